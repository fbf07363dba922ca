"""Ours and the baseline at gpt-oss's real dimensions, with the same random weights (no checkpoint).

Ours: our GptOssForCausalLM with MXFP4-resident experts. Baseline (the official recipe's model):
transformers' GptOssForCausalLM with bf16 experts and "eager" attention. Every tensor is drawn from a
generator seeded by (seed, tensor name), on the model's device, and the baseline's bf16 experts are the
dequantised MXFP4 experts of ours: both hold the same function, so with LoRA B = 0 at the start their
first-step losses agree (the benchmark prints the difference as a check that both runs do the same work).
"""

from __future__ import annotations

import zlib

import torch

from gptoss_kernels.mxfp4 import dequantize, packed_shapes
from gptoss_tune.model.attention import ATTN_IMPLEMENTATION
from gptoss_tune.model.config import published_config, tiny_config
from gptoss_tune.model.loader import _reset_rotary, build_config, build_empty_model

MODELS = ("tiny", "20b", "120b")


def bench_config(name: str) -> dict:
    """The model's config dict: the published one for 20b/120b, a small one in the same layout for tiny."""
    if name == "tiny":
        return tiny_config(layers=2, experts=8, top_k=2, hidden=64, heads=4, kv_heads=2, head_dim=16, sliding_window=16)
    return published_config(name)


def _gen(seed: int, name: str, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


# E8M0 exponent 120 gives MXFP4 weights of std ~2.9 * 2**-7 = 0.023, about 1/sqrt(2880) like the real model.
_SCALE_LO, _SCALE_HI = 119, 122


def _random_mxfp4(seed, name_prefix, blocks_shape, scales_shape, device):
    blocks = torch.randint(
        0, 256, blocks_shape, dtype=torch.uint8, device=device, generator=_gen(seed, name_prefix + "_blocks", device)
    )
    scales = torch.randint(
        _SCALE_LO,
        _SCALE_HI,
        scales_shape,
        dtype=torch.uint8,
        device=device,
        generator=_gen(seed, name_prefix + "_scales", device),
    )
    return blocks, scales


def _std(name: str) -> float:
    if name.endswith("sinks"):
        return 1.0
    if name.endswith("embed_tokens.weight"):
        return 1.0
    return 0.02


@torch.no_grad()
def fill_random_(model, seed: int = 0) -> None:
    """Deterministic random weights by tensor name, drawn on the model's device (nothing on the host).

    MXFP4 blocks/scales for our experts; for transformers' dense experts the dequantised same blocks,
    so both models hold the same function. Norm weights are ones.
    """
    for name, t in list(model.state_dict(keep_vars=True).items()):
        device = t.device
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # transformers' dense [E, in, out]
            E, d_in, d_out = t.shape
            b_shape, s_shape = packed_shapes(E, d_out, d_in)
            blocks, scales = _random_mxfp4(seed, name, b_shape, s_shape, device)
            for e in range(E):  # one expert at a time: the dense temporaries stay small
                t[e].copy_(dequantize(blocks[e], scales[e], t.dtype).t())
            del blocks, scales
        elif name.endswith("_blocks"):
            prefix = name[: -len("_blocks")]
            scales_t = model.get_buffer(prefix + "_scales")
            blocks, scales = _random_mxfp4(seed, prefix, t.shape, scales_t.shape, device)
            t.copy_(blocks)
            scales_t.copy_(scales)
        elif name.endswith("_scales"):
            continue  # filled with its blocks
        elif name.endswith("layernorm.weight") or name == "model.norm.weight":
            t.fill_(1.0)
        elif t.is_floating_point():
            x = torch.randn(t.shape, dtype=torch.float32, device=device, generator=_gen(seed, name, device))
            t.copy_(x.mul_(_std(name)))
            del x


def _meta_build(build):
    with torch.device("meta"):
        return build()


def build_ours(cfg: dict, device, dtype, seed: int = 0, attn_implementation: str | None = None):
    """Our model (MXFP4 experts) at cfg's dimensions with random weights, materialised straight on `device`."""

    config = build_config(cfg, attn_implementation or ATTN_IMPLEMENTATION)
    model = build_empty_model(config, dtype)
    model.to_empty(device=device)
    _reset_rotary(model, config, device)
    fill_random_(model, seed)
    model.requires_grad_(False)
    return model


def build_baseline(cfg: dict, device, dtype, seed: int = 0):
    """transformers' own GptOssForCausalLM, bf16 experts, "eager" attention, the same random weights."""
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig.from_dict(dict(cfg))
    config._attn_implementation = "eager"
    config.use_cache = False

    def build():
        m = GptOssForCausalLM(config)
        m.to(dtype)
        for layer in m.model.layers:
            layer.input_layernorm.float()
            layer.post_attention_layernorm.float()
        m.model.norm.float()
        return m

    model = _meta_build(build)
    model.to_empty(device=device)
    _reset_rotary(model, config, device)
    fill_random_(model, seed)
    model.requires_grad_(False)
    return model


def dense_bytes(cfg: dict, dtype_bytes: int = 2) -> int:
    """Bytes of every weight of the model in a dense dtype (the baseline's resident size)."""
    H, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    I, E = cfg["intermediate_size"], cfg["num_local_experts"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    attn = H * nh * hd * 2 + H * nkv * hd * 2
    experts = E * (H * 2 * I + I * H)
    return dtype_bytes * (2 * V * H + L * (attn + experts + E * H))
