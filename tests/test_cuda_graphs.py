"""CUDA graphs: a whole training step (forward, loss, backward, optimizer step) captured with
``torch.cuda.graph`` and replayed equals the uncaptured loop; with GradScaler's tensors it
equals torch's fused optimizers, skipped steps included; dropout seeds advance under replay.

GPU only (skipped on CPU-only machines); run by ``benchmarks/gpu_check.sh``.

The optimizers: ``Adam(capturable=True)`` keeps its step counters on the device and fusedmlp's
kernel reads them (no host synchronisation); ``SGD`` has no counter, its kernel is captured as
it is. The address tables are built during warm-up (or inside the capture, where their pinned
host buffer stays alive with the table, see ``kernels/adam.py``).
"""

import pytest
import torch
from conftest import assert_close

import fusedmlp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

WARMUP, REPLAYS = 3, 4
# Steps whose found_inf is set (GradScaler's skipped steps): one among the eager warm-up
# steps, two among the replays; never the first (torch's fused SGD would then read a momentum
# buffer it never initialised).
_SKIPPED = (2, 4, 6)


def _setup(opt_name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        fusedmlp.nn.Linear(12, 32, activation="relu"),
        fusedmlp.nn.BatchNorm1d(32),
        fusedmlp.nn.Linear(32, 16, activation="tanh"),
        fusedmlp.nn.Linear(16, 5),
    ).cuda()
    if opt_name == "adam":
        opt = fusedmlp.optim.Adam(model.parameters(), lr=1e-2, capturable=True)
    else:
        opt = fusedmlp.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, fusedmlp.nn.CrossEntropyLoss(), opt


def _batches():
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(WARMUP + REPLAYS, 24, 12, generator=g)
    ys = torch.randint(0, 5, (WARMUP + REPLAYS, 24), generator=g)
    return xs.cuda(), ys.cuda()


def _step(model, loss_fn, opt, x, y, scale=None):
    """Forward, backward (of the loss times ``scale``, GradScaler's way) and optimizer step."""
    loss = loss_fn(model(x), y)
    (loss if scale is None else loss * scale).backward()
    opt.step()
    return loss


def _train_step(model, loss_fn, opt, x, y):
    opt.zero_grad(set_to_none=True)
    return _step(model, loss_fn, opt, x, y)


def _captured_losses(model, loss_fn, opt, xs, ys, scale=None, found_inf=None):
    """Warm-up steps on a side stream, one step captured, replayed on the remaining batches
    (torch's "whole network capture"); the losses of every step. With GradScaler's tensors
    (``scale``, ``found_inf``, set on the optimizer by the caller): ``found_inf`` is set for
    the steps in ``_SKIPPED``, whose replays must leave every parameter as it was."""
    static_x, static_y = xs[0].clone(), ys[0].clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    losses = []

    def load(i):
        static_x.copy_(xs[i])
        static_y.copy_(ys[i])
        if found_inf is not None:
            found_inf.fill_(float(i in _SKIPPED))

    with torch.cuda.stream(stream):
        for i in range(WARMUP):
            load(i)
            opt.zero_grad(set_to_none=True)
            losses.append(_step(model, loss_fn, opt, static_x, static_y, scale).item())
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = _step(model, loss_fn, opt, static_x, static_y, scale)
    for i in range(WARMUP, WARMUP + REPLAYS):
        load(i)
        before = [p.detach().clone() for p in model.parameters()]
        graph.replay()
        losses.append(static_loss.item())
        if found_inf is not None and i in _SKIPPED:
            for p, b in zip(model.parameters(), before, strict=True):
                assert torch.equal(p.detach(), b)
    torch.cuda.synchronize()
    return losses


@pytest.mark.parametrize("opt_name", ["adam", "sgd"])
def test_captured_training_step_equals_eager_loop(opt_name):
    xs, ys = _batches()
    # Reference: the plain loop.
    model, loss_fn, opt = _setup(opt_name)
    ref_losses = [_train_step(model, loss_fn, opt, xs[i], ys[i]).item() for i in range(len(xs))]
    ref_params = [p.detach().clone() for p in model.parameters()]
    ref_buffers = [b.clone() for b in model.buffers()]

    # Captured: warm-up on a side stream, capture one step, replay it on new data.
    model, loss_fn, opt = _setup(opt_name)
    losses = _captured_losses(model, loss_fn, opt, xs, ys)
    assert_close(torch.tensor(losses), torch.tensor(ref_losses), dtype=torch.float32)
    for a, e in zip(list(model.parameters()) + list(model.buffers()), ref_params + ref_buffers):
        assert_close(a.detach().float(), e.float(), dtype=torch.float32, scale=10)
    if opt_name == "adam":  # the device step counter advanced under replay
        step = opt.state[next(model.parameters())]["step"]
        assert step.is_cuda and float(step) == WARMUP + REPLAYS


