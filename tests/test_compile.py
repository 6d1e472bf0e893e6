"""torch.compile(fullgraph=True) over fusedmlp models: one graph, no graph break, eager results.

``backend="aot_eager"`` traces forward and backward through AOTAutograd (the custom ops'
fake implementations, the autograd Functions, the mutating running-statistics op) and runs
them eagerly, on both fusedmlp backends (the Triton kernels under the interpreter: tiny
shapes). Dropout draws its Philox seed with ``torch.randint`` from torch's global generator;
under aot_eager that call runs in the graph with the same generator, so the same
``torch.manual_seed`` gives the same masks as eager (checked exactly below). Inductor replaces
random ops with its own generator, so its test uses a model without dropout.
"""

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from conftest import DEVICE, assert_close
from torch._dynamo.utils import counters

import fusedmlp


def _sequential():
    return torch.nn.Sequential(
        fusedmlp.nn.Linear(5, 8, activation="relu"),
        fusedmlp.nn.BatchNorm1d(8),
        fusedmlp.nn.Dropout(0.3),
        fusedmlp.nn.Linear(8, 6, activation="tanh"),
        fusedmlp.nn.Linear(6, 3),
    ), fusedmlp.nn.CrossEntropyLoss()


def _mlp():
    return fusedmlp.nn.MLP(
        5, [8, 6], 3, batchnorm=True, dropout=0.25
    ), fusedmlp.nn.CrossEntropyLoss(label_smoothing=0.1)


def _converted():
    torch_model = torch.nn.Sequential(
        torch.nn.Linear(5, 8),
        torch.nn.LeakyReLU(0.1),
        torch.nn.BatchNorm1d(8),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(8, 3),
        torch.nn.LogSoftmax(dim=1),
    )
    return fusedmlp.nn.convert(torch_model), fusedmlp.nn.NLLLoss()


def _mlp_no_batchnorm():
    # Linear(relu) -> Identity -> Dropout blocks: the dropout in the Linear's epilogue
    return fusedmlp.nn.MLP(5, [8, 6], 3, dropout=0.25), fusedmlp.nn.CrossEntropyLoss()


MODELS = {
    "sequential": _sequential,
    "mlp": _mlp,
    "mlp_no_bn": _mlp_no_batchnorm,
    "converted": _converted,
}


def _fresh(make):
    torch.manual_seed(0)
    model, loss_fn = make()
    return model.to(DEVICE), loss_fn.to(DEVICE)


def _run(model, loss_fn, fn, x, y):
    """One forward (seeded) + backward: loss, grads, running statistics."""
    torch.manual_seed(123)
    loss = fn(x, y)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    return loss.detach(), grads, buffers


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(MODELS))
def test_fullgraph_aot_eager_matches_eager(backend, launches, monkeypatch, name, training):
    from fusedmlp.nn import fused_block

    # eager mode's BatchNorm1d computes its statistics with its own pass, as a traced graph
    # does, not from the Linear's epilogue (other roundings)
    monkeypatch.setattr(fused_block, "STATS_MIN_ROWS", 1 << 30)
    torch._dynamo.reset()
    counters.clear()
    x = torch.randn(6, 5, device=DEVICE)
    y = torch.randint(0, 3, (6,), device=DEVICE)
    eager_model, eager_loss = _fresh(MODELS[name])
    model, loss_fn = _fresh(MODELS[name])
    eager_model.train(training)
    model.train(training)

    def step(m, lf):
        return lambda a, b: lf(m(a), b)

    cnt = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step(model, loss_fn), fullgraph=True, backend=cnt)
    expected = _run(eager_model, eager_loss, step(eager_model, eager_loss), x, y)
    launches.clear()
    got = _run(model, loss_fn, compiled, x, y)
    # Twice: the second call reuses the graph (no recompilation, e.g. on the dropout seed).
    model.zero_grad()
    _run(model, loss_fn, compiled, x, y)
    assert cnt.frame_count == 1
    assert not counters["graph_break"], dict(counters["graph_break"])
    # Same seed, same dropout masks: exactly the eager numbers (same kernels, same order; the
    # eager BatchNorm1d's statistics pass as the graph's: STATS_MIN_ROWS above).
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    for a, e in zip(got[1] + got[2], expected[1] + expected[2]):
        assert_close(a, e, dtype=torch.float32, scale=0.1)
    if backend == "triton":
        assert launches.total > 0
    else:
        assert launches.total == 0


