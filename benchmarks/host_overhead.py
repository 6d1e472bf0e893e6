"""Host time of a training step on a CPU-only machine, through triton's real launch path.

    python benchmarks/host_overhead.py [--batch 64] [--width 256] [--depth 4] [--steps 50]
    python benchmarks/host_overhead.py --autotune     (multi-config kernels as a GPU launches them)
    python benchmarks/host_overhead.py --peak --batch 16384 --width 1024   (memory, not time)
    python benchmarks/host_overhead.py --ops          (host time per op, beside torch's CPU op)
    python benchmarks/host_overhead.py --layers       (one Linear forward entered at each layer)
    python benchmarks/host_overhead.py --phases       (the step's forward/loss/backward/optimizer)
    python benchmarks/host_overhead.py --big-path     (the bench's w1024 B16K step's code paths)
    python benchmarks/host_overhead.py --no-batchnorm (Linear(relu) -> Dropout blocks)
    PYTHONPATH=.triton36 python benchmarks/host_overhead.py     (triton 3.6, the GPU machines')
    python benchmarks/host_overhead.py --check-direct [--tma]   (direct launches = triton's)

A small MLP step (``fusedmlp bench``'s: [Linear-BN-ReLU-Dropout] x depth + Linear,
cross-entropy, Adam) runs with CPU tensors standing in for CUDA ones and triton NOT interpreting:
every kernel is compiled for sm_90 (as on an H100, with ptxas) and launched through
``JITFunction.run`` exactly as on a GPU, except that a recording driver replaces the CUDA one, so
the final ``cuLaunchKernel`` never happens (and no kernel computes anything: the tensors hold
garbage). The launchers choose their splits as on an H100 (``gpu_geometry``): with the
interpreter's small-test heuristics a batch of 64 would launch merge kernels a GPU skips.
Three figures per step, each the fastest of ``--steps`` steps timed one by one:

- ``launch path``: the whole step with the real launch path;
- ``launches as no-ops``: the same with ``JITFunction.run`` replaced by a no-op: what fusedmlp's
  own Python and the torch calls around the launches cost;
- the number of launches per step.

A development tool for sessions without a GPU: it patches triton internals (the CUDA driver and
launcher classes of triton 3.6 and 3.9) and may need adjusting for other releases. What it cannot
see: the driver's own launch cost and anything that waits on the GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)


def install_recording_driver(record_args: bool = False) -> list:
    """Make triton compile for sm_90 and 'launch' into a list instead of a GPU; returns it
    (kernel names, or with ``record_args`` (name, launcher, flattened launch arguments))."""
    from triton.backends.nvidia import driver as nvd
    from triton.runtime.driver import driver

    calls: list = []

    class Utils:
        def load_binary(self, name, kernel, shared, device):
            return 1, 2, 32, 0, 1024  # module, function, registers, spills, max threads

        def get_device_properties(self, device):
            return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536}

    def launcher(src, metadata):
        obj = nvd.CudaLauncher.__new__(nvd.CudaLauncher)
        obj.num_ctas = getattr(metadata, "num_ctas", 1)
        for name in (
            "global_scratch_size",
            "global_scratch_align",
            "profile_scratch_size",
            "profile_scratch_align",
            "launch_cooperative_grid",
            "launch_pdl",
        ):
            setattr(obj, name, getattr(metadata, name))

        # triton 3.9's launcher also reads these (GSan off: the argument tuple passes as is).
        obj.gsan_enabled, obj.arg_annotations, obj.kernel_signature = False, None, None

        def launch(*args):  # 3.6: (..., *kernel_args); 3.9: (..., kernel_args)
            flat = tuple(b for a in args for b in (a if isinstance(a, tuple) else (a,)))
            for b in flat:
                if hasattr(b, "data_ptr"):  # the C launcher reads every tensor's address
                    b.data_ptr()
            name = getattr(getattr(src, "fn", None), "__name__", "?")
            calls.append((name, obj, flat) if record_args else name)

        obj.launch = launch
        return obj

    fake = nvd.CudaDriver.__new__(nvd.CudaDriver)
    fake.utils = Utils()
    fake.launcher_cls = launcher
    fake.get_device_capability = lambda device=0: (9, 0)
    fake.get_current_stream = lambda device=0: 0
    fake.get_current_device = lambda: 0
    fake.set_current_device = lambda device: None
    driver.set_active(fake)
    return calls


class _H100:
    """Stands in for ``torch.device("cuda", 0)`` where launchers choose a geometry by device."""

    type, index = "cuda", 0


def gpu_geometry(sms: int = 132) -> None:
    """Make the launchers choose their splits as on an H100 (``sms`` SMs) for the CPU tensors:
    the split reductions (batch norm, the fused block, linear's db and dW) and the
    cross-entropy check otherwise take the interpreter's small-test geometry, which launches
    merge kernels a GPU would not need at small batches."""
    import functools

    from fusedmlp.kernels import batchnorm, cross_entropy, fused_block, launch, linear

    launch._sm_count = functools.cache(lambda index: sms)
    for module in (batchnorm, fused_block, linear):
        splits = module.row_splits
        module.row_splits = functools.wraps(splits)(
            lambda R, C, device, _f=splits, **kw: _f(R, C, _H100, **kw)
        )
    # The TMA forward's persistent programs, one per SM (its size rule counts waves of them)
    linear._tma_programs = lambda device: sms
    dw_split, dz_dw_split = linear.dw_split, linear.dz_dw_split
    linear.dw_split = lambda M, N, K, device: dw_split(M, N, K, _H100)
    linear.dz_dw_split = lambda M, N, K, device: dz_dw_split(M, N, K, _H100)
    cross_entropy.check_on_one_program = lambda target: (
        target.numel() <= cross_entropy._CHECK_ONE_PROGRAM
    )
    cross_entropy.loss_on_one_program = lambda n, device: n <= cross_entropy._LOSS_ONE_PROGRAM
    count, reduce = cross_entropy.count_bad_targets, cross_entropy.reduce_loss
    # No kernel computes: the counts the loss reads back would be garbage (out-of-range targets).
    cross_entropy.count_bad_targets = lambda *args: count(*args).zero_()

    def reduce_loss(*args):
        loss, factor, counts = reduce(*args)
        return loss, factor, counts.zero_() if counts is not None else None

    cross_entropy.reduce_loss = reduce_loss


def skip_tuning() -> None:
    """Make triton's autotuner choose each kernel's first configuration without benchmarking
    (timing needs a GPU): one configuration left after pruning, timed as a constant."""
    from triton.runtime.autotuner import Autotuner

    Autotuner.prune_configs = lambda self, kwargs, *a, **k: self.configs[:1]
    Autotuner._bench = lambda self, *a, **k: [1.0, 1.0, 1.0]


def print_profile(fn, steps: int, top: int) -> int:
    """cProfile of ``steps`` calls of ``fn``: the ``top`` functions by own and by total time."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.runcall(lambda: [fn() for _ in range(steps)])
    stats = pstats.Stats(prof).strip_dirs()
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--cprofile", type=int, default=0, metavar="N", help="print the N costliest functions"
    )
    parser.add_argument(
        "--adam-tensors",
        type=int,
        default=0,
        metavar="T",
        help="instead of the MLP step: fusedmlp.optim.Adam's step over T tensors of 1000 elements",
    )
    parser.add_argument(
        "--sgd",
        action="store_true",
        help="with --adam-tensors: fusedmlp.optim.SGD (momentum 0.9) instead of Adam",
    )
    parser.add_argument(
        "--fresh-grads",
        action="store_true",
        help="with --adam-tensors: new gradient tensors before every step (as zero_grad("
        "set_to_none=True) and a backward make them); their allocation is timed apart and "
        "left out",
    )
    parser.add_argument(
        "--check-direct",
        action="store_true",
        help="launch every kernel of a step both ways (fusedmlp's direct launch of the cached "
        "compiled kernel, triton's JITFunction.run) and check the launcher calls are identical",
    )
    parser.add_argument(
        "--autotune",
        action="store_true",
        help="launch multi-config kernels through fusedmlp's autotuned path, as on a GPU (the "
        "'tuning' picks each kernel's first configuration without timing anything)",
    )
    parser.add_argument(
        "--tma",
        action="store_true",
        help="the step's forward GEMMs through the TMA kernel (FUSEDMLP_TMA=1: TF32 too, at "
        "every size)",
    )
    parser.add_argument(
        "--no-batchnorm",
        action="store_true",
        help="the MLP without BatchNorm: Linear(relu) -> Dropout blocks (the dropout in the "
        "Linear's epilogue)",
    )
    parser.add_argument(
        "--big-path",
        action="store_true",
        help="the code paths a GPU takes for the bench's step at width 1024, batch 16K (issue "
        "8), at this batch: TF32 matmuls, every linear backward on the 'dz' path (two GEMM "
        "launches and the transposed copies), and the block output recomputed for the next "
        "Linear's dW instead of kept",
    )
    parser.add_argument(
        "--peak",
        action="store_true",
        help="instead of timing: the bytes in use at each launch of one step (glibc's mallinfo2, "
        "so only on Linux), with TF32 matmuls and each linear backward on the path a GPU takes "
        "(the bench's step: --batch 16384 --width 1024)",
    )
    parser.add_argument(
        "--ops",
        action="store_true",
        help="instead of the step: host microseconds per call of each op (forward, backward), "
        "fusedmlp through the recording driver beside torch's CPU op at the same small size",
    )
    parser.add_argument(
        "--layers",
        action="store_true",
        help="instead of the step: host microseconds of one Linear(relu) forward (64 x 64) entered "
        "at each layer of fusedmlp's stack, module down to the launch, beside torch's module",
    )
    parser.add_argument(
        "--phases",
        action="store_true",
        help="the step's host ms by phase (forward, loss, backward, optimizer step), launches "
        "as no-ops, beside torch's own model (MLP.to_torch(), torch.optim.Adam) on the CPU",
    )
    args = parser.parse_args(argv)
    if args.autotune:
        os.environ["FUSEDMLP_AUTOTUNE"] = "1"
        skip_tuning()
    else:
        os.environ.setdefault("FUSEDMLP_AUTOTUNE", "0")  # autotuning would time kernels on a GPU

    import torch
    import triton
    from triton.runtime.jit import JITFunction

    calls = install_recording_driver(record_args=args.check_direct)

    import fusedmlp
    import fusedmlp.kernels.launch as L
    from fusedmlp import nn as fnn
    from fusedmlp import optim as fo

    L.interpreter_active = lambda: True  # CPU tensors stand in for CUDA ones
    gpu_geometry()
    fusedmlp.set_backend("triton")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.tma:
        import fusedmlp.kernels.linear as KL

        KL.TMA, KL.TMA_TF32, KL.TMA_MIN_MACS, KL.TMA_MIN_WAVES = True, True, 0, 0
        torch.set_float32_matmul_precision("high")
    if args.big_path:
        import fusedmlp.autograd.fused_block as AFB
        import fusedmlp.kernels.linear as KL

        torch.set_float32_matmul_precision("high")
        KL.BACKWARD_PATH = "dz"
        AFB.RECOMPUTE_MIN_BYTES = 0
    if args.ops:
        return per_op(torch)
    if args.layers:
        return per_layer(torch, JITFunction, L)
    if args.adam_tensors:
        params = [torch.randn(1000, requires_grad=True) for _ in range(args.adam_tensors)]
        for p in params:
            p.grad = torch.randn_like(p)
        if args.sgd:
            opt = fo.SGD(params, lr=1e-3, momentum=0.9)
        else:
            opt = fo.Adam(params, lr=1e-3)
        for _ in range(3):
            opt.step()
        if args.check_direct:
            return check_direct(L, opt.step, calls)
        if args.cprofile:
            return print_profile(opt.step, args.steps, args.cprofile)

        def fresh_grads():
            for p in params:
                p.grad = torch.empty_like(p)

        def timed(fn) -> float:
            start = time.perf_counter()
            for _ in range(args.steps):
                fn()
            return (time.perf_counter() - start) / args.steps

        if args.fresh_grads:
            per_step = timed(lambda: (fresh_grads(), opt.step())) - timed(fresh_grads)
        else:
            per_step = timed(opt.step)
        name = "SGD (momentum 0.9)" if args.sgd else "Adam"
        grads = ", fresh gradients every step" if args.fresh_grads else ""
        print(
            f"{name} over {args.adam_tensors} tensors{grads}: {per_step * 1e6:.0f} us/step (host)"
        )
        return 0
    x = torch.randn(args.batch, args.width)
    y = torch.randint(0, 10, (args.batch,))
    model = fnn.MLP(
        args.width,
        [args.width] * args.depth,
        10,
        activation="relu",
        batchnorm=not args.no_batchnorm,
        dropout=0.1,
    )
    loss_fn = fnn.CrossEntropyLoss()
    opt = fo.Adam(model.parameters(), lr=1e-3)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    if args.peak:
        return peak(L, torch, step)
    if args.phases:
        return phases(L, torch, JITFunction, model, loss_fn, opt, x, y, args.steps)
    start = time.perf_counter()
    for _ in range(2):
        step()  # compiles every kernel for sm_90
    compile_s = time.perf_counter() - start

    def per_step() -> float:
        # Each step timed alone and the fastest kept: a busy or throttled machine only adds
        # time to a step, so the minimum moves far less between runs than the mean (sessions
        # up to the eighteenth printed the mean: 20-30% apart between runs on a noisy machine).
        for _ in range(3):
            step()
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return min(times)

    if args.check_direct:
        return check_direct(L, step, calls)
    calls.clear()
    real = per_step()
    launches = len(calls) / (args.steps + 3)
    L.DIRECT_LAUNCH = False
    triton_path = per_step()
    L.DIRECT_LAUNCH = True
    run = JITFunction.run
    JITFunction.run = lambda self, *a, **k: None
    L.DIRECT_LAUNCH = False
    try:
        own = per_step()
    finally:
        JITFunction.run = run
        L.DIRECT_LAUNCH = True
    print(f"triton {triton.__version__}, torch {torch.__version__}; compile {compile_s:.1f} s")
    if args.cprofile:
        print_profile(step, args.steps, args.cprofile)
    n = max(launches, 1)
    print(
        f"batch {args.batch} width {args.width} depth {args.depth}, {launches:.0f} launches/step "
        f"(the fastest of {args.steps} steps): direct launches {real * 1e3:.3f} ms/step ({(real - own) / n * 1e6:.1f} us each), "
        f"all through JITFunction.run {triton_path * 1e3:.3f} ms/step "
        f"({(triton_path - own) / n * 1e6:.1f} us each), launches as no-ops {own * 1e3:.3f} ms/step"
    )
    return 0


