"""Differential fuzzing against torch: hypothesis draws shapes, dtypes, strides and options.

Every property compares fusedmlp (both backends) with torch's own implementation computed in
float32 from exactly the same (already rounded) inputs, with the dtype's tolerance from
conftest. Shapes are tiny (1, primes, odd sizes) because the Triton path runs under the
interpreter on CPU; the example budget is bounded and derandomised, so a run is reproducible
and the file stays well inside the suite's time budget.

A wider search: ``FUSEDMLP_FUZZ_SCALE=30 pytest tests/test_fuzz.py`` multiplies every example
budget by 30 and draws new examples on every run (not derandomised); a few minutes on 2 cores.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, TOLERANCES, assert_close
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import fusedmlp
import fusedmlp.functional as FF

SCALE = int(os.environ.get("FUSEDMLP_FUZZ_SCALE", "1"))
FUZZ = settings(
    max_examples=8 * SCALE,
    derandomize=SCALE == 1,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure reports at once
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,  # `launches` is read as deltas per example
    ],
)

BACKENDS = pytest.mark.parametrize("backend_name", ["torch", "triton"])
SIZES = st.sampled_from([1, 2, 3, 5, 7, 13, 17, 31])
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
LAYOUTS = st.sampled_from(["contiguous", "transposed", "sliced", "expanded"])


def _make(shape, dtype, layout, gen, scale=1.0, low=None):
    """A tensor of ``shape`` with the given memory layout (values drawn from ``gen``)."""
    shape = tuple(shape)

    def draw(s):
        if low is not None:
            t = torch.rand(s, generator=gen) * scale + low
        else:
            t = torch.randn(s, generator=gen) * scale
        return t.to(dtype).to(DEVICE)

    if layout == "transposed" and len(shape) >= 2:
        t = draw(shape[:-2] + (shape[-1], shape[-2])).transpose(-1, -2)
    elif layout == "sliced":
        t = draw(shape[:-1] + (2 * shape[-1],))[..., ::2]
    elif layout == "expanded" and len(shape) >= 2:
        t = draw((1,) + shape[1:]).expand(shape)
    else:
        t = draw(shape)
    assert t.shape == shape
    return t


class _Ran:
    """Asserts that the block launched Triton kernels under backend 'triton', none under 'torch'."""

    def __init__(self, launches, backend_name, kernels=True):
        self.launches, self.backend_name = launches, backend_name
        self.kernels = kernels  # False: an op that is torch's on every backend (nll_loss)

    def __enter__(self):
        self.before = self.launches.total
        self.ctx = fusedmlp.use_backend(self.backend_name)
        self.ctx.__enter__()

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)
        if exc[0] is None:
            ran = self.launches.total - self.before
            expected = self.kernels and self.backend_name == "triton"
            assert (ran > 0) == expected, (self.backend_name, ran)


def _check(actual, expected, dtype, scale=1.0, bound=None, computed_in=None):
    """fusedmlp's result against torch's fp32 reference with ``dtype``'s tolerance.

    ``bound``: for a reduction, the sum of the magnitudes of its terms (``|A| @ |B|``): the
    result may also be off by a few units of the rounding of that sum (the standard
    floating-point bound) in the precision it is ``computed_in`` (default ``dtype``), e.g. a
    bf16 gradient whose terms cancel to a small value.
    """
    assert actual is not None
    if bound is not None:
        eps = torch.finfo(computed_in or dtype).eps
        rtol, atol = TOLERANCES[dtype]
        allowed = atol + rtol * expected.float().abs() + 2 * eps * bound.float()
        err = (actual.float() - expected.float()).abs()
        assert bool((err <= allowed).all()), (
            f"max error {float(err.max()):.3g}, worst excess {float((err - allowed).max()):.3g}"
        )
        return
    assert_close(actual.float(), expected.float(), dtype=dtype, scale=scale, equal_nan=True)


def _act(z, activation, slope):
    if activation is None:
        return z
    if activation == "leaky_relu":
        return F.leaky_relu(z, slope)
    return {
        "relu": F.relu,
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "gelu": F.gelu,
        "silu": F.silu,
    }[activation](z)


# ---------------------------------------------------------------------------------------------
# Linear with every activation.


@BACKENDS
@settings(FUZZ, max_examples=12 * SCALE)
@given(
    lead=st.sampled_from([(), (1,), (3,), (2, 1)]),
    m=SIZES,
    k=SIZES,
    n=SIZES,
    activation=st.sampled_from([None, "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "silu"]),
    slope=st.sampled_from([0.01, 0.2]),
    bias=st.booleans(),
    dtype=DTYPES,
    x_layout=LAYOUTS,
    w_layout=st.sampled_from(["contiguous", "transposed"]),
    g_layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
    seed=st.integers(0, 2**16),
)
def test_linear_fuzz(
    launches,
    backend_name,
    lead,
    m,
    k,
    n,
    activation,
    slope,
    bias,
    dtype,
    x_layout,
    w_layout,
    g_layout,
    seed,
):
    gen = torch.Generator().manual_seed(seed)
    x = _make((*lead, m, k), dtype, x_layout, gen).requires_grad_()
    w = _make((n, k), dtype, w_layout, gen, scale=k**-0.5).requires_grad_()
    b = _make((n,), dtype, "contiguous", gen, scale=0.5).requires_grad_() if bias else None
    with _Ran(launches, backend_name):
        y = FF.linear(x, w, b, activation=activation, negative_slope=slope)
    assert y.dtype == dtype and y.shape == (*lead, m, n)
    g = _make((*lead, m, n), dtype, g_layout, gen)
    y.backward(g)

    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    br = b.detach().float().requires_grad_() if bias else None
    zr = F.linear(xr, wr, br)
    yr = _act(zr, activation, slope)
    if activation in ("relu", "leaky_relu"):
        # The derivative of a piecewise-linear activation is the side of 0 that the output is on
        # (torch's relu backward reads its output too). Where the exact pre-activation is within
        # the 16-bit rounding of 0, an implementation's output may sit on the other side (torch's
        # own bf16 F.linear rounds x @ w before adding the bias): the reference backward takes the
        # side from the implementation's output; the output itself is checked against yr below.
        side = y.detach().float() > 0
        slope_ = slope if activation == "leaky_relu" else 0.0
        zr.backward(g.float() * torch.where(side, 1.0, slope_))
    else:
        yr.backward(g.float())
    # Error bounds of the reductions: the activation derivative of a 16-bit output is exact
    # only to the output's rounding (torch's own bf16 backward has the same error).
    ax, aw, ag = xr.detach().abs(), wr.detach().abs(), g.float().abs()
    _check(y, yr, dtype)
    _check(x.grad, xr.grad, dtype, bound=ag @ aw)
    _check(w.grad, wr.grad, dtype, bound=ag.reshape(-1, n).t() @ ax.reshape(-1, k))
    if bias:
        _check(b.grad, br.grad, dtype, bound=ag.reshape(-1, n).sum(0))


# ---------------------------------------------------------------------------------------------
# Cross-entropy / NLL with every option.


@BACKENDS
@settings(FUZZ, max_examples=12 * SCALE)
@given(
    n=SIZES,
    c=st.sampled_from([1, 2, 3, 7, 31, 67, 131]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    ignore=st.sampled_from(["default", "in-range", "all"]),
    smoothing=st.sampled_from([0.0, 0.1, 0.5]),
    weighted=st.booleans(),
    nll=st.booleans(),
    dtype=DTYPES,
    layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
    seed=st.integers(0, 2**16),
)
def test_cross_entropy_fuzz(
    launches, backend_name, n, c, reduction, ignore, smoothing, weighted, nll, dtype, layout, seed
):
    gen = torch.Generator().manual_seed(seed)
    logits = _make((n, c), dtype, layout, gen, scale=3.0)
    if nll:  # nll_loss takes log-probabilities (label smoothing is cross-entropy only)
        logits = torch.log_softmax(logits.float(), dim=1).to(dtype)
        smoothing = 0.0
    target = torch.randint(0, c, (n,), generator=gen).to(DEVICE)
    ignore_index = -100
    if ignore == "in-range":
        ignore_index = int(target[0])
        target[n // 2 :: 2] = ignore_index
    elif ignore == "all":
        target[:] = ignore_index
    weight = (torch.rand(c, generator=gen) + 0.5).to(dtype).to(DEVICE) if weighted else None
    x = logits.detach().requires_grad_()
    kw = dict(reduction=reduction, ignore_index=ignore_index)
    if not nll:
        kw["label_smoothing"] = smoothing
    with _Ran(launches, backend_name, kernels=not nll):
        fn = FF.nll_loss if nll else FF.cross_entropy
        loss = fn(x, target, weight, **kw)
    assert loss.dtype == dtype
    g = (torch.randn(loss.shape, generator=gen) + 1).to(dtype).to(DEVICE)
    loss.backward(g)

    xr = logits.detach().float().requires_grad_()
    wr = weight.float() if weighted else None
    ref_fn = F.nll_loss if nll else F.cross_entropy
    ref = ref_fn(xr, target, wr, **kw)
    ref.backward(g.float())
    _check(loss, ref, dtype)
    _check(x.grad, xr.grad, dtype)


# ---------------------------------------------------------------------------------------------
# Softmax / log-softmax over any dim of any layout.


@BACKENDS
@settings(FUZZ, max_examples=6 * SCALE)
@given(
    shape=st.sampled_from([(1, 7), (5, 1), (3, 5, 31), (2, 13, 3), (67,)]),
    dim=st.integers(-3, 2),
    log=st.booleans(),
    dtype=DTYPES,
    layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
    seed=st.integers(0, 2**16),
)
def test_softmax_fuzz(launches, backend_name, shape, dim, log, dtype, layout, seed):
    dim = dim if -len(shape) <= dim < len(shape) else -1
    gen = torch.Generator().manual_seed(seed)
    x = _make(shape, dtype, layout, gen, scale=3.0).requires_grad_()
    with _Ran(launches, backend_name):
        y = (FF.log_softmax if log else FF.softmax)(x, dim)
    assert y.dtype == dtype
    g = _make(shape, dtype, "contiguous", gen)
    y.backward(g)
    xr = x.detach().float().requires_grad_()
    yr = (torch.log_softmax if log else torch.softmax)(xr, dim)
    yr.backward(g.float())
    _check(y, yr, dtype)
    _check(x.grad, xr.grad, dtype)


# ---------------------------------------------------------------------------------------------
# BatchNorm1d / BatchNorm2d with every option, several steps.


def _bn_bounds(x, g, weight, eps, running=None):
    """Magnitudes of the terms of batch norm's output and gradients, for ``_check``'s bound:
    ``(y, dx, dw, db)``.

    With batch statistics ``dx = w * invstd * (g - mean(g) - xhat * mean(g * xhat))`` cancels
    (to nothing for a batch of 2) and ``dw = sum(g * xhat)``, ``db = sum(g)`` are sums with
    cancellation, so a 16-bit (or differently ordered) implementation is off by a few units of
    its rounding of the sum of the terms' magnitudes. ``xhat = (x - mean) * invstd`` itself is
    rounded at the scale of ``|x| + |mean|`` (a large offset). Seen in a wider run of this file:
    torch's own bf16 dx 0.079 for 0.0079 at N = 2; an fp32 dweight at an offset of 30 off by
    3e-4 relative; torch's own bf16 output 0.21 off at N = 2 and an offset of 30, where
    ``x - mean`` is rounded to 0.125. ``running``: ``(running_mean, running_var)`` in eval mode
    (then dx does not cancel and is not bounded here: None).
    """
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    if running is None:
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
    else:
        mean, var = (t.detach().float().reshape(shape) for t in running)
    invstd = (var + eps).rsqrt()
    xhat = (x.abs() + mean.abs()) * invstd
    gx = (g.abs() * xhat).sum(dims)
    db = g.abs().sum(dims)
    w = weight.detach().abs().reshape(shape) if weight is not None else 1.0
    if running is not None:
        return w * xhat, None, gx, db
    count = x.numel() / x.shape[1]
    terms = g.abs() + db.reshape(shape) / count + xhat * gx.reshape(shape) / count
    return w * xhat, w * invstd * terms, gx, db


@BACKENDS
@FUZZ
@given(
    kind=st.sampled_from(["1d", "1d-3D", "2d", "2d-channels_last"]),
    n=st.sampled_from([2, 3, 5, 13]),
    c=st.sampled_from([1, 3, 7]),
    spatial=st.sampled_from([1, 2, 5]),
    affine=st.booleans(),
    track=st.booleans(),
    momentum=st.sampled_from([0.1, None, 0.5]),
    eps=st.sampled_from([1e-5, 1e-3]),
    dtype=DTYPES,
    sliced=st.booleans(),
    offset=st.sampled_from([0.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_batchnorm_fuzz(
    launches,
    backend_name,
    kind,
    n,
    c,
    spatial,
    affine,
    track,
    momentum,
    eps,
    dtype,
    sliced,
    offset,
    seed,
):
    gen = torch.Generator().manual_seed(seed)
    if kind == "1d":
        shape, ours_cls, ref_cls = (n, c), fusedmlp.nn.BatchNorm1d, torch.nn.BatchNorm1d
    elif kind == "1d-3D":
        shape, ours_cls, ref_cls = (n, c, spatial), fusedmlp.nn.BatchNorm1d, torch.nn.BatchNorm1d
    else:
        shape = (n, c, spatial, spatial + 2)
        ours_cls, ref_cls = fusedmlp.nn.BatchNorm2d, torch.nn.BatchNorm2d
    kw = dict(eps=eps, momentum=momentum, affine=affine, track_running_stats=track)
    ours = ours_cls(c, **kw).to(DEVICE)
    ref = ref_cls(c, **kw).to(DEVICE)
    if affine:
        with torch.no_grad():
            w, bb = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
            for mod in (ours, ref):
                mod.weight.copy_(w)
                mod.bias.copy_(bb)
    for mode in ("train", "train", "eval"):
        ours.train(mode == "train")
        ref.train(mode == "train")
        x = _make(shape, dtype, "sliced" if sliced else "contiguous", gen, scale=2.0) + offset
        if kind == "2d-channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        x = x.detach().requires_grad_()
        with _Ran(launches, backend_name):
            y = ours(x)
        assert y.dtype == dtype
        g = _make(shape, dtype, "transposed", gen)
        y.backward(g)
        xr = x.detach().float().requires_grad_()
        yr = ref(xr)
        yr.backward(g.float())
        # Both sides see the same rounded input; the large offset tests the variance's
        # numerical stability (a naive E[x^2] - E[x]^2 loses digits there). x - mean is rounded
        # at the scale of the offset (_bn_bounds) in the precision of the computation: fp32 in
        # the Triton kernels, the input's dtype in torch's own 16-bit batch norm.
        batch_stats = mode == "train" or not track
        running = None if batch_stats else (ref.running_mean, ref.running_var)
        y_bound, dx_bound, dw_bound, db_bound = _bn_bounds(
            xr.detach(), g.float(), ref.weight if affine else None, eps, running
        )
        computed_in = dtype if backend_name == "torch" else torch.float32
        _check(y, yr, dtype, bound=y_bound, computed_in=computed_in)
        if dx_bound is not None:
            _check(x.grad, xr.grad, dtype, bound=dx_bound, computed_in=computed_in)
        else:
            _check(x.grad, xr.grad, dtype)
        if affine:
            _check(
                ours.weight.grad, ref.weight.grad, dtype, bound=dw_bound, computed_in=computed_in
            )
            _check(ours.bias.grad, ref.bias.grad, dtype, bound=db_bound, computed_in=computed_in)
            for mod in (ours, ref):
                mod.weight.grad = mod.bias.grad = None
        if track:  # torch's 16-bit statistics at an offset of 30: twice the tolerance
            scale = 2.0 if backend_name == "torch" and dtype != torch.float32 and offset else 1.0
            _check(ours.running_mean, ref.running_mean, dtype, scale=scale)
            _check(ours.running_var, ref.running_var, dtype, scale=scale * 2)
            assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)
        else:
            assert ours.running_mean is None and ours.running_var is None


# ---------------------------------------------------------------------------------------------
# Dropout: statistics, kept values, and the backward regenerating the forward's mask.


@BACKENDS
@FUZZ
@given(
    kind=st.sampled_from(["functional", "Dropout", "Dropout2d"]),
    p=st.sampled_from([0.1, 0.25, 0.5, 0.8]),
    rows=st.sampled_from([31, 64, 97]),
    cols=st.sampled_from([17, 33, 40]),
    dtype=DTYPES,
    x_layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
    g_layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
    seed=st.integers(0, 2**16),
)
def test_dropout_fuzz(launches, backend_name, kind, p, rows, cols, dtype, x_layout, g_layout, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (rows, cols) if kind != "Dropout2d" else (rows, cols, 2, 3)
    # No zeros in x: the mask is read back from the output.
    x = _make(shape, dtype, x_layout, gen, scale=1.5, low=0.5).detach().requires_grad_()
    torch.manual_seed(seed)
    with _Ran(launches, backend_name):
        if kind == "functional":
            y = FF.dropout(x, p, training=True)
        elif kind == "Dropout":
            y = fusedmlp.nn.Dropout(p)(x)
        else:
            y = fusedmlp.nn.Dropout2d(p)(x)
    assert y.dtype == dtype and y.shape == x.shape
    keep = y.detach() != 0
    scale = 1.0 / (1.0 - p)
    _check(y, x.detach().float() * keep * scale, dtype)

    units = keep.flatten(2) if kind == "Dropout2d" else keep.flatten()
    if kind == "Dropout2d":  # one decision per (sample, channel)
        assert torch.equal(units.all(-1), units.any(-1))
        units = units[..., 0]
    rate = units.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / units.numel())
    assert abs(rate - (1 - p)) <= 5 * sigma, (rate, 1 - p, units.numel())

    g = _make(shape, dtype, g_layout, gen)  # other strides than the input: mask regeneration
    y.backward(g)
    _check(x.grad, g.float() * keep * scale, dtype)


# ---------------------------------------------------------------------------------------------
# Optimizers against torch.optim (several steps, two param groups, drawn flags).


@st.composite
def _optimizer_config(draw):
    name = draw(st.sampled_from(["Adam", "AdamW", "SGD"]))
    kw = {"lr": draw(st.sampled_from([1e-3, 3e-2, 0.1]))}
    if name == "SGD":
        momentum = draw(st.sampled_from([0.0, 0.9]))
        nesterov = momentum > 0 and draw(st.booleans())
        kw.update(
            momentum=momentum,
            nesterov=nesterov,
            dampening=0.0 if nesterov else draw(st.sampled_from([0.0, 0.3])),
            weight_decay=draw(st.sampled_from([0.0, 1e-2])),
            maximize=draw(st.booleans()),
        )
    else:
        kw.update(
            betas=draw(st.sampled_from([(0.9, 0.999), (0.8, 0.99)])),
            eps=draw(st.sampled_from([1e-8, 1e-6])),
            weight_decay=draw(st.sampled_from([0.0, 1e-2, 0.1])),
            amsgrad=draw(st.booleans()),
            maximize=draw(st.booleans()),
        )
    return name, kw


@BACKENDS
@settings(FUZZ, max_examples=12 * SCALE)
@given(
    config=_optimizer_config(),
    shapes=st.lists(
        st.sampled_from([(1,), (7,), (3, 5), (13, 2), (2, 3, 1)]), min_size=1, max_size=4
    ),
    dtype=DTYPES,
    steps=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**16),
)
def test_optimizer_fuzz(launches, backend_name, config, shapes, dtype, steps, seed):
    name, kw = config
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(_make(s, dtype, "contiguous", gen)) for s in shapes]
    refs = [torch.nn.Parameter(p.detach().float().clone()) for p in params]

    def groups(ps):  # two groups: the second with half the lr
        half = dict(params=ps[1::2], lr=kw["lr"] / 2)
        return [dict(params=ps[::2])] + ([half] if len(ps) > 1 else [])

    ours = getattr(fusedmlp.optim, name)(groups(params), **kw)
    ref = getattr(torch.optim, name)(groups(refs), **kw)
    for step in range(steps):
        for i, (p, r) in enumerate(zip(params, refs)):
            if step == 1 and i == 0:  # a parameter without a gradient is skipped
                p.grad = r.grad = None
                continue
            # |g| in [0.5, 1]: a fp16 exp_avg_sq of a tiny gradient underflows to 0, and torch's
            # fp16 Adam (the torch backend) then divides by eps alone. With |p| < 4 and a weight
            # decay of at most 0.1, |g + wd * p| stays above 0.1 (maximize flips the sign of g:
            # with |g| down to 0.1 the two cancelled in a wider run of this file).
            mag = torch.rand(p.shape, generator=gen) * 0.5 + 0.5
            sign = torch.randn(p.shape, generator=gen).sign()
            g = (mag * sign).to(dtype).to(DEVICE)
            p.grad = g
            r.grad = g.float()
        with _Ran(launches, backend_name, kernels=any(p.grad is not None for p in params)):
            ours.step()
        ref.step()
    for p, r in zip(params, refs):
        assert p.dtype == dtype
        _check(p, r, dtype)
        s, rs = ours.state[p], ref.state[r]
        assert set(s) == set(rs)
        for key, value in rs.items():
            if torch.is_tensor(value) and key != "step":
                _check(s[key], value, dtype)
            elif key == "step":
                assert float(s[key]) == float(value)


@settings(FUZZ)
@given(
    lead=st.sampled_from([(1,), (6,), (2, 3)]),
    in_features=st.sampled_from([1, 3, 17]),
    out_features=st.sampled_from([16, 32, 48, 7, 20]),
    act=st.sampled_from(
        [
            (None, 0.01),
            ("relu", 0.01),
            ("leaky_relu", 0.2),
            ("leaky_relu", -0.3),
            ("sigmoid", 0.01),
            ("tanh", 0.01),
            ("gelu", 0.01),
            ("silu", 0.01),
        ]
    ),  # fmt: skip
    bias=st.booleans(),
    p=st.sampled_from([0.1, 0.5, 0.9]),
    dtype=DTYPES,
    layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
    seed=st.integers(0, 2**16),
)
def test_linear_act_dropout_fuzz(
    launches, lead, in_features, out_features, act, bias, p, dtype, layout, seed
):
    # Linear -> act -> Dropout with the dropout in the GEMM's epilogue (rows of a multiple of
    # 16 outputs; else the pair) against the unfused pair: the same output to the bit, the
    # gradients to the dtype's tolerance.
    from fusedmlp.autograd.fused_block import act_dropout, linear_act_dropout

    activation, slope = act
    gen = torch.Generator().manual_seed(seed)
    x = _make((*lead, in_features), dtype, layout, gen)
    w = _make((out_features, in_features), dtype, "contiguous", gen, scale=0.5)
    b = _make((out_features,), dtype, "contiguous", gen) if bias else None
    gy = _make((*lead, out_features), dtype, "contiguous", gen)

    def run(fn):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b) if t is not None]
        torch.manual_seed(seed)
        out = fn(*leaves)
        return out, torch.autograd.grad(out, leaves, gy)

    with fusedmlp.use_backend("triton"):
        launches.clear()
        out, grads = run(lambda *t: linear_act_dropout(*t[:2], t[2] if bias else None,
                                                       activation, slope, p))  # fmt: skip
        assert launches["_linear_fwd_kernel"] >= 1
        ref, ref_grads = run(lambda *t: act_dropout(FF.linear(*t[:2], t[2] if bias else None),
                                                    activation, slope, p))  # fmt: skip
    assert torch.equal(out, ref)
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, scale=4)


@settings(FUZZ)
@given(
    rows=st.sampled_from([2, 3, 17, 127, 128, 129, 300]),
    in_features=st.sampled_from([1, 3, 17]),
    out_features=st.sampled_from([1, 7, 16, 20]),
    bias=st.booleans(),
    dtype=DTYPES,
    layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
    offset=st.sampled_from([0.0, 100.0]),
    seed=st.integers(0, 2**16),
)
# FUSEDMLP_FUZZ_SCALE=100's find: a mean 3.5 ulp off, as torch's own (the tolerance's comment)
@example(rows=127, in_features=1, out_features=20, bias=True, dtype=torch.float32,
         layout="sliced", offset=100.0, seed=20835)  # fmt: skip
def test_linear_statistics_epilogue_fuzz(
    launches, rows, in_features, out_features, bias, dtype, layout, offset, seed
):
    # The batch-norm statistics from the Linear's epilogue, merged, against the mean and the
    # variances of the Linear's own output computed in float64 (a large offset: a mean far
    # from the spread, where one-pass sums would cancel).
    from fusedmlp.kernels import batchnorm as KB
    from fusedmlp.kernels import linear as KL

    gen = torch.Generator().manual_seed(seed)
    x = _make((rows, in_features), dtype, layout, gen)
    w = _make((out_features, in_features), dtype, "contiguous", gen, scale=0.5)
    b = _make((out_features,), dtype, "contiguous", gen) + offset if bias else None
    launches.clear()
    y, (pmean, pm2, split_rows) = KL.linear_forward_stats(x, w, b)
    assert launches["_linear_fwd_kernel"] == 1
    assert pmean.shape == (-(-rows // split_rows), out_features)
    mean, invstd, var = KB.batch_norm_stats_merge(pmean, pm2, split_rows, rows, 1e-5, None)
    yd = y.double()
    biased = yd.var(0, unbiased=False)
    # fp32 arithmetic on values up to |y|: errors of a few ulp of |y| in the mean (a tree sum of
    # n values: up to about log2(n) ulp; torch's own F.batch_norm is 3.5 ulp off on 127 rows of
    # seed 20835 at FUSEDMLP_FUZZ_SCALE=100, as this one), of |y| times the spread in the
    # variance (deviations from each tile's own mean: no cancellation)
    big = yd.abs().amax(0)
    ulps = max(3.36, math.log2(rows))
    torch.testing.assert_close(
        mean.double(), yd.mean(0), rtol=0, atol=(ulps * 2.0**-23 * big).max().item()
    )
    torch.testing.assert_close(
        var.double(), yd.var(0), rtol=1e-5, atol=(4e-6 * big * biased.sqrt()).max().item() + 1e-12
    )
    torch.testing.assert_close(
        invstd.double(),
        (biased + 1e-5).rsqrt(),
        rtol=1e-5 + (4e-6 * big / (biased + 1e-5).sqrt()).max().item(),
        atol=0,
    )
