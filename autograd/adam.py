"""Adam / AdamW step: the mutating custom op over the multi-tensor Triton kernel, and the
dispatch between it and torch's own single-tensor algorithm.

The op mutates its inputs (params and optimizer state), so it is declared with
``mutates_args`` and has no autograd formula (an optimizer step runs under ``no_grad``).

Two step-counter regimes:

- host steps (torch.optim's default: float32 CPU scalars): incremented and read on the host,
  bias corrections in float64 on the host (``adam_multi_tensor_step``);
- device steps (``capturable=True``, and every step under ``torch.amp.GradScaler``, whose
  ``found_inf`` is a device tensor): float32 scalars on the params' device, incremented with
  ``torch._foreach_add_`` and, when GradScaler found an inf, decremented by ``found_inf``
  (torch's fused Adam); the kernel reads them (``adam_multi_tensor_step_device``). No host
  synchronisation, so the step can be captured in a CUDA graph.

AMP: ``grad_scale`` (None after ``GradScaler.unscale_``) and ``found_inf`` are honoured as by
torch's fused Adam: unscaled in-kernel (the unscaled gradient is written back to ``.grad``),
the whole update skipped when ``found_inf`` is nonzero. The torch fallback runs torch's own
fused Adam (``fused=True``) for them; complex parameters, which torch's fused kernels do not
take, are unscaled with foreach ops and skipped after reading ``found_inf`` on the host.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import operator

import torch
from torch import Tensor

from ..backend import get_backend, use_triton, use_triton_all
from ._custom_op import caller, custom_op, plain_eager

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_KERNEL_DTYPE_SET = frozenset(_KERNEL_DTYPES)
_STRIDED = {torch.strided}
# Per-tensor attributes read with map(): a C loop, no Python frame per tensor (host time per
# step over hundreds of tensors).
_GETTERS = {a: operator.attrgetter(a) for a in ("dtype", "device", "layout", "is_cpu")}
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
_increment_version = torch.autograd.graph.increment_version


def attr_set(name: str, tensors) -> set:
    """``{t.<name> for t in tensors}``, read with a C loop (``map``): eager mode only (dynamo
    cannot trace ``attrgetter``: a graph break, and a recompilation of the optimizer step at
    every call). Traced code takes the plain-loop branches of the callers below."""
    return set(map(_GETTERS[name], tensors))


@custom_op(
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
    _kernel_step(
        (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs),
        (lr, beta1, beta2, eps, weight_decay),
        (amsgrad, maximize, decoupled_weight_decay),
        step_size=step_size,
        bias_correction2_sqrt=bias_correction2_sqrt,
    )


def _kernel_step(tensors, scalars, flags, **kw) -> None:
    """``kernels.adam.adam_step`` over the five tensor lists; ``scalars`` = (lr, beta1, beta2,
    eps, weight_decay), ``flags`` = (amsgrad, maximize, decoupled_weight_decay), in schema
    order (``_hyper``)."""
    from ..kernels import adam as K

    lr, beta1, beta2, eps, weight_decay = scalars
    amsgrad, maximize, decoupled_weight_decay = flags
    K.adam_step(
        *tensors,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        decoupled_weight_decay=decoupled_weight_decay,
        **kw,
    )


def _no_output(*args, **kwargs) -> None:
    return None


adam_multi_tensor_step.register_fake(_no_output)


@custom_op(
    "fusedmlp::adam_multi_tensor_step_device",
    mutates_args=("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"),
)
def adam_multi_tensor_step_device(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
) -> None:
    """One fused Adam/AdamW step with device step counters (already incremented) and the AMP
    ``grad_scale``/``found_inf`` tensors read in-kernel; ``grads`` are overwritten with the
    unscaled gradients when ``grad_scale`` is given."""
    _kernel_step(
        (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs),
        (lr, beta1, beta2, eps, weight_decay),
        (amsgrad, maximize, decoupled_weight_decay),
        step_size=0.0,
        bias_correction2_sqrt=1.0,
        state_steps=state_steps,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )


adam_multi_tensor_step_device.register_fake(_no_output)


_adam_step = caller(adam_multi_tensor_step)
_adam_step_device = caller(adam_multi_tensor_step_device)


# torch.optim's ``adam``/``sgd`` modules (``torch.optim.adam`` may be shadowed by a name),
# looked up once: torch.compile cannot trace importlib (a graph break in every compiled step).
_TORCH_OPTIM_MODULES = {
    name: importlib.import_module(f"torch.optim.{name}") for name in ("adam", "sgd")
}


def _torch_adam_module():
    return _TORCH_OPTIM_MODULES["adam"]


def _torch_sgd_module():
    return _TORCH_OPTIM_MODULES["sgd"]


# torch.optim functional -> the names of its parameters: ``inspect.signature`` costs ~40 us a
# call, at every step of an optimizer that runs torch's algorithm (the CPU fallback).
_ACCEPTED: dict = {}


def call_torch(fn, *args, **kwargs):
    """Call a torch.optim functional with only the keywords the installed torch accepts."""
    if _is_compiling():  # traced code: no module-level cache lookup in the graph
        accepted = inspect.signature(fn).parameters
    else:
        accepted = _ACCEPTED.get(fn)
        if accepted is None:
            accepted = _ACCEPTED[fn] = frozenset(inspect.signature(fn).parameters)
    return fn(*args, **{k: v for k, v in kwargs.items() if k in accepted})


def unscale_and_check(grads: list[Tensor], grad_scale, found_inf) -> bool:
    """GradScaler's work for an algorithm without in-kernel AMP support: divide the gradients
    by ``grad_scale`` in place; False when ``found_inf`` is set (reads it: one host sync)."""
    if grad_scale is not None:
        for g in grads:
            g.div_(grad_scale.to(g.device, non_blocking=True))
    return found_inf is None or not bool(found_inf.item())


def _fused_ok(params, grads, states=(), sgd: bool = False) -> bool:
    """Whether torch's fused kernels take these tensors (real floating, strided grads) and
    give its non-fused algorithm's numbers. ``states``: lists of the state tensors (None for a
    buffer not made yet); ``sgd``: for ``torch._fused_sgd_``.

    CPU tensors must be contiguous, and fp16/bf16 ones take no fused SGD: torch 2.13's CPU fused
    Adam and SGD read a non-contiguous tensor (a transposed weight, its gradient or a state of
    its strides) as if it were contiguous, and its CPU fused SGD is wrong for fp16/bf16 (every
    update off by tenths), where torch.optim's default (non-fused) optimizer under GradScaler
    is right. Those take GradScaler's own unscale and skip instead (reading ``found_inf`` on
    the host: a CPU tensor, no device to wait for)."""
    if not all(p.is_floating_point() and g.layout == torch.strided for p, g in zip(params, grads)):
        return False
    cpu = [t for t in itertools.chain(params, grads, *states) if t is not None and t.is_cpu]
    if not all(t.is_contiguous() for t in cpu):
        return False
    return not sgd or not any(t.dtype in (torch.float16, torch.bfloat16) for t in cpu)


def _torch_path(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, device_step, amp, **hp
):
    """torch's own algorithm for the tensors the kernel does not take (or the torch backend)."""
    if not params:
        return
    tensors = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
    grad_scale, found_inf = amp
    if grad_scale is not None or found_inf is not None:
        if _fused_ok(params, grads, (exp_avgs, exp_avg_sqs, max_exp_avg_sqs)):
            _torch_adam(
                *tensors,
                fused=True,
                capturable=False,
                grad_scale=grad_scale,
                found_inf=found_inf,
                has_complex=False,
                **hp,
            )
            return
        if not unscale_and_check(grads, grad_scale, found_inf):
            return
    has_complex = any(torch.is_complex(p) for p in params)
    # torch's capturable algorithm reads device counters without a host sync, but refuses CPU
    # params: counters on the CPU (AMP keywords on CPU tensors) take its host-step algorithm
    capturable = device_step and not all(s.is_cpu for s in steps)
    _torch_adam(*tensors, fused=False, capturable=capturable, has_complex=has_complex, **hp)


