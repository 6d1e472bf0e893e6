"""Multi-tensor Adam / AdamW step: one launch for every tensor of a (group, device, dtype).

The kernel reads two small int64 tables instead of one argument per tensor:

- ``addrs`` [K * n]: the raw addresses (``data_ptr()``) of the K arrays of each of the n
  tensors, array-major: params, grads, exp_avgs, exp_avg_sqs[, max_exp_avg_sqs]. Loaded
  in-kernel and cast with ``.to(tl.pointer_type(dtype))``.
- ``meta`` [2 * n + n_blocks]: numel of each tensor, the index of its first block, then for
  every block of the grid the tensor it belongs to. The 1-D grid is the total number of
  ``BLOCK``-element chunks over all tensors, so a 10-element bias and a 10M-element weight
  share one launch without idle programs.

Both tables are cached (``addrs`` keyed by the addresses, ``meta`` by the sizes), so they are
rebuilt only when an address changes (fresh ``.grad`` tensors, ``load_state_dict``). On a GPU
they are staged through pinned memory with a non-blocking copy: no synchronous copy per step.
Under Triton's interpreter the addresses are those of the CPU tensors themselves (the
interpreter's host copy of a CPU tensor argument is the tensor itself), so the same kernel
runs unchanged on CPU in the tests.

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

from .launch import is_interpreted, launch, on_device

# GPU: 4096 elements per program, 8 warps (16 elements per thread, 128-bit accesses).
GPU_CONFIG = triton.Config({"BLOCK": 4096}, num_warps=8, num_stages=1)
# Interpreter: small blocks so that small test tensors span several blocks.
INTERPRET_CONFIG = triton.Config({"BLOCK": 64}, num_warps=1, num_stages=1)

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
_CACHE_SIZE = 32
_ADDR_CACHE: OrderedDict = OrderedDict()
_META_CACHE: OrderedDict = OrderedDict()


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
):
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(meta + 2 * n_tensors + pid)  # the tensor this block belongs to
    numel = tl.load(meta + t)
    start = (pid - tl.load(meta + n_tensors + t)) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel

    dtype = ref.dtype.element_ty
    ptr_ty = tl.pointer_type(dtype)
    p_ptr = tl.load(addrs + t).to(ptr_ty)
    g_ptr = tl.load(addrs + n_tensors + t).to(ptr_ty)
    m_ptr = tl.load(addrs + 2 * n_tensors + t).to(ptr_ty)
    v_ptr = tl.load(addrs + 3 * n_tensors + t).to(ptr_ty)
    if ALIGNED:  # every address 16-byte aligned (checked on the host): vector accesses
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)

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

    full = start + BLOCK <= numel
    # Two copies of the body: full blocks without a mask (so accesses vectorise; the mask
    # `offs < numel` has unknown alignment), the tail block of each tensor with it.
    for MASKED in tl.static_range(2):
        run = full != MASKED
        if HAS_INF:  # GradScaler found an inf/NaN: the whole step is skipped
            run = run & (tl.load(found_inf) == 0)
        if run:
            lmask = mask if MASKED else None
            p = tl.load(p_ptr + offs, mask=lmask).to(tl.float32)
            g = tl.load(g_ptr + offs, mask=lmask).to(tl.float32)
            m = tl.load(m_ptr + offs, mask=lmask).to(tl.float32)
            v = tl.load(v_ptr + offs, mask=lmask).to(tl.float32)
            if HAS_SCALE:  # unscale in-kernel and hand the unscaled gradient back (torch's fused)
                g = g / tl.load(grad_scale).to(tl.float32)
                tl.store(g_ptr + offs, g.to(dtype), mask=lmask)
            if MAXIMIZE:
                g = -g
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
                vm_ptr = tl.load(addrs + 4 * n_tensors + t).to(ptr_ty)
                if ALIGNED:
                    vm_ptr = tl.multiple_of(vm_ptr, 16)
                # fp32 max (for fp32 params exactly torch's; fp16/bf16 keep the fp32 value
                # for this step's denominator instead of one that may underflow to 0).
                vmax = tl.maximum(tl.load(vm_ptr + offs, mask=lmask).to(tl.float32), v)
                tl.store(vm_ptr + offs, vmax.to(dtype), mask=lmask)
                denom = tl.sqrt(vmax) / bias_correction2_sqrt + eps
            else:
                denom = tl.sqrt(v) / bias_correction2_sqrt + eps
            p = p - step_size * (m / denom)
            tl.store(p_ptr + offs, p.to(dtype), mask=lmask)
            tl.store(m_ptr + offs, m.to(dtype), mask=lmask)
            tl.store(v_ptr + offs, v.to(dtype), mask=lmask)


# ----------------------------------------------------------------------------- tables


def _cached(cache: OrderedDict, key, build):
    value = cache.get(key)
    if value is None:
        value = build()
        cache[key] = value
        if len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return value


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """An int64 table on ``device``; CUDA: through pinned memory, non-blocking.

    The pinned host buffer stays referenced by the device table: a copy recorded inside a CUDA
    graph capture re-reads it at every replay, so it must outlive the table (and never return
    to the pinned-memory pool for reuse).
    """
    if device.type == "cuda":
        host = torch.tensor(values, dtype=torch.int64, pin_memory=True)
        table = host.to(device, non_blocking=True)
        table._fusedmlp_host = host
        return table
    return torch.tensor(values, dtype=torch.int64, device=device)


def step_table(steps: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """int64 table of the addresses of ``steps`` (float32 one-element tensors on ``device``)."""
    for s in steps:
        if s.dtype != torch.float32 or s.device != device or s.numel() != 1:
            raise ValueError(
                f"fused Adam step: device step counters must be one-element float32 tensors on "
                f"{device}, got {tuple(s.shape)} {s.dtype} on {s.device}"
            )
    ptrs = tuple(s.data_ptr() for s in steps)
    return _cached(_ADDR_CACHE, (device, "steps", ptrs), lambda: _to_device(list(ptrs), device))


def amp_scalar(t: torch.Tensor | None, name: str, device: torch.device, ref: torch.Tensor):
    """``grad_scale``/``found_inf`` for the kernel: a one-element float tensor on ``device``
    (moved without blocking), or ``ref`` as a placeholder when None."""
    if t is None:
        return ref
    if not torch.is_tensor(t) or t.numel() != 1 or not t.is_floating_point():
        raise ValueError(f"fused optimizer step: {name} must be a one-element float tensor")
    return t.to(device, non_blocking=True)


def log_beta(beta: float) -> float:
    """ln(beta) for the in-kernel bias correction (beta = 0: -inf, so 1 - beta^t = 1)."""
    return math.log(beta) if beta > 0 else -math.inf


def tables(arrays: list[list[torch.Tensor]], block: int):
    """(addrs, meta, n_blocks, aligned) for ``arrays`` = K lists of n tensors each.

    Cached: ``addrs`` by the tuple of addresses, ``meta`` by the tuple of sizes and ``block``.
    """
    device = arrays[0][0].device
    ptrs = tuple(t.data_ptr() for lst in arrays for t in lst)
    sizes = tuple(t.numel() for t in arrays[0])
    addrs = _cached(_ADDR_CACHE, (device, ptrs), lambda: _to_device(list(ptrs), device))

    def build_meta():
        counts = [(s + block - 1) // block for s in sizes]
        firsts, owner, total = [], [], 0
        for i, c in enumerate(counts):
            firsts.append(total)
            owner.extend([i] * c)
            total += c
        return _to_device(list(sizes) + firsts + owner, device), total

    meta, n_blocks = _cached(_META_CACHE, (device, sizes, block), build_meta)
    aligned = all(p % 16 == 0 for p in ptrs)
    return addrs, meta, n_blocks, aligned


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill ``numel`` consecutive slots from data_ptr."""
    if t.is_contiguous():
        return True
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for s, n in dims:
        if s != expected:
            return False
        expected *= n
    return True


