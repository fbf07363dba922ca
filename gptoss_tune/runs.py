"""Layout of a training run directory (written by training, read by export and serve).

RUN_DIR/
  recipe.yaml                  the resolved recipe (all defaults filled in, paths absolute)
  metrics.jsonl                one JSON object per line: {"step", "loss", ...} or {"step", "eval_loss", ...}
  data_report.json             counts from the data stage (examples, tokens, truncated, dropped, skipped)
  checkpoints/step-00000040/   a checkpoint: adapter.json + adapter.safetensors (gptoss_tune.model.adapter),
                               plus trainer state (optimizer, scheduler, RNG, data position) and manifest.json
                               (size and sha256 of every other file, written last: see checkpoint_problem)
  checkpoints/damaged-step-*/  a damaged checkpoint that resume set aside (kept for inspection, never read)
  best.json                    {"checkpoint": "checkpoints/step-00000040", "step": 40, "metric": "eval_loss", "value": ...}
  final/                       the adapter at the end of training (also a gptoss_tune.model.adapter directory)
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

from gptoss_tune.atomic_io import atomic_write_text, fsync_path, sha256_of
from gptoss_tune.errors import UserError
from gptoss_tune.model.adapter import CONFIG_FILE as ADAPTER_CONFIG

CHECKPOINTS = "checkpoints"
BEST = "best.json"
FINAL = "final"
RECIPE = "recipe.yaml"
METRICS = "metrics.jsonl"
DATA_REPORT = "data_report.json"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "gptoss_tune.checkpoint"
ADAPTER_FILES = (ADAPTER_CONFIG, "adapter.safetensors")
# what versions before the manifest wrote with torch.save (pickles): never loaded, the checkpoint is refused
LEGACY_PICKLES = ("optimizer.pt", "scheduler.pt", "optimizer-rank*.pt", "rng-rank*.pt")
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


def _file_entry(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": sha256_of(path)}


def manifest_of(ckpt: Path) -> dict:
    """Size and sha256 of every file in ckpt (flat: a checkpoint has no subdirectories)."""
    files = {p.name: _file_entry(p) for p in sorted(Path(ckpt).iterdir()) if p.is_file() and p.name != MANIFEST}
    return {"format": MANIFEST_FORMAT, "version": 1, "files": files}


def write_manifest(ckpt: Path, manifest: dict | None = None) -> None:
    """manifest.json, atomically: written last, after every other file of the checkpoint is complete."""
    manifest = manifest if manifest is not None else manifest_of(ckpt)
    atomic_write_text(Path(ckpt) / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def rewrite_json(ckpt: Path, name: str, text: str) -> None:
    """Replace one JSON file of a committed checkpoint (its trainer_state.json) so that a kill at any moment
    leaves a checkpoint that verifies: the manifest first accepts both versions, then only the new one."""
    ckpt = Path(ckpt)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    files = manifest["files"]
    data = text.encode("utf-8")
    new = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if name in files:
        write_manifest(ckpt, {**manifest, "files": {**files, name: {**new, "previous": files[name]}}})
    atomic_write_text(ckpt / name, text)
    write_manifest(ckpt, {**manifest, "files": {**files, name: new}})


def legacy_pickles(ckpt: Path) -> list[str]:
    """Names of the pickle files an older version wrote into ckpt (sorted)."""
    return sorted({p.name for pat in LEGACY_PICKLES for p in Path(ckpt).glob(pat)})


def checkpoint_problem(ckpt: Path, files: tuple[str, ...] | None = None) -> str | None:
    """None if ckpt is intact, else what is wrong with it, in a few words naming the file. Checks the files
    of `files` (default: all the manifest lists) against the sizes and sha256 recorded when it was written,
    so a truncated, missing or altered file is found before anything is loaded."""
    ckpt = Path(ckpt)
    found = legacy_pickles(ckpt) if files is None else []
    if found:
        return f"it holds {', '.join(found)}, pickle files of an older gptoss-tune version, which are never loaded (a pickle can run code)"
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        listed = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(listed, dict):
            raise ValueError("not a gptoss-tune manifest")
    except FileNotFoundError:
        return f"{MANIFEST} is missing (written by an older version, or not completely)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} is unreadable ({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})"
    for name in files if files is not None else sorted(listed):
        entry = listed.get(name)
        if not isinstance(entry, dict) or "/" in name or name in ("", ".", ".."):
            return f"{MANIFEST} does not list {name}"
        p = ckpt / name
        if not p.is_file():
            return f"{name} is missing"
        accepted = [e for e in (entry, entry.get("previous")) if isinstance(e, dict)]
        size = p.stat().st_size
        if all(size != e.get("size") for e in accepted):
            return f"{name} is {size} bytes, {entry.get('size')} were written (truncated or replaced)"
        if sha256_of(p) not in [e.get("sha256") for e in accepted]:
            return f"{name} does not match the sha256 recorded when it was written (damaged or edited)"
    return None


def set_aside(ckpt: Path) -> Path:
    """Rename a damaged checkpoint to damaged-step-N (kept for inspection; list_checkpoints ignores it)."""
    ckpt = Path(ckpt)
    dest = ckpt.with_name(f"damaged-{ckpt.name}")
    n = 1
    while dest.exists():
        n += 1
        dest = ckpt.with_name(f"damaged-{ckpt.name}-{n}")
    os.rename(ckpt, dest)
    fsync_path(ckpt.parent)
    return dest


def adapter_problem(p: Path) -> str | None:
    """checkpoint_problem for what export and serve read (the adapter files). A directory without a
    manifest (final/ or a checkpoint of an older version) passes: its files are checked when read."""
    return checkpoint_problem(p, ADAPTER_FILES) if (Path(p) / MANIFEST).exists() else None


def intact_adapter(p: Path) -> Path:
    """p, or a one-line UserError naming it and what is damaged."""
    problem = adapter_problem(p)
    if problem is not None:
        raise UserError(f"{p}: damaged checkpoint ({problem}); choose another checkpoint of the run")
    return p


def resolve_checkpoint(run_dir: str | Path, which: str = "best") -> Path:
    """'best', 'last' (final/, else the newest checkpoint), or a path to a checkpoint/adapter directory.
    A damaged named checkpoint (best.json's, or a path) is refused; 'last' skips damaged ones, saying so."""
    run = Path(run_dir)
    if which not in ("best", "last"):
        p = Path(which)
        if not p.is_absolute() and not p.exists():
            p = run / which
        if not (p / ADAPTER_CONFIG).is_file():
            raise UserError(f"{which}: not a checkpoint directory (no {ADAPTER_CONFIG})")
        return intact_adapter(p)
    if not run.is_dir():
        raise UserError(f"run directory '{run}' does not exist")
    if which == "best" and (run / BEST).is_file():
        try:
            best = json.loads((run / BEST).read_text())
            p = run / best["checkpoint"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{run / BEST}: unreadable ({e})") from None
        if (p / ADAPTER_CONFIG).is_file():
            return intact_adapter(p)
        raise UserError(f"{run / BEST}: points to {p}, which holds no adapter")
    candidates = [p for _, p in reversed(list_checkpoints(run))]
    if (run / FINAL / ADAPTER_CONFIG).is_file():
        candidates.insert(0 if which == "last" else len(candidates), run / FINAL)
    skipped = []
    for p in candidates:
        problem = adapter_problem(p)
        if problem is None:
            for q, why in skipped:
                print(f"note: skipping {q}, which is damaged ({why}); using {p}", file=sys.stderr, flush=True)
            return p
        skipped.append((p, problem))
    if skipped:
        q, why = skipped[0]
        raise UserError(f"{run}: every checkpoint is damaged (e.g. {q}: {why}); nothing intact to read")
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
