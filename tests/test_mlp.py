"""fusedmlp.nn.MLP: structure, state_dict layout, equality with its torch twin, training."""

import math

import numpy as np
import pytest
import torch
from conftest import DEVICE, assert_close, assert_step_like, saved_loaded_copied

import fusedmlp
from fusedmlp.nn import MLP


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: torch's intra-op threads only add overhead (and stall on a busy 2-core box)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _types(seq):
    return [type(m) for m in seq]


def test_structure_without_batchnorm():
    m = MLP(5, [7, 9], 3)
    L = fusedmlp.nn.Linear
    assert _types(m.layers) == [L, torch.nn.Identity, L, torch.nn.Identity, L]
    assert m.layers[0].activation == "relu" and m.layers[2].activation == "relu"
    assert m.layers[4].activation is None  # the head: logits
    assert [(x.in_features, x.out_features) for x in m.layers[::2]] == [(5, 7), (7, 9), (9, 3)]


def test_structure_with_batchnorm_and_dropout():
    m = MLP(4, 6, 2, activation="tanh", batchnorm=True, dropout=0.25)
    assert _types(m.layers) == [
        fusedmlp.nn.Linear,
        fusedmlp.nn.BatchNorm1d,
        torch.nn.Tanh,
        fusedmlp.nn.Dropout,
        fusedmlp.nn.Linear,
    ]
    assert m.layers[0].activation is None  # the activation comes after the BatchNorm
    assert m.layers[3].p == 0.25
    assert m.hidden_features == (6,)


def test_state_dict_keys_documented_layout():
    m = MLP(4, [8, 8], 3, batchnorm=True, dropout=0.1)
    keys = list(m.state_dict())
    assert keys[:7] == [
        "layers.0.weight",
        "layers.0.bias",
        "layers.1.weight",
        "layers.1.bias",
        "layers.1.running_mean",
        "layers.1.running_var",
        "layers.1.num_batches_tracked",
    ]
    assert keys[-2:] == ["layers.8.weight", "layers.8.bias"]
    # the same keys as the plain torch chain and as convert() of that chain
    ref = m.to_torch()
    assert list(ref.state_dict()) == keys
    assert list(fusedmlp.nn.convert(ref).state_dict()) == keys
    assert list(MLP(4, [8, 8], 3, bias=False).state_dict()) == [
        "layers.0.weight",
        "layers.2.weight",
        "layers.4.weight",
    ]


def test_init_matches_torch_linear():
    torch.manual_seed(0)
    m = MLP(6, [5], 4)
    torch.manual_seed(0)
    a = torch.nn.Linear(6, 5)
    b = torch.nn.Linear(5, 4)
    assert_close(m.layers[0].weight, a.weight)
    assert_close(m.layers[2].bias, b.bias)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"activation": "relu"},
        {"activation": "leaky_relu", "negative_slope": 0.2},
        {"activation": "sigmoid", "batchnorm": True},
        {"activation": None},
    ],
)
def test_equals_torch_twin_forward_backward(kwargs):
    torch.manual_seed(1)
    m = MLP(7, [9, 5], 3, **kwargs)
    ref = m.to_torch()
    assert all(type(x).__module__.startswith("torch.") for x in ref.modules() if x is not ref)
    x = torch.randn(11, 7)
    out, out_ref = m(x), ref(x)
    assert_close(out, out_ref)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    for (name, p), p_ref in zip(m.named_parameters(), ref.parameters()):
        assert_close(p.grad, p_ref.grad, msg=name)
    m.eval()
    ref.eval()
    assert_close(m(x), ref(x))


def test_to_torch_keeps_dtype_mode_and_requires_grad():
    m = MLP(3, 4, 2, batchnorm=True, dtype=torch.float64)
    m.layers[0].weight.requires_grad_(False)
    m.eval()
    ref = m.to_torch()
    assert all(p.dtype == torch.float64 for p in ref.parameters())
    assert not ref.layers[0].weight.requires_grad and ref.layers[3].weight.requires_grad
    assert not ref.training and not ref.layers[1].training
    # a copy: training the twin leaves the original alone
    with torch.no_grad():
        ref.layers[0].weight.add_(1)
    assert not torch.equal(ref.layers[0].weight, m.layers[0].weight)


