"""`fusedmlp verify`: every Triton kernel against torch's own implementation on this device.

The self-test to run on a new GPU, driver or triton version. Each op runs under
``fusedmlp.use_backend("triton")`` at a few shapes and dtypes (fp32, fp16, bf16): forward
outputs, every gradient, BatchNorm's running statistics, and a few optimizer steps of Adam,
AdamW and SGD against ``torch.optim``. One table row per compared tensor:

    op | case | dtype | tensor | max abs err | max rel err | tolerance | launches | result

- Reference: torch's implementation (``torch.nn.functional``, ``torch.nn``, ``torch.optim``)
  computed in float32 from exactly the same (already rounded) inputs on the same device, so a
  fp16/bf16 row measures fusedmlp's error against the exact-as-fp32 answer.
- A row passes when every element satisfies ``|a - e| <= atol + rtol * |e|`` (the
  ``torch.testing.assert_close`` rule), NaN/Inf where torch has them, and the forward output has
  torch's dtype. ``max rel err`` is ``max |a - e| / max(|e|, atol)``. For the linear gradients
  (reductions) the allowance also has ``2 eps(dtype) * (|A| @ |B|)``, the rounding bound of the
  reduction (tolerance marked ``+``): a 16-bit activation derivative is exact only to the
  output's rounding, as in torch's own 16-bit backward.
- ``launches`` counts the Triton kernel launches of the case: a case in which no Triton kernel
  ran fails (the fallback must not pass for the kernel).
- Dropout cannot match torch's random mask: its rows check the kept values (``x / (1 - p)``),
  the keep rate (within 5 binomial standard deviations of ``1 - p``) and that the backward
  regenerates the forward's mask (gradient = ``grad_output * mask / (1 - p)`` with the mask read
  from the forward output, through a gradient with other strides than the input).
- ``mlp_block``: an MLP's hidden block and the next layer (``[Linear, BatchNorm1d, ReLU,
  Linear]`` through ``fusedmlp.nn.convert``, fp32 only: 16-bit intermediates compound along the
  chain) against the torch chain, so the cross-layer fused kernels are verified too; at the GPU
  sizes the block's output is recomputed in backward (``BNActDropoutLinearFunction``).
- ``nll_loss`` is not verified: it is torch's own implementation on every backend (a gather of
  N log-probabilities has nothing to fuse); cross-entropy is the fused softmax + NLL kernel.
- An op that raises is an ``ERROR`` row. The exit status is 0 only when every row passes.

On a machine without CUDA the kernels run under Triton's interpreter: ``run`` sets
``TRITON_INTERPRET=1`` before fusedmlp imports any kernel module (they are imported lazily, at
the first launch), uses small sizes, and says so. If the kernels were already imported compiled
in this process, it stops with a clear message (exit status 2) instead of reporting wrong
results.

On a GPU every new kernel variant is a compilation, so to stay within a minute on a fresh
cache the whole case grid runs in the first dtype and one case per kernel family in the others
(``--full`` for the whole grid everywhere), and each kernel runs its first GPU configuration
instead of autotuning over all of them (``--autotune`` to tune as training does).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass

from ._checks import checked_type, output_path_problem

DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

# (rtol, atol) per dtype: the test suite's table (tests/conftest.py).
TOLERANCES = {
    "fp32": (1e-4, 1e-5),
    "fp16": (1e-2, 1e-2),
    "bf16": (5e-2, 5e-2),
}

OPS = (
    "linear",
    "cross_entropy",
    "softmax",
    "log_softmax",
    "batch_norm",
    "dropout",
    "mlp_block",
    "adam",
    "adamw",
    "sgd",
)

ACTIVATIONS = (None, "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "silu")


def add_arguments(parser):
    parser.add_argument(
        "--device",
        default=None,
        help="device to verify on (default: cuda if available, else cpu under Triton's interpreter)",
    )
    parser.add_argument(
        "--dtypes",
        default="fp32,fp16,bf16",
        help="comma-separated dtypes among fp32, fp16, bf16 (default: all three)",
    )
    parser.add_argument(
        "--ops",
        default=",".join(OPS),
        help=f"comma-separated ops to verify (default: all: {', '.join(OPS)})",
    )
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the rows as JSON")
    parser.add_argument(
        "--seed",  # torch.Generator.manual_seed's range
        type=checked_type(int, lambda v: -(2**63) <= v < 2**64, "an integer in [-2**63, 2**64)"),
        default=0,
        help="seed of the random inputs",
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="the whole case grid in every dtype (default on CPU; on a GPU the first dtype "
        "gets the whole grid and the others one case per kernel variant, to bound compile time)",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start no new case after this many seconds; the cases left are reported as not "
        "run (INCOMPLETE) and the exit status covers the checks that ran",
    )
    parser.add_argument(
        "--autotune",
        action="store_true",
        help="autotune the GPU kernels as training does (default: each kernel runs its first "
        "GPU configuration, so verify compiles one configuration per kernel variant)",
    )


# --------------------------------------------------------------------------------------------
# Interpreter set-up: must happen before anything runs triton's @jit on fusedmlp's kernels.


def _loaded_kernel_objects():
    """Jitted kernel objects of fusedmlp kernel modules already imported in this process."""
    found = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("fusedmlp.kernels.") or module is None:
            continue
        for value in vars(module).values():
            if type(value).__name__ in ("JITFunction", "InterpretedFunction", "Autotuner"):
                found.append((name, value))
    return found


def _setup_interpreter(device: str) -> str | None:
    """Turn Triton's interpreter on for CPU tensors; an error message when that is impossible."""
    if device != "cpu":
        return None
    loaded = _loaded_kernel_objects()
    if not loaded:
        os.environ["TRITON_INTERPRET"] = "1"
        return None
    from ..kernels.launch import is_interpreted

    compiled = sorted({mod for mod, obj in loaded if not is_interpreted(obj)})
    if compiled:
        return (
            "fusedmlp verify: the Triton kernels were already imported in compiled mode in this "
            f"process ({', '.join(compiled)}), so they cannot run on CPU tensors. Run "
            "`fusedmlp verify` in a fresh process (or set TRITON_INTERPRET=1 before importing "
            "fusedmlp's kernels)."
        )
    return None


