"""fusedmlp.nn.convert: module swapping, activation absorption, inplace semantics, equality."""

import copy
import warnings

import pytest
import torch
from conftest import DEVICE, assert_close, saved_loaded_copied

import fusedmlp
from fusedmlp.nn import convert

F = fusedmlp.nn


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: torch's intra-op threads only add overhead (and stall on a busy 2-core box)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def lecture_model():
    """The lecture's dropout example."""
    nn = torch.nn
    return nn.Sequential(
        nn.Linear(10, 100),
        nn.ReLU(),
        nn.Dropout(),
        nn.Linear(100, 50),
        nn.ReLU(),
        nn.Dropout(),
        nn.Linear(50, 2),
    )


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_lecture_model_copy():
    torch.manual_seed(0)
    model = lecture_model()
    before = _snapshot(model)
    params_before = list(model.parameters())
    conv = convert(model)
    # the original is untouched: same types, same Parameter objects, same values
    assert [type(m) for m in model] == [type(m) for m in lecture_model()]
    assert list(model.parameters()) == params_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the copy: fused Linear+ReLU, ReLU slot -> Identity, fusedmlp Dropout
    assert [type(m) for m in conv] == [
        F.Linear,
        torch.nn.Identity,
        F.Dropout,
        F.Linear,
        torch.nn.Identity,
        F.Dropout,
        F.Linear,
    ]
    assert conv[0].activation == "relu" and conv[3].activation == "relu"
    assert conv[6].activation is None
    assert conv[2].p == 0.5
    assert all(p is not q for p, q in zip(conv.parameters(), model.parameters()))
    _same_state(conv, model)
    x = torch.randn(13, 10)
    model.eval()
    conv.eval()
    assert_close(conv(x), model(x))


def test_lecture_model_inplace_keeps_parameters_and_optimizer():
    torch.manual_seed(0)
    model = lecture_model()
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reference = copy.deepcopy(model)
    out = convert(model, inplace=True)
    assert out is model
    assert type(model[0]) is F.Linear and type(model[1]) is torch.nn.Identity
    assert all(p is q for p, q in zip(model.parameters(), params))
    assert model[0].weight is params[0]
    _same_state(model, reference)
    # the optimizer built before the conversion still trains the converted model
    model.eval()
    x = torch.randn(8, 10)
    model(x).square().sum().backward()
    opt.step()
    assert not torch.equal(model[0].weight, reference[0].weight)
    reference.eval()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    reference(x).square().sum().backward()
    ref_opt.step()
    _same_state(model, reference)


class Block(torch.nn.Module):
    """A custom module: its Linear -> ReLU is not a Sequential chain, so nothing is absorbed."""

    def __init__(self, n):
        super().__init__()
        self.fc = torch.nn.Linear(n, n)
        self.act = torch.nn.ReLU()
        self.norm = torch.nn.BatchNorm1d(n)

    def forward(self, x):
        h = self.fc(x)
        return self.norm(self.act(h) + h)  # uses the Linear's output twice


class MyLinear(torch.nn.Linear):
    pass


class Nested(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(
            torch.nn.Linear(6, 8), torch.nn.LeakyReLU(0.2), torch.nn.BatchNorm1d(8)
        )
        self.blocks = torch.nn.ModuleList([Block(8), Block(8)])
        self.inner = torch.nn.Sequential(
            torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()),
            torch.nn.Linear(8, 8),
            torch.nn.GELU(approximate="tanh"),  # not absorbed: fusedmlp's GELU is the erf one
        )
        self.sub = MyLinear(8, 8)  # a subclass: left alone
        self.attn_proj = torch.nn.modules.linear.NonDynamicallyQuantizableLinear(8, 8)
        self.head = torch.nn.Sequential(torch.nn.Dropout(0.3), torch.nn.Linear(8, 3))
        self.out = torch.nn.LogSoftmax(dim=1)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        x = self.attn_proj(self.sub(self.inner(x)))
        return self.out(self.head(x))


