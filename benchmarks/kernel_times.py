"""Kernel-only GPU time next to the event-timed figure of ``fusedmlp bench``, per op.

    python benchmarks/kernel_times.py [--out DIR] [--budget SECONDS] [--sections a,b,...]
                                      [--match REGEX] [--passes event,kernel|kernel]

``fusedmlp bench`` times each call the ``triton.testing.do_bench`` way (CUDA events around the
call, L2 flushed before it). When the host needs longer to issue a call than the GPU needs to
run it, that figure is the host's time, not the kernels'. This script also sums the device
time of the kernels the call launched (torch.profiler, CUDA activity), so each row shows both:
``event ms`` (what the bench reports) and ``kernel ms`` (GPU busy time; host excluded).

Sections (run in the order ``--sections`` gives; rows are skipped once the budget is spent):
  linear: the linear + ReLU backward through each backward path (``FUSEDMLP_LINEAR_BWD``,
          ``kernels/linear.py``), TF32 and bf16, against torch autograd;
  step:   the bench's step (width 1024, batch 16K, TF32) beside torch's, then with the block
          output recomputed by a pass of its own (``FUSEDMLP_APPLY_IN_REDUCTION=0``) and with
          TF32 on the pointer kernel instead of TMA (``FUSEDMLP_TMA=16``) and with the dW
          GEMMs' split on the pointer kernel (``FUSEDMLP_TMA_SPLIT=0``); the small MLP
          training step (width 256, batch 64) whose time is the host's, with the direct launch on and off (``kernels/launch.py``); the bench's step
          on the other backward path, and with its dW split merges launched apart
          (``FUSEDMLP_MERGE_MAX_BYTES=0``), as issue 3's 16K x 256 x 256 bf16 backward, and
          that layer's forward;
  ops:    dropout, batch norm, cross-entropy, Adam, SGD as in the bench, fusedmlp and torch.
Two passes: every row's event time first, then every row's kernel time. torch.profiler's CUDA
activity leaves CUPTI's callbacks on in the process, which slows every later launch: measured
after a profiled row, host-bound rows read up to 2x slower (the H100 run of the seventh
session: the small step 14.4 ms against 6.9 ms in ``fusedmlp bench``). A row's setup runs once
per pass. One JSON line per row goes to ``DIR/kernel_times.jsonl`` after both passes, and the
lines of each pass to stdout as they are measured, then, for each row of 8 kernels or more,
its costliest kernels (the JSON line's ``per_kernel``: ms and launches per call by name).
A last JSON line, ``{"tuned": [...]}``, lists the configuration the autotuner chose for each
kernel and key (printed too): which configurations of a list ever win.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusedmlp.autograd import fused_block as AFB  # noqa: E402
from fusedmlp.cli import _bench_engine as E  # noqa: E402
from fusedmlp.cli import _bench_ops as O  # noqa: E402
from fusedmlp.cli import _bench_report as R  # noqa: E402
from fusedmlp.kernels import launch as KLaunch  # noqa: E402
from fusedmlp.kernels import linear as KL  # noqa: E402
from fusedmlp.nn import fused_block as NFB  # noqa: E402


def kernel_ms(fn, grads, calls: int = 10) -> tuple[float, int, dict]:
    """(GPU ms per call summed over the kernels, memsets and copies it ran; kernels per call;
    per kernel name, its ms and launches per call, the costliest first)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            E._reset(grads)
            fn()
        torch.cuda.synchronize()
    total_us, count = 0.0, 0
    by_name: dict = {}
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            total_us += evt.device_time
            count += 1
            us, n = by_name.get(evt.name, (0.0, 0))
            by_name[evt.name] = (us + evt.device_time, n + 1)
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    per_kernel = {name[:80]: [round(us / calls / 1e3, 5), n / calls] for name, (us, n) in ranked}
    return total_us / calls / 1e3, round(count / calls), per_kernel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "kernel-times"))
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for all sections")
    ap.add_argument("--sections", default="linear,step,ops")
    ap.add_argument(
        "--match",
        help="only the rows whose name this regular expression finds (re.search), e.g. "
        "'w1024' for issue 8's step and its A/B rows",
    )
    ap.add_argument(
        "--passes",
        default="event,kernel",
        help="which passes run, in this order: 'event,kernel' (default) or 'kernel' alone (the "
        "per-kernel breakdown first, where a launched row's event time is the host's anyway)",
    )
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the script")
    args = ap.parse_args()
    dry = args.dry_run
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "kernel_times.jsonl").open("a")
    dev = torch.device("cpu" if dry else "cuda")
    cfg = E.settings(not dry, quick=True)
    S = 64 if dry else 1  # shapes divided by S in a dry run
    t_start = time.perf_counter()
    print(f"{E.device_name(dev)}  torch {torch.__version__}", flush=True)
    rows: list = []  # (section, name, build, wall, context, path), in the order given
    recs: dict = {}  # name -> the row's record

    def row(section, name, build, wall=False, context=None, path=None):
        rows.append((section, name, build, wall, context, path))

    def measure(spec, kernels: bool) -> None:
        section, name, build, wall, context, path = spec
        rec = recs.setdefault(name, dict(section=section, case=name, wall=wall))
        if time.perf_counter() - t_start > args.budget:
            print(f"{name:64s} skipped: budget", flush=True)
            return
        if "error" in rec:
            return
        previous = KL.BACKWARD_PATH
        if path:
            KL.BACKWARD_PATH = path
        try:
            with context() if context else contextlib.nullcontext():
                t0 = time.perf_counter()
                prep = build()
                prep.fn()
                E._sync(dev)
                setup = time.perf_counter() - t0
                if kernels:
                    km, nk, per_kernel = (
                        (0.0, 0, {}) if dry else kernel_ms(prep.fn, prep.grad_to_none)
                    )
                    rec.update(kernel_ms=km, kernels=nk, per_kernel=per_kernel)
                    print(f"{name:64s} {km:10.4f} {nk:8d} {setup:8.1f}", flush=True)
                else:
                    if dry:
                        ev = E.time_cpu(prep.fn, prep.grad_to_none, cfg)
                    else:
                        timer = E.time_wall if wall else E.time_cuda
                        ev = timer(prep.fn, prep.grad_to_none, dev, cfg)
                    rec.update(event_ms=ev, setup_s=setup)
                    print(f"{name:64s} {ev:10.4f} {setup:8.1f}", flush=True)
        except Exception as exc:  # noqa: BLE001 - reported, the next row runs
            rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
            print(f"{name:64s} ERROR {rec['error']}", flush=True)
        finally:
            KL.BACKWARD_PATH = previous
            torch.cuda.empty_cache()

    tf32 = O._tf32

    @contextlib.contextmanager
    def _set(module, name, value, inner=None):
        """``module.name = value`` for the duration, inside ``inner``'s context when given (an
        A/B row's switch, e.g. ``FUSEDMLP_TMA``'s module global, read at every call)."""
        previous = getattr(module, name)
        setattr(module, name, value)
        try:
            with inner() if inner else contextlib.nullcontext():
                yield
        finally:
            setattr(module, name, previous)

    def linear():
        for dtype, (M, N, K), ctx in [
            (torch.float32, (16384, 1024, 1024), tf32),
            (torch.bfloat16, (8192, 8192, 8192), None),
            (torch.bfloat16, (16384, 1024, 1024), None),
        ]:
            M, N, K = M // S, N // S, K // S
            tag = f"linear+relu bwd {str(dtype)[6:]} M={M} N={N} K={K}"
            for path in ("fused", "dz"):
                build = O.build_linear("fusedmlp", dev, dtype, M, N, K, True)
                row("linear", f"{tag} fusedmlp {path}", build, context=ctx, path=path)
            row("linear", f"{tag} torch", O.build_linear("torch", dev, dtype, M, N, K, True),
                context=ctx)  # fmt: skip

    def step():
        # The bench's step (width 1024, batch 16K, TF32: issue 8's target) first, beside torch's,
        # then its A/B rows, then the host-bound small step and the other backward path: a
        # budget spent on the large step's autotuning leaves the later rows out.
        big = lambda: O.build_mlp_step("fusedmlp", dev, 16384 // S, 1024 // S)  # noqa: E731
        row("step", "mlp step w1024 B16K tf32 fusedmlp dz", big(), wall=True, context=tf32,
            path="dz")  # fmt: skip
        row("step", "mlp step w1024 B16K tf32 torch", O.build_mlp_step("torch", dev, 16384 // S, 1024 // S),
            wall=True, context=tf32)  # fmt: skip
        # A/B: the block's output recomputed for the next Linear's dW by a forward pass of its
        # own, as before the eighteenth session (FUSEDMLP_APPLY_IN_REDUCTION=0), against the
        # default, where the block's backward reduction writes it
        apply_pass = lambda: _set(AFB, "APPLY_IN_REDUCTION", False, tf32)  # noqa: E731
        row("step", "mlp step w1024 B16K tf32 fusedmlp dz, apply pass of its own", big(),
            wall=True, context=apply_pass, path="dz")  # fmt: skip
        # A/B: the batch statistics merged (with the running update) by a launch of the block's
        # own, as before the nineteenth session (FUSEDMLP_FINAL_STATS=0), against the default,
        # where the Linear's GEMM merges them in its last programs
        row("step", "mlp step w1024 B16K tf32 fusedmlp dz, statistics merge launched", big(),
            wall=True, context=lambda: _set(NFB, "FINAL_STATS", False, tf32), path="dz")  # fmt: skip
        # A/B of the TMA forward kernel for TF32 GEMMs in the step: on by default since the
        # twentieth session (an H200: 2.36 ms of kernels against 2.57); FUSEDMLP_TMA=16 keeps
        # TF32 GEMMs on the pointer kernel, this row
        row("step", "mlp step w1024 B16K tf32 fusedmlp dz, TF32 on the pointer kernel", big(),
            wall=True, context=lambda: _set(KL, "TMA_TF32", False, tf32), path="dz")  # fmt: skip
        # A/B of the dW GEMMs' K slices on the TMA kernel (twenty-first session, untimed then)
        # against the pointer kernel's split (FUSEDMLP_TMA_SPLIT=0, this row)
        row("step", "mlp step w1024 B16K tf32 fusedmlp dz, dW split on the pointer kernel",
            big(), wall=True, context=lambda: _set(KL, "TMA_SPLIT", False, tf32),
            path="dz")  # fmt: skip
        # The host-bound small step, with every launch once through fusedmlp's direct launch
        # and once through triton's JITFunction.run (kernels/launch.py): an A/B in one process
        for impl in ("fusedmlp", "torch"):  # host-bound: the wall time is the host's
            build = O.build_mlp_step(impl, dev, 64, 256 // S)
            row("step", f"mlp step w256 B64 tf32 {impl}", build, wall=True, context=tf32)
        build = O.build_mlp_step("fusedmlp", dev, 64, 256 // S)
        row("step", "mlp step w256 B64 tf32 fusedmlp, JITFunction.run launches", build,
            wall=True, context=lambda: _set(KLaunch, "DIRECT_LAUNCH", False, tf32))  # fmt: skip
        row("step", "mlp step w1024 B16K tf32 fusedmlp fused", big(), wall=True, context=tf32,
            path="fused")  # fmt: skip
        # A/B of the split merges by the tiles' last programs (kernels/arrival.py): the same
        # step, and issue 3's small-width backward, with every dW split merged by a launch
        # of its own (FUSEDMLP_MERGE_MAX_BYTES=0; batch norm's merges stay in the kernel)
        merges = lambda inner=None: _set(KL, "MERGE_MAX_BYTES", 0, inner)  # noqa: E731
        row("step", "mlp step w1024 B16K tf32 fusedmlp dz, dW merges launched", big(),
            wall=True, context=lambda: merges(tf32), path="dz")  # fmt: skip
        M, N = 16384 // S, 256 // S
        for impl, ctx in (("fusedmlp", None), ("fusedmlp, dW merge launched", merges),
                          ("torch", None)):  # fmt: skip
            build = O.build_linear(impl.split(",")[0], dev, torch.bfloat16, M, N, N, True)
            row("step", f"linear+relu bwd bf16 M={M} N={N} K={N} {impl}", build, context=ctx)
        # and its forward (issue 3's 1.3x target), whose kernel time no run had measured
        for impl in ("fusedmlp", "torch"):
            build = O.build_linear(impl, dev, torch.bfloat16, M, N, N, False)
            row("step", f"linear+relu fwd bf16 M={M} N={N} K={N} {impl}", build)

    def ops():
        bf16, rows, cols, big = torch.bfloat16, 65536 // S, 1024 // S, 50_000_000 // S**3
        for impl in ("fusedmlp", "torch"):
            cases = [
                ("dropout fwd 64Mi bf16", O.build_dropout(impl, dev, bf16, rows, cols, False)),
                ("dropout bwd 64Mi bf16", O.build_dropout(impl, dev, bf16, rows, cols, True)),
                ("batchnorm fwd 64Kx1024 bf16", O.build_batchnorm(impl, dev, bf16, rows, cols, False)),
                ("batchnorm bwd 64Kx1024 bf16", O.build_batchnorm(impl, dev, bf16, rows, cols, True)),
                ("cross_entropy 16Kx32K bf16",
                 O.build_cross_entropy(impl, dev, bf16, 16384 // S, 32768 // S)),
                ("adam 50M/100", O.build_optimizer(impl, dev, "adam", big, 100)),
                ("sgd 50M/100", O.build_optimizer(impl, dev, "sgd", big, 100)),
                # issue 7's small-tensor case: 1,000 tensors of 1,000 elements (host-bound)
                ("adam 1M/1000", O.build_optimizer(impl, dev, "adam", 1_000_000, 1000)),
            ]  # fmt: skip
            for name, build in cases:
                row("ops", f"{name} {impl}", build)

    for section in args.sections.split(","):  # in the order given
        {"linear": linear, "step": step, "ops": ops}[section]()
    if args.match:
        pattern = re.compile(args.match)
        rows = [spec for spec in rows if pattern.search(spec[1])]
    passes = args.passes.split(",")
    if not rows or not set(passes) <= {"event", "kernel"}:  # "".split(",") is [""]: refused
        ap.error(f"no rows match {args.match!r}" if not rows else f"bad --passes {args.passes!r}")
    # the event pass before the profiled one when both run (CUPTI slows every later launch)
    if "event" in passes:
        print(f"{'pass 1: event time (no profiler yet)':64s} {'event ms':>10s} {'setup s':>8s}")
        for spec in rows:
            measure(spec, kernels=False)
    if "kernel" in passes:
        print(
            f"{'pass 2: kernel time (torch.profiler)':64s} {'kernel ms':>10s} {'kernels':>8s} "
            f"{'setup s':>8s}"
        )
        for spec in rows:
            measure(spec, kernels=True)
    for spec in rows:
        if spec[1] in recs:
            log.write(json.dumps(recs[spec[1]]) + "\n")
    log.flush()
    print(f"{'case':64s} {'event ms':>10s} {'kernel ms':>10s} {'kernels':>8s}")
    for rec in recs.values():
        ev, km = rec.get("event_ms"), rec.get("kernel_ms")
        print(
            f"{rec['case']:64s} {'-' if ev is None else f'{ev:.4f}':>10s} "
            f"{'-' if km is None else f'{km:.4f}':>10s} {rec.get('kernels', '-'):>8}"
        )
    # Where the kernel time of the multi-kernel rows goes (the costliest kernels of each)
    for rec in recs.values():
        if rec.get("kernels", 0) >= 8 and rec.get("per_kernel"):
            print(f"{rec['case']}: ms and launches per call, by kernel")
            for name, (ms, n) in list(rec["per_kernel"].items())[:10]:
                print(f"    {ms:9.4f} {n:6.1f}  {name}")
    # What the autotuner chose, by kernel and key: which configurations earn their tuning time
    tuned = R.tuned_configs()
    log.write(json.dumps({"tuned": tuned}) + "\n")
    log.flush()
    print("tuned configurations: kernel, key values and dtypes, configuration")
    for t in tuned:
        key = f"{','.join(t['key'])} {'/'.join(t['dtypes'])}"
        print(f"    {t['kernel']:32s} {key:32s} {t['config']} {t['options']}")
    print(f"done in {time.perf_counter() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
