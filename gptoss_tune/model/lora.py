"""LoRA on gpt-oss: PEFT on the attention projections, our per-expert LoRA on every layer's experts.

Attention LoRA is injected in place with `peft.inject_adapter_in_model`, so the model stays a
GptOssForCausalLM and its keys are PEFT's own (`...q_proj.lora_A.default.weight`). Expert LoRA lives in
`MXFP4Experts` (`...experts.gate_up_proj_lora_A` [E, r, in], `..._lora_B` [E, out, r]). Trainable
parameters are kept in fp32 whatever the model dtype (they are few, and bf16 updates of small
LoRA steps round away).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from gptoss_tune.errors import UserError

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_PROJECTIONS = ("gate_up_proj", "down_proj")


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    # Dropout applies to the attention LoRA inputs (through PEFT). Expert LoRA runs without dropout, as
    # in PEFT, whose expert LoRA refuses dropout.
    dropout: float = 0.0
    attention: list[str] = field(default_factory=lambda: list(ATTENTION_PROJECTIONS))
    experts: list[str] = field(default_factory=lambda: list(EXPERT_PROJECTIONS))

    def validate(self) -> "LoraSettings":
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise UserError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise UserError(f"lora.alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        for key, allowed, values in (
            ("attention", ATTENTION_PROJECTIONS, self.attention),
            ("experts", EXPERT_PROJECTIONS, self.experts),
        ):
            bad = [v for v in values if v not in allowed]
            if bad:
                raise UserError(f"lora.{key}: unknown projection(s) {bad}; choose from {list(allowed)}")
        if not self.attention and not self.experts:
            raise UserError("lora.attention and lora.experts are both empty: nothing would be trained")
        return self

    @classmethod
    def coerce(cls, value) -> "LoraSettings":
        if isinstance(value, cls):
            return value.validate()
        if isinstance(value, dict):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise UserError(f"lora: unknown key(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
            return cls(**value).validate()
        raise UserError(f"lora must be a LoraSettings or a dict, got {type(value).__name__}")

    def to_dict(self) -> dict:
        return asdict(self)


def attach_lora(model, settings: LoraSettings | dict):
    """Add LoRA in place; afterwards only LoRA parameters require grad. Returns the model."""
    from gptoss_tune.model.experts import MXFP4Experts

    settings = LoraSettings.coerce(settings)
    model.requires_grad_(False)
    if settings.attention:
        from peft import LoraConfig, inject_adapter_in_model

        pattern = r".*\.self_attn\.(" + "|".join(settings.attention) + r")$"
        cfg = LoraConfig(
            r=settings.rank,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=pattern,
            bias="none",
        )
        inject_adapter_in_model(cfg, model)
    if settings.experts:
        for module in model.modules():
            if isinstance(module, MXFP4Experts):
                module.add_lora(settings.rank, settings.alpha, settings.experts)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
    model.gptoss_tune_lora = settings
    return model


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """Every parameter that requires grad (LoRA, plus the router when it is trained), by model name."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def lora_parameter_count(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
