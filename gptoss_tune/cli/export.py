"""`gptoss-tune export RUN_DIR --format ... --out DIR`: a checkpoint as an adapter or a merged model."""

from __future__ import annotations

from gptoss_tune.export import FORMATS, REQUANT_CHOICES

NAME = "export"


def add_parser(sub) -> None:
    p = sub.add_parser(
        NAME,
        help="export a training checkpoint as a PEFT adapter, a merged bf16 model or a merged MXFP4 model",
        description="Export a checkpoint of a training run. adapter: PEFT adapter_config.json + "
        "adapter_model.safetensors (stock PEFT, vLLM --lora-modules). merged-bf16: full checkpoint with dense bf16 "
        "experts. merged-mxfp4: LoRA merged and experts re-quantised to MXFP4 in the openai/gpt-oss layout "
        "(transformers, vLLM). Merging streams one layer at a time.",
    )
    p.add_argument("run_dir", help="training run directory (or a checkpoint / adapter directory)")
    p.add_argument("--checkpoint", default="best", help="best (default), last, or a checkpoint directory")
    p.add_argument("--format", required=True, choices=list(FORMATS))
    p.add_argument("--out", required=True, help="output directory (created; refused if not empty unless --force)")
    p.add_argument("--base", default=None, help="base model directory or hub id (default: the one the adapter names)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument(
        "--no-effect",
        "--no-drift",
        dest="no_effect",
        action="store_true",
        help="merged formats: skip the effect-retained measurement (and, for merged-mxfp4, choose the re-quantiser without it)",
    )
    p.add_argument(
        "--requant",
        default="auto",
        choices=list(REQUANT_CHOICES),
        help="merged-mxfp4 expert re-quantiser: auto (default) = the run's quantisation-aware one, else the best measured; keep, mse, stochastic, openai force one",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the stochastic re-quantiser (recorded in the report)")
    p.add_argument(
        "--min-effect", type=float, default=0.9, help="warn when the effect retained is below this (default 0.9)"
    )
    p.add_argument(
        "--effect-positions", type=int, default=1024, help="held-out token positions to measure on (default 1024)"
    )
    p.add_argument("--device", default=None, help="device for the effect measurement (default cuda if available)")
    p.set_defaults(run=run)


def run(args) -> int:
    from gptoss_tune.export.exporter import export_run  # torch and safetensors: only when the command runs

    export_run(
        args.run_dir,
        args.format,
        args.out,
        checkpoint=args.checkpoint,
        base=args.base,
        force=args.force,
        effect=not args.no_effect,
        requant=args.requant,
        seed=args.seed,
        min_effect=args.min_effect,
        effect_positions=args.effect_positions,
        device=args.device,
    )
    return 0
