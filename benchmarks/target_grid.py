"""The issues' speed-target grids that ``fusedmlp bench --quick`` leaves out, in one run.

    python benchmarks/target_grid.py [--json PATH] [--markdown PATH] [--compile]

Cross-entropy forward+backward at M = 16K rows and C = 32K, 64K and 128K classes, in bf16 and
fp32 (issue 4's grid: >= 75% of the measured copy bandwidth on 3 x bytes(logits), >= 2.5x
``F.cross_entropy``, extra memory at most the size of the logits), beside torch eager (and
``torch.compile`` with ``--compile``: a compile per shape and dtype, tens of seconds each).
Same cases, timing and columns as ``fusedmlp bench`` (``cli/_bench_ops.py``); needs a GPU
(about 2 minutes on an H100, 40 GB of GPU memory for the largest fp32 case).
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch

from fusedmlp.cli import _bench_engine as E
from fusedmlp.cli import _bench_report as R
from fusedmlp.cli._bench_ops import (
    DTYPE_NAMES,
    OPS,
    Case,
    build_cross_entropy,
    cross_entropy_bytes,
)
from fusedmlp.cli.bench import _versions


def cases(device: torch.device, compile_: bool) -> list[Case]:
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="target_grid.json")
    ap.add_argument("--markdown", default="target_grid.md")
    ap.add_argument("--compile", action="store_true", help="add the torch.compile baselines")
    args = ap.parse_args(argv)
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
        "ops": ["cross_entropy"],
        "timing": "CUDA events, L2 flushed, median (the triton.testing.do_bench method)",
        **_versions(device),
    }
    ceilings = E.measure_ceilings(device, True, cfg)

    def save(rows, complete=False):
        doc = R.document(meta, ceilings, rows, complete)
        R.write_json(args.json, doc)
        R.write_markdown(args.markdown, doc)
        return doc

    rows = E.run_cases(cases(device, args.compile), device, cfg, ceilings, dname, on_row=save)
    save(rows, complete=True)
    errors = [r for r in rows if r["error"]]
    for r in errors:
        print(f"  error: {r['shape']} {r['dtype']} {r['impl']}: {r['error']}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