def test_nested_model_copy_and_inplace():
    torch.manual_seed(0)
    model = Nested().double()
    model.blocks[1].eval()  # mixed modes are kept
    model.head[0].eval()  # the dropout: deterministic outputs
    model.stem[0].weight.requires_grad_(False)
    x = torch.randn(9, 6, dtype=torch.float64)
    for inplace in (False, True):
        src = copy.deepcopy(model)
        ids = [id(p) for p in src.parameters()]
        expected = model(x)
        conv = convert(src, inplace=inplace)
        assert (conv is src) == inplace
        assert ([id(p) for p in conv.parameters()] == ids) == inplace
        assert type(conv.stem[0]) is F.Linear and conv.stem[0].activation == "leaky_relu"
        assert conv.stem[0].negative_slope == 0.2 and type(conv.stem[1]) is torch.nn.Identity
        assert type(conv.stem[2]) is F.BatchNorm1d
        assert type(conv.blocks[0].fc) is F.Linear and conv.blocks[0].fc.activation is None
        assert type(conv.blocks[0].act) is torch.nn.ReLU
        assert type(conv.inner[0][0]) is F.Linear and conv.inner[0][0].activation == "tanh"
        assert type(conv.inner[1]) is F.Linear and conv.inner[1].activation is None
        assert type(conv.inner[2]) is torch.nn.GELU
        assert type(conv.sub) is MyLinear
        assert type(conv.attn_proj) is torch.nn.modules.linear.NonDynamicallyQuantizableLinear
        assert type(conv.head[0]) is F.Dropout and type(conv.out) is F.LogSoftmax
        assert conv.out.dim == 1
        assert not conv.blocks[1].training and not conv.blocks[1].norm.training
        assert conv.blocks[0].norm.training
        assert not conv.stem[0].weight.requires_grad and conv.stem[2].weight.requires_grad
        assert all(p.dtype == torch.float64 for p in conv.parameters())
        assert list(conv.state_dict()) == list(model.state_dict())
        assert not conv.head[0].training
        assert_close(conv(x), expected)


