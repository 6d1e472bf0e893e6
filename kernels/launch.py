"""The one launch helper every fusedmlp kernel goes through.

- On a GPU: ``triton.autotune`` over the kernel's configurations (cached per kernel).
  An in-place kernel passes ``restore_value`` so autotuning never applies its update twice.
- ``FUSEDMLP_AUTOTUNE=0``: the first configuration, no autotuning (the GPU check's tests use it:
  each new shape would otherwise compile and time every configuration).
- A problem too small to be worth tuning (``work`` below ``worth_tuning``'s size) runs the
  launcher's ``small_config`` without autotuning: it is bound by the launch, and
  timing every configuration for every new small shape (a last partial batch, an evaluation
  batch) cost the README's 5-epoch training run over a minute of tuning on an H100.
- Autotuning times each configuration with ``triton.testing.do_bench`` for ``TUNE_WARMUP_MS`` +
  ``TUNE_REP_MS`` (triton's defaults, 25 + 100 ms, spend seconds per new shape and kernel).
- Under Triton's interpreter (``TRITON_INTERPRET=1``): one fixed configuration, because
  autotune needs a GPU driver; the ``INTERPRET`` constexpr is set for kernels that take it
  (interpreter-only bf16 upcast before ``tl.dot``, see DESIGN.md "Traps").
- Every launch records its (kernel, signature, constexprs, warps, stages, and what the JIT
  would specialise on: integers equal to 1, divisibility by 16) in ``LAUNCHED``, which the test
  suite compiles for sm_90 (H100) on a CPU-only machine.

- On a GPU, a launch whose kernel specialization already ran skips triton's ``JITFunction.run``
  (``_direct_launch``): the compiled kernel found for the arguments' specialization (triton's
  own binder computes it) is called directly, as ``CompiledKernel.__getitem__``'s runner does.
  ``JITFunction.run`` rebuilds its option dict, cache-key string and hook lookups on every
  call: about 35 us of host time per launch on the H200 machine's host against a few us here.
  ``FUSEDMLP_DIRECT_LAUNCH=0`` turns this off.

Launches happen inside ``torch.library.custom_op`` implementations, which ``torch.compile`` treats
as opaque calls with a fake (shape-only) implementation. ``triton_op`` + ``wrap_triton`` would let
inductor see into the kernels, but its functional decomposition traces into the launch, which
fails for interpreted kernels (CPU tensors), so the test suite could not compile what it runs.
"""

from __future__ import annotations

import functools
import inspect
import operator
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl
import triton.language.standard as _tl_standard
from triton import knobs
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from .. import _env

# triton >= 3.6 keeps launch hooks in a HookChain; older releases in a plain attribute.
_HookChain = getattr(knobs, "HookChain", None)

_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}


@triton.jit
def _probe_kernel(x):
    pass


@triton.jit
def flat_tile_ids(n0):
    """``(i, j)``: this program's place in a grid of ``n0`` x ``n1`` tiles launched flat along
    axis 0 (``flat_grid``), ``i`` the faster, as axis 0 is in a 2-D grid. Why flat: CUDA caps a
    grid's axes 1 and 2 at 65,535 programs (axis 0 at 2^31 - 1), fewer than a dimension of a few
    million elements has tiles of 4-64."""
    pid = tl.program_id(0)
    return pid % n0, pid // n0


def flat_grid(n0: int, n1: int) -> tuple[int]:
    """The launch grid of ``flat_tile_ids``'s ``n0`` x ``n1`` tiles."""
    return (n0 * n1,)


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was built by ``@triton.jit`` under ``TRITON_INTERPRET=1``."""
    fn = getattr(kernel, "fn", kernel)  # an Autotuner wraps the jitted function
    return type(fn).__name__ == "InterpretedFunction" or (
        type(kernel).__name__ == "InterpretedFunction"
    )


def interpreter_active() -> bool:
    """Whether this process's triton kernels run under the interpreter (checks kernel objects).

    triton's own ``@jit`` library functions (``tl.sum``, ``tl.max``...) are built when triton is
    imported: with ``TRITON_INTERPRET=1`` set after that and before this module's import, our
    kernels would be interpreted but fail inside those calls, so both must be."""
    return is_interpreted(_probe_kernel) and is_interpreted(_tl_standard.sum)


def raw_function(kernel):
    """The Python function behind a jitted (or interpreted, or autotuned) kernel."""
    while hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


def cdiv(x: int, y: int) -> int:
    """``triton.cdiv`` for host-side ints (grids, splits): the same ``(x + (y - 1)) // y``
    without the ~1-2 us that a call of triton's ``constexpr_function`` costs on the host."""
    return (x + (y - 1)) // y


