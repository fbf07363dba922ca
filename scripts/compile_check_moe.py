"""Compile every MoE kernel for Hopper (sm_90) without a GPU and report its resources.

Triton's wheel carries ptxas and cuobjdump, so the whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin)
runs on a CPU machine. For each kernel and tile config at the gpt-oss shapes this prints shared memory,
registers per thread, spill bytes, and whether the matrix products became Hopper warpgroup MMAs
(wgmma in PTX, HGMMA in SASS) rather than the older mma.sync (HMMA). It proves the kernels compile
and fit; it says nothing about speed (scripts/bench_moe.py on a GPU does).

    python scripts/compile_check_moe.py [--kernel NAME] [--json out.json]
    python scripts/compile_check_moe.py --dtype fp16      # the fp16-activation variants
    python scripts/compile_check_moe.py --rank 64         # LoRA rank 64 (R_PAD 64; default 16)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _moe_setup import setup_paths  # noqa: E402

setup_paths()

from gptoss_kernels import moe_kernels as K  # noqa: E402
from gptoss_kernels import moe_triton as MT  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
TARGET = GPUTarget("cuda", 90, 32)

# Pointer element types for the bf16 training path; everything else is i32 unless listed as float.
POINTERS = {
    "X": "bf16",
    "DY": "bf16",
    "Y": "bf16",
    "ACT": "bf16",
    "DX": "bf16",
    "HPRE": "bf16",
    "DOUT": "bf16",
    "L": "bf16",
    "RT": "bf16",
    "BIAS": "bf16",
    "W": "bf16",
    "OUT": "bf16",
    "WB": "u8",
    "WS": "u8",
    "IN_ROWS": "i32",
    "OUT_ROWS": "i32",
    "L_ROWS": "i32",
    "R_ROWS": "i32",
    "OFFSETS": "i32",
    "ROW_SCALE": "fp32",
    "L_SCALE": "fp32",
    "XA": "fp32",
    "LB": "fp32",
    "U": "fp32",
    "LA": "fp32",
    "A": "fp32",
    "DW": "fp32",
}
FLOATS = {"lora_scale", "limit", "alpha", "scale"}

E, H, I, R, P = 32, 2880, 2880, 16, 8192  # 20b layer, 2048 tokens x top-4, LoRA rank 16
SAMPLE_INTS = {  # values at the real shape: an int divisible by 16 is specialised as such at run time
    "stride_xm": H,
    "stride_dym": H,
    "stride_ym": 2 * I,
    "stride_am": I,
    "stride_hm": 2 * I,
    "stride_dxm": 2 * I,
    "stride_wbe": 2 * I * H // 2,
    "stride_wbn": H // 2,
    "stride_wse": 2 * I * H // 32,
    "stride_wsn": H // 32,
    "stride_be": 2 * I,
    "stride_xam": R,
    "stride_lbe": 2 * I * R,
    "stride_lbn": R,
    "stride_lbr": 1,
    "stride_um": R,
    "stride_lae": R * H,
    "stride_lar": H,
    "stride_lak": 1,
    "stride_ae": R * H,
    "stride_ar": H,
    "stride_ak": 1,
    "stride_om": R,
    "stride_lm": 2 * I,
    "stride_rm": R,
    "stride_oe": 2 * I * R,
    "stride_o1": R,
    "stride_o2": 1,
    "stride_dm": H,
    "num_rows": P,
    "E": E,
    "N": 2 * I,
    "K": H,
    "R": R,
    "D1": 2 * I,
    "D2": R,
    "m_hint": 256,
}


ACTIVATIONS = "bf16"  # --dtype: the activation pointers' type and the tensor-core operand type


def set_rank(rank: int) -> None:
    """LoRA rank R (R_PAD = R here, a power of two >= 16) and the strides that depend on it."""
    global R
    R = rank
    SAMPLE_INTS.update(
        {
            "stride_xam": R,
            "stride_lbe": 2 * I * R,
            "stride_lbn": R,
            "stride_um": R,
            "stride_lae": R * H,
            "stride_ae": R * H,
            "stride_om": R,
            "stride_rm": R,
            "stride_oe": 2 * I * R,
            "stride_o1": R,
            "R": R,
            "D2": R,
        }
    )


def signature(fn, constexprs):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in POINTERS:
            sig[name] = "*" + (ACTIVATIONS if POINTERS[name] == "bf16" else POINTERS[name])
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            v = SAMPLE_INTS.get(name)
            if v is not None and v % 16 == 0 and v != 1:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def main_loop_instructions(sass: str) -> int | None:
    """Instructions in the innermost loop that issues the warpgroup MMAs (a backward branch over HGMMA)."""
    insts = [
        (int(m.group(1), 16), m.group(2))
        for line in sass.splitlines()
        for m in [re.match(r"\s+/\*([0-9a-f]{4,6})\*/\s+(.*?);", line)]
        if m
    ]
    best = None
    for addr, text in insts:
        target = re.search(r"BRA (0x[0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            body = [t for a, t in insts if int(target.group(1), 16) <= a <= addr]
            if any("HGMMA" in t for t in body) and (best is None or len(body) < best):
                best = len(body)
    return best


def compile_one(fn, constexprs, num_warps, num_stages):
    sig, attrs = signature(fn, constexprs)
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    out = triton.compile(src, target=TARGET, options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(out.asm["cubin"])
        f.flush()
        res = subprocess.run(
            [str(BIN / "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
        sass = subprocess.run([str(BIN / "cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    spill = sum(int(v) for v in re.findall(r"(?:spill stores|spill loads)\D*(\d+)", res))
    ttgir = out.asm["ttgir"]
    extra = {}
    loop = main_loop_instructions(sass)
    if loop and "BLOCK_N" in constexprs and "BLOCK_K" in constexprs:
        # per-thread loop instructions over the weights each thread dequantises per iteration: the ALU cost
        # of in-register dequantisation (the MMA's share is 2·BLOCK_M flops per weight element)
        per_thread = constexprs["BLOCK_N"] * constexprs["BLOCK_K"] / (num_warps * 32)
        extra = dict(loop_instructions=loop, instructions_per_weight=round(loop / per_thread, 2))
    return dict(
        **extra,
        shared=out.metadata.shared,
        regs=int(regs.group(1)) if regs else None,
        stack=int(stack.group(1)) if stack else None,
        spill_bytes=spill,
        wgmma_ptx=out.asm["ptx"].count("wgmma.mma_async"),
        hgmma_sass=len(re.findall(r"\bHGMMA\b", sass)),
        hmma_sass=len(re.findall(r"\bHMMA\b", sass)),
        local_ldst=len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        convert_layouts=ttgir.count("ttg.convert_layout"),
    )


def cases():
    dot = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}[ACTIVATIONS]
    common = dict(E_PAD=32, R_PAD=R, DOT_DTYPE=dot)
    for cfg in MT.MATMUL_CONFIGS:
        for name, extra in (
            ("gate_up+swiglu", dict(HAS_IN_ROWS=True, HAS_OUT_ROWS=False, SWIGLU=True, STORE_PRE=True)),
            ("down", dict(HAS_IN_ROWS=False, HAS_OUT_ROWS=True, SWIGLU=False, STORE_PRE=False)),
        ):
            c = dict(common, HAS_LORA=True, EVEN_K=H % cfg.kwargs["BLOCK_K"] == 0, **extra, **cfg.kwargs)
            yield f"mxfp4_grouped_matmul[{name}]", K.mxfp4_grouped_matmul_kernel, c, cfg
    for configs, name, extra in (
        (
            MT.MATMUL_T_SWIGLU_CONFIGS,
            "down_bwd+swiglu_bwd",
            dict(HAS_IN_ROWS=True, HAS_ROW_SCALE=True, HAS_OUT_ROWS=False, SWIGLU_BWD=True),
        ),
        (
            MT.MATMUL_T_CONFIGS,
            "gate_up_bwd",
            dict(HAS_IN_ROWS=False, HAS_ROW_SCALE=False, HAS_OUT_ROWS=True, SWIGLU_BWD=False),
        ),
    ):
        for cfg in configs:
            c = dict(common, HAS_LORA=True, **extra, **cfg.kwargs)
            yield f"mxfp4_grouped_matmul_t[{name}]", K.mxfp4_grouped_matmul_t_kernel, c, cfg
    fixed = {
        name: ({k: v for k, v in c.items() if k.startswith("BLOCK")}, c.get("num_warps", 4), c.get("num_stages", 3))
        for name, c in MT.GPU_FIXED_CONFIGS.items()
    }
    tiles, warps, stages = fixed["lowrank"]
    lr = triton.Config(tiles, num_warps=warps, num_stages=stages)
    yield (
        "grouped_lowrank",
        K.grouped_lowrank_kernel,
        dict(E_PAD=32, R_PAD=R, HAS_IN_ROWS=True, HAS_ROW_SCALE=True, DOT_DTYPE=dot, **lr.kwargs),
        lr,
    )
    for name, c in (
        ("dB_gather_scale", dict(HAS_L_ROWS=True, HAS_L_SCALE=True, L_SWIGLU=False)),
        ("dA_swiglu", dict(HAS_L_ROWS=False, HAS_L_SCALE=False, L_SWIGLU=True)),
        ("dA_gather", dict(HAS_L_ROWS=True, HAS_L_SCALE=False, L_SWIGLU=False)),
    ):
        tiles, warps, stages = fixed["outer"]
        c = dict(tiles, BLOCK_D2=R, **c)
        cfg = triton.Config(c, num_warps=warps, num_stages=stages)
        yield f"grouped_outer[{name}]", K.grouped_outer_kernel, dict(c, DOT_DTYPE=dot), cfg
    cfg = triton.Config(dict(TOP_K=4, **fixed["combine"][0]), num_warps=4, num_stages=1)
    yield "combine", K.combine_kernel, dict(cfg.kwargs), cfg
    cfg = triton.Config(dict(TOP_K=4, K_PAD=4, **fixed["routing_grad"][0]), num_warps=4, num_stages=1)
    yield "routing_grad", K.routing_grad_kernel, dict(cfg.kwargs), cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", default=None, help="only kernels whose name contains this")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--dtype",
        choices=["bf16", "fp16", "fp32"],
        default="bf16",
        help="activation / tensor-core operand type (fp32: a model loaded in fp32 on CUDA, tf32 dots)",
    )
    ap.add_argument("--rank", type=int, default=16, choices=[16, 32, 64, 128], help="LoRA rank (padded rank)")
    args = ap.parse_args(argv)
    set_rank(args.rank)
    global ACTIVATIONS
    ACTIVATIONS = args.dtype
    rows, failed = [], 0
    for name, fn, constexprs, cfg in cases():
        if args.kernel and args.kernel not in name:
            continue
        tiles = {k: v for k, v in cfg.kwargs.items() if k.startswith("BLOCK")}
        label = f"{name} {tiles} w{cfg.num_warps} s{cfg.num_stages}"
        try:
            r = compile_one(fn, constexprs, cfg.num_warps, cfg.num_stages)
            ok = r["shared"] <= 227 * 1024 and not r["local_ldst"]
        except Exception as exc:  # noqa: BLE001 - report and go on
            r, ok = dict(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"), False
        failed += not ok
        rows.append(dict(kernel=name, tiles=tiles, num_warps=cfg.num_warps, num_stages=cfg.num_stages, ok=ok, **r))
        print(("OK   " if ok else "FAIL ") + label + "  " + json.dumps(r), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"{len(rows) - failed}/{len(rows)} compiled within Hopper limits")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
