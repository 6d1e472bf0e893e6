"""``FusedSequential``: a ``torch.nn.Sequential`` that runs fusable layer patterns as one block.

Children, their order, their names and so the ``state_dict`` keys are exactly the
Sequential's: the fusion happens in ``forward``, which recognises, at run time, two patterns of
fusedmlp modules (exact types) and calls the fused ops of ``fusedmlp.autograd.fused_block`` with
the children's own parameters and buffers:

    BatchNorm1d, [ReLU | LeakyReLU | Sigmoid | Tanh | GELU | SiLU | Identity], [Dropout]
        -> ``bn_act_dropout``: normalise + affine + activation + dropout in one pass after the
           batch statistics (at least one of the two optional modules present; the preceding
           Linear runs as usual). Needs BatchNorm1d in training mode and a 2-D input.
        followed by Linear(activation=None) (an MLP's next layer or head), with at least
        ``RECOMPUTE_MIN_BYTES`` (1 MiB) of block output and no autocast
        -> ``bn_act_dropout_linear``: the block and that Linear in one autograd Function that
           does not keep the block's output for backward but recomputes it there for the
           Linear's dW (in eager mode in the block's backward reduction, no pass of its own):
           one [N, C] activation kept per hidden layer instead of two.
    Linear(activation=A), Identity..., Dropout      (or Linear(activation=None), <act module>,
    Dropout)
        -> ``linear_act_dropout``: the activation and the dropout in the Linear's epilogue (one
           launch), whose backward keeps the output instead of the pre-activation. Where it
           keeps the output (relu, sigmoid, tanh, leaky_relu with a slope >= 0), only when a
           Linear or BatchNorm reads that output next (``output_stays_inside``): torch's chain
           keeps other tensors, so a caller's in-place edit of an output that leaves the
           Sequential (a residual ``out += x``) still backpropagates; there the modules run
           one after the other.
    A Linear with a fused leaky_relu (``negative_slope >= 0``) that runs as a module and whose
    output does not stay inside (an in-place Dropout, a hooked module, the Sequential's end)
    runs without activation followed by torch's leaky_relu, which keeps the pre-activation as
    torch's LeakyReLU does: an in-place Dropout after it then backpropagates, as torch's chain.

A Linear without activation whose output a fused BatchNorm block reads next (the first
Linear of an MLP as a module; the others inside ``bn_act_dropout_linear``, or as modules when
the block output is kept) also makes the batch norm's statistics in its GEMM's epilogue
(``fusedmlp.autograd.linear.linear_stats`` with the batch norm's eps: each column block's
last program merges the tiles' partial statistics), and the block's forward pass updates the
running statistics from them: no statistics launch, no pass over the block's input for them.
Eager mode only, where the block would compute its statistics in eager mode anyway (tracked,
contiguous running statistics); a traced graph keeps the statistics pass. The same pair shares a ``Handover``
(``fusedmlp.autograd._handover``): in the backward the block's dx pass also writes dx^T and its
column sums, which that Linear's "dz" backward (fp32) would otherwise make in a pass over dx.

The fused path is taken only when it cannot change what anyone observes: the Triton path is
active for the tensors involved (``fusedmlp.backend.use_triton``), the modules are in training
mode (a Dropout in eval mode simply drops out of the block), no module of the pattern has hooks
or a ``forward`` of its own (an instance attribute, as accelerate's device hooks set) and no
global module hooks are registered. Otherwise the children run one after the other, as
in ``torch.nn.Sequential``. Results equal the unfused fusedmlp chain (same dropout mask under
the same ``torch.manual_seed``) to floating-point tolerance.
"""

from __future__ import annotations

import numbers
import operator

import torch
from torch import Tensor
from torch.nn.modules import module as _module

from .. import _env
from ..autograd._handover import Handover
from ..autograd.fused_block import (
    block_linear_applies,
    bn_act_dropout,
    bn_act_dropout_linear,
    linear_act_dropout,
    saves_output,
)
from ..autograd.linear import linear as fused_linear
from ..autograd.linear import linear_stats, slope_fits
from ..backend import use_triton
from .batchnorm import BatchNorm1d, BatchNorm2d
from .dropout import Dropout
from .linear import Linear

MODULE_HOOKS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
    "_global_forward_hooks_always_called",
)