def test_to_torch_keeps_each_tensors_dtype():
    # a half model whose BatchNorm stays in float32 (the usual mixed-precision layout): the twin
    # keeps every tensor's dtype and exact value, not the first parameter's dtype for all
    m = MLP(3, 4, 2, batchnorm=True).half()
    m.layers[1].float()
    ref = m.to_torch()
    assert list(ref.state_dict()) == list(m.state_dict())
    for (k, a), b in zip(m.state_dict().items(), ref.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), k
        assert a.data_ptr() != b.data_ptr(), k  # copies
    assert all(type(p) is torch.nn.Parameter for p in ref.parameters())
    x = torch.randn(5, 3, dtype=torch.float16)
    m.eval()
    ref.eval()
    assert_close(m(x), ref(x))
    # a model on the meta device (no storage) gives a meta twin
    assert next(MLP(3, 4, 2, device="meta").to_torch().parameters()).is_meta


@pytest.mark.parametrize("batchnorm", [False, True])
def test_to_torch_follows_attributes_changed_after_construction(
    triton_backend, launches, batchnorm
):
    # the twin is built from the modules as they are, not from the constructor's arguments
    torch.manual_seed(0)
    m = MLP(5, [16], 3, activation="leaky_relu", batchnorm=batchnorm, dropout=0.5).to(DEVICE)
    drop = m.layers[3 if batchnorm else 2]
    drop.p, drop.inplace = 1.0, True
    m.layers[-1].bias = None
    if batchnorm:
        m.layers[1].momentum, m.layers[1].eps = None, 0.25
        m.layers[2].negative_slope = 0.3
    else:
        m.layers[0].negative_slope = 0.3
    ref = m.to_torch()
    assert all(type(x).__module__.startswith("torch.") for x in ref.modules() if x is not ref)
    assert list(ref.state_dict()) == list(m.state_dict())
    slope = ref.layers[2 if batchnorm else 1]
    assert type(slope) is torch.nn.LeakyReLU and slope.negative_slope == 0.3
    drop_ref = ref.layers[3 if batchnorm else 2]
    assert (drop_ref.p, drop_ref.inplace) == (1.0, True)
    if batchnorm:
        assert (ref.layers[1].momentum, ref.layers[1].eps) == (None, 0.25)
    x = torch.randn(8, 5, device=DEVICE)
    for _ in range(2):
        assert_step_like(m, ref, x)
    assert launches.total > 0
    # a fused activation with no Identity slot after it cannot be written with torch's modules
    m.layers[-1].activation = "relu"
    with pytest.raises(ValueError, match="no Identity"):
        m.to_torch()


def test_to_torch_of_a_parametrized_module_is_torch(triton_backend, launches):
    # a parametrization registered after construction puts torch's ParametrizedLinear class over
    # fusedmlp's Linear: the twin was left with that class, so it ran fusedmlp's forward with
    # the fused tanh AND the Tanh put in the slot after it (tanh(tanh(z)))
    from torch.nn.utils import parametrize

    class Scale(torch.nn.Module):
        def forward(self, w):
            return w * 1.25

    torch.manual_seed(0)
    m = MLP(3, [16], 2, activation="tanh", batchnorm=False).to(DEVICE)
    x = torch.randn(5, 3, device=DEVICE)
    m(x)
    parametrize.register_parametrization(m.layers[0], "weight", Scale())
    parametrize.register_parametrization(m.layers[2], "bias", Scale())
    ref = m.to_torch()
    assert [type(layer).__mro__[1] for layer in (ref.layers[0], ref.layers[2])] == [
        torch.nn.Linear,
        torch.nn.Linear,
    ]
    assert not hasattr(ref.layers[0], "activation")
    assert type(ref.layers[1]) is torch.nn.Tanh
    assert list(ref.state_dict()) == list(m.state_dict())
    assert_step_like(m, ref, x)
    assert launches.total > 0
    # removing the parametrization restores the torch class (its ``__bases__[0]``)
    parametrize.remove_parametrizations(ref.layers[0], "weight")
    assert type(ref.layers[0]) is torch.nn.Linear
    assert_close(m(x), ref(x))


