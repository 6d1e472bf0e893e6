"""Inverted dropout (``dropout``) and channel-wise dropout (``dropout2d``).

Triton path: a one-element int64 seed is drawn from torch's generator (the default one, or
``generator=``) on the input's device, *outside* the autograd Function; the Function's custom ops
multiply by the keep mask that the kernel regenerates from ``(seed, logical element index)``.
Only the seed is saved for backward (no mask: 1 byte per element less than torch), so:

- ``torch.manual_seed`` reproduces a run and successive calls draw different masks;
- ``torch.utils.checkpoint`` recomputation restores the RNG state, redraws the same seed and
  so rebuilds the same mask; CUDA-graph capture replays a fresh seed each replay;
- the backward regenerates the mask whatever the gradient's strides.

The masks are reproducible under fusedmlp's seed but are NOT bit-identical to
``torch.nn.Dropout``'s (a different random stream); the distribution, the scaling
``1/(1-p)`` and the NaN/Inf propagation of the multiply form ``x * keep * 1/(1-p)`` are torch's.

Torch path: torch's own ``F.dropout`` / ``feature_dropout`` (with ``generator=``, the same
Bernoulli-noise multiply that torch's CPU dropout computes, drawn from that generator).

p = 0, eval mode and empty inputs return the input itself; p outside [0, 1] is a ValueError;
``inplace=True`` writes into the input under torch's autograd rules (a leaf that requires grad,
a view of one, or a view torch refuses to modify in place is refused with torch's error, before
any launch). Argument errors are torch's, in its order: the range test of ``p``, then its
argument parser (input, ``p``, ``train``: a Fraction or an array ``p`` is a TypeError there),
then NaN.
"""

from __future__ import annotations

import math
import numbers
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backend import TRITON_DTYPES, use_triton
from ._custom_op import at_trace_time, caller, custom_op
from ._once import grads_batched

# Seeds cover 62 bits of the 64-bit Philox key: no birthday collisions over a training run.
_SEED_HIGH = 2**62


@custom_op("fusedmlp::dropout_fwd", mutates_args=())
def _dropout_fwd(x: Tensor, seed: Tensor, p: float, inner: int, channel: bool) -> Tensor:
    from ..kernels import dropout as K

    return K.dropout_apply(x, seed, p, inner, channel=channel)


@_dropout_fwd.register_fake
def _(x, seed, p, inner, channel):
    return torch.empty_like(x)


@custom_op("fusedmlp::dropout_bwd", mutates_args=())
def _dropout_bwd(grad: Tensor, seed: Tensor, p: float, inner: int, channel: bool) -> Tensor:
    from ..kernels import dropout as K

    return K.dropout_apply(grad, seed, p, inner, backward=True, channel=channel)


@_dropout_bwd.register_fake
def _(grad, seed, p, inner, channel):
    return torch.empty_like(grad)


_dropout_fwd_call = caller(_dropout_fwd)
_dropout_bwd_call = caller(_dropout_bwd)


class _DropoutGrad(torch.autograd.Function):
    """``grad * keep * scale``; linear in ``grad`` with the same mask, so its own backward is
    itself: double backward through dropout is exact (as torch's)."""

    @staticmethod
    def forward(ctx, grad, seed, p, inner, channel):
        ctx.save_for_backward(seed)
        ctx.p, ctx.inner, ctx.channel = p, inner, channel
        return _dropout_bwd_call(grad, seed, p, inner, channel)

    @staticmethod
    def backward(ctx, gg):
        return dropout_backward(ctx, gg)


def dropout_backward(ctx, grad):
    """The backward of ``DropoutFunction`` and of ``dropout_fwd``'s autograd formula (the seed
    saved, ``ctx.p``, ``ctx.inner``, ``ctx.channel``): ``(dx, None, None, None, None)``; also
    ``_DropoutGrad``'s (linear in its input, with the same mask). Differentiable again: with
    grad mode on (``create_graph``) dx comes from ``_DropoutGrad``, whose backward is itself."""
    (seed,) = ctx.saved_tensors
    args = (seed, ctx.p, ctx.inner, ctx.channel)
    if torch.is_grad_enabled():  # create_graph: the gradient is differentiated again
        dx = _DropoutGrad.apply(grad, *args)
    elif grads_batched((grad,)):
        # vmap over the backward (batched gradients): the scaled mask from the kernel, the
        # product in torch's ops, which vmap batches (a batched tensor has no storage).
        ones = torch.ones(grad.shape, dtype=grad.dtype, device=grad.device)
        dx = grad * _dropout_bwd_call(ones, *args)
    else:  # a plain backward: the op itself, without a second Function's host overhead
        dx = _dropout_bwd_call(grad, *args)
    return dx, None, None, None, None


