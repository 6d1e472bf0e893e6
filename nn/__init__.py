"""Drop-in ``torch.nn`` modules backed by fusedmlp's ops, the MLP, and ``convert()``."""

from .activation import LogSoftmax, Softmax
from .batchnorm import BatchNorm1d, BatchNorm2d
from .convert import convert
from .dropout import Dropout, Dropout2d
from .linear import Linear, LinearReLU
from .loss import CrossEntropyLoss, NLLLoss
from .mlp import MLP

__all__ = [
    "MLP",
    "BatchNorm1d",
    "BatchNorm2d",
    "CrossEntropyLoss",
    "Dropout",
    "Dropout2d",
    "Linear",
    "LinearReLU",
    "LogSoftmax",
    "NLLLoss",
    "Softmax",
    "convert",
]