def next_power_of_2(n: int) -> int:
    """``triton.next_power_of_2`` for host-side ints (same bit arithmetic, no wrapper cost)."""
    n -= 1
    n |= n >> 1
    n |= n >> 2
    n |= n >> 4
    n |= n >> 8
    n |= n >> 16
    n |= n >> 32
    return n + 1


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot``: exact fp32 unless torch allows TF32 for matmuls.

    The interpreter always computes exact fp32, so a TF32 default would pass on CPU and fail
    on a GPU against torch's IEEE matmul.
    """
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _constexpr_names(fn) -> tuple[str, ...]:
    sig = inspect.signature(fn)
    return tuple(n for n, p in sig.parameters.items() if "constexpr" in str(p.annotation))


@dataclass(frozen=True)
class Tma:
    """A kernel argument that ``launch`` passes as a host-side TMA descriptor (triton's
    ``TensorDescriptor``) over the 2-D ``tensor`` (last stride 1; 16-byte aligned address and
    row stride), with the block shape given by the configuration's constexprs named in
    ``block``: the configurations of such a launch may differ in anything but those (stages,
    warps, group size), so one descriptor serves them all. Its sm_90 compile record types the
    argument with the block shape of each configuration it compiles."""

    tensor: torch.Tensor
    block: tuple[str, ...]

    def descriptor(self, meta: dict):
        from triton.tools.tensor_descriptor import TensorDescriptor

        t = self.tensor
        return TensorDescriptor(t, list(t.shape), list(t.stride()), [meta[n] for n in self.block])


def arg_type(value) -> str:
    """Triton signature type of a runtime argument, as the JIT would specialise it; for a
    ``Tma`` argument the block shape is a format string of constexpr names
    (``"tensordesc<bf16[{BLOCK_M}, {BLOCK_K}]>"``)."""
    if isinstance(value, Tma):
        dims = ", ".join("{" + n + "}" for n in value.block)
        return f"tensordesc<{_TYPES[value.tensor.dtype]}[{dims}]>"
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type kernel argument {value!r}")


def arg_specialization(value) -> str:
    """What triton's JIT specialises a runtime argument on, from its value: ``"1"`` for the
    integer 1 (compiled as the constant 1), ``"D"`` for an integer divisible by 16 or a tensor
    whose address is 16-byte aligned (``tt.divisibility = 16``), else ``""``. Kernel parameters
    listed in ``do_not_specialize`` ignore it (the sm_90 compile worker applies that rule)."""
    if isinstance(value, torch.Tensor):
        return "D" if value.data_ptr() % 16 == 0 else ""
    if isinstance(value, int) and not isinstance(value, bool):
        return "1" if value == 1 else "D" if value % 16 == 0 else ""
    return ""


@dataclass(frozen=True)
class LaunchRecord:
    module: str
    name: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    num_stages: int
    gpu_configs: tuple = field(default=(), compare=False, hash=False)
    # (name, arg_specialization) of every runtime argument, as the JIT sees the values
    specialization: tuple[tuple[str, str], ...] = ()


# Every configuration launched in this process: record -> the raw Python kernel function.
LAUNCHED: dict[LaunchRecord, object] = {}

# CUDA's limit on a grid's axes 1 and 2 (axis 0 takes 2^31 - 1 programs).
GRID_YZ_MAX = 65535
# Tests set a list here: under the interpreter ``launch`` then appends ``(kernel name, config,
# grid)`` for every GPU configuration of each launch and skips the run, so launches at sizes the
# interpreter could never run (millions of channels) show whether a GPU could launch them.
GRID_AUDIT: list | None = None


@dataclass(frozen=True)
class _KernelInfo:
    fn: object
    names: tuple[str, ...]
    constexprs: frozenset[str]
    has_interpret: bool
    interpreting: bool
    unspecialized: frozenset[str]  # the kernel's ``do_not_specialize`` parameters
    direct: bool = False  # a compiled JITFunction: ``_run`` may launch it directly
    # meta -> the arguments in the kernel's order, in C (a list comprehension costs ~1 us)
    arguments: Callable | None = None


# id(kernel) -> (kernel, info): hashing a JITFunction hashes its source digest under a lock
# (about 1 us per launch); the value keeps the kernel, checked by identity.
_INFO: dict = {}


def _unspecialized(kernel, names: tuple[str, ...]) -> frozenset[str]:
    while not hasattr(kernel, "do_not_specialize") and not hasattr(kernel, "kwargs"):
        if not hasattr(kernel, "fn"):
            return frozenset()
        kernel = kernel.fn  # an Autotuner wraps the jitted function
    listed = getattr(kernel, "do_not_specialize", None)
    if listed is None:  # interpreted: the @triton.jit keyword arguments
        listed = kernel.kwargs.get("do_not_specialize") or ()
    return frozenset(names[p] if isinstance(p, int) else p for p in listed)


def _arguments(names: tuple[str, ...]) -> Callable:
    """``meta -> tuple(meta[n] for n in names)`` (KeyError for a missing one)."""
    if len(names) == 1:
        get = operator.itemgetter(names[0])
        return lambda meta: (get(meta),)
    return operator.itemgetter(*names)


def _info(kernel) -> _KernelInfo:
    # inspect.signature costs ~70 us: computed once per kernel object, not per launch.
    hit = _INFO.get(id(kernel))
    if hit is not None and hit[0] is kernel:
        return hit[1]
    fn = raw_function(kernel)
    names = tuple(inspect.signature(fn).parameters)
    info = _KernelInfo(
        fn,
        names,
        frozenset(_constexpr_names(fn)),
        "INTERPRET" in names,
        is_interpreted(kernel),
        _unspecialized(kernel, names),
        not is_interpreted(kernel) and isinstance(kernel, JITFunction),
        _arguments(names),
    )
    _INFO[id(kernel)] = (kernel, info)
    return info


def _record(info: _KernelInfo, kwargs: dict, config: triton.Config, gpu_configs) -> None:
    fn, names, cexpr = info.fn, info.names, info.constexprs
    values = {**kwargs, **config.kwargs}
    missing = [n for n in names if n not in values and n not in cexpr]
    if missing:
        raise TypeError(f"{fn.__name__}: missing kernel arguments {missing}")
    signature = tuple((n, "constexpr" if n in cexpr else arg_type(values[n])) for n in names)
    constexprs = tuple((n, values[n]) for n in names if n in cexpr and n in values)
    specialization = tuple(
        (n, "" if n in info.unspecialized else arg_specialization(values[n]))
        for n in names
        if n not in cexpr
    )
    rec = LaunchRecord(
        fn.__module__,
        fn.__qualname__,
        signature,
        constexprs,
        config.num_warps,
        config.num_stages,
        tuple(gpu_configs),
        specialization,
    )
    LAUNCHED.setdefault(rec, fn)


# ``FUSEDMLP_AUTOTUNE=0`` (read once, at import: an environment lookup per launch costs ~1 us).
AUTOTUNE = _env.switch("FUSEDMLP_AUTOTUNE")

# Problems with fewer elements (or, for a GEMM, multiply-adds) than these launch a fixed
# configuration: a kernel this small takes a few microseconds whatever its tiles, less than the
# host's launch, so timing configurations cannot win anything back.
TUNE_MIN_ELEMENTS = 1 << 22
TUNE_MIN_MACS = 1 << 28
# do_bench's warm-up and measurement per configuration, ms (triton's defaults: 25 and 100).
TUNE_WARMUP_MS = 5
TUNE_REP_MS = 25


def worth_tuning(work: int, *, gemm: bool = False) -> bool:
    """Whether a launch over ``work`` elements (multiply-adds with ``gemm``) is autotuned on a
    GPU; below that ``launch`` runs the launcher's ``small_config``."""
    return work >= (TUNE_MIN_MACS if gemm else TUNE_MIN_ELEMENTS)


