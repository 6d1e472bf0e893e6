"""fusedmlp softmax / log_softmax / Softmax / LogSoftmax against torch's own."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_close

import fusedmlp
from fusedmlp.functional import log_softmax, softmax

FWD, BWD = "_softmax_fwd_kernel", "_softmax_bwd_kernel"


def _x(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).to(dtype).to(DEVICE)


def _run(fn, x, dim, go, **kw):
    x = x.detach().clone().requires_grad_()
    y = fn(x, dim, **kw)
    y.backward(go)
    return y.detach(), x.grad


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_dims_of_3d_input(backend, launches, log, dim):
    # 300 along the last dim: two chunks there; dim 1 streams 8-class chunks per tile
    x = _x((3, 20, 300))
    x[1, 3:, :260] = float("-inf")  # masked logits (a whole first chunk along dim -1)
    go = _x(x.shape, seed=1)
    ours, ref = (log_softmax, F.log_softmax) if log else (softmax, F.softmax)
    y, g = _run(ours, x, dim, go)
    if backend == "triton":
        assert launches[FWD] == 1 and launches[BWD] == 1
    else:
        assert launches.total == 0
    ry, rg = _run(ref, x, dim, go)
    assert_close(y, ry)
    assert_close(g, rg)


@pytest.mark.parametrize("log", [False, True])
def test_noncontiguous_and_odd_shapes(triton_backend, launches, log):
    ours, ref = (log_softmax, F.log_softmax) if log else (softmax, F.softmax)
    x = _x((7, 33, 3)).permute(2, 0, 1)  # [3, 7, 33], no dimension contiguous in order
    for dim in (0, 1, 2):
        go = _x(x.shape, seed=2).transpose(0, 1).contiguous().transpose(0, 1)
        y, g = _run(ours, x, dim, go)
        ry, rg = _run(ref, x, dim, go)
        assert_close(y, ry)
        assert_close(g, rg)
    for shape in [(1,), (1, 1), (129,), (2, 1, 5)]:
        x = _x(shape)
        assert_close(ours(x, -1), ref(x, -1))
    assert launches[FWD] == 3 + 4
    # the graph names the op as torch's does (LogSoftmaxBackward0, SoftmaxBackward0)
    name = type(ours(x.requires_grad_(), -1).grad_fn).__name__
    assert name.startswith("LogSoftmax" if log else "Softmax"), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(triton_backend, launches, dtype):
    x = _x((4, 9, 70), dtype=dtype)
    go = _x(x.shape, dtype=dtype, seed=1)
    for ours, ref in ((softmax, F.softmax), (log_softmax, F.log_softmax)):
        for dim in (1, -1):
            y, g = _run(ours, x, dim, go)
            assert y.dtype == dtype and g.dtype == dtype
            ry, rg = _run(ref, x.float(), dim, go.float())
            assert_close(y, ry.to(dtype))
            assert_close(g, rg.to(dtype), scale=2)
    assert launches[FWD] == 4 and launches[BWD] == 4


def test_gradcheck_float64_triton(triton_backend, launches):
    x = _x((3, 4, 70), dtype=torch.float64).requires_grad_()
    for fn in (softmax, log_softmax):
        for dim in (1, 2):
            assert torch.autograd.gradcheck(
                lambda t, fn=fn, dim=dim: fn(t, dim), (x,), fast_mode=True
            )
    assert launches[FWD] > 0 and launches[BWD] > 0


def test_dtype_argument_and_implicit_dim(backend):
    x = _x((2, 3, 4))
    assert_close(softmax(x, 1, dtype=torch.float64), F.softmax(x, 1, dtype=torch.float64))
    assert softmax(x, 1, dtype=torch.float64).dtype == torch.float64
    assert_close(log_softmax(x, 0, dtype=torch.float16), F.log_softmax(x, 0, dtype=torch.float16))
    for shape in [(5,), (2, 3), (2, 3, 4), (2, 3, 4, 5)]:
        x = _x(shape)
        with pytest.warns(UserWarning, match="Implicit dimension"):
            y = fusedmlp.nn.Softmax()(x)
        with pytest.warns(UserWarning, match="Implicit dimension"):
            ry = torch.nn.Softmax()(x)
        assert_close(y, ry)
        with pytest.warns(UserWarning, match="Implicit dimension"):
            assert_close(fusedmlp.nn.LogSoftmax()(x), torch.nn.LogSoftmax(dim=None)(x))
    scalar = torch.tensor(2.0, device=DEVICE)
    assert_close(softmax(scalar, 0), F.softmax(scalar, 0))
    with pytest.raises(IndexError):
        softmax(_x((2, 3)), 2)


def test_modules(backend):
    x = _x((4, 6))
    for ours, ref in (
        (fusedmlp.nn.Softmax(dim=1), torch.nn.Softmax(dim=1)),
        (fusedmlp.nn.LogSoftmax(dim=0), torch.nn.LogSoftmax(dim=0)),
    ):
        assert repr(ours) == repr(ref)
        assert_close(ours(x), ref(x))


@pytest.mark.parametrize("name", ["Softmax", "LogSoftmax"])
def test_bad_dim_errors_like_torch(backend, name):
    """A dim that is not an int: torch's error, word for word (a bool too: the Triton path took
    True as dim 1). torch's own TypeError, except a str dim (a dimension name) on torch releases
    that look it up among the tensor's names (2.11: a RuntimeError)."""
    x = _x((2, 3))
    fn = fusedmlp.functional.softmax if name == "Softmax" else fusedmlp.functional.log_softmax
    for dim in ("a", (1,), 1.5, True, False):
        with pytest.raises((TypeError, RuntimeError)) as theirs:
            getattr(torch.nn, name)(dim)(x)
        assert isinstance(theirs.value, TypeError) or isinstance(dim, str)
        with pytest.raises(type(theirs.value)) as ours:
            getattr(fusedmlp.nn, name)(dim)(x)
        assert str(ours.value) == str(theirs.value)
        with pytest.raises(type(theirs.value)) as ours:
            fn(x, dim)
        assert type(ours.value) is type(theirs.value)


def test_double_backward_raises(triton_backend):
    x = _x((3, 5)).requires_grad_()
    (g,) = torch.autograd.grad((softmax(x, 1) * _x((3, 5), seed=3)).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


@pytest.mark.parametrize("offset", [1e3, 1e4, 1e5])
def test_log_softmax_of_large_logits_keeps_full_precision(triton_backend, offset):
    # (x - m) - log(s), not x - (m + log(s)): against float64, as torch's (~1e-7 here).
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(5, 300, generator=g) + offset).to(DEVICE).requires_grad_()
    y = log_softmax(x, 1)
    ref = torch.log_softmax(x.detach().double(), 1)
    torch.testing.assert_close(y.detach().double(), ref, rtol=0, atol=2e-6)
    gy = torch.randn(5, 300, generator=g).to(DEVICE)
    (gx,) = torch.autograd.grad(y, x, gy)
    xr = x.detach().double().requires_grad_()
    (gr,) = torch.autograd.grad(torch.log_softmax(xr, 1), xr, gy.double())
    torch.testing.assert_close(gx.double(), gr, rtol=0, atol=1e-5)
