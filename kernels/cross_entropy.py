"""Fused softmax + negative log-likelihood (cross-entropy) over class indices.

Forward (``cross_entropy_fwd``): one program per row of ``logits`` [N, C] (any strides). The row
is streamed in chunks of ``BLOCK_C`` classes with an online softmax (running max ``m`` and
running sum ``s`` of ``exp(x - m)``), so a row is never loaded whole (C = 262,144 works). With
``COMPUTE_GRAD`` the same program streams the row a second time and writes d(row loss)/d(logits)
into its own buffer ``grad`` [N, C] (contiguous, logits dtype), optionally multiplied by
``*SCALE`` (1 / sum of w[y], the 'mean' normaliser, a device scalar): no host synchronisation;
or by ``host_scale`` (1 / N when the host knows the normaliser: no row ignored, no weights).

Row loss (torch's definition, ``eps`` = label_smoothing, ``w`` = class weights or ones):
    L = (1 - eps) * w[y] * (lse - x[y]) + (eps / C) * sum_c w[c] * (lse - x[c])
Gradient derived from it (``p = softmax(x)``, ``W = sum_c w[c]``):
    dL/dx[j] = p[j] * ((1 - eps) * w[y] + (eps / C) * W) - (1 - eps) * w[y] * [j == y] - (eps / C) * w[j]
Ignored rows (target == ignore_index) write loss 0 and a gradient row of 0, or of NaN as
torch's where it differentiates NaN through the row (a NaN or +inf logit, every logit -inf, or
with label smoothing a non-finite class weight): one read of the row. Rows whose target is out
of range write loss NaN and such a gradient row (the op raises before that matters, see
``fusedmlp.autograd.cross_entropy``).

Target check (``count_bad_targets``): one launch over the targets counts the out-of-range ones
(not ``ignore_index``) and the ignored ones into two int64 counters, for the op's one
device-to-host copy: one program up to 65,536 targets, else one per block adding with integer
atomics (the same counts in any order).

Reduction (``reduce_loss``): 'mean' and 'sum' of fp32 row losses, for up to 65,536 rows: one
program sums them in a fixed order, divides (correctly rounded) by N or by the device
normaliser, and writes the loss in the logits' dtype and the backward's fp32 factor: one launch
where torch's sum, its division and two scalar fills were four. It also counts the targets as
the check does (``check``), in the same loop over the rows: then the check takes no launch.

Backward (``cross_entropy_scale``): multiplies the saved gradient by ``grad_output`` (a scalar or
one value per row, any stride) times a device scalar ``factor``, except on ignored rows, which
stay as they are whatever the multiplier (as torch's); an infinite multiplier gives NaN where
torch's log_softmax backward meets inf - inf. In place it skips, on the device, every row whose
multiplier is exactly 1 (``loss.backward()`` of a 'mean'/'sum' loss moves no gradient bytes at
all); out of place it writes a new buffer.

Arithmetic in fp32 (fp64 for fp64 logits); fp32/fp16/bf16/fp64 logits; int64 targets.

L2 hints (as torch inductor's looped reductions): with ``COMPUTE_GRAD`` the first pass loads
the row ``evict_last`` and the gradient pass ``evict_first``, so that the rows in flight can be
re-read from L2 rather than HBM while the gradient stores stream through it.

``PIPELINE`` (a configuration's constexpr; the autotuner picks): both passes load chunk i + 1
before they compute on chunk i, and the first keeps the running sums per lane (rescaled by the
scalar running max, reduced once after the loop), so each chunk costs it one block reduction
(the max) instead of two, with the loads of the next chunk in flight during it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import acc_dtype
from .launch import cdiv, launch, next_power_of_2, on_device

# ``PIPELINE``: both passes with the next chunk's loads issued before this chunk's arithmetic,
# and the first pass's sums per lane (``_ce_fwd_kernel``). Added in the sixteenth session: with
# the plain pass, bf16 16K x 32K took 0.899 ms on the H100 and 0.797 ms on the H200, 13% less
# time for 41% more copy bandwidth, so the pass waits on more than the bandwidth. The autotuner
# times both: on an H100 (seventeenth session) it picked PIPELINE for fp32 32K and for both
# dtypes at 64K and 128K, the plain 8192 x 16 warps for bf16 32K. sm_90: 36-64 registers
# without label smoothing; with it (three per-lane sums) 78-190, and fp32 8192 with 16 warps
# spills 8 bytes (triton 3.9).
_FWD_CONFIGS = [
    triton.Config({"BLOCK_C": 2048, "PIPELINE": False}, num_warps=8),
    triton.Config({"BLOCK_C": 4096, "PIPELINE": False}, num_warps=8),
    triton.Config({"BLOCK_C": 4096, "PIPELINE": False}, num_warps=16),
    triton.Config({"BLOCK_C": 8192, "PIPELINE": False}, num_warps=16),
    triton.Config({"BLOCK_C": 1024, "PIPELINE": False}, num_warps=4),
    triton.Config({"BLOCK_C": 2048, "PIPELINE": True}, num_warps=8),
    triton.Config({"BLOCK_C": 4096, "PIPELINE": True}, num_warps=8),
    triton.Config({"BLOCK_C": 4096, "PIPELINE": True}, num_warps=16),
    triton.Config({"BLOCK_C": 8192, "PIPELINE": True}, num_warps=16),
]
_FWD_SMALL = _FWD_CONFIGS[4]  # 1024 classes, 4 warps: below worth_tuning's size
# Small chunk under the interpreter, so the tests exercise many chunks per row; the pipelined
# pass (``test_cross_entropy.py`` runs the plain one against torch too).
_FWD_INTERPRET = triton.Config({"BLOCK_C": 64, "PIPELINE": True}, num_warps=4)

# One configuration: an elementwise pass needs no tuning, and autotuning an in-place kernel
# would apply the scaling once per trial.
_SCALE_CONFIGS = [triton.Config({"BLOCK": 4096}, num_warps=8)]
_SCALE_INTERPRET = triton.Config({"BLOCK": 64}, num_warps=4)

# Narrow rows (C <= 1024 classes for the loss, <= 4096 for the scaling: one chunk per row): one
# configuration, the chunk the row's width rounded up to a power of two (at least 32) and one
# warp per 128 elements (at most 4 for the loss, 8 for the scaling), instead of 1024- or
# 4096-wide chunks of 4-8 warps that are nearly all masked lanes: the classifier heads of MLPs
# (10 classes) run one small program per row.
NARROW_LOSS_C = 1024
NARROW_SCALE_C = 4096


_NARROW: dict = {}


def _narrow_configs(c: int, name: str, max_warps: int) -> list:
    """The one configuration of a row of ``c`` classes, as a list that is the same object per
    (chunk, kernel): ``launch`` caches its autotuner and configuration lookups by its identity."""
    block = max(32, next_power_of_2(c))
    key = (block, name, max_warps)
    hit = _NARROW.get(key)
    if hit is None:
        warps = max(1, min(max_warps, block // 128))
        extra = {"PIPELINE": False} if name == "BLOCK_C" else {}  # one chunk: nothing to overlap
        hit = _NARROW[key] = [triton.Config({name: block, **extra}, num_warps=warps)]
    return hit


# 8 warps, 16 targets per thread and block: more loads in flight on the one program's SM.
_CHECK_CONFIGS = [triton.Config({"BLOCK": 4096}, num_warps=8)]
_CHECK_INTERPRET = triton.Config({"BLOCK": 16}, num_warps=4)


@triton.jit
def _row_chunk(x_row, offs, C, stride_xc, KEEP: tl.constexpr):
    """One chunk of a row of logits, -inf past C; ``KEEP``: loaded ``evict_last``, as the
    gradient pass reads the row again (kept in L2 meanwhile)."""
    mask = offs < C
    ptrs = x_row + offs.to(tl.int64) * stride_xc
    if KEEP:
        x = tl.load(ptrs, mask=mask, other=float("-inf"), eviction_policy="evict_last")
    else:
        x = tl.load(ptrs, mask=mask, other=float("-inf"))
    return x


@triton.jit
def _grad_chunk(x_row, offs, C, stride_xc):
    """One chunk of a row of logits for the gradient pass: its last read (``evict_first``)."""
    return tl.load(
        x_row + offs.to(tl.int64) * stride_xc,
        mask=offs < C,
        other=0.0,
        eviction_policy="evict_first",
    )


@triton.jit
def _ce_fwd_kernel(
    X,
    stride_xn,
    stride_xc,
    T,
    stride_t,
    W,
    LOSS,
    GRAD,
    SCALE,
    host_scale,
    C,
    ignore_index,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PIPELINE: tl.constexpr,
):
    if FP64:
        ACC: tl.constexpr = tl.float64
    else:
        ACC: tl.constexpr = tl.float32
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xn
    g_row = GRAD + row * C
    t = tl.load(T + row * stride_t)
    cols = tl.arange(0, BLOCK_C)
    valid = t != ignore_index
    in_range = (t >= 0) & (t < C)
    if valid & in_range:
        # Logits enter every sum as differences from the running max (x - m, m - x[y]), never
        # through lse = m + log(s): near 1e4, m + log(s) keeps only 1e-3 of an fp32 loss of
        # order 1 (torch subtracts in this order too).
        m = tl.full((), float("-inf"), ACC)
        s = tl.zeros((), ACC)
        ref = tl.zeros((), ACC)  # the max that sum_wx is relative to (0 while all are -inf)
        sum_wx = tl.zeros((), ACC)  # sum_c w[c] * (x[c] - ref)
        sum_w = tl.zeros((), ACC)  # sum_c w[c]
        if PIPELINE:
            # The next chunk's loads go out before this chunk's max (a block reduction: two
            # barriers), and the sums stay per lane (one block reduction each, after the
            # loop): the row streams in while a chunk is reduced, where the plain loop waits
            # for each chunk's loads after four barriers (sm_90 PTX).
            s_lane = tl.zeros([BLOCK_C], ACC)
            wx_lane = tl.zeros([BLOCK_C], ACC)
            w_lane = tl.zeros([BLOCK_C], ACC)
            x_next = _row_chunk(x_row, cols, C, stride_xc, COMPUTE_GRAD)
        for c0 in range(0, C, BLOCK_C):
            offs = c0 + cols
            mask = offs < C
            if PIPELINE:
                x = x_next.to(ACC)
                x_next = _row_chunk(x_row, offs + BLOCK_C, C, stride_xc, COMPUTE_GRAD)
            else:
                x = _row_chunk(x_row, offs, C, stride_xc, COMPUTE_GRAD).to(ACC)
            m_new = tl.maximum(m, tl.max(x, 0))
            # while every logit so far is -inf keep s = 0 (avoid exp(-inf + inf) = nan)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            if PIPELINE:
                s_lane = s_lane * tl.exp(m - m_safe) + tl.exp(x - m_safe)
            else:
                s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), 0)
            m = m_new
            if HAS_SMOOTHING:
                # rebase the sum on the new max: sum w (x - new) = sum w (x - old) - W (new - old)
                xz = tl.where(mask, x - m_safe, 0.0)
                if HAS_WEIGHT:
                    w = tl.load(W + offs, mask=mask, other=0.0).to(ACC)
                else:
                    w = mask.to(ACC)
                if PIPELINE:
                    wx_lane += w_lane * (ref - m_safe) + w * xz
                    w_lane += w
                else:
                    sum_wx += sum_w * (ref - m_safe) + tl.sum(w * xz, 0)
                    sum_w += tl.sum(w, 0)
                ref = m_safe
        if PIPELINE:
            s = tl.sum(s_lane, 0)
            if HAS_SMOOTHING:
                sum_wx = tl.sum(wx_lane, 0)
                sum_w = tl.sum(w_lane, 0)
        log_s = tl.log(s)
        x_t = tl.load(x_row + t * stride_xc).to(ACC)
        if HAS_WEIGHT:
            w_t = tl.load(W + t).to(ACC)
        else:
            w_t = tl.full((), 1.0, ACC)
        if HAS_SMOOTHING:
            e_c = eps / C
            # sum_w * lse - sum_c w[c] x[c] = sum_w * ((m - ref) + log(s)) - sum_wx
            smooth = sum_w * ((m - ref) + log_s) - sum_wx
            if HAS_WEIGHT:
                if not (tl.abs(sum_w) < float("inf")):
                    # A non-finite class weight: the relative sums meet inf * 0 (its logit at a
                    # running max), NaN where torch's sum_c w[c] * (lse - x[c]) is inf. Again
                    # term by term as torch, now that lse is known (one more read of the row,
                    # only for such weights).
                    smooth = tl.zeros((), ACC)
                    for c0 in range(0, C, BLOCK_C):
                        offs = c0 + cols
                        mask = offs < C
                        x = _grad_chunk(x_row, offs, C, stride_xc).to(ACC)
                        w = tl.load(W + offs, mask=mask, other=0.0).to(ACC)
                        smooth += tl.sum(tl.where(mask, w * ((m - x) + log_s), 0.0), 0)
            loss = (1.0 - eps) * w_t * ((m - x_t) + log_s) + e_c * smooth
            coef_p = (1.0 - eps) * w_t + e_c * sum_w
            coef_t = (1.0 - eps) * w_t
        else:
            loss = w_t * ((m - x_t) + log_s)
            coef_p = w_t
            coef_t = w_t
        tl.store(LOSS + row, loss)
        if COMPUTE_GRAD:
            if HAS_SCALE:
                scale = tl.load(SCALE).to(ACC)
            else:
                scale = tl.full((), host_scale, ACC)  # 1.0 when there is no normaliser
            # scale multiplies last (a product no addition consumes): PTX leaves an unfused
            # mul.f32 feeding an add.f32 to ptxas, which fused ``e_c * scale`` into the
            # subtraction in one specialisation (HAS_SCALE) and not the other, and the device
            # and host normalisers must give the same bits (seen on an H100)
            if PIPELINE:
                x_next = _grad_chunk(x_row, cols, C, stride_xc)
            for c0 in range(0, C, BLOCK_C):
                offs = c0 + cols
                mask = offs < C
                if PIPELINE:  # the next chunk's loads in flight during this chunk's arithmetic
                    x = x_next
                    x_next = _grad_chunk(x_row, offs + BLOCK_C, C, stride_xc)
                else:
                    x = _grad_chunk(x_row, offs, C, stride_xc)
                p = tl.exp((x.to(ACC) - m) - log_s)
                g = p * coef_p - tl.where(offs == t, coef_t, 0.0)
                if HAS_SMOOTHING:
                    if HAS_WEIGHT:
                        w = tl.load(W + offs, mask=mask, other=0.0).to(ACC)
                        g -= e_c * w
                    else:
                        g -= e_c
                g = g * scale
                tl.store(g_row + offs, g.to(GRAD.dtype.element_ty), mask=mask)
    else:
        if valid:  # out-of-range target: NaN loss (the op raises on the host side)
            tl.store(LOSS + row, tl.full((), float("nan"), ACC))
        else:
            tl.store(LOSS + row, tl.zeros((), ACC))
        if COMPUTE_GRAD:
            # torch differentiates an ignored row too (log_softmax's backward of a zero
            # gradient): 0 - exp(log_softmax(x)) * 0, NaN over the whole row where its
            # log-softmax is NaN (a NaN or +inf logit, or every logit -inf); with label
            # smoothing and class weights the masked smoothing term sends back 0 * w[c], NaN
            # for a non-finite weight. One pass over the row finds out (scalar sums: per-lane
            # flags took 128 registers instead of 80 in a plain 4096-class configuration on
            # sm_90); 0 elsewhere.
            probe = tl.zeros((), ACC)  # NaN once a NaN or +inf logit (or weight) is seen
            top = tl.full((), float("-inf"), ACC)  # -inf while every logit is -inf
            for c0 in range(0, C, BLOCK_C):
                offs = c0 + cols
                x = _row_chunk(x_row, offs, C, stride_xc, False).to(ACC)  # -inf past C
                probe += tl.sum(tl.where(x == float("-inf"), 0.0, x * 0.0), 0)
                top = tl.maximum(top, tl.max(x, 0))
                if HAS_SMOOTHING:
                    if HAS_WEIGHT:
                        probe += tl.sum(
                            tl.load(W + offs, mask=offs < C, other=0.0).to(ACC) * 0.0, 0
                        )
            nan_row = (probe != probe) | (top == float("-inf"))
            fill = (tl.zeros((BLOCK_C,), ACC) + tl.where(nan_row, float("nan"), 0.0)).to(
                GRAD.dtype.element_ty
            )
            for c0 in range(0, C, BLOCK_C):
                offs = c0 + cols
                tl.store(g_row + offs, fill, mask=offs < C)


@triton.jit
def _target_counts(T, stride_t, offs, mask, C, ignore_index):
    """Per lane, 1 where target ``offs`` (``mask``ed) is out of [0, C) and not
    ``ignore_index``, and 1 where it is ``ignore_index`` (int32 each)."""
    t = tl.load(T + offs.to(tl.int64) * stride_t, mask=mask, other=0)
    ignored = (t == ignore_index) & mask
    bad = ((t < 0) | (t >= C)) & mask & (t != ignore_index)
    return bad.to(tl.int32), ignored.to(tl.int32)


@triton.jit
def _ce_check_kernel(
    T, stride_t, N, C, ignore_index, COUNTS, ATOMIC: tl.constexpr, BLOCK: tl.constexpr
):
    """``COUNTS[0]``: the targets outside [0, C) other than ``ignore_index``; ``COUNTS[1]``: the
    targets equal to ``ignore_index``. T: the N int64 targets, any stride; COUNTS: 2 int64.

    ``ATOMIC``: one ``BLOCK`` of targets per program, added to COUNTS (zeroed by the caller)
    with integer atomics, so the counts do not depend on the order the programs add them in.
    Otherwise (few targets) one program walks them all and stores the counts: no zeroing.
    The host waits for these counts, so the walk keeps per-lane counts and reduces them once
    after the loop: no cross-warp reduction (shared memory and barriers) per block."""
    pid = tl.program_id(0).to(tl.int64)
    lane_bad = tl.zeros((BLOCK,), tl.int32)  # at most N / BLOCK per lane
    lane_ignored = tl.zeros((BLOCK,), tl.int32)
    start = pid * BLOCK if ATOMIC else 0
    stop = tl.minimum(start + BLOCK, N) if ATOMIC else N
    for b in range(start, stop, BLOCK):
        offs = b + tl.arange(0, BLOCK)
        bad, ignored = _target_counts(T, stride_t, offs, offs < stop, C, ignore_index)
        lane_bad += bad
        lane_ignored += ignored
    n_bad = tl.sum(lane_bad.to(tl.int64), 0)
    n_ignored = tl.sum(lane_ignored.to(tl.int64), 0)
    if ATOMIC:
        tl.atomic_add(COUNTS, n_bad)
        tl.atomic_add(COUNTS + 1, n_ignored)
    else:
        tl.store(COUNTS, n_bad)
        tl.store(COUNTS + 1, n_ignored)


# Up to this many targets one program counts them all (a few microseconds), without atomics
# and so without zeroing the counters first (one launch fewer).
_CHECK_ONE_PROGRAM = 1 << 16


def check_on_one_program(target: torch.Tensor) -> bool:
    """Whether one program counts every target (else integer atomics after a zeroing): up to
    ``_CHECK_ONE_PROGRAM`` targets on a GPU, 32 on CPU, so that small tests take both paths."""
    return target.numel() <= (_CHECK_ONE_PROGRAM if target.is_cuda else 32)


def count_bad_targets(target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """int64 [2] on the targets' device: how many of ``target`` (int64 [N], N > 0, any stride)
    lie outside [0, num_classes) other than ``ignore_index``, and how many equal
    ``ignore_index``. One launch (two beyond ``_CHECK_ONE_PROGRAM`` targets: zeroed counters,
    then the count over one program per block); no synchronisation."""
    n = target.numel()
    atomic = not check_on_one_program(target)
    if atomic:
        counts = torch.zeros(2, device=target.device, dtype=torch.int64)
    else:
        counts = torch.empty(2, device=target.device, dtype=torch.int64)
    with on_device(target):
        launch(
            _ce_check_kernel,
            lambda meta: (cdiv(n, meta["BLOCK"]) if atomic else 1,),
            configs=_CHECK_CONFIGS,
            interpret_config=_CHECK_INTERPRET,
            T=target,
            stride_t=target.stride(0),
            N=n,
            C=int(num_classes),
            ignore_index=int(ignore_index),
            COUNTS=counts,
            ATOMIC=atomic,
        )
    return counts


@triton.jit
def _ce_loss_kernel(
    ROWS,
    N,
    LOSS,
    WSUM,
    divisor,
    FACTOR,
    factor,
    T,
    stride_t,
    C,
    ignore_index,
    COUNTS,
    MEAN: tl.constexpr,
    DEVICE_DIVISOR: tl.constexpr,
    WRITE_FACTOR: tl.constexpr,
    CHECK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The reduced loss: the sum of the ``N`` fp32 row losses ``ROWS`` (contiguous), in a fixed
    order (deterministic); with ``MEAN`` divided, correctly rounded, by ``divisor`` (a host
    number: N) or with ``DEVICE_DIVISOR`` by ``*WSUM`` (fp32 0-d: the summed w[y] of the
    non-ignored rows; NaN where it is 0, as torch's 0/0); stored to the 0-d ``LOSS`` in its
    dtype. With ``WRITE_FACTOR`` also ``*FACTOR = factor`` (fp32 0-d, the backward's
    multiplier). With ``CHECK`` also ``_ce_check_kernel``'s counts of the N targets ``T`` (int64,
    any stride) against ``C`` classes into ``COUNTS`` (int64 [2]): the target check rides in
    this launch instead of one of its own. One program: the caller keeps N small
    (``loss_on_one_program``)."""
    acc = tl.zeros((BLOCK,), tl.float32)
    lane_bad = tl.zeros((BLOCK,), tl.int32)
    lane_ignored = tl.zeros((BLOCK,), tl.int32)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(ROWS + offs, mask=offs < N, other=0.0)
        if CHECK:
            bad, ignored = _target_counts(T, stride_t, offs, offs < N, C, ignore_index)
            lane_bad += bad
            lane_ignored += ignored
    if CHECK:
        tl.store(COUNTS, tl.sum(lane_bad.to(tl.int64), 0))
        tl.store(COUNTS + 1, tl.sum(lane_ignored.to(tl.int64), 0))
    total = tl.sum(acc, 0)
    if MEAN:
        if DEVICE_DIVISOR:
            w = tl.load(WSUM)
            total = tl.where(w == 0.0, float("nan"), tl.div_rn(total, w))
        else:
            total = tl.div_rn(total, divisor)
    tl.store(LOSS, total.to(LOSS.dtype.element_ty))
    if WRITE_FACTOR:
        tl.store(FACTOR, factor)


