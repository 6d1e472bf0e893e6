"""``fusedmlp.optim.SGD``: torch.optim.SGD whose step is one fused multi-tensor kernel launch
per (param group, device, dtype) (two on the first momentum step when only some buffers exist).

It subclasses torch.optim.SGD: constructor (signature, defaults, the nesterov and
``ValueError`` checks), ``state_dict`` (``momentum_buffer``), hooks and LR schedulers are
torch's own; only ``step`` differs.

Torch's keywords: ``foreach`` accepted and ignored; ``fused=True``, ``differentiable=True`` and
tensor ``lr``/``weight_decay`` run torch's own implementation for that group, as does a group that
lists a param twice (torch warns, then updates it once per appearance). Sparse gradients
run torch's single-tensor algorithm (which supports them), as do params whose momentum buffer
has another dtype (a model converted with ``.half()``/``.float()`` after momentum steps: torch's
in-place ops cast between the two).

AMP: ``_step_supports_amp_scaling = True``: the ``grad_scale``/``found_inf`` tensors that
``torch.amp.GradScaler`` sets on the optimizer (or ``step(grad_scale=..., found_inf=...)``)
are read in-kernel: gradients unscaled on the device (and written back to ``.grad``, as torch's
fused SGD), the update skipped when ``found_inf`` is nonzero, no host synchronisation. Groups
that run torch's non-fused implementation get GradScaler's own treatment (unscale, then skip
after reading ``found_inf`` on the host). So does a step that would create momentum buffers (a
param's first step): a skipped one leaves the state as torch's non-fused SGD, which GradScaler
does not call then, leaves it: no buffer and no state entry (not ``momentum_buffer: None``, nor
zeros), so ``state_dict`` and the next step are torch's. No step counter: the kernel step can be
captured in a CUDA graph as it is.
"""

from __future__ import annotations

import operator
from itertools import repeat

import torch
from torch.optim.optimizer import _use_grad_for_differentiable

from ..autograd import adam as A
from ..autograd import sgd as S
from . import _plan
from .adam import _GRAD, _IS_SPARSE, amp_tensors, has_duplicates

_MOMENTUM_BUFFER = operator.methodcaller("get", "momentum_buffer")


