"""Backpropagating through ``torch.export``ed fusedmlp models on the Triton path.

``torch.export`` inlines the ops' autograd Functions, so an exported program holds the forward
custom ops themselves (``fusedmlp::linear_fwd``, ...); their registered autograd formulas
(the Functions' own backward code) make ``ep.module()`` differentiable, as torch's modules
exported the same way. Each test exports a fusedmlp module, runs ``ep.module()`` forward and
backward, and compares input and parameter gradients with torch's module in eager mode; the
launch counter shows the Triton backward kernels ran. Tiny shapes (the interpreter), few exports.
Models with dropout are compared with the same fusedmlp model run eagerly under the same seed
(the same masks), and with ``p = 0`` with torch's modules.
"""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_close

import fusedmlp
import fusedmlp.autograd._custom_op as C
from fusedmlp import nn as fnn
from fusedmlp.autograd.linear import apply_activation_torch, linear_stats


def _leaf(t):
    return t.detach().clone().requires_grad_()


def _export(module, *args):
    return torch.export.export(module, args).module()


def _backward(mm, x, launches):
    """``mm(xa).backward(go)`` on a leaf copy ``xa`` of ``x``, counting only the backward's
    launches: ``(xa, xb, y, go)``, ``xb`` another leaf copy for the reference."""
    xa, xb = _leaf(x), _leaf(x)
    y = mm(xa)
    go = torch.randn_like(y)
    launches.clear()
    y.backward(go)
    return xa, xb, y, go


def _grads(module, x):
    return [x.grad, *(p.grad for p in module.parameters())]


class _TorchLinear(torch.nn.Module):
    """torch's Linear and activation, with a fusedmlp Linear's parameters."""

    def __init__(self, lin):
        super().__init__()
        self.lin = torch.nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
        self.lin.load_state_dict(lin.state_dict())
        self.activation, self.negative_slope = lin.activation, lin.negative_slope

    def forward(self, x):
        return apply_activation_torch(self.lin(x), self.activation, self.negative_slope)


@pytest.mark.parametrize(
    "activation, slope",
    [(None, 0.01), ("relu", 0.01), ("leaky_relu", 0.2), ("leaky_relu", -0.3), ("sigmoid", 0.01),
     ("tanh", 0.01), ("gelu", 0.01), ("silu", 0.01)],
    ids=["none", "relu", "leaky_relu", "leaky_relu_negative", "sigmoid", "tanh", "gelu", "silu"],
)  # fmt: skip
def test_exported_linear_backward_matches_torch(triton_backend, launches, activation, slope):
    # A Linear with bias, then one without (a 3-D input: the op's reshaping path too)
    model = torch.nn.Sequential(
        fnn.Linear(5, 7, activation=activation, negative_slope=slope),
        fnn.Linear(7, 3, bias=False, activation=activation, negative_slope=slope),
    ).to(DEVICE)
    ref = torch.nn.Sequential(*map(_TorchLinear, model)).to(DEVICE)
    x = torch.randn(2, 3, 5, device=DEVICE)
    mm = _export(model, x)
    xa, xb = _leaf(x), _leaf(x)
    y = mm(xa)
    assert type(y.grad_fn).__name__.startswith("GeneratedBackwardFor_fusedmlp_linear_fwd")
    go = torch.randn_like(y)
    launches.clear()
    y.backward(go)
    # backward kernels only (their names vary with the device), at least one per Linear
    assert launches.total >= 2 and not any("fwd" in name for name in launches)
    yr = ref(xb)
    yr.backward(go)
    assert_close(y, yr)
    for got, exp in zip(_grads(mm, xa), _grads(ref, xb), strict=True):
        assert_close(got, exp)


@pytest.mark.parametrize("eps", [None, 1e-5], ids=["partials", "final"])
def test_exported_linear_stats_backward_matches_torch(triton_backend, launches, eps):
    # The Linear that also makes a batch norm's statistics of its output (linear_stats_fwd):
    # differentiable output, non-differentiable statistics
    class LinearStats(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 4)

        def forward(self, x):
            y, stats = linear_stats(x, self.lin.weight, self.lin.bias, None, eps)
            return y, stats[0]

    model = LinearStats().to(DEVICE)
    x = torch.randn(5, 6, device=DEVICE)
    ep = torch.export.export(model, (x,))
    assert "linear_stats_fwd" in ep.graph_module.code
    mm = ep.module()
    xa, xb = _leaf(x), _leaf(x)
    y, stat = mm(xa)
    assert not stat.requires_grad
    go = torch.randn_like(y)
    launches.clear()
    y.backward(go)
    assert launches.total >= 1 and not any("fwd" in name for name in launches)
    yr = F.linear(xb, *model.lin.parameters())
    yr.backward(go)
    assert_close(y, yr)
    for got, exp in zip(_grads(mm, xa), _grads(model, xb), strict=True):
        assert_close(got, exp)


