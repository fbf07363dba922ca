"""Triton kernels of the gpt-oss expert layer on MXFP4 weights (``@triton.jit`` only; launchers in
``moe_triton.py``, torch references in ``moe_reference.py``; design in docs/kernels.md).

Rows are the (token, expert) pairs sorted by expert (``moe_dispatch``). Every grouped kernel is
launched on a 1-D grid of (row tile, column tile) programs. The row-tile count is the upper bound
``cdiv(rows, BLOCK_M) + E`` (no host sync for the true count); each program finds its expert from
the per-expert offsets in ``_expert_tile`` and returns at once when its slot is past the last tile.

MXFP4 weights stay packed: ``blocks`` uint8 [E, N, K/32, 16] (viewed as [E, N, K/2] bytes, element 2j
in the low nibble) and ``scales`` uint8 [E, N, K/32] (E8M0). ``_mxfp4_tile`` turns a [BLOCK_N, BLOCK_K]
tile of them into floats in registers; both the forward (contracting over K) and the backward
(contracting over N) read the same row-major tiles, only the role of the tile in ``tl.dot`` changes.

``DOT_DTYPE`` is the tensor-core operand type (bf16/fp16 on the GPU). The launchers pass fp32 for bf16
inputs under TRITON_INTERPRET=1, where ``tl.dot`` on bf16 operands is wrong. Accumulation is always fp32.
"""

import triton
import triton.language as tl

# _mxfp4_tile decodes E2M1 codes as fp16 bit patterns, which read as the values times 2**-14. For bf16
# (and fp32) operands it returns the tile scaled so, and the callers multiply their fp32 accumulators by
# this exact power of two once per tile (free: the decode's SASS was measured this way). For fp16
# operands that tile would be 2**14 too small: every block with scale below 2**-10 would fall into fp16's
# subnormal range (a relative error of 0.18 in tests/kernels/test_moe_kernels.py), so there the 2**14 is folded
# into the E8M0 scale instead (exponent + 14; one integer add per 32 weights) and the tile is exact.
DEQ_CORRECTION = tl.constexpr(16384.0)


