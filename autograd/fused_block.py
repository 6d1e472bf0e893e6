"""Cross-layer fusion: custom ops, autograd Functions and dispatch of the fused blocks.

Three blocks (kernels in ``fusedmlp.kernels.fused_block``):

- ``bn_act_dropout``: ``dropout(act(batch_norm(x)))`` with the batch statistics (training
  mode). Triton path: the batch-norm op's statistics kernels, then ONE pass for normalise +
  affine + activation + dropout; the running statistics are updated by the batch-norm op's own
  mutating custom ops: in eager mode ``fusedmlp::batchnorm_stats`` computes the statistics and
  updates them before the Function, which takes the statistics as given (one launch less),
  in traced graphs ``fusedmlp::batchnorm_update_running`` after it. Saved for backward: x, mean,
  invstd, the BN parameters and the one-element seed; the pre-activation is recomputed from x in
  the backward (which reads x anyway for the BN reductions), so no BN output, activation output
  or mask is stored. The backward never writes the BN output's gradient to memory: two passes
  over (x, dout) recompute it (split reduction + merge, then dx).
- ``bn_act_dropout_linear``: ``linear(bn_act_dropout(x), W, b)``, the block and the Linear
  without activation that follows it in an MLP: the block's output is not saved but recomputed
  in the backward for the Linear's dW (the same bits), then freed. In eager mode, when the
  block's gradients are needed too, the Linear's dX runs first and the block's backward
  reduction writes the recomputed output (``fused_block_bn_bwd_sums``, ``APPLY_IN_REDUCTION``);
  otherwise a forward pass with the saved statistics does (``fused_block_apply``).
- Cross-Function, set up by ``FusedSequential`` in eager mode: a Linear (without activation)
  whose output a block reads makes the block's batch statistics in its epilogue
  (``linear_stats`` with the block's eps, ``lin_stats``: a ``BatchStats``; no statistics
  launch), and the block's forward pass updates the running statistics from them
  (``fused_block_apply_update``); in the backward the block's dx pass makes dZ^T and dZ's
  column sums for that Linear's "dz" backward (``_handover``).
- ``linear_act_dropout``: ``dropout(act(linear(x, W, b)))``, ``Linear -> act -> Dropout``: the
  dropout in the Linear's epilogue (``fusedmlp.kernels.linear``), one launch and no
  pre-activation pass. Saved: x and W for the Linear, the OUTPUT where it determines the
  derivative (none, relu, leaky_relu with ``negative_slope >= 0``, sigmoid, tanh; the next
  layer keeps it as its input anyway), else the pre-activation z (leaky_relu with
  ``negative_slope < 0``, gelu, silu, stored by the same epilogue), plus the seed. The
  backward is ``act_dropout``'s, then the Linear's without activation.
- ``act_dropout``: ``dropout(act(z))`` alone, one elementwise pass, saved as above.

The dropout seed is drawn exactly as ``fusedmlp.functional.dropout`` draws it (same generator
call at the same point of the chain) and the kernels use its Philox stream, so a fused block
produces the same mask as the unfused fusedmlp chain under the same ``torch.manual_seed``.

``fused_block_fwd`` and ``fused_block_linear_act_dropout_fwd`` carry autograd formulas, their
Functions' backward itself (``bn_act_dropout_backward`` / ``act_dropout_backward`` by
``normalize``, ``linear_act_dropout_backward``), for exported programs, which hold the ops
outside the Functions.

Torch path: torch's own ``F.batch_norm``, activation and ``F.dropout``, differentiated by torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _env
from ..backend import acc_dtype, use_triton
from ._custom_op import caller, custom_op
from ._handover import take
from ._once import once_differentiable
from .batchnorm import (
    _FLOATS,
    RUNNING_STATS,
    BatchStats,
    affine_grads,
    check_input_dtype,
    check_params,
    eager_stats,
    grads_or_empty,
    torch_batch_norm,
    update_running_after,
)
from .dropout import _check_p, _seed
from .linear import (
    _linear_bwd,
    _linear_fwd,
    _linear_stats_fwd,
    _validate,
    apply_activation_torch,
    check_activation,
    stats_of,
    want_made,
)
from .linear import linear as _linear


def saves_output(activation: str, negative_slope: float) -> bool:
    """Whether ``act_dropout``'s backward reads the derivative from its output (mirrors
    ``fusedmlp.kernels.fused_block.saves_output``, kept import-free of triton)."""
    return not (
        activation in ("gelu", "silu") or (activation == "leaky_relu" and negative_slope < 0)
    )


def _saved_for_act(activation: str, negative_slope: float, out: Tensor, z: Tensor):
    """What an act -> dropout backward keeps: nothing without an activation (the mask comes
    from the seed; the backward passes its incoming gradient in the unread operand's place),
    else the output or z (``saves_output``)."""
    if activation == "none":
        return None
    return out if saves_output(activation, negative_slope) else z


# ----------------------------------------------------------------------------------------------
# custom ops (names prefixed fused_block_)
# ----------------------------------------------------------------------------------------------


@custom_op("fusedmlp::fused_block_fwd", mutates_args=())
def _fused_block_fwd(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    seed: Tensor | None,
    normalize: bool,
    eps: float,
    p: float,
    activation: str,
    negative_slope: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(out, mean, invstd, var)``: out = dropout(act(bn(x))) (``normalize``, x ``[N, C]``) or
    dropout(act(x)) (x ``[..., C]``); seed None = no dropout. Statistics empty without
    ``normalize``."""
    from ..kernels import fused_block as K

    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    C = x.shape[-1]
    _, mean, invstd, var = K.fused_forward(
        x.reshape(-1, C),
        weight,
        bias,
        seed,
        normalize,
        eps,
        p,
        activation,
        negative_slope,
        out=out.view(-1, C),
    )
    return out, mean, invstd, var


@_fused_block_fwd.register_fake
def _(x, weight, bias, seed, normalize, eps, p, activation, negative_slope):
    n = x.shape[-1] if normalize else 0
    stats = [x.new_empty(n, dtype=acc_dtype(x.dtype)) for _ in range(3)]
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device), *stats)


