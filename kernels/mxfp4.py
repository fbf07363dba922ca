"""The MXFP4 format of the published gpt-oss checkpoints, in plain torch.

Layout (HF layout of openai/gpt-oss-*, per expert tensor `W` of shape [E, out_features, in_features]):

* ``*_blocks``: uint8 [E, out, in/32, 16]. Each group of 32 consecutive INPUT features is one block;
  its 32 FP4 (E2M1) codes are packed two per byte, element 2k in the LOW nibble, element 2k+1 in the
  HIGH nibble.
* ``*_scales``: uint8 [E, out, in/32]. One E8M0 exponent per block: value = fp4 * 2**(scale - 127).

That is 16 + 1 bytes per 32 weights: 4.25 bits a weight.

The quantiser follows OpenAI's rule: the block exponent is the one of (amax / 6) rounded UP to a power
of two (so the largest magnitude never clips), then each value rounds to the nearest E2M1 value with
ties to even.
"""

from __future__ import annotations

import torch

BLOCK = 32  # weights per scale
BYTES_PER_BLOCK = BLOCK // 2
SCALE_BIAS = 127
FP4_MAX = 6.0

# E2M1 values by 4-bit code: sign bit 3, exponent bits 2-1, mantissa bit 0.
FP4_VALUES = (
    +0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)  # fmt: skip

# Rounding thresholds between neighbouring magnitudes (0, .5, 1, 1.5, 2, 3, 4, 6). At an exact midpoint
# the value goes to the neighbour with the even code: up at 0.75, 1.75, 3.5 and down at 0.25, 1.25, 2.5, 5.
_ROUND_UP_AT_TIE = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))

_LUT_CACHE: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def fp4_lut(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 E2M1 values as a tensor, cached per dtype and device."""
    key = (dtype, torch.device(device))
    lut = _LUT_CACHE.get(key)
    if lut is None:
        lut = torch.tensor(FP4_VALUES, dtype=dtype, device=device)
        _LUT_CACHE[key] = lut
    return lut


def packed_shapes(num_experts: int, out_features: int, in_features: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of (blocks, scales) for a [E, out, in] weight."""
    if in_features % BLOCK:
        raise ValueError(f"MXFP4 needs the input dimension to be a multiple of {BLOCK}, got {in_features}")
    g = in_features // BLOCK
    return (num_experts, out_features, g, BYTES_PER_BLOCK), (num_experts, out_features, g)


def packed_nbytes(numel: int) -> int:
    """Bytes that `numel` weights take in MXFP4 (17 bytes per 32 weights)."""
    return numel // BLOCK * (BYTES_PER_BLOCK + 1)


def unpack_codes(blocks: torch.Tensor) -> torch.Tensor:
    """uint8 [..., G, 16] -> uint8 codes [..., G*32] in element order (low nibble first)."""
    lo = blocks & 0x0F
    hi = blocks >> 4
    codes = torch.stack((lo, hi), dim=-1)  # [..., G, 16, 2]
    return codes.reshape(*blocks.shape[:-2], blocks.shape[-2] * BLOCK)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., G*32] -> uint8 [..., G, 16] (element 2k low nibble, 2k+1 high nibble)."""
    n = codes.shape[-1]
    if n % BLOCK:
        raise ValueError(f"last dimension {n} is not a multiple of {BLOCK}")
    pairs = codes.to(torch.uint8).reshape(*codes.shape[:-1], n // BLOCK, BYTES_PER_BLOCK, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """blocks [..., G, 16] uint8, scales [..., G] uint8 -> weights [..., G*32] in `dtype`.

    For expert tensors this returns [E, out, in] (the checkpoint's orientation); transformers'
    GptOssExperts parameters are the transpose, [E, in, out]. The arithmetic is the lookup followed by
    an exact power-of-two ldexp in `dtype`, so the result is bit-identical to transformers' dequantiser.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BYTES_PER_BLOCK:
        raise ValueError(f"blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    lut = fp4_lut(dtype, blocks.device)
    values = lut[unpack_codes(blocks).long()]  # [..., G*32]
    values = values.reshape(*scales.shape, BLOCK)
    exp = (scales.to(torch.int32) - SCALE_BIAS).unsqueeze(-1)
    return torch.ldexp(values, exp).to(dtype).reshape(*scales.shape[:-1], scales.shape[-1] * BLOCK)


def _round_to_e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """fp32 values already divided by the block scale -> 4-bit codes, nearest with ties to even."""
    mag = x.abs()
    code = torch.zeros_like(mag, dtype=torch.uint8)
    for threshold, up_at_tie in _ROUND_UP_AT_TIE:
        code += (mag >= threshold) if up_at_tie else (mag > threshold)
    sign = torch.signbit(x).to(torch.uint8) << 3
    return code | sign


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weights [..., N] (N a multiple of 32, blocks along the last dim) -> (blocks, scales) uint8.

    For an expert weight pass the [E, out, in] orientation (blocks run along the input dimension).
    """
    n = weight.shape[-1]
    if n % BLOCK:
        raise ValueError(f"MXFP4 needs the last dimension to be a multiple of {BLOCK}, got {n}")
    w = weight.detach().to(torch.float32).reshape(*weight.shape[:-1], n // BLOCK, BLOCK)
    amax = w.abs().amax(dim=-1)
    # Round amax/6 UP to a power of two by adding a full mantissa to its bit pattern and keeping the
    # exponent field; 0 stays 0 (an all-zero block gets scale byte 0).
    bits = (amax / FP4_MAX).view(torch.int32)
    biased_exp = ((bits + 0x007FFFFF) & 0x7F800000) >> 23
    scales = biased_exp.clamp(0, 254).to(torch.uint8)
    scaled = torch.ldexp(w, (SCALE_BIAS - biased_exp).unsqueeze(-1))
    codes = _round_to_e2m1_codes(scaled).reshape(*weight.shape[:-1], n)
    return pack_codes(codes), scales


def quantize_experts_io(weight_in_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a transformers-layout expert weight [E, in, out] into checkpoint (blocks, scales)."""
    return quantize(weight_in_out.transpose(-1, -2))
