"""Plain torch reference of the gpt-oss expert layer on MXFP4 weights, with per-expert LoRA.

This is the CPU path of the toolkit and the ground truth the Triton kernels are tested against. It
dequantises ONE expert's weight at a time, and its backward dequantises again instead of saving the
dense weight, so no dense copy of the layer's experts is ever held (the autograd graph keeps only
views of the packed uint8 tensors). LoRA is applied to the activations, x·Aᵀ·Bᵀ·scale; the dense
delta A·B is never formed.

Shapes (E experts, H hidden, I intermediate, r LoRA rank, T tokens, k experts per token):
  gate_up blocks [E, 2I, H/32, 16], scales [E, 2I, H/32], bias [E, 2I]   (gate = even, up = odd columns)
  down    blocks [E, H, I/32, 16],  scales [E, H, I/32],  bias [E, H]
  LoRA    gate_up A [E, r, H], B [E, 2I, r];  down A [E, r, I], B [E, H, r]
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from gptoss_tune.mxfp4 import dequantize


class ExpertWeights(NamedTuple):
    gate_up_blocks: torch.Tensor
    gate_up_scales: torch.Tensor
    gate_up_bias: torch.Tensor
    down_blocks: torch.Tensor
    down_scales: torch.Tensor
    down_bias: torch.Tensor


class ExpertLoRA(NamedTuple):
    """Per-expert LoRA factors; a projection without LoRA has None for its A and B."""

    gate_up_A: torch.Tensor | None
    gate_up_B: torch.Tensor | None
    down_A: torch.Tensor | None
    down_B: torch.Tensor | None
    scaling: float


class MXFP4Matmul(torch.autograd.Function):
    """y = x @ W.T with W = dequantize(blocks, scales) of shape [out, in].

    The backward dequantises W again rather than saving it: that costs one more dequantisation but keeps
    the activation memory at the packed size (17 bytes per 32 weights instead of 64 in bf16).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(blocks, scales)
        ctx.x_dtype = x.dtype
        return x @ dequantize(blocks, scales, x.dtype).t()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        blocks, scales = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dequantize(blocks, scales, grad_out.dtype)
        return grad_x, None, None


def mxfp4_matmul(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return MXFP4Matmul.apply(x, blocks, scales)


def swiglu_reference(gate_up: torch.Tensor, limit: float = 7.0, alpha: float = 1.702) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU on interleaved [.., 2I] (gate even, up odd) -> [.., I]."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def _lora(x: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None, scaling: float) -> torch.Tensor | None:
    if a is None or b is None:
        return None
    return (x @ a.to(x.dtype).t()) @ b.to(x.dtype).t() * scaling


def expert_forward_reference(
    x: torch.Tensor,
    w: ExpertWeights,
    e: int,
    lora: ExpertLoRA | None = None,
    limit: float = 7.0,
    alpha: float = 1.702,
) -> torch.Tensor:
    """One expert applied to its tokens x [n, H] -> [n, H] (before the routing weight)."""
    h = mxfp4_matmul(x, w.gate_up_blocks[e], w.gate_up_scales[e]) + w.gate_up_bias[e].to(x.dtype)
    if lora is not None:
        d = _lora(x, _at(lora.gate_up_A, e), _at(lora.gate_up_B, e), lora.scaling)
        if d is not None:
            h = h + d
    act = swiglu_reference(h, limit, alpha)
    y = mxfp4_matmul(act, w.down_blocks[e], w.down_scales[e]) + w.down_bias[e].to(x.dtype)
    if lora is not None:
        d = _lora(act, _at(lora.down_A, e), _at(lora.down_B, e), lora.scaling)
        if d is not None:
            y = y + d
    return y


def _at(t: torch.Tensor | None, e: int) -> torch.Tensor | None:
    return None if t is None else t[e]


def moe_experts_reference(
    hidden_states: torch.Tensor,
    router_indices: torch.Tensor,
    routing_weights: torch.Tensor,
    weights: ExpertWeights,
    lora: ExpertLoRA | None = None,
    limit: float = 7.0,
    alpha: float = 1.702,
) -> torch.Tensor:
    """Routed expert layer: x [T, H], indices [T, k], weights [T, k] -> [T, H].

    Each token's output is the sum over its k experts of routing_weight * expert(x). Gradients flow to x,
    to the routing weights (hence to the router) and to the LoRA factors; the MXFP4 weights are frozen.
    """
    num_experts = weights.gate_up_blocks.shape[0]
    T, k = router_indices.shape
    out = torch.zeros_like(hidden_states)
    flat_expert = router_indices.reshape(-1)
    # Group the (token, slot) pairs by expert: one sort instead of E boolean scans.
    order = torch.argsort(flat_expert, stable=True)
    counts = torch.bincount(flat_expert, minlength=num_experts).tolist()
    token_of = order // k
    flat_w = routing_weights.reshape(-1)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start : start + n]
        tokens = token_of[start : start + n]
        start += n
        y = expert_forward_reference(hidden_states[tokens], weights, e, lora, limit, alpha)
        y = y * flat_w[pairs].unsqueeze(-1).to(y.dtype)
        out = out.index_add(0, tokens, y.to(out.dtype))
    return out
