"""Batch normalization: fusedmlp.nn.BatchNorm1d/2d and functional.batch_norm against torch's own
BatchNorm1d/BatchNorm2d/F.batch_norm, step by step (outputs, every gradient, running statistics,
num_batches_tracked), on both backends; stability, mixed precision, gradcheck, errors, state_dict.
"""

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_close

import fusedmlp
from fusedmlp.functional import batch_norm
from fusedmlp.nn import BatchNorm1d, BatchNorm2d

FWD = "_bn_forward_kernel"
STATS = "_bn_stats_partial_kernel"
DX = "_bn_backward_dx_kernel"
UPDATE = "_bn_update_running_kernel"
MERGE = "_bn_stats_final_kernel"


def _expect(launches, backend, *kernels):
    if backend == "triton":
        for k in kernels:
            assert launches[k] > 0, (k, dict(launches))
    else:
        assert launches.total == 0, dict(launches)


def _pair(cls_ours, cls_torch, *args, **kwargs):
    """Our module and torch's with identical (non-trivial) parameters and buffers."""
    torch.manual_seed(1)
    ref = cls_torch(*args, device=DEVICE, **kwargs)
    with torch.no_grad():
        if ref.affine:
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-1, 1)
        if ref.track_running_stats:
            ref.running_mean.uniform_(-1, 1)
            ref.running_var.uniform_(0.5, 2)
    ours = cls_ours(*args, device=DEVICE, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _compare_modules(ours, ref, x, dy, dtype=torch.float32, scale=1.0):
    xo = x.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    yo, yr = ours(xo), ref(xr)
    assert yo.dtype == yr.dtype and yo.shape == yr.shape
    assert_close(yo, yr, dtype, scale)
    yo.backward(dy)
    yr.backward(dy)
    assert_close(xo.grad, xr.grad, dtype, scale)
    if ref.affine:
        assert_close(ours.weight.grad, ref.weight.grad, dtype, scale * 4)
        assert_close(ours.bias.grad, ref.bias.grad, dtype, scale * 4)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if a is not None:
            if name == "num_batches_tracked":
                assert a.item() == b.item()
            else:
                assert_close(a, b)
    return yo


# ------------------------------------------------------------------------------------- grid


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batchnorm1d_matches_torch_over_steps(
    backend, launches, arrivals, interpreter_splits, mode, affine, track, momentum
):
    ours, ref = _pair(
        BatchNorm1d, torch.nn.BatchNorm1d, 5, momentum=momentum, affine=affine,
        track_running_stats=track,
    )  # fmt: skip
    torch.manual_seed(2)
    modes = ["train", "train", "eval"] if mode == "train" else ["eval", "eval"]
    for step, m in enumerate(modes):
        ours.train(m == "train")
        ref.train(m == "train")
        x = torch.randn(37, 5, device=DEVICE) * (1 + step) + step
        dy = torch.randn(37, 5, device=DEVICE)
        _compare_modules(ours, ref, x, dy)
    _expect(launches, backend, FWD, DX)
    if backend == "triton":
        uses_batch_stats = mode == "train" or not track
        assert (launches[STATS] > 0) == uses_batch_stats
        # in eager mode the statistics kernel updates the running statistics (compared with
        # torch's above): no launch of the separate update kernel
        assert launches[UPDATE] == 0
        # the backward's split sums (37 rows: several splits; for the batch statistics or for
        # the weight and bias gradients) merged by their last split
        assert (len(arrivals) > 0) == (uses_batch_stats or affine) and arrivals.all_reset()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batchnorm2d_matches_torch(backend, launches, mode, channels_last):
    ours, ref = _pair(BatchNorm2d, torch.nn.BatchNorm2d, 4)
    torch.manual_seed(3)
    for step in range(2):
        ours.train(mode == "train")
        ref.train(mode == "train")
        x = torch.randn(3, 4, 5, 3, device=DEVICE) * 2 + step
        dy = torch.randn(3, 4, 5, 3, device=DEVICE)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
            dy = dy.to(memory_format=torch.channels_last)
        y = _compare_modules(ours, ref, x, dy)
        if channels_last:
            assert y.is_contiguous(memory_format=torch.channels_last)
    _expect(launches, backend, FWD, DX)


def test_batchnorm1d_3d_input(backend, launches):
    ours, ref = _pair(BatchNorm1d, torch.nn.BatchNorm1d, 3, momentum=None)
    torch.manual_seed(4)
    for _ in range(2):
        x = torch.randn(4, 3, 9, device=DEVICE) - 3
        _compare_modules(ours, ref, x, torch.randn_like(x))
    ours.eval()
    ref.eval()
    x = torch.randn(4, 3, 9, device=DEVICE)
    _compare_modules(ours, ref, x, torch.randn_like(x))
    _expect(launches, backend, FWD, STATS, DX)


def test_non_contiguous_inputs_and_expanded_grad(backend, launches):
    torch.manual_seed(5)
    base = torch.randn(33, 14, device=DEVICE)
    w = torch.rand(7, device=DEVICE) + 0.5
    b = torch.randn(7, device=DEVICE)
    for x in (base[:, ::2], torch.randn(7, 33, device=DEVICE).t()):
        outs = []
        for fn in (batch_norm, F.batch_norm):
            xi = x.detach().clone().requires_grad_()
            wi, bi = w.clone().requires_grad_(), b.clone().requires_grad_()
            rm, rv = torch.zeros(7, device=DEVICE), torch.ones(7, device=DEVICE)
            y = fn(xi[:, :], rm, rv, wi, bi, True, 0.3, 1e-3)
            (y * torch.arange(33.0, device=DEVICE)[:, None]).sum().backward()  # dy strides (1, 0)
            outs.append((y, xi.grad, wi.grad, bi.grad, rm, rv))
        for a, e in zip(*outs):
            assert_close(a, e)
    _expect(launches, backend, FWD, DX)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(6, 3), (6, 3, 1), (2, 3, 4)])
