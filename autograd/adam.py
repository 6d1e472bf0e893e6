"""Adam / AdamW step: the mutating custom op over the multi-tensor Triton kernel, and the
dispatch between it and torch's own single-tensor algorithm.

The op mutates its inputs (params and optimizer state), so it is declared with
``mutates_args`` and has no autograd formula (an optimizer step runs under ``no_grad``).
"""

from __future__ import annotations

import importlib
import inspect

import torch
from torch import Tensor

from ..backend import use_triton

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@torch.library.custom_op(
    "fusedmlp::adam_multi_tensor_step",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"),
)
def adam_multi_tensor_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step_size: float,
    bias_correction2_sqrt: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
) -> None:
    """One fused Adam/AdamW step over tensors of one device and dtype (one kernel launch)."""
    from ..kernels import adam as K

    K.adam_step(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        step_size=step_size,
        bias_correction2_sqrt=bias_correction2_sqrt,
        amsgrad=amsgrad,
        maximize=maximize,
        decoupled_weight_decay=decoupled_weight_decay,
    )


@adam_multi_tensor_step.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *args) -> None:
    return None


def _torch_adam_module():
    """torch.optim's ``adam`` module (``torch.optim.adam`` is the class's module, shadowed)."""
    return importlib.import_module("torch.optim.adam")


def _torch_sgd_module():
    return importlib.import_module("torch.optim.sgd")


def call_torch(fn, *args, **kwargs):
    """Call a torch.optim functional with only the keywords the installed torch accepts."""
    accepted = inspect.signature(fn).parameters
    return fn(*args, **{k: v for k, v in kwargs.items() if k in accepted})


def _torch_single_tensor(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, **hp):
    if not params:
        return
    call_torch(
        _torch_adam_module().adam,
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        steps,
        foreach=False,
        fused=False,
        capturable=False,
        differentiable=False,
        has_complex=any(torch.is_complex(p) for p in params),
        **hp,
    )


def adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    decoupled_weight_decay: bool = False,
) -> None:
    """Adam/AdamW over one param group (torch's functional ``adam`` arguments, float scalars,
    ``state_steps`` float32 scalar tensors on the CPU, as torch.optim keeps them).

    Triton path: tensors are partitioned by (device, dtype, step); each partition's step
    counters are incremented on the host, ``1 - beta^t`` computed in float64, and one kernel
    runs for the whole partition. float64/complex tensors, and the torch backend, run torch's
    own single-tensor algorithm.
    """
    hp = dict(
        amsgrad=amsgrad,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        maximize=maximize,
        decoupled_weight_decay=decoupled_weight_decay,
    )
    if not params:
        return
    if amsgrad and len(max_exp_avg_sqs) != len(params):
        raise ValueError(
            f"adam: amsgrad needs one max_exp_avg_sq per param, got {len(max_exp_avg_sqs)} "
            f"for {len(params)} params"
        )
    kernel_idx = [
        i
        for i, p in enumerate(params)
        if p.dtype in _KERNEL_DTYPES and grads[i].layout == torch.strided
    ]
    if not kernel_idx or not use_triton(*(params[i] for i in kernel_idx)):
        _torch_single_tensor(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **hp
        )
        return
    if len(kernel_idx) == len(params):
        _fused(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, hp)
        return
    chosen = set(kernel_idx)
    rest = [i for i in range(len(params)) if i not in chosen]
    lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
    _torch_single_tensor(*_select(rest, lists, amsgrad), **hp)
    _fused(*_select(kernel_idx, lists, amsgrad), hp)


def _select(idx, lists, amsgrad):
    params, grads, m, v, vmax, steps = lists
    return (
        [params[i] for i in idx],
        [grads[i] for i in idx],
        [m[i] for i in idx],
        [v[i] for i in idx],
        [vmax[i] for i in idx] if amsgrad else [],
        [steps[i] for i in idx],
    )


def _fused(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, hp):
    groups: dict = {}
    for i, (p, s) in enumerate(zip(params, state_steps)):
        # Host-side step counters (torch.optim's default): reading them never syncs.
        groups.setdefault((p.device, p.dtype, float(s)), []).append(i)
    beta1, beta2, lr = hp["beta1"], hp["beta2"], hp["lr"]
    for (_, _, step), idx in groups.items():
        steps = [state_steps[i] for i in idx]
        torch._foreach_add_(steps, 1)
        t = step + 1.0
        bias_correction1 = 1 - beta1**t
        bias_correction2 = 1 - beta2**t
        torch.ops.fusedmlp.adam_multi_tensor_step(
            [params[i] for i in idx],
            [grads[i] for i in idx],
            [exp_avgs[i] for i in idx],
            [exp_avg_sqs[i] for i in idx],
            [max_exp_avg_sqs[i] for i in idx] if hp["amsgrad"] else [],
            float(lr),
            float(beta1),
            float(beta2),
            float(hp["eps"]),
            float(hp["weight_decay"]),
            float(lr / bias_correction1),
            float(bias_correction2**0.5),
            bool(hp["amsgrad"]),
            bool(hp["maximize"]),
            bool(hp["decoupled_weight_decay"]),
        )


__all__ = [
    "_torch_adam_module",
    "_torch_sgd_module",
    "adam",
    "adam_multi_tensor_step",
    "call_torch",
]