@contextlib.contextmanager
def _first_config_only():
    """Run each kernel's first GPU configuration instead of autotuning (``FUSEDMLP_AUTOTUNE=0``)."""
    from ..kernels import launch

    previous = launch.AUTOTUNE
    launch.AUTOTUNE = False
    try:
        yield
    finally:
        launch.AUTOTUNE = previous


# --------------------------------------------------------------------------------------------
# Launch counting: proves the Triton path ran (interpreter grid executor, or triton's hook).


class _LaunchCounter:
    def __init__(self, interpreted: bool):
        self.count = 0
        self._interpreted = interpreted
        self._undo = None

    def __enter__(self):
        if self._interpreted:
            from triton.runtime import interpreter

            original = interpreter.GridExecutor.__call__
            counter = self

            def counting(executor, *args, **kwargs):
                counter.count += 1
                return original(executor, *args, **kwargs)

            interpreter.GridExecutor.__call__ = counting
            self._undo = lambda: setattr(interpreter.GridExecutor, "__call__", original)
        else:
            import triton

            def hook(*_args, **_kwargs):
                self.count += 1

            chain = triton.knobs.runtime.launch_enter_hook
            if hasattr(chain, "add"):
                chain.add(hook)
                self._undo = lambda: chain.remove(hook)
            else:
                previous = triton.knobs.runtime.launch_enter_hook
                triton.knobs.runtime.launch_enter_hook = hook
                self._undo = lambda: setattr(triton.knobs.runtime, "launch_enter_hook", previous)
        return self

    def __exit__(self, *exc):
        if self._undo is not None:
            self._undo()


# --------------------------------------------------------------------------------------------
# Comparison.


@dataclass
class Check:
    """One compared tensor: ``actual`` (fusedmlp) against ``expected`` (torch)."""

    name: str
    actual: object
    expected: object
    rtol: float | None = None
    atol: float | None = None
    dtype: object = None  # the dtype torch returns for this tensor, when it must match
    # For a reduction: the sum of its terms' magnitudes (|A| @ |B|). The result may also be off
    # by 2 units of the dtype's rounding of that sum (e.g. bf16 gradients that cancel).
    bound: object = None


@dataclass
class Row:
    op: str
    case: str
    dtype: str
    tensor: str
    max_abs_err: float | None
    max_rel_err: float | None
    rtol: float | None
    atol: float | None
    launches: int
    result: str
    note: str = ""
    bounded: bool = False  # the tolerance includes the reduction's rounding bound


def _compare(check: Check, rtol: float, atol: float):
    """(max abs err, max rel err, passed, note) of one check."""
    import torch

    a = torch.as_tensor(check.actual).detach()
    e = torch.as_tensor(check.expected).detach()
    notes = []
    ok = True
    if check.dtype is not None and a.dtype != check.dtype:
        ok = False
        notes.append(f"dtype {a.dtype} (torch: {check.dtype})")
    if tuple(a.shape) != tuple(e.shape):
        return math.inf, math.inf, False, f"shape {tuple(a.shape)} (torch: {tuple(e.shape)})"
    a = a.to(device="cpu", dtype=torch.float64)
    e = e.to(device="cpu", dtype=torch.float64)
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        ok = False
        notes.append(f"NaN at {int((nan_a ^ nan_e).sum())} positions where torch differs")
    inf_e = torch.isinf(e)
    if not torch.equal(torch.isinf(a), inf_e) or not torch.equal(a[inf_e], e[inf_e]):
        ok = False
        notes.append("Inf where torch differs")
    finite = torch.isfinite(a) & torch.isfinite(e)
    if a.numel() == 0 or not bool(finite.any()):
        return 0.0, 0.0, ok, "; ".join(notes)
    diff = (a - e).abs()[finite]
    ref = e.abs()[finite]
    abs_err = float(diff.max())
    rel_err = float((diff / ref.clamp_min(atol if atol > 0 else 1e-30)).max())
    allowed = atol + rtol * ref
    if check.bound is not None:
        eps = torch.finfo(torch.as_tensor(check.actual).dtype).eps
        bound = torch.as_tensor(check.bound).detach().to(device="cpu", dtype=torch.float64)
        allowed = allowed + 2 * eps * bound.expand(e.shape)[finite]
    if not bool((diff <= allowed).all()):
        ok = False
        bad = int((diff > allowed).sum())
        notes.append(f"{bad}/{diff.numel()} elements out of tolerance")
    return abs_err, rel_err, ok, "; ".join(notes)


