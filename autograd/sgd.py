"""SGD step: the mutating custom op over the multi-tensor Triton kernel, and the dispatch
between it and torch's own single-tensor algorithm.

AMP (``torch.amp.GradScaler``): ``grad_scale`` and ``found_inf`` are read in-kernel, as by
torch's fused SGD (module docstring of ``kernels/sgd.py``); the torch fallback calls torch's
fused SGD kernel for them. A step that would create momentum buffers (a param's first step)
reads ``found_inf`` on the host instead (one synchronisation, on such steps only) and, when it
is set, skips the whole step without creating them, leaving ``None`` in
``momentum_buffer_list``: torch's non-fused SGD, which GradScaler does not call on such a step,
creates no buffer and no state entry, and its next step is the first (``buf = grad``, no
dampening). ``fusedmlp.optim.SGD`` then drops the state entries the step's look-up made.
(Zero buffers would give torch's next step only with ``dampening == 0``, and a
``momentum_buffer`` torch has not; torch's own fused SGD leaves uninitialised ones.) Traced
code, which cannot read ``found_inf`` on the host, keeps zero buffers.
"""

from __future__ import annotations

import operator
from itertools import repeat

import torch
from torch import Tensor

from ._custom_op import caller, custom_op, plain_eager
from .adam import (
    _fused_ok,
    _no_output,
    _torch_sgd_module,
    amp_on,
    attr_set,
    call_torch,
    hyper_float,
    kernel_partition,
    one_device_and_dtype,
    unscale_and_check,
)

_increment_version = torch.autograd.graph.increment_version
_is_compiling = torch.compiler.is_compiling


@custom_op("fusedmlp::sgd_multi_tensor_step", mutates_args=("params", "grads", "momentum_buffers"))
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
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One fused SGD step over tensors of one device and dtype (one kernel launch); ``grads``
    are overwritten with the unscaled gradients when ``grad_scale`` is given."""
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
        grad_scale=grad_scale,
        found_inf=found_inf,
    )


sgd_multi_tensor_step.register_fake(_no_output)


_sgd_step = caller(sgd_multi_tensor_step)


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
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """SGD over one param group (torch's functional ``sgd`` arguments, float scalars).

    ``momentum_buffer_list`` is updated in place as torch's: a ``None`` entry becomes the new
    buffer (the caller stores it in the optimizer state). Triton path: one launch per
    (device, dtype, buffer-exists) partition. Sparse gradients, float64/complex params, momentum
    buffers in a dtype other than their param's (a param converted after momentum steps: torch's
    in-place ops cast) and the torch backend run torch's own single-tensor algorithm.
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
    if (
        found_inf is not None
        and use_momentum
        and _skipped_first_step(momentum_buffer_list, found_inf)
    ):
        return  # nothing changed: the None entries stay (module docstring)
    kernel_idx, rest = kernel_partition(params, grads)
    amp = (grad_scale, found_inf)
    if not kernel_idx:
        _torch_path(params, grads, momentum_buffer_list, amp, **hp)
        return
    if use_momentum:
        odd = _other_dtype_buffers(kernel_idx, params, momentum_buffer_list)
        if odd:  # torch's in-place ops cast such a buffer; the kernel takes one dtype
            _torch_other_dtype(odd, params, grads, momentum_buffer_list, amp, hp)
            taken = set(odd)
            kernel_idx = [i for i in kernel_idx if i not in taken]
    if rest:
        bufs = [momentum_buffer_list[i] for i in rest] if use_momentum else []
        _torch_path([params[i] for i in rest], [grads[i] for i in rest], bufs, amp, **hp)
        for j, i in enumerate(rest if use_momentum else []):
            momentum_buffer_list[i] = bufs[j]

    if kernel_idx:
        _partitioned(kernel_idx, params, grads, momentum_buffer_list, amp, hp, kernel=True)


def _skipped_first_step(bufs, found_inf) -> bool:
    """Whether GradScaler skips a step that would create momentum buffers (``bufs`` holds a
    None): torch's non-fused SGD creates none on such a step (module docstring). Reads
    ``found_inf`` on the host (eager mode only; traced code keeps zero buffers)."""
    if _is_compiling():
        return False
    if True not in map(operator.is_, bufs, repeat(None)):
        return False
    return bool(found_inf.item())


def _other_dtype_buffers(indices, params, bufs) -> list:
    """The ``indices`` whose momentum buffer exists in a dtype other than its param's (a model
    converted with ``.half()``/``.float()`` after momentum steps: torch's in-place ops cast
    between the two, so torch's step runs; the kernel takes one dtype per launch)."""
    if not _is_compiling():  # the common case: one dtype throughout, read with C loops
        dtypes = set(map(getattr, bufs, repeat("dtype"), repeat(None)))
        dtypes.discard(None)
        param_dtypes = attr_set("dtype", params)
        if len(param_dtypes) == 1 and dtypes <= param_dtypes:
            return []
    return [i for i in indices if bufs[i] is not None and bufs[i].dtype != params[i].dtype]