def _time_config(fn, quantiles=None):
    return triton.testing.do_bench(fn, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS, quantiles=quantiles)


# (id(kernel), id(configs)) -> (kernel, configs, (key, restore, reset), autotuner). Keyed by ids
# (hashing a JITFunction digests its source under a lock, ~1 us per launch); the value keeps the
# kernel and the configs, checked by identity, so a recycled id never returns another autotuner.
_AUTOTUNED: dict = {}
# (autotuner, key values, dtypes of the tensor arguments) -> (config.kwargs, launch options) of
# the tuned configuration.
_BEST: dict = {}
# autotuner -> names of the kernel arguments that are tensors (learnt at its first launch).
_TENSOR_ARGS: dict = {}


def _autotuned(kernel, configs, key, restore_value, reset_to_zero):
    names = (tuple(key), tuple(restore_value), tuple(reset_to_zero))
    hit = _AUTOTUNED.get((id(kernel), id(configs)))
    if hit is not None and hit[0] is kernel and hit[1] is configs and hit[2] == names:
        return hit[3]
    tuned = triton.autotune(
        configs=list(configs),
        key=list(key),
        restore_value=list(restore_value) or None,
        reset_to_zero=list(reset_to_zero) or None,
        do_bench=_time_config,
    )(kernel)
    _AUTOTUNED[(id(kernel), id(configs))] = (kernel, configs, names, tuned)
    return tuned