def test_dropout_masks_differ_between_replays():
    drop = fusedmlp.nn.Dropout(0.5)
    x = torch.ones(4096, device="cuda")
    drop(x)  # warm-up (kernel compiled outside the capture)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = drop(x)
    graph.replay()
    first = out.clone()
    graph.replay()
    second = out.clone()
    assert not torch.equal(first, second)
    for o in (first, second):  # still a valid inverted-dropout mask
        assert set(o.unique().tolist()) <= {0.0, 2.0}
        assert 0.4 < (o == 0).float().mean().item() < 0.6


def test_grad_scaler_step_has_no_host_sync():
    """fusedmlp's optimizers under GradScaler: no device-to-host synchronisation in step."""
    model, loss_fn, opt = _setup("adam")
    xs, ys = _batches()
    scaler = torch.amp.GradScaler("cuda")
    for i in range(2):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_fn(model(xs[i]), ys[i])
        scaler.scale(loss).backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step(grad_scale=scaler._scale, found_inf=torch.zeros((), device="cuda"))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "path, precision, recompute",
    [("fused", "highest", False), ("dz", "high", False), ("dz", "high", True)],
)
def test_mlp_fused_blocks_captured_step_equals_eager_loop(
    interpreter_splits, monkeypatch, path, precision, recompute
):
    # fusedmlp.nn.MLP's fused Linear -> BatchNorm -> ReLU blocks (statistics from the Linear's
    # epilogue; on the TF32 "dz" path the block's dx pass hands dZ^T to the Linear before it;
    # split reductions merged by their last program, the interpreter's split rules forcing
    # them at this size) under capture and replay, against the same steps run eagerly.
    # ``recompute``: each block and the Linear after it as one Function, whose backward
    # reduction recomputes the block's output (transposed on the dz path), as at the bench's size
    from fusedmlp.autograd import fused_block as AFB
    from fusedmlp.kernels import fused_block as KFB
    from fusedmlp.kernels import linear as KL

    if recompute:
        monkeypatch.setattr(AFB, "RECOMPUTE_MIN_BYTES", 0)

    rule = KFB._splits
    monkeypatch.setattr(KFB, "_splits", lambda R, C, device: rule(R, C, torch.device("cpu")))
    monkeypatch.setattr(KL, "BACKWARD_PATH", path)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        _check_mlp_capture()
    finally:
        torch.set_float32_matmul_precision(previous)


def _check_mlp_capture():
    xs, ys = _batches()

    def setup():
        torch.manual_seed(0)
        model = fusedmlp.nn.MLP(12, [64, 32], 5, batchnorm=True).cuda()
        opt = fusedmlp.optim.Adam(model.parameters(), lr=1e-2, capturable=True)
        return model, fusedmlp.nn.CrossEntropyLoss(), opt

    model, loss_fn, opt = setup()
    ref_losses = [_train_step(model, loss_fn, opt, xs[i], ys[i]).item() for i in range(len(xs))]
    ref = [t.detach().clone() for t in [*model.parameters(), *model.buffers()]]

    model, loss_fn, opt = setup()
    losses = _captured_losses(model, loss_fn, opt, xs, ys)
    assert_close(torch.tensor(losses), torch.tensor(ref_losses), dtype=torch.float32)
    for a, e in zip([*model.parameters(), *model.buffers()], ref):
        assert_close(a.detach().float(), e.float(), dtype=torch.float32, scale=10)


