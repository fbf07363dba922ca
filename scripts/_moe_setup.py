"""Shared set-up for the GPU scripts (bench_moe.py, check_moe_gpu.py, check_convergence_gpu.py).

They must run on the lent GPU machine, where the project may not be pip-installed: `setup_paths()`
puts the repository on sys.path and, if `gptoss_kernels` is not importable, registers kernels/ under
that name (what `pip install -e .` does). Nothing here needs pydantic, datasets or other packages the
GPU machine lacks.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_paths() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        import gptoss_kernels  # noqa: F401
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "gptoss_kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["gptoss_kernels"] = module
        spec.loader.exec_module(module)


def random_mxfp4(E, out_f, in_f, device, *, realistic=True, generator=None):
    """MXFP4 blocks/scales [E, out, in] made on `device`.

    realistic: quantise N(0, 1/in) weights one expert at a time (every code, scales near 2**-6, as in
    the checkpoints); otherwise random bytes with scales 2**-9..2**-4 (fast; fine for timing, never zeros).
    """
    import torch

    from gptoss_kernels.mxfp4 import quantize

    if not realistic:
        blocks = torch.randint(
            0, 256, (E, out_f, in_f // 32, 16), dtype=torch.uint8, device=device, generator=generator
        )
        scales = torch.randint(118, 124, (E, out_f, in_f // 32), dtype=torch.uint8, device=device, generator=generator)
        return blocks, scales
    blocks = torch.empty(E, out_f, in_f // 32, 16, dtype=torch.uint8, device=device)
    scales = torch.empty(E, out_f, in_f // 32, dtype=torch.uint8, device=device)
    for e in range(E):
        w = torch.randn(out_f, in_f, device=device, generator=generator) / in_f**0.5
        blocks[e], scales[e] = quantize(w)
    return blocks, scales


def random_layer(E, H, I, device, *, dtype, rank=16, realistic=True, seed=0, lora=True):
    """(ExpertWeights, ExpertLoRA | None): MXFP4 experts, biases in `dtype`, fp32 LoRA with non-zero B."""
    import torch

    from gptoss_kernels.moe_reference import ExpertLoRA, ExpertWeights

    g = torch.Generator(device=device).manual_seed(seed)
    gub, gus = random_mxfp4(E, 2 * I, H, device, realistic=realistic, generator=g)
    dnb, dns = random_mxfp4(E, H, I, device, realistic=realistic, generator=g)
    w = ExpertWeights(
        gub,
        gus,
        (torch.randn(E, 2 * I, device=device, generator=g) * 0.5).to(dtype),
        dnb,
        dns,
        (torch.randn(E, H, device=device, generator=g) * 0.02).to(dtype),
    )
    if not lora:
        return w, None
    f32 = dict(device=device, dtype=torch.float32)
    factors = (
        (torch.rand(E, rank, H, generator=g, **f32) * 2 - 1) / H**0.5,
        torch.randn(E, 2 * I, rank, generator=g, **f32) * 0.02,
        (torch.rand(E, rank, I, generator=g, **f32) * 2 - 1) / I**0.5,
        torch.randn(E, H, rank, generator=g, **f32) * 0.02,
    )
    return w, ExpertLoRA(*factors, 2.0)


def random_routing(T, E, k, device, *, dtype, idle=(), seed=0):
    """Router-like top-k indices [T, k] and softmax weights [T, k]; experts in `idle` get no token."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(T, E, device=device, generator=g)
    for e in idle:
        logits[:, e] = float("-inf")
    top, idx = torch.topk(logits, k, dim=-1)
    return idx, torch.softmax(top, dim=-1).to(dtype)


def poison_allocator(device, nbytes: int) -> None:
    """Fill freed memory with NaN so that outputs the kernels fail to write show up as NaN."""
    import torch

    if torch.device(device).type != "cuda":
        return
    buf = torch.full((nbytes // 4,), float("nan"), dtype=torch.float32, device=device)
    del buf
