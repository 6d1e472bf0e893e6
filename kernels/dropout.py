"""Inverted dropout: a Philox-seeded Triton kernel that stores no mask.

One kernel serves the forward (``out = x * keep * 1/(1-p)``) and the backward
(``grad_in = grad_out * keep * 1/(1-p)``): the keep decision is a pure function of
``(seed, logical element index)``, so the backward regenerates exactly the forward's mask from the
saved one-element seed tensor and no mask is ever written to memory.

The random stream
-----------------
Element ``i`` (its logical, row-major index in the tensor, int64) belongs to the group
``g = i // inner`` (``inner = 1`` for elementwise dropout; ``inner = prod(shape[2:])`` for
channel-wise ``Dropout2d``, so one decision per (sample, channel)). Group ``g`` reads output
``g % 4`` of Philox4x32-10 keyed by the 64-bit seed at counter ``(lo32(g // 4), hi32(g // 4), 0, 0)``:
one Philox call serves four consecutive groups (as torch's CUDA dropout does), the counter is 64 bits
wide so tensors beyond 2^31 (or 2^34) elements neither overflow nor repeat, and the decision does not
depend on the block size, the launch configuration or the strides. A group is kept when the top
24 bits ``r >> 8`` of its random word satisfy ``r >> 8 >= p * 2^24`` (P(keep) = 1 - p to 2^-24).

The multiply form ``x * (keep ? scale : 0)`` (computed in fp32 with torch's fp32 scale
``1 / float32(1 - p)``, fp64 for fp64 inputs, whose ``scale = 1 / (1 - p)`` arrives as its
double's bit pattern: ``scale_arg`` and ``dropout_scale``, also the fused kernels') makes NaN
and Inf propagate as torch's dropout does: a dropped NaN or Inf gives NaN.

Strides: any. Offsets are logical indices; the addresses come from the (jointly coalesced, up to
4-D) sizes and strides of the input and of the output; row-major contiguous tensors take a
constexpr fast path with no index arithmetic.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from .launch import cdiv, launch, on_device

MAX_DIMS = 4  # dims the strided path addresses after coalescing; more -> a contiguous copy
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

GPU_CONFIGS = [
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 2048}, num_warps=4),
    triton.Config({"BLOCK": 2048}, num_warps=8),
    triton.Config({"BLOCK": 4096}, num_warps=8),
    # 32 elements a thread: more loads in flight per thread to hide the Philox arithmetic
    triton.Config({"BLOCK": 4096}, num_warps=4),
    triton.Config({"BLOCK": 8192}, num_warps=8),
]
# The interpreter runs one program at a time with numpy: a big block keeps it fast.
INTERPRET_CONFIG = triton.Config({"BLOCK": 4096}, num_warps=4)


@triton.jit
def philox_words(seed, counter):
    """The four words of Philox4x32-10 (Random123) keyed by the int64 ``seed`` at counter
    ``(lo32(counter), hi32(counter), 0, 0)`` (``counter`` int64, any shape)."""
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    c2 = c0 * 0
    c3 = c0 * 0
    for _ in tl.static_range(10):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(a2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(a0, 0xD2511F53) ^ c3 ^ k1
        c1 = a2 * 0xCD9E8D57
        c3 = a0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def philox_word(seed, counter, lane):
    """Word ``lane`` (0..3) of ``philox_words(seed, counter)``; ``counter`` and ``lane``
    broadcast against each other."""
    c0, c1, c2, c3 = philox_words(seed, counter)
    return tl.where(lane == 0, c0, tl.where(lane == 1, c1, tl.where(lane == 2, c2, c3)))


@triton.jit
def philox_keep(seed, counter, lane, p):
    """The keep decision of the random stream above (shared with ``fused_block``'s kernels):
    ``philox_word(seed, counter, lane)`` kept when its top 24 bits ``r >> 8 >= p * 2^24``."""
    r = philox_word(seed, counter, lane)
    return (r >> 8).to(tl.float32) >= p * 16777216.0


@triton.jit
def tile_keep(seed_ptr, r, pid_c, C, p, ALIGNED: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Keep mask of the ``[BLOCK_R, 4 * BLOCK_Q]`` tile of rows ``r`` (``[BR, 1]`` int64) and
    columns ``pid_c * 4 * BLOCK_Q + [0, 4 * BLOCK_Q)`` of a row-major ``[R, C]`` tensor: element
    index ``i = r * C + c`` (the stream above, elementwise). ``ALIGNED`` (C % 4 == 0): one
    Philox call per quad of columns. Shared by ``fused_block``'s kernels and ``linear``'s
    forward epilogue."""
    seed = tl.load(seed_ptr)
    if ALIGNED:  # C % 4 == 0: one Philox call per quad, i // 4 = r * C / 4 + q
        q = pid_c.to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        quad = r[:, :, None] * (C // 4) + q[None, :, None]  # [BR, BQ, 1]
        keep = philox_keep(seed, quad, tl.arange(0, 4)[None, None, :], p)  # [BR, BQ, 4]
        keep = tl.reshape(keep, [quad.shape[0], 4 * BLOCK_Q])
    else:
        c = pid_c.to(tl.int64) * (4 * BLOCK_Q) + tl.arange(0, 4 * BLOCK_Q)
        i = r * C + c[None, :]
        keep = philox_keep(seed, i >> 2, i & 3, p)
    return keep


@triton.jit
def dropout_scale(scale, FP64: tl.constexpr):
    """The dropout scale ``1 / (1 - p)`` from its kernel argument (``scale_arg``): for fp64
    data the bit pattern of its double, an int64, since a float argument is fp32 (an
    fp32-rounded scale is 2e-8 off torch's fp64 one). Kernels taking it list ``scale`` in
    ``do_not_specialize``: triton would specialise that integer on divisibility by 16."""
    # one return: triton compiles both returns of a function and refuses unlike types
    if FP64:
        s = scale.to(tl.int64).to(tl.float64, bitcast=True)
    else:
        s = scale
    return s


def _f32(v: float) -> float:
    """``v`` rounded to float32 (to nearest even), as a Python float."""
    return struct.unpack("<f", struct.pack("<f", v))[0]


def _round_to_half(v: float, dtype: torch.dtype) -> float:
    """A finite float32 value ``v`` rounded to float16 or bfloat16 (to nearest even), as a Python
    float (torch's cast; no tensor: this runs at every launch)."""
    if dtype == torch.float16:
        return struct.unpack("<e", struct.pack("<e", v))[0]
    (bits,) = struct.unpack("<I", struct.pack("<f", v))
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def scale_arg(
    p: float,
    dtype: torch.dtype,
    *,
    backward: bool = False,
    channel: bool = False,
    device: torch.device | None = None,
) -> float | int:
    """``dropout_scale``'s argument for drop probability ``p`` (0 for ``p >= 1``: nothing is
    kept) and data of ``dtype``: torch's dropout scale in that dtype's arithmetic.

    - float64: ``1 / (1 - p)`` in double (torch's fp64 dropout), passed as its bits;
    - float32 (and the fp32 arithmetic of fp16/bf16 data): torch's ``1 / float32(1 - p)``, the
      reciprocal of the keep probability rounded to float32 (its CPU dropout divides its fp32
      noise by the scalar ``1 - p`` as a float32 reciprocal; its CUDA kernel takes ``1 - p`` as
      its float accumulation type). The double quotient rounded to float32 is that float
      division, correctly rounded (53 >= 2 * 24 + 2 bits). It is not ``float32(1 / (1 - p))``,
      1 ulp off at p = 0.04, 0.09, 0.15, 0.42, ...: every kept element then was 1 ulp off.

    fp16/bf16 data are multiplied by that fp32 scale in fp32 and rounded once, as torch's CUDA
    dropout does; torch's CPU dropout rounds the scale to the data's dtype first (its noise
    tensor has the input's dtype), so on CPU its kept values can sit 1 ulp from these.

    ``backward`` on a CUDA ``device`` (dropout's gradient, ``dropout_apply(backward=True)``):
    torch's CUDA ``native_dropout_backward`` multiplies by its double ``1 / (1 - p)`` rounded to
    float32, ``float32(1 / (1 - p))``, 1 ulp from its own forward's scale at those p (seen on an
    H200, torch 2.11). On the CPU torch's gradient is its forward's noise, the forward's scale.
    The fused blocks' backward kernels keep the forward's scale (they also divide the saved
    output by it): on CUDA their dropout gradients can sit 1 ulp from torch's.

    ``channel`` (channel-wise dropout, Dropout2d): torch's ``feature_dropout`` multiplies by a
    noise tensor of the data's dtype, ``1 / float32(1 - p)`` rounded to that dtype, in its
    forward and (autograd's product rule) its backward, on every device: fp16/bf16 data take
    that rounded scale, and no device takes the elementwise CUDA gradient scale.
    """
    if p >= 1.0:
        scale = 0.0
    elif dtype == torch.float64:
        scale = 1.0 / (1.0 - p)
    elif backward and not channel and device is not None and device.type == "cuda":
        scale = _f32(1.0 / (1.0 - p))
    else:
        scale = _f32(1.0 / _f32(1.0 - p))
        if channel and dtype in (torch.float16, torch.bfloat16):
            scale = _round_to_half(scale, dtype)
    if dtype == torch.float64:
        return struct.unpack("<q", struct.pack("<d", scale))[0]
    return scale


@triton.jit(do_not_specialize=["scale"])
def _dropout_kernel(
    x_ptr,
    out_ptr,
    seed_ptr,
    numel,
    p,
    scale,
    inner,
    size1,
    size2,
    size3,
    x_stride0,
    x_stride1,
    x_stride2,
    x_stride3,
    out_stride0,
    out_stride1,
    out_stride2,
    out_stride3,
    CONTIGUOUS: tl.constexpr,
    CHANNEL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    seed = tl.load(seed_ptr)
    # The block as [BLOCK // 8, 8]: row o holds the eight consecutive elements 8o .. 8o+7, one
    # 16-byte access for fp16/bf16 (rows of four gave 8-byte accesses), and two Philox calls.
    octs = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)  # int64
    idx = octs[:, None] * 8 + tl.arange(0, 8)[None, :]  # int64 logical (row-major) indices
    in_bounds = idx < numel
    if CONTIGUOUS:
        x_off = idx
        out_off = idx
    else:
        i3 = idx % size3
        rest = idx // size3
        i2 = rest % size2
        rest = rest // size2
        i1 = rest % size1
        i0 = rest // size1
        x_off = i0 * x_stride0 + i1 * x_stride1 + i2 * x_stride2 + i3 * x_stride3
        out_off = i0 * out_stride0 + i1 * out_stride1 + i2 * out_stride2 + i3 * out_stride3
    x = tl.load(x_ptr + x_off, mask=in_bounds, other=0.0)
    # Philox counter and output word of each element's group (elementwise: group = element).
    if CHANNEL:
        group = idx // inner
        keep = philox_keep(seed, group // 4, group % 4, p)  # one Philox call per element
    else:
        # [BLOCK // 8, 2, 4]: one Philox call per quad (counter 2o + h), its four words for the
        # four elements 8o + 4h .. 8o + 4h + 3; row-major reshape back to [BLOCK // 8, 8].
        quad = (octs[:, None] * 2 + tl.arange(0, 2)[None, :])[:, :, None]
        lane = tl.arange(0, 4)[None, None, :]
        keep = tl.reshape(philox_keep(seed, quad, lane, p), [BLOCK // 8, 8])
    y = x * tl.where(keep, dropout_scale(scale, x_ptr.dtype.element_ty == tl.float64), 0.0)
    tl.store(out_ptr + out_off, y.to(out_ptr.dtype.element_ty), mask=in_bounds)


def _coalesce(shape, *strides):
    """Joint row-major coalescing of ``shape`` under each stride tuple; size-1 dims dropped.

    Returns a list of ``(size, [stride for each tensor])`` from outermost to innermost.
    """
    dims: list[tuple[int, list[int]]] = []
    for d, size in enumerate(shape):
        if size == 1:
            continue
        sts = [st[d] for st in strides]
        if dims and all(ps == s * size for ps, s in zip(dims[-1][1], sts)):
            dims[-1] = (dims[-1][0] * size, sts)
        else:
            dims.append((size, sts))
    return dims


# A contiguous x and out as the kernel's CONTIGUOUS branch takes them (it reads only numel).
_FLAT_SIZES = (1,) * MAX_DIMS
_FLAT_STRIDES = (0,) * MAX_DIMS


def _launch(
    x: torch.Tensor,
    out: torch.Tensor,
    seed: torch.Tensor,
    p: float,
    inner: int,
    backward: bool,
    channel: bool,
) -> None:
    numel = x.numel()
    if x.is_contiguous() and out.is_contiguous():  # the common case, without the coalescing
        contiguous, sizes, x_strides, out_strides = True, _FLAT_SIZES, _FLAT_STRIDES, _FLAT_STRIDES
    else:
        dims = _coalesce(x.shape, x.stride(), out.stride())
        contiguous = len(dims) <= 1 and all(s == 1 for s in (dims[0][1] if dims else [1, 1]))
        dims = [(1, [0, 0])] * (MAX_DIMS - len(dims)) + dims
        sizes = [d[0] for d in dims]
        x_strides = [d[1][0] for d in dims]
        out_strides = [d[1][1] for d in dims]
    with on_device(x):
        launch(
            _dropout_kernel,
            lambda meta: (cdiv(numel, meta["BLOCK"]),),
            configs=GPU_CONFIGS,
            key=["numel"],
            small_config=GPU_CONFIGS[0],
            work=numel,
            interpret_config=INTERPRET_CONFIG,
            x_ptr=x,
            out_ptr=out,
            seed_ptr=seed,
            numel=numel,
            p=float(p),
            scale=scale_arg(p, x.dtype, backward=backward, channel=channel, device=x.device),
            inner=int(inner),
            size1=sizes[1],
            size2=sizes[2],
            size3=sizes[3],
            x_stride0=x_strides[0],
            x_stride1=x_strides[1],
            x_stride2=x_strides[2],
            x_stride3=x_strides[3],
            out_stride0=out_strides[0],
            out_stride1=out_strides[1],
            out_stride2=out_strides[2],
            out_stride3=out_strides[3],
            CONTIGUOUS=contiguous,
            CHANNEL=inner > 1,
        )


def dropout_apply(
    x: torch.Tensor,
    seed: torch.Tensor,
    p: float,
    inner: int = 1,
    backward: bool = False,
    channel: bool = False,
) -> torch.Tensor:
    """``x * keep * 1/(1-p)`` with the keep mask regenerated from ``(seed, logical index)``.

    The forward and the backward of dropout both call this (the backward with the gradient as
    ``x`` and the forward's seed), so nothing but the seed is saved for backward.

    Args:
        x: any shape, any strides; float16, bfloat16, float32 or float64 (fp32 arithmetic,
            fp64 for fp64). Not modified.
        seed: one-element int64 tensor on ``x``'s device (read by the kernel: no host sync,
            CUDA-graph safe).
        p: drop probability in [0, 1]; ``p = 1`` multiplies everything by 0 (as torch).
        inner: elements per keep decision, ``1`` (elementwise) or ``prod(shape[2:])`` for
            channel-wise dropout (one decision per (sample, channel) of ``[N, C, *]``).
        backward: ``x`` is dropout's gradient: torch's gradient scale (``scale_arg``; on CUDA
            1 ulp from its forward's at some p for elementwise dropout).
        channel: channel-wise dropout (Dropout2d, also over ``[N, C]`` where ``inner`` is 1):
            torch's ``feature_dropout`` scales (``scale_arg``).

    Returns:
        A new tensor, ``torch.empty_like(x)`` (x's strides when x is dense, else contiguous).
    """
    if x.dtype not in SUPPORTED_DTYPES:
        raise RuntimeError(
            f"dropout kernel: input dtype must be float16, bfloat16, float32 or float64, got {x.dtype}"
        )
    if seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != x.device:
        raise RuntimeError(
            f"dropout kernel: seed must be a one-element int64 tensor on {x.device}, "
            f"got {seed.dtype} {tuple(seed.shape)} on {seed.device}"
        )
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    if len(_coalesce(x.shape, x.stride(), out.stride())) <= MAX_DIMS:
        _launch(x, out, seed, p, inner, backward, channel)
        return out
    # More than MAX_DIMS non-mergeable dims (rare): run on contiguous copies.
    tmp = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x.contiguous(), tmp, seed, p, inner, backward, channel)
    out.copy_(tmp)
    return out


__all__ = ["GPU_CONFIGS", "INTERPRET_CONFIG", "SUPPORTED_DTYPES", "dropout_apply"]
