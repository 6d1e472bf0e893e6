"""fusedmlp.optim.Adam / AdamW / SGD against torch.optim, the same gradients fed to both."""

import copy
import inspect

import pytest
import torch
from conftest import DEVICE, assert_close

import fusedmlp
from fusedmlp.optim import SGD, Adam, AdamW

STEPS = 30
SHAPES = [(7, 5), (5,), (9, 16), (3,), (33,), (1,)]  # (9, 16): 2 full blocks + a tail


def _params(dtype=torch.float32, shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(s, generator=g).to(device=DEVICE, dtype=dtype))
        for s in shapes
    ]


def _clone(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def _groups(params, **second):
    """Two param groups; the second overrides hyperparameters (lr, weight decay, ...)."""
    return [{"params": params[:3]}, {"params": params[3:], **second}]


def _feed(ours, ref, step, skip=()):
    """Fresh gradient tensors every step, the same values for both; indices in ``skip`` get
    no gradient (None) this step."""
    g = torch.Generator().manual_seed(1000 + step)
    for i, (p, q) in enumerate(zip(ours, ref)):
        if i in skip:
            p.grad = q.grad = None
            continue
        grad = torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype)
        p.grad = grad.clone()
        q.grad = grad.clone()


def _assert_params(ours, ref, rtol=1e-5, atol=1e-6):
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=atol)


def _run(ours_opt, ref_opt, ours, ref, steps=STEPS, skip=lambda step: (), start=0):
    for step in range(start, steps):
        _feed(ours, ref, step, skip(step))
        ours_opt.step()
        ref_opt.step()
    _assert_params(ours, ref)


ADAM_CASES = [
    (Adam, torch.optim.Adam, {}),
    (Adam, torch.optim.Adam, {"amsgrad": True, "weight_decay": 0.1}),
    (Adam, torch.optim.Adam, {"maximize": True, "weight_decay": 0.05, "betas": (0.3, 0.9)}),
    (Adam, torch.optim.Adam, {"decoupled_weight_decay": True, "weight_decay": 0.1}),
    (AdamW, torch.optim.AdamW, {}),
    (AdamW, torch.optim.AdamW, {"amsgrad": True, "maximize": True, "weight_decay": 0.2}),
    (Adam, torch.optim.Adam, {"amsgrad": True, "maximize": True, "betas": (0.0, 0.99)}),
    (AdamW, torch.optim.AdamW, {"amsgrad": True, "eps": 1e-3, "weight_decay": 0.0}),
]


@pytest.mark.parametrize(
    "cls,ref_cls,kwargs", ADAM_CASES, ids=[f"{c[0].__name__}-{c[2]}" for c in ADAM_CASES]
)
def test_adam_matches_torch(backend, launches, cls, ref_cls, kwargs):
    ours, ref = _params(), None
    ref = _clone(ours)
    second = {"lr": 3e-2, "weight_decay": 0.3 if kwargs.get("weight_decay") else 0.0}
    opt = cls(_groups(ours, **second), lr=1e-2, **kwargs)
    ref_opt = ref_cls(_groups(ref, **second), lr=1e-2, **kwargs)
    _run(opt, ref_opt, ours, ref)
    expected = 2 * STEPS if backend == "triton" else 0
    assert launches["_adam_kernel"] == expected
    assert launches.total == expected


@pytest.mark.parametrize(
    "cls,ref_cls,decoupled",
    [(AdamW, torch.optim.AdamW, False), (Adam, torch.optim.Adam, True)],
    ids=["adamw-coupled-group", "adam-decoupled-group"],
)
def test_weight_decay_kind_per_group(backend, launches, cls, ref_cls, decoupled):
    # torch's AdamW is Adam with decoupled_weight_decay=True by default: a group may override it
    ours = _params()
    ref = _clone(ours)
    second = {"weight_decay": 0.3, "decoupled_weight_decay": decoupled}
    opt = cls(_groups(ours, **second), lr=1e-2, weight_decay=0.1)
    ref_opt = ref_cls(_groups(ref, **second), lr=1e-2, weight_decay=0.1)
    _run(opt, ref_opt, ours, ref)
    assert launches["_adam_kernel"] == (2 * STEPS if backend == "triton" else 0)


SGD_CASES = [
    {},
    {"momentum": 0.9},
    {"momentum": 0.9, "dampening": 0.3, "weight_decay": 0.1},
    {"momentum": 0.8, "nesterov": True, "weight_decay": 0.05},
    {"momentum": 0.9, "maximize": True},
    {"maximize": True, "weight_decay": 0.1},
    {"momentum": 0.9, "nesterov": True, "maximize": True, "weight_decay": 0.1},
    {"momentum": 0.5, "dampening": 0.5, "maximize": True, "weight_decay": 0.2},
]


@pytest.mark.parametrize("kwargs", SGD_CASES, ids=str)
def test_sgd_matches_torch(backend, launches, kwargs):
    ours = _params()
    ref = _clone(ours)
    second = {"lr": 0.02, "weight_decay": 0.2 if kwargs.get("weight_decay") else 0.0}
    opt = SGD(_groups(ours, **second), lr=0.05, **kwargs)
    ref_opt = torch.optim.SGD(_groups(ref, **second), lr=0.05, **kwargs)
    _run(opt, ref_opt, ours, ref)
    for p, q in zip(ours, ref):
        if kwargs.get("momentum"):
            torch.testing.assert_close(
                opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"]
            )
        else:
            assert p not in opt.state and q not in ref_opt.state
    expected = 2 * STEPS if backend == "triton" else 0
    assert launches["_sgd_kernel"] == expected


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: (Adam(ps, lr=0.1, amsgrad=True), torch.optim.Adam),
        lambda ps: (SGD(ps, lr=0.1, momentum=0.9), torch.optim.SGD),
    ],
    ids=["adam", "sgd"],
)
def test_lr_scheduler_and_missing_grads(backend, make):
    ours = _params()
    ref = _clone(ours)
    opt, ref_cls = make(ours)
    ref_opt = ref_cls(ref, **{k: v for k, v in opt.defaults.items()})
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=5, gamma=0.5)
    for step in range(STEPS):
        # param 1 never gets a gradient; param 2 only every third step (its step lags).
        skip = {1} | ({2} if step % 3 else set())
        _feed(ours, ref, step, skip)
        opt.step()
        ref_opt.step()
        sched.step()
        ref_sched.step()
    _assert_params(ours, ref)
    assert ours[1] not in opt.state
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] < 0.1
    if isinstance(opt, Adam):
        assert float(opt.state[ours[2]]["step"]) == float(ref_opt.state[ref[2]]["step"]) == 10


