"""Write a tiny gpt-oss checkpoint in exactly the published layout of openai/gpt-oss-20b.

config.json (model_type gpt_oss with the mxfp4 quantization_config), generation_config.json, and
safetensors with the experts as uint8 `*_blocks` / `*_scales` (quantised with OpenAI's rule) and every
other tensor bf16; sharded with model.safetensors.index.json when larger than the shard size. Only the
sizes differ from the real model, so the loading code exercised on it is the one real checkpoints use.
Output is a pure function of the sizes and the seed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from gptoss_kernels.mxfp4 import quantize
from gptoss_tune.errors import UserError
from gptoss_tune.model.config import GENERATION_CONFIG, tiny_config


def tensor_specs(cfg: dict) -> Iterator[tuple[str, tuple[int, ...], float]]:
    """(name, shape, init std) of every dense tensor, in checkpoint order; experts as [E, out, in]."""
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    I, E = cfg["intermediate_size"], cfg["num_local_experts"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    yield "model.embed_tokens.weight", (V, H), 1.0
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", (H,), -1.0  # negative std: ones plus noise
        for proj, (o, n) in {
            "q_proj": (nh * hd, H),
            "k_proj": (nkv * hd, H),
            "v_proj": (nkv * hd, H),
            "o_proj": (H, nh * hd),
        }.items():
            yield f"{p}.self_attn.{proj}.weight", (o, n), 1 / math.sqrt(n)
            yield f"{p}.self_attn.{proj}.bias", (o,), 0.02
        yield f"{p}.self_attn.sinks", (nh,), 1.0
        yield f"{p}.post_attention_layernorm.weight", (H,), -1.0
        yield f"{p}.mlp.router.weight", (E, H), 1 / math.sqrt(H)
        yield f"{p}.mlp.router.bias", (E,), 0.1
        yield f"{p}.mlp.experts.gate_up_proj", (E, 2 * I, H), 1 / math.sqrt(H)
        yield f"{p}.mlp.experts.gate_up_proj_bias", (E, 2 * I), 0.02
        yield f"{p}.mlp.experts.down_proj", (E, H, I), 1 / math.sqrt(I)
        yield f"{p}.mlp.experts.down_proj_bias", (E, H), 0.02
    yield "model.norm.weight", (H,), -1.0
    yield "lm_head.weight", (V, H), 1 / math.sqrt(H)


def tiny_state_dict(cfg: dict, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint tensors, deterministic for (cfg, seed): experts packed, everything else bf16."""
    gen = torch.Generator().manual_seed(seed)
    for name, shape, std in tensor_specs(cfg):
        x = torch.randn(shape, generator=gen, dtype=torch.float32)
        x = 1.0 + 0.1 * x if std < 0 else x * std
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = quantize(x)
            yield f"{name}_blocks", blocks
            yield f"{name}_scales", scales
        else:
            yield name, x.to(torch.bfloat16)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_tiny_checkpoint(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    max_shard_bytes: int = 2 * 1024**3,
    force: bool = False,
    **sizes,
) -> Path:
    """Write the checkpoint to `out_dir` (created; refused if it exists and is not empty unless force)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file; pass a directory to write the checkpoint into")
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out}: directory exists and is not empty; pass --force to overwrite it")
    try:
        cfg = tiny_config(**sizes)
    except ValueError as e:
        raise UserError(str(e)) from None

    # Group tensors into shards in order, then write into a temporary directory next to the target and
    # move the files in, so an interrupted run never leaves a checkpoint that looks complete.
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    total = 0
    for name, t in tiny_state_dict(cfg, seed):
        n = _nbytes(t)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += n
        total += n

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot create the directory ({e.strerror})") from None
    with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-") as tmp:
        tmp_dir = Path(tmp)
        weight_map = {}
        if len(shards) == 1:
            save_file(shards[0], tmp_dir / "model.safetensors", metadata={"format": "pt"})
        else:
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp_dir / fname, metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp_dir / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
        for old in out.glob("model*.safetensors*"):
            old.unlink()
        for f in tmp_dir.iterdir():
            shutil.move(str(f), out / f.name)
    return out