class Heads(torch.nn.Module):
    """A custom model holding Sequential, ModuleList and ModuleDict containers and a loss."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Dropout(0.2)
        )
        self.blocks = torch.nn.ModuleList(
            [torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()), torch.nn.Linear(8, 8)]
        )
        self.heads = torch.nn.ModuleDict(
            {
                "a": torch.nn.Sequential(torch.nn.Linear(8, 3), torch.nn.LogSoftmax(1)),
                "b": torch.nn.Linear(8, 2),
            }
        )
        self.loss = torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0]), label_smoothing=0.1)

    def forward(self, x):
        h = self.blocks[1](self.blocks[0](self.body(x)))
        return self.heads["a"](h), self.heads["b"](h)


def test_converted_model_deepcopies_and_pickles(triton_backend):
    torch.manual_seed(0)
    model = Heads().to(DEVICE)
    conv = convert(model)
    assert type(conv.body).__name__ == "FusedSequential" and type(conv.loss) is F.CrossEntropyLoss
    conv(torch.randn(6, 5, device=DEVICE))  # running statistics of its own
    loaded, copied, state = saved_loaded_copied(conv)
    model.load_state_dict(state)  # into the torch model
    for other in (loaded, copied):
        assert [type(m) for m in other.modules()] == [type(m) for m in conv.modules()]
        assert other.blocks[0][0].activation == "tanh"
        _same_state(other, conv)
    _same_state(model, conv)
    x = torch.randn(4, 5, device=DEVICE)
    t = torch.tensor([0, 1, 1, 0], device=DEVICE)
    for net in (model, conv, loaded, copied):
        net.eval()
    a_ref, b_ref = model(x)
    for net in (conv, loaded, copied):
        a, b = net(x)
        assert_close(a, a_ref)
        assert_close(b, b_ref)
        assert_close(net.loss(b, t), model.loss(b_ref, t))


def test_losses_and_softmax_converted_with_buffers():
    w = torch.tensor([1.0, 2.0, 0.5])
    ce = torch.nn.CrossEntropyLoss(weight=w, ignore_index=1, label_smoothing=0.1)
    nll = torch.nn.NLLLoss(reduction="sum")
    model = torch.nn.ModuleDict(
        {"ce": ce, "nll": nll, "sm": torch.nn.Softmax(dim=-1), "lsm": torch.nn.LogSoftmax(1)}
    )
    conv = convert(model)
    assert type(conv["ce"]) is F.CrossEntropyLoss and type(conv["nll"]) is F.NLLLoss
    assert type(conv["sm"]) is F.Softmax and type(conv["lsm"]) is F.LogSoftmax
    assert conv["ce"].ignore_index == 1 and conv["ce"].label_smoothing == 0.1
    assert conv["nll"].reduction == "sum"
    assert list(conv.state_dict()) == list(model.state_dict()) == ["ce.weight"]
    assert torch.equal(conv["ce"].weight, w)
    logits, target = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 0, 1])
    assert_close(conv["ce"](logits, target), ce(logits, target))
    assert_close(conv["nll"](logits.log_softmax(1), target), nll(logits.log_softmax(1), target))
    assert_close(conv["sm"](logits), logits.softmax(-1))


def test_batchnorm2d_dropout2d_and_root_module():
    bn = torch.nn.BatchNorm2d(3, momentum=None, eps=1e-3)
    seq = torch.nn.Sequential(bn, torch.nn.Dropout2d(0.2, inplace=True))
    conv = convert(seq)
    assert type(conv[0]) is F.BatchNorm2d and conv[0].momentum is None and conv[0].eps == 1e-3
    assert type(conv[1]) is F.Dropout2d and conv[1].p == 0.2 and conv[1].inplace
    x = torch.randn(4, 3, 5, 5)
    assert_close(conv[0](x), bn(x))
    _same_state(conv, seq)  # running stats updated identically
    lin = torch.nn.Linear(3, 4)
    root = convert(lin, inplace=True)  # the root itself is replaced: only the return value has it
    assert type(root) is F.Linear and root.weight is lin.weight
    assert type(convert(torch.nn.ReLU())) is torch.nn.ReLU


def test_left_alone_lazy_parametrized_hooks_and_custom_sequential():
    class MySequential(torch.nn.Sequential):
        def forward(self, x):
            h = self[0](x)
            return self[1](h) + h

    lazy = torch.nn.LazyLinear(4)
    param = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(4, 4))
    hooked = torch.nn.Linear(4, 4)
    calls = []
    hooked.register_forward_hook(lambda mod, inp, out: calls.append(out))
    model = torch.nn.Sequential(
        lazy,
        param,
        torch.nn.ReLU(),
        hooked,
        torch.nn.ReLU(),
        MySequential(torch.nn.Linear(4, 4), torch.nn.ReLU()),
    )
    conv = convert(model)
    assert type(conv[0]) is torch.nn.LazyLinear
    assert type(conv[1]) is type(param)  # parametrized: left alone, ReLU not absorbed
    assert type(conv[2]) is torch.nn.ReLU
    assert type(conv[3]) is F.Linear and conv[3].activation is None  # hooked: not absorbed
    assert type(conv[4]) is torch.nn.ReLU
    assert type(conv[5][0]) is F.Linear and conv[5][0].activation is None
    assert type(conv[5][1]) is torch.nn.ReLU
    x = torch.randn(5, 3)
    out = conv(x)  # materialises the copy's lazy layer; the original's stays lazy
    assert len(calls) == 1  # the hook was carried over to the fusedmlp Linear
    model[0] = conv[0]
    assert_close(out, model(x))
    # a materialised LazyLinear becomes a plain torch Linear: converted from then on
    assert type(convert(conv)[0]) is F.Linear


def test_hook_based_weight_and_spectral_norm_are_left_alone():
    torch.manual_seed(0)
    normed = torch.nn.utils.spectral_norm(torch.nn.Linear(4, 4))  # weight_orig, weight_u/v
    wn = torch.nn.utils.weight_norm(torch.nn.Linear(4, 4))  # weight_g, weight_v
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Dropout(0.0), normed, torch.nn.ReLU(), wn, torch.nn.ReLU()
    ).eval()
    x = torch.randn(5, 3)
    ref = model(x)
    # torch cannot deep-copy weight_norm's module (a non-leaf weight): the copy says what to do
    with pytest.raises(RuntimeError, match=r"deep-copy.*convert\(model, inplace=True\)"):
        convert(model)
    conv = convert(model, inplace=True)
    assert conv is model
    assert type(conv[0]) is F.Linear and type(conv[1]) is F.Dropout
    assert type(conv[2]) is torch.nn.Linear and type(conv[3]) is torch.nn.ReLU  # not absorbed
    assert type(conv[4]) is torch.nn.Linear and type(conv[5]) is torch.nn.ReLU
    assert_close(conv(x), ref)


def test_hook_handles_still_remove_hooks_after_convert():
    lin = torch.nn.Linear(4, 4)
    calls = []
    handle = lin.register_forward_hook(lambda mod, inp, out: calls.append(1))
    model = convert(torch.nn.Sequential(lin), inplace=True)
    model(torch.randn(2, 4))
    assert calls == [1]
    handle.remove()
    model(torch.randn(2, 4))
    assert calls == [1]


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("kind", ["full", "legacy"])
@pytest.mark.parametrize("module", ["linear", "batchnorm"])
def test_backward_hooks_still_fire_after_convert(inplace, kind, module):
    # torch runs a module's backward hooks only with the flag saying which kind they are
    mod = torch.nn.Linear(3, 3) if module == "linear" else torch.nn.BatchNorm1d(3)
    calls = []
    register = mod.register_full_backward_hook if kind == "full" else mod.register_backward_hook
    register(lambda m, grad_in, grad_out: calls.append(type(m)))
    model = torch.nn.Sequential(mod, torch.nn.Linear(3, 2))
    model(torch.randn(4, 3, requires_grad=True)).sum().backward()
    assert calls == [type(mod)]
    conv = convert(model, inplace=inplace)
    assert type(conv[0]) is not type(mod)
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy hook's own deprecation warning
        conv(torch.randn(4, 3, requires_grad=True)).sum().backward()
    assert calls == [type(conv[0])]


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("module", ["linear", "batchnorm"])
def test_load_state_dict_pre_hooks_see_the_new_module_after_convert(inplace, module):
    # register_load_state_dict_pre_hook keeps a weak reference to its module (torch's
    # _WrappedHook), which copy.deepcopy rebinds to the copy: after convert the hook gets the
    # fusedmlp module, not the replaced one (dead by then: "the hook of a dead Module")
    mod = torch.nn.Linear(3, 3) if module == "linear" else torch.nn.BatchNorm1d(3)
    seen = []
    mod.register_load_state_dict_pre_hook(lambda m, *args: seen.append(m))
    mod.register_load_state_dict_post_hook(lambda m, keys: seen.append(m))
    model = torch.nn.Sequential(mod)
    state = copy.deepcopy(model.state_dict())
    conv = convert(model, inplace=inplace)
    del model, mod
    conv.load_state_dict(state)
    assert len(seen) == 2 and seen[0] is conv[0] and seen[1] is conv[0]


@pytest.mark.parametrize("inplace", [False, True])
def test_user_attributes_survive_convert(inplace):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.1))
    model[0].tag = "encoder"
    model[1].note = {"kept": True}
    reference = copy.deepcopy(model)
    conv = convert(model, inplace=inplace)
    assert type(conv[0]) is F.Linear and type(conv[1]) is F.Dropout
    assert conv[0].tag == reference[0].tag == "encoder"
    assert conv[1].note == {"kept": True}
    # what fusedmlp's module defines itself is its own
    assert conv[0].activation is None and conv[0].in_features == 3


def test_absorbed_activation_keeps_eval_mode():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    conv = convert(model.eval())
    assert type(conv[1]) is torch.nn.Identity
    assert [m.training for m in conv.modules()] == [m.training for m in model.modules()]


def test_shared_linear_is_not_absorbed_and_stays_shared():
    shared = torch.nn.Linear(4, 4)
    model = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
    conv = convert(model)
    assert conv[0] is conv[2] and type(conv[0]) is F.Linear
    assert conv[0].activation is None and type(conv[1]) is torch.nn.ReLU
    x = torch.randn(3, 4)
    assert_close(conv(x), model(x))


def _outputs_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = model(x)
    out.square().sum().backward()
    return [out.detach(), x.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("inplace", [False, True])
def test_tied_weights_and_a_block_applied_twice(triton_backend, launches, inplace):
    """Two Linears sharing one weight Parameter stay tied (and absorb their activations); a
    Sequential held twice (a block applied twice) is converted once and still absorbs: its
    Linear feeds only that Sequential's next module."""
    nn = torch.nn
    first, second = nn.Linear(6, 6), nn.Linear(6, 6)
    second.weight = first.weight
    block = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
    model = nn.Sequential(first, nn.ReLU(), second, nn.Sigmoid(), block, block).to(DEVICE)
    reference = copy.deepcopy(model)
    conv = convert(model, inplace=inplace)
    assert conv[0].weight is conv[2].weight and conv[0].bias is not conv[2].bias
    assert (conv[0].weight is reference[0].weight) is False
    assert (conv[0].weight is first.weight) == inplace
    assert [conv[0].activation, conv[2].activation] == ["relu", "sigmoid"]
    assert conv[4] is conv[5] and conv[4][0].activation == "tanh"
    assert type(conv[4][1]) is nn.Identity
    assert list(conv.state_dict()) == list(reference.state_dict())
    x = torch.randn(5, 6, device=DEVICE)
    for training in (True, False):
        conv.train(training)
        reference.train(training)
        launches.clear()
        got = _outputs_and_grads(conv, x)
        assert launches.total > 0
        for a, e in zip(got, _outputs_and_grads(reference, x)):
            assert_close(a, e)


