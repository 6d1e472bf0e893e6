"""The issues' speed-target grids that ``fusedmlp bench --quick`` leaves out, in one run.

    python benchmarks/target_grid.py [--grid cross_entropy|tma|small|optim|step[,...]] [--json PATH]
                                     [--markdown PATH] [--compile]

``--grid cross_entropy`` (default): cross-entropy forward+backward at M = 16K rows and C = 32K,
64K and 128K classes, in bf16 and fp32 (issue 4's grid: >= 75% of the measured copy bandwidth
on 3 x bytes(logits), >= 2.5x ``F.cross_entropy``, extra memory at most the size of the
logits), beside torch eager (and ``torch.compile`` with ``--compile``: a compile per shape and
dtype, tens of seconds each).

``--grid tma``: issue 3's bf16 GEMM, linear + ReLU forward and backward at 8192^3 and
16384 x 4096 x 4096, and the bench step's TF32 layer (16384 x 1024 x 1024, fp32 with torch's
matmul precision "high"), through the pointer-based kernels ("fusedmlp": ``FUSEDMLP_TMA=0``),
the TMA forward kernel ("fusedmlp TMA": ``FUSEDMLP_TMA=1``, TF32 included; it also runs the
backward's two GEMMs on the "dz" path) and torch: where the TMA kernel should be the default.
The TF32 backward also runs without the dz path's dW split ("fusedmlp no dW split":
``FUSEDMLP_DZ_DW_SPLIT=0``, the GEMM as before the twelfth session).
Also issue 3's small width, 16384 x 256 x 256 bf16, with the TMA kernel forced below its size
rules (the forward is kernel-bound there: 16 us, 1.23x torch against the 1.3x target).

``--grid small``: issue 3's small widths, linear + ReLU forward and backward at batch 16K and
widths 64, 128 and 256 (``16384 x w x w``), bf16 and fp32, beside torch: the forward
against ``relu(linear(x))`` (>= 1.3x), the backward against torch autograd (the issue's
backward target, >= 0.9x). The quick bench has only width 256 in bf16.

``--grid optim``: issue 7's small-tensor case, Adam over 1,000 tensors of 1,000 fp32 elements
(>= 5x ``torch.optim.Adam(foreach=True)``), beside torch's fused Adam.

``--grid step``: issue 8's training step at width 1024, batch 16K, TF32 (the bench's), beside
torch eager. With ``--graph``: each impl's whole step (zero_grad, forward, loss, backward,
Adam with ``capturable=True``) captured and replayed, fusedmlp and torch alike: the steps'
GPU time without the host's (on the GPU machines fusedmlp's Python sets its step's event
time; ``fusedmlp train --cuda-graph`` trains so). Its A/B rows: fusedmlp with TF32 GEMMs on the
pointer kernel ("fusedmlp TF32 pointer": ``FUSEDMLP_TMA=16``) and with the dW GEMMs' split on
the pointer kernel ("fusedmlp pointer dW split": ``FUSEDMLP_TMA_SPLIT=0``).

Several grids, comma-separated, run into one JSON file.

``--graph``: every case timed as replays of a CUDA graph of 20 back-to-back calls
(``_bench_engine.time_graph``), fusedmlp and torch alike: the GPU's time per call with no host
launch cost in it (what a training loop under CUDA graphs sees), L2 warm. Issue 3's small
widths are host-bound on the GPU machines when launched from Python (``--grid small``): this
is their time on the GPU.

Same cases, timing and columns as ``fusedmlp bench`` (``cli/_bench_ops.py``); needs a GPU
(about 2 minutes on an H100, 40 GB of GPU memory for the largest fp32 case).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import sys

import torch

from fusedmlp.cli import _bench_engine as E
from fusedmlp.cli import _bench_report as R
from fusedmlp.cli._bench_ops import (
    DTYPE_NAMES,
    MLP_CLASSES,
    MLP_DEPTH,
    OPS,
    Case,
    _si,
    _tf32,
    adam_bytes,
    build_cross_entropy,
    build_linear,
    build_mlp_step,
    build_optimizer,
    cross_entropy_bytes,
    linear_bwd_bytes,
    linear_bwd_flops,
    linear_fwd_bytes,
    linear_fwd_flops,
    mlp_step_counts,
)
from fusedmlp.cli.bench import _versions


def cases(device: torch.device, compile_: bool, graph: bool = False) -> list[Case]:
    impls = ["fusedmlp", "torch"] + (["torch.compile"] if compile_ else [])
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        for C in (32768, 65536, 131072):
            M = 16384
            for impl in impls:
                out.append(
                    Case(
                        "cross_entropy",
                        "fwd+bwd",
                        f"M={M} C={C}",
                        DTYPE_NAMES[dtype],
                        impl,
                        build_cross_entropy(impl, device, dtype, M, C),
                        cross_entropy_bytes(M, C, dtype.itemsize),
                        order=(OPS.index("cross_entropy"), len(out)),
                    )
                )
    return out


@contextlib.contextmanager
def linear_settings(tma: bool, tf32: bool, force: bool = False, dw_split: bool = True):
    """The TMA forward kernel on or off (``FUSEDMLP_TMA``), and torch's fp32 matmul precision
    "high" (TF32, for fusedmlp and torch alike) when ``tf32``, for the duration. ``force``
    (with ``tma``): also below the kernel's size rules (``TMA_MIN_MACS``, ``TMA_MIN_WAVES``).
    ``dw_split``: the dz backward's dW GEMM split over the batch (``FUSEDMLP_DZ_DW_SPLIT``)."""
    from fusedmlp.kernels import linear as kernels

    names = ("TMA", "TMA_TF32", "TMA_MIN_MACS", "TMA_MIN_WAVES", "DZ_DW_SPLIT")
    before = [getattr(kernels, n) for n in names], torch.get_float32_matmul_precision()
    kernels.TMA = kernels.TMA_TF32 = tma
    kernels.DZ_DW_SPLIT = dw_split
    if tma and force:
        kernels.TMA_MIN_MACS = kernels.TMA_MIN_WAVES = 0
    if tf32:
        torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        for n, v in zip(names, before[0]):
            setattr(kernels, n, v)
        torch.set_float32_matmul_precision(before[1])