def prepare(arrays: list[list[torch.Tensor]], mutated: list[bool]):
    """Make every tensor index walkable as one flat run: all K arrays of tensor i must be
    dense with identical strides. Otherwise contiguous copies stand in (copied back after
    the step for the mutated arrays). Returns (arrays, writebacks) and drops empty tensors."""
    n = len(arrays[0])
    out = [[] for _ in arrays]
    writebacks = []
    for i in range(n):
        ts = [lst[i] for lst in arrays]
        if ts[0].numel() == 0:
            continue
        stride = ts[0].stride()
        if all(_dense(t) and t.stride() == stride for t in ts):
            for k, t in enumerate(ts):
                out[k].append(t)
            continue
        for k, t in enumerate(ts):
            c = t.contiguous()
            out[k].append(c)
            if mutated[k] and c is not t:
                writebacks.append((t, c))
    return out, writebacks


def check(arrays: list[list[torch.Tensor]], names: list[str]) -> None:
    """Same length, device, dtype and shape across the K arrays (raised before any launch)."""
    ref = arrays[0]
    if not ref:
        return
    dtype, device = ref[0].dtype, ref[0].device
    if dtype not in _SUPPORTED:
        raise TypeError(f"fused optimizer step: params must be fp32, fp16 or bf16, got {dtype}")
    for name, lst in zip(names, arrays):
        if len(lst) != len(ref):
            raise ValueError(
                f"fused optimizer step: {name} has {len(lst)} tensors, expected {len(ref)}"
            )
        for p, t in zip(ref, lst):
            if t.dtype != dtype or t.device != device or t.shape != p.shape:
                raise ValueError(
                    f"fused optimizer step: {name} tensor {tuple(t.shape)} {t.dtype} on {t.device} "
                    f"does not match param {tuple(p.shape)} {dtype} on {device}"
                )


