"""Re-quantisers from the base's MXFP4 scales (gptoss_kernels.requantize) against plain float references."""

from __future__ import annotations

import pytest
import torch

from gptoss_kernels.mxfp4 import dequantize, quantize
from gptoss_kernels.requantize import METHODS, fake_quantize, requantize


def _random_base(out=16, n=128, seed=0):
    """Arbitrary MXFP4 bytes: every code (-0.0 = code 8 included) and a spread of exponents."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (out, n // 32, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(100, 131, (out, n // 32), generator=g, dtype=torch.uint8)
    return blocks, scales


@pytest.mark.parametrize("method", METHODS)
def test_zero_update_gives_the_base_bytes(method):
    blocks, scales = _random_base()
    w = dequantize(blocks, scales, torch.float32)
    got_b, got_s = requantize(blocks, scales, w + 0.0, method, torch.Generator().manual_seed(1))
    assert torch.equal(got_b, blocks) and torch.equal(got_s, scales)


def _gaussian_layer(rho, out=256, n=512, rank=8, seed=0):
    """An already-quantised gaussian weight at gpt-oss's scale (std 0.02) and a rank-8 update of relative norm rho."""
    g = torch.Generator().manual_seed(seed)
    blocks, scales = quantize(torch.randn(out, n, generator=g) * 0.02)
    w = dequantize(blocks, scales, torch.float32)
    delta = torch.randn(out, rank, generator=g) @ torch.randn(rank, n, generator=g)
    delta *= rho * w.norm() / delta.norm()
    x = torch.randn(512, n, generator=g)
    return blocks, scales, w, delta, x


def _output_errors(rho, methods=METHODS):
    blocks, scales, w, delta, x = _gaussian_layer(rho)
    merged = w + delta
    target = x @ merged.t()
    effect = float((x @ delta.t()).norm())  # = the base's error against the tuned layer
    errs = {}
    for m in methods:
        q = fake_quantize(blocks, scales, merged, m, torch.Generator().manual_seed(0))
        errs[m] = float((x @ q.t() - target).norm()) / effect
    return errs


def test_openai_rule_error_dwarfs_a_small_update_and_keep_never_does_worse_than_the_base():
    errs = _output_errors(1e-3)
    # The pathology: OpenAI's rule re-derives exponents, moving whole blocks (measured 50x at 2880 wide).
    assert errs["openai"] > 10
    # Nearest on the base grid: elementwise never further than the base value (error <= 1x the update).
    assert errs["keep"] <= 1.0 + 1e-5 and errs["mse"] <= 1.0 + 1e-5  # fp32 matmul rounding
    errs = _output_errors(1e-1, ("keep", "openai"))
    assert errs["keep"] < 1.0  # a large update does cross grid points: part of it is kept


def test_keep_is_elementwise_no_worse_than_the_base():
    blocks, scales, w, delta, _ = _gaussian_layer(3e-2)
    merged = w + delta
    q = fake_quantize(blocks, scales, merged, "keep")
    assert bool(((q - merged).abs() <= (w - merged).abs() + 1e-12).all())


def test_stochastic_rounding_is_unbiased_and_seeded():
    blocks, scales, w, delta, _ = _gaussian_layer(1e-2, out=8, n=64)
    merged = w + delta
    trials = 4000
    rep = lambda t: t.unsqueeze(0).expand(trials, *t.shape).contiguous()  # noqa: E731
    q = fake_quantize(rep(blocks), rep(scales), rep(merged), "stochastic", torch.Generator().manual_seed(0))
    mean = q.mean(0)
    # In expectation the update survives: the mean is ~ merged (the bias left is sampling noise, about
    # step/sqrt(trials) per element), where nearest rounding on the same grid loses almost all of it.
    assert float((mean - merged).norm()) < 0.2 * float(delta.norm())
    assert float((fake_quantize(blocks, scales, merged, "keep") - merged).norm()) > 0.8 * float(delta.norm())
    a = fake_quantize(blocks, scales, merged, "stochastic", torch.Generator().manual_seed(5))
    b = fake_quantize(blocks, scales, merged, "stochastic", torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_a_block_pushed_past_the_grid_takes_a_coarser_exponent_instead_of_clipping():
    blocks, scales = quantize(torch.tensor([[6.0] + [0.5] * 31]))  # exponent 0: the code 6 is the top
    w = dequantize(blocks, scales, torch.float32)
    merged = w.clone()
    merged[0, 0] = 11.0
    for m in ("keep", "mse", "stochastic"):
        _, s = requantize(blocks, scales, merged, m, torch.Generator().manual_seed(0))
        assert int(s[0, 0]) == int(scales[0, 0]) + 1, m
    q = fake_quantize(blocks, scales, merged, "keep")
    assert float(q[0, 0]) == 12.0  # nearest on the coarser grid, not clipped to 6
