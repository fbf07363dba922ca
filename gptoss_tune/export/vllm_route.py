"""The lossless serving route of an adapter export: what vLLM's gpt-oss LoRA loader needs, and its command.

vLLM 0.33's gpt-oss LoRA loader (the MXFP4 base stays MXFP4, the LoRA is applied on the fly, so nothing
of the fine-tune is lost) takes PEFT's 3-D expert LoRA as `export --format adapter` writes it, with
three conditions measured against it:
- it asserts both expert slots and reads bare `experts` as down_proj and `experts.base_layer` as
  gate_up_proj, so an adapter that trained one expert projection is written with both (the untrained one
  with A = B = 0: it adds exactly nothing, in vLLM, stock PEFT and our server alike);
- it rejects `modules_to_save` (a trained router): such an adapter is for PEFT and `gptoss-tune serve`;
- ranks above 16 need `--max-lora-rank` (one of vLLM's allowed values; printed always, harmless).
"""

from __future__ import annotations

from pathlib import Path

import torch

from gptoss_tune.model.config import EXPERT_PROJECTIONS
from gptoss_tune.model.lora import LoraSettings

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_GPTOSS_ARGS = ["--tool-call-parser", "openai", "--enable-auto-tool-choice", "--reasoning-parser", "openai_gptoss"]

ROUTER_WARNING = (
    "this adapter also trained the router (modules_to_save), which vLLM's LoRA loader rejects: serve it with "
    "`gptoss-tune serve BASE --adapter DIR` or stock PEFT, or export merged-bf16 / merged-mxfp4 for vLLM"
)


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds `rank`."""
    return next((r for r in VLLM_LORA_RANKS if r >= rank), rank)


def lora_args(name: str, adapter_dir: str | Path, rank: int) -> list[str]:
    return [
        "--enable-lora",
        "--lora-modules",
        f"{name}={adapter_dir}",
        "--max-lora-rank",
        str(vllm_max_lora_rank(rank)),
    ]


def adapter_command(base: str, adapter_dir: str | Path, rank: int, name: str | None = None) -> list[str]:
    """argv of `vllm serve BASE ... --enable-lora --lora-modules NAME=DIR --max-lora-rank R`."""
    name = name or Path(adapter_dir).resolve().name
    return ["vllm", "serve", str(base), *VLLM_GPTOSS_ARGS, *lora_args(name, adapter_dir, rank)]


def with_both_expert_slots(
    state: dict[str, torch.Tensor], settings: LoraSettings, config: dict
) -> tuple[dict[str, torch.Tensor], LoraSettings]:
    """Our adapter tensors with a zero LoRA for an untrained expert projection (when exactly one of the two
    was trained), and the settings naming both; unchanged otherwise (no expert LoRA: no slot is needed)."""
    trained = [p for p in EXPERT_PROJECTIONS if p in settings.experts]
    if len(trained) != 1:
        return state, settings
    E, H, I, r = config["num_local_experts"], config["hidden_size"], config["intermediate_size"], settings.rank
    missing = next(p for p in EXPERT_PROJECTIONS if p not in trained)
    d_in, d_out = {"gate_up_proj": (H, 2 * I), "down_proj": (I, H)}[missing]
    like = state[f"model.layers.0.mlp.experts.{trained[0]}_lora_A"]
    out = dict(state)
    for i in range(config["num_hidden_layers"]):
        out[f"model.layers.{i}.mlp.experts.{missing}_lora_A"] = torch.zeros(E, r, d_in, dtype=like.dtype)
        out[f"model.layers.{i}.mlp.experts.{missing}_lora_B"] = torch.zeros(E, d_out, r, dtype=like.dtype)
    return out, settings.model_copy(update={"experts": list(EXPERT_PROJECTIONS)})
