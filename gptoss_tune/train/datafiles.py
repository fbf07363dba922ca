"""The data files a run trains on, recorded so that a resumed run notices when they changed.

A run's data position is a count of micro-batches into a permutation of the training rows: continued on
other rows under the same path (a file rewritten from 20 examples to 7), it silently trains on a different
stream from a meaningless position, and its validation loss is no longer comparable with the best one.
So a run records, in RUN_DIR/data_files.json, each data file's (or saved dataset directory's) size, line
count and sha256 when it starts; resuming it (resume: auto, or resume: PATH of one of its checkpoints)
with any of them changed is refused with one line naming the file, unless `resume_allow_data_change: true`.
A run branched from another run's checkpoint (resume: PATH elsewhere) is checked against that run's record
for the files it reads under the same path (new paths are new data, which is what branching is for).
Hashing reads the files once: about 1 s per GB.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from gptoss_tune.atomic_io import atomic_write_text
from gptoss_tune.errors import UserError

DATA_FILES = "data_files.json"
_KEYS = ("train", "validation")


def _digest_file(path: Path, h, counts: dict) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            counts["size"] += len(chunk)
            counts["lines"] += chunk.count(b"\n")


def fingerprint(path: str | Path) -> dict:
    """{"path", "size", "lines", "sha256"} of a file, or of every file under a directory (by relative path)."""
    p = Path(path)
    h = hashlib.sha256()
    counts = {"size": 0, "lines": 0}
    if p.is_dir():
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(os.fsencode(f.relative_to(p)) + b"\0")
            _digest_file(f, h, counts)
    else:
        _digest_file(p, h, counts)
    return {"path": str(p), **counts, "sha256": h.hexdigest()}


def data_fingerprints(recipe) -> dict:
    out = {}
    for key in _KEYS:
        path = getattr(recipe.data, key)
        if path and Path(path).exists():
            try:
                out[key] = fingerprint(path)
            except OSError as e:
                raise UserError(
                    f"{recipe.where('data', key)}: data.{key}: '{path}' cannot be read ({e.strerror or e})"
                ) from None
    return out


def _recorded(run_dir: Path) -> dict | None:
    try:
        d = json.loads((run_dir / DATA_FILES).read_text())
        return d if isinstance(d, dict) else None
    except (OSError, ValueError):
        return None


def check_data_files(recipe, plan, run_dir: Path) -> dict:
    """The data files' fingerprints now; raises UserError when a resumed run's data changed under the same path
    (unless recipe.resume_allow_data_change, which prints what changed and goes on)."""
    now = data_fingerprints(recipe)
    if plan.mode != "resume":
        return now
    source = Path(plan.checkpoint).parent.parent if plan.branch else Path(run_dir)
    before = _recorded(source) or {}
    for key, cur in now.items():
        old = before.get(key)
        if not isinstance(old, dict) or old.get("path") != cur["path"] or old.get("sha256") == cur["sha256"]:
            continue
        what = (
            f"data.{key}: '{cur['path']}' changed since the run in {source} recorded it "
            f"({old.get('lines')} -> {cur['lines']} lines, {old.get('size')} -> {cur['size']} bytes)"
        )
        if recipe.resume_allow_data_change:
            if os.environ.get("RANK", "0") == "0":  # every process checks; one says so
                print(f"note: {what}; continuing on the new data (resume_allow_data_change)", flush=True)
            continue
        raise UserError(
            f"{recipe.where('data', key)}: {what}: its data position and best checkpoint belong to the old data; "
            f"pass resume_allow_data_change=true to continue on the new data anyway, or start a new run "
            f"(another output_dir, or overwrite=true resume=never)"
        )
    return now


def record_data_files(run_dir: Path, fingerprints: dict) -> None:
    """Main process, once the run is set to start: what the next resume compares with."""
    atomic_write_text(Path(run_dir) / DATA_FILES, json.dumps(fingerprints, indent=2) + "\n")