# (dtype, M, N, K, force): issue 3's bf16 shape, a wider-batch bf16 one, the bench step's TF32
# layer, and issue 3's small width (below the TMA kernel's size rules: forced there, to see
# whether its pipelined loads and stores beat the pointer kernel's 16 us on a kernel-bound
# forward; its descriptors cost host time that a host-bound call pays)
TMA_SHAPES = (
    (torch.bfloat16, 8192, 8192, 8192, False),
    (torch.bfloat16, 16384, 4096, 4096, False),
    (torch.float32, 16384, 1024, 1024, False),
    (torch.bfloat16, 16384, 256, 256, True),
)


def tma_cases(device: torch.device, compile_: bool, graph: bool = False) -> list[Case]:
    impls = [("fusedmlp", "fusedmlp", False), ("fusedmlp TMA", "fusedmlp", True)]
    impls += [("torch", "torch", False)] + (
        [("torch.compile", "torch.compile", False)] if compile_ else []
    )
    out = []
    for dtype, M, N, K, force in TMA_SHAPES:
        tf32 = dtype == torch.float32
        for bwd in (False, True):
            # the TF32 layer's backward without the dW GEMM's split too (an A/B in one run)
            extra = [("fusedmlp no dW split", "fusedmlp", False)] if tf32 and bwd else []
            for name, impl, tma in impls + extra:
                split = name != "fusedmlp no dW split"
                context = functools.partial(linear_settings, tma, tf32, force, split)
                out.append(
                    _linear_case(device, dtype, M, N, K, bwd, name, impl, len(out), tf32, context)
                )
    return out


def _linear_case(device, dtype, M, N, K, bwd, name, impl, index, tf32=False,
                 context=contextlib.nullcontext):  # fmt: skip
    """A linear + ReLU case of ``M x N x K``, forward or (``bwd``) backward, by ``impl``
    (shown as ``name``), in ``context``; ``tf32``: fp32 labelled TF32 (``context`` sets it)."""
    return Case(
        "linear",
        "bwd" if bwd else "fwd",
        f"M={M} N={N} K={K}",
        "tf32" if tf32 else DTYPE_NAMES[dtype],
        name,
        build_linear(impl, device, dtype, M, N, K, bwd),
        (linear_bwd_bytes if bwd else linear_fwd_bytes)(M, N, K, dtype.itemsize),
        (linear_bwd_flops if bwd else linear_fwd_flops)(M, N, K),
        context=context,
        order=(OPS.index("linear"), index),
    )


# issue 3's "widths up to 256 at batch 16K"
SMALL_WIDTHS = (64, 128, 256)


def small_cases(device: torch.device, compile_: bool, graph: bool = False) -> list[Case]:
    impls = ["fusedmlp", "torch"] + (["torch.compile"] if compile_ else [])
    M, out = 16384, []
    for dtype in (torch.bfloat16, torch.float32):
        for width in SMALL_WIDTHS:
            for bwd in (False, True):
                for impl in impls:
                    out.append(
                        _linear_case(device, dtype, M, width, width, bwd, impl, impl, len(out))
                    )
    return out


def optim_cases(device: torch.device, compile_: bool, graph: bool = False) -> list[Case]:
    impls = ["fusedmlp", "torch", "torch.fused"] + (["torch.compile"] if compile_ else [])
    P, T = 1_000_000, 1000
    return [
        Case(
            "adam",
            "step",
            f"P={_si(P)} in {T} tensors",
            DTYPE_NAMES[torch.float32],
            impl,
            build_optimizer(impl, device, "adam", P, T),
            adam_bytes(P),
            order=(OPS.index("adam"), i),
        )
        for i, impl in enumerate(impls)
    ]


