"""``fusedmlp.optim.Adam`` and ``AdamW``: torch.optim.Adam / AdamW whose step is one fused
multi-tensor kernel launch per (param group, device, dtype).

They subclass torch's classes, so the constructor (signature, defaults, ``ValueError`` checks),
lazy state initialisation, ``state_dict``/``load_state_dict``, hooks, LR schedulers and
``isinstance(opt, torch.optim.Adam)`` are torch's own; only ``step`` differs. The state is
torch's (``step`` a float32 scalar CPU tensor, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``),
so checkpoints move between torch.optim and fusedmlp in both directions.

Torch's keywords:

- ``foreach``: accepted and ignored (fusedmlp's kernel is already multi-tensor).
- ``fused=True``, ``capturable=True``, ``differentiable=True``, tensor ``lr``/``betas``: honoured by
  running torch's own implementation for that group (its state layout, e.g. the step counter
  on the device, is torch's for those flags).
- The AMP ``grad_scale``/``found_inf`` protocol is not implemented (``_step_supports_amp_scaling``
  stays False unless ``fused=True``), so ``torch.amp.GradScaler`` unscales the gradients
  itself and skips steps with inf/NaN gradients, as for torch's non-fused Adam.
"""

from __future__ import annotations

import torch
from torch.optim.optimizer import _use_grad_for_differentiable

from ..autograd import adam as A


def _torch_group(group) -> bool:
    """Whether a group asks for something only torch's implementation provides."""
    return bool(
        group.get("fused")
        or group.get("capturable")
        or group.get("differentiable")
        or torch.is_tensor(group["lr"])
        or any(torch.is_tensor(b) for b in group["betas"])
        or torch.is_tensor(group["weight_decay"])
    )


class _FusedAdamStep:
    @_use_grad_for_differentiable
    def step(self, closure=None):
        """Perform a single optimization step (one fused launch per group, device and dtype).

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        health = getattr(self, "_accelerator_graph_capture_health_check", None) or getattr(
            self, "_cuda_graph_capture_health_check", None
        )
        if health is not None:
            health()

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
            has_complex = self._init_group(
                group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps
            )
            beta1, beta2 = group["betas"]
            hp = dict(
                amsgrad=group["amsgrad"],
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
                decoupled_weight_decay=group.get("decoupled_weight_decay", False)
                or isinstance(self, torch.optim.AdamW),
            )
            if _torch_group(group):
                A.call_torch(
                    A._torch_adam_module().adam,
                    params,
                    grads,
                    exp_avgs,
                    exp_avg_sqs,
                    max_exp_avg_sqs,
                    steps,
                    foreach=group["foreach"],
                    capturable=group["capturable"],
                    differentiable=group["differentiable"],
                    fused=group["fused"],
                    grad_scale=getattr(self, "grad_scale", None),
                    found_inf=getattr(self, "found_inf", None),
                    has_complex=has_complex,
                    **hp,
                )
                continue
            A.adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, **hp)
        return loss


class Adam(_FusedAdamStep, torch.optim.Adam):
    __doc__ = (
        "torch.optim.Adam with a fused multi-tensor Triton step (module docstring: "
        "fusedmlp.optim.adam).\n\n" + (torch.optim.Adam.__doc__ or "")
    )


class AdamW(_FusedAdamStep, torch.optim.AdamW):
    __doc__ = (
        "torch.optim.AdamW with a fused multi-tensor Triton step (module docstring: "
        "fusedmlp.optim.adam).\n\n" + (torch.optim.AdamW.__doc__ or "")
    )


__all__ = ["Adam", "AdamW"]
