"""The real o200k_harmony tokenizer, offline.

openai-harmony and tiktoken normally download `o200k_base.tiktoken`. Nothing can be downloaded here, so
the vocabulary is written out from the copy that the PyPI package quicktok-v1 ships
(`quicktok/data/o200k.vocab`: a u32 count, then per entry a u16 length, the bytes and a u32 rank) as
tiktoken text (`base64(bytes) rank` per line, by rank), which is byte-identical to the official file.
Its SHA-256 is checked against the official one and a mismatch is refused.

A vocabulary the user already has (TIKTOKEN_ENCODINGS_BASE for openai-harmony, or tiktoken's cache) is
used as it is when its hash is right. Otherwise the file goes to ``$GPTOSS_TUNE_CACHE/tiktoken``
(default ``~/.cache/gptoss_tune/tiktoken``) under both names the two libraries look for, and their
environment variables are pointed there.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import struct
import tempfile
from pathlib import Path

import tiktoken
from openai_harmony import HarmonyEncodingName, load_harmony_encoding

from gptoss_tune.atomic_io import atomic_write_bytes, sha256_of
from gptoss_tune.errors import UserError

O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
HARMONY_FILE = "o200k_base.tiktoken"  # what openai-harmony reads under TIKTOKEN_ENCODINGS_BASE
TIKTOKEN_CACHE_KEY = hashlib.sha1(O200K_URL.encode()).hexdigest()  # fb374d41..., tiktoken's cache file name
N_VOCAB = 201088


def cache_dir() -> Path:
    base = os.environ.get("GPTOSS_TUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gptoss_tune")
    return Path(base) / "tiktoken"


def _valid(path: Path | None) -> bool:
    return path is not None and path.is_file() and sha256_of(path) == O200K_SHA256


def quicktok_vocab_path() -> Path:
    try:
        import quicktok
    except ImportError:
        raise UserError(
            "the package quicktok-v1 is not installed; `pip install quicktok-v1` (it ships the o200k vocabulary)"
        ) from None
    return Path(quicktok.__file__).parent / "data" / "o200k.vocab"


def tiktoken_text_from_quicktok(path: Path) -> bytes:
    """quicktok's binary o200k vocabulary -> tiktoken text, ordered by rank."""
    data = path.read_bytes()
    (count,) = struct.unpack_from("<I", data, 0)
    off = 4
    entries = []
    for _ in range(count):
        (n,) = struct.unpack_from("<H", data, off)
        off += 2
        tok = data[off : off + n]
        off += n
        (rank,) = struct.unpack_from("<I", data, off)
        off += 4
        entries.append((rank, tok))
    if off != len(data):
        raise UserError(f"{path}: unexpected layout ({len(data) - off} trailing bytes); reinstall quicktok-v1")
    entries.sort()
    return b"".join(base64.b64encode(tok) + b" " + str(rank).encode() + b"\n" for rank, tok in entries)


def materialize(dest_dir: Path | None = None, source: Path | None = None) -> Path:
    """Write the vocabulary from quicktok into dest_dir (both file names); refuse a wrong hash."""
    dest_dir = dest_dir or cache_dir()
    source = source or quicktok_vocab_path()
    text = tiktoken_text_from_quicktok(source)
    digest = hashlib.sha256(text).hexdigest()
    if digest != O200K_SHA256:
        raise UserError(
            f"{source}: the o200k vocabulary built from it has SHA-256 {digest}, not the official {O200K_SHA256}; "
            f"refusing to use it (reinstall quicktok-v1, or put the official o200k_base.tiktoken in TIKTOKEN_ENCODINGS_BASE)"
        )
    for name in (HARMONY_FILE, TIKTOKEN_CACHE_KEY):
        atomic_write_bytes(dest_dir / name, text)
    return dest_dir / HARMONY_FILE


def _existing_official() -> tuple[Path | None, Path | None]:
    """(harmony dir, tiktoken cache dir) already holding a valid official file, if any."""
    harmony = None
    base = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if base and _valid(Path(base) / HARMONY_FILE):
        harmony = Path(base)
    tk = None
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        d = os.environ.get(var)
        if d:
            tk = Path(d) if _valid(Path(d) / TIKTOKEN_CACHE_KEY) else None
            break
    else:
        d = Path(tempfile.gettempdir()) / "data-gym-cache"
        tk = d if _valid(d / TIKTOKEN_CACHE_KEY) else None
    return harmony, tk


@functools.lru_cache(maxsize=1)
def ensure_vocab() -> Path:
    """Make sure openai-harmony and tiktoken find a verified o200k vocabulary; returns the file used."""
    harmony_dir, tiktoken_dir = _existing_official()
    ours = cache_dir()
    if harmony_dir is None or tiktoken_dir is None:
        if not (_valid(ours / HARMONY_FILE) and _valid(ours / TIKTOKEN_CACHE_KEY)):
            materialize(ours)
    if harmony_dir is None:
        os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(ours)
        harmony_dir = ours
    if tiktoken_dir is None:
        # Only redirect tiktoken's cache when the user's own has no valid copy; keep any other files there.
        os.environ["TIKTOKEN_CACHE_DIR"] = str(ours)
    return harmony_dir / HARMONY_FILE


@functools.lru_cache(maxsize=1)
def harmony_encoding():
    """openai-harmony's HarmonyEncoding for gpt-oss (o200k_harmony)."""
    ensure_vocab()

    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


@functools.lru_cache(maxsize=1)
def tiktoken_encoding():
    """tiktoken's o200k_harmony encoding (same ids as openai-harmony), for fast plain-text encode/decode."""
    ensure_vocab()

    return tiktoken.get_encoding("o200k_harmony")