def _torch_adam(*tensors, fused, capturable, **kw):
    """torch.optim's functional ``adam`` (single-tensor or its fused kernel) over the six lists."""
    call_torch(
        _torch_adam_module().adam,
        *tensors,
        foreach=False,
        fused=fused,
        capturable=capturable,
        differentiable=False,
        **kw,
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
    device_step: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    steps_buffer: Tensor | None = None,
) -> None:
    """Adam/AdamW over one param group (torch's functional ``adam`` arguments, float scalars).

    ``state_steps``: float32 scalar tensors on the CPU, as torch.optim keeps them by default
    (host steps), or, with ``device_step`` (required when ``grad_scale``/``found_inf`` are
    given), float32 scalars on each param's device (module docstring).

    Triton path: host steps partition the tensors by (device, dtype, step); each partition's
    step counters are incremented on the host, ``1 - beta^t`` computed in float64, and one
    kernel runs for the whole partition. Device steps partition by (device, dtype) and the
    kernel reads the counters. float64/complex tensors, and the torch backend, run torch's own
    algorithm (single-tensor; its fused Adam for the AMP tensors).

    ``steps_buffer``: a 1-D tensor whose elements are exactly the (host) ``state_steps``, in
    order (0-d views of it): read and incremented with one op each when every tensor takes
    the kernel.
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
    amp = (grad_scale, found_inf)
    device_step = bool(device_step) or grad_scale is not None or found_inf is not None
    if amsgrad and len(max_exp_avg_sqs) != len(params):
        raise ValueError(
            f"adam: amsgrad needs one max_exp_avg_sq per param, got {len(max_exp_avg_sqs)} "
            f"for {len(params)} params"
        )
    lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
    kernel_idx, rest = kernel_partition(params, grads)
    if not kernel_idx:
        _torch_path(*lists, device_step, amp, **hp)
        return
    if not rest:
        _fused(lists, hp, device_step, amp, steps_buffer)
        return
    _torch_path(*_select(rest, lists, amsgrad), device_step, amp, **hp)
    _fused(_select(kernel_idx, lists, amsgrad), hp, device_step, amp)


def one_device_and_dtype(tensors) -> tuple | None:
    """``(device, dtype)`` when every tensor shares them, else None (read with C loops)."""
    if not tensors:
        return None
    if _is_compiling():  # plain loops: no attrgetter, no set algebra in the traced graph
        first = tensors[0]
        same = all(t.dtype == first.dtype and t.device == first.device for t in tensors)
        return (first.device, first.dtype) if same else None
    if len(attr_set("dtype", tensors)) != 1:
        return None
    devices = attr_set("device", tensors)
    return (*devices, tensors[0].dtype) if len(devices) == 1 else None


def kernel_partition(params, grads):
    """``(kernel_idx, rest)``: the indices of the tensors the Triton kernel takes (fp32/fp16/bf16
    params with strided grads) and of the others; all in ``rest`` when the backend runs torch."""
    if get_backend() == "torch":
        return [], list(range(len(params)))
    if not _is_compiling() and (
        attr_set("dtype", params) <= _KERNEL_DTYPE_SET and attr_set("layout", grads) == _STRIDED
    ):  # the common case, without a per-tensor loop
        if use_triton_all(params):
            return list(range(len(params))), []
        return [], list(range(len(params)))
    kernel_idx = [
        i
        for i, p in enumerate(params)
        if p.dtype in _KERNEL_DTYPES and grads[i].layout == torch.strided
    ]
    if not kernel_idx or not use_triton(*(params[i] for i in kernel_idx)):
        return [], list(range(len(params)))
    chosen = set(kernel_idx)
    return kernel_idx, [i for i in range(len(params)) if i not in chosen]


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


def hyper_float(name: str, value) -> float:
    """``float(value)`` for a hyperparameter, refusing text: ``float("1e-3")`` succeeds, where
    torch.optim's own step raises ``TypeError`` for a string (e.g. a YAML ``1e-3``) in a group."""
    if isinstance(value, (str, bytes, bytearray)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    return float(value)


def _hyper(hp):
    """The custom ops' scalar arguments, in schema order: (lr, beta1, beta2, eps, weight_decay)
    as floats and (amsgrad, maximize, decoupled_weight_decay) as bools."""
    scalars = tuple(hyper_float(k, hp[k]) for k in ("lr", "beta1", "beta2", "eps", "weight_decay"))
    flags = tuple(bool(hp[k]) for k in ("amsgrad", "maximize", "decoupled_weight_decay"))
    return scalars, flags


def amp_on(device, amp, per_device: dict):
    """``amp`` = (grad_scale, found_inf) on ``device``: moved once per device (memoised in
    ``per_device``), without blocking (torch's fused optimizers)."""
    if device not in per_device:
        per_device[device] = tuple(
            None if t is None else t.to(device, non_blocking=True) for t in amp
        )
    return per_device[device]


def _fused_device_step(lists, hp, amp):
    scalars, flags = _hyper(hp)
    groups: dict = {}
    for i, p in enumerate(lists[0]):
        groups.setdefault((p.device, p.dtype), []).append(i)
    per_device: dict = {}
    for (device, _), idx in groups.items():
        scale, inf = amp_on(device, amp, per_device)
        *tensors, steps = _select(idx, lists, hp["amsgrad"])
        torch._foreach_add_(steps, 1)
        _adam_step_device(*tensors, steps, scale, inf, *scalars, *flags)
        if inf is not None:  # a skipped step does not count (torch's fused Adam)
            torch._foreach_sub_(steps, [inf] * len(steps))


def _fused(lists, hp, device_step, amp, steps_buffer=None):
    if device_step:
        _fused_device_step(lists, hp, amp)
        return
    scalars, flags = _hyper(hp)  # raises before any counter moves
    groups: dict = {}
    # Host-side step counters (torch.optim's default): reading them never syncs. One stacked
    # read instead of a float() per tensor (~2-5 us each on the host); all counters incremented
    # up front, as torch's foreach Adam does, by one shared 0-d tensor: a Python scalar costs
    # _foreach_add_ a conversion per tensor (1.26 ms against 0.33 ms for 1,000 counters).
    steps = lists[5]
    if steps_buffer is not None:  # the counters are its elements: one read, one increment
        values = steps_buffer.tolist()
        steps_buffer.add_(1)
    elif (
        steps
        and len(attr_set("dtype", steps)) == 1
        and len(attr_set("device", steps)) == 1
        and len(set(map(Tensor.size, steps))) == 1
        and steps[0].numel() == 1
    ):  # one-element counters of one shape: 0-d (torch's), or torch < 2.1's (1,)
        values = torch.stack(steps).view(-1).tolist()
        one = torch.ones((), dtype=steps[0].dtype, device=steps[0].device)
        torch._foreach_add_(steps, [one] * len(steps))
    else:  # float(): one number per counter, whatever its shape (torch's .item())
        values = [float(s) for s in steps]
        torch._foreach_add_(steps, 1)
    params = lists[0]
    shared = one_device_and_dtype(params) if len(set(values)) == 1 else None
    if shared is not None:  # one partition (the common case): no per-tensor grouping
        groups[(*shared, values[0])] = None
    else:
        for i, (p, step) in enumerate(zip(params, values)):
            groups.setdefault((p.device, p.dtype, step), []).append(i)
    for (_, _, step), idx in groups.items():
        if idx is None:
            tensors = (*lists[:4], lists[4] if hp["amsgrad"] else [])
        else:
            tensors = _select(idx, lists, hp["amsgrad"])[:5]
        _adam_step(*tensors, *scalars, *_bias_corrections(hp, step), *flags)


def _bias_corrections(hp, step: float) -> tuple[float, float]:
    """``(lr / (1 - beta1^t), sqrt(1 - beta2^t))`` for the step after ``step``, in float64."""
    t = step + 1.0
    return float(hp["lr"] / (1 - hp["beta1"] ** t)), float((1 - hp["beta2"] ** t) ** 0.5)


def planned_check(arrays: list, op: str):
    """For a step plan (``fusedmlp.optim._plan``), after a full step over ``arrays`` (kernel
    ``op``'s lists, "adam" or "sgd": params, grads, then the state): their multi-tensor check
    when the next steps may skip it (every tensor on the Triton kernel, one device and dtype,
    contiguous params with their gradients and state in the params' strides), else None.
    None inside ``torch.inference_mode()``: tensors made there (e.g. the state of a first
    step) may be inference tensors, which a planned step outside it, without the check, would
    update in place where torch raises (``multi_tensor.check``)."""
    if torch.is_inference_mode_enabled():
        return None
    params, grads = arrays[0], arrays[1]
    kernel_idx, rest = kernel_partition(params, grads)
    if rest or one_device_and_dtype(params) is None:
        return None
    from ..kernels import adam as KA
    from ..kernels import sgd as KS
    from ..kernels.multi_tensor import TensorMismatchError, check

    try:
        checked = check(arrays, (KA if op == "adam" else KS).ARRAY_NAMES)
    except TensorMismatchError:  # SGD momentum buffers of another dtype took torch's step
        return None
    return checked if checked is not None and checked.plain else None


def adam_planned(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps_buffer, checked, grad_ptrs, **hp
) -> bool:
    """A planned group's step (``fusedmlp.optim._plan`` verified the lists against
    ``checked``, ``planned_check``'s result; ``grad_ptrs`` the gradients' addresses):
    ``adam``'s fused path with host step counters (``steps_buffer``'s elements), without its
    partition tests and the kernel's check.
    False, with nothing changed, where that path does not apply: the counters differ
    (a partition per step), a dispatch or function mode is active, or grad mode is on."""
    if _grad_enabled() or not plain_eager():
        return False
    values = steps_buffer.tolist()
    step = values[0]
    if values.count(step) != len(values):
        return False
    amsgrad = hp["amsgrad"]
    vmax = max_exp_avg_sqs if amsgrad else []
    scalars_flags = _hyper(hp)  # raises before any counter moves
    step_size, bias_correction2_sqrt = _bias_corrections(hp, step)
    for mutated in (params, exp_avgs, exp_avg_sqs, vmax):  # as the custom op's eager path
        _increment_version(mutated)
    steps_buffer.add_(1)
    _kernel_step(
        (params, grads, exp_avgs, exp_avg_sqs, vmax),
        *scalars_flags,
        step_size=step_size,
        bias_correction2_sqrt=bias_correction2_sqrt,
        checked=checked,
        grad_ptrs=grad_ptrs,
    )
    return True


__all__ = [
    "_torch_adam_module",
    "_torch_sgd_module",
    "adam",
    "adam_multi_tensor_step",
    "adam_multi_tensor_step_device",
    "adam_planned",
    "amp_on",
    "attr_set",
    "call_torch",
    "kernel_partition",
    "one_device_and_dtype",
    "planned_check",
    "unscale_and_check",
]
