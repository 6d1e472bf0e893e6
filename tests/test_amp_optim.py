"""torch.amp.GradScaler with fusedmlp's optimizers: grad_scale / found_inf read on the device.

Reference: torch.optim's default (non-fused) Adam / SGD under the same GradScaler, which
unscales the gradients itself and skips the whole ``step`` call when it finds an inf/NaN.
"""

import copy
import functools

import pytest
import torch
from conftest import DEVICE

import fusedmlp
from fusedmlp.optim import SGD, Adam, AdamW

STEPS = 6
INF_STEPS = (0, 3)  # a skipped first step (fresh state) and a skipped later step


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        fusedmlp.nn.Linear(5, 7, activation="tanh"), fusedmlp.nn.Linear(7, 3)
    ).to(DEVICE)


def _ref_model(model):
    ref = _model()
    ref.load_state_dict(model.state_dict())
    return ref


def _loss(model, step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(9, 5, generator=g).to(DEVICE)
    return (model(x) ** 2).mean()


def _train(model, opt, scaler, inject=INF_STEPS, unscale=False):
    """A few GradScaler steps; steps in ``inject`` get an inf gradient. Returns the scales."""
    scales = []
    for step in range(STEPS):
        opt.zero_grad()
        scaler.scale(_loss(model, step)).backward()
        if step in inject:
            next(model.parameters()).grad[0, 0] = float("inf")
        if unscale:
            scaler.unscale_(opt)  # then the optimizer gets grad_scale=None, found_inf only
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales


NESTEROV = {"lr": 0.1, "momentum": 0.9, "nesterov": True}
OPTS = [
    (Adam, torch.optim.Adam, {"lr": 1e-2}),
    (AdamW, torch.optim.AdamW, {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.1}),
    # torch's foreach SGD (the default on CUDA) overwrites .grad with the nesterov direction
    # (test_nesterov_foreach_reference_rewrites_grads); the single-tensor SGD (the CPU default)
    # leaves the gradient in .grad, as torch's fused SGD and fusedmlp's do.
    (SGD, functools.partial(torch.optim.SGD, foreach=False), NESTEROV),
    (SGD, torch.optim.SGD, {"lr": 0.1, "weight_decay": 0.01}),
]


@pytest.mark.parametrize("unscale", [False, True], ids=["scaled", "unscale_"])
@pytest.mark.parametrize(
    "cls,ref_cls,kw", OPTS, ids=["Adam", "AdamW-amsgrad-wd", "SGD-nesterov", "SGD-wd"]
)
def test_grad_scaler_matches_torch(backend, launches, cls, ref_cls, kw, unscale):
    assert cls._step_supports_amp_scaling
    model = _model()
    ref = _ref_model(model)
    opt, ref_opt = cls(model.parameters(), **kw), ref_cls(ref.parameters(), **kw)
    scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**10, growth_interval=2)
    ref_scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**10, growth_interval=2)
    scales = _train(model, opt, scaler, unscale=unscale)
    ref_scales = _train(ref, ref_opt, ref_scaler, unscale=unscale)
    # The injected infs halve the scale, exactly as with torch's optimizer.
    assert scales == ref_scales
    assert scales[0] == 2.0**9 and scales[3] < scales[2]
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
        # The gradients the optimizer saw were unscaled (written back, as torch's fused).
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), ref.parameters()):
        st, ref_st = opt.state[p], ref_opt.state[q]
        if "step" in st:  # skipped steps are not counted
            assert float(st["step"]) == float(ref_st["step"]) == STEPS - len(INF_STEPS)
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
            if k in ref_st:
                torch.testing.assert_close(st[k], ref_st[k], rtol=1e-5, atol=1e-6)
    kernel = "_adam_kernel" if cls is not SGD else "_sgd_kernel"
    # Skipped steps launch too: found_inf is read in-kernel, never on the host. Except SGD's
    # skipped first step, which would create the momentum buffers: it reads found_inf on the
    # host and launches nothing (test_skipped_step_that_initialises_state_keeps_torchs_state).
    skipped_first = cls is SGD and kw.get("momentum", 0) != 0 and 0 in INF_STEPS
    assert launches[kernel] == (STEPS - skipped_first if backend == "triton" else 0)