def _best_us(fn, n=1000) -> float:
    """Host microseconds per call of ``fn``: the best of 5 runs of ``n`` calls, after 50."""
    for _ in range(50):
        fn()
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - start) / n * 1e6)
    return min(runs)


def per_layer(torch, JITFunction, L) -> int:
    """Host us of one ``fusedmlp.nn.Linear(64, 64, activation="relu")`` forward (input requiring
    grad, grad mode on) entered at each layer, top to bottom: what each layer adds is the
    difference between two rows."""
    from fusedmlp import nn as fnn
    from fusedmlp.autograd import linear as AL
    from fusedmlp.kernels import linear as KL

    x = torch.randn(64, 64, requires_grad=True)
    lin = fnn.Linear(64, 64, activation="relu")
    w, b = lin.weight, lin.bias
    xd, wd, bd = x.detach(), w.detach(), b.detach()
    ref = torch.nn.Linear(64, 64)
    rows = [
        ("module: Linear.forward", lambda: lin(x)),
        ("functional: autograd.linear.linear", lambda: AL.linear(x, w, b, "relu", 0.01)),
        ("LinearFunction.apply", lambda: AL.LinearFunction.apply(x, w, b, "relu", 0.01)),
        ("custom op caller (fast path)", lambda: AL._linear_fwd(xd, wd, bd, "relu", 0.01)),
        ("kernels.linear.linear_forward", lambda: KL.linear_forward(xd, wd, bd, "relu", 0.01)),
    ]
    print(f"{'entered at (Linear(64, 64, relu) forward)':44s} {'host us':>8s}")
    for name, fn in rows:
        print(f"{name:44s} {_best_us(fn):8.1f}")
    run, direct = JITFunction.run, L.DIRECT_LAUNCH
    JITFunction.run, L.DIRECT_LAUNCH = (lambda self, *a, **k: None), False
    try:
        print(f"{'linear_forward, its launch a no-op':44s} {_best_us(rows[-1][1]):8.1f}")
        print(f"{'module, its launch a no-op':44s} {_best_us(rows[0][1]):8.1f}")
    finally:
        JITFunction.run, L.DIRECT_LAUNCH = run, direct
    print(
        f"{'torch: relu(nn.Linear(x)) on the CPU':44s} {_best_us(lambda: torch.relu(ref(x))):8.1f}"
    )
    return 0


