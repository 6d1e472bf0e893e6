"""``fusedmlp.optim.Adam`` and ``AdamW``: torch.optim.Adam / AdamW whose step is one fused
multi-tensor kernel launch per (param group, device, dtype).

They subclass torch's classes, so the constructor (signature, defaults, ``ValueError`` checks),
lazy state initialisation, ``state_dict``/``load_state_dict``, hooks, LR schedulers and
``isinstance(opt, torch.optim.Adam)`` are torch's own; only ``step`` differs. The state is
torch's (``step`` a float32 scalar CPU tensor, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``),
so checkpoints move between torch.optim and fusedmlp in both directions.

Torch's keywords:

- ``foreach``: accepted and ignored (fusedmlp's kernel is already multi-tensor).
- ``capturable=True`` (CUDA params): the step counters live on the device (torch's layout for
  that flag) and the kernel reads them: no host synchronisation, so the step can be captured
  in a CUDA graph. On other devices torch's own implementation runs (and raises as torch's).
- ``fused=True``, ``differentiable=True``, tensor ``lr``/``betas``: honoured by running torch's
  own implementation for that group (its state layout is torch's for those flags). So does a
  group that lists a param twice (torch warns, then updates it once per appearance).
- AMP: ``_step_supports_amp_scaling = True``. ``torch.amp.GradScaler.step`` sets
  ``optimizer.grad_scale`` (None after ``scaler.unscale_``) and ``optimizer.found_inf``, 0-d
  device tensors (``step(grad_scale=..., found_inf=...)`` passes them explicitly; a shape-[1]
  ``found_inf`` raises torch's fused Adam's ``RuntimeError``);
  the kernel divides the gradients by ``grad_scale`` (writing the unscaled gradients back to
  ``.grad``, as torch's fused Adam) and skips the whole update when ``found_inf`` is nonzero,
  reading both on the device: no host synchronisation. The step counters of such a group move
  to the params' device (float32, torch's fused layout), incremented and, on a skipped step,
  decremented by ``found_inf`` on the device. Groups that run torch's non-fused implementation
  (``differentiable``, tensor hyperparameters) get GradScaler's own treatment (unscale, then
  skip after reading ``found_inf`` on the host); a skip there also removes the state that the
  step initialised (the params' first step), as torch's non-fused Adam, which GradScaler does
  not call on such a step, has none. The kernel's groups keep the state of a skipped first
  step (``step`` 0, zero moments: torch's fused Adam's; the next step's numbers are the same):
  removing it would need ``found_inf`` on the host, and the step never synchronises.
"""

from __future__ import annotations

import operator
from itertools import repeat

import torch
from torch.optim.optimizer import _use_grad_for_differentiable

from ..autograd import adam as A
from . import _plan


def _torch_group(group) -> bool:
    """Whether a group asks for something only torch's implementation provides."""
    capturable_elsewhere = group.get("capturable") and not all(p.is_cuda for p in group["params"])
    return bool(
        group.get("fused")
        or capturable_elsewhere
        or group.get("differentiable")
        or torch.is_tensor(group["lr"])
        or any(torch.is_tensor(b) for b in group["betas"])
        or torch.is_tensor(group["weight_decay"])
        # grad mode in a step: the optimizer's defaults are differentiable (torch's
        # _use_grad_for_differentiable), this group's not: torch's algorithm runs under
        # autograd (its leaf in-place error, or a graph through non-leaf params), which the
        # kernel's raw in-place writes would bypass
        or torch.is_grad_enabled()
    )


def has_duplicates(params) -> bool:
    """Whether a param appears more than once among ``params`` (torch only warns for such a
    group, then updates the param once per appearance, one after the other: one launch would
    race over it, so torch's implementation runs). Eager mode only (``id`` is no traced op)."""
    return not torch.compiler.is_compiling() and len(set(map(id, params))) != len(params)


def amp_tensors(optimizer, grad_scale, found_inf):
    """The AMP tensors of this step: the keywords, else what GradScaler set on the optimizer."""
    if grad_scale is None:
        grad_scale = getattr(optimizer, "grad_scale", None)
    if found_inf is None:
        found_inf = getattr(optimizer, "found_inf", None)
    return grad_scale, found_inf


def _device_steps(state, params, steps) -> None:
    """Move the step counters to their params' devices as float32 (torch's fused layout)."""
    for i, p in enumerate(params):
        s = steps[i]
        if s.device != p.device or s.dtype != torch.float32:
            s = s.to(device=p.device, dtype=torch.float32)
            state[p]["step"] = s
            steps[i] = s


_GRAD = operator.attrgetter("grad")
_IS_SPARSE = operator.attrgetter("is_sparse")
_EXP_AVG = operator.itemgetter("exp_avg")
_EXP_AVG_SQ = operator.itemgetter("exp_avg_sq")
_MAX_EXP_AVG_SQ = operator.itemgetter("max_exp_avg_sq")
_STEP = operator.itemgetter("step")
_DATA_PTR = torch.Tensor.data_ptr