class DropoutFunction(torch.autograd.Function):
    """``x * keep * 1/(1-p)``, keep regenerated from ``seed`` (one-element int64 tensor) by the
    kernel in forward and in backward. ``inner``: elements per keep decision (1, or
    ``prod(shape[2:])`` for channel-wise dropout); ``channel``: channel-wise dropout (torch's
    ``feature_dropout`` scales, ``kernels.dropout.scale_arg``). Saves only ``seed``."""

    @staticmethod
    def forward(ctx, x, seed, p, inner, channel=False):
        ctx.save_for_backward(seed)
        ctx.p, ctx.inner, ctx.channel = p, inner, channel
        return _dropout_fwd_call(x, seed, p, inner, channel)

    @staticmethod
    def backward(ctx, grad):
        return dropout_backward(ctx, grad)  # also dropout_fwd's autograd formula


# Used only where dropout_fwd is called with an input that requires grad in grad mode outside
# DropoutFunction: a ``torch.export``ed program (export inlines the Function: its graph holds
# the op itself), ``ep.module()``. The Function calls the op in its forward, where grad mode is
# off, and plain eager calls run the implementation itself (``_custom_op``).
def _setup_dropout_fwd(ctx, inputs, output) -> None:
    _x, seed, p, inner, channel = inputs
    ctx.save_for_backward(seed)
    ctx.p, ctx.inner, ctx.channel = p, inner, channel


_dropout_fwd.register_autograd(dropout_backward, setup_context=_setup_dropout_fwd)


def _type_name(obj) -> str:
    """The type name torch's argument parser prints (the C ``tp_name``): ``list``, ``Fraction``
    for a class defined in Python, ``numpy.ndarray`` / ``decimal.Decimal`` for a C type."""
    t = type(obj)
    if t.__module__ == "builtins" or t.__flags__ & (1 << 9):  # Py_TPFLAGS_HEAPTYPE
        return t.__name__
    return f"{t.__module__}.{t.__qualname__}"


def _check_range(p) -> None:
    """torch's Python range test of ``p`` (``p < 0.0 or p > 1.0``), its first check: NaN passes
    it (refused by ``_check_nan`` last), a multi-element or complex tensor raises its own error."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")


def _is_numpy_scalar(p) -> bool:
    np = sys.modules.get("numpy")  # no numpy imported: p is no numpy scalar
    return np is not None and isinstance(p, (np.bool_, np.integer, np.floating, np.complexfloating))


def _parse_p(p, op: str) -> float:
    """torch's argument parser for ``p`` (a double): a Python or numpy number (a numpy complex
    gives its real part, with numpy's warning), or a 0-d real tensor that does not require grad;
    anything else (a Fraction, a Decimal, an array) is its TypeError, with ``op`` its op name."""
    if isinstance(p, Tensor):
        if p.dim() != 0 or p.requires_grad or p.is_complex():
            raise TypeError(f"{op}(): argument 'p' (position 2) must be float, not Tensor")
        return float(p.item())  # torch's dropout takes a 0-d tensor p as its number
    if not (
        isinstance(p, (float, int, torch.SymFloat, torch.SymInt))
        or _is_numpy_scalar(p)
        # dynamo's symbolic floats (dynamic=True) are real numbers
        or (torch.compiler.is_compiling() and isinstance(p, numbers.Real))
    ):
        raise TypeError(f"{op}(): argument 'p' (position 2) must be float, not {_type_name(p)}")
    return float(p)


def _check_nan(p: float) -> None:
    """NaN, which torch's dropout refuses in C++ (a RuntimeError) after parsing its arguments;
    ``p != p``, not ``math.isnan``, which dynamo cannot trace on the symbolic float of
    ``dynamic=True``."""
    if p != p:
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {p}")


def _check_p(p, op: str = "dropout") -> float:
    """All of torch's checks of ``p`` for a tensor input (range, parser, NaN), in its order."""
    _check_range(p)
    p = _parse_p(p, op)
    _check_nan(p)
    return p


