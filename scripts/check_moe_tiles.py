"""Every GPU tile config of the MoE kernels against the torch references, at the real shapes' tails.

The layer checks (tests/kernels/test_moe_kernels.py on the CPU, scripts/check_moe_gpu.py on the GPU) run whatever
tiles they get: the interpreter's small INTERPRET_CONFIG, or on the GPU the one candidate the autotuner
picks for that shape. The other autotuning candidates in moe_triton (MATMUL_CONFIGS, MATMUL_T_CONFIGS,
MATMUL_T_SWIGLU_CONFIGS) would run unchecked whenever another shape or row count (8192 or 131k tokens)
makes one of them the fastest. This script runs each of them, and the fixed GPU tiles of the small
kernels (GPU_FIXED_CONFIGS), through the launchers' `config=` argument.

On the CPU (default) under Triton's interpreter with hidden = intermediate = 320, which leaves the same
remainder as 2880 against every block size used (32..256; gate_up N = 640 like 5760), so each config meets
the same partial tiles and EVEN_K choice as at the real shapes; fp32 inputs (the interpreter's dots are
fp32), tolerance 1e-6. With --device cuda: the real 2880, bf16 activations on the tensor cores, tolerance
1e-2 (bf16 intermediates, see check_moe_gpu.py). Rows are ragged either way: one expert with more than 256
rows (several tiles at every BLOCK_M), one with exactly 64, one with a single row, two idle, and GROUP_M = 8
swizzling over more row tiles than a group. LoRA rank 40 (padded to 64 and masked). Error: relative
Frobenius vs float64 references computed on the CPU.

    python scripts/check_moe_tiles.py                    # CPU, interpreted: all 35 cases, about a minute
    python scripts/check_moe_tiles.py --only matmul_t    # one kernel family
    python scripts/check_moe_tiles.py --device cuda --json out.json   # on the GPU, real shapes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

TOL = {"cpu": 1e-6, "cuda": 1e-2}  # fp32 interpreted dots vs bf16 tensor-core operands
HIDDEN = {"cpu": 320, "cuda": 2880}  # 320: the remainder of 2880 against BLOCK 32/64/128/256
RANK = 40  # R_PAD = 64, masked


def _ops(device: str):
    """gptoss_kernels.moe_triton, interpreted (TRITON_INTERPRET=1 before triton is imported) on the CPU."""
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _moe_setup import setup_paths

    setup_paths()
    from gptoss_kernels import moe_triton

    if device == "cpu" and not moe_triton.INTERPRET:
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

    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _problem(seed=0, T=330, E=10, k=2, big=260, hidden=320, device="cpu", dtype=None):
    """Inputs on `device` (activations in `dtype`, LoRA factors and their intermediates fp32, as in
    training) and the same values on the CPU for the references: (p, cpu)."""
    import torch

    from gptoss_kernels.moe_dispatch import build_dispatch
    from gptoss_kernels.mxfp4 import quantize

    H = I = hidden
    dtype = dtype or torch.float32
    g = torch.Generator().manual_seed(seed)
    idx, rw = ragged_routing(T, E, k, big, seed)

    def mx(out_f, in_f):
        return quantize(torch.randn(E, out_f, in_f, generator=g) / in_f**0.5)

    act = dict(x=(T, H, 2.0), dout=(T, H, 1.0), h=(T * k, 2 * I, 6.0), dh=(T * k, 2 * I, 1.0))  # h: beyond the clamps
    cpu = dict(T=T, E=E, k=k, H=H, I=I, idx=idx, rw=rw.to(dtype))
    cpu["gu"], cpu["dn"] = mx(2 * I, H), mx(H, I)
    cpu["gu_bias"] = (torch.randn(E, 2 * I, generator=g) * 0.5).to(dtype)
    cpu["dn_bias"] = (torch.randn(E, H, generator=g) * 0.1).to(dtype)
    for name, (rows, cols, scale) in act.items():
        cpu[name] = (torch.randn(rows, cols, generator=g) * scale).to(dtype)
    cpu["xa"] = torch.randn(T * k, RANK, generator=g)
    cpu["u"] = torch.randn(T * k, RANK, generator=g)
    cpu["gu_B"] = torch.randn(E, 2 * I, RANK, generator=g) * 0.1
    cpu["gu_A"] = torch.randn(E, RANK, H, generator=g) * 0.1
    cpu["d"] = build_dispatch(idx, E)
    cpu["w_rows"] = rw.reshape(-1)[cpu["d"].row_pair.long()]
    p = {}
    for name, v in cpu.items():
        if isinstance(v, tuple) and not hasattr(v, "_fields"):
            p[name] = tuple(t.to(device) for t in v)
        elif hasattr(v, "_fields"):  # the Dispatch
            p[name] = type(v)(*[t.to(device) if torch.is_tensor(t) else t for t in v])
        else:
            p[name] = v.to(device) if torch.is_tensor(v) else v
    return p, cpu


def cases(MT, problem: dict | None = None):
    """(family, label, fn() -> rel error) for every GPU config of every kernel. `problem`: keyword
    arguments of _problem (device, dtype, hidden; the CPU tests pass fewer tokens)."""
    from gptoss_kernels import moe_reference as REF

    P, R = {}, {}

    def prob():
        if not P:
            P["p"], P["c"] = _problem(**(problem or {}))
        return P["p"], P["c"]

    def reference(kind, fn):
        """The float64 reference of one kind of case, computed once (it does not depend on the tiles)."""
        if kind not in R:
            R[kind] = fn()
        return R[kind]

    def kw(cfg):
        return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    def fwd_gate_up(cfg):
        p, c = prob()
        h, act = MT.mxfp4_grouped_matmul(
            p["x"],
            p["d"],
            *p["gu"],
            p["gu_bias"],
            rows=p["d"].row_token,
            lora=(p["xa"], p["gu_B"], 0.7),
            swiglu=(7.0, 1.702),
            config=kw(cfg),
        )
        d = c["d"]
        h_ref, act_ref = reference(
            "gate_up",
            lambda: REF.grouped_mxfp4_matmul_reference(
                c["x"],
                d.offsets,
                *c["gu"],
                c["gu_bias"],
                rows=d.row_token,
                xa=c["xa"],
                lora_B=c["gu_B"],
                lora_scale=0.7,
                swiglu=(7.0, 1.702),
            ),
        )
        return max(_rel(h, h_ref), _rel(act, act_ref))

    def fwd_down(cfg):
        p, c = prob()
        I, H = c["I"], c["H"]
        y = MT.mxfp4_grouped_matmul(
            p["h"][:, :I].contiguous(),
            p["d"],
            *p["dn"],
            p["dn_bias"],
            lora=(p["xa"], p["gu_B"][:, :H], 1.3),
            out_rows=p["d"].row_pair,
            config=kw(cfg),
        )
        d = c["d"]
        ref = reference(
            "down",
            lambda: REF.grouped_mxfp4_matmul_reference(
                c["h"][:, :I],
                d.offsets,
                *c["dn"],
                c["dn_bias"],
                xa=c["xa"],
                lora_B=c["gu_B"][:, :H],
                lora_scale=1.3,
                out_rows=d.row_pair,
            ),
        )
        return _rel(y, ref)

    def bwd_down_swiglu(cfg):
        p, c = prob()
        I = c["I"]
        dh = MT.mxfp4_grouped_matmul_t(
            p["dout"],
            p["d"],
            *p["dn"],
            rows=p["d"].row_token,
            row_scale=p["w_rows"],
            lora=(p["u"], p["gu_A"][:, :, :I], 0.9),
            swiglu_h=p["h"],
            config=kw(cfg),
        )
        d = c["d"]
        ref = reference(
            "down_bwd",
            lambda: REF.grouped_mxfp4_matmul_t_reference(
                c["dout"],
                d.offsets,
                *c["dn"],
                rows=d.row_token,
                row_scale=c["w_rows"],
                u=c["u"],
                lora_A=c["gu_A"][:, :, :I],
                lora_scale=0.9,
                swiglu_h=c["h"],
            ),
        )
        return _rel(dh, ref)

    def bwd_gate_up(cfg):
        p, c = prob()
        dx = MT.mxfp4_grouped_matmul_t(
            p["dh"], p["d"], *p["gu"], lora=(p["u"], p["gu_A"], 0.9), out_rows=p["d"].row_pair, config=kw(cfg)
        )
        d = c["d"]
        ref = reference(
            "gate_up_bwd",
            lambda: REF.grouped_mxfp4_matmul_t_reference(
                c["dh"], d.offsets, *c["gu"], u=c["u"], lora_A=c["gu_A"], lora_scale=0.9, out_rows=d.row_pair
            ),
        )
        return _rel(dx, ref)

    for cfg in MT.MATMUL_CONFIGS:
        yield "matmul", f"gate_up+swiglu {_label(cfg)}", lambda cfg=cfg: fwd_gate_up(cfg)
        yield "matmul", f"down scatter {_label(cfg)}", lambda cfg=cfg: fwd_down(cfg)
    for cfg in MT.MATMUL_T_SWIGLU_CONFIGS:
        yield "matmul_t", f"down_bwd+swiglu_bwd {_label(cfg)}", lambda cfg=cfg: bwd_down_swiglu(cfg)
    for cfg in MT.MATMUL_T_CONFIGS:
        yield "matmul_t", f"gate_up_bwd {_label(cfg)}", lambda cfg=cfg: bwd_gate_up(cfg)

    lr_cfg, outer_cfg, combine_cfg, rg_cfg = (
        MT.GPU_FIXED_CONFIGS[n] for n in ("lowrank", "outer", "combine", "routing_grad")
    )

    def lowrank():
        p, c = prob()
        out = MT.grouped_lowrank(p["dh"], p["d"], p["gu_B"].transpose(1, 2), row_scale=p["w_rows"], config=lr_cfg)
        ref = REF.grouped_lowrank_reference(c["dh"], c["d"].offsets, c["gu_B"].transpose(1, 2), row_scale=c["w_rows"])
        out2 = MT.grouped_lowrank(p["x"], p["d"], p["gu_A"], rows=p["d"].row_token, config=lr_cfg)
        ref2 = REF.grouped_lowrank_reference(c["x"], c["d"].offsets, c["gu_A"], rows=c["d"].row_token)
        return max(_rel(out, ref), _rel(out2, ref2))

    def outer(variant):
        p, c = prob()
        # (left operand, keyword arguments; strings name tensors of the problem, looked up on each side)
        left, kwargs = {
            "dB_gather_scale": ("dout", dict(left_rows="row_token", left_scale="w_rows")),
            "dA_swiglu": ("h", dict(left_swiglu=(7.0, 1.702), transpose=True)),
            "dA_gather": ("x", dict(left_rows="row_token", transpose=True)),
        }[variant]

        def resolve(q):
            return {
                k: (getattr(q["d"], v) if v == "row_token" else q[v]) if isinstance(v, str) else v
                for k, v in kwargs.items()
            }

        out = MT.grouped_outer(p[left], p["u"], p["d"], scale=0.5, config=outer_cfg, **resolve(p))
        ref = REF.grouped_outer_reference(c[left], c["u"], c["d"].offsets, scale=0.5, **resolve(c))
        idle_zero = all(int((out[e] != 0).sum()) == 0 for e in (c["E"] - 2, c["E"] - 1))
        return _rel(out, ref) if idle_zero else float("inf")

    def combine_and_routing_grad():
        p, c = prob()
        H = c["H"]
        e1 = _rel(
            MT.combine(p["dh"][:, :H].contiguous(), p["rw"], config=combine_cfg),
            REF.combine_reference(c["dh"][:, :H], c["rw"]),
        )
        e2 = _rel(
            MT.routing_grad(p["dh"][:, :H].contiguous(), p["dout"], c["k"], config=rg_cfg),
            REF.routing_grad_reference(c["dh"][:, :H], c["dout"], c["k"]),
        )
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
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--only", default=None, help="matmul, matmul_t, lowrank, outer or combine")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    MT = _ops(args.device)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    tol = TOL[args.device]
    problem = dict(
        hidden=HIDDEN[args.device], device=args.device, dtype=torch.bfloat16 if args.device == "cuda" else torch.float32
    )
    rows, failed = [], 0
    for family, label, fn in cases(MT, problem):
        if args.only and family != args.only:
            continue
        t0 = time.perf_counter()
        try:
            err = fn()
        except Exception as exc:  # noqa: BLE001 - a config that fails to compile or launch is reported, not fatal
            err, label = float("nan"), f"{label} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        ok = err <= tol
        failed += not ok
        rows.append(dict(family=family, config=label, rel_err=err, tolerance=tol, passed=ok))
        print(
            f"{'OK  ' if ok else 'FAIL'} {label:<70} rel err {err:.2e}  {time.perf_counter() - t0:5.1f} s", flush=True
        )
    print(f"{len(rows) - failed}/{len(rows)} configs match the references (tol {tol:g})")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=args.device, hidden=problem["hidden"], rows=rows), indent=1))
    print("PASS" if not failed else "FAIL")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
