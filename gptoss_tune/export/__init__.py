"""The export stage: a run's checkpoint -> an adapter, a merged bf16 or a merged MXFP4 model."""

FORMATS = ("adapter", "merged-bf16", "merged-mxfp4")
