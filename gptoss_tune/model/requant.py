"""The expert re-quantisation of a merged-mxfp4 export, shared by the writer (export.exporter.merge_layer), the
candidate measurement (export.effect.EffectMeter) and the quantisation-aware training phase (train/qat.py), so the
three compute the same bytes.

One expert, one projection at a time, in the checkpoint's [out, in] orientation:
merged = base + scale·(B[e] @ A[e]) in fp32, then `gptoss_kernels.requantize.requantize` from the base's
blocks and scales. "stochastic" draws from a generator seeded by (seed, layer, projection, expert), so the
result does not depend on the order experts are visited in, and the export records the seed.
"""

from __future__ import annotations

import torch

from gptoss_kernels.mxfp4 import dequantize
from gptoss_kernels.requantize import METHODS, base_mxfp4, requantize
from gptoss_tune.model.config import EXPERT_PROJECTIONS

CHOICES = ("auto", *METHODS)
DEFAULT_SEED = 0


def expert_generator(seed: int, layer: int, proj: str, expert: int) -> torch.Generator:
    key = ((int(seed) * 1_000_003 + layer) * 7 + EXPERT_PROJECTIONS.index(proj)) * 100_003 + expert
    return torch.Generator().manual_seed(key & 0x7FFF_FFFF_FFFF_FFFF)


def merged_expert(base: torch.Tensor, lora: tuple[torch.Tensor, torch.Tensor] | None, scale: float, e: int):
    """base [out, in] fp32 + scale·B[e]A[e] (the export's arithmetic; QAT repeats it for equal bytes)."""
    if lora is None:
        return base
    a, b = lora
    return base + scale * (b[e].float() @ a[e].float())


def requant_expert(
    blocks: torch.Tensor | None,
    scales: torch.Tensor | None,
    merged: torch.Tensor,
    method: str,
    seed: int,
    layer: int,
    proj: str,
    e: int,
    dense_base: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, scales) of one merged expert weight [out, in]. A dense base (bf16 checkpoint) starts from
    OpenAI's rule applied to the base itself (`base_mxfp4`), the MXFP4 form gptoss_tune serves it in."""
    if blocks is None:
        blocks, scales = base_mxfp4(dense_base)
    gen = expert_generator(seed, layer, proj, e) if method == "stochastic" else None
    return requantize(blocks, scales, merged, method, gen)


def base_expert(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return dequantize(blocks, scales, torch.float32)
