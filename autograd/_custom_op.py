"""Custom-op registration with an eager fast path.

Calling a ``torch.library.custom_op`` goes through torch's Python dispatch machinery (autograd
wrapper, redispatch, default filling, the dynamo-disable wrapper): tens of microseconds of host
time per call, which dominates a small training step on a GPU. fusedmlp's ops are only called
from inside ``torch.autograd.Function`` forward/backward (grad mode off) or as mutating ops
without autograd, so in plain eager mode the dispatcher adds nothing but that overhead.

The differentiable forward ops also carry autograd formulas (``register_autograd``, sharing
their Function's backward) for graphs that hold them outside their Function: ``torch.export``
inlines the Functions, and ``ep.module()`` calls the ops with inputs that require grad. Such a
call never takes the fast path (``fast_eager`` is False with grad mode on and an input that
requires grad): the dispatcher's autograd kernel runs the op under its formula.

``custom_op(name, mutates_args=...)`` registers the op exactly as ``torch.library.custom_op``
(the ``CustomOpDef`` it returns takes ``register_fake`` as usual) and remembers the undecorated
implementation; ``caller(op)`` returns a function that

- in plain eager mode (``fast_eager``) calls that implementation directly, bumping the version
  counters of the mutated arguments as the op's ADInplaceOrView kernel does (except those named
  in ``unversioned``: a batch norm's running statistics, whose versions torch's own batch norm
  leaves as they are);
- otherwise (``torch.compile``/export tracing, FakeTensor/FunctionalTensor/other tensor
  subclasses, an active TorchFunctionMode/TorchDispatchMode or functorch transform, or grad
  mode on with an input that requires grad) calls ``torch.ops.<ns>.<op>``, so traced graphs
  hold the registered op and its fake implementation, unbroken.

Arguments are passed positionally, in the op's schema order.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

_Tensor = torch.Tensor
# exactly these types take the fast path: nn.Parameter disables __torch_function__ and has no
# __torch_dispatch__, so it dispatches as a plain tensor
_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))
_PLAIN_OR_NONE = _PLAIN | {type(None)}
_is_compiling = torch.compiler.is_compiling
_dispatch_stack_len = torch._C._len_torch_dispatch_stack
_function_mode_enabled = torch._C._is_torch_function_mode_enabled
_functorch_active = torch._C._are_functorch_transforms_active
_grad_enabled = torch.is_grad_enabled
_increment_version = torch.autograd.graph.increment_version

# CustomOpDef -> the eager caller made at registration
_CALLERS: dict = {}


def plain_eager() -> bool:
    """No compilation, torch-function or torch-dispatch mode, or functorch transform active:
    the mode half of ``fast_eager``, for callers that checked their tensors themselves."""
    return not (
        _is_compiling() or _dispatch_stack_len() or _function_mode_enabled() or _functorch_active()
    )


def fast_eager(*args) -> bool:
    """Whether a custom op over ``args`` may run its implementation directly (plain eager mode).

    ``args``: the op's arguments; tensors and lists/tuples of tensors are inspected, anything
    else (None, numbers, strings) is ignored. True only when not compiling, no torch-function or
    torch-dispatch mode nor functorch transform is active, every tensor is exactly
    ``torch.Tensor`` or ``nn.Parameter`` (no other subclass: FakeTensor, FunctionalTensor, DTensor, ...), and no tensor
    requires grad while grad mode is on (the dispatcher's autograd wrapper would then differ).
    """
    if not plain_eager():
        return False
    grad = _grad_enabled()
    for a in args:
        t = type(a)
        if t in _PLAIN:
            if grad and a.requires_grad:
                return False
        elif t is list or t is tuple:
            # C loops (map): an optimizer step passes lists of hundreds of tensors.
            if not _PLAIN_OR_NONE.issuperset(map(type, a)):
                return False
            if grad and any(x is not None and x.requires_grad for x in a):
                return False
        elif isinstance(a, Tensor):  # a tensor subclass
            return False
    return True


def _mutated_positions(fn, mutates_args: Sequence[str] | str) -> tuple[int, ...]:
    if isinstance(mutates_args, str):  # "unknown": not used by fusedmlp
        raise ValueError("fusedmlp custom ops must list their mutated arguments")
    names = list(inspect.signature(fn).parameters)
    return tuple(names.index(n) for n in mutates_args)


def custom_op(
    name: str, *, mutates_args: Sequence[str], unversioned: Sequence[str] = ()
) -> Callable:
    """Decorator: ``torch.library.custom_op(name, fn, mutates_args=mutates_args)``; returns the
    ``CustomOpDef``. ``caller(op)`` gives the fast-path caller (module docstring), which bumps
    the version counters of the mutated arguments not named in ``unversioned``."""

    def register(fn):
        op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
        ns, opname = name.split("::")
        packet = getattr(getattr(torch.ops, ns), opname)
        mutated = _mutated_positions(fn, [n for n in mutates_args if n not in unversioned])

        if mutated:

            def call(*args):
                if fast_eager(*args):
                    for i in mutated:  # as the op's ADInplaceOrView kernel
                        a = args[i]
                        if a is not None:
                            _increment_version(a)  # a tensor or a list of tensors
                    return fn(*args)
                return packet(*args)

        else:

            def call(*args):
                if fast_eager(*args):
                    return fn(*args)
                return packet(*args)

        call.__name__ = call.__qualname__ = f"call_{opname}"
        call.__doc__ = f"``torch.ops.{ns}.{opname}``, or its implementation in plain eager mode."
        _CALLERS[op] = call
        return op

    return register


def at_trace_time(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result(fn)`` without importing ``torch._dynamo`` (1.4 s
    on import): dynamo runs ``fn`` when it traces a call to it, instead of tracing into it, and
    puts the result in the graph as a constant. For host-only helpers that warn: dynamo cannot
    trace ``warnings.warn`` (a graph break, an error under ``fullgraph=True``), and torch's own
    functions warn there once per trace."""
    fn._dynamo_marked_constant = True  # what assume_constant_result sets
    return fn


def caller(op) -> Callable:
    """The fast-path caller of an op registered by ``custom_op`` (module docstring)."""
    return _CALLERS[op]


__all__ = ["at_trace_time", "caller", "custom_op", "fast_eager", "plain_eager"]
