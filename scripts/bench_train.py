#!/usr/bin/env python
"""LoRA training throughput and memory of gpt-oss at the real dimensions, with random weights.

    python scripts/bench_train.py --model 20b --seq 2048 --baseline
    python scripts/bench_train.py --model 120b --seq 2048
    python scripts/bench_train.py --model 20b --seq 131072 --steps 2
    python scripts/bench_train.py --model tiny --seq 64 --steps 1 --warmup 1 --baseline   # CPU smoke run

Prints one line of JSON, then a short table (tokens/s, peak GiB, MFU; the FLOP formula is in the JSON
and in gptoss_tune/perf/flops.py). The flags are the fields of gptoss_tune.perf.bench.BenchConfig (same
names), plus --json-out. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path


def _ensure_importable() -> None:
    """Run from a plain checkout too (the GPU machine has no editable install): put the repo on the path
    and expose kernels/ as `gptoss_kernels` through a symlink (never as `kernels`, a name transformers probes)."""
    root = Path(__file__).resolve().parent.parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        import gptoss_kernels  # noqa: F401
    except ImportError:
        shim = Path(tempfile.mkdtemp(prefix="gptoss_kernels_shim_"))
        (shim / "gptoss_kernels").symlink_to(root / "kernels", target_is_directory=True)
        sys.path.insert(0, str(shim))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["tiny", "20b", "120b"], required=True)
    p.add_argument("--seq", type=int, required=True, help="tokens per row")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=None, help="default 2 x rank")
    p.add_argument(
        "--lora-on", choices=["all", "attention"], default="all", help="attention + every expert, or attention only"
    )
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, autotuning)")
    p.add_argument("--baseline", action="store_true", help="also run the official recipe's approach in this process")
    p.add_argument("--baseline-only", action="store_true")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    p.add_argument("--every-n", type=int, default=1, help="checkpoint every n-th decoder layer")
    p.add_argument("--offload", action="store_true", help="keep checkpointed layer inputs in pinned host memory")
    p.add_argument("--chunk-tokens", type=int, default=512, help="chunked loss: tokens per chunk")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw_8bit", "paged_adamw_8bit"])
    p.add_argument("--attn", default=None, help="attention implementation (default gptoss_sink)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default bf16 on CUDA, fp32 on the CPU")
    p.add_argument(
        "--mixed-precision",
        choices=["bf16", "no"],
        default=None,
        help="autocast of the forward, as train.mixed_precision (default bf16 on CUDA, no on the CPU)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak dense bf16 TFLOP/s for MFU")
    p.add_argument("--profile", type=int, default=0, help="profile this many extra steps of ours; prints top ops")
    p.add_argument(
        "--time-limit",
        dest="time_limit_s",
        type=float,
        default=None,
        help="seconds for the whole run: fewer timed steps (at least one) and no baseline once it is used up",
    )
    p.add_argument(
        "--json-out", default=None, help="also write the JSON here (ours' part first, before the baseline runs)"
    )
    return p.parse_args(argv)


def config_from_args(args):
    """The BenchConfig the flags describe (every field has a flag of the same name)."""
    from dataclasses import fields

    from gptoss_tune.perf.bench import BenchConfig

    return BenchConfig(**{f.name: getattr(args, f.name) for f in fields(BenchConfig)})


def main(argv=None) -> int:
    _ensure_importable()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5.2x renames checkpointing APIs
    args = parse_args(argv)
    from gptoss_tune.atomic_io import atomic_write_text
    from gptoss_tune.errors import UserError
    from gptoss_tune.perf.bench import run
    from gptoss_tune.perf.report import format_table, to_json

    def keep(partial):  # a run killed during the baseline still leaves ours' figures
        if args.json_out:
            ours = {k: v for k, v in partial["ours"].items() if k != "profile"}
            atomic_write_text(args.json_out, to_json({**partial, "ours": ours}) + "\n")

    try:
        result = run(config_from_args(args), on_partial=keep)
    except UserError as e:
        print(f"bench_train: error: {e}", file=sys.stderr)
        return 2
    profile = result.get("ours", {}).pop("profile", None)
    text = to_json(result)
    print(text, flush=True)
    if args.json_out:
        atomic_write_text(args.json_out, text + "\n")
    if profile:
        print(profile)
    print(format_table(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