@pytest.mark.parametrize(
    "affine, training", [(True, True), (False, True), (True, False)],
    ids=["affine-train", "plain-train", "affine-eval"],
)  # fmt: skip
def test_exported_batchnorm_backward_matches_torch(triton_backend, launches, affine, training):
    model = fnn.BatchNorm1d(6, affine=affine).to(DEVICE)
    ref = torch.nn.BatchNorm1d(6, affine=affine).to(DEVICE)
    if affine:
        with torch.no_grad():
            for p in (*model.parameters(), *ref.parameters()):
                p.copy_(torch.linspace(0.5, 1.5, 6))
    if not training:
        mean, var = torch.rand(6) * 2 - 1, torch.rand(6) + 0.5
        for m in (model, ref):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.eval()
    x = torch.randn(5, 6, device=DEVICE) * 2 + 1
    mm = _export(model, x)
    xa, xb, y, go = _backward(mm, x, launches)
    assert launches["_bn_backward_dx_kernel"] >= 1
    yr = ref(xb)
    yr.backward(go)
    assert_close(y, yr)
    for got, exp in zip(_grads(mm, xa), _grads(ref, xb), strict=True):
        assert_close(got, exp)
    for got, exp in zip(mm.buffers(), ref.buffers(), strict=True):  # the running statistics
        assert_close(got.double(), exp.double(), dtype=torch.float32)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_exported_softmax_backward_matches_torch(triton_backend, launches, log):
    model = (fnn.LogSoftmax if log else fnn.Softmax)(dim=1)
    x = torch.randn(3, 5, 4, device=DEVICE) * 3
    mm = _export(model, x)
    xa, xb, y, go = _backward(mm, x, launches)
    assert launches["_softmax_bwd_kernel"] == 1
    yr = (F.log_softmax if log else F.softmax)(xb, 1)
    yr.backward(go)
    assert_close(y, yr)
    assert_close(xa.grad, xb.grad)


@pytest.mark.parametrize(
    "reduction, weighted, smoothing, grad_at_export, dtype",
    [("mean", True, 0.0, True, torch.float32), ("mean", False, 0.1, False, torch.float32),
     ("sum", True, 0.2, False, torch.float32), ("none", False, 0.0, True, torch.float32),
     ("mean", True, 0.1, False, torch.float16)],
    ids=["mean-weight", "mean-smoothing-regrad", "sum-weight-smoothing-regrad", "none",
         "mean-fp16-regrad"],
)  # fmt: skip
def test_exported_cross_entropy_backward_matches_torch(
    triton_backend, launches, reduction, weighted, smoothing, grad_at_export, dtype
):
    # ``grad_at_export``: the logits required grad while exported, so the graph's op writes
    # the gradient buffer (compute_grad=True); else it writes none and the formula makes it
    # in backward ("regrad"). Rows with target ignore_index=2 are ignored.
    n, c = 7, 5
    weight = torch.rand(c, device=DEVICE).to(dtype) + 0.5 if weighted else None
    kw = dict(weight=weight, ignore_index=2, reduction=reduction, label_smoothing=smoothing)
    model = fnn.CrossEntropyLoss(**kw).to(DEVICE)
    x = (torch.randn(n, c, device=DEVICE) * 2).to(dtype)
    target = torch.tensor([0, 2, 4, 1, 2, 3, 0], device=DEVICE)
    ep = torch.export.export(model, (_leaf(x) if grad_at_export else x, target))
    assert f"'{reduction}', {grad_at_export})" in ep.graph_module.code  # compute_grad
    mm = ep.module()
    xa, xb = _leaf(x), _leaf(x)
    loss = mm(xa, target)
    go = torch.rand_like(loss) + 0.5
    launches.clear()
    loss.backward(go)
    assert launches["_ce_scale_kernel"] == 1
    assert launches["_ce_fwd_kernel"] == (0 if grad_at_export else 1)
    ref = F.cross_entropy(xb, target, **kw)
    ref.backward(go)
    assert_close(loss, ref)
    assert_close(xa.grad, xb.grad)


