"""The multi-tensor table protocol shared by the fused optimizer kernels (``kernels/adam.py``,
``kernels/sgd.py``): one launch for every tensor of a (group, device, dtype).

The kernels read two small int64 tables instead of one argument per tensor:

- ``addrs`` [K * n]: the raw addresses (``data_ptr()``) of the K arrays of each of the n
  tensors, array-major (params, grads, then the optimizer's state arrays). Loaded in-kernel and
  cast with ``.to(tl.pointer_type(dtype))`` (``tensor_ptr``).
- ``meta`` [2 * n + n_chunks]: numel of each tensor, the index of its first chunk, then for
  every chunk of the grid the tensor it belongs to (``chunk_of``). The 1-D grid is the total
  number of ``BLOCK * ITERS``-element chunks over all tensors, so a 10-element bias and a
  10M-element weight share one launch without idle programs; each program walks its chunk in
  ``ITERS`` blocks of ``BLOCK`` elements (``block_of``).

Both tables are cached (``addrs`` keyed by the addresses, ``meta`` by the sizes), so they are
rebuilt only when an address changes (fresh ``.grad`` tensors, ``load_state_dict``). So is the
host check of the tensors (``check``): a call whose params and state are the very objects of a
checked call at the same addresses, with gradients of the same shapes, strides and dtype,
skips the per-array walks (over 1,000 tensors they took 1.2 of the step's 3.4 ms of host
time). On a GPU
they are staged through pinned memory with a non-blocking copy: no synchronous copy per step.
Under Triton's interpreter the addresses are those of the CPU tensors themselves (the
interpreter's host copy of a CPU tensor argument is the tensor itself), so the same kernels
run unchanged on CPU in the tests.

The updates are in place, so there is a single fixed configuration, never autotuned.
"""

from __future__ import annotations

import operator
import weakref
from array import array
from collections import OrderedDict
from itertools import chain
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch import is_interpreted, launch, on_device

# GPU: chunks of ITERS blocks of 2048 elements per program, 8 warps: 8 elements per thread and
# array (128-bit accesses for fp32 and for fp16/bf16). 16 per thread (BLOCK 4096) compiled to
# 228 registers for Adam (one program per SM, no overlap of one program's loads with another's
# stores; 36% of copy bandwidth on an H200); 8 per thread compile to 64 (Adam) and 40 (SGD)
# registers for sm_90. The ITERS loop amortises each program's dependent table loads (chunk ->
# tensor -> addresses) over 4 blocks.
GPU_CONFIG = triton.Config({"BLOCK": 2048, "ITERS": 4}, num_warps=8, num_stages=1)
# Interpreter: small blocks and chunks, so that small test tensors span several of each.
INTERPRET_CONFIG = triton.Config({"BLOCK": 64, "ITERS": 2}, num_warps=1, num_stages=1)

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
# Per-tensor attributes read with map(): a C loop without a Python frame per tensor; the host
# checks and tables walk every tensor of every array at every step.
_DATA_PTR, _NUMEL, _SIZE, _STRIDE, _IS_CONTIGUOUS = (
    torch.Tensor.data_ptr,
    torch.Tensor.numel,
    torch.Tensor.size,
    torch.Tensor.stride,
    torch.Tensor.is_contiguous,
)
_DTYPE, _DEVICE = operator.attrgetter("dtype"), operator.attrgetter("device")
_SHAPE_DTYPE = operator.attrgetter("shape", "dtype")
_IS_INFERENCE = torch.Tensor.is_inference
_inference_mode = torch.is_inference_mode_enabled
_REF, _DEREF = weakref.ref, weakref.ref.__call__
_CACHE_SIZE = 32
_ADDR_CACHE: OrderedDict = OrderedDict()
_META_CACHE: OrderedDict = OrderedDict()
_CHECK_CACHE: dict = {}
# The tables of every launch recorded in a CUDA graph capture (``launch_step``), never freed.
_CAPTURED_TABLES: list = []
# False while a launch recorded in a capture builds its tables (``launch_step``): a table built
# then is filled only when the graph replays (its copy is recorded, not run), so no eager call
# may find it in a cache.
_STORE = True


