"""A one-shot handover between two autograd Functions of one fused forward.

On the "dz" backward path a Linear without activation transposes the gradient of its output
(dZ^T, for its dW GEMM, whose fp32 operands TF32 reads K-major only) and sums its columns (db):
one pass over dZ. When a fused BatchNorm block reads that Linear's output, the block's backward
makes that gradient, in a pass of its own; that pass can write dZ^T and the column sums beside
it (``fusedmlp.kernels.fused_block``'s ``TRANSPOSED``), and the Linear's pass is not needed.

``FusedSequential`` gives the two Functions one ``Handover`` in the forward: the Linear's sets
``want`` (its backward takes the "dz" path with a transposed dZ and it computes dW), the
block's backward ``give``s what it made with the gradient it returns, and the Linear's backward
``take``s it only for the very tensor the block returned, unmodified since (object identity
and version counter). A gradient that autograd summed with another (the Linear's output read
elsewhere too), or that a hook replaced or changed in place, is another object or version:
the Linear then makes its own, as without the handover.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import Variable


class Handover:
    """The slot (module docstring)."""

    __slots__ = ("want", "_grad", "_version", "_made", "_gives")

    def __init__(self) -> None:
        self.want = False
        self._grad = self._version = self._made = None
        self._gives = 0

    def give(self, grad: Tensor, made: tuple) -> None:
        """The block's backward: ``made`` belongs to ``grad``, the gradient it returns."""
        if torch.compiler.is_compiling():
            # dynamo traces this backward (compiled autograd): no handover, the Linear makes
            # its own. (Its queue_callback below raises AssertionError without fullgraph=True,
            # and take's version test is a data-dependent guard with it.)
            return
        self._grad, self._version, self._made = grad, grad._version, made
        self._gives += 1
        # Not taken when the Linear's backward does not run in this pass (torch.autograd.grad
        # or backward(inputs=...) that stops at the block): empty the slot when the pass ends,
        # or dx, dx^T and its column sums stay in the graph as long as it lives. (The callback
        # holds no tensor: dx dies once the Linear has used it, as before.)
        gives = self._gives
        try:
            Variable._execution_engine.queue_callback(lambda: self._drop(gives))
        except RuntimeError:  # not inside an engine's backward pass
            pass

    def _drop(self, gives: int) -> None:
        if self._gives == gives:
            self._grad = self._version = self._made = None

    def take(self, grad: Tensor) -> list | None:
        """The Linear's backward: what was given with ``grad`` itself, unmodified, as a list
        (its only holder: ``kernels.linear.linear_backward`` empties it, so that each tensor
        dies once used), else None. Empties the slot either way."""
        made = self._made if self._grad is grad and grad._version == self._version else None
        self._grad = self._version = self._made = None
        return list(made) if made is not None else None


def take(handover: Handover | None, grad: Tensor):
    """``handover.take(grad)``, or None without a handover."""
    return handover.take(grad) if handover is not None else None


__all__ = ["Handover", "take"]
