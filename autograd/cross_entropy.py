"""Fused softmax + negative log-likelihood (cross-entropy): custom ops, autograd Function and
backend dispatch.

``cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
reduction="mean", label_smoothing=0.0)`` and ``nll_loss(...)`` have torch.nn.functional's
signatures and semantics.

Triton path (class-index targets, ``input`` [N, C] or [C], fp32/fp16/bf16 logits; fp64 only
under the 'triton' backend and without label smoothing):

- ``torch.ops.fusedmlp.cross_entropy_fwd`` streams every row of logits once for the loss and,
  when the logits require grad, a second time for the gradient of the loss, written into its
  own buffer (the caller's logits are never written). The 'mean' normaliser (sum of w[y] over
  the non-ignored rows) is a device scalar: no ``.item()``. For fp32/bf16 logits it is folded
  into the saved gradient; for fp16 it is applied in the backward, so that a small ``1/N`` does
  not underflow fp16 before a loss scale (``GradScaler``) multiplies it back up.
- The backward (``cross_entropy_bwd_inplace``) only multiplies that buffer by ``grad_output``
  (one value per row for reduction='none'), in place, skipping on the device every row whose
  multiplier is exactly 1. When the graph is retained (``retain_graph=True``), outside an
  autograd graph task, or under ``torch.compile``, the functional ``cross_entropy_bwd`` writes
  a new tensor instead, so a second backward sees the untouched buffer.
- Out-of-range targets raise ``IndexError`` (as torch on the CPU) from inside
  ``cross_entropy_fwd``'s implementation, not from a Python branch in the traced path. Cost on
  a GPU: a count of the out-of-range and the ignored targets, made by the one-program 'mean'
  or 'sum' reduction of up to 65,536 fp32 row losses in its loop over the rows (no launch of
  its own), else by one small launch over the N targets (``count_bad_targets``; beyond 65,536
  targets a second one zeroes its counters), and ONE device-to-host copy of the two counts per
  forward, into pinned memory. The host waits for that copy only after it has queued the loss
  kernels (before it, or with it): a synchronisation with the work queued before the check
  (e.g. the model's forward), during which the GPU goes on to the loss kernels instead of
  waiting for the host to launch them. (Waiting before launching left the GPU idle while the host launched them: the
  likely cause of the 0.07-0.1 ms between the event and kernel times of a 16K x 32K bf16
  forward and backward, 0.8-0.9 ms, on the H100 and H200.) An out-of-range target then
  raises, and the queued results, which such rows leave NaN, are dropped. The same counts
  tell whether any row is ignored: a 'mean' without class weights and no ignored row takes
  1/N, known on the host, as the gradient's scale (no launch) and N as the loss's divisor (the
  same bits as the device normaliser). Its kernels are queued before the counts arrive, so
  that choice is made ahead: the host's 1/N when the last such forward had no ignored row
  (``_NO_IGNORED_LAST``), else the device normaliser. A wrong guess (an ignored row after
  forwards without) launches the loss kernels again, with the device normaliser.
  The check is skipped during CUDA-graph capture (a sync is illegal there: the kernel then
  writes a NaN loss and an ignored row's gradient for such a row) and when ``CHECK_TARGETS`` is set
  to False; the normaliser is then computed on the device.

Double backward raises (``_once.once_differentiable``). The op saves no tensor that carries the
logits' graph, so unless the incoming gradient carries one, the ``create_graph=True`` backward
itself raises.

``cross_entropy_fwd`` carries an autograd formula, the Function's backward itself
(``cross_entropy_backward``), for exported programs, which hold the op outside the Function.
An op exported while its logits did not require grad writes no gradient buffer
(``compute_grad`` False): its formula saves the logits and makes the buffer in backward (one
more ``cross_entropy_fwd``).

Batched gradients (vmap over the backward: ``torch.autograd.grad(..., is_grads_batched=True)``,
``jacobian(vectorize=True)``, ``gradcheck(check_batched_grad=True)``): the saved gradient is
scaled with torch's ops, which vmap batches (a batched ``grad_output`` has no storage).

Under ``torch.autocast`` fp16/bf16 logits are cast to fp32 first, as autocast does for torch's
cross_entropy (the loss is then fp32).

Torch path (and every input the kernel does not cover: probability targets, [N, C, d1, ...]
inputs, weights that require grad or differ in dtype, empty batches, fp64 logits with label
smoothing, an ``ignore_index`` that is not an integer, for torch's TypeError, or not an int64,
for its ValueError): ``F.cross_entropy`` / ``F.nll_loss`` themselves. ``nll_loss`` always
runs torch's implementation (a gather of N values; there is nothing to fuse).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import _reduction as _Reduction

from ..backend import TRITON_DTYPES, acc_dtype, use_triton
from ._amp import fp32
from ._custom_op import caller, custom_op
from ._once import grads_batched, once_differentiable

_TRITON_DTYPES = TRITON_DTYPES
_REDUCTIONS = ("mean", "sum", "none")
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

# Set to False to skip the out-of-range target check (and its host synchronisation).
CHECK_TARGETS = True
# Whether the last checked 'mean' forward without class weights had no ignored row: the next
# one then queues its kernels with the host's 1/N before its own counts arrive (module doc).
# The first one takes the device normaliser: never launched twice.
_NO_IGNORED_LAST = [False]


def _folds_mean(dtype: torch.dtype) -> bool:
    # fp16 keeps the 'mean' normaliser out of the saved gradient (underflow, see module doc).
    return dtype != torch.float16


def _keep_graph() -> bool:
    """Whether the running backward retains the graph (True outside a graph task and while
    torch.compile traces: then the functional backward op is used)."""
    if torch.compiler.is_compiling():
        return True
    getter = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if getter is None:
        return True
    try:
        return bool(getter())
    except RuntimeError:
        return True


def _checks_targets(target: Tensor) -> bool:
    """Whether the targets are checked: not when empty, with ``CHECK_TARGETS`` off, or during a
    CUDA-graph capture (no synchronisation there)."""
    if not CHECK_TARGETS or target.numel() == 0:
        return False
    return not (target.is_cuda and torch.cuda.is_current_stream_capturing())


def _start_target_check(target: Tensor, num_classes: int, ignore_index: int):
    """Launch the count of the out-of-range and the ignored targets (``_checks_targets``) and
    start its copy to the host: ``_copy_counts``."""
    from ..kernels.cross_entropy import count_bad_targets

    return _copy_counts(count_bad_targets(target, num_classes, ignore_index))


def _copy_counts(counts: Tensor):
    """Start the copy of the target check's two counts to the host (pinned memory, no wait):
    what ``_finish_target_check`` takes."""
    if not counts.is_cuda:
        return counts, None
    host = torch.empty(2, dtype=torch.int64, pin_memory=True)
    host.copy_(counts, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(counts.device))
    return host, copied


def _finish_target_check(pending, target: Tensor, num_classes: int, ignore_index: int):
    """Wait for the counts ``_start_target_check`` started; raise IndexError for a target
    outside [0, C) other than ignore_index; return whether no row is ignored (None: not
    checked). The targets are compared one by one only to name an offending value."""
    if pending is None:
        return None
    counts, copied = pending
    if copied is not None:
        copied.synchronize()
    n_bad, n_ignored = counts.tolist()
    if not n_bad:
        return n_ignored == 0
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    value = int(target[bad][0])
    raise IndexError(f"Target {value} is out of bounds (expected 0 <= target < {num_classes}).")


# --------------------------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------------------------


@custom_op("fusedmlp::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, grad, factor)`` for logits [N, C] and int64 targets [N].

    loss: 0-d ('mean', 'sum') or [N] ('none') in the logits dtype. grad: [N, C] contiguous, in
    the logits dtype, such that d(loss)/d(logits) = ``grad * grad_output[:, None] * factor``;
    empty [0] when ``compute_grad`` is False (no gradient written). factor: 0-d (fp32, fp64 for
    fp64 logits): 1, or 1/sum(w[y]) for 'mean' with fp16 logits.
    Raises IndexError for out-of-range targets (see the module docstring for its cost).
    """
    n, c = logits.shape
    acc = acc_dtype(logits.dtype)
    w = weight.to(acc).contiguous() if weight is not None else None
    # The check's counts are copied to the host while the loss kernels are queued (module doc).
    # Where one program reduces the loss, it counts the targets too (no launch of the check's
    # own); its counts are then copied after it. A 'mean' without class weights and no ignored
    # row has N for its normaliser, known on the host: no launch makes it. The same bits:
    # N < 2^24 is exact in fp32, and 1/N rounded to fp32 on the host is the correctly rounded
    # quotient the device's reciprocal gives (fp64 logits keep the device normaliser: the
    # kernel's float argument is fp32).
    check = _checks_targets(target)
    in_loss = check and _reduced_on_one_program(reduction, acc, n, logits.device)
    pending = _start_target_check(target, c, ignore_index) if check and not in_loss else None
    host_n = reduction == "mean" and w is None and n < 1 << 24 and acc == torch.float32
    guess = host_n and check and _NO_IGNORED_LAST[0]
    result, counts = _loss_and_grad(logits, target, w, ignore_index, label_smoothing,
                                    reduction, compute_grad, guess, in_loss)  # fmt: skip
    if in_loss:
        pending = _copy_counts(counts)
    no_ignored = _finish_target_check(pending, target, c, ignore_index)
    if host_n and no_ignored is not None:
        _NO_IGNORED_LAST[0] = no_ignored
        if guess and not no_ignored:  # rows are ignored: again, with the device normaliser
            result = None  # its buffers back to the allocator first (the same stream)
            result, _ = _loss_and_grad(logits, target, w, ignore_index, label_smoothing,
                                       reduction, compute_grad, False, False)  # fmt: skip
    return result


