"""The measuring engine of ``fusedmlp bench``: timers, ceilings, peak memory, the run loop.

- CUDA: the ``triton.testing.do_bench`` method: one call first (compiles, autotunes), an
  estimate over 5 calls, warm-up calls, then each timed call between two CUDA events with the
  L2 cache flushed (a 256 MB buffer zeroed) and the listed ``.grad`` reset to None before it,
  outside the timed region; the median of the event times.
- CPU: ``time.perf_counter`` around each call, median over the repeats.
- Wall mode (small shapes, launch overhead): a block of calls between two synchronisations,
  the wall time divided by the number of calls, median over blocks; this is what a Python
  training loop sees when the GPU waits on the CPU.
- Graph mode (CUDA; ``target_grid.py --graph``): ``GRAPH_CALLS`` back-to-back calls captured
  in one CUDA graph (each after its ``.grad`` reset, as above) and replayed between two events,
  the time per call, median over replays: the GPU's time with no host launch cost in it, for
  fusedmlp and torch alike (what a training loop under CUDA graphs sees), with the L2 warm.
- Ceilings, measured at the start of the run: a device-to-device copy (GB/s counting the read
  and the write) and a large matmul (bf16 on CUDA; a small fp32 matmul on CPU, labelled CPU).
- Host time (CUDA events): each timed call's ``perf_counter`` time on the host (what queuing
  it took), median, as ``host_ms``: an event time near it and above the kernels' is the host's.
- Peak memory (CUDA): ``torch.cuda.max_memory_allocated`` over one steady-state call, with the
  case's inputs, parameters and optimizer state live and the listed ``.grad`` reset to None
  before it (as before each timed call), minus what was allocated before the case was built
  (the L2-flush buffer); None on CPU.
"""

from __future__ import annotations

import contextlib
import gc
import platform
import statistics
import time
from dataclasses import dataclass

import torch

from ._bench_ops import Case

_FLUSH = {}


@dataclass
class Settings:
    warmup_ms: float
    rep_ms: float
    max_reps: int
    min_reps: int = 3


def settings(cuda: bool, quick: bool) -> Settings:
    if cuda:
        return Settings(10, 40, 100) if quick else Settings(25, 100, 1000)
    return Settings(10, 50, 10) if quick else Settings(50, 500, 100)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset(grads) -> None:
    for t in grads:
        t.grad = None


def _flush_buffer(device):
    buf = _FLUSH.get(device)
    if buf is None:
        buf = _FLUSH[device] = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)
    return buf


def time_cuda(fn, grad_to_none, device, cfg: Settings, stat=statistics.median,
              host: list | None = None) -> float:  # fmt: skip
    """Median ms of ``fn`` the ``triton.testing.do_bench`` way (warm-up, L2 flush, events).
    ``host``: gets each timed call's host ms (``perf_counter`` around the call: what the host
    spends to queue it; an event time near it, above the kernels', is the host's)."""
    cache = _flush_buffer(device)
    fn()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        cache.zero_()
        fn()
    end.record()
    torch.cuda.synchronize(device)
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    n_warmup = max(1, int(cfg.warmup_ms / estimate))
    n_repeat = min(cfg.max_reps, max(cfg.min_reps, int(cfg.rep_ms / estimate)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_repeat)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_repeat)]
    for _ in range(n_warmup):
        fn()
    clock = time.perf_counter
    for i in range(n_repeat):
        _reset(grad_to_none)
        cache.zero_()
        starts[i].record()
        t0 = clock()
        fn()
        t1 = clock()
        ends[i].record()
        if host is not None:
            host.append((t1 - t0) * 1e3)
    torch.cuda.synchronize(device)
    return stat([s.elapsed_time(e) for s, e in zip(starts, ends)])