# --------------------------------------------------------------------------------------------
# Cases. Each case function returns a list of Checks; sizes depend on the device.


def _sizes(device: str) -> dict:
    if device == "cpu":  # the interpreter runs every program in Python: keep tiny
        return {
            "linear": (7, 33, 17),
            "linear3d": (2, 5, 19, 23),
            "ce": (13, 37),
            "ce_wide": (5, 300),
            "softmax": (3, 5, 37),
            "bn1d": (16, 7),
            "bn3d": (4, 5, 9),
            "bn2d": (3, 6, 5, 7),
            "dropout": (64, 73),
            "dropout2d": (8, 16, 3, 5),
            "optim": ((17, 33), (17,), (5, 7)),
        }
    return {
        "linear": (1000, 384, 520),
        "linear3d": (4, 129, 257, 300),
        "ce": (1024, 4099),
        "ce_wide": (64, 65537),
        "softmax": (8, 64, 1031),
        "bn1d": (4096, 129),
        "bn3d": (64, 33, 129),
        "bn2d": (32, 64, 15, 17),
        "dropout": (2048, 1031),
        "dropout2d": (64, 128, 7, 9),
        "optim": ((1024, 1000), (1000,), (3, 5), (257, 129)),
    }


class _Inputs:
    """Deterministic random inputs: drawn on CPU from a seeded generator, moved to the device."""

    def __init__(self, device, seed):
        import torch

        self.device = device
        self.gen = torch.Generator().manual_seed(seed)

    def randn(self, *shape, dtype, scale=1.0):
        import torch

        return (torch.randn(shape, generator=self.gen) * scale).to(dtype).to(self.device)

    def rand(self, *shape, dtype, low=0.0, high=1.0):
        import torch

        x = torch.rand(shape, generator=self.gen) * (high - low) + low
        return x.to(dtype).to(self.device)

    def randint(self, high, *shape):
        import torch

        return torch.randint(0, high, shape, generator=self.gen).to(self.device)


def _leaf(t):
    """A leaf requiring grad with ``t``'s strides."""
    return t.detach().requires_grad_(True)


def _ref_leaf(t):
    return t.detach().float().requires_grad_(True)


def _torch_activation(z, activation, negative_slope):
    import torch
    import torch.nn.functional as F

    if activation is None:
        return z
    if activation == "leaky_relu":
        return F.leaky_relu(z, negative_slope)
    return {
        "relu": F.relu,
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "gelu": F.gelu,
        "silu": F.silu,
    }[activation](z)


def _case_linear(inp, dtype, sizes, activation, layout):
    import torch

    import fusedmlp.functional as FF

    if layout == "3d":
        b, m, k, n = sizes["linear3d"]
        x = inp.randn(b, m, 2 * k, dtype=dtype)[..., ::2]  # sliced: non-contiguous
        bias = None
    else:
        m, k, n = sizes["linear"]
        x = inp.randn(k, m, dtype=dtype).t()  # transposed input
        bias = inp.randn(n, dtype=dtype, scale=0.5)
    w = inp.randn(n, k, dtype=dtype, scale=k**-0.5)
    slope = 0.1
    x_, w_ = _leaf(x), _leaf(w)
    b_ = _leaf(bias) if bias is not None else None
    y = FF.linear(x_, w_, b_, activation=activation, negative_slope=slope)
    g = inp.randn(*y.shape[:-1], y.shape[-1], dtype=dtype)
    if layout == "3d":
        g = inp.randn(y.shape[-1], *y.shape[:-1], dtype=dtype).movedim(0, -1)  # other strides
    y.backward(g)

    xr, wr = _ref_leaf(x), _ref_leaf(w)
    br = _ref_leaf(bias) if bias is not None else None
    yr = _torch_activation(torch.nn.functional.linear(xr, wr, br), activation, slope)
    yr.backward(g.float())
    n_out = yr.shape[-1]
    ag, ax, aw = g.float().abs(), xr.detach().abs(), wr.detach().abs()
    checks = [
        Check("output", y, yr, dtype=dtype),
        Check("grad input", x_.grad, xr.grad, bound=ag @ aw),
        Check(
            "grad weight",
            w_.grad,
            wr.grad,
            bound=ag.reshape(-1, n_out).t() @ ax.reshape(-1, ax.shape[-1]),
        ),
    ]
    if bias is not None:
        checks.append(Check("grad bias", b_.grad, br.grad, bound=ag.reshape(-1, n_out).sum(0)))
    return checks


