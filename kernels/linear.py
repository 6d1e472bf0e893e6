"""Fused linear + bias + activation: ``y = act(x @ W^T + b)`` forward and backward kernels.

Shapes (2-D views; the autograd layer flattens ``[..., in]`` to ``[M, K]``):
  x ``[M, K]`` (any strides), weight ``[N, K]`` (any strides), bias ``[N]`` (any stride),
  y ``[M, N]`` (contiguous, input dtype).

Forward (``_linear_fwd_kernel``): a tiled GEMM with grouped tile ordering (GROUP_M tile-rows
share the same W tiles while they sit in L2, as in Triton's matmul tutorial), fp32 accumulation
(fp64 for fp64 inputs), then in the epilogue, with the tile still in registers: bias add,
rounding of the pre-activation ``z`` to the input dtype (as torch's ``F.linear`` output), the
activation, and one store of ``y``. When the derivative needs the pre-activation (see below) the
rounded ``z`` is stored too.

What is saved for backward (``saves_preactivation``):
  - the OUTPUT ``y`` where it determines the derivative: relu (``y > 0``), leaky_relu with
    ``negative_slope >= 0`` (``y > 0`` iff ``z > 0``), sigmoid (``y (1 - y)``), tanh (``1 - y^2``);
  - the pre-activation ``z`` where it does not: leaky_relu with ``negative_slope < 0``,
    gelu (erf form), silu;
  - nothing for no activation.

Backward, two paths (``backward_path``):

"fused": ``dZ = dY * act'(.)`` is never written to memory. ``_linear_dx_kernel`` computes
``dX = dZ @ W`` and ``_linear_dw_kernel`` computes ``dW = dZ^T @ X``; both apply the derivative
to the dY tile right after loading it. ``_linear_dw_kernel`` also runs the bias-gradient
programs (a deterministic column sum of dZ over M-chunks, no atomics). When the dW grid has
fewer tiles than the GPU has SMs, the M reduction is split over ``SPLIT`` program slices that
write fp32 partials to a workspace, summed in a fixed order (deterministic split-K) by each
tile's last program to arrive (``arrival``, ``merges_in_kernel``), or, where a tile has more
than ``MERGE_MAX_BYTES`` of partials, by ``_sum_splits_kernel``. A small backward
(``SMALL_MERGE_MACS``) keeps its split to what its tiles merge.

"dz" (on a GPU for large TF32 and 16-bit problems, ``FUSEDMLP_LINEAR_BWD`` overrides): one pass,
``_linear_dz_kernel``, writes dZ (and, for fp32, dZ^T) and per-slice column sums of dZ; then
both GEMMs run through the forward kernel with no bias and no activation, ``dX = dZ @ W`` and
``dW = dZ^T @ X``. Why: the fused kernels feed wgmma its A operand (dZ) from registers, which
splits each K-step into k8 slices with waits between them, and TF32 wgmma reads shared-memory
operands only K-major, while X and W are stored with the reduction dimension outer. The
forward kernel reads both operands from shared memory; fp32 gets K-major copies of W^T, X^T
(``_transpose_kernel``) and dZ^T (16-bit types transpose in wgmma and use views). Where dW's
[N, K] tiles leave SMs idle, its M-deep reduction is split (``dz_dw_split``, ``SPLIT_K``): fp32
partials, summed with the dZ pass's column sums (db) by each tile's last program
(``merges_in_kernel``), else by ``_sum_splits_kernel`` in one launch; on the TMA kernel where
it takes the GEMM (``TMA_SPLIT``, ``_tma_split_depth``), else on the pointer kernel.

TMA forward (``_linear_fwd_tma_kernel``; ``TMA``: fp16/bf16 and TF32 on sm_90+, ``FUSEDMLP_TMA``):
for large GEMMs (``TMA_MIN_MACS``, ``TMA_MIN_WAVES``), the same epilogue behind a persistent
loop over output tiles whose operands arrive by TMA (host descriptors). 16-bit operands may come
in either orientation, so the "dz" path's dX and dW GEMMs take it too; TF32 takes K-major
operands only (x [M, K] and W [N, K] with unit stride along K: the "dz" path's fp32 copies
are). Operands TMA cannot read (a row stride or address not 16-byte aligned, no unit stride)
keep the pointer kernel. TF32 forward GEMMs that feed a batch norm make its statistics in the
TMA epilogue (``linear_forward_stats``); 16-bit ones leave them to a pass of their own.

Activations are a ``tl.constexpr`` string: "none", "relu", "leaky_relu", "sigmoid", "tanh",
"gelu" (erf form), "silu"; ``negative_slope`` is a runtime argument.
All offsets are computed in int64.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# aliased: ``acc_dtype`` is a local name inside kernels below
from .. import _env
from ..backend import acc_dtype as host_acc_dtype
from .arrival import arrival_counters, last_arrival
from .batchnorm import _merge_splits, _store_final
from .dropout import dropout_scale, scale_arg, tile_keep
from .launch import (
    Tma,
    cdiv,
    dot_precision,
    flat_grid,
    flat_tile_ids,
    is_interpreted,
    launch,
    on_device,
    row_splits,
    sm_count,
    worth_tuning,
)

KERNEL_ACTIVATIONS = ("none", "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "silu")


def saves_preactivation(activation: str, negative_slope: float) -> bool:
    """Whether the backward needs the pre-activation ``z`` (else the output ``y`` or nothing)."""
    return activation in ("gelu", "silu") or (activation == "leaky_relu" and negative_slope < 0)


def saves_output(activation: str, negative_slope: float) -> bool:
    """Whether the backward reads the derivative from the saved output ``y``."""
    return activation != "none" and not saves_preactivation(activation, negative_slope)


# --------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped ordering: consecutive programs walk GROUP_M tile-rows column by column."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _sigmoid(z):
    # torch's formula (CPU and CUDA): exp(-z) overflows to +inf below about -88.72 (fp32),
    # where the result is 0 as torch's, not the subnormal that exp(z) / (1 + exp(z)) gives. The
    # difference shows through the backward: dY = inf times torch's y = 0 (sigmoid; silu's
    # sigmoid) is NaN. No inf / inf arises; a NaN z stays NaN.
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _tanh(z):
    # libdevice.tanh does not run under the interpreter; (1 - e) / (1 + e) with e = exp(-2|z|)
    # loses relative accuracy near 0, where an odd Taylor polynomial (error < 1e-10 relative
    # for |z| < 0.3) takes over.
    a = tl.abs(z)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(z < 0, -t, t)
    z2 = z * z
    p = -0.0014558343870513183  # -929569/638512875
    p = p * z2 + 0.003592128036572481  # 21844/6081075
    p = p * z2 - 0.008863235529902197  # -1382/155925
    p = p * z2 + 0.021869488536155203  # 62/2835
    p = p * z2 - 0.05396825396825397  # -17/315
    p = p * z2 + 0.13333333333333333  # 2/15
    p = p * z2 - 0.3333333333333333  # -1/3
    p = z + z * (p * z2)
    return tl.where(a < 0.3, p, t)


@triton.jit
def _activation(z, negative_slope, ACTIVATION: tl.constexpr):
    """act(z) in z's (fp32/fp64) precision."""
    if ACTIVATION == "relu":
        y = tl.where(z < 0, 0.0, z)  # NaN stays NaN, as torch.relu
    elif ACTIVATION == "leaky_relu":
        y = tl.where(z > 0, z, z * negative_slope)
    elif ACTIVATION == "sigmoid":
        y = _sigmoid(z)
    elif ACTIVATION == "tanh":
        y = _tanh(z)
    elif ACTIVATION == "gelu":
        y = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACTIVATION == "silu":
        y = z * _sigmoid(z)
    else:
        y = z
    return y


@triton.jit
def _activation_grad(dy, t, negative_slope, ACTIVATION: tl.constexpr):
    """dZ from dY and the saved tensor ``t`` (output y or pre-activation z, see module doc).

    ``_T_PAD``: the backward kernels load masked-off lanes of ``t`` as 1.0 (dY as 0.0), where
    every derivative here gives dZ = 0. With ``t = 0`` leaky_relu's ``0 * negative_slope`` is
    NaN for an infinite or NaN slope (torch takes both), and the padded lanes' NaN would reach
    dX, dW and db through the GEMMs and column sums."""
    if ACTIVATION == "relu":  # t = y; a NaN output passes the gradient, as torch's relu
        dz = tl.where(t <= 0, 0.0, dy)
    elif ACTIVATION == "leaky_relu":  # t = y (slope >= 0) or z (slope < 0): same test
        dz = tl.where(t > 0, dy, dy * negative_slope)
    elif ACTIVATION == "sigmoid":  # t = y
        dz = dy * t * (1.0 - t)
    elif ACTIVATION == "tanh":  # t = y
        dz = dy * (1.0 - t * t)
    elif ACTIVATION == "gelu":  # t = z
        cdf = 0.5 * (1.0 + tl.erf(t * 0.7071067811865476))
        pdf = tl.exp(-0.5 * t * t) * 0.3989422804014327
        dz = dy * (cdf + t * pdf)
    elif ACTIVATION == "silu":  # t = z
        s = _sigmoid(t)
        dz = dy * (s * (1.0 + t * (1.0 - s)))
    else:
        dz = dy
    return dz


