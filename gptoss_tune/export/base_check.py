"""`export --base`: the base checkpoint's tensors checked against the model before anything is merged.

The adapter is checked against the base's config.json (AdapterSource); this checks the base's own
tensors (names, dtypes, shapes, from the safetensors headers: no data read), so a base whose weights
disagree with its config, or a checkpoint of another model, is one line naming the tensor and both
shapes, not a shape error from inside the merge.
"""

from __future__ import annotations

from pathlib import Path

from gptoss_tune.errors import CheckpointError, UserError
from gptoss_tune.model.loader import check_checkpoint


def check_base_tensors(base_dir: Path, adapter_ckpt: Path, base_given: bool) -> None:
    try:
        check_checkpoint(base_dir)
    except CheckpointError as e:
        fix = (
            "pass the --base the adapter was trained on"
            if base_given
            else f"repair it, or pass --base with the model {adapter_ckpt} was trained on"
        )
        raise UserError(f"base model {base_dir}: {e}; {fix}") from None
