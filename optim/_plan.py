"""Step plans: the fused optimizers' host fast path for a param group that repeats its step.

A step over T tensors walks them many times on the host before its one launch: the state
lookups, torch's list building, the multi-tensor check (``kernels.multi_tensor.check``), the
backend and partition tests. Once a group has taken the common path (eager mode, the Triton
kernel for every param, one device and dtype, every param with a gradient, contiguous
tensors), its ``Plan`` records what those walks established, and the next steps only verify
that nothing they depend on changed:

- the same group dict, ``optimizer.state`` object and backend;
- the same param objects in the group, in order;
- the same ``optimizer.state`` entries (its keys and per-param dicts, as objects:
  ``load_state_dict`` replaces the state, ``optimizer.state[p] = {...}`` shows here);
- the recorded state tensors (the same objects: a view of one put in its place keeps its
  address), and every param and state tensor at its recorded address: a tensor replaced in the
  state (the plan holds the recorded ones, so no other tensor takes their memory while it
  lives), or its storage swapped in place (an ``nn.Module.to()``, ``.data`` assignments,
  ``set_``, ``torch.utils.swap_tensors``), moves it;
- every param still contiguous (as recorded) and of its recorded shape and dtype: a ``.data``
  view of the same storage from its first element stays at its address (``p.data =
  p.data.t()`` on a square weight, ``p.data = p.data.view(-1)``), and its gradient, which torch
  lets a user assign in any strides, may be contiguous (the flat walk would pair the param's
  elements with the wrong gradient elements) or, kept from before the change, of the old
  shape (torch's step raises there: the full path's check does too);
- a gradient for every param, a plain (``torch.Tensor``) contiguous tensor of the recorded
  dtype and shape (``zero_grad`` sets gradients to None: fresh tensors at every step are
  the norm; a gradient kept from step to step may have been given other data in place).
  Contiguous and of the param's shape, it is walked as the param (its strides may differ only
  in dimensions of size 1).

What is not seen, as ``multi_tensor.check`` does not see it: a state tensor given another
shape or dtype at the same address (never done by torch.optim or fusedmlp).

Anything else, and any failed test, takes the full path, which may record a new plan. Each
verification is one C-level walk (``map``) over the tensors, no Python frame per tensor.
"""

from __future__ import annotations

import operator
from itertools import chain

import torch

from ..backend import get_backend

_GRAD = operator.attrgetter("grad")
_DTYPE = operator.attrgetter("dtype")
_SHAPE_DTYPE = operator.attrgetter("shape", "dtype")
_DATA_PTR, _SIZE = torch.Tensor.data_ptr, torch.Tensor.size
_IS_CONTIGUOUS = torch.Tensor.is_contiguous
_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))
_is = operator.is_


def _addresses(params, lists) -> tuple:
    return tuple(chain(map(_DATA_PTR, params), *[map(_DATA_PTR, lst) for lst in lists]))


class Plan:
    """What a full step of one param group established (module docstring). ``lists``: the
    state tensors under ``keys`` (one list per key, in the params' order); ``extra``: whatever
    the optimizer keeps with the plan (e.g. its launch tables)."""

    __slots__ = (
        "group", "state", "backend", "keys", "params", "addresses", "state_keys", "state_values",
        "states", "lists", "dtype", "sizes", "meta", "extra",
    )  # fmt: skip

    def __init__(self, optimizer, group, keys: tuple, params: list, lists, extra):
        state = optimizer.state
        self.group, self.state, self.backend, self.keys = group, state, get_backend(), keys
        self.params = list(params)
        self.addresses = _addresses(params, lists)
        self.state_keys, self.state_values = list(state), list(state.values())
        # .get: a defaultdict would create the entries of params without state (SGD without
        # momentum keeps none)
        self.states = list(map(state.get, params))
        # held, not read: while the plan lives no other tensor can take these addresses
        self.lists = [list(x) for x in lists]
        self.dtype = params[0].dtype
        self.sizes = list(map(_SIZE, params))
        self.meta = list(map(_SHAPE_DTYPE, params))
        self.extra = extra


