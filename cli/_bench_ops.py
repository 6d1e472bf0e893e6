"""What ``fusedmlp bench`` measures: byte and FLOP counts per op, and the benchmark cases.

The byte counts are the *compulsory* traffic of a fused implementation (what a kernel must read
and write at least once), so ``achieved GB/s / measured copy GB/s`` says how close an
implementation is to the memory roofline. Every implementation of an op (fusedmlp, torch
eager, torch.compile) is scored against the same counts. ``s`` is the element size in bytes.

A case is built lazily (tensors are only allocated when it runs) and returns a ``Prepared``:
the callable to time and the tensors whose ``.grad`` is reset between timed calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Byte and FLOP counts, written once. M rows, N output features, K input features, C classes or
# channels, n elements, P parameters, s bytes per element.
# ---------------------------------------------------------------------------------------------


def linear_fwd_bytes(M: int, N: int, K: int, s: int) -> int:
    # s(MK + NK + MN + N): read X [M, K], W [N, K] and bias [N]; write Y [M, N] (activation fused)
    return s * (M * K + N * K + M * N + N)


def linear_fwd_flops(M: int, N: int, K: int) -> int:
    # 2MNK: one multiply-add per (m, n, k)
    return 2 * M * N * K


def linear_bwd_bytes(M: int, N: int, K: int, s: int) -> int:
    # s(2MN + 2MK + 2NK): read dY and the saved activation output [M, N]; read X and write dX
    # [M, K]; read W and write dW [N, K] (the bias gradient, N elements, is neglected)
    return s * (2 * M * N + 2 * M * K + 2 * N * K)


def linear_bwd_flops(M: int, N: int, K: int) -> int:
    # 4MNK: dX = dY @ W (2MNK) and dW = dY^T @ X (2MNK)
    return 4 * M * N * K


def cross_entropy_bytes(M: int, C: int, s: int) -> int:
    # 3sMC, forward + backward: read the logits [M, C] in the forward, read them again in the
    # backward and write dlogits [M, C] (targets and per-row statistics are negligible)
    return 3 * s * M * C


def batchnorm_fwd_bytes(N: int, C: int, s: int) -> int:
    # 3sNC, two-pass training forward: read x for the statistics, read x again to normalise,
    # write y
    return 3 * s * N * C


def batchnorm_bwd_bytes(N: int, C: int, s: int) -> int:
    # 5sNC, two-pass backward: read x and dy for the two reductions, read both again and write dx
    return 5 * s * N * C


def dropout_bytes(n: int, s: int) -> int:
    # 2s per element per direction: forward reads x and writes y; backward reads dy and writes
    # dx (the mask is regenerated from the seed, never stored)
    return 2 * s * n


def adam_bytes(P: int) -> int:
    # 28 B per fp32 parameter: read param, grad, exp_avg, exp_avg_sq (16 B); write param,
    # exp_avg, exp_avg_sq (12 B). Adam and AdamW alike.
    return 28 * P


def sgd_momentum_bytes(P: int) -> int:
    # 20 B per fp32 parameter: read param, grad, momentum buffer (12 B); write param and
    # momentum buffer (8 B)
    return 20 * P


def mlp_step_counts(batch: int, in_features: int, width: int, depth: int, classes: int, s: int):
    """(bytes, flops) of one training step of ``depth`` x [Linear-BN-ReLU-Dropout] + Linear,
    cross-entropy and Adam: the sum of the per-op counts above (the ReLU is taken as fused, so
    the byte count is a lower bound). FLOPs: 6 * B * in * out per Linear (forward + backward)."""
    dims = [in_features] + [width] * depth + [classes]
    nbytes = flops = params = 0
    for k, n in zip(dims[:-1], dims[1:]):
        nbytes += linear_fwd_bytes(batch, n, k, s) + linear_bwd_bytes(batch, n, k, s)
        flops += linear_fwd_flops(batch, n, k) + linear_bwd_flops(batch, n, k)
        params += n * k + n
    nbytes += depth * (
        batchnorm_fwd_bytes(batch, width, s)
        + batchnorm_bwd_bytes(batch, width, s)
        + 2 * dropout_bytes(batch * width, s)
    )
    params += depth * 2 * width
    nbytes += cross_entropy_bytes(batch, classes, s) + adam_bytes(params)
    return nbytes, flops


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------

OPS = (
    "linear",
    "cross_entropy",
    "batchnorm",
    "dropout",
    "adam",
    "adamw",
    "sgd",
    "mlp_step",
    "mlp_small",
)
OP_TITLES = {
    "linear": "linear + ReLU",
    "cross_entropy": "cross-entropy",
    "batchnorm": "batch norm (training)",
    "dropout": "dropout (p = 0.5)",
    "adam": "Adam (fp32)",
    "adamw": "AdamW (fp32)",
    "sgd": "SGD, momentum 0.9 (fp32)",
    "mlp_step": "full MLP training step: 4 x [Linear-BN-ReLU-Dropout] + Linear, cross-entropy, Adam",
    "mlp_small": "small MLP training step, wall time per call (launch overhead)",
}
IMPL_ORDER = ("fusedmlp", "torch", "torch.fused", "torch.compile")
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
MLP_CLASSES = 10
MLP_DEPTH = 4
MLP_DROPOUT = 0.1


@dataclass
class Prepared:
    fn: Callable[[], object]
    grad_to_none: list = field(default_factory=list)
    backend: str = ""


@dataclass
class Case:
    op: str
    pass_: str
    shape: str
    dtype: str
    impl: str
    build: Callable[[], Prepared]
    nbytes: float | None = None
    flops: float | None = None
    tier: float = 1  # run order under a time budget, lowest first
    wall: bool = False  # time as wall clock per call, synchronised only around a block of calls
    graph: bool = False  # time as replays of a CUDA graph of back-to-back calls (no host time)
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    note: str = ""
    order: tuple = ()


def _fused_backend(*tensors) -> str:
    from ..backend import use_triton

    return "triton" if use_triton(*tensors) else "fallback"


def _impl_backend(impl: str, *tensors) -> str:
    if impl == "fusedmlp":
        return _fused_backend(*tensors)
    return {"torch": "eager", "torch.fused": "fused", "torch.compile": "inductor"}[impl]


def _compile(fn):
    from torch import _dynamo

    _dynamo.reset()  # a fresh cache per case: no silent fall-back after 8 recompiles
    return torch.compile(fn, dynamic=False)


def _pick(impl: str, fused, eager):
    if impl == "fusedmlp":
        return fused
    if impl == "torch.compile":
        return _compile(eager)
    return eager


# --- linear + ReLU ---------------------------------------------------------------------------


def _linear_ops():
    from ..functional import linear

    return (
        lambda x, w, b: linear(x, w, b, activation="relu"),
        lambda x, w, b: F.relu(F.linear(x, w, b)),
    )


def build_linear(impl, device, dtype, M, N, K, backward):
    def build():
        fused, eager = _linear_ops()
        fn = _pick(impl, fused, eager)
        x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(N, K, device=device, dtype=dtype) / K**0.5).requires_grad_()
        b = torch.randn(N, device=device, dtype=dtype, requires_grad=True)
        backend = _impl_backend(impl, x, w, b)
        if not backward:
            return Prepared(lambda: fn(x, w, b), backend=backend)
        y = fn(x, w, b)
        dy = torch.randn_like(y)
        return Prepared(lambda: y.backward(dy, retain_graph=True), [x, w, b], backend)

    return build


# --- cross-entropy ---------------------------------------------------------------------------


def build_cross_entropy(impl, device, dtype, M, C):
    def build():
        from ..functional import cross_entropy

        fn = _pick(impl, cross_entropy, F.cross_entropy)
        logits = torch.randn(M, C, device=device, dtype=dtype, requires_grad=True)
        target = torch.randint(0, C, (M,), device=device)

        def step():
            fn(logits, target).backward()

        return Prepared(step, [logits], _impl_backend(impl, logits))

    return build


# --- batch norm ------------------------------------------------------------------------------


def build_batchnorm(impl, device, dtype, N, C, backward):
    def build():
        from ..functional import batch_norm

        fn = _pick(impl, batch_norm, F.batch_norm)
        x = torch.randn(N, C, device=device, dtype=dtype, requires_grad=True)
        w = torch.rand(C, device=device, dtype=dtype).add_(0.5).requires_grad_()
        b = torch.randn(C, device=device, dtype=dtype, requires_grad=True)
        rm = torch.zeros(C, device=device, dtype=dtype)
        rv = torch.ones(C, device=device, dtype=dtype)
        backend = _impl_backend(impl, x, w, b)

        def fwd():
            return fn(x, rm, rv, w, b, True, 0.1, 1e-5)

        if not backward:
            return Prepared(fwd, backend=backend)
        y = fwd()
        dy = torch.randn_like(y)
        return Prepared(lambda: y.backward(dy, retain_graph=True), [x, w, b], backend)

    return build


# --- dropout ---------------------------------------------------------------------------------


def build_dropout(impl, device, dtype, rows, cols, backward):
    def build():
        from ..functional import dropout

        fn = _pick(impl, dropout, F.dropout)
        x = torch.randn(rows, cols, device=device, dtype=dtype, requires_grad=True)
        backend = _impl_backend(impl, x)
        if not backward:
            return Prepared(lambda: fn(x, 0.5, True), backend=backend)
        y = fn(x, 0.5, True)
        dy = torch.randn_like(y)
        return Prepared(lambda: y.backward(dy, retain_graph=True), [x], backend)

    return build


# --- optimizers ------------------------------------------------------------------------------


def _params(device, P, T):
    sizes = [P // T + (1 if i < P % T else 0) for i in range(T)]
    params = [torch.randn(n, device=device, requires_grad=True) for n in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def build_optimizer(impl, device, name, P, T):
    def build():
        from .. import optim as fo

        params = _params(device, P, T)
        kwargs = {"lr": 1e-3}
        if name == "sgd":
            kwargs.update(momentum=0.9)
        if name == "adamw":
            kwargs.update(weight_decay=1e-2)
        cls = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}[name]
        if impl == "fusedmlp":
            opt = getattr(fo, cls)(params, **kwargs)
            backend = _fused_backend(*params[:1])
        else:
            if impl == "torch.fused":
                kwargs["fused"] = True
            opt = getattr(torch.optim, cls)(params, **kwargs)
            backend = _impl_backend(impl)
        if impl != "torch.compile":
            return Prepared(opt.step, backend=backend)
        from torch import _dynamo

        _dynamo.reset()

        @torch.compile(fullgraph=False)
        def compiled_step():
            opt.step()

        return Prepared(compiled_step, backend=backend)

    return build


# --- MLP training step -----------------------------------------------------------------------


def _torch_mlp(in_features, width, depth, classes, dropout):
    layers = []
    d = in_features
    for _ in range(depth):
        layers += [
            torch.nn.Linear(d, width),
            torch.nn.BatchNorm1d(width),
            torch.nn.ReLU(),
            torch.nn.Dropout(dropout),
        ]
        d = width
    layers.append(torch.nn.Linear(d, classes))
    return torch.nn.Sequential(*layers)


def build_mlp_step(impl, device, batch, width, depth=MLP_DEPTH, classes=MLP_CLASSES,
                   capturable=False):  # fmt: skip
    """``capturable``: the optimizers built for CUDA-graph capture (``capturable=True``, fusedmlp
    and torch alike; torch.compile's fused Adam too): a graph case (``Case.graph``)."""
    extra = {"capturable": True} if capturable else {}

    def build():
        x = torch.randn(batch, width, device=device)
        y = torch.randint(0, classes, (batch,), device=device)
        if impl == "fusedmlp":
            from .. import nn as fnn
            from .. import optim as fo

            model = fnn.MLP(
                width,
                [width] * depth,
                classes,
                activation="relu",
                batchnorm=True,
                dropout=MLP_DROPOUT,
            ).to(device)
            loss_fn = fnn.CrossEntropyLoss()
            opt = fo.Adam(model.parameters(), lr=1e-3, **extra)
            backend = _fused_backend(x)
        else:
            model = _torch_mlp(width, width, depth, classes, MLP_DROPOUT).to(device)
            loss_fn = torch.nn.CrossEntropyLoss()
            fused = impl == "torch.compile" and x.is_cuda
            opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused or None, **extra)
            backend = _impl_backend(impl)
        model.train()

        def forward(x, y):
            return loss_fn(model(x), y)

        if impl == "torch.compile":
            forward = _compile(forward)

        def step():
            opt.zero_grad(set_to_none=True)
            forward(x, y).backward()
            opt.step()

        return Prepared(step, backend=backend)

    return build