def _case_cross_entropy(inp, dtype, sizes, reduction, weighted, ignore, smoothing, wide=False):
    import torch
    import torch.nn.functional as F

    import fusedmlp.functional as FF

    n, c = sizes["ce_wide" if wide else "ce"]
    x = inp.randn(n, c, dtype=dtype, scale=2.0)
    target = inp.randint(c, n)
    ignore_index = -100
    if ignore:
        ignore_index = 1
        target[::3] = ignore_index
    weight = inp.rand(c, dtype=dtype, low=0.5, high=1.5) if weighted else None
    kw = dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=smoothing)
    x_ = _leaf(x)
    loss = FF.cross_entropy(x_, target, weight, **kw)
    g = inp.randn(n, dtype=dtype) if reduction == "none" else torch.tensor(0.7, dtype=dtype)
    g = g.to(x.device)
    loss.backward(g)
    xr = _ref_leaf(x)
    wr = weight.float() if weighted else None
    lr_ = F.cross_entropy(xr, target, wr, **kw)
    lr_.backward(g.float())
    return [Check("loss", loss, lr_, dtype=dtype), Check("grad input", x_.grad, xr.grad)]


def _case_softmax(inp, dtype, sizes, log, dim):
    import torch

    import fusedmlp.functional as FF

    shape = sizes["softmax"]
    x = inp.randn(*shape, dtype=dtype, scale=2.0)
    x_ = _leaf(x)
    fn = FF.log_softmax if log else FF.softmax
    y = fn(x_, dim)
    g = inp.randn(*shape, dtype=dtype)
    y.backward(g)
    xr = _ref_leaf(x)
    yr = (torch.log_softmax if log else torch.softmax)(xr, dim)
    yr.backward(g.float())
    return [Check("output", y, yr, dtype=dtype), Check("grad input", x_.grad, xr.grad)]


def _case_batch_norm(inp, dtype, sizes, kind, momentum, affine, track, channels_last=False):
    import torch

    import fusedmlp

    shape = sizes[kind]
    c = shape[1]
    dims = 4 if kind == "bn2d" else 1
    ours_cls = fusedmlp.nn.BatchNorm2d if dims == 4 else fusedmlp.nn.BatchNorm1d
    ref_cls = torch.nn.BatchNorm2d if dims == 4 else torch.nn.BatchNorm1d
    kw = dict(momentum=momentum, affine=affine, track_running_stats=track)
    ours = ours_cls(c, **kw).to(inp.device)
    ref = ref_cls(c, **kw).to(inp.device)
    if affine:
        w = inp.rand(c, dtype=torch.float32, low=0.5, high=1.5)
        b = inp.randn(c, dtype=torch.float32)
        with torch.no_grad():
            for m in (ours, ref):
                m.weight.copy_(w)
                m.bias.copy_(b)
    checks = []
    for step, mode in enumerate(("train", "train", "eval")):
        ours.train(mode == "train")
        ref.train(mode == "train")
        x = inp.randn(*shape, dtype=dtype, scale=3.0) + 5.0
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x_ = _leaf(x)
        y = ours(x_)
        g = inp.randn(*shape, dtype=dtype)
        y.backward(g)
        xr = _ref_leaf(x)
        yr = ref(xr)
        yr.backward(g.float())
        tag = f"{mode}{step}" if mode == "train" else mode
        checks += [
            Check(f"{tag} output", y, yr, dtype=dtype),
            Check(f"{tag} grad input", x_.grad, xr.grad),
        ]
        if affine:
            # dweight and dbias are per-channel sums over N (and S) in a different order than
            # torch's: allow their rounding bound, as for linear's reductions.
            red = [d for d in range(x.dim()) if d != 1]
            xf, gab = x.float(), g.float().abs()
            xhat = (xf - xf.mean(red, keepdim=True)) / (
                xf.var(red, unbiased=False, keepdim=True) + ours.eps
            ).sqrt()
            checks += [
                Check(
                    f"{tag} grad weight",
                    ours.weight.grad,
                    ref.weight.grad,
                    bound=(gab * xhat.abs()).sum(red),
                ),
                Check(f"{tag} grad bias", ours.bias.grad, ref.bias.grad, bound=gab.sum(red)),
            ]
            for m in (ours, ref):
                m.weight.grad = None
                m.bias.grad = None
        if track and mode == "train":
            checks += [
                Check(f"{tag} running_mean", ours.running_mean, ref.running_mean),
                Check(f"{tag} running_var", ours.running_var, ref.running_var),
                Check(
                    f"{tag} num_batches_tracked",
                    ours.num_batches_tracked,
                    ref.num_batches_tracked,
                    rtol=0.0,
                    atol=0.0,
                ),
            ]
    return checks


