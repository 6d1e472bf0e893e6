"""Drop-in ``torch.optim`` optimizers whose step is one fused multi-tensor kernel launch."""

from .adam import Adam, AdamW
from .sgd import SGD

__all__ = ["SGD", "Adam", "AdamW"]