class _FusedAdamStep:
    _step_supports_amp_scaling = True

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps):
        """torch's ``Adam._init_group`` (the same lists, errors and return value). Once every
        param with a gradient has its state, in eager mode, the lists are built with C-level
        maps instead of torch's loop: about half of the step's host time over 100 tensors."""
        lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
        return self._collect(group, *lists)[0]

    def _collect(self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps):
        """``(has_complex, fresh)``: ``_init_group``'s work and result, and the state it
        initialised (lazily: the params' first step), as ``(param, entry before)`` pairs for
        ``_drop`` (eager mode; a group on torch's non-fused implementation skipped by
        GradScaler, module docstring)."""
        lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
        if torch.compiler.is_compiling():
            return super()._init_group(group, *lists), []
        if group["differentiable"] or (group["foreach"] and torch.is_tensor(group["lr"])):
            fresh = [
                (p, self.state.get(p))
                for p in group["params"]
                if p.grad is not None and not self.state.get(p)
            ]
            return super()._init_group(group, *lists), fresh
        ps = group["params"]
        gs = list(map(_GRAD, ps))
        if False in map(operator.is_not, gs, repeat(None)):
            ps = [p for p, g in zip(ps, gs) if g is not None]
            gs = [g for g in gs if g is not None]
        states = list(map(self.state.get, ps))
        if not all(states) or True in map(_IS_SPARSE, gs):  # lazy initialisation; the error
            fresh = [(p, st) for p, st in zip(ps, states) if not st]
            return super()._init_group(group, *lists), fresh
        params.extend(ps)
        grads.extend(gs)
        exp_avgs.extend(map(_EXP_AVG, states))
        exp_avg_sqs.extend(map(_EXP_AVG_SQ, states))
        if group["amsgrad"]:
            max_exp_avg_sqs.extend(map(_MAX_EXP_AVG_SQ, states))
        steps.extend(map(_STEP, states))
        return True in map(torch.is_complex, ps), []

    def _drop(self, fresh) -> None:
        """A skipped step (GradScaler's ``found_inf``): undo the lazy initialisation of
        ``fresh`` (``_collect``). torch's non-fused Adam, which GradScaler does not call on
        such a step, leaves no state for those params (or an empty entry as it was)."""
        for p, before in fresh:
            if before is None:
                self.state.pop(p, None)
            else:
                before.clear()
                self.state[p] = before

    def _steps_buffer(self, group, params, steps):
        """A 1-D tensor whose elements are ``steps`` (the host step counters of the params with
        a gradient, in order), or None: ``adam`` then reads and increments every counter with
        one op each instead of one per tensor (~0.6 of 2.4 ms of host time per step over 1,000
        tensors; CPU tensors, so no synchronisation either way).

        Eager mode, on the Triton path, for float 0-d CPU counters of one dtype: the first such
        step stacks the counters into one buffer and makes every param's ``state["step"]`` a
        0-d view of it (same values, dtype and device: torch.optim and checkpoints take them as
        they are). Later steps check that the counters still live at the buffer's addresses,
        with one C-level read of every counter's address: a counter replaced, assigned through
        ``.data``, or a different set of params with gradients builds a new buffer. Values
        written in place through the views are the buffer's own. None is built inside
        ``torch.inference_mode()``."""
        n = len(steps)
        if n < 2:
            return None
        cache = self.__dict__.setdefault("_fusedmlp_steps", {})
        hit = cache.get(id(group))
        if hit is not None and hit[0] is group and tuple(map(_DATA_PTR, steps)) == hit[2]:
            return hit[1]
        if torch.is_inference_mode_enabled() or not A.use_triton_all(params):
            # inference mode: the buffer and its views would be inference tensors, which no
            # step outside it may update (torch's counters, updated in place, stay as they are)
            return None
        dtypes = A.attr_set("dtype", steps)
        if (
            len(dtypes) != 1
            or not next(iter(dtypes)).is_floating_point
            or False in A.attr_set("is_cpu", steps)
            or set(map(torch.Tensor.dim, steps)) != {0}
        ):
            return None
        buffer = torch.stack(steps)
        views = buffer.unbind(0)
        for p, view in zip(params, views):
            self.state[p]["step"] = view
        steps[:] = views
        cache[id(group)] = (group, buffer, tuple(map(_DATA_PTR, views)))
        return buffer

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
        # An ``is None`` test, not ``or``: torch 2.11's dynamo cannot take the truth value of a
        # bound method (a graph break that sent the whole step back to eager).
        health = getattr(self, "_accelerator_graph_capture_health_check", None)
        if health is None:
            health = getattr(self, "_cuda_graph_capture_health_check", None)
        if health is not None:
            health()

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # A step plan (fusedmlp.optim._plan) applies in eager mode without AMP tensors. Plans
        # are recorded once every group's state exists (a plan checks the whole state).
        compiling = torch.compiler.is_compiling()
        plannable = not amp and not compiling
        if not compiling:
            _plan.prune(self)  # no plan may keep a removed group's tensors alive
        to_plan = []
        for group in self.param_groups:
            hp = self._hyper(group)
            if plannable and self._planned_step(group, hp):
                continue
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
            built = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
            if torch.compiler.is_compiling():  # dynamo treats _init_group itself specially
                has_complex, fresh = self._init_group(group, *built), []
            else:
                has_complex, fresh = self._collect(group, *built)
            if _torch_group(group) or has_duplicates(params):
                fused = bool(group["fused"])
                if amp and not fused and not A.unscale_and_check(grads, grad_scale, found_inf):
                    self._drop(fresh)
                    continue  # torch's non-fused algorithm: GradScaler's own skip
                A.call_torch(
                    A._torch_adam_module().adam,
                    params,
                    grads,
                    exp_avgs,
                    exp_avg_sqs,
                    max_exp_avg_sqs,
                    steps,
                    foreach=group["foreach"],
                    capturable=group["capturable"],
                    differentiable=group["differentiable"],
                    fused=group["fused"],
                    grad_scale=grad_scale if fused else None,
                    found_inf=found_inf if fused else None,
                    has_complex=has_complex,
                    **hp,
                )
                continue
            if not torch.compiler.is_compiling() and not all(
                map(isinstance, steps, repeat(torch.Tensor))
            ):  # torch's functional adam's check (a float put in the state)
                raise RuntimeError(
                    "API has changed, `state_steps` argument must contain a list of singleton "
                    "tensors"
                )
            device_step = amp or bool(group["capturable"])
            buffer = None
            if device_step:
                _device_steps(self.state, params, steps)
            elif torch.compiler.is_compiling():  # counters moved to the device by AMP stay there
                device_step = not all(s.is_cpu for s in steps)
            else:
                buffer = self._steps_buffer(group, params, steps)  # only over CPU counters
                if buffer is None:
                    device_step = False in A.attr_set("is_cpu", steps)
            A.adam(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                max_exp_avg_sqs,
                steps,
                device_step=device_step,
                grad_scale=grad_scale,
                found_inf=found_inf,
                steps_buffer=buffer,
                **hp,
            )
            if plannable:
                lists = (exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
                to_plan.append((group, buffer, params, grads, *lists))
        for args in to_plan:
            self._plan(*args)
        return loss

    def _hyper(self, group) -> dict:
        """The group's hyperparameters as ``A.adam`` takes them (read at every step: LR
        schedulers and users change them between steps)."""
        beta1, beta2 = group["betas"]
        return dict(
            amsgrad=group["amsgrad"],
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
            # torch's AdamW is Adam with this default True: a group may still set it False
            decoupled_weight_decay=group.get(
                "decoupled_weight_decay", isinstance(self, torch.optim.AdamW)
            ),
        )

    def _planned_step(self, group, hp) -> bool:
        """The group's step through its plan (``fusedmlp.optim._plan``): True when it ran."""
        if group["capturable"] or _torch_group(group):
            return False
        found = _plan.hit(self, group, _plan_keys(group))
        if found is None:
            return False
        plan, params, grads, lists, grad_ptrs = found
        buffer, checked = plan.extra
        vmax = lists[2] if group["amsgrad"] else []
        return A.adam_planned(
            params, grads, lists[0], lists[1], vmax, buffer, checked, grad_ptrs, **hp
        )

    def _plan(self, group, buffer, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps):
        """After a full step of ``group`` (eager, no AMP): record its plan when the next steps
        may take it (host step counters in one buffer, all equal, every param with a gradient,
        the common kernel path), else drop any earlier one."""
        checked = None
        if (
            buffer is not None
            and _all_equal(buffer.tolist())
            and not group["capturable"]
            and not _torch_group(group)
            and len(params) == len(group["params"])
        ):
            amsgrad = group["amsgrad"]
            arrays = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
            checked = A.planned_check(arrays, "adam")
        if checked is None:
            _plan.forget(self, group)
            return
        # steps: the buffer's views (``_steps_buffer`` put them in the state and the list)
        lists = [exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else []) + [steps]
        _plan.record(self, group, _plan_keys(group), params, lists, (buffer, checked))

    def __setstate__(self, state):
        # load_state_dict (and unpickling) replace the state: no plan or counter buffer may
        # keep the old state tensors alive
        _plan.forget_all(self)
        self.__dict__.pop("_fusedmlp_steps", None)
        super().__setstate__(state)


def _all_equal(values: list) -> bool:
    return values.count(values[0]) == len(values)


def _plan_keys(group) -> tuple:
    """The state entries a planned step reads, in ``_plan.hit``'s ``lists`` order."""
    if group["amsgrad"]:
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")
    return ("exp_avg", "exp_avg_sq", "step")


class Adam(_FusedAdamStep, torch.optim.Adam):
    __doc__ = (
        "torch.optim.Adam with a fused multi-tensor Triton step (module docstring: "
        "fusedmlp.optim.adam).\n\n" + (torch.optim.Adam.__doc__ or "")
    )


class AdamW(_FusedAdamStep, torch.optim.AdamW):
    __doc__ = (
        "torch.optim.AdamW with a fused multi-tensor Triton step (module docstring: "
        "fusedmlp.optim.adam).\n\n" + (torch.optim.AdamW.__doc__ or "")
    )


__all__ = ["Adam", "AdamW"]
