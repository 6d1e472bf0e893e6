"""Backend selection: which implementation an op runs.

- ``auto`` (default): the Triton kernels for CUDA tensors, the torch fallback otherwise;
  float64 always takes the fallback.
- ``triton``: always the Triton kernels (CPU tensors need Triton's interpreter,
  ``TRITON_INTERPRET=1`` set before triton is imported).
- ``torch``: always the fallback.

The state is a plain module global: a ``ContextVar`` breaks ``torch.compile``.
Nothing here imports triton or queries CUDA at import time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import numbers
import operator
import os

import torch

BACKENDS = ("auto", "triton", "torch")
# The floating dtypes fusedmlp's Triton kernels take (other dtypes: torch's ops, or an error).
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the kernels (and of their torch-op stand-ins) for inputs of
    ``dtype``: float64 for float64, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def float_arg(value) -> bool:
    """Whether torch's argument parser takes ``value`` for a ``float`` argument (batch norm's
    momentum, leaky_relu's negative_slope): a real number (bool and numpy scalars too), or a
    0-d real tensor that does not require grad."""
    if isinstance(value, numbers.Real):
        return True
    return (
        isinstance(value, torch.Tensor)
        and value.dim() == 0
        and not value.requires_grad
        and not value.is_complex()
    )


def _validate(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(
            f"unknown fusedmlp backend {name!r}: expected one of {', '.join(map(repr, BACKENDS))}"
        )
    return name.lower()


_BACKEND: str = _validate(os.environ.get("FUSEDMLP_BACKEND", "auto") or "auto")


# Looked up once (no import of triton): torch.compile cannot trace importlib's find_spec.
_TRITON_AVAILABLE: bool = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_AVAILABLE


def _require_triton() -> None:
    if not triton_available():
        raise RuntimeError(
            "fusedmlp backend 'triton' needs the triton package, which is not installed: "
            "`pip install triton` (Linux), or use set_backend('torch')"
        )


def set_backend(name: str) -> None:
    """Select the backend for every later op: 'auto', 'triton' or 'torch'."""
    global _BACKEND
    name = _validate(name)
    if name == "triton":
        _require_triton()
    _BACKEND = name


def get_backend() -> str:
    return _BACKEND


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: run the block under backend ``name``, then restore the previous one."""
    global _BACKEND
    previous = _BACKEND
    set_backend(name)
    try:
        yield
    finally:
        _BACKEND = previous


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether an op over ``tensors`` runs its Triton kernels under the current backend.

    Raises before any launch when the backend is 'triton' and the kernels cannot run:
    triton missing, or CPU tensors without Triton's interpreter. Under a ``torch.func``
    transform (grad, vmap, jvp, jacrev, ...) or inside a forward-AD level
    (``torch.autograd.forward_ad.dual_level``) every op runs torch's implementation: fusedmlp's
    autograd Functions have neither vmap nor forward-AD (jvp) rules, and torch's ops have both.
    While ``torch.jit.trace`` records a graph, too: the trace then holds torch's ops.
    """
    backend = _BACKEND
    if backend == "torch" or (
        not _is_compiling()
        and (_functorch_active() or _forward_ad._current_level >= 0 or _jit_tracing())
    ):
        return False
    if backend == "auto":  # one plain loop: it runs for every op call
        for t in tensors:
            if t is not None and (not t.is_cuda or t.dtype == torch.float64):
                return False
        return triton_available()
    _require_triton()
    if not all(t.is_cuda for t in tensors if t is not None):
        if any(t.is_meta for t in tensors if t is not None):
            return False  # no kernel runs on meta tensors: torch's ops give their shapes
        _require_interpreter()
    return True


_functorch_active = torch._C._are_functorch_transforms_active
_forward_ad = torch.autograd.forward_ad
_is_compiling = torch.compiler.is_compiling
# torch.jit.trace (and the TorchScript-based torch.onnx.export) records torch's ops; sizes are
# traced 0-d tensors there, which no launcher takes.
_jit_tracing = torch._C._is_tracing
_IS_CUDA = operator.attrgetter("is_cuda")
_IS_META = operator.attrgetter("is_meta")
_DTYPE = operator.attrgetter("dtype")


def use_triton_all(tensors: list[torch.Tensor]) -> bool:
    """``use_triton(*tensors)`` for a list without None, walked with C loops (``map``): an
    optimizer step asks it of hundreds of tensors. Eager only: dynamo cannot trace
    ``attrgetter`` (a graph break), so traced code calls ``use_triton``."""
    backend = _BACKEND
    if backend == "torch":
        return False
    cuda = all(map(_IS_CUDA, tensors))
    if backend == "auto":
        return cuda and torch.float64 not in set(map(_DTYPE, tensors)) and triton_available()
    _require_triton()
    if not cuda:
        if True in map(_IS_META, tensors):
            return False
        _require_interpreter()
    return True


def _require_interpreter() -> None:
    from .kernels.launch import interpreter_active

    if not interpreter_active():
        raise RuntimeError(
            "fusedmlp backend 'triton' got CPU tensors but Triton's interpreter is off: "
            "use CUDA tensors, or set TRITON_INTERPRET=1 before triton is imported"
        )
