"""Split reductions merged by their last program: no second launch for the merge.

A split reduction (a GEMM's dW over slices of the batch, batch norm's gradient sums over slices
of rows) has each program store its partial result; the partials of one output block are then
summed in a fixed order. That sum used to be a launch of its own. Here the programs of one
output block count their arrivals on an int32 counter, and the last to arrive sums the
partials, in the same fixed order, and resets the counter to 0 for the next launch:

- ``last_arrival(counter_ptr, arrivals)`` (``@triton.jit``): call it after the partial's stores;
  it returns whether this program arrived last.
- ``arrival_counters(device, n)``: the zeroed counters, cached per device and CUDA stream.

Why it is correct on a GPU (PTX memory model): ``tl.debug_barrier`` (``bar.sync``) orders every
thread's partial stores before the counter's update; the update is an acquire-release atomic at
GPU scope, which a scalar ``tl.atomic_add`` issues from one thread and broadcasts through shared
memory behind another barrier (triton 3.6 and 3.9 alike: sm_90 PTX ``bar.sync;
atom.global.gpu.acq_rel.add.u32; st.shared; bar.sync``). The last program's acquire therefore
sees every other program's partials; it reads them with ``.cg`` loads (L2, never a stale L1
line). The sum runs over the partials in a fixed order whichever program arrives last, so the
result is deterministic (a split dW's equals, to the bit, what ``_sum_splits_kernel``'s launch
computes from the same partials).

Each counter must see exactly ``arrivals`` updates per launch: every program of a block calls
``last_arrival`` once, also when its slice is empty. Two launches sharing counters at once would
corrupt each other's counts, so the counters are per CUDA stream (kernels on one stream run in
order), and a stream being captured into a CUDA graph gets fresh counters (their zero fill is
part of the graph) that are not cached.
"""

from __future__ import annotations

import threading

import torch
import triton
import triton.language as tl

from .launch import next_power_of_2


@triton.jit
def last_arrival(counter_ptr, arrivals):
    """Count this program's arrival at the int32 ``counter_ptr``; True for the ``arrivals``-th
    (the last) arrival, which also resets the counter to 0. Call after storing the partial."""
    tl.debug_barrier()  # every thread's partial stores before the release below
    seen = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = seen == arrivals - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
    return last


# (device index, stream), or (device type, index, thread) for the interpreter's CPU tensors ->
# int32 counters, all zero between launches.
_COUNTERS: dict = {}


def _stream(index: int) -> int:
    getter = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if getter is not None:
        return getter(index)
    return torch.cuda.current_stream(index).cuda_stream


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """At least ``n`` zeroed int32 counters on ``device`` for ``last_arrival``, reused by every
    launch on the current stream (each launch leaves them zero)."""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(max(n, 1), dtype=torch.int32, device=device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = (index, _stream(index))
    else:
        # per thread: another thread's interpreted launch may be counting on its counters
        key = (device.type, device.index, threading.get_ident())
    counters = _COUNTERS.get(key)
    if counters is None or counters.numel() < n:
        counters = _COUNTERS[key] = torch.zeros(
            max(next_power_of_2(n), 256), dtype=torch.int32, device=device
        )
    elif device.type != "cuda" and bool(counters.any()):
        # The interpreter runs the programs one after another: a kernel that raised part-way
        # (a test's interrupt) left its counts behind. (On a GPU a kernel that faults ends
        # the CUDA context.)
        counters.zero_()
    return counters


__all__ = ["arrival_counters", "last_arrival"]
