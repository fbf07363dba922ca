"""The toolkit's own adapter directory: what training checkpoints hold and what export reads.

    adapter.json          {"format": "gptoss_tune-adapter", "version": 1, "base_model": ..., "lora": {...},
                           "router_trained": bool, "model_config": {sizes used to check compatibility}}
    adapter.safetensors   every trainable tensor under its model name (LoRA; the router when trained)

The names are the model's own (`model.layers.0.self_attn.q_proj.lora_A.default.weight`,
`model.layers.0.mlp.experts.gate_up_proj_lora_A`, ...). `gptoss_tune.export` converts this into PEFT's
adapter format; stock PEFT does not read this one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gptoss_tune.errors import UserError
from gptoss_tune.model.loader import load_model
from gptoss_tune.model.lora import LoraSettings, trainable_state_dict

FORMAT = "gptoss_tune-adapter"
CONFIG_FILE = "adapter.json"
WEIGHTS_FILE = "adapter.safetensors"
_CHECKED_CONFIG_KEYS = (
    "num_hidden_layers",
    "num_local_experts",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)


def save_adapter(
    model, out_dir: str | Path, base_model: str | None = None, extra: dict | None = None, state: dict | None = None
) -> Path:
    """Write adapter.json and adapter.safetensors into out_dir (the caller makes the directory write atomic).

    state: the trainable tensors by model name, when the caller gathered them (sharded training);
    default: trainable_state_dict(model)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings: LoraSettings | None = getattr(model, "gptoss_tune_lora", None)
    if settings is None:
        raise ValueError("the model has no LoRA attached (load it with load_model(..., lora=...))")
    state = {
        k: v.detach().to("cpu").contiguous()
        for k, v in (trainable_state_dict(model) if state is None else state).items()
    }
    meta = {
        "format": FORMAT,
        "version": 1,
        "base_model": base_model or getattr(model, "gptoss_tune_model_dir", None),
        "lora": settings.to_dict(),
        "router_trained": any(".mlp.router." in k for k in state),
        "model_config": {k: getattr(model.config, k) for k in _CHECKED_CONFIG_KEYS},
    }
    if extra:
        meta.update(extra)
    save_file(state, out / WEIGHTS_FILE, metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def read_adapter_config(adapter_dir: str | Path) -> dict:
    f = Path(adapter_dir) / CONFIG_FILE
    if not f.is_file():
        raise UserError(f"{adapter_dir}: not a gptoss_tune adapter directory ({CONFIG_FILE} missing)")
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{f}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{f}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_adapter_weights(model, adapter_dir: str | Path) -> None:
    """Copy an adapter's tensors into a model that already has the same LoRA attached."""
    adapter_dir = Path(adapter_dir)
    meta = read_adapter_config(adapter_dir)
    for k in _CHECKED_CONFIG_KEYS:
        want = meta.get("model_config", {}).get(k)
        if want is not None and getattr(model.config, k) != want:
            raise UserError(
                f"{adapter_dir / CONFIG_FILE}: adapter was trained on {k}={want}, the model has {getattr(model.config, k)}"
            )
    state = load_file(adapter_dir / WEIGHTS_FILE)
    if meta.get("router_trained"):
        for n, p in model.named_parameters():
            if ".mlp.router." in n:
                p.requires_grad_(True)
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unexpected = [n for n in state if n not in params]
    if missing or unexpected:
        raise UserError(
            f"{adapter_dir / WEIGHTS_FILE}: does not match the model's LoRA "
            f"(missing {missing[:2]}, unexpected {unexpected[:2]}); was it trained with other lora settings?"
        )
    with torch.no_grad():
        for n, t in state.items():
            if params[n].shape != t.shape:
                raise UserError(
                    f"{adapter_dir / WEIGHTS_FILE}: '{n}' has shape {list(t.shape)}, the model expects {list(params[n].shape)}"
                )
            params[n].copy_(t)


def load_with_adapter(adapter_dir: str | Path, base_model: str | Path | None = None, **load_kwargs):
    """load_model on the adapter's base (or `base_model`) with its LoRA settings and weights."""
    meta = read_adapter_config(adapter_dir)
    base = base_model or meta.get("base_model")
    if not base:
        raise UserError(f"{adapter_dir}: the adapter does not name its base model; pass it explicitly")
    model = load_model(base, lora=meta["lora"], **load_kwargs)
    load_adapter_weights(model, adapter_dir)
    return model