def test_strided_weight_and_running_statistics(backend, launches, training, shape):
    """A weight and running statistics that are strided views (columns of a stacked tensor)
    give the gradients of their contiguous copies. torch 2.13's own CPU backward of a (N, C)
    or (N, C, 1) input reads such a weight, and in eval mode such statistics, as if
    contiguous (right output, wrong gradients), so torch's op gets the copies here."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=g).to(DEVICE)
    dy = torch.randn(*shape, generator=g).to(DEVICE)
    params = torch.randn(3, 2, generator=g).to(DEVICE)  # weight, bias as columns
    stats = torch.randn(3, 2, generator=g).to(DEVICE)  # mean, var
    stats[:, 1] = stats[:, 1].abs() + 0.5
    outs = []
    for fn in (batch_norm, F.batch_norm):
        w, b, rm, rv = *params.clone().unbind(1), *stats.clone().unbind(1)  # stride 2: fresh
        assert not any(t.is_contiguous() for t in (w, b, rm, rv))
        if fn is F.batch_norm:
            w, b, rm, rv = (t.contiguous() for t in (w, b, rm, rv))
        xi = x.clone().requires_grad_()
        wi, bi = w.requires_grad_(), b.requires_grad_()  # leaves, with the views' strides
        y = fn(xi, rm, rv, wi, bi, training, 0.3, 1e-3)
        y.backward(dy)
        outs.append((y, xi.grad, wi.grad, bi.grad, rm, rv))
    for a, e in zip(*outs):
        assert_close(a, e)
    _expect(launches, backend, FWD, DX)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "cls, shape, layout",
    [
        ("BatchNorm1d", (7, 5), lambda x: x.t()),
        ("BatchNorm1d", (6, 4, 5), lambda x: x.permute(1, 2, 0)),
        ("BatchNorm2d", (2, 4, 5, 3), lambda x: x.transpose(1, 3)),
        ("BatchNorm2d", (2, 5, 3, 4), lambda x: x.to(memory_format=torch.channels_last)),
        ("BatchNorm2d", (2, 5, 3, 8), lambda x: x[..., ::2]),
    ],
)
def test_output_layout_like_torch(backend, launches, training, cls, shape, layout):
    """The output's strides are torch's on this device: on CPU (and cuDNN, 3-D and more on
    CUDA) contiguous in the input's suggested memory format (channels_last kept, a transposed
    or permuted input's layout not, so that ``y.view(-1)`` works on it); torch's native CUDA
    kernels (a 2-D input) keep a dense input's strides (``empty_like``): x.t()'s (1, 5)."""
    x = layout(torch.randn(*shape, device=DEVICE))
    ours, ref = _pair(getattr(fusedmlp.nn, cls), getattr(torch.nn, cls), x.shape[1])
    ours.train(training)
    ref.train(training)
    y, yr = ours(x), ref(x)
    assert y.stride() == yr.stride()
    assert_close(y, yr)
    _expect(launches, backend, FWD)


def test_3d_and_5d_functional(backend):
    torch.manual_seed(6)
    x = torch.randn(2, 3, 4, 2, 3, device=DEVICE) + 1
    w, b = torch.rand(3, device=DEVICE), torch.randn(3, device=DEVICE)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    rm2, rv2 = rm.clone(), rv.clone()
    assert_close(batch_norm(x, rm, rv, w, b, training=True), F.batch_norm(x, rm2, rv2, w, b, True))
    assert_close(rm, rm2)
    assert_close(rv, rv2)


# -------------------------------------------------------------------------- numerics


def test_lecture_example(backend, launches):
    """Features with means -10, 25, 3 and spreads 2, 5, 10; after BN with weight [1, 2, 3] and
    bias [2, 4, 8] the per-feature mean and std are [2, 4, 8] and [1, 2, 3]."""
    torch.manual_seed(7)
    means = torch.tensor([-10.0, 25.0, 3.0], device=DEVICE)
    stds = torch.tensor([2.0, 5.0, 10.0], device=DEVICE)
    x = torch.randn(400, 3, device=DEVICE) * stds + means
    bn = BatchNorm1d(3, device=DEVICE)
    ref = torch.nn.BatchNorm1d(3, device=DEVICE)
    with torch.no_grad():
        for m in (bn, ref):
            m.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
            m.bias.copy_(torch.tensor([2.0, 4.0, 8.0]))
    y = bn(x)
    assert_close(y, ref(x))
    assert_close(y.mean(0), torch.tensor([2.0, 4.0, 8.0], device=DEVICE), atol=1e-4, rtol=0)
    std = y.std(0, unbiased=False)
    assert_close(std, torch.tensor([1.0, 2.0, 3.0], device=DEVICE), atol=1e-4, rtol=1e-5)
    # the running estimates moved 10% of the way towards the batch statistics
    assert_close(bn.running_mean, 0.1 * x.mean(0))
    assert_close(bn.running_var, 0.9 + 0.1 * x.var(0))
    # 400 rows: several splits, merged by the kernel that then updates the running statistics
    _expect(launches, backend, FWD, STATS, MERGE)
    assert launches[UPDATE] == 0


def test_large_offset_is_stable(backend, launches):
    """Mean 1e4 times the spread: E[x^2] - E[x]^2 in fp32 would be garbage."""
    torch.manual_seed(8)
    x = (torch.randn(257, 3, device=DEVICE) + 1e4).requires_grad_()
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    y = batch_norm(x, rm, rv, training=True, momentum=1.0)
    x64 = x.detach().double()
    var64 = x64.var(0, unbiased=False)
    ref = (x64 - x64.mean(0)) / (var64 + 1e-5).sqrt()
    naive = (x.detach() ** 2).mean(0) - x.detach().mean(0) ** 2
    assert (naive.double() - var64).abs().max() > 0.05  # the test would catch the naive formula
    # fp32 holds the mean only to ~5e-4 (its ulp at 1e4 is ~1e-3), in units of the spread; the
    # kernels stay within that of the exact result. torch's own single-threaded CPU batch_norm
    # (the torch backend) is off by ~5e-3 here, hence the wider bound for it.
    bound = 2e-3 if backend == "triton" else 1e-2
    assert_close(y.double(), ref, atol=bound, rtol=0)
    assert_close(y, F.batch_norm(x.detach(), None, None, training=True), atol=1e-2, rtol=0)
    # torch's own CUDA batch_norm (the torch backend on a GPU) is ~2e-4 off here
    assert_close(rv.double(), x64.var(0), rtol=1e-4 if backend == "triton" else 1e-3, atol=0)
    mean_rtol = 2.5e-7 if backend == "triton" else 1e-6  # ~2 fp32 ulp (torch: ~4 ulp)
    assert_close(rm.double(), x64.mean(0), rtol=mean_rtol, atol=0)
    dy = torch.randn_like(y)
    y.backward(dy)
    xr = x.detach().double().requires_grad_()
    F.batch_norm(xr, None, None, training=True).backward(dy.double())
    assert_close(x.grad.double(), xr.grad, atol=bound, rtol=0)
    _expect(launches, backend, FWD, STATS, DX)


def _assert_same_nonfinite(actual, expected, **kw):
    """``assert_close`` with NaN == NaN, and the same +-inf and NaN at the same places."""
    torch.testing.assert_close(actual, expected, equal_nan=True, **kw)
    assert torch.equal(actual.isnan(), expected.isnan())
    assert torch.equal(actual.isposinf(), expected.isposinf())
    assert torch.equal(actual.isneginf(), expected.isneginf())


def _assert_nonfinite_as_torch(actual, expected, **kw):
    """Batch statistics of a batch holding infinities (or overflowing), against torch's on the
    same device. On CPU exactly (``_assert_same_nonfinite``): torch's two-pass sums give +-inf
    means and infinite variances, as the kernels' merges do. On CUDA non-finite at the same
    places, equal elsewhere: torch's Welford there makes +-inf NaN (``inf - inf`` once an
    infinite mean meets a later value of its thread, ``inf * 0`` in its masked-off loads, an
    overflowed M2 times 0 likewise) or leaves it, by where the value falls in its launch
    configuration (the same input's last row stays +-inf, its first not): no kernel can
    follow that, nor should; NaN and +-inf both count as non-finite."""
    if not actual.is_cuda:
        _assert_same_nonfinite(actual, expected, **kw)
        return
    assert torch.equal(actual.isfinite(), expected.isfinite()), (actual, expected)
    finite = expected.isfinite()
    torch.testing.assert_close(actual[finite], expected[finite], **kw)


# the interpreter's numpy reduces inf - inf (the intended NaN) with a warning
@pytest.mark.filterwarnings("ignore:invalid value encountered in reduce:RuntimeWarning")
@pytest.mark.parametrize("rows", [20, 300])  # one split (final statistics) / four, merged
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_infinite_values_in_the_batch_as_torch(backend, launches, interpreter_splits, dtype, rows):
    # An infinite x makes its channel's mean +-inf (NaN with both signs) and its variance,
    # output and gradients NaN in torch. The shifted sums took the split's first row as the
    # shift (inf - inf = NaN in the mean), and Chan's merge of an infinite split mean with a
    # finite later one made delta = -inf, mean = inf - inf: NaN running means where torch's
    # are +-inf. 300 rows: 4 splits of 75, merged two at a time under the interpreter.
    inf = float("inf")
    ours, ref = _pair(BatchNorm1d, torch.nn.BatchNorm1d, 7)
    torch.manual_seed(12)
    x = torch.randn(rows, 7, device=DEVICE)
    x[1, 0] = inf  # split 0 (not its first row): merged before the finite splits
    x[0, 1] = -inf  # the first row of split 0: the shift
    x[rows - 1, 2] = inf  # the last split
    x[:, 3] = inf  # every row
    x[2, 4], x[rows - 2, 4] = inf, -inf  # both signs: NaN mean
    x[rows // 2, 5] = -inf  # the first row of split 2 at 300 rows
    x = x.to(dtype)  # channel 6 stays finite
    dy = torch.randn(rows, 7, device=DEVICE).to(dtype)
    xo = x.clone().requires_grad_()
    xr = x.clone().requires_grad_()
    yo, yr = ours(xo), ref(xr)
    yo.backward(dy)
    yr.backward(dy)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.float16 else {}
    _assert_same_nonfinite(yo, yr, **tol)
    _assert_same_nonfinite(xo.grad, xr.grad, **tol)
    _assert_same_nonfinite(ours.weight.grad, ref.weight.grad, **tol)
    _assert_same_nonfinite(ours.bias.grad, ref.bias.grad, **tol)
    # the output and gradients: NaN for channels 0-5 on any device (invstd NaN), exactly
    _assert_nonfinite_as_torch(ours.running_mean, ref.running_mean)
    _assert_nonfinite_as_torch(ours.running_var, ref.running_var)
    # the premise, torch's on this device: non-finite means for channels 0-5 (CPU: +-inf for
    # 0-3 and 5, NaN for 4; CUDA: NaN but for 2), channel 6 finite
    assert not ref.running_mean[:6].isfinite().any() and ref.running_mean[6].isfinite()
    _expect(launches, backend, STATS, FWD, DX)
    if backend == "triton":
        assert launches[MERGE] == (rows == 300), dict(launches)


def test_merge_of_infinite_split_means_as_torch(triton_backend, launches):
    # The merge alone (batch_norm_stats_merge, as for a Linear's epilogue statistics) over 40
    # splits: more than one block of splits on any device, an infinite mean in the first split
    # of channel 0, the last of channel 1; torch's mean of the same rows is +-inf.
    from fusedmlp.kernels.batchnorm import batch_norm_stats_merge

    inf = float("inf")
    splits, rows = 40, 5
    torch.manual_seed(13)
    x = torch.randn(splits * rows, 3, device=DEVICE)
    x[2, 0] = inf
    x[-1, 1] = -inf
    parts = x.view(splits, rows, 3)
    pmean = parts.mean(1)
    pm2 = parts.var(1, unbiased=False) * rows  # NaN where a split holds an inf
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    mean, _, var = batch_norm_stats_merge(
        pmean, pm2, rows, splits * rows, 1e-5, (rm, rv, 1.0, None)
    )
    ref_rm, ref_rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    F.batch_norm(x, ref_rm, ref_rv, training=True, momentum=1.0)
    # the premise, torch's on this device: channels 0 and 1 non-finite (CPU: inf, -inf; CUDA:
    # NaN, -inf), channel 2 finite
    assert not ref_rm[:2].isfinite().any() and ref_rm[2].isfinite()
    _assert_nonfinite_as_torch(mean, ref_rm)
    _assert_nonfinite_as_torch(var, ref_rv, rtol=1e-5, atol=1e-5)
    _assert_nonfinite_as_torch(rm, ref_rm)
    assert launches[MERGE] == 1


@pytest.mark.parametrize("rows", [20, 100])  # one split (final statistics) / four, merged
def test_means_beyond_1e19_merge_as_torch(triton_backend, launches, interpreter_splits, rows):
    # Chan's merge added delta^2 * n_a for the first block of splits too (n_a = 0, delta = its
    # mean): with |mean| > ~1.8e19 delta^2 overflows fp32 and inf * 0 made the channel's M2,
    # variance, output and gradients NaN. Channel 0 spreads (variance ~1e32, far from fp32's
    # limits), channel 1 is constant, channel 2 ordinary. Reference: torch's own batch norm in
    # float64 on the same fp32 values.
    torch.manual_seed(14)
    x = torch.randn(rows, 3, device=DEVICE) * 1e16 + 1e20
    x[:, 1] = -3e20
    x[:, 2] = torch.randn(rows, device=DEVICE)
    dy = torch.randn(rows, 3, device=DEVICE)
    w = torch.rand(3, device=DEVICE) + 0.5
    b = torch.randn(3, device=DEVICE)
    results = []
    for fn, dtype in ((batch_norm, torch.float32), (F.batch_norm, torch.float64)):
        xi, wi, bi = (t.to(dtype, copy=True).requires_grad_() for t in (x, w, b))
        rm = torch.zeros(3, device=DEVICE, dtype=dtype)
        rv = torch.ones(3, device=DEVICE, dtype=dtype)
        y = fn(xi, rm, rv, wi, bi, True, 0.5, 1e-5)
        y.backward(dy.to(dtype))
        results.append([y, xi.grad, wi.grad, bi.grad, rm, rv])
    (y, *rest), (ref_y, *ref_rest) = results
    for ours in results[0]:
        assert ours.isfinite().all(), ours
    # fp32 holds channel 0's mean to its ulp (~9e12, ~4e-4 of the spread): the output and the
    # weight gradient sit within ~1e-3 of the exact result (torch's own fp32: ~1e-3 too)
    assert_close(y[:, [0, 2]].double(), ref_y[:, [0, 2]], rtol=0, atol=3e-3)
    # constant channel: y is the bias exactly (torch's CPU x * a + (b - mean * a) cancels
    # there, even in float64: not a reference)
    assert torch.equal(y[:, 1], b[1].expand(rows))
    assert rest[1][1] == 0  # dweight of the constant channel
    for ours, ref in zip(rest, ref_rest):
        assert_close(ours.double(), ref, rtol=2e-3, atol=1e-2)
    # channel 0's dx is ~1e-17 (its std is ~1e16): in its own units
    assert_close(rest[0][:, 0].double() * 1e16, ref_rest[0][:, 0] * 1e16, rtol=2e-3, atol=1e-2)
    assert launches[STATS] == 1 and launches[MERGE] == (rows == 100), dict(launches)


@pytest.mark.parametrize("rows", [20, 100])
def test_variance_beyond_fp32_is_infinite_as_torch(backend, launches, interpreter_splits, rows):
    # Finite x whose variance exceeds fp32's range (~3e38): torch's CPU batch norm has an
    # infinite variance (running_var inf, invstd 0: y = bias, zero gradients for x and
    # weight). The shifted sums overflowed to inf - inf = NaN for every output and gradient of
    # the channel. torch's CUDA batch norm makes that variance NaN instead at most shapes (its
    # Welford's masked-off loads add an overflowed square times 0), +inf at others (none
    # masked off), and then every output and gradient of the channel NaN: the kernels keep the
    # infinite variance on every device. Where torch's variance is NaN and ours +inf, the
    # channel's outputs and gradients are compared with torch's for an infinite variance (its
    # CPU batch norm on the same values); everything else with torch's on this device.
    ours, ref = _pair(BatchNorm1d, torch.nn.BatchNorm1d, 3)
    ref_cpu = copy.deepcopy(ref).cpu()
    torch.manual_seed(15)
    x = torch.randn(rows, 3, device=DEVICE)
    x[:, 0] *= 3e19
    x[:, 1] = torch.where(torch.arange(rows, device=DEVICE) % 2 == 0, 3e19, -3e19)
    dy = torch.randn(rows, 3, device=DEVICE)
    xo, xr, xc = x.clone().requires_grad_(), x.clone().requires_grad_(), x.cpu().requires_grad_()
    yo, yr, yc = ours(xo), ref(xr), ref_cpu(xc)
    yo.backward(dy)
    yr.backward(dy)
    yc.backward(dy.cpu())
    # the premise, torch's on this device: the variance of channels 0 and 1 is not finite
    assert not ref.running_var[:2].isfinite().any() and ref.running_var[2].isfinite()
    assert ref_cpu.running_var[:2].isposinf().all()
    _assert_nonfinite_as_torch(ours.running_var, ref.running_var)
    # channel 0's mean is ~1e18, its sum's rounding ~1e-6 of it: each device's own order
    _assert_same_nonfinite(ours.running_mean, ref.running_mean, rtol=1e-5, atol=1e-5)
    nan_in_torch = ref.running_var.isnan() & ours.running_var.isposinf()  # CUDA only
    assert not nan_in_torch.any() or DEVICE == "cuda"
    for a, b, c in (
        (yo, yr, yc),
        (xo.grad, xr.grad, xc.grad),
        (ours.weight.grad, ref.weight.grad, ref_cpu.weight.grad),
        (ours.bias.grad, ref.bias.grad, ref_cpu.bias.grad),
    ):
        _assert_same_nonfinite(a, torch.where(nan_in_torch, c.to(DEVICE), b))
    _expect(launches, backend, STATS, FWD, DX)


def test_million_rows(triton_backend, launches):
    """The batch is tiled: N = 1,000,000 (never one tile for the whole batch)."""
    torch.manual_seed(9)
    x = torch.randn(1_000_000, 1, device=DEVICE) * 0.5 + 100.0
    rm, rv = torch.zeros(1, device=DEVICE), torch.ones(1, device=DEVICE)
    y = batch_norm(x, rm, rv, training=True, momentum=1.0)
    x64 = x.double()
    assert_close(rm.double(), x64.mean(0), rtol=1e-6, atol=0)
    assert_close(rv.double(), x64.var(0), rtol=1e-5, atol=0)
    assert abs(y.double().mean().item()) < 1e-4
    assert abs(y.double().std().item() - 1.0) < 1e-4
    assert launches[STATS] == 1 and launches[FWD] == 1
    # backward over the million rows against torch in float64
    dy = torch.randn_like(x)
    xg = x.clone().requires_grad_()
    batch_norm(xg, None, None, training=True).backward(dy)
    xr = x.double().requires_grad_()
    F.batch_norm(xr, None, None, training=True).backward(dy.double())
    assert_close(xg.grad.double(), xr.grad, atol=1e-5, rtol=1e-4)
    assert launches[DX] == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_fp32_params(backend, launches, dtype):
    ours, ref = _pair(BatchNorm1d, torch.nn.BatchNorm1d, 6)
    torch.manual_seed(10)
    for _ in range(2):
        x = (torch.randn(40, 6, device=DEVICE) * 2 + 3).to(dtype)
        dy = torch.randn(40, 6, device=DEVICE).to(dtype)
        y = _compare_modules(ours, ref, x, dy, dtype=dtype)
        assert y.dtype == dtype
    assert ours.weight.grad.dtype == torch.float32
    assert ours.running_mean.dtype == torch.float32
    _expect(launches, backend, FWD, DX)


# -------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize(
    "shape,training,fast",
    [
        ((5, 2), True, False),
        ((7, 3), True, True),
        ((3, 2, 5), True, True),
        ((2, 3, 2, 3), True, True),
        ((7, 3), False, True),
    ],
)
def test_gradcheck_triton_fp64(triton_backend, launches, shape, training, fast):
    torch.manual_seed(11)
    x = torch.randn(*shape, device=DEVICE, dtype=torch.float64)
    if len(shape) == 4:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    C = shape[1]
    w = (torch.rand(C, device=DEVICE, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(C, device=DEVICE, dtype=torch.float64).requires_grad_()
    rm = torch.randn(C, device=DEVICE, dtype=torch.float64)
    rv = torch.rand(C, device=DEVICE, dtype=torch.float64) + 0.5

    def fn(x, w, b):
        if training:
            return batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
        return batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5)

    assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=fast)
    assert launches[FWD] > 0 and launches[DX] > 0


def test_double_backward_is_a_clear_error(triton_backend):
    x = torch.randn(5, 3, device=DEVICE, requires_grad=True)
    y = batch_norm(x, None, None, training=True)
    (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|not support"):
        g.sum().backward()


def test_deterministic(triton_backend, arrivals, interpreter_splits):
    # the backward's split sums are merged by whichever split arrives last, in a fixed order
    torch.manual_seed(12)
    x = torch.randn(40, 20, device=DEVICE)
    dy = torch.randn_like(x)
    runs = []
    for _ in range(2):
        m = BatchNorm1d(20, device=DEVICE)
        xi = x.clone().requires_grad_()
        m(xi).backward(dy)
        runs.append((xi.grad, m.weight.grad, m.bias.grad, m.running_var))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert len(arrivals) == 2 and arrivals.all_reset()


# -------------------------------------------------------------------------- errors


def _error(fn, *args):
    with pytest.raises(Exception) as info:
        fn(*args)
    return type(info.value), str(info.value)


def test_errors_match_torch(backend, launches):
    def ours(cls, **kw):
        return cls(4, device=DEVICE, **kw)

    def theirs(cls, **kw):
        ref = {BatchNorm1d: torch.nn.BatchNorm1d, BatchNorm2d: torch.nn.BatchNorm2d}[cls]
        return ref(4, device=DEVICE, **kw)

    modules = [
        # one value per channel when training
        lambda m: m(BatchNorm1d)(torch.randn(1, 4, device=DEVICE)),
        lambda m: m(BatchNorm2d)(torch.randn(1, 4, 1, 1, device=DEVICE)),
        # wrong rank
        lambda m: m(BatchNorm1d)(torch.randn(2, 4, 3, 3, device=DEVICE)),
        lambda m: m(BatchNorm2d)(torch.randn(2, 4, 3, device=DEVICE)),
        # wrong channel count
        lambda m: m(BatchNorm1d)(torch.randn(3, 5, device=DEVICE)),
        lambda m: m(BatchNorm1d, track_running_stats=False)(torch.randn(3, 5, device=DEVICE)),
    ]
    for case in modules:
        assert _error(case, ours) == _error(case, theirs)
    x = torch.randn(3, 4, device=DEVICE)
    ones, zeros = torch.ones(4, device=DEVICE), torch.zeros(4, device=DEVICE)
    functional = [
        lambda bn: bn(x, None, None, training=False),
        lambda bn: bn(x, zeros, None, training=True),
        lambda bn: bn(x, zeros, torch.ones(3, device=DEVICE), None),
        lambda bn: bn(x, None, None, torch.ones(5, device=DEVICE), training=True),
        lambda bn: bn(x, None, None, None, torch.ones(2, device=DEVICE), training=True),
        lambda bn: bn(torch.randn(1, 4, device=DEVICE), None, None, training=True),
        lambda bn: bn(x, None, None, training=True, eps=0.0),
        lambda bn: bn(x, zeros, ones, training=False, eps=-1.0),
        lambda bn: bn(torch.randn(4, device=DEVICE), zeros, ones, training=False),  # 1-D
        lambda bn: bn(torch.randn(4, device=DEVICE), zeros, ones, training=True),
        lambda bn: bn(torch.randn(4, device=DEVICE), None, None, training=True),
    ]
    for case in functional:
        (ours_type, ours_msg), (torch_type, torch_msg) = (
            _error(case, batch_norm),
            _error(case, F.batch_norm),
        )
        assert ours_type is torch_type
        # torch 2.11 and 2.13 word the eps messages differently ("eps must be positive during
        # training" / "must be non-negative"): the type and the subject must agree.
        assert ours_msg.split(" must ")[0] == torch_msg.split(" must ")[0]
    assert launches.total == 0, dict(launches)


def test_momentum_as_torch_takes_it(backend, launches):
    # torch's batch_norm takes any real number (numpy scalars, bool) and a 0-d tensor for its
    # momentum, and refuses a 1-D tensor
    x = torch.randn(6, 3, device=DEVICE)
    for momentum in (torch.tensor(0.2), np.float32(0.2), np.float64(0.3), True, 1):
        stats = []
        for fn in (batch_norm, F.batch_norm):
            rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
            y = fn(x, rm, rv, training=True, momentum=momentum)
            stats.append((y, rm, rv))
        for ours, theirs in zip(*stats):
            assert_close(ours, theirs)
    for fn in (batch_norm, F.batch_norm):
        with pytest.raises(TypeError, match="momentum"):
            rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
            fn(x, rm, rv, training=True, momentum=torch.tensor([0.2]))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_non_floating_input_raises_torchs_error(backend, launches, dtype):
    x = torch.ones(4, 3, device=DEVICE, dtype=dtype)
    for bn in (BatchNorm1d(3).to(DEVICE), torch.nn.BatchNorm1d(3).to(DEVICE)):
        with pytest.raises(NotImplementedError):
            bn(x)
    with pytest.raises(NotImplementedError):
        batch_norm(x, None, None, training=True)
    assert launches.total == 0


def test_dtype_mismatch_raises_before_launch(triton_backend, launches):
    x = torch.randn(4, 3, device=DEVICE)
    with pytest.raises(RuntimeError, match="weight"):
        batch_norm(x, None, None, torch.ones(3, device=DEVICE, dtype=torch.float16), training=True)
    with pytest.raises(RuntimeError, match="running_mean"):
        batch_norm(
            x.half(), torch.zeros(3, device=DEVICE, dtype=torch.float64),
            torch.ones(3, device=DEVICE), training=True,
        )  # fmt: skip
    assert launches.total == 0


def test_empty_batch(backend):
    ours, ref = _pair(BatchNorm1d, torch.nn.BatchNorm1d, 3)
    x = torch.randn(0, 3, device=DEVICE)
    assert ours(x).shape == ref(x).shape == (0, 3)
    assert_close(ours.running_mean, ref.running_mean)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()


# -------------------------------------------------------------------------- modules, state


def test_state_dict_loads_both_ways(backend):
    theirs = torch.nn.BatchNorm2d(4, momentum=None, device=DEVICE)
    theirs(torch.randn(3, 4, 2, 2, device=DEVICE) * 3 + 1)
    ours = BatchNorm2d(4, momentum=None, device=DEVICE)
    ours.load_state_dict(theirs.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    ours(x)
    theirs(x)
    back = torch.nn.BatchNorm2d(4, momentum=None, device=DEVICE)
    back.load_state_dict(ours.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert_close(ours.running_var, theirs.running_var)
    # an old checkpoint without num_batches_tracked loads as torch's does
    old = {k: v for k, v in theirs.state_dict().items() if k != "num_batches_tracked"}
    fresh, ref = BatchNorm1d(4, device=DEVICE), torch.nn.BatchNorm1d(4, device=DEVICE)
    fresh.load_state_dict(old, strict=False)
    ref.load_state_dict(old, strict=False)
    assert fresh.num_batches_tracked.item() == ref.num_batches_tracked.item()


def test_module_surface():
    ours = BatchNorm1d(6, eps=1e-3, momentum=0.2, affine=False, dtype=torch.float64)
    ref = torch.nn.BatchNorm1d(6, eps=1e-3, momentum=0.2, affine=False, dtype=torch.float64)
    assert repr(ours) == repr(ref)
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]
    assert ours.weight is None and ours.running_mean.dtype == torch.float64
    assert isinstance(BatchNorm2d(3), torch.nn.BatchNorm2d)
    assert fusedmlp.functional.batch_norm is batch_norm


def test_custom_ops_opcheck():
    x = torch.randn(6, 3, device=DEVICE)
    w, b = torch.rand(3, device=DEVICE), torch.randn(3, device=DEVICE)
    with fusedmlp.use_backend("triton"):
        rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
        torch.library.opcheck(
            torch.ops.fusedmlp.batchnorm_stats.default, (x, 1e-5, rm, rv, 0.1, None),
            test_utils=("test_schema", "test_faketensor"),
        )  # fmt: skip
        given = torch.ops.fusedmlp.batchnorm_stats(x, 1e-5, rm, rv, 0.1, None)[:2]
        for stats in ((None, None), given):
            torch.library.opcheck(
                torch.ops.fusedmlp.batchnorm_fwd.default, (x, w, b, None, None, True, 1e-5, *stats),
                test_utils=("test_schema", "test_faketensor"),
            )  # fmt: skip
        y, mean, invstd, var = torch.ops.fusedmlp.batchnorm_fwd(
            x, w, b, None, None, True, 1e-5, None, None
        )
        torch.library.opcheck(
            torch.ops.fusedmlp.batchnorm_bwd.default,
            (torch.randn_like(x), x, w, mean, invstd, True, 1e-5, True, True, True),
            test_utils=("test_schema", "test_faketensor"),
        )  # fmt: skip
        torch.library.opcheck(
            torch.ops.fusedmlp.batchnorm_update_running.default,
            (torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE), mean, var, 0.1, None),
            test_utils=("test_schema", "test_faketensor"),
        )  # fmt: skip


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("rows", [16, 200])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_float64_running_statistics_to_float64_precision(
    triton_backend, launches, interpreter_splits, momentum, rows, contiguous
):
    # A float kernel argument arrives as fp32: the update must still use momentum as a double
    # (0.1 is not 0.100000001490116...), as torch does for float64 statistics. Done by the
    # statistics kernel (16 rows: one split) or by the merge of the splits (200 rows), or, for
    # non-contiguous running statistics, by the separate update kernel.
    ours = BatchNorm1d(5, momentum=momentum, device=DEVICE, dtype=torch.float64)
    ref = torch.nn.BatchNorm1d(5, momentum=momentum, device=DEVICE, dtype=torch.float64)
    if not contiguous:
        for name in ("running_mean", "running_var"):
            strided = torch.empty(10, device=DEVICE, dtype=torch.float64)[::2]
            ours.register_buffer(name, strided.copy_(getattr(ours, name)))
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        x = (torch.randn(rows, 5, generator=g, dtype=torch.float64) * 3 + 2).to(DEVICE)
        ours(x)
        ref(x)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=0, atol=1e-13)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=0, atol=1e-12)
    assert launches[UPDATE] == (0 if contiguous else 3)
    assert (launches[MERGE] > 0) == (rows == 200)


# ------------------------------------------------------------ argument checks as torch's (probe)


@pytest.mark.parametrize("training", [1, None, "yes", np.bool_(True), torch.tensor(True)])
def test_training_must_be_a_bool_as_torch(triton_backend, launches, training):
    # torch's argument parser refuses anything but a bool for ``training``
    x = torch.randn(4, 3, device=DEVICE)
    for fn in (F.batch_norm, batch_norm):
        rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
        with pytest.raises(TypeError, match="training"):
            fn(x, rm, rv, training=training)
    assert launches.total == 0


def test_non_tensor_arguments_raise_torchs_type_error(triton_backend, launches):
    x = torch.randn(4, 3, device=DEVICE)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    for fn in (F.batch_norm, batch_norm):
        with pytest.raises(TypeError):
            fn(x.tolist(), rm, rv)
        with pytest.raises(TypeError):
            fn(x, [0.0, 0.0, 0.0], rv)
        with pytest.raises(TypeError):
            fn(x, rm, rv, 1.0)
    assert launches.total == 0


def _outcome(fn, *args, **kwargs):
    """``(exception type, None)`` when ``fn`` raises, else ``(None, result)``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch on CUDA: a resized statistics output
            return None, fn(*args, **kwargs)
    except Exception as e:
        return type(e), None


@pytest.mark.parametrize("training", [False, True])
def test_running_stats_not_1d_or_requiring_grad_raise_as_torch(triton_backend, launches, training):
    x = torch.randn(4, 3, device=DEVICE)
    # [1, 3] running statistics: torch's CPU batch norm refuses them (it reads them as 1-D);
    # its CUDA kernels for a contiguous 2-D input take them as the [3] they hold (broadcast in
    # their TensorIterators, with a warning). Ours as torch's on this device: the same error
    # type, or the same output and running statistics (updated in place, still [1, 3]).
    for x_ in (x, torch.randn(3, 4, device=DEVICE).t()):
        stats = [(torch.zeros(1, 3, device=DEVICE), torch.ones(1, 3, device=DEVICE) + 0.5)]
        stats.append(tuple(t.clone() for t in stats[0]))
        (err, ref), (err_ours, y) = (
            _outcome(fn, x_, rm, rv, training=training)
            for fn, (rm, rv) in zip((F.batch_norm, batch_norm), stats)
        )
        assert err_ours == err, (err_ours, err)
        if err is None:
            assert_close(y, ref)
            for ours_t, ref_t in zip(stats[1], stats[0]):
                assert ours_t.shape == (1, 3)
                assert_close(ours_t, ref_t)
    if DEVICE == "cpu":
        assert err is RuntimeError
    for fn in (F.batch_norm, batch_norm):
        rm = torch.zeros(3, device=DEVICE, requires_grad=True)
        with pytest.raises(RuntimeError, match="running_mean"):  # not differentiable
            fn(x, rm, torch.ones(3, device=DEVICE), training=training)
        with torch.no_grad():  # without grad mode torch takes them
            fn(x, rm, torch.ones(3, device=DEVICE), training=training)
    assert launches.total > 0  # the no_grad calls ran the kernels
    # a weight of another shape with C elements is taken, as torch
    w = torch.randn(1, 3, device=DEVICE)
    ours = batch_norm(x, None, None, w, None, True)
    assert_close(ours, F.batch_norm(x, None, None, w, None, True))


@pytest.mark.parametrize("training", [False, True])
def test_empty_batch_takes_torchs_path_without_its_checks(triton_backend, launches, training):
    # torch returns input.clone() * weight[0] + bias[0] for an empty input, before it checks the
    # per-channel tensors' sizes (or that running stats exist in eval mode)
    x = torch.randn(0, 3, 2, device=DEVICE, requires_grad=True)
    w, b = torch.randn(5, device=DEVICE), torch.randn(5, device=DEVICE)
    rm, rv = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    for args in ((rm, rv, w, b), (None, None, w, b), (rm, rv, None, None)):
        ref = F.batch_norm(x, *args, training=training)
        ours = batch_norm(x, *args, training=training)
        assert ours.shape == ref.shape and ours.dtype == ref.dtype
        assert ours.requires_grad == ref.requires_grad
    x2 = torch.randn(2, 0, device=DEVICE)
    assert batch_norm(x2, rm, rv, training=training).shape == (2, 0)
    assert launches.total == 0