@custom_op("fusedmlp::fused_block_act_dropout_bwd", mutates_args=())
def _fused_block_act_dropout_bwd(
    dy: Tensor, saved: Tensor, seed: Tensor, p: float, activation: str, negative_slope: float
) -> Tensor:
    """dz of ``dropout(act(z))``; ``saved`` is the output or z (see ``saves_output``)."""
    from ..kernels import fused_block as K

    C = dy.shape[-1]
    dx = torch.empty(dy.shape, dtype=dy.dtype, device=dy.device)
    K.act_dropout_backward(
        dy.reshape(-1, C),
        saved.reshape(-1, C),
        seed,
        p,
        activation,
        negative_slope,
        dx=dx.view(-1, C),
    )
    return dx


@_fused_block_act_dropout_bwd.register_fake
def _(dy, saved, seed, p, activation, negative_slope):
    return torch.empty(dy.shape, dtype=dy.dtype, device=dy.device)


@custom_op("fusedmlp::fused_block_bn_bwd", mutates_args=("dxt", "ws"))
def _fused_block_bn_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    seed: Tensor | None,
    p: float,
    activation: str,
    negative_slope: float,
    need_dx: bool,
    need_dweight: bool,
    need_dbias: bool,
    dxt: Tensor | None,
    ws: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)`` of ``dropout(act(bn(x)))``; a gradient not asked for is empty.
    With ``dxt`` ``[C, R]`` and ``ws`` ``[cdiv(R, TRANSPOSED_ROWS), C]`` (acc dtype; need_dx) the
    dx pass also fills them with dx^T and dx's column sums per ``TRANSPOSED_ROWS`` rows
    (``_handover``). (No defaults for the two: torch 2.11's in-place bookkeeping of mutated
    arguments indexes the call's arguments without the trailing defaulted ones, and raised
    IndexError under ``torch.compile`` when they were left at None.)"""
    from ..kernels import fused_block as K

    dx, dw, db = K.bn_act_dropout_backward(
        dy,
        x,
        weight,
        bias,
        mean,
        invstd,
        seed,
        p,
        activation,
        negative_slope,
        need_dx,
        need_dweight,
        need_dbias,
        (dxt, ws) if dxt is not None and ws is not None else None,
    )
    return grads_or_empty(x, dx, dw, db)


@_fused_block_bn_bwd.register_fake
def _(dy, x, weight, bias, mean, invstd, seed, p, activation, negative_slope, nx, nw, nb,
      dxt, ws):  # fmt: skip
    C = x.shape[1]
    ref = weight if weight is not None else bias
    pdtype = ref.dtype if ref is not None else acc_dtype(x.dtype)
    return (
        torch.empty(x.shape, dtype=x.dtype, device=x.device) if nx else x.new_empty(0),
        x.new_empty(C, dtype=pdtype) if nw and weight is not None else x.new_empty(0),
        x.new_empty(C, dtype=pdtype) if nb else x.new_empty(0),
    )


@custom_op("fusedmlp::fused_block_bn_bwd_sums", mutates_args=())
def _fused_block_bn_bwd_sums(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    seed: Tensor | None,
    p: float,
    activation: str,
    negative_slope: float,
    need_dweight: bool,
    need_dbias: bool,
    apply: bool,
    transposed: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(psum_g, psum_gxmu, dweight, dbias, out)``: the first pass of ``fused_block_bn_bwd``
    (``kernels.fused_block.bn_act_dropout_backward_sums``; a gradient not asked for is empty)
    and, with ``apply``, the block's output from the same pass, ``fused_block_apply``'s bit for
    bit: ``[N, C]``, or with ``transposed`` its transpose ``[C, N]``, contiguous (else
    empty)."""
    from ..kernels import fused_block as K

    n, c = x.shape
    out = dest = None
    if apply:
        out = torch.empty((c, n) if transposed else (n, c), dtype=x.dtype, device=x.device)
        dest = out.t() if transposed else out
    psum_g, psum_gxmu, dw, db = K.bn_act_dropout_backward_sums(
        dy, x, weight, bias, mean, invstd, seed, p, activation, negative_slope,
        need_dweight, need_dbias, dest,
    )  # fmt: skip
    dw, db = grads_or_empty(x, None, dw, db)[1:]
    return psum_g, psum_gxmu, dw, db, out if out is not None else x.new_empty(0)


@_fused_block_bn_bwd_sums.register_fake
def _(dy, x, weight, bias, mean, invstd, seed, p, activation, negative_slope, nw, nb, apply,
      transposed):  # fmt: skip
    from ..kernels.fused_block import backward_sums_shape

    n, c = x.shape
    ref = weight if weight is not None else bias
    pdtype = ref.dtype if ref is not None else acc_dtype(x.dtype)
    shape = backward_sums_shape(n, c, x.device)
    out = ((c, n) if transposed else (n, c)) if apply else (0,)
    return (
        x.new_empty(shape, dtype=acc_dtype(x.dtype)),
        x.new_empty(shape, dtype=acc_dtype(x.dtype)),
        x.new_empty(c, dtype=pdtype) if nw and weight is not None else x.new_empty(0),
        x.new_empty(c, dtype=pdtype) if nb else x.new_empty(0),
        x.new_empty(out),
    )