def _reduced_on_one_program(reduction: str, acc: torch.dtype, n: int, device) -> bool:
    """Whether ``_loss_and_grad`` reduces the row losses in one program (``reduce_loss``)."""
    from ..kernels import cross_entropy as K

    return reduction != "none" and acc == torch.float32 and K.loss_on_one_program(n, device)


def _loss_and_grad(logits, target, w, ignore_index, label_smoothing, reduction, compute_grad,
                   host_n: bool, count: bool):  # fmt: skip
    """``(cross_entropy_fwd``'s result, the target check's counts or None)``: its launches.
    With ``host_n``, a 'mean' normalised by N (no row ignored), else by the device normaliser
    (or none: 'sum', 'none'). With ``count`` (only where ``_reduced_on_one_program``) the loss's
    reduction also counts the targets (``_checks_targets``'s counts)."""
    from ..kernels import cross_entropy as K

    n = logits.shape[0]
    acc = acc_dtype(logits.dtype)
    scale = None
    wsum = None
    inv = None
    factor = 1.0
    if host_n:
        inv = 1.0 / n
    elif reduction == "mean":
        valid = target != ignore_index
        if w is not None:
            wsum = torch.where(valid, w[target.clamp(0, logits.shape[1] - 1)], 0.0).sum()
        else:
            wsum = valid.sum(dtype=acc)
        # sum(w[y]) = 0 ('mean' of rows that all weigh 0, or all ignored): torch's loss and
        # gradients are NaN there (0/0), also when label smoothing makes the numerator nonzero.
        inv = torch.where(wsum == 0, math.nan, 1.0 / wsum)
    if reduction == "mean":
        if _folds_mean(logits.dtype):
            scale = inv
        else:
            factor = inv
    loss_rows, grad = K.cross_entropy_fwd(
        logits, target, w, ignore_index, label_smoothing, scale, compute_grad
    )
    if _reduced_on_one_program(reduction, acc, n, logits.device):
        # One launch: the sum, the division (by N, or by the device normaliser), the factor and
        # with ``count`` the target check's counts.
        divisor = None if reduction == "sum" else (float(n) if host_n else wsum)
        loss, factor_t, counts = K.reduce_loss(
            loss_rows,
            logits.dtype,
            divisor,
            factor if isinstance(factor, float) else None,
            (target, logits.shape[1], ignore_index) if count else None,
        )
        return (loss, grad, factor_t if factor_t is not None else factor), counts
    factor = (
        torch.full((), factor, device=logits.device, dtype=acc)
        if isinstance(factor, float)
        else factor
    )
    if host_n:
        # divided by a device N, not a Python number: CUDA's division by a host scalar
        # multiplies by its reciprocal (other bits than the device normaliser's quotient)
        loss = loss_rows.sum() / torch.full((), float(n), device=logits.device, dtype=acc)
    elif reduction == "mean":
        loss = torch.where(wsum == 0, math.nan, loss_rows.sum() / wsum)
    elif reduction == "sum":
        loss = loss_rows.sum()
    else:
        loss = loss_rows
    return (loss.to(logits.dtype), grad, factor), None


