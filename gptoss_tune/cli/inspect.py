"""`gptoss-tune inspect MODEL`: load a checkpoint the way training does and report what was loaded."""

from __future__ import annotations

import json

NAME = "inspect"


def add_parser(sub) -> None:
    p = sub.add_parser(
        NAME,
        help="load a gpt-oss checkpoint (checking every tensor) and report what was loaded",
        description="Load a checkpoint exactly as training does (every tensor's name, dtype and shape checked, "
        "experts kept in MXFP4) and print a summary.",
    )
    p.add_argument("model", help="checkpoint directory or a hub id in the local Hugging Face cache")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--lora-rank", type=int, default=0, help="also attach LoRA of this rank and count its parameters")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args) -> int:
    # torch and transformers: imported only when the command runs, so `gptoss-tune --help` stays fast
    from gptoss_tune.model.loader import load_model
    from gptoss_tune.model.summary import summarize

    lora = {"rank": args.lora_rank} if args.lora_rank else None
    model = load_model(args.model, lora=lora, device=args.device)
    info = summarize(model)
    if args.json:
        print(json.dumps(info))
    else:
        width = max(map(len, info))
        for k, v in info.items():
            print(f"{k:<{width}}  {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k:<{width}}  {v}")
    return 0