def test_modules_with_a_forward_of_their_own_are_left_alone():
    """accelerate's device hooks and users' patches set ``module.forward`` on the instance: that
    is what ``module(x)`` runs, so such a module is not replaced, an activation with one is
    not absorbed, and a Sequential with one is not a chain."""
    nn = torch.nn

    def patched(module, scale):
        original = module.forward
        module._old_forward = original
        module.forward = lambda x: original(x) * scale

    model = nn.Sequential(
        nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 3))
    )
    patched(model[0], 2.0)  # a patched Linear: left alone, its activation with it
    patched(model[3], 0.5)  # a patched activation: kept
    chain = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    chain.forward = lambda x: chain[0](x) - chain[1](x)  # reads the pre-activation
    model.append(chain)
    x = torch.randn(5, 4)
    expected = _outputs_and_grads(model, x)
    conv = convert(model, inplace=True)  # (the patches close over the original modules)
    assert type(conv[0]) is torch.nn.Linear and type(conv[1]) is nn.ReLU
    assert type(conv[2]) is F.Linear and conv[2].activation is None
    assert type(conv[3]) is nn.ReLU and type(conv[4][0]) is F.Linear
    assert type(chain[0]) is F.Linear and chain[0].activation is None
    assert type(chain[1]) is nn.ReLU
    for a, e in zip(_outputs_and_grads(conv, x), expected):
        assert_close(a, e)
    # nor does a Sequential holding one become a FusedSequential (whose blocks run their
    # modules' classes' code)
    model = torch.nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 2))
    model[1].forward = lambda x: torch.relu(x) * 0.0
    conv = convert(model, inplace=True)
    assert type(conv) is nn.Sequential and type(conv[0]) is F.Linear
    assert type(conv[2]) is F.Dropout
    with fusedmlp.use_backend("triton"):
        assert_close(conv(x.new_ones(5, 4)), conv[3].bias.expand(5, 2))