@cross_entropy_fwd.register_fake
def _(logits, target, weight, ignore_index, label_smoothing, reduction, compute_grad):
    n, c = logits.shape
    loss = logits.new_empty((n,) if reduction == "none" else ())
    grad = logits.new_empty((n, c) if compute_grad else (0,))
    factor = logits.new_empty((), dtype=acc_dtype(logits.dtype))
    return loss, grad, factor


@custom_op("fusedmlp::cross_entropy_bwd", mutates_args=())
def cross_entropy_bwd(
    grad: Tensor,
    grad_output: Tensor,
    factor: Tensor,
    target: Tensor,
    ignore_index: int,
    smoothing: bool,
) -> Tensor:
    """``grad * grad_output[:, None] * factor`` (grad_output 0-d or [N]) as a new tensor; rows
    whose target is ``ignore_index`` keep ``grad``'s row (0, or NaN) whatever the multiplier,
    as torch's; an infinite multiplier gives torch's NaN (``smoothing``: label smoothing > 0)."""
    from ..kernels import cross_entropy as K

    out = torch.empty_like(grad, memory_format=torch.contiguous_format)
    return K.cross_entropy_scale(grad, grad_output, factor, target, ignore_index, smoothing, out)


@cross_entropy_bwd.register_fake
def _(grad, grad_output, factor, target, ignore_index, smoothing):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


