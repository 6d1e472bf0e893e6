"""``fusedmlp.nn.convert``: swap torch's modules for fusedmlp's in any module tree.

Replaced (only when the module's type is *exactly* the torch class: subclasses, lazy modules
that are not materialised yet, parametrized modules, modules whose parameters or buffers
were renamed or extended, as by the hook-based ``torch.nn.utils.weight_norm`` or
``spectral_norm``, ``torch.nn.utils.prune`` or a user's extra buffer, modules with a
``forward`` of their own (an instance attribute, as accelerate's device hooks set) and
TorchScript modules with all they hold are left alone):

    torch.nn.Linear                  -> fusedmlp.nn.Linear
    torch.nn.BatchNorm1d / 2d        -> fusedmlp.nn.BatchNorm1d / 2d
    torch.nn.Dropout / Dropout2d     -> fusedmlp.nn.Dropout / Dropout2d
    torch.nn.Softmax / LogSoftmax    -> fusedmlp.nn.Softmax / LogSoftmax
    torch.nn.CrossEntropyLoss        -> fusedmlp.nn.CrossEntropyLoss
    torch.nn.NLLLoss                 -> fusedmlp.nn.NLLLoss

Fusion: a container whose type is exactly ``torch.nn.Sequential`` and that, after conversion,
holds ``BatchNorm1d -> activation -> Dropout`` or ``Linear -> activation -> Dropout`` (and no
child with a ``forward`` of its own, which a fused block would not run) becomes a
``fusedmlp.nn.fused_block.FusedSequential`` (its class is swapped in place: same object, same
children, same ``state_dict`` keys, still a ``torch.nn.Sequential``), whose forward runs those
blocks fused on the Triton path in training mode.

Absorption: inside a container whose ``forward`` is ``torch.nn.Sequential``'s (so the Linear's
output feeds only the next module), a ReLU, LeakyReLU, Sigmoid, Tanh, GELU (approximate="none")
or SiLU that directly follows a converted Linear becomes that Linear's fused activation and is
replaced by ``torch.nn.Identity`` (no parameters, so ``state_dict`` keys do not change). It is
skipped when it could change what someone observes: the Linear is shared (held in more than
one place of the tree; a Sequential held twice, as a block applied twice, still absorbs) or has
forward or backward hooks, the activation has hooks or a ``forward`` of its own, or a global
module hook is registered. An out-of-place LeakyReLU with ``negative_slope >= 0`` is absorbed
only where its output feeds a Linear or BatchNorm (after Identities or out-of-place Dropouts):
torch's LeakyReLU keeps its input for backward, the fused Linear its output, so an in-place
edit of that output would otherwise stop backpropagating. What convert cannot see is code that
calls a Sequential's children one by one (``self.seq[0](x)`` read as a pre-activation feature,
a slice ``self.seq[1:]``): there the Linear now returns the activation's output and the
activation's slot is the identity; convert such a model's other parts only. Nor can it see
edits made after the conversion, which meet the converted layout, not torch's: a forward hook
registered later on such a Linear (or a global module hook) sees the activation's output, and
replacing or deleting the Identity in the activation's slot, or setting a ``negative_slope``
on it, leaves the Linear's ``activation`` and ``negative_slope`` as they are (edit those, or
make such changes before converting).

The new modules hold the very Parameter and buffer objects of the old ones, so weights, buffers,
``requires_grad``, device, dtype, non-persistent buffers and train/eval mode are kept, and the
module's hooks are carried over (its very hook dicts: the handles a user holds still remove
them). ``inplace=False`` converts a deep copy (the original is
untouched); ``inplace=True`` edits the tree itself and keeps the same Parameter objects, so an
optimizer built before still works. Always use the return value: a root that is itself a
replaced module (``convert(torch.nn.Linear(2, 3))``) can only be returned, not edited.
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch.nn.modules import module as _module
from torch.nn.utils import parametrize

from . import activation as _activation
from . import batchnorm as _batchnorm
from . import dropout as _dropout
from . import fused_block as _fused_block
from . import linear as _linear
from . import loss as _loss

# A module's own hook dicts: those a fused block checks, and the state-dict hooks it carries over.
_HOOK_DICTS = _fused_block.MODULE_HOOKS + (
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _factory_linear(m: torch.nn.Linear, activation=None, negative_slope=0.01):
    return _linear.Linear(
        m.in_features,
        m.out_features,
        bias=m.bias is not None,
        activation=activation,
        negative_slope=negative_slope,
        device="meta",
    )


def _factory_batchnorm(cls):
    def make(m):
        # torch >= 2.8 has BatchNorm(..., bias=False): affine, but no bias Parameter
        extra = {"bias": False} if m.affine and m.bias is None else {}
        return cls(
            m.num_features,
            eps=m.eps,
            momentum=m.momentum,
            affine=m.affine,
            track_running_stats=m.track_running_stats,
            device="meta",
            **extra,
        )

    return make


def _factory_cross_entropy(m: torch.nn.CrossEntropyLoss):
    return _loss.CrossEntropyLoss(
        ignore_index=m.ignore_index, reduction=m.reduction, label_smoothing=m.label_smoothing
    )


def _factory_nll(m: torch.nn.NLLLoss):
    return _loss.NLLLoss(ignore_index=m.ignore_index, reduction=m.reduction)


def _replacements() -> dict:
    """Exact torch type -> factory building the (parameter-less, meta) fusedmlp module."""
    return {
        torch.nn.Linear: _factory_linear,
        torch.nn.BatchNorm1d: _factory_batchnorm(_batchnorm.BatchNorm1d),
        torch.nn.BatchNorm2d: _factory_batchnorm(_batchnorm.BatchNorm2d),
        torch.nn.Dropout: lambda m: _dropout.Dropout(m.p, inplace=m.inplace),
        torch.nn.Dropout2d: lambda m: _dropout.Dropout2d(m.p, inplace=m.inplace),
        torch.nn.Softmax: lambda m: _activation.Softmax(dim=m.dim),
        torch.nn.LogSoftmax: lambda m: _activation.LogSoftmax(dim=m.dim),
        torch.nn.CrossEntropyLoss: _factory_cross_entropy,
        torch.nn.NLLLoss: _factory_nll,
    }


def _absorbable(act: torch.nn.Module) -> tuple[str, float] | None:
    """(activation name, negative_slope) when ``act`` can be fused into a preceding Linear:
    the fused block's activations, Identity excepted (there is nothing to absorb)."""
    found = _fused_block.activation_of(act)
    return None if found is None or found[0] is None else found


