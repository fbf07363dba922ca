"""Launchers and autograd for the Triton MXFP4 expert kernels (kernels in ``moe_kernels.py``).

Public entry point: ``moe_experts(hidden_states, router_indices, routing_weights, weights, lora, *,
limit, alpha) -> [T, H]``, the same call as ``moe_reference.moe_experts_reference``, differentiable with
respect to the hidden states, the routing weights (hence the router) and the LoRA factors. The MXFP4
weights and biases are frozen and never dequantised outside a kernel tile.

Each launcher below has its torch reference in ``moe_reference.py`` (named ``<launcher>_reference``),
against which tests/kernels/test_moe_kernels.py checks it. The layer is one ``autograd.Function``
(``MoEExpertsFunction``) rather than one per GEMM because the SwiGLU backward is fused into the down
projection's backward epilogue and the routing weight into the down projection's backward loads; each
fusion crosses what would be a Function boundary.

On the GPU the two MXFP4 GEMMs are autotuned (configs for Hopper below); the small kernels use fixed
tiles. Under TRITON_INTERPRET=1 (CPU tests) everything runs with small fixed tiles and fp32 ``tl.dot``
operands for fp32 and bf16 inputs (the interpreter's bf16 ``tl.dot`` is wrong), fp16 ones for fp16. Interpretation is decided when moe_kernels is first imported (Triton reads the variable when
it decorates a kernel), so set TRITON_INTERPRET=1 before importing this module.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from . import moe_kernels as K
from .moe_dispatch import Dispatch, build_dispatch, combine_pairs
from .moe_reference import ExpertLoRA, ExpertWeights

try:  # the class Triton substitutes for JITFunction under TRITON_INTERPRET=1
    from triton.runtime.interpreter import InterpretedFunction as _Interpreted
except ImportError:  # pragma: no cover - very old Triton
    _Interpreted = ()

INTERPRET = isinstance(K.mxfp4_grouped_matmul_kernel, _Interpreted)

# Tiles used under the interpreter: small, so the CPU tests cover several tiles, tails and the
# empty-slot exit on tiny shapes. A test may pass its own through the launchers' `config`.
INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)


def _config(block_m, block_n, block_k, warps, stages, group_m=8):
    return triton.Config(
        dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m), num_warps=warps, num_stages=stages
    )


# Hopper (H100/H200) candidates. Each compiles for sm_90 within shared memory and WITHOUT register spills
# at the gpt-oss shapes (scripts/compile_check_moe.py, Triton 3.9 and 3.6; tile shapes that spilled were
# dropped, e.g. 128x256x64 and 256x128x64 in the forward and every BLOCK_M = 128 tile with the fused
# SwiGLU backward except 128x128x32). Timings pick among them at run time; none is timed yet (no GPU in the session
# that wrote them; docs/benchmarks.md). 4 warps = one warpgroup for wgmma's M = 64. BLOCK_K is a
# multiple of 32 (whole scale blocks). Entries: BLOCK_M, BLOCK_N, BLOCK_K, warps, stages.
MATMUL_CONFIGS = [
    _config(64, 128, 64, 4, 4),
    _config(64, 128, 64, 8, 4),
    _config(64, 256, 64, 8, 3),
    _config(64, 64, 128, 4, 4),
    _config(64, 128, 128, 8, 3),
    _config(128, 128, 64, 8, 4),
    _config(128, 128, 128, 8, 3),
    _config(128, 64, 64, 4, 4),
    # 256 rows share each dequantised tile: the only candidate that is MMA-bound by the SASS count
    # (about 440 issue cycles of dequantisation vs 512 of wgmma per K step); for >= 256 rows per expert.
    _config(256, 64, 64, 8, 3),
]
# Backward (transposed) kernel: BLOCK_K is the output column tile, BLOCK_N the contraction step.
MATMUL_T_CONFIGS = [
    _config(64, 64, 128, 4, 4),
    _config(64, 128, 64, 4, 4),
    _config(64, 64, 256, 8, 3),
    _config(128, 64, 128, 8, 3),
    _config(128, 128, 64, 8, 3),
    _config(128, 64, 64, 4, 4),
]
# With the SwiGLU backward fused into the epilogue the register budget is tighter.
MATMUL_T_SWIGLU_CONFIGS = [
    _config(64, 128, 64, 8, 3),
    _config(64, 64, 64, 8, 4),
    _config(64, 256, 64, 8, 3),
    _config(64, 128, 32, 4, 4),
    _config(64, 64, 32, 4, 4),
    _config(128, 128, 32, 8, 4),
]
# The small kernels run fixed tiles on the GPU (memory-bound, or few programs): not autotuned.
# scripts/check_moe_tiles.py runs these and every config above (interpreted on the CPU, or on the GPU) at shapes with
# the real tails; scripts/compile_check_moe.py compiles them.
GPU_FIXED_CONFIGS = {
    "lowrank": dict(BLOCK_M=64, BLOCK_K=128, num_warps=4, num_stages=3),
    "outer": dict(BLOCK_M=64, BLOCK_D1=128, num_warps=4, num_stages=3),
    "combine": dict(BLOCK_H=1024),
    "routing_grad": dict(BLOCK_H=512),
}


def _prune_block_m(configs, named_args, **kwargs):
    """Rows per expert below 64 (E = 128 at 2048 tokens) would leave a 128-row tile mostly empty."""
    m_hint = named_args["m_hint"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(64, m_hint)]
    return kept or configs


def _autotuned(kernel, configs, keys):
    return triton.autotune(
        configs,
        key=["N", "K", "E", "m_hint", "R_PAD", "HAS_LORA", *keys],
        prune_configs_by={"early_config_prune": _prune_block_m},
    )(kernel)


def _even_k(meta) -> bool:
    """K a multiple of BLOCK_K: the forward's K loop needs no tail masks (2880 = 45 x 64)."""
    return meta["K"] % meta["BLOCK_K"] == 0


