"""Divergence: when a run has gone wrong, stop before keeping anything unsound, and say what to change.

Three symptoms, one guard (DivergenceGuard; the trainer calls it after every update and before every save):

- a NaN/inf loss or gradient norm (the trainer checks those before the update and raises here);
- unsound parameters: any trainable tensor non-finite, or their global L2 norm more than EXPLODED_FACTOR
  times the norm this process started from. AdamW moves each element by at most about lr per step, so a
  sound run's norm grows slowly: measured on the tiny model, lr 3e-2 (already too high: the loss climbs back)
  grew it 6x in 150 steps, while one step at lr 1e6 grew it 1.7e7x and one at 1e30 to 1e30. A worst case
  of lr 2e-4 for 10,000 steps, every element moving the same way every step, stays near 200x against
  LoRA A's initial scale, so 1000x is never a sound run. Such parameters are never written to a checkpoint;
- vanishing gradients: a gradient norm of exactly 0 for VANISHED_STEPS steps in a row means nothing learns
  any more (lr 1e6 saturated the tiny model: 0 from step 3 on, the loss flat, exit 0 before). A warning,
  since the run itself is not broken.

The advice names the setting that most likely caused it (lora.alpha far above the rank, train.lr far above
the range LoRA uses, no gradient clipping) with a concrete value, and a command that works as printed:
a new output_dir (the diverged run stays for inspection, and a changed lr in the same one would be refused
as "a different run"), branched from the last sound checkpoint when the LoRA settings stay the same, else
a fresh start (a checkpoint trained with another lora.alpha cannot be loaded under a new one).
"""

from __future__ import annotations

import math
import os
import shlex
from pathlib import Path

import torch

from gptoss_tune.errors import UserError
from gptoss_tune.runs import RECIPE

EXPLODED_FACTOR = 1000.0
VANISHED_STEPS = 3
DEFAULT_LR = 2e-4  # the recipe default; 1e-4 to 2e-4 is the usual range for LoRA at alpha/rank = 2
HIGH_LR = 1e-2  # 50x the default: no LoRA recipe uses more (the random tiny demo model needs 1e-2)
HIGH_SCALE = 64.0  # lora.alpha / lora.rank; 1 to 4 is usual


class TrainingDiverged(UserError):
    """The loss, gradient or parameters became NaN/inf or exploded: the run stops (exit 3) without keeping it."""

    exit_code = 3


