"""Fused linear + bias + activation: custom ops, autograd Function and backend dispatch.

``linear(input, weight, bias=None, activation=None, negative_slope=0.01)`` computes
``act(input @ weight.T + bias)`` for ``input`` of shape ``[..., in_features]``.

- Triton path: ``torch.ops.fusedmlp.linear_fwd`` / ``linear_bwd`` (functional custom ops over
  ``fusedmlp.kernels.linear``), tied together by ``LinearFunction``. The backward reads the
  activation's derivative from the saved OUTPUT for relu, leaky_relu with
  ``negative_slope >= 0``, sigmoid and tanh (no pre-activation tensor is kept); for
  leaky_relu with ``negative_slope < 0``, gelu and silu the forward also stores the
  pre-activation ``z`` for the backward. Double backward raises (``_once.once_differentiable``).
  ``linear_fwd`` and ``linear_stats_fwd`` carry autograd formulas, that backward itself
  (``linear_backward``), for exported programs, which hold the ops outside the Functions.
- Torch path: ``F.linear`` followed by torch's own activation (``apply_activation_torch``),
  differentiated by torch's autograd.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backend import TRITON_DTYPES, acc_dtype, float_arg, use_triton
from ._amp import lower_precision
from ._custom_op import caller, custom_op
from ._handover import take
from ._once import grads_batched, once_differentiable

# Supported activations (None = identity). "gelu" is the exact (erf) form, as torch's default.
ACTIVATIONS = (None, "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "silu")

_TRITON_DTYPES = TRITON_DTYPES


def check_activation(activation) -> str:
    """Validate ``activation``; return its kernel name ("none" for None)."""
    if activation is not None and not isinstance(activation, str):
        raise TypeError(
            f"activation must be None or one of {ACTIVATIONS[1:]}, got {type(activation).__name__}"
        )
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: expected one of {ACTIVATIONS}")
    return "none" if activation is None else activation


def apply_activation_torch(z: Tensor, activation, negative_slope: float = 0.01) -> Tensor:
    """torch's own activation ``activation`` (an entry of ``ACTIVATIONS``) applied to ``z``."""
    if activation is None or activation == "none":
        return z
    if activation == "relu":
        return F.relu(z)
    if activation == "leaky_relu":
        return F.leaky_relu(z, negative_slope)
    if activation == "sigmoid":
        return torch.sigmoid(z)
    if activation == "tanh":
        return torch.tanh(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "silu":
        return F.silu(z)
    raise ValueError(f"unknown activation {activation!r}: expected one of {ACTIVATIONS}")


def _saves_preactivation(activation: str, negative_slope: float) -> bool:
    # Mirrors fusedmlp.kernels.linear.saves_preactivation (kept import-free of triton).
    return activation in ("gelu", "silu") or (activation == "leaky_relu" and negative_slope < 0)


# --------------------------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------------------------


@custom_op("fusedmlp::linear_fwd", mutates_args=())
def linear_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, activation: str, negative_slope: float
) -> tuple[Tensor, Tensor]:
    """``(y, z)``: y = act(x @ weight.T + bias) of shape ``[..., out]``; z the pre-activation
    when the backward needs it (leaky_relu with negative_slope < 0, gelu, silu), else empty."""
    from ..kernels import linear as K

    if x.dim() == 2:  # the common case: no view object, no shape arithmetic
        y, z = K.linear_forward(x, weight, bias, activation, negative_slope)
        return y, (z if z is not None else x.new_empty(0))
    in_features = weight.shape[1]
    out_shape = (*x.shape[:-1], weight.shape[0])
    rows = math.prod(x.shape[:-1])
    x2 = x.reshape(rows, in_features)  # a view whenever the strides allow it
    # outputs allocated in their final shape: a view would forbid in-place ops on y
    y, z = K.linear_forward(x2, weight, bias, activation, negative_slope, out_shape)
    return y, (z if z is not None else x.new_empty(0))