@custom_op("fusedmlp::fused_block_bn_bwd_dx", mutates_args=("dxt", "ws"))
def _fused_block_bn_bwd_dx(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    seed: Tensor | None,
    p: float,
    activation: str,
    negative_slope: float,
    psum_g: Tensor,
    psum_gxmu: Tensor,
    dxt: Tensor | None,
    ws: Tensor | None,
) -> Tensor:
    """dx of ``dropout(act(bn(x)))`` from ``fused_block_bn_bwd_sums``'s sums: the second pass
    of ``fused_block_bn_bwd``, which also fills ``dxt`` and ``ws`` as that op does."""
    from ..kernels import fused_block as K

    return K.bn_act_dropout_backward_dx(
        dy, x, weight, bias, mean, invstd, seed, p, activation, negative_slope, psum_g,
        psum_gxmu, (dxt, ws) if dxt is not None and ws is not None else None,
    )  # fmt: skip


@_fused_block_bn_bwd_dx.register_fake
def _(dy, x, weight, bias, mean, invstd, seed, p, activation, negative_slope, psum_g, psum_gxmu,
      dxt, ws):  # fmt: skip
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@custom_op("fusedmlp::fused_block_apply", mutates_args=())
def _fused_block_apply(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    seed: Tensor | None,
    p: float,
    activation: str,
    negative_slope: float,
    transposed: bool,
) -> Tensor:
    """``dropout(act(bn(x)))`` with given statistics (``fused_block_fwd``'s mean and invstd for
    this x): that op's output again, bit for bit, without the statistics kernels. x ``[N, C]``;
    the output ``[N, C]``, or with ``transposed`` its transpose ``[C, N]`` (contiguous: the
    kernel writes its tiles transposed, through shared memory, with coalesced stores)."""
    from ..kernels import fused_block as K

    n, c = x.shape
    buf = torch.empty((c, n) if transposed else (n, c), dtype=x.dtype, device=x.device)
    K.fused_forward(
        x, weight, bias, seed, True, 0.0, p, activation, negative_slope,
        out=buf.t() if transposed else buf, stats=(mean, invstd),
    )  # fmt: skip
    return buf


@_fused_block_apply.register_fake
def _(x, weight, bias, mean, invstd, seed, p, activation, negative_slope, transposed):
    n, c = x.shape
    return torch.empty((c, n) if transposed else (n, c), dtype=x.dtype, device=x.device)


@custom_op(
    "fusedmlp::fused_block_apply_update", mutates_args=RUNNING_STATS, unversioned=RUNNING_STATS
)
def _fused_block_apply_update(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    seed: Tensor | None,
    p: float,
    activation: str,
    negative_slope: float,
    running_mean: Tensor,
    running_var: Tensor,
    var: Tensor,
    momentum: float,
    num_batches_tracked: Tensor | None,
) -> Tensor:
    """``fused_block_apply`` (row-major) with x's batch statistics made by the Linear before
    the block (``BatchStats``), whose launch does not touch the running statistics: the same
    launch updates ``running_mean``/``running_var`` in place from ``mean`` and the unbiased
    ``var``, with ``momentum`` (``num_batches_tracked``: the cumulative average), as the
    statistics kernels would have."""
    from ..kernels import fused_block as K

    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    update = (running_mean, running_var, var, momentum, num_batches_tracked)
    K.fused_forward(
        x, weight, bias, seed, True, 0.0, p, activation, negative_slope, out=out,
        stats=(mean, invstd), update=update,
    )  # fmt: skip
    return out


@_fused_block_apply_update.register_fake
def _(x, weight, bias, mean, invstd, seed, p, activation, negative_slope, running_mean,
      running_var, var, momentum, num_batches_tracked):  # fmt: skip
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@custom_op("fusedmlp::fused_block_linear_act_dropout_fwd", mutates_args=())
def _fused_block_linear_act_dropout_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    seed: Tensor,
    p: float,
    activation: str,
    negative_slope: float,
) -> tuple[Tensor, Tensor]:
    """``(y, z)``: y = dropout(act(x @ weight.T + bias), p) of shape ``[..., out]`` (the mask
    of ``seed``), z the pre-activation when the backward needs it (``saves_output`` False),
    else empty."""
    from ..kernels import linear as K

    in_features = weight.shape[1]
    out_shape = (*x.shape[:-1], weight.shape[0])
    x2 = x.reshape(-1, in_features)
    y, z = K.linear_forward(x2, weight, bias, activation, negative_slope, out_shape, seed, p)
    return y, (z if z is not None else x.new_empty(0))


@_fused_block_linear_act_dropout_fwd.register_fake
def _(x, weight, bias, seed, p, activation, negative_slope):
    out_shape = (*x.shape[:-1], weight.shape[0])
    z = x.new_empty(out_shape) if not saves_output(activation, negative_slope) else x.new_empty(0)
    return x.new_empty(out_shape), z


_fused_block_fwd_call = caller(_fused_block_fwd)
_fused_block_linear_act_dropout_fwd_call = caller(_fused_block_linear_act_dropout_fwd)
_fused_block_apply_call = caller(_fused_block_apply)
_fused_block_apply_update_call = caller(_fused_block_apply_update)
_fused_block_act_dropout_bwd_call = caller(_fused_block_act_dropout_bwd)
_fused_block_bn_bwd_call = caller(_fused_block_bn_bwd)
_fused_block_bn_bwd_sums_call = caller(_fused_block_bn_bwd_sums)
_fused_block_bn_bwd_dx_call = caller(_fused_block_bn_bwd_dx)


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------


# Activations whose derivative is constant between kinks: the act-dropout gradient is then linear
# in the received gradient alone (nothing second-order flows through the saved tensors).
_PIECEWISE_LINEAR = frozenset(("none", "relu", "leaky_relu"))


