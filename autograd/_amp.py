"""torch.autocast's casting policy, applied by fusedmlp's dispatch functions themselves.

Custom ops (``torch.library.custom_op``) have no Autocast kernel: the dispatcher falls through
to them with the caller's dtypes. So each dispatch function applies torch's own policy for the
op it replaces, before choosing the Triton path or the torch fallback:

- ``linear`` (torch's lower-precision list, every device): float16/bfloat16/float32 operands
  are cast to the autocast dtype (``lower_precision``);
- ``cross_entropy`` / ``nll_loss``: float16/bfloat16 operands are cast to float32, so the loss
  is float32 (``fp32``). Both are on CPU autocast's fp32 list; CUDA's lists ``nll_loss`` only,
  and torch's ``cross_entropy`` there runs its ``log_softmax`` in the input's dtype (it passes
  that dtype explicitly) before a float32 ``nll_loss``: the same dtypes, but its
  log-probabilities are rounded to float16/bfloat16 where fusedmlp's stay float32;
- ``softmax`` / ``log_softmax``: CUDA's ``fp32_set_opt_dtype`` policy (no explicit ``dtype``:
  computed and returned in float32); CPU autocast leaves them alone (``softmax_dtype``);
- ``batch_norm``, activations, ``dropout``: in no list, unchanged (batch norm takes a
  float16/bfloat16 input with float32 parameters and statistics and returns the input's
  dtype, as torch's).

float64 tensors and tensors of another device type than the autocast region are never cast
(torch's eligibility rule). ``.to`` is differentiable: gradients flow back to the original
dtype. Works with torch >= 2.4 (``torch.is_autocast_enabled(device_type)``) and, through the
older per-device functions, with earlier versions. Traceable by ``torch.compile``.
"""

from __future__ import annotations

import torch
from torch import Tensor

_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype of ``device_type`` when an autocast region is active there, else None."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type without autocast (meta, ...): no region there
        return None
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu":
            enabled = torch.is_autocast_cpu_enabled()
        elif device_type == "cuda":
            enabled = torch.is_autocast_enabled()
        else:
            enabled = False
    if not enabled:
        return None
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type)
    if device_type == "cpu":  # torch < 2.4
        return torch.get_autocast_cpu_dtype()
    return torch.get_autocast_gpu_dtype()


def _device_type(tensors) -> str | None:
    for t in tensors:
        if isinstance(t, Tensor):
            return t.device.type
    return None


def _cast(tensors, device_type: str, dtype: torch.dtype, eligible) -> tuple:
    return tuple(
        t.to(dtype)
        if isinstance(t, Tensor)
        and t.device.type == device_type
        and t.dtype in eligible
        and t.dtype != dtype
        else t
        for t in tensors
    )


def lower_precision(*tensors):
    """torch's lower-precision policy (``F.linear``): every float16/bfloat16/float32 tensor of
    the autocast region's device type cast to the autocast dtype. Returns the tuple."""
    device_type = _device_type(tensors)
    dtype = autocast_dtype(device_type) if device_type is not None else None
    if dtype is None:
        return tensors
    return _cast(tensors, device_type, dtype, _ELIGIBLE)


def fp32(*tensors):
    """torch's fp32 policy (``cross_entropy``, ``nll_loss``): float16/bfloat16 tensors cast
    to float32 inside an autocast region. Returns the tuple."""
    device_type = _device_type(tensors)
    if device_type is None or autocast_dtype(device_type) is None:
        return tensors
    return _cast(tensors, device_type, torch.float32, (torch.float16, torch.bfloat16))


def softmax_dtype(input: Tensor, dtype: torch.dtype | None) -> torch.dtype | None:
    """The ``dtype`` argument ``softmax``/``log_softmax`` run with: torch's CUDA policy
    ``fp32_set_opt_dtype`` sets float32 when none is given; CPU autocast does not list them."""
    if dtype is not None or not isinstance(input, Tensor):
        return dtype
    device_type = input.device.type
    if device_type == "cpu" or input.dtype not in _ELIGIBLE:
        return dtype
    if autocast_dtype(device_type) is None:
        return dtype
    return torch.float32


__all__ = ["autocast_dtype", "fp32", "lower_precision", "softmax_dtype"]