def _torch_other_dtype(indices, params, grads, bufs, amp, hp) -> None:
    """torch's single-tensor SGD over ``indices`` (their buffers exist: updated in place), after
    GradScaler's own unscale and skip for the AMP tensors (torch's fused SGD takes one dtype)."""
    ps = [params[i] for i in indices]
    gs = [grads[i] for i in indices]
    if amp[0] is not None or amp[1] is not None:
        if not unscale_and_check(gs, *amp):
            return
    _torch_single_tensor(ps, gs, [bufs[i] for i in indices], **hp)


def _torch_path(params, grads, bufs, amp, **hp):
    """torch's own algorithm: single-tensor, or its fused SGD kernel for the AMP tensors."""
    if not params:
        return
    grad_scale, found_inf = amp
    if grad_scale is not None or found_inf is not None:
        # torch's fused SGD takes a buffer of its param's dtype only: one of another dtype (a
        # model converted after momentum steps; float64 params and the torch backend come
        # here) takes GradScaler's own unscale and skip, then the single-tensor step, which
        # casts in place as torch.optim.SGD's under GradScaler (the fused one raised)
        if _fused_ok(params, grads, (bufs,), sgd=True) and not (
            bufs and _other_dtype_buffers(range(len(params)), params, bufs)
        ):
            _partitioned(range(len(params)), params, grads, bufs, amp, hp, kernel=False)
            return
        if not unscale_and_check(grads, grad_scale, found_inf):
            return
    _torch_single_tensor(params, grads, bufs, **hp)


def _partitioned(indices, params, grads, momentum_buffer_list, amp, hp, kernel):
    """One fused step (ours, or torch's ``_fused_sgd_``) per (device, dtype, new-buffer)
    partition; new momentum buffers are created here and stored in ``momentum_buffer_list``."""
    scalars = _scalars(hp)  # raises before any buffer is made
    use_momentum = hp["momentum"] != 0
    found_inf = amp[1]
    partitions: dict = {}
    shared = one_device_and_dtype(params) if len(indices) == len(params) else None
    if shared is not None and (
        not use_momentum or True not in map(operator.is_, momentum_buffer_list, repeat(None))
    ):  # one partition, every buffer present (the common case): no per-tensor grouping
        # (a C-level identity walk: torch.is_tensor is a Python call per tensor)
        partitions[(*shared, False)] = None
    else:
        for i in indices:
            p = params[i]
            fresh = use_momentum and momentum_buffer_list[i] is None
            partitions.setdefault((p.device, p.dtype, fresh), []).append(i)
    per_device: dict = {}
    for (device, _, fresh), idx in partitions.items():
        if idx is None:
            ps, gs, bufs = params, grads, list(momentum_buffer_list) if use_momentum else []
        else:
            ps, gs, bufs = [params[i] for i in idx], [grads[i] for i in idx], []
            for i in idx if use_momentum else ():
                if fresh:
                    # torch: buf = clone(grad) (the grad's layout), written by the kernel;
                    # zeros when the step may be skipped (module docstring).
                    new = torch.zeros_like if found_inf is not None else torch.empty_like
                    momentum_buffer_list[i] = new(grads[i])
                bufs.append(momentum_buffer_list[i])
        scale, inf = amp_on(device, amp, per_device)
        if not kernel:
            torch._fused_sgd_(
                ps, gs, bufs, **scalars, is_first_step=bool(fresh), grad_scale=scale,
                found_inf=inf,
            )  # fmt: skip
            continue
        _sgd_step(ps, gs, bufs, *scalars.values(), bool(fresh), scale, inf)


def _scalars(hp) -> dict:
    """The step's hyperparameters as floats and bools, in the custom op's schema order (lr,
    momentum, dampening, weight_decay, nesterov, maximize)."""
    return dict(
        lr=hyper_float("lr", hp["lr"]),
        momentum=hyper_float("momentum", hp["momentum"]),
        dampening=hyper_float("dampening", hp["dampening"]),
        weight_decay=hyper_float("weight_decay", hp["weight_decay"]),
        nesterov=bool(hp["nesterov"]),
        maximize=bool(hp["maximize"]),
    )


def sgd_planned(params, grads, momentum_buffers, checked, grad_ptrs, **hp) -> bool:
    """A planned group's step (``fusedmlp.optim._plan`` verified the lists against
    ``checked``, ``adam.planned_check``'s result; every momentum buffer exists; ``grad_ptrs``
    the gradients' addresses): ``sgd``'s one-partition kernel launch without its partition
    tests and the kernel's check. False, with nothing changed, when a dispatch or function
    mode is active or grad mode is on."""
    if torch.is_grad_enabled() or not plain_eager():
        return False
    scalars = _scalars(hp)  # raises before anything is touched
    use_momentum = hp["momentum"] != 0
    bufs = momentum_buffers if use_momentum else []
    for mutated in (params, grads, bufs):  # as the custom op's eager path
        _increment_version(mutated)
    from ..kernels import sgd as K

    K.sgd_step(
        params, grads, bufs, **scalars, first_step=False, checked=checked,
        grad_ptrs=grad_ptrs,
    )  # fmt: skip
    return True


__all__ = ["sgd", "sgd_multi_tensor_step", "sgd_planned"]
