"""The export's output directory: what --out may be, the temporary it is built in, a full disk.

The export is built in a hidden temporary next to --out whose name says it is ours and which process
made it (`.NAME.gptoss-tune-export-HOST-PID-XXXX`, HOST a hash of the machine's name, with a marker
file inside), and renamed into place at the
end. A killed export (SIGKILL, power loss) cannot remove its temporary; the next export in the same
directory on the same machine removes every such temporary whose process is gone, and touches nothing else.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from gptoss_tune.errors import UserError
from gptoss_tune.model.checkpoint import index_checkpoint

TMP_TAG = "gptoss-tune-export"
OLD_TAG = "gptoss-tune-replaced"
MARKER = ".gptoss-tune-export-in-progress"
_OURS = re.compile(
    rf"^\.(?P<name>.+)\.(?P<tag>{TMP_TAG}|{OLD_TAG})-(?P<host>[0-9a-f]{{8}})-(?P<pid>\d+)(?:-[A-Za-z0-9_]+)?$"
)


def _host() -> str:
    """8 hex digits of this machine's name: a pid says whether a process is gone only on the machine that
    made it (an export directory on a shared file system is seen by others, whose pids mean nothing here)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


# tokenizer.json (o200k_harmony, 27.9 MB) and the small files beside it: what every export writes besides weights.
TOKENIZER_BYTES = 30 * 2**20

DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# safetensors and torch report a full disk in their own words, not as OSError: safetensors as
# SafetensorError("... IoError(Os { code: 28, kind: StorageFull ... })"), torch as "unexpected pos".
_DISK_FULL_TEXT = (
    "No space left",
    "StorageFull",
    "code: 28",
    "Disk quota",
    "code: 122",
    "unexpected pos",
    "File too large",
)


def check_out(out: Path, force: bool) -> None:
    """--out must be a directory path: a regular file is refused (--force never replaces a file by a directory)."""
    if out.is_symlink():  # the export is renamed into place: that would replace the link, not fill its target
        raise UserError(f"--out {out}: is a symbolic link; pass the directory it points to ({os.path.realpath(out)})")
    if out.exists() and not out.is_dir():
        raise UserError(
            f"--out {out}: is a file, not a directory; choose a directory path (the file is left as it is, --force or not)"
        )
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out}: exists and is not empty; choose another --out or pass --force to replace it")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def stale_temporaries(parent: Path) -> list[Path]:
    """Our temporaries in `parent` whose export process is gone: named by us, a directory, holding our
    marker (or nothing: killed right after it was made)."""
    found = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    for p in entries:
        m = _OURS.match(p.name)
        if not m or m.group("host") != _host() or p.is_symlink() or not p.is_dir() or _pid_alive(int(m.group("pid"))):
            continue
        try:
            ours = (p / MARKER).is_file() or OLD_TAG in p.name or not any(p.iterdir())
        except OSError:
            continue
        if ours:
            found.append(p)
    return found


def warn_if_short(out: Path, needed: int, progress) -> None:
    """Say before a long export that the disk looks too small (an estimate: a warning, not a refusal)."""
    try:
        free = shutil.disk_usage(out.parent).free
    except OSError:
        return
    if needed > free:
        progress(
            f"  warning: this export writes about {_gb(needed)} and {_gb(free)} is free on the disk of --out {out}; "
            f"it will probably fail when the disk fills up"
        )


def remove_stale_temporaries(parent: Path, progress) -> None:
    for p in stale_temporaries(parent):
        m = _OURS.match(p.name)
        final = parent / m.group("name")
        if m.group("tag") == OLD_TAG and not os.path.lexists(final):
            # killed between moving the previous export aside and renaming the new one into place: put it back
            os.replace(p, final)
            progress(f"  restored {final}, moved aside by an export that did not finish")
            continue
        shutil.rmtree(p, ignore_errors=True)
        if not p.exists():
            progress(f"  removed {p}, left by an export that did not finish")


def make_temporary(out: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.{TMP_TAG}-{_host()}-{os.getpid()}-"))
    try:
        (tmp / MARKER).write_text("an export in progress; removed by the next export if its process is gone\n")
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished export at --out (replacing a directory there, never a file)."""
    (tmp / MARKER).unlink(missing_ok=True)
    old = None
    if out.exists():
        if not out.is_dir() or out.is_symlink():
            raise UserError(f"--out {out}: is not a directory; nothing was replaced")
        old = out.with_name(f".{out.name}.{OLD_TAG}-{_host()}-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in DISK_FULL_ERRNOS
    if isinstance(e, RuntimeError) or type(e).__name__ == "SafetensorError":
        return any(t in str(e) for t in _DISK_FULL_TEXT)
    return False


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def disk_full_error(out: Path, needed: int) -> UserError:
    """One line: --out, the space the export needs and what the disk has."""
    try:
        free = shutil.disk_usage(out.parent).free
        has = f", and {_gb(free)} is free there"
    except OSError:
        has = ""
    return UserError(
        f"--out {out}: the disk filled up while writing the export (it needs about {_gb(needed)} free{has}); "
        f"free some space or choose another --out on a larger disk; nothing was written"
    )


def estimate_bytes(fmt: str, adapter_file: Path, base_dir: Path) -> int:
    """About how many bytes the export writes: from the base's safetensors headers (no data read)."""
    if fmt == "adapter":
        return adapter_file.stat().st_size * 2 + TOKENIZER_BYTES  # x2: a zero slot for an untrained projection

    total = TOKENIZER_BYTES
    for name, info in index_checkpoint(base_dir).tensors.items():
        n = 1
        for d in info.shape:
            n *= d
        size = getattr(info.dtype, "itemsize", 2)
        is_dense_expert = name.endswith(("experts.gate_up_proj", "experts.down_proj"))
        if name.endswith("_blocks"):  # two E2M1 values a byte
            total += n * 4 if fmt == "merged-bf16" else n
        elif name.endswith("_scales"):
            total += 0 if fmt == "merged-bf16" else n
        elif is_dense_expert and fmt == "merged-mxfp4":
            total += n // 2 + n // 32
        else:
            total += n * size
    return total
