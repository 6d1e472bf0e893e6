"""``torch.fx.symbolic_trace`` support: fusedmlp's modules trace as leaves, as torch.nn's do.

FX's default tracer keeps the modules defined in ``torch.nn`` as single ``call_module`` nodes
and traces into every other module's ``forward``. fusedmlp's forwards check their arguments as
tensors (a ``Proxy`` is none) and pick a kernel by the tensors' devices, neither of which a
symbolic trace can do. So each module's ``forward`` first hands a ``Proxy`` argument to
``fx_leaf``, which records the module as a ``call_module`` node: the traced ``GraphModule``
then calls the module itself, with its kernels and its train/eval flag at run time, as it calls
torch's modules.
"""

from __future__ import annotations

import torch

_Proxy = torch.fx.Proxy


def fx_leaf(module: torch.nn.Module, *args):
    """A ``call_module`` node of ``module`` over ``args`` when one of them is an FX ``Proxy``
    (a symbolic trace), else None. Callers test ``type(arg) is not Tensor`` first, so a plain
    call pays nothing more."""
    for a in args:
        if isinstance(a, _Proxy):
            tracer = a.tracer
            return tracer.create_proxy("call_module", tracer.path_of_module(module), args, {})
    return None


__all__ = ["fx_leaf"]