def launch(
    kernel,
    grid,
    *,
    configs,
    key=(),
    interpret_config: triton.Config | None = None,
    small_config: triton.Config | None = None,
    work: int = 0,
    gemm: bool = False,
    restore_value=(),
    reset_to_zero=(),
    tma=(),
    **kwargs,
):
    """Launch ``kernel`` over ``grid`` with keyword arguments ``kwargs``.

    ``configs``: the GPU autotune space (a list of ``triton.Config``); ``key``: the argument
    names autotune keys on; ``interpret_config``: the fixed configuration used under the
    interpreter (default ``configs[0]``); ``small_config``: the configuration a GPU launches
    without autotuning when ``work`` (elements, or multiply-adds with ``gemm``) is below
    ``worth_tuning``'s size; it is compiled for sm_90 with the others. ``grid`` is a tuple or a
    callable of the meta dict. ``tma``: the names of the ``Tma`` arguments among ``kwargs``
    (their descriptors are built here, with the block shape all ``configs`` share).
    A kernel parameter named ``INTERPRET`` is filled in here. Launches are recorded for the
    sm_90 compile test under the interpreter only (the test suite's CPU runs); on a GPU the
    bookkeeping would only add host overhead to every launch.
    """
    info = _info(kernel)
    interpreting = info.interpreting
    if tma:
        _check_tma_blocks(info, kwargs, tma, configs)
    if info.has_interpret:
        kwargs["INTERPRET"] = interpreting
    fixed = None
    if small_config is not None and not worth_tuning(work, gemm=gemm):
        fixed = small_config
    if interpreting or fixed is not None or len(configs) == 1 or not AUTOTUNE:
        if interpreting:
            config = interpret_config or configs[0]
        else:
            config = fixed or configs[0]
        meta = {**kwargs, **config.kwargs}
        for name in tma:
            meta[name] = kwargs[name].descriptor(config.kwargs)
        if interpreting:
            gpu_configs = configs
            if small_config is not None and small_config not in configs:
                gpu_configs = [*configs, small_config]
            _record(info, kwargs, config, gpu_configs)
            if GRID_AUDIT is not None:
                GRID_AUDIT.extend(
                    (info.fn.__name__, c, grid({**kwargs, **c.kwargs}) if callable(grid) else grid)
                    for c in gpu_configs
                )
                return
            g = grid(meta) if callable(grid) else grid
            # Triton's interpreter keeps the running kernel's state in module globals (the
            # patched ``triton.language``, the program id): one interpreted launch at a time.
            with _INTERPRET_LOCK:
                kernel[g](**meta, num_warps=config.num_warps, num_stages=config.num_stages)
            return
        _run(
            kernel,
            info,
            grid,
            meta,
            (("num_warps", config.num_warps), ("num_stages", config.num_stages)),
        )
        return
    if tma:  # every configuration has the same block shape (_check_tma_blocks)
        kwargs = {**kwargs, **{n: kwargs[n].descriptor(configs[0].kwargs) for n in tma}}
    tuned = _autotuned(kernel, configs, key, restore_value, reset_to_zero)
    # What the autotuner keys on: the key arguments' values, then the dtypes of the tensor
    # arguments (as dtype objects here: str() of each costs host time at every launch).
    # The tensor arguments' names are learnt at the autotuner's first launch (scanning every
    # argument costs ~1.5 us a launch): fusedmlp's launchers pass a tensor (or a placeholder
    # tensor) at the same names at every call. A call where one of them is not a tensor rescans.
    values = tuple(kwargs[k] for k in key if k in kwargs)
    names = _TENSOR_ARGS.get(tuned, ())
    try:
        dtypes = tuple([kwargs[n].dtype for n in names])
    except (KeyError, AttributeError):
        names = ()
    if not names:
        names = tuple(n for n, v in kwargs.items() if isinstance(v, torch.Tensor))
        _TENSOR_ARGS[tuned] = names
        dtypes = tuple([kwargs[n].dtype for n in names])
    best = _BEST.get((tuned, values, dtypes))
    if best is None:
        # triton's Autotuner keeps the call being tuned in attributes (its arguments, the
        # restore_value copies): two threads tuning at once (DataParallel's replicas, autograd's
        # per-device threads) broke each other's run, or restored one's tensors from the other's
        with _TUNE_LOCK:
            best = _BEST.get((tuned, values, dtypes))
            if best is None:
                _tune(tuned, grid, kwargs, (tuned, values, dtypes))
                return
    # Tuned already: launch the jitted kernel with the chosen configuration directly. Autotuner.run
    # rebuilds its key and argument dicts on every call, host time that a small op pays per launch.
    meta_kwargs, options = best
    _run(kernel, info, grid, {**kwargs, **meta_kwargs}, options)