def _block_grads(ctx, dout, x, weight, bias, mean, invstd, seed, n_inputs: int,
                 sums=None) -> tuple:  # fmt: skip
    """The block's (dx, dweight, dbias) as ``affine_grads`` returns them for a Function of
    ``n_inputs`` inputs (x, weight and bias first), from the gradient of its output. With a
    ``ctx.handover`` that the Linear before the block wants filled (``_handover``), the dx
    pass also makes dx^T and dx's column sums, handed over with dx. ``sums``: ``(psum_g,
    psum_gxmu, dweight, dbias)`` of ``fused_block_bn_bwd_sums`` (its pass ran already): the dx
    pass alone runs."""
    handover = ctx.handover
    extra = (None, None)
    if handover is not None and handover.want and ctx.needs_input_grad[0]:
        from ..kernels.fused_block import TRANSPOSED_ROWS

        R, C = x.shape
        extra = (
            torch.empty((C, R), dtype=x.dtype, device=x.device),
            torch.empty((-(-R // TRANSPOSED_ROWS), C), dtype=acc_dtype(x.dtype), device=x.device),
        )
    args = (dout, x, weight, bias, mean, invstd, seed, ctx.p, ctx.activation, ctx.negative_slope)
    if sums is None:
        dx, dw, db = _fused_block_bn_bwd_call(*args, *ctx.needs_input_grad[:3], *extra)
    else:
        psum_g, psum_gxmu, dw, db = sums
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _fused_block_bn_bwd_dx_call(*args, psum_g, psum_gxmu, *extra)
    grads = affine_grads(ctx, dx, dw, db, n_inputs)
    if extra[0] is not None:
        handover.give(grads[0], extra)
    return grads


def _block_forward(x, weight, bias, seed, eps, p, activation, negative_slope, mean, invstd,
                   update=None):  # fmt: skip
    """``(out, mean, invstd, var)`` of the block: its statistics computed here, or given
    (``mean``/``invstd`` from ``eager_stats`` or a ``BatchStats``: then ``var`` is None).
    ``update``: ``(running_mean, running_var, var, momentum, num_batches_tracked)`` for given
    statistics that the running ones still await (``BatchStats``): updated by the same
    launch."""
    if mean is None:
        return _fused_block_fwd_call(
            x, weight, bias, seed, True, eps, p, activation, negative_slope
        )
    if update is not None:
        out = _fused_block_apply_update_call(
            x, weight, bias, mean, invstd, seed, p, activation, negative_slope, *update
        )
    else:
        out = _fused_block_apply_call(
            x, weight, bias, mean, invstd, seed, p, activation, negative_slope, False
        )
    return out, mean, invstd, None


class BNActDropoutFunction(torch.autograd.Function):
    """``out = dropout(act(batch_norm(x)))`` with batch statistics; also returns the batch mean
    and unbiased variance (non-differentiable; None when given) for the running-statistics
    update. ``mean``/``invstd``: this x's batch statistics when ``eager_stats`` computed them,
    else None (computed here). Saves x, weight, bias, mean, invstd, seed (the pre-activation
    is recomputed from x)."""

    @staticmethod
    def forward(
        ctx, x, weight, bias, seed, eps, p, activation, negative_slope, mean, invstd, handover,
        update,
    ):  # fmt: skip
        given = mean is not None
        out, mean, invstd, var = _block_forward(
            x, weight, bias, seed, eps, p, activation, negative_slope, mean, invstd, update
        )
        ctx.save_for_backward(x, weight, bias, mean, invstd, seed)
        ctx.p, ctx.activation, ctx.negative_slope = p, activation, negative_slope
        ctx.handover = handover
        ctx.bias_dtype = bias.dtype if bias is not None else None
        # No zero tensors for the gradients of mean and var (never read): two fewer allocations
        # and fill launches per backward. The output's own gradient is None only when it got none.
        ctx.set_materialize_grads(False)
        if given:
            return out, None, None
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, dout, _dmean, _dvar):
        return bn_act_dropout_backward(ctx, dout, _dmean, _dvar)  # also fused_block_fwd's


@once_differentiable("batch_norm + activation + dropout")
def bn_act_dropout_backward(ctx, dout, *_grads_of_statistics):
    """The backward of ``BNActDropoutFunction`` and of ``fused_block_fwd``'s autograd formula
    with ``normalize`` (what they saved: x, weight, bias, mean, invstd, seed; ``ctx.handover``
    None in the formula): ``(dx, dweight, dbias)`` as asked for by ``ctx.needs_input_grad``,
    None for every other input."""
    n_inputs = len(ctx.needs_input_grad)
    if dout is None or not any(ctx.needs_input_grad[:3]):
        return (None,) * n_inputs
    return _block_grads(ctx, dout, *ctx.saved_tensors, n_inputs=n_inputs)


# The block + Linear backward computes the Linear's dX first, and the block's reduction, which
# reads the block's input x anyway, also recomputes the block's output for the Linear's dW: one
# launch and one read of x per hidden layer fewer than a recomputation pass of its own (64 MiB
# at w1024 B16K fp32). Read once; ``FUSEDMLP_APPLY_IN_REDUCTION=0`` runs the separate pass
# (``benchmarks/kernel_times.py`` times both).
APPLY_IN_REDUCTION = _env.switch("FUSEDMLP_APPLY_IN_REDUCTION")


def _grads_apply_in_reduction(
    ctx, dy, x, weight, bias, mean, invstd, seed, lin_weight, need_dlb, transposed
) -> tuple:
    """``BNActDropoutLinearFunction.backward``'s return when both the Linear's dW and the
    block's gradients are needed (``APPLY_IN_REDUCTION``): the Linear's dX (the block output's
    gradient); the block's reduction, which also writes the block's output (transposed where
    the Linear's dW reads it so: ``dw_copies_input_transposed``); the Linear's dW and db from
    it, after which it is freed; the block's dx pass."""
    need_dw, need_db = ctx.needs_input_grad[1:3]
    dout = _linear_bwd(dy, x, lin_weight, dy, "none", 0.0, True, False, False, [])[0]
    psum_g, psum_gxmu, dw, db, out = _fused_block_bn_bwd_sums_call(
        dout, x, weight, bias, mean, invstd, seed, ctx.p, ctx.activation, ctx.negative_slope,
        need_dw, need_db, True, transposed,
    )  # fmt: skip
    made = take(ctx.lin_handover, dy)  # dy^T and its column sums, from the next block
    _, dlw, dlb = _linear_bwd(
        dy, out.t() if transposed else out, lin_weight, dy, "none", 0.0, False, True, need_dlb,
        made or [],
    )  # fmt: skip
    del out
    dx, dw, db = _block_grads(
        ctx, dout, x, weight, bias, mean, invstd, seed, 3, (psum_g, psum_gxmu, dw, db)
    )
    return dx, dw, db, None, dlw, dlb if need_dlb else None, *(None,) * 11


class BNActDropoutLinearFunction(torch.autograd.Function):
    """``linear(dropout(act(batch_norm(x))), lin_weight, lin_bias)`` with batch statistics, the
    Linear without activation (an MLP's next layer, or its head). Also returns the batch mean and
    unbiased variance (non-differentiable; None when given) for the running-statistics update;
    ``mean``/``invstd`` as ``BNActDropoutFunction``'s.

    The block's output, the Linear's input, is not saved: the backward recomputes it from x, the
    statistics and the seed for the Linear's dW (in the block's backward reduction,
    ``_grads_apply_in_reduction``, or in an elementwise pass of its own, ``fused_block_apply``),
    then frees it before the block's dx pass. A hidden layer so keeps one [N, C] activation for
    backward (x) instead of two (x and the block output), as a compiled torch model does.
    Saves x, weight, bias, mean, invstd, seed, lin_weight."""

    @staticmethod
    def forward(
        ctx, x, weight, bias, seed, lin_weight, lin_bias, eps, p, activation, negative_slope,
        mean, invstd, lin_stats, handover, lin_handover, lin_eps, update,
    ):  # fmt: skip
        given = mean is not None
        out, mean, invstd, var = _block_forward(
            x, weight, bias, seed, eps, p, activation, negative_slope, mean, invstd, update
        )
        pmean = pm2 = None
        if lin_stats:  # the Linear's output's batch-norm statistics, from its epilogue: final
            # ones with ``lin_eps`` (the next batch norm's), else partials (``linear_stats``)
            y, pmean, pm2 = _linear_stats_fwd(out, lin_weight, lin_bias, lin_eps)
        else:
            y, _ = _linear_fwd(out, lin_weight, lin_bias, "none", 0.0)
        want_made(lin_handover, out, lin_weight, ctx.needs_input_grad[4])
        del out  # freed here: the backward recomputes it
        ctx.save_for_backward(x, weight, bias, mean, invstd, seed, lin_weight)
        ctx.handover, ctx.lin_handover = handover, lin_handover
        ctx.p, ctx.activation, ctx.negative_slope = p, activation, negative_slope
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.has_lin_bias = lin_bias is not None
        ctx.set_materialize_grads(False)
        # One call for every non-differentiable output: each call replaces the last one's set,
        # and differentiable statistics would reach the next batch norm's ``batchnorm_stats``
        # (which has no autograd formula) when it merges them (``FINAL_STATS`` off).
        if given:
            mean = var = None
        ctx.mark_non_differentiable(*[t for t in (mean, var, pmean, pm2) if t is not None])
        return y, mean, var, pmean, pm2

    @staticmethod
    @once_differentiable("batch_norm + activation + dropout + linear")
    def backward(ctx, dy, _dmean, _dvar, _dpmean, _dpm2):
        if dy is None:
            return (None,) * 17
        x, weight, bias, mean, invstd, seed, lin_weight = ctx.saved_tensors
        need_dx, need_dw, need_db, _, need_dlw, need_dlb = ctx.needs_input_grad[:6]
        need_dlb = need_dlb and ctx.has_lin_bias
        need_block = need_dx or need_dw or need_db
        transposed = False
        if need_dlw:
            from ..kernels.linear import dw_copies_input_transposed

            # Where TF32's dW would copy the Linear's input transposed, its recomputation
            # writes it transposed at once: no row-major copy beside dZ^T (64 MiB less at w1024
            # B16K fp32), no transpose pass. Eager only: the precision setting read there
            # cannot be traced.
            transposed = not torch.compiler.is_compiling() and dw_copies_input_transposed(
                x, lin_weight
            )
        if need_dlw and need_block and APPLY_IN_REDUCTION and not torch.compiler.is_compiling():
            return _grads_apply_in_reduction(
                ctx, dy, x, weight, bias, mean, invstd, seed, lin_weight, need_dlb, transposed
            )
        if need_dlw:  # the Linear's input again, for its dW only
            out = _fused_block_apply_call(
                x,
                weight,
                bias,
                mean,
                invstd,
                seed,
                ctx.p,
                ctx.activation,
                ctx.negative_slope,
                transposed,
            )
            if transposed:
                out = out.t()  # [N, C] again, a view of the contiguous [C, N]
        else:
            out = x  # shape and dtype only: not read without dW
        made = take(ctx.lin_handover, dy)  # dy^T and its column sums, from the next block
        dout, dlw, dlb = _linear_bwd(
            dy, out, lin_weight, dy, "none", 0.0, need_block, need_dlw, need_dlb, made or []
        )  # fmt: skip
        del out
        dx = dw = db = None
        if need_block:
            dx, dw, db = _block_grads(ctx, dout, x, weight, bias, mean, invstd, seed, n_inputs=3)
        return (
            dx,
            dw,
            db,
            None,
            dlw if need_dlw else None,
            dlb if need_dlb else None,
            *(None,) * 11,
        )


class LinearActDropoutFunction(torch.autograd.Function):
    """``dropout(act(x @ weight.T + bias))`` with the dropout in the Linear's epilogue. Saves x,
    weight, the output (or z, ``saves_output``) and the seed."""

    @staticmethod
    def forward(ctx, x, weight, bias, seed, p, activation, negative_slope):
        y, z = _fused_block_linear_act_dropout_fwd_call(
            x, weight, bias, seed, p, activation, negative_slope
        )
        saved = _saved_for_act(activation, negative_slope, y, z)
        ctx.save_for_backward(x, weight, saved, seed)
        ctx.p, ctx.activation, ctx.negative_slope = p, activation, negative_slope
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        return linear_act_dropout_backward(ctx, dy)  # also fused_block_linear_act_dropout_fwd's


def _linear_grads_through_saved(ctx) -> bool:
    """Whether ``linear_act_dropout_backward``'s gradients depend on its saved tensors: through
    the activation's derivative (not piecewise linear), or through the Linear's operands
    (dx = dz @ W, dW = dz^T @ x) when x and W both require grad. Linear in ``dy`` otherwise."""
    needs = ctx.needs_input_grad
    return ctx.activation not in _PIECEWISE_LINEAR or (needs[0] and needs[1])


@once_differentiable("linear + activation + dropout", through_saved=_linear_grads_through_saved)
def linear_act_dropout_backward(ctx, dy, *_grad_of_z):
    """The backward of ``LinearActDropoutFunction`` and of
    ``fused_block_linear_act_dropout_fwd``'s autograd formula (what they saved: x, weight, the
    output or z, seed): ``(dx, dweight, dbias)`` as asked for by ``ctx.needs_input_grad``, then
    None for the other 4 inputs."""
    if dy is None:  # the formula: only z's gradient (``set_materialize_grads(False)``)
        return (None,) * 7
    x, weight, saved, seed = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    need_db = need_db and ctx.has_bias
    if not (need_dx or need_dw or need_db):
        return (None,) * 7
    dz = _fused_block_act_dropout_bwd_call(
        dy, saved if saved is not None else dy, seed, ctx.p, ctx.activation,
        ctx.negative_slope,
    )  # fmt: skip
    dx, dw, db = _linear_bwd(dz, x, weight, dz, "none", 0.0, need_dx, need_dw, need_db, [])
    return (
        dx if need_dx else None,
        dw if need_dw else None,
        db if need_db else None,
        *(None,) * 4,
    )


class ActDropoutFunction(torch.autograd.Function):
    """``out = act(z) * keep * 1/(1-p)``; saves the output (or z, see ``saves_output``) and the
    seed."""

    @staticmethod
    def forward(ctx, z, seed, p, activation, negative_slope):
        out, _, _, _ = _fused_block_fwd_call(
            z, None, None, seed, False, 0.0, p, activation, negative_slope
        )
        saved = _saved_for_act(activation, negative_slope, out, z)
        ctx.save_for_backward(saved, seed)
        ctx.p, ctx.activation, ctx.negative_slope = p, activation, negative_slope
        return out

    @staticmethod
    def backward(ctx, dout):
        return act_dropout_backward(ctx, dout)  # also fused_block_fwd's (without normalize)


@once_differentiable(
    "activation + dropout", through_saved=lambda ctx: ctx.activation not in _PIECEWISE_LINEAR
)
def act_dropout_backward(ctx, dout, *_grads_of_statistics):
    """The backward of ``ActDropoutFunction`` and of ``fused_block_fwd``'s autograd formula
    without ``normalize`` (what they saved: the output or z, and the seed): ``(dz, None,
    ...)`` for every input."""
    n_inputs = len(ctx.needs_input_grad)
    if dout is None:  # the formula: only the (empty) statistics' gradients
        return (None,) * n_inputs
    saved, seed = ctx.saved_tensors
    dz = _fused_block_act_dropout_bwd_call(
        dout, saved if saved is not None else dout, seed, ctx.p, ctx.activation,
        ctx.negative_slope,
    )  # fmt: skip
    return dz, *(None,) * (n_inputs - 1)


# ----------------------------------------------------------------------------------------------
# autograd formulas of the forward ops
# ----------------------------------------------------------------------------------------------
# Used only where an op is called with an input that requires grad in grad mode outside its
# Function: a ``torch.export``ed program (export inlines the Functions: its graph holds the
# forward ops themselves), ``ep.module()``. The Functions call the ops in their forward, where
# grad mode is off, and plain eager calls run the implementation itself (``_custom_op``).
# fused_block_apply_update mutates the running statistics (torch refuses formulas there).


def _setup_fused_block_fwd(ctx, inputs, output) -> None:
    """``BNActDropoutFunction``'s saving with ``normalize`` (no handover), else
    ``ActDropoutFunction``'s."""
    x, weight, bias, seed, normalize, _eps, p, activation, negative_slope = inputs
    out, mean, invstd, var = output
    ctx.normalize = normalize
    ctx.p, ctx.activation, ctx.negative_slope = p, activation, negative_slope
    if normalize:
        ctx.save_for_backward(x, weight, bias, mean, invstd, seed)
        ctx.handover = None
        ctx.bias_dtype = bias.dtype if bias is not None else None
    else:
        ctx.save_for_backward(_saved_for_act(activation, negative_slope, out, x), seed)
    ctx.mark_non_differentiable(mean, invstd, var)
    # No zero tensors for the gradients of the statistics (never read)
    ctx.set_materialize_grads(False)


def _fused_block_fwd_backward(ctx, dout, *_grads_of_statistics):
    """``fused_block_fwd``'s formula: the backward of the Function its ``normalize`` stands for."""
    if ctx.normalize:
        return bn_act_dropout_backward(ctx, dout)
    return act_dropout_backward(ctx, dout)


def _setup_linear_act_dropout_fwd(ctx, inputs, output) -> None:
    """``LinearActDropoutFunction``'s saving; z (an output here) is not differentiable."""
    x, weight, bias, seed, p, activation, negative_slope = inputs
    y, z = output
    ctx.save_for_backward(x, weight, _saved_for_act(activation, negative_slope, y, z), seed)
    ctx.p, ctx.activation, ctx.negative_slope = p, activation, negative_slope
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(z)
    ctx.set_materialize_grads(False)


_fused_block_fwd.register_autograd(_fused_block_fwd_backward, setup_context=_setup_fused_block_fwd)
_fused_block_linear_act_dropout_fwd.register_autograd(
    linear_act_dropout_backward, setup_context=_setup_linear_act_dropout_fwd
)


# ----------------------------------------------------------------------------------------------
# public dispatch
# ----------------------------------------------------------------------------------------------


def _kernel_activation(activation) -> str:
    if activation == "none":
        return "none"
    return check_activation(activation)


def _check_bn(input, running_mean, running_var, weight, bias, eps) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"bn_act_dropout: input must be a Tensor, got {type(input).__name__}")
    if input.dim() != 2:
        raise ValueError(
            f"bn_act_dropout: expected a 2-D [N, C] input, got {input.dim()}-D input of size "
            f"{tuple(input.shape)}"
        )
    if input.shape[0] <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {input.size()}"
        )
    if eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    check_input_dtype("bn_act_dropout", input)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    check_params("bn_act_dropout", input, running_mean, running_var, weight, bias)


