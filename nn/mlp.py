"""``fusedmlp.nn.MLP``: a multi-layer perceptron built from fusedmlp's modules.

Layout (the ``state_dict`` keys are a contract)::

    layers = Sequential(
        # per hidden layer i, in order:
        Linear(in, h_i)                  # activation fused in when batchnorm=False
        BatchNorm1d(h_i)                 # only when batchnorm=True
        <activation> or Identity         # Identity when the activation is fused into the Linear
        Dropout(dropout)                 # only when dropout > 0
        ...
        Linear(h_last, out_features)     # the head: no activation
    )

so the keys are ``layers.<index>.weight`` / ``.bias`` (and BatchNorm's ``running_mean``,
``running_var``, ``num_batches_tracked``), exactly the keys of the same chain written with
``torch.nn`` modules (``Linear, [BatchNorm1d], ReLU, [Dropout], ..., Linear``) and of
``fusedmlp.nn.convert`` applied to it. :meth:`MLP.to_torch` builds that torch chain.

``layers`` is a :class:`fusedmlp.nn.fused_block.FusedSequential` (a ``torch.nn.Sequential``
subclass with the same children and keys): on the Triton path, in training mode, it runs each
``BatchNorm1d -> activation -> Dropout`` as one fused block (normalise + activation + dropout in
one pass) and each ``Linear(activation) -> Identity -> Dropout`` as the Linear without
activation followed by one activation + dropout pass that saves the output instead of the
pre-activation. Elsewhere (CPU/torch backend, eval mode, hooks) it runs the children in order.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Sequence

import torch
from torch.nn.utils import parametrize

from .batchnorm import BatchNorm1d
from .dropout import Dropout
from .fused_block import MODULE_HOOKS, FusedSequential
from .linear import Linear, slope_value

#: activation name -> torch module factory (``negative_slope`` only for leaky_relu).
_TORCH_ACTIVATIONS = {
    "relu": lambda slope: torch.nn.ReLU(),
    "leaky_relu": lambda slope: torch.nn.LeakyReLU(slope),
    "sigmoid": lambda slope: torch.nn.Sigmoid(),
    "tanh": lambda slope: torch.nn.Tanh(),
    "gelu": lambda slope: torch.nn.GELU(),
    "silu": lambda slope: torch.nn.SiLU(),
}


def _hidden_list(hidden_features) -> list[int]:
    if isinstance(hidden_features, numbers.Integral) and not isinstance(hidden_features, bool):
        hidden = [hidden_features]
    elif isinstance(hidden_features, Sequence) and not isinstance(hidden_features, str):
        hidden = list(hidden_features)
    else:
        raise TypeError(
            "MLP: hidden_features must be an int or a sequence of ints, "
            f"got {type(hidden_features).__name__}"
        )
    if any(_positive_int(h) is None for h in hidden):
        raise ValueError(f"MLP: hidden_features must be positive ints, got {hidden_features!r}")
    return [int(h) for h in hidden]


def _positive_int(value) -> int | None:
    """``value`` as an int when it is a positive integer (numpy's too, as torch.nn.Linear
    takes them; not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        return None
    return int(value)


def _activation_name(activation) -> str | None:
    if activation is None:
        return None
    if not isinstance(activation, str) or activation.lower() not in _TORCH_ACTIVATIONS:
        raise ValueError(
            f"MLP: activation must be None or one of {', '.join(map(repr, _TORCH_ACTIVATIONS))}, "
            f"got {activation!r}"
        )
    return activation.lower()


def _build_layers(
    lib: str,
    in_features: int,
    hidden: list[int],
    out_features: int,
    activation: str | None,
    batchnorm: bool,
    dropout: float,
    bias: bool,
    negative_slope: float,
    factory: dict,
) -> torch.nn.Sequential:
    """The layer chain with fusedmlp modules (``lib="fusedmlp"``) or torch's (``"torch"``)."""
    fused = lib == "fusedmlp"
    layers: list[torch.nn.Module] = []
    prev = in_features
    for h in hidden:
        if fused:
            act_in_linear = None if batchnorm else activation
            layers.append(
                Linear(
                    prev,
                    h,
                    bias=bias,
                    activation=act_in_linear,
                    negative_slope=negative_slope,
                    **factory,
                )
            )
        else:
            layers.append(torch.nn.Linear(prev, h, bias=bias, **factory))
        if batchnorm:
            layers.append((BatchNorm1d if fused else torch.nn.BatchNorm1d)(h, **factory))
        if activation is None or (fused and not batchnorm):
            layers.append(torch.nn.Identity())
        else:
            layers.append(_TORCH_ACTIVATIONS[activation](negative_slope))
        if dropout > 0:
            layers.append((Dropout if fused else torch.nn.Dropout)(dropout))
        prev = h
    layers.append((Linear if fused else torch.nn.Linear)(prev, out_features, bias=bias, **factory))
    return (FusedSequential if fused else torch.nn.Sequential)(*layers)


class MLP(torch.nn.Module):
    """Multi-layer perceptron on fusedmlp's fused modules.

    Args:
        in_features: input size.
        hidden_features: an int (one hidden layer) or a sequence of ints (one layer per entry).
        out_features: output size (the head is a plain Linear: logits, no activation).
        activation: None, "relu", "leaky_relu", "sigmoid", "tanh", "gelu" or "silu".
        batchnorm: per hidden layer Linear -> BatchNorm1d -> activation; without it the
            activation is fused into the Linear's epilogue.
        dropout: probability of the Dropout after each hidden activation (0 = no Dropout module).
        bias: whether the Linear layers have a bias.
        negative_slope: slope of "leaky_relu".
        device, dtype: where and in which dtype the parameters are created.

    The module holds one ``torch.nn.Sequential`` named ``layers`` (see the module docstring for
    the exact layout and ``state_dict`` keys, which equal those of :meth:`to_torch`'s chain).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | Sequence[int],
        out_features: int,
        activation: str | None = "relu",
        batchnorm: bool = False,
        dropout: float = 0.0,
        bias: bool = True,
        negative_slope: float = 0.01,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if _positive_int(value) is None:
                raise ValueError(f"MLP: {name} must be a positive int, got {value!r}")
        in_features, out_features = int(in_features), int(out_features)
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
            raise TypeError(f"MLP: dropout must be a float, got {type(dropout).__name__}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"MLP: dropout must be in [0, 1), got {dropout!r}")
        self.in_features = in_features
        self.hidden_features = tuple(_hidden_list(hidden_features))
        self.out_features = out_features
        self.activation = _activation_name(activation)
        self.batchnorm = bool(batchnorm)
        self.dropout = float(dropout)
        self.bias = bool(bias)
        self.negative_slope = slope_value(negative_slope, "MLP")
        self.layers = _build_layers(
            "fusedmlp",
            in_features,
            list(self.hidden_features),
            out_features,
            self.activation,
            self.batchnorm,
            self.dropout,
            self.bias,
            self.negative_slope,
            {"device": device, "dtype": dtype},
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.layers(input)

    def to_torch(self) -> torch.nn.Module:
        """The same network written with ``torch.nn`` modules only, as a separate copy.

        Same ``state_dict`` keys and values (parameters, running statistics), same device,
        dtype, ``requires_grad`` flags and train/eval mode: the reference model for comparisons.
        Built from the modules as they are now, not from the constructor's arguments: what was
        changed since (a Dropout's ``p`` or ``inplace``, a BatchNorm's ``eps``, ``momentum`` or
        ``track_running_stats``, a Linear's ``negative_slope`` or activation, a bias set to
        None, an extra buffer, a parametrization) is in the twin too. Hooks are not copied,
        except torch's hook-based ``weight_norm``, ``spectral_norm`` and ``prune``, which
        make the weight.
        """
        # A deep copy keeps each tensor's own dtype and device (a half model whose BatchNorms
        # were kept in float32 stays so), Parameter ties, requires_grad, modes and attributes;
        # then each fusedmlp module becomes the torch class it derives from (only ``forward``
        # differs), and a Linear's fused activation goes into the Identity slot after it.
        layers = copy.deepcopy(self.layers)
        names = list(layers._modules)
        for i, name in enumerate(names):
            m = layers._modules[name]
            if not isinstance(m, Linear) or m.activation is None:
                continue
            slot = names[i + 1] if i + 1 < len(names) else None
            nxt = layers._modules[slot] if slot is not None else None
            if type(nxt) is not torch.nn.Identity:
                raise ValueError(
                    f"MLP.to_torch: layers.{name} has the fused activation {m.activation!r} but "
                    "no Identity after it to hold torch's activation module"
                )
            act = _TORCH_ACTIVATIONS[m.activation](m.negative_slope)
            act.training = nxt.training
            layers._modules[slot] = act
        for m in layers.modules():
            _as_torch_module(m)
        ref = _TorchMLP()
        ref.layers = layers
        ref.training = self.training
        return ref

    def extra_repr(self) -> str:
        slope = f", negative_slope={self.negative_slope}" if self.activation == "leaky_relu" else ""
        return (
            f"in_features={self.in_features}, hidden_features={list(self.hidden_features)}, "
            f"out_features={self.out_features}, activation={self.activation!r}{slope}, "
            f"batchnorm={self.batchnorm}, dropout={self.dropout}, bias={self.bias}"
        )


# Where torch's hook-based reparametrizations (weight_norm, spectral_norm, prune) live.
_UTILS = "torch.nn.utils."


def _torch_base(cls: type) -> type:
    """The torch class that fusedmlp's class ``cls`` derives from."""
    return next((b for b in cls.__mro__ if b.__module__.startswith("torch.nn.")), torch.nn.Module)


def _as_torch_module(m: torch.nn.Module) -> None:
    """Turn ``m`` (a copy) into the torch class its fusedmlp class derives from, in place
    (fusedmlp's modules and ``FusedSequential`` subclass torch's and only change ``forward``),
    and drop its forward and backward hooks, but for torch's hook-based reparametrizations."""
    cls = type(m)
    fused = cls.__module__.startswith("fusedmlp.")
    if fused:
        m.__class__ = _torch_base(cls)
    elif parametrize.is_parametrized(m) and cls.__bases__[0].__module__.startswith("fusedmlp."):
        # A parametrization registered on one of the MLP's modules put torch's
        # ``Parametrized<Name>`` class (which holds the parametrized properties) over the
        # fusedmlp class: the same class over the torch base instead, or the twin would run
        # fusedmlp's forward, a Linear's fused activation on top of the one in its slot.
        # ``remove_parametrizations`` restores ``__bases__[0]``: then the torch class.
        fused = True
        body = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
        m.__class__ = type(cls.__name__, (_torch_base(cls.__bases__[0]),), body)
    if fused and isinstance(m, torch.nn.Linear):
        for attr in ("activation", "negative_slope"):
            m.__dict__.pop(attr, None)
    for name in MODULE_HOOKS:
        hooks = getattr(m, name, None)
        if hooks:
            # torch's hook-based reparametrizations (weight_norm, spectral_norm, prune: objects
            # of torch.nn.utils) compute the weight before each forward: without them the twin
            # would keep the weight of the last forward and give its sources no gradient
            kept = [(k, h) for k, h in hooks.items() if type(h).__module__.startswith(_UTILS)]
            setattr(m, name, type(hooks)(kept))


class _TorchMLP(torch.nn.Module):
    """Plain-torch twin of :class:`MLP` (built by :meth:`MLP.to_torch`)."""

    layers: torch.nn.Sequential

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.layers(input)
