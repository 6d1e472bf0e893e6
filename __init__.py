"""fusedmlp: Triton kernels for training MLPs in PyTorch.

Drop-in ``torch.nn`` modules (:mod:`fusedmlp.nn`), ``torch.optim`` optimizers
(:mod:`fusedmlp.optim`) and a functional API (:mod:`fusedmlp.functional`). CUDA tensors run
fused Triton kernels; other tensors run a pure-PyTorch fallback (see :mod:`fusedmlp.backend`).
Importing fusedmlp never imports triton's kernels nor queries CUDA.
"""

from . import functional, nn, optim
from .backend import get_backend, set_backend, use_backend

__version__ = "0.1.0"

__all__ = ["functional", "nn", "optim", "get_backend", "set_backend", "use_backend"]