def phases(L, torch, JITFunction, model, loss_fn, opt, x, y, steps: int) -> int:
    """Host ms of each phase of the step, the fastest of ``steps`` for each: fusedmlp with its
    launches as no-ops (its own Python and torch calls) beside torch's own model, loss and
    Adam on the CPU, whose figures include their compute (small at small sizes)."""
    ref = model.to_torch()
    ref.train()
    runs = {
        "fusedmlp, launches as no-ops": (model, loss_fn, opt),
        "torch on the CPU, compute included": (
            ref,
            torch.nn.CrossEntropyLoss(),
            torch.optim.Adam(ref.parameters(), lr=1e-3),
        ),
    }
    names = ("forward", "loss", "backward", "optimizer")
    print(f"batch {x.shape[0]} width {x.shape[1]}: host ms per phase (the fastest of {steps})")
    print(f"{'':36s}" + "".join(f"{n:>10s}" for n in names) + f"{'step':>10s}")

    def timed(net, lf, o) -> list:
        o.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        out = net(x)
        t1 = time.perf_counter()
        loss = lf(out, y)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        o.step()
        return [t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3]

    run, direct = JITFunction.run, L.DIRECT_LAUNCH
    for name, parts in runs.items():
        for _ in range(3):  # warm-up: compiles, lazy state
            timed(*parts)
        if parts[0] is model:
            JITFunction.run, L.DIRECT_LAUNCH = (lambda self, *a, **k: None), False
        try:
            best = [min(t) for t in zip(*(timed(*parts) for _ in range(steps)))]
        finally:
            JITFunction.run, L.DIRECT_LAUNCH = run, direct
        cells = "".join(f"{b * 1e3:10.3f}" for b in best)
        print(f"{name:36s}{cells}{sum(best) * 1e3:10.3f}")
    return 0


