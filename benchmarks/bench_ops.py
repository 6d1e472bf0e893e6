"""pytest-benchmark suite over the cases of ``fusedmlp bench`` (same builders, same byte/FLOP
counts): ``pytest benchmarks --benchmark-only``.

On a CPU-only machine the cases are the tiny ``--quick`` CPU shapes (fusedmlp runs its torch
fallback there); on a GPU, the ``--quick`` headline shapes. Each round is one call, synchronised
on CUDA, with the listed gradients reset before it; ``extra_info`` holds the achieved GB/s and
TFLOPS from the median. A case whose op is not available is skipped with the reason.
"""

import pytest
import torch

from fusedmlp.cli import _bench_engine as E
from fusedmlp.cli import _bench_ops as O

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"
CASES = O.make_cases(DEVICE, quick=True, ops=O.OPS, compile_=False)


def _id(case):
    return f"{case.op}-{case.pass_}-{case.shape}-{case.dtype}-{case.impl}".replace(" ", "_")


def _sync():
    if CUDA:
        torch.cuda.synchronize(DEVICE)


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_case(benchmark, case):
    with case.context():
        try:
            prepared = case.build()
            prepared.fn()
        except (NotImplementedError, RuntimeError) as exc:
            pytest.skip(f"{type(exc).__name__}: {exc}")
        _sync()
        fn, grads = prepared.fn, prepared.grad_to_none

        def reset():
            for t in grads:
                t.grad = None

        def call():
            fn()
            _sync()

        benchmark.group = f"{case.op} {case.pass_} {case.shape} {case.dtype}"
        benchmark.extra_info.update(
            op=case.op, impl=case.impl, backend=prepared.backend, bytes=case.nbytes
        )
        benchmark.pedantic(call, setup=reset, rounds=10 if CUDA else 5, warmup_rounds=2)
    ms = benchmark.stats.stats.median * 1e3
    if case.nbytes:
        benchmark.extra_info["gbps"] = case.nbytes / ms / 1e6
    if case.flops:
        benchmark.extra_info["tflops"] = case.flops / ms / 1e9


def test_ceilings(benchmark):
    """The two ceilings of ``fusedmlp bench``, measured once (extra_info)."""
    cfg = E.settings(CUDA, quick=True)
    ceilings = benchmark.pedantic(E.measure_ceilings, args=(DEVICE, True, cfg), rounds=1)
    benchmark.extra_info.update(ceilings)
    assert ceilings["copy_gbps"] > 0 and ceilings["matmul_tflops"] > 0