class SGD(torch.optim.SGD):
    __doc__ = (
        "torch.optim.SGD with a fused multi-tensor Triton step (module docstring: "
        "fusedmlp.optim.sgd).\n\n" + (torch.optim.SGD.__doc__ or "")
    )

    _step_supports_amp_scaling = True

    def _init_group(self, group, params, grads, momentum_buffer_list):
        """torch's ``SGD._init_group`` (the same lists, state entries and return value), built
        with C-level maps in eager mode instead of a Python loop over the params."""
        return self._collect(group, params, grads, momentum_buffer_list)[0]

    def _collect(self, group, params, grads, momentum_buffer_list):
        """``(has_sparse_grad, fresh)``: ``_init_group``'s work and result, and the params whose
        state entry it made (``_drop`` removes them when the step is skipped)."""
        if torch.compiler.is_compiling():
            return super()._init_group(group, params, grads, momentum_buffer_list), []
        if group["fused"] or group["differentiable"]:
            fresh = []
            if group["momentum"] != 0:
                fresh = [p for p in group["params"] if p.grad is not None and p not in self.state]
            return super()._init_group(group, params, grads, momentum_buffer_list), fresh
        ps = group["params"]
        gs = list(map(_GRAD, ps))
        if False in map(operator.is_not, gs, repeat(None)):
            ps = [p for p, g in zip(ps, gs) if g is not None]
            gs = [g for g in gs if g is not None]
        params.extend(ps)
        grads.extend(gs)
        fresh = []
        if group["momentum"] != 0:  # self.state[p] as torch's loop: a defaultdict entry
            states = list(map(self.state.get, ps))
            if True in map(operator.is_, states, repeat(None)):  # a param's first step
                fresh = [p for p, st in zip(ps, states) if st is None]
                states = list(map(self.state.__getitem__, ps))
            momentum_buffer_list.extend(map(_MOMENTUM_BUFFER, states))
        return True in map(_IS_SPARSE, gs), fresh

    def _drop(self, fresh) -> None:
        """A skipped step (GradScaler's ``found_inf``): remove the state entries its look-up
        made. torch's non-fused SGD, which GradScaler does not call on such a step, has none."""
        for p in fresh:
            self.state.pop(p, None)

    @_use_grad_for_differentiable
    def step(self, closure=None, *, grad_scale=None, found_inf=None):
        """Perform a single optimization step (one fused launch per group, device and dtype).

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
            grad_scale, found_inf (Tensor, optional): AMP: divide the gradients by
                ``grad_scale`` and skip the step when ``found_inf`` is nonzero, on the device
                (``torch.amp.GradScaler`` sets them as attributes of the optimizer instead).
        """
        grad_scale, found_inf = amp_tensors(self, grad_scale, found_inf)
        amp = grad_scale is not None or found_inf is not None
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Step plans (fusedmlp.optim._plan), as Adam's: eager mode, no AMP tensors; recorded
        # once every group's state exists.
        compiling = torch.compiler.is_compiling()
        plannable = not amp and not compiling
        if not compiling:
            _plan.prune(self)  # no plan may keep a removed group's tensors alive
        to_plan = []
        for group in self.param_groups:
            hp = dict(
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                lr=group["lr"],
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                maximize=group["maximize"],
            )
            if plannable and not _torch_group(group) and self._planned_step(group, hp):
                continue
            params, grads, bufs = [], [], []
            if torch.compiler.is_compiling():  # dynamo treats _init_group itself specially
                has_sparse_grad, fresh = self._init_group(group, params, grads, bufs), []
            else:
                has_sparse_grad, fresh = self._collect(group, params, grads, bufs)
            # The step creates the buffers that do not exist yet; the state gets them after it.
            created = True in map(operator.is_, bufs, repeat(None))
            if _torch_group(group) or has_duplicates(params):
                fused = bool(group.get("fused"))
                if amp and not fused and not A.unscale_and_check(grads, grad_scale, found_inf):
                    self._drop(fresh)
                    continue  # torch's non-fused algorithm: GradScaler's own skip
                A.call_torch(
                    A._torch_sgd_module().sgd,
                    params,
                    grads,
                    bufs,
                    has_sparse_grad=has_sparse_grad,
                    foreach=group["foreach"],
                    fused=group["fused"],
                    grad_scale=grad_scale if fused else None,
                    found_inf=found_inf if fused else None,
                    **hp,
                )
            else:
                S.sgd(params, grads, bufs, grad_scale=grad_scale, found_inf=found_inf, **hp)
                if plannable and not has_sparse_grad and len(params) == len(group["params"]):
                    to_plan.append((group, params, grads, bufs))
                elif plannable:
                    _plan.forget(self, group)

            if created and True in map(operator.is_, bufs, repeat(None)):
                # S.sgd read GradScaler's found_inf on the host and skipped the step: no buffer
                # was made (autograd/sgd.py's module docstring), and no state entry stays
                self._drop(fresh)
                continue
            if group["momentum"] != 0 and (created or torch.compiler.is_compiling()):
                for p, buf in zip(params, bufs):
                    self.state[p]["momentum_buffer"] = buf
        for group, params, grads, bufs in to_plan:
            self._plan(group, params, grads, bufs)
        return loss

    def _planned_step(self, group, hp) -> bool:
        """The group's step through its plan (``fusedmlp.optim._plan``): True when it ran."""
        found = _plan.hit(self, group, _plan_keys(group))
        if found is None:
            return False
        plan, params, grads, lists, grad_ptrs = found
        bufs = lists[0] if lists else []
        return S.sgd_planned(params, grads, bufs, plan.extra, grad_ptrs, **hp)

    def _plan(self, group, params, grads, bufs):
        """After a full kernel step of ``group`` (eager, no AMP, every param with a gradient):
        record its plan when the next steps may take it (the common kernel path), else drop
        any earlier one."""
        momentum = group["momentum"] != 0
        arrays = [params, grads] + ([bufs] if momentum else [])
        checked = A.planned_check(arrays, "sgd")
        if checked is None:
            _plan.forget(self, group)
            return
        _plan.record(self, group, _plan_keys(group), params, arrays[2:], checked)

    def __setstate__(self, state):
        # load_state_dict (and unpickling) replace the state: no plan may keep the old state
        # tensors alive
        _plan.forget_all(self)
        super().__setstate__(state)


def _torch_group(group) -> bool:
    """Whether a group asks for something only torch's implementation provides."""
    return bool(
        group.get("fused")
        or group.get("differentiable")
        or torch.is_tensor(group["lr"])
        or torch.is_tensor(group["weight_decay"])
        # grad mode in a step: the optimizer's defaults are differentiable (torch's
        # _use_grad_for_differentiable), this group's not: torch's algorithm runs under
        # autograd (its leaf in-place error, or a graph through non-leaf params), which the
        # kernel's raw in-place writes would bypass
        or torch.is_grad_enabled()
    )


def _plan_keys(group) -> tuple:
    """The state entries a planned step reads: the momentum buffers (none without momentum)."""
    return ("momentum_buffer",) if group["momentum"] != 0 else ()


__all__ = ["SGD"]