def per_op(torch) -> int:
    """Host us per call, best of 5 runs: each fusedmlp op (its kernels launched into the
    recording driver) beside torch's own op on the CPU at the same small size, where torch's
    figure is mostly its host path too."""
    import torch.nn.functional as F

    from fusedmlp import functional as FF
    from fusedmlp import nn as fnn

    best = _best_us

    def backward(out, leaves):
        g = torch.randn_like(out)

        def run():
            for t in leaves:
                t.grad = None
            out.backward(g, retain_graph=True)

        return run

    x = torch.randn(64, 64, requires_grad=True)
    lin, tlin = fnn.Linear(64, 64, activation="relu"), torch.nn.Linear(64, 64)
    bn, tbn = fnn.BatchNorm1d(64), torch.nn.BatchNorm1d(64)
    logits, target = torch.randn(64, 10, requires_grad=True), torch.randint(0, 10, (64,))
    pairs = {
        "linear+relu fwd": (lambda: lin(x), lambda: torch.relu(tlin(x))),
        "linear+relu bwd": (
            backward(lin(x), [x, *lin.parameters()]),
            backward(torch.relu(tlin(x)), [x, *tlin.parameters()]),
        ),
        "batchnorm fwd": (lambda: bn(x), lambda: tbn(x)),
        "batchnorm bwd": (
            backward(bn(x), [x, *bn.parameters()]),
            backward(torch.nn.BatchNorm1d(64)(x), [x]),
        ),
        "dropout fwd": (lambda: FF.dropout(x, 0.5, True), lambda: F.dropout(x, 0.5, True)),
        "dropout bwd": (
            backward(FF.dropout(x, 0.5, True), [x]),
            backward(F.dropout(x, 0.5, True), [x]),
        ),
        "cross_entropy fwd": (
            lambda: FF.cross_entropy(logits, target),
            lambda: F.cross_entropy(logits, target),
        ),
        "cross_entropy fwd+bwd": (
            lambda: FF.cross_entropy(logits, target).backward(),
            lambda: F.cross_entropy(logits, target).backward(),
        ),
    }
    print(f"{'op (64 x 64, CPU)':24s} {'fusedmlp us':>12s} {'torch us':>9s}")
    for name, (ours, theirs) in pairs.items():
        print(f"{name:24s} {best(ours):12.1f} {best(theirs):9.1f}")
    return 0