def config_for(kernel) -> triton.Config:
    return INTERPRET_CONFIG if is_interpreted(kernel) else GPU_CONFIG


# ----------------------------------------------------------------------------- launcher


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
    (module docstring), read in-kernel.
    """
    device_step = state_steps is not None
    if device_step and len(state_steps) != len(params):
        raise ValueError(
            f"fused optimizer step: state_steps has {len(state_steps)} tensors, "
            f"expected {len(params)}"
        )
    arrays = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    names = ["params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"]
    check(arrays, names)
    keep = [i for i, p in enumerate(params) if p.numel() > 0]
    if len(keep) != len(params):
        arrays = [[lst[i] for i in keep] for lst in arrays]
        state_steps = [state_steps[i] for i in keep] if device_step else None
    arrays, writebacks = prepare(arrays, [True, grad_scale is not None, True, True, True])
    if not arrays[0]:
        return
    ref = arrays[0][0]
    cfg = config_for(_adam_kernel)
    addrs, meta, n_blocks, aligned = tables(arrays, cfg.kwargs["BLOCK"])
    steps = step_table(state_steps, ref.device) if device_step else addrs
    with on_device(ref):
        launch(
            _adam_kernel,
            (n_blocks,),
            configs=[GPU_CONFIG],
            interpret_config=INTERPRET_CONFIG,
            addrs=addrs,
            meta=meta,
            ref=ref,
            steps=steps,
            grad_scale=amp_scalar(grad_scale, "grad_scale", ref.device, ref),
            found_inf=amp_scalar(found_inf, "found_inf", ref.device, ref),
            n_tensors=len(arrays[0]),
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
            HAS_SCALE=grad_scale is not None,
            HAS_INF=found_inf is not None,
            ALIGNED=aligned,
        )
    for dst, src in writebacks:
        dst.copy_(src)


__all__ = ["adam_step", "amp_scalar", "step_table", "tables"]
