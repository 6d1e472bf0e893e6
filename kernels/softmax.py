"""Softmax and log-softmax over one dimension, forward and backward.

The input is viewed as [outer, C, inner] (C = the reduced dimension) with arbitrary strides.
One program owns ``BLOCK_I`` neighbouring inner positions of one outer index and streams the
C axis in chunks of ``BLOCK_C`` (tiles [BLOCK_C, BLOCK_I], contiguous along the inner axis when
the reduced dimension is not the last one), so a row is never loaded whole:

- forward: online max / sum of exp over the chunks, then a second pass writes
  ``exp(x - m) / s`` (softmax) or ``x - m - log(s)`` (log-softmax). The output is saved for
  backward (as torch does).
- backward: a pass accumulating ``sum(g * y)`` (softmax) or ``sum(g)`` (log-softmax), then a
  pass writing ``y * (g - sum)`` or ``g - exp(y) * sum``.

Arithmetic in fp32 (fp64 for fp64 tensors); outputs in the input dtype; int64 offsets.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cdiv, launch, next_power_of_2, on_device

# TILE = BLOCK_C * BLOCK_I elements per chunk; BLOCK_I is chosen by the launcher.
_CONFIGS = [
    triton.Config({"TILE": 4096}, num_warps=8),
    triton.Config({"TILE": 2048}, num_warps=4),
    triton.Config({"TILE": 8192}, num_warps=16),
    triton.Config({"TILE": 1024}, num_warps=4),
]
_INTERPRET = triton.Config({"TILE": 256}, num_warps=4)


@triton.jit
def _softmax_fwd_kernel(
    X,
    Y,
    C,
    inner,
    sx_o,
    sx_c,
    sx_i,
    sy_o,
    sy_c,
    sy_i,
    LOG: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_I: tl.constexpr,
    TILE: tl.constexpr,
):
    if FP64:
        ACC: tl.constexpr = tl.float64
    else:
        ACC: tl.constexpr = tl.float32
    BLOCK_C: tl.constexpr = TILE // BLOCK_I
    n_iblk = tl.cdiv(inner, BLOCK_I)
    pid = tl.program_id(0).to(tl.int64)
    o = pid // n_iblk
    ib = pid % n_iblk
    offs_i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < inner
    x_base = X + o * sx_o + offs_i[None, :] * sx_i
    y_base = Y + o * sy_o + offs_i[None, :] * sy_i
    cols = tl.arange(0, BLOCK_C)
    m = tl.full((BLOCK_I,), float("-inf"), ACC)
    s = tl.zeros((BLOCK_I,), ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = (c0 + cols).to(tl.int64)
        mask = (offs_c < C)[:, None] & mask_i[None, :]
        x = tl.load(
            x_base + offs_c[:, None] * sx_c,
            mask=mask,
            other=float("-inf"),
            eviction_policy="evict_last",  # read again by the second pass: keep it in L2
        ).to(ACC)
        m_new = tl.maximum(m, tl.max(x, 0))
        # lanes with an all -inf column so far keep s = 0 (avoid exp(-inf + inf) = nan)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[None, :]), 0)
        m = m_new
    s = tl.where(mask_i, s, 1.0)  # padding lanes: keep log / division finite
    if LOG:
        # (x - m) - log(s), never x - (m + log(s)): m + log(s) rounds to the precision of the
        # largest logit (1e-3 near 1e4 in fp32), which the small result would inherit.
        log_s = tl.log(s)
    else:
        inv = 1.0 / s
    for c0 in range(0, C, BLOCK_C):
        offs_c = (c0 + cols).to(tl.int64)
        mask = (offs_c < C)[:, None] & mask_i[None, :]
        x = tl.load(
            x_base + offs_c[:, None] * sx_c, mask=mask, other=0.0, eviction_policy="evict_first"
        ).to(ACC)
        if LOG:
            y = (x - m[None, :]) - log_s[None, :]
        else:
            y = tl.exp(x - m[None, :]) * inv[None, :]
        tl.store(y_base + offs_c[:, None] * sy_c, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_bwd_kernel(
    Y,
    G,
    DX,
    C,
    inner,
    sy_o,
    sy_c,
    sy_i,
    sg_o,
    sg_c,
    sg_i,
    sd_o,
    sd_c,
    sd_i,
    LOG: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_I: tl.constexpr,
    TILE: tl.constexpr,
):
    if FP64:
        ACC: tl.constexpr = tl.float64
    else:
        ACC: tl.constexpr = tl.float32
    BLOCK_C: tl.constexpr = TILE // BLOCK_I
    n_iblk = tl.cdiv(inner, BLOCK_I)
    pid = tl.program_id(0).to(tl.int64)
    o = pid // n_iblk
    ib = pid % n_iblk
    offs_i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < inner
    y_base = Y + o * sy_o + offs_i[None, :] * sy_i
    g_base = G + o * sg_o + offs_i[None, :] * sg_i
    d_base = DX + o * sd_o + offs_i[None, :] * sd_i
    cols = tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_I,), ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = (c0 + cols).to(tl.int64)
        mask = (offs_c < C)[:, None] & mask_i[None, :]
        # first pass: evict_last, the second pass reads the same tiles again
        g = tl.load(
            g_base + offs_c[:, None] * sg_c, mask=mask, other=0.0, eviction_policy="evict_last"
        ).to(ACC)
        if LOG:
            acc += tl.sum(g, 0)
        else:
            y = tl.load(
                y_base + offs_c[:, None] * sy_c, mask=mask, other=0.0, eviction_policy="evict_last"
            ).to(ACC)
            acc += tl.sum(g * y, 0)
    for c0 in range(0, C, BLOCK_C):
        offs_c = (c0 + cols).to(tl.int64)
        mask = (offs_c < C)[:, None] & mask_i[None, :]
        g = tl.load(
            g_base + offs_c[:, None] * sg_c, mask=mask, other=0.0, eviction_policy="evict_first"
        ).to(ACC)
        y = tl.load(
            y_base + offs_c[:, None] * sy_c, mask=mask, other=0.0, eviction_policy="evict_first"
        ).to(ACC)
        if LOG:
            dx = g - tl.exp(y) * acc[None, :]
        else:
            dx = y * (g - acc[None, :])
        tl.store(d_base + offs_c[:, None] * sd_c, dx.to(DX.dtype.element_ty), mask=mask)


def _block_i(inner: int) -> int:
    """Inner positions per program: 1 when the reduced dimension is the last one."""
    if inner == 1:
        return 1
    return min(32, next_power_of_2(inner))


def as_3d(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` viewed as [outer, C, inner] around ``dim`` (a copy only if the outer or inner
    dimensions cannot be merged into one stride)."""
    shape = t.shape
    outer = 1
    for s in shape[:dim]:
        outer *= s
    inner = 1
    for s in shape[dim + 1 :]:
        inner *= s
    return t.reshape(outer, shape[dim], inner)


