"""Static audit of the kernels' sm_90 code on a machine without a GPU.

    python benchmarks/ptx_audit.py [--triton DIR]

``--triton DIR``: compile with the triton installed in DIR (``pip install --target``, e.g. CI's
``.triton36``, the GPU machines' release); the ops always run under this environment's triton.

Runs a small set of ops under Triton's interpreter (batch norm, dropout, cross-entropy, log-softmax, the relu-dropout block
and the linear backward's dz path in fp32 and bf16, an MLP training step with Adam), then compiles the first GPU configuration of every
kernel it launched for sm_90, with the JIT's argument specialisation (``tests/sm90_worker.py``),
and prints per kernel what the generated code does that costs bandwidth or time:

- ``cvt``: ``ttg.convert_layout`` ops in the TTGIR; with ``st.shared``/``bar``: a tensor moved
  between register layouts through shared memory (cheap once per program, costly per tile);
- ``ld.v4`` / ``ld``: vectorised (16-byte) and all global loads in the PTX;
- ``L2hint``: global loads with an L2 cache-eviction hint (``eviction_policy``: the two-pass
  cross-entropy and softmax kernels keep their first pass in L2 for the second);
- ``mulhi``: ``mul.hi`` instructions (Philox rounds: 2 per round, 20 per call of 4 words);
- ``sass``: SASS instructions of the cubin (``cuobjdump -sass``, bundled with triton): what an
  arithmetic-bound kernel executes per program (tried and dropped with it: a 64-bit multiply
  for Philox's hi/lo pairs, fewer for fp32 and more for bf16; an integer keep test, no fewer).

This found the fused block kernels moving every data tile through shared memory twice (their
per-column vectors took a layout of their own) and the forward computing each Philox call four
times. It cannot say how fast a kernel runs: only a GPU can.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# PTX instruction counts: shared-memory stores, barriers, 16-byte global loads, global loads,
# mul.hi (Philox)
_PATTERNS = (
    r"st\.shared",
    r"bar\.sync",
    r"ld\.global[^\n]*v4",
    r"ld\.global",
    r"mul\.hi",
    r"ld\.global[^\n]*L2::cache_hint",
)


def collect(path: str) -> None:
    """Under the interpreter: run the ops, pickle one compile job per kernel signature."""
    import torch

    import fusedmlp
    from fusedmlp import functional as FF
    from fusedmlp import nn as fnn
    from fusedmlp import optim as fo
    from fusedmlp.autograd.fused_block import act_dropout
    from fusedmlp.kernels.launch import LAUNCHED

    fusedmlp.set_backend("triton")
    torch.manual_seed(0)
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(64, 32, dtype=dt, requires_grad=True)
        fnn.BatchNorm1d(32).to(dt)(x).sum().backward()
        FF.dropout(x, 0.3, True).sum().backward()
        logits = torch.randn(16, 48, dtype=dt, requires_grad=True)  # rows 16-element aligned
        FF.cross_entropy(logits, torch.randint(0, 48, (16,))).backward()
        FF.log_softmax(logits, 1).backward(torch.randn(16, 48, dtype=dt))
        # the relu-dropout tail of Linear -> ReLU -> Dropout (its backward reads the output)
        y = act_dropout(x, "relu", p=0.3)
        y.backward(torch.randn_like(y))  # a dense gradient (.sum()'s is expanded: stride 0)
    from fusedmlp.kernels import linear as KL

    KL.BACKWARD_PATH = "dz"  # the linear backward's dz path too (a GPU takes it for big GEMMs)
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(64, 32, dtype=dt, requires_grad=True)
        w = torch.randn(48, 32, dtype=dt, requires_grad=True)
        FF.linear(x, w, torch.randn(48, dtype=dt, requires_grad=True), "relu").sum().backward()
    KL.BACKWARD_PATH = "auto"
    model = fnn.MLP(32, [32, 32], 10, activation="relu", batchnorm=True, dropout=0.1)
    opt = fo.Adam(model.parameters())
    FF.cross_entropy(model(torch.randn(64, 32)), torch.randint(0, 10, (64,))).backward()
    opt.step()
    jobs = {}
    for rec in LAUNCHED:
        cfg = rec.gpu_configs[0]
        constexprs = {**dict(rec.constexprs), **cfg.kwargs}
        key = (rec.module, rec.name, rec.signature, repr(sorted(constexprs.items())))
        job = (rec.module, rec.name, dict(rec.signature), constexprs, cfg.num_warps,
               cfg.num_stages, dict(rec.specialization))  # fmt: skip
        jobs.setdefault(key, job)
    with open(path, "wb") as f:
        pickle.dump(list(jobs.values()), f)


def audit(path: str) -> None:
    """Not interpreting: compile every job for sm_90 and print its counts."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sys.path.insert(0, str(ROOT / "tests"))
    from sm90_worker import specialize

    with open(path, "rb") as f:
        jobs = pickle.load(f)
    print(f"triton {triton.__version__}, sm_90, first GPU configuration of each kernel")
    target = GPUTarget("cuda", 90, 32)
    for module, name, signature, constexprs, warps, stages, spec in jobs:
        fn = importlib.import_module(module)
        for part in name.split("."):
            fn = getattr(fn, part)
        while not hasattr(fn, "arg_names") and hasattr(fn, "fn"):
            fn = fn.fn
        if "INTERPRET" in constexprs:
            constexprs = {**constexprs, "INTERPRET": False}
        sig, cx, attrs = specialize(fn, signature, constexprs, spec)
        types = ",".join(sorted({t for t in signature.values() if t.startswith("*")}))
        try:
            c = triton.compile(
                ASTSource(fn, sig, cx, attrs),
                target=target,
                options={"num_warps": warps, "num_stages": stages},
            )
        except Exception as exc:  # noqa: BLE001 - reported, the next job runs
            print(f"{name:32s} {types:24s} compile error: {str(exc).splitlines()[0][:80]}")
            continue
        ptx = c.asm["ptx"]
        counts = [len(re.findall(pattern, ptx)) for pattern in _PATTERNS]
        convert = c.asm["ttgir"].count("ttg.convert_layout")
        shared, bar, v4, loads, mulhi, hinted = counts
        print(
            f"{name:32s} {types:24s} w{warps} cvt {convert:2d} st.shared {shared:3d} bar {bar:3d}"
            f" ld.v4 {v4:3d} ld {loads:3d} L2hint {hinted:3d} mulhi {mulhi:3d}"
            f" sass {sass_count(c.asm['cubin']):5d}"
        )


def sass_count(cubin: bytes) -> int:
    """SASS instructions in ``cubin`` (triton's bundled ``cuobjdump -sass``; -1 without it):
    a static count, the cost of a kernel bound by its arithmetic (Philox) per element."""
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return -1
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True)
    return len(re.findall(r"^\s+/\*[0-9a-f]{4}\*/\s+\S", out.stdout, re.M))


def main(argv=None) -> int:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triton", metavar="DIR", help="compile with the triton in DIR")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "jobs.pkl")
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        run = [sys.executable, __file__, "--collect", path]
        subprocess.run(run, check=True, env=env, cwd=ROOT)
        env.pop("TRITON_INTERPRET")
        if args.triton:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.triton, env.get("PYTHONPATH")]))
        subprocess.run([sys.executable, __file__, "--audit", path], check=True, env=env, cwd=ROOT)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--collect":
        collect(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "--audit":
        audit(sys.argv[2])
    else:
        sys.exit(main())
