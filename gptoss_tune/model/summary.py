"""What a loaded model holds: layers, experts, resident bytes of the MXFP4 experts, LoRA parameters (`inspect`)."""

from __future__ import annotations

from gptoss_tune.model.experts import MXFP4Experts
from gptoss_tune.model.lora import lora_parameter_count


def summarize(model) -> dict:
    cfg = model.config
    experts = [m for m in model.modules() if isinstance(m, MXFP4Experts)]
    resident = sum(m.resident_bytes() for m in experts)
    expert_weights = sum(m.num_experts * 3 * m.hidden_size * m.intermediate_size for m in experts)
    other = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)
    return {
        "model_dir": getattr(model, "gptoss_tune_model_dir", None),
        "layers": cfg.num_hidden_layers,
        "experts": cfg.num_local_experts,
        "experts_per_token": cfg.num_experts_per_tok,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "layer_types": sorted(set(cfg.layer_types)),
        "expert_weights": expert_weights,
        "expert_resident_bytes": resident,
        "expert_bits_per_weight": round(resident * 8 / max(expert_weights, 1), 4),
        "other_parameter_bytes": other,
        "lora_parameters": lora_parameter_count(model),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(next(model.parameters()).device),
    }
