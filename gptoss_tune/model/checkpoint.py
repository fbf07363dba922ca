"""Find a gpt-oss checkpoint, read its config and index its safetensors without loading them.

Every failure is a `CheckpointError` naming the directory, file or tensor and what to do.
"""

from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open

from gptoss_tune.errors import CheckpointError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _stat_problem(p: Path) -> str | None:
    """Why `p` cannot be opened ("a symbolic link loop", ...), None when it can be stat'ed (or is absent:
    the caller says what it expected there)."""
    try:
        os.stat(p)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symbolic link loop (a link that leads back to itself); point it at the real file or directory"
        return f"cannot be read ({e.strerror or e})"
    return None


def resolve_model_dir(path: str | Path) -> Path:
    """A local directory, or a hub id already in the local Hugging Face cache (nothing is downloaded)."""
    p = Path(path).expanduser()
    problem = _stat_problem(p)
    if problem:
        raise CheckpointError(f"model path '{path}' {problem}")
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"model path '{path}' is a file; pass the checkpoint directory that holds config.json")
    s = str(path)
    if _HUB_ID.match(s) and not s.startswith((".", "/", "~")):
        try:
            return Path(snapshot_download(repo_id=s, local_files_only=True))
        except Exception:
            raise CheckpointError(
                f"model '{s}' is neither a local directory nor in the local Hugging Face cache, and nothing can be "
                f"downloaded here; on a machine with network run `hf download {s}` (it fills ~/.cache/huggingface/hub, "
                f"or set HF_HOME) and copy that cache here, or pass the checkpoint directory"
            ) from None
    raise CheckpointError(
        f"model path '{path}' does not exist; pass a gpt-oss checkpoint directory "
        f"(`gptoss-tune init-tiny DIR` writes a tiny one) or a hub id in the local cache"
    )


# Bounds of the sizes in config.json: 8 to 16 times gpt-oss-120b's (2,880 wide, 36 layers, 128 experts,
# 201,088 tokens, 131,072 positions). Beyond them a config is a mistake, and building the model would
# try to allocate terabytes (vocab_size 10**12: 256 TB for the embedding alone) before any check of
# the weights could say so.
SIZE_KEYS = {
    "hidden_size": 65_536,
    "intermediate_size": 262_144,
    "num_hidden_layers": 1_024,
    "num_local_experts": 4_096,
    "num_attention_heads": 2_048,
    "num_key_value_heads": 2_048,
    "head_dim": 4_096,
    "num_experts_per_tok": 4_096,
    "vocab_size": 4_194_304,
    "max_position_embeddings": 16_777_216,
    "sliding_window": 16_777_216,
}
REQUIRED_SIZES = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_local_experts",
    "num_attention_heads",
    "vocab_size",
)


def check_sizes(cfg: dict, f: Path) -> None:
    """Refuse sizes no gpt-oss model has, naming the key: not positive integers, absurdly large, or not
    fitting together (MXFP4 blocks of 32, grouped-query heads, top-k within the experts)."""
    for key, most in SIZE_KEYS.items():
        if key not in cfg and key not in REQUIRED_SIZES:
            continue
        v = cfg.get(key)
        if type(v) is not int or v <= 0:
            raise CheckpointError(f"{f}: '{key}' must be a positive integer, got {v!r}")
        if v > most:
            raise CheckpointError(
                f"{f}: '{key}' is {v:,}, far beyond any gpt-oss model (at most {most:,} is accepted); fix config.json"
            )
    for key in ("hidden_size", "intermediate_size"):
        if cfg[key] % 32:
            raise CheckpointError(
                f"{f}: '{key}' must be a multiple of 32 (MXFP4 blocks hold 32 weights), got {cfg[key]}"
            )
    if cfg.get("head_dim", 2) % 2:
        raise CheckpointError(f"{f}: 'head_dim' must be even (rotary embeddings rotate pairs), got {cfg['head_dim']}")
    kv = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    if cfg["num_attention_heads"] % kv:
        raise CheckpointError(
            f"{f}: 'num_attention_heads' ({cfg['num_attention_heads']}) must be a multiple of 'num_key_value_heads' ({kv})"
        )
    top_k = cfg.get("num_experts_per_tok", 1)
    if top_k > cfg["num_local_experts"]:
        raise CheckpointError(
            f"{f}: 'num_experts_per_tok' ({top_k}) cannot exceed 'num_local_experts' ({cfg['num_local_experts']})"
        )


