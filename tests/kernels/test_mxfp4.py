"""The MXFP4 format against transformers' dequantiser and an independent brute-force quantiser."""

import numpy as np
import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from gptoss_kernels import mxfp4


def _random_packed(seed, E=3, out=10, groups=4, scale_lo=0, scale_hi=256):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (E, out, groups, 16), generator=g, dtype=torch.int32).to(torch.uint8)
    scales = torch.randint(scale_lo, scale_hi, (E, out, groups), generator=g, dtype=torch.int32).to(torch.uint8)
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seed", [0, 1])
def test_dequantize_matches_transformers_bit_for_bit(dtype, seed):
    # The whole E8M0 range, over/underflow included, and a range typical of real weights.
    for lo, hi in ((0, 256), (110, 135)):
        blocks, scales = _random_packed(seed, scale_lo=lo, scale_hi=hi)
        ours = mxfp4.dequantize(blocks, scales, dtype)  # [E, out, in]
        theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, in, out]
        a = ours.transpose(1, 2).contiguous()
        assert a.dtype == theirs.dtype and a.shape == theirs.shape
        # Compare bit patterns: NaN/inf and signed zeros included.
        view = torch.int16 if dtype == torch.bfloat16 else torch.int32
        assert torch.equal(a.view(view), theirs.view(view))


def test_nibble_order_and_scale_bias():
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)  # one row, one block
    blocks[0, 0, 0] = 0x21  # element 0 -> code 1 (+0.5), element 1 -> code 2 (+1.0)
    blocks[0, 0, 1] = 0xF7  # element 2 -> code 7 (+6.0), element 3 -> code 15 (-6.0)
    scales = torch.tensor([[128]], dtype=torch.uint8)  # 2**(128-127) = 2
    w = mxfp4.dequantize(blocks, scales, torch.float32)
    assert w.shape == (1, 32)
    assert w[0, :4].tolist() == [1.0, 2.0, 12.0, -12.0]
    assert torch.equal(mxfp4.pack_codes(mxfp4.unpack_codes(blocks)), blocks)


def _brute_force_quantize(w: np.ndarray):
    """Independent reference: exponent = ceil(log2(amax / 6)); nearest E2M1 value, ties to the even code."""
    vals = np.array(mxfp4.FP4_VALUES[:8], dtype=np.float64)
    blocks = w.reshape(-1, 32).astype(np.float64)
    codes = np.zeros(blocks.shape, dtype=np.uint8)
    scales = np.zeros(blocks.shape[0], dtype=np.uint8)
    for b, row in enumerate(blocks):
        amax = np.abs(row).max()
        e = 0 if amax == 0 else int(np.ceil(np.log2(np.float32(amax / 6.0))))
        scales[b] = 0 if amax == 0 else e + 127
        for j, v in enumerate(row):
            x = abs(v) / 2.0**e if amax else 0.0
            d = np.abs(vals - x)
            best = np.flatnonzero(d == d.min())
            c = best[0] if len(best) == 1 else [i for i in best if i % 2 == 0][0]
            codes[b, j] = c | (8 if np.signbit(v) else 0)
    return codes.reshape(w.shape), scales.reshape(*w.shape[:-1], -1)


def test_quantize_matches_bruteforce_rule_with_ties():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 64, generator=g) * 0.05
    # Plant exact ties and the block maximum: with amax 6 the scale is 2**0 and these sit on midpoints.
    w[0, :9] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75])
    w[1, :32] = 0.0  # an all-zero block
    blocks, scales = mxfp4.quantize(w)
    codes = mxfp4.unpack_codes(blocks)
    ref_codes, ref_scales = _brute_force_quantize(w.numpy())
    # Zero magnitudes may carry either sign; compare magnitudes' codes and signs of non-zero values.
    nz = (ref_codes & 7) != 0
    assert np.array_equal(codes.numpy() & 7, ref_codes & 7)
    assert np.array_equal(codes.numpy()[nz], ref_codes[nz])
    assert np.array_equal(scales.numpy()[ref_scales != 0], ref_scales[ref_scales != 0])
    assert mxfp4.dequantize(blocks, scales, torch.float32)[0, :9].tolist() == [
        6.0,
        0.0,
        1.0,
        1.0,
        2.0,
        2.0,
        4.0,
        4.0,
        -1.0,
    ]


def test_quantize_is_exact_on_mxfp4_values():
    blocks, scales = _random_packed(4, scale_lo=100, scale_hi=140)
    w = mxfp4.dequantize(blocks, scales, torch.float32)
    b2, s2 = mxfp4.quantize(w)
    assert torch.equal(mxfp4.dequantize(b2, s2, torch.float32), w)


def test_packed_size_is_4_25_bits():
    assert mxfp4.packed_nbytes(32) == 17
    assert mxfp4.packed_nbytes(2880 * 5760) * 8 / (2880 * 5760) == 4.25