def bn_act_dropout(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str | None = None,
    negative_slope: float = 0.01,
    p: float = 0.0,
    num_batches_tracked: Tensor | None = None,
    *,
    partials: tuple | None = None,
    handover=None,
) -> Tensor:
    """``dropout(act(batch_norm(input, training=True)), p)``: BatchNorm1d in training mode, an
    activation and inverted dropout as one block. ``partials``: input's batch-norm partial
    statistics from the Linear that produced it (``linear_stats``), merged instead of a
    statistics pass over input; ``handover``: the ``_handover.Handover`` shared with that
    Linear.

    ``input`` ``[N, C]``; ``running_mean``/``running_var`` ``[C]`` (updated in place with
    ``momentum`` and the unbiased batch variance) or both None; ``weight``/``bias`` ``[C]`` or
    None; ``activation`` None/"none", "relu", "leaky_relu" (``negative_slope``), "sigmoid",
    "tanh", "gelu", "silu"; ``p`` the drop probability (0 = no dropout, no seed drawn).
    ``num_batches_tracked`` (already incremented): cumulative running average
    (``momentum=None`` of the module), read on the device on the Triton path.

    Triton path: normalise + affine + activation + dropout in one pass after the statistics
    kernels, mask regenerated in backward (same mask as ``fusedmlp.functional.dropout`` would
    draw at this point). Torch path: ``F.batch_norm``, torch's activation, ``F.dropout``.
    """
    act = _kernel_activation(activation)
    p = _check_p(p)
    eps = float(eps)
    if not use_triton(input, running_mean, running_var, weight, bias):
        y = torch_batch_norm(
            input, running_mean, running_var, weight, bias, True, momentum, eps, num_batches_tracked
        )
        y = apply_activation_torch(y, act, negative_slope)
        return F.dropout(y, p, True) if p > 0.0 else y
    _check_bn(input, running_mean, running_var, weight, bias, eps)
    seed = _seed(input, None, p) if p > 0.0 else None
    mean, invstd, update = _given_stats(
        input, running_mean, running_var, momentum, eps, num_batches_tracked, partials
    )
    out, batch_mean, var = BNActDropoutFunction.apply(
        input, weight, bias, seed, eps, p, act, float(negative_slope), mean, invstd, handover,
        update,
    )  # fmt: skip
    update_running_after(
        running_mean, running_var, mean, batch_mean, var, momentum, num_batches_tracked
    )
    return out