def peak(L, torch, step) -> int:
    """Print the peak of the bytes in use over one step, sampled at every launch (a kernel's
    buffers all exist when it launches), and where it happens: a CPU stand-in for the GPU
    allocator's peak (the caching allocator's own overhead aside)."""
    import ctypes

    from fusedmlp.kernels import linear as KL

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                         "uordblks", "fordblks", "keepcost")
        ]  # fmt: skip

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2

    def in_use() -> int:
        info = libc.mallinfo2()
        return info.hblkhd + info.uordblks  # mmapped blocks (the big tensors) + the heap's

    torch.set_float32_matmul_precision("high")  # TF32, as the bench's step
    choose = KL.backward_path
    cuda = torch.device("cuda")
    KL.backward_path = lambda dtype, prec, M, N, K, device: choose(dtype, prec, M, N, K, cuda)
    for _ in range(2):
        step()
    trace = []
    direct = L._direct_launch

    def sampled(compiled, *args):
        trace.append((compiled.name, in_use()))
        return direct(compiled, *args)

    L._direct_launch = sampled
    before = in_use()
    try:
        step()
    finally:
        L._direct_launch = direct
    top = max(range(len(trace)), key=lambda i: trace[i][1])
    print(f"in use before the step: {before / 2**20:.0f} MiB; peak {trace[top][1] / 2**20:.0f} MiB "
          f"at launch {top + 1} of {len(trace)} ({trace[top][0]})")  # fmt: skip
    for i, (name, used) in enumerate(trace, 1):
        print(f"  {i:3d} {used / 2**20:7.0f} MiB  {name}")
    return 0