def _case_mlp_block(inp, dtype, sizes):
    """An MLP's hidden block and the next layer, [Linear, BatchNorm1d, ReLU, Linear], converted
    by ``fusedmlp.nn.convert``: the fused BatchNorm-ReLU kernels and, from 1 MiB of block output
    (the GPU sizes), the Function that recomputes the block's output for the last Linear's dW."""
    import torch

    import fusedmlp

    n, c = sizes["bn1d"]
    ref = torch.nn.Sequential(
        torch.nn.Linear(c, c), torch.nn.BatchNorm1d(c), torch.nn.ReLU(), torch.nn.Linear(c, 5)
    ).to(inp.device)
    with torch.no_grad():
        for lin in (ref[0], ref[3]):
            lin.weight.copy_(inp.randn(*lin.weight.shape, dtype=torch.float32, scale=c**-0.5))
            lin.bias.copy_(inp.randn(*lin.bias.shape, dtype=torch.float32, scale=0.5))
        ref[1].weight.copy_(inp.rand(c, dtype=torch.float32, low=0.5, high=1.5))
        ref[1].bias.copy_(inp.randn(c, dtype=torch.float32))
    ours = fusedmlp.nn.convert(ref).to(dtype)
    x = inp.randn(n, c, dtype=dtype)
    g = inp.randn(n, 5, dtype=dtype)
    x_ = _leaf(x)
    y = ours(x_)
    y.backward(g)
    xr = _ref_leaf(x)
    z = ref[0](xr)
    z.retain_grad()
    b = ref[1](z)
    b.retain_grad()
    r = ref[2](b)
    yr = ref[3](r)
    yr.backward(g.float())
    # The reductions' rounding bounds, as for linear and batch norm alone (sums of |terms|).
    ag, ar, agz, ax = g.float().abs(), r.detach().abs(), z.grad.abs(), xr.detach().abs()
    zd = z.detach()
    xhat = (zd - zd.mean(0)) / (zd.var(0, unbiased=False) + ref[1].eps).sqrt()
    checks = [
        Check("output", y, yr, dtype=dtype),
        Check("grad input", x_.grad, xr.grad, bound=agz @ ref[0].weight.detach().abs()),
        Check("grad weight (last Linear)", ours[3].weight.grad, ref[3].weight.grad,
              bound=ag.t() @ ar),
        Check("grad bias (last Linear)", ours[3].bias.grad, ref[3].bias.grad, bound=ag.sum(0)),
        Check("grad weight (BatchNorm)", ours[1].weight.grad, ref[1].weight.grad,
              bound=(b.grad.abs() * xhat.abs()).sum(0)),
        Check("grad bias (BatchNorm)", ours[1].bias.grad, ref[1].bias.grad,
              bound=b.grad.abs().sum(0)),
        Check("grad weight (first Linear)", ours[0].weight.grad, ref[0].weight.grad,
              bound=agz.t() @ ax),
        Check("running_mean", ours[1].running_mean, ref[1].running_mean),
        Check("running_var", ours[1].running_var, ref[1].running_var),
    ]  # fmt: skip
    return checks


def _case_dropout(inp, dtype, sizes, p):

    import fusedmlp.functional as FF

    n, m = sizes["dropout"]
    x = inp.rand(n, m, dtype=dtype, low=0.5, high=2.0)  # no zeros: the mask is out != 0
    x_ = _leaf(x)
    y = FF.dropout(x_, p, training=True)
    g = inp.randn(m, n, dtype=dtype).t()  # other strides than the input
    y.backward(g)
    keep = y.detach() != 0
    scale = 1.0 / (1.0 - p)
    return [
        Check("output (kept = x/(1-p))", y, x.float() * keep * scale, dtype=dtype),
        _keep_rate("keep rate", keep, p),
        Check("grad = g*mask/(1-p)", x_.grad, g.float() * keep * scale),
    ]


def _keep_rate(name: str, kept, p: float) -> Check:
    """The share of ``kept`` (bool, one entry per keep decision) within 5 sigma of ``1 - p``:
    a kernel that never drops, or drops everything, fails it."""
    import torch

    sigma = math.sqrt(p * (1 - p) / kept.numel())
    return Check(
        f"{name} (1-p +- 5 sigma)",
        kept.double().mean(),
        torch.tensor(1.0 - p, dtype=torch.float64),
        rtol=0.0,
        atol=5 * sigma,
    )


def _case_dropout2d(inp, dtype, sizes, p):
    import fusedmlp

    shape = sizes["dropout2d"]
    x = inp.rand(*shape, dtype=dtype, low=0.5, high=2.0)
    mod = fusedmlp.nn.Dropout2d(p)
    x_ = _leaf(x)
    y = mod(x_)
    g = inp.randn(*shape, dtype=dtype)
    y.backward(g)
    keep = y.detach() != 0
    scale = 1.0 / (1.0 - p)
    per_channel = keep.flatten(2)
    kept = per_channel.any(-1)  # one keep decision per (sample, channel)
    return [
        Check("output (kept = x/(1-p))", y, x.float() * keep * scale, dtype=dtype),
        _keep_rate("channel keep rate", kept, p),
        Check(
            "whole channels kept/dropped",
            per_channel.all(-1).double(),
            kept.double(),
            rtol=0.0,
            atol=0.0,
        ),
        Check("grad = g*mask/(1-p)", x_.grad, g.float() * keep * scale),
    ]


