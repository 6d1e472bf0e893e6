"""Drop-in ``torch.nn.BatchNorm1d`` / ``BatchNorm2d`` on fusedmlp's batch-norm op.

They subclass torch's own classes, so constructor arguments, parameters and buffers
(``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``),
initialisation, ``state_dict``/``_load_from_state_dict`` (old checkpoints without
``num_batches_tracked``), ``_check_input_dim`` errors and ``extra_repr`` are torch's. Only
``forward`` differs: torch's logic, with the math through ``fusedmlp``'s batch norm, and the
cumulative average (``momentum=None``) read from ``num_batches_tracked`` on the device
instead of ``float(num_batches_tracked)`` (a host sync) on the Triton path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..autograd.batchnorm import _batch_norm
from ._fx import fx_leaf


class _FusedBatchNormForward:
    """torch's ``_BatchNorm.forward`` with the math routed through fusedmlp."""

    def forward(self, input: Tensor) -> Tensor:
        if type(input) is not Tensor and (node := fx_leaf(self, input)) is not None:
            return node
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        cumulative = None
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative moving average
                    cumulative = self.num_batches_tracked
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        # buffers are passed only when they are updated (training and tracked) or used (eval)
        use_buffers = not self.training or self.track_running_stats
        return _batch_norm(
            input,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight,
            self.bias,
            bn_training,
            momentum,
            self.eps,
            cumulative,
        )


class BatchNorm1d(_FusedBatchNormForward, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d(num_features, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True, device=None, dtype=None)`` on fusedmlp's kernels.

    Input ``[N, C]`` or ``[N, C, L]``.
    """


class BatchNorm2d(_FusedBatchNormForward, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d(num_features, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True, device=None, dtype=None)`` on fusedmlp's kernels.

    Input ``[N, C, H, W]``, any memory format (channels_last included).
    """


__all__ = ["BatchNorm1d", "BatchNorm2d"]
