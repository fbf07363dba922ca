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

import errno
import fcntl
import json
import os
import re
import shutil
from pathlib import Path

from gptoss_tune.atomic_io import atomic_write_text
from gptoss_tune.errors import UserError
from gptoss_tune.model.adapter import CONFIG_FILE as ADAPTER_CONFIG

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
    """Complete checkpoints (those with an adapter config), oldest first."""
    d = Path(run_dir) / CHECKPOINTS
    out = []
    if d.is_dir():
        for p in d.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / ADAPTER_CONFIG).is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def resolve_checkpoint(run_dir: str | Path, which: str = "best") -> Path:
    """'best', 'last' (newest checkpoint, else final/), or a path to a checkpoint/adapter directory."""
    run = Path(run_dir)
    if which not in ("best", "last"):
        p = Path(which)
        if not p.is_absolute() and not p.exists():
            p = run / which
        if not (p / ADAPTER_CONFIG).is_file():
            raise UserError(f"{which}: not a checkpoint directory (no {ADAPTER_CONFIG})")
        return p
    if not run.is_dir():
        raise UserError(f"run directory '{run}' does not exist")
    if which == "best" and (run / BEST).is_file():
        try:
            best = json.loads((run / BEST).read_text())
            p = run / best["checkpoint"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{run / BEST}: unreadable ({e})") from None
        if (p / ADAPTER_CONFIG).is_file():
            return p
        raise UserError(f"{run / BEST}: points to {p}, which holds no adapter")
    ckpts = list_checkpoints(run)
    if which == "last" and (run / FINAL / ADAPTER_CONFIG).is_file():
        return run / FINAL
    if ckpts:
        return ckpts[-1][1]
    if (run / FINAL / ADAPTER_CONFIG).is_file():
        return run / FINAL
    raise UserError(f"{run}: no checkpoint found (expected {CHECKPOINTS}/step-*/{ADAPTER_CONFIG} or {FINAL}/)")


def _metric_lines(path: Path):
    """(line, record) of each line of a metrics.jsonl that holds a JSON object; a torn or foreign line
    (a run killed mid-write) is skipped."""
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                yield line, rec


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, in order (the one reader: model card, resume, tests)."""
    return [rec for _, rec in _metric_lines(path)]


def holds_run(out: Path) -> bool:
    return any((out / n).exists() for n in (RECIPE, METRICS, CHECKPOINTS))


def trained(out: Path) -> bool:
    """Whether the run in `out` got anywhere: a checkpoint, or a line in metrics.jsonl."""
    metrics = out / METRICS
    return bool(list_checkpoints(out)) or (metrics.is_file() and metrics.stat().st_size > 0)


def lock_run_dir(out: Path, source: str) -> int | None:
    """Main process: create output_dir and hold an exclusive lock on it for the whole run, so a second
    training in the same directory is refused instead of interleaving checkpoints. Returns the fd (the
    lock lasts until it is closed or the process ends); None where the filesystem has no flock."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"{source}: output_dir '{out}' cannot be created ({e.strerror}); choose a writable directory"
        ) from None
    fd = os.open(str(out), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            raise UserError(
                f"{source}: output_dir '{out}' is in use by another training process; wait for it to finish or choose another output_dir"
            ) from None
        return None
    return fd


def wipe(out: Path) -> None:
    for p in Path(out).iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics.jsonl lines after `step` (a resumed run writes them again) and any torn last line."""
    if path.is_file():
        kept = [line for line, rec in _metric_lines(path) if isinstance(rec.get("step"), int) and rec["step"] <= step]
        atomic_write_text(path, "".join(k + "\n" for k in kept))