def activation_of(m: torch.nn.Module) -> tuple[str | None, float] | None:
    """(activation name or None for Identity, negative_slope) of an activation module that a
    fused block can absorb; None when ``m`` is not one (exact types only)."""
    t = type(m)
    if t is torch.nn.Identity:
        return None, 0.01
    if t is torch.nn.ReLU:
        return "relu", 0.01
    if t is torch.nn.LeakyReLU:
        slope = m.negative_slope
        if not isinstance(slope, numbers.Real):  # not absorbed: its forward raises torch's error
            return None
        return "leaky_relu", float(slope)
    if t is torch.nn.Sigmoid:
        return "sigmoid", 0.01
    if t is torch.nn.Tanh:
        return "tanh", 0.01
    if t is torch.nn.GELU and m.approximate == "none":
        return "gelu", 0.01
    if t is torch.nn.SiLU:
        return "silu", 0.01
    return None


_MODULE_HOOK_DICTS = operator.attrgetter(*MODULE_HOOKS)


def _hooked(mods) -> bool:
    """Whether a hook is registered globally or on one of ``mods``, or one of ``mods`` has a
    ``forward`` of its own (an instance attribute, as accelerate's device hooks or a user's
    patch set: ``torch.nn.Sequential`` calls it, a fused block would not): in eager mode with
    C-level reads of the hook dicts (this runs for every block of every forward); traced, with
    the plain loops dynamo follows (it cannot trace ``attrgetter``)."""
    if torch.compiler.is_compiling():
        if any(getattr(_module, name, None) for name in _GLOBAL_HOOKS):
            return True
        if any("forward" in m.__dict__ for m in mods):
            return True
        return any(getattr(m, name, None) for m in mods for name in MODULE_HOOKS)
    if any(map(vars(_module).get, _GLOBAL_HOOKS)):
        return True
    return any(any(_MODULE_HOOK_DICTS(m)) or "forward" in vars(m) for m in mods)


# What a block's output may pass through (out of place) and what may read it without editing it
# in place or handing it on (exact types): ``output_stays_inside``.
_PASSING = (torch.nn.Identity, torch.nn.Dropout, Dropout)
_CONSUMERS = (
    torch.nn.Linear,
    Linear,
    torch.nn.BatchNorm1d,
    torch.nn.BatchNorm2d,
    BatchNorm1d,
    BatchNorm2d,
)


def output_stays_inside(mods: list, j: int) -> bool:
    """Whether the tensor that ``mods[j - 1]`` returns (inside a Sequential chain) is read only
    by a module that neither changes it in place nor hands it on: after Identities and
    out-of-place Dropouts (the identity in eval mode), a Linear or BatchNorm (torch's or
    fusedmlp's), none of them with hooks (a hook may edit its input in place). A fused op that
    keeps its output for backward (torch's modules there keep another tensor) runs only then:
    an in-place edit of its output by the caller (``out += x``) would stop the backward."""
    while j < len(mods):
        m = mods[j]
        if m is None or _hooked((m,)):
            return False
        if type(m) in _CONSUMERS:
            return True
        if type(m) not in _PASSING or getattr(m, "inplace", False):
            return False
        j += 1
    return False


def _match_bn(mods: list, i: int):
    """``(end, bn, activation, slope, dropout)`` of a BatchNorm block starting at ``i``."""
    bn = mods[i]
    if type(bn) is not BatchNorm1d or not bn.training:
        return None
    j = i + 1
    act, slope = None, 0.01
    if j < len(mods) and activation_of(mods[j]) is not None:
        act, slope = activation_of(mods[j])
        j += 1
    drop = None
    if j < len(mods) and type(mods[j]) is Dropout:
        drop = mods[j]
        j += 1
    dropping = drop is not None and drop.training and drop.p > 0.0
    if act is None and not dropping:
        return None  # BatchNorm alone: nothing to fuse
    return j, bn, act, slope, drop


def _match_linear(mods: list, i: int):
    """``(end, linear, activation, slope, dropout)`` of a Linear -> act -> Dropout block."""
    lin = mods[i]
    if type(lin) is not Linear:
        return None
    act, slope = lin.activation, lin.negative_slope
    j = i + 1
    while j < len(mods) and type(mods[j]) is torch.nn.Identity:
        j += 1
    if act is None and j < len(mods) and activation_of(mods[j]) is not None:
        act, slope = activation_of(mods[j])
        j += 1
        while j < len(mods) and type(mods[j]) is torch.nn.Identity:
            j += 1
    if j >= len(mods) or type(mods[j]) is not Dropout:
        return None
    drop = mods[j]
    if not drop.training or drop.p == 0.0:
        return None  # the Dropout is the identity: nothing to fuse
    if act is not None and saves_output(act, slope) and not output_stays_inside(mods, j + 1):
        # The fused op keeps its output for the activation's derivative, torch's chain the
        # activation's output before the dropout: an output that leaves the Sequential runs
        # unfused, so that an in-place edit of it (a residual ``out += x``) still backpropagates
        return None
    return j + 1, lin, act, slope, drop


