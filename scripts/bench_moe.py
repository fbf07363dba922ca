"""Benchmark the gpt-oss expert layer: our MXFP4 Triton kernels vs torch's bf16 grouped GEMM and vs
transformers + PEFT, all measured in the same run on the same inputs.

Shapes (hidden = intermediate = 2880, top-4): 20b (E = 32) and 120b (E = 128), at 2048 and 8192 tokens.
Weights are random MXFP4 made on the GPU (random bytes, E8M0 scales 2**-9..2**-4: never zeros); the bf16
baselines get the same weights dequantised to bf16. Inputs rotate over three sets so that no run is
timed on a warm copy of the previous one's activations; triton.testing.do_bench (CUDA events, L2
flushed between repetitions) gives the median.

Rows of the table:
  ours fwd                 MXFP4 Triton forward, inference (torch.no_grad, no LoRA)
  ours fwd+bwd             forward + backward, grads to x and the routing weights, no LoRA
  ours fwd+bwd LoRA r      the training step's expert work: + LoRA on both projections, grads to A and B
  bf16 grouped_mm GEMMs    torch._grouped_mm on pre-sorted, pre-padded bf16 inputs: the two GEMMs alone
  bf16 grouped_mm fwd      a torch layer around them (sort, gather, pad, bias, SwiGLU, weight, combine)
  bf16 grouped_mm fwd+bwd  the same with autograd (grads to x and the routing weights)
  transformers+PEFT ...    GptOssExperts with bf16 weights and PEFT LoRA (target_parameters), per
                           transformers experts implementation (eager loop, grouped_mm)
TFLOP/s counts only the base GEMM work, 2·(T·k)·3·H·I per forward (x3 for forward + backward), so rows
compare directly; LoRA's extra work is not counted. "expert bytes" is the resident expert weight memory
(ours: 4.25 bits a weight). "peak GB" is the peak allocated during one call, above what was allocated
before it (weights excluded).

    python scripts/bench_moe.py                                # all four shapes; JSON to bench_moe.json
    python scripts/bench_moe.py --shapes 120b-2048 --json out.json --skip-peft
    TRITON_INTERPRET=1 python scripts/bench_moe.py --device cpu --small   # plumbing only, on CPU (minutes)
    python scripts/bench_moe.py --device cpu --tiny                        # plumbing in seconds (gpu_quick --dry-run)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

SHAPES = {"20b-2048": (32, 2048), "20b-8192": (32, 8192), "120b-2048": (128, 2048), "120b-8192": (128, 8192)}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--json", default="bench_moe.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="hidden = intermediate = 64, tokens / 16 (for --device cpu)")
    ap.add_argument(
        "--tiny",
        action="store_true",
        help="hidden = intermediate = 32, 16 tokens, 4 experts for every shape: the interpreter's plumbing in seconds "
        "(--small at E = 32 takes minutes interpreted)",
    )
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _moe_setup import random_layer, random_routing, setup_paths

    setup_paths()
    import torch
    import triton

    from gptoss_kernels import moe_triton
    from gptoss_kernels.moe_dispatch import build_dispatch
    from gptoss_kernels.moe_reference import ExpertLoRA, swiglu_reference
    from gptoss_kernels.mxfp4 import dequantize

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if cuda else torch.float32
    dev = torch.device(args.device)
    H = I = 32 if args.tiny else 64 if args.small else 2880
    k = args.top_k

    def bench(fn):
        fn()  # compile and autotune outside the timing (do_bench sizes its repetitions from a first call)
        if cuda:
            torch.cuda.synchronize()
            return triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")
        times = []
        for _ in range(1 if args.tiny else 3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def peak_gb(fn):
        if not cuda:
            return None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 1e9

    env = dict(
        device=torch.cuda.get_device_name() if cuda else "cpu",
        torch=torch.__version__,
        triton=triton.__version__,
        interpret=moe_triton.INTERPRET,
        hidden=H,
        intermediate=I,
        top_k=k,
        lora_rank=args.rank,
    )
    try:
        import peft
        import transformers

        env.update(transformers=transformers.__version__, peft=peft.__version__)
    except ImportError:
        pass
    print(json.dumps(env))
    rows = []

    for shape in args.shapes:
        E, T = SHAPES[shape]
        if args.tiny:
            E, T = 4, 16
        elif args.small:
            T //= 16
        P = T * k
        flops_fwd = 2.0 * P * 3 * H * I
        w, lora = random_layer(E, H, I, dev, dtype=dtype, rank=args.rank, realistic=False, seed=E)
        ours_bytes = sum(t.numel() for t in (w.gate_up_blocks, w.gate_up_scales, w.down_blocks, w.down_scales))
        bf16_bytes = E * 3 * H * I * 2
        sets = []
        for i in range(3):
            idx, rw = random_routing(T, E, k, dev, dtype=dtype, seed=100 * i + E)
            g = torch.Generator(device=dev).manual_seed(7 + i)
            x = torch.randn(T, H, device=dev, generator=g).to(dtype)
            gout = torch.randn(T, H, device=dev, generator=g).to(dtype)
            sets.append((x, idx, rw, gout))
        turn = [0]

        def inputs():
            turn[0] = (turn[0] + 1) % len(sets)
            return sets[turn[0]]

        def record(name, fn, flops, expert_bytes, note=""):
            try:
                ms = bench(fn)
                pk = peak_gb(fn)
                row = dict(
                    shape=shape,
                    experts=E,
                    tokens=T,
                    name=name,
                    ms=ms,
                    tflops=flops / ms / 1e9,
                    expert_gb=expert_bytes / 1e9,
                    peak_gb=pk,
                    note=note,
                )
            except Exception as exc:  # noqa: BLE001 - a failing baseline is reported, not fatal
                traceback.print_exc()
                row = dict(shape=shape, experts=E, tokens=T, name=name, error=f"{type(exc).__name__}: {exc}"[:300])
            rows.append(row)
            print(json.dumps(row), flush=True)
            return row

        # ---- ours ----------------------------------------------------------------------------------------
        def ours_fwd():
            x, idx, rw, _ = inputs()
            with torch.no_grad():
                moe_triton.moe_experts(x, idx, rw, w, None)

        def ours_train(use_lora):
            factors = None
            if use_lora:
                factors = ExpertLoRA(*[t.detach().clone().requires_grad_(True) for t in lora[:4]], lora.scaling)

            def step():
                x, idx, rw, gout = inputs()
                x = x.detach().requires_grad_(True)
                rw = rw.detach().requires_grad_(True)
                moe_triton.moe_experts(x, idx, rw, w, factors).backward(gout)
                if factors is not None:
                    for t in factors[:4]:
                        t.grad = None

            return step

        record("ours fwd", ours_fwd, flops_fwd, ours_bytes)
        record("ours fwd+bwd", ours_train(False), 3 * flops_fwd, ours_bytes)
        record(f"ours fwd+bwd LoRA r{args.rank}", ours_train(True), 3 * flops_fwd, ours_bytes)

        # ---- bf16 weights for the baselines (dequantised once, one expert at a time) ---------------------
        W1 = torch.empty(E, 2 * I, H, dtype=torch.bfloat16 if cuda else dtype, device=dev)
        W2 = torch.empty(E, H, I, dtype=W1.dtype, device=dev)
        for e in range(E):
            W1[e] = dequantize(w.gate_up_blocks[e], w.gate_up_scales[e], W1.dtype)
            W2[e] = dequantize(w.down_blocks[e], w.down_scales[e], W2.dtype)
        W1t, W2t = W1.transpose(1, 2), W2.transpose(1, 2)  # [E, in, out], column-major: _grouped_mm's layout
        b1, b2 = w.gate_up_bias.to(W1.dtype), w.down_bias.to(W1.dtype)

        def padded_layout(idx):
            """Rows sorted by expert, each expert's group padded to a multiple of 16 (torchtitan's alignment
            for grouped GEMMs); static size P + 15·E, so no host sync."""
            d = build_dispatch(idx, E)
            counts = (d.offsets[1:] - d.offsets[:-1]).long()
            padded = (counts + 15) // 16 * 16
            ends = torch.cumsum(padded, 0)
            rows = torch.arange(P, device=dev)
            e_rows = torch.searchsorted(d.offsets[1:].long(), rows, right=True)
            dest = (ends - padded)[e_rows] + rows - d.offsets[:-1].long()[e_rows]
            return d, e_rows, dest, ends.to(torch.int32), P + 15 * E

        def torch_layer(x, idx, rw):
            d, e_rows, dest, offs, rows_pad = padded_layout(idx)
            xs = torch.zeros(rows_pad, H, dtype=W1.dtype, device=dev).index_copy(
                0, dest, x[d.row_token.long()].to(W1.dtype)
            )
            h = torch._grouped_mm(xs, W1t, offs=offs)[dest] + b1[e_rows]
            act = swiglu_reference(h)
            acts = torch.zeros(rows_pad, I, dtype=W1.dtype, device=dev).index_copy(0, dest, act)
            y = torch._grouped_mm(acts, W2t, offs=offs)[dest] + b2[e_rows]
            y = y * rw.reshape(-1)[d.row_pair.long()].to(y.dtype)[:, None]
            return torch.zeros(T, H, dtype=y.dtype, device=dev).index_add(0, d.row_token.long(), y)

        try:
            gemm_inputs = []
            for x, idx, _rw, _ in sets:
                d, e_rows, dest, offs, rows_pad = padded_layout(idx)
                xs = torch.zeros(rows_pad, H, dtype=W1.dtype, device=dev).index_copy(
                    0, dest, x[d.row_token.long()].to(W1.dtype)
                )
                acts = torch.randn(rows_pad, I, device=dev).to(W1.dtype)
                gemm_inputs.append((xs, acts, offs))
            gturn = [0]

            def gemms():
                gturn[0] = (gturn[0] + 1) % len(gemm_inputs)
                xs, acts, offs = gemm_inputs[gturn[0]]
                torch._grouped_mm(xs, W1t, offs=offs)
                torch._grouped_mm(acts, W2t, offs=offs)

            record("bf16 grouped_mm GEMMs", gemms, flops_fwd, bf16_bytes, "two GEMMs on pre-sorted inputs")
            del gemm_inputs
        except Exception as exc:  # noqa: BLE001
            rows.append(dict(shape=shape, experts=E, tokens=T, name="bf16 grouped_mm GEMMs", error=str(exc)[:300]))

        def torch_fwd():
            x, idx, rw, _ = inputs()
            with torch.no_grad():
                torch_layer(x, idx, rw)

        def torch_train():
            x, idx, rw, gout = inputs()
            x = x.detach().requires_grad_(True)
            rw = rw.detach().requires_grad_(True)
            torch_layer(x, idx, rw).backward(gout.to(W1.dtype))

        def agreement(name, fn):
            """The baselines must compute our function: relative error of their output vs ours (no LoRA)."""
            x, idx, rw, _ = sets[0]
            row = dict(shape=shape, experts=E, tokens=T, name=f"agreement: {name} vs ours")
            try:
                with torch.no_grad():
                    ref = moe_triton.moe_experts(x, idx, rw, w, None).double()
                    row["rel_err"] = ((fn(x, idx, rw).double() - ref).norm() / ref.norm()).item()
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)

        agreement("bf16 grouped_mm", torch_layer)
        record("bf16 grouped_mm fwd", torch_fwd, flops_fwd, bf16_bytes)
        record("bf16 grouped_mm fwd+bwd", torch_train, 3 * flops_fwd, bf16_bytes)

        # ---- transformers + PEFT -----------------------------------------------------------------------
        if not args.skip_peft:
            for impl in ("eager", "grouped_mm"):
                try:
                    holder = peft_experts(E, H, I, k, W1t, b1, W2t, b2, args.rank, impl, dev)
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc()
                    rows.append(
                        dict(shape=shape, experts=E, tokens=T, name=f"transformers+PEFT {impl}", error=str(exc)[:300])
                    )
                    continue

                def peft_train(holder=holder):
                    x, idx, rw, gout = inputs()
                    x = x.detach().to(W1.dtype).requires_grad_(True)
                    rw = rw.detach().to(W1.dtype).requires_grad_(True)
                    holder.experts(x, idx, rw).backward(gout.to(W1.dtype))
                    for p in holder.parameters():
                        p.grad = None

                def peft_fwd(holder=holder):
                    x, idx, rw, _ = inputs()
                    with torch.no_grad():
                        holder.experts(x.to(W1.dtype), idx, rw.to(W1.dtype))

                agreement(
                    f"transformers+PEFT {impl} (B = 0)",
                    lambda x, idx, rw, holder=holder: holder.experts(x.to(W1.dtype), idx, rw.to(W1.dtype)),
                )
                record(f"transformers+PEFT {impl} fwd", peft_fwd, flops_fwd, bf16_bytes, "LoRA on, dense delta")
                record(f"transformers+PEFT {impl} fwd+bwd LoRA r{args.rank}", peft_train, 3 * flops_fwd, bf16_bytes)
                del holder
        del W1, W2, W1t, W2t
        if cuda:
            torch.cuda.empty_cache()

    # ---- summary ----------------------------------------------------------------------------------------
    def find(shape, name):
        return next((r for r in rows if r["shape"] == shape and r["name"] == name and "ms" in r), None)

    summary = []
    for shape in args.shapes:
        gem, tfwd, tbwd = (
            find(shape, "bf16 grouped_mm GEMMs"),
            find(shape, "bf16 grouped_mm fwd"),
            find(shape, "bf16 grouped_mm fwd+bwd"),
        )
        ofwd, obwd = find(shape, "ours fwd"), find(shape, "ours fwd+bwd")
        s = dict(shape=shape)
        if ofwd and gem:
            s["fwd_speedup_vs_bf16_gemms"] = gem["ms"] / ofwd["ms"]
        if ofwd and tfwd:
            s["fwd_speedup_vs_bf16_layer"] = tfwd["ms"] / ofwd["ms"]
        if obwd and tbwd:
            s["fwd_bwd_speedup_vs_bf16_layer"] = tbwd["ms"] / obwd["ms"]
        summary.append(s)
    Path(args.json).write_text(json.dumps(dict(env=env, rows=rows, summary=summary), indent=1))

    print(f"\n{'shape':<10} {'what':<48} {'ms':>9} {'TFLOP/s':>8} {'expert GB':>10} {'peak GB':>8}")
    for r in rows:
        if "ms" in r:
            pk = "" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
            print(
                f"{r['shape']:<10} {r['name']:<48} {r['ms']:>9.3f} {r['tflops']:>8.1f} {r['expert_gb']:>10.2f} {pk:>8}"
            )
        elif "rel_err" in r:
            print(f"{r['shape']:<10} {r['name']:<48} rel err {r['rel_err']:.1e}")
        else:
            print(f"{r['shape']:<10} {r['name']:<48} ERROR {r['error'][:60]}")
    for s in summary:
        print("  ".join(f"{k_}={v:.2f}" if isinstance(v, float) else f"{k_}={v}" for k_, v in s.items()))
    print(f"JSON: {args.json}")
    return 0


def peft_experts(E, H, I, k, W1t, b1, W2t, b2, rank, impl, dev):
    """transformers' GptOssExperts holding the bf16 weights, with PEFT LoRA on both expert parameters."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    cfg = GptOssConfig(
        hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k, num_hidden_layers=1
    )
    cfg._experts_implementation = impl
    with torch.device("meta"):
        experts = GptOssExperts(cfg)
    experts.gate_up_proj = torch.nn.Parameter(W1t, requires_grad=False)  # [E, H, 2I] = transformers' layout
    experts.gate_up_proj_bias = torch.nn.Parameter(b1, requires_grad=False)
    experts.down_proj = torch.nn.Parameter(W2t, requires_grad=False)
    experts.down_proj_bias = torch.nn.Parameter(b2, requires_grad=False)
    holder = torch.nn.Module()
    holder.experts = experts
    lcfg = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"]
    )
    inject_adapter_in_model(lcfg, holder)
    holder.to(dev)
    return holder


if __name__ == "__main__":
    sys.exit(main())
