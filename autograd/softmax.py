"""Softmax and log-softmax over a dimension: custom ops, autograd Function and backend dispatch.

``softmax(input, dim=None, _stacklevel=3, dtype=None)`` and ``log_softmax(...)`` have
torch.nn.functional's signatures: ``dim=None`` picks torch's implicit dimension (with torch's
deprecation warning), ``dtype`` casts the input first.

- Triton path: ``torch.ops.fusedmlp.softmax_fwd`` / ``softmax_bwd`` (functional custom ops over
  ``fusedmlp.kernels.softmax``) tied together by ``SoftmaxFunction``; the output is saved for the
  backward, as torch does. Double backward raises (``_once.once_differentiable``).
  ``softmax_fwd`` carries an autograd formula, that backward itself (``softmax_backward``),
  for exported programs, which hold the op outside the Function.
- Torch path (and 0-d or empty inputs): ``torch.softmax`` / ``torch.log_softmax``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backend import TRITON_DTYPES, acc_dtype, use_triton
from ._amp import softmax_dtype
from ._custom_op import at_trace_time, caller, custom_op
from ._once import grads_batched, once_differentiable

_TRITON_DTYPES = TRITON_DTYPES


@custom_op("fusedmlp::softmax_fwd", mutates_args=())
def softmax_fwd(x: Tensor, dim: int, log: bool) -> Tensor:
    """Softmax (log=False) or log-softmax of ``x`` over ``dim`` (>= 0); contiguous output."""
    from ..kernels import softmax as K

    return K.softmax_fwd(x, dim, log)


@softmax_fwd.register_fake
def _(x, dim, log):
    return x.new_empty(x.shape)


@custom_op("fusedmlp::softmax_bwd", mutates_args=())
def softmax_bwd(y: Tensor, grad: Tensor, dim: int, log: bool) -> Tensor:
    """Input gradient from the saved output ``y`` and the output gradient ``grad``."""
    from ..kernels import softmax as K

    return K.softmax_bwd(y, grad, dim, log)


@softmax_bwd.register_fake
def _(y, grad, dim, log):
    return y.new_empty(y.shape)


_softmax_fwd = caller(softmax_fwd)
_softmax_bwd = caller(softmax_bwd)


def _save_softmax(ctx, inputs, output) -> None:
    """What ``softmax_backward`` reads, from ``softmax_fwd``'s inputs and output: the output,
    the dimension and the flag."""
    _, dim, log = inputs
    ctx.save_for_backward(output)
    ctx.dim = dim
    ctx.log = log


@once_differentiable("softmax / log_softmax", batched=True)
def softmax_backward(ctx, grad):
    """The backward of ``SoftmaxFunction`` and of ``softmax_fwd``'s autograd formula: the input
    gradient, None for ``dim`` and ``log``."""
    (y,) = ctx.saved_tensors
    if grads_batched((grad,)):
        return _batched_grad(y, grad, ctx.dim, ctx.log), None, None
    return _softmax_bwd(y, grad, ctx.dim, ctx.log), None, None


class SoftmaxFunction(torch.autograd.Function):
    """Softmax / log-softmax over ``dim`` on the Triton kernels."""

    @staticmethod
    def forward(ctx, x, dim, log):
        y = _softmax_fwd(x, dim, log)
        _save_softmax(ctx, (x, dim, log), y)
        return y

    @staticmethod
    def backward(ctx, grad):
        return softmax_backward(ctx, grad)  # also softmax_fwd's autograd formula


class LogSoftmaxFunction(SoftmaxFunction):
    """``SoftmaxFunction`` with ``log`` True, under its own name: the output's ``grad_fn`` says
    LogSoftmax, as torch's ``LogSoftmaxBackward0`` does."""


# Used only where softmax_fwd is called with an input that requires grad in grad mode outside
# SoftmaxFunction: a ``torch.export``ed program (export inlines the Function: its graph holds
# the op itself), ``ep.module()``. The Function calls the op in its forward, where grad mode is
# off, and plain eager calls run the implementation itself (``_custom_op``).
softmax_fwd.register_autograd(softmax_backward, setup_context=_save_softmax)


def _batched_grad(y: Tensor, grad: Tensor, dim: int, log: bool) -> Tensor:
    """The input gradient in torch's ops, which vmap batches (batched gradients: a batched
    tensor has no storage for the kernel), in fp32 for 16-bit outputs as the kernel."""
    acc = acc_dtype(y.dtype)
    y, g = y.to(acc), grad.to(acc)
    if log:
        dx = g - y.exp() * g.sum(dim, keepdim=True)
    else:
        dx = y * (g - (g * y).sum(dim, keepdim=True))
    return dx.to(grad.dtype)


@at_trace_time  # its deprecation warning: no graph break under torch.compile
def _implicit_dim(name: str, ndim: int, stacklevel: int) -> int:
    """torch's implicit softmax dimension for ``dim=None``, with its warning."""
    return F._get_softmax_dim(name, ndim, stacklevel + 1)


def _dispatch(name, input, dim, stacklevel, dtype, log):
    if not isinstance(input, Tensor):  # torch's own TypeError
        return F.log_softmax(input, dim) if log else F.softmax(input, dim)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        # torch's argument parser; ``input.to`` would read a str or an int as a device
        raise TypeError(
            f"{name}(): argument 'dtype' must be torch.dtype, not {type(dtype).__name__}"
        )
    if dim is None:
        dim = _implicit_dim(name, input.dim(), stacklevel + 1)
    dtype = softmax_dtype(input, dtype)  # autocast: torch's CUDA policy
    if dtype is not None:
        input = input.to(dtype)
    ndim = input.dim()
    if (
        ndim > 0
        and input.numel() > 0
        and input.dtype in _TRITON_DTYPES
        and isinstance(dim, int)
        and not isinstance(dim, bool)  # torch: "must be int, not bool"
        and -ndim <= dim < ndim
        and use_triton(input)
    ):
        return (LogSoftmaxFunction if log else SoftmaxFunction).apply(input, dim % ndim, log)
    # the Tensor methods, as torch.nn.functional calls them (its argument errors' positions)
    return input.log_softmax(dim) if log else input.softmax(dim)


def softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype=None) -> Tensor:
    """``torch.nn.functional.softmax`` on the Triton kernels where the backend selects them."""
    return _dispatch("softmax", input, dim, _stacklevel, dtype, log=False)


def log_softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype=None) -> Tensor:
    """``torch.nn.functional.log_softmax`` on the Triton kernels where the backend selects them."""
    return _dispatch("log_softmax", input, dim, _stacklevel, dtype, log=True)


__all__ = ["LogSoftmaxFunction", "SoftmaxFunction", "log_softmax", "softmax"]
