"""Multi-tensor SGD step (momentum, dampening, nesterov, weight decay, maximize): one launch
for every tensor of a (group, device, dtype).

Same tables as ``kernels/adam.py`` (addresses array-major: params, grads[, momentum buffers];
sizes, first block, block owner), cached and staged the same way. All arithmetic in fp32;
buffers stored in the param dtype. ``first_step`` (runtime, not specialised) marks buffers that
are new this step: torch sets them to the (decayed, sign-adjusted) gradient itself, without
dampening. Single fixed configuration (in-place update: never autotuned).

AMP (``torch.amp.GradScaler``, as torch's fused SGD): ``grad_scale`` divides the gradients
in-kernel (the unscaled gradient is written back to ``.grad``), and a nonzero ``found_inf``
makes every program return without writing anything; both are one-element device tensors read
in-kernel (no host synchronisation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .adam import GPU_CONFIG, INTERPRET_CONFIG, amp_scalar, check, config_for, prepare, tables
from .launch import launch, on_device


@triton.jit(do_not_specialize=["n_tensors", "first_step"])
def _sgd_kernel(
    addrs,
    meta,
    ref,
    grad_scale,
    found_inf,
    n_tensors,
    lr,
    momentum,
    one_minus_dampening,
    weight_decay,
    first_step,
    MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_INF: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(meta + 2 * n_tensors + pid)  # the tensor this block belongs to
    numel = tl.load(meta + t)
    start = (pid - tl.load(meta + n_tensors + t)) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel

    dtype = ref.dtype.element_ty
    ptr_ty = tl.pointer_type(dtype)
    p_ptr = tl.load(addrs + t).to(ptr_ty)
    g_ptr = tl.load(addrs + n_tensors + t).to(ptr_ty)
    if ALIGNED:  # every address 16-byte aligned (checked on the host): vector accesses
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)

    full = start + BLOCK <= numel
    # Full blocks without a mask (vector accesses), each tensor's tail block with it.
    for MASKED in tl.static_range(2):
        run = full != MASKED
        if HAS_INF:  # GradScaler found an inf/NaN: the whole step is skipped
            run = run & (tl.load(found_inf) == 0)
        if run:
            lmask = mask if MASKED else None
            p = tl.load(p_ptr + offs, mask=lmask).to(tl.float32)
            g = tl.load(g_ptr + offs, mask=lmask).to(tl.float32)
            if HAS_SCALE:  # unscale in-kernel and hand the unscaled gradient back (torch's fused)
                g = g / tl.load(grad_scale).to(tl.float32)
                tl.store(g_ptr + offs, g.to(dtype), mask=lmask)
            if MAXIMIZE:
                g = -g
            if WEIGHT_DECAY:
                g = g + weight_decay * p
            if MOMENTUM:
                b_ptr = tl.load(addrs + 2 * n_tensors + t).to(ptr_ty)
                if ALIGNED:
                    b_ptr = tl.multiple_of(b_ptr, 16)
                if first_step != 0:
                    buf = g  # torch: the first buffer is the gradient itself, no dampening
                else:
                    buf = tl.load(b_ptr + offs, mask=lmask).to(tl.float32)
                    buf = buf * momentum + one_minus_dampening * g
                # Rounded to the buffer's dtype first: torch reads the stored buffer back.
                buf = buf.to(dtype).to(tl.float32)
                tl.store(b_ptr + offs, buf.to(dtype), mask=lmask)
                if NESTEROV:
                    g = g + momentum * buf
                else:
                    g = buf
            tl.store(p_ptr + offs, (p - lr * g).to(dtype), mask=lmask)


def sgd_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """One in-place SGD step over n tensors of one device and dtype, in one launch.

    ``params`` (and ``momentum_buffers`` when ``momentum != 0``) are updated in place; ``grads``
    is read (and overwritten with the unscaled gradient when ``grad_scale`` is given). With
    ``first_step`` the buffers are written (not read): buf = grad, as torch. ``grad_scale`` /
    ``found_inf``: GradScaler's one-element tensors (module docstring), read in-kernel.
    """
    use_momentum = momentum != 0
    arrays = [params, grads] + ([momentum_buffers] if use_momentum else [])
    check(arrays, ["params", "grads", "momentum_buffers"])
    arrays, writebacks = prepare(arrays, [True, grad_scale is not None, True])
    if not arrays[0]:
        return
    ref = arrays[0][0]
    cfg = config_for(_sgd_kernel)
    addrs, meta, n_blocks, aligned = tables(arrays, cfg.kwargs["BLOCK"])
    with on_device(arrays[0][0]):
        launch(
            _sgd_kernel,
            (n_blocks,),
            configs=[GPU_CONFIG],
            interpret_config=INTERPRET_CONFIG,
            addrs=addrs,
            meta=meta,
            ref=ref,
            grad_scale=amp_scalar(grad_scale, "grad_scale", ref.device, ref),
            found_inf=amp_scalar(found_inf, "found_inf", ref.device, ref),
            n_tensors=len(arrays[0]),
            lr=float(lr),
            momentum=float(momentum),
            one_minus_dampening=float(1.0 - dampening),
            weight_decay=float(weight_decay),
            first_step=int(bool(first_step)),
            MOMENTUM=use_momentum,
            NESTEROV=bool(nesterov),
            MAXIMIZE=bool(maximize),
            WEIGHT_DECAY=weight_decay != 0,
            HAS_SCALE=grad_scale is not None,
            HAS_INF=found_inf is not None,
            ALIGNED=aligned,
        )
    for dst, src in writebacks:
        dst.copy_(src)


__all__ = ["sgd_step"]