@contextlib.contextmanager
def _tf32():
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


# --- shapes ----------------------------------------------------------------------------------


def shape_table(cuda: bool, quick: bool) -> dict:
    """The shapes per op. GPU quick: the headline shapes of the issue only."""
    if cuda and quick:
        return dict(
            linear=[(8192, 8192, 8192), (16384, 256, 256)],
            cross_entropy=[(16384, 32768)],
            batchnorm=[(65536, 1024)],
            dropout=[(65536, 1024)],  # 64M elements
            optim=[(50_000_000, 100)],
            mlp_step=[(16384, 1024), (65536, 128), (65536, 64)],
            mlp_small=(256, [64, 1024, 16384]),
        )
    if cuda:
        return dict(
            linear=[
                (8192, 8192, 8192),
                (4096, 4096, 4096),
                (16384, 1024, 1024),
                (16384, 256, 256),
                (65536, 128, 128),
                (65536, 64, 64),
            ],
            cross_entropy=[(16384, 32768), (16384, 1024), (4096, 128256)],
            batchnorm=[(65536, 1024), (65536, 256), (16384, 64)],
            dropout=[(65536, 1024), (4096, 1024)],
            optim=[(50_000_000, 100), (1_000_000, 1000), (1_000_000, 20)],
            mlp_step=[(16384, 1024), (65536, 128), (65536, 64)],
            mlp_small=(256, [16, 64, 256, 1024, 4096, 16384, 65536]),
        )
    if quick:  # CPU: tiny shapes, the whole run in seconds
        return dict(
            linear=[(256, 256, 256), (1024, 64, 64)],
            cross_entropy=[(512, 1000)],
            batchnorm=[(4096, 256)],
            dropout=[(1024, 1024)],
            optim=[(200_000, 10)],
            mlp_step=[(1024, 64)],
            mlp_small=(64, [32, 512]),
        )
    return dict(
        linear=[(1024, 1024, 1024), (4096, 256, 256)],
        cross_entropy=[(4096, 1000)],
        batchnorm=[(16384, 256)],
        dropout=[(4096, 1024)],
        optim=[(10_000_000, 100)],
        mlp_step=[(4096, 256), (16384, 64)],
        mlp_small=(64, [16, 64, 256, 1024, 4096]),
    )


