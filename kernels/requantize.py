"""Re-quantisers: merged weights back to MXFP4, starting from the BASE checkpoint's block exponents.

A LoRA merge W + ΔW of an MXFP4 base is re-quantised for the merged-mxfp4 export. OpenAI's rule
(`mxfp4.quantize`: exponent of amax/6 rounded up) ignores the base's scales: about a third of the blocks of
an already-quantised weight hold a code of 6, any positive update there raises the exponent by one and the
whole block re-rounds on a grid twice as coarse, with 0.5/1.5-step values on ties that the update's sign
breaks. Measured on gaussian layers (std 0.02, 2880 wide, rank-8 update of relative norm rho): its error at
the layer output is 495x / 50x / 4.9x the update's own effect at rho = 1e-4 / 1e-3 / 1e-2.

The candidates here, all on [..., N] weights (blocks along the last dim, as `mxfp4.quantize`):

    keep        the base exponent of every block, values rounded to the nearest E2M1 code (ties to even).
                A block the update pushes past the grid (|v| > 6·2^s) takes the MSE choice among s-1, s, s+1.
                Elementwise never further from the merged value than the base is (the base value is a grid
                point of the same grid), so never worse than the base; small updates are simply lost.
    mse         per block the exponent among s-1, s, s+1 with the smallest squared error (ties keep s).
    stochastic  the base exponent (s+1 where the block would clip), each value rounded to one of its two
                neighbouring grid values with the probability that makes the rounding unbiased: the update
                survives in expectation, with noise. Deterministic for a given torch.Generator (the export
                records the seed).
    openai      OpenAI's rule on the merged weight (the previous export), for comparison.

Every candidate leaves a block whose merged values equal the base's (zero update there) byte-identical to the
base (blocks and scales), and keeps the base's code for every unchanged element of a block that keeps its
exponent (so -0.0 stays code 8): with a zero update the export is the base checkpoint, value for value.
"""

from __future__ import annotations

import torch

from .mxfp4 import BLOCK, SCALE_BIAS, _round_to_e2m1_codes, dequantize, fp4_lut, pack_codes, quantize, unpack_codes

METHODS = ("keep", "mse", "stochastic", "openai")

# E2M1 magnitudes by magnitude code (code & 7).
_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _blocks_view(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    if n % BLOCK:
        raise ValueError(f"MXFP4 needs the last dimension to be a multiple of {BLOCK}, got {n}")
    return x.reshape(*x.shape[:-1], n // BLOCK, BLOCK)


def _nearest(x: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 blocked values [..., G, 32] and scale bytes [..., G] -> (codes, dequantised values), nearest."""
    exp = SCALE_BIAS - scales.to(torch.int32)
    codes = _round_to_e2m1_codes(torch.ldexp(x, exp.unsqueeze(-1)))
    return codes, _decode(codes, scales)


def _decode(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    vals = fp4_lut(torch.float32, codes.device)[codes.long()]
    return torch.ldexp(vals, (scales.to(torch.int32) - SCALE_BIAS).unsqueeze(-1))


def _mse_choice(x: torch.Tensor, s: torch.Tensor, candidates=(0, -1, 1)) -> torch.Tensor:
    """Per block, the exponent among s+c (c in `candidates`, first wins ties) with the least squared error."""
    best_s = s.clone()
    best_err = None
    for c in candidates:
        sc = (s.to(torch.int32) + c).clamp(0, 254).to(torch.uint8)
        _, v = _nearest(x, sc)
        err = (v - x).double().pow(2).sum(-1)
        if best_err is None:
            best_err = err
            best_s = sc
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, sc, best_s)
    return best_s


def _overflows(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Blocks where a value lies beyond the grid of exponent s (it would clip at ±6·2^s)."""
    top = torch.ldexp(torch.full_like(x[..., 0], 6.0), s.to(torch.int32) - SCALE_BIAS)
    return x.abs().amax(-1) > top


def _stochastic_codes(x: torch.Tensor, scales: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Unbiased rounding of blocked fp32 values onto the E2M1 grid of `scales` (no value beyond ±6·2^s)."""
    grid = torch.tensor(_GRID, dtype=torch.float32, device=x.device)
    y = torch.ldexp(x, (SCALE_BIAS - scales.to(torch.int32)).unsqueeze(-1))
    mag = y.abs().clamp(max=6.0)
    lo = (torch.searchsorted(grid, mag.contiguous(), right=True) - 1).clamp(0, 7)
    hi = (lo + 1).clamp(max=7)
    g_lo, g_hi = grid[lo], grid[hi]
    p = torch.where(g_hi > g_lo, (mag - g_lo) / (g_hi - g_lo).clamp(min=1e-30), torch.zeros_like(mag))
    u = torch.rand(mag.shape, generator=generator, device="cpu").to(mag.device)
    code = torch.where(u < p, hi, lo).to(torch.uint8)
    return code | (torch.signbit(y).to(torch.uint8) << 3)


def requantize(
    base_blocks: torch.Tensor,
    base_scales: torch.Tensor,
    merged: torch.Tensor,
    method: str = "keep",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged weights [..., N] -> (blocks [..., N/32, 16], scales [..., N/32]) uint8, from the base's MXFP4.

    `base_blocks`/`base_scales` are the base checkpoint's tensors for the same weight (same orientation:
    blocks along the last dim of `merged`). `generator` drives "stochastic" (pass a seeded one).
    """
    if method not in METHODS:
        raise ValueError(f"unknown re-quantiser {method!r}; choose one of {', '.join(METHODS)}")
    x = _blocks_view(merged.detach().to(torch.float32))
    base = _blocks_view(dequantize(base_blocks, base_scales, torch.float32))
    base_codes = _blocks_view(unpack_codes(base_blocks))
    if x.shape != base.shape:
        raise ValueError(
            f"merged weight {tuple(merged.shape)} does not match the base blocks {tuple(base_blocks.shape)}"
        )
    s = base_scales
    if method == "openai":
        blocks, scales = quantize(merged)
        codes = _blocks_view(unpack_codes(blocks))
    else:
        if method == "keep":
            scales = torch.where(_overflows(x, s), _mse_choice(x, s), s)
        elif method == "mse":
            scales = _mse_choice(x, s)
        else:  # stochastic: the base grid, one exponent coarser only where it would clip
            scales = torch.where(_overflows(x, s), (s.to(torch.int32) + 1).clamp(max=254).to(torch.uint8), s)
        if method == "stochastic":
            codes = _stochastic_codes(x, scales, generator)
        else:
            codes, _ = _nearest(x, scales)
    # Unchanged elements of a block on its base exponent keep the base code (-0.0 + 0.0 is +0.0, which
    # would flip code 8 to 0), and a block with no change at all keeps its base bytes (OpenAI's rule may
    # re-derive a smaller exponent for a block whose largest code is 3 or less).
    same = x == base
    untouched = same.all(-1)
    scales = torch.where(untouched, s, scales)
    keep_code = same & (scales == s).unsqueeze(-1)
    codes = torch.where(keep_code, base_codes, codes)
    return pack_codes(codes.reshape(merged.shape)), scales


def fake_quantize(
    base_blocks: torch.Tensor,
    base_scales: torch.Tensor,
    merged: torch.Tensor,
    method: str = "keep",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The dequantised values (fp32, shape of `merged`) `requantize` would write: what the export computes."""
    blocks, scales = requantize(base_blocks, base_scales, merged, method, generator)
    return dequantize(blocks, scales, torch.float32)


def base_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, scales) to start from for a base held dense (a bf16 checkpoint): OpenAI's rule on it."""
    return quantize(weight)