def test_global_module_hooks_keep_the_activations():
    """A global module hook sees every module's input and output: with one registered, no
    activation is absorbed (the hook sees the same modules and tensors as with torch's)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    seen = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, args: seen.append((type(m).__name__, args[0].detach().clone()))
    )
    try:
        conv = convert(model)
        x = torch.randn(3, 4)
        model(x)
        expected, seen[:] = list(seen), []
        conv(x)
    finally:
        handle.remove()
    assert type(conv[0]) is F.Linear and conv[0].activation is None
    assert type(conv[1]) is torch.nn.ReLU
    assert [name for name, _ in seen] == [name for name, _ in expected]
    for (_, a), (_, e) in zip(seen, expected):
        assert_close(a, e)
    assert convert(model)[0].activation == "relu"  # without the hook


def test_torchscript_modules_are_left_alone():
    """A scripted module runs its compiled code, which calls its own submodules: it is kept
    whole, as the root or inside a model."""
    nn = torch.nn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script's own
        scripted = torch.jit.script(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), scripted)
    x = torch.randn(5, 3)
    conv = convert(model)
    assert type(conv[0]) is F.Linear and conv[0].activation == "relu"
    assert isinstance(conv[2], torch.jit.ScriptModule)
    assert_close(conv(x), model(x))
    root = convert(scripted)
    assert isinstance(root, torch.jit.ScriptModule)
    assert_close(root(x[:, :1].expand(5, 4)), scripted(x[:, :1].expand(5, 4)))


def test_pruned_linear_is_left_alone():
    """``torch.nn.utils.prune`` renames the weight (``weight_orig`` + a ``weight_mask`` buffer)
    and recomputes it in a forward pre-hook: the module is kept, its activation with it."""
    from torch.nn.utils import prune

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    keys = list(model.state_dict())
    x = torch.randn(5, 4)
    expected = _outputs_and_grads(model, x)
    conv = convert(model, inplace=True)  # (torch cannot deep-copy a pruned module)
    assert type(conv[0]) is torch.nn.Linear and type(conv[1]) is torch.nn.ReLU
    assert type(conv[2]) is F.Linear and list(conv.state_dict()) == keys
    for a, e in zip(_outputs_and_grads(conv, x), expected):
        assert_close(a, e)


def test_not_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        convert([torch.nn.Linear(2, 2)])


def test_first_training_steps_equal_torch():
    """A converted model (no dropout) trained with fusedmlp's loss and Adam follows torch's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(12, 32),
        torch.nn.BatchNorm1d(32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 5),
    )
    conv = convert(model)
    assert conv[3].activation == "tanh"
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    fopt = fusedmlp.optim.Adam(conv.parameters(), lr=1e-2)
    loss_fn, floss_fn = torch.nn.CrossEntropyLoss(), fusedmlp.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(16, 12, generator=gen)
        y = torch.randint(0, 5, (16,), generator=gen)
        losses = []
        for net, o, fn in ((model, opt, loss_fn), (conv, fopt, floss_fn)):
            o.zero_grad()
            loss = fn(net(x), y)
            loss.backward()
            o.step()
            losses.append(loss.detach())
        assert_close(losses[1], losses[0])
    for (k, a), b in zip(conv.state_dict().items(), model.state_dict().values()):
        if a.is_floating_point():
            assert_close(a, b, msg=k)
        else:
            assert torch.equal(a, b), k


