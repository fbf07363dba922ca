"""Training checkpoints, written so that a kill at any moment never leaves a half checkpoint.

    checkpoints/step-00000040/
      adapter.json, adapter.safetensors   the trainable weights (gptoss_tune.model.adapter; export reads these)
      optimizer.safetensors               AdamW state (optimizer-rank{r}.safetensors per process when sharded)
      scheduler.safetensors               learning-rate schedule state
      rng-rank{r}.safetensors             python, numpy, torch (and CUDA) RNG states of process r
      trainer_state.json                  step, data position, best metric, early-stopping counter, ...

Everything is written into checkpoints/.tmp-step-N, each file fsynced, then the directory is renamed to
step-N (atomic on POSIX) and the parent fsynced. A checkpoint is complete iff its step-N directory exists
(run_dir.list_checkpoints also requires adapter.json). Old checkpoints are renamed away before being
deleted, so a kill during pruning cannot leave a step-N directory with files missing.

The optimizer, scheduler and RNG states go through gptoss_tune.train.state_codec (safetensors with a JSON
skeleton): nothing is ever unpickled. A checkpoint of an older version (optimizer.pt, scheduler.pt,
rng-rank*.pt: pickles) is refused with one line, since loading a pickle from a downloaded run directory
could run any code.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from gptoss_tune.atomic_io import atomic_write_text, fsync_path
from gptoss_tune.errors import UserError
from gptoss_tune.model.adapter import save_adapter
from gptoss_tune.runs import (
    BEST,
    CHECKPOINTS,
    legacy_pickles,
    list_checkpoints,
    rewrite_json,
    set_aside,  # noqa: F401  (for the trainer)
    step_dir_name,
    write_manifest,
)
from gptoss_tune.train.state_codec import load_state, save_state

TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
SCHEDULER = "scheduler.safetensors"


def optimizer_file(rank: int, sharded: bool) -> str:
    return f"optimizer-rank{rank}.safetensors" if sharded else OPTIMIZER


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.safetensors"


def fsync_tree(path: Path) -> None:
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            fsync_path(p)
    fsync_path(path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # One state per device visible when saved; a resume that sees fewer devices (another machine,
        # CUDA_VISIBLE_DEVICES) restores those it has instead of failing on an invalid device ordinal.
        for i, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, i)


def tmp_dir_for(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f".tmp-{step_dir_name(step)}"


def write_checkpoint_files(
    tmp: Path,
    *,
    rank: int,
    is_main: bool,
    sharded: bool,
    model,
    optimizer,
    scheduler,
    trainer_state: dict,
    adapter_state: dict | None = None,
) -> None:
    """Every process writes its own files into tmp; the main process writes the shared ones."""
    save_state(rng_state(), tmp / rng_file(rank))
    if sharded:
        save_state(optimizer.state_dict(), tmp / optimizer_file(rank, sharded))
    if is_main:
        save_adapter(model, tmp, state=adapter_state)
        if not sharded:
            save_state(optimizer.state_dict(), tmp / OPTIMIZER)
        save_state(scheduler.state_dict(), tmp / SCHEDULER)
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2) + "\n")
        fsync_tree(tmp)


def prepare_tmp(run_dir: Path, step: int) -> Path:
    """Main process: a fresh, empty temporary directory for step's checkpoint."""
    tmp = tmp_dir_for(run_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(run_dir: Path, step: int) -> Path:
    """Main process, after every process wrote its files: the manifest (sizes and sha256 of them all, so
    resume can tell a damaged checkpoint), then rename the finished temporary directory into place."""
    tmp = tmp_dir_for(run_dir, step)
    write_manifest(tmp)
    final = Path(run_dir) / CHECKPOINTS / step_dir_name(step)
    if final.exists():  # only after a crash between a previous commit and its bookkeeping
        _remove(final)
    os.rename(tmp, final)
    fsync_path(final.parent)
    return final


def _remove(path: Path) -> None:
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.rename(path, trash)
    fsync_path(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def clean_stale(run_dir: Path) -> None:
    """Remove leftovers of interrupted writes and deletions (.tmp-*, .trash-*)."""
    d = Path(run_dir) / CHECKPOINTS
    if d.is_dir():
        for p in d.iterdir():
            if p.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(p, ignore_errors=True)


def prune(run_dir: Path, keep: int, best_step: int | None) -> list[Path]:
    """Keep the newest `keep` checkpoints and the best one; delete the rest (oldest first)."""
    ckpts = list_checkpoints(run_dir)
    newest = {s for s, _ in ckpts[-keep:]}
    removed = []
    for s, p in ckpts:
        if s in newest or s == best_step:
            continue
        _remove(p)
        removed.append(p)
    return removed


def write_best(run_dir: Path, step: int, value: float, metric: str = "eval_loss") -> None:
    best = {"checkpoint": f"{CHECKPOINTS}/{step_dir_name(step)}", "step": step, "metric": metric, "value": value}
    atomic_write_text(Path(run_dir) / BEST, json.dumps(best, indent=2) + "\n")


def rewrite_trainer_state(ckpt: Path, trainer_state: dict) -> None:
    """New bookkeeping for a committed checkpoint (an evaluation at its step, the run finished there)."""
    rewrite_json(ckpt, TRAINER_STATE, json.dumps(trainer_state, indent=2) + "\n")


def read_trainer_state(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / TRAINER_STATE).read_text())


def refuse_legacy(ckpt: Path) -> None:
    """One line for a checkpoint holding pickles (an older version's, or a crafted one): never unpickled."""
    found = legacy_pickles(ckpt)
    if found:
        raise UserError(
            f"{ckpt}: holds {', '.join(found)}, pickle files of an older gptoss-tune version, which are never loaded "
            f"(a pickle can run code); export its adapter, or start over with resume=never overwrite=true"
        )


def _apply(ckpt: Path, name: str, apply, device="cpu") -> None:
    """Read state file `name` of ckpt and hand it to `apply`; a state of another shape is one line too."""
    refuse_legacy(ckpt)
    path = Path(ckpt) / name
    state = load_state(path, device=device)
    try:
        apply(state)
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(
            f"{path}: does not fit this run ({reason}); resume from a checkpoint of this run, or start over"
        ) from None


def load_optimizer_state(ckpt: Path, optimizer, rank: int, sharded: bool, map_location="cpu") -> None:
    # Optimizer.load_state_dict moves each state tensor to its parameter's device.
    _apply(ckpt, optimizer_file(rank, sharded), optimizer.load_state_dict, map_location)


def load_scheduler_state(ckpt: Path, scheduler) -> None:
    _apply(ckpt, SCHEDULER, scheduler.load_state_dict)


def load_rng_state(ckpt: Path, rank: int) -> bool:
    """False when ckpt holds no RNG state for this rank (written by fewer processes)."""
    if not (Path(ckpt) / rng_file(rank)).is_file():
        refuse_legacy(ckpt)
        return False
    _apply(ckpt, rng_file(rank), set_rng_state)
    return True