def test_nesterov_foreach_reference_rewrites_grads(backend):
    """Against torch's foreach SGD (CUDA's default) with nesterov momentum: the same parameters
    and momentum buffers, but torch's foreach step adds ``momentum * buf`` into ``.grad`` in
    place (``_foreach_add_(grads, bufs)`` when there is no weight decay and no maximize), where
    fusedmlp (like torch's fused and single-tensor SGD) leaves the unscaled gradient there."""
    model = _model()
    ref = _ref_model(model)
    opt = SGD(model.parameters(), **NESTEROV)
    ref_opt = torch.optim.SGD(ref.parameters(), foreach=True, **NESTEROV)
    _train(model, opt, torch.amp.GradScaler(DEVICE, init_scale=2.0**10, growth_interval=2))
    _train(ref, ref_opt, torch.amp.GradScaler(DEVICE, init_scale=2.0**10, growth_interval=2))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
        buf, ref_buf = opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"]
        torch.testing.assert_close(buf, ref_buf, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(q.grad, p.grad + NESTEROV["momentum"] * buf)


@pytest.mark.parametrize("cls", [Adam, SGD])
def test_found_inf_skips_everything_without_host_sync(backend, monkeypatch, cls):
    """Explicit keywords; found_inf = 1 leaves params, state and grads as they were, and the
    step reads neither tensor on the host (``item``/``__bool__``/``__float__`` would raise)."""
    model = _model()
    opt = cls(model.parameters(), lr=0.1, **({"momentum": 0.9} if cls is SGD else {}))
    _loss(model, 0).backward()
    opt.step()  # state exists
    _loss(model, 1).backward()
    params = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    state = {k: v.clone() for p in model.parameters() for k, v in opt.state[p].items()}
    scale = torch.tensor(4.0, device=DEVICE)
    found = torch.tensor(1.0, device=DEVICE)

    def no_sync(*args, **kwargs):
        raise AssertionError("host synchronisation in the optimizer step")

    with monkeypatch.context() as m:
        for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
            m.setattr(torch.Tensor, name, no_sync)
        opt.step(grad_scale=scale, found_inf=found)
    for p, p0, g0 in zip(model.parameters(), params, grads):
        assert torch.equal(p.detach(), p0) and torch.equal(p.grad, g0)
    after = {k: v for p in model.parameters() for k, v in opt.state[p].items()}
    for k, v in state.items():
        assert torch.equal(after[k].cpu(), v.cpu()), k
    # found_inf = 0: the gradients are divided by grad_scale, written back, and applied.
    ref_model = _model()
    ref_model.load_state_dict(model.state_dict())
    ref_opt = cls(ref_model.parameters(), lr=0.1, **({"momentum": 0.9} if cls is SGD else {}))
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # else shared state tensors
    for p, g0 in zip(ref_model.parameters(), grads):
        p.grad = g0 / 4
    opt.step(grad_scale=scale, found_inf=torch.zeros((), device=DEVICE))
    ref_opt.step()
    for p, q, g0 in zip(model.parameters(), ref_model.parameters(), grads):
        torch.testing.assert_close(p.grad, g0 / 4)
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-6)


def test_torch_fused_group_keeps_torch_amp(backend):
    """fused=True runs torch's fused Adam, which takes grad_scale/found_inf itself."""
    model = _model()
    ref = _ref_model(model)
    opt = Adam(model.parameters(), lr=1e-2, fused=True)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2, fused=True)
    _train(model, opt, torch.amp.GradScaler(DEVICE, init_scale=256.0))
    _train(ref, ref_opt, torch.amp.GradScaler(DEVICE, init_scale=256.0))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach())


@pytest.mark.parametrize("unscale", [False, True], ids=["scaled", "unscale_"])
def test_sgd_dampening_with_a_skipped_first_step_matches_torch(backend, launches, unscale):
    """A skipped first step (an inf) with ``dampening != 0``: torch's non-fused SGD under
    GradScaler creates no momentum buffer, so its next step is the first (``buf = grad``);
    fusedmlp's zero buffers made it ``(1 - dampening) * grad``. Steps that create buffers so
    read ``found_inf`` on the host and skip without a launch; later ones launch as before."""
    kw = {"lr": 0.1, "momentum": 0.9, "dampening": 0.5, "weight_decay": 0.01}
    model = _model()
    ref = _ref_model(model)
    opt = SGD(model.parameters(), **kw)
    ref_opt = torch.optim.SGD(ref.parameters(), foreach=False, **kw)
    scales = _train(model, opt, torch.amp.GradScaler(DEVICE, init_scale=2.0**10), unscale=unscale)
    ref_scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**10)
    assert scales == _train(ref, ref_opt, ref_scaler, unscale=unscale)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
        buf, ref_buf = opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"]
        torch.testing.assert_close(buf, ref_buf, rtol=1e-5, atol=1e-6)
    assert launches["_sgd_kernel"] == (STEPS - 1 if backend == "triton" else 0)