def bn_act_dropout_linear(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    activation: str | None,
    negative_slope: float,
    p: float,
    num_batches_tracked: Tensor | None,
    lin_weight: Tensor,
    lin_bias: Tensor | None,
    *,
    partials: tuple | None = None,
    stats: bool = False,
    handover=None,
    lin_handover=None,
    stats_eps: float | None = None,
):
    """``linear(bn_act_dropout(input, ...), lin_weight, lin_bias)`` (no activation on the
    Linear) as one autograd Function that does not save the block's output
    (``BNActDropoutLinearFunction``); same arguments as ``bn_act_dropout``, and the same
    results, masks and running statistics as the two ops run one after the other.
    ``partials``: as ``bn_act_dropout``'s. With ``stats`` returns ``(y, y_partials)``: also the
    batch-norm partial statistics of y from the Linear's epilogue (``linear_stats``), for a
    batch norm that reads y next, or None where the GEMM made none; with ``stats_eps`` (that
    batch norm's eps) y's final statistics instead (a ``BatchStats``). ``handover``: as
    ``bn_act_dropout``'s; ``lin_handover``: the one the Linear shares with that next batch norm.

    Only where ``block_linear_applies`` (the caller asks first, and otherwise runs the two ops).
    """
    act = _kernel_activation(activation)
    p = _check_p(p)
    eps = float(eps)
    _check_bn(input, running_mean, running_var, weight, bias, eps)
    _validate(input, lin_weight, lin_bias, 0.0)  # the block's output: input's shape and dtype
    seed = _seed(input, None, p) if p > 0.0 else None
    mean, invstd, update = _given_stats(
        input, running_mean, running_var, momentum, eps, num_batches_tracked, partials
    )
    lin_eps = float(stats_eps) if stats and stats_eps is not None else None
    y, batch_mean, var, pmean, pm2 = BNActDropoutLinearFunction.apply(
        input, weight, bias, seed, lin_weight, lin_bias, eps, p, act, float(negative_slope),
        mean, invstd, stats, handover, lin_handover, lin_eps, update,
    )  # fmt: skip
    update_running_after(
        running_mean, running_var, mean, batch_mean, var, momentum, num_batches_tracked
    )
    if not stats:
        return y
    return y, stats_of(y, pmean, pm2, lin_eps)  # None: the TMA kernel ran the Linear