def _has_hooks(m: torch.nn.Module, names=_HOOK_DICTS) -> bool:
    return any(getattr(m, name, None) for name in names)


def _absorption_keeps_autograd(
    act: tuple[str, float], nxt: torch.nn.Module, parent: torch.nn.Module, names: list, j: int
) -> bool:
    """Whether absorbing ``nxt`` (activation ``act``) leaves what autograd lets a caller do
    unchanged. fusedmlp's Linear keeps its OUTPUT for the backward of relu, sigmoid, tanh and
    leaky_relu with ``negative_slope >= 0``: torch's ReLU, Sigmoid and Tanh keep theirs too,
    but an out-of-place LeakyReLU keeps its input, so with torch an in-place edit of its output
    (``out += x``, a ``ReLU(inplace=True)`` after it) still backpropagates, and after absorption
    it would raise. Such a LeakyReLU is absorbed only where its output feeds a module that does
    not edit it in place (``fused_block.output_stays_inside`` from ``parent``'s child ``names[j]`` on)."""
    name, slope = act
    if name != "leaky_relu" or slope < 0 or getattr(nxt, "inplace", False):
        return True
    return _fused_block.output_stays_inside([parent._modules[n] for n in names], j)


def _own_forward(m: torch.nn.Module) -> bool:
    """Whether ``m`` has a ``forward`` of its own (an instance attribute, as accelerate's
    device hooks or a user's patch set): that is what ``m(x)`` runs, not its class's."""
    return "forward" in m.__dict__


