"""Drop-in ``torch.nn.CrossEntropyLoss`` and ``torch.nn.NLLLoss``.

Subclasses of torch's modules: the same constructor (``weight`` registered as a buffer, the
deprecated ``size_average``/``reduce`` folded into ``reduction``), ``extra_repr`` and
``state_dict``; ``forward`` calls ``fusedmlp.functional``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..autograd.cross_entropy import cross_entropy, nll_loss
from ._fx import fx_leaf


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss(weight=None, size_average=None, ignore_index=-100,
    reduce=None, reduction="mean", label_smoothing=0.0)`` on the fused softmax + NLL kernel."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if type(input) is not Tensor or type(target) is not Tensor:
            node = fx_leaf(self, input, target)
            if node is not None:
                return node
        return cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )


class NLLLoss(torch.nn.NLLLoss):
    """``torch.nn.NLLLoss(weight=None, size_average=None, ignore_index=-100, reduce=None,
    reduction="mean")`` (torch's implementation: see ``fusedmlp.functional.nll_loss``)."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if type(input) is not Tensor or type(target) is not Tensor:
            node = fx_leaf(self, input, target)
            if node is not None:
                return node
        return nll_loss(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
        )


__all__ = ["CrossEntropyLoss", "NLLLoss"]