def _given_stats(input, running_mean, running_var, momentum, eps, nbt, partials):
    """``(mean, invstd, update)`` for a block's Function: statistics it takes as given, or
    None (computed there). ``partials``: a ``BatchStats`` (the Linear before made them; the
    running statistics, if tracked, await ``update`` = ``(running_mean, running_var, var,
    momentum, nbt)`` in the Function's forward launch), partial statistics to merge, or None
    (``eager_stats``; the running statistics updated on the way: ``update`` None)."""
    if isinstance(partials, BatchStats):
        update = None
        if running_mean is not None:
            update = (running_mean, running_var, partials.var, float(momentum), nbt)
        return partials.mean, partials.invstd, update
    mean, invstd = eager_stats(
        input, True, running_mean, running_var, float(momentum), eps, nbt, partials
    )
    return mean, invstd, None


# Below this many bytes of block output, keeping it costs less than recomputing it: the
# recomputation is one more launch per layer in backward, host time that a small (host-bound)
# step pays in full, for memory it does not need.
RECOMPUTE_MIN_BYTES = 1 << 20


def block_linear_applies(input, *tensors: Tensor | None) -> bool:
    """Whether ``bn_act_dropout_linear`` runs for ``input`` and the block's and the Linear's
    ``tensors``: the Triton path, no autocast (it would cast the Linear's operands), and a
    block output of at least ``RECOMPUTE_MIN_BYTES``."""
    return (
        isinstance(input, Tensor)
        and _at_least(input.numel() * input.element_size(), RECOMPUTE_MIN_BYTES)
        and not torch.is_autocast_enabled(input.device.type)
        and use_triton(input, *tensors)
    )