def test_exported_model_and_loss_match_torch(triton_backend, launches):
    # Linear -> BatchNorm1d -> Linear -> CrossEntropyLoss exported whole: the loss's op writes
    # its gradient buffer (its logits require grad while exported)
    class Net(torch.nn.Module):
        def __init__(self, body, loss):
            super().__init__()
            self.body, self.loss = body, loss

        def forward(self, x, y):
            return self.loss(self.body(x), y)

    body = torch.nn.Sequential(fnn.Linear(4, 6, activation="relu"), fnn.BatchNorm1d(6),
                               fnn.Linear(6, 3))  # fmt: skip
    ref_body = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(),
                                   torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 3))  # fmt: skip
    index = {"0": "0", "1": "2", "2": "3"}  # ref_body's index of each of body's modules
    ref_body.load_state_dict({index[k[0]] + k[1:]: v for k, v in body.state_dict().items()})
    model = Net(body, fnn.CrossEntropyLoss()).to(DEVICE)
    ref = Net(ref_body, torch.nn.CrossEntropyLoss()).to(DEVICE)
    x, y = torch.randn(6, 4, device=DEVICE), torch.randint(0, 3, (6,), device=DEVICE)
    mm = _export(model, x, y)
    launches.clear()
    loss = mm(x, y)
    loss.backward()
    assert launches["_ce_scale_kernel"] == 1 and launches["_bn_backward_dx_kernel"] == 1
    expected = ref(x, y)
    expected.backward()
    assert_close(loss, expected)
    for (name, got), exp in zip(mm.named_parameters(), ref.parameters(), strict=True):
        assert_close(got.grad, exp.grad, msg=name)


def test_formulas_run_only_outside_the_functions(triton_backend, launches, monkeypatch):
    # Eager fusedmlp: the Function's backward node, and both ops run their implementations
    # directly (the fast path); an exported program's node is the op's registered formula.
    taken = []
    orig = C.fast_eager
    monkeypatch.setattr(C, "fast_eager", lambda *a: taken.append(orig(*a)) or taken[-1])
    model = fnn.Linear(4, 3, activation="gelu").to(DEVICE)
    x = torch.randn(5, 4, device=DEVICE, requires_grad=True)
    y = model(x)
    assert type(y.grad_fn).__name__ == "LinearFunctionBackward"
    y.sum().backward()
    assert taken == [True, True]
    monkeypatch.setattr(C, "fast_eager", orig)
    expected = x.grad
    x.grad = None
    y = _export(model, x.detach())(x)
    assert type(y.grad_fn).__name__.startswith("GeneratedBackwardFor_fusedmlp_linear_fwd")
    y.sum().backward()
    assert_close(x.grad, expected)


def _direct_call(op: str):
    """``(output, input)``: the forward op ``op`` called directly with inputs that require
    grad (its formula), as an exported program calls it."""
    x = torch.randn(5, 4, device=DEVICE, requires_grad=True)
    w = torch.randn(3, 4, device=DEVICE, requires_grad=True)
    b = torch.randn(3, device=DEVICE, requires_grad=True)
    ops = torch.ops.fusedmlp
    if op == "linear_fwd":
        return ops.linear_fwd(x, w, b, "gelu", 0.01)[0], x
    if op == "linear_stats_fwd":
        return ops.linear_stats_fwd(x, w, b)[0], x
    if op == "batchnorm_fwd":
        bn_w = (torch.rand(4, device=DEVICE) + 0.5).requires_grad_()
        bn_b = torch.randn(4, device=DEVICE)
        return ops.batchnorm_fwd(x, bn_w, bn_b, None, None, True, 1e-5, None, None)[0], x
    if op == "softmax_fwd":
        return ops.softmax_fwd(x, 1, True), x
    t = torch.tensor([0, 1, 3, 2, 1], device=DEVICE)
    compute_grad = op == "cross_entropy_fwd"  # else: the buffer made in backward
    return ops.cross_entropy_fwd(x, t, None, -100, 0.1, "mean", compute_grad)[0], x