def _case_optimizer(inp, dtype, sizes, name, kwargs, steps=3):
    import torch

    import fusedmlp

    ours_cls = {"adam": fusedmlp.optim.Adam, "adamw": fusedmlp.optim.AdamW}.get(
        name, fusedmlp.optim.SGD
    )
    ref_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}.get(name, torch.optim.SGD)
    shapes = sizes["optim"]
    params = [torch.nn.Parameter(inp.randn(*s, dtype=dtype)) for s in shapes]
    ref_params = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    ours = ours_cls(params, **kwargs)
    ref = ref_cls(ref_params, **kwargs)
    for _ in range(steps):
        for p, rp in zip(params, ref_params):
            # |g| in [0.1, 1]: a fp16 exp_avg_sq of a tiny gradient underflows to 0 and the
            # step (lr * m / eps) explodes, in torch.optim's own fp16 state as well.
            g = inp.rand(*p.shape, dtype=torch.float32, low=0.1, high=1.0)
            g = (g * torch.sign(inp.randn(*p.shape, dtype=torch.float32))).to(dtype)
            p.grad = g
            rp.grad = g.float()
        ours.step()
        ref.step()
    checks = []
    for i, (p, rp) in enumerate(zip(params, ref_params)):
        checks.append(Check(f"param{i} after {steps} steps", p, rp, dtype=dtype))
        s, rs = ours.state[p], ref.state[rp]
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
            if key in rs and rs[key] is not None:
                checks.append(Check(f"param{i} {key}", s.get(key), rs[key]))
    return checks


def _cases(sizes, dtypes, full):
    """(op, case, dtype name, thunk(inputs, torch dtype) -> checks).

    ``full``: the whole grid in every dtype. Otherwise (the GPU default: every new constexpr
    variant is one more compilation) the whole grid runs in the first dtype and one case per
    kernel variant family in the others.
    """
    cases = []

    def add(op, case, dt, thunk):
        cases.append((op, case, dt, thunk))

    for dt in dtypes:
        whole = full or dt == dtypes[0]
        acts = ACTIVATIONS if whole else ("relu", "gelu")
        for act in acts:
            add(
                "linear",
                f"act={act}, x transposed",
                dt,
                lambda i, d, a=act: _case_linear(i, d, sizes, a, "2d"),
            )
        add(
            "linear",
            "act=leaky_relu, 3-D sliced x, no bias",
            dt,
            lambda i, d: _case_linear(i, d, sizes, "leaky_relu", "3d"),
        )
        ce_cases = [("mean", False, False, 0.0), ("none", True, True, 0.1)]
        if whole:
            ce_cases += [("sum", True, True, 0.0), ("mean", True, True, 0.2)]
        for red, w, ig, ls in ce_cases:
            case = f"reduction={red}" + (", weight" if w else "") + (", ignore_index" if ig else "")
            case += f", label_smoothing={ls}" if ls else ""
            add(
                "cross_entropy",
                case,
                dt,
                lambda i, d, r=red, w=w, ig=ig, ls=ls: _case_cross_entropy(
                    i, d, sizes, r, w, ig, ls
                ),
            )
        add(
            "cross_entropy",
            "wide rows (several chunks)",
            dt,
            lambda i, d: _case_cross_entropy(i, d, sizes, "mean", False, False, 0.0, True),
        )
        for log in (False, True):
            op = "log_softmax" if log else "softmax"
            for dim in (-1, 1) if whole else (-1,):
                add(
                    op,
                    f"3-D, dim={dim}",
                    dt,
                    lambda i, d, lg=log, dm=dim: _case_softmax(i, d, sizes, lg, dm),
                )
        bn_cases = [
            ("bn1d", 0.1, True, True, False, "1d [N,C], momentum=0.1"),
            ("bn2d", 0.1, True, True, True, "2d channels_last"),
        ]
        if whole:
            bn_cases += [
                ("bn3d", None, False, True, False, "1d [N,C,L], momentum=None, no affine"),
                ("bn2d", 0.1, True, False, False, "2d, no running stats"),
            ]
        for kind, mom, affine, track, cl, label in bn_cases:
            add(
                "batch_norm",
                label,
                dt,
                lambda i, d, k=kind, m=mom, a=affine, t=track, c=cl: _case_batch_norm(
                    i, d, sizes, k, m, a, t, c
                ),
            )
        add("dropout", "p=0.3", dt, lambda i, d: _case_dropout(i, d, sizes, 0.3))
        if dt == "fp32":  # 16-bit intermediates compound through the chain: fp32 only
            add(
                "mlp_block",
                "Linear, BatchNorm1d, ReLU, Linear (fused block)",
                dt,
                lambda i, d: _case_mlp_block(i, d, sizes),
            )
        add("dropout", "Dropout2d p=0.5", dt, lambda i, d: _case_dropout2d(i, d, sizes, 0.5))
        optim_cases = [
            ("adam", dict(lr=1e-2, weight_decay=0.01)),
            ("adamw", dict(lr=1e-2, weight_decay=0.05)),
            ("sgd", dict(lr=1e-2, momentum=0.9, weight_decay=1e-4)),
        ]
        if whole:
            optim_cases += [
                ("adam", dict(lr=1e-2, amsgrad=True, maximize=True)),
                ("sgd", dict(lr=1e-2, momentum=0.9, nesterov=True)),
            ]
        for name, kwargs in optim_cases:
            case = ", ".join(f"{k}={v}" for k, v in kwargs.items())
            add(name, case, dt, lambda i, d, n=name, kw=kwargs: _case_optimizer(i, d, sizes, n, kw))
    return cases


