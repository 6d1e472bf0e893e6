"""Multi-tensor SGD step (momentum, dampening, nesterov, weight decay, maximize): one launch
for every tensor of a (group, device, dtype).

The tables of ``kernels/multi_tensor.py`` (addresses array-major: params, grads[, momentum
buffers]; sizes, first block, block owner), as ``kernels/adam.py``. All arithmetic in fp32;
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

from .multi_tensor import (
    Checked,
    block_of,
    check,
    chunk_of,
    launch_step,
    load_param_grad,
    runs,
    tensor_ptr,
)


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
    ITERS: tl.constexpr,
):
    t, start, numel = chunk_of(meta, n_tensors, BLOCK * ITERS)
    dtype = ref.dtype.element_ty
    p_ptr = tensor_ptr(addrs, n_tensors, t, ref, 0, ALIGNED)
    g_ptr = tensor_ptr(addrs, n_tensors, t, ref, 1, ALIGNED)
    if MOMENTUM:
        b_ptr = tensor_ptr(addrs, n_tensors, t, ref, 2, ALIGNED)

    for it in range(ITERS):
        offs, mask, full, present = block_of(start, it, numel, BLOCK)
        for MASKED in tl.static_range(2):  # two copies of the body (``runs``)
            if runs(full, present, found_inf, MASKED, HAS_INF):
                lmask = mask if MASKED else None
                p, g = load_param_grad(p_ptr, g_ptr, offs, lmask, grad_scale, HAS_SCALE, MAXIMIZE)
                if WEIGHT_DECAY:
                    g = g + weight_decay * p
                if MOMENTUM:
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


# The kernel's arrays, in order (``multi_tensor.check`` names them in its errors).
ARRAY_NAMES = ["params", "grads", "momentum_buffers"]


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
    checked: Checked | None = None,
    grad_ptrs: tuple | None = None,
) -> None:
    """One in-place SGD step over n tensors of one device and dtype, in one launch.

    ``params`` (and ``momentum_buffers`` when ``momentum != 0``) are updated in place; ``grads``
    is read (and overwritten with the unscaled gradient when ``grad_scale`` is given). With
    ``first_step`` the buffers are written (not read): buf = grad, as torch. ``grad_scale`` /
    ``found_inf``: GradScaler's one-element tensors (module docstring), read in-kernel.
    ``checked``, ``grad_ptrs``: as ``kernels.adam.adam_step``'s (a step plan's).
    """
    use_momentum = momentum != 0
    arrays = [params, grads] + ([momentum_buffers] if use_momentum else [])
    if checked is None:
        checked = check(arrays, ARRAY_NAMES)
    launch_step(
        _sgd_kernel,
        arrays,
        grad_scale,
        found_inf,
        checked=checked,
        grad_ptrs=grad_ptrs,
        lr=float(lr),
        momentum=float(momentum),
        one_minus_dampening=float(1.0 - dampening),
        weight_decay=float(weight_decay),
        first_step=int(bool(first_step)),
        MOMENTUM=use_momentum,
        NESTEROV=bool(nesterov),
        MAXIMIZE=bool(maximize),
        WEIGHT_DECAY=weight_decay != 0,
    )


__all__ = ["ARRAY_NAMES", "sgd_step"]