_TUNE_LOCK = threading.Lock()
# Serialises interpreted launches (``launch``): the interpreter is not thread-safe.
_INTERPRET_LOCK = threading.Lock()


def _reset_locks() -> None:
    # a fork while another thread held a lock would leave it held forever in the child
    global _TUNE_LOCK, _INTERPRET_LOCK
    _TUNE_LOCK, _INTERPRET_LOCK = threading.Lock(), threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_locks)


def _tune(tuned, grid, kwargs: dict, best_key: tuple) -> None:
    """Launch through the autotuner ``tuned`` (tuning this key once: restore_value /
    reset_to_zero apply there) and record the configuration it chose in ``_BEST`` at
    ``best_key``, ``(tuned, key values, tensor dtypes)``."""
    tuned[grid](**kwargs)
    # The autotuner's own key: this call's tensor arguments in its keyword order.
    config = tuned.cache.get(
        (*best_key[1], *(str(v.dtype) for v in kwargs.values() if isinstance(v, torch.Tensor)))
    )
    if config is not None and config.pre_hook is None:
        options = tuple((k, v) for k, v in config.all_kwargs().items() if k not in config.kwargs)
        _BEST[best_key] = (config.kwargs, options)


def _check_tma_blocks(info: _KernelInfo, kwargs: dict, tma, configs) -> None:
    """A launch's ``Tma`` arguments get one descriptor for all its configurations: they must
    agree on the block-shape constexprs."""
    names = [n for t in tma for n in kwargs[t].block]
    if len({tuple(c.kwargs[n] for n in names) for c in configs}) != 1:
        raise ValueError(
            f"{info.fn.__name__}: the configurations of a launch with TMA descriptors must share "
            f"the block shape ({', '.join(dict.fromkeys(names))})"
        )


# (id(kernel), device, options, specialization) -> (kernel, the CompiledKernel triton built).
_COMPILED: dict = {}
# ``FUSEDMLP_DIRECT_LAUNCH=0`` (read once, at import): every launch goes through
# ``JITFunction.run`` (benchmarks/host_overhead.py compares both).
DIRECT_LAUNCH = _env.switch("FUSEDMLP_DIRECT_LAUNCH")


