"""Batch normalization: custom ops, the autograd Function and the backend dispatch.

Custom ops (names prefixed ``batchnorm_``):
- ``fusedmlp::batchnorm_fwd``  (functional) -> y, mean, invstd, unbiased var (or y alone, with
  the batch statistics given); its autograd formula, ``BatchNormFunction``'s backward itself
  (``batchnorm_backward``), serves exported programs, which hold the op outside the Function
- ``fusedmlp::batchnorm_bwd``  (functional) -> dx, dweight, dbias
- ``fusedmlp::batchnorm_update_running`` mutates ``running_mean``/``running_var`` in place, no
  autograd (torch refuses autograd formulas on mutating ops); called after the differentiable
  op with the batch statistics it returned.
- ``fusedmlp::batchnorm_stats`` -> mean, invstd, unbiased var, and mutates ``running_mean``/
  ``running_var`` (the statistics kernel updates them): in eager mode, before the
  differentiable op, which then takes the statistics as given: one launch less per training
  forward than statistics inside the op plus ``batchnorm_update_running``. Traced graphs keep
  that pair (the differentiable op stays free of mutation either way).

``batch_norm`` has ``torch.nn.functional.batch_norm``'s signature and semantics; the torch
backend is ``F.batch_norm`` itself.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._prims_common import suggest_memory_format

from ..backend import TRITON_DTYPES, acc_dtype, float_arg, use_triton
from ._custom_op import caller, custom_op, plain_eager
from ._once import grads_batched, once_differentiable

# The running statistics a training batch norm updates in place. Its custom ops declare them
# mutated (for torch.compile) but leave their version counters as torch's batch norm does:
# parameters and statistics in one storage (a flat buffer) then keep a saved weight valid.
RUNNING_STATS = ("running_mean", "running_var")

# ----------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------


@custom_op("fusedmlp::batchnorm_fwd", mutates_args=())
def _batchnorm_fwd(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    eps: float,
    mean: Tensor | None,
    invstd: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, invstd, var)``; ``running_mean``/``running_var`` are read in eval mode. In
    training, ``mean``/``invstd`` (both or neither): the batch statistics of this x, already
    computed (``batchnorm_stats``): no statistics kernels, and the three statistics outputs
    are empty."""
    from ..kernels import batchnorm as K

    given = None if mean is None else (mean, invstd)
    y, *stats = K.batch_norm_forward(
        x, weight, bias, running_mean, running_var, training, eps, given
    )
    if given is not None:
        stats = [x.new_empty(0, dtype=acc_dtype(x.dtype)) for _ in range(3)]  # distinct tensors
    return y, *stats


@_batchnorm_fwd.register_fake
def _(x, weight, bias, running_mean, running_var, training, eps, mean, invstd):
    n = x.shape[1] if training and mean is None else 0
    stats = [x.new_empty(n, dtype=acc_dtype(x.dtype)) for _ in range(3)]
    return (torch.empty_like(x), *stats)