def _states(opt, params):
    """Each param's state entry (``"none"`` where it has none) and the state_dict's indices."""
    entries = [dict(opt.state[p]) if p in opt.state else "none" for p in params]
    return entries, sorted(opt.state_dict()["state"])


FIRST_STEP_CASES = [
    (SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, False),
    (SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, True),
    (
        SGD,
        torch.optim.SGD,
        {"lr": 0.1, "momentum": 0.9, "dampening": 0.5, "weight_decay": 0.01},
        False,
    ),
    # a tensor lr: torch's own (non-fused) implementation, under GradScaler's own skip
    (Adam, torch.optim.Adam, {"lr": torch.tensor(0.1)}, False),
    (AdamW, torch.optim.AdamW, {"lr": torch.tensor(0.1), "amsgrad": True}, True),
]


@pytest.mark.parametrize(
    "cls,ref_cls,kw,unscale",
    FIRST_STEP_CASES,
    ids=[
        f"{c[0].__name__}-{i}-{'unscale_' if c[3] else 'scaled'}"
        for i, c in enumerate(FIRST_STEP_CASES)
    ],
)
def test_skipped_step_that_initialises_state_keeps_torchs_state(
    backend, launches, cls, ref_cls, kw, unscale
):
    """A skipped step (an inf) that initialises some params' state (their first step):
    GradScaler does not call torch's non-fused optimizer then, so those params have no state
    entry afterwards. fusedmlp's SGD left zero momentum buffers (``None`` ones with dampening);
    its Adam groups on torch's implementation (a tensor lr) the ``step: 0`` state torch's
    ``_init_group`` had made. (Adam's kernel groups keep that state, torch's fused Adam's, so
    as never to synchronise: fusedmlp.optim.adam's docstring.) The same entries and
    ``state_dict`` as torch's after every step (the first step skipped, then a step skipped
    where the second layer gets its first gradients), the same params and state, and the same
    next steps, also for a state_dict loaded across (ours into torch's, torch's into ours)."""
    model = _model()
    ref = _ref_model(model)
    opt = cls(model.parameters(), **kw)
    ref_opt = ref_cls(ref.parameters(), foreach=False, **kw)
    scalers = [torch.amp.GradScaler(DEVICE, init_scale=2.0**10) for _ in range(2)]
    for step in range(5):
        for net, o, scaler in zip((model, ref), (opt, ref_opt), scalers):
            o.zero_grad()
            scaler.scale(_loss(net, step)).backward()
            if step < 2:  # the second layer's first gradients come at step 2
                for p in net[1].parameters():
                    p.grad = None
            if step in (0, 2):
                next(net.parameters()).grad[0, 0] = float("inf")
            if unscale:
                scaler.unscale_(o)
            scaler.step(o)
            scaler.update()
        params, ref_params = list(model.parameters()), list(ref.parameters())
        (ours, ours_idx), (theirs, their_idx) = _states(opt, params), _states(ref_opt, ref_params)
        assert ours_idx == their_idx, step
        for p, q, st, ref_st in zip(params, ref_params, ours, theirs):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
            if ref_st == "none":
                assert st == "none", (step, st)
                continue
            assert st.keys() == ref_st.keys(), (step, st)
            for key, value in ref_st.items():
                mine = st[key].to(value.device, value.dtype)  # AMP's device step counters
                torch.testing.assert_close(mine, value, rtol=1e-5, atol=1e-6)
    assert scalers[0].get_scale() == scalers[1].get_scale()
    # Sent across after a skip: the next (non-skipped) steps agree.
    model2, ref2 = _ref_model(model), _ref_model(model)
    opt2 = cls(model2.parameters(), **kw)
    ref_opt2 = ref_cls(ref2.parameters(), foreach=False, **kw)
    opt2.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    ref_opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for net, o in ((model, opt), (ref, ref_opt), (model2, opt2), (ref2, ref_opt2)):
        o.zero_grad()
        _loss(net, 9).backward()
        o.step()
    for p, q, p2, q2 in zip(*(net.parameters() for net in (model, ref, model2, ref2))):
        for x in (p, p2, q2):
            torch.testing.assert_close(x.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    # SGD: steps 1 (first layer's buffers made), 3 (the second's: a partition of its own), 4,
    # and the final steps of opt and opt2; the skipped steps 0 and 2, which would make buffers,
    # read found_inf on the host and launch nothing. Adam with a tensor lr: torch's own steps.
    expected = 1 + 2 + 1 + 2 if cls is SGD and backend == "triton" else 0
    assert launches["_sgd_kernel"] == expected and launches["_adam_kernel"] == 0
