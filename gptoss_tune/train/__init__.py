"""The training stage: a recipe, the model and the data rows -> a run directory of checkpoints."""