@pytest.mark.parametrize("reparametrize", ["weight_norm", "spectral_norm", "prune"])
def test_to_torch_keeps_hook_based_reparametrizations(triton_backend, launches, reparametrize):
    # torch's hook-based weight_norm / spectral_norm / prune make the weight in a forward
    # pre-hook: the twin dropped every hook, so it kept the weight of the last forward (a
    # deep copy works after a forward under no_grad), stale after the next update, and its
    # weight_g / weight_v / weight_orig got no gradient
    import warnings

    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    m = MLP(3, [16], 2, activation="tanh").to(DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # weight_norm's deprecation
        if reparametrize == "weight_norm":
            torch.nn.utils.weight_norm(m.layers[0])
        elif reparametrize == "spectral_norm":
            torch.nn.utils.spectral_norm(m.layers[0])
        else:
            prune.l1_unstructured(m.layers[0], "weight", amount=0.5)
    x = torch.randn(5, 3, device=DEVICE)
    with torch.no_grad():
        m(x)
    ref = m.to_torch()
    assert type(ref.layers[0]) is torch.nn.Linear
    with torch.no_grad():
        for net in (m, ref):
            for name, q in net.named_parameters():
                if name.startswith("layers.0.weight"):
                    q.mul_(1.5).add_(0.25)
    for _ in range(2):
        assert_step_like(m, ref, x)
    assert launches.total > 0


def test_repr_shows_the_leaky_relu_slope():
    assert "negative_slope=0.2" in repr(MLP(3, 4, 2, activation="leaky_relu", negative_slope=0.2))
    assert "negative_slope" not in repr(MLP(3, 4, 2))


@pytest.mark.parametrize("batchnorm", [False, True])
def test_backward_twice_with_retain_graph_as_torch(triton_backend, launches, batchnorm):
    # the fused blocks hand tensors from one backward step to the next (dZ^T for the Linear
    # before a batch norm): a second backward through the same graph recomputes what the first
    # one used up, and the gradients accumulate as torch's
    torch.manual_seed(0)
    m = MLP(5, [6, 4], 3, activation="tanh", batchnorm=batchnorm).to(DEVICE)
    ref = m.to_torch()
    x = torch.randn(9, 5, device=DEVICE)
    g1, g2 = torch.randn(9, 3, device=DEVICE), torch.randn(9, 3, device=DEVICE)
    xs = []
    for net in (m, ref):
        xs.append(x.clone().requires_grad_())
        y = net(xs[-1])
        y.backward(g1, retain_graph=True)
        y.backward(g2)
    assert launches.total > 0
    assert_close(xs[0].grad, xs[1].grad)
    for (name, p), p_ref in zip(m.named_parameters(), ref.parameters()):
        assert_close(p.grad, p_ref.grad, msg=name)


def test_deepcopy_and_pickle_of_the_whole_module(triton_backend):
    torch.manual_seed(0)
    kwargs = {"activation": "leaky_relu", "negative_slope": 0.1, "batchnorm": True, "dropout": 0.2}
    m = MLP(4, [6], 3, **kwargs).to(DEVICE)
    m(torch.randn(8, 4, device=DEVICE))  # running statistics that differ from a fresh module's
    loaded, copied, state = saved_loaded_copied(m)
    ref = MLP(4, [6], 3, **kwargs, device=DEVICE).to_torch()
    ref.load_state_dict(state)  # a careful user's checkpoint
    for other in (loaded, copied):
        assert type(other.layers) is type(m.layers) and repr(other) == repr(m)
        assert all(p is not q for p, q in zip(other.parameters(), m.parameters()))
        for (k, a), b in zip(other.state_dict().items(), m.state_dict().values()):
            assert torch.equal(a, b), k
    x = torch.randn(5, 4, device=DEVICE)
    for net in (m, loaded, copied, ref):
        net.eval()
    for net in (loaded, copied):
        assert_close(net(x), m(x))
    assert_close(ref(x), m(x))
    # the copies train on: the same step gives the same state
    for net in (m, loaded, copied):
        net.train()
        torch.manual_seed(3)
        net(x).sum().backward()
    for net in (loaded, copied):
        for (name, p), q in zip(net.named_parameters(), m.parameters()):
            assert_close(p.grad, q.grad, msg=name)
        assert_close(net.layers[1].running_var, m.layers[1].running_var)


def test_bad_arguments():
    with pytest.raises(TypeError, match="hidden_features"):
        MLP(3, "8", 2)
    with pytest.raises(ValueError, match="hidden_features"):
        MLP(3, [8, 0], 2)
    with pytest.raises(ValueError, match="activation"):
        MLP(3, 8, 2, activation="softplus")
    with pytest.raises(ValueError, match="dropout"):
        MLP(3, 8, 2, dropout=1.0)
    with pytest.raises(ValueError, match="in_features"):
        MLP(0, 8, 2)
    for dropout in ("0.1", None, True):  # a string was compared as a float's text before
        with pytest.raises(TypeError, match="dropout"):
            MLP(3, 8, 2, dropout=dropout)


def test_numpy_integers_as_torch_linear_takes_them():
    # torch.nn.Linear takes numpy integers for its sizes; so does the MLP, as ints
    torch.manual_seed(0)
    ours = MLP(np.int64(3), [np.int32(8), 4], np.int64(2), batchnorm=True)
    torch.manual_seed(0)
    ref = MLP(3, [8, 4], 2, batchnorm=True)
    assert type(ours.in_features) is int and ours.hidden_features == (8, 4)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for a, b in zip(ours.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)


def _disc(n, gen):
    x = torch.empty(n, 2).uniform_(-1, 1, generator=gen)
    return x, (x.pow(2).sum(1) < 2 / math.pi).long()


def test_training_reduces_loss_and_matches_torch():
    """Fused Adam + MLP (BatchNorm, no dropout) tracks torch's Adam + the twin step by step."""
    gen = torch.Generator().manual_seed(0)
    x, y = _disc(256, gen)
    torch.manual_seed(0)
    m = MLP(2, [32, 32], 2, batchnorm=True)
    ref = m.to_torch()
    opt = fusedmlp.optim.Adam(m.parameters(), lr=1e-2)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2)
    loss_fn = fusedmlp.nn.CrossEntropyLoss()
    losses, losses_ref = [], []
    for step in range(40):
        idx = torch.randperm(256, generator=gen)[:64]
        for net, o, fn, out in (
            (m, opt, loss_fn, losses),
            (ref, opt_ref, torch.nn.functional.cross_entropy, losses_ref),
        ):
            o.zero_grad()
            loss = fn(net(x[idx]), y[idx])
            loss.backward()
            o.step()
            out.append(loss.item())
        if step < 5:
            assert losses[-1] == pytest.approx(losses_ref[-1], rel=1e-4, abs=1e-5)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    m.eval()
    xt, yt = _disc(512, gen)
    with torch.no_grad():
        assert (m(xt).argmax(1) == yt).float().mean() > 0.8


