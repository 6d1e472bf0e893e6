"""Multi-tensor Adam / AdamW step: one launch for every tensor of a (group, device, dtype).

The tensors are walked through the address and block tables of ``kernels/multi_tensor.py``
(array-major: params, grads, exp_avgs, exp_avg_sqs[, max_exp_avg_sqs]), cached and staged there.

All arithmetic is fp32, for fp32, fp16 and bf16 tensors; the state is stored in the param
dtype (as torch.optim). The update is in place, so there is a single fixed configuration,
never autotuned. Runtime scalars (lr, betas, eps, weight decay, the bias-corrected step size)
are kernel arguments. With host step counters (torch.optim's default) the step never reaches
the kernel: the bias corrections ``1 - beta^t`` are computed in float64 on the host. With
device step counters (``capturable=True``, or any step under ``torch.amp.GradScaler``) a third
table holds the address of each tensor's float32 step and the kernel computes
``1 - exp(t * ln(beta))`` in float64 itself: nothing is read back to the host.

AMP (``torch.amp.GradScaler``'s ``grad_scale``/``found_inf`` protocol, as torch's fused Adam):
``grad_scale`` (a one-element float32 device tensor) divides every gradient in-kernel and the
unscaled gradient is written back to ``.grad``; when ``found_inf`` (one element) is nonzero
every program returns without touching anything (params, state and grads keep their values).
Both are read in-kernel, so a skipped step costs no host synchronisation.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from .multi_tensor import (
    Checked,
    amp_scalar,
    block_of,
    cached,
    check,
    chunk_of,
    launch_step,
    load_param_grad,
    runs,
    tables,
    tensor_ptr,
    to_device,
)


@triton.jit(do_not_specialize=["n_tensors"])
def _adam_kernel(
    addrs,
    meta,
    ref,
    steps,
    grad_scale,
    found_inf,
    n_tensors,
    lr,
    log_beta1,
    log_beta2,
    lerp_weight,
    beta2,
    one_minus_beta2,
    eps,
    weight_decay,
    decay_factor,
    step_size,
    bias_correction2_sqrt,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    DECOUPLED: tl.constexpr,
    DEVICE_STEP: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_INF: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    t, start, numel = chunk_of(meta, n_tensors, BLOCK * ITERS)
    dtype = ref.dtype.element_ty
    p_ptr = tensor_ptr(addrs, n_tensors, t, ref, 0, ALIGNED)
    g_ptr = tensor_ptr(addrs, n_tensors, t, ref, 1, ALIGNED)
    m_ptr = tensor_ptr(addrs, n_tensors, t, ref, 2, ALIGNED)
    v_ptr = tensor_ptr(addrs, n_tensors, t, ref, 3, ALIGNED)
    if AMSGRAD:
        vm_ptr = tensor_ptr(addrs, n_tensors, t, ref, 4, ALIGNED)

    if DEVICE_STEP:
        # This tensor's step counter (float32, already incremented on the device): the bias
        # corrections in float64; ln(beta) comes from the host (relative error of fp32 ~6e-8,
        # and 1 - exp(x) keeps the relative accuracy of x for small |x|).
        s_ptr = tl.load(steps + t).to(tl.pointer_type(tl.float32))
        step = tl.load(s_ptr).to(tl.float64)
        bc1 = 1.0 - tl.exp(step * tl.cast(log_beta1, tl.float64))
        bc2 = 1.0 - tl.exp(step * tl.cast(log_beta2, tl.float64))
        step_size = (tl.cast(lr, tl.float64) / bc1).to(tl.float32)
        bias_correction2_sqrt = tl.sqrt(bc2).to(tl.float32)

    for it in range(ITERS):
        offs, mask, full, present = block_of(start, it, numel, BLOCK)
        for MASKED in tl.static_range(2):  # two copies of the body (``runs``)
            if runs(full, present, found_inf, MASKED, HAS_INF):
                lmask = mask if MASKED else None
                p, g = load_param_grad(p_ptr, g_ptr, offs, lmask, grad_scale, HAS_SCALE, MAXIMIZE)
                m = tl.load(m_ptr + offs, mask=lmask).to(tl.float32)
                v = tl.load(v_ptr + offs, mask=lmask).to(tl.float32)
                if WEIGHT_DECAY:
                    if DECOUPLED:
                        p = p * decay_factor
                    else:
                        g = g + weight_decay * p
                # torch's lerp: small weights from the start, large weights from the end.
                if lerp_weight < 0.5:
                    m = m + lerp_weight * (g - m)
                else:
                    m = g - (g - m) * (1.0 - lerp_weight)
                v = v * beta2 + one_minus_beta2 * (g * g)
                if AMSGRAD:
                    # fp32 max (for fp32 params exactly torch's; fp16/bf16 keep the fp32 value
                    # for this step's denominator instead of one that may underflow to 0).
                    # NaN propagates, as torch.maximum's (tl.maximum's default drops it).
                    vmax = tl.maximum(
                        tl.load(vm_ptr + offs, mask=lmask).to(tl.float32),
                        v,
                        propagate_nan=tl.PropagateNan.ALL,
                    )
                    tl.store(vm_ptr + offs, vmax.to(dtype), mask=lmask)
                    denom = tl.div_rn(tl.sqrt_rn(vmax), bias_correction2_sqrt) + eps
                else:
                    # Correctly rounded, as torch's CUDA ops: tl.sqrt and "/" compile to
                    # sqrt.approx.ftz / div.full (2 ulp, subnormal v flushed to a 0 root: m / 0
                    # with eps = 0). Free here: the step is memory-bound.
                    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
                p = p - step_size * tl.div_rn(m, denom)
                tl.store(p_ptr + offs, p.to(dtype), mask=lmask)
                tl.store(m_ptr + offs, m.to(dtype), mask=lmask)
                tl.store(v_ptr + offs, v.to(dtype), mask=lmask)


# ----------------------------------------------------------------------------- tables


# step-counter address tables (multi_tensor's address cache holds (table, aligned) pairs)
_STEP_CACHE: OrderedDict = OrderedDict()


def step_table(steps: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """int64 table of the addresses of ``steps`` (float32 one-element tensors on ``device``)."""
    for s in steps:
        if s.dtype != torch.float32 or s.device != device or s.numel() != 1:
            raise ValueError(
                f"fused Adam step: device step counters must be one-element float32 tensors on "
                f"{device}, got {tuple(s.shape)} {s.dtype} on {s.device}"
            )
    ptrs = tuple(s.data_ptr() for s in steps)
    return cached(_STEP_CACHE, (device, ptrs), lambda: to_device(list(ptrs), device))


def log_beta(beta: float) -> float:
    """ln(beta) for the in-kernel bias correction (beta = 0: -inf, so 1 - beta^t = 1)."""
    return math.log(beta) if beta > 0 else -math.inf


# ----------------------------------------------------------------------------- launcher


# The kernel's arrays, in order (``multi_tensor.check`` names them in its errors).
ARRAY_NAMES = ["params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"]


def adam_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step_size: float,
    bias_correction2_sqrt: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    state_steps: list[torch.Tensor] | None = None,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    checked: Checked | None = None,
    grad_ptrs: tuple | None = None,
) -> None:
    """One in-place Adam/AdamW step over n tensors of one device and dtype, in one launch.

    ``params``, ``exp_avgs``, ``exp_avg_sqs`` (and ``max_exp_avg_sqs`` when ``amsgrad``) are
    updated in place; ``grads`` is read (and overwritten with the unscaled gradient when
    ``grad_scale`` is given). Every list holds n tensors of the params' shapes, dtype
    (fp32/fp16/bf16) and device.

    Host steps (``state_steps`` None): ``step_size = lr / (1 - beta1^t)`` and
    ``bias_correction2_sqrt = sqrt(1 - beta2^t)`` come from the host in float64. Device steps:
    ``state_steps`` holds n one-element float32 tensors on the params' device, already
    incremented for this step; the kernel reads them and ignores ``step_size`` and
    ``bias_correction2_sqrt``. ``grad_scale``/``found_inf``: GradScaler's one-element tensors
    (module docstring), read in-kernel. ``checked``: what ``multi_tensor.check`` returned for
    these very arrays at an earlier step, plain, when the caller verified since that nothing
    it depends on changed (``fusedmlp.optim._plan``): the check is skipped; ``grad_ptrs``:
    the gradients' addresses when the caller read them.
    """
    device_step = state_steps is not None
    if device_step and len(state_steps) != len(params):
        raise ValueError(
            f"fused optimizer step: state_steps has {len(state_steps)} tensors, "
            f"expected {len(params)}"
        )
    arrays = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    if checked is None:
        checked = check(arrays, ARRAY_NAMES)
    if checked is not None and not checked.plain and not all(map(torch.Tensor.numel, params)):
        # drop empty tensors (and their step counters)
        keep = [i for i, p in enumerate(params) if p.numel() > 0]
        arrays = [[lst[i] for i in keep] for lst in arrays]
        state_steps = [state_steps[i] for i in keep] if device_step else None
        checked = None
    launch_step(
        _adam_kernel,
        arrays,
        grad_scale,
        found_inf,
        checked=checked,
        grad_ptrs=grad_ptrs,
        extra=lambda addrs, ref: {
            "steps": step_table(state_steps, ref.device) if device_step else addrs
        },
        lr=float(lr),
        log_beta1=log_beta(float(beta1)),
        log_beta2=log_beta(float(beta2)),
        lerp_weight=float(1.0 - beta1),
        beta2=float(beta2),
        one_minus_beta2=float(1.0 - beta2),
        eps=float(eps),
        weight_decay=float(weight_decay),
        decay_factor=float(1.0 - lr * weight_decay),
        step_size=float(step_size),
        bias_correction2_sqrt=float(bias_correction2_sqrt),
        AMSGRAD=bool(amsgrad),
        MAXIMIZE=bool(maximize),
        WEIGHT_DECAY=weight_decay != 0,
        DECOUPLED=bool(decoupled_weight_decay),
        DEVICE_STEP=device_step,
    )


__all__ = ["ARRAY_NAMES", "adam_step", "amp_scalar", "step_table", "tables"]