def _at_least(nbytes, threshold: int) -> bool:
    """``nbytes >= threshold``; while ``torch.export`` traces a symbolic batch, True only where
    it holds for every batch size: a guard on the comparison would bound the exported batch
    dimension (an unbounded ``Dim`` fails to export), and only memory, not results, depends
    on the answer. Under ``torch.compile`` the guard stays (a recompile at the threshold)."""
    if torch.compiler.is_exporting():
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return statically_known_true(nbytes >= threshold)
    return nbytes >= threshold


def act_dropout(
    input: Tensor, activation: str | None = None, negative_slope: float = 0.01, p: float = 0.5
) -> Tensor:
    """``dropout(act(input), p)`` in training mode, as one elementwise pass on the Triton path
    (the tail of ``Linear -> act -> Dropout`` with the Linear run without activation).

    ``input`` any shape (the logical row-major element index drives the mask, as
    ``fusedmlp.functional.dropout``); ``p = 0`` returns ``act(input)``.
    """
    act = _kernel_activation(activation)
    p = _check_p(p)
    if not isinstance(input, Tensor):
        raise TypeError(f"act_dropout: input must be a Tensor, got {type(input).__name__}")
    if p == 0.0 or input.numel() == 0 or not use_triton(input):
        y = apply_activation_torch(input, act, negative_slope)
        if p == 0.0 or input.numel() == 0:
            return y
        return F.dropout(y, p, True)
    if input.dtype not in _FLOATS:
        raise RuntimeError(
            f"act_dropout: input must be float16, bfloat16, float32 or float64, got {input.dtype}"
        )
    seed = _seed(input, None, p)
    if input.dim() == 0:
        return ActDropoutFunction.apply(input.reshape(1), seed, p, act, float(negative_slope)).view(
            ()
        )
    return ActDropoutFunction.apply(input, seed, p, act, float(negative_slope))


def linear_act_dropout(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    negative_slope: float = 0.01,
    p: float = 0.5,
) -> Tensor:
    """``dropout(act(linear(input, weight, bias)), p)`` in training mode: ``Linear -> act ->
    Dropout`` with the dropout in the Linear's epilogue on the Triton path (one launch).

    The same values, mask and gradients as ``act_dropout(linear(input, weight, bias), ...)``
    (the unfused chain, which runs instead under autocast, for a bias that ``F.linear``
    broadcasts, ``p = 0``, empty inputs, on the torch path, and in eager mode where the GEMM
    takes the TMA kernel: ``fusedmlp.kernels.linear.dropout_epilogue_applies``).
    """
    act = _kernel_activation(activation)
    p = _check_p(p)
    fused = (
        p > 0.0
        and isinstance(input, Tensor)
        and isinstance(weight, Tensor)
        and weight.dim() == 2
        and (bias is None or (isinstance(bias, Tensor) and bias.shape == (weight.shape[0],)))
        and not torch.is_autocast_enabled(input.device.type)
        and use_triton(input, weight, bias)
    )
    if fused:
        _validate(input, weight, bias, negative_slope)  # linear's checks, before any launch
        # rows of a multiple of 16 outputs (kernels.linear.DROPOUT_EPILOGUE_N: else it spills)
        N = weight.shape[0]
        fused = input.numel() > 0 and N > 0 and N % 16 == 0 and input.dtype in _FLOATS
    if fused and not torch.compiler.is_compiling():
        from ..kernels.linear import dropout_epilogue_applies

        # not where the TMA GEMM would run: it and a separate pass beat the pointer kernel
        # (traced graphs fuse: no data pointers to test)
        fused = dropout_epilogue_applies(input.reshape(-1, input.shape[-1]), weight)
    if not fused:
        return act_dropout(_linear(input, weight, bias, None), activation, negative_slope, p)
    seed = _seed(input, None, p)
    return LinearActDropoutFunction.apply(input, weight, bias, seed, p, act, float(negative_slope))


__all__ = [
    "ActDropoutFunction",
    "LinearActDropoutFunction",
    "BNActDropoutFunction",
    "BNActDropoutLinearFunction",
    "act_dropout",
    "bn_act_dropout",
    "bn_act_dropout_linear",
    "block_linear_applies",
    "linear_act_dropout",
]
