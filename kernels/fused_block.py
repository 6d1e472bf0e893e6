"""Cross-layer fusion: (BatchNorm normalise) -> activation -> dropout in one pass.

Two blocks share these kernels (every input viewed as a 2-D ``[R, C]`` matrix, row ``r``,
column / channel ``c``, logical row-major element index ``i = r * C + c`` in int64):

* ``Linear -> BatchNorm1d -> act -> Dropout`` (``NORM=True``, x = the Linear's output ``[N, C]``):
    forward   ``batch_norm_stats`` (two launches of fusedmlp.kernels.batchnorm: split partials
              and their merge; none where the Linear's GEMM made the final statistics in its
              epilogue, ``linear.linear_forward_stats`` with eps) -> ``_fused_fwd_kernel``:
              ``z = (x - mean) * invstd * w + b``, ``a = act(z)``, ``out = a * keep * 1/(1-p)``,
              one read of x, one write of out. (The running statistics: updated by the
              batchnorm module's ops, ``batch_norm_stats`` in eager mode, with the statistics
              then given to this forward; or, for the Linear's statistics, by this forward's
              row block 0, ``UPDATE``.)
    saved     x, mean, invstd (and the seed): the pre-activation is *recomputed from x* in the
              backward, which reads x anyway for the BN reductions, so neither the BN output, nor
              the activation output, nor a mask is ever stored.
    backward  ``_fused_bwd_reduce_kernel`` (per split: ``sum(g)``, ``sum(g * (x - mean))`` with
              ``g = dout * keep * scale * act'(z)`` recomputed on the fly) ->
              (its last split per column block to arrive merges the splits in a fixed order and
              writes dweight, dbias: ``batchnorm._merge_grad_sums``) ->
              ``_fused_bwd_dx_kernel`` (recomputes ``g`` again, BN's dx formula). ``g`` (the
              gradient of the BN output) is never written to memory. Deterministic, no atomics.
              With ``APPLY`` the reduction also writes the block's output (recomputed, the
              forward's bits; row-major or transposed) for the Linear after the block, whose
              dW reads it and which does not save it.
              With ``TRANSPOSED`` the dx pass also writes dx^T and dx's column sums per 64
              rows: the "dz" backward of the Linear before the block (fp32) reads them instead
              of making them in a pass over dx (``fusedmlp.autograd._handover``).

* ``Linear -> act -> Dropout`` (``NORM=False``, x = the pre-activation ``z``, i.e. the output
  of a Linear run without activation, any shape ``[..., C]``):
    forward   ``_fused_fwd_kernel``: ``out = act(z) * keep * scale``.
    saved     the OUTPUT ``out`` where it determines the derivative (none, relu, leaky_relu with
              ``negative_slope >= 0``, sigmoid, tanh: ``act(z) = out / scale`` where kept; the
              next layer saves ``out`` as its input anyway, so this costs no memory), else the
              pre-activation ``z`` (leaky_relu with ``negative_slope < 0``, gelu, silu).
    backward  ``_fused_bwd_elementwise_kernel``: ``dz = dout * keep * scale * act'(.)``.

The dropout random stream is exactly ``fusedmlp.kernels.dropout``'s (elementwise mode): element
``i`` reads word ``i % 4`` of Philox4x32-10 keyed by the 64-bit seed (a one-element int64 tensor
read on the device) at counter ``(lo32(i // 4), hi32(i // 4), 0, 0)``, kept when
``(r >> 8) >= p * 2^24``. So a fused block draws the same mask as the unfused
``fusedmlp.nn.Dropout`` given the same seed, and the backward regenerates it. Tiles are
``[BLOCK_R, 4 * BLOCK_Q]`` (rows x columns): when ``C % 4 == 0`` each quad of columns is one
Philox call (``ALIGNED``: computed on a ``[BLOCK_R, BLOCK_Q, 1]`` counter and reshaped), else
each element computes its own. Per-column vectors (mean, invstd, weight, bias, the backward's
sums) are loaded at the tile's 2-D shape (each row reads the same addresses: L1 hits), so they
share the data tile's register layout: loaded as ``[1, C]`` rows they take a layout of their
own and the compiler moves the whole data tile through shared memory, twice (sm_90 PTX).

Numerics follow the unfused chain: fp32 computation (fp64 for fp64 inputs); the BN output and
the activation output are rounded to the input dtype before the next step (as the unfused
modules store them); dropout is the multiply form ``a * (keep ? scale : 0)`` (NaN/Inf propagate
as torch's). Any strides in; outputs are contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import acc_dtype
from . import batchnorm as BN
from .arrival import arrival_counters
from .batchnorm import _merge_grad_sums, _store_grad_sums
from .dropout import dropout_scale, scale_arg
from .dropout import tile_keep as _tile_keep
from .launch import cdiv, flat_grid, flat_tile_ids, launch, on_device, row_splits
from .linear import _activation, _activation_grad

KERNEL_ACTIVATIONS = ("none", "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "silu")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def saves_output(activation: str, negative_slope: float) -> bool:
    """Whether the non-normalising block's backward reads the derivative from its output
    (else it keeps the pre-activation)."""
    return not (
        activation in ("gelu", "silu") or (activation == "leaky_relu" and negative_slope < 0)
    )


# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _act_grad_z(g, z, negative_slope, ACTIVATION: tl.constexpr):
    """``g * act'(z)`` from the pre-activation: fusedmlp.kernels.linear's derivative, which reads
    the activation output for sigmoid and tanh (recomputed here) and ``z`` otherwise."""
    if ACTIVATION == "sigmoid":
        t = _activation(z, negative_slope, ACTIVATION)
    elif ACTIVATION == "tanh":
        t = _activation(z, negative_slope, ACTIVATION)
    else:
        t = z
    return _activation_grad(g, t, negative_slope, ACTIVATION)


@triton.jit
def _preact(x, mean, scale, shift, DTYPE: tl.constexpr):
    """BN output ``(x - mean) * scale + shift`` (as fusedmlp's batchnorm forward), rounded to the
    input dtype ``DTYPE`` (the unfused chain stores it in that dtype; a no-op for fp32/fp64)."""
    z = (x - mean) * scale + shift
    return z.to(DTYPE).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["scale"])
def _fused_fwd_kernel(
    x_ptr,
    out_ptr,
    mean_ptr,
    invstd_ptr,
    w_ptr,
    b_ptr,
    seed_ptr,
    R,
    C,
    sxR,
    sxC,
    soR,
    soC,
    p,
    scale,
    negative_slope,
    rmean_ptr,
    rvar_ptr,
    nbt_ptr,
    var_ptr,
    momentum,
    momentum_lo,
    NORM: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACTIVATION: tl.constexpr,
    DROPOUT: tl.constexpr,
    ALIGNED: tl.constexpr,
    UPDATE: tl.constexpr,
    CUMULATIVE: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    """One ``[BLOCK_R, 4 * BLOCK_Q]`` tile of ``out = act(norm(x)) * keep * scale``.

    Grid: (row blocks, column blocks), flat (``_grid``). ``NORM``: per column
    ``(x - mean) * invstd * w + b``; ``DROPOUT``: the Philox mask (``p``, ``scale`` runtime).
    out: x's dtype.
    ``UPDATE`` (with ``NORM``): the programs of row block 0 also update the running statistics
    of their columns from the batch mean and the unbiased variance at ``var_ptr`` (``[C]``, acc
    type), as ``batchnorm._update_running`` (rmean, rvar ``[C]`` contiguous; nbt, momentum,
    momentum_lo, CUMULATIVE: that function's): for statistics that the Linear before the block
    made in its epilogue (``linear.linear_forward_stats``), whose launch does not touch the
    batch norm's buffers.
    """
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    scale = dropout_scale(scale, FP64)  # fp64: its bits (dropout.scale_arg)
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    pid_r, pid_c = flat_tile_ids(tl.cdiv(R, BLOCK_R))
    r = (pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]
    c = (pid_c.to(tl.int64) * (4 * BLOCK_Q) + tl.arange(0, 4 * BLOCK_Q))[None, :]
    cmask = c < C
    mask = (r < R) & cmask
    x = tl.load(x_ptr + r * sxR + c * sxC, mask=mask, other=0.0).to(ACC)
    if NORM:
        # per-column vectors loaded at the tile's shape (L1 hits after the first row): the
        # same layout as x, where [1, C] loads would move the whole tile through shared memory
        cb = c + r * 0
        mean = tl.load(mean_ptr + cb, mask=mask, other=0.0).to(ACC)
        invstd = tl.load(invstd_ptr + cb, mask=mask, other=1.0).to(ACC)
        if HAS_W:
            sc = invstd * tl.load(w_ptr + cb, mask=mask, other=0.0).to(ACC)
        else:
            sc = invstd
        if HAS_B:
            sh = tl.load(b_ptr + cb, mask=mask, other=0.0).to(ACC)
        else:
            sh = tl.zeros_like(sc)
        z = _preact(x, mean, sc, sh, DTYPE)
    else:
        z = x
    a = _activation(z, negative_slope, ACTIVATION)
    if DROPOUT:
        a = a.to(DTYPE).to(ACC)  # the unfused activation output, in the input dtype
        keep = _tile_keep(seed_ptr, r, pid_c, C, p, ALIGNED, BLOCK_Q)
        a = a * tl.where(keep, scale, 0.0)
    tl.store(out_ptr + r * soR + c * soC, a.to(out_ptr.dtype.element_ty), mask=mask)
    if UPDATE:
        if pid_r == 0:
            cv = pid_c.to(tl.int64) * (4 * BLOCK_Q) + tl.arange(0, 4 * BLOCK_Q)
            cvmask = cv < C
            mean_v = tl.load(mean_ptr + cv, mask=cvmask, other=0.0).to(ACC)
            var_v = tl.load(var_ptr + cv, mask=cvmask, other=0.0).to(ACC)
            BN._update_running(rmean_ptr, rvar_ptr, nbt_ptr, cv, cvmask, mean_v, var_v,
                               momentum, momentum_lo, CUMULATIVE, FP64, 4 * BLOCK_Q)  # fmt: skip


@triton.jit(do_not_specialize=["scale"])
def _fused_bwd_elementwise_kernel(
    dy_ptr,
    t_ptr,
    dx_ptr,
    seed_ptr,
    R,
    C,
    sdR,
    sdC,
    stR,
    stC,
    sgR,
    sgC,
    p,
    scale,
    negative_slope,
    FROM_OUT: tl.constexpr,
    ACTIVATION: tl.constexpr,
    ALIGNED: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    """Backward of ``out = act(z) * keep * scale``: ``dz = dout * keep * scale * act'(.)``.

    ``t`` is the saved output (``FROM_OUT``: ``act(z) = out / scale`` where kept) or the
    pre-activation z. The mask is regenerated from the seed (not needed for relu from the
    output: ``out > 0`` exactly where kept and ``z > 0``).
    """
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    scale = dropout_scale(scale, FP64)  # fp64: its bits (dropout.scale_arg)
    pid_r, pid_c = flat_tile_ids(tl.cdiv(R, BLOCK_R))
    r = (pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]
    c = (pid_c.to(tl.int64) * (4 * BLOCK_Q) + tl.arange(0, 4 * BLOCK_Q))[None, :]
    mask = (r < R) & (c < C)
    dy = tl.load(dy_ptr + r * sdR + c * sdC, mask=mask, other=0.0).to(ACC)
    t = tl.load(t_ptr + r * stR + c * stC, mask=mask, other=0.0).to(ACC)
    if FROM_OUT and ACTIVATION == "relu":
        # out > 0 exactly where the element was kept and z > 0: no mask to regenerate
        dz = tl.where(t > 0, dy * scale, 0.0)
        if tl.max((t != t).to(tl.int32)) > 0:
            # a NaN output (NaN z, kept or not, or a dropped +inf z: the dropout multiplies):
            # torch's relu passes the gradient there and its dropout keeps it only where kept,
            # so read the mask
            keep = _tile_keep(seed_ptr, r, pid_c, C, p, ALIGNED, BLOCK_Q)
            dz = tl.where(t != t, tl.where(keep, dy * scale, 0.0), dz)
    else:
        keep = _tile_keep(seed_ptr, r, pid_c, C, p, ALIGNED, BLOCK_Q)
        g = dy * tl.where(keep, scale, 0.0)
        if FROM_OUT:
            # a dropped element's output is act(z) * 0: 0, or NaN where act(z) was NaN, whose
            # derivative (tanh's 1 - y^2, sigmoid's y (1 - y)) torch's backward multiplies in
            a = tl.where(keep, t / tl.where(keep, scale, 1.0), tl.where(t != t, t, 0.0))
            dz = _activation_grad(g, a, negative_slope, ACTIVATION)
        else:
            dz = _act_grad_z(g, t, negative_slope, ACTIVATION)
    tl.store(dx_ptr + r * sgR + c * sgC, dz.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["scale"])
def _fused_bwd_reduce_kernel(
    x_ptr,
    dy_ptr,
    mean_ptr,
    invstd_ptr,
    w_ptr,
    b_ptr,
    seed_ptr,
    psum_g_ptr,
    psum_gxmu_ptr,
    dw_ptr,
    db_ptr,
    cnt_ptr,
    out_ptr,
    R,
    C,
    sxR,
    sxC,
    sdR,
    sdC,
    soR,
    soC,
    rows_per_split,
    p,
    scale,
    negative_slope,
    FINAL: tl.constexpr,
    HAS_DW: tl.constexpr,
    HAS_DB: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACTIVATION: tl.constexpr,
    DROPOUT: tl.constexpr,
    ALIGNED: tl.constexpr,
    FP64: tl.constexpr,
    APPLY: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    PIPELINE: tl.constexpr,
):
    """Pass 1 of the BN block's backward, per split (axis 1) and column block (axis 0):
    ``sum(g)`` and ``sum(g * (x - mean))`` over the split's rows, where
    ``g = dout * keep * scale * act'(z)`` and ``z`` is recomputed from x. psum_*: ``[n_split +
    1, C]`` in the acc type, accumulated element-wise in registers, reduced once at the end:
    split ``s`` stores at row s, and the last split of the column block to arrive merges rows
    0..n_split-1 into row n_split and dweight/dbias, as batch norm's backward does
    (``batchnorm._merge_grad_sums``; counter ``cnt_ptr[pid_c]``). ``FINAL`` (one split):
    psum_* are the sums ``[C]``, stored directly. ``PIPELINE``: the next row block's x and dout
    are loaded before this one's arithmetic (two blocks of loads in flight per warp, where the
    plain loop issues a block's loads only after the previous block's arithmetic).

    ``APPLY``: also the block's output ``dropout(act(z))`` to ``out`` (strides soR, soC; a
    transposed ``[C, R]`` buffer has soR == 1), bit for bit ``_fused_fwd_kernel``'s: the output
    that the Linear after the block reads for its dW, recomputed from the x this pass reads
    anyway, so that no pass of its own reads x once more (``bn_act_dropout_backward_sums``).
    """
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    scale = dropout_scale(scale, FP64)  # fp64: its bits (dropout.scale_arg)
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    c = (pid_c.to(tl.int64) * (4 * BLOCK_Q) + tl.arange(0, 4 * BLOCK_Q))[None, :]
    cmask = c < C
    cb = c + tl.zeros([BLOCK_R, 1], dtype=tl.int64)  # the tile's shape: see _fused_fwd_kernel
    cbmask = cb < C
    mean = tl.load(mean_ptr + cb, mask=cbmask, other=0.0).to(ACC)
    invstd = tl.load(invstd_ptr + cb, mask=cbmask, other=1.0).to(ACC)
    if HAS_W:
        sc = invstd * tl.load(w_ptr + cb, mask=cbmask, other=0.0).to(ACC)
    else:
        sc = invstd
    if HAS_B:
        sh = tl.load(b_ptr + cb, mask=cbmask, other=0.0).to(ACC)
    else:
        sh = tl.zeros_like(sc)
    start = pid_s.to(tl.int64) * rows_per_split
    end = tl.minimum(start + rows_per_split, R)
    a1 = tl.zeros([BLOCK_R, 4 * BLOCK_Q], dtype=ACC)
    a2 = tl.zeros([BLOCK_R, 4 * BLOCK_Q], dtype=ACC)
    if PIPELINE:
        rn = (start + tl.arange(0, BLOCK_R))[:, None]
        mn = (rn < end) & cmask
        x_next = tl.load(x_ptr + rn * sxR + c * sxC, mask=mn, other=0.0)
        g_next = tl.load(dy_ptr + rn * sdR + c * sdC, mask=mn, other=0.0)
    for r0 in range(start, end, BLOCK_R):
        r = (r0 + tl.arange(0, BLOCK_R))[:, None]
        mask = (r < end) & cmask
        if PIPELINE:
            x = x_next.to(ACC)
            g = g_next.to(ACC)
            rn = r + BLOCK_R
            mn = (rn < end) & cmask
            x_next = tl.load(x_ptr + rn * sxR + c * sxC, mask=mn, other=0.0)
            g_next = tl.load(dy_ptr + rn * sdR + c * sdC, mask=mn, other=0.0)
        else:
            x = tl.load(x_ptr + r * sxR + c * sxC, mask=mask, other=0.0).to(ACC)
            g = tl.load(dy_ptr + r * sdR + c * sdC, mask=mask, other=0.0).to(ACC)
        if DROPOUT:
            keep = _tile_keep(seed_ptr, r, pid_c, C, p, ALIGNED, BLOCK_Q)
            g = g * tl.where(keep, scale, 0.0)
        z = _preact(x, mean, sc, sh, DTYPE)
        if APPLY:  # as _fused_fwd_kernel, operation for operation (the same bits)
            a = _activation(z, negative_slope, ACTIVATION)
            if DROPOUT:
                a = a.to(DTYPE).to(ACC) * tl.where(keep, scale, 0.0)
            tl.store(out_ptr + r * soR + c * soC, a.to(out_ptr.dtype.element_ty), mask=mask)
        g = tl.where(mask, _act_grad_z(g, z, negative_slope, ACTIVATION), 0.0)
        a1 += g
        a2 += g * (x - mean)
    if FINAL:
        c1 = pid_c.to(tl.int64) * (4 * BLOCK_Q) + tl.arange(0, 4 * BLOCK_Q)
        _store_grad_sums(
            tl.sum(a1, 0), tl.sum(a2, 0), c1, c1 < C, invstd_ptr, psum_g_ptr, psum_gxmu_ptr,
            dw_ptr, db_ptr, 0.0, False, HAS_DW, HAS_DB, FP64,
        )  # fmt: skip
    else:
        out = pid_s * C + c
        tl.store(psum_g_ptr + out, tl.sum(a1, 0)[None, :], mask=cmask)
        tl.store(psum_gxmu_ptr + out, tl.sum(a2, 0)[None, :], mask=cmask)
        c1 = pid_c.to(tl.int64) * (4 * BLOCK_Q) + tl.arange(0, 4 * BLOCK_Q)
        sums = tl.num_programs(1).to(tl.int64) * C
        _merge_grad_sums(
            psum_g_ptr, psum_gxmu_ptr, cnt_ptr + pid_c, c1, c1 < C, C, invstd_ptr,
            psum_g_ptr + sums, psum_gxmu_ptr + sums, dw_ptr, db_ptr, 0.0, False, HAS_DW, HAS_DB,
            FP64,
        )  # fmt: skip


@triton.jit(do_not_specialize=["scale"])
def _fused_bwd_dx_kernel(
    x_ptr,
    dy_ptr,
    dx_ptr,
    mean_ptr,
    invstd_ptr,
    w_ptr,
    b_ptr,
    seed_ptr,
    sum_g_ptr,
    sum_gxmu_ptr,
    dxt_ptr,
    ws_ptr,
    R,
    C,
    sxR,
    sxC,
    sdR,
    sdC,
    sgR,
    sgC,
    p,
    scale,
    negative_slope,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACTIVATION: tl.constexpr,
    DROPOUT: tl.constexpr,
    ALIGNED: tl.constexpr,
    TRANSPOSED: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    """Pass 2 of the BN block's backward, one tile of dx (``g`` recomputed as in pass 1):
    ``dx = w * invstd * (g - sum_g / R - (x - mean) * invstd^2 * sum_gxmu / R)``.

    ``TRANSPOSED`` (for the Linear before the block, whose dW on the "dz" path reads dZ^T,
    and whose db is dZ's column sums: ``_TRANSPOSED_CONFIGS``): also dx^T to dxt ``[C, R]``
    contiguous, and the column sums of the rounded dx of this tile's rows to row ``pid_r``
    of ws ``[cdiv(R, BLOCK_R), C]`` (acc dtype): what that Linear's dZ pass would make."""
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    scale = dropout_scale(scale, FP64)  # fp64: its bits (dropout.scale_arg)
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    pid_r, pid_c = flat_tile_ids(tl.cdiv(R, BLOCK_R))
    r = (pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]
    c = (pid_c.to(tl.int64) * (4 * BLOCK_Q) + tl.arange(0, 4 * BLOCK_Q))[None, :]
    mask = (r < R) & (c < C)
    cb = c + r * 0  # per-column vectors at the tile's shape: see _fused_fwd_kernel
    mean = tl.load(mean_ptr + cb, mask=mask, other=0.0).to(ACC)
    invstd = tl.load(invstd_ptr + cb, mask=mask, other=1.0).to(ACC)
    if HAS_W:
        sc = invstd * tl.load(w_ptr + cb, mask=mask, other=0.0).to(ACC)
    else:
        sc = invstd
    if HAS_B:
        sh = tl.load(b_ptr + cb, mask=mask, other=0.0).to(ACC)
    else:
        sh = tl.zeros_like(sc)
    x = tl.load(x_ptr + r * sxR + c * sxC, mask=mask, other=0.0).to(ACC)
    g = tl.load(dy_ptr + r * sdR + c * sdC, mask=mask, other=0.0).to(ACC)
    if DROPOUT:
        keep = _tile_keep(seed_ptr, r, pid_c, C, p, ALIGNED, BLOCK_Q)
        g = g * tl.where(keep, scale, 0.0)
    z = _preact(x, mean, sc, sh, DTYPE)
    g = _act_grad_z(g, z, negative_slope, ACTIVATION)
    n = R * 1.0
    b = tl.load(sum_g_ptr + cb, mask=mask, other=0.0) / n
    # the sum first, as batch norm's dx kernel (torch's order): a constant channel's 0 stays 0
    # where invstd^2 overflows (var + eps below ~3e-39 in fp32), not 0 * inf = NaN
    k = tl.load(sum_gxmu_ptr + cb, mask=mask, other=0.0) * invstd * invstd / n
    dx = ((g - b - (x - mean) * k) * sc).to(dx_ptr.dtype.element_ty)
    tl.store(dx_ptr + r * sgR + c * sgC, dx, mask=mask)
    if TRANSPOSED:
        tl.store(dxt_ptr + c * R + r, dx, mask=mask)
        c1 = pid_c.to(tl.int64) * (4 * BLOCK_Q) + tl.arange(0, 4 * BLOCK_Q)
        colsum = tl.sum(tl.where(mask, dx.to(ACC), 0.0), 0)
        tl.store(ws_ptr + pid_r.to(tl.int64) * C + c1, colsum, mask=c1 < C)


# ----------------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------------

# [BLOCK_R, 4 * BLOCK_Q] tiles over a row-major [R, C]: wide along the contiguous C.
# The first five hold 16 elements a thread. The step's kernels (fp32, dropout, C % 4 == 0) then
# compile for sm_90 to 66 registers (forward) and 101-128 (dx), so 3 and 2 programs of 8 warps
# fit an SM: 24 and 16 warps to keep loads in flight, while one program of a memory-bound pass
# computes (Philox, the BN algebra) with none of its own. The last two hold 8 and 4: forward
# 40-43 and 32 registers, dx 58-60 and 39-40 (triton 3.6 and 3.9), 5-8 and 4-6 programs of 8
# warps an SM. The autotuner picks by timing.
_TILE_CONFIGS = [
    triton.Config({"BLOCK_R": 16, "BLOCK_Q": 64}, num_warps=8),
    triton.Config({"BLOCK_R": 32, "BLOCK_Q": 32}, num_warps=8),
    triton.Config({"BLOCK_R": 8, "BLOCK_Q": 64}, num_warps=4),
    triton.Config({"BLOCK_R": 64, "BLOCK_Q": 16}, num_warps=8),
    triton.Config({"BLOCK_R": 16, "BLOCK_Q": 32}, num_warps=4),
    triton.Config({"BLOCK_R": 8, "BLOCK_Q": 64}, num_warps=8),
    triton.Config({"BLOCK_R": 8, "BLOCK_Q": 32}, num_warps=8),
]
# The forward that also updates the running statistics in place (``UPDATE``): the same list as
# another object, so that it gets an autotuner of its own (``launch`` caches one per list),
# which restores the running statistics after each trial (else a GPU's first launch of a
# shape applied the update once per trial).
_UPDATE_TILE_CONFIGS = list(_TILE_CONFIGS)
# The reduction keeps two [BLOCK_R, BLOCK_Q, 4] fp32 accumulators per program. The first four
# compile to 79-80 registers for sm_90 (the step's signature): 3 programs of 8 warps an SM, one
# fewer than ``launch.PROGRAMS_PER_SM`` sizes the splits for, so a grid of 128-column blocks
# runs in 1.33 waves. The next two, 46-50 registers: 8 x 256 with 16 warps (2 programs an SM,
# the splits' grid of 256-column blocks in one wave) and 8 x 128 with 8 warps (5 an SM). The
# last four load the next row block ahead (``PIPELINE``). The autotuner picks: on an H100
# (seventeenth session, the step's w1024 B16K TF32 blocks) 8 x 64 with 8 warps and PIPELINE;
# from the lists above, 8 x 32 with 8 warps (the forward, row-major and transposed), 8 x 64
# with 8 warps (dx) and 64 x 8 with 8 warps (dx, transposed): each a sixteenth-session addition.
# With APPLY (the block's output recomputed and stored transposed, fp32, dropout) the same list
# compiles to about twice the registers (sm_90, triton 3.9 / 3.6; no spills): 150-175 for the
# 8 x 64 and 16 x 32 tiles with 8 warps (one program an SM), 80-98 for 8 x 32 with 8 warps and
# 92-98 for 8 x 64 with 16 warps. The stores go through one layout conversion in shared memory
# (a warp then writes 4 whole 32-byte sectors per instruction, one element a thread) and hold a
# 64-bit address per element. Not yet timed: ``kernel_times.py``'s step A/B says whether the
# reduction with APPLY beats the reduction plus a pass of its own.
_REDUCE_CONFIGS = [
    triton.Config({"BLOCK_R": r, "BLOCK_Q": q, "PIPELINE": pipe}, num_warps=w)
    for r, q, w, pipe in [
        (8, 64, 8, False),
        (16, 32, 8, False),
        (16, 16, 4, False),
        (32, 16, 8, False),
        (8, 64, 16, False),
        (8, 32, 8, False),
        (8, 64, 8, True),
        (8, 64, 16, True),
        (8, 32, 8, True),
        (16, 32, 8, True),
    ]
]
# Interpreter: small tiles, so tiny tests still see several row/column blocks and splits.
_INTERPRET_TILE = triton.Config({"BLOCK_R": 8, "BLOCK_Q": 4}, num_warps=4)
_REDUCE_INTERPRET = triton.Config({"BLOCK_R": 8, "BLOCK_Q": 4, "PIPELINE": True}, num_warps=4)
# The dx pass that also writes dx^T and column sums (``TRANSPOSED``): one row count, the rows of
# a column-sum split, on a GPU and under the interpreter alike (whatever a test forces); 64 rows
# make the transposed stores 256-byte runs (fp32). The step's signature (fp32, dropout) for
# sm_90, triton 3.6 / 3.9: 64 x 64 with 8 warps 140 / 144 registers (one program an SM: 8 warps
# to hide the loads and the transposing stores), 64 x 32 with 4 warps 136 / 150; with twice the
# warps the same tiles take 64 / 74 and 80 / 75 registers: 2 programs of 16 warps and 3 of 8 an
# SM. No spills; 64 x 128 tiles spill (8 warps: 192 bytes of stack; 16 warps: 112).
TRANSPOSED_ROWS = 64
_TRANSPOSED_CONFIGS = [
    triton.Config({"BLOCK_R": 64, "BLOCK_Q": 16}, num_warps=8),
    triton.Config({"BLOCK_R": 64, "BLOCK_Q": 8}, num_warps=4),
    triton.Config({"BLOCK_R": 64, "BLOCK_Q": 16}, num_warps=16),
    triton.Config({"BLOCK_R": 64, "BLOCK_Q": 8}, num_warps=8),
]
_TRANSPOSED_INTERPRET = triton.Config({"BLOCK_R": 64, "BLOCK_Q": 4}, num_warps=4)


def _splits(R: int, C: int, device: torch.device) -> tuple[int, int]:
    """(n_split, rows_per_split) of the backward reduction (``launch.row_splits``)."""
    return row_splits(R, C, device, block_c=128, align=64, cpu_splits=3, cpu_min_rows=8)


def _sums_shape(n_split: int, C: int) -> tuple[int, ...]:
    """The reduction's sums buffers over ``n_split`` splits: the sums ``[C]`` (one split), else
    one row per split and the merged sums' row (``_fused_bwd_reduce_kernel``)."""
    return (C,) if n_split == 1 else (n_split + 1, C)


def backward_sums_shape(R: int, C: int, device: torch.device) -> tuple[int, ...]:
    """The shape of ``bn_act_dropout_backward_sums``'s ``psum_g`` and ``psum_gxmu``."""
    return _sums_shape(_splits(R, C, device)[0], C)


def _grid(R: int, C: int):
    """(row blocks, column blocks), flat along axis 0 (``flat_tile_ids``)."""
    return lambda meta: flat_grid(cdiv(R, meta["BLOCK_R"]), cdiv(C, 4 * meta["BLOCK_Q"]))


def _check(x: torch.Tensor, seed: torch.Tensor | None, activation: str) -> None:
    if x.dim() != 2:
        raise RuntimeError(f"fused block kernel: expected a 2-D [R, C] input, got {x.dim()}-D")
    if x.dtype not in SUPPORTED_DTYPES:
        raise RuntimeError(
            f"fused block kernel: input dtype must be float16, bfloat16, float32 or float64, "
            f"got {x.dtype}"
        )
    if activation not in KERNEL_ACTIVATIONS:
        raise ValueError(f"fused block kernel: unknown activation {activation!r}")
    if seed is not None and (
        seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != x.device
    ):
        raise RuntimeError(
            f"fused block kernel: seed must be a one-element int64 tensor on {x.device}, "
            f"got {seed.dtype} {tuple(seed.shape)} on {seed.device}"
        )


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def fused_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    seed: torch.Tensor | None,
    normalize: bool,
    eps: float,
    p: float,
    activation: str,
    negative_slope: float,
    out: torch.Tensor | None = None,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    update: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``out = act(bn(x)) * keep * 1/(1-p)`` (``normalize``) or ``act(x) * keep * 1/(1-p)``.

    Args:
        x: ``[R, C]``, any strides, fp16/bf16/fp32/fp64 (fp32 math, fp64 for fp64).
        weight, bias: ``[C]`` BN affine parameters or None (fp32 allowed with 16-bit x); only
            read when ``normalize``.
        seed: one-element int64 tensor on x's device (the dropout seed), or None: no dropout.
        normalize: BN with the batch statistics (computed here by
            ``fusedmlp.kernels.batchnorm.batch_norm_stats``, ``eps``).
        p: drop probability in [0, 1] (ignored without seed).
        activation: one of ``KERNEL_ACTIVATIONS``; ``negative_slope`` for leaky_relu.
        out: optional ``[R, C]`` destination (e.g. a view of a tensor of the caller's shape).
        stats: ``(mean, invstd)`` of an earlier call on the same x (``normalize``): the
            statistics kernels are skipped and the output is that call's, bit for bit (the
            backward's recomputation of a block output it did not save); or x's statistics
            from the Linear that made x (its epilogue's, ``linear.linear_forward_stats``).
        update: with ``stats``, ``(running_mean, running_var, var, momentum,
            num_batches_tracked or None)``: the same launch also updates the running
            statistics (``[C]`` contiguous, in place) from the given mean and the unbiased
            batch variance ``var`` (``[C]``), as the statistics kernels would have; the
            cumulative average (``momentum`` ignored) with ``num_batches_tracked``.

    Returns:
        ``(out, mean, invstd, var)``: out ``[R, C]`` contiguous in x's dtype; with
        ``normalize`` the batch mean, invstd and unbiased var ``[C]`` in the acc type (mean and
        invstd are saved for backward, var feeds the running estimate), else empty; with
        ``stats``, the given mean and invstd and None (nothing allocated for them).
    """
    _check(x, seed, activation)
    R, C = x.shape
    acc = acc_dtype(x.dtype)
    if out is None:
        out = torch.empty((R, C), dtype=x.dtype, device=x.device)
    weight, bias = BN._vec(weight), BN._vec(bias)
    if stats is not None:
        mean, invstd, var = BN._vec(stats[0]), BN._vec(stats[1]), None
    elif x.numel() == 0 or not normalize:
        mean, invstd, var = (x.new_empty(0, dtype=acc) for _ in range(3))  # distinct (custom op)
    if x.numel() == 0:
        return out, mean, invstd, var
    running = {**BN._no_update(out, out), "var_ptr": out}
    if update is not None:
        rm, rv, batch_var, momentum, nbt = update
        running = BN._update_args((rm, rv, momentum, nbt), mean, batch_var)
        running["var_ptr"] = batch_var
    with on_device(x):
        if normalize and stats is None:
            mean, invstd, var = BN.batch_norm_stats(x, eps)
        launch(
            _fused_fwd_kernel,
            _grid(R, C),
            configs=_TILE_CONFIGS if update is None else _UPDATE_TILE_CONFIGS,
            small_config=_TILE_CONFIGS[0],
            work=R * C,
            restore_value=() if update is None else ("rmean_ptr", "rvar_ptr"),
            # soR: a transposed output (the backward's recomputation for TF32's dW: soR == 1)
            # is tuned apart from a row-major one (soR == C): its stores run along the rows
            key=["R", "C", "soR"],
            interpret_config=_INTERPRET_TILE,
            x_ptr=x,
            out_ptr=out,
            mean_ptr=mean if normalize else out,
            invstd_ptr=invstd if normalize else out,
            w_ptr=weight if weight is not None else out,
            b_ptr=bias if bias is not None else out,
            seed_ptr=seed if seed is not None else out,
            R=R,
            C=C,
            sxR=x.stride(0),
            sxC=x.stride(1),
            soR=out.stride(0),
            soC=out.stride(1),
            p=float(p),
            scale=scale_arg(p, x.dtype),
            negative_slope=float(negative_slope),
            NORM=bool(normalize),
            HAS_W=normalize and weight is not None,
            HAS_B=normalize and bias is not None,
            ACTIVATION=activation,
            DROPOUT=seed is not None,
            ALIGNED=C % 4 == 0,
            FP64=acc == torch.float64,
            **running,
        )
    return out, mean, invstd, var


def act_dropout_backward(
    dy: torch.Tensor,
    saved: torch.Tensor,
    seed: torch.Tensor,
    p: float,
    activation: str,
    negative_slope: float,
    dx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Backward of the non-normalising block: ``dz = dout * keep * scale * act'(.)``.

    dy, saved: ``[R, C]``, any strides; ``saved`` is the forward's output when
    ``saves_output(activation, negative_slope)``, else its input (the pre-activation).
    Returns dz ``[R, C]`` in dy's dtype (written into ``dx`` when given, else contiguous).
    """
    _check(dy, seed, activation)
    R, C = dy.shape
    if dx is None:
        dx = torch.empty((R, C), dtype=dy.dtype, device=dy.device)
    if dy.numel() == 0:
        return dx
    with on_device(dy):
        launch(
            _fused_bwd_elementwise_kernel,
            _grid(R, C),
            configs=_TILE_CONFIGS,
            small_config=_TILE_CONFIGS[0],
            work=R * C,
            key=["R", "C"],
            interpret_config=_INTERPRET_TILE,
            dy_ptr=dy,
            t_ptr=saved,
            dx_ptr=dx,
            seed_ptr=seed,
            R=R,
            C=C,
            sdR=dy.stride(0),
            sdC=dy.stride(1),
            stR=saved.stride(0),
            stC=saved.stride(1),
            sgR=dx.stride(0),
            sgC=dx.stride(1),
            p=float(p),
            scale=scale_arg(p, dy.dtype),
            negative_slope=float(negative_slope),
            FROM_OUT=saves_output(activation, negative_slope),
            ACTIVATION=activation,
            ALIGNED=C % 4 == 0,
            FP64=dy.dtype == torch.float64,
        )
    return dx


def _backward_args(x, weight, bias, mean, invstd, seed, p, activation, negative_slope):
    """The two backward passes' shared launch arguments: ``(ptrs, common)``."""
    weight, bias = BN._vec(weight), BN._vec(bias)
    mean = BN._vec(mean)
    common = dict(
        p=float(p),
        scale=scale_arg(p, x.dtype),
        negative_slope=float(negative_slope),
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        ACTIVATION=activation,
        DROPOUT=seed is not None,
        ALIGNED=x.shape[1] % 4 == 0,
        FP64=x.dtype == torch.float64,
    )
    ptrs = dict(
        mean_ptr=mean,
        invstd_ptr=BN._vec(invstd),
        w_ptr=weight if weight is not None else mean,
        b_ptr=bias if bias is not None else mean,
        seed_ptr=seed if seed is not None else mean,
    )
    return ptrs, common


def bn_act_dropout_backward_sums(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    seed: torch.Tensor | None,
    p: float,
    activation: str,
    negative_slope: float,
    need_dweight: bool = True,
    need_dbias: bool = True,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Pass 1 of ``bn_act_dropout_backward`` (``_fused_bwd_reduce_kernel``): the column sums
    ``sum(g)`` and ``sum(g * (x - mean))`` and, from them, dweight and dbias.

    ``out``: an ``[R, C]`` destination (any strides; ``buf.t()`` of a contiguous ``[C, R]``
    buffer for a transposed one) that the same pass fills with the block's output
    ``dropout(act(bn(x)))``, bit for bit ``fused_forward``'s with these statistics (``APPLY``).

    Returns ``(psum_g, psum_gxmu, dweight, dbias)``: the sums as ``[C]`` (one split) or
    ``[n_split + 1, C]`` with the merged sums in the last row (``bn_act_dropout_backward_dx``
    reads them there), acc dtype; dweight/dbias in weight's dtype, None where not asked for.
    """
    _check(x, seed, activation)
    bound = _backward_args(x, weight, bias, mean, invstd, seed, p, activation, negative_slope)
    return _sums(dy, x, weight, bias, need_dweight, need_dbias, out, *bound)


def _sums(dy, x, weight, bias, need_dweight, need_dbias, out, ptrs, common):
    """``bn_act_dropout_backward_sums`` after its checks (``_backward_args``'s ptrs, common)."""
    R, C = x.shape
    acc = acc_dtype(x.dtype)
    need_dweight = need_dweight and weight is not None
    pdtype = weight.dtype if weight is not None else (bias.dtype if bias is not None else acc)
    with on_device(x):
        n_split, rows = _splits(R, C, x.device)
        final = n_split == 1  # one split: the reduction writes the merged sums itself
        dw = torch.empty(C, device=x.device, dtype=pdtype) if need_dweight else None
        db = torch.empty(C, device=x.device, dtype=pdtype) if need_dbias else None
        psum_g = torch.empty(_sums_shape(n_split, C), device=x.device, dtype=acc)
        psum_gxmu = torch.empty_like(psum_g)
        sum_g = psum_g if final else psum_g[-1]
        apply = out is not None
        launch(
            _fused_bwd_reduce_kernel,
            lambda meta: (cdiv(C, 4 * meta["BLOCK_Q"]), n_split),
            configs=_REDUCE_CONFIGS,
            small_config=_REDUCE_CONFIGS[0],
            work=R * C,
            # APPLY's stores (transposed: soR == 1) tune apart from the plain reduction
            key=["C", "rows_per_split", "soR"],
            interpret_config=_REDUCE_INTERPRET,
            x_ptr=x,
            dy_ptr=dy,
            psum_g_ptr=psum_g,
            psum_gxmu_ptr=psum_gxmu,
            dw_ptr=dw if dw is not None else sum_g,
            db_ptr=db if db is not None else sum_g,
            # one counter per column block: at most this many (the interpreter's 16 columns)
            cnt_ptr=psum_g if final else arrival_counters(x.device, cdiv(C, 16)),
            out_ptr=out if apply else x,
            R=R,
            C=C,
            sxR=x.stride(0),
            sxC=x.stride(1),
            sdR=dy.stride(0),
            sdC=dy.stride(1),
            soR=out.stride(0) if apply else 0,
            soC=out.stride(1) if apply else 0,
            rows_per_split=rows,
            FINAL=final,
            HAS_DW=dw is not None,
            HAS_DB=db is not None,
            APPLY=apply,
            **ptrs,
            **common,
        )
    return psum_g, psum_gxmu, dw, db


def bn_act_dropout_backward_dx(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    seed: torch.Tensor | None,
    p: float,
    activation: str,
    negative_slope: float,
    psum_g: torch.Tensor,
    psum_gxmu: torch.Tensor,
    transposed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Pass 2 of ``bn_act_dropout_backward`` (``_fused_bwd_dx_kernel``): dx ``[R, C]``
    contiguous in x's dtype, from ``bn_act_dropout_backward_sums``'s ``psum_g`` and
    ``psum_gxmu``. ``transposed``: ``(dxt [C, R], ws [cdiv(R, TRANSPOSED_ROWS), C])`` that the
    pass also fills with dx^T and dx's column sums (``TRANSPOSED``)."""
    _check(x, seed, activation)
    bound = _backward_args(x, weight, bias, mean, invstd, seed, p, activation, negative_slope)
    return _dx(dy, x, psum_g, psum_gxmu, transposed, *bound)


def _dx(dy, x, psum_g, psum_gxmu, transposed, ptrs, common):
    """``bn_act_dropout_backward_dx`` after its checks (``_backward_args``'s ptrs, common)."""
    R, C = x.shape
    dx = torch.empty((R, C), dtype=x.dtype, device=x.device)
    tr = transposed is not None
    sum_g = psum_g if psum_g.dim() == 1 else psum_g[-1]
    with on_device(x):
        launch(
            _fused_bwd_dx_kernel,
            _grid(R, C),
            configs=_TRANSPOSED_CONFIGS if tr else _TILE_CONFIGS,
            small_config=_TRANSPOSED_CONFIGS[0] if tr else _TILE_CONFIGS[0],
            work=R * C,
            key=["R", "C"],
            interpret_config=_TRANSPOSED_INTERPRET if tr else _INTERPRET_TILE,
            x_ptr=x,
            dy_ptr=dy,
            dx_ptr=dx,
            sum_g_ptr=sum_g,
            sum_gxmu_ptr=psum_gxmu if psum_gxmu.dim() == 1 else psum_gxmu[-1],
            dxt_ptr=transposed[0] if tr else dx,
            ws_ptr=transposed[1] if tr else sum_g,
            TRANSPOSED=tr,
            R=R,
            C=C,
            sxR=x.stride(0),
            sxC=x.stride(1),
            sdR=dy.stride(0),
            sdC=dy.stride(1),
            sgR=dx.stride(0),
            sgC=dx.stride(1),
            **ptrs,
            **common,
        )
    return dx


def bn_act_dropout_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    seed: torch.Tensor | None,
    p: float,
    activation: str,
    negative_slope: float,
    need_dx: bool = True,
    need_dweight: bool = True,
    need_dbias: bool = True,
    transposed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Backward of ``out = act(bn(x)) * keep * scale`` (BN with batch statistics).

    dy, x: ``[R, C]``, any strides; weight/bias: the BN parameters or None; mean/invstd: the
    forward's ``[C]`` statistics; seed: the forward's dropout seed or None. The gradient of the
    BN output, ``g = dy * keep * scale * act'(z)``, is recomputed from x in both passes (never
    stored). Launches: the split reduction (its last split per column block merges:
    ``bn_act_dropout_backward_sums``), then dx (``bn_act_dropout_backward_dx``, which also
    fills ``transposed``, with need_dx).
    Returns ``(dx, dweight, dbias)`` (None where not asked for): dx contiguous in x's dtype,
    dweight/dbias in weight's dtype.
    """
    _check(x, seed, activation)
    bound = _backward_args(x, weight, bias, mean, invstd, seed, p, activation, negative_slope)
    psum_g, psum_gxmu, dw, db = _sums(dy, x, weight, bias, need_dweight, need_dbias, None,
                                      *bound)  # fmt: skip
    dx = _dx(dy, x, psum_g, psum_gxmu, transposed, *bound) if need_dx else None
    return dx, dw, db


__all__ = [
    "KERNEL_ACTIVATIONS",
    "SUPPORTED_DTYPES",
    "act_dropout_backward",
    "bn_act_dropout_backward",
    "bn_act_dropout_backward_dx",
    "bn_act_dropout_backward_sums",
    "fused_forward",
    "saves_output",
]
