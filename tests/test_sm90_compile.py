"""Compile, for sm_90 (H100), every kernel configuration this test run launched.

The interpreter accepts programs the GPU compiler refuses (``tl.dot`` dimensions below 16,
shared memory over the limit): this test reproduces those errors on a CPU-only machine.
It runs last (conftest) and compiles what ``fusedmlp.kernels.launch.LAUNCHED`` recorded, plus
every GPU autotune configuration for the first recorded signature of each kernel.
Run it together with the tests whose kernels it should compile.
"""

import os
import subprocess
import tempfile
import time

import pytest

# H100 (sm_90) opt-in shared memory per block.
SM90_MAX_SHARED = 227 * 1024


def _resources(cubin: bytes) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True
        )
    for line in out.stdout.splitlines():
        if "REG:" in line:
            return " ".join(line.split()[1:])
    return "resources unknown"


def _jobs():
    from fusedmlp.kernels.launch import LAUNCHED

    jobs, seen = [], set()
    for rec, fn in LAUNCHED.items():
        jobs.append((rec, fn, dict(rec.constexprs), rec.num_warps, rec.num_stages))
        if rec.name in seen:
            continue
        seen.add(rec.name)
        for cfg in rec.gpu_configs:
            constexprs = {**dict(rec.constexprs), **cfg.kwargs}
            jobs.append((rec, fn, constexprs, cfg.num_warps, cfg.num_stages))
    unique = {}
    for rec, fn, cx, w, s in jobs:
        unique.setdefault(
            (rec.module, rec.name, rec.signature, tuple(sorted(cx.items(), key=str)), w, s),
            (rec, fn, cx, w, s),
        )
    return list(unique.values())


def test_every_launched_configuration_compiles_for_sm90(capsys):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    jobs = _jobs()
    if not jobs:
        pytest.fail("no kernel was launched in this run: run this test together with the op tests")
    target = GPUTarget("cuda", 90, 32)
    jitted, failures, lines = {}, [], []
    start = time.perf_counter()
    for rec, fn, constexprs, warps, stages in jobs:
        jf = jitted.setdefault(fn, JITFunction(fn))
        signature = dict(rec.signature)
        src = ASTSource(jf, signature, constexprs)
        label = f"{rec.name} {','.join(t for t in signature.values() if t != 'constexpr')} {constexprs} w{warps} s{stages}"
        try:
            compiled = triton.compile(
                src, target=target, options={"num_warps": warps, "num_stages": stages}
            )
        except Exception as e:  # noqa: BLE001 - every failure is reported below
            failures.append(
                f"{label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            )
            continue
        shared = compiled.metadata.shared
        if shared > SM90_MAX_SHARED:
            failures.append(f"{label}: {shared} B shared memory > {SM90_MAX_SHARED} B")
        lines.append(f"{label}: {_resources(compiled.asm['cubin'])} shared={shared}")
    with capsys.disabled():
        print(f"\nsm_90 compile: {len(jobs)} configurations in {time.perf_counter() - start:.1f} s")
        for line in lines:
            print("  " + line)
    assert not failures, "kernels that do not compile for sm_90:\n" + "\n".join(failures)
