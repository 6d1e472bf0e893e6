"""Drop-in ``torch.nn.Softmax`` and ``torch.nn.LogSoftmax`` (``dim=None`` follows torch's
implicit-dimension rule with its deprecation warning)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..autograd.softmax import log_softmax, softmax
from ._fx import fx_leaf


class Softmax(torch.nn.Softmax):
    """``torch.nn.Softmax(dim=None)`` on fusedmlp's softmax kernels."""

    def forward(self, input: Tensor) -> Tensor:
        if type(input) is not Tensor and (node := fx_leaf(self, input)) is not None:
            return node
        return softmax(input, self.dim, _stacklevel=5)


class LogSoftmax(torch.nn.LogSoftmax):
    """``torch.nn.LogSoftmax(dim=None)`` on fusedmlp's log-softmax kernels."""

    def forward(self, input: Tensor) -> Tensor:
        if type(input) is not Tensor and (node := fx_leaf(self, input)) is not None:
            return node
        return log_softmax(input, self.dim, _stacklevel=5)


__all__ = ["LogSoftmax", "Softmax"]