def _convertible(m: torch.nn.Module, table: dict) -> bool:
    if type(m) not in table:  # exact type: subclasses and (unmaterialised) lazy modules stay
        return False
    if _own_forward(m):  # fusedmlp's module would run its class's forward, not this one
        return False
    if parametrize.is_parametrized(m):
        return False
    if isinstance(m, torch.nn.modules.lazy.LazyModuleMixin):
        return False
    return not any(
        isinstance(t, torch.nn.parameter.UninitializedTensorMixin)
        for t in list(m._parameters.values()) + list(m._buffers.values())
    )


def _transplant(old: torch.nn.Module, new: torch.nn.Module) -> torch.nn.Module | None:
    """Move ``old``'s Parameter and buffer objects, mode, hooks and the attributes a user set
    on it into ``new``; None (``old`` stays) when their parameter or buffer names differ: a
    module that something else reshaped, e.g. ``torch.nn.utils.weight_norm``/``spectral_norm``
    (``weight_g``, ``weight_orig``, ...) or a user's extra buffer, whose forward fusedmlp's
    module would not reproduce."""
    if set(new._parameters) != set(old._parameters) or set(new._buffers) != set(old._buffers):
        return None
    for name, value in old._parameters.items():
        new._parameters[name] = value
    for name, value in old._buffers.items():
        new._buffers[name] = value
    new._non_persistent_buffers_set = set(old._non_persistent_buffers_set)
    new.training = old.training
    for name in _HOOK_DICTS:
        if hasattr(old, name) and hasattr(new, name):
            # the very dicts (as the Parameters): the handles a user holds keep working
            setattr(new, name, getattr(old, name))
    # ``register_load_state_dict_pre_hook`` wraps the hook in a ``_WrappedHook`` that holds a
    # weak reference to the module it was registered on and passes that module to the hook:
    # rebound to ``new``, or ``load_state_dict`` would hand the hook the replaced module, or
    # raise "the hook of a dead Module" once ``old`` is gone (as ``copy.deepcopy`` rebinds it)
    for hook in new._load_state_dict_pre_hooks.values():
        if isinstance(hook, _module._WrappedHook) and hook.with_module and hook.module() is old:
            hook.module = weakref.ref(new)
    # Which kind of backward hook ``_backward_hooks`` holds (full or legacy): without it torch
    # runs neither kind.
    new.__dict__["_is_full_backward_hook"] = old.__dict__.get("_is_full_backward_hook")
    # What else ``old`` holds that ``new`` does not, e.g. a user's ``m.tag = ...``, as
    # ``copy.deepcopy`` keeps it (never over what ``new`` defines itself)
    for name, value in old.__dict__.items():
        if name not in new.__dict__ and not hasattr(type(new), name):
            new.__dict__[name] = value
    return new


def _replace(m: torch.nn.Module, table: dict, memo: dict, act=None) -> torch.nn.Module | None:
    """fusedmlp's module for ``m`` (once per module and activation), or None (``_transplant``)."""
    key = (id(m), act)
    if key not in memo:
        if act is None:
            new = table[type(m)](m)
        else:
            new = _factory_linear(m, activation=act[0], negative_slope=act[1])
        memo[key] = (m, _transplant(m, new))  # holding m keeps its id unique meanwhile
    return memo[key][1]


def _supports_activation(act: tuple[str, float]) -> bool:
    """Whether fusedmlp's Linear accepts this fused activation (GELU/SiLU are optional)."""
    try:
        _linear.Linear(1, 1, activation=act[0], negative_slope=act[1], device="meta")
    except (ValueError, NotImplementedError, TypeError):
        return False
    return True


def _is_sequential_chain(m: torch.nn.Module) -> bool:
    return (
        isinstance(m, torch.nn.Sequential)
        and type(m).forward in (torch.nn.Sequential.forward, _fused_block.FusedSequential.forward)
        and not _own_forward(m)
    )


def _global_hooks() -> bool:
    """Whether a global module hook (``torch.nn.modules.module.register_module_forward_hook``
    and the like) is registered: it sees every module's input and output, so an absorbed
    activation would change what it sees (the FusedSequential does not fuse then either)."""
    return any(getattr(_module, name, None) for name in _fused_block._GLOBAL_HOOKS)


