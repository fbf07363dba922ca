"""The `gptoss-tune` command.

Argument parsers live here (cheap to build); each subcommand's work is imported only when it runs, so
`gptoss-tune --help` stays fast. A `UserError` anywhere becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from gptoss_tune import __version__


def _add_init_tiny(sub) -> None:
    p = sub.add_parser(
        "init-tiny",
        help="write a tiny gpt-oss checkpoint in the published layout (MXFP4 experts)",
        description="Write a tiny gpt-oss checkpoint in exactly the layout of openai/gpt-oss-20b: config.json with "
        "the mxfp4 quantization_config, generation_config.json, safetensors with *_blocks/*_scales experts.",
    )
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
    p.set_defaults(handler="gptoss_tune.cli.main:run_init_tiny")


def parse_size(text: str) -> int:
    from gptoss_tune.errors import UserError

    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    unit = t[len(num) :]
    try:
        return int(float(num) * units[unit])
    except (ValueError, KeyError):
        raise UserError(f"size '{text}' is not understood; write e.g. 500MB or 2GB") from None


def run_init_tiny(args) -> int:
    from gptoss_tune.model.tiny import write_tiny_checkpoint

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


def _add_inspect(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="load a gpt-oss checkpoint (checking every tensor) and report what was loaded",
        description="Load a checkpoint exactly as training does (every tensor's name, dtype and shape checked, "
        "experts kept in MXFP4) and print a summary.",
    )
    p.add_argument("model", help="checkpoint directory or a hub id in the local Hugging Face cache")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--lora-rank", type=int, default=0, help="also attach LoRA of this rank and count its parameters")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler="gptoss_tune.model.summary:run_cli")


def _add_validate(sub) -> None:
    p = sub.add_parser(
        "validate",
        help="check a training recipe without running it",
        description="Read a recipe, apply key.sub=value overrides, fill in defaults and check every key, path and the "
        "output directory; print what training would do. Exit status 2 with a one-line error otherwise.",
    )
    p.add_argument("recipe", help="recipe YAML (see docs/recipes.md)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe keys, e.g. train.lr=1e-4")
    p.add_argument("--print", action="store_true", help="print the resolved recipe (every default filled in)")
    p.set_defaults(handler="gptoss_tune.train.recipe:run_validate")


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a LoRA adapter from a YAML recipe",
        description="Train LoRA on attention and every expert of gpt-oss from a recipe (docs/recipes.md). One process; "
        "for several GPUs run `accelerate launch [--config_file recipes/accelerate/...] -m gptoss_tune.train RECIPE`.",
    )
    p.add_argument("recipe", help="recipe YAML (see docs/recipes.md)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe keys, e.g. train.lr=1e-4")
    p.set_defaults(handler="gptoss_tune.train.trainer:run_cli")


def _add_render(sub) -> None:
    p = sub.add_parser(
        "render",
        help="show how a data file is rendered in harmony and which tokens are trained",
        description="Render a data file (.jsonl, .json, .parquet or a saved dataset directory) exactly as training "
        "does: harmony text with the trained tokens marked, token counts and totals. With --json, one JSON object "
        'per example: {"input_ids": [...], "loss_mask": [...]} (unpacked; loss_mask 1 where the loss falls).',
    )
    p.add_argument("data", help="data file or saved Hugging Face dataset directory")
    p.add_argument("--n", type=int, default=None, help="examples to print (default: 3; with --json all)")
    p.add_argument("--json", action="store_true", help="print one JSON object per example (input_ids, loss_mask)")
    p.add_argument(
        "--reasoning-effort", choices=["low", "medium", "high"], default=None, help="for examples without their own"
    )
    p.add_argument(
        "--train-on",
        choices=["last", "all"],
        default="last",
        help="train the last assistant turn or all (default: last)",
    )
    p.add_argument("--max-seq-len", type=int, default=2048, help="truncate or drop longer examples (default: 2048)")
    p.add_argument(
        "--overlong", choices=["truncate", "drop"], default="truncate", help="what to do with longer examples"
    )
    p.add_argument("--tools", default=None, metavar="FILE", help="JSON file with a list of OpenAI function schemas")
    p.add_argument(
        "--skip-bad-lines", action="store_true", help="skip bad records and list them (default: stop at the first)"
    )
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto", help="mark trained tokens in color")
    p.set_defaults(handler="gptoss_tune.cli.render:run")


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a training checkpoint as a PEFT adapter, a merged bf16 model or a merged MXFP4 model",
        description="Export a checkpoint of a training run. adapter: PEFT adapter_config.json + "
        "adapter_model.safetensors (stock PEFT, vLLM --lora-modules). merged-bf16: full checkpoint with dense bf16 "
        "experts. merged-mxfp4: LoRA merged and experts re-quantised to MXFP4 in the openai/gpt-oss layout "
        "(transformers, vLLM). Merging streams one layer at a time.",
    )
    p.add_argument("run_dir", help="training run directory (or a checkpoint / adapter directory)")
    p.add_argument("--checkpoint", default="best", help="best (default), last, or a checkpoint directory")
    p.add_argument("--format", required=True, choices=["adapter", "merged-bf16", "merged-mxfp4"])
    p.add_argument("--out", required=True, help="output directory (created; refused if not empty unless --force)")
    p.add_argument("--base", default=None, help="base model directory or hub id (default: the one the adapter names)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-drift", action="store_true", help="merged-mxfp4: skip the logit drift measurement")
    p.add_argument("--device", default=None, help="device for the drift measurement (default cuda if available)")
    p.set_defaults(handler="gptoss_tune.export.exporter:run_cli")


def _add_serve(sub) -> None:
    import os

    p = sub.add_parser(
        "serve",
        help="serve a (tuned) model with an OpenAI-compatible chat-completions API",
        description="Serve MODEL_DIR (a gpt-oss checkpoint or merged export, a training run directory, our adapter "
        "directory or a PEFT adapter export) at /v1/chat/completions and /v1/models. Prompts are rendered with "
        "openai-harmony, output is parsed by channel (content, reasoning, tool_calls). --print-vllm-command prints "
        "the equivalent `vllm serve` command for production instead.",
    )
    p.add_argument("model_dir", help="model, run, adapter or export directory (or a hub id in the local cache)")
    p.add_argument("--adapter", default=None, help="a gptoss_tune or PEFT adapter to apply on MODEL_DIR as base")
    p.add_argument("--checkpoint", default="best", help="for a run directory: best (default), last, or a path")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; others need --api-key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("GPTOSS_TUNE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $GPTOSS_TUNE_API_KEY)")  # fmt: skip
    p.add_argument(
        "--max-concurrency", type=int, default=4, help="requests generating at once; more get 429 (default 4)"
    )
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the directory name)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length limit (default: the model's)")
    p.add_argument("--device", default=None, help="cuda or cpu (default cuda if available)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument(
        "--print-vllm-command", action="store_true", help="print the `vllm serve` command for MODEL_DIR and exit"
    )
    p.set_defaults(handler="gptoss_tune.serve.app:run_cli")


PARSERS = [_add_init_tiny, _add_inspect, _add_render, _add_export, _add_serve]
PARSERS += [_add_validate, _add_train]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptoss-tune",
        description="Fine-tune gpt-oss-20b/120b with LoRA on MXFP4 experts, export and serve the result.",
    )
    parser.add_argument("--version", action="version", version=f"gptoss-tune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in PARSERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from gptoss_tune.errors import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    module_name, func_name = args.handler.split(":")
    try:
        handler = getattr(importlib.import_module(module_name), func_name)
        return int(handler(args) or 0)
    except UserError as e:
        print(f"gptoss-tune {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"gptoss-tune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