@pytest.mark.parametrize(
    "op, name",
    [("linear_fwd", "linear"), ("linear_stats_fwd", "linear"), ("batchnorm_fwd", "batch_norm"),
     ("softmax_fwd", "softmax"), ("cross_entropy_fwd", "cross_entropy"),
     ("cross_entropy_fwd_regrad", "cross_entropy")],
)  # fmt: skip
def test_double_backward_through_a_formula_raises(triton_backend, op, name):
    # The formulas are the Functions' once-differentiable backward: differentiating their
    # gradients again raises the Functions' clear error, never a silently wrong second order
    out, x = _direct_call(op)
    with pytest.raises(RuntimeError, match=f"fusedmlp {name}.*double backward is not supported"):
        (g,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        torch.autograd.grad(g.square().sum(), x)


def test_statistics_outputs_are_not_differentiable(triton_backend):
    x = torch.randn(5, 4, device=DEVICE, requires_grad=True)
    w = torch.randn(3, 4, device=DEVICE, requires_grad=True)
    ops = torch.ops.fusedmlp
    y, z = ops.linear_fwd(x, w, None, "gelu", 0.01)
    assert y.requires_grad and not z.requires_grad
    y, pmean, pm2 = ops.linear_stats_fwd(x, w, None)
    assert y.requires_grad and not pmean.requires_grad and not pm2.requires_grad
    y, *stats = ops.batchnorm_fwd(x, None, None, None, None, True, 1e-5, None, None)
    assert y.requires_grad and not any(s.requires_grad for s in stats)
    t = torch.tensor([0, 1, 3, 2, 1], device=DEVICE)
    loss, grad, factor = ops.cross_entropy_fwd(x, t, None, -100, 0.0, "mean", True)
    assert loss.requires_grad and not grad.requires_grad and not factor.requires_grad
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
        w = torch.rand(4, device=DEVICE, requires_grad=True)
        ops.cross_entropy_fwd(x, t, w, -100, 0.0, "mean", True)
    # the formula's gradient of the fused ops, called directly, is the Function's
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    x2 = _leaf(x)
    fusedmlp.functional.batch_norm(x2, None, None, training=True).square().sum().backward()
    assert_close(gx, x2.grad)


# --------------------------------------------------------------------------------------------
# fused blocks and dropout: fused_block_fwd, fused_block_linear_act_dropout_fwd, dropout_fwd
# --------------------------------------------------------------------------------------------


def _run_seeded(module, x, go, seed):
    """``(y, [x.grad, *parameter grads])`` of ``module`` on a fresh leaf of ``x`` with the
    dropout masks of ``torch.manual_seed(seed)``, backpropagating ``go``."""
    xa = _leaf(x)
    torch.manual_seed(seed)
    y = module(xa)
    y.backward(go)
    return y, _grads(module, xa)


def _assert_export_matches_eager(model, x, launches, backward_kernels, seed=1234):
    """Export ``model`` (Triton path), backpropagate ``ep.module()`` and compare its output and
    input and parameter gradients with an eager copy of ``model`` on fusedmlp run under the
    same seed (the same dropout masks); ``backward_kernels``: ``{name: launches}`` of the
    exported program's backward. Returns the exported program's ``(y, grads, grad_y)``."""
    eager = copy.deepcopy(model)  # ep.module() shares model's parameters (and their .grad)
    mm = _export(model, x)
    xa = _leaf(x)
    torch.manual_seed(seed)
    y = mm(xa)
    go = torch.randn_like(y)
    launches.clear()
    y.backward(go)
    for name, count in backward_kernels.items():
        assert launches[name] == count, (name, dict(launches))
    assert not any("fwd" in name for name in launches), dict(launches)  # backward kernels only
    got = _grads(mm, xa)
    y_eager, expected = _run_seeded(eager, x, go, seed)
    assert_close(y, y_eager)
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert_close(g, e, msg=f"gradient {i}")
    return y, got, go


@pytest.mark.parametrize(
    "batchnorm, dropout", [(True, 0.0), (True, 0.3), (False, 0.3)],
    ids=["bn", "bn-dropout", "dropout"],
)  # fmt: skip
def test_exported_mlp_backward_matches_eager(triton_backend, launches, batchnorm, dropout):
    # Each hidden layer's block is one fused_block_fwd (normalize = batchnorm): its formula is
    # BNActDropoutFunction's backward (the fused reduction + dx passes) or ActDropoutFunction's
    # (one elementwise pass); the dropout masks come from the seeds drawn in the graph.
    model = fnn.MLP(4, [8, 8], 3, batchnorm=batchnorm, dropout=dropout).to(DEVICE)
    x = torch.randn(6, 4, device=DEVICE)
    kernels = {"_fused_bwd_dx_kernel": 2} if batchnorm else {"_fused_bwd_elementwise_kernel": 2}
    y, got, go = _assert_export_matches_eager(model, x, launches, kernels)
    if dropout == 0.0:  # torch's own modules, exactly
        ref = model.to_torch()
        xb = _leaf(x)
        yr = ref(xb)
        yr.backward(go)
        assert_close(y, yr)
        for i, (g, e) in enumerate(zip(got, _grads(ref, xb), strict=True)):
            assert_close(g, e, msg=f"gradient {i}")


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_exported_linear_act_dropout_backward_matches_eager(triton_backend, launches, activation):
    # Linear -> act -> Dropout -> Linear: the first three as one
    # fused_block_linear_act_dropout_fwd (16 outputs), whose formula is
    # LinearActDropoutFunction's backward; gelu's graph also returns its pre-activation z
    act = torch.nn.ReLU() if activation == "relu" else torch.nn.GELU()
    model = fnn.convert(torch.nn.Sequential(
        torch.nn.Linear(4, 16), act, torch.nn.Dropout(0.5), torch.nn.Linear(16, 3)
    )).to(DEVICE)  # fmt: skip
    x = torch.randn(5, 4, device=DEVICE)
    ep = torch.export.export(model, (x,))
    assert "fused_block_linear_act_dropout_fwd" in ep.graph_module.code
    _assert_export_matches_eager(model, x, launches, {"_fused_bwd_elementwise_kernel": 1})


def test_exported_sequential_dropout_backward_matches_eager(triton_backend, launches):
    # Linear(relu) then dropout_fwd (the output leaves the Sequential: no fused epilogue)
    model = fnn.convert(
        torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Dropout(0.5))
    ).to(DEVICE)
    x = torch.randn(5, 4, device=DEVICE)
    _assert_export_matches_eager(model, x, launches, {"_dropout_kernel": 1})
    # p = 0: torch's own modules
    model[2].p = 0.0
    model.zero_grad()  # accumulated by the first exported program (it shares the parameters)
    ref = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU()).to(DEVICE)
    ref[0].load_state_dict(model[0].state_dict())
    mm = _export(model, x)
    xa, xb = _leaf(x), _leaf(x)
    y, yr = mm(xa), ref(xb)
    go = torch.randn_like(y)
    y.backward(go)
    yr.backward(go)
    assert_close(y, yr)
    for g, e in zip(_grads(mm, xa), _grads(ref, xb), strict=True):
        assert_close(g, e)


