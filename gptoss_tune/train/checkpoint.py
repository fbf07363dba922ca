"""Training checkpoints, written so that a kill at any moment never leaves a half checkpoint.

    checkpoints/step-00000040/
      adapter.json, adapter.safetensors   the trainable weights (gptoss_tune.model.adapter; export reads these)
      optimizer.safetensors               AdamW state (optimizer-rank{r}.safetensors per process when sharded)
      scheduler.safetensors               learning-rate schedule state
      rng-rank{r}.safetensors             python, numpy, torch (and CUDA) RNG states of process r
      trainer_state.json                  step, data position, best metric, early-stopping counter, ...
      manifest.json                       size and sha256 of every other file (runs.write_manifest), written last

Everything is written into checkpoints/.tmp-step-N, each file fsynced; after every process has written
its files the main process writes the manifest, renames the directory to step-N (atomic on POSIX) and
fsyncs the parent. A checkpoint is complete iff its step-N directory exists (run_dir.list_checkpoints
also requires adapter.json), and intact iff every file matches its manifest (runs.checkpoint_problem:
resume falls back past damaged ones). Old checkpoints are renamed away before being deleted, so a kill
during pruning cannot leave a step-N directory with files missing.

The optimizer, scheduler and RNG states go through gptoss_tune.train.state_codec (safetensors with a JSON
skeleton): nothing is ever unpickled. A checkpoint of an older version (optimizer.pt, scheduler.pt,
rng-rank*.pt: pickles) is refused with one line, since loading a pickle from a downloaded run directory
could run any code. A full disk while writing is one line naming the checkpoint, the bytes it needs and
the free space (write_guard); the partial write is removed and earlier checkpoints stay as they were.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from contextlib import contextmanager
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
    """Every process writes its own files into tmp; the main process writes the shared ones. A full disk
    (or another OSError) is one line (write_guard)."""
    trainable = adapter_state or [p for p in model.parameters() if p.requires_grad]
    with write_guard(tmp, _final_of(tmp), lambda: state_bytes(optimizer.state_dict(), trainable)):
        _write_files(tmp, rank, is_main, sharded, model, optimizer, scheduler, trainer_state, adapter_state)


def _write_files(tmp, rank, is_main, sharded, model, optimizer, scheduler, trainer_state, adapter_state) -> None:
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


# What a full disk looks like from each writer: OSError ENOSPC/EDQUOT from Python, safetensors'
# SafetensorError "IoError(Os { code: 28, kind: StorageFull, ... })", torch.save's "unexpected pos N vs M".
_DISK_FULL_TEXT = ("No space left", "os error 28", "code: 28", "StorageFull", "unexpected pos", "quota exceeded")


def is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(t.lower() in str(e).lower() for t in _DISK_FULL_TEXT)


def state_bytes(*objs) -> int:
    """Bytes of the tensors in nested dicts/lists/tuples (what a checkpoint of them writes, give or take
    the headers)."""
    total, todo = 0, list(objs)
    while todo:
        o = todo.pop()
        if isinstance(o, torch.Tensor):
            total += o.numel() * o.element_size()
        elif isinstance(o, dict):
            todo += o.values()
        elif isinstance(o, (list, tuple)):
            todo += o
    return total


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def _final_of(tmp: Path) -> Path:
    return tmp.with_name(tmp.name.removeprefix(".tmp-"))


@contextmanager
def write_guard(tmp: Path, final: Path, needed, last: Path | None = None):
    """Around the writing of checkpoint `final` through `tmp`: an OSError or a full disk becomes one line
    naming `final`, the bytes it needs (needed(): a callable, evaluated only then) and the free space; the
    partial tmp directory is removed, so every earlier checkpoint stays as it was, intact and resumable.
    `last`: the checkpoint to continue from (default: the run's newest)."""
    try:
        yield
    except Exception as e:
        full = is_disk_full(e)
        if not (full or isinstance(e, OSError)):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        if last is None and final.parent.name == CHECKPOINTS:
            older = [p for s, p in list_checkpoints(final.parent.parent) if p != final]
            last = older[-1] if older else None
        then = (
            f"then run the same command with resume=auto to continue from {last}"
            if last is not None
            else "then run again (no checkpoint of this run was written yet)"
        )
        if not full:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:120]
            raise UserError(
                f"{final}: cannot write this checkpoint ({reason}); fix the output directory, {then}"
            ) from None
        try:
            free = _size(shutil.disk_usage(final.parent).free)
        except OSError:
            free = "an unknown amount"
        need = needed() + (1 << 20)  # the tensors, and ~1 MiB of headers, JSON and the manifest
        raise UserError(
            f"{final}: the disk is full: this checkpoint needs about {_size(need)} ({need} bytes) and {free} "
            f"are free on {final.parent} (after removing the partial write); free space there or lower "
            f"checkpoint.keep, {then}"
        ) from None


def prepare_tmp(run_dir: Path, step: int) -> Path:
    """Main process: a fresh, empty temporary directory for step's checkpoint."""
    tmp = tmp_dir_for(run_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    with write_guard(tmp, _final_of(tmp), lambda: 0):
        tmp.mkdir(parents=True)
    return tmp


def commit(run_dir: Path, step: int) -> Path:
    """Main process, after every process wrote its files: the manifest (sizes and sha256 of them all, so
    resume can tell a damaged checkpoint), then rename the finished temporary directory into place."""
    tmp = tmp_dir_for(run_dir, step)
    with write_guard(tmp, _final_of(tmp), lambda: 0):
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
    def apply(state):
        optimizer.load_state_dict(state)
        if not sharded:  # load_state_dict does not compare shapes: a wrong one would fail only at the next step
            for group in optimizer.param_groups:
                for p in group["params"]:
                    for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                        v = optimizer.state.get(p, {}).get(k)
                        if isinstance(v, torch.Tensor) and v.shape != p.shape:
                            raise ValueError(f"{k} of shape {list(v.shape)} for a parameter of shape {list(p.shape)}")

    _apply(ckpt, optimizer_file(rank, sharded), apply, map_location)


def load_scheduler_state(ckpt: Path, scheduler) -> None:
    _apply(ckpt, SCHEDULER, scheduler.load_state_dict)


def load_rng_state(ckpt: Path, rank: int) -> bool:
    """False when ckpt holds no RNG state for this rank (written by fewer processes)."""
    if not (Path(ckpt) / rng_file(rank)).is_file():
        refuse_legacy(ckpt)
        return False
    _apply(ckpt, rng_file(rank), set_rng_state)
    return True
