"""Post-hoc fixes: procedures that fit, train or rewrite a finished model and write the result as a new run
dir that every eval, sample.py and train.init_from read (test-time sinks, Denoising ViTs, self-distilled
registers). eval/ measures; fixes/ changes the model. Each module is a library plus a thin CLI:
`python -m fixes.<name>`."""
