"""Post-hoc fixes that write a model: they fit or train something on a finished model and save the result as a
new run dir that every eval, sample.py and train.init_from read. eval/ only measures."""
