"""Drop-in ``torch.nn.Linear`` with a fused activation: ``act(x @ W^T + b)``."""

from __future__ import annotations

import torch

from ..autograd.linear import check_activation
from ..autograd.linear import linear as fused_linear
from ..backend import float_arg
from ._fx import fx_leaf


def slope_value(negative_slope, owner: str) -> float:
    """``negative_slope`` as a float: a real number or a 0-d real tensor that does not require
    grad, as ``torch.nn.LeakyReLU``'s forward takes it (``float`` alone would also read a
    string such as "0.5")."""
    if not float_arg(negative_slope):
        raise TypeError(
            f"{owner}: negative_slope must be a real number, got {type(negative_slope).__name__}"
        )
    return float(negative_slope)


class Linear(torch.nn.Linear):
    """``torch.nn.Linear`` followed by ``activation``, computed by one fused op.

    Parameters ``weight`` ``[out_features, in_features]`` and ``bias`` ``[out_features]`` are
    created and initialised by ``torch.nn.Linear`` itself (same names, shapes, init and RNG
    draws), so ``state_dict`` loads both ways. ``activation``: None, "relu", "leaky_relu"
    (with ``negative_slope``), "sigmoid", "tanh", "gelu" (erf form) or "silu".
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str | None = None,
        negative_slope: float = 0.01,
        device=None,
        dtype=None,
    ) -> None:
        check_activation(activation)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation
        self.negative_slope = slope_value(negative_slope, "Linear")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if type(input) is not torch.Tensor and (node := fx_leaf(self, input)) is not None:
            return node
        return fused_linear(input, self.weight, self.bias, self.activation, self.negative_slope)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.activation is not None:
            s += f", activation={self.activation}"
        if self.activation == "leaky_relu":
            s += f", negative_slope={self.negative_slope}"
        return s


class LinearReLU(Linear):
    """``Linear`` with a fused ReLU (named after ``torch.ao.nn.intrinsic.LinearReLU``)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__(
            in_features, out_features, bias=bias, activation="relu", device=device, dtype=dtype
        )


__all__ = ["Linear", "LinearReLU"]