def _walk(
    parent: torch.nn.Module, table: dict, memo: dict, counts: dict, done: dict, absorb: bool
) -> None:
    if id(parent) in done:  # shared sub-trees are converted once
        return
    done[id(parent)] = parent
    if isinstance(parent, torch.jit.ScriptModule):  # compiled code calls its own submodules
        return
    names = list(parent._modules)
    chain = absorb and _is_sequential_chain(parent)
    i = 0
    while i < len(names):
        name = names[i]
        child = parent._modules[name]
        if child is None:
            i += 1
            continue
        if _convertible(child, table):
            act = None
            if chain and type(child) is torch.nn.Linear and i + 1 < len(names):
                nxt = parent._modules[names[i + 1]]
                cand = _absorbable(nxt) if nxt is not None else None
                if (
                    cand is not None
                    and counts[id(child)] == 1
                    and not _has_hooks(
                        child,
                        (
                            "_forward_hooks",
                            "_forward_hooks_with_kwargs",
                            "_backward_hooks",
                            "_backward_pre_hooks",
                        ),
                    )
                    and not _has_hooks(nxt)
                    and not _own_forward(nxt)
                    and _supports_activation(cand)
                    and _absorption_keeps_autograd(cand, nxt, parent, names, i + 2)
                ):
                    act = cand
            new = _replace(child, table, memo, act)
            if new is None and act is not None:  # not convertible: the activation stays too
                act = None
            if new is not None:
                parent._modules[name] = new
            if act is not None:
                identity = torch.nn.Identity()
                identity.training = parent._modules[names[i + 1]].training
                parent._modules[names[i + 1]] = identity
                i += 2
                continue
        else:
            _walk(child, table, memo, counts, done, absorb)
        i += 1
    # Cross-layer fusion: a plain Sequential now holding BatchNorm1d -> act -> Dropout or
    # Linear -> act -> Dropout becomes a FusedSequential (same object, children and keys),
    # unless a child has a forward of its own (a fused block would not run it).
    if not any(m is not None and _own_forward(m) for m in parent._modules.values()):
        _fused_block.fuse_sequential(parent)


def convert(module: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
    """Replace torch's Linear, BatchNorm1d/2d, Dropout/Dropout2d, Softmax/LogSoftmax,
    CrossEntropyLoss and NLLLoss modules in ``module``'s tree by fusedmlp's (see module doc).

    Args:
        module: any ``torch.nn.Module`` (a Sequential, a custom model, a single layer).
        inplace: edit ``module`` itself, keeping its Parameter objects (an optimizer built on
            them keeps working); otherwise convert and return a deep copy (torch cannot
            deep-copy a model with the hook-based ``weight_norm`` or ``prune`` in it: a
            ``RuntimeError`` says to pass ``inplace=True``).

    Returns:
        The converted module: ``module`` itself when ``inplace`` (unless the root itself was
        replaced), else the converted copy. ``state_dict`` keys and values are unchanged.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(
            f"fusedmlp.nn.convert: expected a torch.nn.Module, got {type(module).__name__}"
        )
    if not inplace:
        try:
            module = copy.deepcopy(module)
        except RuntimeError as e:  # the hook-based weight_norm (a non-leaf weight), prune
            raise RuntimeError(
                f"fusedmlp.nn.convert: torch cannot deep-copy this model ({e}); "
                "convert(model, inplace=True) converts it without a copy"
            ) from e
    table = _replacements()
    # How many places (parent, name) hold each module: a Linear held by one Sequential only
    # (shared or not, as a block applied twice) feeds only that Sequential's next module.
    places: dict[int, set] = {}
    for parent in module.modules():
        for name, child in parent._modules.items():
            if child is not None:
                places.setdefault(id(child), set()).add((id(parent), name))
    counts = {key: len(value) for key, value in places.items()}
    memo: dict = {}
    if _convertible(module, table):
        return _replace(module, table, memo) or module
    _walk(module, table, memo, counts, {}, not _global_hooks())
    return module
