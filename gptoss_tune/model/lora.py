"""LoRA on gpt-oss: PEFT on the attention projections, our per-expert LoRA on every layer's experts.

Attention LoRA is injected in place with `peft.inject_adapter_in_model`, so the model stays a
GptOssForCausalLM and its keys are PEFT's own (`...q_proj.lora_A.default.weight`). Expert LoRA lives in
`MXFP4Experts` (`...experts.gate_up_proj_lora_A` [E, r, in], `..._lora_B` [E, out, r]). Trainable
parameters are kept in fp32 whatever the model dtype (they are few, and bf16 updates of small
LoRA steps round away).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from gptoss_tune.errors import UserError
from gptoss_tune.model.config import ATTENTION_PROJECTIONS, EXPERT_PROJECTIONS
from gptoss_tune.model.experts import MXFP4Experts
from gptoss_tune.settings import Settings


class LoraSettings(Settings):
    """The recipe's `lora:` section and `load_model(lora=...)`: one type, one set of rules."""

    rank: int = Field(8, gt=0, description="LoRA rank r of every adapted matrix")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank")
    # Expert LoRA runs without dropout, as in PEFT, whose expert LoRA refuses dropout.
    dropout: float = Field(
        0.0, ge=0, lt=1, description="dropout on the attention LoRA inputs (expert LoRA runs without, as in PEFT)"
    )
    # strict=False: a tuple from Python is as good as a list (YAML gives lists; a string is still refused)
    attention: list[Literal[ATTENTION_PROJECTIONS]] = Field(
        default_factory=lambda: list(ATTENTION_PROJECTIONS),
        strict=False,
        description="attention projections that get LoRA",
    )
    experts: list[Literal[EXPERT_PROJECTIONS]] = Field(
        default_factory=lambda: list(EXPERT_PROJECTIONS),
        strict=False,
        description="expert projections that get per-expert LoRA in every layer (may be empty)",
    )

    @model_validator(mode="after")
    def _something_to_train(self):
        if not self.attention and not self.experts:
            raise ValueError("lora.attention and lora.experts are both empty: nothing would be trained")
        return self

    @classmethod
    def coerce(cls, value, where: str = "lora") -> LoraSettings:
        return super().coerce(value, where)

    def to_dict(self) -> dict:
        return self.model_dump()


def attach_lora(model, settings: LoraSettings | dict):
    """Add LoRA in place; afterwards only LoRA parameters require grad. Returns the model."""
    settings = LoraSettings.coerce(settings)
    width = model.config.hidden_size
    if settings.rank > width:
        raise UserError(
            f"lora.rank {settings.rank} is above the model's width (hidden_size {width}); no adapted matrix has a "
            f"rank above its smaller side: use at most {width} (8 to 64 is usual)"
        )
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