# --------------------------------------------------------------------------------------------
# Output.

_COLUMNS = (
    ("op", 13),
    ("case", 42),
    ("dtype", 5),
    ("tensor", 28),
    ("max abs err", 11),
    ("max rel err", 11),
    ("tolerance", 17),
    ("launches", 8),
    ("result", 6),
)


def _fmt_err(x):
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.2e}"


def _format_row(row: Row) -> str:
    tolerance = "-" if row.rtol is None else f"r{row.rtol:.0e} a{row.atol:.0e}"
    if row.bounded:
        tolerance += "+"
    cells = (
        row.op,
        row.case,
        row.dtype,
        row.tensor,
        _fmt_err(row.max_abs_err),
        _fmt_err(row.max_rel_err),
        tolerance,
        str(row.launches),
        row.result,
    )
    line = "  ".join(c[:w].ljust(w) for c, (_, w) in zip(cells, _COLUMNS)).rstrip()
    if row.note:
        line += f"  ({row.note})"
    return line


def _header() -> str:
    head = "  ".join(name.ljust(w) for name, w in _COLUMNS).rstrip()
    return head + "\n" + "-" * len(head)


def _json_row(row: Row) -> dict:
    """A row for the JSON report: an infinite error (a shape mismatch) as null, since JSON has
    no Infinity (the row's result and note say what went wrong)."""
    out = asdict(row)
    for key in ("max_abs_err", "max_rel_err"):
        if out[key] is not None and not math.isfinite(out[key]):
            out[key] = None
    return out


def _run_cases(cases, ops, inp, interpreted, deadline=None):
    """Run the cases of ``ops`` under backend 'triton', print them; returns the rows and the
    number of cases not started because ``deadline`` (a ``time.perf_counter`` value) passed."""
    import torch

    import fusedmlp

    rows: list[Row] = []
    not_run = 0
    for op, case, dt, thunk in cases:
        if op not in ops:
            continue
        if deadline is not None and time.perf_counter() > deadline:
            not_run += 1
            continue
        dtype = getattr(torch, DTYPE_NAMES[dt])
        rtol, atol = TOLERANCES[dt]
        counter = _LaunchCounter(interpreted)
        try:
            with fusedmlp.use_backend("triton"), counter:
                checks = thunk(inp, dtype)
        except Exception as exc:  # an op that raises is a failure of verify, not a crash
            msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            row = Row(op, case, dt, "-", None, None, None, None, counter.count, "ERROR", msg)
            rows.append(row)
            print(_format_row(row), flush=True)
            continue
        for check in checks:
            r = rtol if check.rtol is None else check.rtol
            a = atol if check.atol is None else check.atol
            if check.actual is None:
                abs_err = rel_err = None
                ok, note = False, "fusedmlp produced no tensor (torch did)"
            else:
                abs_err, rel_err, ok, note = _compare(check, r, a)
            if counter.count == 0:
                ok = False
                note = "; ".join(filter(None, [note, "no Triton kernel launched"]))
            row = Row(
                op,
                case,
                dt,
                check.name,
                abs_err,
                rel_err,
                r,
                a,
                counter.count,
                "PASS" if ok else "FAIL",
                note,
                check.bound is not None,
            )
            rows.append(row)
            print(_format_row(row), flush=True)
    return rows, not_run


def _refuse(message: str) -> int:
    """A usage error, before any case runs: said on stderr (stdout carries the report), and
    exit status 2, as argparse's."""
    print(message, file=sys.stderr)
    return 2