def _regular(lin: Linear) -> bool:
    """Whether ``lin``'s weight is ``[out, in]`` and its bias ``[out]`` or None, the shapes the
    epilogue kernels of ``linear_stats`` and ``bn_act_dropout_linear`` take. A parameter
    replaced after construction may be another shape that ``F.linear`` takes (a 0-d or
    one-element bias it broadcasts), which the Linear as a module computes as torch."""
    w, b = lin.weight, lin.bias
    return (
        isinstance(w, Tensor)
        and w.dim() == 2
        and (b is None or (isinstance(b, Tensor) and b.shape == w.shape[:1]))
    )


def _run_bn_block(
    input: Tensor, bn: BatchNorm1d, act, slope, drop, lin=None, partials=None, stats=False,
    handovers=(None, None), stats_eps=None,
):  # fmt: skip
    """The block's output, or with ``lin`` (a Linear without activation that follows it) the
    Linear's, from one Function that does not keep the block's output for backward; None when
    the block does not run fused. ``partials``: input's batch statistics from the Linear that
    made it (``linear_stats``). ``stats`` (with ``lin``): ``(y, y's statistics or None)``
    instead, final ones with ``stats_eps`` (the eps of the batch norm that reads y next).
    ``handovers``: (the one shared with the Linear before, the one ``lin`` shares with the
    block after)."""
    if input.dim() != 2 or input.numel() == 0:
        return None
    if act == "leaky_relu" and not slope_fits(slope, input.dtype):
        return None  # the modules in turn: torch's LeakyReLU raises its own error
    params = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
    if lin is not None:
        if not _regular(lin) or not block_linear_applies(input, *params, lin.weight, lin.bias):
            return None
    elif not use_triton(input, *params):
        return None
    bn._check_input_dim(input)
    momentum = 0.0 if bn.momentum is None else bn.momentum
    cumulative = None
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            cumulative = bn.num_batches_tracked
    track = bn.track_running_stats
    p = drop.p if drop is not None and drop.training else 0.0
    args = (
        input,
        bn.running_mean if track else None,
        bn.running_var if track else None,
        bn.weight,
        bn.bias,
        momentum,
        bn.eps,
        act,
        slope,
        p,
        cumulative,
    )
    if lin is not None:
        return bn_act_dropout_linear(
            *args, lin.weight, lin.bias, partials=partials, stats=stats,
            handover=handovers[0], lin_handover=handovers[1], stats_eps=stats_eps,
        )  # fmt: skip
    return bn_act_dropout(*args, partials=partials, handover=handovers[0])


# From this many rows up a Linear makes the next block's statistics in its epilogue. It was 129
# while the block merged the Linear's partial statistics in a launch of its own (below 129
# rows its own statistics pass was one launch too, and the handover's Python cost about 40 us
# a step of the CPU stand-in's B=64 MLP). Now the epilogue makes the final statistics: one
# launch fewer per block at any batch (the stand-in's B=64 step: 30 -> 26 launches, host time
# 3.78-4.62 ms against 3.89-4.21, alternated, fastest of 500 steps). Training batch norm needs
# two rows anyway.
STATS_MIN_ROWS = 2
# Whether those statistics are final (merged in the GEMM by its last programs, the running
# update in the block's forward pass) or partial (merged, with the running update, by a launch
# of the block's own, as before the nineteenth session). Read once; ``FUSEDMLP_FINAL_STATS=0``
# takes the partials (``benchmarks/kernel_times.py`` times both).
FINAL_STATS = _env.switch("FUSEDMLP_FINAL_STATS")


def _takes_partials(mods: list, j: int, rows: int) -> bool:
    """Whether ``mods[j:]`` starts a BatchNorm block that runs fused and merges its input's
    statistics from the partial statistics of the Linear before it: ``rows`` (the input's) at
    least ``STATS_MIN_ROWS``, and ``eager_stats``'s conditions (eager mode, tracked contiguous
    running statistics). Asked before that Linear
    runs, so that it makes them only when they will be read. Hooks are not looked at here (a
    hooked block runs as its modules and ignores the statistics: work lost, nothing wrong)."""
    if (
        rows < STATS_MIN_ROWS
        or j >= len(mods)
        or type(mods[j]) is not BatchNorm1d
        or torch.compiler.is_compiling()
    ):
        return False
    match = _match_bn(mods, j)
    if match is None:
        return False
    bn = match[1]
    rm, rv = bn.running_mean, bn.running_var
    return (
        bn.track_running_stats
        and rm is not None
        and rv is not None
        and rm.is_contiguous()
        and rv.is_contiguous()
    )