if not INTERPRET:
    _matmul_kernel = _autotuned(
        triton.heuristics({"EVEN_K": _even_k})(K.mxfp4_grouped_matmul_kernel), MATMUL_CONFIGS, ["SWIGLU", "STORE_PRE"]
    )
    _matmul_t_kernel = _autotuned(K.mxfp4_grouped_matmul_t_kernel, MATMUL_T_CONFIGS, ["HAS_ROW_SCALE"])
    _matmul_t_swiglu_kernel = _autotuned(K.mxfp4_grouped_matmul_t_kernel, MATMUL_T_SWIGLU_CONFIGS, ["HAS_ROW_SCALE"])


# ---- helpers -------------------------------------------------------------------------------------------
def _dot_dtype(t: torch.Tensor):
    if t.dtype == torch.float32 or (INTERPRET and t.dtype == torch.bfloat16):
        return tl.float32  # interpreter: bf16 tl.dot is wrong there (fp16 is right); fp32 on the GPU runs as tf32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[t.dtype]


def _check_device(*tensors: torch.Tensor | None) -> None:
    if INTERPRET:
        return
    for t in tensors:
        if t is not None and t.device.type != "cuda":
            raise RuntimeError(
                "gptoss_kernels' Triton kernels need CUDA tensors; on the CPU run them interpreted by setting "
                "TRITON_INTERPRET=1 before gptoss_kernels.moe_triton is imported"
            )