def _capturing(ref: torch.Tensor) -> bool:
    return ref.is_cuda and torch.cuda.is_current_stream_capturing()


# ----------------------------------------------------------------------------- in-kernel


@triton.jit
def chunk_of(meta, n_tensors, CHUNK: tl.constexpr):
    """This program's chunk: ``(t, start, numel)``: the tensor it belongs to, the offset of its
    first element in that tensor, and the tensor's numel."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(meta + 2 * n_tensors + pid)  # the tensor this chunk belongs to
    numel = tl.load(meta + t)
    start = (pid - tl.load(meta + n_tensors + t)) * CHUNK
    return t, start, numel


@triton.jit
def block_of(start, it, numel, BLOCK: tl.constexpr):
    """Block ``it`` of the chunk at ``start``: ``(offs, mask, full, present)``: its element
    offsets, ``offs < numel``, whether it is full (no mask needed) and whether it holds any
    element (the tail chunk of a tensor may end before its last block)."""
    first = start + it * BLOCK
    offs = first + tl.arange(0, BLOCK)
    return offs, offs < numel, first + BLOCK <= numel, first < numel


@triton.jit
def tensor_ptr(addrs, n_tensors, t, ref, K: tl.constexpr, ALIGNED: tl.constexpr):
    """Tensor ``t``'s pointer in array ``K`` of ``addrs``, typed as ``ref``'s elements."""
    ptr = tl.load(addrs + K * n_tensors + t).to(tl.pointer_type(ref.dtype.element_ty))
    if ALIGNED:  # every address 16-byte aligned (checked on the host): vector accesses
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def runs(full, present, found_inf, MASKED: tl.constexpr, HAS_INF: tl.constexpr):
    """Whether this copy of the body runs: full blocks without a mask (vector accesses; the mask
    ``offs < numel`` has unknown alignment), each tensor's partial tail block with it; never when
    GradScaler's ``found_inf`` is set (``HAS_INF``): the whole step is skipped."""
    run = present & (full != MASKED)
    if HAS_INF:
        run = run & (tl.load(found_inf) == 0)
    return run


@triton.jit
def load_param_grad(
    p_ptr, g_ptr, offs, lmask, grad_scale, HAS_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr
):
    """fp32 param and gradient; ``HAS_SCALE``: the gradient unscaled in-kernel and the unscaled
    gradient written back (torch's fused optimizers); ``MAXIMIZE``: negated."""
    p = tl.load(p_ptr + offs, mask=lmask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=lmask).to(tl.float32)
    if HAS_SCALE:
        g = tl.div_rn(g, tl.load(grad_scale).to(tl.float32))  # "/" is div.full (2 ulp) on a GPU
        tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=lmask)
    if MAXIMIZE:
        g = -g
    return p, g


# ----------------------------------------------------------------------------- host tables


def cached(cache: OrderedDict, key, build):
    """``cache[key]``, built with ``build()`` when missing (LRU, ``_CACHE_SIZE`` entries; not
    stored while ``_STORE`` is off)."""
    value = cache.get(key)
    if value is None:
        value = build()
        if not _STORE:
            return value
        cache[key] = value
        if len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
    else:
        try:
            cache.move_to_end(key)
        except KeyError:  # another thread's insertion evicted it since the lookup
            pass
    return value


def _host_table(values) -> torch.Tensor:
    """``values`` (Python ints) as an int64 CPU tensor: through an ``array`` buffer, half the
    host time of ``torch.tensor(list)`` for thousands of addresses (the tensor keeps the buffer
    alive)."""
    buffer = array("q", values)
    if not buffer:  # frombuffer refuses an empty buffer
        return torch.empty(0, dtype=torch.int64)
    return torch.frombuffer(buffer, dtype=torch.int64)


def to_device(values, device: torch.device) -> torch.Tensor:
    """An int64 table of ``values`` on ``device`` (``_device_table``)."""
    return _device_table(_host_table(values), device)