def test_train_cli_cuda_graph_runs_match_and_learn(capsys):
    # ``fusedmlp train --cuda-graph``: both models' steps replayed from CUDA graphs (after 3
    # eager warm-up steps). Without dropout the columns agree as in the eager runs (the same
    # batches); with Adam (capturable) and dropout the data are learnt as eagerly.
    import importlib.util

    from fusedmlp.cli.main import main

    # the digits come with scikit-learn (an optional extra); else the generated disc problem
    dataset, floor = ("digits", 93.0) if importlib.util.find_spec("sklearn") else ("disc", 85.0)
    args = ["train", "--dataset", dataset, "--epochs", "5", "--no-progress", "--cuda-graph"]
    assert main([*args, "--optimizer", "sgd", "--lr", "0.1", "--dropout", "0"]) == 0
    out = capsys.readouterr().out
    assert "CUDA graph replay" in out
    lines = [ln for ln in out.splitlines() if ln.startswith("epoch")]
    assert len(lines) == 5
    for line in lines:
        fused, torch_part = line.split("fusedmlp:")[1].split("torch:")
        assert float(fused.split()[1]) == pytest.approx(float(torch_part.split()[1]), abs=2e-3)
    assert main([*args, "--no-compare"]) == 0
    last = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch")][-1]
    assert float(last.split("acc")[1].split("%")[0]) > floor


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("impl", ["fusedmlp", "torch"])
def test_bench_graph_timing_runs_both_impls(impl, backward, launches):
    # target_grid.py --graph: a linear + ReLU case built on a side stream, timed as replays
    # of a captured graph of back-to-back calls (its backward on that stream too), for fusedmlp
    # (whose kernels the capture records: launches counted) and torch alike
    import dataclasses

    from fusedmlp.cli import _bench_engine as E
    from fusedmlp.cli._bench_ops import OPS, Case, build_linear

    device = torch.device("cuda")
    case = Case("linear", "bwd" if backward else "fwd", "M=512 N=64 K=64", "bf16", impl,
                build_linear(impl, device, torch.bfloat16, 512, 64, 64, backward),
                order=(OPS.index("linear"), 0))  # fmt: skip
    cfg = E.settings(True, True)
    ceilings = {"copy_gbps": None, "matmul_tflops": None}
    launches.clear()
    row = E.run_case(dataclasses.replace(case, graph=True), device, cfg, ceilings, "gpu")
    assert row["error"] is None and row["timing"] == "cuda graph replay, L2 warm", row
    assert 0 < row["ms"] < 1.0
    if impl == "fusedmlp":
        assert launches.total > 0
    assert row["host_ms"] is None  # graph replays: no host time per call
    # the same case launched (events, L2 flushed) records the host's time per call beside it
    row = E.run_case(case, device, cfg, ceilings, "gpu")
    assert row["error"] is None and row["timing"] == "cuda events, L2 flushed", row
    assert 0 < row["host_ms"] < 100.0
    # on the default stream there is no capture: a clear error, not a hang
    with pytest.raises(RuntimeError, match="side stream"):
        E.time_graph(lambda: None, [], device, cfg)


def _amp_twins(opt_name, device):
    """fusedmlp's Linear chain and torch's (same weights), with their optimizers: fusedmlp's
    and torch's fused one (which takes GradScaler's grad_scale / found_inf attributes). No
    batch norm: a Linear's bias before it has a gradient of rounding noise, which Adam
    normalises to steps of lr in both, in unrelated directions."""
    torch.manual_seed(0)
    ours = torch.nn.Sequential(
        fusedmlp.nn.Linear(12, 32, activation="relu"),
        fusedmlp.nn.Linear(32, 16, activation="tanh"),
        fusedmlp.nn.Linear(16, 5),
    ).to(device)
    theirs = torch.nn.Sequential(
        torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16), torch.nn.Tanh(),
        torch.nn.Linear(16, 5),
    ).to(device)  # fmt: skip
    with torch.no_grad():
        for p, q in zip(theirs.parameters(), ours.parameters(), strict=True):
            p.copy_(q)
    if opt_name == "adam":
        opts = (
            fusedmlp.optim.Adam(ours.parameters(), lr=1e-2, capturable=True),
            torch.optim.Adam(theirs.parameters(), lr=1e-2, capturable=True, fused=True),
        )
    else:
        opts = (
            fusedmlp.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9),
            torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9, fused=True),
        )
    ours_run = (ours, fusedmlp.nn.CrossEntropyLoss(), opts[0])
    return ours_run, (theirs, torch.nn.CrossEntropyLoss(), opts[1])


def _amp_losses_eager(model, loss_fn, opt, xs, ys, scale, found_inf):
    opt.grad_scale, opt.found_inf = scale, found_inf  # as GradScaler sets them
    losses = []
    for i in range(len(xs)):
        found_inf.fill_(float(i in _SKIPPED))
        opt.zero_grad(set_to_none=True)
        losses.append(_step(model, loss_fn, opt, xs[i], ys[i], scale).item())
    return losses


@pytest.mark.parametrize("opt_name", ["adam", "sgd"])
def test_captured_amp_step_skips_found_inf_steps_as_torch(opt_name):
    # A captured step with GradScaler's tensors (the gradients scaled by 1024, found_inf read
    # on the device): replays whose found_inf is set change no parameter, moment, momentum or
    # step counter, and every step equals torch's fused optimizer run eagerly with the same
    # tensors.
    xs, ys = _batches()
    (model, loss_fn, opt), torch_run = _amp_twins(opt_name, "cuda")
    scale = torch.full((), 1024.0, device="cuda")
    ref_losses = _amp_losses_eager(
        *torch_run, xs, ys, scale.clone(), torch.zeros((), device="cuda")
    )

    found_inf = torch.zeros((), device="cuda")
    opt.grad_scale, opt.found_inf = scale, found_inf
    losses = _captured_losses(model, loss_fn, opt, xs, ys, scale, found_inf)

    theirs, _, torch_opt = torch_run
    assert_close(torch.tensor(losses), torch.tensor(ref_losses), dtype=torch.float32)
    for p, q in zip(model.parameters(), theirs.parameters(), strict=True):
        assert_close(p.detach(), q.detach(), dtype=torch.float32, scale=10)
        for key, value in torch_opt.state[q].items():
            assert_close(opt.state[p][key].float(), value.float(), scale=10, msg=key)
