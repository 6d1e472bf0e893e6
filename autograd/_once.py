"""``once_differentiable(name)`` for fusedmlp's backward functions: differentiating their
gradients again raises a clear error instead of silently dropping the second-order term.

torch's ``torch.autograd.function.once_differentiable`` looks only at the gradients a backward
receives: when none of them requires grad (a gradient penalty, ``grad(loss, x,
create_graph=True)``, receives plain ones), the gradients it returns are plain tensors, and
whatever differentiates them next silently misses the op's own second-order term.

Here, when the graph is being built (``create_graph=True``) and an input of the op requires
grad, the returned gradients pass through an identity node connected to every tensor of the
backward (received gradients and saved tensors) that requires grad; that node's backward
raises. So any differentiation that reaches the op through its gradients fails loudly, while a
``create_graph=True`` backward whose result is never differentiated again still works. When no
such tensor exists (the op saved none that carries a graph, as cross-entropy's gradient
buffer), the backward raises at once.

A backward run under vmap (batched gradients: ``torch.autograd.grad(..., is_grads_batched=True)``,
``jacobian(..., vectorize=True)``, ``gradcheck(check_batched_grad=True)``) receives batched
tensors, which have no storage for a kernel to read: it raises a clear error before any launch,
unless the op handles them (``batched=True``: linear, softmax, batch norm and cross-entropy
compute them with torch's ops from what they saved; only the fused blocks raise). ``torch.func`` transforms of the whole computation are not affected: their
forward already takes torch's ops (``fusedmlp.backend.use_triton``).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def _message(name: str) -> str:
    return (
        f"fusedmlp {name}: double backward is not supported (this op's backward is not "
        "differentiable); for higher-order gradients run it on the torch backend "
        "(fusedmlp.set_backend('torch'))"
    )


_is_compiling = torch.compiler.is_compiling
_functorch_active = torch._C._are_functorch_transforms_active
_is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor


def grads_batched(grad_outputs) -> bool:
    """Whether a backward runs under vmap: a transform is active or a received gradient is a
    (legacy) batched tensor. Not while torch.compile traces (dynamo cannot trace the check;
    the traced graph holds the custom ops)."""
    if _is_compiling():
        return False
    return _functorch_active() or any(
        isinstance(g, Tensor) and _is_legacy_batched(g) for g in grad_outputs
    )


def _batched_message(name: str) -> str:
    return (
        f"fusedmlp {name}: batched gradients (torch.autograd.grad(..., is_grads_batched=True), "
        "jacobian(..., vectorize=True), gradcheck's check_batched_grad) are not supported on "
        "the Triton kernels; torch.func.vmap/jacrev/jacfwd of the whole function take torch's "
        "ops, or run it on the torch backend (fusedmlp.set_backend('torch'))"
    )


class _RaiseWhenDifferentiated(torch.autograd.Function):
    """Identity on the first ``n`` tensors (copied), connected to all of them; backward raises."""

    @staticmethod
    def forward(ctx, name, n, *tensors):
        ctx.name = name
        return tuple(t.clone() for t in tensors[:n])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_message(ctx.name))


def once_differentiable(name: str, through_saved=None, batched: bool = False):
    """Decorate a ``torch.autograd.Function.backward``: run it without grad, and make its
    gradients raise when differentiated (module docstring). ``name`` goes into the message.

    ``through_saved(ctx)``: whether the gradients depend on the saved tensors (default: always).
    When it returns False (the gradients are linear in the received ones, e.g. a ReLU's mask),
    only received gradients that require grad make the result raise when differentiated.
    ``batched``: the backward takes batched gradients itself (module docstring); else they
    raise.
    """

    def wrap(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            if not batched and grads_batched(grad_outputs):
                raise RuntimeError(_batched_message(name))
            if not torch.is_grad_enabled():  # the engine's usual mode (no create_graph)
                return backward(ctx, *grad_outputs)
            if not any(ctx.needs_input_grad):
                with torch.no_grad():
                    return backward(ctx, *grad_outputs)
            # Read the saved tensors before the backward runs: it may scale one of them in
            # place (cross-entropy's gradient buffer), which a later unpack would refuse.
            saved = through_saved is None or through_saved(ctx)
            candidates = (*grad_outputs, *ctx.saved_tensors) if saved else grad_outputs
            sources = [t for t in candidates if isinstance(t, Tensor) and t.requires_grad]
            if not sources and saved:
                raise RuntimeError(_message(name))
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            if not sources:
                return grads  # nothing the gradients depend on carries a graph
            single = not isinstance(grads, tuple)
            out = [grads] if single else list(grads)
            idx = [i for i, g in enumerate(out) if isinstance(g, Tensor)]
            wrapped = _RaiseWhenDifferentiated.apply(
                name, len(idx), *(out[i] for i in idx), *sources
            )
            for i, g in zip(idx, wrapped):
                out[i] = g
            return out[0] if single else tuple(out)

        return wrapper

    return wrap
