"""``fusedmlp bench``: every op against torch eager, torch.compile and the hardware.

Every figure is a ratio measured in the same run: against torch eager, against
``torch.compile``, and against two ceilings measured at the start (device-to-device copy
bandwidth and a large matmul). The engine is in ``_bench_engine.py``, the cases and byte/FLOP
formulas in ``_bench_ops.py``, the reports in ``_bench_report.py``.

On a CPU-only machine the same command runs: fusedmlp takes its torch fallback there (rows
labelled backend ``fallback``, device ``CPU``), and ``--quick`` uses tiny shapes and skips the
torch.compile baselines, finishing in well under 2 minutes.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import platform
import sys
import time

from ._bench_ops import OPS
from ._checks import checked_type, output_path_problem, plot_format_problem, positive_c_int

OP_ALIASES = {
    "ce": "cross_entropy",
    "bn": "batchnorm",
    "optim": "adam,adamw,sgd",
    "step": "mlp_step",
}


def add_arguments(parser):
    parser.add_argument(
        "--quick",
        action="store_true",
        help="few shapes and short timings (GPU: the headline shapes, ~2-3 min with compiles; "
        "CPU: tiny shapes, no torch.compile, < 2 min)",
    )
    parser.add_argument(
        "--ops",
        nargs="+",
        metavar="OP",
        help=f"ops to run (space or comma separated): {', '.join(OPS)}; default all",
    )
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON (updated per case)")
    parser.add_argument("--markdown", metavar="PATH", help="write markdown tables")
    parser.add_argument(
        "--plot", metavar="PATH", help="write a PNG of percent of roofline (needs matplotlib)"
    )
    parser.add_argument("--device", help="device to run on (default: cuda if available, else cpu)")
    compile_group = parser.add_mutually_exclusive_group()
    compile_group.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="force the torch.compile baselines (default: on, except --quick on CPU)",
    )
    compile_group.add_argument(
        "--no-compile", dest="compile", action="store_false", help="skip torch.compile baselines"
    )
    parser.add_argument(
        "--threads",
        type=positive_c_int,
        metavar="N",
        help="CPU threads for torch during the run (default: 1 for --quick on CPU, which keeps "
        "timings stable on a shared machine; else torch's default)",
    )
    parser.add_argument(
        "--time-budget",
        type=checked_type(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
        metavar="S",
        help="skip the cases that would start after S seconds (default: 150 for --quick on a "
        "GPU, else none); torch.compile baselines run last",
    )


def parse_ops(values) -> list[str]:
    if not values:
        return list(OPS)
    ops = []
    for value in values:
        for name in value.split(","):
            name = name.strip().lower().replace("-", "_")
            if not name:
                continue
            for op in OP_ALIASES.get(name, name).split(","):
                if op not in OPS:
                    raise SystemExit(
                        f"fusedmlp bench: unknown op {name!r}; expected some of {', '.join(OPS)}"
                    )
                if op not in ops:
                    ops.append(op)
    if not ops:  # `--ops ""`: a run of no rows is no benchmark
        raise SystemExit(f"fusedmlp bench: --ops names no op; expected some of {', '.join(OPS)}")
    return ops


def _versions(device) -> dict:
    import torch

    from .. import __version__

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    meta = {
        "fusedmlp": __version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "driver": None,
    }
    if device.type == "cuda":
        try:
            import subprocess

            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            meta["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
        except Exception:  # noqa: BLE001
            pass
    return meta


@contextlib.contextmanager
def _torch_threads(n):
    import torch

    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run(args) -> int:
    import torch

    ops = parse_ops(args.ops)
    try:
        default = "cuda" if torch.cuda.is_available() else "cpu"
        # '' is not "the default": torch.device('') refuses it, as it must here
        device = torch.device(default if args.device is None else args.device)
    except RuntimeError as e:
        raise SystemExit(f"fusedmlp bench: bad --device {args.device!r}: {e}") from None
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"fusedmlp bench: unsupported device {args.device!r} (cpu or cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fusedmlp bench: --device cuda asked for, but no CUDA device is available")
    # the output paths checked before the run, not after it: the rows would be lost
    from . import _bench_report as R

    given = [(o, p) for o, p in (("--json", args.json), ("--markdown", args.markdown),
                                 ("--plot", args.plot)) if p]  # fmt: skip
    for i, (option, path) in enumerate(given):
        for other, other_path in given[i + 1 :]:
            if os.path.realpath(path) == os.path.realpath(other_path) and not (
                R.is_special_file(path)  # /dev/null twice overwrites nothing
            ):
                raise SystemExit(
                    f"fusedmlp bench: {option} and {other} name the same file {path}: "
                    "one would overwrite the other"
                )
    for option, path in (
        ("--json", args.json),
        ("--markdown", args.markdown),
        ("--plot", args.plot),
    ):
        if path is None:
            continue
        problem = (plot_format_problem(path) if option == "--plot" else None) or (
            output_path_problem(path, make_folder=True)  # the writers make missing folders
        )
        if problem is not None:
            raise SystemExit(f"fusedmlp bench: cannot write {option} {path}: {problem}")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cuda = device.type == "cuda"
    threads = args.threads or (1 if args.quick and not cuda else None)
    with _torch_threads(None if cuda else threads):
        return _run(args, ops, device)


def _run(args, ops, device) -> int:
    import torch

    from . import _bench_engine as E
    from . import _bench_report as R
    from ._bench_ops import make_cases

    cuda = device.type == "cuda"
    compile_ = args.compile if args.compile is not None else (cuda or not args.quick)
    budget = args.time_budget
    if budget is None and args.quick and cuda:
        budget = 150.0
    cfg = E.settings(cuda, args.quick)
    dname = E.device_name(device)
    meta = {
        "device": dname,
        "device_type": device.type,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": bool(args.quick),
        "compile": bool(compile_),
        "ops": ops,
        "timing": (
            "CUDA events, L2 flushed, median (the triton.testing.do_bench method); small-MLP "
            "rows: wall time per call"
            if cuda
            else "time.perf_counter per call on the CPU, median"
        ),
        **_versions(device),
    }
    torch.manual_seed(0)
    t0 = time.perf_counter()
    print(f"fusedmlp bench on {dname} ({'quick' if args.quick else 'full'})", flush=True)
    ceilings = E.measure_ceilings(device, args.quick, cfg)
    print(
        f"ceilings: {ceilings['copy_gbps']:.1f} GB/s ({ceilings['copy_what']}), "
        f"{ceilings['matmul_tflops']:.2f} TFLOPS ({ceilings['matmul_what']})",
        flush=True,
    )
    cases = make_cases(device, args.quick, ops, compile_)

    def save(rows, complete=False):
        doc = R.document(meta, ceilings, rows, complete)
        # a pipe or terminal (/dev/stdout) gets the final document only: each save would add
        # a whole document to the stream, not replace the last one
        if args.json and (complete or not R.is_special_file(args.json)):
            R.write_json(args.json, doc)
        if args.markdown and (complete or not R.is_special_file(args.markdown)):
            R.write_markdown(args.markdown, doc)
        return doc

    rows = E.run_cases(
        cases,
        device,
        cfg,
        ceilings,
        dname,
        budget_s=budget,
        on_row=save,
        log=lambda s: print(s, flush=True),
    )
    doc = save(rows, complete=True)
    rc = 0
    if args.plot:
        try:
            R.write_plot(args.plot, doc)
        except ImportError as exc:
            print(f"fusedmlp bench: --plot needs matplotlib ({exc})", file=sys.stderr)
            rc = 1
    if not (args.json or args.markdown):
        print(R.render_markdown(doc))
    errors = [r for r in rows if r["error"]]
    skipped = [r for r in rows if r["skipped"]]
    print(
        f"{len(rows)} rows, {len(errors)} errors, {len(skipped)} skipped, "
        f"{time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    for r in errors:
        print(f"  error: {r['op']} {r['pass']} {r['shape']} {r['impl']}: {r['error']}")
    if not any(r["ms"] for r in rows):  # e.g. --time-budget 0: a run that measured nothing
        print("fusedmlp bench: no case was measured", file=sys.stderr)
        return 1
    return 1 if errors else rc
