"""``fusedmlp.optim.SGD``: torch.optim.SGD whose step is one fused multi-tensor kernel launch
per (param group, device, dtype) (two on the first momentum step when only some buffers exist).

It subclasses torch.optim.SGD: constructor (signature, defaults, the nesterov and
``ValueError`` checks), ``state_dict`` (``momentum_buffer``), hooks and LR schedulers are
torch's own; only ``step`` differs.

Torch's keywords: ``foreach`` accepted and ignored; ``fused=True``, ``differentiable=True`` and
tensor ``lr``/``weight_decay`` run torch's own implementation for that group. Sparse gradients
run torch's single-tensor algorithm (which supports them). The AMP ``grad_scale``/``found_inf``
protocol is not implemented (``torch.amp.GradScaler`` then unscales and skips steps itself).
"""

from __future__ import annotations

import torch
from torch.optim.optimizer import _use_grad_for_differentiable

from ..autograd import adam as A
from ..autograd import sgd as S


class SGD(torch.optim.SGD):
    __doc__ = (
        "torch.optim.SGD with a fused multi-tensor Triton step (module docstring: "
        "fusedmlp.optim.sgd).\n\n" + (torch.optim.SGD.__doc__ or "")
    )

    @_use_grad_for_differentiable
    def step(self, closure=None):
        """Perform a single optimization step (one fused launch per group, device and dtype).

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            params, grads, bufs = [], [], []
            has_sparse_grad = self._init_group(group, params, grads, bufs)
            hp = dict(
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                lr=group["lr"],
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                maximize=group["maximize"],
            )
            if (
                group.get("fused")
                or group.get("differentiable")
                or torch.is_tensor(group["lr"])
                or torch.is_tensor(group["weight_decay"])
            ):
                A.call_torch(
                    A._torch_sgd_module().sgd,
                    params,
                    grads,
                    bufs,
                    has_sparse_grad=has_sparse_grad,
                    foreach=group["foreach"],
                    fused=group["fused"],
                    grad_scale=getattr(self, "grad_scale", None),
                    found_inf=getattr(self, "found_inf", None),
                    **hp,
                )
            else:
                S.sgd(params, grads, bufs, **hp)

            if group["momentum"] != 0:
                for p, buf in zip(params, bufs):
                    self.state[p]["momentum_buffer"] = buf
        return loss


__all__ = ["SGD"]