OPTIMIZERS = [
    (Adam, torch.optim.Adam, {"lr": 0.05, "amsgrad": True, "weight_decay": 0.1}),
    (AdamW, torch.optim.AdamW, {"lr": 0.05}),
    (SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
]


@pytest.mark.parametrize("cls,ref_cls,kwargs", OPTIMIZERS, ids=[c[0].__name__ for c in OPTIMIZERS])
@pytest.mark.parametrize("direction", ["ours_to_torch", "torch_to_ours"])
def test_state_dict_round_trip(backend, cls, ref_cls, kwargs, direction):
    """Train 10 steps with one, checkpoint (deep copy), load into the other, train on: the
    continuation matches an uninterrupted run of torch.optim."""
    first_cls, second_cls = (cls, ref_cls) if direction == "ours_to_torch" else (ref_cls, cls)
    ps = _params()
    ref = _clone(ps)
    first = first_cls(_groups(ps, lr=0.01), **kwargs)
    ref_opt = ref_cls(_groups(ref, lr=0.01), **kwargs)
    for step in range(10):
        _feed(ps, ref, step)
        first.step()
        ref_opt.step()
    sd = copy.deepcopy(first.state_dict())
    ref_sd = ref_opt.state_dict()
    # The same layout as torch's: group keys, state keys, step as a float32 scalar tensor.
    assert [sorted(g) for g in sd["param_groups"]] == [sorted(g) for g in ref_sd["param_groups"]]
    for k, v in ref_sd["state"].items():
        assert sorted(sd["state"][k]) == sorted(v)
        if "step" in v:
            assert sd["state"][k]["step"].dtype == torch.float32
            assert sd["state"][k]["step"].shape == ()
            assert sd["state"][k]["step"].device.type == "cpu"
    second = second_cls(_groups(ps, lr=0.01), **kwargs)
    second.load_state_dict(sd)
    _run(second, ref_opt, ps, ref, steps=20, start=10)


def test_one_launch_per_group_per_step_for_12_tensors(triton_backend, launches):
    model = torch.nn.Sequential(*[torch.nn.Linear(5, 5) for _ in range(6)]).to(DEVICE)
    params = list(model.parameters())
    assert len(params) == 12
    groups = [{"params": params[:8]}, {"params": params[8:], "lr": 0.1, "weight_decay": 0.1}]
    x = torch.randn(3, 5, device=DEVICE)
    for opt, name in [
        (Adam(groups, lr=1e-3), "_adam_kernel"),
        (AdamW(groups, lr=1e-3), "_adam_kernel"),
        (SGD(groups, lr=1e-3, momentum=0.9), "_sgd_kernel"),
    ]:
        launches.clear()
        for _ in range(3):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
        assert launches[name] == 2 * 3, (type(opt).__name__, dict(launches))
        assert launches.total == 2 * 3


def test_no_launch_under_torch_backend(launches):
    ps = _params()
    with fusedmlp.use_backend("torch"):
        for opt in (Adam(ps), SGD(ps, lr=0.1, momentum=0.5)):
            _feed(ps, _clone(ps), 0)
            opt.step()
    assert launches.total == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("which", ["adam", "sgd"])
def test_half_precision_params(triton_backend, launches, dtype, which):
    """fp16/bf16 params: fp32 math in the kernel, state in the param dtype (as torch). The
    reference is torch.optim on fp32 copies (torch's own fp16 Adam rounds eps=1e-8 to 0 and
    can divide by zero where the second moment underflows)."""
    ours = _params(dtype)
    ref = [torch.nn.Parameter(p.detach().float()) for p in ours]
    if which == "adam":
        kw = {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.1}
        opt, ref_opt = Adam(ours, **kw), torch.optim.Adam(ref, **kw)
    else:
        kw = {"lr": 1e-2, "momentum": 0.9, "weight_decay": 0.1}
        opt, ref_opt = SGD(ours, **kw), torch.optim.SGD(ref, **kw)
    for step in range(5):
        g = torch.Generator().manual_seed(step)
        for p, q in zip(ours, ref):  # the same (half-rounded) gradient values for both
            p.grad = torch.randn(p.shape, generator=g).to(device=DEVICE, dtype=dtype)
            q.grad = p.grad.float()
        opt.step()
        ref_opt.step()
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.float16 else {"rtol": 4e-2, "atol": 4e-2}
    for p, q in zip(ours, ref):
        assert p.dtype == dtype
        torch.testing.assert_close(p.detach().float(), q.detach(), **tol)
        for key, value in opt.state[p].items():
            if key != "step":
                assert value.dtype == dtype
                torch.testing.assert_close(value.float(), ref_opt.state[q][key], **tol)
    assert launches.total == 5


def test_odd_layouts_and_empty_params(triton_backend, launches):
    """A transposed (dense, non-contiguous) param, a param at an unaligned storage offset, a
    grad whose strides differ from its param's, and an empty param."""
    base = torch.randn(70, device=DEVICE)
    sources = [
        torch.randn(5, 7, device=DEVICE).t(),
        base[1:66],
        torch.randn(4, 6, device=DEVICE),
        torch.randn(0, 3, device=DEVICE),
    ]
    for cls, ref_cls, kwargs in [
        (Adam, torch.optim.Adam, {"lr": 0.1, "amsgrad": True}),
        (SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    ]:
        ours = [torch.nn.Parameter(t.clone()) for t in sources]
        ours[1] = torch.nn.Parameter(torch.randn(70, device=DEVICE)[1:66])
        assert ours[1].data_ptr() % 16 != 0 and not ours[0].is_contiguous()
        ref = _clone(ours)
        opt, ref_opt = cls(ours, **kwargs), ref_cls(ref, **kwargs)
        launches.clear()
        for step in range(4):
            g = torch.Generator().manual_seed(step)
            for i, (p, q) in enumerate(zip(ours, ref)):
                grad = torch.randn(p.shape, generator=g).to(DEVICE)
                if i == 0:
                    grad = torch.empty_like(p).copy_(grad)  # the param's (transposed) strides
                if i == 2:
                    grad = grad.t().contiguous().t()  # column-major grad, row-major param
                p.grad, q.grad = grad.clone(), grad.clone()
                if i in (0, 2):
                    p.grad = torch.empty_like(grad).copy_(grad)
            opt.step()
            ref_opt.step()
        _assert_params(ours, ref)
        assert launches.total == 4


def test_address_table_cached_and_rebuilt():
    from fusedmlp.kernels import adam as K

    a = [torch.randn(5), torch.randn(70)]
    b = [torch.randn(5), torch.randn(70)]
    addrs, meta, n_chunks, aligned = K.tables([a, b], 64)
    assert n_chunks == 1 + 2
    assert meta.tolist() == [5, 70, 0, 1, 0, 1, 1]
    assert addrs.tolist() == [t.data_ptr() for t in a + b]
    again = K.tables([a, b], 64)
    assert again[0] is addrs and again[1] is meta  # same addresses: no rebuild
    c = [torch.randn(5), torch.randn(70)]  # fresh grads: new addresses, same sizes
    fresh = K.tables([a, c], 64)
    assert fresh[0] is not addrs and fresh[1] is meta
    assert fresh[0].tolist() == [t.data_ptr() for t in a + c]


def test_closure_and_isinstance(backend):
    ps = _params()
    opt = Adam(ps)
    calls = []

    def closure():
        calls.append(1)
        _feed(ps, _clone(ps), 0)
        return torch.tensor(3.0)

    assert opt.step(closure).item() == 3.0 and calls == [1]
    assert isinstance(opt, torch.optim.Adam)
    assert isinstance(AdamW(ps), torch.optim.AdamW)
    assert isinstance(SGD(ps, lr=0.1), torch.optim.SGD)
    # torch's signatures and defaults
    for ours, theirs in [
        (Adam, torch.optim.Adam),
        (AdamW, torch.optim.AdamW),
        (SGD, torch.optim.SGD),
    ]:
        assert inspect.signature(ours) == inspect.signature(theirs)
        assert ours(ps).defaults == theirs(ps).defaults


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: Adam(ps, lr=-1.0),
        lambda ps: Adam(ps, betas=(1.0, 0.9)),
        lambda ps: Adam(ps, betas=(0.9, -0.1)),
        lambda ps: Adam(ps, eps=-1e-8),
        lambda ps: AdamW(ps, weight_decay=-0.1),
        lambda ps: SGD(ps, lr=-0.1),
        lambda ps: SGD(ps, momentum=-0.5),
        lambda ps: SGD(ps, nesterov=True),
        lambda ps: SGD(ps, momentum=0.9, dampening=0.1, nesterov=True),
        lambda ps: SGD(ps, weight_decay=-1.0),
    ],
)
def test_invalid_hyperparameters_raise_torch_value_errors(make):
    with pytest.raises(ValueError):
        make(_params())


def test_sparse_grads(backend):
    emb = torch.nn.Embedding(10, 3, sparse=True).to(DEVICE)
    ref = copy.deepcopy(emb)
    idx = torch.tensor([1, 4, 4], device=DEVICE)
    emb(idx).sum().backward()
    ref(idx).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        Adam(emb.parameters()).step()
    # torch's SGD supports sparse gradients: so does fusedmlp's (torch's algorithm).
    SGD(emb.parameters(), lr=0.1).step()
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    torch.testing.assert_close(emb.weight.detach(), ref.weight.detach())


