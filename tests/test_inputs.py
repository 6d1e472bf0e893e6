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
