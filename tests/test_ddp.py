"""DistributedDataParallel smoke test: 2 processes, gloo, CPU.

An MLP of fusedmlp Linear layers (no batchnorm or dropout: each rank would have its own batch
statistics and masks) trained with DDP on two halves of a batch, its kernels (the Triton
backend, under the interpreter on these CPU tensors) and fused SGD included, ends with the
gradients and parameters of torch's model trained with torch.optim.SGD on the whole batch.
"""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedmlp

STEPS = 3


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        fusedmlp.nn.Linear(6, 16, activation="tanh"),
        fusedmlp.nn.Linear(16, 16, activation="relu"),
        fusedmlp.nn.Linear(16, 3),
    )


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, 8, 6, generator=g), torch.randint(0, 3, (STEPS, 8), generator=g)


def _worker(rank, world, store, queue):
    # A file store, not a TCP port: a port probed free in the parent can be taken before rank 0
    # listens on it (EADDRINUSE, seen here).
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    fusedmlp.set_backend("triton")  # CPU tensors take torch's fallback under "auto"
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        opt = fusedmlp.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loss_fn = fusedmlp.nn.CrossEntropyLoss()
        xs, ys = _data()
        half = xs.shape[1] // world
        for step in range(STEPS):
            opt.zero_grad()
            sl = slice(rank * half, (rank + 1) * half)
            loss_fn(model(xs[step, sl]), ys[step, sl]).backward()
            grads = [p.grad.clone() for p in model.parameters()]
            opt.step()
        if rank == 0:
            # numpy arrays pickle by value: tensors would travel as shared-memory handles that
            # die with this process before the parent opens them.
            from fusedmlp.kernels.launch import LAUNCHED

            queue.put(
                (
                    [g.numpy() for g in grads],
                    [p.detach().numpy().copy() for p in model.parameters()],
                    sorted({r.name for r in LAUNCHED}),
                )
            )
    finally:
        dist.destroy_process_group()
    # torch's gloo teardown aborts now and then while the interpreter exits, after all Python
    # code has run ("terminate called without an active exception", no Python frame; about 1 run
    # in 20 here). Once the results are flushed, leave without running the C++ static destructors.
    queue.close()
    queue.join_thread()
    os._exit(0)


def test_ddp_matches_torch_on_concatenated_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the workers' kernels, on CPU tensors
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(r, 2, str(tmp_path / "store"), queue)) for r in range(2)
    ]
    for p in procs:
        p.start()
    ddp_grads, ddp_params, kernels = queue.get(timeout=300)
    ddp_grads = [torch.from_numpy(a) for a in ddp_grads]
    ddp_params = [torch.from_numpy(a) for a in ddp_params]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    assert {"_linear_fwd_kernel", "_ce_fwd_kernel", "_sgd_kernel"} <= set(kernels), kernels

    ours = _model()
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
        torch.nn.Linear(16, 3),
    )  # fmt: skip
    for i, layer in zip((0, 2, 4), ours, strict=True):
        model[i].load_state_dict(layer.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    xs, ys = _data()
    for step in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xs[step]), ys[step]).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
    for a, b in zip(ddp_grads, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(ddp_params, model.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