def run(args) -> int:
    start = time.perf_counter()
    import torch

    # '' is not "the default": torch.device('') refuses it, as it must here
    device = args.device
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device_type = torch.device(device).type
    except RuntimeError as e:
        return _refuse(f"fusedmlp verify: bad --device {device!r}: {e}")
    if device_type == "cuda" and not torch.cuda.is_available():
        return _refuse(
            f"fusedmlp verify: --device {device} asked for, but no CUDA device is available"
        )
    if device_type not in ("cpu", "cuda"):
        return _refuse(f"fusedmlp verify: unsupported device {device!r} (cpu or cuda)")
    error = _setup_interpreter(device_type)
    if error:
        return _refuse(error)

    budget = args.time_budget
    if budget is not None and not (math.isfinite(budget) and budget >= 0):
        return _refuse(
            f"fusedmlp verify: --time-budget must be a finite number of seconds >= 0, got {budget}"
        )

    dtypes = list(dict.fromkeys(d.strip() for d in args.dtypes.split(",") if d.strip()))
    bad = [d for d in dtypes if d not in DTYPE_NAMES]
    ops = list(dict.fromkeys(o.strip() for o in args.ops.split(",") if o.strip()))
    bad_ops = [o for o in ops if o not in OPS]
    if bad or bad_ops or not dtypes or not ops:
        return _refuse(
            f"fusedmlp verify: unknown dtypes {bad} or ops {bad_ops}: "
            f"dtypes among {', '.join(DTYPE_NAMES)}; ops among {', '.join(OPS)}"
        )
    # an op asked for that has no case in these dtypes (mlp_block: fp32 only) would be left out
    # of a run that passes without a word
    covered = {op for op, _, _, _ in _cases(_sizes(device_type), dtypes, True)}
    uncovered = [o for o in ops if o not in covered]
    if uncovered:
        return _refuse(
            f"fusedmlp verify: no case of {', '.join(uncovered)} in dtypes {', '.join(dtypes)} "
            "(mlp_block is verified in fp32 only): add fp32 to --dtypes"
        )
    if args.json is not None:  # checked before the cases run, not after them
        problem = output_path_problem(args.json)
        if problem is not None:
            return _refuse(f"fusedmlp verify: cannot write {args.json}: {problem}")

    import triton

    import fusedmlp

    from ..kernels.launch import interpreter_active

    interpreted = interpreter_active()
    if device_type == "cpu" and not interpreted:  # pragma: no cover - guarded above
        return _refuse("fusedmlp verify: Triton's interpreter could not be enabled for CPU tensors")

    full = args.full or device_type == "cpu"
    first_config = device_type == "cuda" and not args.autotune
    if device_type == "cuda":
        where = f"{device} ({torch.cuda.get_device_name(torch.device(device))}), compiled kernels"
        where += (
            ", first GPU configuration of each kernel (--autotune to tune)"
            if first_config
            else ", autotuned"
        )
    else:
        where = (
            "cpu: no CUDA device, so the Triton kernels run under Triton's interpreter "
            "(TRITON_INTERPRET=1) at small sizes"
        )
    print(
        f"fusedmlp verify {fusedmlp.__version__}: torch {torch.__version__}, triton "
        f"{triton.__version__}"
    )
    print(f"device: {where}")
    print(f"reference: torch in float32 from the same inputs; dtypes: {', '.join(dtypes)}")
    print()
    print(_header())
    sys.stdout.flush()

    sizes = _sizes(device_type)
    inp = _Inputs(device, args.seed)
    with (
        warnings.catch_warnings(),
        _first_config_only() if first_config else contextlib.nullcontext(),
    ):
        if interpreted:  # numpy warns about masked-off lanes (log(0), x/0), never stored
            warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime")
        deadline = None if budget is None else start + budget
        rows, not_run = _run_cases(_cases(sizes, dtypes, full), ops, inp, interpreted, deadline)

    elapsed = time.perf_counter() - start
    failed = [r for r in rows if r.result != "PASS"]
    passed = bool(rows) and not failed  # nothing verified (a spent --time-budget) fails too
    print()
    if any(r.bounded for r in rows):
        print(
            "tolerance r/a: |a - e| <= atol + rtol |e|; '+': plus 2 eps(dtype) x the sum of the "
            "reduction's |terms| (its rounding bound)"
        )
    print(
        f"{len(rows)} checks, {len(rows) - len(failed)} passed, {len(failed)} failed "
        f"({elapsed:.1f} s on {device}{', interpreted' if interpreted else ''})"
    )
    if not_run:
        print(
            f"INCOMPLETE: {not_run} cases not run (--time-budget {budget:g} s); the "
            "exit status covers the checks above"
        )
    if failed:
        names = sorted({f"{r.op} [{r.case}, {r.dtype}]" for r in failed})
        more = f"; and {len(names) - 12} more" if len(names) > 12 else ""
        print("FAILED: " + "; ".join(names[:12]) + more)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": device,
                    "interpreted": interpreted,
                    "full_grid": full,
                    "autotuned": device_type == "cuda" and not first_config,
                    "torch": torch.__version__,
                    "triton": triton.__version__,
                    "elapsed_s": elapsed,
                    "passed": passed,
                    "complete": not not_run,
                    "cases_not_run": not_run,
                    "rows": [_json_row(r) for r in rows],
                },
                f,
                indent=1,
                allow_nan=False,
            )
    return 0 if passed else 1
