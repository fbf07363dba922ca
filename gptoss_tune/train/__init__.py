"""The training stage: a recipe, the model and the data rows -> a run directory of checkpoints.

Takes a validated recipe (`recipe.load_recipe`); gives a run directory (layout in gptoss_tune.runs):
metrics, checkpoints, the best and final adapters (`trainer.train`). Launched by
`accelerate launch -m gptoss_tune.train RECIPE` or `gptoss-tune train RECIPE`.

    recipe       the recipe schema and loading (YAML, overrides, one-line errors with file:line)
    resume       what to do with the output directory: start, resume, branch, or refuse
    stream       the deterministic micro-batch stream over the data rows (and evaluation batches)
    length       how many steps a run takes (train.max_steps over train.epochs) and why
    objective    the loss as one module: chunked LM loss (chunked_ce) + load-balancing loss (losses)
    memory       MemorySettings: activation checkpointing, host offload, the optimizer
    trainer      the Trainer: set-up, the loop, evaluation, early stopping, checkpoints
    divergence   non-finite/exploded parameters never kept, the advice and command after a divergence
    datafiles    the data files' fingerprints, so a resume notices changed data
    checkpoint   atomic checkpoint files and their loading
    tracking     metrics.jsonl, Weights & Biases, the console
"""