@pytest.mark.parametrize("flag", ["capturable", "foreach", "fused"])
def test_torch_flags_accepted(backend, flag):
    ours = _params()
    ref = _clone(ours)
    kwargs = {flag: True}
    if flag == "capturable" and DEVICE == "cpu":
        with pytest.raises(AssertionError, match="capturable"):  # torch's own check
            opt = Adam(ours, **kwargs)
            _feed(ours, ref, 0)
            opt.step()
        return
    opt = Adam(ours, lr=0.01, **kwargs)
    ref_opt = torch.optim.Adam(ref, lr=0.01, **kwargs)
    _run(opt, ref_opt, ours, ref, steps=5)
    assert opt.state_dict()["param_groups"] == ref_opt.state_dict()["param_groups"]
    for p, q in zip(ours, ref):  # e.g. fused=True keeps torch's step on the param's device
        assert opt.state[p]["step"].device == ref_opt.state[q]["step"].device


@pytest.mark.parametrize("cls", [Adam, AdamW])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_init_group_fast_path_builds_torchs_lists(cls, amsgrad):
    """Once the state exists, Adam's ``_init_group`` builds its lists with C-level maps: the same
    tensors, in the same order, and the same ``has_complex`` as torch's loop; params without a
    gradient are left out; a sparse gradient gets torch's error."""
    params = [torch.randn(3, device=DEVICE, requires_grad=True) for _ in range(4)]
    params.append(torch.randn(2, dtype=torch.complex64, device=DEVICE, requires_grad=True))
    opt = cls(params, lr=1e-2, amsgrad=amsgrad)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # lazy state initialisation (torch's own loop)
    params[1].grad = None
    for complex_grad in (True, False):
        params[4].grad = torch.randn_like(params[4]) if complex_grad else None
        ours, theirs = [[] for _ in range(6)], [[] for _ in range(6)]
        group = opt.param_groups[0]
        has_complex = opt._init_group(group, *ours)
        assert has_complex == torch.optim.Adam._init_group(opt, group, *theirs) == complex_grad
        assert [len(a) for a in ours] == [len(a) for a in theirs]
        assert len(ours[0]) == (4 if complex_grad else 3) and len(ours[4]) == (
            len(ours[0]) if amsgrad else 0
        )
        for a, b in zip(ours, theirs):
            assert all(x is y for x, y in zip(a, b))
    params[0].grad = torch.randn(3, device=DEVICE).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_init_group_fast_path_builds_torchs_lists(momentum):
    """SGD's ``_init_group`` with C-level maps: the same params, grads and momentum buffers (None
    before the first step), the same state entries and ``has_sparse_grad`` as torch's loop."""
    params = [torch.randn(3, device=DEVICE, requires_grad=True) for _ in range(4)]
    opt = SGD(params, lr=1e-2, momentum=momentum)
    ref = torch.optim.SGD(params, lr=1e-2, momentum=momentum)
    for p in params:
        p.grad = torch.randn_like(p)
    params[2].grad = None
    for _ in range(2):
        ours, theirs = [[] for _ in range(3)], [[] for _ in range(3)]
        group = opt.param_groups[0]
        sparse = opt._init_group(group, *ours)
        assert sparse is torch.optim.SGD._init_group(ref, ref.param_groups[0], *theirs) is False
        assert [len(a) for a in ours] == [len(a) for a in theirs] == [3, 3, 3 if momentum else 0]
        for a, b in zip(ours, theirs):
            assert all(x is y for x, y in zip(a, b))
        assert set(opt.state) == set(ref.state)  # torch's loop makes an entry per param
        opt.step()
        ref.state = opt.state  # the same buffers: the next lists must hold them
        if momentum:
            assert all(opt.state[p]["momentum_buffer"] is not None for p in (params[0], params[3]))
    params[0].grad = torch.randn(3, device=DEVICE).to_sparse()
    assert opt._init_group(opt.param_groups[0], [], [], []) is True


@pytest.mark.parametrize("cls,ref_cls", [(Adam, torch.optim.Adam), (SGD, torch.optim.SGD)])
def test_checked_steps_skip_the_host_walks_until_a_tensor_changes(
    triton_backend, launches, monkeypatch, cls, ref_cls
):
    """``multi_tensor.check`` walks every tensor only for a call it has not seen: the same
    params and state objects at the same addresses, with gradients of the same dtype, shapes and
    strides (fresh ones too, anywhere), pass without it. Any change is
    caught before a launch: a gradient reshaped behind torch's back at the same address (as
    torch's own foreach step, which raises on it), a state tensor swapped for another of the
    wrong shape, and a gradient reinterpreted with other strides at the same address (stand-in
    copies, as with a fresh call; results as torch.optim's)."""
    from fusedmlp.kernels import multi_tensor as M

    walks = []
    monkeypatch.setattr(M, "_check", lambda *a, _f=M._check: walks.append(1) or _f(*a))
    ours = _params(shapes=[(4, 3), (6,)])
    ref = _clone(ours)
    kwargs = {"lr": 0.1, "momentum": 0.9} if cls is SGD else {"lr": 0.1}
    opt, ref_opt = cls(ours, **kwargs), ref_cls(ref, **kwargs)
    grads = [torch.randn(p.shape, device=DEVICE) for p in ours]
    for p, q, g in zip(ours, ref, grads):
        p.grad, q.grad = g, g.clone()
    launches.clear()
    for _ in range(3):  # the same grad objects every step (zero_grad(set_to_none=False))
        opt.step()
        ref_opt.step()
    _assert_params(ours, ref)
    assert launches.total == 3
    assert len(walks) == 1  # the state exists before the first launch (lazy init)
    walks.clear()
    opt.step()
    assert walks == [] and launches.total == 4
    ref_opt.step()
    # fresh gradient tensors (zero_grad(set_to_none=True)): new objects, other addresses
    keep = [p.grad for p in ours]  # alive, so that the new ones cannot take their addresses
    _feed(ours, ref, 99)
    assert all(p.grad.data_ptr() != g.data_ptr() for p, g in zip(ours, keep))
    opt.step()
    ref_opt.step()
    _assert_params(ours, ref)
    assert walks == [] and launches.total == 5

    # the same address, other strides: the column-major reading of the same 12 numbers
    g0 = ours[0].grad
    ours[0].grad.data = g0.data.as_strided((4, 3), (1, 4))
    assert ours[0].grad.data_ptr() == g0.data_ptr()
    ref[0].grad = ours[0].grad.detach().clone()
    opt.step()
    ref_opt.step()
    _assert_params(ours, ref)
    assert walks == [1] and launches.total == 6

    # The refused steps below advance Adam's step counters, as torch's foreach Adam does when
    # one of its ops raises: no comparison with ref_opt after them.
    # The same storage at the same address, viewed as (3, 4): walked again, and refused.
    walks.clear()
    ours[0].grad.data = g0.data.as_strided((3, 4), (4, 1))
    assert ours[0].grad.data_ptr() == g0.data_ptr()
    with pytest.raises(ValueError, match=r"grads tensor \(3, 4\)"):
        opt.step()
    assert walks == [1] and launches.total == 6
    ours[0].grad.data = g0.data.as_strided((4, 3), (3, 1))

    # a state tensor swapped for one of the wrong shape
    key = "exp_avg" if cls is Adam else "momentum_buffer"
    opt.state[ours[1]][key] = torch.zeros(5, device=DEVICE)
    with pytest.raises(ValueError, match=r"\(5,\)"):
        opt.step()
    assert launches.total == 6


@pytest.mark.parametrize("write", ["fill_", "data.fill_", "data =", "replace"])
def test_step_counters_read_every_step(triton_backend, write):
    """Adam reads its host step counters at every step: a counter written in place, through
    ``.data`` (which bumps no version counter) or replaced gives the bias corrections torch's
    Adam computes from it. (Caching the values between steps would miss the ``.data`` write.)"""
    ours = _params()
    ref = _clone(ours)
    opt, ref_opt = Adam(ours, lr=0.05), torch.optim.Adam(ref, lr=0.05)
    for step in range(3):
        _feed(ours, ref, step)
        opt.step()
        ref_opt.step()
    for o, r in zip(ours, ref):
        for state in (opt.state[o], ref_opt.state[r]):
            if write == "fill_":
                state["step"].fill_(40.0)
            elif write == "data.fill_":
                state["step"].data.fill_(40.0)
            elif write == "data =":  # the same tensor object, other storage
                state["step"].data = torch.tensor(40.0)
            else:
                state["step"] = torch.tensor(40.0)
    for step in range(3, 6):
        _feed(ours, ref, step)
        opt.step()
        ref_opt.step()
        _assert_params(ours, ref)
    assert float(opt.state[ours[0]]["step"]) == 43.0