@custom_op("fusedmlp::cross_entropy_bwd_inplace", mutates_args=["grad"])
def cross_entropy_bwd_inplace(
    grad: Tensor,
    grad_output: Tensor,
    factor: Tensor,
    target: Tensor,
    ignore_index: int,
    smoothing: bool,
) -> None:
    """``grad *= grad_output[:, None] * factor`` in place; rows whose multiplier is exactly 1,
    and ignored rows, are not touched (decided on the device)."""
    from ..kernels import cross_entropy as K

    K.cross_entropy_scale(grad, grad_output, factor, target, ignore_index, smoothing)


@cross_entropy_bwd_inplace.register_fake
def _(grad, grad_output, factor, target, ignore_index, smoothing):
    return None


_cross_entropy_fwd = caller(cross_entropy_fwd)
_cross_entropy_bwd = caller(cross_entropy_bwd)
_cross_entropy_bwd_inplace = caller(cross_entropy_bwd_inplace)


def _scale_with_torch(grad, grad_output, factor, target, ignore_index, smoothing) -> Tensor:
    """``cross_entropy_bwd`` in torch's ops (which vmap batches): ``grad * grad_output[:, None]
    * factor``, ``grad``'s row on the ignored rows, NaN as the kernel's for an infinite
    multiplier."""
    acc = factor.dtype
    go = grad_output.to(acc)
    if go.dim() == 1:
        go = go.unsqueeze(1)
    f = go * factor
    g = grad.to(acc)
    nan_at = f.abs() == math.inf
    if not smoothing:
        cols = torch.arange(grad.shape[1], device=grad.device)
        nan_at = nan_at & (cols == target.unsqueeze(1))
    dx = torch.where(nan_at, math.nan, g * f)
    return torch.where((target == ignore_index).unsqueeze(1), g, dx).to(grad.dtype)