def _on_device(t: torch.Tensor):
    """Triton launches on the *current* CUDA device and stream. A model on cuda:1 (`--device cuda:1`) while
    cuda:0 is current would have its kernels launched on device 0 with device-1 pointers (an illegal
    memory access), so every launch of the layer runs under its tensors' device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_same_device(hidden_states: torch.Tensor, named: dict) -> None:
    for name, t in named.items():
        if t is not None and t.device != hidden_states.device:
            raise ValueError(
                f"moe_experts: {name} is on {t.device} but hidden_states on {hidden_states.device}; "
                f"the experts' weights, LoRA factors and routing must be on the activations' device"
            )


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, triton.next_power_of_2(max(1, n)))


def _rank_pad(rank: int) -> int:
    return _pow2_at_least(rank, 16)  # tl.dot needs every dimension >= 16


def _m_hint(d: Dispatch) -> int:
    """Rows per expert rounded to a power of two: the autotuning key that tracks the tile fill."""
    return min(4096, _pow2_at_least(d.num_rows // max(1, d.num_experts), 16))


def _mxfp4_dims(blocks: torch.Tensor, scales: torch.Tensor) -> tuple[int, int]:
    E, N, G, B = blocks.shape
    if B != 16 or scales.shape != (E, N, G) or blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} / scales {tuple(scales.shape)} are not [E, N, K/32, 16] / [E, N, K/32] uint8"
        )
    if blocks.stride(3) != 1 or blocks.stride(2) != 16 or scales.stride(2) != 1:
        raise ValueError("MXFP4 blocks and scales must be contiguous along the input dimension")
    return N, G * 32


def _dummy(d: Dispatch) -> torch.Tensor:
    return d.offsets  # stands in for an absent pointer argument (its constexpr flag is off)


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ---- launchers (each checked against its *_reference in moe_reference.py) -------------------------------
def mxfp4_grouped_matmul(
    x: torch.Tensor,
    d: Dispatch,
    blocks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    lora: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    swiglu: tuple[float, float] | None = None,
    store_pre: bool = True,
    out_rows: torch.Tensor | None = None,
    config: dict | None = None,
):
    """Grouped y[p] = x[rows[p]] @ W[e]ᵀ + bias[e] (+ s·xa[p] @ B[e]ᵀ with lora=(xa, B, s)).

    x [*, K] (rows gathered through `rows`, else row p), W[e] = MXFP4 (blocks, scales) [N, K].
    Without swiglu returns y [P, N], row p written at out_rows[p] when given. With swiglu=(limit, alpha)
    returns (h [P, N] or None when not store_pre, act [P, N/2]). Reference: grouped_mxfp4_matmul_reference.
    """
    _check_device(x, blocks)
    x, bias = _last_contiguous(x), _last_contiguous(bias)  # the kernel reads bias rows with unit stride
    N, Kdim = _mxfp4_dims(blocks, scales)
    P, E = d.num_rows, d.num_experts
    if swiglu is not None and N % 2:
        raise ValueError("SwiGLU needs an even number of output columns")
    xa, lora_B, lora_scale = lora if lora is not None else (None, None, 0.0)
    R = lora_B.shape[-1] if lora is not None else 1
    if lora is not None:
        xa = _last_contiguous(xa)
    if swiglu is not None:
        h = torch.empty(P, N, dtype=x.dtype, device=x.device) if store_pre else None
        act = torch.empty(P, N // 2, dtype=x.dtype, device=x.device)
        y = h if h is not None else act  # Y unused when not storing
        limit, alpha = swiglu
    else:
        y = torch.empty(P, N, dtype=x.dtype, device=x.device)
        act = y
        limit, alpha = 0.0, 0.0
    if P == 0:
        return (h, act) if swiglu is not None else y
    dummy = _dummy(d)
    args = (
        x,
        x.stride(0),
        rows if rows is not None else dummy,
        out_rows if out_rows is not None else dummy,
        blocks,
        blocks.stride(0),
        blocks.stride(1),
        scales,
        scales.stride(0),
        scales.stride(1),
        bias,
        bias.stride(0),
        xa if xa is not None else x,
        xa.stride(0) if xa is not None else 0,
        lora_B if lora_B is not None else x,
        *(lora_B.stride() if lora_B is not None else (0, 0, 0)),
        float(lora_scale),
        y,
        y.stride(0),
        act,
        act.stride(0),
        d.offsets,
        P,
        E,
        N,
        Kdim,
        R,
        float(limit),
        float(alpha),
        _m_hint(d),
    )
    flags = dict(
        E_PAD=_pow2_at_least(E, 16),
        R_PAD=_rank_pad(R),
        HAS_IN_ROWS=rows is not None,
        HAS_OUT_ROWS=out_rows is not None,
        HAS_LORA=lora is not None,
        SWIGLU=swiglu is not None,
        STORE_PRE=swiglu is not None and store_pre,
        DOT_DTYPE=_dot_dtype(x),
    )

    def grid(meta):
        return ((triton.cdiv(P, meta["BLOCK_M"]) + E) * triton.cdiv(N, meta["BLOCK_N"]),)

    if INTERPRET or config is not None:
        cfg = dict(INTERPRET_CONFIG, **(config or {}))
        K.mxfp4_grouped_matmul_kernel[grid(cfg)](*args, **flags, **cfg, EVEN_K=Kdim % cfg["BLOCK_K"] == 0)
    else:
        _matmul_kernel[grid](*args, **flags)
    return (h, act) if swiglu is not None else y


def mxfp4_grouped_matmul_t(
    dy: torch.Tensor,
    d: Dispatch,
    blocks: torch.Tensor,
    scales: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    lora: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    swiglu_h: torch.Tensor | None = None,
    limit: float = 7.0,
    alpha: float = 1.702,
    out_rows: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Grouped dx[p] = s_p·dy[rows[p]] @ W[e] (+ s·u[p] @ A[e] with lora=(u, A, s)): the backward
    through an MXFP4 projection, contracting along W's output dimension. row_scale s_p per sorted row.

    Returns dx [P, K] (row p at out_rows[p] when given) or, with swiglu_h (the saved gate_up
    pre-activations [P, 2K]), d(pre-activation) [P, 2K]. Reference: grouped_mxfp4_matmul_t_reference.
    """
    _check_device(dy, blocks)
    dy = _last_contiguous(dy)
    N, Kdim = _mxfp4_dims(blocks, scales)
    P, E = d.num_rows, d.num_experts
    u, lora_A, lora_scale = lora if lora is not None else (None, None, 0.0)
    R = lora_A.shape[1] if lora is not None else 1
    if lora is not None:
        u = _last_contiguous(u)
    if swiglu_h is not None:
        if swiglu_h.shape != (P, 2 * Kdim):
            raise ValueError(f"pre-activations {tuple(swiglu_h.shape)} do not match [{P}, {2 * Kdim}]")
        swiglu_h = _last_contiguous(swiglu_h)
        dx = torch.empty(P, 2 * Kdim, dtype=dy.dtype, device=dy.device)
    else:
        dx = torch.empty(P, Kdim, dtype=dy.dtype, device=dy.device)
    if P == 0:
        return dx
    dummy = _dummy(d)
    args = (
        dy,
        dy.stride(0),
        rows if rows is not None else dummy,
        row_scale if row_scale is not None else dummy,
        out_rows if out_rows is not None else dummy,
        blocks,
        blocks.stride(0),
        blocks.stride(1),
        scales,
        scales.stride(0),
        scales.stride(1),
        u if u is not None else dy,
        u.stride(0) if u is not None else 0,
        lora_A if lora_A is not None else dy,
        *(lora_A.stride() if lora_A is not None else (0, 0, 0)),
        float(lora_scale),
        swiglu_h if swiglu_h is not None else dy,
        swiglu_h.stride(0) if swiglu_h is not None else 0,
        dx,
        dx.stride(0),
        d.offsets,
        P,
        E,
        N,
        Kdim,
        R,
        float(limit),
        float(alpha),
        _m_hint(d),
    )
    flags = dict(
        E_PAD=_pow2_at_least(E, 16),
        R_PAD=_rank_pad(R),
        HAS_IN_ROWS=rows is not None,
        HAS_ROW_SCALE=row_scale is not None,
        HAS_OUT_ROWS=out_rows is not None,
        HAS_LORA=lora is not None,
        SWIGLU_BWD=swiglu_h is not None,
        DOT_DTYPE=_dot_dtype(dy),
    )

    def grid(meta):
        return ((triton.cdiv(P, meta["BLOCK_M"]) + E) * triton.cdiv(Kdim, meta["BLOCK_K"]),)

    if INTERPRET or config is not None:
        cfg = dict(INTERPRET_CONFIG, **(config or {}))
        K.mxfp4_grouped_matmul_t_kernel[grid(cfg)](*args, **flags, **cfg)
    else:
        (_matmul_t_swiglu_kernel if swiglu_h is not None else _matmul_t_kernel)[grid](*args, **flags)
    return dx


