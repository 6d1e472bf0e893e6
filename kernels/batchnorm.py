"""Batch normalization kernels and their launchers.

Every input is viewed as ``(N, C, S)``: ``[N, C]`` has ``S = 1``, ``[N, C, L]`` has ``S = L``,
``[N, C, H, W]`` has ``S = H * W``. The statistics of channel ``c`` run over the
``R = N * S`` "rows" ``r = n * S + h * W + w``; a row's element offset is
``n * sN + h * sH + w * sW`` (any strides: channels_last, slices, expanded gradients), so
nothing is copied. Tiles are ``[BLOCK_C, BLOCK_R]`` (channels x rows); the row index is int64.

Computation type ("acc"): fp32 for fp32/fp16/bf16 inputs, fp64 for fp64 (gradcheck).
Parameters (weight, bias) and running statistics may be fp32 with fp16/bf16 inputs.

Kernels (launches per call, training, everything tracked):
    forward   ``_bn_stats_partial_kernel`` -> ``_bn_stats_final_kernel`` -> ``_bn_forward_kernel``;
              with a single split (small batches) the partial kernel writes the final
              statistics itself. The kernel that writes them can also update the running
              statistics (``batch_norm_stats(..., running)``: the eager path, with the forward
              then given the statistics); else ``_bn_update_running_kernel`` does, a separate
              in-place op. When the preceding Linear made the partial statistics in its
              epilogue (``linear.linear_forward_stats``), ``batch_norm_stats_merge`` runs the
              final kernel alone on them: no pass over the input; with ``eps`` that GEMM's
              last programs merge them too (``_merge_splits``): no launch at all.
    backward  ``_bn_backward_reduce_kernel`` -> ``_bn_backward_dx_kernel``: the reduction's
              last split of each channel block to arrive merges the splits' sums and writes
              dweight/dbias (``arrival``; with a single split it writes them directly)
Eval mode (running statistics) is one forward launch; its backward is one launch for dx
(plus the reduction launch only when weight/bias need gradients).

Reductions are deterministic: each program of a "partial" kernel owns a contiguous slice of
rows (a split) and a block of channels and writes its result to a ``[n_split, C]`` buffer;
a "final" kernel (the forward's statistics) or the last split to arrive (the backward's sums,
``arrival``) combines the splits in a fixed order. No float atomics (integer ones count the
arrivals).

Numerical stability of the statistics: within a split the sums are *shifted* by the split's
first row (``K``): ``S1 = sum(x - K)``, ``S2 = sum((x - K)^2)``, accumulated element-wise in
``[BLOCK_C, BLOCK_R]`` registers and reduced once at the end, so data whose mean is 1e4 times
its spread loses nothing to cancellation. Splits are merged with Chan et al.'s parallel
formula (counts, means, M2), in blocks of ``BLOCK_S`` splits.

For a later cross-layer fusion, ``_bn_forward_kernel`` is two clearly separated steps: the
per-channel ``(mean, scale, shift)`` and the per-element ``(x - mean) * scale + shift``.
"""

from __future__ import annotations

import functools
import struct

import torch
import triton
import triton.language as tl

from ..backend import acc_dtype
from .arrival import arrival_counters, last_arrival
from .launch import cdiv, flat_grid, flat_tile_ids, launch, next_power_of_2, on_device, row_splits