@triton.jit
def _dot_operand(t, INTERPRET: tl.constexpr):
    # Under the interpreter, tl.dot on bf16 is wrong and fp16 accumulates in numpy fp16:
    # upcast 16-bit tiles to fp32 there (exact products, fp32 accumulation as on the GPU).
    if INTERPRET:
        if t.dtype == tl.bfloat16 or t.dtype == tl.float16:
            t = t.to(tl.float32)
    return t


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["scale"])
def _linear_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    z_ptr,
    seed_ptr,
    pmean_ptr,
    pm2_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_b,
    negative_slope,
    p,
    scale,
    k_split,
    split_stride,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    SAVE_Z: tl.constexpr,
    DROPOUT: tl.constexpr,
    STATS: tl.constexpr,
    FP64: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SPLIT_K: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y[M, N] = act(x[M, K] @ w[N, K]^T + b[N]); z (pre-activation) stored when SAVE_Z;
    with ``DROPOUT`` y = dropout(act(...)) (``_fwd_epilogue``). With ``STATS`` (no activation,
    no dropout) also the batch-norm partial statistics of y's columns over this tile's rows
    (``_fwd_epilogue``): pmean, pm2 ``[cdiv(M, BLOCK_M), N]`` in the accumulator dtype.

    ``SPLIT_K`` (the dz backward's dW GEMM, ``_dz_dw_gemm``; 0 = no split): program (i, s)
    reduces only ``K`` from ``s * k_split`` to ``(s + 1) * k_split`` (a multiple of BLOCK_K)
    and stores its raw fp32 partial tile at ``y + s * split_stride`` (no bias, no activation).
    With ``SPLIT_K == 2`` (``merges_in_kernel``) the last of a tile's programs to arrive
    (``arrival``) sums the tile's partials in split order into the final dW at ``z_ptr`` ([M,
    N], its dtype), as ``_sum_splits_kernel`` does in a launch of its own (``SPLIT_K == 1``);
    the tiles of column block 0 also sum db's ``stride_b`` rows of column sums at ``pm2_ptr``
    ([stride_b, M] fp32, the dZ pass's) into db at ``pmean_ptr`` ([M]). The arrival counters
    are at ``b_ptr`` (int32, one per tile). These roles take the pointers and the integer that
    the split's GEMM leaves unused: no bias, no pre-activation, no statistics. Without a split
    grid axis 1 has one program and ``k_split``, ``split_stride`` are unused."""
    pid = tl.program_id(0)
    pid_m, pid_n = _grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrapped indices keep every load in bounds without an M/N mask (rows past M are recomputed
    # copies, never stored).
    am = (rm % M).to(tl.int64)
    bn = (rn % N).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    rk64 = rk.to(tl.int64)
    x_ptrs = x_ptr + am[:, None] * stride_xm + rk64[None, :] * stride_xk
    w_ptrs = w_ptr + rk64[:, None] * stride_wk + bn[None, :] * stride_wn
    x_step = tl.cast(stride_xk, tl.int64) * BLOCK_K
    w_step = tl.cast(stride_wk, tl.int64) * BLOCK_K
    depth = K
    if SPLIT_K:
        k_lo = tl.program_id(1).to(tl.int64) * k_split
        x_ptrs += k_lo * stride_xk
        w_ptrs += k_lo * stride_wk
        depth = tl.minimum(K - k_lo, k_split).to(tl.int32)
    if FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(depth, BLOCK_K)):
        k_left = depth - k * BLOCK_K
        a = tl.load(x_ptrs, mask=rk[None, :] < k_left, other=0.0)
        b = tl.load(w_ptrs, mask=rk[:, None] < k_left, other=0.0)
        acc = tl.dot(
            _dot_operand(a, INTERPRET),
            _dot_operand(b, INTERPRET),
            acc,
            input_precision=DOT_PRECISION,
            out_dtype=acc.dtype,  # triton 3.6 asserts an fp64 accumulator gets fp64 out
        )
        x_ptrs += x_step
        w_ptrs += w_step
    if SPLIT_K:
        offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
        mask = (rm < M)[:, None] & (rn < N)[None, :]
        part = y_ptr + tl.program_id(1).to(tl.int64) * split_stride
        tl.store(part + offs, acc, mask=mask)
        if SPLIT_K == 2 and last_arrival(b_ptr + pid, tl.num_programs(1)):
            _merge_tile(y_ptr, z_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N, M, N, split_stride,
                        tl.num_programs(1), BLOCK_M, BLOCK_N)  # fmt: skip
            if (stride_b > 0) & (pid_n == 0):  # db: the column sums' rows, [stride_b, M]
                _sum_partials(pm2_ptr, pmean_ptr, rm, rm < M, M, stride_b)
    else:
        _fwd_epilogue(acc, rm, rn, bn, pid_m, pid_n, b_ptr, y_ptr, z_ptr, seed_ptr, pmean_ptr,
                      pm2_ptr, M, N, stride_b, negative_slope, p, scale, HAS_BIAS, ACTIVATION,
                      SAVE_Z, DROPOUT, STATS, FP64, BLOCK_N)  # fmt: skip


@triton.jit
def _fwd_epilogue(acc, rm, rn, bn, pid_m, pid_n, b_ptr, y_ptr, z_ptr, seed_ptr, pmean_ptr,
                  pm2_ptr, M, N, stride_b, negative_slope, p, scale, HAS_BIAS: tl.constexpr,
                  ACTIVATION: tl.constexpr, SAVE_Z: tl.constexpr, DROPOUT: tl.constexpr,
                  STATS: tl.constexpr, FP64: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """The forward kernels' epilogue on the accumulator tile of rows ``rm`` and columns ``rn``
    (``bn``: the columns wrapped into [0, N), int64; tile column ``pid_n``): bias, rounding to
    the output dtype, activation, with ``DROPOUT`` the dropout mask of the seed at ``seed_ptr``
    (``p``, ``scale = 1/(1-p)``; N % 16 == 0: ``dropout_epilogue_applies``), and the masked stores
    of ``z`` (SAVE_Z) and ``y`` (contiguous [M, N]).

    The dropout is ``fused_block``'s ``act_dropout`` on this output, to the bit: the activation
    rounded to the output dtype, times ``keep ? scale : 0`` (fp32; fp64 for fp64), rounded
    again, with the mask of element ``m * N + n`` (``dropout.tile_keep``).

    ``STATS``: the output as a batch norm that follows reads it (rounded to its dtype) gives
    each column's mean and M2 (sum of squared deviations from that mean, two passes over the
    registers) over the tile's rows below M, stored at row ``pid_m`` of pmean and pm2 [*, N]:
    the splits ``batchnorm._bn_stats_final_kernel`` merges, ``BLOCK_M`` rows each. The batch
    norm's own statistics pass over y (a read of [M, N]) and its launch are not needed.
    ``STATS == 2``: the final statistics too, with no merge launch: the last of a column
    block's programs to arrive (``arrival``; counters at ``seed_ptr``, int32, one per column
    block) merges every split's partials of its columns in a fixed order
    (``batchnorm._merge_splits``) and stores the mean, invstd (``negative_slope`` is eps) and
    unbiased variance at rows 0, 1, 2 of ``z_ptr`` ([3, N] in the accumulator dtype), as the
    merge kernel does (the running statistics stay the batch norm's own: its forward pass
    updates them). The statistics roles take the pointers and the float that an epilogue
    without activation, dropout or pre-activation leaves unused."""
    if HAS_BIAS:
        bias = tl.load(b_ptr + bn * stride_b)
        acc += bias.to(acc.dtype)[None, :]
    out_offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    out_mask = (rm < M)[:, None] & (rn < N)[None, :]
    z = acc.to(y_ptr.dtype.element_ty)  # torch rounds F.linear's output before the activation
    if SAVE_Z:
        tl.store(z_ptr + out_offs, z, mask=out_mask)
    if ACTIVATION == "none":
        y = z
    else:
        y = _activation(z.to(acc.dtype), negative_slope, ACTIVATION).to(y_ptr.dtype.element_ty)
    if DROPOUT:
        keep = tile_keep(seed_ptr, rm.to(tl.int64)[:, None], pid_n, N, p, True, BLOCK_N // 4)
        y = y.to(acc.dtype) * tl.where(keep, dropout_scale(scale, FP64), 0.0)
        y = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + out_offs, y, mask=out_mask)
    if STATS:
        row_mask = (rm < M)[:, None]
        rows = tl.minimum(M - pid_m * rm.shape[0], rm.shape[0]).to(acc.dtype)
        yf = tl.where(row_mask, y.to(acc.dtype), 0.0)
        mean = tl.sum(yf, 0) / rows
        d = tl.where(row_mask, yf - mean[None, :], 0.0)
        m2 = tl.sum(d * d, 0)
        stat_offs = pid_m.to(tl.int64) * N + rn
        tl.store(pmean_ptr + stat_offs, mean.to(pmean_ptr.dtype.element_ty), mask=rn < N)
        tl.store(pm2_ptr + stat_offs, m2.to(pm2_ptr.dtype.element_ty), mask=rn < N)
        if STATS == 2:
            n_split = tl.cdiv(M, rm.shape[0])
            if last_arrival(seed_ptr + pid_n, n_split):
                cmask = rn < N
                mean, m2 = _merge_splits(pmean_ptr, pm2_ptr, rn, cmask, M, N, n_split,
                                         rm.shape[0], acc.dtype, BLOCK_N, 16)  # fmt: skip
                _store_final(z_ptr, z_ptr + N, z_ptr + 2 * N, z_ptr, z_ptr, z_ptr, rn, cmask,
                             mean, m2, M, negative_slope, 0.0, 0.0, False, False, FP64,
                             BLOCK_N)  # fmt: skip


@triton.jit
def _linear_fwd_tma_kernel(
    x_desc,
    w_desc,
    b_ptr,
    y_ptr,
    z_ptr,
    seed_ptr,
    pmean_ptr,
    pm2_ptr,
    M,
    N,
    K,
    stride_b,
    negative_slope,
    k_split,
    split_stride,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    SAVE_Z: tl.constexpr,
    STATS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    X_T: tl.constexpr,
    W_T: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr,
):
    """``_linear_fwd_kernel`` for operands read by TMA, persistent (``TMA``, on by default).

    ``x_desc``: a host TMA descriptor over x [M, K] (block [BLOCK_M, BLOCK_K]), or with ``X_T``
    over its transpose's storage [K, M] (block [BLOCK_K, BLOCK_M]); ``w_desc`` likewise over
    weight [N, K] ([BLOCK_N, BLOCK_K]) or, with ``W_T``, over weight^T's storage [K, N]
    ([BLOCK_K, BLOCK_N]). Both fp16, both bf16, or both fp32 with ``DOT_PRECISION`` "tf32" and
    neither transposed (TF32 wgmma reads K-major operands only); last stride 1, 16-byte aligned
    base and row stride. y, z, bias and what the backward saves: as ``_linear_fwd_kernel``.
    ``STATS`` (fp32 only; no activation): the batch-norm statistics of y's columns as
    ``_linear_fwd_kernel``'s ``STATS`` makes them, partials per ``BLOCK_M`` rows at pmean, pm2
    and with ``STATS == 2`` the final [3, N] at z (counters at ``seed_ptr``, eps in
    ``negative_slope``): the same epilogue, on each half of the tile's columns in turn, so that
    the column reductions beside the accumulator do not spill.

    ``SPLIT_K == 2`` (the dz backward's dW GEMM, ``_dz_dw_gemm``, when its tiles alone leave
    SMs idle; no bias, activation or statistics): the work items are (tile, slice) pairs,
    slice ``s`` reducing K from ``s * k_split`` to ``(s + 1) * k_split`` (a multiple of
    BLOCK_K); each stores its raw fp32 partial at ``y + s * split_stride`` and the last of a
    tile's items to arrive sums them in slice order into dW at ``z_ptr`` (and db from the
    column sums), with the roles and arrival counters of ``_linear_fwd_kernel``'s
    ``SPLIT_K == 2``: the same sums, the same bits, whichever kernel ran the slices.

    NUM_SMS programs each walk the output tiles ``start, start + NUM_SMS, ...``; the flattened
    loop lets the pipeliner issue the next tile's first loads while this tile's epilogue runs.
    TMA zero-fills reads past the tensor's end, so the K loop has no mask. The next tile's
    operand buffers stay live during the epilogue, so the shared memory its stores' layout
    conversion takes adds to the pipeline's (``_TMA_CONFIGS``).
    """
    start = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    # The epilogue recomputes its tile from its own counter: a value used both before and
    # after the flattened inner loop defeats its pipelining (Triton's persistent matmul).
    tile_c = start - NUM_SMS
    num_items = num_tiles
    n_split = 1
    if SPLIT_K:
        n_split = tl.cdiv(K, k_split)
        num_items = num_tiles * n_split
    # An arrival (a barrier, an atomic, a branch) in the epilogue (STATS == 2, SPLIT_K == 2)
    # defeats the flattened loop's pipelining (sm_90, triton 3.9: the K loop then ran
    # unpipelined, 64 KiB of shared memory); unflattened, the K loop pipelines (72 KiB for 3
    # stages) and only the next tile's first loads wait for the epilogue. Registers: 255, no
    # spills with triton 3.6, 16 bytes of stack with 3.9.
    for item in tl.range(start, num_items, NUM_SMS, flatten=(STATS != 2) and (SPLIT_K != 2)):
        tile = item
        k_lo = 0
        k_hi = k_tiles
        if SPLIT_K:
            tile = item // n_split
            k_lo = (item % n_split) * (k_split // BLOCK_K)
            k_hi = tl.minimum(k_lo + k_split // BLOCK_K, k_tiles)
        pid_m, pid_n = _grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_lo, k_hi):
            off_k = ki * BLOCK_K
            if X_T:
                a = tl.trans(x_desc.load([off_k, off_m]))
            else:
                a = x_desc.load([off_m, off_k])
            if W_T:
                b = w_desc.load([off_k, off_n])
            else:
                b = tl.trans(w_desc.load([off_n, off_k]))
            acc = tl.dot(
                _dot_operand(a, INTERPRET),
                _dot_operand(b, INTERPRET),
                acc,
                input_precision=DOT_PRECISION,
            )
        tile_c += NUM_SMS
        tile_e = tile_c
        if SPLIT_K:
            tile_e = tile_c // n_split
        pid_m, pid_n = _grouped_tile(tile_e, num_pid_m, num_pid_n, GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # No dropout here: with its mask, the 128 x 256 tiles spill (``linear_forward``)
        if SPLIT_K:
            offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
            mask = (rm < M)[:, None] & (rn < N)[None, :]
            part = y_ptr + (tile_c % n_split).to(tl.int64) * split_stride
            tl.store(part + offs, acc, mask=mask)
            if last_arrival(b_ptr + tile_e, n_split):
                _merge_tile(y_ptr, z_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N, M, N, split_stride,
                            n_split, BLOCK_M, BLOCK_N)  # fmt: skip
                if (stride_b > 0) & (pid_n == 0):  # db: the column sums' rows, [stride_b, M]
                    _sum_partials(pm2_ptr, pmean_ptr, rm, rm < M, M, stride_b)
        elif STATS:
            # Two column halves, each a column block of its own for the statistics' arrival
            # counters (``pid_n`` in units of BLOCK_N // 2)
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            acc0, acc1 = tl.split(halves)
            rn0 = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
            rn1 = rn0 + BLOCK_N // 2
            _fwd_epilogue(acc0, rm, rn0, (rn0 % N).to(tl.int64), pid_m, 2 * pid_n, b_ptr, y_ptr,
                          z_ptr, seed_ptr, pmean_ptr, pm2_ptr, M, N, stride_b, negative_slope,
                          0.0, 1.0, HAS_BIAS, ACTIVATION, False, False, STATS, False,
                          BLOCK_N // 2)  # fmt: skip
            _fwd_epilogue(acc1, rm, rn1, (rn1 % N).to(tl.int64), pid_m, 2 * pid_n + 1, b_ptr,
                          y_ptr, z_ptr, seed_ptr, pmean_ptr, pm2_ptr, M, N, stride_b,
                          negative_slope, 0.0, 1.0, HAS_BIAS, ACTIVATION, False, False, STATS,
                          False, BLOCK_N // 2)  # fmt: skip
        else:
            _fwd_epilogue(acc, rm, rn, (rn % N).to(tl.int64), pid_m, pid_n, b_ptr, y_ptr, z_ptr,
                          y_ptr, y_ptr, y_ptr, M, N, stride_b, negative_slope, 0.0, 1.0,
                          HAS_BIAS, ACTIVATION, SAVE_Z, False, 0, False, BLOCK_N)  # fmt: skip


@triton.jit
def _linear_dx_kernel(
    dy_ptr,
    t_ptr,
    w_ptr,
    dx_ptr,
    M,
    N,
    K,
    stride_dym,
    stride_dyn,
    stride_tm,
    stride_tn,
    stride_wn,
    stride_wk,
    negative_slope,
    ACTIVATION: tl.constexpr,
    FP64: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dx[M, K] = (dy * act'(t))[M, N] @ w[N, K]; the reduction runs over N. One program per
    ``[BLOCK_M, BLOCK_K]`` tile of dx."""
    _dx_tile(
        dy_ptr, t_ptr, w_ptr, dx_ptr, M, N, K, stride_dym, stride_dyn, stride_tm, stride_tn,
        stride_wn, stride_wk, negative_slope, tl.program_id(0),
        ACTIVATION, FP64, DOT_PRECISION, INTERPRET, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
    )  # fmt: skip


