"""Edge inputs every op meets as torch does: empty batches, NaN/Inf, float64 under ``auto``,
double backward, and mismatched devices/dtypes caught before any launch."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_close

import fusedmlp
import fusedmlp.functional as FF


def _ops():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 4, generator=g).to(DEVICE)
    b = torch.randn(5, generator=g).to(DEVICE)
    rm, rv = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    t = torch.randint(0, 4, (64,), generator=g).to(DEVICE)
    return {
        "linear": (
            lambda x: FF.linear(x, w, b, activation="relu"),
            lambda x: F.relu(F.linear(x, w, b)),
        ),
        "batch_norm": (
            lambda x: FF.batch_norm(x, rm.clone(), rv.clone(), training=True),
            lambda x: F.batch_norm(x, rm.clone(), rv.clone(), training=True),
        ),
        "cross_entropy": (
            lambda x: FF.cross_entropy(x, t[: x.shape[0]], reduction="none"),
            lambda x: F.cross_entropy(x, t[: x.shape[0]], reduction="none"),
        ),
        "softmax": (lambda x: FF.softmax(x, 1), lambda x: F.softmax(x, 1)),
        "log_softmax": (lambda x: FF.log_softmax(x, 1), lambda x: F.log_softmax(x, 1)),
    }


@pytest.mark.parametrize("op", ["linear", "cross_entropy", "softmax", "log_softmax"])
def test_empty_batch_behaves_like_torch(backend, op):
    ours, theirs = _ops()[op]
    x = torch.zeros(0, 4, device=DEVICE, requires_grad=True)
    y, ref = ours(x), theirs(x.detach().requires_grad_())
    assert y.shape == ref.shape and y.dtype == ref.dtype
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_empty_batch_norm_behaves_like_torch(backend):
    x = torch.zeros(0, 4, device=DEVICE)
    stats = [torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)]
    ref_stats = [t.clone() for t in stats]
    y = FF.batch_norm(x, *stats, training=True)
    ref = F.batch_norm(x, *ref_stats, training=True)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    for a, e in zip(stats, ref_stats):
        torch.testing.assert_close(a, e, equal_nan=True)


@pytest.mark.parametrize("op", ["linear", "cross_entropy", "softmax", "log_softmax", "batch_norm"])
def test_nan_and_inf_propagate_like_torch(backend, launches, op):
    ours, theirs = _ops()[op]
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    x[1, 2] = math.nan
    x[3, 0] = math.inf
    y, ref = ours(x), theirs(x)
    # NaN where torch has NaN (a NaN in one row of cross-entropy leaves the other rows alone)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)), (y, ref)
    assert torch.equal(torch.isinf(y), torch.isinf(ref))
    finite = torch.isfinite(ref)
    assert_close(y[finite], ref[finite])
    assert (launches.total > 0) == (backend == "triton")


def test_float64_under_auto_takes_the_fallback(launches):
    x = torch.randn(3, 4, dtype=torch.float64, device=DEVICE)
    w = torch.randn(5, 4, dtype=torch.float64, device=DEVICE)
    with fusedmlp.use_backend("auto"):
        y = FF.linear(x, w, activation="tanh")
        FF.cross_entropy(x, torch.tensor([0, 1, 2], device=DEVICE))
        FF.dropout(x, 0.5)
    assert launches.total == 0
    torch.testing.assert_close(y, torch.tanh(x @ w.t()))


@pytest.mark.parametrize("op", ["linear", "cross_entropy", "softmax", "batch_norm"])
def test_double_backward_through_a_fused_op_is_a_clear_error(triton_backend, op):
    ours, _ = _ops()[op]
    x = torch.randn(6, 4, device=DEVICE, requires_grad=True)
    (g,) = torch.autograd.grad(ours(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate|double backward|twice"):
        g.sum().backward()


@pytest.mark.parametrize(
    "op", ["linear", "cross_entropy", "softmax", "log_softmax", "batch_norm", "mlp_block"]
)
@pytest.mark.parametrize("how", ["backward", "grad"])
def test_gradient_penalty_through_a_fused_op_raises_never_drops_a_term(triton_backend, op, how):
    # A gradient penalty with a non-leaf input: the first gradient is taken with create_graph
    # and plain incoming gradients, then differentiated again with respect to a parameter before
    # the op. torch.autograd.function.once_differentiable lets this through with the op's own
    # second-order term silently missing; fusedmlp's raises.
    torch.manual_seed(0)
    m = torch.randn(4, 4, device=DEVICE, requires_grad=True)
    a = torch.randn(6, 4, device=DEVICE, requires_grad=True)
    if op == "mlp_block":
        block = fusedmlp.nn.MLP(4, [8], 3, activation="tanh", batchnorm=True, dropout=0.2)
        ours = block.to(DEVICE)
    else:
        ours, _ = _ops()[op]
    with pytest.raises(RuntimeError, match="double backward"):
        (g,) = torch.autograd.grad(ours(a @ m).sum(), a, create_graph=True)
        penalty = g.square().sum()
        if how == "backward":
            penalty.backward()
        else:
            torch.autograd.grad(penalty, m, allow_unused=True)


def test_create_graph_without_a_second_differentiation_works(triton_backend):
    x = torch.randn(6, 4, device=DEVICE, requires_grad=True)
    ours, theirs = _ops()["softmax"]
    (g,) = torch.autograd.grad(ours(x).square().sum(), x, create_graph=True)
    (ref,) = torch.autograd.grad(theirs(x).square().sum(), x)
    assert_close(g.detach(), ref)


def test_mismatched_dtypes_raise_before_any_launch(triton_backend, launches):
    x = torch.randn(3, 4, device=DEVICE)
    with pytest.raises(RuntimeError, match="dtype"):
        FF.linear(x, torch.randn(5, 4, device=DEVICE, dtype=torch.float16))
    with pytest.raises(RuntimeError):
        FF.batch_norm(
            x, None, None, torch.ones(4, device=DEVICE, dtype=torch.float64), training=True
        )
    assert launches.total == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device beside the CPU")
def test_cuda_input_with_cpu_parameters_raises_before_any_launch(launches):
    x = torch.randn(3, 4, device="cuda")
    with pytest.raises(RuntimeError, match="device"):
        FF.linear(x, torch.randn(5, 4))
    assert launches.total == 0


def test_meta_tensors_give_torch_shapes():
    # No autocast region exists for the meta device: the dispatch must not ask torch for one.
    x = torch.randn(3, 4, device="meta")
    w = torch.randn(5, 4, device="meta")
    t = torch.zeros(3, dtype=torch.long, device="meta")
    assert FF.linear(x, w, activation="relu").shape == F.linear(x, w).shape
    assert FF.softmax(x, 1).shape == (3, 4)
    assert FF.cross_entropy(x, t).shape == F.cross_entropy(x, t).shape
    assert fusedmlp.nn.Linear(4, 5, device="meta")(x).device.type == "meta"


def test_running_statistics_update_leaves_version_counters_as_torch(triton_backend, launches):
    # Parameters and running statistics sharing one storage (a flat buffer): torch's batch norm
    # updates the statistics without bumping the shared version counter, so the weight that the
    # Linear before it saved for backward stays valid. The same with fusedmlp's modules, alone
    # and as a fused block (convert: the statistics from the Linear's epilogue).
    def chain(kind):
        seq = torch.nn.Sequential(
            torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.ReLU(), torch.nn.Linear(3, 2)
        ).to(DEVICE)
        if kind == "modules":
            seq[0], seq[1] = (
                fusedmlp.nn.Linear(4, 3).to(DEVICE),
                fusedmlp.nn.BatchNorm1d(3).to(DEVICE),
            )
        elif kind == "fused":
            seq = fusedmlp.nn.convert(seq, inplace=True)
        return seq

    outcomes = []
    for kind in ("torch", "modules", "fused"):
        seq = chain(kind)
        flat = torch.randn(40, device=DEVICE)
        seq[0].weight = torch.nn.Parameter(flat[:12].view(3, 4))
        seq[1].running_mean = flat[20:23]
        before = seq[1].running_mean._version
        try:
            seq(torch.randn(5, 4, device=DEVICE)).sum().backward()
            raised = False
        except RuntimeError:
            raised = True
        outcomes.append((raised, seq[1].running_mean._version - before))
    assert launches.total > 0
    assert outcomes == [(False, 0)] * 3


# ------------------------------------------- bad inputs against torch's own op (one table)


def _x(*shape, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)


def _expanded(*shape):
    return _x(*([1] * len(shape))).expand(*shape)


def _stats(n=3, dtype=torch.float32):
    return torch.zeros(n, device=DEVICE, dtype=dtype), torch.ones(n, device=DEVICE, dtype=dtype)


def _leaky_mlp(torch_chain: bool):
    torch.manual_seed(0)
    m = fusedmlp.nn.MLP(4, [16], 2, activation="leaky_relu", negative_slope=1e308, dropout=0.3)
    m = m.to(DEVICE)
    return m.to_torch() if torch_chain else m


# id -> (fusedmlp's call, torch's call): torch raises, fusedmlp raises the same type, before
# any launch (a sweep of bad arguments through every op found these).
_BAD_INPUTS = {
    # leaky_relu's negative_slope overflows the fp32 compute type (fp64 takes it)
    "linear-slope-overflow-fp32": (
        lambda: FF.linear(_x(3, 4), _x(5, 4), None, "leaky_relu", 1e308),
        lambda: F.leaky_relu(F.linear(_x(3, 4), _x(5, 4)), 1e308),
    ),
    "linear-slope-overflow-fp16": (
        lambda: FF.linear(_x(3, 4).half(), _x(5, 4).half(), None, "leaky_relu", -1e39),
        lambda: F.leaky_relu(_x(3, 5).half(), -1e39),
    ),
    "linear-1d-weight-slope-overflow": (
        lambda: FF.linear(_x(3, 4), _x(4), None, "leaky_relu", 1e308),
        lambda: F.leaky_relu(F.linear(_x(3, 4), _x(4)), 1e308),
    ),
    "linear-slope-tensor-requiring-grad": (
        lambda: FF.linear(
            _x(3, 4), _x(5, 4), None, "leaky_relu", torch.tensor(0.2, requires_grad=True)
        ),
        lambda: F.leaky_relu(_x(3, 5), torch.tensor(0.2, requires_grad=True)),
    ),
    "nn.Linear-slope-overflow": (
        lambda: fusedmlp.nn.Linear(4, 5, activation="leaky_relu", negative_slope=1e308).to(DEVICE)(
            _x(3, 4)
        ),
        lambda: torch.nn.LeakyReLU(1e308)(_x(3, 5)),
    ),
    "nn.Linear-slope-str": (  # float() alone would read "0.5"
        lambda: fusedmlp.nn.Linear(4, 5, activation="leaky_relu", negative_slope="0.5"),
        lambda: torch.nn.LeakyReLU("0.5")(_x(3, 5)),
    ),
    "nn.Linear-slope-tensor-requiring-grad": (
        lambda: fusedmlp.nn.Linear(
            4, 5, activation="leaky_relu", negative_slope=torch.tensor(0.2, requires_grad=True)
        ),
        lambda: torch.nn.LeakyReLU(torch.tensor(0.2, requires_grad=True))(_x(3, 5)),
    ),
    "MLP-slope-str": (
        lambda: fusedmlp.nn.MLP(4, [6], 2, activation="leaky_relu", negative_slope="0.5"),
        lambda: torch.nn.LeakyReLU("0.5")(_x(3, 5)),
    ),
    # the fused Linear -> LeakyReLU -> Dropout block took the overflowing slope silently
    "MLP-dropout-slope-overflow": (
        lambda: _leaky_mlp(False)(_x(5, 4)),
        lambda: _leaky_mlp(True)(_x(5, 4)),
    ),
    # F.batch_norm's Python checks come before its argument parser's
    "batch_norm-list-input-training": (
        lambda: FF.batch_norm(_x(4, 3).tolist(), None, None, training=True),
        lambda: F.batch_norm(_x(4, 3).tolist(), None, None, training=True),
    ),
    "batch_norm-training-str-bad-eps": (
        lambda: FF.batch_norm(_x(4, 3), None, None, training="yes", eps=-1.0),
        lambda: F.batch_norm(_x(4, 3), None, None, training="yes", eps=-1.0),
    ),
    # torch's argument parser takes a 0-d tensor for the float momentum only without grad
    "batch_norm-momentum-tensor-requiring-grad": (
        lambda: FF.batch_norm(
            _x(4, 3), *_stats(), training=True, momentum=torch.tensor(0.1, requires_grad=True)
        ),
        lambda: F.batch_norm(
            _x(4, 3), *_stats(), training=True, momentum=torch.tensor(0.1, requires_grad=True)
        ),
    ),
    # torch's C++ order: element counts, then 'both or neither' running statistics
    "batch_norm-running-mean-size-without-var": (
        lambda: FF.batch_norm(_x(4, 3), torch.zeros(5, device=DEVICE), None, training=True),
        lambda: F.batch_norm(_x(4, 3), torch.zeros(5, device=DEVICE), None, training=True),
    ),
    "batch_norm-running-mean-requiring-grad-without-var": (
        lambda: FF.batch_norm(_x(4, 3), _x(3).requires_grad_(), None, training=True),
        lambda: F.batch_norm(_x(4, 3), _x(3).requires_grad_(), None, training=True),
    ),
    # inputs of fewer than 2 dims: torch reads 0 channels and checks the statistics against it
    "batch_norm-0d-eval": (
        lambda: FF.batch_norm(_x(), *_stats(), training=False),
        lambda: F.batch_norm(_x(), *_stats(), training=False),
    ),
    "batch_norm-0d-eval-no-stats": (
        lambda: FF.batch_norm(_x(), None, None, training=False),
        lambda: F.batch_norm(_x(), None, None, training=False),
    ),
    "batch_norm-1d-eval-no-stats": (
        lambda: FF.batch_norm(_x(4), None, None, _x(3), training=False),
        lambda: F.batch_norm(_x(4), None, None, _x(3), training=False),
    ),
    "batch_norm-1d-weight": (
        lambda: FF.batch_norm(_x(4), None, None, _x(3), training=True),
        lambda: F.batch_norm(_x(4), None, None, _x(3), training=True),
    ),
    # in place into an expanded (stride-0) tensor
    "dropout-inplace-expanded": (
        lambda: FF.dropout(_expanded(4, 6), 0.5, True, True),
        lambda: F.dropout(_expanded(4, 6), 0.5, True, True),
    ),
    "dropout-inplace-expanded-p1": (
        lambda: FF.dropout(_expanded(4, 6), 1.0, True, True),
        lambda: F.dropout(_expanded(4, 6), 1.0, True, True),
    ),
    "dropout2d-inplace-expanded": (
        lambda: FF.dropout2d(_expanded(2, 3, 2, 2), 0.5, True, True),
        lambda: F.dropout2d(_expanded(2, 3, 2, 2), 0.5, True, True),
    ),
    "nn.Dropout-inplace-expanded": (
        lambda: fusedmlp.nn.Dropout(0.5, inplace=True)(_expanded(4, 6)),
        lambda: torch.nn.Dropout(0.5, inplace=True)(_expanded(4, 6)),
    ),
    # a dtype that is not a torch.dtype (input.to would read it as a device)
    "softmax-dtype-str": (
        lambda: FF.softmax(_x(3, 4), 1, dtype="a"),
        lambda: F.softmax(_x(3, 4), 1, dtype="a"),
    ),
    "log_softmax-dtype-int": (
        lambda: FF.log_softmax(_x(3, 4), 1, dtype=0),
        lambda: F.log_softmax(_x(3, 4), 1, dtype=0),
    ),
}


@pytest.mark.parametrize("case", list(_BAD_INPUTS), ids=list(_BAD_INPUTS))
def test_bad_inputs_raise_torchs_error_before_any_launch(triton_backend, launches, case):
    ours, theirs = _BAD_INPUTS[case]
    with pytest.raises(Exception) as ref:
        theirs()
    with pytest.raises(Exception) as got:
        ours()
    assert type(got.value) is type(ref.value), (got.value, ref.value)
    assert launches.total == 0, dict(launches)


def test_leaky_slope_as_torch_takes_it(triton_backend, launches):
    # a 0-d tensor (torch's Number), an infinite slope, and a huge one for float64
    x, w = _x(3, 4), _x(5, 4)
    for slope in (torch.tensor(0.2), torch.tensor(2), math.inf):
        y = FF.linear(x, w, None, "leaky_relu", slope)
        torch.testing.assert_close(y, F.leaky_relu(F.linear(x, w), slope), equal_nan=True)
    x, w = x.double(), w.double()
    y = FF.linear(x, w, None, "leaky_relu", 1e300)
    torch.testing.assert_close(y, F.leaky_relu(F.linear(x, w), 1e300))
    assert launches.total == 4


def _shared(kind):
    buf = torch.zeros(8, device=DEVICE)
    return {
        "same": (buf[:3], buf[:3]),
        "overlapping": (buf[:3], buf[1:4]),
        "strided-overlapping": (buf[3:6], buf[1:7:2]),
        "interleaved": (buf[0:6:2], buf[1:7:2]),
        "side-by-side": (buf[:3], buf[3:6]),
        "expanded-mean": (buf[:1].expand(3), buf[3:6]),
        "expanded-var": (buf[:3], buf[3:4].expand(3)),
    }[kind]


@pytest.mark.parametrize(
    "kind",
    ["same", "overlapping", "strided-overlapping", "interleaved", "side-by-side",
     "expanded-mean", "expanded-var"],
)  # fmt: skip
def test_running_statistics_sharing_memory(triton_backend, launches, kind):
    # torch's batch norm writes running statistics that share memory one after the other (an
    # expanded one: each channel over the same element), fusedmlp's kernels at once: refused
    # before any launch in training, as torch's own in-place ops refuse it. Views of one
    # buffer that share no element work as torch's; eval mode writes nothing.
    x = _x(6, 3) * 2 + 1
    refuses = kind not in ("interleaved", "side-by-side")
    for training in (True, False):
        ours, theirs = _shared(kind), _shared(kind)
        ref = F.batch_norm(x, *theirs, training=training)
        before = launches.total
        if training and refuses:
            with pytest.raises(RuntimeError, match="memory"):
                FF.batch_norm(x, *ours, training=training)
            assert launches.total == before
            bn = fusedmlp.nn.BatchNorm1d(3).to(DEVICE)
            bn.running_mean, bn.running_var = _shared(kind)
            with pytest.raises(RuntimeError, match="memory"):
                bn(x)
            assert launches.total == before
            continue
        y = FF.batch_norm(x, *ours, training=training)
        assert launches.total > before
        assert_close(y, ref)
        for a, e in zip(ours, theirs):
            assert_close(a, e)


def test_converted_leaky_relu_with_a_string_slope_raises_as_torch(triton_backend):
    # float() would read "0.5": the LeakyReLU is not absorbed, and raises torch's TypeError
    seq = torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.LeakyReLU("0.5"), torch.nn.Linear(16, 2)
    ).to(DEVICE)
    fused = fusedmlp.nn.convert(seq)
    assert type(fused[1]) is torch.nn.LeakyReLU
    for model in (seq, fused):
        with pytest.raises(TypeError, match="negative_slope"):
            model(_x(3, 4))


def test_fake_tensors_pass_the_running_statistics_checks(triton_backend):
    # The training checks that read the running statistics' addresses (shared memory) skip
    # fake tensors, which have none: shape propagation under FakeTensorMode works as torch's.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, rm, rv = torch.randn(4, 3), torch.zeros(3), torch.ones(3)
        out = FF.batch_norm(x, rm, rv, training=True)
        ref = F.batch_norm(x, rm.clone(), rv.clone(), training=True)
    assert out.shape == ref.shape == (4, 3)
