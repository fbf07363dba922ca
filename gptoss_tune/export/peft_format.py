"""Our adapter tensors <-> PEFT's adapter format for transformers' GptOssForCausalLM.

PEFT layout (checked against PEFT 0.21's `ParamWrapper` and proven by tests/export/test_export.py, which
loads the result with stock `PeftModel.from_pretrained` and compares logits):

* attention: `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` [r, in] and `lora_B.weight`
  [out, r]: the same tensors as ours, without PEFT's adapter name (`.default`).
* experts (`target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]`): per targeted
  parameter `lora_A.weight` is [r*E, in] and `lora_B.weight` is [out, r*E]. PEFT reshapes A to (E, r, in)
  (expert-major) and B to (out, r, E) (rank-major). Ours are A [E, r, in] and B [E, out, r], so
  A_peft = A.reshape(E*r, in) and B_peft = B.permute(1, 2, 0).reshape(out, r*E). With both parameters
  targeted the wrappers nest: the first listed (gate_up_proj) sits under `experts.base_layer.lora_*`,
  the second under `experts.lora_*`; a single targeted parameter sits under `experts.lora_*`.
* a trained router goes through `modules_to_save=["router"]`, saved as `...mlp.router.weight` / `.bias`.

PEFT refuses lora_dropout != 0 with target_parameters; dropout only matters in training, so 0 is written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from gptoss_tune.errors import UserError
from gptoss_tune.model.config import ATTENTION_PROJECTIONS, EXPERT_PROJECTIONS
from gptoss_tune.model.lora import LoraSettings

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."

_ATTN = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(\w+)\.lora_([AB])\.default\.weight$")
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)_lora_([AB])$")
_ROUTER = re.compile(r"^model\.layers\.(\d+)\.mlp\.router\.(weight|bias)$")
_PEFT_ATTN = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.self_attn\.(\w+)\.lora_([AB])\.weight$")
_PEFT_EXPERT = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.mlp\.experts\.(base_layer\.)?lora_([AB])\.weight$"
)
_PEFT_ROUTER = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.mlp\.router\.(weight|bias)$")


def expert_slot(proj: str, targets: tuple[str, ...] | list[str]) -> str:
    """Where PEFT's nested ParamWrappers put this projection's LoRA: 'experts.base_layer' or 'experts'."""
    targets = [p for p in EXPERT_PROJECTIONS if p in targets]
    if proj not in targets:
        raise ValueError(f"{proj} is not among the targeted expert projections {targets}")
    return "experts.base_layer" if len(targets) == 2 and proj == targets[0] else "experts"


def expert_a_to_peft(a: torch.Tensor) -> torch.Tensor:
    """Ours [E, r, in] -> PEFT [r*E, in] (expert-major rows)."""
    E, r, d_in = a.shape
    return a.reshape(E * r, d_in).contiguous()


def expert_b_to_peft(b: torch.Tensor) -> torch.Tensor:
    """Ours [E, out, r] -> PEFT [out, r*E] (rank-major columns: column k*E + e is rank k of expert e)."""
    E, d_out, r = b.shape
    return b.permute(1, 2, 0).reshape(d_out, r * E).contiguous()


def expert_a_from_peft(a: torch.Tensor, num_experts: int) -> torch.Tensor:
    return a.reshape(num_experts, -1, a.shape[-1]).contiguous()


def expert_b_from_peft(b: torch.Tensor, num_experts: int) -> torch.Tensor:
    return b.reshape(b.shape[0], -1, num_experts).permute(2, 0, 1).contiguous()


def to_peft_state_dict(state: dict[str, torch.Tensor], settings: LoraSettings) -> dict[str, torch.Tensor]:
    """Our adapter tensors (adapter.safetensors) -> PEFT's adapter_model.safetensors tensors."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if m := _ATTN.match(name):
            layer, proj, ab = m.groups()
            out[f"{PREFIX}model.layers.{layer}.self_attn.{proj}.lora_{ab}.weight"] = t.contiguous()
        elif m := _EXPERT.match(name):
            layer, proj, ab = m.groups()
            slot = expert_slot(proj, settings.experts)
            out[f"{PREFIX}model.layers.{layer}.mlp.{slot}.lora_{ab}.weight"] = (
                expert_a_to_peft(t) if ab == "A" else expert_b_to_peft(t)
            )
        elif m := _ROUTER.match(name):
            out[f"{PREFIX}{name}"] = t.contiguous()
        else:
            raise UserError(
                f"adapter tensor '{name}' has no PEFT equivalent; this adapter was not written by gptoss_tune"
            )
    return out