def _run(kernel, info: _KernelInfo, grid, meta: dict, options: tuple) -> None:
    """Launch a jitted kernel on a GPU: ``meta`` holds every kernel parameter (constexprs too),
    ``options`` the launch options as ``(name, value)`` pairs (num_warps, num_stages, ...)."""
    key = None
    g = grid(meta) if callable(grid) else grid
    if DIRECT_LAUNCH and info.direct and not kernel.pre_run_hooks and _plain_knobs(kernel):
        try:
            args = info.arguments(meta)
            key = _compiled_key(kernel, args, options)
            hit = _COMPILED.get(key)
        except (KeyError, TypeError):  # a missing argument (triton reports it), unhashable value
            key = hit = None
        if hit is not None and hit[0] is kernel:
            _direct_launch(hit[1], g, args, key[1])
            return
    compiled = kernel[g](**meta, **dict(options))
    if key is not None and compiled is not None:
        _COMPILED[key] = (kernel, compiled)


def _plain_knobs(kernel) -> bool:
    """Whether the triton knobs that ``JITFunction.run`` folds into its cache key or acts on at
    every launch are at their defaults: no debug mode (kernel or ``knobs.runtime.debug``), no
    instrumentation (proton sets it while it profiles), no fpsan casts (triton 3.9), no stages
    inspection hook, and no global value read by the kernel that changed since it compiled
    (``JITFunction.run`` raises then). Otherwise the launch goes through ``JITFunction.run``,
    which recompiles or raises as triton does."""
    comp, rt = knobs.compilation, knobs.runtime
    if (
        kernel.debug
        or rt.debug
        or comp.instrumentation_mode
        or getattr(comp, "fpsan_homomorphic_casts", False)
        or getattr(rt, "add_stages_inspection_hook", None) is not None
    ):
        return False
    missing = object()
    return all(
        globals_dict.get(name, missing) == value
        for (name, _), (value, globals_dict) in kernel.used_global_vals.items()
    )


def _compiled_key(kernel, args: tuple, options: tuple) -> tuple:
    """What selects the compiled kernel: the device, the launch options and the specialization
    triton's binder derives from the arguments (types, 16-byte alignment of pointers, integers
    equal to 1 or divisible by 16, constexpr values), as ``JITFunction.run`` computes it (the
    knobs it also keys on are at their defaults here: ``_plain_knobs``)."""
    device = driver.active.get_current_device()
    hit = _SPECIALIZERS.get((id(kernel), device))
    if hit is None or hit[0] is not kernel:
        hit = _SPECIALIZERS[(id(kernel), device)] = (
            kernel,
            _specializer(kernel, kernel.device_caches[device][4]),
        )
    # id(): hashing a JITFunction hashes its source digest under a lock (~1 us); the cache
    # value holds the kernel, checked by identity.
    return id(kernel), device, options, hit[1](*args)


# (id(kernel), device) -> (kernel, its ``_specializer``)
_SPECIALIZERS: dict = {}


def _specializer(kernel, binder) -> Callable:
    """A function of the kernel's arguments (all of them, in order) that tells apart exactly
    the launches triton's ``binder`` tells apart: ``specialize_impl`` of every runtime argument
    with the flags the binder passes, and every constexpr's value. The binder (triton's
    ``create_function_from_signature``, the same code in 3.6 and 3.9) also builds a dict of
    every argument and a tuple per constexpr that the cache key does not need: ~0.8 us of a
    2.9 us call at 25 arguments. Kernels with annotated parameters keep the binder."""

    def from_binder(*args):
        return tuple(binder(*args)[1])

    names = list(kernel.signature.parameters)
    env = getattr(binder, "__globals__", {})
    spec, backend = env.get("specialize_impl"), env.get("backend")
    params = getattr(kernel, "params", None)
    if spec is None or backend is None or params is None or len(params) != len(names):
        return from_binder
    parts = []
    for name, kp in zip(names, params):
        if kp.annotation_type or name.startswith("_fusedmlp"):
            return from_binder
        if kp.is_constexpr:
            parts.append(name)
        else:
            flags = (kp.is_const, not kp.do_not_specialize, not kp.do_not_specialize_on_alignment)
            parts.append(f"_fusedmlp_spec(_fusedmlp_backend, {name}, {', '.join(map(str, flags))})")
    namespace = {"_fusedmlp_spec": spec, "_fusedmlp_backend": backend}
    exec(f"def specialize({', '.join(names)}):\n    return ({', '.join(parts)},)\n", namespace)
    return namespace["specialize"]