def grouped_lowrank(
    x: torch.Tensor,
    d: Dispatch,
    a: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """out[p] = s_p·x[rows[p]] @ a[e]ᵀ -> fp32 [P, R]; a [E, R, K] may be a strided view (B.transpose(1, 2)).

    LoRA's x·Aᵀ once per (token, expert) in the forward, dY·B in the backward. Memory-bound (R is small),
    so fixed tiles. Reference: grouped_lowrank_reference.
    """
    _check_device(x, a)
    x = _last_contiguous(x)
    P, E = d.num_rows, d.num_experts
    R, Kdim = a.shape[1], a.shape[2]
    out = torch.empty(P, R, dtype=torch.float32, device=x.device)
    if P == 0:
        return out
    cfg = dict(BLOCK_M=16, BLOCK_K=32) if INTERPRET else dict(GPU_FIXED_CONFIGS["lowrank"])
    cfg.update(config or {})
    dummy = _dummy(d)
    grid = (triton.cdiv(P, cfg["BLOCK_M"]) + E,)
    K.grouped_lowrank_kernel[grid](
        x,
        x.stride(0),
        rows if rows is not None else dummy,
        row_scale if row_scale is not None else dummy,
        a,
        *a.stride(),
        out,
        out.stride(0),
        d.offsets,
        P,
        E,
        Kdim,
        R,
        E_PAD=_pow2_at_least(E, 16),
        R_PAD=_rank_pad(R),
        HAS_IN_ROWS=rows is not None,
        HAS_ROW_SCALE=row_scale is not None,
        DOT_DTYPE=_dot_dtype(x),
        **cfg,
    )
    return out


def grouped_outer(
    left: torch.Tensor,
    right: torch.Tensor,
    d: Dispatch,
    *,
    left_rows: torch.Tensor | None = None,
    left_scale: torch.Tensor | None = None,
    left_swiglu: tuple[float, float] | None = None,
    scale: float = 1.0,
    transpose: bool = False,
    config: dict | None = None,
) -> torch.Tensor:
    """out[e] = scale·Σ_{p of e} (s_p·left[left_rows[p]])ᵀ right[p] -> fp32 [E, D1, D2] ([E, D2, D1]
    with transpose): the LoRA factor gradients, right being rank-wide ([P, r]).

    left_swiglu=(limit, alpha): left is the saved pre-activation [P, 2·D1] and SwiGLU is recomputed on
    load. Reference: grouped_outer_reference.
    """
    _check_device(left, right)
    left, right = _last_contiguous(left), _last_contiguous(right)
    E = d.num_experts
    D1 = left.shape[1] // 2 if left_swiglu is not None else left.shape[1]
    D2 = right.shape[1]
    out = torch.empty((E, D2, D1) if transpose else (E, D1, D2), dtype=torch.float32, device=left.device)
    o_e, o_1, o_2 = (out.stride(0), out.stride(2), out.stride(1)) if transpose else out.stride()
    cfg = dict(BLOCK_M=16, BLOCK_D1=32) if INTERPRET else dict(GPU_FIXED_CONFIGS["outer"])
    cfg["BLOCK_D2"] = _rank_pad(D2)
    cfg.update(config or {})
    dummy = _dummy(d)
    limit, alpha = left_swiglu if left_swiglu is not None else (0.0, 0.0)
    grid = (E * triton.cdiv(D1, cfg["BLOCK_D1"]) * triton.cdiv(D2, cfg["BLOCK_D2"]),)
    K.grouped_outer_kernel[grid](
        left,
        left.stride(0),
        left_rows if left_rows is not None else dummy,
        left_scale if left_scale is not None else dummy,
        right,
        right.stride(0),
        out,
        o_e,
        o_1,
        o_2,
        d.offsets,
        E,
        D1,
        D2,
        float(scale),
        float(limit),
        float(alpha),
        HAS_L_ROWS=left_rows is not None,
        HAS_L_SCALE=left_scale is not None,
        L_SWIGLU=left_swiglu is not None,
        DOT_DTYPE=_dot_dtype(left if left.dtype != torch.float32 else right),
        **cfg,
    )
    return out


def combine(y_pairs: torch.Tensor, routing_weights: torch.Tensor, *, config: dict | None = None) -> torch.Tensor:
    """out[t] = Σ_j w[t, j]·y[t·k + j] in fp32, returned in y's dtype. Reference: combine_reference."""
    _check_device(y_pairs)
    T, k = routing_weights.shape
    H = y_pairs.shape[1]
    w = routing_weights.contiguous()
    out = torch.empty(T, H, dtype=y_pairs.dtype, device=y_pairs.device)
    if T == 0:
        return out
    cfg = dict(BLOCK_H=64) if INTERPRET else dict(GPU_FIXED_CONFIGS["combine"])
    cfg.update(config or {})
    K.combine_kernel[(T, triton.cdiv(H, cfg["BLOCK_H"]))](
        y_pairs, y_pairs.stride(0), w, out, out.stride(0), H, TOP_K=k, **cfg
    )
    return out


def routing_grad(y_pairs: torch.Tensor, dout: torch.Tensor, top_k: int, *, config: dict | None = None) -> torch.Tensor:
    """dw[t, j] = <dout[t], y[t·k + j]> -> fp32 [T, k]. Reference: routing_grad_reference."""
    _check_device(y_pairs, dout)
    T, H = dout.shape
    dw = torch.empty(T, top_k, dtype=torch.float32, device=dout.device)
    if T == 0:
        return dw
    cfg = dict(BLOCK_H=64) if INTERPRET else dict(GPU_FIXED_CONFIGS["routing_grad"])
    cfg.update(config or {})
    K.routing_grad_kernel[(T,)](
        y_pairs, y_pairs.stride(0), dout, dout.stride(0), dw, H, TOP_K=top_k, K_PAD=_pow2_at_least(top_k, 1), **cfg
    )
    return dw


# ---- the expert layer ------------------------------------------------------------------------------------
def _has(a, b) -> bool:
    return a is not None and b is not None


def _layer_forward(x, rw, gu_A, gu_B, dn_A, dn_B, d: Dispatch, w: ExpertWeights, s, limit, alpha, need_bwd):
    """Forward of the layer; returns (out, h, xa1, aa2, y) (the last four kept for the backward)."""
    xa1 = grouped_lowrank(x, d, gu_A, rows=d.row_token) if _has(gu_A, gu_B) else None
    h, act = mxfp4_grouped_matmul(
        x,
        d,
        w.gate_up_blocks,
        w.gate_up_scales,
        w.gate_up_bias,
        rows=d.row_token,
        lora=(xa1, gu_B, s) if xa1 is not None else None,
        swiglu=(limit, alpha),
        store_pre=need_bwd,
    )
    aa2 = grouped_lowrank(act, d, dn_A) if _has(dn_A, dn_B) else None
    y = mxfp4_grouped_matmul(
        act,
        d,
        w.down_blocks,
        w.down_scales,
        w.down_bias,
        lora=(aa2, dn_B, s) if aa2 is not None else None,
        out_rows=d.row_pair,
    )
    return combine(y, rw), h, xa1, aa2, y


class MoEExpertsFunction(torch.autograd.Function):
    """The routed expert layer; grads to x, routing weights and the four LoRA factors.

    Saved for the backward: the gate_up pre-activations h [T·k, 2I], the per-pair expert outputs
    y [T·k, H] (for the routing-weight gradient), the LoRA intermediates x·A₁ᵀ and act·A₂ᵀ [T·k, r] and
    the dispatch; the SwiGLU output is recomputed from h where needed. Nothing weight-sized is saved.
    """

    @staticmethod
    def forward(ctx, x, rw, gu_A, gu_B, dn_A, dn_B, router_indices, weights: ExpertWeights, s, limit, alpha):
        with _on_device(x):
            d = build_dispatch(router_indices, weights.gate_up_blocks.shape[0])
            out, h, xa1, aa2, y = _layer_forward(x, rw, gu_A, gu_B, dn_A, dn_B, d, weights, s, limit, alpha, True)
        ctx.save_for_backward(x, rw, gu_A, gu_B, dn_A, dn_B, h, xa1, aa2, y, d.offsets, d.row_token, d.row_pair)
        ctx.weights, ctx.meta = weights, (d.num_experts, d.top_k, s, limit, alpha)
        return out

    @staticmethod
    def backward(ctx, dout):
        with _on_device(dout):  # autograd's device threads set it already; explicit for any other caller
            return MoEExpertsFunction._backward(ctx, dout)

    @staticmethod
    def _backward(ctx, dout):
        x, rw, gu_A, gu_B, dn_A, dn_B, h, xa1, aa2, y, offsets, row_token, row_pair = ctx.saved_tensors
        E, k, s, limit, alpha = ctx.meta
        w: ExpertWeights = ctx.weights
        d = Dispatch(offsets, row_token, row_pair, E, k)
        need_x, need_rw, need_guA, need_guB, need_dnA, need_dnB = ctx.needs_input_grad[:6]
        dout = dout.contiguous()
        grads = [None] * 6

        if need_rw:
            grads[1] = routing_grad(y, dout, k).to(rw.dtype)
        # down projection: dy[p] = w[p]·dout[token(p)], never materialised (rows + row_scale)
        w_rows = rw.reshape(-1)[row_pair.long()].float()
        u2 = None
        if _has(dn_A, dn_B):
            u2 = grouped_lowrank(dout, d, dn_B.transpose(1, 2), rows=row_token, row_scale=w_rows)
            if need_dnB:
                grads[5] = grouped_outer(dout, aa2, d, left_rows=row_token, left_scale=w_rows, scale=s).to(dn_B.dtype)
            if need_dnA:
                grads[4] = grouped_outer(h, u2, d, left_swiglu=(limit, alpha), scale=s, transpose=True).to(dn_A.dtype)
        dh = mxfp4_grouped_matmul_t(
            dout,
            d,
            w.down_blocks,
            w.down_scales,
            rows=row_token,
            row_scale=w_rows,
            lora=(u2, dn_A, s) if u2 is not None else None,
            swiglu_h=h,
            limit=limit,
            alpha=alpha,
        )
        # gate_up projection
        u1 = None
        if _has(gu_A, gu_B):
            u1 = grouped_lowrank(dh, d, gu_B.transpose(1, 2))
            if need_guB:
                grads[3] = grouped_outer(dh, xa1, d, scale=s).to(gu_B.dtype)
            if need_guA:
                grads[2] = grouped_outer(x, u1, d, left_rows=row_token, scale=s, transpose=True).to(gu_A.dtype)
        if need_x:
            dx_pairs = mxfp4_grouped_matmul_t(
                dh,
                d,
                w.gate_up_blocks,
                w.gate_up_scales,
                lora=(u1, gu_A, s) if u1 is not None else None,
                out_rows=row_pair,
            )
            grads[0] = combine_pairs(dx_pairs, k)
        return (*grads, None, None, None, None, None)


def moe_experts(
    hidden_states: torch.Tensor,
    router_indices: torch.Tensor,
    routing_weights: torch.Tensor,
    weights: ExpertWeights,
    lora: ExpertLoRA | None = None,
    *,
    limit: float = 7.0,
    alpha: float = 1.702,
) -> torch.Tensor:
    """Routed expert layer on MXFP4 weights: x [T, H], indices [T, k], weights [T, k] -> [T, H].

    Same contract as moe_reference.moe_experts_reference. Without anything to differentiate (inference,
    or torch.no_grad) it skips saving the pre-activations.
    """
    if hidden_states.dim() != 2 or router_indices.shape != routing_weights.shape:
        raise ValueError(
            f"expected hidden_states [T, H] and router_indices/routing_weights [T, k], got "
            f"{tuple(hidden_states.shape)}, {tuple(router_indices.shape)}, {tuple(routing_weights.shape)}"
        )
    _check_device(hidden_states)
    factors = (None, None, None, None, 0.0) if lora is None else tuple(lora)
    gu_A, gu_B, dn_A, dn_B, s = factors
    _check_same_device(
        hidden_states,
        dict(
            router_indices=router_indices,
            routing_weights=routing_weights,
            **weights._asdict(),
            gate_up_lora_A=gu_A,
            gate_up_lora_B=gu_B,
            down_lora_A=dn_A,
            down_lora_B=dn_B,
        ),
    )
    tensors = (hidden_states, routing_weights, gu_A, gu_B, dn_A, dn_B)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return MoEExpertsFunction.apply(*tensors, router_indices, weights, float(s), float(limit), float(alpha))
    with _on_device(hidden_states):
        d = build_dispatch(router_indices, weights.gate_up_blocks.shape[0])
        return _layer_forward(
            hidden_states,
            routing_weights,
            gu_A,
            gu_B,
            dn_A,
            dn_B,
            d,
            weights,
            float(s),
            float(limit),
            float(alpha),
            False,
        )[0]