def test_step_counters_share_one_buffer_and_stay_torchs(triton_backend, launches):
    """On the Triton path the host step counters of a group become 0-d views of one buffer
    (read and incremented with one op each). They stay torch's state: a param without a
    gradient keeps its count, and a checkpoint moves to torch.optim.Adam and back mid-training
    with the same results."""
    import copy

    ours = _params()
    ref = _clone(ours)
    opt, ref_opt = Adam(ours, lr=0.05), torch.optim.Adam(ref, lr=0.05)
    _run(opt, ref_opt, ours, ref, steps=3)
    steps = [opt.state[p]["step"] for p in ours]
    base = steps[0].untyped_storage().data_ptr()
    assert all(s.untyped_storage().data_ptr() == base and s.dim() == 0 for s in steps)
    assert [float(s) for s in steps] == [3.0] * len(ours)
    # a step without a gradient for param 1: its counter stays, the others' move on
    _run(opt, ref_opt, ours, ref, steps=2, skip=lambda step: (1,))
    assert [float(opt.state[p]["step"]) for p in ours] == [
        float(ref_opt.state[q]["step"]) for q in ref
    ]
    assert float(opt.state[ours[1]]["step"]) == 3.0 and float(opt.state[ours[0]]["step"]) == 5.0
    # fusedmlp -> torch -> fusedmlp through deep copies of the state, as checkpoints do
    theirs = torch.optim.Adam(ours, lr=0.05)
    theirs.load_state_dict(copy.deepcopy(opt.state_dict()))
    _run(theirs, ref_opt, ours, ref, steps=2)
    back = Adam(ours, lr=0.05)
    back.load_state_dict(copy.deepcopy(theirs.state_dict()))
    _run(back, ref_opt, ours, ref, steps=3)
    assert float(back.state[ours[0]]["step"]) == 10.0
    # two launches a step once param 1's count lags the others' (one per step value)
    assert launches["_adam_kernel"] == 3 + 2 + 2 * 3, dict(launches)


def _run_scheduled(opt, ref_opt, ours, ref, steps, step_size):
    """``steps`` steps of both optimizers with fresh gradients, each under a StepLR that halves
    lr every ``step_size`` steps (schedulers made here: their counts start at this call), the
    params compared after each."""
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size, gamma=0.5) for o in (opt, ref_opt)]
    for step in range(steps):
        _feed(ours, ref, step)
        opt.step()
        ref_opt.step()
        for sched in scheds:
            sched.step()
        _assert_params(ours, ref)


def _count_plans(monkeypatch):
    """Wrap ``_plan.hit``: the list of its results, True where a step took its plan."""
    from fusedmlp.optim import _plan

    taken = []
    monkeypatch.setattr(
        _plan, "hit", lambda *a, _f=_plan.hit: taken.append(_f(*a)) or taken[-1]
    )  # fmt: skip
    return taken


@pytest.mark.parametrize(
    "cls,ref_cls,kwargs", ADAM_CASES[:4], ids=[f"{c[0].__name__}-{c[2]}" for c in ADAM_CASES[:4]]
)
def test_step_plans_match_torch_with_fresh_grads_and_a_scheduler(
    triton_backend, launches, monkeypatch, cls, ref_cls, kwargs
):
    """After a group's first step, its steps take the plan (fusedmlp.optim._plan: no state
    lookups by Python hash, no multi-tensor check), with fresh gradient tensors every step and
    an LR scheduler changing lr: still torch's numbers, one launch per group and step."""
    from fusedmlp.kernels import multi_tensor as M

    taken = _count_plans(monkeypatch)
    walks = []
    monkeypatch.setattr(M, "_check", lambda *a, _f=M._check: walks.append(1) or _f(*a))
    ours = _params()
    ref = _clone(ours)
    second = {"lr": 3e-2, "weight_decay": 0.3 if kwargs.get("weight_decay") else 0.0}
    opt = cls(_groups(ours, **second), lr=1e-2, **kwargs)
    ref_opt = ref_cls(_groups(ref, **second), lr=1e-2, **kwargs)
    _run_scheduled(opt, ref_opt, ours, ref, steps=1, step_size=3)
    assert len(walks) == 2  # the multi-tensor check walked each group's tensors
    _run_scheduled(opt, ref_opt, ours, ref, steps=9, step_size=3)
    # two groups: the first step of each records its plan, the nine others take it
    assert [t is not None for t in taken] == [False, False] + [True] * 18
    assert len(walks) == 2  # and never again
    assert launches["_adam_kernel"] == 20


def _replace_state_dict(opt, p):
    opt.state[p] = {k: v.clone() for k, v in opt.state[p].items()}


def _swap_param(opt, p):
    torch.utils.swap_tensors(p, torch.nn.Parameter(p.detach().clone()))


PLAN_CHANGES = {
    # each applied to ours and to torch's optimizer alike, between two steps
    "state dict replaced": _replace_state_dict,
    "state tensor replaced": lambda opt, p: opt.state[p].update(
        exp_avg=opt.state[p]["exp_avg"] * 1
    ),
    "state tensor .data": lambda opt, p: setattr(
        opt.state[p]["exp_avg_sq"], "data", opt.state[p]["exp_avg_sq"].data.clone()
    ),
    "step counter .data": lambda opt, p: setattr(
        opt.state[p]["step"], "data", opt.state[p]["step"].data.clone()
    ),
    "param .data": lambda opt, p: setattr(p, "data", p.data.clone()),
    "param swapped": _swap_param,
    "load_state_dict": lambda opt, p: opt.load_state_dict(copy.deepcopy(opt.state_dict())),
}


@pytest.mark.parametrize("change", list(PLAN_CHANGES))
def test_step_plans_see_what_they_depend_on(triton_backend, monkeypatch, change):
    """Each change a plan depends on (fusedmlp.optim._plan's list) sends the next step through
    the full path, which gives torch's numbers (a stale plan would update the old tensors, or
    memory no longer theirs)."""
    taken = _count_plans(monkeypatch)
    ours = _params()
    ref = _clone(ours)
    opt, ref_opt = Adam(ours, lr=0.05), torch.optim.Adam(ref, lr=0.05)
    _run(opt, ref_opt, ours, ref, steps=3)
    assert taken[-1] is not None
    PLAN_CHANGES[change](opt, ours[2])
    PLAN_CHANGES[change](ref_opt, ref[2])
    taken.clear()
    _run(opt, ref_opt, ours, ref, steps=3)
    # the step after the change checks everything again; the next ones have a plan again
    assert [t is not None for t in taken][-2:] == [True, True]
    if change != "load_state_dict":  # load_state_dict drops the plan: no look-up at all
        assert taken[0] is None
    assert float(opt.state[ours[2]]["step"]) == float(ref_opt.state[ref[2]]["step"])


def test_step_plans_step_aside_for_a_missing_grad_and_the_torch_backend(
    triton_backend, launches, monkeypatch
):
    """A step where a param has no gradient takes the full path (torch skips that param), and
    so do the steps after it while that param's step counter lags (one launch per count);
    the torch backend never takes a plan, and the Triton backend records one again."""
    taken = _count_plans(monkeypatch)
    ours = _params()
    ref = _clone(ours)
    opt, ref_opt = Adam(ours, lr=0.05), torch.optim.Adam(ref, lr=0.05)
    _run(opt, ref_opt, ours, ref, steps=3)
    with fusedmlp.use_backend("torch"):
        launched = launches.total
        _run(opt, ref_opt, ours, ref, steps=2)
        assert launches.total == launched and taken[-2:] == [None, None]
    _run(opt, ref_opt, ours, ref, steps=3)
    assert [t is not None for t in taken[-3:]] == [False, True, True]
    _run(opt, ref_opt, ours, ref, steps=1, skip=lambda step: (4,))
    assert taken[-1] is None
    launched = launches["_adam_kernel"]
    _run(opt, ref_opt, ours, ref, steps=3)  # param 4's counter lags: two counts, two launches
    assert taken[-3:] == [None, None, None]
    assert launches["_adam_kernel"] == launched + 3 * 2


