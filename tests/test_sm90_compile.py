"""Compile, for sm_90 (H100), every kernel configuration this test run launched.

The interpreter accepts programs the GPU compiler refuses (``tl.dot`` dimensions below 16,
shared memory over the limit): this test reproduces those errors on a CPU-only machine.
It runs last (conftest) and compiles what ``fusedmlp.kernels.launch.LAUNCHED`` recorded, plus
every GPU autotune configuration for the first recorded signature of each kernel, in a
subprocess without the interpreter (``sm90_worker.py``), with the argument specialization the
JIT would apply to the recorded values (integers equal to 1 compiled as constants, divisibility
by 16 of integers and addresses), so that the registers and spills printed are those of the
GPU compile.
Run it together with the tests whose kernels it should compile.
"""

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _jobs():
    from fusedmlp.kernels.launch import LAUNCHED

    jobs, seen = {}, set()

    def add(rec, constexprs, warps, stages):
        # A TMA descriptor's type names its block shape by constexprs (``launch.Tma``).
        signature = {n: t.format(**constexprs) if "{" in t else t for n, t in rec.signature}
        spec = dict(rec.specialization)
        types = ",".join(f"{t}{spec.get(n, '')}" for n, t in signature.items() if t != "constexpr")
        label = f"{rec.name}({types}) {constexprs} w{warps} s{stages}"
        # One job per signature and configuration, compiled with the argument specialization of
        # its first launch: specialisations only change alignment and constant-1 folding.
        key = (rec.module, rec.name, rec.signature, repr(sorted(constexprs.items())), warps, stages)
        job = (rec.module, rec.name, signature, constexprs, warps, stages, label, spec)
        jobs.setdefault(key, job)

    for rec in LAUNCHED:
        add(rec, dict(rec.constexprs), rec.num_warps, rec.num_stages)
        if rec.name in seen:
            continue
        seen.add(rec.name)
        for cfg in rec.gpu_configs:
            add(rec, {**dict(rec.constexprs), **cfg.kwargs}, cfg.num_warps, cfg.num_stages)
    return list(jobs.values())


def _tritons():
    """The triton installations to compile with: this environment's, plus each folder listed in
    ``FUSEDMLP_SM90_EXTRA_TRITON`` (os.pathsep-separated ``pip install --target`` folders: CI
    adds triton 3.6, the GPU machines' version, so code that only the current release accepts
    fails here)."""
    extra = [p for p in os.environ.get("FUSEDMLP_SM90_EXTRA_TRITON", "").split(os.pathsep) if p]
    return [None, *extra]


def test_every_launched_configuration_compiles_for_sm90(capsys):
    jobs = _jobs()
    if not jobs:
        pytest.fail("no kernel was launched in this run: run this test together with the op tests")
    failures, approx = [], []
    for site in _tritons():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if site:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, env.get("PYTHONPATH")]))
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("sm90_worker.py"))],
            input=pickle.dumps(jobs),
            capture_output=True,
            env=env,
            timeout=1200,
        )
        lines = [json.loads(x) for x in out.stdout.decode().splitlines() if x.startswith("{")]
        header = next((x for x in lines if "triton" in x), {"triton": "?", "path": ""})
        version = header["triton"]
        results = [x for x in lines if "label" in x]
        assert out.returncode == 0 and len(results) == len(jobs), out.stderr.decode()[-3000:]
        if site:  # the worker really imported the extra triton, not this environment's
            assert header["path"].startswith(os.path.abspath(site)), (site, header)
        failures += [
            f"triton {version}: {r['label']}: {r['error']}" for r in results if "error" in r
        ]
        approx += [
            f"triton {version}: {r['label']}: {r['approx']}"
            for r in results
            if r.get("approx") and r["label"].startswith(_OPTIMIZER_KERNELS)
        ]
        with capsys.disabled():
            print(
                f"\nsm_90 compile with triton {version}: {len(jobs)} configurations in "
                f"{time.perf_counter() - start:.1f} s"
            )
            if site is None:  # registers and spills once, for the environment's triton
                for r in results:
                    print(f"  {r['label']}: {r.get('resources', r.get('error'))}")
    assert not failures, "kernels that do not compile for sm_90:\n" + "\n".join(failures)
    # The optimizers' updates round as torch's CUDA ops do (correctly): no approximate fp32
    # square root or division (tl.sqrt, "/") in their code (checked where this run launched them).
    assert not approx, "\n".join(approx)


_OPTIMIZER_KERNELS = ("_adam_kernel(", "_sgd_kernel(")


_ARRIVAL_PTX = """
import json
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fusedmlp.kernels.arrival import last_arrival


@triton.jit
def merge(part_ptr, out_ptr, cnt_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    split = tl.program_id(1)
    tl.store(part_ptr + split * N + offs, offs.to(tl.float32), mask=offs < N)
    if last_arrival(cnt_ptr + tl.program_id(0), tl.num_programs(1)):
        total = tl.load(part_ptr + offs, mask=offs < N, other=0.0, cache_modifier=".cg")
        tl.store(out_ptr + offs, total, mask=offs < N)


signature = {"part_ptr": "*fp32", "out_ptr": "*fp32", "cnt_ptr": "*i32", "N": "i32",
             "BLOCK": "constexpr"}
src = ASTSource(fn=merge, signature=signature, constexprs={"BLOCK": 256})
ptx = triton.compile(src, target=GPUTarget("cuda", 90, 64), options={"num_warps": 4}).asm["ptx"]
print(json.dumps({"triton": triton.__version__, "path": triton.__file__, "ptx": ptx}))
"""


def test_last_arrival_orders_the_partials_before_the_counter_in_sm90_code(tmp_path):
    # fusedmlp.kernels.arrival's correctness on a GPU rests on the code triton emits for
    # ``last_arrival``: every thread's partial stores, then a CTA barrier, then one GPU-scope
    # acquire-release atomic on the counter (its result broadcast behind another barrier), then
    # the partials read past L1. Checked in the sm_90 PTX of each triton CI compiles with.
    script = tmp_path / "arrival_ptx.py"
    script.write_text(_ARRIVAL_PTX)
    for site in _tritons():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if site:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, env.get("PYTHONPATH")]))
        out = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600
        )
        assert out.returncode == 0, out.stderr[-3000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        if site:
            assert result["path"].startswith(os.path.abspath(site)), (site, result["path"])
        lines = [line.strip() for line in result["ptx"].splitlines()]
        atom = [i for i, line in enumerate(lines) if line.startswith("@") and "atom." in line]
        assert atom, result["triton"]
        first = atom[0]
        assert "atom.global.gpu.acq_rel.add" in lines[first], (result["triton"], lines[first])
        stores = [i for i in range(first) if "st.global" in lines[i]]
        barriers = [i for i in range(first) if lines[i].startswith("bar.sync")]
        assert stores and barriers and barriers[-1] > stores[-1], result["triton"]
        loads = [i for i, line in enumerate(lines) if "ld.global" in line]
        assert loads and all(".cg" in lines[i] for i in loads), result["triton"]
        assert min(loads) > first, result["triton"]
        # the atomic's result reaches the other threads through shared memory and a barrier
        after = lines[first + 1 : min(loads)]
        assert any("st.shared" in line for line in after), result["triton"]
        assert any(line.startswith("bar.sync") for line in after), result["triton"]
