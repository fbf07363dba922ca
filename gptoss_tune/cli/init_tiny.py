"""`gptoss-tune init-tiny DIR`: a tiny gpt-oss checkpoint in exactly the published layout."""

from __future__ import annotations

from gptoss_tune.errors import UserError

NAME = "init-tiny"


def add_arguments(p) -> None:
    p.add_argument("dir", help="output directory (created)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64, help="hidden size (multiple of 32)")
    p.add_argument("--intermediate", type=int, default=None, help="expert intermediate size (default: hidden)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--vocab", type=int, default=201088, help="vocabulary size (default: the real 201088)")
    p.add_argument("--sliding-window", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-size", type=str, default="2GB", help="shard when larger, e.g. 500MB (writes an index)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty directory")


def add_parser(sub) -> None:
    p = sub.add_parser(
        NAME,
        help="write a tiny gpt-oss checkpoint in the published layout (MXFP4 experts)",
        description="Write a tiny gpt-oss checkpoint in exactly the layout of openai/gpt-oss-20b: config.json with "
        "the mxfp4 quantization_config, generation_config.json, safetensors with *_blocks/*_scales experts.",
    )
    add_arguments(p)
    p.set_defaults(run=run)


def parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    unit = t[len(num) :]
    try:
        return int(float(num) * units[unit])
    except (ValueError, KeyError):
        raise UserError(f"size '{text}' is not understood; write e.g. 500MB or 2GB") from None


def run(args) -> int:
    from gptoss_tune.model.tiny import write_tiny_checkpoint  # torch: imported only when the command runs

    out = write_tiny_checkpoint(
        args.dir,
        seed=args.seed,
        max_shard_bytes=parse_size(args.max_shard_size),
        force=args.force,
        layers=args.layers,
        experts=args.experts,
        top_k=args.top_k,
        hidden=args.hidden,
        intermediate=args.intermediate,
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        vocab=args.vocab,
        sliding_window=args.sliding_window,
    )
    files = sorted(p.name for p in out.iterdir())
    print(f"wrote a tiny gpt-oss checkpoint to {out}: {', '.join(files)}")
    return 0
