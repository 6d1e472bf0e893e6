"""Where the time of one MLP training step goes: host (Python) and device (kernels).

    python benchmarks/profile_step.py [--out DIR] [--shapes 64x256,16384x1024] [--steps N]

For each ``batch x width`` shape, the step of ``fusedmlp bench``'s MLP cases (4 x [Linear-BN-
ReLU-Dropout] + Linear, cross-entropy, Adam; ``cli/_bench_ops.build_mlp_step``), for fusedmlp
and for eager torch:

- ``wall``: wall time per step over a block of steps between two synchronisations;
- ``torch.profiler`` (CPU + CUDA activities) over a few steps: the per-kernel device times
  (``*_kernels.txt``, sorted by self device time) and the per-op host times (``*_ops.txt``,
  sorted by self CPU time);
- ``cProfile`` of the fusedmlp step (``*_cprofile.txt``): the Python functions, by own time and
  by cumulative time.

First (CUDA only), one line per launch path (``launch.txt``): the host time of one launch of a
tiny kernel through ``fusedmlp.kernels.launch.launch``, through triton's ``kernel[grid](...)``
directly, and of one small torch op, for reference: what a launch costs on this machine's CPU.
``summary.txt`` is rewritten after every shape, so a timeout keeps what ran.

``--ops``: instead of the steps, single ops at the bench's shapes (batch norm forward and
backward 64K x 1024 bf16, linear+ReLU forward 16K x 256 x 256 bf16, Adam over 50M parameters
in 100 tensors), fusedmlp beside torch: wall time per call over back-to-back calls (the host's
pace when it is slower than the kernels) and a cProfile of fusedmlp's calls
(``op_<name>_cprofile.txt``).

On a CPU-only machine it runs the same steps (fusedmlp on its torch fallback, so it says
nothing about the kernels); ``benchmarks/gpu_check.sh`` runs it on the GPU machine.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

import torch

from fusedmlp.cli import _bench_ops as O


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _wall(fn, device, steps: int) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / steps


def _profile(fn, device, steps: int, prefix: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        _sync(device)
    averages = prof.key_averages()
    if device.type == "cuda":
        table = averages.table(
            sort_by="self_device_time_total", row_limit=40, max_name_column_width=70
        )
        prefix.with_name(prefix.name + "_kernels.txt").write_text(
            f"{steps} steps; sorted by self device (CUDA) time\n{table}\n"
        )
    table = averages.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70)
    prefix.with_name(prefix.name + "_ops.txt").write_text(
        f"{steps} steps; sorted by self CPU time\n{table}\n"
    )


def _cprofile(fn, device, steps: int, path: Path) -> None:
    prof = cProfile.Profile()
    _sync(device)
    prof.enable()
    for _ in range(steps):
        fn()
    _sync(device)
    prof.disable()
    out = io.StringIO()
    for key in ("tottime", "cumulative"):
        out.write(f"==== {steps} steps, sorted by {key}\n")
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(45)
    path.write_text(out.getvalue())


def _per_call(fn, calls: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def launch_costs(device, calls: int = 2000) -> list[str]:
    """Host time per launch of a tiny dropout kernel through each path (no synchronisation in
    the loop: what the host spends before it can issue the next launch)."""
    from fusedmlp.kernels import dropout as KD
    from fusedmlp.kernels import launch as L

    x = torch.randn(1024, device=device)
    seed = torch.zeros(1, dtype=torch.int64, device=device)
    lines = []
    with L.on_device(x):
        KD.dropout_apply(x, seed, 0.5)  # compiles
    captured = {}
    original = KD.launch

    def spy(kernel, grid, **kwargs):
        captured.update(kernel=kernel, grid=grid, kwargs=dict(kwargs))
        return original(kernel, grid, **kwargs)

    KD.launch = spy
    try:
        KD.dropout_apply(x, seed, 0.5)
    finally:
        KD.launch = original
    kernel, grid, kwargs = captured["kernel"], captured["grid"], captured["kwargs"]
    lines.append(
        f"dropout_apply (the op's launcher: checks, output, launch): "
        f"{_per_call(lambda: KD.dropout_apply(x, seed, 0.5), calls) * 1e6:.1f} us"
    )
    lines.append(
        f"fusedmlp.kernels.launch.launch: "
        f"{_per_call(lambda: L.launch(kernel, grid, **kwargs), calls) * 1e6:.1f} us"
    )
    configs = kwargs.pop("configs")
    for name in ("key", "interpret_config", "small_config", "work", "gemm", "restore_value",
                 "reset_to_zero"):  # fmt: skip
        kwargs.pop(name, None)
    config = configs[0]
    meta = {**kwargs, **config.kwargs}
    if "INTERPRET" in L._info(kernel).names:
        meta["INTERPRET"] = L._info(kernel).interpreting
    g = grid(meta) if callable(grid) else grid
    lines.append(
        f"triton kernel[grid](**kwargs): "
        f"{_per_call(lambda: kernel[g](**meta, num_warps=config.num_warps, num_stages=config.num_stages), calls) * 1e6:.1f} us"  # noqa: E501
    )
    y = torch.empty_like(x)
    lines.append(f"torch.empty_like: {_per_call(lambda: torch.empty_like(x), calls) * 1e6:.1f} us")
    lines.append(f"torch add_ (one kernel): {_per_call(lambda: y.add_(1.0), calls) * 1e6:.1f} us")
    _sync(device)
    return lines


def _ops(device, steps: int, out: Path, say) -> None:
    bf16 = torch.bfloat16
    big = device.type == "cuda"
    n, c = (65536, 1024) if big else (4096, 256)
    cases = {
        "batchnorm_fwd": lambda impl: O.build_batchnorm(impl, device, bf16, n, c, False),
        "batchnorm_bwd": lambda impl: O.build_batchnorm(impl, device, bf16, n, c, True),
        "linear_relu_fwd": lambda impl: O.build_linear(
            impl, device, bf16, 16384 if big else 1024, 256, 256, False
        ),
        "adam_100": lambda impl: O.build_optimizer(
            impl, device, "adam", 50_000_000 if big else 1_000_000, 100
        ),
    }
    for name, build in cases.items():
        for impl in ("fusedmlp", "torch"):
            prepared = build(impl)()
            fn = prepared.fn
            for _ in range(3):
                fn()
            wall = _wall(fn, device, steps * 5)
            say(f"op {name:16s} {impl:9s}: {wall * 1e6:9.1f} us/call wall ({prepared.backend})")
            if impl == "fusedmlp":
                _cprofile(fn, device, steps * 5, out / f"op_{name}_cprofile.txt")
            del prepared, fn


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="profile-results")
    parser.add_argument("--shapes", default="64x256,16384x256,16384x1024")
    parser.add_argument("--steps", type=int, default=20, help="steps per measurement")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", action="store_true", help="single ops instead of the steps")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = []

    def say(line: str) -> None:
        print(line, flush=True)
        summary.append(line)
        (out / "summary.txt").write_text("\n".join(summary) + "\n")  # a timeout keeps what ran

    say(
        f"device {device}: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}"
    )
    say(f"torch {torch.__version__}, FUSEDMLP_AUTOTUNE={os.environ.get('FUSEDMLP_AUTOTUNE')}")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # as the bench's MLP cases (TF32)
    try:
        if device.type == "cuda":  # first: the cheapest and most telling figures
            lines = launch_costs(device)
            for line in lines:
                say("launch: " + line)
            (out / "launch.txt").write_text("\n".join(lines) + "\n")
        if args.ops:
            _ops(device, args.steps, out, say)
            return 0
        for shape in args.shapes.split(","):
            batch, width = (int(v) for v in shape.lower().split("x"))
            for impl in ("fusedmlp", "torch"):
                prepared = O.build_mlp_step(impl, device, batch, width)()
                fn = prepared.fn
                for _ in range(3):
                    fn()
                wall = _wall(fn, device, args.steps)
                say(
                    f"{impl:9s} B={batch:6d} width={width:5d}: {wall * 1e3:8.3f} ms/step ({prepared.backend})"
                )
                prefix = out / f"{impl}_{batch}x{width}"
                _profile(fn, device, min(args.steps, 5), prefix)
                if impl == "fusedmlp":
                    _cprofile(
                        fn, device, args.steps, prefix.with_name(prefix.name + "_cprofile.txt")
                    )
                del prepared, fn
    finally:
        torch.set_float32_matmul_precision(previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