def _local(p: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter: the shard of an FSDP2 DTensor or a DeepSpeed ZeRO-3 partition."""
    if hasattr(p, "to_local"):
        return p.to_local()
    ds = getattr(p, "ds_tensor", None)
    return ds if ds is not None else p


def parameter_norm(params, reduce=None) -> float:
    """Global L2 norm of the parameters (inf/nan when any element is); `reduce` sums a tensor over the
    processes when parameters are sharded (every process must call it then). Accumulated in float64, which
    holds the square of any float32 (a float32 sum of squares would overflow at 1e19 and read as non-finite);
    one reduction per tensor and one host sync per call."""
    # _local before detach: a detached ZeRO-3 parameter loses its ds_tensor (this rank's partition)
    tensors = [t for t in (_local(p).detach() for p in params) if t.numel()]
    if tensors:
        sq = torch.stack([torch.linalg.vector_norm(t, dtype=torch.float64) for t in tensors]).pow(2).sum()
    else:
        sq = torch.zeros((), dtype=torch.float64)
    if reduce is not None:
        sq = reduce(sq)
    return math.sqrt(float(sq))


def _fmt(x: float) -> str:
    return f"{x:.1g}" if x < 1e-3 or x >= 1e4 else f"{x:g}"


def likely_cause(recipe) -> tuple[str, dict[str, str]]:
    """(why, the settings to change with their new values), most likely cause first."""
    lora, cfg = recipe.lora, recipe.train
    scale = lora.alpha / lora.rank
    if scale > HIGH_SCALE:
        alpha = 2 * lora.rank
        return (
            f"lora.alpha {lora.alpha:g} scales the LoRA update by alpha/rank = {scale:g} (1 to 4 is usual)",
            {"lora.alpha": f"{alpha}"},
        )
    fix: dict[str, str] = {}
    if cfg.lr > HIGH_LR:
        why = f"train.lr {cfg.lr:g} is far above the range LoRA trains at (1e-4 to 2e-4; the default is 2e-4)"
        fix["train.lr"] = _fmt(DEFAULT_LR)
    else:
        why = f"train.lr {cfg.lr:g} is too high for this model and data"
        fix["train.lr"] = _fmt(float(f"{cfg.lr / 4:.1g}"))
    if cfg.max_grad_norm == 0:
        why += ", and gradient clipping is off (train.max_grad_norm 0)"
        fix["train.max_grad_norm"] = "1.0"
    return why, fix


def retry_command(recipe, run_dir: Path, sound: Path | None, fix: dict[str, str], num_processes: int) -> str:
    """A command that continues (from `sound`) or restarts the run with `fix`, into a new output_dir next to
    run_dir; from run_dir/recipe.yaml, which holds every setting of this run with absolute paths."""
    run_dir = Path(run_dir)
    tag = "-".join(f"{k.split('.')[-1].replace('max_grad_norm', 'clip')}{v}" for k, v in fix.items())
    out = run_dir.with_name(f"{run_dir.name}-{tag}")
    n = 2
    while out.exists():
        out = run_dir.with_name(f"{run_dir.name}-{tag}-{n}")
        n += 1
    branch = sound is not None and not any(k.startswith("lora.") for k in fix)
    args = [str(run_dir / RECIPE), f"resume={sound}" if branch else "resume=never"]
    args += [f"{k}={v}" for k, v in fix.items()] + [f"output_dir={out}"]
    launch = "gptoss-tune train" if num_processes == 1 else accelerate_launch_prefix(num_processes)
    return f"{launch} {' '.join(shlex.quote(a) for a in args)}"


def accelerate_launch_prefix(num_processes: int, cmdline: list[str] | None = None) -> str:
    """`accelerate launch <the user's flags> -m gptoss_tune.train`: the flags (--config_file above all, which
    chose FSDP2 or DeepSpeed) are read from the launcher, the parent of every rank; accelerate passes no
    record of them to the ranks. Without them (another launcher, no /proc) --num_processes alone."""
    if cmdline is None:
        try:
            raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
            cmdline = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        except OSError:
            cmdline = []
    if "launch" in cmdline and "gptoss_tune.train" in cmdline:
        flags = cmdline[cmdline.index("launch") + 1 : cmdline.index("gptoss_tune.train") - 1]
        if flags and cmdline[cmdline.index("gptoss_tune.train") - 1] == "-m":
            return " ".join(["accelerate", "launch", *map(shlex.quote, flags), "-m", "gptoss_tune.train"])
    return f"accelerate launch --num_processes {num_processes} -m gptoss_tune.train"


class DivergenceGuard:
    """Checks one run's parameters and gradients; every process holds one and decides the same."""

    def __init__(self, recipe, run_dir: Path, params, reduce=None, num_processes: int = 1):
        self.recipe, self.run_dir, self.params, self.reduce = recipe, Path(run_dir), list(params), reduce
        self.num_processes = num_processes
        numel = sum(_local(p).numel() for p in self.params)
        self.start_norm = parameter_norm(self.params, reduce)
        # LoRA B starts at zero; should every trainable tensor start at zero, compare with an rms of 0.01 per
        # element (LoRA A's initial scale for a 2880-wide model is 1/sqrt(3 * 2880) = 0.011).
        self.reference = max(self.start_norm, 0.01 * math.sqrt(max(numel, 1)))
        self.zero_grad_since: int | None = None
        self.vanished: str | None = None

    def unsound(self) -> str | None:
        """Why the parameters as they are now must not be kept, or None."""
        norm = parameter_norm(self.params, self.reduce)
        if not math.isfinite(norm):
            return "the trainable parameters are no longer finite"
        if norm > EXPLODED_FACTOR * self.reference:
            return (
                f"the trainable parameters exploded (L2 norm {self.start_norm:.3g} at the start, {norm:.3g} now: "
                f"more than {EXPLODED_FACTOR:g}x)"
            )
        return None

    def diverged(self, step: int, what: str, sound: Path | None, saved: bool = True) -> TrainingDiverged:
        """The exception to raise at `step`: what happened, the likely cause, and the command to go on."""
        why, fix = likely_cause(self.recipe)
        cmd = retry_command(self.recipe, self.run_dir, sound, fix, self.num_processes)
        kept = "the last sound checkpoint is " + str(sound) if sound is not None else "no sound checkpoint was written"
        go = "continue from it" if "resume=never" not in cmd else "start again"
        return TrainingDiverged(f"step {step}: {what}; {kept}. Likely cause: {why}. To {go}: {cmd}")

    def after_update(self, step: int, sound: Path | None) -> None:
        """Raise TrainingDiverged when the update of `step` left unsound parameters."""
        problem = self.unsound()
        if problem is not None:
            raise self.diverged(step, f"{problem}; stopped before keeping them", sound)

    def grad_norm(self, step: int, norm: float) -> str | None:
        """Count steps with a gradient norm of exactly 0; the warning, once, on the VANISHED_STEPS-th."""
        if norm != 0.0:
            self.zero_grad_since = None
            return None
        if self.zero_grad_since is None:
            self.zero_grad_since = step
        if self.vanished is None and step - self.zero_grad_since + 1 >= VANISHED_STEPS:
            _, fix = likely_cause(self.recipe)
            self.vanished = (
                f"warning: the gradient norm has been exactly 0 since step {self.zero_grad_since}: nothing is learning "
                f"any more (the loss stays flat). Either no token is trained (check the data report's trained tokens "
                f"and data.train_on), or too large updates saturated the model: lower train.lr "
                f"({self.recipe.train.lr:g}; e.g. train.lr={fix.get('train.lr', _fmt(DEFAULT_LR))}) and start again"
            )
            return self.vanished
        return None
