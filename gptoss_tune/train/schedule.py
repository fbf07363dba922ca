"""The learning-rate schedule, and how a resumed run makes its own recipe's hyperparameters current.

The trainer builds a LambdaLR over the peak lr (train.lr) with the multiplier below; a resumed run keeps
the warmup length its checkpoint recorded (trainer_state.json "warmup_steps") and recomputes the rest
from this recipe's length, then calls apply_recipe_hyperparameters after loading the optimizer and
scheduler states.
"""

from __future__ import annotations

import math


def lr_lambda(total_steps: int, warmup_steps: int, kind: str, min_ratio: float):
    """Multiplier of the peak lr for optimizer step s (0-based): linear warmup to 1 over warmup_steps
    (the first step already gets 1/warmup of the peak), then cosine/linear decay to min_ratio, or constant."""

    def f(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps))
        if kind == "cosine":
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return min_ratio + (1 - min_ratio) * (1 - progress)

    return f


def apply_recipe_hyperparameters(optimizer, scheduler, schedule, cfg_t) -> None:
    """After loading a checkpoint's optimizer and scheduler state, make this recipe's settings current.

    Both states carry the settings of the run that wrote them: the optimizer its lr, betas, eps and weight
    decay, LambdaLR the peak lr and the learning rate its last step() computed from the old schedule. A
    continuation that changes the length (train.max_steps, train.epochs) has another schedule, and its
    first step would run at the old one's rate (0 at the end of a finished cosine run); a run branched
    with resume: PATH may change lr or weight decay, which would be silently ignored. Unchanged settings
    give the same numbers, so exact resume is unaffected."""
    sched = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper under DeepSpeed
    factor = schedule(sched.last_epoch)
    sched.base_lrs = [cfg_t.lr for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group.update(
            initial_lr=cfg_t.lr,
            lr=cfg_t.lr * factor,
            betas=(cfg_t.adam_beta1, cfg_t.adam_beta2),
            eps=cfg_t.adam_eps,
            weight_decay=cfg_t.weight_decay,
        )
    sched._last_lr = [group["lr"] for group in optimizer.param_groups]