def test_converted_model_runs_triton_kernels(triton_backend, launches):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16)
    ).to(DEVICE)
    conv = convert(model)
    x = torch.randn(17, 16, device=DEVICE)
    out = conv(x)
    assert launches.total > 0
    assert_close(out, model(x))


@pytest.mark.parametrize("tail", ["end", "relu_inplace", "linear"])
def test_leaky_relu_absorbed_only_where_an_inplace_edit_still_backpropagates(triton_backend, tail):
    """torch's LeakyReLU keeps its input for backward, fusedmlp's fused Linear its output: an
    in-place edit of a trailing LeakyReLU's output (``out += x``, a ``ReLU(inplace=True)``
    after it) backpropagates with torch, so the LeakyReLU stays there (absorbed before a
    Linear, which does not edit its input)."""
    torch.manual_seed(0)
    nn = torch.nn
    mods = [nn.Linear(4, 6), nn.LeakyReLU(0.1)]
    mods += {"end": [], "relu_inplace": [nn.ReLU(inplace=True)], "linear": [nn.Linear(6, 3)]}[tail]
    model = nn.Sequential(*mods).to(DEVICE)
    conv = convert(model)
    absorbed = tail == "linear"
    assert (conv[0].activation == "leaky_relu") == absorbed
    assert (type(conv[1]) is nn.Identity) == absorbed
    x = torch.randn(5, 4, device=DEVICE)
    outs, grads = [], []
    for m in (model, conv):
        m.zero_grad()
        out = m(x)
        if tail != "relu_inplace":  # (there the ReLU edits the LeakyReLU's output in place)
            out.add_(1.0)  # an in-place edit of the output (a residual ``out += x``)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([p.grad for p in m.parameters()])
    assert_close(outs[1], outs[0])
    for g, ref in zip(*grads[::-1]):
        assert_close(g, ref)