def test_fullgraph_aot_eager_block_then_linear_recomputing(backend, launches, monkeypatch):
    # The MLP's BatchNorm blocks with the next Linear in one Function that recomputes the
    # block's output in backward (autograd/fused_block.py; from 1 MiB of output, here always).
    from fusedmlp.autograd import fused_block

    monkeypatch.setattr(fused_block, "RECOMPUTE_MIN_BYTES", 0)
    test_fullgraph_aot_eager_matches_eager(backend, launches, monkeypatch, "mlp", True)
    if backend == "triton":
        # two compiled steps x two blocks x (forward + recomputation)
        assert launches["_fused_fwd_kernel"] == 8


def test_dropout_seed_advances_inside_compiled_graph(backend):
    """The seed is drawn inside the graph: two calls give different masks, and the same
    ``manual_seed`` reproduces the eager mask."""
    torch._dynamo.reset()
    drop = fusedmlp.nn.Dropout(0.5)
    fn = torch.compile(drop, fullgraph=True, backend="aot_eager")
    x = torch.ones(64, device=DEVICE)
    torch.manual_seed(7)
    a, b = fn(x), fn(x)
    torch.manual_seed(7)
    e = drop(x)
    assert not torch.equal(a, b)
    torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_fullgraph_inductor_once():
    """The default (inductor) backend on a small model: forward and backward as eager."""
    torch._dynamo.reset()
    with fusedmlp.use_backend("torch"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            fusedmlp.nn.Linear(4, 8, activation="relu"), fusedmlp.nn.Linear(8, 3)
        ).to(DEVICE)
        loss_fn = fusedmlp.nn.CrossEntropyLoss()
        x = torch.randn(5, 4, device=DEVICE)
        y = torch.randint(0, 3, (5,), device=DEVICE)
        eager = loss_fn(model(x), y)
        eager.backward()
        expected = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        compiled = torch.compile(lambda a, b: loss_fn(model(a), b), fullgraph=True)
        loss = compiled(x, y)
        loss.backward()
    assert_close(loss.detach(), eager.detach(), dtype=torch.float32)
    for p, e in zip(model.parameters(), expected):
        assert_close(p.grad, e, dtype=torch.float32)


@pytest.mark.parametrize("cls", ["Adam", "AdamW", "SGD"])
def test_compiled_optimizer_step_compiles_once_and_matches_torch(backend, cls):
    # Same graphs and results as torch's optimizer. (dynamo marks a compiled optimizer's groups
    # capturable: on CUDA the fused step then reads its counters on the device, so the step
    # count never becomes a guarded constant; CPU params take torch's capturable algorithm.)
    kw = {"lr": 0.05} if cls != "SGD" else {"lr": 0.05, "momentum": 0.9}
    results = {}
    for lib in ("fusedmlp", "torch"):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3).to(DEVICE)
        opt = getattr(fusedmlp.optim if lib == "fusedmlp" else torch.optim, cls)(
            model.parameters(), **kw
        )
        step = torch.compile(opt.step, backend="aot_eager")
        g = torch.Generator().manual_seed(1)
        for _ in range(6):
            model(torch.randn(2, 4, generator=g).to(DEVICE)).square().sum().backward()
            step()
            opt.zero_grad()
        results[lib] = (
            [p.detach().clone() for p in model.parameters()],
            counters["stats"]["unique_graphs"],
        )
    (ours, ours_graphs), (ref, ref_graphs) = results["fusedmlp"], results["torch"]
    for a, b in zip(ours, ref):
        assert_close(a, b)
    assert ours_graphs == ref_graphs, (ours_graphs, ref_graphs)


