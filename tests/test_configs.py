"""Every GPU configuration of every autotuned kernel, forced one at a time, against torch.

On a GPU the autotuner may pick any configuration of a kernel's list, while the GPU check's
tests (``FUSEDMLP_AUTOTUNE=0``) and the small problems (``small_config``) run only one or two
of them. Test ``i`` launches configuration ``i`` (modulo the list's length) of every kernel that
the ops below launch (linear fwd/dX/dW on both backward paths, batch norm, the fused
BN-activation-dropout block, cross-entropy, softmax, dropout), through the ops' own launchers,
and compares the results with torch's.

On a GPU this checks the compiled code of each configuration. Under the interpreter (CPU-only
machines) the forced configuration also replaces the interpreter's small one, so each GPU tile
shape runs there too: the masks and loop bounds at those shapes (about 45 s on 2 cores).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, ON_GPU, assert_close, assert_within_magnitude

import fusedmlp
from fusedmlp import functional as FF
from fusedmlp import nn as fnn

# The kernel modules whose launches are forced (Adam/SGD have one configuration each).
_MODULES = ("linear", "batchnorm", "cross_entropy", "dropout", "fused_block", "softmax")
LONGEST = 11  # the longest configuration list (bf16 linear forward)


@pytest.fixture
def forced(monkeypatch, request):
    """Make every launch of the kernel modules run configuration ``request.param`` of its list;
    yields {kernel name: the configuration launched}."""
    import importlib

    index = request.param
    used = {}
    for name in _MODULES:
        module = importlib.import_module(f"fusedmlp.kernels.{name}")
        original = module.launch

        def launch(kernel, grid, *, configs, small_config=None, interpret_config=None,
                   original=original, **kwargs):  # fmt: skip
            cfg = configs[index % len(configs)]
            used[getattr(kernel, "__name__", str(kernel))] = (index % len(configs), cfg)
            return original(
                kernel,
                grid,
                configs=[cfg],
                interpret_config=interpret_config if ON_GPU else cfg,
                **kwargs,
            )

        monkeypatch.setattr(module, "launch", launch)
    with fusedmlp.use_backend("triton"):
        yield used


def _check_forced(used, names):
    for name in names:
        assert name in used, f"{name} was not launched: {sorted(used)}"


def _linear_backward_pair(M, K, N, dtype, precision):
    """fusedmlp.nn.Linear(K, N) and torch.nn.Linear with the same weights, each backward over
    one [M, K] batch with gradient g under torch's fp32 matmul ``precision``: (ours, x, g, xa,
    xb), xa and xb the two inputs (their .grad: ours, torch's)."""
    ref = torch.nn.Linear(K, N, device=DEVICE, dtype=dtype)
    ours = fnn.Linear(K, N, device=DEVICE, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    g = torch.randn(M, N, device=DEVICE, dtype=dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        ours(xa).backward(g)
        ref(xb).backward(g)
    finally:
        torch.set_float32_matmul_precision(previous)
    return ours, x, g, xa, xb


def _linear_run(dtype, precision, activation, reference: bool):
    """fusedmlp.nn.Linear(72, 136, activation) and torch.nn.Linear with the same weights over one
    batch of 200, forward and backward, under torch's fp32 matmul ``precision``; torch's (with a
    ReLU) only with ``reference``. Returns (ours, ref, x, g, xa, xb, ya, yb), yb None without."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        ref = torch.nn.Linear(72, 136, device=DEVICE, dtype=dtype)
        ours = fnn.Linear(72, 136, activation=activation, device=DEVICE, dtype=dtype)
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(200, 72, device=DEVICE, dtype=dtype)
        g = torch.randn(200, 136, device=DEVICE, dtype=dtype)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = ours(xa)
        ya.backward(g)
        yb = None
        if reference:
            yb = torch.relu(ref(xb))
            yb.backward(g)
    finally:
        torch.set_float32_matmul_precision(previous)
    return ours, ref, x, g, xa, xb, ya, yb


@pytest.mark.parametrize("forced", range(LONGEST), indirect=True)
@pytest.mark.parametrize("path", ["fused", "dz"])
@pytest.mark.parametrize("dtype, precision", [
    (torch.bfloat16, "highest"), (torch.float32, "highest"), (torch.float32, "high"),
], ids=["bf16", "fp32", "tf32"])  # fmt: skip
def test_linear_every_configuration(forced, monkeypatch, path, dtype, precision):
    from fusedmlp.kernels import linear as KL

    monkeypatch.setattr(KL, "BACKWARD_PATH", path)
    # each GEMM's own configuration lists (a small backward otherwise launches its dX with dW,
    # in the one small configuration)
    monkeypatch.setattr(KL, "COMBINED_BACKWARD", False)
    tf32 = precision == "high"
    # TF32 against float64 with its rounding bound (below), without an activation: a ReLU mask
    # could flip where TF32 moves a pre-activation across 0
    activation = None if tf32 else "relu"
    ours, ref, x, g, xa, xb, ya, yb = _linear_run(dtype, precision, activation, not tf32)
    if tf32:
        # TF32 keeps 10 of each operand's mantissa bits (rounded, or truncated when fp32 goes
        # to the tensor cores as is): each operand within 2^-10, each product within about
        # 2^-9 of its value, a sum within 2^-8 of its products' magnitudes with fp32 adds
        x64, w64, g64 = x.double(), ref.weight.detach().double(), g.double()
        bias64 = ref.bias.detach().double()
        assert_within_magnitude(ya, x64 @ w64.T + bias64, x64.abs() @ w64.T.abs(), 2**-8)
        assert_within_magnitude(xa.grad, g64 @ w64, g64.abs() @ w64.abs(), 2**-8)
        assert_within_magnitude(ours.weight.grad, g64.T @ x64, g64.T.abs() @ x64.abs(), 2**-8)
        assert_within_magnitude(ours.bias.grad, g64.sum(0), g64.abs().sum(0), 2**-8)
    else:
        assert_close(ya, yb)
        assert_close(xa.grad, xb.grad)
        assert_close(ours.weight.grad, ref.weight.grad)
        assert_close(ours.bias.grad, ref.bias.grad)
    if path == "fused":
        _check_forced(forced, ["_linear_fwd_kernel", "_linear_dx_kernel", "_linear_dw_kernel"])
    else:  # fp32's dz path: K-major copies of X and W by the transpose kernel
        copies = ["_transpose_kernel"] if dtype == torch.float32 else []
        _check_forced(forced, ["_linear_fwd_kernel", *copies])


@pytest.mark.parametrize("forced", range(2), indirect=True)  # the TMA lists' length
@pytest.mark.parametrize("path", ["fused", "dz"])
@pytest.mark.parametrize("dtype, precision", [
    (torch.bfloat16, "highest"), (torch.float32, "high"),
], ids=["bf16", "tf32"])  # fmt: skip
def test_linear_tma_every_configuration(forced, monkeypatch, path, dtype, precision):
    """The TMA forward (``FUSEDMLP_TMA``): each configuration of its 16-bit and TF32
    lists, for the forward and (dz path) the backward's GEMMs in every operand orientation."""
    from fusedmlp.kernels import linear as KL

    monkeypatch.setattr(KL, "BACKWARD_PATH", path)
    monkeypatch.setattr(KL, "TMA", True)
    monkeypatch.setattr(KL, "TMA_TF32", True)
    monkeypatch.setattr(KL, "TMA_MIN_MACS", 0)
    monkeypatch.setattr(KL, "TMA_MIN_WAVES", 0)
    ours, ref, _, _, xa, xb, ya, yb = _linear_run(dtype, precision, "relu", True)
    # TF32 on a GPU, torch's GEMMs too: a bf16-sized tolerance (a ReLU mask may flip where the
    # two round a pre-activation differently across 0: compare the unmasked entries)
    tol = torch.bfloat16
    keep = (ya > 0) == (yb > 0)
    assert keep.float().mean() > 0.99
    assert_close(ya[keep], yb[keep], dtype=tol)
    if precision == "highest":
        assert_close(xa.grad, xb.grad, dtype=tol)
        assert_close(ours.weight.grad, ref.weight.grad, dtype=tol, scale=2.0)
        assert_close(ours.bias.grad, ref.bias.grad, dtype=tol, scale=2.0)
    _check_forced(forced, ["_linear_fwd_tma_kernel"])
    assert "_linear_fwd_kernel" not in forced, sorted(forced)


@pytest.mark.parametrize("forced", range(LONGEST), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_norm_loss_softmax_every_configuration(forced, dtype):
    # batch norm, training and eval, with fp32 parameters beside a bf16 input
    ref = torch.nn.BatchNorm1d(40, device=DEVICE)
    ours = fnn.BatchNorm1d(40, device=DEVICE)
    x = (torch.randn(300, 40, device=DEVICE) * 3 + 1).to(dtype)
    g = torch.randn_like(x)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours(xa).backward(g)
    ref(xb).backward(g)
    assert_close(xa.grad, xb.grad, dtype=dtype, scale=4.0)
    assert_close(ours.weight.grad, ref.weight.grad, dtype=dtype, scale=4.0)
    assert_close(ours.running_var, ref.running_var)
    ours.eval(), ref.eval()
    assert_close(ours(x), ref(x), dtype=dtype)
    # cross-entropy over several chunks of the largest block (8192 classes)
    logits = torch.randn(24, 9000, device=DEVICE, dtype=dtype)
    target = torch.randint(0, 9000, (24,), device=DEVICE)
    la, lb = logits.clone().requires_grad_(), logits.float().requires_grad_()
    FF.cross_entropy(la, target, label_smoothing=0.1).backward()
    F.cross_entropy(lb, target, label_smoothing=0.1).backward()
    assert_close(la.grad.float(), lb.grad, dtype=dtype)
    # narrow rows (a classifier head: one chunk per row, the width's own configuration), with a
    # per-row grad_output so that the scaling writes every row
    for classes in (10, 700):
        logits = torch.randn(50, classes, device=DEVICE, dtype=dtype)
        target = torch.randint(0, classes, (50,), device=DEVICE)
        go = torch.rand(50, device=DEVICE)
        la, lb = logits.clone().requires_grad_(), logits.float().requires_grad_()
        ya = FF.cross_entropy(la, target, reduction="none")
        yb = F.cross_entropy(lb, target, reduction="none")
        ya.backward(go.to(dtype))
        yb.backward(go)
        assert_close(ya.float(), yb, dtype=dtype)
        assert_close(la.grad.float(), lb.grad, dtype=dtype)
    # softmax over the last dim (rows of several tiles) and log-softmax over dim 0 (inner > 1)
    for fn, ref_fn, dim, shape in (
        (FF.softmax, F.softmax, -1, (37, 9000)),
        (FF.log_softmax, F.log_softmax, 0, (300, 40)),
    ):
        s = torch.randn(*shape, device=DEVICE, dtype=dtype)
        sa, sb = s.clone().requires_grad_(), s.float().requires_grad_()
        ya, yb = fn(sa, dim=dim), ref_fn(sb, dim=dim)
        gs = torch.randn_like(yb)
        ya.backward(gs.to(dtype))
        yb.backward(gs)
        assert_close(ya.float(), yb, dtype=dtype)
        assert_close(sa.grad.float(), sb.grad, dtype=dtype, scale=2.0)
    _check_forced(
        forced,
        ["_bn_forward_kernel", "_bn_backward_dx_kernel", "_ce_fwd_kernel", "_softmax_fwd_kernel"],
    )


@pytest.mark.parametrize("forced", range(LONGEST), indirect=True)
def test_fused_block_and_dropout_every_configuration(forced, monkeypatch):
    # [Linear, BatchNorm1d, ReLU, Linear] through convert: the fused BN-activation kernels.
    # Twice: as the small model runs, and as a big fp32 one (the block's output recomputed in
    # its backward reduction, written transposed for the last Linear's dW on the dz path).
    from fusedmlp.autograd import fused_block
    from fusedmlp.kernels import linear as KL

    torch_model = torch.nn.Sequential(
        torch.nn.Linear(24, 48), torch.nn.BatchNorm1d(48), torch.nn.ReLU(), torch.nn.Linear(48, 5)
    ).to(DEVICE)
    ours = fnn.convert(copy.deepcopy(torch_model))
    x = torch.randn(260, 24, device=DEVICE)
    for big in (False, True):
        if big:
            monkeypatch.setattr(fused_block, "RECOMPUTE_MIN_BYTES", 0)
            monkeypatch.setattr(KL, "BACKWARD_PATH", "dz")
            forced.clear()
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours.zero_grad()
        torch_model.zero_grad()
        ours(xa).square().sum().backward()
        torch_model(xb).square().sum().backward()
        assert_close(xa.grad, xb.grad, scale=10.0)
        for (name, pa), pb in zip(ours.named_parameters(), torch_model.parameters()):
            assert_close(pa.grad, pb.grad, scale=10.0, msg=name)
    _check_forced(forced, ["_fused_bwd_reduce_kernel", "_fused_bwd_dx_kernel"])
    # dropout: every element kept as x / (1 - p) or dropped, and the backward's mask the same
    d = torch.randn(257, 33, device=DEVICE).requires_grad_()
    y = FF.dropout(d, 0.3, True)
    kept = y != 0
    assert_close(y[kept], d.detach()[kept] / 0.7)
    assert 0.6 < kept.float().mean().item() < 0.8
    y.backward(torch.ones_like(y))
    assert torch.equal(d.grad != 0, kept)
    _check_forced(forced, ["_dropout_kernel", "_fused_fwd_kernel"])


@pytest.mark.parametrize("forced", range(LONGEST), indirect=True)
def test_linear_dropout_epilogue_every_configuration(forced):
    # Linear -> tanh -> Dropout with the dropout in the GEMM's epilogue (its own list), against
    # torch's chain with the mask read off the output (tanh is 0 only at 0)
    from fusedmlp.autograd.fused_block import linear_act_dropout

    x = torch.randn(200, 72, device=DEVICE)
    w = (torch.randn(144, 72, device=DEVICE) * 0.1).requires_grad_()
    b = torch.randn(144, device=DEVICE).requires_grad_()
    xa = x.clone().requires_grad_()
    y = linear_act_dropout(xa, w, b, "tanh", p=0.3)
    kept = y != 0
    assert 0.6 < kept.float().mean().item() < 0.8
    ref_w, ref_b, xb = (t.detach().clone().requires_grad_() for t in (w, b, x))
    ref = torch.tanh(F.linear(xb, ref_w, ref_b)) * kept / 0.7
    assert_close(y, ref)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    for got, want in ((xa.grad, xb.grad), (w.grad, ref_w.grad), (b.grad, ref_b.grad)):
        assert_close(got, want, scale=4.0)
    cfg = forced["_linear_fwd_kernel"][1]  # a configuration of the epilogue's own list
    assert cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] <= 64 * 32 * cfg.num_warps


@pytest.mark.parametrize("forced", range(LONGEST), indirect=True)
@pytest.mark.parametrize(
    "dtype, precision",
    [
        (torch.float32, "high"),
        (torch.float32, "highest"),
        (torch.bfloat16, "highest"),
        (torch.float16, "highest"),
    ],
)
def test_linear_statistics_epilogue_every_configuration(forced, request, dtype, precision):
    # The forward GEMM with the batch-norm statistics epilogue (its own list: one BLOCK_M, the
    # rows of a split), every configuration: y as without the epilogue, the merged statistics
    # as the batch norm's own pass over y.
    from fusedmlp.kernels import batchnorm as KB
    from fusedmlp.kernels import linear as KL

    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        prec = KL.dot_precision(dtype)
        configs = KL._stats_configs(dtype, prec)[0]
        cfg = configs[request.node.callspec.params["forced"] % len(configs)]
        rows = cfg.kwargs["BLOCK_M"]
        x = torch.randn(300, 72, device=DEVICE, dtype=dtype)
        w = torch.randn(144, 72, device=DEVICE, dtype=dtype) * 0.1
        b = torch.randn(144, device=DEVICE, dtype=dtype)
        y, (pmean, pm2, got_rows) = KL.linear_forward_stats(x, w, b)
        assert got_rows == rows and pmean.shape == (-(-300 // rows), 144)
        # TF32 on a GPU rounds our operands and cuBLAS's differently: a bf16-sized tolerance
        like = torch.bfloat16 if precision == "high" and ON_GPU else dtype
        assert_close(y, F.linear(x.float(), w.float(), b.float()).to(dtype), like, scale=4.0)
        mean, invstd, var = KB.batch_norm_stats_merge(pmean, pm2, rows, 300, 1e-5, None)
        yf = y.float()
        assert_close(mean, yf.mean(0), dtype=torch.float32, scale=4.0)
        assert_close(var, yf.var(0), dtype=torch.float32, scale=4.0)
        assert_close(invstd, (yf.var(0, unbiased=False) + 1e-5).rsqrt(), dtype=torch.float32,
                     scale=4.0)  # fmt: skip
    finally:
        torch.set_float32_matmul_precision(previous)
    _check_forced(forced, ["_linear_fwd_kernel"])
    assert forced["_linear_fwd_kernel"][1] is cfg


@pytest.mark.parametrize("forced", range(2), indirect=True)  # the TMA lists' length
@pytest.mark.parametrize("final", [True, False], ids=["final", "partials"])
def test_linear_tma_statistics_epilogue_every_configuration(forced, monkeypatch, final):
    # TF32 on the TMA forward with the statistics epilogue (each half of a tile's columns in
    # turn; STATS == 2 in an unflattened tile loop): torch's batch statistics of y
    from fusedmlp.kernels import batchnorm as KB
    from fusedmlp.kernels import linear as KL

    for name, value in (("TMA", True), ("TMA_TF32", True), ("TMA_MIN_MACS", 0)):
        monkeypatch.setattr(KL, name, value)
    monkeypatch.setattr(KL, "TMA_MIN_WAVES", 0)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        x = torch.randn(300, 72, device=DEVICE)
        w = torch.randn(400, 72, device=DEVICE) * 0.1  # 2 column tiles, the second's half past N
        b = torch.randn(400, device=DEVICE)
        y, stats = KL.linear_forward_stats(x, w, b, 1e-5 if final else None)
        if not final:
            pmean, pm2, rows = stats
            assert rows == 128 and pmean.shape == (3, 400)
            stats = torch.stack(KB.batch_norm_stats_merge(pmean, pm2, rows, 300, 1e-5, None))
    finally:
        torch.set_float32_matmul_precision(previous)
    like = torch.bfloat16 if ON_GPU else torch.float32  # TF32: ours and cuBLAS round apart
    assert_close(y, F.linear(x, w, b), like, scale=4.0)
    var, mean = torch.var_mean(y, 0, unbiased=False)
    assert_close(stats[0], mean, dtype=torch.float32, scale=4.0)
    assert_close(stats[1], (var + 1e-5).rsqrt(), dtype=torch.float32, scale=4.0)
    assert_close(stats[2], y.var(0), dtype=torch.float32, scale=4.0)
    _check_forced(forced, ["_linear_fwd_tma_kernel"])
    assert "_linear_fwd_kernel" not in forced, sorted(forced)


@pytest.mark.parametrize("forced", range(LONGEST), indirect=True)
def test_block_dx_transposed_every_configuration(forced):
    # The BN block's dx pass that also writes dx^T and dx's column sums (its own list: one row
    # count, the rows of a sum): both equal dx's own, for every configuration.
    from fusedmlp.kernels import fused_block as K

    R, C = 150, 72
    x = torch.randn(R, C, device=DEVICE)
    dy = torch.randn(R, C, device=DEVICE)
    mean, invstd = x.mean(0), x.var(0, unbiased=False).add(1e-5).rsqrt()
    w, b = torch.rand(C, device=DEVICE) + 0.5, torch.randn(C, device=DEVICE)
    seed = torch.tensor([77], device=DEVICE)
    rows = K.TRANSPOSED_ROWS
    dxt = torch.empty(C, R, device=DEVICE)
    ws = torch.empty(-(-R // rows), C, device=DEVICE)
    args = (dy, x, w, b, mean, invstd, seed, 0.2, "relu", 0.01)
    dx_plain = K.bn_act_dropout_backward(*args)[0]
    dx = K.bn_act_dropout_backward(*args, transposed=(dxt, ws))[0]  # launched last: recorded
    assert torch.equal(dxt, dx.t())
    assert_close(dx, dx_plain)
    want = torch.stack([dx[i : i + rows].sum(0) for i in range(0, R, rows)])
    assert_close(ws, want)
    _check_forced(forced, ["_fused_bwd_dx_kernel"])
    assert forced["_fused_bwd_dx_kernel"][1] in K._TRANSPOSED_CONFIGS


@pytest.mark.parametrize("forced", range(LONGEST), indirect=True)
@pytest.mark.parametrize("path", ["fused", "dz"])
@pytest.mark.parametrize("dtype, precision", [
    (torch.bfloat16, "highest"), (torch.float32, "highest"), (torch.float32, "high"),
], ids=["bf16", "fp32", "tf32"])  # fmt: skip
def test_linear_split_merge_every_configuration(
    forced, arrivals, monkeypatch, path, dtype, precision
):
    # A narrow layer over a long batch: dW is one tile whose reduction over the batch splits,
    # and the tile's last program merges the splits (and db's sums), for every configuration.
    from fusedmlp.kernels import linear as KL

    monkeypatch.setattr(KL, "BACKWARD_PATH", path)
    monkeypatch.setattr(KL, "COMBINED_BACKWARD", False)
    M, K, N = (4096 if ON_GPU else 300), 10, 12
    device = torch.device(DEVICE)
    split = (KL.dw_split if path == "fused" else KL.dz_dw_split)(M, N, K, device)
    assert split > 1, split
    ours, x, g, xa, xb = _linear_backward_pair(M, K, N, dtype, precision)
    # TF32 on a GPU (10-bit mantissas, torch's GEMMs too): a bf16-sized tolerance
    like = torch.bfloat16 if precision == "high" and ON_GPU else dtype
    assert_close(xa.grad, xb.grad, dtype=like)
    # dW and db sum M products each: against float64, within a bound relative to the sum of
    # their magnitudes. (Against torch's, elements near 0 missed the tolerance by summation
    # order alone on an H200: 5.6e-5 in fp32, and 4 bf16 ulps where cuBLAS's own split-K
    # reduction rounds its partials to bf16.)
    x64, g64 = x.double(), g.double()
    unit = 2**-16 if dtype == torch.float32 and like == dtype else 2**-8
    assert_within_magnitude(ours.weight.grad, g64.T @ x64, g64.T.abs() @ x64.abs(), unit)
    assert_within_magnitude(ours.bias.grad, g64.sum(0), g64.abs().sum(0), unit)
    assert len(arrivals) == 1 and arrivals.all_reset()
    _check_forced(forced, ["_linear_dw_kernel" if path == "fused" else "_linear_fwd_kernel"])


@pytest.mark.parametrize("forced", range(2), indirect=True)  # the TMA lists' length
@pytest.mark.parametrize("dtype, precision", [
    (torch.bfloat16, "highest"), (torch.float32, "high"),
], ids=["bf16", "tf32"])  # fmt: skip
def test_linear_tma_dw_split_every_configuration(forced, arrivals, monkeypatch, dtype, precision):
    # The dz path's dW over K slices on the TMA kernel (one output tile, its last item merging
    # the slices and db's column sums): against float64, for each TMA configuration.
    from fusedmlp.kernels import linear as KL

    monkeypatch.setattr(KL, "BACKWARD_PATH", "dz")
    monkeypatch.setattr(KL, "TMA_MIN_MACS", 0)
    for name in ("TMA", "TMA_TF32", "TMA_SPLIT"):
        monkeypatch.setattr(KL, name, True)
    M, K, N = (4096 if ON_GPU else 300), 32, 16
    device = torch.device(DEVICE)
    assert KL._tma_split_depth(N, K, M, device) == (1024 if ON_GPU else 128)
    splits, tma = [], KL._linear_forward_tma
    monkeypatch.setattr(
        KL,
        "_linear_forward_tma",
        lambda *a, split=None, **k: (splits.append(split), tma(*a, split=split, **k))[1],
    )
    ours, x, g, xa, xb = _linear_backward_pair(M, K, N, dtype, precision)
    x64, g64 = x.double(), g.double()
    assert_within_magnitude(ours.weight.grad, g64.T @ x64, g64.T.abs() @ x64.abs(), 2**-8)
    assert_within_magnitude(ours.bias.grad, g64.sum(0), g64.abs().sum(0), 2**-8)
    assert len(arrivals) == 1 and arrivals.all_reset()
    assert [s[0] for s in splits if s is not None] == [1024 if ON_GPU else 128], splits
    _check_forced(forced, ["_linear_fwd_tma_kernel"])


def _grids_over_cuda_limits(monkeypatch, run):
    """The launch grids (of every GPU configuration) that ``run`` would give a GPU beyond CUDA's
    limits: axis 0 at most 2^31 - 1 programs, axes 1 and 2 at most 65,535. The launches are
    recorded, not run (``launch.GRID_AUDIT``), so sizes the interpreter could never run are
    audited in a moment."""
    from fusedmlp.kernels import launch as L

    audit = []
    monkeypatch.setattr(L, "GRID_AUDIT", audit)
    with fusedmlp.use_backend("triton"):
        run()
    assert audit, "nothing was launched"
    over = [
        (name, cfg.kwargs, grid)
        for name, cfg, grid in audit
        if grid[0] > 2**31 - 1 or any(n > L.GRID_YZ_MAX for n in grid[1:])
    ]
    return sorted({(n, str(k), g) for n, k, g in over})


def _train_step(module, x):
    module(x.requires_grad_()).sum().backward()


@pytest.mark.skipif(ON_GPU, reason="the audit records launches under the interpreter")
@pytest.mark.parametrize(
    "case", ["batch_norm", "linear_dz_wide", "linear_dz_deep", "mlp_blocks", "mlp_dropout"]
)
def test_launch_grids_fit_cuda_limits_at_millions_of_features(monkeypatch, case):
    """A dimension of a few million elements has more tiles than a grid's axis 1 takes (65,535):
    batch norm over 300,000 channels (tuned on a GPU, its 4-channel tiles need 75,000), a
    Linear with 4.3M outputs (the dZ pass's columns) or inputs (the dz path's transposes), an
    MLP's fused blocks over 4.3M features."""
    import fusedmlp.kernels.linear as KL

    monkeypatch.setattr(KL, "BACKWARD_PATH", "dz")
    if case == "batch_norm":
        bn = fnn.BatchNorm1d(300_000)

        def run():
            _train_step(bn.train(), torch.zeros(4, 300_000))
            _train_step(bn.eval(), torch.zeros(4, 300_000))

    elif case.startswith("mlp"):
        mlp = fnn.MLP(2, [4_300_000], 2, batchnorm=case == "mlp_blocks", dropout=0.1)

        def run():
            _train_step(mlp, torch.zeros(4, 2))

    else:
        n_in, n_out = (2, 4_300_000) if case == "linear_dz_wide" else (4_300_000, 2)
        linear = fnn.Linear(n_in, n_out, activation="relu")

        def run():
            _train_step(linear, torch.zeros(4, n_in))

    assert _grids_over_cuda_limits(monkeypatch, run) == []