def test_fx_symbolic_trace_keeps_fusedmlp_modules_as_leaves(triton_backend, launches):
    """torch.fx.symbolic_trace of a converted model, an MLP and a model with a fusedmlp loss:
    fusedmlp's modules are call_module nodes, as torch.nn's are, and the GraphModule runs them
    (their kernels, their train/eval flag at run time) with the model's own results."""
    torch.manual_seed(0)
    ref = torch.nn.Sequential(
        torch.nn.Linear(5, 8),
        torch.nn.BatchNorm1d(8),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.3),
        torch.nn.Linear(8, 3),
        torch.nn.LogSoftmax(1),
    ).to(DEVICE)
    conv = convert(ref)
    x = torch.randn(7, 5, device=DEVICE)
    for model in (conv, fusedmlp.nn.MLP(5, [8, 8], 3, batchnorm=True, dropout=0.1).to(DEVICE)):
        gm = torch.fx.symbolic_trace(model)
        targets = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"]
        assert len(targets) == len(list(model.modules())) - 1 - isinstance(model, fusedmlp.nn.MLP)
        assert any(type(m) is fusedmlp.nn.Linear for m in targets)
        for train in (True, False):
            gm.train(train)
            model.train(train)
            torch.manual_seed(1)
            got = gm(x)
            torch.manual_seed(1)
            assert_close(got, model(x))

    class WithLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = fusedmlp.nn.Linear(5, 3, activation="relu", device=DEVICE)
            self.loss = fusedmlp.nn.CrossEntropyLoss()

        def forward(self, x, t):
            return self.loss(self.net(x), t)

    with_loss = WithLoss()
    gm = torch.fx.symbolic_trace(with_loss)
    t = torch.tensor([0, 1, 2, 0, 1, 2, 0], device=DEVICE)
    launches.clear()
    loss = gm(x, t)
    loss.backward()
    assert launches.total > 0
    assert_close(loss, torch.nn.functional.cross_entropy(torch.relu(with_loss.net(x)), t))