# ----------------------------------------------------------------------------------------------
# kernels
#
# Written without @triton.jit helper functions (the sm_90 compile test compiles each kernel on
# its own), so three idioms recur:
#   ACC: tl.constexpr = tl.float64 if FP64 else tl.float32       computation type
#   (r // S) * sN + (r % S // W) * sH + (r % W) * sW              offset of row r = n*S + h*W + w
#   1 / sqrt(v) correctly rounded: div_rn(1, sqrt_rn(v)) in fp32 (as torch), 1 / sqrt(v) in fp64
# With S = W = 1 (2-D input) triton specialises both to 1 and the divisions fold away.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _bn_stats_partial_kernel(
    x_ptr,
    pmean_ptr,
    pm2_ptr,
    var_ptr,
    rmean_ptr,
    rvar_ptr,
    nbt_ptr,
    R,
    C,
    S,
    W,
    sxN,
    sxC,
    sxH,
    sxW,
    rows_per_split,
    eps,
    momentum,
    momentum_lo,
    FINAL: tl.constexpr,
    UPDATE: tl.constexpr,
    CUMULATIVE: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Per split (program axis 1) and channel block (axis 0): mean and M2 of the split's rows.

    Shifted sums: ``K`` = the split's first row, ``S1 = sum(x - K)``, ``S2 = sum((x - K)^2)``
    accumulated element-wise in ``[BLOCK_C, BLOCK_R]`` registers, reduced once at the end;
    ``mean = K + S1 / n``, ``M2 = S2 - S1^2 / n``. x: any strides; pmean, pm2: ``[n_split, C]``.
    ``FINAL`` (one split: these are all the rows): the final statistics instead, as
    ``_bn_stats_final_kernel`` writes them: mean to pmean, invstd to pm2, the unbiased variance
    to var (``[C]`` each), without the merge launch; with ``UPDATE`` (only with ``FINAL``) it
    also updates the running statistics in place, as ``_bn_update_running_kernel`` (rmean,
    rvar: ``[C]`` contiguous; nbt, momentum, momentum_lo, CUMULATIVE: that kernel's).
    """
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    c_off = c.to(tl.int64) * sxC
    start = pid_s.to(tl.int64) * rows_per_split
    end = tl.minimum(start + rows_per_split, R)
    k_off = (start // S) * sxN + (start % S // W) * sxH + (start % W) * sxW
    shift = tl.load(x_ptr + c_off + k_off, mask=cmask, other=0.0).to(ACC)
    # an infinite (or NaN) first row shifts by 0 instead: x - K would be inf - inf = NaN in the
    # mean where torch's is +-inf (the variance is NaN either way)
    shift = tl.where(tl.abs(shift) < float("inf"), shift, 0.0)
    s1 = tl.zeros([BLOCK_C, BLOCK_R], dtype=ACC)
    s2 = tl.zeros([BLOCK_C, BLOCK_R], dtype=ACC)
    # Software prefetch: each iteration loads its tile before it accumulates the one the previous
    # iteration loaded (the first accumulates an empty tile, the last loads nothing), so two
    # tiles per program are in flight (triton does not pipeline loads that feed no tl.dot).
    x = tl.zeros([BLOCK_C, BLOCK_R], dtype=x_ptr.dtype.element_ty)
    mask = tl.zeros([BLOCK_C, BLOCK_R], dtype=tl.int1)
    for r0 in range(start, end + BLOCK_R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_off = (r // S) * sxN + (r % S // W) * sxH + (r % W) * sxW
        mask_next = cmask[:, None] & (r < end)[None, :]
        x_next = tl.load(x_ptr + c_off[:, None] + r_off[None, :], mask=mask_next, other=0.0)
        d = tl.where(mask, x.to(ACC) - shift[:, None], 0.0)
        s1 += d
        s2 += d * d
        x = x_next
        mask = mask_next
    n = (end - start).to(ACC)
    t1 = tl.sum(s1, 1)
    t2 = tl.sum(s2, 1)
    mean = shift + t1 / n
    m2 = t2 - t1 * (t1 / n)
    # finite x whose squared deviations overflow the sum (a variance near fp32's limit): M2 is
    # +inf (an infinite variance, as torch's), not inf - inf = NaN; an infinite x (t1 +-inf or
    # NaN) keeps the NaN
    m2 = tl.where((t2 == float("inf")) & (tl.abs(t1) < float("inf")), float("inf"), m2)
    # rounding below 0 clamps to 0; a NaN (an infinite x: inf - inf) stays NaN, as torch's
    # statistics (tl.maximum would return the 0)
    m2 = tl.where(m2 < 0.0, 0.0, m2)
    if FINAL:
        _store_final(
            pmean_ptr, pm2_ptr, var_ptr, rmean_ptr, rvar_ptr, nbt_ptr, c, cmask, mean, m2, R,
            eps, momentum, momentum_lo, UPDATE, CUMULATIVE, FP64, BLOCK_C,
        )  # fmt: skip
    else:
        out = pid_s * C + c
        tl.store(pmean_ptr + out, mean, mask=cmask)
        tl.store(pm2_ptr + out, m2, mask=cmask)


@triton.jit
def _invstd(m2, R, eps, FP64: tl.constexpr, BLOCK_C: tl.constexpr):
    """``1 / sqrt(M2 / R + eps)``, correctly rounded in fp32 (torch's CUDA batch norm)."""
    v = m2 / (R * 1.0) + eps
    if FP64:
        invstd = 1.0 / tl.sqrt(v)
    else:
        invstd = tl.math.div_rn(tl.full([BLOCK_C], 1.0, tl.float32), tl.sqrt_rn(v))
    return invstd


@triton.jit
def _store_final(
    mean_ptr,
    invstd_ptr,
    var_ptr,
    rmean_ptr,
    rvar_ptr,
    nbt_ptr,
    c,
    cmask,
    mean,
    m2,
    R,
    eps,
    momentum,
    momentum_lo,
    UPDATE: tl.constexpr,
    CUMULATIVE: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The final statistics of channels ``c`` from their ``mean`` and ``M2`` over all R rows:
    mean, invstd and the unbiased variance stored (``[C]``), and with ``UPDATE`` the running
    statistics updated (``_update_running``)."""
    var = m2 / (R * 1.0 - 1.0)
    tl.store(mean_ptr + c, mean, mask=cmask)
    tl.store(invstd_ptr + c, _invstd(m2, R, eps, FP64, BLOCK_C), mask=cmask)
    tl.store(var_ptr + c, var, mask=cmask)
    if UPDATE:
        _update_running(
            rmean_ptr, rvar_ptr, nbt_ptr, c, cmask, mean, var, momentum, momentum_lo,
            CUMULATIVE, FP64, BLOCK_C,
        )  # fmt: skip


@triton.jit
def _merge_splits(
    pmean_ptr,
    pm2_ptr,
    c,
    cmask,
    R,
    C,
    n_split,
    rows_per_split,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """``(mean, M2)`` of channels ``c`` (``[BLOCK_C]``, masked by ``cmask``) over all R rows,
    from the splits' ``[n_split, C]`` partial means and M2s (``rows_per_split`` rows each, the
    last one the rest of R): merged in a fixed order, blocks of ``BLOCK_S`` splits (Chan et
    al.). The partials are read from L2 (``.cg``): a GEMM's last program to arrive
    (``arrival``) merges what the other programs stored."""
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    n_a = tl.zeros([BLOCK_C], dtype=ACC)  # count merged so far
    for s0 in range(0, n_split, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        smask = s < n_split
        lo = s.to(tl.int64) * rows_per_split
        cnt = tl.where(smask, tl.minimum(lo + rows_per_split, R) - lo, 0).to(ACC)
        mask = smask[:, None] & cmask[None, :]
        off = s.to(tl.int64)[:, None] * C + c[None, :]
        pm = tl.load(pmean_ptr + off, mask=mask, other=0.0, cache_modifier=".cg")
        pq = tl.load(pm2_ptr + off, mask=mask, other=0.0, cache_modifier=".cg")
        # this block of splits: count, mean, M2
        n_b = tl.sum(cnt, 0)
        mean_b = tl.sum(cnt[:, None] * pm, 0) / n_b
        # an infinite partial mean (a split's sum that overflowed: its M2 is +inf, as torch's
        # variance; or an infinite x: its M2 is NaN) adds no deviation term: inf - inf = NaN
        d = tl.where(mask & (tl.abs(pm) < float("inf")), pm - mean_b[None, :], 0.0)
        m2_b = tl.sum(pq + cnt[:, None] * d * d, 0)
        # merged with the previous blocks
        n_ab = n_a + n_b
        delta = mean_b - mean
        frac = n_b / n_ab
        # an infinite mean (an infinite x: M2 is NaN already) takes the plain sum, as torch's:
        # the update's delta would be inf - inf = NaN where one side is infinite
        finite = (tl.abs(mean) < float("inf")) & (tl.abs(mean_b) < float("inf"))
        mean = tl.where(finite, mean + delta * frac, mean + mean_b)
        # delta * (delta * (n_a * frac)): the first block's term (n_a = 0) is 0 also when
        # delta^2 (its mean squared) overflows (|mean| beyond ~1.8e19 in fp32): inf * 0 = NaN;
        # an infinite mean on either side adds none (M2 carries the inf or NaN already)
        m2 = m2 + m2_b + tl.where(finite, delta * (delta * (n_a * frac)), 0.0)
        n_a = n_ab
    return mean, m2


@triton.jit
def _bn_stats_final_kernel(
    pmean_ptr,
    pm2_ptr,
    mean_ptr,
    invstd_ptr,
    var_ptr,
    rmean_ptr,
    rvar_ptr,
    nbt_ptr,
    R,
    C,
    n_split,
    rows_per_split,
    eps,
    momentum,
    momentum_lo,
    UPDATE: tl.constexpr,
    CUMULATIVE: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Merge the splits in a fixed order (blocks of ``BLOCK_S`` splits, Chan et al.): the mean,
    ``invstd = 1 / sqrt(M2 / R + eps)`` and the unbiased variance ``M2 / (R - 1)`` (for the
    running estimate). pmean, pm2: ``[n_split, C]``; mean, invstd, var: ``[C]``, acc type.
    ``UPDATE``: the running statistics too, as in ``_bn_stats_partial_kernel``.
    """
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid_c = tl.program_id(0)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean, m2 = _merge_splits(
        pmean_ptr, pm2_ptr, c, cmask, R, C, n_split, rows_per_split, ACC, BLOCK_C, BLOCK_S
    )
    _store_final(
        mean_ptr, invstd_ptr, var_ptr, rmean_ptr, rvar_ptr, nbt_ptr, c, cmask, mean, m2, R, eps,
        momentum, momentum_lo, UPDATE, CUMULATIVE, FP64, BLOCK_C,
    )  # fmt: skip


@triton.jit
def _bn_forward_kernel(
    x_ptr,
    y_ptr,
    mean_ptr,
    stat_ptr,
    w_ptr,
    b_ptr,
    R,
    C,
    S,
    W,
    sxN,
    sxC,
    sxH,
    sxW,
    syN,
    syC,
    syH,
    syW,
    eps,
    STAT_IS_VAR: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """The normalization: ``y = (x - mean) * scale + shift`` on one ``[BLOCK_C, BLOCK_R]`` tile.

    Grid: (row blocks, channel blocks), flat (``flat_grid``). Two steps, kept apart so that
    another kernel can take over step 2 (cross-layer fusion):
      1. per channel: ``mean``, ``scale = invstd * weight``, ``shift = bias``, where ``stat`` is
         invstd (batch statistics) or the running variance (``STAT_IS_VAR``: invstd computed here);
      2. per element: ``(x - mean) * scale + shift`` (``x - mean`` first: with large offsets
         ``x * scale + (shift - mean * scale)`` would cancel), stored in y's dtype and strides.
    """
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid_r, pid_c = flat_tile_ids(tl.cdiv(R, BLOCK_R))
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    # 1. per-channel affine
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(ACC)
    stat = tl.load(stat_ptr + c, mask=cmask, other=1.0).to(ACC)
    if STAT_IS_VAR:
        if FP64:
            invstd = 1.0 / tl.sqrt(stat + eps)
        else:
            invstd = tl.math.div_rn(tl.full([BLOCK_C], 1.0, ACC), tl.sqrt_rn(stat + eps))
    else:
        invstd = stat
    if HAS_W:
        scale = invstd * tl.load(w_ptr + c, mask=cmask, other=0.0).to(ACC)
    else:
        scale = invstd
    if HAS_B:
        shift = tl.load(b_ptr + c, mask=cmask, other=0.0).to(ACC)
    else:
        shift = tl.zeros([BLOCK_C], dtype=ACC)
    # 2. per-element normalization
    r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = cmask[:, None] & (r < R)[None, :]
    c64 = c.to(tl.int64)
    x_off = c64[:, None] * sxC + ((r // S) * sxN + (r % S // W) * sxH + (r % W) * sxW)[None, :]
    x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(ACC)
    y = (x - mean[:, None]) * scale[:, None] + shift[:, None]
    y_off = c64[:, None] * syC + ((r // S) * syN + (r % S // W) * syH + (r % W) * syW)[None, :]
    tl.store(y_ptr + y_off, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_update_running_kernel(
    rmean_ptr,
    rvar_ptr,
    mean_ptr,
    var_ptr,
    nbt_ptr,
    C,
    momentum,
    momentum_lo,
    CUMULATIVE: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """In place: ``running = f * batch + (1 - f) * running`` for the mean and the (unbiased)
    variance. ``f = momentum``, or ``1 / num_batches_tracked`` read on the device when
    ``CUMULATIVE`` (torch's ``momentum=None``), so there is no host sync.

    A float argument reaches a kernel as fp32: for float64 statistics ``momentum_lo`` carries
    the rest (``momentum + momentum_lo`` is the float64 value to ~2^-48), as torch's double.
    """
    pid = tl.program_id(0)
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0)
    var = tl.load(var_ptr + c, mask=cmask, other=0.0)
    _update_running(
        rmean_ptr, rvar_ptr, nbt_ptr, c, cmask, mean, var, momentum, momentum_lo, CUMULATIVE,
        FP64, BLOCK_C,
    )  # fmt: skip


@triton.jit
def _update_running(
    rmean_ptr,
    rvar_ptr,
    nbt_ptr,
    c,
    cmask,
    mean,
    var,
    momentum,
    momentum_lo,
    CUMULATIVE: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``running = f * batch + (1 - f) * running`` for channels ``c`` (``[BLOCK_C]``, masked by
    ``cmask``) from the batch ``mean`` and unbiased ``var`` (acc type); see
    ``_bn_update_running_kernel`` for f."""
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    if CUMULATIVE:
        if FP64:
            f = 1.0 / (tl.load(nbt_ptr).to(tl.float64) + tl.zeros([BLOCK_C], tl.float64))
        else:
            nbt = tl.load(nbt_ptr).to(tl.float32)
            f = tl.math.div_rn(
                tl.full([BLOCK_C], 1.0, tl.float32), nbt + tl.zeros([BLOCK_C], tl.float32)
            )
    elif FP64:
        f = (tl.zeros([BLOCK_C], tl.float64) + momentum) + momentum_lo
    else:
        f = momentum
    rm = tl.load(rmean_ptr + c, mask=cmask, other=0.0).to(ACC)
    rv = tl.load(rvar_ptr + c, mask=cmask, other=0.0).to(ACC)
    rm = f * mean + (1.0 - f) * rm
    rv = f * var + (1.0 - f) * rv
    tl.store(rmean_ptr + c, rm.to(rmean_ptr.dtype.element_ty), mask=cmask)
    tl.store(rvar_ptr + c, rv.to(rvar_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _bn_backward_reduce_kernel(
    x_ptr,
    dy_ptr,
    mean_ptr,
    psum_dy_ptr,
    psum_dyxmu_ptr,
    stat_ptr,
    dw_ptr,
    db_ptr,
    cnt_ptr,
    R,
    C,
    S,
    W,
    sxN,
    sxC,
    sxH,
    sxW,
    sdN,
    sdC,
    sdH,
    sdW,
    rows_per_split,
    eps,
    FINAL: tl.constexpr,
    STAT_IS_VAR: tl.constexpr,
    HAS_DW: tl.constexpr,
    HAS_DB: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Pass 1 of the backward: per split, ``sum(dy)`` and ``sum(dy * (x - mean))`` per channel,
    accumulated element-wise and reduced once. psum_*: ``[n_split + 1, C]``, acc type: split
    ``s`` stores at row s; the last split of a channel block to arrive merges rows 0..n_split-1
    into row n_split (the sums the dx pass reads) and dweight/dbias (``_merge_grad_sums``;
    counter ``cnt_ptr[pid_c]``). ``FINAL`` (one split): psum_* are the sums ``[C]``, stored
    directly.
    """
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    cx = c.to(tl.int64) * sxC
    cd = c.to(tl.int64) * sdC
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(ACC)
    start = pid_s.to(tl.int64) * rows_per_split
    end = tl.minimum(start + rows_per_split, R)
    a1 = tl.zeros([BLOCK_C, BLOCK_R], dtype=ACC)
    a2 = tl.zeros([BLOCK_C, BLOCK_R], dtype=ACC)
    # Software prefetch, as in _bn_stats_partial_kernel.
    x = tl.zeros([BLOCK_C, BLOCK_R], dtype=x_ptr.dtype.element_ty)
    dy = tl.zeros([BLOCK_C, BLOCK_R], dtype=dy_ptr.dtype.element_ty)
    mask = tl.zeros([BLOCK_C, BLOCK_R], dtype=tl.int1)
    for r0 in range(start, end + BLOCK_R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mask_next = cmask[:, None] & (r < end)[None, :]
        x_off = cx[:, None] + ((r // S) * sxN + (r % S // W) * sxH + (r % W) * sxW)[None, :]
        d_off = cd[:, None] + ((r // S) * sdN + (r % S // W) * sdH + (r % W) * sdW)[None, :]
        x_next = tl.load(x_ptr + x_off, mask=mask_next, other=0.0)
        dy_next = tl.load(dy_ptr + d_off, mask=mask_next, other=0.0)
        a1 += dy.to(ACC)
        a2 += dy.to(ACC) * tl.where(mask, x.to(ACC) - mean[:, None], 0.0)
        x = x_next
        dy = dy_next
        mask = mask_next
    if FINAL:
        _store_grad_sums(
            tl.sum(a1, 1), tl.sum(a2, 1), c, cmask, stat_ptr, psum_dy_ptr, psum_dyxmu_ptr,
            dw_ptr, db_ptr, eps, STAT_IS_VAR, HAS_DW, HAS_DB, FP64,
        )  # fmt: skip
    else:
        out = pid_s * C + c
        tl.store(psum_dy_ptr + out, tl.sum(a1, 1), mask=cmask)
        tl.store(psum_dyxmu_ptr + out, tl.sum(a2, 1), mask=cmask)
        _merge_grad_sums(
            psum_dy_ptr, psum_dyxmu_ptr, cnt_ptr + pid_c, c, cmask, C, stat_ptr,
            psum_dy_ptr + tl.num_programs(1) * C, psum_dyxmu_ptr + tl.num_programs(1) * C,
            dw_ptr, db_ptr, eps, STAT_IS_VAR, HAS_DW, HAS_DB, FP64,
        )  # fmt: skip


@triton.jit
def _merge_grad_sums(
    psum_dy_ptr, psum_dyxmu_ptr, counter_ptr, c, cmask, C, stat_ptr, sum_dy_ptr, sum_dyxmu_ptr,
    dw_ptr, db_ptr, eps, STAT_IS_VAR: tl.constexpr, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr,
    FP64: tl.constexpr,
):  # fmt: skip
    """After this split stored its sums of channels ``c`` (1-D) at row ``program_id(1)`` of
    psum_* ``[n_split, C]`` (n_split = the grid's axis 1): the last split of the channel block
    to arrive (``arrival``) merges every split's, in a fixed order (blocks of 8 splits, then
    a sum over the block), into the sums and dweight/dbias (``_store_grad_sums``). The merge
    launch this replaces read the same partials from every channel block's one program."""
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    BLOCK_S: tl.constexpr = 8
    n_split = tl.num_programs(1)
    if last_arrival(counter_ptr, n_split):
        a1 = tl.zeros([BLOCK_S, c.shape[0]], dtype=ACC)
        a2 = tl.zeros([BLOCK_S, c.shape[0]], dtype=ACC)
        for s0 in range(0, n_split, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = (s < n_split)[:, None] & cmask[None, :]
            off = s.to(tl.int64)[:, None] * C + c[None, :]
            a1 += tl.load(psum_dy_ptr + off, mask=mask, other=0.0, cache_modifier=".cg")
            a2 += tl.load(psum_dyxmu_ptr + off, mask=mask, other=0.0, cache_modifier=".cg")
        _store_grad_sums(
            tl.sum(a1, 0), tl.sum(a2, 0), c, cmask, stat_ptr, sum_dy_ptr, sum_dyxmu_ptr,
            dw_ptr, db_ptr, eps, STAT_IS_VAR, HAS_DW, HAS_DB, FP64,
        )  # fmt: skip


@triton.jit
def _store_grad_sums(
    sum_dy, sum_dyxmu, c, cmask, stat_ptr, sum_dy_ptr, sum_dyxmu_ptr, dw_ptr, db_ptr, eps,
    STAT_IS_VAR: tl.constexpr, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr, FP64: tl.constexpr,
):  # fmt: skip
    """The backward's merged sums of channels ``c`` (1-D): stored for the dx pass, and
    ``dweight = sum_dyxmu * invstd``, ``dbias = sum_dy`` in the parameters' dtype."""
    tl.store(sum_dy_ptr + c, sum_dy, mask=cmask)
    tl.store(sum_dyxmu_ptr + c, sum_dyxmu, mask=cmask)
    if HAS_DW:
        stat = tl.load(stat_ptr + c, mask=cmask, other=1.0).to(sum_dy.dtype)
        if STAT_IS_VAR:
            if FP64:
                invstd = 1.0 / tl.sqrt(stat + eps)
            else:
                invstd = tl.math.div_rn(
                    tl.full(stat.shape, 1.0, tl.float32), tl.sqrt_rn(stat + eps)
                )
        else:
            invstd = stat
        tl.store(dw_ptr + c, (sum_dyxmu * invstd).to(dw_ptr.dtype.element_ty), mask=cmask)
    if HAS_DB:
        tl.store(db_ptr + c, sum_dy.to(db_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _bn_backward_dx_kernel(
    x_ptr,
    dy_ptr,
    dx_ptr,
    mean_ptr,
    stat_ptr,
    w_ptr,
    sum_dy_ptr,
    sum_dyxmu_ptr,
    R,
    C,
    S,
    W,
    sxN,
    sxC,
    sxH,
    sxW,
    sdN,
    sdC,
    sdH,
    sdW,
    sgN,
    sgC,
    sgH,
    sgW,
    eps,
    TRAINING: tl.constexpr,
    HAS_W: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Pass 2 of the backward, one ``[BLOCK_C, BLOCK_R]`` tile of dx.

    Training (batch statistics, stat = invstd):
        ``dx = w * invstd * (dy - sum_dy / R - (x - mean) * invstd^2 * sum_dyxmu / R)``
    Eval (running statistics, stat = running_var): ``dx = dy * w / sqrt(var + eps)``.
    """
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid_r, pid_c = flat_tile_ids(tl.cdiv(R, BLOCK_R))
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    stat = tl.load(stat_ptr + c, mask=cmask, other=1.0).to(ACC)
    if TRAINING:
        invstd = stat
    else:
        if FP64:
            invstd = 1.0 / tl.sqrt(stat + eps)
        else:
            invstd = tl.math.div_rn(tl.full([BLOCK_C], 1.0, ACC), tl.sqrt_rn(stat + eps))
    if HAS_W:
        a = invstd * tl.load(w_ptr + c, mask=cmask, other=0.0).to(ACC)
    else:
        a = invstd
    r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = cmask[:, None] & (r < R)[None, :]
    c64 = c.to(tl.int64)
    d_off = c64[:, None] * sdC + ((r // S) * sdN + (r % S // W) * sdH + (r % W) * sdW)[None, :]
    dy = tl.load(dy_ptr + d_off, mask=mask, other=0.0).to(ACC)
    if TRAINING:
        mean = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(ACC)
        n = R * 1.0
        b = tl.load(sum_dy_ptr + c, mask=cmask, other=0.0) / n
        # sum_dyxmu first (torch's order): a constant channel's 0 stays 0 where invstd^2
        # overflows (var + eps below ~3e-39 in fp32), not 0 * inf = NaN
        k = tl.load(sum_dyxmu_ptr + c, mask=cmask, other=0.0) * invstd * invstd / n
        x_off = c64[:, None] * sxC + ((r // S) * sxN + (r % S // W) * sxH + (r % W) * sxW)[None, :]
        x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(ACC)
        dx = (dy - b[:, None] - (x - mean[:, None]) * k[:, None]) * a[:, None]
    else:
        dx = dy * a[:, None]
    g_off = c64[:, None] * sgC + ((r // S) * sgN + (r % S // W) * sgH + (r % W) * sgW)[None, :]
    tl.store(dx_ptr + g_off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------------

# [BLOCK_C, BLOCK_R] tiles: wide in C for [N, C] (C contiguous), wide in R for NCHW (S contiguous).
_TILE_CONFIGS = [
    triton.Config({"BLOCK_C": 64, "BLOCK_R": 64}, num_warps=8),
    triton.Config({"BLOCK_C": 128, "BLOCK_R": 32}, num_warps=8),
    triton.Config({"BLOCK_C": 32, "BLOCK_R": 64}, num_warps=4),
    triton.Config({"BLOCK_C": 256, "BLOCK_R": 16}, num_warps=8),
    triton.Config({"BLOCK_C": 16, "BLOCK_R": 256}, num_warps=8),
    triton.Config({"BLOCK_C": 4, "BLOCK_R": 1024}, num_warps=8),
]
_FINAL_CONFIGS = [triton.Config({"BLOCK_C": 128, "BLOCK_S": 16}, num_warps=4)]
_UPDATE_CONFIGS = [triton.Config({"BLOCK_C": 256}, num_warps=4)]


_INTERPRET_SMALL_TILE = triton.Config({"BLOCK_C": 16, "BLOCK_R": 16}, num_warps=4)


def _interpret_tile(R: int, C: int) -> triton.Config:
    """Interpreter tile: small (many tiles, splits and channel blocks in small tests); long
    rows and no idle channels for big batches, so that N = 1,000,000 stays quick there.
    (Evaluated at every launch, also on a GPU: a shared constant or a cached one.)"""
    if R <= 4096:
        return _INTERPRET_SMALL_TILE
    return _interpret_big_tile(min(16384, next_power_of_2(cdiv(R, 64))), min(16, C))


@functools.lru_cache(maxsize=64)
def _interpret_big_tile(block_r: int, c: int) -> triton.Config:
    return triton.Config({"BLOCK_C": next_power_of_2(c), "BLOCK_R": block_r}, num_warps=8)


_INTERPRET_FINAL = triton.Config({"BLOCK_C": 16, "BLOCK_S": 2}, num_warps=4)
_INTERPRET_UPDATE = triton.Config({"BLOCK_C": 16}, num_warps=4)


def _splits(R: int, C: int, device: torch.device) -> tuple[int, int]:
    """(n_split, rows_per_split) for the reductions (``launch.row_splits``)."""
    return row_splits(R, C, device, block_c=64, align=128, cpu_splits=4, cpu_min_rows=32)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def _geometry(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(R, C, S, W) of a [N, C], [N, C, L] or [N, C, H, W] tensor."""
    N, C = t.shape[0], t.shape[1]
    if t.dim() == 2:
        return N, C, 1, 1
    if t.dim() == 3:
        return N * t.shape[2], C, t.shape[2], t.shape[2]
    if t.dim() == 4:
        S = t.shape[2] * t.shape[3]
        return N * S, C, S, t.shape[3]
    raise ValueError(f"batch_norm kernels take 2-D, 3-D or 4-D input, got {t.dim()}-D")


_STRIDE_NAMES = {p: tuple(f"s{p}{k}" for k in "NCHW") for p in "xydg"}


def _strides(t: torch.Tensor, p: str) -> dict:
    """(sN, sC, sH, sW) as kernel arguments named ``s{p}N`` ... (``p`` in x, y, d, g)."""
    st = t.stride()
    if len(st) == 2:
        v = (st[0], st[1], 0, 0)
    elif len(st) == 3:
        v = (st[0], st[1], 0, st[2])
    else:
        v = st
    return dict(zip(_STRIDE_NAMES[p], v))


def _vec(t: torch.Tensor | None) -> torch.Tensor | None:
    """A per-channel vector as a contiguous 1-D tensor: ``t`` itself when it already is one (no
    view object per launch), else a contiguous view of its elements."""
    if t is None or (t.dim() == 1 and t.is_contiguous()):
        return t
    return t.contiguous().view(-1)


def _no_update(mean: torch.Tensor, var: torch.Tensor) -> dict:
    """The running-update arguments of a statistics kernel that updates nothing (placeholder
    pointers, never read without ``UPDATE``)."""
    return dict(
        rmean_ptr=mean, rvar_ptr=var, nbt_ptr=mean, momentum=0.0, momentum_lo=0.0,
        UPDATE=False, CUMULATIVE=False,
    )  # fmt: skip


def batch_norm_stats(
    x: torch.Tensor, eps: float, running: tuple | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel batch statistics of ``x`` ([N, C], [N, C, L], [N, C, H, W]; any strides).

    Returns ``(mean, invstd, var)``, each ``[C]`` in the acc type: ``invstd = 1 / sqrt(biased
    var + eps)`` and ``var`` the unbiased variance (for the running estimate). Two launches:
    the split partials, then their merge; one when a single split holds every row.

    ``running``: ``(running_mean, running_var, momentum, num_batches_tracked)`` to update in
    place by the launch that writes the final statistics, as ``batch_norm_update_running``
    (same arithmetic, same bits) without its launch; the running tensors ``[C]`` contiguous.
    """
    R, C, S, W = _geometry(x)
    acc = acc_dtype(x.dtype)
    n_split, rows = _splits(R, C, x.device)
    mean = torch.empty(C, device=x.device, dtype=acc)
    invstd = torch.empty(C, device=x.device, dtype=acc)
    var = torch.empty(C, device=x.device, dtype=acc)
    final = n_split == 1  # one split holds every row: final statistics, no merge launch
    pmean = mean if final else torch.empty((n_split, C), device=x.device, dtype=acc)
    pm2 = invstd if final else torch.empty((n_split, C), device=x.device, dtype=acc)
    update = _update_args(running, mean, var)
    launch(
        _bn_stats_partial_kernel,
        lambda meta: (cdiv(C, meta["BLOCK_C"]), n_split),
        configs=_TILE_CONFIGS,
        small_config=_TILE_CONFIGS[0],
        work=R * C * S,
        key=["C", "S", "rows_per_split"],
        # the update is in place: tuning runs every configuration on the same running stats
        restore_value=["rmean_ptr", "rvar_ptr"],
        interpret_config=_interpret_tile(R, C),
        x_ptr=x,
        pmean_ptr=pmean,
        pm2_ptr=pm2,
        var_ptr=var,
        R=R,
        C=C,
        S=S,
        W=W,
        **_strides(x, "x"),
        rows_per_split=rows,
        eps=float(eps),
        FINAL=final,
        FP64=acc == torch.float64,
        **(update if final else _no_update(mean, var)),
    )
    if final:
        return mean, invstd, var
    _merge(pmean, pm2, mean, invstd, var, R, rows, eps, update)
    return mean, invstd, var


def _update_args(running: tuple | None, mean: torch.Tensor, var: torch.Tensor) -> dict:
    """The running-update arguments of the kernel that writes the final statistics:
    ``running`` = ``(running_mean, running_var, momentum, num_batches_tracked)`` or None."""
    if running is None:
        return _no_update(mean, var)
    rm, rv, momentum, nbt = running
    hi = _fp32(float(momentum))
    return dict(
        rmean_ptr=rm,
        rvar_ptr=rv,
        nbt_ptr=nbt if nbt is not None else mean,
        momentum=hi,
        momentum_lo=float(momentum) - hi,
        UPDATE=True,
        CUMULATIVE=nbt is not None,
    )


def _merge(pmean, pm2, mean, invstd, var, R: int, rows: int, eps: float, update: dict) -> None:
    """``_bn_stats_final_kernel``: the splits' (mean, M2) ``[n_split, C]`` of ``rows`` rows each
    (the last one the rest of R) into mean, invstd and var ``[C]``."""
    n_split, C = pmean.shape
    launch(
        _bn_stats_final_kernel,
        lambda meta: (cdiv(C, meta["BLOCK_C"]),),
        configs=_FINAL_CONFIGS,
        interpret_config=_INTERPRET_FINAL,
        pmean_ptr=pmean,
        pm2_ptr=pm2,
        mean_ptr=mean,
        invstd_ptr=invstd,
        var_ptr=var,
        R=R,
        C=C,
        n_split=n_split,
        rows_per_split=rows,
        eps=float(eps),
        FP64=pmean.dtype == torch.float64,
        **update,
    )


def batch_norm_stats_merge(
    pmean: torch.Tensor, pm2: torch.Tensor, rows: int, R: int, eps: float, running: tuple | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``batch_norm_stats``'s result for an [R, C] input from partial statistics already made
    (``linear.linear_forward_stats``: the preceding Linear's epilogue): ``pmean``, ``pm2``
    ``[cdiv(R, rows), C]`` contiguous, the mean and M2 of each split of ``rows`` rows. One
    launch (the merge, with the running-statistics update), no pass over the input."""
    C = pmean.shape[1]
    mean = torch.empty(C, device=pmean.device, dtype=pmean.dtype)
    invstd = torch.empty_like(mean)
    var = torch.empty_like(mean)
    with on_device(pmean):
        _merge(pmean, pm2, mean, invstd, var, R, rows, eps, _update_args(running, mean, var))
    return mean, invstd, var


def batch_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    eps: float,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Batch normalization forward.

    x: [N, C], [N, C, L] or [N, C, H, W], any strides, fp32/fp16/bf16 (fp64 for gradcheck).
    weight, bias: [C] or None. training=True normalizes with the batch statistics (running
    stats unused, may be None); training=False with ``running_mean``/``running_var``.
    Returns ``(y, mean, invstd, var)``: y like x (``empty_like``: channels_last is kept);
    in training ``mean``, ``invstd`` (saved for backward) and the unbiased ``var`` (for the
    running estimate) are [C] in the acc type (fp32, fp64 for fp64 input); in eval they are
    empty (the backward reads the running statistics). ``stats`` (training only): the batch
    ``(mean, invstd)`` of this x from ``batch_norm_stats``: no statistics kernels; they are
    returned with None for var.
    """
    R, C, S, W = _geometry(x)
    acc = acc_dtype(x.dtype)
    weight, bias = _vec(weight), _vec(bias)
    y = torch.empty_like(x)
    with on_device(x):
        if training and stats is not None:
            (mean, invstd), var = map(_vec, stats), None
            stat = invstd
        elif training:
            mean, invstd, var = batch_norm_stats(x, eps)
            stat = invstd
        else:
            mean, stat = _vec(running_mean), _vec(running_var)
        launch(
            _bn_forward_kernel,
            lambda meta: flat_grid(cdiv(R, meta["BLOCK_R"]), cdiv(C, meta["BLOCK_C"])),
            configs=_TILE_CONFIGS,
            small_config=_TILE_CONFIGS[0],
            work=R * C * S,
            key=["R", "C", "S"],
            interpret_config=_interpret_tile(R, C),
            x_ptr=x,
            y_ptr=y,
            mean_ptr=mean,
            stat_ptr=stat,
            w_ptr=weight if weight is not None else mean,
            b_ptr=bias if bias is not None else mean,
            R=R,
            C=C,
            S=S,
            W=W,
            **_strides(x, "x"),
            **_strides(y, "y"),
            eps=float(eps),
            STAT_IS_VAR=not training,
            HAS_W=weight is not None,
            HAS_B=bias is not None,
            FP64=acc == torch.float64,
        )
    if not training:
        mean, invstd, var = (x.new_empty(0, dtype=acc) for _ in range(3))
    return y, mean, invstd, var


def _fp32(value: float) -> float:
    """``value`` rounded to fp32, as a float kernel argument arrives (inf beyond its range)."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return float("inf") if value > 0 else float("-inf")


def batch_norm_update_running(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    momentum: float,
    num_batches_tracked: torch.Tensor | None = None,
) -> None:
    """In place: ``running = (1 - f) * running + f * batch`` for mean and (unbiased) var.

    ``f = momentum``, or, when ``num_batches_tracked`` (an int64 scalar tensor, already
    incremented) is given, ``1 / num_batches_tracked`` computed on the device (torch's
    cumulative average for ``momentum=None``). Running stats: [C], any float dtype.
    """
    C = mean.numel()
    hi = _fp32(float(momentum))
    rm = running_mean if running_mean.is_contiguous() else running_mean.contiguous()
    rv = running_var if running_var.is_contiguous() else running_var.contiguous()
    with on_device(mean):
        launch(
            _bn_update_running_kernel,
            lambda meta: (cdiv(C, meta["BLOCK_C"]),),
            configs=_UPDATE_CONFIGS,
            interpret_config=_INTERPRET_UPDATE,
            rmean_ptr=rm,
            rvar_ptr=rv,
            mean_ptr=mean,
            var_ptr=var,
            nbt_ptr=num_batches_tracked if num_batches_tracked is not None else mean,
            C=C,
            momentum=hi,
            momentum_lo=float(momentum) - hi,
            CUMULATIVE=num_batches_tracked is not None,
            FP64=mean.dtype == torch.float64,
        )
    if rm is not running_mean:
        running_mean.copy_(rm)
    if rv is not running_var:
        running_var.copy_(rv)


def batch_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    stat: torch.Tensor,
    training: bool,
    eps: float,
    need_dx: bool = True,
    need_dweight: bool = True,
    need_dbias: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Batch normalization backward: ``(dx, dweight, dbias)`` (None where not asked for).

    dy, x: same shape, any strides. training=True: ``mean``/``stat`` are the saved batch mean
    and invstd; training=False: the running mean and variance. Two passes over (x, dy): a
    split reduction for sum(dy), sum(dy * (x - mean)) (its last split per channel block to
    arrive merges the splits), then dx.
    In eval mode without weight/bias gradients only the dx pass runs. dx like x (its dtype);
    dweight/dbias in weight's dtype.
    """
    R, C, S, W = _geometry(x)
    acc = acc_dtype(x.dtype)
    weight = _vec(weight)
    mean, stat = _vec(mean), _vec(stat)
    need_dweight = need_dweight and weight is not None
    dx = dw = db = None
    sum_dy = sum_dyxmu = None
    with on_device(x):
        if training or need_dweight or need_dbias:
            n_split, rows = _splits(R, C, x.device)
            final = n_split == 1  # one split: the reduction writes the merged sums itself
            pdtype = weight.dtype if weight is not None else acc
            dw = torch.empty(C, device=x.device, dtype=pdtype) if need_dweight else None
            db = torch.empty(C, device=x.device, dtype=pdtype) if need_dbias else None
            # the splits' rows, then the merged sums' (``_bn_backward_reduce_kernel``)
            shape = (C,) if final else (n_split + 1, C)
            psum_dy = torch.empty(shape, device=x.device, dtype=acc)
            psum_dyxmu = torch.empty(shape, device=x.device, dtype=acc)
            sum_dy, sum_dyxmu = (psum_dy, psum_dyxmu) if final else (psum_dy[-1], psum_dyxmu[-1])
            grads = dict(
                stat_ptr=stat,
                dw_ptr=dw if dw is not None else sum_dy,
                db_ptr=db if db is not None else sum_dy,
                eps=float(eps),
                STAT_IS_VAR=not training,
                HAS_DW=dw is not None,
                HAS_DB=db is not None,
                FP64=acc == torch.float64,
            )
            launch(
                _bn_backward_reduce_kernel,
                lambda meta: (cdiv(C, meta["BLOCK_C"]), n_split),
                configs=_TILE_CONFIGS,
                small_config=_TILE_CONFIGS[0],
                work=R * C * S,
                key=["C", "S", "rows_per_split"],
                interpret_config=_interpret_tile(R, C),
                x_ptr=x,
                dy_ptr=dy,
                mean_ptr=mean,
                psum_dy_ptr=psum_dy,
                psum_dyxmu_ptr=psum_dyxmu,
                # one counter per channel block, at most this many (the smallest BLOCK_C)
                cnt_ptr=psum_dy if final else arrival_counters(x.device, cdiv(C, 4)),
                R=R,
                C=C,
                S=S,
                W=W,
                **_strides(x, "x"),
                **_strides(dy, "d"),
                rows_per_split=rows,
                FINAL=final,
                **grads,
            )
        if need_dx:
            dx = torch.empty_like(x)
            launch(
                _bn_backward_dx_kernel,
                lambda meta: flat_grid(cdiv(R, meta["BLOCK_R"]), cdiv(C, meta["BLOCK_C"])),
                configs=_TILE_CONFIGS,
                small_config=_TILE_CONFIGS[0],
                work=R * C * S,
                key=["R", "C", "S"],
                interpret_config=_interpret_tile(R, C),
                x_ptr=x,
                dy_ptr=dy,
                dx_ptr=dx,
                mean_ptr=mean,
                stat_ptr=stat,
                w_ptr=weight if weight is not None else stat,
                sum_dy_ptr=sum_dy if sum_dy is not None else stat,
                sum_dyxmu_ptr=sum_dyxmu if sum_dyxmu is not None else stat,
                R=R,
                C=C,
                S=S,
                W=W,
                **_strides(x, "x"),
                **_strides(dy, "d"),
                **_strides(dx, "g"),
                eps=float(eps),
                TRAINING=training,
                HAS_W=weight is not None,
                FP64=acc == torch.float64,
            )
    return dx, dw, db


__all__ = [
    "batch_norm_backward",
    "batch_norm_forward",
    "batch_norm_stats",
    "batch_norm_stats_merge",
    "batch_norm_update_running",
]
