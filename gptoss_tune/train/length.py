"""How many optimizer steps a run takes, and the one phrase that says why (for the start line).

As in HF Trainer, TRL and Axolotl: `train.max_steps`, when set, is the length, exactly that many optimizer
steps, and the data stream cycles as often as needed (epoch e is a fresh permutation seeded by
(train.seed, e): gptoss_tune.train.stream), so `train.epochs` is then ignored. Only without max_steps
does `train.epochs` (default 1) decide. (Before, "the smaller wins" with epochs defaulting to 1 stopped a
`max_steps: 40` recipe on a small file after one epoch at step 14, without a word.)
"""

from __future__ import annotations

import math


def _num(x: float) -> str:
    """2.857 -> '2.9', 0.043 -> '0.043', 14.0 -> '14', 123.4 -> '123'."""
    return f"{x:.2g}" if x < 10 else f"{x:.0f}"


def run_length(
    epochs: float | None, max_steps: int | None, per_epoch: int, per_step: int, start_step: int, consumed: int
) -> tuple[int, str]:
    """(total optimizer steps, why). per_epoch: micro-batches in one pass over the training rows; per_step:
    micro-batches one optimizer step takes (processes x grad_accum); start_step and consumed (micro-batches)
    say where a resumed run is. A resumed run never goes back: the total is at least start_step."""
    steps_per_epoch = per_epoch / per_step
    epoch_steps = f"{_num(steps_per_epoch)} step{'' if steps_per_epoch == 1 else 's'}"
    if max_steps is not None:
        total = max(max_steps, start_step)
        why = f"train.max_steps; {_num(max_steps / steps_per_epoch)} epochs of {epoch_steps}"
        if epochs is not None:
            why += f"; train.epochs {epochs:g} is ignored when train.max_steps is set"
        return total, f"{total} steps ({why})"
    n = 1.0 if epochs is None else epochs
    total_mb = max(1, math.ceil(n * per_epoch))
    total = start_step + max(0, math.ceil((total_mb - consumed) / per_step))
    source = f"train.epochs {n:g}" if epochs is not None else "1 epoch: train.epochs and train.max_steps are unset"
    return total, f"{total} steps ({source}; an epoch is {epoch_steps})"
