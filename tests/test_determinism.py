"""Bit-identical results across two runs with the same seed, on the Triton path.

Every op (forward and gradients), BatchNorm's running statistics, dropout (its mask comes from
torch's generator: ``torch.manual_seed`` reproduces it) and the optimizers' steps must give
``torch.equal`` results when run twice: the default paths use no float atomics and no
order-dependent reductions. Each test also checks that the Triton kernels really ran.
"""

import pytest
import torch
from conftest import DEVICE

import fusedmlp
import fusedmlp.functional as FF


def _twice(fn, seed=0):
    """Run ``fn`` twice from the same seed; both results (lists of tensors)."""
    results = []
    for _ in range(2):
        torch.manual_seed(seed)
        results.append([t.detach().clone() if t is not None else None for t in fn()])
    return results


def _assert_identical(first, second):
    assert len(first) == len(second) and first
    for i, (a, b) in enumerate(zip(first, second)):
        assert a is not None and b is not None, i
        assert a.dtype == b.dtype and a.shape == b.shape, i
        assert torch.equal(a, b) or (  # NaN == NaN bitwise (all-ignored cross-entropy)
            torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()], b[~b.isnan()])
        ), f"result {i} differs between two runs"


def _inputs(*shapes, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).to(DEVICE) for s in shapes]


@pytest.mark.parametrize(
    "activation, dtype",
    [
        (None, torch.float32),
        ("relu", torch.float32),
        ("leaky_relu", torch.float32),
        ("tanh", torch.float32),
        ("gelu", torch.bfloat16),
        ("silu", torch.float16),
    ],
)
def test_linear_is_deterministic(triton_backend, launches, activation, dtype):
    def run():
        x, w, b, g = _inputs((37, 33), (19, 33), (19,), (37, 19), dtype=dtype)
        x, w, b = (t.requires_grad_() for t in (x, w, b))
        y = FF.linear(x, w, b, activation=activation)
        y.backward(g)
        return [y, x.grad, w.grad, b.grad]

    _assert_identical(*_twice(run))
    assert launches.total > 0


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_is_deterministic(triton_backend, launches, reduction):
    def run():
        (x,) = _inputs((29, 67))
        x.requires_grad_()
        gen = torch.Generator().manual_seed(2)
        target = torch.randint(0, 67, (29,), generator=gen).to(DEVICE)
        target[::5] = 3
        weight = torch.rand(67, generator=gen).to(DEVICE) + 0.5
        loss = FF.cross_entropy(
            x, target, weight, ignore_index=3, reduction=reduction, label_smoothing=0.1
        )
        loss.backward(torch.ones_like(loss))
        nll = FF.nll_loss(torch.log_softmax(x.detach(), 1), target, weight)
        return [loss, x.grad, nll]

    _assert_identical(*_twice(run))
    assert launches.total > 0


@pytest.mark.parametrize("log", [False, True])
def test_softmax_is_deterministic(triton_backend, launches, log):
    def run():
        x, g = _inputs((3, 5, 41), (3, 5, 41))
        x.requires_grad_()
        y = (FF.log_softmax if log else FF.softmax)(x, 1)
        y.backward(g)
        return [y, x.grad]

    _assert_identical(*_twice(run))
    assert launches.total > 0


@pytest.mark.parametrize("dims", [2, 4])
def test_batchnorm_is_deterministic(triton_backend, launches, dims):
    def run():
        shape = (37, 5) if dims == 2 else (6, 5, 3, 7)
        bn = (fusedmlp.nn.BatchNorm1d if dims == 2 else fusedmlp.nn.BatchNorm2d)(5).to(DEVICE)
        out = []
        for step in range(2):
            x, g = _inputs(shape, shape, seed=step)
            x.requires_grad_()
            y = bn(x)
            y.backward(g)
            out += [y, x.grad, bn.weight.grad.clone(), bn.bias.grad.clone()]
        out += [bn.running_mean, bn.running_var]
        bn.eval()
        out.append(bn(_inputs(shape, seed=9)[0]))
        return out

    _assert_identical(*_twice(run))
    assert launches.total > 0


def test_dropout_is_deterministic_under_manual_seed(triton_backend, launches):
    def run():
        x, g = _inputs((67, 33), (67, 33))
        x.requires_grad_()
        y = FF.dropout(x, 0.4, training=True)
        y2 = FF.dropout(x, 0.4, training=True)  # the next draw: another mask
        (y + y2).backward(g)
        channels = fusedmlp.nn.Dropout2d(0.5)(_inputs((4, 9, 2, 3))[0])
        return [y, y2, x.grad, channels]

    first, second = _twice(run, seed=1234)
    _assert_identical(first, second)
    assert launches.total > 0
    assert not torch.equal(first[0] != 0, first[1] != 0), "successive calls drew the same mask"
    torch.manual_seed(4321)
    third = run()
    assert not torch.equal(first[0] != 0, third[0] != 0), "another seed gave the same mask"