def _plans(optimizer) -> dict:
    return optimizer.__dict__.setdefault("_fusedmlp_plans", {})


def record(optimizer, group, keys: tuple, params: list, lists, extra=None) -> None:
    """Keep a ``Plan`` for ``group``: its ``params`` (every param of the group, contiguous,
    each with a gradient of its dtype, shape and strides) and their state tensors ``lists`` under
    ``keys``, as the full step just used them."""
    _plans(optimizer)[id(group)] = Plan(optimizer, group, keys, params, lists, extra)


def forget(optimizer, group) -> None:
    """Drop ``group``'s plan (its step left the common path)."""
    _plans(optimizer).pop(id(group), None)


def forget_all(optimizer) -> None:
    """Drop every plan (``load_state_dict``: no plan may keep the old state tensors alive)."""
    optimizer.__dict__.pop("_fusedmlp_plans", None)


def prune(optimizer) -> None:
    """Drop the plans (and Adam's step-counter buffers, ``_fusedmlp_steps``) of param groups
    that are no longer in ``optimizer.param_groups`` (a group deleted or replaced by another
    dict): each holds its group's params and state tensors, which would otherwise live as long
    as the optimizer. A cache's key is the id of the group its entry holds (alive, so no live
    group can share that id): an entry is stale exactly when its key is no live group's id.
    (Not a length test: a live group without a plan left a removed group's plan unseen.)"""
    live = None
    for name in ("_fusedmlp_plans", "_fusedmlp_steps"):
        cache = optimizer.__dict__.get(name)
        if cache:
            if live is None:
                live = set(map(id, optimizer.param_groups))
            if not live.issuperset(cache):
                for key in [k for k in cache if k not in live]:
                    del cache[key]


def hit(optimizer, group, keys: tuple):
    """``(plan, params, grads, lists, grad_ptrs)`` when ``group``'s plan still holds (module
    docstring), else None. ``lists``: the state tensors under ``keys``; ``grad_ptrs``: the
    gradients' addresses, in order."""
    plan = _plans(optimizer).get(id(group))
    state = optimizer.state
    if (
        plan is None
        or plan.group is not group
        or plan.state is not state
        or plan.keys != keys
        or plan.backend != get_backend()
    ):
        return None
    params = group["params"]
    if (
        len(params) != len(plan.params)
        or False in map(_is, params, plan.params)
        or len(state) != len(plan.state_keys)
        or False in map(_is, state, plan.state_keys)
        or False in map(_is, state.values(), plan.state_values)
    ):
        return None
    try:
        lists = [list(map(operator.itemgetter(k), plan.states)) for k in keys]
    except (KeyError, TypeError):  # an entry gone from a param's state
        return None
    # The recorded state tensors themselves, not only their addresses: a view put in the state
    # in their place (``state["exp_avg"] = exp_avg.t()``, ``.view(-1)``, ``[:1]``) starts at
    # the same address with other strides or another shape (the kernel's flat walk would pair
    # its elements with the wrong gradient elements, or update what torch's step refuses).
    if False in map(_is, chain.from_iterable(lists), chain.from_iterable(plan.lists)):
        return None
    try:
        if _addresses(params, lists) != plan.addresses:
            return None
    except (TypeError, RuntimeError):  # a state entry that is no tensor with storage now
        return None
    grads = list(map(_GRAD, params))
    try:
        grad_ptrs = tuple(map(_DATA_PTR, grads))  # raises for None, or a tensor without storage
    except (TypeError, RuntimeError):
        return None
    if (
        not _PLAIN.issuperset(map(type, grads))
        or set(map(_DTYPE, grads)) != {plan.dtype}
        or list(map(_SIZE, grads)) != plan.sizes
        or not all(map(_IS_CONTIGUOUS, grads))
        # a .data view at the same address: other strides, or another shape or dtype, which a
        # gradient kept from before no longer matches
        or not all(map(_IS_CONTIGUOUS, params))
        or list(map(_SHAPE_DTYPE, params)) != plan.meta
    ):
        return None
    return plan, params, grads, lists, grad_ptrs


__all__ = ["Plan", "forget", "forget_all", "hit", "prune", "record"]