def _device_table(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The int64 CPU table ``host`` on ``device``; CUDA: through pinned memory, non-blocking.

    The pinned host buffer stays referenced by the device table: a copy recorded inside a CUDA
    graph capture re-reads it at every replay, so it must outlive the table (and never return
    to the pinned-memory pool for reuse).
    """
    if device.type == "cuda":
        pinned = torch.empty(host.shape, dtype=torch.int64, pin_memory=True).copy_(host)
        table = pinned.to(device, non_blocking=True)
        table._fusedmlp_host = pinned
        return table
    return host if device.type == "cpu" else host.to(device)


def _address_table(ptrs: tuple, device: torch.device) -> tuple[torch.Tensor, bool]:
    """(the ``addrs`` table on ``device``, whether every address is 16-byte aligned); the
    alignment read off the host table with one tensor op (a Python test per address costs
    about as much as building the table)."""
    host = _host_table(ptrs)
    return _device_table(host, device), not bool(host.bitwise_and(15).any())


def amp_scalar(t: torch.Tensor | None, name: str, device: torch.device, ref: torch.Tensor):
    """``grad_scale``/``found_inf`` for the kernel: a one-element float tensor on ``device``
    (moved without blocking), or ``ref`` as a placeholder when None."""
    if t is None:
        return ref
    if not torch.is_tensor(t) or t.numel() != 1 or not t.is_floating_point():
        raise ValueError(f"fused optimizer step: {name} must be a one-element float tensor")
    return t.to(device, non_blocking=True)


def addresses(arrays: list[list[torch.Tensor]]) -> tuple:
    """The ``data_ptr()`` of every tensor of ``arrays``, array-major (the ``addrs`` table)."""
    return tuple(chain.from_iterable([map(_DATA_PTR, lst) for lst in arrays]))


def tables(arrays: list[list[torch.Tensor]], chunk: int, ptrs: tuple | None = None):
    """(addrs, meta, n_chunks, aligned) for ``arrays`` = K lists of n tensors each, walked in
    chunks of ``chunk`` elements; ``ptrs``: their ``addresses`` when already read.

    Cached: ``addrs`` by the tuple of addresses, ``meta`` by the tuple of sizes and ``chunk``.
    """
    device = arrays[0][0].device
    if ptrs is None:
        ptrs = addresses(arrays)
    sizes = tuple(map(_NUMEL, arrays[0]))
    addrs, aligned = cached(_ADDR_CACHE, (device, ptrs), lambda: _address_table(ptrs, device))

    def build_meta():
        counts = [(s + chunk - 1) // chunk for s in sizes]
        firsts, owner, total = [], [], 0
        for i, c in enumerate(counts):
            firsts.append(total)
            owner.extend([i] * c)
            total += c
        return to_device(list(sizes) + firsts + owner, device), total

    meta, n_chunks = cached(_META_CACHE, (device, sizes, chunk), build_meta)
    return addrs, meta, n_chunks, aligned


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


def _plain(arrays: list[list[torch.Tensor]]) -> bool:
    """``prepare``'s common case: contiguous non-empty params, and every array with the
    params' strides (one list of strides per array, no per-tensor Python)."""
    params = arrays[0]
    strides = list(map(_STRIDE, params))
    return (
        all(map(_IS_CONTIGUOUS, params))
        and all(list(map(_STRIDE, lst)) == strides for lst in arrays[1:])
        and all(map(_NUMEL, params))
    )


def prepare(arrays: list[list[torch.Tensor]], mutated: list[bool], plain: bool | None = None):
    """Make every tensor index walkable as one flat run: all K arrays of tensor i must be
    dense with identical strides. Otherwise contiguous copies stand in (copied back after
    the step for the mutated arrays). Returns (arrays, writebacks) and drops empty tensors.

    ``check`` ran first (same shapes across the arrays). The common case (``_plain``; ``plain``
    when the caller knows it already) costs no per-tensor Python; only the rest goes tensor by
    tensor.
    """
    if plain is None:
        plain = _plain(arrays)
    if plain:
        return arrays, []
    params = arrays[0]
    n = len(params)
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


class Checked(NamedTuple):
    """What ``check`` established: whether ``prepare``'s common case holds (``plain``: no
    stand-ins, the arrays launch as they are), and the checked call's record (``tables``)."""

    plain: bool
    call: _CheckedCall


class _CheckedCall:
    """A checked call, for the next ones (``_CHECK_CACHE``, keyed by the addresses of every
    tensor but the gradients): the params' ids and weak references to the state tensors (the
    same objects, still alive), the gradients' dtype, shapes and strides (fresh tensors at
    every step when ``zero_grad`` sets them to None; their addresses may change), and the last
    ``tables`` of a plain call by chunk size with the gradient addresses they hold.

    Params get no weak reference: ``torch.utils.swap_tensors`` (``nn.Module.to()`` under
    ``torch.__future__.set_swap_module_params_on_conversion(True)``) refuses a tensor that has
    one. A param object gone and another at its id and address is not told apart; its
    gradients' dtype, shapes and strides still are checked."""

    __slots__ = (
        "lengths", "others", "param_ids", "param_meta", "refs", "dtype", "grad_shapes",
        "grad_strides", "plain", "tables",
    )  # fmt: skip

    def __init__(self, arrays, lengths: tuple, others: tuple):
        grads = arrays[1] if len(arrays) > 1 else []
        self.lengths, self.others = lengths, others
        self.param_ids = list(map(id, arrays[0]))
        self.param_meta = list(map(_SHAPE_DTYPE, arrays[0]))
        self.refs = list(map(_REF, chain(*arrays[2:])))
        self.dtype = arrays[0][0].dtype
        self.grad_shapes = list(map(_SIZE, grads))
        self.grad_strides = list(map(_STRIDE, grads))
        self.plain = _plain(arrays)
        self.tables: dict = {}

    def tables_for(self, arrays, chunk: int, grad_ptrs: tuple | None = None):
        """``tables(arrays, chunk)`` for this call's own (plain) arrays: the last ones while the
        gradients stay at the same addresses (no lookup keyed by every address).
        ``grad_ptrs``: the gradients' addresses, when the caller read them already."""
        if grad_ptrs is None:
            grad_ptrs = tuple(map(_DATA_PTR, arrays[1])) if len(arrays) > 1 else ()
        last = self.tables.get(chunk)
        if last is not None and last[0] == grad_ptrs:
            return last[1]
        n = len(arrays[0])
        built = tables(arrays, chunk, self.others[:n] + grad_ptrs + self.others[n:])
        if _STORE:
            self.tables[chunk] = (grad_ptrs, built)
        return built


def _others(arrays):
    """Every tensor of ``arrays`` but the gradients (array 1), as one iterator."""
    return chain(arrays[0], *arrays[2:])


def _same_call(arrays, hit: _CheckedCall) -> bool:
    grads = arrays[1] if len(arrays) > 1 else []
    return (
        list(map(id, arrays[0])) == hit.param_ids
        # a plain call's params stay contiguous: a .data view of the same storage (a transposed
        # square weight) keeps the address, and its gradient may keep the recorded strides
        and (not hit.plain or all(map(_IS_CONTIGUOUS, arrays[0])))
        # nor may such a view change a param's shape or dtype (``p.data = p.data.view(-1)``)
        # under a gradient kept from before, which still matches the recorded ones
        and list(map(_SHAPE_DTYPE, arrays[0])) == hit.param_meta
        and all(map(operator.is_, map(_DEREF, hit.refs), chain(*arrays[2:])))
        and set(map(_DTYPE, grads)) <= {hit.dtype}
        and list(map(_SIZE, grads)) == hit.grad_shapes
        and list(map(_STRIDE, grads)) == hit.grad_strides
    )


def check(arrays: list[list[torch.Tensor]], names: list[str]) -> Checked | None:
    """Same length, device, dtype and shape across the K arrays (raised before any launch);
    None when there are no tensors. ``arrays[0]`` are the params, ``arrays[1]`` (when present)
    the gradients.

    A call whose params and state tensors are the objects of a call checked before, at the same
    addresses, and whose gradients have the same dtype, shapes and strides passes without the
    walks below. What that relies on: a tensor keeps its dtype, device, shape and strides while
    it lives unless they are changed in place (``resize_``, ``set_``, assigning ``.data``).
    Those change the address, except a ``.data`` view of the same storage from its first
    element: the params' shapes and dtypes are compared with the recorded ones (a gradient kept
    from before the change still matches), and a plain call's params are checked to be still
    contiguous (torch checks an assigned gradient's size and dtype against its param's, but not
    its strides); a state tensor changed so (never done by torch.optim or fusedmlp) is not
    seen. Otherwise: one list of shapes, one set of dtypes and one of devices per array; the
    per-tensor walk that names the offending tensor runs only when those differ. Outside
    ``torch.inference_mode()``, no param or state tensor may be an inference tensor (torch's
    ``RuntimeError``, ``_check_inplace_allowed``); a call checked inside it is not reused
    outside it.
    """
    ref = arrays[0]
    if not ref:
        return None
    lengths = tuple(map(len, arrays))
    others = tuple(map(_DATA_PTR, _others(arrays)))
    # Inference mode in the key: a call checked inside it (where inference tensors may be
    # updated) is checked again outside it (``_check_inplace_allowed``).
    inference = _inference_mode()
    key = (ref[0].device, lengths, others, inference)
    hit = _CHECK_CACHE.get(key)
    if hit is not None and _same_call(arrays, hit):
        return Checked(hit.plain, hit)
    _check(arrays, names)
    if not inference:
        _check_inplace_allowed(arrays)
    call = _CHECK_CACHE[key] = _CheckedCall(arrays, lengths, others)
    if len(_CHECK_CACHE) > _CACHE_SIZE:  # the oldest entry (a lookup here hashes every address
        try:  # once: no LRU reordering)
            _CHECK_CACHE.pop(next(iter(_CHECK_CACHE)), None)
        except (StopIteration, RuntimeError):  # another thread evicted or inserted meanwhile
            pass
    return Checked(call.plain, call)


class TensorMismatchError(ValueError, RuntimeError):
    """A state or gradient tensor whose shape, dtype or device does not match its param's
    (e.g. optimizer state loaded from another model's checkpoint). A ``RuntimeError``, as
    torch.optim's own step raises for it, and a ``ValueError``, as this check always raised."""


def _check(arrays: list[list[torch.Tensor]], names: list[str]) -> None:
    ref = arrays[0]
    dtype, device = ref[0].dtype, ref[0].device
    if dtype not in _SUPPORTED:
        raise TypeError(f"fused optimizer step: params must be fp32, fp16 or bf16, got {dtype}")
    shapes = list(map(_SIZE, ref))
    for name, lst in zip(names, arrays):
        if len(lst) != len(ref):
            raise TensorMismatchError(
                f"fused optimizer step: {name} has {len(lst)} tensors, expected {len(ref)}"
            )
        if (
            set(map(_DTYPE, lst)) == {dtype}
            and set(map(_DEVICE, lst)) == {device}
            and (lst is ref or list(map(_SIZE, lst)) == shapes)
        ):
            continue
        for p, t in zip(ref, lst):
            if t.dtype != dtype or t.device != device or t.shape != p.shape:
                raise TensorMismatchError(
                    f"fused optimizer step: {name} tensor {tuple(t.shape)} {t.dtype} on {t.device} "
                    f"does not match param {tuple(p.shape)} {dtype} on {device}"
                )


# torch's error for an in-place update of an inference tensor outside inference mode
INFERENCE_TENSOR_ERROR = (
    "Inplace update to inference tensor outside InferenceMode is not allowed."
    "You can make a clone to get a normal tensor before doing inplace update."
    "See https://github.com/pytorch/rfcs/pull/17 for more details."
)


def _check_inplace_allowed(arrays: list[list[torch.Tensor]]) -> None:
    """torch's rule for the tensors the kernel updates in place (params and state; the
    gradients, written only under AMP, are left to torch's GradScaler): outside
    ``torch.inference_mode()`` an inference tensor cannot be updated in place (e.g. SGD
    momentum buffers or Adam moments created by a step taken inside inference mode; torch's
    next step raises on them). The kernel writes through raw addresses, past torch's check:
    raised here, before any launch, with torch's message. Inference tensors are those without
    a version counter (a ``Parameter`` or ``detach()`` made from one outside inference mode
    has one, and torch updates it)."""
    tensors = list(chain(arrays[0], *arrays[2:]))
    if True not in map(_IS_INFERENCE, tensors):
        return
    for t in tensors:
        if t.is_inference():
            try:
                t._version  # noqa: B018 (raises for a tensor without a version counter)
            except RuntimeError:
                raise RuntimeError(INFERENCE_TENSOR_ERROR) from None


def config_for(kernel) -> triton.Config:
    return INTERPRET_CONFIG if is_interpreted(kernel) else GPU_CONFIG


def launch_step(
    kernel,
    arrays,
    grad_scale,
    found_inf,
    extra=None,
    checked: Checked | None = None,
    grad_ptrs: tuple | None = None,
    **kwargs,
) -> None:
    """One launch of the multi-tensor optimizer ``kernel`` over ``arrays`` (K checked lists of n
    non-empty tensors, params and grads first): staged by ``prepare`` (grads mutated only with
    ``grad_scale``), walked through ``tables``, contiguous stand-ins copied back afterwards.
    ``checked``: what ``check`` returned for exactly these ``arrays``; ``grad_ptrs``: the
    gradients' addresses, when the caller read them already.

    Fills the protocol's arguments (``addrs``, ``meta``, ``ref``, ``grad_scale``, ``found_inf``,
    ``n_tensors``, ``HAS_SCALE``, ``HAS_INF``, ``ALIGNED``); ``kwargs`` are the kernel's own and
    ``extra(addrs, ref)`` returns more that need the tables.
    """
    mutated = [k != 1 or grad_scale is not None for k in range(len(arrays))]
    plain = None if checked is None else checked.plain
    arrays, writebacks = prepare(arrays, mutated, plain)
    if not arrays[0]:
        return
    ref = arrays[0][0]
    config = config_for(kernel).kwargs
    chunk = config["BLOCK"] * config["ITERS"]
    global _STORE
    capturing = _capturing(ref)
    _STORE = not capturing
    try:
        if plain:  # the checked call's own tensors
            addrs, meta, n_chunks, aligned = checked.call.tables_for(arrays, chunk, grad_ptrs)
        else:
            addrs, meta, n_chunks, aligned = tables(arrays, chunk)
        if extra is not None:
            kwargs.update(extra(addrs, ref))
    finally:
        _STORE = True
    if capturing:
        # Every replay of the graph reads these tables (and re-runs the copies from the pinned
        # host buffers they hold, for tables built during the capture), but the caches that
        # hold them drop them after 32 other entries or at a call with other gradients: freed,
        # their memory would be reused while the graph still points the kernel at it. Kept for
        # the process (a few small tensors per capture).
        tensors = [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
        _CAPTURED_TABLES.append((addrs, meta, tensors))
    with on_device(ref):
        launch(
            kernel,
            (n_chunks,),
            configs=[GPU_CONFIG],
            interpret_config=INTERPRET_CONFIG,
            addrs=addrs,
            meta=meta,
            ref=ref,
            grad_scale=amp_scalar(grad_scale, "grad_scale", ref.device, ref),
            found_inf=amp_scalar(found_inf, "found_inf", ref.device, ref),
            n_tensors=len(arrays[0]),
            HAS_SCALE=grad_scale is not None,
            HAS_INF=found_inf is not None,
            ALIGNED=aligned,
            **kwargs,
        )
    for dst, src in writebacks:
        dst.copy_(src)


__all__ = [
    "Checked",
    "TensorMismatchError",
    "GPU_CONFIG",
    "INTERPRET_CONFIG",
    "addresses",
    "amp_scalar",
    "block_of",
    "cached",
    "chunk_of",
    "check",
    "config_for",
    "launch_step",
    "load_param_grad",
    "prepare",
    "runs",
    "tables",
    "tensor_ptr",
    "to_device",
]
