"""Post-hoc fixes: procedures that train or rewrite a trained model after the fact and write the result as a
new run or artifact (Denoising ViTs, self-distilled registers). eval/ measures; fixes/ changes the model.
Each module is a library plus a thin CLI: `python -m fixes.<name>`."""
