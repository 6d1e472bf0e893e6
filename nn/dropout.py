"""Drop-in ``torch.nn.Dropout`` and ``torch.nn.Dropout2d`` backed by fusedmlp's dropout.

They subclass torch's modules (same constructor, ``p``/``inplace`` attributes, validation,
``extra_repr``, and ``isinstance(m, torch.nn.Dropout)`` still holds) and only replace
``forward``. On CUDA tensors the masks come from fusedmlp's Philox kernel: reproducible under
``torch.manual_seed``, not bit-identical to torch's own masks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..autograd.dropout import dropout, dropout2d
from ._fx import fx_leaf


class Dropout(torch.nn.Dropout):
    """Inverted dropout: zeroes each element with probability ``p`` during training and scales
    the kept ones by ``1/(1-p)``; identity in eval mode. ``torch.nn.Dropout``'s arguments.

    Masks are reproducible under fusedmlp's seed (``torch.manual_seed``) but not bit-identical
    to ``torch.nn.Dropout``'s. No mask is stored for backward on the Triton path.
    """

    def forward(self, input: Tensor) -> Tensor:
        if type(input) is not Tensor and (node := fx_leaf(self, input)) is not None:
            return node
        return dropout(input, self.p, self.training, self.inplace)


class Dropout2d(torch.nn.Dropout2d):
    """Channel-wise dropout: zeroes whole channels (one decision per (sample, channel) of
    ``[N, C, H, W]``; a 3-D input is read as ``[N, C, L]``, with torch's warning) with
    probability ``p`` during training and scales the kept ones by ``1/(1-p)``.
    ``torch.nn.Dropout2d``'s arguments.

    Masks are reproducible under fusedmlp's seed but not bit-identical to torch's.
    """

    def forward(self, input: Tensor) -> Tensor:
        if type(input) is not Tensor and (node := fx_leaf(self, input)) is not None:
            return node
        return dropout2d(input, self.p, self.training, self.inplace)


__all__ = ["Dropout", "Dropout2d"]