@custom_op("fusedmlp::batchnorm_stats", mutates_args=RUNNING_STATS, unversioned=RUNNING_STATS)
def _batchnorm_stats(
    x: Tensor,
    eps: float,
    running_mean: Tensor,
    running_var: Tensor,
    momentum: float,
    num_batches_tracked: Tensor | None,
    pmean: Tensor | None = None,
    pm2: Tensor | None = None,
    rows: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(mean, invstd, var)``: the batch statistics of ``x`` (no autograd: the forward op
    takes them as given), and ``running_mean``/``running_var`` (contiguous) updated in place
    with ``momentum`` (``num_batches_tracked``: the cumulative average) by the kernel that
    writes the statistics, as ``batchnorm_update_running`` would.

    With ``pmean``/``pm2`` (``[cdiv(N, rows), C]``: each split's mean and M2, made by the
    Linear that produced x, ``fusedmlp::linear_stats_fwd``) they are merged instead: one
    launch, no pass over x."""
    from ..kernels import batchnorm as K
    from ..kernels.launch import on_device

    running = (running_mean, running_var, momentum, num_batches_tracked)
    if pmean is not None and pm2 is not None:
        return K.batch_norm_stats_merge(pmean, pm2, rows, x.shape[0], eps, running)
    with on_device(x):  # x's GPU on a multi-GPU machine, as the forward op's launches
        return K.batch_norm_stats(x, eps, running)


@_batchnorm_stats.register_fake
def _(x, eps, running_mean, running_var, momentum, num_batches_tracked, pmean=None, pm2=None,
      rows=0):  # fmt: skip
    return tuple(x.new_empty(x.shape[1], dtype=acc_dtype(x.dtype)) for _ in range(3))


class BatchStats(NamedTuple):
    """A batch's final statistics per channel (``[C]`` each, the accumulation dtype), made by
    the Linear that produced the batch norm's input, in its GEMM's epilogue
    (``fusedmlp.autograd.linear.linear_stats`` with ``eps``): the mean, ``invstd = 1 /
    sqrt(biased var + eps)`` and the unbiased variance. The running statistics are not yet
    updated: the batch norm's forward pass does that (``fusedmlp.kernels.fused_block``'s
    ``update``)."""

    mean: Tensor
    invstd: Tensor
    var: Tensor


def eager_stats(
    input: Tensor,
    training: bool,
    running_mean,
    running_var,
    momentum,
    eps,
    nbt,
    partials: tuple | None = None,
):
    """``(mean, invstd)`` of ``input``'s batch, with the running statistics updated in place
    on the way (``batchnorm_stats``: one launch less than the forward op's statistics and a
    separate update), or ``(None, None)``: then the forward op computes the statistics and the
    caller runs ``batchnorm_update_running``. In eager mode only, for training with tracked,
    contiguous running statistics: a traced graph keeps the update after the differentiable
    op. ``nbt``: ``num_batches_tracked`` (already incremented) for the cumulative average.
    ``partials``: ``(pmean, pm2, rows)`` of ``input`` from the Linear that produced it
    (``fusedmlp.autograd.linear.linear_stats``): merged instead of a statistics pass over
    ``input``."""
    if (
        not training
        or running_mean is None
        or running_var is None
        or not running_mean.is_contiguous()
        or not running_var.is_contiguous()
        or torch.compiler.is_compiling()
    ):
        return None, None
    x = input.detach() if input.requires_grad else input  # the op has no autograd
    mean, invstd, _ = batchnorm_stats(
        x, float(eps), running_mean, running_var, momentum, nbt, *(partials or ())
    )
    return mean, invstd


def update_running_after(running_mean, running_var, mean, batch_mean, var, momentum, nbt):
    """After a training forward's differentiable op: the running-statistics update that
    ``eager_stats`` did not do (``mean``: its result, None when it did not), from the
    ``batch_mean`` and ``var`` the op returned; nothing without running statistics."""
    if running_mean is not None and mean is None:
        batchnorm_update_running(running_mean, running_var, batch_mean, var, float(momentum), nbt)


@custom_op("fusedmlp::batchnorm_bwd", mutates_args=())
def _batchnorm_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    stat: Tensor,
    training: bool,
    eps: float,
    need_dx: bool,
    need_dweight: bool,
    need_dbias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from ..kernels import batchnorm as K

    dx, dw, db = K.batch_norm_backward(
        dy, x, weight, mean, stat, training, eps, need_dx, need_dweight, need_dbias
    )
    return grads_or_empty(x, dx, dw, db)


def grads_or_empty(x: Tensor, dx, dw, db) -> tuple[Tensor, Tensor, Tensor]:
    """A backward op's ``(dx, dweight, dbias)`` with an empty tensor (x's dtype and device) for
    each gradient not computed (custom-op schemas return tensors, not None)."""
    empty = x.new_empty(0)
    return (
        dx if dx is not None else empty,
        dw if dw is not None else empty.clone(),
        db if db is not None else empty.clone(),
    )


@_batchnorm_bwd.register_fake
def _(dy, x, weight, mean, stat, training, eps, need_dx, need_dweight, need_dbias):
    C = x.shape[1]
    pdtype = weight.dtype if weight is not None else acc_dtype(x.dtype)
    return (
        torch.empty_like(x) if need_dx else x.new_empty(0),
        x.new_empty(C, dtype=pdtype) if need_dweight and weight is not None else x.new_empty(0),
        x.new_empty(C, dtype=pdtype) if need_dbias else x.new_empty(0),
    )


@custom_op(
    "fusedmlp::batchnorm_update_running", mutates_args=RUNNING_STATS, unversioned=RUNNING_STATS
)
def _batchnorm_update_running(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    momentum: float,
    num_batches_tracked: Tensor | None,
) -> None:
    from ..kernels import batchnorm as K

    K.batch_norm_update_running(running_mean, running_var, mean, var, momentum, num_batches_tracked)


@_batchnorm_update_running.register_fake
def _(running_mean, running_var, mean, var, momentum, num_batches_tracked):
    return None


_batchnorm_fwd_call = caller(_batchnorm_fwd)
_batchnorm_bwd_call = caller(_batchnorm_bwd)
batchnorm_update_running = caller(_batchnorm_update_running)
batchnorm_stats = caller(_batchnorm_stats)


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------


def _save_batchnorm(ctx, inputs, output) -> None:
    """What ``batchnorm_backward`` reads, from ``batchnorm_fwd``'s inputs and outputs: x,
    weight and, in training, the batch mean and invstd (given, or the op's), else the running
    statistics; the non-tensor arguments. The op's statistics outputs are not differentiable."""
    x, weight, bias, running_mean, running_var, training, eps, mean, invstd = inputs
    y, mean_out, invstd_out, var = output
    if mean is None:
        mean, invstd = mean_out, invstd_out
    if training:
        ctx.save_for_backward(x, weight, mean, invstd)
    else:
        ctx.save_for_backward(x, weight, running_mean, running_var)
    ctx.training = training
    ctx.eps = eps
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(mean_out, invstd_out, var)
    # No zero tensors for the gradients of the statistics (never read): fewer allocations and
    # fill launches per backward. The output's own gradient is None only when it got none.
    ctx.set_materialize_grads(False)


@once_differentiable("batch_norm", batched=True)
def batchnorm_backward(ctx, dy, *_grads_of_statistics):
    """The backward of ``BatchNormFunction`` and of ``batchnorm_fwd``'s autograd formula (what
    ``_save_batchnorm`` saved): ``(dx, dweight, dbias)`` as asked for by
    ``ctx.needs_input_grad``, None for the other inputs (the given batch statistics too: the
    gradient through them, functions of x, is part of dx)."""
    n_inputs = len(ctx.needs_input_grad)
    if dy is None:
        return (None,) * n_inputs
    x, weight, mean, stat = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    dx = dw = db = None
    if grads_batched((dy,)):
        dx, dw, db = _batched_grads(dy, x, weight, mean, stat, ctx.training, ctx.eps)
    elif need_dx or need_dw or need_db:
        dx, dw, db = _batchnorm_bwd_call(
            dy, x, weight, mean, stat, ctx.training, ctx.eps, need_dx, need_dw, need_db
        )
    return affine_grads(ctx, dx, dw, db, n_inputs)


class BatchNormFunction(torch.autograd.Function):
    """y = batch_norm(x); also returns the batch mean and unbiased variance (non-differentiable,
    empty in eval mode and when given) for the running-statistics update. ``mean``/``invstd``:
    the batch statistics of x when ``eager_stats`` computed them (training), else None. The
    backward is the same either way: they are functions of x, and it differentiates them."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, eps, mean, invstd):
        inputs = (x, weight, bias, running_mean, running_var, training, eps, mean, invstd)
        output = _batchnorm_fwd_call(*inputs)
        _save_batchnorm(ctx, inputs, output)
        y, mean_out, _, var = output
        return y, mean_out, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        return batchnorm_backward(ctx, dy, _dmean, _dvar)  # also batchnorm_fwd's formula


# Used only where batchnorm_fwd is called with an input that requires grad in grad mode outside
# BatchNormFunction: a ``torch.export``ed program (export inlines the Function: its graph holds
# the op itself), ``ep.module()``. The Function calls the op in its forward, where grad mode is
# off, and plain eager calls run the implementation itself (``_custom_op``). batchnorm_stats
# and batchnorm_update_running mutate the running statistics (torch refuses formulas there):
# their results are never differentiated (batchnorm_stats reads a detached x).
_batchnorm_fwd.register_autograd(batchnorm_backward, setup_context=_save_batchnorm)


def _batched_grads(dy, x, weight, mean, stat, training: bool, eps: float):
    """``(dx, dweight, dbias)`` in torch's ops, which vmap batches (batched gradients: a batched
    tensor has no storage for the kernels). ``stat``: the batch's invstd in training, else the
    running variance. In fp32 for 16-bit inputs, as the kernels."""
    acc = acc_dtype(x.dtype)
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    dims = [d for d in range(x.dim()) if d != 1]
    invstd = stat.to(acc) if training else torch.rsqrt(stat.to(acc) + eps)
    xhat = (x.to(acc) - mean.to(acc).view(shape)) * invstd.view(shape)
    g = dy.to(acc)
    db = g.sum(dims)
    dw = (g * xhat).sum(dims)
    scale = invstd if weight is None else invstd * weight.to(acc)
    if training:  # the batch statistics depend on x: their terms
        count = x.numel() // x.shape[1]
        g = g - (db.view(shape) + xhat * dw.view(shape)) / count
    dx = (g * scale.view(shape)).to(x.dtype)
    pdtype = weight.dtype if weight is not None else acc
    return dx, dw.to(pdtype), db.to(pdtype)


def affine_grads(ctx, dx, dw, db, n_inputs: int) -> tuple:
    """A backward's return for inputs (x, weight, bias, then ``n_inputs - 3`` non-tensors): the
    gradients asked for (dbias cast to the bias dtype), None elsewhere."""
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    if need_db and db.dtype != ctx.bias_dtype:
        db = db.to(ctx.bias_dtype)
    return (
        dx if need_dx else None,
        dw if need_dw else None,
        db if need_db else None,
        *(None,) * (n_inputs - 3),
    )


# ----------------------------------------------------------------------------------------------
# validation (torch's exception types and messages, before any launch)
# ----------------------------------------------------------------------------------------------

_FLOATS = TRITON_DTYPES


def _verify_batch_size(size) -> None:
    size_prods = size[0]
    for i in range(len(size) - 2):
        size_prods *= size[i + 2]
    if size_prods == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}"
        )


def _check_types(input, running_mean, running_var, weight, bias, training) -> None:
    """torch's argument parser: TypeError for a non-Tensor input, a per-channel argument that
    is neither a Tensor nor None, and a ``training`` that is not a bool (an int, a numpy bool,
    a tensor are refused). Runs before the backend dispatch reads any attribute of them."""
    if not isinstance(input, Tensor):
        raise TypeError(
            f"batch_norm(): argument 'input' (position 1) must be Tensor, not {type(input).__name__}"
        )
    for name, t in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(
                f"batch_norm(): argument '{name}' must be Tensor, not {type(t).__name__}"
            )
    if not isinstance(training, bool):
        raise TypeError(
            f"batch_norm(): argument 'training' (position 6) must be bool, not "
            f"{type(training).__name__}"
        )


def _check_python(input, training, eps) -> None:
    """``F.batch_norm``'s own Python checks, in its order, before anything else (its argument
    parser's TypeErrors come after them: a non-tensor input in training raises what its
    ``input.size()`` raises, an AttributeError for a list)."""
    if training:
        _verify_batch_size(input.size())
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def _check_low_rank(input, running_mean, running_var, weight, bias, training) -> None:
    """torch's errors for a non-empty input of fewer than 2 dims: its C++ reads a channel count
    of 0 there, checks the per-channel tensors against it in its usual order, then fails to
    index dim 1."""
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is None:
            if not training:
                raise RuntimeError(f"{name} must be defined in evaluation mode")
        elif t.numel() != 0:
            raise RuntimeError(f"{name} should contain 0 elements not {t.numel()}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.numel() != 0:
            raise RuntimeError(f"{name} should contain 0 elements not {t.numel()}")
    raise IndexError(
        f"Dimension out of range (expected to be in range of [{-max(input.dim(), 1)}, "
        f"{max(input.dim(), 1) - 1}], but got 1)"
    )


def _check(input, running_mean, running_var, weight, bias, training, momentum, eps) -> None:
    """The Triton path's checks after ``_check_python`` and ``_check_types``, in torch's order:
    its argument parser (momentum), then its C++ (``check_params``)."""
    if not float_arg(momentum):
        raise TypeError(
            f"batch_norm(): argument 'momentum' must be float, not {type(momentum).__name__}"
        )
    if input.dim() < 2:
        _check_low_rank(input, running_mean, running_var, weight, bias, training)
    check_params(
        "batch_norm", input, running_mean, running_var, weight, bias, training,
        row_stats=_cuda_takes_row_stats(input, weight, bias),
    )  # fmt: skip


def _cuda_takes_row_stats(input: Tensor, weight, bias) -> bool:
    """Whether torch's batch norm on ``input``'s device takes running statistics of shape
    ``[1, ..., 1, C]`` (as the ``[C]`` they hold) where its CPU kernel refuses them (not 1-D):
    its native CUDA kernels for a contiguous 2-D input (the channels-last kernels) broadcast
    them with the ``[C]`` batch statistics in their TensorIterators (a warning, for the
    resized statistics output), and read the per-channel tensors as flat, contiguous arrays.
    Its other CUDA paths (an input of another layout: an assertion that they are 1-D; 3-D and
    more: cuDNN or per-plane kernels) are not followed: the 1-D check stays there."""
    return (
        input.is_cuda
        and input.dim() == 2
        and input.is_contiguous()
        and (weight is None or weight.is_contiguous())
        and (bias is None or bias.is_contiguous())
    )


def check_input_dtype(op: str, input: Tensor) -> None:
    if input.dtype not in _FLOATS:
        # torch's batch norm raises NotImplementedError for every other dtype (its dispatch
        # has no kernel for it)
        raise NotImplementedError(
            f"{op}: expected input of a floating dtype (float32, float16, bfloat16, "
            f"float64), got {input.dtype}"
        )


def check_params(
    op: str,
    input,
    running_mean,
    running_var,
    weight,
    bias,
    training: bool = True,
    row_stats: bool = False,
) -> None:
    """The per-channel tensors (each may be None) against ``input`` [N, C, ...], in torch's
    order: C elements each (and, in eval mode, running statistics defined), running statistics
    that do not require grad (in grad mode), the input's device; then, in training, both
    running statistics or neither; a floating input; each tensor in the input's dtype (fp32
    also beside fp16/bf16); 1-D running statistics (``row_stats``: ``[1, ..., 1, C]`` ones
    too, as torch's CUDA kernels take them: ``_cuda_takes_row_stats``); and, in training,
    running statistics that the update can write (``_check_writable``). Messages are
    prefixed with ``op``."""
    C = input.shape[1]
    grad_mode = torch.is_grad_enabled()
    named = (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    )
    for i, (name, t) in enumerate(named):
        if t is None:
            if i < 2 and not training:
                raise RuntimeError(f"{name} must be defined in evaluation mode")
            continue
        if t.numel() != C:
            raise RuntimeError(f"{name} should contain {C} elements not {t.numel()}")
        if i < 2 and grad_mode and t.requires_grad:
            # torch's autograd refuses running statistics that require grad (even in training)
            raise RuntimeError(
                f"The function 'native_batch_norm' is not differentiable with respect to "
                f"argument '{name}'. This input cannot have requires_grad True."
            )
        if t.device != input.device:
            raise RuntimeError(
                f"{op}: expected all tensors to be on the same device, but input is on "
                f"{input.device} and {name} on {t.device}"
            )
    if training and (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    check_input_dtype(op, input)
    allowed = {input.dtype}
    if input.dtype in (torch.float16, torch.bfloat16):
        allowed.add(torch.float32)
    for name, t in named:
        if t is not None and t.dtype not in allowed:
            raise RuntimeError(
                f"{op}: expected {name} to have dtype "
                f"{' or '.join(sorted(map(str, allowed)))} (input is {input.dtype}), got {t.dtype}"
            )
    for name, t in named[:2]:
        if t is not None and t.dim() != 1:  # torch reads them 1-D (weight/bias: any shape)
            if not (row_stats and t.shape[-1] == C):  # [1, ..., 1, C]: C elements
                raise RuntimeError(f"{op}: expected {name} to be 1-D, got {t.dim()} dims")
    if training and running_mean is not None:
        if running_mean.dim() != 1 or running_var.dim() != 1:  # [1, ..., 1, C]: as the [C]
            running_mean, running_var = running_mean.view(-1), running_var.view(-1)
        _check_writable(op, running_mean, running_var)


_OVERLAP = (
    "unsupported operation: more than one element of the written-to tensor refers to a single "
    "memory location. Please clone() the tensor before performing the operation."
)


def _check_writable(op: str, running_mean: Tensor, running_var: Tensor) -> None:
    """Running statistics (1-D, non-empty) that a training batch norm can update in place,
    before any launch: none whose elements share memory (an expanded, stride-0 view, which
    torch's own in-place ops refuse and the kernels' update could not write back), and no
    memory shared between the two (the same tensor, overlapping views of one buffer: torch
    updates them one after the other there, the kernels at once: other numbers). Views of one
    flat buffer side by side are fine. Costs two stride tests and an address comparison;
    plain eager tensors only (traced and fake tensors have no addresses)."""
    if not (plain_eager() and type(running_mean) is Tensor and type(running_var) is Tensor):
        return
    for t in (running_mean, running_var):
        if not t.is_contiguous() and torch._debug_has_internal_overlap(t) == 1:
            raise RuntimeError(_OVERLAP)
    a0, b0 = running_mean.data_ptr(), running_var.data_ptr()
    ea, eb = running_mean.element_size(), running_var.element_size()
    sa, sb = running_mean.stride(0) * ea, running_var.stride(0) * eb
    a1 = a0 + (running_mean.numel() - 1) * sa + ea
    b1 = b0 + (running_var.numel() - 1) * sb + eb
    if a1 <= b0 or b1 <= a0:  # disjoint byte ranges: the usual case
        return
    # interleaved or overlapping views: compare the elements' byte ranges (a0 + i * sa, + ea)
    starts_a = a0 + torch.arange(running_mean.numel(), dtype=torch.int64) * sa
    starts_b = b0 + torch.arange(running_var.numel(), dtype=torch.int64) * sb
    # for each element of running_var, the last element of running_mean starting before its end
    k = torch.searchsorted(starts_a, starts_b + eb) - 1
    hit = (k >= 0) & (starts_a[k.clamp(min=0)] + ea > starts_b)
    if bool(hit.any()):
        raise RuntimeError(
            f"{op}: running_mean and running_var share memory, which the running-statistics "
            "update writes in place: pass separate tensors (clone() one of them)"
        )


# ----------------------------------------------------------------------------------------------
# public dispatch
# ----------------------------------------------------------------------------------------------


def torch_batch_norm(
    input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked
) -> Tensor:
    """``F.batch_norm``; ``num_batches_tracked`` (``momentum=None`` of the modules): a cumulative
    average, factor ``1 / num_batches_tracked`` (read on the host in eager mode; traced, a
    device tensor: ``_traced_cumulative_batch_norm``)."""
    # torch 2.13's CPU backward of a (N, C) or (N, C, 1) input reads a non-contiguous weight,
    # and in eval mode non-contiguous running statistics, as if contiguous: a right output and
    # wrong gradients. Contiguous copies of those it only reads (training updates the buffers).
    if weight is not None:
        weight = weight.contiguous()
    if not training:
        if running_mean is not None:
            running_mean = running_mean.contiguous()
        if running_var is not None:
            running_var = running_var.contiguous()
    if num_batches_tracked is not None:
        if running_mean is None and running_var is None:
            momentum = 0.0  # no running statistics to update: the factor is unused
        elif torch.compiler.is_compiling() and training:
            return _traced_cumulative_batch_norm(
                input, running_mean, running_var, weight, bias, eps, num_batches_tracked
            )
        else:
            momentum = 1.0 / float(num_batches_tracked)
    return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _traced_cumulative_batch_norm(
    input, running_mean, running_var, weight, bias, eps, num_batches_tracked
) -> Tensor:
    """Training-mode ``F.batch_norm`` with the cumulative average's factor
    ``f = 1 / num_batches_tracked`` kept on the device, for traced code: ``float()`` of the
    traced counter is a data-dependent float that ``torch.compile(fullgraph=True)`` and
    ``torch.export`` refuse to guard on (torch's own module fails there). ``F.batch_norm`` with
    momentum 1 leaves the batch's statistics (unbiased variance) in zeroed stand-ins for the
    buffers (the batch norm's autograd may save what it gets: the buffers themselves are not
    passed); each buffer is then ``batch * f + old * (1 - f)``, torch's update formula."""
    batch_mean = None if running_mean is None else torch.zeros_like(running_mean)
    batch_var = None if running_var is None else torch.zeros_like(running_var)
    out = F.batch_norm(input, batch_mean, batch_var, weight, bias, True, 1.0, eps)
    f = 1.0 / num_batches_tracked.to(torch.float64)
    with torch.no_grad():
        for t, batch in ((running_mean, batch_mean), (running_var, batch_var)):
            if t is not None:
                t.copy_(batch * f.to(t.dtype) + t * (1.0 - f).to(t.dtype))
    return out


def _batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    num_batches_tracked: Tensor | None,
) -> Tensor:
    """``batch_norm`` with one addition for the modules: when ``num_batches_tracked`` is given
    (``momentum=None``), the running statistics are a cumulative average with factor
    ``1 / num_batches_tracked``, read on the device by the Triton path (no host sync)."""
    args = (input, running_mean, running_var, weight, bias, training, momentum, eps)
    _check_python(input, training, eps)
    _check_types(input, running_mean, running_var, weight, bias, training)
    if input.numel() == 0 or not use_triton(input, running_mean, running_var, weight, bias):
        # Empty input: nothing to launch; torch's own semantics (it returns before checking
        # the per-channel tensors, and multiplies by weight[0], adds bias[0])
        return torch_batch_norm(*args, num_batches_tracked)
    _check(*args)
    if running_mean is not None and (running_mean.dim() != 1 or running_var.dim() != 1):
        # [1, ..., 1, C] (torch on CUDA: _cuda_takes_row_stats): views, updated in place
        running_mean, running_var = running_mean.view(-1), running_var.view(-1)
    x = input
    if x.dim() > 4:  # BatchNorm3d-like: fold the trailing spatial dims (a view when it can)
        x = x.flatten(3)
    mean, invstd = eager_stats(
        x, training, running_mean, running_var, float(momentum), eps, num_batches_tracked
    )
    y, batch_mean, var = BatchNormFunction.apply(
        x,
        weight,
        bias,
        None if training else running_mean,
        None if training else running_var,
        bool(training),
        float(eps),
        mean,
        invstd,
    )
    if training:
        update_running_after(
            running_mean, running_var, mean, batch_mean, var, momentum, num_batches_tracked
        )
    if y.shape != input.shape:
        y = y.reshape(input.shape)
    return _like_torchs_output(y, input, weight, bias, running_mean, running_var, training, eps)


def _like_torchs_output(y, input, weight, bias, running_mean, running_var, training, eps):
    """``y`` (the kernels write it ``empty_like`` x) in the layout of torch's batch norm output
    on ``input``'s device. Its CPU kernel, cuDNN and MIOpen write it contiguous in the input's
    suggested memory format (channels_last kept, a permuted dense layout not); its native CUDA
    kernels (``batch_norm_cuda``: 2-D inputs, and any input cuDNN does not take: bf16, no
    affine parameters, ...) write it ``empty_like(input)``: a dense input's strides kept (a
    transposed 2-D input's too), another input's contiguous in its suggested format."""
    fmt = suggest_memory_format(input)
    # where the input is contiguous in its suggested format both layouts agree: no choice
    if (
        input.is_cuda
        and not input.is_contiguous(memory_format=fmt)
        and _torch_cuda_native(input, weight, bias, running_mean, running_var, training, eps)
    ):
        if y.dim() == input.dim() and y.stride() == input.stride():
            return y  # the kernels' y is empty_like(input) (the usual case, x is input)
        target = torch.empty_like(input, device="meta").stride()
        return y if y.stride() == target else torch.empty_like(input).copy_(y)
    return y if y.is_contiguous(memory_format=fmt) else y.contiguous(memory_format=fmt)


def _torch_cuda_native(input, weight, bias, running_mean, running_var, training, eps) -> bool:
    """Whether torch's batch norm runs its native CUDA kernels on ``input`` (not cuDNN, not
    MIOpen), by torch's own selection (``_select_batch_norm_backend``, its condition in
    ``_batch_norm_impl_index``); asked only for an input on a GPU that is not already contiguous
    in its suggested memory format (where both layouts agree, nothing to choose)."""
    if input.dim() < 3 or weight is None or bias is None:
        return True  # cuDNN and MIOpen take 3-D and more, with both affine parameters
    select = getattr(torch._C, "_select_batch_norm_backend", None)
    if select is None:  # an older torch: its condition (cuDNN builds)
        return not (
            torch.backends.cudnn.is_available()
            and torch.backends.cudnn.enabled
            and input.dtype != torch.bfloat16
            and weight.dtype != torch.bfloat16
            and (input.dtype != torch.float16 or weight.dtype == torch.float32)
            and input.shape[0] <= (880801 if training else 65535)
            and input.numel() < 2**31 - 1
        )
    # no running statistics (training): any defined tensors stand for them there, the
    # selection reads only whether they are defined
    rm = running_mean if running_mean is not None else weight
    rv = running_var if running_var is not None else weight
    backend = select(input, weight, bias, rm, rv, bool(training), float(eps))
    return backend == torch._C._BatchNormBackend.Native


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``torch.nn.functional.batch_norm`` on fusedmlp's kernels (same signature and semantics).

    Normalizes each channel (dim 1) of ``input`` ([N, C], [N, C, L], [N, C, H, W]; any strides,
    channels_last kept) over the batch and spatial dims: with the batch statistics when
    ``training`` (and then updates ``running_mean``/``running_var`` in place, when given, with
    ``momentum`` and the unbiased variance), otherwise with the running statistics. fp16/bf16
    inputs may have fp32 parameters/statistics; the output has the input's dtype.
    """
    return _batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps, None
    )


__all__ = ["BatchNormFunction", "batch_norm"]