def test_exported_dropout_backward_and_double_backward(triton_backend, launches):
    # dropout_fwd alone: the gradient is go * keep / (1 - p) with the forward's mask, and its
    # formula is twice differentiable (the gradient's own backward is the same mask again)
    p = 0.5
    model = fnn.Dropout(p).to(DEVICE)
    x = torch.randn(4, 8, device=DEVICE) + 0.1
    y, (gx,), go = _assert_export_matches_eager(model, x, launches, {"_dropout_kernel": 1})
    keep = y != 0
    assert 0 < keep.sum() < keep.numel()
    assert_close(gx, go * keep / (1 - p))
    mm = _export(model, x)
    xa = _leaf(x)
    torch.manual_seed(7)
    y = mm(xa)
    (g,) = torch.autograd.grad(y.square().sum(), xa, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), xa)
    keep = (y != 0).to(x.dtype)
    assert_close(g, 2 * y * keep / (1 - p))
    assert_close(gg, 2 * keep / (1 - p) ** 2)


def test_fused_block_formulas_raise_on_double_backward(triton_backend):
    # The formulas are the Functions' once-differentiable backward: a clear error
    ops = torch.ops.fusedmlp
    x = torch.randn(5, 4, device=DEVICE, requires_grad=True)
    w = torch.randn(16, 4, device=DEVICE, requires_grad=True)
    seed = torch.tensor([3], device=DEVICE)
    cases = [
        ("batch_norm + activation + dropout",
         lambda: ops.fused_block_fwd(x, None, None, seed, True, 1e-5, 0.5, "gelu", 0.01)[0]),
        ("activation + dropout",
         lambda: ops.fused_block_fwd(x, None, None, seed, False, 0.0, 0.5, "gelu", 0.01)[0]),
        ("linear + activation + dropout",
         lambda: ops.fused_block_linear_act_dropout_fwd(x, w, None, seed, 0.5, "gelu", 0.01)[0]),
    ]  # fmt: skip
    for name, fn in cases:
        out = fn()
        with pytest.raises(RuntimeError, match=re.escape(f"fusedmlp {name}: double backward")):
            (g,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
            torch.autograd.grad(g.square().sum(), x)
    # the statistics and z outputs are not differentiable
    out, *stats = ops.fused_block_fwd(x, None, None, seed, True, 1e-5, 0.5, "relu", 0.01)
    assert out.requires_grad and not any(s.requires_grad for s in stats)
    y, z = ops.fused_block_linear_act_dropout_fwd(x, w, None, seed, 0.5, "gelu", 0.01)
    assert y.requires_grad and not z.requires_grad
