"""SGD step: the mutating custom op over the multi-tensor Triton kernel, and the dispatch
between it and torch's own single-tensor algorithm.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backend import use_triton
from .adam import _KERNEL_DTYPES, _torch_sgd_module, call_torch


@torch.library.custom_op(
    "fusedmlp::sgd_multi_tensor_step", mutates_args=("params", "momentum_buffers")
)
def sgd_multi_tensor_step(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
) -> None:
    """One fused SGD step over tensors of one device and dtype (one kernel launch)."""
    from ..kernels import sgd as K

    K.sgd_step(
        params,
        grads,
        momentum_buffers,
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        maximize=maximize,
        first_step=first_step,
    )


@sgd_multi_tensor_step.register_fake
def _(params, grads, momentum_buffers, *args) -> None:
    return None


def _torch_single_tensor(params, grads, bufs, **hp):
    if not params:
        return
    call_torch(
        _torch_sgd_module().sgd,
        params,
        grads,
        bufs,
        has_sparse_grad=any(g.is_sparse for g in grads),
        foreach=False,
        fused=False,
        **hp,
    )


def sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    *,
    weight_decay: float,
    momentum: float,
    lr: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """SGD over one param group (torch's functional ``sgd`` arguments, float scalars).

    ``momentum_buffer_list`` is updated in place as torch's: a ``None`` entry becomes the new
    buffer (the caller stores it in the optimizer state). Triton path: one launch per
    (device, dtype, buffer-exists) partition. Sparse gradients, float64/complex params and the
    torch backend run torch's own single-tensor algorithm.
    """
    hp = dict(
        weight_decay=weight_decay,
        momentum=momentum,
        lr=lr,
        dampening=dampening,
        nesterov=nesterov,
        maximize=maximize,
    )
    if not params:
        return
    use_momentum = momentum != 0
    if use_momentum and len(momentum_buffer_list) != len(params):
        raise ValueError(
            f"sgd: expected one momentum buffer entry per param, got "
            f"{len(momentum_buffer_list)} for {len(params)} params"
        )
    kernel_idx = [
        i
        for i, (p, g) in enumerate(zip(params, grads))
        if p.dtype in _KERNEL_DTYPES and g.layout == torch.strided
    ]
    if not kernel_idx or not use_triton(*(params[i] for i in kernel_idx)):
        _torch_single_tensor(params, grads, momentum_buffer_list, **hp)
        return
    chosen = set(kernel_idx)
    rest = [i for i in range(len(params)) if i not in chosen]
    if rest:
        bufs = [momentum_buffer_list[i] for i in rest] if use_momentum else []
        _torch_single_tensor([params[i] for i in rest], [grads[i] for i in rest], bufs, **hp)
        for j, i in enumerate(rest if use_momentum else []):
            momentum_buffer_list[i] = bufs[j]

    partitions: dict = {}
    for i in kernel_idx:
        p = params[i]
        fresh = use_momentum and momentum_buffer_list[i] is None
        partitions.setdefault((p.device, p.dtype, fresh), []).append(i)
    for (_, _, fresh), idx in partitions.items():
        bufs = []
        if use_momentum:
            for i in idx:
                if fresh:
                    # torch: buf = clone(grad) (the grad's layout), written by the kernel.
                    momentum_buffer_list[i] = torch.empty_like(grads[i])
                bufs.append(momentum_buffer_list[i])
        torch.ops.fusedmlp.sgd_multi_tensor_step(
            [params[i] for i in idx],
            [grads[i] for i in idx],
            bufs,
            float(lr),
            float(momentum),
            float(dampening),
            float(weight_decay),
            bool(nesterov),
            bool(maximize),
            bool(fresh),
        )


__all__ = ["sgd", "sgd_multi_tensor_step"]