def time_cpu(fn, grad_to_none, cfg: Settings, stat=statistics.median) -> float:
    """Median ms of ``fn`` on the host clock, one call per sample."""
    t0 = time.perf_counter()
    fn()
    estimate = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(max(0, min(3, int(cfg.warmup_ms / estimate)))):
        fn()
    n_repeat = min(cfg.max_reps, max(cfg.min_reps, int(cfg.rep_ms / estimate)))
    times = []
    for _ in range(n_repeat):
        _reset(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return stat(times)


def time_wall(fn, grad_to_none, device, cfg: Settings, blocks: int = 5) -> float:
    """Wall ms per call over blocks of back-to-back calls, synchronised only around a block."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    estimate = max((time.perf_counter() - t0) * 1e3, 1e-3)
    per_block = max(1, min(cfg.max_reps, int(cfg.rep_ms / blocks / estimate)))
    samples = []
    for _ in range(blocks):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(per_block):
            _reset(grad_to_none)
            fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) * 1e3 / per_block)
    return statistics.median(samples)


GRAPH_CALLS = 20


def time_graph(fn, grad_to_none, device, cfg: Settings, stat=statistics.median) -> float:
    """Median ms per call of ``fn`` replayed from a CUDA graph of ``GRAPH_CALLS`` calls.

    Captured on the current stream, which must not be the default one (a capture cannot run
    there): ``run_case`` builds a graph case on a side stream of its own, so that a backward
    case's autograd graph, recorded there, also runs its backward there."""
    stream = torch.cuda.current_stream(device)
    if stream == torch.cuda.default_stream(device):
        raise RuntimeError("time_graph: run on a side stream (torch.cuda.stream), not the default")
    for _ in range(3):  # compiled and autotuned before: nothing may synchronise in the capture
        _reset(grad_to_none)
        fn()
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(GRAPH_CALLS):
            _reset(grad_to_none)
            fn()
    _reset(grad_to_none)
    graph.replay()
    stream.synchronize()
    t0 = time.perf_counter()
    graph.replay()
    stream.synchronize()
    estimate = max((time.perf_counter() - t0) * 1e3, 1e-3)
    n_repeat = min(cfg.max_reps, max(cfg.min_reps, int(cfg.rep_ms / estimate)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_repeat)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_repeat)]
    for i in range(n_repeat):
        starts[i].record(stream)
        graph.replay()
        ends[i].record(stream)
    stream.synchronize()
    per_replay = stat([s.elapsed_time(e) for s, e in zip(starts, ends)])
    del graph
    return per_replay / GRAPH_CALLS


def time_fn(
    fn, grad_to_none, device, cfg: Settings, wall=False, stat=statistics.median, graph=False,
    host: list | None = None,
):  # fmt: skip
    """(ms, timing method name): the median by default; ``stat=min`` for the ceilings.
    ``host``: with CUDA events, gets the host ms of each timed call (``time_cuda``)."""
    if graph and device.type == "cuda":
        return time_graph(fn, grad_to_none, device, cfg, stat), "cuda graph replay, L2 warm"
    if wall:
        return time_wall(fn, grad_to_none, device, cfg), "wall per call"
    if device.type == "cuda":
        return time_cuda(fn, grad_to_none, device, cfg, stat, host), "cuda events, L2 flushed"
    return time_cpu(fn, grad_to_none, cfg, stat), "cpu perf_counter"


# --- ceilings --------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine() or "unknown"
    return f"CPU ({cpu}, {torch.get_num_threads()} threads)"


def _time_copy(nbytes: int, device, cfg: Settings) -> float:
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return time_fn(lambda: dst.copy_(src), [], device, cfg, stat=min)[0]


def _time_matmul(n: int, dtype, device, cfg: Settings) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return time_fn(lambda: a @ b, [], device, cfg, stat=min)[0]


def measure_ceilings(device: torch.device, quick: bool, cfg: Settings) -> dict:
    """The copy bandwidth and matmul peak of ``device``, measured now (best of the repeats)."""
    cuda = device.type == "cuda"
    copy_bytes = (1 << 30) if cuda else (64 << 20)
    ms = _time_copy(copy_bytes, device, cfg)
    copy_gbps = 2 * copy_bytes / (ms * 1e-3) / 1e9  # read + write
    n = 8192 if cuda else (512 if quick else 1024)
    dtype = torch.bfloat16 if cuda else torch.float32
    ms_mm = _time_matmul(n, dtype, device, cfg)
    tflops = 2 * n**3 / (ms_mm * 1e-3) / 1e12
    dname = "bf16" if cuda else "fp32"
    return {
        "copy_gbps": copy_gbps,
        "copy_what": f"{'device-to-device' if cuda else 'CPU memcpy'} copy of "
        f"{copy_bytes >> 20} MiB, GB/s counting read + write",
        "copy_ms": ms,
        "matmul_tflops": tflops,
        "matmul_what": f"{'' if cuda else 'CPU '}{dname} matmul {n}x{n}x{n}",
        "matmul_ms": ms_mm,
    }