def _final_eps(mods: list, j: int) -> float | None:
    """The eps of the batch norm ``mods[j]`` for the final statistics of the Linear before it
    (``FINAL_STATS``), else None (partial statistics)."""
    if FINAL_STATS and j < len(mods) and type(mods[j]) is BatchNorm1d:
        return mods[j].eps
    return None


def _run_linear_stats(input: Tensor, lin: Linear, handover, eps: float | None):
    """``(y, statistics)`` of a Linear without activation whose output a fused BatchNorm block
    reads next (``linear_stats``; final statistics with that batch norm's ``eps``), or None
    where the module runs as usual."""
    if (
        lin.activation is not None
        or not _regular(lin)
        or not isinstance(input, Tensor)
        or input.dim() != 2
        or input.numel() == 0
        or _hooked((lin,))
        or torch.is_autocast_enabled(input.device.type)
        or not use_triton(input, lin.weight, lin.bias)
    ):
        return None
    return linear_stats(input, lin.weight, lin.bias, handover, eps)


def _run_linear_block(input: Tensor, lin: Linear, act, slope, drop) -> Tensor | None:
    if not isinstance(input, Tensor) or not use_triton(input, lin.weight, lin.bias):
        return None
    if act == "leaky_relu" and not slope_fits(slope, input.dtype):
        return None  # the modules in turn: their leaky_relu raises torch's error
    return linear_act_dropout(input, lin.weight, lin.bias, act, slope, drop.p)


def _keeps_input(m: torch.nn.Module, mods: list, i: int, input) -> bool:
    """Whether ``m = mods[i]``, a Linear with a fused leaky_relu (``negative_slope >= 0``)
    that runs as a module, must keep its pre-activation for backward as torch's ``Linear ->
    LeakyReLU`` chain does (``LeakyReLU`` keeps its input): where its output does not stay
    inside (``output_stays_inside``: an in-place Dropout, a hooked module or the Sequential's
    end reads it), an in-place edit of the output (``Dropout(inplace=True)``) still
    backpropagates there, while the Linear's own op keeps its output and would raise."""
    return (
        # a subclass that keeps Linear's forward too: torch.nn.utils.parametrize's
        # ParametrizedLinear, which a parametrization registered on the module swaps in
        isinstance(m, Linear)
        and type(m).forward is Linear.forward
        and m.activation == "leaky_relu"
        and m.negative_slope >= 0
        and isinstance(input, Tensor)
        and "forward" not in m.__dict__
        and slope_fits(m.negative_slope, input.dtype)
        and not output_stays_inside(mods, i + 1)
    )


def _run_keeping_input(m: Linear, input: Tensor) -> Tensor:
    """``m(input)`` (its hooks fire as usual, with the same arguments) computed as the Linear
    without activation followed by torch's leaky_relu, which keeps the pre-activation for
    backward instead of the output (``_keeps_input``)."""

    def forward(x):
        if not isinstance(x, Tensor) or not slope_fits(m.negative_slope, x.dtype):
            return Linear.forward(m, x)  # what a pre-hook handed on: the module's own forward
        return torch.nn.functional.leaky_relu(fused_linear(x, m.weight, m.bias), m.negative_slope)

    if not _hooked((m,)):
        return forward(input)
    if torch.compiler.is_compiling():
        return m(input)
    # The module's hooks around this forward: ``Module.__call__`` runs ``self.forward``, an
    # instance attribute first (as accelerate's device hooks set it), removed right after.
    vars(m)["forward"] = forward
    try:
        out = m(input)
    finally:
        vars(m).pop("forward", None)
    if isinstance(out, Tensor) and type(out.grad_fn).__name__ == "BackwardHookFunctionBackward":
        # A full backward hook's output, which torch forbids to edit in place: in torch's chain
        # the in-place Dropout edits the LeakyReLU's output, a tensor of its own, so here a copy.
        out = out.clone()
    return out