@triton.jit
def _swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped order: GROUP_M row tiles share each weight tile while it is in L2 and each x tile is
    reused across the column tiles (the usual Triton matmul swizzle)."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _expert_tile(pid_m, OFFSETS, E, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Row-tile slot -> (expert, first row, end row of the expert). expert == E means an empty slot.

    Each expert takes cdiv(count, BLOCK_M) consecutive slots (none when it has no rows); the slot's
    expert is the number of experts whose cumulative tile count is <= the slot. One vector load of the
    E+1 offsets per program (E <= 128 for gpt-oss), no host-side tile list, so BLOCK_M can be autotuned.
    """
    e_idx = tl.arange(0, E_PAD)
    e_mask = e_idx < E
    lo = tl.load(OFFSETS + e_idx, mask=e_mask, other=0)
    hi = tl.load(OFFSETS + e_idx + 1, mask=e_mask, other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(tiles, 0)
    expert = tl.sum((ends <= pid_m).to(tl.int32), 0)
    here = e_idx == expert
    first_tile = tl.sum(tl.where(here, ends - tiles, 0), 0)
    row_start = tl.sum(tl.where(here, lo, 0), 0) + (pid_m - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(here, hi, 0), 0)
    return expert, row_start, row_end


@triton.jit
def _mapped_rows(INDEX, rows, row_mask, HAS_INDEX: tl.constexpr):
    """The rows another tensor is addressed at: INDEX[rows] (the dispatch's gather or scatter) or the rows
    themselves, as int64 (rows x stride exceeds 2^31 at 131k tokens x top-4)."""
    if HAS_INDEX:
        return tl.load(INDEX + rows, mask=row_mask, other=0).to(tl.int64)
    return rows.to(tl.int64)


@triton.jit
def _tile_rows(row_start, row_end, IN_ROWS, BLOCK_M: tl.constexpr, HAS_IN_ROWS: tl.constexpr):
    """The tile's rows in the grouped order, their mask, and the input rows they read."""
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    return rows, row_mask, _mapped_rows(IN_ROWS, rows, row_mask, HAS_IN_ROWS)


@triton.jit
def _mxfp4_tile(
    wb_ptrs,
    ws_ptrs,
    n_mask,
    k0,
    K,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """Load and dequantise W[n, k0:k0+BLOCK_K] for BLOCK_N rows n -> fp32 [BLOCK_N, BLOCK_K] * 2**-14
    (exact, without the 2**-14, when DOT_DTYPE is fp16: see DEQ_CORRECTION).

    wb_ptrs: [BLOCK_N, BLOCK_K // 2] byte pointers, ws_ptrs: [BLOCK_N, BLOCK_K // 32] scale pointers,
    both already at column k0 (k0 only bounds the K tail).
    An E2M1 code s|e1 e0|m placed at bits 15|11 10|9 of an fp16 word is exactly its value times 2**-14
    (code 1, the E2M1 subnormal 0.5, lands on the fp16 subnormal 2**-15, which fp16 keeps: no flush to
    zero as fp32 subnormals could suffer). So the decode is pure bit placement (no compare or select),
    then one exact fp16->fp32 conversion; the E8M0 scale 2**(s-127) is built from its bits (s = 0 gives 0 instead
    of 2**-127, s = 255 inf instead of NaN; neither occurs in real checkpoints) and applied per 32
    values. Masked-out bytes and scales read as 0 and dequantise to 0.
    """
    if EVEN_K:
        packed = tl.load(wb_ptrs, mask=n_mask[:, None], other=0)
        scale_bits = tl.load(ws_ptrs, mask=n_mask[:, None], other=0)
    else:
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        ks = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        packed = tl.load(wb_ptrs, mask=n_mask[:, None] & (kb < K // 2)[None, :], other=0)
        scale_bits = tl.load(ws_ptrs, mask=n_mask[:, None] & (ks < K // 32)[None, :], other=0)
    # One 32-bit word per byte holds both fp16 patterns: the low nibble (element 2j) in the low half,
    # the high nibble (element 2j + 1) in the high half. Two multiplies place the magnitude bits
    # (b<<9 | b<<21) and the sign bits (b<<12 | b<<24) without overlap, two masks keep them.
    b = packed.to(tl.uint32)
    word = ((b * 0x200200) & 0x0E000E00) | ((b * 0x1001000) & 0x80008000)
    lo = (word & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (word >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    values = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))
    if DOT_DTYPE == tl.float16:  # fold the 2**14 into the exponent (s > 240, weights beyond 2**113, do not occur)
        scale = ((scale_bits.to(tl.uint32) + 14) << 23).to(tl.float32, bitcast=True)
    else:
        scale = (scale_bits.to(tl.uint32) << 23).to(tl.float32, bitcast=True)
    values = tl.reshape(values, (BLOCK_N, BLOCK_K // 32, 32)) * scale[:, :, None]
    return tl.reshape(values, (BLOCK_N, BLOCK_K))


@triton.jit
def _swiglu(gate, up, limit, alpha):
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    return (up + 1.0) * (gate * tl.sigmoid(alpha * gate))


@triton.jit
def _swiglu_bwd(gate, up, dact, limit, alpha):
    """d/d(gate, up) of _swiglu; the clamps pass the gradient where limit is not exceeded (as torch's
    clamp: inclusive bounds)."""
    gate_c = tl.minimum(gate, limit)
    up_c = tl.minimum(tl.maximum(up, -limit), limit)
    sig = tl.sigmoid(alpha * gate_c)
    glu = gate_c * sig
    d_up = tl.where((up >= -limit) & (up <= limit), dact * glu, 0.0)
    d_gate = dact * (up_c + 1.0) * (sig + alpha * glu * (1.0 - sig))
    d_gate = tl.where(gate <= limit, d_gate, 0.0)
    return d_gate, d_up


@triton.jit
def mxfp4_grouped_matmul_kernel(
    X,
    stride_xm,
    IN_ROWS,
    OUT_ROWS,
    WB,
    stride_wbe,
    stride_wbn,
    WS,
    stride_wse,
    stride_wsn,
    BIAS,
    stride_be,
    XA,
    stride_xam,
    LB,
    stride_lbe,
    stride_lbn,
    stride_lbr,
    lora_scale,
    Y,
    stride_ym,
    ACT,
    stride_am,
    OFFSETS,
    num_rows,
    E,
    N,
    K,
    R,
    limit,
    alpha,
    m_hint,
    E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    R_PAD: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_IN_ROWS: tl.constexpr,
    HAS_OUT_ROWS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    SWIGLU: tl.constexpr,
    STORE_PRE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """Y[p] = X[in_row(p)] @ W[e]ᵀ + bias[e] + lora_scale * XA[p] @ LB[e]ᵀ for the rows p of expert e.

    W[e] is [N, K] in MXFP4 (blocks along K). XA = X·Aᵀ [rows, R] comes precomputed (once per row, by
    grouped_lowrank_kernel), so LoRA costs one [BLOCK_M, R] x [R, BLOCK_N] dot per tile and never
    forms the dense delta. SWIGLU: the N columns interleave gate (even) and up (odd); the tile's
    BLOCK_N / 2 activations go to ACT [rows, N / 2] and, if STORE_PRE, the pre-activations to Y
    (saved for the backward). Otherwise Y[out_row(p)] gets the row (out_row = pair, for the combine).
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(num_rows, BLOCK_M) + E
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _swizzle(pid, num_pid_m, num_pid_n, GROUP_M)
    expert, row_start, row_end = _expert_tile(pid_m, OFFSETS, E, E_PAD, BLOCK_M)
    if expert >= E:
        return
    expert = expert.to(tl.int64)

    rows, row_mask, in_rows = _tile_rows(row_start, row_end, IN_ROWS, BLOCK_M, HAS_IN_ROWS)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    x_ptrs = X + in_rows[:, None] * stride_xm + offs_k[None, :]
    wb_ptrs = WB + expert * stride_wbe + offs_n[:, None].to(tl.int64) * stride_wbn + tl.arange(0, BLOCK_K // 2)[None, :]
    ws_ptrs = (
        WS + expert * stride_wse + offs_n[:, None].to(tl.int64) * stride_wsn + tl.arange(0, BLOCK_K // 32)[None, :]
    )

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=row_mask[:, None], other=0.0)
        else:
            x = tl.load(x_ptrs, mask=row_mask[:, None] & ((k0 + offs_k) < K)[None, :], other=0.0)
        w = _mxfp4_tile(wb_ptrs, ws_ptrs, n_mask, k0, K, BLOCK_N, BLOCK_K, EVEN_K, DOT_DTYPE)
        acc = tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc)
        x_ptrs += BLOCK_K
        wb_ptrs += BLOCK_K // 2
        ws_ptrs += BLOCK_K // 32
    if DOT_DTYPE != tl.float16:
        acc = acc * DEQ_CORRECTION

    bias = tl.load(BIAS + expert * stride_be + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    acc += bias[None, :]
    if HAS_LORA:
        offs_r = tl.arange(0, R_PAD)
        r_mask = offs_r < R
        xa = tl.load(
            XA + rows[:, None].to(tl.int64) * stride_xam + offs_r[None, :],
            mask=row_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        lb = tl.load(
            LB + expert * stride_lbe + offs_n[:, None] * stride_lbn + offs_r[None, :] * stride_lbr,
            mask=n_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        acc += lora_scale * tl.dot(xa.to(DOT_DTYPE), tl.trans(lb.to(DOT_DTYPE)))

    rows64 = rows.to(tl.int64)
    if SWIGLU:
        if STORE_PRE:
            tl.store(
                Y + rows64[:, None] * stride_ym + offs_n[None, :],
                acc.to(Y.dtype.element_ty),
                mask=row_mask[:, None] & n_mask[None, :],
            )
        gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
        act = _swiglu(gate, up, limit, alpha)
        offs_a = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(
            ACT + rows64[:, None] * stride_am + offs_a[None, :],
            act.to(ACT.dtype.element_ty),
            mask=row_mask[:, None] & (offs_a < N // 2)[None, :],
        )
    else:
        out_rows = _mapped_rows(OUT_ROWS, rows, row_mask, HAS_OUT_ROWS)
        tl.store(
            Y + out_rows[:, None] * stride_ym + offs_n[None, :],
            acc.to(Y.dtype.element_ty),
            mask=row_mask[:, None] & n_mask[None, :],
        )


@triton.jit
def mxfp4_grouped_matmul_t_kernel(
    DY,
    stride_dym,
    IN_ROWS,
    ROW_SCALE,
    OUT_ROWS,
    WB,
    stride_wbe,
    stride_wbn,
    WS,
    stride_wse,
    stride_wsn,
    U,
    stride_um,
    LA,
    stride_lae,
    stride_lar,
    stride_lak,
    lora_scale,
    HPRE,
    stride_hm,
    DX,
    stride_dxm,
    OFFSETS,
    num_rows,
    E,
    N,
    K,
    R,
    limit,
    alpha,
    m_hint,
    E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    R_PAD: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_IN_ROWS: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    HAS_OUT_ROWS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    SWIGLU_BWD: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """The backward through an MXFP4 projection: DX[p] = s_p * DY[in_row(p)] @ W[e] + lora_scale * U[p] @ LA[e].

    W[e] is [N, K] with scale blocks along K, and here the contraction runs along N. Each program owns
    BLOCK_K output columns (a multiple of 32, so whole scale blocks) and walks down the N rows of W[e]
    in BLOCK_N steps, reading the same row-major [BLOCK_N, BLOCK_K] MXFP4 tiles as the forward and
    dequantising them in registers: each tile element still sees exactly its own scale, no transposed or
    dense copy of W exists, and the weight bytes read equal the forward's. s_p = ROW_SCALE[p] (the
    routing weight of the row) scales the accumulator row once, after the loop. U = (s_p * DY[in_row]) @ LB[e]
    [rows, R] comes precomputed; LA[e] is LoRA's A [R, K].
    SWIGLU_BWD: DX is the gradient of the SwiGLU output (K = I columns); the epilogue reads the saved
    pre-activations HPRE [rows, 2K] (gate even, up odd) and writes d(pre-activation) [rows, 2K] to DX.
    Otherwise DX[out_row(p)] gets the row.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(num_rows, BLOCK_M) + E
    num_pid_k = tl.cdiv(K, BLOCK_K)
    pid_m, pid_k = _swizzle(pid, num_pid_m, num_pid_k, GROUP_M)
    expert, row_start, row_end = _expert_tile(pid_m, OFFSETS, E, E_PAD, BLOCK_M)
    if expert >= E:
        return
    expert = expert.to(tl.int64)

    rows, row_mask, in_rows = _tile_rows(row_start, row_end, IN_ROWS, BLOCK_M, HAS_IN_ROWS)
    rows64 = rows.to(tl.int64)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    offs_n = tl.arange(0, BLOCK_N)

    dy_ptrs = DY + in_rows[:, None] * stride_dym + offs_n[None, :]
    wb_ptrs = (
        WB
        + expert * stride_wbe
        + offs_n[:, None].to(tl.int64) * stride_wbn
        + (k0 // 2 + tl.arange(0, BLOCK_K // 2))[None, :]
    )
    ws_ptrs = (
        WS
        + expert * stride_wse
        + offs_n[:, None].to(tl.int64) * stride_wsn
        + (k0 // 32 + tl.arange(0, BLOCK_K // 32))[None, :]
    )

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n_mask = (n0 + offs_n) < N
        dy = tl.load(dy_ptrs, mask=row_mask[:, None] & n_mask[None, :], other=0.0)
        w = _mxfp4_tile(wb_ptrs, ws_ptrs, n_mask, k0, K, BLOCK_N, BLOCK_K, False, DOT_DTYPE)
        acc = tl.dot(dy.to(DOT_DTYPE), w.to(DOT_DTYPE), acc)
        dy_ptrs += BLOCK_N
        wb_ptrs += BLOCK_N * stride_wbn
        ws_ptrs += BLOCK_N * stride_wsn
    if DOT_DTYPE != tl.float16:
        acc = acc * DEQ_CORRECTION
    if HAS_ROW_SCALE:
        row_scale = tl.load(ROW_SCALE + rows, mask=row_mask, other=0.0).to(tl.float32)
        acc = acc * row_scale[:, None]
    if HAS_LORA:
        offs_r = tl.arange(0, R_PAD)
        r_mask = offs_r < R
        u = tl.load(
            U + rows64[:, None] * stride_um + offs_r[None, :], mask=row_mask[:, None] & r_mask[None, :], other=0.0
        )
        la = tl.load(
            LA + expert * stride_lae + offs_r[:, None] * stride_lar + offs_k[None, :] * stride_lak,
            mask=r_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        acc += lora_scale * tl.dot(u.to(DOT_DTYPE), la.to(DOT_DTYPE))

    if SWIGLU_BWD:
        # (gate, up) = columns (2k, 2k + 1) of the pre-activations, loaded as [BLOCK_M, BLOCK_K, 2] so
        # each pair is one 4-byte access and the split is free; d(gate, up) is stored the same way.
        offs_pair = 2 * offs_k[None, :, None] + tl.arange(0, 2)[None, None, :]
        hd_mask = (row_mask[:, None] & k_mask[None, :])[:, :, None]
        h = tl.load(HPRE + rows64[:, None, None] * stride_hm + offs_pair, mask=hd_mask, other=0.0)
        gate, up = tl.split(h.to(tl.float32))
        d_gate, d_up = _swiglu_bwd(gate, up, acc, limit, alpha)
        tl.store(
            DX + rows64[:, None, None] * stride_dxm + offs_pair,
            tl.join(d_gate, d_up).to(DX.dtype.element_ty),
            mask=hd_mask,
        )
    else:
        out_rows = _mapped_rows(OUT_ROWS, rows, row_mask, HAS_OUT_ROWS)
        tl.store(
            DX + out_rows[:, None] * stride_dxm + offs_k[None, :],
            acc.to(DX.dtype.element_ty),
            mask=row_mask[:, None] & k_mask[None, :],
        )


@triton.jit
def grouped_lowrank_kernel(
    X,
    stride_xm,
    IN_ROWS,
    ROW_SCALE,
    A,
    stride_ae,
    stride_ar,
    stride_ak,
    OUT,
    stride_om,
    OFFSETS,
    num_rows,
    E,
    K,
    R,
    E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    R_PAD: tl.constexpr,
    HAS_IN_ROWS: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """OUT[p] = s_p * X[in_row(p)] @ A[e]ᵀ -> fp32 [rows, R]: LoRA's x·Aᵀ once per (token, expert).

    A[e] is addressed as [R, K] through strides, so the same kernel computes dY·B (B[e] [K, R] read
    transposed) for the backward. One program per row tile covers all R columns (R is the LoRA rank,
    padded to R_PAD >= 16 for tl.dot) and reads its X rows once.
    """
    pid_m = tl.program_id(0)
    expert, row_start, row_end = _expert_tile(pid_m, OFFSETS, E, E_PAD, BLOCK_M)
    if expert >= E:
        return
    expert = expert.to(tl.int64)
    rows, row_mask, in_rows = _tile_rows(row_start, row_end, IN_ROWS, BLOCK_M, HAS_IN_ROWS)
    rows64 = rows.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R
    x_ptrs = X + in_rows[:, None] * stride_xm + offs_k[None, :]
    a_ptrs = A + expert * stride_ae + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(x.to(DOT_DTYPE), tl.trans(a.to(DOT_DTYPE)), acc)
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K * stride_ak
    if HAS_ROW_SCALE:
        row_scale = tl.load(ROW_SCALE + rows, mask=row_mask, other=0.0).to(tl.float32)
        acc = acc * row_scale[:, None]
    tl.store(OUT + rows64[:, None] * stride_om + offs_r[None, :], acc, mask=row_mask[:, None] & r_mask[None, :])


@triton.jit
def grouped_outer_kernel(
    L,
    stride_lm,
    L_ROWS,
    L_SCALE,
    RT,
    stride_rm,
    OUT,
    stride_oe,
    stride_o1,
    stride_o2,
    OFFSETS,
    E,
    D1,
    D2,
    scale,
    limit,
    alpha,
    BLOCK_M: tl.constexpr,
    BLOCK_D1: tl.constexpr,
    BLOCK_D2: tl.constexpr,
    HAS_L_ROWS: tl.constexpr,
    HAS_L_SCALE: tl.constexpr,
    L_SWIGLU: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """OUT[e] = scale * sum over the rows p of expert e of (s_p L[l_row(p)])ᵀ RT[p] -> fp32 [E, D1, D2].

    The LoRA factor gradients, contractions over an expert's rows with the wide operand on the left and
    the rank-wide one (D2 = r) on the right: dB[e] = s·dYᵀ(X·Aᵀ) and dA[e]ᵀ = s·Xᵀ(dY·B). That keeps the
    wide side as the MMA's M dimension (wgmma needs M = 64 per warpgroup; M = r = 16 fell back to
    mma.sync); OUT's strides may transpose the result on store. L_SWIGLU: L holds the saved gate_up
    pre-activations [rows, 2 * D1] and the SwiGLU output is recomputed on load (so the activation need
    not be kept for the backward). Experts with no rows write zeros.
    """
    pid = tl.program_id(0)
    num_d1 = tl.cdiv(D1, BLOCK_D1)
    num_d2 = tl.cdiv(D2, BLOCK_D2)
    expert = pid // (num_d1 * num_d2)
    rest = pid % (num_d1 * num_d2)
    offs_1 = (rest // num_d2) * BLOCK_D1 + tl.arange(0, BLOCK_D1)
    offs_2 = (rest % num_d2) * BLOCK_D2 + tl.arange(0, BLOCK_D2)
    mask_1 = offs_1 < D1
    mask_2 = offs_2 < D2
    row_lo = tl.load(OFFSETS + expert)
    row_hi = tl.load(OFFSETS + expert + 1)
    acc = tl.zeros((BLOCK_D1, BLOCK_D2), dtype=tl.float32)
    for start in range(row_lo, row_hi, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_hi
        rows64 = rows.to(tl.int64)
        l_rows = _mapped_rows(L_ROWS, rows, row_mask, HAS_L_ROWS)
        l_mask = row_mask[:, None] & mask_1[None, :]
        if L_SWIGLU:
            h_ptrs = L + l_rows[:, None] * stride_lm + 2 * offs_1[None, :]
            gate = tl.load(h_ptrs, mask=l_mask, other=0.0).to(tl.float32)
            up = tl.load(h_ptrs + 1, mask=l_mask, other=0.0).to(tl.float32)
            left = _swiglu(gate, up, limit, alpha)
        else:
            left = tl.load(L + l_rows[:, None] * stride_lm + offs_1[None, :], mask=l_mask, other=0.0)
        if HAS_L_SCALE:
            left = left.to(tl.float32) * tl.load(L_SCALE + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        right = tl.load(
            RT + rows64[:, None] * stride_rm + offs_2[None, :], mask=row_mask[:, None] & mask_2[None, :], other=0.0
        )
        acc = tl.dot(tl.trans(left.to(DOT_DTYPE)), right.to(DOT_DTYPE), acc)
    out_ptrs = OUT + expert.to(tl.int64) * stride_oe + offs_1[:, None] * stride_o1 + offs_2[None, :] * stride_o2
    tl.store(out_ptrs, acc * scale, mask=mask_1[:, None] & mask_2[None, :])


@triton.jit
def combine_kernel(Y, stride_ym, W, OUT, stride_om, H, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """OUT[t] = sum_j W[t, j] * Y[t * TOP_K + j] in fp32 (Y holds the expert outputs in pair order)."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        w = tl.load(W + t * TOP_K + j).to(tl.float32)
        y = tl.load(Y + (t * TOP_K + j) * stride_ym + offs, mask=mask, other=0.0).to(tl.float32)
        acc += w * y
    tl.store(OUT + t * stride_om + offs, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def routing_grad_kernel(
    Y, stride_ym, DOUT, stride_dm, DW, H, TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_H: tl.constexpr
):
    """DW[t, j] = <DOUT[t], Y[t * TOP_K + j]> in fp32: the gradient of the routing weights."""
    t = tl.program_id(0).to(tl.int64)
    offs_j = tl.arange(0, K_PAD)
    j_mask = offs_j < TOP_K
    offs_h = tl.arange(0, BLOCK_H)
    acc = tl.zeros((K_PAD, BLOCK_H), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h_mask = (h0 + offs_h) < H
        d = tl.load(DOUT + t * stride_dm + h0 + offs_h, mask=h_mask, other=0.0).to(tl.float32)
        y = tl.load(
            Y + (t * TOP_K + offs_j)[:, None] * stride_ym + (h0 + offs_h)[None, :],
            mask=j_mask[:, None] & h_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += y * d[None, :]
    tl.store(DW + t * TOP_K + offs_j, tl.sum(acc, 1), mask=j_mask)