def _si(n: int) -> str:
    """50000000 -> '50M', 67108864 -> '64Mi'."""
    for unit, div in (("G", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    for unit, div in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def _note(op: str, impl: str, note: str, cuda: bool) -> str:
    """What each baseline is, where it is not obvious."""
    extra = ""
    if op in ("mlp_step", "mlp_small"):
        extra = {
            "fusedmlp": "fusedmlp.nn.MLP + CrossEntropyLoss + optim.Adam",
            "torch": "torch.nn modules + torch.optim.Adam (default: foreach on CUDA)",
            "torch.compile": "torch.compile(model + loss), torch.optim.Adam"
            + ("(fused=True)" if cuda else ""),
        }.get(impl, "")
    elif op in ("adam", "adamw", "sgd"):
        extra = {
            "torch": "torch.optim default (foreach on CUDA, for-loop on CPU)",
            "torch.fused": "torch.optim fused=True",
            "torch.compile": "torch.compile of torch.optim's step",
        }.get(impl, "")
    return "; ".join(x for x in (note, extra) if x)


def _tier(op: str, impl: str, base: float) -> float:
    """Run order under a time budget: fusedmlp and eager torch first, then the small-MLP sweep,
    then the full-step torch.compile baseline, then the other torch.compile baselines."""
    if impl == "torch.compile":
        return 2.5 if op == "mlp_step" else 3
    return base


def make_cases(device: torch.device, quick: bool, ops, compile_: bool) -> list[Case]:
    """Every case of ``ops`` on ``device``; torch.compile baselines only when ``compile_``."""
    cuda = device.type == "cuda"
    table = shape_table(cuda, quick)
    low = torch.bfloat16 if cuda else torch.float32  # CPU: fp32 (bf16 GEMMs crawl there)
    impls = ["fusedmlp", "torch"] + (["torch.compile"] if compile_ else [])
    cases: list[Case] = []

    def add(op, pass_, shape, dtype, builder, nbytes=None, flops=None, **kw):
        for impl in impls + (["torch.fused"] if op in ("adam", "adamw", "sgd") and cuda else []):
            # compile after everything else under a time budget; quick GPU skips optimizer
            # compiles (tens of seconds each for 100 tensors)
            if impl == "torch.compile" and quick and op in ("adam", "adamw", "sgd", "mlp_small"):
                continue
            cases.append(
                Case(
                    op,
                    pass_,
                    shape,
                    dtype if isinstance(dtype, str) else DTYPE_NAMES[dtype],
                    impl,
                    builder(impl),
                    nbytes,
                    flops,
                    tier=_tier(op, impl, kw.get("base_tier", 1)),
                    wall=kw.get("wall", False),
                    context=kw.get("context", contextlib.nullcontext),
                    note=_note(op, impl, kw.get("note", ""), cuda),
                    order=(OPS.index(op), len(cases)),
                )
            )

    s_low = torch.finfo(low).bits // 8
    if "linear" in ops:
        for M, N, K in table["linear"]:
            shape = f"M={M} N={N} K={K}"
            for bwd in (False, True):
                add(
                    "linear",
                    "bwd" if bwd else "fwd",
                    shape,
                    low,
                    lambda impl, M=M, N=N, K=K, bwd=bwd: build_linear(
                        impl, device, low, M, N, K, bwd
                    ),
                    (linear_bwd_bytes if bwd else linear_fwd_bytes)(M, N, K, s_low),
                    (linear_bwd_flops if bwd else linear_fwd_flops)(M, N, K),
                )
    if "cross_entropy" in ops:
        for M, C in table["cross_entropy"]:
            add(
                "cross_entropy",
                "fwd+bwd",
                f"M={M} C={C}",
                low,
                lambda impl, M=M, C=C: build_cross_entropy(impl, device, low, M, C),
                cross_entropy_bytes(M, C, s_low),
            )
    if "batchnorm" in ops:
        for N, C in table["batchnorm"]:
            for bwd in (False, True):
                add(
                    "batchnorm",
                    "bwd" if bwd else "fwd",
                    f"N={N} C={C}",
                    low,
                    lambda impl, N=N, C=C, bwd=bwd: build_batchnorm(impl, device, low, N, C, bwd),
                    (batchnorm_bwd_bytes if bwd else batchnorm_fwd_bytes)(N, C, s_low),
                )
    if "dropout" in ops:
        for rows, cols in table["dropout"]:
            for bwd in (False, True):
                add(
                    "dropout",
                    "bwd" if bwd else "fwd",
                    f"n={_si(rows * cols)} ({rows}x{cols})",
                    low,
                    lambda impl, r=rows, c=cols, bwd=bwd: build_dropout(
                        impl, device, low, r, c, bwd
                    ),
                    dropout_bytes(rows * cols, s_low),
                )
    for name in ("adam", "adamw", "sgd"):
        if name in ops:
            for P, T in table["optim"]:
                add(
                    name,
                    "step",
                    f"P={_si(P)} in {T} tensors",
                    torch.float32,
                    lambda impl, name=name, P=P, T=T: build_optimizer(impl, device, name, P, T),
                    (sgd_momentum_bytes if name == "sgd" else adam_bytes)(P),
                )
    tf32 = "fp32 (tf32)" if cuda else "fp32"
    scaled = "" if cuda else "CPU: scaled-down shape"
    if "mlp_step" in ops:
        for batch, width in table["mlp_step"]:
            nbytes, flops = mlp_step_counts(batch, width, width, MLP_DEPTH, MLP_CLASSES, 4)
            add(
                "mlp_step",
                "step",
                f"width={width} B={batch}",
                tf32,
                lambda impl, b=batch, w=width: build_mlp_step(impl, device, b, w),
                nbytes,
                flops,
                context=_tf32,
                note=scaled,
            )
    if "mlp_small" in ops:
        width, batches = table["mlp_small"]
        for batch in batches:
            nbytes, flops = mlp_step_counts(batch, width, width, MLP_DEPTH, MLP_CLASSES, 4)
            add(
                "mlp_small",
                "step (wall)",
                f"width={width} B={batch}",
                tf32,
                lambda impl, b=batch, w=width: build_mlp_step(impl, device, b, w),
                nbytes,
                flops,
                wall=True,
                context=_tf32,
                base_tier=2,
            )
    return cases
