"""Training run directories for export/serve tests, made the way training writes them (gptoss_tune/runs.py layout)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gptoss_tune import load_model
from gptoss_tune.model.adapter import save_adapter


def make_run_dir(
    run: Path,
    base: Path,
    *,
    lora: dict | None = None,
    seed: int = 0,
    scale: float = 0.05,
    train_router: bool = False,
    step: int = 10,
) -> Path:
    """A run directory whose best checkpoint holds random non-zero LoRA weights (B != 0, so it changes logits)."""
    lora = lora or {"rank": 2, "alpha": 4}
    torch.manual_seed(seed)
    m = load_model(base, device="cpu", lora=lora)
    if train_router:
        for n, p in m.named_parameters():
            if ".mlp.router." in n:
                p.requires_grad_(True)
    with torch.no_grad():
        for _, p in m.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)
    ckpt = f"checkpoints/step-{step:08d}"
    save_adapter(m, run / ckpt)
    (run / "best.json").write_text(json.dumps({"checkpoint": ckpt, "step": step, "metric": "eval_loss", "value": 1.25}))
    (run / "recipe.yaml").write_text(f"model: {base}\nlora:\n  rank: {lora['rank']}\n  alpha: {lora['alpha']}\n")
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": step, "loss": 2.5}) + "\n" + json.dumps({"step": step, "eval_loss": 1.25}) + "\n"
    )
    (run / "data_report.json").write_text(json.dumps({"examples": 12, "tokens": 3456, "truncated": 0}))
    return run