# --- the run loop ----------------------------------------------------------------------------


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text[:300]


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(case: Case, device: torch.device, cfg: Settings, ceilings: dict, dname: str) -> dict:
    """Build, warm up and time one case; a failure becomes the row's ``error``, never a crash."""
    row = blank_row(case, dname)
    cuda = device.type == "cuda"
    prepared = None
    t0 = time.perf_counter()
    base = torch.cuda.memory_allocated(device) if cuda else 0
    # a graph case, built and run on a side stream (``time_graph``)
    on_stream = torch.cuda.stream(torch.cuda.Stream(device)) if cuda and case.graph else None
    try:
        with case.context(), on_stream or contextlib.nullcontext():
            prepared = case.build()
            row["backend"] = prepared.backend
            prepared.fn()  # compiles / autotunes / initialises optimizer state
            _sync(device)
            row["setup_s"] = round(time.perf_counter() - t0, 3)
            if cuda:
                # As before every timed call: a call that accumulated into .grad left by the
                # previous one would hold both gradients at once, which no training step does.
                _reset(prepared.grad_to_none)
                torch.cuda.reset_peak_memory_stats(device)
                prepared.fn()
                torch.cuda.synchronize(device)
                peak = torch.cuda.max_memory_allocated(device) - base
                row["peak_mem_mb"] = round(peak / 2**20, 1)
            host: list = []
            ms, how = time_fn(
                prepared.fn, prepared.grad_to_none, device, cfg, case.wall, graph=case.graph,
                host=host,
            )  # fmt: skip
        row["ms"], row["timing"] = ms, how
        if host:  # the host's ms per call beside the event time (CUDA events only)
            row["host_ms"] = statistics.median(host)
        fill_rates(row, ceilings)
    except Exception as exc:  # noqa: BLE001 - one failing case must not end the run
        row["error"] = _error_text(exc)
    finally:
        prepared = None
        if case.impl == "torch.compile":
            from torch import _dynamo

            _dynamo.reset()
        _free(device)
    return row


def fill_rates(row: dict, ceilings: dict) -> None:
    """GB/s, TFLOPS and percent of the roofline from ``row['ms']`` and the counts.

    ``pct_of_peak`` = max(% of the copy bandwidth, % of the matmul peak): the percent of the
    roofline bound max(bytes / bandwidth, flops / peak) that the measured time reaches.
    """
    ms = row["ms"]
    if not ms:
        return
    pcts = []
    if row.get("bytes"):
        row["gbps"] = row["bytes"] / (ms * 1e-3) / 1e9
        row["pct_bw"] = 100 * row["gbps"] / ceilings["copy_gbps"]
        pcts.append(row["pct_bw"])
    if row.get("flops"):
        row["tflops"] = row["flops"] / (ms * 1e-3) / 1e12
        row["pct_flops"] = 100 * row["tflops"] / ceilings["matmul_tflops"]
        pcts.append(row["pct_flops"])
    row["pct_of_peak"] = max(pcts) if pcts else None


def add_speedups(rows: list[dict]) -> None:
    """``speedup_vs_torch`` / ``speedup_vs_compile``: the baseline's ms over this row's ms, for
    the same (op, pass, shape, dtype)."""
    base: dict = {}
    for r in rows:
        if r.get("ms") and r["impl"] in ("torch", "torch.compile"):
            base[(r["op"], r["pass"], r["shape"], r["dtype"], r["impl"])] = r["ms"]
    for r in rows:
        key = (r["op"], r["pass"], r["shape"], r["dtype"])
        for impl, field in (("torch", "speedup_vs_torch"), ("torch.compile", "speedup_vs_compile")):
            b = base.get((*key, impl))
            r[field] = (b / r["ms"]) if (b and r.get("ms")) else None


def run_cases(cases, device, cfg, ceilings, dname, budget_s=None, on_row=None, log=print):
    """Run ``cases`` (tier order, stable); after ``budget_s`` seconds the rest are skipped.

    ``on_row(rows)`` is called after every case with the rows so far (in report order, with
    speedups), so a run killed by a timeout still leaves its results behind.
    """
    done = []
    t_start = time.perf_counter()
    for case in sorted(cases, key=lambda c: c.tier):
        label = f"{case.op} {case.pass_} {case.shape} {case.dtype} {case.impl}"
        elapsed = time.perf_counter() - t_start
        if budget_s is not None and elapsed > budget_s:
            row = blank_row(case, dname)
            row["skipped"] = f"time budget of {budget_s:.0f} s spent"
        else:
            row = run_case(case, device, cfg, ceilings, dname)
        done.append((case.order, row))
        if log:
            if row["ms"] is not None:
                log(f"  {label}: {row['ms']:.4g} ms (setup {row['setup_s']:.1f} s)")
            else:
                log(f"  {label}: {row['error'] or 'skipped: ' + row['skipped']}")
        if on_row:
            on_row(_ordered(done))
    return _ordered(done)


def _ordered(done) -> list[dict]:
    rows = [row for _, row in sorted(done, key=lambda pair: pair[0])]
    add_speedups(rows)
    return rows


def blank_row(case: Case, dname: str) -> dict:
    return {
        "op": case.op,
        "pass": case.pass_,
        "shape": case.shape,
        "dtype": case.dtype,
        "impl": case.impl,
        "backend": None,
        "ms": None,
        "gbps": None,
        "tflops": None,
        "pct_bw": None,
        "pct_flops": None,
        "pct_of_peak": None,
        "peak_mem_mb": None,
        "device": dname,
        "timing": None,
        "setup_s": None,
        "host_ms": None,
        "bytes": case.nbytes,
        "flops": case.flops,
        "note": case.note,
        "error": None,
        "skipped": None,
    }