def _save_cross_entropy(ctx, inputs, output) -> None:
    """What ``cross_entropy_backward`` reads, from ``cross_entropy_fwd``'s inputs and outputs:
    the gradient buffer, its factor and the targets; or, where the op wrote no buffer
    (``compute_grad`` False: only in a graph exported while the logits did not require grad,
    differentiated through the op's autograd formula), the op's tensor inputs, from which the
    backward makes them."""
    logits, target, weight, ignore_index, label_smoothing, reduction, compute_grad = inputs
    loss, grad, factor = output
    ctx.ignore_index = ignore_index
    ctx.smoothing = label_smoothing > 0.0
    if compute_grad:
        ctx.save_for_backward(grad, factor, target)
        ctx.remake = None
    else:
        ctx.save_for_backward(logits, target, weight)
        ctx.remake = (label_smoothing, reduction)


def _gradient_buffer(ctx) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad, factor, target)`` saved by ``_save_cross_entropy``, the buffer made here (a
    second ``cross_entropy_fwd``, with ``compute_grad``) where the forward wrote none."""
    if ctx.remake is None:
        return ctx.saved_tensors
    logits, target, weight = ctx.saved_tensors
    label_smoothing, reduction = ctx.remake
    _, grad, factor = _cross_entropy_fwd(
        logits, target, weight, ctx.ignore_index, label_smoothing, reduction, True
    )
    return grad, factor, target


@once_differentiable("cross_entropy", batched=True)
def cross_entropy_backward(ctx, grad_output, *_grads_of_buffers):
    """The backward of ``CrossEntropyFunction`` and of ``cross_entropy_fwd``'s autograd formula
    (what ``_save_cross_entropy`` saved): the logits' gradient, None for the other inputs."""
    n_inputs = len(ctx.needs_input_grad)
    if grad_output is None or not ctx.needs_input_grad[0]:
        return (None,) * n_inputs
    grad, factor, target = _gradient_buffer(ctx)
    args = (grad, grad_output, factor, target, ctx.ignore_index, ctx.smoothing)
    if grads_batched((grad_output,)):
        dx = _scale_with_torch(*args)
    elif _keep_graph():
        dx = _cross_entropy_bwd(*args)
    else:  # the buffer is ours and dies with this graph: scale it in place
        _cross_entropy_bwd_inplace(*args)
        dx = grad
    return (dx, *(None,) * (n_inputs - 1))


class CrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy over logits [N, C] with class-index targets [N] on the Triton kernels."""

    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, label_smoothing, reduction):
        compute_grad = bool(ctx.needs_input_grad[0])
        inputs = (logits, target, weight, ignore_index, label_smoothing, reduction, compute_grad)
        output = _cross_entropy_fwd(*inputs)
        if compute_grad:
            _save_cross_entropy(ctx, inputs, output)
        return output[0]

    @staticmethod
    def backward(ctx, grad_output):
        return cross_entropy_backward(ctx, grad_output)  # also cross_entropy_fwd's formula


def _setup_cross_entropy_fwd(ctx, inputs, output) -> None:
    if ctx.needs_input_grad[2]:  # torch's error (its forward)
        raise RuntimeError(
            "The function 'cross_entropy_fwd' is not differentiable with respect to argument "
            "'weight'. This input cannot have requires_grad True."
        )
    _save_cross_entropy(ctx, inputs, output)
    _, grad, factor = output
    ctx.mark_non_differentiable(grad, factor)
    ctx.set_materialize_grads(False)


# Used only where cross_entropy_fwd is called with an input that requires grad in grad mode
# outside CrossEntropyFunction: a ``torch.export``ed program (export inlines the Function: its
# graph holds the op itself, with ``compute_grad`` as the logits were while exported),
# ``ep.module()``. The Function calls the op in its forward, where grad mode is off, and plain
# eager calls run the implementation itself (``_custom_op``).
cross_entropy_fwd.register_autograd(cross_entropy_backward, setup_context=_setup_cross_entropy_fwd)


# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------


def _triton_covers(input, target, weight, reduction, label_smoothing, ignore_index) -> bool:
    """Whether the kernel covers this call (otherwise torch's own implementation runs, and
    raises torch's errors for bad arguments)."""
    if not (isinstance(input, Tensor) and isinstance(target, Tensor)):
        return False
    if isinstance(ignore_index, Tensor):
        if ignore_index.dim() != 0 or ignore_index.is_floating_point():
            return False
        if ignore_index.is_complex() or ignore_index.dtype == torch.bool:
            return False  # torch refuses them (TypeError; RuntimeError for bool)
    elif not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        return False  # torch: "must be int, not float"
    elif not _INT64_MIN <= int(ignore_index) <= _INT64_MAX:
        return False  # torch's ValueError (int64 overflow), not a kernel's wrapped value
    if input.dtype not in _TRITON_DTYPES or target.dtype != torch.int64:
        return False
    if input.dim() not in (1, 2) or target.dim() != input.dim() - 1:
        return False
    if input.dim() == 2 and target.shape[0] != input.shape[0]:
        return False
    if input.numel() == 0 or target.device != input.device:
        return False
    if weight is not None:
        if not isinstance(weight, Tensor) or weight.dim() != 1:
            return False
        if weight.numel() != input.shape[-1] or weight.dtype != input.dtype:
            return False
        if weight.device != input.device or weight.requires_grad:
            return False
    if reduction not in _REDUCTIONS:
        return False
    if not isinstance(label_smoothing, numbers.Real) or not 0.0 <= label_smoothing <= 1.0:
        return False
    # The kernel takes the smoothing as an fp32 argument: fp64 logits would get an fp32-exact
    # loss and gradient where torch's are fp64-exact.
    return not (input.dtype == torch.float64 and label_smoothing > 0.0)


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """``torch.nn.functional.cross_entropy`` on the fused Triton kernel where it applies."""
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    input, weight = fp32(input, weight)  # autocast: float32 (_amp's docstring)
    covered = _triton_covers(input, target, weight, reduction, label_smoothing, ignore_index)
    if covered and use_triton(input, target, weight):
        unbatched = input.dim() == 1
        logits = input.unsqueeze(0) if unbatched else input
        tgt = target.unsqueeze(0) if unbatched else target
        args = (logits, tgt, weight, int(ignore_index), float(label_smoothing), reduction)
        if torch.is_grad_enabled() and logits.requires_grad:
            loss = CrossEntropyFunction.apply(*args)
        else:  # no graph (e.g. under no_grad): no gradient buffer is written
            loss = _cross_entropy_fwd(*args, False)[0]
        return loss.squeeze(0) if unbatched and reduction == "none" else loss
    return F.cross_entropy(
        input,
        target,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )


def nll_loss(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> Tensor:
    """``torch.nn.functional.nll_loss`` (torch's implementation on every backend: it gathers
    N values of the log-probabilities, there is nothing to fuse)."""
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    input, weight = fp32(input, weight)  # autocast: float32 (_amp's docstring)
    return F.nll_loss(input, target, weight=weight, ignore_index=ignore_index, reduction=reduction)


__all__ = ["CHECK_TARGETS", "CrossEntropyFunction", "cross_entropy", "nll_loss"]