def _same_argument(x, y) -> bool:
    x, y = _no_hook(x), _no_hook(y)
    if x is y:
        return True
    if {type(x).__name__, type(y).__name__} == {"LazyDict", "NoneType"}:
        return True  # metadata for no hook: JITFunction.run builds it, the direct launch skips it
    if type(x) is not type(y) or hasattr(x, "data_ptr"):  # tensors: the same object
        return False
    if type(x).__name__ == "LazyDict":  # launch metadata, built per launch when a hook is set
        return x.data == y.data
    return x == y


def _no_hook(x):
    """An empty launch-hook chain calls nothing: the same as no hook (None)."""
    return None if type(x).__name__ == "HookChain" and not x.calls else x


def check_direct(L, step, calls) -> int:
    """Run a step with every launch made twice, through ``JITFunction.run`` and through
    fusedmlp's direct launch, and compare what reached the launcher (the compiled kernel's
    launcher object, grid, stream, metadata, hooks, every argument) and the specialization
    each path computed."""
    run, direct = L._run, L._direct_launch
    stats = {"launches": 0, "direct": 0}
    kernels = set()

    def counted(*a):
        stats["direct"] += 1
        direct(*a)

    def both(kernel, info, grid, meta, options):
        n = len(calls)
        L.DIRECT_LAUNCH = False
        run(kernel, info, grid, meta, options)
        L.DIRECT_LAUNCH = True
        run(kernel, info, grid, meta, options)
        (name, a_obj, a_args), (_, b_obj, b_args) = calls[n], calls[n + 1]
        same = a_obj is b_obj and len(a_args) == len(b_args)
        same = same and all(map(_same_argument, a_args, b_args))
        if not same:
            raise AssertionError(f"{name}: direct launch differs\n{a_args}\n{b_args}")
        # fusedmlp's specializer tells launches apart as triton's binder does: the same values
        # (a constexpr's value bare, where the binder writes ("constexpr", value))
        args = info.arguments(meta)
        ours = L._compiled_key(kernel, args, options)[3]
        binder = kernel.device_caches[L.driver.active.get_current_device()][4]
        theirs = tuple(
            v[1] if kp.is_constexpr else v for kp, v in zip(kernel.params, binder(*args)[1])
        )
        if ours != theirs:
            raise AssertionError(f"{name}: specialization differs\n{ours}\n{theirs}")
        stats["launches"] += 1
        kernels.add(name)

    L._run, L._direct_launch = both, counted
    try:
        step()
    finally:
        L._run, L._direct_launch = run, direct
    print(
        f"direct launch check: {stats['launches']} launches, {stats['direct']} direct, identical "
        f"({', '.join(sorted(kernels))})"
    )
    return 0 if stats["launches"] and stats["direct"] == stats["launches"] else 1


if __name__ == "__main__":
    sys.exit(main())
