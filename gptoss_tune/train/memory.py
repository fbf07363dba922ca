"""Memory options for training: per-layer activation checkpointing, CPU offload, optimizer choice.

What dominates memory when training LoRA on gpt-oss (bf16 activations, H = 2,880):
  weights         12.82 GiB (20b) / 60.77 GiB (120b) as MXFP4 - fixed.
  LoRA training   r=8 on attention + every expert: 92.5 M params (20b), 536.8 M (120b). fp32 weights
                  + grads + AdamW's two moments = 16 bytes each: 1.4 GiB (20b), 8.0 GiB (120b). 8-bit
                  AdamW (bitsandbytes) keeps the moments in 2 bytes: 0.9 GiB / 5.0 GiB.
  activations     without checkpointing, every op's saved inputs of every layer: tens of GB at 2k
                  tokens for the MoE layers; with per-layer checkpointing only each layer's input is
                  kept (L x H x 2 bytes: 11.8 MB per layer at 2,048 tokens, 755 MB at 131,072 - 18 GB
                  over 24 layers) plus one layer's activations during its recompute.
  logits          never materialised: gptoss_tune.train.chunked_ce.
Offloading the per-layer inputs to pinned host memory removes the 18 GB term at 131k tokens for one
device-to-host copy per layer in the forward and one host-to-device copy in the backward (755 MB
each, ~15 ms each at PCIe 5 speeds, against seconds of compute per layer at that length).
(Offloading everything autograd saves, with save_on_cpu around the whole step, is NOT offered: the
expert matmuls save their packed MXFP4 weights for backward, so it would copy the whole model to the
host every step.)
None of these numbers were measured on a GPU in this revision: see docs/memory-and-speed.md.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch.utils.checkpoint import checkpoint

from gptoss_tune.errors import UserError
from gptoss_tune.settings import Settings

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")


class MemorySettings(Settings):
    """The memory knobs (the defaults are the ones the benchmarks use). The recipe's `train:` section
    carries them under the same names (TrainSection derives from this type)."""

    gradient_checkpointing: bool = Field(
        True, description="recompute each decoder layer in the backward pass instead of storing its activations"
    )
    checkpoint_every_n_layers: int = Field(
        1,
        ge=1,
        description="with gradient_checkpointing: recompute every n-th decoder layer only (2 = half the recompute, "
        "more activation memory)",
    )
    offload_checkpoints: bool = Field(
        False,
        description="with gradient_checkpointing: keep each layer's saved input in (pinned) host memory; for very "
        "long sequences (131k tokens: 18 GB of layer inputs on 20b)",
    )
    optimizer: Literal[OPTIMIZERS] = Field(
        "adamw",
        description="adamw (fused on CUDA); the 8-bit variants keep AdamW's moments in 8 bits and need bitsandbytes",
    )
    loss_chunk_tokens: int = Field(
        512,
        ge=16,
        description="trained tokens projected onto the 201,088-token vocabulary at once (about 0.6 GB of logits and "
        "gradient at 512)",
    )

    @model_validator(mode="after")
    def _offload_needs_checkpointing(self):
        if self.offload_checkpoints and not self.gradient_checkpointing:
            raise ValueError("offload_checkpoints needs gradient_checkpointing: true")
        return self

    @classmethod
    def coerce(cls, value, where: str = "memory") -> MemorySettings:
        return super().coerce({} if value is None else value, where)

    def memory_settings(self) -> MemorySettings:
        """Just the memory knobs (of a recipe's train section, say)."""
        return MemorySettings(**{k: getattr(self, k) for k in MemorySettings.model_fields})

    def to_dict(self) -> dict:
        return self.model_dump()


# ---------------------------------------------------------------------------------------------------
# activation checkpointing
# ---------------------------------------------------------------------------------------------------
def _checkpoint_function(offload: bool):
    def checkpoint_layer(function, *args, **kwargs):
        if offload:
            # Non-reentrant checkpointing saves the layer's inputs through autograd's saved-tensor hooks
            # before its own hooks take over, so save_on_cpu moves exactly those inputs to the host.
            with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
                return checkpoint(function, *args, use_reentrant=False, **kwargs)
        return checkpoint(function, *args, use_reentrant=False, **kwargs)

    return checkpoint_layer


def decoder_layers(model) -> list[torch.nn.Module]:
    """transformers' checkpointable blocks (GptOssDecoderLayer), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def enable_checkpointing(model, every_n_layers: int = 1, offload: bool = False) -> int:
    """Recompute each decoder layer in backward (non-reentrant torch checkpointing); returns how many.

    Same mechanism as transformers' gradient_checkpointing_enable(use_reentrant=False), set per layer so it
    behaves the same on transformers 5.17 and 5.23. Takes effect in train() mode only (transformers' rule);
    call the model with use_cache=False.
    """
    fn = _checkpoint_function(offload)
    count = 0
    for i, layer in enumerate(decoder_layers(model)):
        layer._gradient_checkpointing_func = fn
        layer.gradient_checkpointing = i % every_n_layers == 0
        count += int(layer.gradient_checkpointing)
    if count == 0:
        raise ValueError(f"{type(model).__name__} has no checkpointable decoder layers")
    model.gptoss_tune_checkpointing = {"every_n_layers": every_n_layers, "offload": offload}
    return count


def disable_checkpointing(model) -> None:
    for layer in decoder_layers(model):
        layer.gradient_checkpointing = False
    model.gptoss_tune_checkpointing = None


# ---------------------------------------------------------------------------------------------------
# optimizer
# ---------------------------------------------------------------------------------------------------
def bitsandbytes_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA setup raising at import
        return False
    return True


def build_optimizer(params, name: str = "adamw", lr: float = 2e-4, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:  # fmt: skip
    """AdamW over the trainable parameters; "adamw_8bit" / "paged_adamw_8bit" through bitsandbytes.

    Plain AdamW uses torch's fused CUDA kernel where every parameter is on CUDA (one launch per step
    instead of one per tensor group: LoRA has ~10 tensors per layer).
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise UserError("no trainable parameters: attach LoRA (lora: in the recipe) before building the optimizer")
    if name == "adamw":
        fused = all(p.is_cuda for p in params)
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused or None)
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        if not bitsandbytes_available():
            raise UserError(
                f"memory.optimizer {name!r} needs the bitsandbytes package, which is not importable here; "
                "pip install bitsandbytes, or use optimizer: adamw"
            )
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit if name == "adamw_8bit" else bnb.optim.PagedAdamW8bit
        return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise UserError(f"memory.optimizer {name!r} is not one of {list(OPTIMIZERS)}")


def training_state_bytes(n_trainable: int, optimizer: str = "adamw") -> int:
    """fp32 LoRA weights + fp32 grads + optimizer moments (2 x 4 bytes, or 2 x 1 byte + block absmax)."""
    moments = 8 if optimizer == "adamw" else 2
    return n_trainable * (4 + 4 + moments)


def apply_memory_settings(model, settings: MemorySettings | dict | None) -> MemorySettings:
    """Switch on what `settings` asks for on a loaded model; returns the validated settings."""
    settings = MemorySettings.coerce(settings)
    if settings.gradient_checkpointing:
        enable_checkpointing(model, settings.checkpoint_every_n_layers, settings.offload_checkpoints)
    else:
        disable_checkpointing(model)
    return settings