SGD_PLAN_CHANGES = {
    "state dict replaced": _replace_state_dict,
    "buffer dropped": lambda opt, p: opt.state[p].update(momentum_buffer=None),
    "buffer replaced": lambda opt, p: opt.state[p].update(
        momentum_buffer=opt.state[p]["momentum_buffer"] * 1
    ),
    "buffer .data": lambda opt, p: setattr(
        opt.state[p]["momentum_buffer"], "data", opt.state[p]["momentum_buffer"].data.clone()
    ),
    "param .data": PLAN_CHANGES["param .data"],
    "param swapped": _swap_param,
    "load_state_dict": PLAN_CHANGES["load_state_dict"],
}


_NESTEROV = {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}
SGD_PLAN_CASES = [(_NESTEROV, c) for c in [None, *SGD_PLAN_CHANGES]] + [
    ({"momentum": 0.0}, c) for c in [None, *SGD_PLAN_CHANGES] if c is None or "buffer" not in c
]  # without momentum: no buffers to change


@pytest.mark.parametrize(
    "kwargs,change",
    SGD_PLAN_CASES,
    ids=[f"momentum={k['momentum']}-{c}" for k, c in SGD_PLAN_CASES],
)
def test_sgd_step_plans(triton_backend, launches, monkeypatch, kwargs, change):
    """SGD's plans as Adam's: taken from the second step on (with fresh gradients and a
    scheduler), torch's numbers, and every change they depend on seen at the next step."""
    taken = _count_plans(monkeypatch)
    ours = _params()
    ref = _clone(ours)
    opt, ref_opt = SGD(ours, lr=0.05, **kwargs), torch.optim.SGD(ref, lr=0.05, **kwargs)
    _run_scheduled(opt, ref_opt, ours, ref, steps=4, step_size=2)
    assert [t is not None for t in taken] == [False, True, True, True]
    assert launches["_sgd_kernel"] == 4
    if change is None:
        return
    SGD_PLAN_CHANGES[change](opt, ours[2])
    SGD_PLAN_CHANGES[change](ref_opt, ref[2])
    taken.clear()
    _run(opt, ref_opt, ours, ref, steps=3)
    assert [t is not None for t in taken][-2:] == [True, True]
    if change != "load_state_dict":
        assert taken[0] is None


def _optimizer_pairs(cases):
    """Parametrize ``cls, ref_cls, kwargs`` (fusedmlp's optimizer, torch's, their keywords)."""
    return pytest.mark.parametrize(
        "cls,ref_cls,kwargs", cases, ids=[f"{c[0].__name__}-{c[2]}" for c in cases]
    )


TRANSPOSED_CASES = [
    (Adam, torch.optim.Adam, {"amsgrad": True}),
    (AdamW, torch.optim.AdamW, {"weight_decay": 0.1}),
    (SGD, torch.optim.SGD, {}),
    (SGD, torch.optim.SGD, _NESTEROV),
]


@pytest.mark.parametrize("amp", [False, True], ids=["plan", "found_inf"])
@_optimizer_pairs(TRANSPOSED_CASES)
def test_param_transposed_through_data_steps_as_torchs(
    triton_backend, launches, cls, ref_cls, kwargs, amp
):
    """``p.data = p.data.t()`` on a square param keeps its address (a view of the same
    storage), and a gradient assigned afterwards may have any strides (torch checks its size
    and dtype only): here contiguous ones, the recorded strides. The step plan (no AMP) and the
    multi-tensor check's cache (a ``found_inf`` keyword: no plan) took the param for the
    contiguous one they recorded and paired its elements with the wrong gradient elements."""
    ours = _params(shapes=[(5, 5), (7,), (3, 3)])
    ref = _clone(ours)
    opt, ref_opt = cls(ours, lr=0.05, **kwargs), ref_cls(ref, lr=0.05, **kwargs)
    keywords = {"found_inf": torch.zeros((), device=DEVICE)} if amp else {}
    for step in range(5):
        if step == 3:
            for params in (ours, ref):
                params[0].data = params[0].data.t()
                params[2].data = params[2].data.t()
        _feed(ours, ref, step)  # contiguous gradients
        opt.step(**keywords)
        ref_opt.step()
        _assert_params(ours, ref)
    assert ours[0].stride() == (1, 5)
    kernel = "_sgd_kernel" if cls is SGD else "_adam_kernel"
    assert launches[kernel] == 5  # one per step: the transposed params through stand-ins


@pytest.mark.parametrize("amp", [False, True], ids=["plan", "found_inf"])
@pytest.mark.parametrize("view", ["flat", "rows"])
@_optimizer_pairs(TRANSPOSED_CASES)
def test_param_reshaped_through_data_under_a_kept_gradient_raises_as_torch(
    triton_backend, launches, cls, ref_cls, kwargs, view, amp
):
    """``p.data = p.data.view(-1)`` (or ``p.data[:2]``) keeps the param's address, and a
    gradient kept from before still has the old shape: torch's step raises a RuntimeError
    (sizes differ). The step plan and the multi-tensor check's cache, which compare the
    gradients' shapes with the recorded ones, ran the kernel over the reshaped param."""
    ours = _params(shapes=[(4, 6), (7,)])
    ref = _clone(ours)
    opt, ref_opt = cls(ours, lr=0.05, **kwargs), ref_cls(ref, lr=0.05, **kwargs)
    keywords = {"found_inf": torch.zeros((), device=DEVICE)} if amp else {}
    for step in range(2):
        _feed(ours, ref, step)
        opt.step(**keywords)
        ref_opt.step()
    launched = launches.total
    for params in (ours, ref):
        params[0].data = params[0].data.view(-1) if view == "flat" else params[0].data[:2]
    with pytest.raises(RuntimeError):
        ref_opt.step()
    with pytest.raises(RuntimeError, match="does not match param"):
        opt.step(**keywords)
    assert launches.total == launched  # refused before any launch


STATE_VIEWS = {
    "transposed": lambda t: t.t(),
    "flat": lambda t: t.view(-1),
    "rows": lambda t: t[:2],
}
STATE_VIEW_CASES = [TRANSPOSED_CASES[0], TRANSPOSED_CASES[1], TRANSPOSED_CASES[3]]


@pytest.mark.parametrize("view", list(STATE_VIEWS))
@_optimizer_pairs(STATE_VIEW_CASES)
def test_state_tensor_replaced_by_a_view_at_its_address_steps_as_torchs(
    triton_backend, launches, cls, ref_cls, kwargs, view
):
    """``optimizer.state[p]["exp_avg"] = exp_avg.t()`` (or ``.view(-1)``, ``[:2]``) puts
    another tensor at the recorded state tensor's address. The step plan compared the state
    tensors' addresses only: it ran the kernel's flat walk over the view (a transposed moment
    paired with the wrong gradient elements; the other shapes, which torch's step refuses,
    updated as the recorded tensor)."""
    ours = _params(shapes=[(5, 5), (7,), (3, 3)])
    ref = _clone(ours)
    opt, ref_opt = cls(ours, lr=0.05, **kwargs), ref_cls(ref, lr=0.05, **kwargs)
    key = "momentum_buffer" if cls is SGD else "exp_avg"
    _run(opt, ref_opt, ours, ref, steps=3)  # the plan recorded, and taken
    for o, params in ((opt, ours), (ref_opt, ref)):
        state = o.state[params[0]]
        state[key] = STATE_VIEWS[view](state[key])
    kernel = "_sgd_kernel" if cls is SGD else "_adam_kernel"
    if view != "transposed":
        _feed(ours, ref, 3)
        with pytest.raises(RuntimeError):
            ref_opt.step()
        with pytest.raises(RuntimeError, match="does not match param"):
            opt.step()
        assert launches[kernel] == 3  # refused before any launch
        return
    for step in range(3, 6):
        _feed(ours, ref, step)
        opt.step()
        ref_opt.step()
        _assert_params(ours, ref)
        for p, q in zip(ours, ref):
            torch.testing.assert_close(opt.state[p][key], ref_opt.state[q][key])
    assert launches[kernel] == 6


