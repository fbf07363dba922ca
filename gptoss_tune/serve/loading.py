"""What `gptoss-tune serve MODEL_DIR [--adapter DIR]` loads: a gpt-oss checkpoint (the base or a merged
export), a training run directory (its best checkpoint, or --checkpoint), our adapter directory, or a
PEFT adapter export (converted back to our layout and applied on the MXFP4-resident base). A merged-bf16
export keeps its experts dense bf16 (re-quantising them would lose the merged fine-tune).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from gptoss_tune.errors import UserError
from gptoss_tune.export.exporter import resolve_export_checkpoint
from gptoss_tune.export.peft_format import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, from_peft_state_dict, read_peft_settings
from gptoss_tune.model.adapter import CONFIG_FILE, load_adapter_weights, load_with_adapter, read_adapter_config
from gptoss_tune.model.loader import load_model


def load_for_serving(model_dir: str | Path, adapter: str | Path | None = None, checkpoint: str = "best", device=None):
    """(model, default served name) for a base/merged checkpoint, an adapter dir or a training run dir.

    MODEL_DIR may be: a gpt-oss checkpoint (the base, or a merged export), our adapter directory or a run
    directory (its best checkpoint, or --checkpoint), or a PEFT adapter export. --adapter adds our or a PEFT
    adapter on top of MODEL_DIR as base.
    """

    p = Path(model_dir)
    name = p.resolve().name if p.exists() else str(model_dir)
    is_run = (p / CONFIG_FILE).is_file() or (p / "checkpoints").is_dir() or (p / "final").is_dir()
    if checkpoint != "best" and (adapter is not None or not is_run):
        raise UserError(
            f"--checkpoint {checkpoint}: applies to a training run directory, and {model_dir}"
            + (" is served with --adapter" if adapter is not None else " is not one")
            + "; leave --checkpoint out, or pass the run directory"
        )
    if adapter is None:
        if (p / PEFT_CONFIG_FILE).is_file():
            return _load_peft_adapter(p, None, device), name
        if is_run:
            ckpt = resolve_export_checkpoint(p, checkpoint)
            return load_with_adapter(ckpt, device=device), name
        return load_model(model_dir, device=device, keep_dense_experts=True), name
    a = Path(adapter)
    if (a / PEFT_CONFIG_FILE).is_file():
        return _load_peft_adapter(a, model_dir, device), f"{name}+{a.resolve().name}"
    if (a / CONFIG_FILE).is_file():
        model = load_model(model_dir, lora=read_adapter_config(a)["lora"], device=device, keep_dense_experts=True)
        load_adapter_weights(model, a)
        return model, f"{name}+{a.resolve().name}"
    raise UserError(
        f"--adapter {adapter}: neither a gptoss_tune adapter (adapter.json) nor a PEFT adapter ({PEFT_CONFIG_FILE})"
    )


def _load_peft_adapter(adapter_dir: Path, base, device):
    """A PEFT adapter (our export, or compatible) on an MXFP4-resident base, converted to our layout."""

    settings, cfg = read_peft_settings(adapter_dir)
    base = base or cfg.get("base_model_name_or_path")
    if not base:
        raise UserError(
            f"{adapter_dir / 'adapter_config.json'}: names no base_model_name_or_path; pass the base as MODEL_DIR"
        )
    f = adapter_dir / PEFT_WEIGHTS_FILE
    if not f.is_file():  # checked before the base loads (minutes for 120b)
        raise UserError(f"{adapter_dir}: {PEFT_WEIGHTS_FILE} is missing")
    try:
        raw = load_file(f)
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise UserError(f"{f}: unreadable ({str(e).strip() or type(e).__name__}); export the adapter again") from None
    model = load_model(base, lora=settings, device=device, keep_dense_experts=True)
    state = from_peft_state_dict(raw, settings, model.config.num_local_experts)
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    routers = {n for n in state if ".mlp.router." in n}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected - routers)
    if missing or unexpected:
        raise UserError(
            f"{adapter_dir / PEFT_WEIGHTS_FILE}: does not match adapter_config.json (missing {missing[:2]}, unexpected {unexpected[:2]})"
        )
    with torch.no_grad():
        for n, t in state.items():
            if n not in params or tuple(params[n].shape) != tuple(t.shape):
                raise UserError(f"{adapter_dir / PEFT_WEIGHTS_FILE}: '{n}' does not fit the base model")
            params[n].copy_(t)
    return model