@linear_fwd.register_fake
def _(x, weight, bias, activation, negative_slope):
    out_shape = (*x.shape[:-1], weight.shape[0])
    y = x.new_empty(out_shape)
    z = (
        x.new_empty(out_shape)
        if _saves_preactivation(activation, negative_slope)
        else x.new_empty(0)
    )
    return y, z


@custom_op("fusedmlp::linear_bwd", mutates_args=())
def linear_bwd(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    saved: Tensor,
    activation: str,
    negative_slope: float,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    made: list[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dw, db)`` for ``linear_fwd``; ``saved`` is y or z (see ``linear_fwd``), unused
    (any tensor) without activation. A gradient not asked for comes back empty. ``made``: empty,
    or the list [grad_y's transpose, its column sums] made with it (``_handover``; 2-D
    grad_y), emptied here (its tensors die once used)."""
    from ..kernels import linear as K

    if x.dim() == 2 and grad_y.dim() == 2:  # the common case: no views, no shape arithmetic
        s2 = saved if activation != "none" else None
        dx, dw, db = K.linear_backward(
            grad_y, x, weight, s2, activation, negative_slope, need_dx, need_dw, need_db,
            None, made,
        )  # fmt: skip
    else:
        out_features, in_features = weight.shape
        rows = math.prod(x.shape[:-1])
        g2 = grad_y.reshape(rows, out_features)
        x2 = x.reshape(rows, in_features)
        s2 = saved.reshape(rows, out_features) if activation != "none" else None
        dx, dw, db = K.linear_backward(
            g2, x2, weight, s2, activation, negative_slope, need_dx, need_dw, need_db,
            tuple(x.shape),
        )  # fmt: skip
    empty = lambda t: t if t is not None else x.new_empty(0)
    return empty(dx), empty(dw), empty(db)


@linear_bwd.register_fake
def _(grad_y, x, weight, saved, activation, negative_slope, need_dx, need_dw, need_db, made):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    dw = x.new_empty(weight.shape) if need_dw else x.new_empty(0)
    db = x.new_empty(weight.shape[0]) if need_db else x.new_empty(0)
    return dx, dw, db


@custom_op("fusedmlp::linear_stats_fwd", mutates_args=())
def linear_stats_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, eps: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, pmean, pm2)``: ``y = x @ weight.T + bias`` for a 2-D x and, from the same launch,
    the batch-norm partial statistics of y's columns (``kernels.linear.linear_forward_stats``:
    ``[cdiv(M, stats_rows(x)), N]`` each, the accumulation dtype); pmean and pm2 empty where
    the GEMM makes none (the TMA kernel). With ``eps``: ``(y, final, empty)``, ``final`` the
    final statistics ``[3, N]`` (mean, invstd with ``eps``, unbiased variance) instead."""
    from ..kernels import linear as K

    y, stats = K.linear_forward_stats(x, weight, bias, eps)
    acc = acc_dtype(x.dtype)
    if stats is None:
        return y, x.new_empty(0, dtype=acc), x.new_empty(0, dtype=acc)
    if eps is not None:
        return y, stats, x.new_empty(0, dtype=acc)
    return y, stats[0], stats[1]


@linear_stats_fwd.register_fake
def _(x, weight, bias, eps=None):
    from ..kernels.linear import stats_rows

    m, n = x.shape[0], weight.shape[0]
    acc = acc_dtype(x.dtype)
    if eps is not None:
        return x.new_empty((m, n)), x.new_empty((3, n), dtype=acc), x.new_empty(0, dtype=acc)
    parts = -(-m // stats_rows(x))
    return (x.new_empty((m, n)), x.new_empty((parts, n), dtype=acc),
            x.new_empty((parts, n), dtype=acc))  # fmt: skip


_linear_fwd = caller(linear_fwd)
_linear_bwd = caller(linear_bwd)
_linear_stats_fwd = caller(linear_stats_fwd)


def _save_linear(ctx, x, weight, bias, activation: str, negative_slope: float, y, z) -> None:
    """What ``linear_backward`` reads, from a forward's inputs and ``linear_fwd``'s outputs
    ``(y, z)``: x, weight and y or z (the activation's derivative; nothing without one), and
    the non-tensor arguments."""
    if activation == "none":
        saved = None
    elif _saves_preactivation(activation, negative_slope):
        saved = z
    else:
        saved = y  # the output determines the derivative
    ctx.save_for_backward(x, weight, saved)
    ctx.has_bias = bias is not None
    ctx.activation = activation
    ctx.negative_slope = negative_slope


@once_differentiable("linear", batched=True)
def linear_backward(ctx, grad_y, *_grads_of_statistics):
    """The backward of ``LinearFunction``, ``LinearStatsFunction`` and of the autograd formulas
    of ``linear_fwd`` and ``linear_stats_fwd`` (what ``_save_linear`` saved): ``(dx, dweight,
    dbias)`` as asked for by ``ctx.needs_input_grad``, then None for every other input."""
    n_inputs = len(ctx.needs_input_grad)
    if grad_y is None:  # the statistics' gradients only (``set_materialize_grads(False)``)
        return (None,) * n_inputs
    return (*_linear_backward(ctx, grad_y, *ctx.saved_tensors), *(None,) * (n_inputs - 3))


class LinearFunction(torch.autograd.Function):
    """``act(x @ weight.T + bias)`` on the Triton kernels (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation: str, negative_slope: float):
        y, z = _linear_fwd(x, weight, bias, activation, negative_slope)
        _save_linear(ctx, x, weight, bias, activation, negative_slope, y, z)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return linear_backward(ctx, grad_y)  # also linear_fwd's autograd formula


class LinearStatsFunction(torch.autograd.Function):
    """``x @ weight.T + bias`` (no activation) on the Triton kernels, returning also the
    batch-norm partial statistics of its output (non-differentiable; ``linear_stats``). The
    backward is ``LinearFunction``'s."""

    @staticmethod
    def forward(ctx, x, weight, bias, handover, eps):
        y, pmean, pm2 = _linear_stats_fwd(x, weight, bias, eps)
        _save_linear(ctx, x, weight, bias, "none", 0.0, y, None)
        want_made(handover, x, weight, ctx.needs_input_grad[1])
        ctx.handover = handover
        ctx.mark_non_differentiable(pmean, pm2)
        # No zero tensors for the statistics' gradients (never read)
        ctx.set_materialize_grads(False)
        return y, pmean, pm2

    @staticmethod
    def backward(ctx, grad_y, _dpmean, _dpm2):
        return linear_backward(ctx, grad_y, _dpmean, _dpm2)  # also linear_stats_fwd's formula


# --------------------------------------------------------------------------------------------
# autograd formulas of the forward ops
# --------------------------------------------------------------------------------------------
# Used only where an op is called with an input that requires grad in grad mode outside its
# Function: a ``torch.export``ed program (export inlines the Functions: its graph holds the
# forward ops themselves), ``ep.module()``. The Functions call the ops in their forward, where
# grad mode is off, and plain eager calls run the implementation itself (``_custom_op``).


def _setup_linear_fwd(ctx, inputs, output) -> None:
    x, weight, bias, activation, negative_slope = inputs
    y, z = output
    _save_linear(ctx, x, weight, bias, activation, negative_slope, y, z)
    ctx.mark_non_differentiable(z)
    ctx.set_materialize_grads(False)


def _setup_linear_stats_fwd(ctx, inputs, output) -> None:
    x, weight, bias, _eps = inputs
    y, pmean, pm2 = output
    _save_linear(ctx, x, weight, bias, "none", 0.0, y, None)
    ctx.mark_non_differentiable(pmean, pm2)
    ctx.set_materialize_grads(False)


linear_fwd.register_autograd(linear_backward, setup_context=_setup_linear_fwd)
linear_stats_fwd.register_autograd(linear_backward, setup_context=_setup_linear_stats_fwd)


def want_made(handover, x: Tensor, weight: Tensor, need_dw: bool) -> None:
    """Set ``handover.want`` for the Linear ``x [M, K] -> [M, N]`` (``_handover``): its
    backward computes dW on the "dz" path with a transposed dZ."""
    if handover is not None:
        from ..kernels.linear import dw_copies_input_transposed

        handover.want = need_dw and dw_copies_input_transposed(x, weight)


def _activation_grad_torch(saved: Tensor, activation: str, negative_slope: float) -> Tensor:
    """d act / dz in torch's ops from what the forward saved: the pre-activation z where
    ``_saves_preactivation``, else the output y (fp32 for 16-bit tensors)."""
    acc = acc_dtype(saved.dtype)
    s = saved.to(acc)
    if activation == "relu":
        return (s > 0).to(acc)
    if activation == "leaky_relu":  # y > 0 exactly where z > 0 for a slope >= 0
        # two Python scalars would make a float32 tensor: the slope rounded to fp32 (and an
        # overflow error beyond fp32's range) for float64 inputs
        return torch.where(s > 0, s.new_ones(()), s.new_full((), negative_slope))
    if activation == "sigmoid":
        return s * (1 - s)
    if activation == "tanh":
        return 1 - s * s
    if activation == "gelu":  # erf form
        return (
            0.5 * (1 + torch.erf(s * 0.5**0.5))
            + s * torch.exp(-0.5 * s * s) * (2 * math.pi) ** -0.5
        )
    if activation == "silu":
        sig = torch.sigmoid(s)
        return sig * (1 + s * (1 - sig))
    raise ValueError(f"unknown activation {activation!r}: expected one of {ACTIVATIONS}")


def _batched_linear_grads(ctx, grad_y, x, weight, saved, need_dx, need_dw, need_db):
    """``_linear_backward``'s gradients in torch's ops, which vmap batches (batched gradients:
    a batched tensor has no storage for the kernels)."""
    acc = acc_dtype(grad_y.dtype)
    dz = grad_y.to(acc)
    if ctx.activation != "none":
        dz = dz * _activation_grad_torch(saved, ctx.activation, ctx.negative_slope)
    dz2 = dz.reshape(-1, dz.shape[-1])
    dx = (dz @ weight.to(acc)).to(x.dtype) if need_dx else None
    dw = (dz2.t() @ x.reshape(-1, x.shape[-1]).to(acc)).to(weight.dtype) if need_dw else None
    db = dz2.sum(0).to(weight.dtype) if need_db else None
    return dx, dw, db


def _linear_backward(ctx, grad_y, x, weight, saved):
    """``(dx, dweight, dbias)``, each None where not asked for (``linear_backward``)."""
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    need_db = need_db and ctx.has_bias
    if not (need_dx or need_dw or need_db):
        return None, None, None
    if grads_batched((grad_y,)):
        return _batched_linear_grads(ctx, grad_y, x, weight, saved, need_dx, need_dw, need_db)
    if saved is None:
        saved = grad_y  # placeholder: not read without an activation
    made = take(getattr(ctx, "handover", None), grad_y)
    dx, dw, db = _linear_bwd(
        grad_y,
        x,
        weight,
        saved,
        ctx.activation,
        ctx.negative_slope,
        need_dx,
        need_dw,
        need_db,
        made or [],
    )
    return dx if need_dx else None, dw if need_dw else None, db if need_db else None


# --------------------------------------------------------------------------------------------
# public dispatch
# --------------------------------------------------------------------------------------------


def _validate(input, weight, bias, negative_slope) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"linear(): input must be a Tensor, got {type(input).__name__}")
    if not isinstance(weight, Tensor):
        raise TypeError(f"linear(): weight must be a Tensor, got {type(weight).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"linear(): bias must be a Tensor or None, got {type(bias).__name__}")
    if not float_arg(negative_slope):
        raise TypeError(
            f"linear(): negative_slope must be a real number, got {type(negative_slope).__name__}"
        )
    if weight.dim() != 2:
        raise RuntimeError(
            f"linear(): weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}"
        )
    if input.dim() == 0:
        raise RuntimeError("linear(): input must have at least 1 dimension, got a 0-d tensor")
    if input.shape[-1] != weight.shape[1]:
        raise RuntimeError(
            f"linear(): input shape {tuple(input.shape)} does not match weight shape "
            f"{tuple(weight.shape)}: expected input.shape[-1] == weight.shape[1] == "
            f"{weight.shape[1]} (in_features), got {input.shape[-1]}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise RuntimeError(
            f"linear(): bias shape {tuple(bias.shape)} does not match weight shape "
            f"{tuple(weight.shape)}: expected bias of shape ({weight.shape[0]},)"
        )
    if input.dtype != weight.dtype:
        raise RuntimeError(
            f"linear(): expected input and weight to have the same dtype, "
            f"got input {input.dtype} and weight {weight.dtype}"
        )
    if bias is not None and bias.dtype != weight.dtype:
        raise RuntimeError(
            f"linear(): expected bias to have weight's dtype {weight.dtype}, got {bias.dtype}"
        )
    if input.device != weight.device:
        raise RuntimeError(
            f"linear(): expected input and weight on the same device, "
            f"got input on {input.device} and weight on {weight.device}"
        )
    if bias is not None and bias.device != weight.device:
        raise RuntimeError(
            f"linear(): expected bias on weight's device {weight.device}, got {bias.device}"
        )


# torch converts leaky_relu's negative_slope to the op's compute type (float for
# float32/float16/bfloat16) and refuses a finite value that overflows it
_FP32_MAX = torch.finfo(torch.float32).max


def slope_fits(negative_slope: float, dtype: torch.dtype) -> bool:
    """Whether torch's leaky_relu takes ``negative_slope`` for an input of ``dtype``."""
    return (
        abs(negative_slope) <= _FP32_MAX
        or dtype == torch.float64
        or not math.isfinite(negative_slope)
    )


def _check_slope_fits(negative_slope: float, dtype: torch.dtype) -> None:
    if not slope_fits(negative_slope, dtype):
        raise RuntimeError("value cannot be converted to type float without overflow")


def _autocast(input, weight, bias):
    """torch.autocast's rule for linear: eligible floating tensors become the autocast dtype."""
    return lower_precision(input, weight, bias)


def linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    negative_slope: float = 0.01,
) -> Tensor:
    """``act(input @ weight.T + bias)``: ``torch.nn.functional.linear`` fused with an activation.

    ``input`` ``[..., in_features]``, ``weight`` ``[out_features, in_features]``, ``bias``
    ``[out_features]`` or None; ``activation`` one of ``ACTIVATIONS`` (None, "relu",
    "leaky_relu" with ``negative_slope``, "sigmoid", "tanh", "gelu" (erf), "silu").
    Returns ``[..., out_features]`` in the input's dtype. Under ``torch.autocast`` the
    float16/bfloat16/float32 operands are cast to the autocast dtype first, as ``F.linear``.
    """
    act = check_activation(activation)
    if isinstance(input, Tensor) and isinstance(weight, Tensor):
        input, weight, bias = _autocast(input, weight, bias)
        odd_bias = (
            isinstance(bias, Tensor) and weight.dim() == 2 and bias.shape != (weight.shape[0],)
        )
        if odd_bias and bias.numel() == 1 and bias.dim() <= 1:
            # F.linear broadcasts a 0-d or one-element bias over the outputs: an expanded view
            # (stride 0) does the same here, and its backward sums the gradient back.
            bias = bias.expand(weight.shape[0])
        elif odd_bias or (weight.dim() == 1 and bias is None):
            _validate(
                input, weight.view(1, -1) if weight.dim() == 1 else weight, None, negative_slope
            )
            if act == "leaky_relu":
                _check_slope_fits(float(negative_slope), input.dtype)
            y = _linear_irregular(input, weight, bias, activation, negative_slope)
            if y is not None:
                return y
    _validate(input, weight, bias, negative_slope)
    negative_slope = float(negative_slope)
    if act == "leaky_relu":
        _check_slope_fits(negative_slope, input.dtype)
    # Other dtypes (integer, bool, complex) take torch's F.linear, which computes them or raises
    # its own error for them, as dropout and softmax do.
    if input.dtype in _TRITON_DTYPES and use_triton(input, weight, bias):
        return LinearFunction.apply(input, weight, bias, act, negative_slope)
    return apply_activation_torch(F.linear(input, weight, bias), activation, negative_slope)


def _linear_irregular(input, weight, bias, activation, negative_slope):
    """``linear`` for two shapes ``F.linear`` takes beyond ``weight [out, in]`` with ``bias
    [out]``, or None for any other (``_validate`` then raises): a 1-D weight without bias
    (``input @ weight``, the last dim dropped) and, for a 2-D input, a bias that ``addmm``
    expands to the output ``[rows, out]`` (``[1, out]``, ``[rows, out]``, ``[rows, 1]``). The
    product runs on the kernels without bias; the bias and activation are torch's ops after it."""
    if weight.dim() == 1 and bias is None:
        y = linear(input, weight.unsqueeze(0)).squeeze(-1)
    elif (
        weight.dim() == 2
        and input.dim() == 2
        and isinstance(bias, Tensor)
        and bias.dim() <= 2
        and bias.dtype == weight.dtype
        and input.shape[-1] == weight.shape[1]
    ):
        out_shape = (input.shape[0], weight.shape[0])
        try:
            fits = torch.broadcast_shapes(bias.shape, out_shape) == out_shape
        except RuntimeError:
            fits = False
        if not fits:
            return None
        y = linear(input, weight, None) + bias
    else:
        return None
    return apply_activation_torch(y, activation, float(negative_slope))


def linear_stats(
    input: Tensor, weight: Tensor, bias: Tensor | None, handover=None, eps: float | None = None
):
    """``(y, partials)``: ``y = F.linear(input, weight, bias)`` on the Triton path for a 2-D
    ``input``, and ``partials = (pmean, pm2, rows)``, the batch-norm partial statistics of y's
    columns that the same launch made (for a batch norm that reads y next:
    ``fusedmlp.autograd.batchnorm.eager_stats``), or None where it made none. With ``eps``
    (that batch norm's) ``partials`` is y's final statistics instead
    (``fusedmlp.autograd.batchnorm.BatchStats``): no merge launch. The caller has checked the
    Triton path applies (``use_triton``, no autocast). ``handover``: a ``_handover.Handover``
    shared with that batch norm's Function."""
    _validate(input, weight, bias, 0.0)
    y, pmean, pm2 = LinearStatsFunction.apply(input, weight, bias, handover, eps)
    return y, stats_of(input, pmean, pm2, eps)


def stats_of(input: Tensor, pmean: Tensor, pm2: Tensor, eps: float | None):
    """What ``linear_stats_fwd`` made for a batch norm of its output, as ``linear_stats``
    returns it: None (nothing), the partials ``(pmean, pm2, rows)`` or, with ``eps``, a
    ``BatchStats``."""
    if pmean.numel() == 0:
        return None
    if eps is not None:
        from .batchnorm import BatchStats

        return BatchStats(*pmean.unbind(0))
    from ..kernels.linear import stats_rows

    return pmean, pm2, stats_rows(input)


__all__ = [
    "ACTIVATIONS",
    "LinearFunction",
    "LinearStatsFunction",
    "apply_activation_torch",
    "check_activation",
    "linear",
    "linear_stats",
]
