"""`gptoss-tune export RUN_DIR --format ... --out DIR`: a checkpoint as an adapter or a merged model."""

from __future__ import annotations

from gptoss_tune.export import FORMATS

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
    p.add_argument("--no-drift", action="store_true", help="merged-mxfp4: skip the logit drift measurement")
    p.add_argument("--device", default=None, help="device for the drift measurement (default cuda if available)")
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
        drift=not args.no_drift,
        device=args.device,
    )
    return 0