@triton.jit
def _dx_tile(
    dy_ptr, t_ptr, w_ptr, dx_ptr, M, N, K, stride_dym, stride_dyn, stride_tm, stride_tn,
    stride_wn, stride_wk, negative_slope, tile,
    ACTIVATION: tl.constexpr, FP64: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """Tile ``tile`` ([BLOCK_M, BLOCK_K], grouped order) of dx = (dy * act'(t)) @ w."""
    pid_m, pid_k = _grouped_tile(tile, tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    am = (rm % M).to(tl.int64)
    bk = (rk % K).to(tl.int64)
    rn = tl.arange(0, BLOCK_N)
    rn64 = rn.to(tl.int64)
    dy_ptrs = dy_ptr + am[:, None] * stride_dym + rn64[None, :] * stride_dyn
    t_ptrs = t_ptr + am[:, None] * stride_tm + rn64[None, :] * stride_tn
    w_ptrs = w_ptr + rn64[:, None] * stride_wn + bk[None, :] * stride_wk
    dy_step = tl.cast(stride_dyn, tl.int64) * BLOCK_N
    t_step = tl.cast(stride_tn, tl.int64) * BLOCK_N
    w_step = tl.cast(stride_wn, tl.int64) * BLOCK_N
    if FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n in range(0, tl.cdiv(N, BLOCK_N)):
        n_left = N - n * BLOCK_N
        dy = tl.load(dy_ptrs, mask=rn[None, :] < n_left, other=0.0)
        if ACTIVATION == "none":
            dz = dy.to(w_ptr.dtype.element_ty)
        else:
            t = tl.load(t_ptrs, mask=rn[None, :] < n_left, other=1.0)  # _T_PAD
            dz = _activation_grad(dy.to(acc.dtype), t.to(acc.dtype), negative_slope, ACTIVATION)
            dz = dz.to(w_ptr.dtype.element_ty)  # torch's dZ is in the input dtype too
        w = tl.load(w_ptrs, mask=rn[:, None] < n_left, other=0.0)
        acc = tl.dot(
            _dot_operand(dz, INTERPRET),
            _dot_operand(w, INTERPRET),
            acc,
            input_precision=DOT_PRECISION,
            out_dtype=acc.dtype,  # triton 3.6 asserts an fp64 accumulator gets fp64 out
        )
        dy_ptrs += dy_step
        t_ptrs += t_step
        w_ptrs += w_step
    out_offs = rm.to(tl.int64)[:, None] * K + rk[None, :]
    out_mask = (rm < M)[:, None] & (rk < K)[None, :]
    tl.store(dx_ptr + out_offs, acc.to(dx_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _linear_dw_kernel(
    dy_ptr,
    t_ptr,
    x_ptr,
    dw_ptr,
    db_ptr,
    w_ptr,
    dx_ptr,
    cnt_ptr,
    M,
    N,
    K,
    stride_dym,
    stride_dyn,
    stride_tm,
    stride_tn,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    split_stride,
    negative_slope,
    SPLIT,
    COMPUTE_DB: tl.constexpr,
    DX: tl.constexpr,
    MERGE: tl.constexpr,
    ACTIVATION: tl.constexpr,
    FP64: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dw[N, K] = (dy * act'(t))^T @ x and db[N] = column sums of dy * act'(t).

    Grid ``(num_dx + num_db + num_dw_tiles, SPLIT)``: with ``DX`` (SPLIT == 1 only) the first
    ``num_dx`` programs compute dx's ``[BLOCK_M, BLOCK_K]`` tiles as ``_linear_dx_kernel`` (a
    small backward's two GEMMs in one launch: the launch, not the GPU, sets its time); then
    ``num_db = cdiv(N, BLOCK_N)`` programs (when COMPUTE_DB) sum dZ over M for one block of
    columns; the others compute one ``[BLOCK_N, BLOCK_K]`` tile of dW. Slice ``s`` of axis 1
    handles the s-th contiguous chunk of M-blocks and stores at ``+ s * split_stride`` (SPLIT >
    1: fp32 partials in a workspace; SPLIT == 1: the final dw/db, split_stride 0).

    ``MERGE`` (SPLIT > 1, so never with DX): the last of a block's SPLIT programs to arrive
    (``arrival``, counter ``cnt_ptr[pid]`` of the db/dW numbering) sums the block's partials in
    split order, as ``_sum_splits_kernel`` does in a launch of its own, into the final dW
    ``[N, K]`` at ``dx_ptr`` and db ``[N]`` at ``w_ptr``: the pointers only DX reads (one
    kernel argument less at every launch: host time).
    """
    pid = tl.program_id(0)
    # A constexpr branch: without DX the dX code is not compiled at all (its tiles, in the dW
    # configurations' shapes, would claim shared memory of their own)
    if DX:
        num_dx = tl.cdiv(M, BLOCK_M) * tl.cdiv(K, BLOCK_K)
        if pid < num_dx:
            _dx_tile(
                dy_ptr, t_ptr, w_ptr, dx_ptr, M, N, K, stride_dym, stride_dyn, stride_tm,
                stride_tn, stride_wn, stride_wk, negative_slope, pid,
                ACTIVATION, FP64, DOT_PRECISION, INTERPRET, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
            )  # fmt: skip
        else:
            _dw_db_program(
                dy_ptr, t_ptr, x_ptr, dw_ptr, db_ptr, dx_ptr, w_ptr, cnt_ptr, M, N, K,
                stride_dym, stride_dyn, stride_tm, stride_tn, stride_xm, stride_xk,
                split_stride, negative_slope, SPLIT, pid - num_dx,
                COMPUTE_DB, MERGE, ACTIVATION, FP64, DOT_PRECISION, INTERPRET, BLOCK_M,
                BLOCK_N, BLOCK_K, GROUP_M,
            )  # fmt: skip
    else:
        _dw_db_program(
            dy_ptr, t_ptr, x_ptr, dw_ptr, db_ptr, dx_ptr, w_ptr, cnt_ptr, M, N, K,
            stride_dym, stride_dyn, stride_tm, stride_tn, stride_xm, stride_xk, split_stride,
            negative_slope, SPLIT, pid,
            COMPUTE_DB, MERGE, ACTIVATION, FP64, DOT_PRECISION, INTERPRET, BLOCK_M, BLOCK_N,
            BLOCK_K, GROUP_M,
        )  # fmt: skip


@triton.jit
def _dw_db_program(
    dy_ptr, t_ptr, x_ptr, dw_ptr, db_ptr, out_w_ptr, out_b_ptr, cnt_ptr, M, N, K, stride_dym,
    stride_dyn, stride_tm, stride_tn, stride_xm, stride_xk, split_stride, negative_slope, SPLIT,
    pid, COMPUTE_DB: tl.constexpr, MERGE: tl.constexpr, ACTIVATION: tl.constexpr,
    FP64: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """Program ``pid`` of ``_linear_dw_kernel``'s db and dW programs (split ``program_id(1)``)."""
    pid_s = tl.program_id(1)
    num_mb = tl.cdiv(M, BLOCK_M)
    per_split = tl.cdiv(num_mb, SPLIT)
    mb_start = pid_s * per_split
    mb_end = tl.minimum(mb_start + per_split, num_mb)
    split_off = pid_s.to(tl.int64) * split_stride
    if COMPUTE_DB:
        num_db = tl.cdiv(N, BLOCK_N)
    else:
        num_db = 0
    if pid < num_db:
        _dw_kernel_db_part(
            dy_ptr, t_ptr, db_ptr, M, N, stride_dym, stride_dyn, stride_tm, stride_tn,
            negative_slope, pid, mb_start, mb_end, split_off,
            ACTIVATION, FP64, BLOCK_M, BLOCK_N,
        )  # fmt: skip
        if MERGE:
            if last_arrival(cnt_ptr + pid, SPLIT):
                rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
                _sum_partials(db_ptr, out_b_ptr, rn, rn < N, split_stride, SPLIT)
    else:
        tile = pid - num_db
        _dw_kernel_gemm_part(
            dy_ptr, t_ptr, x_ptr, dw_ptr, M, N, K, stride_dym, stride_dyn, stride_tm, stride_tn,
            stride_xm, stride_xk, negative_slope, tile, mb_start, mb_end, split_off,
            ACTIVATION, FP64, DOT_PRECISION, INTERPRET, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
        )  # fmt: skip
        if MERGE:
            if last_arrival(cnt_ptr + pid, SPLIT):
                pid_n, pid_k = _grouped_tile(
                    tile, tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP_M
                )
                _merge_tile(dw_ptr, out_w_ptr, pid_n * BLOCK_N, pid_k * BLOCK_K, N, K,
                            split_stride, SPLIT, BLOCK_N, BLOCK_K)  # fmt: skip


@triton.jit
def _sum_partials(ws_ptr, out_ptr, offs, mask, split_stride, SPLIT):
    """``out[offs] = sum over s < SPLIT of ws[s * split_stride + offs]``, in split order, read
    past L1 (``.cg``: in a merge by the last program, other SMs wrote them), rounded to out's
    dtype. Every merge of split partials sums with it, in the kernel or in a launch of its
    own (``_sum_splits_kernel``): the same order, the same bits."""
    total = tl.load(ws_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
    for s in range(1, SPLIT):
        part = ws_ptr + s * tl.cast(split_stride, tl.int64)
        total += tl.load(part + offs, mask=mask, other=0.0, cache_modifier=".cg")
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _merge_tile(ws_ptr, out_ptr, row0, col0, R, C, split_stride, SPLIT,
                ROWS: tl.constexpr, COLS: tl.constexpr):  # fmt: skip
    """The last program's merge of a ``[ROWS, COLS]`` tile at ``(row0, col0)`` of a row-major
    ``[R, C]`` output: ``out = sum over s of ws[s * split_stride + ...]`` in split order,
    rounded to out's dtype. In slices of 32 rows: a whole fp32 tile beside the loads took 128
    registers a thread more and spilled (sm_90, 128 x 128 tiles: 300-1400 bytes of stack)."""
    SUB: tl.constexpr = ROWS if ROWS < 32 else 32
    cols = col0 + tl.arange(0, COLS)
    for i in range(0, ROWS, SUB):
        rows = row0 + i + tl.arange(0, SUB)
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        mask = (rows < R)[:, None] & (cols < C)[None, :]
        _sum_partials(ws_ptr, out_ptr, offs, mask, split_stride, SPLIT)


@triton.jit
def _dw_kernel_db_part(
    dy_ptr, t_ptr, db_ptr, M, N, stride_dym, stride_dyn, stride_tm, stride_tn,
    negative_slope, pid, mb_start, mb_end, split_off,
    ACTIVATION: tl.constexpr, FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Bias gradient: a column sum of dZ over M-blocks [mb_start, mb_end), in a fixed order."""
    if FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    bn = (rn % N).to(tl.int64)
    rm = mb_start * BLOCK_M + tl.arange(0, BLOCK_M)
    dy_ptrs = dy_ptr + rm.to(tl.int64)[:, None] * stride_dym + bn[None, :] * stride_dyn
    t_ptrs = t_ptr + rm.to(tl.int64)[:, None] * stride_tm + bn[None, :] * stride_tn
    dy_step = tl.cast(stride_dym, tl.int64) * BLOCK_M
    t_step = tl.cast(stride_tm, tl.int64) * BLOCK_M
    colsum = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    for mb in range(mb_start, mb_end):
        m_mask = (mb * BLOCK_M + tl.arange(0, BLOCK_M)) < M
        dy = tl.load(dy_ptrs, mask=m_mask[:, None], other=0.0).to(acc_dtype)
        if ACTIVATION == "none":
            dz = dy
        else:
            t = tl.load(t_ptrs, mask=m_mask[:, None], other=1.0).to(acc_dtype)  # _T_PAD
            dz = _activation_grad(dy, t, negative_slope, ACTIVATION)
            # torch rounds dZ to the input dtype before its reduction
            dz = dz.to(dy_ptr.dtype.element_ty).to(acc_dtype)
        colsum += dz
        dy_ptrs += dy_step
        t_ptrs += t_step
    db = tl.sum(colsum, axis=0)
    tl.store(db_ptr + split_off + rn, db.to(db_ptr.dtype.element_ty), mask=rn < N)


@triton.jit
def _dw_kernel_gemm_part(
    dy_ptr, t_ptr, x_ptr, dw_ptr, M, N, K, stride_dym, stride_dyn, stride_tm, stride_tn,
    stride_xm, stride_xk, negative_slope, tile, mb_start, mb_end, split_off,
    ACTIVATION: tl.constexpr, FP64: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_N, BLOCK_K] tile of dW over M-blocks [mb_start, mb_end)."""
    if FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    pid_n, pid_k = _grouped_tile(tile, tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    bn = (rn % N).to(tl.int64)
    bk = (rk % K).to(tl.int64)
    rm = mb_start * BLOCK_M + tl.arange(0, BLOCK_M)
    rm64 = rm.to(tl.int64)
    # dZ^T tile [BLOCK_N, BLOCK_M] and x tile [BLOCK_M, BLOCK_K]
    dy_ptrs = dy_ptr + bn[:, None] * stride_dyn + rm64[None, :] * stride_dym
    t_ptrs = t_ptr + bn[:, None] * stride_tn + rm64[None, :] * stride_tm
    x_ptrs = x_ptr + rm64[:, None] * stride_xm + bk[None, :] * stride_xk
    dy_step = tl.cast(stride_dym, tl.int64) * BLOCK_M
    t_step = tl.cast(stride_tm, tl.int64) * BLOCK_M
    x_step = tl.cast(stride_xm, tl.int64) * BLOCK_M
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=acc_dtype)
    for mb in range(mb_start, mb_end):
        m_mask = (mb * BLOCK_M + tl.arange(0, BLOCK_M)) < M
        dy = tl.load(dy_ptrs, mask=m_mask[None, :], other=0.0)
        if ACTIVATION == "none":
            dz = dy.to(x_ptr.dtype.element_ty)
        else:
            t = tl.load(t_ptrs, mask=m_mask[None, :], other=1.0)  # _T_PAD
            dz = _activation_grad(dy.to(acc_dtype), t.to(acc_dtype), negative_slope, ACTIVATION)
            dz = dz.to(x_ptr.dtype.element_ty)
        x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        acc = tl.dot(
            _dot_operand(dz, INTERPRET),
            _dot_operand(x, INTERPRET),
            acc,
            input_precision=DOT_PRECISION,
            out_dtype=acc.dtype,  # triton 3.6 asserts an fp64 accumulator gets fp64 out
        )
        dy_ptrs += dy_step
        t_ptrs += t_step
        x_ptrs += x_step
    out_offs = split_off + rn.to(tl.int64)[:, None] * K + rk[None, :]
    out_mask = (rn < N)[:, None] & (rk < K)[None, :]
    tl.store(dw_ptr + out_offs, acc.to(dw_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _linear_dz_kernel(
    dy_ptr,
    t_ptr,
    dz_ptr,
    dzt_ptr,
    ws_ptr,
    M,
    N,
    stride_dym,
    stride_dyn,
    stride_tm,
    stride_tn,
    rows_per_split,
    negative_slope,
    ACTIVATION: tl.constexpr,
    WRITE_DZ: tl.constexpr,
    WRITE_DZT: tl.constexpr,
    WRITE_SUMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dZ = dY * act'(t) for the "dz" backward path.

    Grid ``(n_split, cdiv(N, BLOCK_N))``, flat (``flat_grid``; n_split =
    ``cdiv(M, rows_per_split)``): program (s, j) walks rows
    ``[s * rows_per_split, (s + 1) * rows_per_split)`` of columns ``[j * BLOCK_N, ...)`` in
    ``[BLOCK_M, BLOCK_N]`` tiles.
    dy, t: ``[M, N]``, any strides, the input dtype (t: the saved output or pre-activation,
    see ``saves_preactivation``; unread for "none"). dZ is rounded to ``dz_ptr``'s dtype (the
    input dtype, as torch's dZ) and stored, when asked, to dz ``[M, N]`` contiguous and to
    dzt ``[N, M]`` contiguous; ws ``[n_split, N]`` fp32 gets each slice's column sums of the
    rounded dZ (summed in a fixed order: deterministic).
    """
    pid_s, pid_n = flat_tile_ids(tl.cdiv(M, rows_per_split))
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rn64 = rn.to(tl.int64)
    row0 = pid_s * rows_per_split
    row_end = tl.minimum(row0 + rows_per_split, M)
    colsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(row0, row_end, BLOCK_M):
        rm = start + tl.arange(0, BLOCK_M)
        rm64 = rm.to(tl.int64)
        mask = (rm < row_end)[:, None] & n_mask[None, :]
        dy = tl.load(
            dy_ptr + rm64[:, None] * stride_dym + rn64[None, :] * stride_dyn, mask=mask, other=0.0
        )
        if ACTIVATION == "none":
            dz = dy.to(dz_ptr.dtype.element_ty)
        else:
            t = tl.load(
                t_ptr + rm64[:, None] * stride_tm + rn64[None, :] * stride_tn, mask=mask, other=1.0
            )  # _T_PAD
            dz = _activation_grad(dy.to(tl.float32), t.to(tl.float32), negative_slope, ACTIVATION)
            dz = dz.to(dz_ptr.dtype.element_ty)
        if WRITE_DZ:
            tl.store(dz_ptr + rm64[:, None] * N + rn64[None, :], dz, mask=mask)
        if WRITE_DZT:
            tl.store(dzt_ptr + rn64[None, :] * M + rm64[:, None], dz, mask=mask)
        if WRITE_SUMS:
            colsum += tl.sum(dz.to(tl.float32), axis=0)
    if WRITE_SUMS:
        tl.store(ws_ptr + pid_s.to(tl.int64) * N + rn, colsum, mask=n_mask)


@triton.jit
def _sum_splits_kernel(ws_ptr, wsb_ptr, dw_ptr, db_ptr, NK, NB, SPLIT, SPLIT_B, stride_w, stride_b,
                       BLOCK: tl.constexpr):  # fmt: skip
    """dw.flat[i] = sum_s ws[s, i] (i < NK, s < SPLIT); db[j] = sum_p wsb[p, j] (j < NB,
    p < SPLIT_B): one launch over the NK + NB outputs.

    ``ws`` fp32 (fp64 for fp64 gradients) rows of ``stride_w`` elements, ``wsb`` rows of
    ``stride_b`` (the fused backward's workspace: ``[SPLIT, NK + NB]`` with wsb its column NK
    on; the dz path's: the dW GEMM's ``[SPLIT, NK]`` partials, then the dZ pass's
    ``[SPLIT_B, NB]`` column sums). Each sum runs over the splits in order (deterministic).
    NK = 0 when only db is wanted, NB = 0 when only dw.
    """
    pid = tl.program_id(0)
    lo = pid.to(tl.int64) * BLOCK
    offs = lo + tl.arange(0, BLOCK)
    if lo < NK:
        _sum_partials(ws_ptr, dw_ptr, offs, offs < NK, stride_w, SPLIT)
    if lo + BLOCK > NK:
        j = offs - NK
        _sum_partials(wsb_ptr, db_ptr, j, (j >= 0) & (j < NB), stride_b, SPLIT_B)


@triton.jit
def _transpose_kernel(x_ptr, y_ptr, M, K, stride_xm, stride_xk, BLOCK_M: tl.constexpr,
                      BLOCK_K: tl.constexpr):  # fmt: skip
    """y = x^T, contiguous: x ``[M, K]`` (any strides, any dtype), y ``[K, M]`` contiguous in
    x's dtype. Nothing is saved: the "dz" backward's K-major copies of X and W for TF32 wgmma.

    One program per BLOCK_M x BLOCK_K tile (a flat grid, ``flat_grid``): loaded along x's rows
    and stored along y's, the tile's layout converted between the two in shared memory, so
    that a row-major x is read and y written in full runs (torch's ``x.t().contiguous()``
    walks one of the two with a stride of a whole row). int64 offsets.
    """
    pid_m, pid_k = flat_tile_ids(tl.cdiv(M, BLOCK_M))
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    tile = tl.load(
        x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
        mask=(rm[:, None] < M) & (rk[None, :] < K),
    )
    tl.store(
        y_ptr + rk[:, None] * M + rm[None, :],
        tl.trans(tile),
        mask=(rk[:, None] < K) & (rm[None, :] < M),
    )


# --------------------------------------------------------------------------------------------
# configurations
# --------------------------------------------------------------------------------------------


# Tiles as (rows, cols, depth) of each kernel's own GEMM: the output tile is rows x cols and the
# loop walks depth. Forward: (M, N, K); dX = dZ W: (M, K, N); dW = dZ^T X: (N, K, M).
_TILE_NAMES = {
    "fwd": ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
    "dx": ("BLOCK_M", "BLOCK_K", "BLOCK_N"),
    "dw": ("BLOCK_N", "BLOCK_K", "BLOCK_M"),
}
# 16-bit inputs (wgmma; sizes from the Triton matmul tutorial's H100 list). Shared memory on
# sm_90 is stages x (rows + cols) x depth x 2 bytes: 147 KiB for the largest, < 227 KiB.
_TILES_16 = [
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    # 4 stages: 192 KiB of shared memory, one more K-step of loads in flight per tile
    (128, 256, 64, 8, 4),
    (256, 128, 64, 8, 4),
    (128, 128, 64, 8, 4),
    (128, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (128, 128, 32, 4, 4),
    (64, 128, 32, 4, 4),
]
# The backward GEMMs also hold the dZ operand and the derivative's inputs in registers: the
# 256-row and 4-warp 128x128 tiles spill there for relu or gelu (sm_90 cubins, compiled with
# the JIT's argument specialization); 128 x 256 x 64 with 8 warps does not (204-255 registers
# for none/relu/gelu, dX and dW).
_TILES_16_BWD = [
    (128, 128, 64, 8, 4),
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (128, 128, 32, 8, 4),
    (64, 128, 32, 4, 4),
    (128, 256, 64, 8, 3),
]
# fp32 (IEEE FMA dot, or TF32 wgmma): 4-byte elements, so shallower tiles.
_TILES_32 = [
    (128, 128, 32, 8, 3),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (64, 64, 32, 4, 4),
    (128, 128, 16, 8, 4),
]
# TF32 only: 128 x 256 x 16 with 8 warps compiles without spills for the forward, dX and dW
# with wgmma (178-250 registers); the IEEE FMA dot spills there.
_TILES_32_TF32 = _TILES_32 + [(128, 256, 16, 8, 4)]
# The forward kernel (also both GEMMs of the "dz" backward) with 32-deep TF32 tiles: half the
# barriers and wgmma issue rounds per FLOP of the 16-deep one; 182-188 registers, no spills
# (sm_90, triton 3.9). The fused dX/dW kernels spill with them (72-96 bytes of stack).
# 128 x 256 x 32 with 3 stages won every GEMM of issue 8's step on the H100 (seventeenth
# session), at about 80% of cuBLAS's backward GEMMs' speed; the same tile with 4 stages (192 KiB
# of shared memory, one more K-step of loads in flight, as the 16-bit list has) is the
# autotuner's to try: 250-254 registers and no spills at the step's signatures (sm_90, triton
# 3.6 and 3.9), not yet timed.
_TILES_32_TF32_FWD = _TILES_32_TF32 + [
    (128, 256, 32, 8, 3),
    (256, 128, 32, 8, 3),
    (128, 256, 32, 8, 4),
]
# fp64 (only under backend "triton", e.g. gradcheck): one small config, no autotuning.
_TILES_64 = [(32, 32, 16, 4, 2)]
_INTERPRET_TILE = (16, 16, 16, 4, 2)
# Below ``worth_tuning``'s size: the smallest tile of each list (more programs for the few
# output tiles a small GEMM has), launched without autotuning.
_SMALL_TILES = {4: (64, 64, 32, 4, 4), 2: (64, 64, 64, 4, 4), 8: _TILES_64[0]}


def _cfg(kind: str, tile, group: int = 8) -> triton.Config:
    rows, cols, depth, warps, stages = tile
    kw = dict(zip(_TILE_NAMES[kind], (rows, cols, depth)))
    kw["GROUP_M"] = group
    return triton.Config(kw, num_warps=warps, num_stages=stages)


_SUM_CONFIGS = [triton.Config({"BLOCK": 1024}, num_warps=4, num_stages=1)]
_SUM_INTERPRET = triton.Config({"BLOCK": 64}, num_warps=4, num_stages=1)


@functools.cache
def _configs(kind: str, dtype: torch.dtype, precision: str):
    """(GPU configurations, autotune key, interpreter configuration, the configuration of a
    GEMM too small to tune) of kernel ``kind`` for ``dtype`` and the dot ``precision``
    (``dot_precision``).

    ``launch`` caches one autotuner per (kernel, key): the key's order differs per dtype group
    so that each group gets its own autotuner over its own configuration list.
    """
    if dtype == torch.float64:
        tiles, key = _TILES_64, ("M", "N", "K")  # one config: launched without autotuning
    elif dtype == torch.float32:
        if precision == "tf32":
            tiles = _TILES_32_TF32_FWD if kind == "fwd" else _TILES_32_TF32
        else:
            tiles = _TILES_32
        key = ("K", "N", "M")
    else:
        tiles, key = (_TILES_16 if kind == "fwd" else _TILES_16_BWD), ("M", "N", "K")
    configs = [_cfg(kind, t) for t in tiles]
    small = configs[tiles.index(_SMALL_TILES[dtype.itemsize])]
    return configs, key, _cfg(kind, _INTERPRET_TILE, group=2), small


def _launch_configs(kind: str, dtype: torch.dtype, precision: str, M: int, N: int, K: int):
    """``launch``'s configuration arguments for kernel ``kind`` of an ``[M, N, K]`` problem."""
    configs, key, interpret_config, small = _configs(kind, dtype, precision)
    return dict(
        configs=configs,
        key=key,
        interpret_config=interpret_config,
        small_config=small,
        work=M * N * K,
        gemm=True,
    )


@functools.cache
def _combined_config(dtype: torch.dtype, precision: str) -> triton.Config:
    """The configuration of a combined small backward (``_linear_dw_kernel`` with ``DX``): the
    dW kernel's small tile, with 8 warps and 2 stages. With 4 warps the dX branch beside dW's
    spills on sm_90 (bf16 64 x 64 x 64: 472-688 bytes of stack for relu, gelu and silu, with 2
    or 4 stages); with 8 warps and 2 stages no activation, dtype or precision spills (120-255
    registers; triton 3.9)."""
    small = _configs("dw", dtype, precision)[3]
    return triton.Config(dict(small.kwargs), num_warps=8, num_stages=2)


def dw_split(M: int, N: int, K: int, device: torch.device) -> int:
    """How many M-slices the dW/db reduction is split into (1 = no workspace).

    Splits only when the dW grid (at a nominal tile size) leaves SMs idle and M is long.
    Under the interpreter a nominal 16x16 tile and 4 "SMs" exercise the split path in tests.
    """
    if device.type == "cuda":
        sms, tile, rows = sm_count(device), 128, 512
    else:
        sms, tile, rows = 4, 16, 32
    tiles = max(1, cdiv(N, tile) * cdiv(K, tile))
    if tiles >= sms:
        return 1
    return max(1, min(cdiv(sms, tiles), cdiv(M, rows), 32))


# A split dW's partials are merged by each tile's last program (``arrival``) when a tile's
# partials take at most this many bytes; else by ``_sum_splits_kernel``, a launch of its own.
# The last program reads them all on one SM (on the order of 100 GB/s: 512 KiB in ~5 us,
# while the other tiles' merges run on other SMs); the merge launch spreads its read over the
# whole GPU but costs a launch's host time (~20 us on the GPU machines' hosts) and its own
# kernel. The bench's w1024 TF32 dW (4 slices of 64 KiB tiles, 256 KiB) merges in the kernel;
# a 256-wide bf16 dW at batch 64K (32 slices, 2 MiB; above ``SMALL_MERGE_MACS``, which caps
# a smaller one's split) keeps the launch. Not yet timed on a GPU:
# ``FUSEDMLP_MERGE_MAX_BYTES`` (read once; tests set the attribute) moves the line.
MERGE_MAX_BYTES = _env.byte_count("FUSEDMLP_MERGE_MAX_BYTES", 512 * 1024)


def _partials_per_tile(N: int, K: int, device: torch.device) -> int:
    """Bytes of one slice's fp32 partial of an ``[N, K]`` dW tile, at the nominal tile: 128 x
    128 (16 x 16 under the interpreter)."""
    tile = 128 if device.type == "cuda" else 16
    return min(N, tile) * min(K, tile) * 4


def merges_in_kernel(split: int, N: int, K: int, device: torch.device) -> bool:
    """Whether a dW split in ``split`` slices over ``[N, K]`` is merged by its tiles' last
    programs."""
    return split > 1 and split * _partials_per_tile(N, K, device) <= MERGE_MAX_BYTES


# Up to this many multiply-adds a split dW keeps to the slices its tiles' last programs merge
# (``merged_split_cap``): on a GPU such a backward is host-bound (issue 3's 16384 x 256 x 256
# bf16: 0.149 ms of events against tens of microseconds of kernels, H100), so one launch
# less outweighs longer slices (256 x 256 over 16K rows: 8 slices of 2048 rows, not 32 of 512).
SMALL_MERGE_MACS = 2**31


def merged_split_cap(N: int, K: int, device: torch.device) -> int:
    """The most slices of an ``[N, K]`` dW that ``merges_in_kernel`` merges in the kernel (no
    cap, a large number, where it merges none)."""
    cap = MERGE_MAX_BYTES // max(1, _partials_per_tile(N, K, device))
    return cap if cap >= 2 else 1 << 30


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


# The TMA forward (``_linear_fwd_tma_kernel``), read once (tests set the attributes): large
# 16-bit and TF32 GEMMs take it on sm_90+ (``FUSEDMLP_TMA=0`` turns it off, ``FUSEDMLP_TMA=16``
# keeps it to 16-bit GEMMs, the default up to the nineteenth session). Two H100 runs, triton 3.6
# (benchmarks/RESULTS.md): bf16 8192^3 forward 1.22x and 1.14x the pointer kernel (0.98x and
# 0.91x torch.mm), 16384x4096x4096 1.15x and 1.13x; the TF32 16384x1024x1024 layer 1.03x in
# one run and 0.80x in the other, 1.03x forward and 1.17x backward in a third. The whole step
# (``kernel_times.py``, an H200, twentieth session): 2.36 ms of kernels with TF32 on TMA against
# 2.57 without, its TMA GEMMs 0.111 ms each against the pointer kernel's 0.157, even with the
# batch statistics then launched apart (the TMA epilogue makes them since).
_TMA_ENV = _env.choice("FUSEDMLP_TMA", ("0", "16", "1"), "1")
TMA = _TMA_ENV != "0"
TMA_TF32 = _TMA_ENV not in ("0", "16")
# From this many multiply-adds up (every dimension >= TMA_MIN_DIM): building the two
# descriptors costs ~9 us of host time a launch (CPU stand-in), hidden behind a GEMM of 2^34
# multiply-adds (~50 us at 700 TFLOPS) but not behind a small one.
TMA_MIN_MACS = 2**34
TMA_MIN_DIM = 16
# And only when its 128 x 256 output tiles fill this many waves of the persistent programs
# (one per SM): the TF32 backward's dW GEMM, 1024 x 1024 outputs over K = 16384, is 32 tiles
# for 132 SMs, and ran 0.68x the pointer kernel (whose smaller tiles fill the SMs) on an H100.
TMA_MIN_WAVES = 1
# A dW whose output tiles leave SMs idle (the dz path's, ``_dz_dw_gemm``) runs on the TMA
# kernel in K slices its last programs merge (``_tma_split_depth``) rather than on the pointer
# kernel's split; ``FUSEDMLP_TMA_SPLIT=0`` keeps it there. Not timed on a GPU yet (twenty-first
# session): the TMA GEMM of the step's forward took 0.111 ms against the pointer kernel's 0.157
# (H200), and the dW GEMMs, the same 2^34 multiply-adds, are four of the step's seven pointer
# GEMMs.
TMA_SPLIT = _env.switch("FUSEDMLP_TMA_SPLIT")


# 128 x 256 tiles (the Triton tutorials' H100 choice for 16-bit GEMMs), autotuned over the
# pipeline depth only (the descriptors' block shape is fixed before the launch: ``launch.Tma``).
# sm_90 shared memory (triton 3.9, the epilogue's included): 16-bit 64-deep, 176 KiB for 3
# stages, 224 KiB for 4. fp32 32-deep needs 272 KiB for 3 stages (the epilogue converts a
# 128 KiB fp32 tile); a subtiled epilogue fits but spills 232 bytes of registers: 16-deep.
_TMA_CONFIGS = {
    2: [_cfg("fwd", (128, 256, 64, 8, 3)), _cfg("fwd", (128, 256, 64, 8, 4))],
    4: [_cfg("fwd", (128, 256, 16, 8, 3)), _cfg("fwd", (128, 256, 16, 8, 4))],
}
# The interpreter: small tiles, and 3 "SMs", so that every program walks several tiles.
_TMA_INTERPRET = _cfg("fwd", (16, 32, 16, 4, 2), group=2)
# With the statistics epilogue: the 128 rows of a statistics split (``stats_rows``).
_TMA_STATS_INTERPRET = _cfg("fwd", (128, 32, 16, 4, 2), group=2)
_TMA_INTERPRET_PROGRAMS = 3


@functools.cache
def _tma_capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def _tma_programs(device: torch.device) -> int:
    """The persistent TMA kernel's programs: one per SM (3 under the interpreter)."""
    return sm_count(device) if device.type == "cuda" else _TMA_INTERPRET_PROGRAMS


def _tma_operand(t: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """``(view, transposed)``: the 2-D ``t`` itself (last stride 1) or its transpose (first
    stride 1) as TMA reads it, or None where TMA cannot (an unaligned address or row stride,
    rows that overlap)."""
    if t.stride(1) == 1:
        view, transposed = t, False
    elif t.stride(0) == 1:
        view, transposed = t.t(), True
    else:
        return None
    rows = view.stride(0)  # rows of a broadcast (0) or overlapping view: no TMA tensor map
    if view.data_ptr() % 16 or (rows * view.element_size()) % 16 or rows < view.shape[1]:
        return None
    return view, transposed


def _tma_operands(x: torch.Tensor, weight: torch.Tensor, M: int, N: int, K: int, precision: str,
                  waves: bool = True):  # fmt: skip
    """The ``_tma_operand`` pair of x and weight when the TMA forward takes this problem
    (``waves=False``: however few its output tiles, for a K-split launch)."""
    if not TMA:
        return None
    tf32 = x.dtype == torch.float32 and precision == "tf32"
    if not ((tf32 and TMA_TF32) or x.dtype in (torch.float16, torch.bfloat16)):
        return None
    if min(M, N, K) < TMA_MIN_DIM or M * N * K < TMA_MIN_MACS:
        return None
    device = x.device  # not CUDA: the interpreter
    if device.type == "cuda" and not _tma_capable(device.index if device.index is not None else 0):
        return None
    if waves and not _fills_waves(M, N, device):
        return None
    xa, wa = _tma_operand(x), _tma_operand(weight)
    if xa is None or wa is None or (tf32 and (xa[1] or wa[1])):
        return None
    return xa, wa


def _tma_tile() -> dict:
    """The TMA kernel's tile constexprs (its configurations' 128 x 256, or the
    interpreter's)."""
    return _TMA_INTERPRET.kwargs if _INTERPRETED[0] else _TMA_CONFIGS[2][0].kwargs


def _tma_tiles(M: int, N: int) -> int:
    """The TMA kernel's output tiles over [M, N]."""
    tile = _tma_tile()
    return cdiv(M, tile["BLOCK_M"]) * cdiv(N, tile["BLOCK_N"])


def _fills_waves(M: int, N: int, device: torch.device) -> bool:
    """Whether the TMA kernel's output tiles over [M, N] fill ``TMA_MIN_WAVES`` waves of its
    persistent programs (``_tma_operands``'s wave rule)."""
    return _tma_tiles(M, N) >= TMA_MIN_WAVES * _tma_programs(device)


def _tma_split_depth(M: int, N: int, K: int, device: torch.device) -> int:
    """The K depth of each slice when the TMA kernel runs an [M, N] dW over a K-deep reduction
    in slices (``SPLIT_K == 2``), or 0 where it should not: as many slices as make the
    tiles fill the persistent programs once (32 tiles of 128 x 256 on 132 SMs: 4 slices), each
    over at least 1024 rows (32 interpreted), no more than the last programs merge
    (``MERGE_MAX_BYTES`` of partials a tile), a multiple of 64 (every configuration's BLOCK_K,
    the interpreter's too)."""
    tile = _tma_tile()
    # CPU tensors run under the interpreter (tests' interpreter_splits: the CPU rule on a GPU)
    rows = 32 if _INTERPRETED[0] or device.type != "cuda" else 1024
    cap = MERGE_MAX_BYTES // (tile["BLOCK_M"] * tile["BLOCK_N"] * 4)
    split = min(_tma_programs(device) // _tma_tiles(M, N), K // rows, cap, 16)
    if split < 2:
        return 0
    depth = cdiv(cdiv(K, split), 64) * 64
    return depth if cdiv(K, depth) > 1 else 0


def _dropout_args(seed: torch.Tensor | None, p: float, y: torch.Tensor) -> dict:
    """The pointer kernel's dropout arguments: ``seed`` (one-element int64 tensor) or None."""
    return dict(
        seed_ptr=seed if seed is not None else y,
        p=float(p),
        scale=scale_arg(p, y.dtype) if seed is not None else 1.0,
        DROPOUT=seed is not None,
    )


def _stats_roles(stats, z, seed, negative_slope):
    """``(z, seed, negative_slope, STATS)`` of a forward GEMM launch with the statistics
    epilogue's ``stats`` (``linear_forward_stats``: the partials ``(pmean, pm2)``, or with the
    final statistics ``(pmean, pm2, out, counters, eps)``, whose roles take z's and the seed's
    pointers and the slope's float: ``_fwd_epilogue``, STATS == 2) or None."""
    if stats is None:
        return z, seed, negative_slope, 0
    if len(stats) > 2:
        return stats[2], stats[3], stats[4], 2
    return z, seed, negative_slope, 1


def _linear_forward_tma(operands, bias, y, z, activation, negative_slope, M, N, K, precision,
                        stats=None, split=None):  # fmt: skip
    """``linear_forward`` through ``_linear_fwd_tma_kernel`` (``operands``: ``_tma_operands``);
    ``stats``: ``_launch_forward``'s (the statistics epilogue, fp32 only). ``split``: ``(depth,
    counters, sums)`` for the dz path's dW over K slices of ``depth`` (``SPLIT_K == 2``, y the
    fp32 partials [cdiv(K, depth), M * N], z the dW; ``sums``: ``_dz_dw_gemm``'s db column sums
    or None)."""
    (xv, x_t), (wv, w_t) = operands
    programs = _tma_programs(xv.device)
    z, seed, negative_slope, stats_mode = _stats_roles(stats, z, y, negative_slope)
    pmean, pm2 = stats[:2] if stats is not None else (y, y)
    b_ptr, stride_b = (bias, bias.stride(0)) if bias is not None else (y, 0)
    k_split, slices = K, 1
    if split is not None:  # the merge's roles (the kernel's docstring)
        k_split, b_ptr, sums = split
        slices = cdiv(K, k_split)
        if sums is not None:
            pmean, pm2, stride_b = sums[1], sums[0], sums[2]
    grid = lambda meta: (
        min(programs, cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]) * slices),
    )
    with on_device(xv):
        launch(
            _linear_fwd_tma_kernel,
            grid,
            configs=_TMA_CONFIGS[xv.element_size()],
            key=("M", "N", "K"),
            interpret_config=_TMA_INTERPRET if stats is None else _TMA_STATS_INTERPRET,
            work=M * N * K,
            gemm=True,
            tma=("x_desc", "w_desc"),
            x_desc=Tma(xv, ("BLOCK_K", "BLOCK_M") if x_t else ("BLOCK_M", "BLOCK_K")),
            w_desc=Tma(wv, ("BLOCK_K", "BLOCK_N") if w_t else ("BLOCK_N", "BLOCK_K")),
            b_ptr=b_ptr,
            y_ptr=y,
            z_ptr=z if z is not None else y,
            seed_ptr=seed,
            pmean_ptr=pmean,
            pm2_ptr=pm2,
            M=M,
            N=N,
            K=K,
            stride_b=stride_b,
            negative_slope=float(negative_slope),
            k_split=k_split,
            split_stride=M * N if split is not None else 0,
            HAS_BIAS=bias is not None,
            ACTIVATION=activation,
            SAVE_Z=z is not None and stats_mode != 2 and split is None,
            STATS=stats_mode,
            SPLIT_K=0 if split is None else 2,
            X_T=x_t,
            W_T=w_t,
            DOT_PRECISION=precision,
            NUM_SMS=programs,
        )


def linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    negative_slope: float,
    out_shape: tuple[int, ...] | None = None,
    seed: torch.Tensor | None = None,
    p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``y = act(x @ weight^T + bias)`` for a 2-D ``x [M, K]`` (any strides); with ``seed`` (a
    one-element int64 tensor) ``y = dropout(act(...), p)`` in the epilogue, the mask of
    ``fusedmlp.kernels.dropout``'s stream over y's row-major elements (``_fwd_epilogue``).

    Returns ``(y, z)``: ``y [M, N]`` contiguous in x's dtype (allocated directly with shape
    ``out_shape`` when given, e.g. ``[..., N]``, so that it is not a view); ``z`` the
    pre-activation (same shape and dtype, before dropout) when ``saves_preactivation(activation,
    negative_slope)``, else None.
    """
    M, K = x.shape
    N = weight.shape[0]
    save_z = saves_preactivation(activation, negative_slope)
    y = torch.empty(out_shape or (M, N), device=x.device, dtype=x.dtype)
    z = torch.empty_like(y) if save_z else None
    if M == 0 or N == 0:
        return y, z
    precision = dot_precision(x.dtype)
    configs = _launch_configs("fwd", x.dtype, precision, M, N, K)
    if seed is None:
        operands = _tma_operands(x, weight, M, N, K, precision)
        if operands is not None:
            _linear_forward_tma(
                operands, bias, y, z, activation, negative_slope, M, N, K, precision
            )
            return y, z
    else:
        if N % DROPOUT_EPILOGUE_N:
            raise ValueError(
                f"linear_forward: the dropout epilogue takes N % {DROPOUT_EPILOGUE_N} == 0, "
                f"got N = {N}"
            )
        configs["configs"] = _dropout_configs(x.dtype, precision)
    _launch_forward(x, weight, bias, y, z, activation, negative_slope, precision, configs,
                    _dropout_args(seed, p, y))  # fmt: skip
    return y, z


@functools.cache
def _stats_configs(dtype: torch.dtype, precision: str) -> tuple[list, triton.Config, int]:
    """(configurations, small configuration, BLOCK_M) of the forward GEMM with the statistics
    epilogue: the forward list's configurations of one row count (``BLOCK_M`` = 128 on a GPU:
    the rows of one statistics split, which the merge must know; the fp64 list's one
    configuration: 32); the small one (below tuning size) is the list's 128 x 64 tile.

    16-bit: only 128 x 128 x 64 with 8 warps. The column reductions beside the accumulator
    spill the others on sm_90 (triton 3.9): 128 x 256 x 64 (8 warps) 624 bytes of stack,
    128 x 128 x 64 (4 warps) 1152, 128 x 64 x 64 (4 warps) 376, 128 x 128 x 32 (4 warps) 16.
    fp32 (IEEE and TF32): every 128-row tile compiles without spills (128-255 registers)."""
    configs = _configs("fwd", dtype, precision)[0]
    rows = _stats_gpu_rows(dtype)
    same = [c for c in configs if c.kwargs["BLOCK_M"] == rows]
    if dtype.itemsize == 2:
        same = [c for c in same if c.num_warps == 8 and c.kwargs["BLOCK_N"] <= 128]
    small = next((c for c in same if c.kwargs["BLOCK_N"] == 64), same[0])
    return same, small, rows


# Under the interpreter the statistics epilogue runs 128-row tiles too: the rows of a split are
# then the same as a GPU's, whichever configuration of the list a test forces.
_STATS_INTERPRET = _cfg("fwd", (128, 16, 16, 4, 2), group=2)


def _stats_gpu_rows(dtype: torch.dtype) -> int:
    return 32 if dtype == torch.float64 else 128  # the fp64 list's one tile has 32 rows


def stats_rows(x: torch.Tensor) -> int:
    """The rows of one statistics split that ``linear_forward_stats`` writes for input ``x``
    (its configurations' BLOCK_M; the interpreter's tile, 128, under the interpreter)."""
    if _INTERPRETED[0]:
        return _STATS_INTERPRET.kwargs["BLOCK_M"]
    return _stats_gpu_rows(x.dtype)


# Whether the kernels run under the interpreter (fixed at import, as the kernels' own type).
_INTERPRETED = (is_interpreted(_linear_fwd_kernel),)


def linear_forward_stats(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float | None = None
) -> tuple[torch.Tensor, tuple | None]:
    """``(y, stats)``: ``y = x @ weight^T + bias`` as ``linear_forward(x, weight, bias, "none",
    0.0)``, and ``stats = (pmean, pm2, rows)`` from the same launch's epilogue: the batch-norm
    partial statistics of y's columns (``_fwd_epilogue``), each ``[cdiv(M, rows), N]`` in the
    accumulation dtype (fp32; fp64 for fp64), for ``batchnorm.batch_norm_stats_merge``. With
    ``eps``, ``stats = final``: ``[3, N]`` in that dtype, y's batch mean, invstd (``1 /
    sqrt(biased var + eps)``) and unbiased variance per column, merged in the same launch by
    each column block's last program (no merge launch; the running statistics are not
    touched). None (y alone) where the TMA kernel runs a 16-bit GEMM (its 128 x 256 tiles spill
    with the column reductions) or y is empty.
    """
    M, K = x.shape
    N = weight.shape[0]
    precision = dot_precision(x.dtype)
    operands = _tma_operands(x, weight, M, N, K, precision) if M and N else None
    if M == 0 or N == 0 or (operands is not None and x.dtype != torch.float32):
        return linear_forward(x, weight, bias, "none", 0.0)[0], None
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    rows = stats_rows(x)
    acc = host_acc_dtype(x.dtype)
    pmean = torch.empty((cdiv(M, rows), N), device=x.device, dtype=acc)
    pm2 = torch.empty_like(pmean)
    final = None
    if eps is not None:
        final = torch.empty((3, N), device=x.device, dtype=acc)
        # one counter per column block of the smallest tile's 16 columns
        stats = (pmean, pm2, final, arrival_counters(x.device, cdiv(N, 16)), float(eps))
    else:
        stats = (pmean, pm2)
    if operands is not None:  # TF32 on TMA: the statistics in its epilogue too
        _linear_forward_tma(operands, bias, y, None, "none", 0.0, M, N, K, precision, stats)
    else:
        configs = _launch_configs("fwd", x.dtype, precision, M, N, K)
        configs["configs"], configs["small_config"], _ = _stats_configs(x.dtype, precision)
        configs["interpret_config"] = _STATS_INTERPRET
        _launch_forward(x, weight, bias, y, None, "none", 0.0, precision, configs,
                        _dropout_args(None, 0.0, y), stats)  # fmt: skip
    return y, (final if final is not None else (pmean, pm2, rows))


def _launch_forward(x, weight, bias, y, z, activation, negative_slope, precision, configs,
                    dropout: dict, stats=None) -> None:  # fmt: skip
    """``_linear_fwd_kernel`` over y's tiles (``linear_forward``, ``linear_forward_stats``)."""
    M, K = x.shape
    N = weight.shape[0]
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
    # ``dropout``: a fresh ``_dropout_args`` dict, given the seed role's pointer in place
    z, dropout["seed_ptr"], negative_slope, stats_mode = _stats_roles(
        stats, z, dropout["seed_ptr"], negative_slope
    )
    with on_device(x):
        launch(
            _linear_fwd_kernel,
            grid,
            **configs,
            x_ptr=x,
            w_ptr=weight,
            b_ptr=bias if bias is not None else y,
            y_ptr=y,
            z_ptr=z if z is not None else y,
            pmean_ptr=stats[0] if stats is not None else y,
            pm2_ptr=stats[1] if stats is not None else y,
            M=M,
            N=N,
            K=K,
            stride_xm=x.stride(0),
            stride_xk=x.stride(1),
            stride_wn=weight.stride(0),
            stride_wk=weight.stride(1),
            stride_b=bias.stride(0) if bias is not None else 0,
            negative_slope=float(negative_slope),
            k_split=0,
            split_stride=0,
            HAS_BIAS=bias is not None,
            ACTIVATION=activation,
            SAVE_Z=z is not None and stats_mode != 2,
            **dropout,
            STATS=stats_mode,
            FP64=x.dtype == torch.float64,
            DOT_PRECISION=precision,
            SPLIT_K=0,
        )


def _sum_splits(ws, dw, db, nk: int, nb: int, split: int, wsb=None, split_b: int = 0) -> None:
    """dw.flat = ws[:, :nk] summed over the split, db = ws[:, nk:] summed (``_sum_splits_kernel``);
    with ``wsb`` (``[split_b, nb]``), db sums that instead and ``ws`` is ``[split, nk]``."""
    if wsb is None:
        wsb, split_b, stride_b = ws[:, nk:], split, nk + nb
    else:
        stride_b = nb
    launch(
        _sum_splits_kernel,
        lambda meta: (cdiv(nk + nb, meta["BLOCK"]),),
        configs=_SUM_CONFIGS,
        interpret_config=_SUM_INTERPRET,
        ws_ptr=ws,
        wsb_ptr=wsb,
        dw_ptr=dw if dw is not None else ws,
        db_ptr=db if db is not None else ws,
        NK=nk,
        NB=nb,
        SPLIT=split,
        SPLIT_B=split_b,
        stride_w=ws.stride(0),
        stride_b=stride_b,
    )


# Tiles of 16-32 KiB (fp32), 128 columns of x first: a warp reads a 512-byte run of a row,
# four elements a thread, and the tile compiles to few registers (sm_90, triton 3.9, fp32:
# 66 for 64 x 128 with 8 warps, 48 for 32 x 128 with 4; 64-column tiles, 122-154), so many
# warps an SM keep loads in flight. The first is also the launch below ``worth_tuning``.
_TRANSPOSE_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 128}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 32, "BLOCK_K": 128}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 128, "BLOCK_K": 64}, num_warps=8, num_stages=1),
]
_TRANSPOSE_INTERPRET = triton.Config({"BLOCK_M": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1)


def transpose_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x.t().contiguous()`` of a 2-D ``x`` (``_transpose_kernel``): ``x.t()`` itself when that
    is contiguous already (a view of a contiguous [K, M], as a fused block's recomputed
    output), else a new [K, M] tensor, one launch."""
    xt = x.t()
    if xt.is_contiguous():
        return xt
    M, K = x.shape  # not empty: an empty x.t() is contiguous
    y = torch.empty((K, M), device=x.device, dtype=x.dtype)
    with on_device(x):
        launch(
            _transpose_kernel,
            lambda meta: flat_grid(cdiv(M, meta["BLOCK_M"]), cdiv(K, meta["BLOCK_K"])),
            configs=_TRANSPOSE_CONFIGS,
            key=["M", "K"],
            interpret_config=_TRANSPOSE_INTERPRET,
            small_config=_TRANSPOSE_CONFIGS[0],
            work=M * K,
            x_ptr=x,
            y_ptr=y,
            M=M,
            K=K,
            stride_xm=x.stride(0),
            stride_xk=x.stride(1),
        )
    return y


_DZ_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)
_DZ_INTERPRET = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)

# Whether a small backward (below ``worth_tuning``'s size, no dW split) launches its dX tiles
# with the dW/db kernel (``_linear_dw_kernel``'s ``DX``). Tests set the attribute.
COMBINED_BACKWARD = True
# "auto" | "fused" | "dz": the backward path (module doc). Read once; tests set the attribute.
BACKWARD_PATH = _env.choice("FUSEDMLP_LINEAR_BWD", ("auto", "fused", "dz"), "auto")
# "auto" takes the dz path from these sizes (M * N * K multiply-adds) up; below them the fused
# kernels are as fast (H200, kernel time, benchmarks/kernel_times.py: TF32 16384x1024x1024
# relu 0.49 ms dz vs 1.06 ms fused; bf16 8192^3 3.40 vs 4.61 ms; bf16 16384x1024x1024 0.173
# vs 0.167 ms) and the dz path's extra launches cost host time.
DZ_PATH_MIN_MACS = {"tf32": 2**30, "16bit": 2**36}
# The dz path's dW GEMM is the forward kernel, chosen (third session) when it had no split-K: its
# [N, K] output had to give the GPU enough tiles (1024 x 1024: 256 tiles of 64 x 64). Narrow
# layers over long batches keep the fused kernels, whose dW reduction splits over M. The GEMM's
# own split (``dz_dw_split``, twelfth session) has not run on a GPU: the rule stays until it has.
DZ_PATH_MIN_DW_ELEMENTS = 2**20


def backward_path(dtype: torch.dtype, precision: str, M: int, N: int, K: int, device) -> str:
    """The backward path, "fused" or "dz", for these sizes (see the module doc)."""
    if dtype == torch.float64 or not (M and N and K):
        return "fused"
    if BACKWARD_PATH in ("fused", "dz"):
        return BACKWARD_PATH
    if device.type != "cuda" or (dtype == torch.float32 and precision != "tf32"):
        return "fused"  # the IEEE fp32 dot is FMA-based: no wgmma operand constraints
    kind = "tf32" if dtype == torch.float32 else "16bit"
    if N * K < DZ_PATH_MIN_DW_ELEMENTS:
        return "fused"
    return "dz" if M * N * K >= DZ_PATH_MIN_MACS[kind] else "fused"


def _dz_copies_transposes(dtype: torch.dtype) -> bool:
    """Whether the dz path makes physical transposes of its operands: TF32 wgmma reads fp32
    operands only K-major; 16-bit types take transposed views."""
    return dtype == torch.float32


def dw_copies_input_transposed(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear_backward`` of a 2-D ``x`` works on transposed copies for its dW (the dz
    path in fp32: TF32 wgmma reads K-major operands only): of x, and of dZ. A caller that makes
    the input anyway can hand over ``x_t.t()`` (a view of a contiguous [K, M] tensor) instead:
    the copy is skipped; a kernel that makes the output's gradient can make dZ^T and its column
    sums beside it (``made``): the dZ pass is skipped."""
    M, K = x.shape
    N = weight.shape[0]
    return (
        _dz_copies_transposes(x.dtype)
        and backward_path(x.dtype, dot_precision(x.dtype), M, N, K, x.device) == "dz"
    )


# Whether the dz path's dW GEMM splits its depth (the batch) over several programs per output
# tile where its [N, K] tiles leave SMs idle (``dz_dw_split``). Read once; tests set it.
DZ_DW_SPLIT = _env.switch("FUSEDMLP_DZ_DW_SPLIT")


def dz_dw_split(M: int, N: int, K: int, device: torch.device) -> int:
    """Depth slices of the dz path's dW GEMM: ``[N, K]`` outputs, each over the M rows (1 = no
    split).

    Without a split the forward kernel has one program per output tile: at width 1024 that is
    64 tiles of 128 x 128 for 132 SMs, or small tiles (TF32 16384 x 1024 x 1024 on an H100,
    tenth session: the dz backward 0.545 ms against torch's 0.400, its dW GEMM about twice
    the dX GEMM's time for the same FLOPs). Slices make about two programs per SM at the
    nominal 128 x 128 tile, each over at least 1024 rows. Under the interpreter a nominal 16 x
    16 tile, 4 "SMs" and 32 rows exercise the split in tests.
    """
    if device.type == "cuda":
        sms, tile, per_sm, rows = sm_count(device), 128, 2, 1024
    else:
        sms, tile, per_sm, rows = 4, 16, 1, 32
    tiles = cdiv(N, tile) * cdiv(K, tile)
    if tiles >= sms:
        return 1
    return max(1, min(round(per_sm * sms / tiles), cdiv(M, rows), 16))


# The dropout epilogue's output rows: a multiple of this many elements. With N % 16 != 0 the
# mask beside the tile spills on sm_90 (triton 3.9: 0.8-2.5 KiB of stack in most
# configurations and activations at N = 1020 or 1022, where N = 1024 spills none; a Philox
# call per element where N % 4 != 0). Mirrored by fusedmlp.autograd.fused_block.
DROPOUT_EPILOGUE_N = 16


@functools.cache
def _dropout_configs(dtype: torch.dtype, precision: str) -> list:
    """The forward GEMM's configurations with the dropout epilogue: those with at most 64
    accumulator elements a thread. The Philox mask beside a larger tile spills on sm_90
    (triton 3.9, TF32 and bf16: 0.9-1.7 KiB of stack for 128 x 256, 256 x 128 and 4-warp
    128 x 128 tiles); the others compile without spills. Their own list object: their own
    autotuner."""
    configs = _configs("fwd", dtype, precision)[0]
    return [
        c for c in configs
        if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32 * c.num_warps
    ]  # fmt: skip


def dropout_epilogue_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear_forward`` of the 2-D ``x`` takes the dropout in its epilogue (``seed``):
    rows of a multiple of 16 outputs (``DROPOUT_EPILOGUE_N``), and the GEMM run the way it runs
    without: the pointer kernel. Where the TMA kernel would run (large 16-bit GEMMs, whose
    128 x 256 tiles spill with the mask), a separate dropout pass costs less than giving it up
    (bf16 8192^3 on an H100: TMA 1.5 ms against the pointer kernel's 1.8 ms; the pass, about
    2 x 128 MB, about 0.09 ms)."""
    M, K = x.shape
    N = weight.shape[0]
    return (
        N % DROPOUT_EPILOGUE_N == 0
        and _tma_operands(x, weight, M, N, K, dot_precision(x.dtype)) is None
    )


@functools.cache
def _split_k_configs(dtype: torch.dtype, precision: str) -> list:
    """The forward GEMM's configurations for its K-split launch: the same list as another
    object, so that it gets an autotuner (and tuned choices) of its own."""
    return list(_configs("fwd", dtype, precision)[0])


def _sum_column_sums(sums) -> None:
    """db from the dZ pass's column sums ``(ws [n_split, N], db, n_split)``, on its own launch."""
    ws, db, n_split = sums
    with on_device(ws):
        _sum_splits(ws, None, db, 0, db.shape[0], n_split)


def _dz_dw_gemm(a: torch.Tensor, b: torch.Tensor, sums) -> torch.Tensor:
    """dW = a @ b^T for the dz path (``a`` [N, M], ``b`` [K, M]: dZ^T and X^T, as views or
    copies), over its M-deep reduction in ``dz_dw_split`` slices where the pointer kernel runs
    it. ``sums``: the dZ pass's db column sums ``(ws [n_split, N], db, n_split)``, or None;
    they are summed here too (with the slices' partials in one launch when split)."""
    N, M = a.shape
    K = b.shape[0]
    dtype, device = a.dtype, a.device
    precision = dot_precision(dtype)
    split = dz_dw_split(M, N, K, device) if DZ_DW_SPLIT else 1
    # TMA's operands whatever the tile count: the split on TMA, or (its waves filled) no split
    operands = _tma_operands(a, b, N, K, M, precision, waves=False) if split > 1 else None
    if operands is not None and TMA_SPLIT:
        depth = _tma_split_depth(N, K, M, device)
        if depth:
            ws = torch.empty((cdiv(M, depth), N * K), device=device, dtype=torch.float32)
            dw = torch.empty((N, K), device=device, dtype=dtype)
            counters = arrival_counters(device, _tma_tiles(N, K))
            _linear_forward_tma(operands, None, ws, dw, "none", 0.0, N, K, M, precision,
                                split=(depth, counters, sums))  # fmt: skip
            return dw
    if split > 1 and (operands is None or not _fills_waves(N, K, device)):
        # slices of a multiple of every configuration's BLOCK_K (16 to 64; 16 interpreted)
        grain = 64 if device.type == "cuda" else _INTERPRET_TILE[2]
        depth = cdiv(cdiv(M, split), grain) * grain
        split = cdiv(M, depth)
    else:
        split = 1
    if split == 1:
        dw = linear_forward(a, b, None, "none", 0.0)[0]
        if sums is not None:
            _sum_column_sums(sums)
        return dw
    ws = torch.empty((split, N * K), device=device, dtype=torch.float32)
    dw = torch.empty((N, K), device=device, dtype=dtype)
    configs = _launch_configs("fwd", dtype, precision, N, K, M)
    configs["configs"] = _split_k_configs(dtype, precision)
    merge = merges_in_kernel(split, N, K, device)
    with on_device(a):
        launch(
            _linear_fwd_kernel,
            lambda meta: (cdiv(N, meta["BLOCK_M"]) * cdiv(K, meta["BLOCK_N"]), split),
            **configs,
            x_ptr=a,
            w_ptr=b,
            # the merge's roles of the unused pointers (the kernel's docstring)
            b_ptr=arrival_counters(device, cdiv(N, 16) * cdiv(K, 16)) if merge else ws,
            y_ptr=ws,
            z_ptr=dw,
            pmean_ptr=sums[1] if merge and sums is not None else ws,
            pm2_ptr=sums[0] if merge and sums is not None else ws,
            M=N,
            N=K,
            K=M,
            stride_xm=a.stride(0),
            stride_xk=a.stride(1),
            stride_wn=b.stride(0),
            stride_wk=b.stride(1),
            stride_b=sums[2] if merge and sums is not None else 0,
            negative_slope=0.0,
            k_split=depth,
            split_stride=N * K,
            HAS_BIAS=False,
            ACTIVATION="none",
            SAVE_Z=False,
            **_dropout_args(None, 0.0, ws),
            STATS=False,
            FP64=False,
            DOT_PRECISION=precision,
            SPLIT_K=2 if merge else 1,
        )
        if not merge and sums is None:
            _sum_splits(ws, dw, None, N * K, 0, split)
        elif not merge:
            _sum_splits(ws, dw, sums[1], N * K, N, split, wsb=sums[0], split_b=sums[2])
    return dw


def _backward_dz(grad_y, x, weight, saved, activation, negative_slope, need_dx, need_dw, need_db,
                 dx_shape, made=None):  # fmt: skip
    """The "dz" path of ``linear_backward`` (M, N, K > 0, not fp64). ``made``: the dZ pass's
    results already made by whoever made grad_y (``linear_backward``), taken out of the list so
    that dZ^T dies once dW is made."""
    M, K = x.shape
    N = weight.shape[0]
    dtype = x.dtype
    kmajor = _dz_copies_transposes(dtype)
    db = ws = dz = dzt = None
    given = bool(made)
    if given:  # dZ^T and the column sums are there: no dZ pass, nothing to allocate for it
        ws, dzt = made.pop(), made.pop()
        n_split, rows, write_dz, write_dzt = ws.shape[0], 0, False, False
    else:
        write_dz = activation != "none" and (need_dx or (need_dw and not kmajor))
        write_dzt = need_dw and kmajor
        dz = torch.empty((M, N), device=x.device, dtype=dtype) if write_dz else None
        dzt = torch.empty((N, M), device=x.device, dtype=dtype) if write_dzt else None
        cfg = _DZ_INTERPRET if x.device.type != "cuda" else _DZ_CONFIG
        n_split, rows = row_splits(
            M, N, x.device, block_c=cfg.kwargs["BLOCK_N"], align=cfg.kwargs["BLOCK_M"],
            cpu_splits=3, cpu_min_rows=8,
        )  # fmt: skip
    if need_db:
        db = torch.empty((N,), device=x.device, dtype=dtype)
        if ws is None:
            ws = torch.empty((n_split, N), device=x.device, dtype=torch.float32)
    with on_device(x):
        if write_dz or write_dzt or (need_db and not given):
            launch(
                _linear_dz_kernel,
                lambda meta: flat_grid(n_split, cdiv(N, meta["BLOCK_N"])),
                configs=[_DZ_CONFIG],
                interpret_config=_DZ_INTERPRET,
                dy_ptr=grad_y,
                t_ptr=saved,
                dz_ptr=dz if write_dz else x,  # x: never written, gives dZ's dtype
                dzt_ptr=dzt if write_dzt else x,
                ws_ptr=ws if need_db else x,
                M=M,
                N=N,
                stride_dym=grad_y.stride(0),
                stride_dyn=grad_y.stride(1),
                stride_tm=saved.stride(0),
                stride_tn=saved.stride(1),
                rows_per_split=rows,
                negative_slope=float(negative_slope),
                ACTIVATION=activation,
                WRITE_DZ=write_dz,
                WRITE_DZT=write_dzt,
                WRITE_SUMS=need_db,
            )
    # db's column sums, summed by the launch that sums dW's K-split partials when it splits
    sums = (ws, db, n_split) if need_db else None
    dz_rows = dz if write_dz else grad_y
    dx = dw = None
    # dW first, and its [M, *] transposes freed before dX is allocated: TF32 holds dZ^T and X^T
    # (M x N and M x K) for it, and dX (M x K) need not exist beside them. That is the
    # step's peak (the last hidden layer's backward, every activation still saved): 64 MiB less
    # at width 1024, batch 16K, fp32.
    if need_dw:  # dW = dZ^T @ X = dZ^T @ (X^T)^T (no copy when x is already such a view)
        x_t = transpose_contiguous(x) if kmajor else x.t()
        dw = _dz_dw_gemm(dzt if dzt is not None else dz_rows.t(), x_t, sums)
        sums = None
        del x_t, dzt
    if sums is not None:
        _sum_column_sums(sums)
    if need_dx:  # dX = dZ @ W = dZ @ (W^T)^T
        w_t = transpose_contiguous(weight) if kmajor else weight.t()
        dx = linear_forward(dz_rows, w_t, None, "none", 0.0, out_shape=dx_shape)[0]
    return dx, dw, db


def linear_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    saved: torch.Tensor | None,
    activation: str,
    negative_slope: float,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    dx_shape: tuple[int, ...] | None = None,
    made: list | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``y = act(x @ weight^T + b)`` for 2-D ``grad_y [M, N]`` and ``x [M, K]``.

    ``made`` (no activation, ``dw_copies_input_transposed``): the list ``[dzt [N, M] contiguous,
    ws [S, N]]``, grad_y's transpose and S row slices' column sums (acc dtype), made by the
    kernel that made grad_y: the "dz" path's dZ pass is skipped. Emptied here: the list is the
    only holder, so that dZ^T is freed once dW is made (before dX is allocated).

    ``saved``: the output y or the pre-activation z (see ``saves_output`` /
    ``saves_preactivation``), ``[M, N]`` any strides, None for no activation.
    Returns ``(dx [M, K] contiguous (allocated with shape ``dx_shape`` when given), dw [N, K]
    contiguous, db [N])``, each None when not needed; all in x's dtype. No float atomics: results are deterministic.
    """
    M, K = x.shape
    N = weight.shape[0]
    dtype = x.dtype
    dx = dw = db = None
    if activation == "none":
        saved = grad_y  # never read; any tensor will do as the pointer
    prec = dot_precision(dtype)
    fp64 = dtype == torch.float64
    if backward_path(dtype, prec, M, N, K, x.device) == "dz":
        return _backward_dz(
            grad_y, x, weight, saved, activation, negative_slope, need_dx, need_dw, need_db,
            dx_shape, made if activation == "none" and need_dw else None,
        )  # fmt: skip
    split = dw_split(M, N, K, x.device)
    if split > 1 and M * N * K <= SMALL_MERGE_MACS:
        split = min(split, merged_split_cap(N, K, x.device))
    # A small backward's dX tiles ride in the dW/db launch (one launch less: the launches, not
    # the GPU, set a small backward's time); a tuned one keeps each GEMM's own configuration.
    combined = (
        COMBINED_BACKWARD
        and need_dx
        and (need_dw or need_db)
        and M * N * K > 0
        and split == 1
        and not worth_tuning(M * N * K, gemm=True)
    )
    if need_dx:
        dx = torch.empty(dx_shape or (M, K), device=x.device, dtype=dtype)
    dw, db = _dw_db(grad_y, x, weight, saved, dx, activation, negative_slope, need_dw, need_db,
                    split, combined, prec)  # fmt: skip
    # dX after dW: on a host-bound GPU the longer dW kernel runs while the host launches dX
    if need_dx and M and K and not combined:
        if N == 0:
            dx.zero_()
        else:
            grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(K, meta["BLOCK_K"]),)
            with on_device(x):
                launch(
                    _linear_dx_kernel,
                    grid,
                    **_launch_configs("dx", dtype, prec, M, N, K),
                    dy_ptr=grad_y,
                    t_ptr=saved,
                    w_ptr=weight,
                    dx_ptr=dx,
                    M=M,
                    N=N,
                    K=K,
                    stride_dym=grad_y.stride(0),
                    stride_dyn=grad_y.stride(1),
                    stride_tm=saved.stride(0),
                    stride_tn=saved.stride(1),
                    stride_wn=weight.stride(0),
                    stride_wk=weight.stride(1),
                    negative_slope=float(negative_slope),
                    ACTIVATION=activation,
                    FP64=fp64,
                    DOT_PRECISION=prec,
                )
    return dx, dw, db


def _dw_db(grad_y, x, weight, saved, dx, activation, negative_slope, need_dw, need_db, split,
           combined, prec):  # fmt: skip
    """``(dw, db)`` of ``linear_backward``'s fused path (one launch, with dX's tiles when
    ``combined``; split: partials merged in the kernel or by a launch of their own)."""
    dw = db = None
    if not (need_dw or need_db):
        return dw, db
    M, K = x.shape
    N = weight.shape[0]
    dtype = x.dtype
    fp64 = dtype == torch.float64
    if need_dw:
        dw = torch.empty((N, K), device=x.device, dtype=dtype)
    if need_db:
        db = torch.empty((N,), device=x.device, dtype=dtype)
    if N == 0:
        return dw, db
    if M == 0:  # nothing to reduce: zero gradients, as torch
        if dw is not None:
            dw.zero_()
        if db is not None:
            db.zero_()
        return dw, db
    compute_dw = need_dw and K > 0
    if not (compute_dw or need_db):
        return dw, db
    nk, nb = (N * K if compute_dw else 0), (N if need_db else 0)
    if split > 1:  # partials: merged by each block's last program, or by a launch of their own
        ws = torch.empty((split, nk + nb), device=x.device, dtype=host_acc_dtype(dtype))
        dw_out, db_out, split_stride = ws, ws[:, nk:], nk + nb
    merge = merges_in_kernel(split, N, K, x.device)
    # one counter per db/dW program of axis 0: at most this many at the smallest tiles
    counters = arrival_counters(x.device, cdiv(N, 16) * (cdiv(K, 16) + 1)) if merge else None
    if split == 1:
        dw_out = dw if dw is not None else dx if dx is not None else x
        db_out = db if db is not None else dw_out
        split_stride = 0

    def grid(meta):
        tiles = cdiv(N, meta["BLOCK_N"]) * cdiv(K, meta["BLOCK_K"])
        dx_tiles = cdiv(M, meta["BLOCK_M"]) * cdiv(K, meta["BLOCK_K"]) if combined else 0
        return (
            dx_tiles + (tiles if compute_dw else 0) + (cdiv(N, meta["BLOCK_N"]) if need_db else 0),
            split,
        )

    configs = _launch_configs("dw", dtype, prec, M, N, K)
    if combined:  # small: one configuration, nothing to tune (nor to compile for sm_90)
        configs["configs"] = [_combined_config(dtype, prec)]
        configs["small_config"] = configs["configs"][0]
    with on_device(x):
        launch(
            _linear_dw_kernel,
            grid,
            **configs,
            dy_ptr=grad_y,
            t_ptr=saved,
            x_ptr=x,
            dw_ptr=dw_out,
            db_ptr=db_out,
            # with MERGE: the final dW and db (the kernel's docstring)
            w_ptr=db if merge and db is not None else weight,
            dx_ptr=dx if combined else dw if merge and dw is not None else dw_out,
            cnt_ptr=counters if counters is not None else dw_out,
            M=M,
            N=N,
            K=K,
            stride_dym=grad_y.stride(0),
            stride_dyn=grad_y.stride(1),
            stride_tm=saved.stride(0),
            stride_tn=saved.stride(1),
            stride_xm=x.stride(0),
            stride_xk=x.stride(1),
            stride_wn=weight.stride(0),
            stride_wk=weight.stride(1),
            split_stride=split_stride,
            negative_slope=float(negative_slope),
            SPLIT=split,
            COMPUTE_DB=need_db,
            DX=combined,
            MERGE=merge,
            ACTIVATION=activation,
            FP64=fp64,
            DOT_PRECISION=prec,
        )
        if split > 1 and not merge:
            _sum_splits(ws, dw, db, nk, nb, split)
    return dw, db


__all__ = [
    "KERNEL_ACTIVATIONS",
    "backward_path",
    "dropout_epilogue_applies",
    "dw_split",
    "linear_backward",
    "linear_forward",
    "linear_forward_stats",
    "saves_output",
    "stats_rows",
    "saves_preactivation",
]