# Up to this many rows one program sums the row losses (a few microseconds: 64K fp32 values),
# and that one launch replaces torch's sum, the division and two scalar fills.
_LOSS_ONE_PROGRAM = 1 << 16
_LOSS_CONFIGS = [triton.Config({"BLOCK": 2048}, num_warps=8)]
_LOSS_INTERPRET = triton.Config({"BLOCK": 16}, num_warps=4)


def loss_on_one_program(n: int, device: torch.device) -> bool:
    """Whether ``reduce_loss`` takes ``n`` fp32 row losses: up to ``_LOSS_ONE_PROGRAM`` on a
    GPU, 256 on CPU, so that small tests take both paths."""
    return n <= (_LOSS_ONE_PROGRAM if device.type == "cuda" else 256)


def reduce_loss(
    loss_rows: torch.Tensor,
    dtype: torch.dtype,
    divisor: float | torch.Tensor | None,
    factor: float | None,
    check: tuple[torch.Tensor, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(loss, factor, counts)``: the 0-d ``dtype`` loss ``sum(loss_rows) / divisor``
    (``divisor``: a host number, a 0-d fp32 device tensor, or None for the plain sum); for a
    float ``factor``, a 0-d fp32 tensor holding it (else None); with ``check = (target,
    num_classes, ignore_index)`` (target int64 [N], any stride) ``count_bad_targets``'s counts
    of those targets (else None). loss_rows: [N] fp32 contiguous, ``loss_on_one_program(N)``.
    One launch."""
    n = loss_rows.shape[0]
    loss = torch.empty((), device=loss_rows.device, dtype=dtype)
    factor_t = None
    if factor is not None:
        factor_t = torch.empty((), device=loss_rows.device, dtype=torch.float32)
    counts = None
    if check is not None:
        target, num_classes, ignore_index = check
        counts = torch.empty(2, device=loss_rows.device, dtype=torch.int64)
    device_divisor = isinstance(divisor, torch.Tensor)
    with on_device(loss_rows):
        launch(
            _ce_loss_kernel,
            (1,),
            configs=_LOSS_CONFIGS,
            interpret_config=_LOSS_INTERPRET,
            ROWS=loss_rows,
            N=n,
            LOSS=loss,
            WSUM=divisor if device_divisor else loss_rows,
            divisor=float(divisor) if divisor is not None and not device_divisor else 1.0,
            FACTOR=factor_t if factor_t is not None else loss_rows,
            factor=float(factor) if factor is not None else 1.0,
            T=target if counts is not None else loss_rows,
            stride_t=target.stride(0) if counts is not None else 0,
            C=int(num_classes) if counts is not None else 0,
            ignore_index=int(ignore_index) if counts is not None else 0,
            COUNTS=counts if counts is not None else loss_rows,
            MEAN=divisor is not None,
            DEVICE_DIVISOR=device_divisor,
            WRITE_FACTOR=factor_t is not None,
            CHECK=counts is not None,
        )
    return loss, factor_t, counts


@triton.jit
def _ce_scale_kernel(
    G,
    OUT,
    GO,
    stride_go,
    FACTOR,
    T,
    stride_t,
    ignore_index,
    C,
    SMOOTHING: tl.constexpr,
    INPLACE: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``OUT[row] = G[row] * GO[row * stride_go] * FACTOR`` over one ``BLOCK`` of a row; a row
    whose target ``T[row]`` is ``ignore_index`` keeps G's row (0, or NaN) whatever the
    multiplier (torch never scales an ignored row: a NaN grad_output, or the infinite
    1/sum(w[y]) of an all-ignored 'mean' batch, leaves it as it is). G, OUT: [N, C]
    contiguous; GO: 0-d (stride 0) or [N]. An infinite multiplier gives NaN at the target's
    column (every column with ``SMOOTHING``, label smoothing > 0), as torch's log_softmax
    backward forms g - p * sum(g) from infinite g: inf - inf there.
    ``INPLACE`` (OUT is G): rows with a multiplier of exactly 1, and ignored rows, are not
    touched."""
    if FP64:
        ACC: tl.constexpr = tl.float64
    else:
        ACC: tl.constexpr = tl.float32
    n_blocks = tl.cdiv(C, BLOCK)
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_blocks
    blk = pid % n_blocks
    t = tl.load(T + row * stride_t)
    ignored = t == ignore_index
    f = tl.load(GO + row * stride_go).to(ACC) * tl.load(FACTOR).to(ACC)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < C
    ptr = row * C + offs
    # NaN where torch's inf - inf falls (f as a block: the interpreter ands no scalar with one)
    nan_at = tl.abs(tl.zeros((BLOCK,), ACC) + f) == float("inf")
    if not SMOOTHING:
        nan_at = nan_at & (offs == t)
    if INPLACE:
        if (f != 1.0) & (ignored == 0):
            g = tl.load(G + ptr, mask=mask, other=0.0).to(ACC)
            g = tl.where(nan_at, float("nan"), g * f)
            tl.store(OUT + ptr, g.to(OUT.dtype.element_ty), mask=mask)
    else:
        f = tl.where(ignored, 0.0, f)  # G's ignored row: 0 (0 * 0) or NaN (NaN * 0)
        g = tl.load(G + ptr, mask=mask, other=0.0).to(ACC)
        g = tl.where(nan_at & (ignored == 0), float("nan"), g * f)
        tl.store(OUT + ptr, g.to(OUT.dtype.element_ty), mask=mask)


def cross_entropy_fwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    scale: torch.Tensor | float | None,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses and (optionally) the gradient of the summed row losses.

    logits [N, C] fp32/fp16/bf16/fp64, any strides; target [N] int64, any stride; weight [C] in
    the accumulation dtype (contiguous) or None; scale the 'mean' normaliser multiplied into the
    gradient: a 0-d accumulation-dtype device tensor, a Python float (rounded to fp32: not for
    fp64 logits) or None.
    Returns ``loss_rows`` [N] (fp32, fp64 for fp64 logits; 0 for ignored rows, NaN for
    out-of-range targets) and ``grad`` [N, C] contiguous in the logits dtype (shape [0] when
    ``compute_grad`` is False: nothing is written).
    """
    n, c = logits.shape
    acc = acc_dtype(logits.dtype)
    loss = torch.empty(n, device=logits.device, dtype=acc)
    if compute_grad:
        grad = torch.empty((n, c), device=logits.device, dtype=logits.dtype)
    else:
        grad = torch.empty(0, device=logits.device, dtype=logits.dtype)
    if n == 0:
        return loss, grad
    with on_device(logits):
        narrow = c <= NARROW_LOSS_C
        launch(
            _ce_fwd_kernel,
            (n,),
            configs=_narrow_configs(c, "BLOCK_C", 4) if narrow else _FWD_CONFIGS,
            key=["C", "HAS_WEIGHT", "HAS_SMOOTHING", "COMPUTE_GRAD"],
            small_config=None if narrow else _FWD_SMALL,
            work=n * c,
            interpret_config=_FWD_INTERPRET,
            X=logits,
            stride_xn=logits.stride(0),
            stride_xc=logits.stride(1),
            T=target,
            stride_t=target.stride(0),
            W=weight if weight is not None else loss,
            LOSS=loss,
            GRAD=grad if compute_grad else loss,
            SCALE=scale if isinstance(scale, torch.Tensor) else loss,
            host_scale=float(scale) if isinstance(scale, float) else 1.0,
            C=c,
            ignore_index=int(ignore_index),
            eps=float(label_smoothing),
            HAS_WEIGHT=weight is not None,
            HAS_SMOOTHING=float(label_smoothing) > 0.0,
            COMPUTE_GRAD=bool(compute_grad),
            HAS_SCALE=isinstance(scale, torch.Tensor),
            FP64=logits.dtype == torch.float64,
        )
    return loss, grad


def cross_entropy_scale(
    grad: torch.Tensor,
    grad_output: torch.Tensor,
    factor: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    smoothing: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out = grad * grad_output[row] * factor``, ``grad``'s row on the rows whose target is
    ``ignore_index``; NaN where torch's is for an infinite multiplier (the target's column, or
    with ``smoothing`` (label smoothing > 0) the whole row).

    grad [N, C] contiguous (the forward's gradient buffer: 0 or NaN on ignored rows);
    grad_output 0-d (one multiplier for every row) or [N] (any stride); factor 0-d; target [N]
    int64 (any stride). ``out=None`` scales ``grad`` in place and skips rows whose multiplier
    is exactly 1 and ignored rows (decided on the device); otherwise ``out`` ([N, C]
    contiguous) receives the product.
    """
    n, c = grad.shape
    inplace = out is None
    if inplace:
        out = grad
    if n == 0 or c == 0:
        return out
    stride_go = 0 if grad_output.dim() == 0 else grad_output.stride(0)
    with on_device(grad):
        launch(
            _ce_scale_kernel,
            lambda meta: (n * cdiv(c, meta["BLOCK"]),),
            configs=_narrow_configs(c, "BLOCK", 8) if c <= NARROW_SCALE_C else _SCALE_CONFIGS,
            interpret_config=_SCALE_INTERPRET,
            G=grad,
            OUT=out,
            GO=grad_output,
            stride_go=stride_go,
            FACTOR=factor,
            T=target,
            stride_t=target.stride(0),
            ignore_index=int(ignore_index),
            C=c,
            SMOOTHING=bool(smoothing),
            INPLACE=inplace,
            FP64=grad.dtype == torch.float64,
        )
    return out