def fusable(seq: torch.nn.Module) -> bool:
    """Whether ``seq``'s children contain a pattern that ``FusedSequential`` fuses in training
    mode (BatchNorm1d followed by an activation and/or a Dropout; Linear -> act -> Dropout)."""
    mods = list(seq._modules.values())

    def skip_identity(j):
        while j < len(mods) and type(mods[j]) is torch.nn.Identity:
            j += 1
        return j

    def is_act(j):
        return j < len(mods) and activation_of(mods[j]) not in (None, (None, 0.01))

    def is_dropout(j):
        return j < len(mods) and type(mods[j]) is Dropout

    for i, m in enumerate(mods):
        if type(m) is BatchNorm1d:
            if is_act(i + 1) or is_dropout(i + 1) or is_dropout(skip_identity(i + 1)):
                return True
        if type(m) is Linear:
            j = skip_identity(i + 1)
            if m.activation is None and is_act(j):
                j = skip_identity(j + 1)
            if is_dropout(j):
                return True
    return False


class FusedSequential(torch.nn.Sequential):
    """``torch.nn.Sequential`` whose ``forward`` fuses BatchNorm1d -> act -> Dropout and
    Linear -> act -> Dropout blocks on the Triton path (see the module docstring).

    Same constructor, children, indexing and ``state_dict`` keys as ``torch.nn.Sequential``.
    """

    def forward(self, input):
        if not (isinstance(input, Tensor) and use_triton(input)):
            # No block can run fused (each asks use_triton of this input, among others):
            # torch.nn.Sequential's loop, without matching the blocks at every call.
            return super().forward(input)
        mods = list(self._modules.values())
        n = len(mods)
        i = 0
        # The batch-norm partial statistics of ``made`` (the output of the Linear just run),
        # from that Linear's epilogue, for the BatchNorm block that reads it next.
        made = partials = handover = None
        while i < n:
            m = mods[i]
            out = None
            given = partials if input is made else None
            # The Linear that made ``input`` and the block that reads it share a handover slot
            # for the block's backward (dZ^T and dZ's column sums for that Linear: _handover).
            given_handover = handover if given is not None else None
            made = partials = handover = None
            if type(m) is BatchNorm1d or type(m) is Linear:
                match = _match_bn(mods, i) if type(m) is BatchNorm1d else _match_linear(mods, i)
                if match is not None and isinstance(input, Tensor):
                    end, first, act, slope, drop = match
                    if type(m) is BatchNorm1d:
                        # A Linear without activation right after the block takes the block's
                        # output without keeping it for backward (recomputed there).
                        nxt = mods[end] if end < n else None
                        if (
                            type(nxt) is Linear
                            and nxt.activation is None
                            and not _hooked(mods[i : end + 1])
                        ):
                            stats = _takes_partials(mods, end + 1, input.shape[0])
                            lin_handover = Handover() if stats else None
                            out = _run_bn_block(
                                input, first, act, slope, drop, nxt, given, stats,
                                (given_handover, lin_handover), _final_eps(mods, end + 1),
                            )  # fmt: skip
                            if out is not None:
                                if stats:
                                    out, partials = out
                                    made, handover = out, lin_handover
                                input = out
                                i = end + 1
                                continue
                            hooked = False  # mods[i:end] is part of what was just looked at
                        else:
                            hooked = _hooked(mods[i:end])
                    else:
                        hooked = _hooked(mods[i:end])
                    if not hooked:
                        if type(m) is BatchNorm1d:
                            out = _run_bn_block(
                                input, first, act, slope, drop, partials=given,
                                handovers=(given_handover, None),
                            )  # fmt: skip
                        else:
                            out = _run_linear_block(input, first, act, slope, drop)
                        if out is not None:
                            input = out
                            i = end
                            continue
                elif (
                    type(m) is Linear
                    and isinstance(input, Tensor)
                    and input.dim() == 2
                    and _takes_partials(mods, i + 1, input.shape[0])
                ):
                    lin_handover = Handover()
                    out = _run_linear_stats(input, m, lin_handover, _final_eps(mods, i + 1))
                    if out is not None:
                        input, partials = out
                        made, handover = input, lin_handover
                        i += 1
                        continue
            if _keeps_input(m, mods, i, input):
                input = _run_keeping_input(m, input)
            else:
                input = m(input)
            i += 1
        return input


def fuse_sequential(seq: torch.nn.Sequential) -> torch.nn.Sequential:
    """Turn a plain ``torch.nn.Sequential`` (exact type) with a fusable pattern into a
    ``FusedSequential`` in place (class swap: same object, children, Parameters and keys).
    Other modules are returned unchanged."""
    if type(seq) is torch.nn.Sequential and fusable(seq):
        seq.__class__ = FusedSequential
    return seq


__all__ = [
    "FusedSequential",
    "activation_of",
    "fusable",
    "fuse_sequential",
    "output_stays_inside",
]