def _steps_against_torch(step, torch_opt, params, ref, n=4, graphs=1):
    """``n`` steps of the compiled functional ``step(grads)`` over ``params`` and of torch's
    optimizer over ``ref`` (copies) with the same random gradients: same results, and
    ``graphs`` graphs in all (no recompilation per step)."""
    counters.clear()
    for _ in range(n):
        grads = [torch.randn_like(p) for p in params]
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        torch_opt.step()
        step(grads)
    for p, r in zip(params, ref):
        assert_close(p, r.detach())
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("decoupled", [False, True], ids=["Adam", "AdamW"])
def test_fused_adam_device_step_traces_once_in_one_graph(triton_backend, launches, decoupled):
    # The path a compiled optimizer takes on CUDA (dynamo marks the groups capturable, so the
    # step counters live on the device), traced whole on any device: the per-tensor attribute
    # reads must not graph-break (they did with operator.attrgetter: 13 graphs for 6 steps on
    # an H200), and the result is torch.optim's.
    from fusedmlp.autograd import adam as A

    torch._dynamo.reset()
    params = [torch.randn(3, 4, device=DEVICE), torch.randn(3, device=DEVICE)]
    ref = [p.clone().requires_grad_() for p in params]
    torch_opt = (torch.optim.AdamW if decoupled else torch.optim.Adam)(
        ref, lr=0.05, weight_decay=0.01
    )
    state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    steps = [torch.zeros((), device=DEVICE) for _ in params]
    hp = dict(amsgrad=False, beta1=0.9, beta2=0.999, lr=0.05, weight_decay=0.01, eps=1e-8)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(grads):
        A.adam(
            params,
            grads,
            [m for m, _ in state],
            [v for _, v in state],
            [],
            steps,
            maximize=False,
            decoupled_weight_decay=decoupled,
            device_step=True,
            **hp,
        )

    _steps_against_torch(step, torch_opt, params, ref)
    assert [float(s) for s in steps] == [4.0, 4.0]
    assert launches.total == 4


def test_fused_sgd_step_traces_without_breaks_or_recompiles(triton_backend, launches):
    # SGD's functional (momentum buffers created on the first step) traced whole: no graph
    # break in the partitioning, and torch.optim.SGD's result.
    from fusedmlp.autograd import sgd as S

    torch._dynamo.reset()
    params = [torch.randn(3, 4, device=DEVICE), torch.randn(3, device=DEVICE)]
    ref = [p.clone().requires_grad_() for p in params]
    hp = dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True)
    torch_opt = torch.optim.SGD(ref, **hp)
    bufs = [None, None]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(grads):
        S.sgd(params, grads, bufs, maximize=False, **hp)

    # two graphs: the first step creates the momentum buffers (a list entry goes from None to
    # a tensor), then one for every later step
    _steps_against_torch(step, torch_opt, params, ref, graphs=2)
    for b, r in zip(bufs, ref):
        assert_close(b, torch_opt.state[r]["momentum_buffer"])
    assert launches.total == 4


@pytest.mark.parametrize("third", [torch.float64, torch.float16], ids=["fp64", "fp16"])
def test_compiled_sgd_dispatch_matches_eager_over_mixed_dtypes(triton_backend, launches, third):
    # The dispatch's compiled branches (plain loops under torch.compile) against its eager ones
    # (C-loop attribute reads): one kernel launch per kernel dtype (fp32, bf16, fp16), fp64 on
    # torch's algorithm, in both modes, with the same results.
    from fusedmlp.autograd import sgd as S

    torch._dynamo.reset()
    shapes_dtypes = [((3, 4), torch.float32), ((5,), torch.bfloat16), ((2, 2), third)]
    params = [torch.randn(s, device=DEVICE).to(dt) for s, dt in shapes_dtypes]
    eager = [p.clone() for p in params]
    hp = dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=False)
    bufs, eager_bufs = [None] * 3, [None] * 3

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(grads):
        S.sgd(params, grads, bufs, maximize=False, **hp)

    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        S.sgd(eager, [g.clone() for g in grads], eager_bufs, maximize=False, **hp)
        step(grads)
    for p, e in zip(params + bufs, eager + eager_bufs):
        assert p.dtype == e.dtype
        assert_close(p, e)
    partitions = 2 if third == torch.float64 else 3
    assert launches.total == partitions * 2 * 3  # compiled and eager, three steps


