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

from .mxfp4 import dequantize


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
    return routed_experts(
        hidden_states,
        router_indices,
        routing_weights,
        weights.gate_up_blocks.shape[0],
        lambda x, e: expert_forward_reference(x, weights, e, lora, limit, alpha),
    )


def routed_experts(hidden_states, router_indices, routing_weights, num_experts: int, expert) -> torch.Tensor:
    """sum over each token's k experts of routing_weight * expert(x_tokens, e) -> [T, H]; `expert` computes one
    expert on the rows routed to it (the MXFP4 reference above, or dense weights: gptoss_tune's train/qat.py)."""
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
        y = expert(hidden_states[tokens], e)
        y = y * flat_w[pairs].unsqueeze(-1).to(y.dtype)
        out = out.index_add(0, tokens, y.to(out.dtype))
    return out


# ---- per-op references of the Triton kernels (rows = (token, expert) pairs sorted by expert) ----------
# Each mirrors one launcher in moe_triton.py and is what its test compares against. They loop over the
# experts in Python, dequantise one expert at a time and compute in `dtype` (float64 by default, the
# ground truth). See moe_dispatch for the row layout.


def _expert_slices(offsets: torch.Tensor):
    bounds = offsets.tolist()
    for e in range(len(bounds) - 1):
        if bounds[e + 1] > bounds[e]:
            yield e, slice(bounds[e], bounds[e + 1])


def _rows(x: torch.Tensor, rows: torch.Tensor | None, num: int, dtype: torch.dtype) -> torch.Tensor:
    return (x[:num] if rows is None else x[rows.long()]).to(dtype)


def grouped_mxfp4_matmul_reference(
    x,
    offsets,
    blocks,
    scales,
    bias,
    *,
    rows=None,
    xa=None,
    lora_B=None,
    lora_scale=0.0,
    swiglu: tuple[float, float] | None = None,
    out_rows=None,
    dtype=torch.float64,
):
    """Reference of `mxfp4_grouped_matmul`: y[p] = x[rows[p]] @ W[e]ᵀ + bias[e] + s·xa[p] @ B[e]ᵀ.

    Returns y [P, N] (rows permuted by out_rows when given), or (h, act) with swiglu=(limit, alpha).
    """
    P = offsets[-1].item()
    xs = _rows(x, rows, P, dtype)
    h = torch.zeros(P, blocks.shape[1], dtype=dtype)
    for e, sl in _expert_slices(offsets):
        w = dequantize(blocks[e], scales[e], dtype)
        h[sl] = xs[sl] @ w.t() + bias[e].to(dtype)
        if xa is not None:
            h[sl] += lora_scale * xa[sl].to(dtype) @ lora_B[e].to(dtype).t()
    if swiglu is not None:
        return h, swiglu_reference(h, *swiglu)
    if out_rows is not None:
        out = torch.empty_like(h)
        out[out_rows.long()] = h
        return out
    return h


def swiglu_backward_reference(h, dact, limit=7.0, alpha=1.702):
    """d(pre-activation) of the clamped interleaved SwiGLU, by autograd through swiglu_reference."""
    h = h.detach().clone().requires_grad_(True)
    swiglu_reference(h, limit, alpha).backward(dact)
    return h.grad


def grouped_mxfp4_matmul_t_reference(
    dy,
    offsets,
    blocks,
    scales,
    *,
    rows=None,
    row_scale=None,
    u=None,
    lora_A=None,
    lora_scale=0.0,
    swiglu_h=None,
    limit=7.0,
    alpha=1.702,
    out_rows=None,
    dtype=torch.float64,
):
    """Reference of `mxfp4_grouped_matmul_t`: dx[p] = s_p·dy[rows[p]] @ W[e] + lora_scale·u[p] @ A[e].

    With swiglu_h (the saved pre-activations [P, 2K]) returns d(pre-activation) [P, 2K] instead.
    """
    P = offsets[-1].item()
    dys = _rows(dy, rows, P, dtype)
    if row_scale is not None:
        dys = dys * row_scale.to(dtype)[:, None]
    dx = torch.zeros(P, blocks.shape[2] * blocks.shape[3] * 2, dtype=dtype)
    for e, sl in _expert_slices(offsets):
        dx[sl] = dys[sl] @ dequantize(blocks[e], scales[e], dtype)
        if u is not None:
            dx[sl] += lora_scale * u[sl].to(dtype) @ lora_A[e].to(dtype)
    if swiglu_h is not None:
        return swiglu_backward_reference(swiglu_h.to(dtype), dx, limit, alpha)
    if out_rows is not None:
        out = torch.empty_like(dx)
        out[out_rows.long()] = dx
        return out
    return dx


def grouped_lowrank_reference(x, offsets, a, *, rows=None, row_scale=None, dtype=torch.float64):
    """Reference of `grouped_lowrank`: out[p] = s_p·x[rows[p]] @ a[e]ᵀ, a [E, R, K] -> [P, R]."""
    P = offsets[-1].item()
    xs = _rows(x, rows, P, dtype)
    out = torch.zeros(P, a.shape[1], dtype=dtype)
    for e, sl in _expert_slices(offsets):
        out[sl] = xs[sl] @ a[e].to(dtype).t()
    if row_scale is not None:
        out = out * row_scale.to(dtype)[:, None]
    return out


def grouped_outer_reference(
    left,
    right,
    offsets,
    *,
    left_rows=None,
    left_scale=None,
    left_swiglu=None,
    scale=1.0,
    transpose=False,
    dtype=torch.float64,
):
    """Reference of `grouped_outer`: out[e] = scale·Σ_p (s_p·left[lrow])ᵀ right[p] -> [E, D1, D2]
    ([E, D2, D1] with transpose). left_swiglu=(limit, alpha): `left` holds pre-activations [P, 2·D1] and
    SwiGLU is applied first.
    """
    P = offsets[-1].item()
    E = offsets.numel() - 1
    ls = _rows(left, left_rows, P, dtype)
    if left_swiglu is not None:
        ls = swiglu_reference(ls, *left_swiglu)
    if left_scale is not None:
        ls = ls * left_scale.to(dtype)[:, None]
    rs = right[:P].to(dtype)
    out = torch.zeros(E, ls.shape[1], rs.shape[1], dtype=dtype)
    for e, sl in _expert_slices(offsets):
        out[e] = scale * ls[sl].t() @ rs[sl]
    return out.transpose(1, 2) if transpose else out


def combine_reference(y_pairs, routing_weights, dtype=torch.float64):
    """out[t] = Σ_j w[t, j]·y[t·k + j] (y in pair order)."""
    T, k = routing_weights.shape
    return (y_pairs.to(dtype).view(T, k, -1) * routing_weights.to(dtype)[..., None]).sum(1)


def routing_grad_reference(y_pairs, dout, top_k, dtype=torch.float64):
    """dw[t, j] = <dout[t], y[t·k + j]>."""
    T = dout.shape[0]
    return (y_pairs.to(dtype).view(T, top_k, -1) * dout.to(dtype)[:, None, :]).sum(-1)