def _direct_launch(compiled, g, args: tuple, device: int) -> None:
    """Call a compiled kernel as ``CompiledKernel.__getitem__``'s runner does (and as
    ``JITFunction.run`` does once it has found it): every parameter, constexprs included, on
    the current stream of ``device`` (the current device, read by ``_compiled_key``)."""
    stream = driver.active.get_current_stream(device)
    rt = knobs.runtime
    enter, leave = _hook(rt.launch_enter_hook), _hook(rt.launch_exit_hook)
    compiled.run(
        g[0],
        g[1] if len(g) > 1 else 1,
        g[2] if len(g) > 2 else 1,
        stream,
        compiled.function,
        compiled.packed_metadata,
        # Only the hooks read the launch metadata: without any, neither is built nor called.
        None if enter is None and leave is None else compiled.launch_metadata(g, stream, *args),
        enter,
        leave,
        *args,
    )


def _hook(hook):
    """A launch hook knob as the launcher should get it: None for no hook, also for an empty
    ``HookChain`` (the knobs' default since triton 3.6: the launcher would call it, and
    ``launch_metadata`` build a dict for it, at every launch, to run no hook)."""
    if hook is None or (type(hook) is _HookChain and not hook.calls):
        return None
    return hook


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of CUDA ``device`` (queried once per device index, never at
    import time)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


# Programs per SM that the split reductions aim for: their 8-warp tiles compile to about 64
# registers for sm_90, so 4 such programs fill an SM's register file (one wave).
PROGRAMS_PER_SM = 4


def row_splits(
    R: int,
    C: int,
    device: torch.device,
    *,
    block_c: int,
    align: int,
    cpu_splits: int,
    cpu_min_rows: int,
) -> tuple[int, int]:
    """``(n_split, rows_per_split)`` of a deterministic split reduction over the R rows of an
    ``[R, C]`` problem (batch-norm statistics and gradients), one program per split and
    ``block_c`` channels.

    GPU: about ``PROGRAMS_PER_SM`` programs per SM, each over a contiguous slice of at least 256
    rows (a multiple of ``align``). CPU (the interpreter): at most ``cpu_splits`` splits of at
    least ``cpu_min_rows`` rows, so that small tests exercise the split merge.
    """
    if device.type == "cuda":
        want = cdiv(PROGRAMS_PER_SM * sm_count(device), cdiv(C, block_c))
        split = max(1, min(want, cdiv(R, 256)))
        rows = cdiv(cdiv(R, split), align) * align
    else:
        split = max(1, min(cpu_splits, cdiv(R, cpu_min_rows)))
        rows = cdiv(R, split)
    return cdiv(R, rows), rows


class on_device:
    """Launch on ``t``'s GPU (multi-GPU machines); a no-op for CPU tensors.

    ``torch.cuda.device``'s own work (exchange the current device, restore it) without its
    device-index parsing and without a generator-based context manager: it runs around every
    launch, and each of those costs microseconds of host time per launch.
    """

    __slots__ = ("index", "previous")

    def __init__(self, t: torch.Tensor):
        self.index = t.device.index if t.is_cuda else None

    def __enter__(self):
        if self.index is not None:
            self.previous = torch.cuda._exchange_device(self.index)
        return self

    def __exit__(self, *exc):
        if self.index is not None:
            torch.cuda._maybe_exchange_device(self.previous)
        return False


__all__ = [
    "LAUNCHED",
    "LaunchRecord",
    "arg_specialization",
    "arg_type",
    "cdiv",
    "dot_precision",
    "flat_grid",
    "flat_tile_ids",
    "interpreter_active",
    "is_interpreted",
    "launch",
    "next_power_of_2",
    "on_device",
    "raw_function",
    "row_splits",
    "sm_count",
]