def _check_input(input) -> None:
    if not isinstance(input, Tensor):  # torch's argument parser
        raise TypeError(
            f"dropout(): argument 'input' (position 1) must be Tensor, not {_type_name(input)}"
        )


def _check_training(training, op: str = "dropout") -> None:
    if not isinstance(training, bool):  # torch's argument parser: a bool, nothing else
        raise TypeError(
            f"{op}(): argument 'train' (position 3) must be bool, not {_type_name(training)}"
        )


def _torch_refuses(input: Tensor) -> None:
    """Raise the error torch raises for an in-place write into ``input`` (a view it refuses to
    modify in place): its own check runs before the op modifies anything."""
    input.mul_(1)
    raise AssertionError("torch accepted an in-place write it refuses")  # pragma: no cover


def _check_inplace(input: Tensor) -> None:
    """torch's in-place rules (its ``check_inplace``, in its order), checked before any launch:
    a view that torch refuses to modify in place (created in no_grad or inference mode, one of
    several outputs of one op, made inside a custom Function) raises torch's own error, then a
    view of a leaf that requires grad, then a leaf that requires grad."""
    if not (torch.is_grad_enabled() and input.requires_grad):
        return
    base = input._base
    if base is not None:
        if not torch.compiler.is_compiling() and _creation_meta(input) != _DEFAULT_VIEW:
            _torch_refuses(input)
        if base.is_leaf and base.requires_grad:
            raise RuntimeError(
                "a view of a leaf Variable that requires grad is being used in an in-place "
                "operation."
            )
    if input.is_leaf:
        raise RuntimeError(
            "a leaf Variable that requires grad is being used in an in-place operation."
        )


_creation_meta = torch._C._autograd._get_creation_meta
_DEFAULT_VIEW = torch._C._autograd.CreationMeta.DEFAULT


def _seed(input: Tensor, generator, p: float) -> Tensor:
    """The one-element int64 seed of a dropout with drop probability ``p``. At ``p >= 1``
    nothing is kept whatever the seed: none is drawn (a zero seed), so that the random
    generator is left as torch's dropout leaves it at ``p = 1`` (it draws nothing there)."""
    if p >= 1.0:
        return torch.zeros(1, device=input.device, dtype=torch.int64)
    return torch.randint(
        0, _SEED_HIGH, (1,), generator=generator, device=input.device, dtype=torch.int64
    )


_TRITON_DTYPES = TRITON_DTYPES


def _on_triton(input: Tensor) -> bool:
    """Whether the kernel runs: a dtype it takes, on the Triton path. Other dtypes go to torch's
    dropout, which refuses them (integers, bool) or, at p = 1, multiplies them by 0."""
    return input.dtype in _TRITON_DTYPES and use_triton(input)


def _check_no_internal_overlap(input: Tensor) -> None:
    """torch's refusal to write in place into a tensor whose elements share memory (an
    expanded, stride-0 view), before any launch; only a non-contiguous tensor can (eager:
    traced code reaches torch's own check in ``copy_``)."""
    if (
        not input.is_contiguous()
        and not torch.compiler.is_compiling()
        and torch._debug_has_internal_overlap(input) == 1
    ):
        raise RuntimeError(
            "unsupported operation: more than one element of the written-to tensor refers to a "
            "single memory location. Please clone() the tensor before performing the operation."
        )


def _triton(input: Tensor, p: float, inner: int, inplace: bool, generator, channel: bool) -> Tensor:
    if inplace:
        _check_inplace(input)
        _check_no_internal_overlap(input)
    seed = _seed(input, generator, p)
    out = DropoutFunction.apply(input, seed, p, inner, channel)
    if inplace:
        return input.copy_(out)
    return out