@pytest.mark.parametrize("batchnorm", [False, True], ids=["mlp", "mlp_bn"])
def test_dynamic_true_traces_dropout_p(backend, launches, batchnorm):
    # dynamic=True makes the modules' float attributes (a Dropout's p) symbolic floats: the
    # NaN check of p used math.isnan, which dynamo cannot trace on one (a graph break, an
    # error under fullgraph=True). Same masks as eager under the same seed, also at a new batch.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = fusedmlp.nn.MLP(5, [8], 3, batchnorm=batchnorm, dropout=0.25).to(DEVICE)
    eager = fusedmlp.nn.MLP(5, [8], 3, batchnorm=batchnorm, dropout=0.25).to(DEVICE)
    eager.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    for n in (6, 9):
        x = torch.randn(n, 5, device=DEVICE)
        torch.manual_seed(1)
        got = compiled(x)
        torch.manual_seed(1)
        assert_close(got, eager(x), dtype=torch.float32)
    for a, e in zip(model.buffers(), eager.buffers()):
        assert_close(a, e, dtype=torch.float32)
    assert (launches.total > 0) == (backend == "triton")


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "dropout2d"])
def test_fullgraph_warning_paths_trace(triton_backend, launches, name):
    # torch's deprecation warnings (Softmax's implicit dim, Dropout2d on a 3-D input) are
    # warnings.warn calls, which dynamo cannot trace: fullgraph=True raised where torch's own
    # modules compile. They now run at trace time (as torch's warn there), with the kernels.
    torch._dynamo.reset()
    module = {
        "softmax": fusedmlp.nn.Softmax(),
        "log_softmax": fusedmlp.nn.LogSoftmax(),
        "dropout2d": fusedmlp.nn.Dropout2d(0.5),
    }[name]
    x = torch.randn(4, 6, 5, device=DEVICE)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    match = "3D input" if name == "dropout2d" else "Implicit dimension"
    with pytest.warns(UserWarning, match=match):
        torch.manual_seed(2)
        got = compiled(x)
    assert launches.total == 1
    with pytest.warns(UserWarning, match=match):
        torch.manual_seed(2)
        expected = module(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_export_with_an_unbounded_batch_dimension(triton_backend, launches):
    # The fused block's memory rule (recompute its output at >= 1 MiB) compared the symbolic
    # batch with a constant: a guard that bounded the batch, so an unbounded Dim failed to
    # export. The exported program runs at other batch sizes, as the torch twin.
    torch.manual_seed(0)
    model = fusedmlp.nn.MLP(8, [8, 8], 4, batchnorm=True).to(DEVICE)
    ref = model.to_torch()
    batch = torch.export.Dim("batch", min=2)
    ep = torch.export.export(
        model, (torch.randn(6, 8, device=DEVICE),), dynamic_shapes={"input": {0: batch}}
    )
    x = torch.randn(11, 8, device=DEVICE)
    assert_close(ep.module()(x), ref(x))
    assert launches.total > 0


def test_fullgraph_cumulative_batchnorm_matches_torch(backend, launches):
    # BatchNorm1d(momentum=None) (cumulative average, factor 1 / num_batches_tracked): the
    # torch backend read the factor with float() of the traced counter, a data-dependent float
    # that fullgraph=True refused ("Could not guard on data-dependent expression"; torch's own
    # module fails there too). Traced, the factor now stays on the device. Against torch's
    # modules in eager mode: outputs, gradients, running statistics over three batches.
    torch._dynamo.reset()
    torch.manual_seed(0)
    ref = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5, momentum=None), torch.nn.Linear(5, 3)
    ).to(DEVICE)
    model = fusedmlp.nn.convert(ref)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    for n in (6, 6, 9):
        x = torch.randn(n, 4, device=DEVICE)
        out, expected = compiled(x), ref(x)
        assert_close(out, expected)
        out.square().sum().backward()
        expected.square().sum().backward()
        for p, r in zip(model.parameters(), ref.parameters()):
            assert_close(p.grad, r.grad, atol=1e-4)  # the BN-preceded bias: rounding noise
        for b, r in zip(model.buffers(), ref.buffers()):
            assert_close(b.double(), r.double(), dtype=torch.float32)
    assert int(model[1].num_batches_tracked) == 3
    assert (launches.total > 0) == (backend == "triton")
