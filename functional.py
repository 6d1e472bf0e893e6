"""The functional API, thin over ``fusedmlp.autograd`` (torch.nn.functional's signatures)."""

from .autograd.batchnorm import batch_norm
from .autograd.cross_entropy import cross_entropy, nll_loss
from .autograd.dropout import dropout, dropout2d
from .autograd.linear import linear
from .autograd.softmax import log_softmax, softmax

__all__ = [
    "batch_norm",
    "cross_entropy",
    "dropout",
    "dropout2d",
    "linear",
    "log_softmax",
    "nll_loss",
    "softmax",
]