def from_peft_state_dict(
    state: dict[str, torch.Tensor], settings: LoraSettings, num_experts: int
) -> dict[str, torch.Tensor]:
    """PEFT adapter tensors -> our names and layouts (inverse of `to_peft_state_dict`)."""
    targets = [p for p in EXPERT_PROJECTIONS if p in settings.experts]
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if m := _PEFT_ATTN.match(name):
            layer, proj, ab = m.groups()
            out[f"model.layers.{layer}.self_attn.{proj}.lora_{ab}.default.weight"] = t
        elif m := _PEFT_EXPERT.match(name):
            layer, nested, ab = m.groups()
            if not targets:
                raise UserError(
                    f"adapter tensor '{name}' is an expert LoRA but adapter_config.json targets no expert parameters"
                )
            proj = targets[0] if (nested and len(targets) == 2) else targets[-1]
            conv = expert_a_from_peft if ab == "A" else expert_b_from_peft
            out[f"model.layers.{layer}.mlp.experts.{proj}_lora_{ab}"] = conv(t, num_experts)
        elif m := _PEFT_ROUTER.match(name):
            out[name[len(PREFIX) :]] = t
        else:
            raise UserError(
                f"adapter tensor '{name}' is not one gptoss_tune can load (attention LoRA, expert LoRA or router)"
            )
    return out


def peft_config(settings: LoraSettings, base_model: str, router_trained: bool = False):
    """The `peft.LoraConfig` that describes this adapter to stock PEFT (and vLLM)."""
    from peft import LoraConfig

    if not settings.attention and not settings.experts:
        raise UserError("the adapter has neither attention nor expert LoRA")
    kwargs = dict(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
        inference_mode=True,
    )
    # A list of module names (not a regex): PEFT matches them as name suffixes, and vLLM reads lists.
    kwargs["target_modules"] = list(settings.attention) if settings.attention else []
    if settings.experts:
        kwargs["target_parameters"] = [f"mlp.experts.{p}" for p in EXPERT_PROJECTIONS if p in settings.experts]
    if router_trained:
        kwargs["modules_to_save"] = ["router"]
    return LoraConfig(**kwargs)


def read_peft_settings(adapter_dir: str | Path) -> tuple[LoraSettings, dict]:
    """LoraSettings of a PEFT adapter directory written by `export --format adapter` (or compatible)."""
    f = Path(adapter_dir) / PEFT_CONFIG_FILE
    try:
        cfg = json.loads(f.read_text())
    except FileNotFoundError:
        raise UserError(f"{adapter_dir}: not a PEFT adapter directory ({PEFT_CONFIG_FILE} missing)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{f}: not valid JSON ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise UserError(f"{f}: peft_type is {cfg.get('peft_type')!r}; only LoRA adapters are supported")
    for key in ("use_dora", "use_rslora"):
        if cfg.get(key):
            raise UserError(f"{f}: {key} is set; gptoss_tune serves plain LoRA only")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise UserError(f"{f}: rank_pattern/alpha_pattern are not supported (one rank and alpha for all modules)")
    tm = cfg.get("target_modules") or []
    if isinstance(tm, str):
        attention = [p for p in ATTENTION_PROJECTIONS if re.search(rf"\b{p}\b", tm)]
    else:
        attention = [p for p in ATTENTION_PROJECTIONS if p in tm or any(str(t).endswith(f"self_attn.{p}") for t in tm)]
        unknown = [t for t in tm if not any(str(t).endswith(p) for p in ATTENTION_PROJECTIONS)]
        if unknown:
            raise UserError(f"{f}: target_modules {unknown} are not attention projections gptoss_tune can apply")
    experts = [
        p
        for p in EXPERT_PROJECTIONS
        if any(str(t).endswith(f"experts.{p}") for t in cfg.get("target_parameters") or [])
    ]
    try:
        rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise UserError(
            f"{f}: needs a numeric 'r' and 'lora_alpha' (got {cfg.get('r')!r}, {cfg.get('lora_alpha')!r})"
        ) from None
    try:
        settings = LoraSettings.coerce(
            {"rank": rank, "alpha": alpha, "dropout": 0.0, "attention": attention, "experts": experts}
        )
    except UserError as e:
        raise UserError(f"{f}: {e}") from None
    return settings, cfg
