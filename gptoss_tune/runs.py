"""Layout of a training run directory (written by training, read by export and serve).

RUN_DIR/
  recipe.yaml                  the resolved recipe (all defaults filled in, paths absolute)
  metrics.jsonl                one JSON object per line: {"step", "loss", ...} or {"step", "eval_loss", ...}
  data_report.json             counts from the data stage (examples, tokens, truncated, dropped, skipped)
  checkpoints/step-00000040/   a checkpoint: adapter.json + adapter.safetensors (gptoss_tune.model.adapter),
                               plus trainer state (optimizer, scheduler, RNG, data position)
  best.json                    {"checkpoint": "checkpoints/step-00000040", "step": 40, "metric": "eval_loss", "value": ...}
  final/                       the adapter at the end of training (also a gptoss_tune.model.adapter directory)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from gptoss_tune.errors import UserError

CHECKPOINTS = "checkpoints"
BEST = "best.json"
FINAL = "final"
RECIPE = "recipe.yaml"
METRICS = "metrics.jsonl"
DATA_REPORT = "data_report.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with adapter.json), oldest first."""
    d = Path(run_dir) / CHECKPOINTS
    out = []
    if d.is_dir():
        for p in d.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / "adapter.json").is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def resolve_checkpoint(run_dir: str | Path, which: str = "best") -> Path:
    """'best', 'last' (newest checkpoint, else final/), or a path to a checkpoint/adapter directory."""
    run = Path(run_dir)
    if which not in ("best", "last"):
        p = Path(which)
        if not p.is_absolute() and not p.exists():
            p = run / which
        if not (p / "adapter.json").is_file():
            raise UserError(f"{which}: not a checkpoint directory (no adapter.json)")
        return p
    if not run.is_dir():
        raise UserError(f"run directory '{run}' does not exist")
    if which == "best" and (run / BEST).is_file():
        try:
            best = json.loads((run / BEST).read_text())
            p = run / best["checkpoint"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{run / BEST}: unreadable ({e})") from None
        if (p / "adapter.json").is_file():
            return p
        raise UserError(f"{run / BEST}: points to {p}, which holds no adapter")
    ckpts = list_checkpoints(run)
    if which == "last" and (run / FINAL / "adapter.json").is_file():
        return run / FINAL
    if ckpts:
        return ckpts[-1][1]
    if (run / FINAL / "adapter.json").is_file():
        return run / FINAL
    raise UserError(f"{run}: no checkpoint found (expected {CHECKPOINTS}/step-*/adapter.json or {FINAL}/)")