@contextlib.contextmanager
def step_settings(tma_tf32: bool = True, tma_split: bool = True):
    """TF32 (torch's matmul precision "high"), with TF32 GEMMs on the TMA kernel or the pointer
    kernel (``FUSEDMLP_TMA=16``) and the dW GEMMs' K slices on the TMA kernel or the pointer
    kernel's split (``FUSEDMLP_TMA_SPLIT=0``), for the duration (a graph case captures what
    its context chose)."""
    from fusedmlp.kernels import linear as kernels

    before = kernels.TMA_TF32, kernels.TMA_SPLIT
    kernels.TMA_TF32 = kernels.TMA_TF32 and tma_tf32
    kernels.TMA_SPLIT = kernels.TMA_SPLIT and tma_split
    try:
        with _tf32():
            yield
    finally:
        kernels.TMA_TF32, kernels.TMA_SPLIT = before


# issue 8's A/B rows of the step grid: (name, step_settings' switches). The twentieth session
# measured the graph-replayed step at 1.26x torch with TF32 on the pointer kernel; the
# twenty-fourth read 1.20x after the TMA TF32 default, its statistics epilogue and its dW
# split, so each is timed beside the default in the same run.
STEP_AB = (
    ("fusedmlp TF32 pointer", dict(tma_tf32=False)),
    ("fusedmlp pointer dW split", dict(tma_split=False)),
)


def step_cases(device: torch.device, compile_: bool, graph: bool = False) -> list[Case]:
    """Issue 8's training step (``fusedmlp bench``'s: 4 x [Linear-BN-ReLU-Dropout] + Linear,
    cross-entropy, Adam) at width 1024, batch 16K, TF32; with ``graph`` its optimizers are
    built capturable (a step captured in a CUDA graph). Then ``STEP_AB``'s rows: fusedmlp with
    one TMA default switched off each."""
    impls = [("fusedmlp", "fusedmlp", {}), ("torch", "torch", {})]
    impls += [("torch.compile", "torch.compile", {})] if compile_ else []
    impls += [(name, "fusedmlp", switches) for name, switches in STEP_AB]
    batch, width = 16384, 1024
    nbytes, flops = mlp_step_counts(batch, width, width, MLP_DEPTH, MLP_CLASSES, 4)
    return [
        Case(
            "mlp_step",
            "step",
            f"width={width} B={batch}",
            "fp32 (tf32)",
            name,
            build_mlp_step(impl, device, batch, width, capturable=graph),
            nbytes,
            flops,
            context=functools.partial(step_settings, **switches),
            order=(OPS.index("mlp_step"), i),
        )
        for i, (name, impl, switches) in enumerate(impls)
    ]


# the bench op each grid measures (a grid's own name where it is the op's)
OP_OF_GRID = {"tma": "linear", "small": "linear", "optim": "adam", "step": "mlp_step"}
GRIDS = {
    "cross_entropy": cases,
    "tma": tma_cases,
    "small": small_cases,
    "optim": optim_cases,
    "step": step_cases,
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--grid",
        type=lambda v: v.split(","),
        default=["cross_entropy"],
        help=f"comma-separated, from {', '.join(GRIDS)} (default: cross_entropy)",
    )
    ap.add_argument("--json", default="target_grid.json")
    ap.add_argument("--markdown", default="target_grid.md")
    ap.add_argument("--compile", action="store_true", help="add the torch.compile baselines")
    ap.add_argument(
        "--graph",
        action="store_true",
        help="time each case as CUDA graph replays of 20 back-to-back calls (no host time)",
    )
    args = ap.parse_args(argv)
    unknown = sorted(set(args.grid) - set(GRIDS))
    if unknown:
        ap.error(f"unknown grid {', '.join(unknown)} (choose from {', '.join(GRIDS)})")
    if not torch.cuda.is_available():
        print("target_grid.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    cfg = E.settings(True, True)
    dname = E.device_name(device)
    meta = {
        "device": dname,
        "device_type": "cuda",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": True,
        "compile": args.compile,
        "ops": list(dict.fromkeys(OP_OF_GRID.get(g, g) for g in args.grid)),
        "timing": (
            f"CUDA graph of {E.GRAPH_CALLS} back-to-back calls, replayed between CUDA events, "
            "time per call, median over replays, L2 warm"
            if args.graph
            else "CUDA events, L2 flushed, median (the triton.testing.do_bench method)"
        ),
        **_versions(device),
    }
    ceilings = E.measure_ceilings(device, True, cfg)

    def save(rows, complete=False):
        doc = R.document(meta, ceilings, rows, complete)
        R.write_json(args.json, doc)
        R.write_markdown(args.markdown, doc)
        return doc

    # each grid's cases for --graph: the step's optimizers are built capturable, the other
    # grids' cases need nothing different (``graph`` is set on every case below)
    grid = [case for name in args.grid for case in GRIDS[name](device, args.compile, args.graph)]
    if args.graph:
        grid = [dataclasses.replace(case, graph=True) for case in grid]
    rows = E.run_cases(grid, device, cfg, ceilings, dname, on_row=save)
    save(rows, complete=True)
    errors = [r for r in rows if r["error"]]
    for r in errors:
        print(f"  error: {r['shape']} {r['dtype']} {r['impl']}: {r['error']}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
