"""Every GPU tile config of the MoE kernels, run by Triton's interpreter on the CPU against the torch references.

The CPU tests (tests/test_moe_kernels.py) use the interpreter's small tiles (INTERPRET_CONFIG); the GPU
runs the autotuning candidates in moe_triton (MATMUL_CONFIGS, MATMUL_T_CONFIGS, MATMUL_T_SWIGLU_CONFIGS)
and the fixed GPU tiles of the small kernels (GPU_FIXED_CONFIGS). Their tail and masking situations differ:
2880 is 45 x 64 but 22.5 x 128 and 11.25 x 256, and 5760 leaves half a 256-wide tile. This script runs each
config with hidden = intermediate = 320, which leaves the same remainder as 2880 against every block size
used (32..256: 320 = 2880 mod 32, 64, 128, 256 up to whole tiles; gate_up N = 640 like 5760), so each
config meets the same partial tiles and EVEN_K choice as at the real shapes. Rows are ragged: one expert
with more than 256 rows (several BLOCK_M tiles at every config), one with exactly 64, one with a single
row, idle experts, and GROUP_M = 8 swizzling over more row tiles than a group. LoRA rank 40 (padded to 64
and masked). fp32 inputs (the interpreter's tl.dot is fp32 there), relative Frobenius error vs float64.

What this cannot show: speed, register spills, bf16 tensor-core numerics (scripts/check_moe_gpu.py) and
anything of compiled code that the interpreter does not model (scripts/compile_check_moe.py compiles).

    python scripts/check_moe_tiles_cpu.py                 # all configs (a few minutes on 2 cores)
    python scripts/check_moe_tiles_cpu.py --only matmul_t  # one kernel family
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

TOL = 1e-6  # fp32 dots in the interpreter vs float64 references (the CPU tests' bound)
H = I = 320  # same remainder as 2880 against BLOCK 32/64/128/256
RANK = 40  # R_PAD = 64, masked


def _ops():
    """gptoss_kernels.moe_triton imported with TRITON_INTERPRET=1 (set before triton is imported)."""
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _moe_setup import setup_paths

    setup_paths()
    from gptoss_kernels import moe_triton

    if not moe_triton.INTERPRET:
        raise SystemExit("triton was imported without TRITON_INTERPRET=1; run this script in its own process")
    return moe_triton


def ragged_routing(T: int, E: int, k: int, big: int = 260, seed: int = 0):
    """[T, k] distinct experts per token: expert 0 takes the first `big` tokens (more than 256 rows: several
    tiles at every BLOCK_M), expert 1 exactly 64, expert 2 a single token, the last two none; the rest random."""
    import torch

    g = torch.Generator().manual_seed(seed)
    idx = torch.empty(T, k, dtype=torch.long)
    for t in range(T):
        first = 0 if t < big else (1 if t < big + 64 else (2 if t == big + 64 else 3))
        others = torch.randperm(E - 5, generator=g)[: k - 1] + 3  # experts 3 .. E-3, never the idle ones
        others = others[others != first][: k - 1]
        if len(others) < k - 1:
            others = torch.cat([others, torch.tensor([E - 3])])
        idx[t, 0], idx[t, 1:] = first, others
    w = torch.softmax(torch.randn(T, k, generator=g), -1)
    return idx, w


def _rel(a, b) -> float:
    import torch

    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _problem(seed=0, T=330, E=10, k=2, big=260):
    import torch

    from gptoss_kernels.moe_dispatch import build_dispatch
    from gptoss_tune.mxfp4 import quantize

    g = torch.Generator().manual_seed(seed)
    idx, rw = ragged_routing(T, E, k, big, seed)
    d = build_dispatch(idx, E)

    def mx(out_f, in_f):
        w = torch.randn(E, out_f, in_f, generator=g) / in_f**0.5
        return quantize(w)

    p = dict(T=T, E=E, k=k, idx=idx, rw=rw, d=d)
    p["gu"] = mx(2 * I, H)
    p["dn"] = mx(H, I)
    p["gu_bias"] = torch.randn(E, 2 * I, generator=g) * 0.5
    p["dn_bias"] = torch.randn(E, H, generator=g) * 0.1
    p["x"] = torch.randn(T, H, generator=g) * 2
    p["xa"] = torch.randn(T * k, RANK, generator=g)
    p["gu_B"] = torch.randn(E, 2 * I, RANK, generator=g) * 0.1
    p["gu_A"] = torch.randn(E, RANK, H, generator=g) * 0.1
    p["dout"] = torch.randn(T, H, generator=g)
    p["h"] = torch.randn(T * k, 2 * I, generator=g) * 6  # beyond the SwiGLU clamps in places
    p["u"] = torch.randn(T * k, RANK, generator=g)
    p["dh"] = torch.randn(T * k, 2 * I, generator=g)
    p["w_rows"] = rw.reshape(-1)[d.row_pair.long()]
    return p


def cases(MT, problem: dict | None = None):
    """(family, label, fn() -> rel error) for every GPU config of every kernel. `problem`: keyword
    arguments of _problem (the CPU tests pass fewer tokens)."""
    from gptoss_kernels import moe_reference as REF

    P = {}

    def prob():
        if not P:
            P.update(_problem(**(problem or {})))
        return P

    def kw(cfg):
        return {k: v for k, v in cfg.kwargs.items()}

    def fwd_gate_up(cfg):
        p = prob()
        d = p["d"]
        h, act = MT.mxfp4_grouped_matmul(p["x"], d, *p["gu"], p["gu_bias"], rows=d.row_token,
                                         lora=(p["xa"], p["gu_B"], 0.7), swiglu=(7.0, 1.702), config=kw(cfg))
        h_ref, act_ref = REF.grouped_mxfp4_matmul_reference(p["x"], d.offsets, *p["gu"], p["gu_bias"], rows=d.row_token,
                                                           xa=p["xa"], lora_B=p["gu_B"], lora_scale=0.7, swiglu=(7.0, 1.702))
        return max(_rel(h, h_ref), _rel(act, act_ref))

    def fwd_down(cfg):
        p = prob()
        d = p["d"]
        act = p["h"][:, :I].contiguous()
        y = MT.mxfp4_grouped_matmul(act, d, *p["dn"], p["dn_bias"], lora=(p["xa"], p["gu_B"][:, :H], 1.3),
                                    out_rows=d.row_pair, config=kw(cfg))
        ref = REF.grouped_mxfp4_matmul_reference(act, d.offsets, *p["dn"], p["dn_bias"], xa=p["xa"],
                                                 lora_B=p["gu_B"][:, :H], lora_scale=1.3, out_rows=d.row_pair)
        return _rel(y, ref)

    def bwd_down_swiglu(cfg):
        p = prob()
        d = p["d"]
        A = p["gu_A"][:, :, :I]
        dh = MT.mxfp4_grouped_matmul_t(p["dout"], d, *p["dn"], rows=d.row_token, row_scale=p["w_rows"],
                                       lora=(p["u"], A, 0.9), swiglu_h=p["h"], config=kw(cfg))
        ref = REF.grouped_mxfp4_matmul_t_reference(p["dout"], d.offsets, *p["dn"], rows=d.row_token, row_scale=p["w_rows"],
                                                   u=p["u"], lora_A=A, lora_scale=0.9, swiglu_h=p["h"])
        return _rel(dh, ref)

    def bwd_gate_up(cfg):
        p = prob()
        d = p["d"]
        dx = MT.mxfp4_grouped_matmul_t(p["dh"], d, *p["gu"], lora=(p["u"], p["gu_A"], 0.9), out_rows=d.row_pair,
                                       config=kw(cfg))
        ref = REF.grouped_mxfp4_matmul_t_reference(p["dh"], d.offsets, *p["gu"], u=p["u"], lora_A=p["gu_A"], lora_scale=0.9,
                                                   out_rows=d.row_pair)
        return _rel(dx, ref)

    for cfg in MT.MATMUL_CONFIGS:
        yield "matmul", f"gate_up+swiglu {_label(cfg)}", lambda cfg=cfg: fwd_gate_up(cfg)
        yield "matmul", f"down scatter {_label(cfg)}", lambda cfg=cfg: fwd_down(cfg)
    for cfg in MT.MATMUL_T_SWIGLU_CONFIGS:
        yield "matmul_t", f"down_bwd+swiglu_bwd {_label(cfg)}", lambda cfg=cfg: bwd_down_swiglu(cfg)
    for cfg in MT.MATMUL_T_CONFIGS:
        yield "matmul_t", f"gate_up_bwd {_label(cfg)}", lambda cfg=cfg: bwd_gate_up(cfg)

    lr_cfg, outer_cfg, combine_cfg, rg_cfg = (MT.GPU_FIXED_CONFIGS[n] for n in ("lowrank", "outer", "combine", "routing_grad"))

    def lowrank():
        p = prob()
        d = p["d"]
        out = MT.grouped_lowrank(p["dh"], d, p["gu_B"].transpose(1, 2), row_scale=p["w_rows"], config=lr_cfg)
        ref = REF.grouped_lowrank_reference(p["dh"], d.offsets, p["gu_B"].transpose(1, 2), row_scale=p["w_rows"])
        out2 = MT.grouped_lowrank(p["x"], d, p["gu_A"], rows=d.row_token, config=lr_cfg)
        ref2 = REF.grouped_lowrank_reference(p["x"], d.offsets, p["gu_A"], rows=d.row_token)
        return max(_rel(out, ref), _rel(out2, ref2))

    def outer(variant):
        p = prob()
        d = p["d"]
        if variant == "dB_gather_scale":
            left, kwargs = p["dout"], dict(left_rows=d.row_token, left_scale=p["w_rows"])
        elif variant == "dA_swiglu":
            left, kwargs = p["h"], dict(left_swiglu=(7.0, 1.702), transpose=True)
        else:
            left, kwargs = p["x"], dict(left_rows=d.row_token, transpose=True)
        out = MT.grouped_outer(left, p["u"], d, scale=0.5, config=outer_cfg, **kwargs)
        ref = REF.grouped_outer_reference(left, p["u"], d.offsets, scale=0.5, **kwargs)
        idle_zero = all(int((out[e] != 0).sum()) == 0 for e in (p["E"] - 2, p["E"] - 1))
        return _rel(out, ref) if idle_zero else float("inf")

    def combine_and_routing_grad():
        p = prob()
        y = p["dh"][:, :H].contiguous()
        e1 = _rel(MT.combine(y, p["rw"], config=combine_cfg), REF.combine_reference(y, p["rw"]))
        e2 = _rel(MT.routing_grad(y, p["dout"], p["k"], config=rg_cfg), REF.routing_grad_reference(y, p["dout"], p["k"]))
        return max(e1, e2)

    yield "lowrank", f"grouped_lowrank {lr_cfg}", lowrank
    for v in ("dB_gather_scale", "dA_swiglu", "dA_gather"):
        yield "outer", f"grouped_outer[{v}] {outer_cfg}", lambda v=v: outer(v)
    yield "combine", f"combine {combine_cfg} routing_grad {rg_cfg}", combine_and_routing_grad


def _label(cfg) -> str:
    k = cfg.kwargs
    return f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']} g{k['GROUP_M']} w{cfg.num_warps} s{cfg.num_stages}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="matmul, matmul_t, lowrank, outer or combine")
    args = ap.parse_args(argv)
    MT = _ops()
    failed = total = 0
    for family, label, fn in cases(MT):
        if args.only and family != args.only:
            continue
        t0 = time.perf_counter()
        err = fn()
        ok = err <= TOL
        total += 1
        failed += not ok
        print(f"{'OK  ' if ok else 'FAIL'} {label:<60} rel err {err:.2e}  {time.perf_counter() - t0:5.1f} s", flush=True)
    print(f"{total - failed}/{total} configs match the references (tol {TOL:g})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