def test_dropout_with_generator_is_deterministic(triton_backend, launches):
    def run():
        (x,) = _inputs((41, 17))
        gen = torch.Generator(device=DEVICE).manual_seed(7)
        return [FF.dropout(x, 0.5, training=True, generator=gen)]

    first, second = _twice(run, seed=0)
    torch.manual_seed(99)  # the default generator does not matter when one is given
    third = run()
    _assert_identical(first, second)
    _assert_identical(first, third)
    assert launches.total > 0


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("Adam", dict(lr=1e-2, amsgrad=True, weight_decay=0.01)),
        ("AdamW", dict(lr=1e-2)),
        ("SGD", dict(lr=1e-2, momentum=0.9, nesterov=True)),
    ],
)
def test_optimizer_steps_are_deterministic(triton_backend, launches, name, kwargs):
    def run():
        params = [torch.nn.Parameter(t) for t in _inputs((17, 9), (9,), (3, 4, 5))]
        opt = getattr(fusedmlp.optim, name)(params, **kwargs)
        for step in range(3):
            for p, g in zip(params, _inputs(*(p.shape for p in params), seed=10 + step)):
                p.grad = g
            opt.step()
        state = [t for p in params for t in opt.state[p].values() if torch.is_tensor(t)]
        return params + state

    _assert_identical(*_twice(run))
    assert launches.total > 0


def test_mlp_training_is_deterministic(triton_backend, launches):
    """A few training steps of a model with every op: identical parameters twice."""

    def run():
        model = torch.nn.Sequential(
            fusedmlp.nn.Linear(13, 32, activation="relu"),
            fusedmlp.nn.BatchNorm1d(32),
            fusedmlp.nn.Dropout(0.2),
            fusedmlp.nn.Linear(32, 5),
        ).to(DEVICE)
        opt = fusedmlp.optim.AdamW(model.parameters(), lr=1e-2)
        loss_fn = fusedmlp.nn.CrossEntropyLoss(label_smoothing=0.05)
        losses = []
        for step in range(2):
            (x,) = _inputs((24, 13), seed=step)
            y = torch.randint(0, 5, (24,), generator=torch.Generator().manual_seed(step))
            loss = loss_fn(model(x), y.to(DEVICE))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return losses + list(model.state_dict().values())

    _assert_identical(*_twice(run, seed=5))
    assert launches.total > 0


@pytest.mark.parametrize("path", ["fused", "dz"])
def test_split_merges_by_the_last_program_are_repeatable(
    triton_backend, launches, arrivals, monkeypatch, path
):
    # The splits of a narrow dW and of batch norm's gradient sums are merged by whichever
    # program of a tile arrives last (``fusedmlp.kernels.arrival``). On a GPU that program
    # varies from run to run; a partial read before its writer's stores were visible would
    # vary the result too. Ten runs, bit-identical, each leaving its counters at zero.
    from fusedmlp.kernels import linear as KL

    monkeypatch.setattr(KL, "BACKWARD_PATH", path)
    M = 4096 if DEVICE == "cuda" else 200
    x, w, b, g = _inputs((M, 10), (12, 10), (12,), (M, 12))
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    bn = fusedmlp.nn.BatchNorm1d(12).to(DEVICE)

    def run():
        for t in (x, w, b, *bn.parameters()):
            t.grad = None
        bn(FF.linear(x, w, b)).backward(g)
        return [x.grad, w.grad, b.grad, bn.weight.grad, bn.bias.grad]

    first = [t.clone() for t in run()]
    for _ in range(9):
        _assert_identical(first, run())
    # the linear's dW split and the batch norm's sums, each merged in its kernel, every run
    assert len(arrivals) == 20 and arrivals.all_reset()
    assert launches["_sum_splits_kernel"] == 0, dict(launches)


def test_arrival_counters_one_zeroed_buffer_per_stream():
    # fusedmlp.kernels.arrival: the counters are reused launch after launch (each launch leaves
    # them at zero); the interpreter's, left counting by a kernel that raised part-way, are
    # zeroed again; a larger request gets a larger buffer; on a GPU each stream has its own.
    from fusedmlp.kernels.arrival import arrival_counters

    device = torch.device(DEVICE)
    first = arrival_counters(device, 10)
    assert first.dtype == torch.int32 and first.numel() >= 10 and not bool(first.any())
    assert arrival_counters(device, 10) is first
    if device.type == "cpu":
        first[3] = 5
        assert arrival_counters(device, 10) is first and not bool(first.any())
    bigger = arrival_counters(device, 5000)
    assert bigger.numel() >= 5000 and not bool(bigger.any())
    if device.type == "cuda":
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            other = arrival_counters(device, 10)
        assert other.data_ptr() != bigger.data_ptr() and not bool(other.any())
