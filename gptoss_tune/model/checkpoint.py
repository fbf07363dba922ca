"""Find a gpt-oss checkpoint, read its config and index its safetensors without loading them.

Every failure is a `CheckpointError` naming the directory, file or tensor and what to do.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from gptoss_tune.errors import CheckpointError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_dir(path: str | Path) -> Path:
    """A local directory, or a hub id already in the local Hugging Face cache (nothing is downloaded)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"model path '{path}' is a file; pass the checkpoint directory that holds config.json")
    s = str(path)
    if _HUB_ID.match(s) and not s.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

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


def read_config(model_dir: Path) -> dict:
    f = model_dir / "config.json"
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
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_local_experts",
        "num_attention_heads",
        "vocab_size",
    ):
        if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
            raise CheckpointError(f"{f}: '{key}' must be a positive integer, got {cfg.get(key)!r}")
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
    index_file = model_dir / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_file}: not a safetensors index with a 'weight_map' ({e})") from None
        files = sorted({model_dir / v for v in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index_file}: refers to {f.name}, which is missing from {model_dir}")
    else:
        weight_map = None
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{model_dir}: no *.safetensors weight files (and no model.safetensors.index.json)")

    idx = CheckpointIndex(model_dir)
    for f in files:
        size = f.stat().st_size
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