def test_training_with_dropout_reduces_loss():
    gen = torch.Generator().manual_seed(1)
    x, y = _disc(256, gen)
    torch.manual_seed(1)
    m = MLP(2, [32, 32], 2, dropout=0.1)
    opt = fusedmlp.optim.SGD(m.parameters(), lr=0.2, momentum=0.9)
    loss_fn = fusedmlp.nn.CrossEntropyLoss()
    losses = []
    for _ in range(60):
        idx = torch.randperm(256, generator=gen)[:64]
        opt.zero_grad()
        loss = loss_fn(m(x[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def _backward_as_twin(m, ref, x, out):
    """``out = m(x)`` (backpropagated from ``out.square().sum()``) against torch's twin ``ref``
    on a copy of ``x``: the outputs and every gradient."""
    xr = x.detach().clone().requires_grad_()
    out_ref = ref(xr)
    out_ref.square().sum().backward()
    assert_close(out, out_ref)
    assert_close(x.grad, xr.grad)
    for (name, q), q_ref in zip(m.named_parameters(), ref.parameters()):
        assert_close(q.grad, q_ref.grad, msg=name)


class _InPlaceMask(torch.nn.Module):
    """torch's ``Dropout(inplace=True)`` with a given (scaled) mask: ``x.mul_(mask)``."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x.mul_(self.mask)


@pytest.mark.parametrize(
    "hook", ["none", "dropout forward", "linear pre", "head forward", "linear full backward"]
)
@pytest.mark.parametrize("batchnorm", [False, True])
def test_leaky_relu_with_inplace_dropout_and_hooks_as_torch(
    triton_backend, launches, hook, batchnorm
):
    # torch's Linear -> LeakyReLU -> Dropout(inplace=True) backpropagates: LeakyReLU keeps its
    # input, the dropout edits its output. The MLP's Linear with the leaky_relu fused keeps its
    # output: where the block did not run fused (a hook on one of its modules or on the module
    # that reads it), the in-place dropout edited that saved output and the backward raised
    # "modified by an inplace operation" (with a full backward hook on the Linear, torch's
    # "Output 0 of BackwardHookFunction is a view and is being modified inplace").
    torch.manual_seed(0)
    p, slope, n = 0.5, 0.2, 6
    m = MLP(4, [8, 8], 3, activation="leaky_relu", negative_slope=slope, batchnorm=batchnorm,
            dropout=p).to(DEVICE)  # fmt: skip
    drops = [i for i, c in enumerate(m.layers) if isinstance(c, torch.nn.Dropout)]
    for i in drops:
        m.layers[i].inplace = True
    ref = m.to_torch()
    for i in drops:
        assert ref.layers[i].inplace
    seen = []
    layers = m.layers
    if hook == "dropout forward":
        for i in drops:
            layers[i].register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    elif hook == "linear pre":
        layers[0].register_forward_pre_hook(lambda mod, i: seen.append(i[0].shape))
    elif hook == "head forward":
        layers[drops[0] + 1].register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    elif hook == "linear full backward":
        layers[0].register_full_backward_hook(lambda mod, gi, go: seen.append(go[0].shape))
    x = torch.randn(n, 4, device=DEVICE, requires_grad=True)
    torch.manual_seed(1)
    out = m(x)
    out.square().sum().backward()
    assert launches["_linear_fwd_kernel"] > 0
    # torch's twin with the same masks (fusedmlp's, redrawn from the same seed)
    torch.manual_seed(1)
    ones = torch.ones(n, 8, device=DEVICE)
    for i in drops:
        ref.layers[i] = _InPlaceMask(fusedmlp.functional.dropout(ones, p))
    _backward_as_twin(m, ref, x, out)
    if hook == "dropout forward":
        assert seen == [(n, 8), (n, 8)]
    else:
        assert len(seen) == (hook != "none")


def test_parametrized_leaky_relu_linear_with_inplace_dropout_as_torch(triton_backend, launches):
    # a parametrization registered after a first step swaps torch's ParametrizedLinear (a
    # subclass of fusedmlp's Linear, same forward) in: it ran as a plain module that keeps its
    # output, which the in-place dropout then edited, and the backward raised "modified by an
    # inplace operation" where torch's chain (LeakyReLU keeps its input) backpropagates
    from torch.nn.utils import parametrize

    class Scale(torch.nn.Module):
        def forward(self, w):
            return w * 1.25

    torch.manual_seed(0)
    p, n = 0.5, 6
    m = MLP(4, [16], 3, activation="leaky_relu", negative_slope=0.2, dropout=p).to(DEVICE)
    m.layers[2].inplace = True
    x = torch.randn(n, 4, device=DEVICE, requires_grad=True)
    m(x).sum().backward()
    parametrize.register_parametrization(m.layers[0], "weight", Scale())
    ref = m.to_torch()
    m.zero_grad()
    x.grad = None
    torch.manual_seed(1)
    out = m(x)
    out.square().sum().backward()
    assert launches["_linear_fwd_kernel"] > 0
    torch.manual_seed(1)
    ref.layers[2] = _InPlaceMask(fusedmlp.functional.dropout(torch.ones(n, 16, device=DEVICE), p))
    _backward_as_twin(m, ref, x, out)