def _torch_with_generator(input: Tensor, p: float, feature: bool, inplace: bool, generator):
    """torch's CPU dropout (Bernoulli noise, divided by 1-p, multiplied in) from ``generator``."""
    if p == 1.0:
        noise = torch.zeros((), dtype=input.dtype, device=input.device)
    else:
        shape = (*input.shape[:2], *([1] * (input.dim() - 2))) if feature else input.shape
        # input.new_empty: the same tensor in eager mode, but batched under torch.func.vmap,
        # so randomness="different" draws a mask per sample (an unbatched one refuses it)
        noise = input.new_empty(shape)
        noise.bernoulli_(1.0 - p, generator=generator).div_(1.0 - p)
    return input.mul_(noise) if inplace else input * noise


def dropout(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Inverted dropout, ``torch.nn.functional.dropout``'s semantics.

    During training each element is zeroed with probability ``p`` and the kept ones are scaled
    by ``1/(1-p)``; ``training=False``, ``p = 0`` and empty inputs return ``input`` itself.
    ``generator`` (optional) draws the seed instead of torch's default generator.

    CUDA tensors run the Philox Triton kernel (no mask stored; see the module docstring): its
    masks are reproducible under fusedmlp's seed (``torch.manual_seed`` / ``generator``) but are
    not bit-identical to ``torch.nn.Dropout``'s.
    """
    _check_range(p)  # torch's order: its range test, its argument parser, its NaN check
    _check_input(input)
    p = _parse_p(p, "dropout")
    _check_training(training)
    _check_nan(p)
    if not training or p == 0.0 or input.numel() == 0:
        return input
    if _on_triton(input):
        return _triton(input, p, 1, inplace, generator, False)
    if generator is None:
        return F.dropout(input, p, True, inplace)
    if inplace:
        _check_inplace(input)
    return _torch_with_generator(input, p, False, inplace, generator)


@at_trace_time  # dynamo cannot trace warnings.warn: no graph break under torch.compile
def _warn_dims(dim: int, stacklevel: int) -> None:
    """torch's dropout2d warnings for a ``dim``-D input (``stacklevel``: its caller's caller)."""
    if dim not in (3, 4):
        warnings.warn(
            f"dropout2d: Received a {dim}-D input to dropout2d, which is deprecated "
            "and will result in an error in a future release. To retain the behavior "
            "and silence this warning, please use dropout instead. Note that dropout2d "
            "exists to provide channel-wise dropout on inputs with 2 spatial dimensions, "
            "a channel dimension, and an optional batch dimension (i.e. 3D or 4D inputs).",
            stacklevel=stacklevel,
        )
    if dim == 3:
        warnings.warn(
            "dropout2d: Received a 3D input to dropout2d and assuming that channel-wise "
            "1D dropout behavior is desired - input is interpreted as shape (N, C, L), where C "
            "is the channel dim. This behavior will change in a future release to interpret the "
            "input as one without a batch dimension, i.e. shape (C, H, W). To maintain the 1D "
            "channel-wise dropout behavior, please switch to using dropout1d instead.",
            stacklevel=stacklevel,
        )


def dropout2d(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Channel-wise dropout, ``torch.nn.functional.dropout2d``'s semantics.

    One keep decision per (sample, channel) of an ``[N, C, *]`` input: whole channels are zeroed
    with probability ``p``, kept ones scaled by ``1/(1-p)``. As torch: a 3-D input is read as
    ``[N, C, L]`` (with torch's warning), inputs that are not 3-D or 4-D warn, and fewer than
    2 dimensions is an error (when dropout actually runs). Masks are reproducible under
    fusedmlp's seed, not bit-identical to ``torch.nn.Dropout2d``'s.
    """
    _check_range(p)
    dim = input.dim()  # as torch: an AttributeError for a non-tensor input
    _warn_dims(dim, 3)
    p = _parse_p(p, "feature_dropout")
    _check_training(training, "feature_dropout")
    _check_nan(p)
    if not training or p == 0.0 or input.numel() == 0:
        return input
    if p < 1.0 and dim < 2:
        raise RuntimeError("Feature dropout requires at least 2 dimensions in the input")
    if _on_triton(input):
        return _triton(input, p, math.prod(input.shape[2:]), inplace, generator, True)
    if generator is None:
        if inplace:
            return torch.feature_dropout_(input, p, True)
        return torch.feature_dropout(input, p, True)
    if inplace:
        _check_inplace(input)
    return _torch_with_generator(input, p, True, inplace, generator)


__all__ = ["DropoutFunction", "dropout", "dropout2d"]