def test_amsgrad_max_keeps_torchs_nan(triton_backend, launches):
    """A NaN in the second moment reaches ``max_exp_avg_sq`` as with torch.maximum (Triton's
    ``tl.maximum`` drops NaN by default): the same state, so checkpoints agree."""
    ours = _params(shapes=[(4, 3), (5,)])
    ref = _clone(ours)
    opt = Adam(ours, lr=0.1, amsgrad=True)
    ref_opt = torch.optim.Adam(ref, lr=0.1, amsgrad=True)
    for step in range(3):
        _feed(ours, ref, step)
        if step == 1:
            ours[0].grad[0, 0] = ref[0].grad[0, 0] = float("nan")
        opt.step()
        ref_opt.step()
    assert launches.total == 3
    for p, q in zip(ours, ref):
        for key in ("exp_avg_sq", "max_exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key], ref_opt.state[q][key], equal_nan=True)
        torch.testing.assert_close(p.detach(), q.detach(), equal_nan=True)
    assert opt.state[ours[0]]["max_exp_avg_sq"].isnan().sum() == 1


@pytest.mark.parametrize(
    "cls,ref_cls,kwargs",
    [
        (Adam, torch.optim.Adam, {"lr": 0.1, "amsgrad": True}),
        (AdamW, torch.optim.AdamW, {"lr": 0.1, "weight_decay": 0.1}),
        (SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    ],
    ids=["adam", "adamw", "sgd"],
)
def test_duplicate_params_in_a_group_step_as_torchs(backend, cls, ref_cls, kwargs):
    """torch only warns for a param listed twice in a group, then updates it once per
    appearance, one after the other (Adam's step counter twice): one fused launch would
    update it once with one bias correction (and race over it on a GPU)."""
    ours = _params(shapes=[(4, 3), (5,)])
    ref = _clone(ours)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = cls([ours[0], ours[1], ours[0]], **kwargs)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        ref_opt = ref_cls([ref[0], ref[1], ref[0]], **kwargs)
    _run(opt, ref_opt, ours, ref, steps=4)
    if cls is not SGD:
        assert float(opt.state[ours[0]]["step"]) == float(ref_opt.state[ref[0]]["step"]) == 8


@pytest.mark.parametrize("shape", [(1,), ()], ids=["1-element", "0-d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
def test_step_counters_of_other_layouts_load_as_in_torch(backend, shape, dtype):
    """Checkpoints whose ``step`` counters are one-element tensors of another shape or dtype
    (torch < 2.1's fused/capturable Adam kept ``(1,)`` float32 counters): torch's Adam reads
    them with ``.item()``, so must fusedmlp's."""
    ours = _params(shapes=[(4, 3), (5,), (2,)])
    ref = _clone(ours)
    opt = Adam(ours, lr=0.05, amsgrad=True)
    ref_opt = torch.optim.Adam(ref, lr=0.05, amsgrad=True)
    _feed(ours, ref, 0)
    ref_opt.step()
    sd = copy.deepcopy(ref_opt.state_dict())
    for entry in sd["state"].values():
        entry["step"] = torch.full(shape, float(entry["step"])).to(dtype)
    opt.load_state_dict(copy.deepcopy(sd))
    ref_opt.load_state_dict(sd)
    with torch.no_grad():
        for p, q in zip(ours, ref):
            p.copy_(q)
    _run(opt, ref_opt, ours, ref, steps=4, start=1)
    for p, q in zip(ours, ref):
        assert opt.state[p]["step"].shape == ref_opt.state[q]["step"].shape == shape
        assert float(opt.state[p]["step"]) == float(ref_opt.state[q]["step"]) == 4


@pytest.mark.parametrize(
    "cls,ref_cls,kwargs",
    [
        (Adam, torch.optim.Adam, {"lr": 0.1}),
        (SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    ],
    ids=["adam", "sgd"],
)
def test_state_of_another_shape_raises_torchs_runtime_error(backend, cls, ref_cls, kwargs):
    """State loaded from another model's checkpoint (same param count, other shapes): torch's
    step raises a RuntimeError; so does fusedmlp's (still a ValueError, as it always was)."""
    src = _params(shapes=[(3,), (4,)])
    src_opt = ref_cls(src, **kwargs)
    _feed(src, _clone(src), 0)
    src_opt.step()
    for make in (cls, ref_cls):
        ps = _params(shapes=[(3,), (5,)])
        opt = make(ps, **kwargs)
        opt.load_state_dict(copy.deepcopy(src_opt.state_dict()))
        _feed(ps, _clone(ps), 1)
        with pytest.raises(RuntimeError) as info:
            opt.step()
        if make is cls and backend == "triton":
            assert isinstance(info.value, ValueError) and "(4,)" in str(info.value)


@pytest.mark.parametrize(
    "start,end",
    [
        (torch.float32, torch.float16),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.float32),
    ],
    ids=["fp32-to-fp16", "fp32-to-bf16", "fp16-to-fp32"],
)
def test_sgd_momentum_buffers_of_another_dtype_step_as_torchs(triton_backend, launches, start, end):
    """A param converted (``.half()``, ``.float()``) after momentum steps keeps its buffer in
    the old dtype: torch's in-place SGD ops cast between the two and step on; so does
    fusedmlp's (torch's step for that param, the kernel for the others), where the kernel's
    dtype check raised before."""
    ours = _params(start, shapes=[(4, 3), (5,), (2,)])
    ref = _clone(ours)
    kwargs = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1, "nesterov": True}
    opt, ref_opt = SGD(ours, **kwargs), torch.optim.SGD(ref, **kwargs)
    for step in range(2):
        _feed(ours, ref, step)
        opt.step()
        ref_opt.step()
    assert launches.total == 2
    with torch.no_grad():
        for p in (ours[0], ref[0]):
            p.data = p.data.to(end)
    for step in range(2, 5):
        _feed(ours, ref, step)
        opt.step()
        ref_opt.step()
    assert launches["_sgd_kernel"] == 2 + 3  # the other params stay on the kernel
    for p, q in zip(ours, ref):
        assert p.dtype == q.dtype
        buf, ref_buf = opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"]
        assert buf.dtype == ref_buf.dtype == start
        torch.testing.assert_close(p.detach(), q.detach(), rtol=3e-2, atol=3e-2)
        torch.testing.assert_close(buf, ref_buf, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("found_inf", [0.0, 1.0], ids=["step", "skip"])
@pytest.mark.parametrize("end", [torch.float64, torch.float16], ids=["to-fp64", "to-fp16"])
def test_sgd_amp_keywords_with_momentum_buffers_of_another_dtype_step_as_torchs(
    backend, end, found_inf
):
    """GradScaler's keywords over a param converted after momentum steps (its buffer in the old
    dtype): torch.optim.SGD under GradScaler (unscale, skip or step, its in-place ops casting)
    steps it. fusedmlp's torch path (float64 params, the torch backend) handed it to torch's
    fused SGD, which takes one dtype: a RuntimeError."""
    ours = _params(shapes=[(4, 3), (5,)])
    ref = _clone(ours)
    kwargs = {"lr": 0.1, "momentum": 0.9, "dampening": 0.2}
    opt, ref_opt = SGD(ours, **kwargs), torch.optim.SGD(ref, **kwargs)
    _run(opt, ref_opt, ours, ref, steps=2)
    for p in (ours[0], ref[0]):
        p.data = p.data.to(end)
    scale = torch.tensor(4.0, device=DEVICE)
    _feed(ours, ref, 2)
    opt.step(grad_scale=scale, found_inf=torch.tensor(found_inf, device=DEVICE))
    for q in ref:  # GradScaler's work for an optimizer without AMP support
        q.grad.div_(scale)
    if not found_inf:
        ref_opt.step()
    for p, q in zip(ours, ref):
        assert p.dtype == q.dtype
        buf, ref_buf = opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"]
        assert buf.dtype == ref_buf.dtype == torch.float32
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(buf, ref_buf)


def test_adam_step_counter_that_is_no_tensor_raises_torchs_runtime_error(triton_backend, launches):
    """A ``step`` put in the state as a Python number: torch's Adam raises a RuntimeError
    before updating anything; fusedmlp's raised a TypeError from its counter buffer."""
    ours = _params(shapes=[(4, 3), (5,)])
    ref = _clone(ours)
    for make, ps in ((Adam, ours), (torch.optim.Adam, ref)):
        opt = make(ps, lr=0.1)
        _feed(ps, _clone(ps), 0)
        opt.step()
        for p in ps:
            opt.state[p]["step"] = 1.0
        before = [p.detach().clone() for p in ps]
        with pytest.raises(RuntimeError, match="singleton tensors"):
            opt.step()
        for p, b in zip(ps, before):
            torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)
    assert launches.total == 1


@pytest.mark.parametrize(
    "cls,ref_cls,kwargs",
    [
        (Adam, torch.optim.Adam, {"lr": 0.1, "amsgrad": True}),
        (SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    ],
    ids=["adam", "sgd"],
)
@pytest.mark.parametrize("after", ["one-step", "planned", "missing-grad", "cloned"])
def test_state_made_in_inference_mode_updates_as_torchs(
    triton_backend, launches, cls, ref_cls, kwargs, after
):
    """Steps taken inside ``torch.inference_mode()`` make the state (SGD momentum buffers,
    Adam moments) as inference tensors: torch's next step outside it raises (an in-place update
    of an inference tensor), where the kernel, writing through raw addresses, updated them
    (also through a step plan, or Adam's step counters rebuilt outside inference mode by a
    missing gradient). Cloned state steps on, as torch's."""
    ours = _params(shapes=[(4, 3), (5,), (2,)])
    ref = _clone(ours)
    opt, ref_opt = cls(ours, **kwargs), ref_cls(ref, **kwargs)
    with torch.inference_mode():
        for step in range(2 if after == "planned" else 1):
            _feed(ours, ref, step)
            opt.step()
            ref_opt.step()
    assert launches.total == (2 if after == "planned" else 1)
    _assert_params(ours, ref)
    assert all(t.is_inference() for t in opt.state[ours[0]].values())
    if after == "cloned":
        for o in (opt, ref_opt):
            for state in o.state.values():
                for key in state:
                    state[key] = state[key].clone()
        _run(opt, ref_opt, ours, ref, steps=5, start=2)
        return
    skip = {2} if after == "missing-grad" else set()
    for o, ps in ((opt, ours), (ref_opt, ref)):
        _feed(ps, _clone(ps), 5, skip)
        before = [p.detach().clone() for p in ps]
        with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside"):
            o.step()
        torch.testing.assert_close([p.detach() for p in ps], before, rtol=0, atol=0)


def test_adam_step_counters_stay_plain_tensors_through_inference_mode(triton_backend, launches):
    """A step inside ``torch.inference_mode()`` updates torch's (normal) step counters in
    place; fusedmlp's counter buffer, had it been rebuilt there (another set of params with
    gradients), made them inference tensors, and the next step outside raised."""
    ours = _params(shapes=[(4, 3), (5,), (2,)])
    ref = _clone(ours)
    opt, ref_opt = Adam(ours, lr=0.1), torch.optim.Adam(ref, lr=0.1)
    for step in range(4):
        _feed(ours, ref, step, skip={2} if step else set())
        with torch.inference_mode(step == 1):
            opt.step()
            ref_opt.step()
    _assert_params(ours, ref)
    assert launches.total == 4
    for p, q in zip(ours, ref):
        assert not opt.state[p]["step"].is_inference()
        assert float(opt.state[p]["step"]) == float(ref_opt.state[q]["step"])


def test_amp_keywords_with_complex_params_step_as_torch(backend, launches):
    """``step(grad_scale=..., found_inf=...)`` over a group with a complex param: the complex
    param takes torch's algorithm after GradScaler's own unscale and skip. Its counters sit on
    the params' device; on the CPU torch's capturable algorithm refuses them (an
    AssertionError on every step), so the host-step algorithm runs there."""
    g = torch.Generator().manual_seed(0)
    ours = [
        torch.nn.Parameter(torch.randn(4, 3, generator=g).to(DEVICE)),
        torch.nn.Parameter(torch.randn(3, dtype=torch.complex64, generator=g).to(DEVICE)),
    ]
    ref = _clone(ours)
    opt = Adam(ours, lr=0.1, amsgrad=True)
    ref_opt = torch.optim.Adam(ref, lr=0.1, amsgrad=True)
    scale = torch.tensor(4.0, device=DEVICE)
    for step in range(3):
        for p, q in zip(ours, ref):
            grad = torch.randn(p.shape, dtype=p.dtype, generator=g).to(DEVICE)
            p.grad, q.grad = grad * 4, grad.clone()
        skipped = step == 1
        opt.step(grad_scale=scale, found_inf=torch.tensor(float(skipped), device=DEVICE))
        if not skipped:
            ref_opt.step()
    _assert_params(ours, ref)
    for p, q in zip(ours, ref):
        assert float(opt.state[p]["step"]) == float(ref_opt.state[q]["step"]) == 2
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key], ref_opt.state[q][key])
    assert launches["_adam_kernel"] == (3 if backend == "triton" else 0)


AMP_LAYOUT_CASES = [
    (SGD, {"momentum": 0.9, "dampening": 0.2}, torch.float16, False),
    (SGD, {"momentum": 0.9, "nesterov": True}, torch.bfloat16, False),
    (SGD, {}, torch.bfloat16, False),
    (SGD, {"momentum": 0.9, "weight_decay": 0.1}, torch.float32, True),
    (SGD, {"momentum": 0.9}, torch.float64, True),
    (Adam, {"amsgrad": True}, torch.float32, True),
    (Adam, {"weight_decay": 0.1}, torch.float64, True),
    (AdamW, {"weight_decay": 0.1}, torch.float16, True),
]


@pytest.mark.parametrize(
    "cls,kwargs,dtype,transposed",
    AMP_LAYOUT_CASES,
    ids=[
        f"{c.__name__}-{k}-{str(d)[6:]}{'-transposed' if t else ''}"
        for c, k, d, t in AMP_LAYOUT_CASES
    ],
)
def test_amp_keywords_on_torchs_path_step_as_torchs_non_fused(
    backend, cls, kwargs, dtype, transposed
):
    """GradScaler's keywords on fusedmlp's torch path (the torch backend, the CPU default;
    float64 params) ran torch's fused Adam/SGD kernels, which torch 2.13 gets wrong on the CPU
    for non-contiguous tensors (a weight transposed through ``.data``, and the state made in
    its strides) and, for SGD, for fp16/bf16: updates off by tenths. The reference is
    torch.optim's default (non-fused) optimizer under GradScaler: unscale, skip or step."""
    ref_cls = getattr(torch.optim, cls.__name__)
    ours = _params(dtype, shapes=[(4, 4), (5,), (3, 3)])
    ref = _clone(ours)
    if transposed:
        for params in (ours, ref):
            params[0].data = params[0].data.t()
            params[2].data = params[2].data.t()
    opt, ref_opt = cls(ours, lr=0.05, **kwargs), ref_cls(ref, lr=0.05, **kwargs)
    scale = torch.tensor(4.0, device=DEVICE)
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        for p, q in zip(ours, ref):
            grad = torch.randn(p.shape, generator=g).to(device=DEVICE, dtype=dtype)
            p.grad, q.grad = grad * 4, grad.clone()
        skipped = step == 2
        opt.step(grad_scale=scale, found_inf=torch.tensor(float(skipped), device=DEVICE))
        if not skipped:
            ref_opt.step()
        for p, q in zip(ours, ref):
            assert_close(p.detach(), q.detach())
            for key, value in ref_opt.state[q].items():
                if key == "step":
                    assert float(opt.state[p][key]) == float(value)
                else:
                    assert_close(opt.state[p][key], value)


def _recorded_launches(monkeypatch, record):
    """(the multi_tensor module, a list that gets ``record(kwargs)`` of each optimizer launch);
    no tables kept from earlier tests' stand-in captures."""
    from fusedmlp.kernels import multi_tensor as MT

    monkeypatch.setattr(MT, "_CAPTURED_TABLES", [])
    launched = []
    original = MT.launch

    def recording(kernel, grid, **kwargs):
        launched.append(record(kwargs))
        return original(kernel, grid, **kwargs)

    monkeypatch.setattr(MT, "launch", recording)
    return MT, launched


def _two_params(cls):
    """(two params with gradients, ``cls`` over them, its keywords): SGD with momentum, Adam
    with its step counters on the device where it can."""
    kw = {"momentum": 0.9} if cls is SGD else {"capturable": DEVICE == "cuda"}
    params = [torch.randn(n, device=DEVICE, requires_grad=True) for n in (3, 5)]
    for p in params:
        p.grad = torch.randn_like(p)
    return params, cls(params, lr=0.1, **kw), kw


@pytest.mark.parametrize("cls", [Adam, SGD])
def test_tables_of_a_captured_step_outlive_the_table_caches(
    triton_backend, launches, monkeypatch, cls
):
    # A step recorded in a CUDA graph capture bakes its address tables (params, grads, state,
    # Adam's step counters) into the graph, which reads them at every replay; the caches
    # holding them dropped them after 32 other entries or at the next call with other
    # gradients, freeing memory the graph's kernel still reads (and whose pinned host buffers
    # its captured copies re-read). The capture is stood in for by its test (_capturing): the
    # tables launched then must stay alive through many eager steps over fresh tensors.
    import gc
    import weakref

    MT, launched = _recorded_launches(
        monkeypatch, lambda kwargs: [weakref.ref(kwargs[k]) for k in ("addrs", "meta")]
    )
    params, opt, kw = _two_params(cls)
    opt.step()  # warm-up: state made, tables built and cached
    monkeypatch.setattr(MT, "_capturing", lambda ref: True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # "captured"
    captured = launched[-1]
    monkeypatch.setattr(MT, "_capturing", lambda ref: False)
    for _ in range(40):  # fresh gradients and fresh optimizers: the caches turn over
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        other = [torch.randn(4, device=DEVICE, requires_grad=True)]
        other[0].grad = torch.randn(4, device=DEVICE)
        cls(other, lr=0.1, **kw).step()
    gc.collect()
    assert launches.total > 80
    assert all(ref() is not None for ref in captured)


@pytest.mark.parametrize("cls", [Adam, SGD])
def test_tables_built_in_a_capture_are_not_reused_by_eager_steps(
    triton_backend, launches, monkeypatch, cls
):
    # A table built during a CUDA graph capture is filled only when the graph replays (its copy
    # is recorded, not run): a capture without warm-up steps cached its tables, and an eager
    # step before the first replay read them unfilled. The capture is stood in for by its test.
    MT, launched = _recorded_launches(
        monkeypatch, lambda kwargs: {k: v for k, v in kwargs.items() if torch.is_tensor(v)}
    )
    params, opt, _ = _two_params(cls)
    opt.step()  # state made eagerly: its tables are filled
    for p in params:  # gradients at new addresses: a new address table
        p.grad = torch.randn_like(p)
    monkeypatch.setattr(MT, "_capturing", lambda ref: True)
    opt.step()  # "captured": the address table is built now
    monkeypatch.setattr(MT, "_capturing", lambda ref: False)
    opt.step()
    opt.step()
    first, captured, eager, again = launched[-4:]
    assert captured["addrs"] is not first["addrs"]
    assert eager["addrs"] is not captured["addrs"]  # built again, and filled
    assert again["addrs"] is eager["addrs"]  # eager steps share their cached tables
    assert captured["meta"] is first["meta"]  # a capture reuses the filled ones it finds


@pytest.mark.parametrize(
    "cls,ref_cls,group",
    [
        (SGD, torch.optim.SGD, {"lr": "1e-3"}),
        (SGD, torch.optim.SGD, {"weight_decay": "0.1"}),
        (Adam, torch.optim.Adam, {"eps": "1e-8"}),
        (AdamW, torch.optim.AdamW, {"weight_decay": "0.01"}),
    ],
    ids=["sgd-lr", "sgd-weight_decay", "adam-eps", "adamw-weight_decay"],
)
def test_text_hyperparameter_in_a_group_raises_torchs_type_error(
    backend, launches, cls, ref_cls, group
):
    """A group value read as text (PyYAML reads ``1e-3`` as a string): torch's step raises
    TypeError; the kernel path's ``float()`` accepted it and trained on. No param moves."""
    for make in (ref_cls, cls):
        p = torch.nn.Parameter(torch.ones(4, device=DEVICE))
        p.grad = torch.ones(4, device=DEVICE)
        opt = make([{"params": [p], **group}], lr=0.1)
        with pytest.raises(TypeError):
            opt.step()
        assert torch.equal(p.detach(), torch.ones(4, device=DEVICE))
        if make is cls:
            assert launches.total == 0


@pytest.mark.parametrize("cls,ref_cls", [(Adam, torch.optim.Adam), (SGD, torch.optim.SGD)])
def test_plain_group_of_a_differentiable_optimizer_steps_under_autograd_as_torch(
    triton_backend, launches, cls, ref_cls
):
    """``differentiable=True`` turns grad mode on in the step; a group that sets it False still
    runs under autograd in torch, whose in-place update of a leaf that requires grad raises.
    The kernel's raw writes skipped that check and updated the leaf."""
    for make in (ref_cls, cls):
        leaf = torch.nn.Parameter(torch.ones(4, device=DEVICE))
        leaf.grad = torch.ones(4, device=DEVICE)
        w = torch.randn(4, device=DEVICE, requires_grad=True).clone()
        w.grad = torch.ones(4, device=DEVICE)
        groups = [{"params": [w]}, {"params": [leaf], "differentiable": False}]
        opt = make(groups, lr=0.1, differentiable=True)
        with pytest.raises(RuntimeError, match="leaf Variable"):
            opt.step()
        assert torch.equal(leaf.detach(), torch.ones(4, device=DEVICE))
    assert launches.total == 0


@pytest.mark.parametrize("planless", [False, True], ids=["planned", "kept-group-planless"])
@pytest.mark.parametrize("cls", [Adam, SGD])
def test_a_removed_group_is_not_kept_alive(triton_backend, launches, cls, planless):
    """A param group deleted from ``param_groups`` (its state and module deleted too): torch's
    optimizer holds nothing of it; fusedmlp's step plans (and Adam's step counters) held the
    group, its params and their state for the optimizer's lifetime. ``planless``: the group
    kept has no plan (a param of it never gets a gradient), so the caches hold no more entries
    than there are groups, and a test of their lengths never saw the removed group's plan."""
    import gc
    import weakref

    kwargs = {"momentum": 0.9} if cls is SGD else {}
    body, head = torch.nn.Linear(8, 8).to(DEVICE), torch.nn.Linear(8, 4).to(DEVICE)
    unused = [torch.nn.Parameter(torch.zeros(3, device=DEVICE))] if planless else []
    opt = cls(
        [{"params": [*body.parameters(), *unused]}, {"params": head.parameters()}],
        lr=1e-3,
        **kwargs,
    )
    x = torch.randn(5, 8, device=DEVICE)
    for _ in range(3):
        opt.zero_grad()
        head(body(x)).sum().backward()
        opt.step()
    assert launches.total == 6  # a launch per group and step
    held = [*head.parameters(), *(v for q in head.parameters() for v in opt.state[q].values())]
    refs = [weakref.ref(t) for t in held if torch.is_tensor(t)]
    del opt.param_groups[1]
    for q in list(head.parameters()):
        del opt.state[q]
    del head, held, q
    for _ in range(2):
        opt.zero_grad()
        body(x).sum().backward()
        opt.step()
    gc.collect()
    assert refs and not [r for r in refs if r() is not None]
