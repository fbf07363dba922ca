"""Quantisation-aware finishing: the last `quantization_aware.steps` steps run the experts through the
weight the merged-mxfp4 export will hold, Q(W + s·B·A), with a straight-through gradient to A and B.

Q is a re-quantiser from the base's own block exponents (gptoss_kernels.requantize; "keep" by default:
nearest on the base grid), computed with the export's arithmetic (gptoss_tune.model.requant), so after
the phase the merged-mxfp4 export IS the model that was trained and evaluated. Why: a small LoRA update
(relative norm 1e-3 of the expert weights) falls between the grid points of MXFP4 and re-quantisation
loses it (or, with OpenAI's rule, does worse than the base); through Q the LoRA learns an update that
crosses grid points where the loss needs it.

Forward, per expert routed to: W = dequantised base [out, in] fp32, M = W + s·B[e]A[e], q = Q(M) (no
gradient), the expert computed with q; backward: dL/dM = dL/dq (straight-through), hence to A and B.
Attention LoRA goes through the weight the export stores as well, bf16(W + s·B·A) (merged-mxfp4 keeps
attention in bf16, where small updates round away too: measured effect retained 0.93 instead of 1 on a
small-update run before this). Dropout is not applied in the phase (the export has none).
The path is the plain-torch reference (dense fp32 weight of each routed expert, held for the backward),
on the CPU and on CUDA alike: fine for small models, several GB of activations per layer for gpt-oss-20b
(no Triton fake-quantised kernel yet; docs/recipes.md says so).

The phase is recorded in the run directory (RECORD: the re-quantiser, its first step) so that
`gptoss-tune export --format merged-mxfp4` uses the same re-quantiser and measures the effect retained
against the fake-quantised model.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch

from gptoss_kernels.moe_reference import routed_experts, swiglu_reference
from gptoss_kernels.mxfp4 import dequantize
from gptoss_tune.atomic_io import atomic_write_text
from gptoss_tune.model.experts import MXFP4Experts
from gptoss_tune.model.requant import DEFAULT_SEED, requant_expert

RECORD = "quantization_aware.json"


class _StraightThrough(torch.autograd.Function):
    """Returns q exactly (the export's values); the gradient goes to the unquantised merged weight."""

    @staticmethod
    def forward(ctx, merged: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return q

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _weight(m: MXFP4Experts, proj: str, e: int, layer: int, method: str, seed: int) -> torch.Tensor:
    blocks, scales = getattr(m, f"{proj}_blocks")[e], getattr(m, f"{proj}_scales")[e]
    w = dequantize(blocks, scales, torch.float32)
    if proj not in m.lora_targets:
        return w
    a, b = getattr(m, f"{proj}_lora_A")[e], getattr(m, f"{proj}_lora_B")[e]
    merged = w + m.lora_scaling * (b.float() @ a.float())  # the export's arithmetic (model.requant.merged_expert)
    with torch.no_grad():
        nb, ns = requant_expert(blocks.cpu(), scales.cpu(), merged.detach().cpu(), method, seed, layer, proj, e)
        q = dequantize(nb, ns, torch.float32).to(merged.device)
    return _StraightThrough.apply(merged, q)


def routed_dense_forward(
    m: MXFP4Experts, hidden: torch.Tensor, router_indices, routing_weights, weight
) -> torch.Tensor:
    """The routed expert layer (moe_experts_reference's contract) with each expert's dense weight from
    `weight(proj, e)` -> [out, in]; biases, SwiGLU and routing as the module's own."""

    def expert(x, e):
        h = x @ weight("gate_up_proj", e).to(x.dtype).t() + m.gate_up_proj_bias[e].to(x.dtype)
        act = swiglu_reference(h, m.limit, m.alpha)
        return act @ weight("down_proj", e).to(x.dtype).t() + m.down_proj_bias[e].to(x.dtype)

    return routed_experts(hidden, router_indices, routing_weights, m.num_experts, expert)


def fake_quant_forward(
    m: MXFP4Experts, hidden: torch.Tensor, router_indices, routing_weights, *, layer: int, method: str, seed: int
):
    """The expert layer on fake-quantised merged weights Q(W + s·B·A) (straight-through to A and B)."""
    return routed_dense_forward(
        m, hidden, router_indices, routing_weights, lambda proj, e: _weight(m, proj, e, layer, method, seed)
    )


def _attention_forward(module, x: torch.Tensor) -> torch.Tensor:
    """A PEFT LoRA Linear through the weight the export stores: bf16(W + s·B·A) (exporter._merge_linear's
    arithmetic: base weight in fp32 plus the update, rounded to the checkpoint's bf16), straight-through."""
    w = module.base_layer.weight
    a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
    merged = w.float() + module.scaling["default"] * (b.float() @ a.float())
    q = _StraightThrough.apply(merged, merged.detach().to(torch.bfloat16).float())
    bias = module.base_layer.bias
    return torch.nn.functional.linear(x, q.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _lora_linears(model):
    for m in model.modules():
        if hasattr(m, "base_layer") and hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
            yield m


def enable(model, method: str = "keep", seed: int = DEFAULT_SEED) -> int:
    """Route every expert layer with LoRA through Q(W + s·B·A), and every attention LoRA through the bf16
    weight the export stores; returns how many expert layers."""
    n = 0
    for i, m in enumerate(x for x in model.modules() if isinstance(x, MXFP4Experts)):
        if m.lora_targets:
            m.fake_quant = partial(fake_quant_forward, layer=i, method=method, seed=seed)
            n += 1
    enable_attention(model)
    return n


def enable_attention(model) -> None:
    """Every attention LoRA through bf16(W + s·B·A), the weight a merged export stores."""
    for m in _lora_linears(model):
        m.forward = partial(_attention_forward, m)  # an instance attribute: nn.Module.__call__ uses it


def disable(model) -> None:
    for m in model.modules():
        if isinstance(m, MXFP4Experts):
            m.fake_quant = None
    for m in _lora_linears(model):
        m.__dict__.pop("forward", None)


def first_step(steps: int, total_steps: int) -> int | None:
    """The step count at which the phase starts (steps already taken), or None without one."""
    return max(0, total_steps - steps) if steps > 0 else None


def before_step(trainer) -> None:
    """The trainer's hook, called before each optimizer step: switch the phase on when it begins (also on
    a resume inside it) and record it in the run directory."""
    qa = trainer.recipe.quantization_aware
    start = first_step(qa.steps, trainer.total_steps)
    if start is None or trainer.state.step < start or getattr(trainer, "_qat_on", False):
        return
    enable(trainer.unwrapped, qa.requant, DEFAULT_SEED)
    trainer._qat_on = True
    if trainer.is_main:
        record = {"requant": qa.requant, "seed": DEFAULT_SEED, "from_step": start, "steps": qa.steps}
        atomic_write_text(Path(trainer.run_dir) / RECORD, json.dumps(record, indent=2) + "\n")
        trainer._say(
            f"step {trainer.state.step}: quantisation-aware finishing for the last {trainer.total_steps - trainer.state.step} "
            f"step(s): experts run through the MXFP4 weight the export will hold (re-quantiser {qa.requant!r})"
        )


def recorded(run_dir: Path | None) -> dict | None:
    """The run's quantisation-aware phase ({"requant", "seed", "from_step"}), if it had one."""
    if run_dir is None or not (Path(run_dir) / RECORD).is_file():
        return None
    try:
        rec = json.loads((Path(run_dir) / RECORD).read_text())
        return rec if isinstance(rec, dict) and isinstance(rec.get("requant"), str) else None
    except (OSError, json.JSONDecodeError):
        return None
