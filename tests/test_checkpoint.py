"""Checkpoints move between fusedmlp and torch mid-training and training continues identically.

A fusedmlp model and its fusedmlp optimizer are trained, saved with ``torch.save`` (to a
BytesIO, loaded with ``weights_only=True`` as a careful user does), loaded into the equivalent
``torch.nn`` model and ``torch.optim`` optimizer, trained on, saved again, loaded back into a
fresh fusedmlp model and optimizer, and trained to the end: the parameters, BatchNorm buffers
and optimizer state match an uninterrupted fusedmlp run.
"""

import io

import pytest
import torch
from conftest import DEVICE, assert_close

import fusedmlp

IN, HIDDEN, OUT, BATCH = 11, 24, 5, 32


def _fused_model():
    return torch.nn.Sequential(
        fusedmlp.nn.Linear(IN, HIDDEN, activation="relu"),
        torch.nn.Identity(),  # where torch's ReLU sits: the same state_dict keys
        fusedmlp.nn.BatchNorm1d(HIDDEN),
        fusedmlp.nn.Linear(HIDDEN, OUT),
    ).to(DEVICE)


def _torch_model():
    return torch.nn.Sequential(
        torch.nn.Linear(IN, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.BatchNorm1d(HIDDEN),
        torch.nn.Linear(HIDDEN, OUT),
    ).to(DEVICE)


OPTIMIZERS = {
    "Adam": dict(lr=1e-2, amsgrad=True, weight_decay=1e-3),
    "AdamW": dict(lr=1e-2, weight_decay=0.05),
    "SGD": dict(lr=5e-2, momentum=0.9, nesterov=True),
}


def _batch(step):
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, IN, generator=gen)
    y = torch.randint(0, OUT, (BATCH,), generator=gen)
    return x.to(DEVICE), y.to(DEVICE)


def _train(model, opt, loss_fn, steps):
    model.train()
    for step in steps:
        x, y = _batch(step)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()


def _save(model, opt) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    return buf


def _load(buf, model, opt):
    ckpt = torch.load(buf, weights_only=True)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optim"])


def _run_round_trip(name, backend_name, steps_per_leg):
    kwargs = OPTIMIZERS[name]
    fused_loss = fusedmlp.nn.CrossEntropyLoss()
    a, b, c = (range(i * steps_per_leg, (i + 1) * steps_per_leg) for i in range(3))

    torch.manual_seed(0)
    init = _fused_model().state_dict()

    # Uninterrupted fusedmlp run.
    with fusedmlp.use_backend(backend_name):
        straight = _fused_model()
        straight.load_state_dict(init)
        straight_opt = getattr(fusedmlp.optim, name)(straight.parameters(), **kwargs)
        _train(straight, straight_opt, fused_loss, [*a, *b, *c])

        # fusedmlp -> checkpoint -> torch -> checkpoint -> fusedmlp.
        first = _fused_model()
        first.load_state_dict(init)
        first_opt = getattr(fusedmlp.optim, name)(first.parameters(), **kwargs)
        _train(first, first_opt, fused_loss, a)
        ckpt1 = _save(first, first_opt)

    middle = _torch_model()
    middle_opt = getattr(torch.optim, name)(middle.parameters(), **kwargs)
    _load(ckpt1, middle, middle_opt)
    _train(middle, middle_opt, torch.nn.CrossEntropyLoss(), b)
    ckpt2 = _save(middle, middle_opt)

    with fusedmlp.use_backend(backend_name):
        last = _fused_model()
        last_opt = getattr(fusedmlp.optim, name)(last.parameters(), **kwargs)
        _load(ckpt2, last, last_opt)
        assert type(last_opt) is getattr(fusedmlp.optim, name)
        _train(last, last_opt, fused_loss, c)
    return straight, straight_opt, last, last_opt


def _assert_same_training(straight, straight_opt, last, last_opt, scale):
    ref, got = straight.state_dict(), last.state_dict()
    assert ref.keys() == got.keys()
    for key in ref:
        if key.endswith("num_batches_tracked"):
            assert int(got[key]) == int(ref[key])
        else:
            assert_close(got[key], ref[key], scale=scale, msg=key)
    ref_state, got_state = straight_opt.state_dict(), last_opt.state_dict()
    assert ref_state["param_groups"] == got_state["param_groups"]
    assert ref_state["state"].keys() == got_state["state"].keys()
    for i, state in ref_state["state"].items():
        assert state.keys() == got_state["state"][i].keys()
        for key, value in state.items():
            if torch.is_tensor(value):
                assert_close(got_state["state"][i][key], value, scale=scale, msg=f"{i} {key}")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_checkpoint_round_trip_through_torch_continues_training(name):
    straight, straight_opt, last, last_opt = _run_round_trip(name, "torch", steps_per_leg=3)
    # The torch backend composes torch's own ops: the round trip is (nearly) exact.
    _assert_same_training(straight, straight_opt, last, last_opt, scale=0.1)
    assert int(last[2].num_batches_tracked) == 9


def test_checkpoint_round_trip_on_the_triton_path(launches):
    straight, straight_opt, last, last_opt = _run_round_trip("Adam", "triton", steps_per_leg=1)
    assert launches.total > 0
    # The middle leg ran torch's ops instead of the kernels: fp32 rounding differences only.
    _assert_same_training(straight, straight_opt, last, last_opt, scale=1.0)


def test_checkpoint_loads_into_a_fusedmlp_model_from_torch():
    """A torch checkpoint (model + optimizer) of the equivalent network loads into fusedmlp."""
    torch.manual_seed(3)
    src = _torch_model()
    src_opt = torch.optim.Adam(src.parameters(), lr=1e-2)
    _train(src, src_opt, torch.nn.CrossEntropyLoss(), range(2))
    dst = _fused_model()
    dst_opt = fusedmlp.optim.Adam(dst.parameters(), lr=1e-2)
    _load(_save(src, src_opt), dst, dst_opt)
    src.eval()
    dst.eval()
    x, _ = _batch(7)
    with fusedmlp.use_backend("torch"):
        assert_close(dst(x), src(x))
    saved = src_opt.state_dict()
    assert dst_opt.state_dict()["state"].keys() == saved["state"].keys()