def _grid(outer: int, inner: int, block_i: int):
    return (outer * cdiv(inner, block_i),)


def softmax_fwd(x: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    """Softmax (``log=False``) or log-softmax of ``x`` over ``dim`` (non-negative).

    x any shape with numel > 0, fp32/fp16/bf16/fp64, any strides. Returns a contiguous tensor of
    x's shape and dtype.
    """
    x3 = as_3d(x, dim)
    outer, c, inner = x3.shape
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    y3 = y.view(outer, c, inner)
    block_i = _block_i(inner)
    with on_device(x):
        launch(
            _softmax_fwd_kernel,
            _grid(outer, inner, block_i),
            configs=_CONFIGS,
            key=["C", "inner", "LOG", "BLOCK_I"],
            small_config=_CONFIGS[3],
            work=outer * c * inner,
            interpret_config=_INTERPRET,
            X=x3,
            Y=y3,
            C=c,
            inner=inner,
            sx_o=x3.stride(0),
            sx_c=x3.stride(1),
            sx_i=x3.stride(2),
            sy_o=y3.stride(0),
            sy_c=y3.stride(1),
            sy_i=y3.stride(2),
            LOG=bool(log),
            FP64=x.dtype == torch.float64,
            BLOCK_I=block_i,
        )
    return y


def softmax_bwd(y: torch.Tensor, grad: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    """Gradient of softmax / log-softmax w.r.t. its input, from the output ``y`` and the
    output gradient ``grad`` (same shape, any strides). Returns a contiguous tensor in y's dtype."""
    y3 = as_3d(y, dim)
    g3 = as_3d(grad, dim)
    outer, c, inner = y3.shape
    dx = torch.empty(y.shape, device=y.device, dtype=y.dtype)
    d3 = dx.view(outer, c, inner)
    block_i = _block_i(inner)
    with on_device(y):
        launch(
            _softmax_bwd_kernel,
            _grid(outer, inner, block_i),
            configs=_CONFIGS,
            key=["C", "inner", "LOG", "BLOCK_I"],
            small_config=_CONFIGS[3],
            work=outer * c * inner,
            interpret_config=_INTERPRET,
            Y=y3,
            G=g3,
            DX=d3,
            C=c,
            inner=inner,
            sy_o=y3.stride(0),
            sy_c=y3.stride(1),
            sy_i=y3.stride(2),
            sg_o=g3.stride(0),
            sg_c=g3.stride(1),
            sg_i=g3.stride(2),
            sd_o=d3.stride(0),
            sd_c=d3.stride(1),
            sd_i=d3.stride(2),
            LOG=bool(log),
            FP64=y.dtype == torch.float64,
            BLOCK_I=block_i,
        )
    return dx