def read_config(model_dir: Path) -> dict:
    f = model_dir / "config.json"
    problem = _stat_problem(f)
    if problem:
        raise CheckpointError(f"{f} {problem}")
    if not f.is_file():
        raise CheckpointError(
            f"{f}: missing; a gpt-oss checkpoint directory holds config.json next to its *.safetensors"
        )
    try:
        cfg = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{f}: expected a JSON object")
    mt = cfg.get("model_type")
    if mt != "gpt_oss":
        raise CheckpointError(
            f"{f}: model_type is {mt!r}, not 'gpt_oss'; gptoss_tune loads gpt-oss-20b/120b checkpoints only"
        )
    check_sizes(cfg, f)
    pad = cfg.get("pad_token_id")
    if isinstance(pad, int) and not 0 <= pad < cfg["vocab_size"]:
        raise CheckpointError(
            f"{f}: pad_token_id {pad} is not a token of the vocabulary (vocab_size {cfg['vocab_size']})"
        )
    qc = cfg.get("quantization_config")
    if qc is not None and (not isinstance(qc, dict) or qc.get("quant_method") != "mxfp4"):
        raise CheckpointError(
            f"{f}: quantization_config.quant_method must be 'mxfp4' (or no quantization_config), got {qc!r}"
        )
    return cfg


_DTYPES = {
    "U8": torch.uint8, "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
    "F64": torch.float64, "I8": torch.int8, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
}  # fmt: skip


@dataclass
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype | str


@dataclass
class CheckpointIndex:
    """Where each tensor lives, with its header shape and dtype (nothing loaded yet)."""

    model_dir: Path
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    def files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})


def index_checkpoint(model_dir: Path) -> CheckpointIndex:
    """Every tensor's file, shape and dtype, from the safetensors headers alone (no tensor data is read)."""
    index_file = model_dir / "model.safetensors.index.json"
    problem = _stat_problem(index_file)
    if problem:
        raise CheckpointError(f"{index_file} {problem}")
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError(f"weight_map is {type(weight_map).__name__}, not an object")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_file}: not a safetensors index with a 'weight_map' ({e})") from None
        for name, v in weight_map.items():
            if not _inside(v):
                raise CheckpointError(
                    f"{index_file}: tensor '{name}' is mapped to {v!r}, which is not a file inside the checkpoint "
                    f"directory; an index names its shards relative to its own directory"
                )
        files = sorted({model_dir / v for v in weight_map.values()})
        for f in files:
            problem = _stat_problem(f)
            if problem:
                raise CheckpointError(f"{f} {problem}")
            if not f.is_file():
                raise CheckpointError(f"{index_file}: refers to {f.name}, which is missing from {model_dir}")
    else:
        weight_map = None
        files = sorted(model_dir.glob("*.safetensors"))
        for f in files:
            problem = _stat_problem(f)
            if problem:
                raise CheckpointError(f"{f} {problem}")
        if not files:
            raise CheckpointError(f"{model_dir}: no *.safetensors weight files (and no model.safetensors.index.json)")

    idx = CheckpointIndex(model_dir)
    for f in files:
        size = f.stat().st_size
        try:
            with open(f, "rb"):
                pass
        except OSError as e:
            raise CheckpointError(f"{f} cannot be read ({e.strerror or e}); check its permissions") from None
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    sl = st.get_slice(name)
                    dt = sl.get_dtype()
                    info = TensorInfo(f, tuple(sl.get_shape()), _DTYPES.get(dt, dt))
                    if name in idx.tensors:
                        raise CheckpointError(f"{f}: tensor '{name}' is also in {idx.tensors[name].file.name}")
                    idx.tensors[name] = info
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for a bad header or size
            raise CheckpointError(
                f"{f}: cannot read this safetensors file ({size} bytes; {str(e).strip() or type(e).__name__}); "
                f"it is truncated or corrupt, copy or download it again"
            ) from None
        _check_data_extent(f, size)
    if weight_map is not None:
        for name, fname in weight_map.items():
            info = idx.tensors.get(name)
            if info is None:
                raise CheckpointError(
                    f"{index_file}: tensor '{name}' is listed in {fname} but that file does not hold it"
                )
    return idx


def _inside(name) -> bool:
    """A shard name from an index: a relative path that stays in the checkpoint directory (checked on the
    name: the files themselves may be links, as in the Hugging Face cache, whose snapshots link to blobs)."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        return False
    p = Path(name)
    return not p.is_absolute() and ".." not in p.parts and os.path.normpath(name) not in (".", "")


def _check_data_extent(f: Path, size: int) -> None:
    """Refuse a file whose header promises more bytes than it holds (a truncated download)."""
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{f}: truncated safetensors file ({size} bytes); copy or download it again")
        n = int.from_bytes(head, "little")
        try:
            header = json.loads(fh.read(n))
        except Exception:
            raise CheckpointError(f"{f}: corrupt safetensors header; copy or download it again") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{f}: truncated safetensors file: its header describes {8 + n + end} bytes but the file has {size}; "
            f"copy or download it again"
        )
