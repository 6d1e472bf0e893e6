"""Cross-layer fusion: BatchNorm1d -> act -> Dropout and Linear -> act -> Dropout blocks.

References: torch's own unfused chain (p = 0: dropout is the identity, so everything must equal
torch), and for p > 0 the unfused fusedmlp chain (same modules run one by one), which draws the
same seed at the same point, so the fused block must reproduce its mask exactly.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_close, assert_step_like

import fusedmlp
from fusedmlp.autograd.fused_block import (
    ActDropoutFunction,
    BNActDropoutFunction,
    BNActDropoutLinearFunction,
    act_dropout,
    bn_act_dropout,
)
from fusedmlp.nn import MLP, BatchNorm1d, Dropout, Linear, convert
from fusedmlp.nn.fused_block import FusedSequential

TORCH_ACTS = {
    "relu": torch.nn.ReLU,
    "leaky_relu": lambda: torch.nn.LeakyReLU(-0.1),
    "sigmoid": torch.nn.Sigmoid,
    "tanh": torch.nn.Tanh,
    "gelu": torch.nn.GELU,
    "silu": torch.nn.SiLU,
    None: torch.nn.Identity,
}


def _bn_block(n_in, c, act, p, dtype=torch.float32, lib="fusedmlp"):
    """[Linear, BatchNorm1d, act, Dropout] with non-trivial BN affine parameters."""
    torch.manual_seed(0)
    if lib == "fusedmlp":
        mods = [Linear(n_in, c), BatchNorm1d(c), TORCH_ACTS[act](), Dropout(p)]
    else:
        mods = [
            torch.nn.Linear(n_in, c),
            torch.nn.BatchNorm1d(c),
            TORCH_ACTS[act](),
            torch.nn.Dropout(p),
        ]
    seq = FusedSequential(*mods) if lib == "fusedmlp" else torch.nn.Sequential(*mods)
    with torch.no_grad():
        seq[1].weight.uniform_(0.5, 1.5)
        seq[1].bias.uniform_(-0.5, 0.5)
    return seq.to(device=DEVICE, dtype=dtype)


def _params(seq):
    return [seq[0].weight, seq[0].bias, seq[1].weight, seq[1].bias]


def _run(seq, x, seed, grad_seed=1):
    """Forward with ``torch.manual_seed(seed)`` and backward of a fixed random cotangent."""
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = seq(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out)
    grads = torch.autograd.grad(out, [x, *[p for p in seq.parameters()]], g)
    return out, grads


def _unfused(seq):
    """The same modules (deep copies) run one after the other."""
    return torch.nn.Sequential(*copy.deepcopy(list(seq)))


# ----------------------------------------------------------------------------------------------
# BatchNorm1d -> act -> Dropout
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, c, act",
    [(7, 13, "relu"), (33, 8, "tanh"), (9, 12, "leaky_relu"), (6, 5, "gelu"), (8, 4, "sigmoid")],
)
def test_bn_block_p0_equals_torch_chain(backend, launches, n, c, act):
    fused = _bn_block(5, c, act, 0.0)
    ref = _bn_block(5, c, act, 0.0, lib="torch")
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(n, 5, device=DEVICE)
    out, grads = _run(fused, x, 3)
    launched = dict(launches)
    out_ref, grads_ref = _run(ref, x, 3)
    assert_close(out, out_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, scale=4)
    assert_close(fused[1].running_mean, ref[1].running_mean)
    assert_close(fused[1].running_var, ref[1].running_var)
    assert int(fused[1].num_batches_tracked) == int(ref[1].num_batches_tracked) == 1
    if backend == "triton":
        assert launched["_fused_fwd_kernel"] == 1
        assert launched["_fused_bwd_reduce_kernel"] == 1
        assert launched["_fused_bwd_dx_kernel"] == 1
        assert "_bn_forward_kernel" not in launched and "_dropout_kernel" not in launched
        # the running statistics (compared above) came from the statistics kernel
        assert "_bn_update_running_kernel" not in launched
    else:
        assert launches.total == 0


@pytest.mark.parametrize(
    "n, c, act",
    # c = 36, 37: three column blocks of the interpreter's 16-column tile (aligned and not)
    [(9, 13, "relu"), (16, 8, "silu"), (5, 7, None), (20, 36, "relu"), (11, 37, "tanh")],
)
def test_bn_block_dropout_equals_unfused_fusedmlp_chain(triton_backend, launches, n, c, act):
    p = 0.4
    fused = _bn_block(6, c, act, p)
    unfused = _unfused(fused)
    x = torch.randn(n, 6, device=DEVICE)
    out, grads = _run(fused, x, 11)
    n_fused = launches.total
    assert launches["_fused_fwd_kernel"] == 1 and launches["_fused_bwd_dx_kernel"] == 1
    launches.clear()
    out_ref, grads_ref = _run(unfused, x, 11)
    assert launches["_dropout_kernel"] == 2 and "_fused_fwd_kernel" not in launches
    assert n_fused < launches.total or c % 16  # 7 launches + Linear's instead of 9 + Linear's
    # the same seed, the same Philox stream: the same mask
    assert torch.equal(out == 0, out_ref == 0)
    assert_close(out, out_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, scale=4)
    assert_close(fused[1].running_mean, unfused[1].running_mean)
    assert_close(fused[1].running_var, unfused[1].running_var)
    # dropout semantics (the lecture's check): each element is 0 or act(bn(x)) / (1 - p)
    with torch.no_grad():
        pre = fused[2](
            torch.nn.functional.batch_norm(
                fused[0](x), None, None, fused[1].weight, fused[1].bias, True, 0.0, fused[1].eps
            )
        )
    kept = out != 0
    assert 0 < kept.sum() < kept.numel()
    assert_close(out[kept], pre[kept] / (1 - p))


def test_bn_block_mask_rate_and_successive_calls_differ(triton_backend):
    x = torch.randn(64, 32, device=DEVICE)
    w = torch.ones(32, device=DEVICE)
    b = torch.full((32,), 10.0, device=DEVICE)  # act(bn(x)) > 0 everywhere: zeros = drops
    a = bn_act_dropout(x, None, None, w, b, activation="relu", p=0.25)
    c = bn_act_dropout(x, None, None, w, b, activation="relu", p=0.25)
    rate = (a == 0).float().mean().item()
    assert 0.18 < rate < 0.32
    assert not torch.equal(a == 0, c == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bn_block_half_precision(triton_backend, dtype):
    fused = _bn_block(6, 12, "relu", 0.3)
    fused[0].to(dtype)  # fp16/bf16 activations, fp32 BN parameters (as torch allows)
    unfused = _unfused(fused)
    x = torch.randn(10, 6, device=DEVICE, dtype=dtype)
    out, grads = _run(fused, x, 5)
    out_ref, grads_ref = _run(unfused, x, 5)
    assert out.dtype == dtype
    assert_close(out, out_ref, scale=2)
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == g_ref.dtype
        assert_close(g.float(), g_ref.float(), dtype=dtype, scale=4)


def test_bn_block_strided_input_and_momentum_none(triton_backend, launches):
    base = torch.randn(11, 26, device=DEVICE)
    x = base[:, ::2]  # non-contiguous [11, 13]
    bn = BatchNorm1d(13, momentum=None).to(DEVICE)
    ref_bn = copy.deepcopy(bn)
    for _ in range(2):
        torch.manual_seed(4)
        out = FusedSequential(bn, torch.nn.Tanh(), Dropout(0.2))(x)
        torch.manual_seed(4)
        ref = torch.nn.Sequential(ref_bn, torch.nn.Tanh(), Dropout(0.2))(x)
    assert launches["_fused_fwd_kernel"] == 2
    assert "_bn_update_running_kernel" not in launches  # the cumulative average in-kernel too
    assert_close(out, ref)
    assert_close(bn.running_mean, ref_bn.running_mean)
    assert_close(bn.running_var, ref_bn.running_var)
    assert int(bn.num_batches_tracked) == 2


def _saved_bytes(seq, x):
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.manual_seed(0)
        seq(x.detach().requires_grad_(True))
    return sum(storages.values())


def test_bn_block_saves_less_than_unfused(triton_backend):
    fused = _bn_block(6, 16, "relu", 0.5)
    unfused = _unfused(fused)
    x = torch.randn(32, 6, device=DEVICE)
    saved_bytes = lambda seq: _saved_bytes(seq, x)  # noqa: E731
    # unfused keeps the BN input, the activation output and the dropout seed; fused keeps only
    # the BN input (pre-activation recomputed), the statistics, BN's bias and the seed (the
    # statistics the Linear's epilogue made are rows of one [3, C] buffer: the unbiased
    # variance's row stays with them)
    assert saved_bytes(fused) <= saved_bytes(unfused) - 32 * 16 * 4 + 2 * 16 * 4


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_bn_block_gradcheck_float64(triton_backend, p):
    x = torch.randn(5, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, device=DEVICE).add_(0.5).requires_grad_(True)
    b = torch.randn(3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    seed = torch.tensor([1234567], dtype=torch.int64, device=DEVICE) if p else None

    def f(x, w, b):
        return BNActDropoutFunction.apply(
            x, w, b, seed, 1e-5, p, "tanh", 0.01, None, None, None, None
        )[0]

    assert (f(x, w, b) == 0).any() == (p > 0)  # the mask does drop something
    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# BatchNorm1d -> act -> Dropout -> Linear: the block's output recomputed, not saved
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def recompute(monkeypatch):
    """The recomputing path at the tests' small sizes (it starts at 1 MiB of block output)."""
    from fusedmlp.autograd import fused_block

    monkeypatch.setattr(fused_block, "RECOMPUTE_MIN_BYTES", 0)


def _bn_block_linear(c, act, p, out=3):
    seq = _bn_block(6, c, act, p)
    torch.manual_seed(1)
    return FusedSequential(*seq, Linear(c, out).to(DEVICE))


def _block_then_linear(seq):
    """The same modules (deep copies): the fused block, then the Linear as its own op (which
    keeps the block's output), as before this path existed."""
    mods = copy.deepcopy(list(seq))
    return torch.nn.Sequential(FusedSequential(*mods[:4]), mods[4])


@pytest.mark.parametrize("apply", ["in reduction", "own pass"])
@pytest.mark.parametrize("path", ["auto", "dz"])
@pytest.mark.parametrize(
    "n, c, act, p", [(9, 13, "relu", 0.4), (16, 8, "tanh", 0.0), (7, 37, None, 0.3)]
)
def test_bn_block_then_linear_equals_the_unfused_chain(
    triton_backend, recompute, launches, monkeypatch, n, c, act, p, path, apply
):
    # path "dz": the Linear's backward as a GPU runs it for big fp32 GEMMs, whose dW reads
    # its input transposed: the recomputed block output is then handed over transposed.
    # apply "in reduction" (the default): the block's backward reduction recomputes it, after
    # the Linear's dX; "own pass": a forward pass again, before the Linear's backward.
    from fusedmlp.autograd import fused_block
    from fusedmlp.kernels import linear as KL

    monkeypatch.setattr(KL, "BACKWARD_PATH", path)
    monkeypatch.setattr(fused_block, "APPLY_IN_REDUCTION", apply == "in reduction")
    fused = _bn_block_linear(c, act, p)
    unfused = _block_then_linear(fused)
    x = torch.randn(n, 6, device=DEVICE)
    out, grads = _run(fused, x, 5)
    launched = dict(launches)
    launches.clear()
    out_ref, grads_ref = _run(unfused, x, 5)
    # one fused pass forward, and the recomputation for the second Linear's dW in backward:
    # in the reduction's launch, or in a pass of its own
    assert launched["_fused_fwd_kernel"] == (1 if apply == "in reduction" else 2)
    assert launched["_fused_bwd_reduce_kernel"] == 1
    assert "_bn_update_running_kernel" not in launched  # the statistics kernel updates them
    # the same kernels on the same values: equal to the bit, masks included
    assert torch.equal(out, out_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert torch.equal(g, g_ref)
    assert torch.equal(fused[1].running_mean, unfused[0][1].running_mean)
    assert torch.equal(fused[1].running_var, unfused[0][1].running_var)
    # the second Linear does not keep its [n, c] input
    assert _saved_bytes(fused, x) <= _saved_bytes(unfused, x) - n * c * 4


@pytest.mark.parametrize(
    "dtype, act",
    [(torch.float32, a) for a in ("relu", "leaky_relu", "gelu", "silu", "sigmoid", "none")]
    + [(torch.bfloat16, "relu"), (torch.bfloat16, "gelu"), (torch.float16, "tanh")],
)
def test_backward_reduction_recomputes_the_forward_output_bit_for_bit(
    triton_backend, launches, dtype, act
):
    # The block's backward reduction writes the block's output (APPLY), row-major or
    # transposed, as the forward pass wrote it: the same bits (the Linear after the block
    # takes its dW from it). Its sums and the gradients from them: those of the reduction
    # without it. 37 rows: several splits, the last one short; dropout on and off.
    from fusedmlp.kernels import fused_block as K

    for p, transposed in ((0.3, False), (0.3, True), (0.0, True)):
        x = (torch.randn(37, 12, device=DEVICE) * 2 + 0.5).to(dtype)
        w = torch.rand(12, device=DEVICE) + 0.5
        b = torch.randn(12, device=DEVICE)
        dy = torch.randn(37, 12, device=DEVICE).to(dtype)
        seed = torch.tensor([1234], device=DEVICE) if p else None
        out, mean, invstd, _ = K.fused_forward(x, w, b, seed, True, 1e-5, p, act, 0.1)
        shape = (12, 37) if transposed else (37, 12)
        buf = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
        launches.clear()
        got = K.bn_act_dropout_backward_sums(
            dy, x, w, b, mean, invstd, seed, p, act, 0.1, out=buf.t() if transposed else buf
        )
        assert dict(launches) == {"_fused_bwd_reduce_kernel": 1}
        assert torch.equal(buf.t() if transposed else buf, out)
        want = K.bn_act_dropout_backward_sums(dy, x, w, b, mean, invstd, seed, p, act, 0.1)
        for a, e in zip(got, want):
            assert torch.equal(a, e)
        dx = K.bn_act_dropout_backward_dx(dy, x, w, b, mean, invstd, seed, p, act, 0.1, *got[:2])
        assert torch.equal(dx, K.bn_act_dropout_backward(dy, x, w, b, mean, invstd, seed, p, act,
                                                         0.1)[0])  # fmt: skip


def test_bn_block_then_linear_without_dw_skips_the_recomputation(
    triton_backend, recompute, launches
):
    fused = _bn_block_linear(8, "relu", 0.3)
    fused[4].weight.requires_grad_(False)
    unfused = _block_then_linear(fused)
    x = torch.randn(10, 6, device=DEVICE, requires_grad=True)
    torch.manual_seed(4)
    out = fused(x)
    gx = torch.autograd.grad(out, x, torch.ones_like(out))[0]
    assert launches["_fused_fwd_kernel"] == 1  # no dW: the block's output is not needed again
    torch.manual_seed(4)
    out_ref = unfused(x)
    assert torch.equal(out, out_ref)
    assert torch.equal(gx, torch.autograd.grad(out_ref, x, torch.ones_like(out_ref))[0])


def test_bn_block_then_linear_falls_back_with_hooks_activation_or_autocast(
    triton_backend, recompute, launches
):
    fused = _bn_block_linear(8, "relu", 0.3)
    x = torch.randn(10, 6, device=DEVICE)
    seen = []
    handle = fused[4].register_forward_pre_hook(lambda m, i: seen.append(i[0]))
    fused(x).sum().backward()
    handle.remove()
    assert seen and launches["_fused_fwd_kernel"] == 1  # the hook saw the block's output
    launches.clear()
    fused[4].activation = "relu"  # a Linear with its own activation keeps its own Function
    fused(x).sum().backward()
    assert launches["_fused_fwd_kernel"] == 1
    fused[4].activation = None
    launches.clear()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        fused(x).float().sum().backward()
    assert launches["_fused_fwd_kernel"] == 1


def test_mlp_keeps_one_activation_per_hidden_layer(triton_backend, launches, monkeypatch):
    from fusedmlp.autograd import fused_block

    torch.manual_seed(0)
    model = MLP(8, [16, 16, 16], 4, batchnorm=True, dropout=0.1).to(DEVICE)
    block_then_linear = copy.deepcopy(model)
    x = torch.randn(32, 8, device=DEVICE)
    # small block outputs (2 KiB here, under RECOMPUTE_MIN_BYTES): kept, no recomputation
    kept = _saved_bytes(block_then_linear, x)
    launches.clear()
    block_then_linear(x).sum().backward()
    assert launches["_fused_fwd_kernel"] == 3
    launches.clear()
    monkeypatch.setattr(fused_block, "RECOMPUTE_MIN_BYTES", 32 * 16 * 4)
    # three hidden [32, 16] block outputs not kept, each recomputed once in backward: by the
    # block's backward reduction (no launch of its own), or by a forward pass again
    assert _saved_bytes(model, x) <= kept - 3 * 32 * 16 * 4
    launches.clear()
    model(x).sum().backward()
    assert launches["_fused_fwd_kernel"] == 3
    assert launches["_fused_bwd_reduce_kernel"] == 3
    monkeypatch.setattr(fused_block, "APPLY_IN_REDUCTION", False)
    launches.clear()
    model(x).sum().backward()
    assert launches["_fused_fwd_kernel"] == 6


@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("lin_stats", [False, True])
def test_bn_block_linear_gradcheck_float64(triton_backend, p, lin_stats):
    x = torch.randn(5, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, device=DEVICE).add_(0.5).requires_grad_(True)
    b = torch.randn(3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    lw = torch.randn(2, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    lb = torch.randn(2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    seed = torch.tensor([1234567], dtype=torch.int64, device=DEVICE) if p else None

    def f(x, w, b, lw, lb):
        args = (x, w, b, seed, lw, lb, 1e-5, p, "tanh", 0.01, None, None, lin_stats)
        return BNActDropoutLinearFunction.apply(*args, None, None, None, None)[0]

    assert torch.autograd.gradcheck(f, (x, w, b, lw, lb), eps=1e-6, atol=1e-5)


def test_bn_block_torch_backend_is_torch(launches):
    x = torch.randn(8, 6, device=DEVICE)
    rm, rv = torch.zeros(6, device=DEVICE), torch.ones(6, device=DEVICE)
    with fusedmlp.use_backend("torch"):
        out = bn_act_dropout(x, rm, rv, None, None, 0.1, 1e-5, "relu", p=0.0)
    ref_rm, ref_rv = torch.zeros(6, device=DEVICE), torch.ones(6, device=DEVICE)
    ref = torch.relu(torch.nn.functional.batch_norm(x, ref_rm, ref_rv, None, None, True))
    assert launches.total == 0
    assert_close(out, ref)
    assert_close(rv, ref_rv)


def test_bn_block_bad_inputs_raise_before_launch(triton_backend, launches):
    x = torch.randn(4, 6, device=DEVICE)
    with pytest.raises(ValueError, match="between 0 and 1"):
        bn_act_dropout(x, None, None, p=1.5)
    with pytest.raises(ValueError, match="unknown activation"):
        bn_act_dropout(x, None, None, activation="softplus")
    with pytest.raises(ValueError, match="2-D"):
        bn_act_dropout(x[None], None, None)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn_act_dropout(x[:1], None, None)
    with pytest.raises(RuntimeError, match="weight should contain 6 elements not 5"):
        bn_act_dropout(x, None, None, torch.ones(5, device=DEVICE))
    assert launches.total == 0


# ----------------------------------------------------------------------------------------------
# Linear -> act -> Dropout
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act, c", [("relu", 12), ("sigmoid", 7), ("gelu", 16)])
def test_linear_block_equals_unfused_fusedmlp_chain(triton_backend, launches, act, c):
    from fusedmlp.autograd.fused_block import linear_act_dropout

    p = 0.3
    torch.manual_seed(0)
    # the block feeds a Linear: fused (its output stays inside the Sequential)
    fused = FusedSequential(
        Linear(5, c, activation=act), torch.nn.Identity(), Dropout(p), Linear(c, 3)
    )
    fused = fused.to(DEVICE)
    unfused = _unfused(fused)
    x = torch.randn(3, 4, 5, device=DEVICE)  # [..., in]: the mask follows the logical index
    out, grads = _run(fused, x, 21)
    # the dropout in the Linear's epilogue: the block's and the head's forward launches, no
    # elementwise pass (rows of a multiple of 16 outputs; else the pass)
    assert launches["_linear_fwd_kernel"] == 2
    assert launches["_fused_fwd_kernel"] == (0 if c % 16 == 0 else 1)
    assert launches["_fused_bwd_elementwise_kernel"] == 1
    n_fused = launches.total
    launches.clear()
    out_ref, grads_ref = _run(unfused, x, 21)
    assert n_fused < launches.total or c % 16
    assert torch.equal(out, out_ref)  # the same mask and the same roundings, to the bit
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, scale=4)
    # the block's dropout semantics against torch's own Linear + activation
    lin = fused[0]
    torch.manual_seed(21)
    block = linear_act_dropout(x, lin.weight, lin.bias, act, 0.01, p).detach()
    with torch.no_grad():
        pre = TORCH_ACTS[act]()(torch.nn.functional.linear(x, lin.weight, lin.bias))
    kept = block != 0
    assert 0 < kept.sum() < kept.numel()
    assert_close(block[kept], pre[kept] / (1 - p))


@pytest.mark.parametrize("act", [None, "relu", "tanh", "leaky_relu", "gelu"])
def test_block_output_edited_in_place_backpropagates_as_torch(triton_backend, launches, act):
    # A residual ``out += x`` on what a Sequential ending in Linear -> act -> Dropout returns:
    # torch's chain keeps the activation's output (or its input) and the mask, never the
    # returned tensor, so its backward still runs. The fused op keeps its output where that
    # gives the derivative (relu, tanh, leaky_relu >= 0): such a block whose output leaves
    # the Sequential runs unfused; one without activation keeps nothing but the seed, and
    # gelu keeps z: both stay fused.
    torch.manual_seed(0)
    acts = {None: [], "relu": [torch.nn.ReLU()], "tanh": [torch.nn.Tanh()],
            "leaky_relu": [torch.nn.LeakyReLU(0.1)], "gelu": [torch.nn.GELU()]}  # fmt: skip
    ref = torch.nn.Sequential(torch.nn.Linear(16, 16), *acts[act], torch.nn.Dropout(0.5))
    ref = ref.to(DEVICE)
    model = convert(ref)
    x = torch.randn(8, 16, device=DEVICE)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(1)
    out = model(xa)
    fused = launches["_fused_fwd_kernel"] + launches["_dropout_kernel"] == 0
    assert fused == (act in (None, "gelu")), dict(launches)
    out += xa  # in place, as a residual connection
    out.backward(torch.ones_like(out))
    kept = (out - xa).detach() != 0  # the mask (the values differ from torch's draw)
    with torch.no_grad():
        pre = ref[1](ref[0](xb)) if act else ref[0](xb)
    assert_close((out - xa).detach()[kept], pre[kept] * 2)
    # the gradient: 1 (the residual) + the chain's through the kept elements
    act_mod = ref[1] if act else torch.nn.Identity()
    pre = act_mod(torch.nn.functional.linear(xb, ref[0].weight, ref[0].bias))
    chain = torch.autograd.grad(pre, xb, kept.float() * 2)[0]
    assert_close(xa.grad, chain + 1, scale=4)


LINEAR_ACT_DROPOUT_CASES = [
    (None, 0.01, torch.float32, 16),
    ("relu", 0.01, torch.float32, 32),
    ("relu", 0.01, torch.float32, 12),
    ("leaky_relu", 0.2, torch.bfloat16, 16),
    ("leaky_relu", -0.3, torch.float32, 48),
    ("sigmoid", 0.01, torch.float16, 16),
    ("tanh", 0.01, torch.float32, 16),
    ("gelu", 0.01, torch.bfloat16, 32),
    ("silu", 0.01, torch.float32, 7),
]


@pytest.mark.parametrize("act, slope, dtype, n", LINEAR_ACT_DROPOUT_CASES)
def test_linear_act_dropout_equals_act_dropout_of_linear(triton_backend, launches, act, slope,
                                                         dtype, n):  # fmt: skip
    # The fused op against the unfused pair (the same seed draw): output to the bit, over
    # widths with (n % 4 == 0: one Philox call per quad) and without aligned rows; gradients
    # close (another order of the same operations); z saved only where the output cannot tell
    # the derivative.
    from fusedmlp.autograd.fused_block import act_dropout, linear_act_dropout
    from fusedmlp.functional import linear

    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 5, 11, generator=g).to(device=DEVICE, dtype=dtype)
    w = (torch.randn(n, 11, generator=g) * 0.3).to(device=DEVICE, dtype=dtype)
    b = torch.randn(n, generator=g).to(device=DEVICE, dtype=dtype)
    gy = torch.randn(3, 5, n, generator=g).to(device=DEVICE, dtype=dtype)

    def run(fn):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
        torch.manual_seed(17)
        out = fn(*leaves)
        return out, torch.autograd.grad(out, leaves, gy)

    out, grads = run(lambda x, w, b: linear_act_dropout(x, w, b, act, slope, p=0.4))
    assert launches["_linear_fwd_kernel"] == 1
    # rows of a multiple of 16 outputs take the epilogue; others the pass (it would spill)
    assert launches["_fused_fwd_kernel"] == (0 if n % 16 == 0 else 1), dict(launches)
    ref, ref_grads = run(lambda x, w, b: act_dropout(linear(x, w, b), act, slope, p=0.4))
    assert torch.equal(out, ref)
    kept = out != 0
    assert 0 < kept.sum() < kept.numel()
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, scale=4)


def test_linear_act_dropout_with_p_one_zeroes_as_torch(triton_backend, launches):
    # Dropout(1.0) in the Linear's epilogue keeps nothing (the scale is 0, not 1 / 0): the next
    # Linear's output is its bias, as torch's
    torch.manual_seed(0)
    ref = torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(1.0), torch.nn.Linear(16, 3)
    ).to(DEVICE)
    model = convert(ref)
    x = torch.randn(8, 4, device=DEVICE)
    out = model(x)
    assert launches["_linear_fwd_kernel"] == 2 and launches["_dropout_kernel"] == 0
    assert_close(out, ref(x))
    assert torch.equal(out, ref[3].bias.detach().expand(8, 3))


@pytest.mark.parametrize("block", ["bn_relu_dropout", "linear_relu_dropout"])
def test_fused_dropout_float64_is_the_unfused_chains(triton_backend, monkeypatch, block):
    # fp64 blocks scale by the double 1 / (1 - p) (its bits: dropout.scale_arg), as the
    # standalone dropout does: the fused block equals the unfused fusedmlp chain to fp64's
    # rounding, forward and backward (an fp32-rounded scale was 2e-8 off)
    from fusedmlp.nn import fused_block

    monkeypatch.setattr(fused_block, "STATS_MIN_ROWS", 1 << 30)  # the chain's statistics pass
    torch.manual_seed(0)
    if block == "bn_relu_dropout":
        mods = [BatchNorm1d(16), torch.nn.ReLU(), Dropout(0.3)]
    else:
        mods = [Linear(16, 16, activation="relu"), Dropout(0.3)]
    fused = FusedSequential(*mods).to(DEVICE, torch.float64)
    plain = _unfused(fused)
    x = torch.randn(37, 16, device=DEVICE, dtype=torch.float64)
    (out, grads), (ref, ref_grads) = _run(fused, x, 1), _run(plain, x, 1)
    assert torch.equal(out != 0, ref != 0)  # the same mask
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_linear_act_dropout_saves_z_only_where_needed(triton_backend):
    from fusedmlp.autograd.fused_block import linear_act_dropout

    x = torch.randn(6, 4, device=DEVICE, requires_grad=True)
    w = torch.randn(16, 4, device=DEVICE, requires_grad=True)
    for act, slope, saved_out in (("relu", 0.01, True), ("gelu", 0.01, False),
                                  ("leaky_relu", -0.5, False)):  # fmt: skip
        y = linear_act_dropout(x, w, None, act, slope, p=0.5)
        _, _, saved, seed = y.grad_fn.saved_tensors
        assert (saved.data_ptr() == y.data_ptr()) == saved_out, act  # the output itself, or z
        assert saved.shape == y.shape and seed.numel() == 1


def test_linear_act_dropout_falls_back_to_the_unfused_chain(triton_backend, launches):
    from fusedmlp.autograd.fused_block import linear_act_dropout
    from fusedmlp.functional import linear

    x, w = torch.randn(4, 3, device=DEVICE), torch.randn(5, 3, device=DEVICE)
    # p = 0: the Linear with its activation, nothing dropped
    assert_close(linear_act_dropout(x, w, None, "tanh", p=0.0), torch.tanh(x @ w.T))
    assert launches["_linear_fwd_kernel"] == 1 and launches.total == 1
    # a one-element bias that F.linear broadcasts: the unfused pair, as before
    launches.clear()
    torch.manual_seed(3)
    out = linear_act_dropout(x, w, torch.ones(1, device=DEVICE), "relu", p=0.5)
    torch.manual_seed(3)
    from fusedmlp.autograd.fused_block import act_dropout

    assert torch.equal(out, act_dropout(linear(x, w, torch.ones(1, device=DEVICE)), "relu", p=0.5))
    with fusedmlp.use_backend("torch"):
        launches.clear()
        y = linear_act_dropout(x, w, None, "relu", p=0.5)
        assert launches.total == 0 and y.shape == (4, 5)
    with pytest.raises(RuntimeError, match="does not match weight shape"):
        linear_act_dropout(x, torch.randn(5, 4, device=DEVICE), None, "relu", p=0.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        linear_act_dropout(x, w, None, "relu", p=1.5)


def test_linear_act_dropout_leaves_the_tma_gemm_unfused(triton_backend, launches, monkeypatch):
    # Where the persistent TMA forward takes the GEMM (16-bit, forced below its size rules
    # here), the Linear keeps it and the activation + dropout run as their own pass: the same
    # mask as the fused op's (tanh is 0 only at 0); the values as close as two GEMM kernels'
    # (on a GPU they may sum in another order).
    from fusedmlp.autograd.fused_block import linear_act_dropout
    from fusedmlp.kernels import linear as KL

    g = torch.Generator().manual_seed(6)
    x = torch.randn(40, 32, generator=g).to(device=DEVICE, dtype=torch.bfloat16)
    w = (torch.randn(48, 32, generator=g) * 0.2).to(device=DEVICE, dtype=torch.bfloat16)
    torch.manual_seed(8)
    fused = linear_act_dropout(x, w, None, "tanh", p=0.3)
    assert launches["_linear_fwd_kernel"] == 1 and launches.total == 1
    for name, value in (("TMA", True), ("TMA_MIN_MACS", 0), ("TMA_MIN_WAVES", 0)):
        monkeypatch.setattr(KL, name, value)
    assert not KL.dropout_epilogue_applies(x, w)
    launches.clear()
    torch.manual_seed(8)
    out = linear_act_dropout(x, w, None, "tanh", p=0.3)
    assert launches["_linear_fwd_tma_kernel"] == 1 and launches["_fused_fwd_kernel"] == 1
    assert launches.total == 2
    assert torch.equal(out == 0, fused == 0) and 0 < (out == 0).sum() < out.numel()
    assert_close(out, fused, dtype=torch.bfloat16)


@pytest.mark.parametrize("act", ["tanh", "gelu"])
def test_linear_act_dropout_gradcheck_float64(triton_backend, act):
    from fusedmlp.autograd.fused_block import LinearActDropoutFunction

    x = torch.randn(4, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(16, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    b = torch.randn(16, dtype=torch.float64, device=DEVICE, requires_grad=True)
    seed = torch.tensor([24681357], dtype=torch.int64, device=DEVICE)

    def f(x, w, b):
        return LinearActDropoutFunction.apply(x, w, b, seed, 0.3, act, 0.01)

    assert (f(x, w, b) == 0).any()
    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-5)


def test_linear_block_saves_output_not_preactivation(triton_backend):
    """Linear(relu) -> Dropout -> Linear: fused, the head's saved input IS the block's saved
    output; unfused, the Linear's activation output is kept besides it."""
    torch.manual_seed(0)
    fused = FusedSequential(
        Linear(6, 16, activation="relu"), torch.nn.Identity(), Dropout(0.5), Linear(16, 3)
    )
    fused = fused.to(DEVICE)
    unfused = _unfused(fused)
    x = torch.randn(8, 6, device=DEVICE)

    saved_bytes = lambda seq: _saved_bytes(seq, x)  # noqa: E731

    assert saved_bytes(fused) <= saved_bytes(unfused) - 8 * 16 * 4


@pytest.mark.parametrize("act", ["sigmoid", "silu"])
def test_act_dropout_gradcheck_float64(triton_backend, act):
    z = torch.randn(2, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    seed = torch.tensor([987654321], dtype=torch.int64, device=DEVICE)
    assert (ActDropoutFunction.apply(z, seed, 0.3, act, 0.01) == 0).any()
    assert torch.autograd.gradcheck(
        lambda z: ActDropoutFunction.apply(z, seed, 0.3, act, 0.01), (z,), eps=1e-6, atol=1e-5
    )


def test_act_dropout_p1_and_torch_backend(launches):
    z = torch.randn(4, 5, device=DEVICE)
    with fusedmlp.use_backend("triton"):
        assert torch.equal(act_dropout(z, "relu", p=1.0), torch.zeros_like(z))
    launches.clear()
    with fusedmlp.use_backend("torch"):
        assert_close(act_dropout(z, "tanh", p=0.0), torch.tanh(z))
    assert launches.total == 0


# ----------------------------------------------------------------------------------------------
# FusedSequential: fallbacks; MLP and convert produce fused blocks, keys unchanged
# ----------------------------------------------------------------------------------------------


def test_fused_sequential_falls_back_in_eval_with_hooks_and_on_torch(launches):
    seq = _bn_block(5, 8, "relu", 0.2)
    x = torch.randn(6, 5, device=DEVICE)
    with fusedmlp.use_backend("triton"):
        seq.eval()
        seq(x)
        assert "_fused_fwd_kernel" not in launches and "_bn_forward_kernel" in launches
        seq.train()
        calls = []
        handle = seq[2].register_forward_hook(lambda m, i, o: calls.append(o))
        launches.clear()
        seq(x)
        assert calls and "_fused_fwd_kernel" not in launches  # the hook saw the activation
        handle.remove()
        launches.clear()
        seq(x)
        assert launches["_fused_fwd_kernel"] == 1
        # a global module hook (torch.nn.modules.module.register_module_forward_hook) sees
        # every module's output too
        seen = []
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda m, i, o: seen.append(type(m).__name__)
        )
        launches.clear()
        try:
            seq(x)
        finally:
            handle.remove()
        assert "ReLU" in seen and "_fused_fwd_kernel" not in launches
    launches.clear()
    with fusedmlp.use_backend("torch"):
        seq(x)
    assert launches.total == 0


def test_mlp_uses_fused_blocks_with_unchanged_keys(launches):
    torch.manual_seed(0)
    model = MLP(6, [16, 8], 3, batchnorm=True, dropout=0.2).to(DEVICE)
    assert isinstance(model.layers, FusedSequential)
    keys = list(model.state_dict())
    assert keys == list(model.to_torch().state_dict())
    unfused = copy.deepcopy(model)
    unfused.layers = torch.nn.Sequential(*unfused.layers)
    assert list(unfused.state_dict()) == keys
    x = torch.randn(10, 6, device=DEVICE)
    with fusedmlp.use_backend("triton"):
        torch.manual_seed(2)
        out = model(x)
        assert launches["_fused_fwd_kernel"] == 2
        torch.manual_seed(2)
        out_ref = unfused(x)
    assert_close(out, out_ref)
    # without BatchNorm: Linear(relu) -> Identity -> Dropout blocks, the dropout in the
    # Linear's epilogue (two forward GEMMs: the block's and the head's; no elementwise pass)
    plain = MLP(6, 16, 3, dropout=0.2).to(DEVICE)
    launches.clear()
    with fusedmlp.use_backend("triton"):
        plain(x).sum().backward()
    assert "_fused_fwd_kernel" not in launches and launches["_linear_fwd_kernel"] == 2
    assert launches["_fused_bwd_elementwise_kernel"] == 1


@pytest.mark.parametrize("inplace", [False, True])
def test_convert_produces_fused_blocks(launches, inplace):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 12),
        torch.nn.BatchNorm1d(12),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.25),
        torch.nn.Linear(12, 16),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.25),
        torch.nn.Linear(16, 3),
    ).to(DEVICE)
    keys = list(model.state_dict())
    params = list(model.parameters())
    twin = copy.deepcopy(model)
    conv = convert(model, inplace=inplace)
    assert type(conv) is FusedSequential and isinstance(conv, torch.nn.Sequential)
    assert (conv is model) == inplace
    assert list(conv.state_dict()) == keys
    assert all(a is b for a, b in zip(conv.parameters(), params)) == inplace
    assert [type(m) for m in conv] == [
        Linear,
        BatchNorm1d,
        torch.nn.ReLU,
        Dropout,
        Linear,
        torch.nn.Identity,
        Dropout,
        Linear,
    ]
    x = torch.randn(9, 6, device=DEVICE)
    unfused = torch.nn.Sequential(*copy.deepcopy(list(conv)))
    with fusedmlp.use_backend("triton"):
        torch.manual_seed(7)
        out = conv(x)
        # the BN block's pass; the Linear block's dropout rides in its GEMM's epilogue
        assert launches["_fused_fwd_kernel"] == 1 and launches["_linear_fwd_kernel"] == 3
        torch.manual_seed(7)
        out_ref = unfused(x)
    assert_close(out, out_ref)
    # eval (dropout is the identity, running statistics): equal to torch's own model
    twin.load_state_dict(conv.state_dict())
    twin.eval()
    conv.eval()
    with fusedmlp.use_backend("triton"):
        assert_close(conv(x), twin(x))


@pytest.mark.parametrize("block", ["batchnorm", "bn_block"])
def test_backward_materializes_no_zero_gradients(triton_backend, block):
    """The batch mean and variance outputs are non-differentiable: their gradients are never
    materialized as zero tensors (one allocation and fill each per backward otherwise)."""
    if block == "batchnorm":
        mod = BatchNorm1d(8).to(DEVICE)
    else:
        mod = _bn_block(8, 8, "relu", 0.2)
    x = torch.randn(16, 8, device=DEVICE, requires_grad=True)
    mod(x).sum().backward()  # first: one-time allocations (the split merge's arrival counters)
    x.grad = None
    y = mod(x).sum()
    with torch.profiler.profile() as prof:
        y.backward()
    names = [e.name for e in prof.events()]
    assert "aten::zeros" not in names and "aten::zero_" not in names, names
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


def test_relu_dropout_backward_at_nan_outputs_like_torch(triton_backend):
    # relu(NaN) = NaN and the dropout multiplies, so a NaN output does not say whether the
    # element was kept: torch's relu passes the gradient at NaN, its dropout keeps it only where
    # kept. (Elsewhere the relu-from-output shortcut needs no mask.)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(8, 16, generator=g).to(DEVICE)
    z[3] = math.nan  # a whole row: some of it kept, some dropped
    z[5, 7] = -math.inf
    torch.manual_seed(11)
    keep = act_dropout(torch.ones_like(z), "relu", p=0.5) != 0  # same seed draw, same mask
    assert keep[3].any() and (~keep[3]).any()
    torch.manual_seed(11)
    zz = z.clone().requires_grad_()
    out = act_dropout(zz, "relu", p=0.5)
    dy = torch.randn(8, 16, generator=g).to(DEVICE)
    out.backward(dy)
    zt = z.clone().requires_grad_()
    (torch.relu(zt) * keep * 2.0).backward(dy)
    torch.testing.assert_close(zz.grad, zt.grad, equal_nan=True)


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "leaky_relu"])
def test_act_dropout_backward_at_nan_outputs_like_torch(triton_backend, launches, activation):
    # The backward from the saved output: a dropped element's output is act(z) * 0, NaN where
    # act(z) is NaN, and torch's tanh/sigmoid backward multiplies the (zero) gradient by the
    # derivative at that NaN output (leaky_relu's takes only the sign: no NaN). The kernel
    # read every dropped output as 0, so those gradients were 0 where torch's are NaN.
    g = torch.Generator().manual_seed(3)
    z = torch.randn(8, 16, generator=g).to(DEVICE)
    z[3] = math.nan  # a whole row: some of it kept, some dropped
    torch.manual_seed(12)
    keep = act_dropout(torch.ones_like(z), None, p=0.5) != 0  # same seed draw, same mask
    assert keep[3].any() and (~keep[3]).any()
    torch.manual_seed(12)
    zz = z.clone().requires_grad_()
    out = act_dropout(zz, activation, p=0.5)
    dy = torch.randn(8, 16, generator=g).to(DEVICE)
    launches.clear()
    out.backward(dy)
    assert launches["_fused_bwd_elementwise_kernel"] == 1
    zt = z.clone().requires_grad_()
    act = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "leaky_relu": F.leaky_relu}[activation]
    (act(zt) * keep * 2.0).backward(dy)
    torch.testing.assert_close(zz.grad, zt.grad, equal_nan=True)


# ----------------------------------------------------------------------------------------------
# Linear -> BatchNorm1d: the batch statistics from the Linear's epilogue
# ----------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _statistics_at_every_size(monkeypatch):
    """The Linear-epilogue statistics (and the backward handover) at every batch of these
    tests (from STATS_MIN_ROWS rows)."""
    from fusedmlp.nn import fused_block

    monkeypatch.setattr(fused_block, "STATS_MIN_ROWS", 2)


def _mlp_pair(dtype, bias=True):
    model = MLP(6, [24, 40, 16], 5, batchnorm=True, dropout=0.0, bias=bias).to(DEVICE, dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BatchNorm1d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model, model.to_torch()


@pytest.mark.parametrize("keep", ["recompute", "keep"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "n, final", [(300, True), (37, True), (16, True), (2, True), (300, False), (37, False)]
)
def test_linear_epilogue_statistics_feed_the_batch_norm(
    triton_backend, launches, monkeypatch, keep, dtype, n, final
):
    # Every Linear before a BatchNorm1d (the first one as a module, the others inside the
    # block + Linear Function when its output is recomputed, as modules otherwise) makes the
    # batch norm's statistics in its epilogue (each column block's last program merges the
    # tiles' partials) and the block's forward pass updates the running statistics: no
    # statistics launch, no read of the block's input for them (with FINAL_STATS off: partial
    # statistics, merged with the running update by a launch of the block's own, as before the
    # nineteenth session). Against torch's own modules:
    # outputs, gradients and running statistics over two training steps (300 rows: three
    # 128-row splits, the last of 44). bf16 gradients through three batch norms differ from
    # torch's by 5-13% of their norm with or without this path (roundings amplified): compared
    # in fp32 only.
    from fusedmlp.autograd import fused_block
    from fusedmlp.nn import fused_block as nn_fused_block

    if keep == "recompute":
        monkeypatch.setattr(fused_block, "RECOMPUTE_MIN_BYTES", 0)
    monkeypatch.setattr(nn_fused_block, "FINAL_STATS", final)
    model, ref = _mlp_pair(dtype)
    ref64 = copy.deepcopy(ref).double()
    for step in range(2):
        x = torch.randn(n, 6, device=DEVICE, dtype=dtype)
        launches.clear()
        out, grads = _run(model.layers, x, step)
        assert launches["_bn_stats_partial_kernel"] == 0, dict(launches)
        assert launches["_bn_stats_final_kernel"] == (0 if final else 3), dict(launches)
        assert launches["_bn_update_running_kernel"] == 0, dict(launches)
        out_ref, grads_ref = _run(ref.layers, x, step)
        _, grads64 = _run(ref64.layers, x.double(), step)
        assert_close(out, out_ref, dtype=dtype, scale=4)
        if dtype == torch.float32 and n > 2:
            for g, g_ref in zip(grads, grads_ref):
                assert_close(g, g_ref, scale=8)
        elif dtype == torch.float32:
            # Two rows: each batch norm's variance is one squared difference, and the gradients
            # through three of them are ill-conditioned: torch's own fp32 gradients were off its
            # fp64 ones by 1e-4 to 0.8 (absolute) over a few random models on a CPU, and ours
            # and torch's differed by 0.5% on an H200, whose GEMMs sum in other orders. Ours
            # must be within 8 times torch's own fp32 error.
            for g, g_ref, g64 in zip(grads, grads_ref, grads64):
                err, err_ref = (g.double() - g64).abs().max(), (g_ref.double() - g64).abs().max()
                assert err <= 8 * err_ref + 1e-4, (err.item(), err_ref.item())
    for m, m_ref in zip(model.modules(), ref.modules()):
        if isinstance(m, BatchNorm1d):
            assert_close(m.running_mean, m_ref.running_mean, dtype=dtype)
            assert_close(m.running_var, m_ref.running_var, dtype=dtype)
            assert torch.equal(m.num_batches_tracked, m_ref.num_batches_tracked)


def test_linear_epilogue_statistics_equal_the_statistics_pass(triton_backend):
    # The merged partials are the batch norm's own statistics (its partial + merge kernels
    # over the same output) within rounding, for every dtype; bias or not.
    from fusedmlp.kernels import batchnorm as KB
    from fusedmlp.kernels import linear as KL

    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for bias in (True, False):
            x = torch.randn(45, 20, device=DEVICE, dtype=dtype) + 2
            w = torch.randn(33, 20, device=DEVICE, dtype=dtype) * 0.3
            b = torch.randn(33, device=DEVICE, dtype=dtype) if bias else None
            y, (pmean, pm2, rows) = KL.linear_forward_stats(x, w, b)
            assert_close(y, KL.linear_forward(x, w, b, "none", 0.0)[0])  # other tiles
            assert pmean.shape == (-(-45 // rows), 33)
            got = KB.batch_norm_stats_merge(pmean, pm2, rows, 45, 1e-5, None)
            want = KB.batch_norm_stats(y, 1e-5)
            for a, e in zip(got, want):
                assert_close(a, e, dtype=torch.float64 if dtype == torch.float64 else None)


@pytest.mark.parametrize("rows", [45, 300])  # one 128-row split / three, the last of 44
def test_linear_epilogue_final_statistics(triton_backend, launches, rows):
    # With eps the GEMM's last program of each column block merges the tiles' partials into
    # the final statistics: the batch norm's own (its statistics pass over the same output)
    # within rounding, for every dtype, bias or not, in the one GEMM launch; the arrival
    # counters are left at zero for the next launch.
    from fusedmlp.kernels import batchnorm as KB
    from fusedmlp.kernels import linear as KL
    from fusedmlp.kernels.arrival import _COUNTERS

    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for bias in (True, False):
            x = torch.randn(rows, 20, device=DEVICE, dtype=dtype) + 2
            w = torch.randn(33, 20, device=DEVICE, dtype=dtype) * 0.3  # 3 column blocks
            b = torch.randn(33, device=DEVICE, dtype=dtype) if bias else None
            launches.clear()
            y, final = KL.linear_forward_stats(x, w, b, 1e-3)
            assert launches.total == launches["_linear_fwd_kernel"] == 1, dict(launches)
            assert_close(y, KL.linear_forward(x, w, b, "none", 0.0)[0])
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            assert final.shape == (3, 33) and final.dtype == acc
            want = KB.batch_norm_stats(y, 1e-3)
            for a, e in zip(final.unbind(0), want):
                assert_close(a, e, dtype=torch.float64 if dtype == torch.float64 else None)
            assert not any(bool(c.any()) for c in _COUNTERS.values())


@pytest.fixture
def tma_tf32(monkeypatch):
    """TF32 matmuls, and the TMA forward at every size and tile count."""
    from fusedmlp.kernels import linear as KL

    for name, value in (("TMA", True), ("TMA_TF32", True), ("TMA_MIN_MACS", 0)):
        monkeypatch.setattr(KL, name, value)
    monkeypatch.setattr(KL, "TMA_MIN_WAVES", 0)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("final", [True, False], ids=["final", "partials"])
def test_tma_tf32_epilogue_statistics(triton_backend, launches, tma_tf32, final):
    # A TF32 GEMM on the persistent TMA kernel makes the batch statistics in its epilogue, on
    # each half of a tile's columns: torch's batch mean and variances of the output, in the one
    # launch. 300 rows: three 128-row splits, the last short; 80 columns: the last tile's
    # second half past N. Every program walks several tiles (3 programs under the interpreter).
    from fusedmlp.kernels import batchnorm as KB
    from fusedmlp.kernels import linear as KL
    from fusedmlp.kernels.arrival import _COUNTERS

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(300, 24, generator=g) + 1).to(DEVICE)
    w = (torch.randn(80, 24, generator=g) * 0.3).to(DEVICE)
    b = torch.randn(80, generator=g).to(DEVICE)
    launches.clear()
    y, stats = KL.linear_forward_stats(x, w, b, 1e-3 if final else None)
    assert launches.total == launches["_linear_fwd_tma_kernel"] == 1, dict(launches)
    assert_close(y, F.linear(x, w, b), atol=2e-5, rtol=1e-5)
    var, mean = torch.var_mean(y, 0, unbiased=False)
    if final:
        assert stats.shape == (3, 80)
        assert_close(stats[0], mean)
        assert_close(stats[1], torch.rsqrt(var + 1e-3))
        assert_close(stats[2], torch.var(y, 0))
        assert not any(bool(c.any()) for c in _COUNTERS.values())
    else:
        pmean, pm2, rows = stats
        assert rows == 128 and pmean.shape == pm2.shape == (3, 80)
        for i in range(3):
            part = y[i * rows : (i + 1) * rows]
            assert_close(pmean[i], part.mean(0))
            assert_close(pm2[i], ((part - part.mean(0)) ** 2).sum(0), rtol=1e-4, atol=1e-4)
        got = KB.batch_norm_stats_merge(pmean, pm2, rows, 300, 1e-3, None)
        assert_close(got[0], mean)


def test_tma_tf32_bn_block_matches_torch(triton_backend, launches, tma_tf32):
    # The block's forward with its GEMM on TMA: the GEMM and the block's pass, no statistics
    # launch; outputs, gradients and running statistics as torch's chain (dropout 0)
    torch.manual_seed(0)
    mods = [Linear(24, 80), BatchNorm1d(80), torch.nn.ReLU(), Dropout(0.0)]
    model = FusedSequential(*mods).to(DEVICE)
    ref = torch.nn.Sequential(torch.nn.Linear(24, 80), torch.nn.BatchNorm1d(80), torch.nn.ReLU())
    ref.load_state_dict(FusedSequential(*model[:2]).state_dict())
    ref.to(DEVICE)
    x = torch.randn(300, 24, device=DEVICE, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    launches.clear()
    out = model(x)
    assert launches["_linear_fwd_tma_kernel"] == 1, dict(launches)
    assert launches["_bn_stats_partial_kernel"] == launches["_bn_stats_final_kernel"] == 0
    expected = ref(xr)
    assert_close(out, expected, atol=1e-4, rtol=1e-4)
    gy = torch.randn_like(out)
    out.backward(gy)
    expected.backward(gy)
    assert_close(x.grad, xr.grad, atol=1e-4, rtol=1e-4)
    assert_close(model[0].weight.grad, ref[0].weight.grad, atol=1e-3, rtol=1e-4)
    assert_close(model[1].running_mean, ref[1].running_mean)
    assert_close(model[1].running_var, ref[1].running_var)


def test_epilogue_statistics_cumulative_running_average(triton_backend, launches):
    # momentum=None: the block's forward pass updates the running statistics from the Linear's
    # statistics as a cumulative average (num_batches_tracked read on the device), as torch.
    mods = [Linear(6, 12), BatchNorm1d(12, momentum=None), torch.nn.ReLU(), Dropout(0.2)]
    model = FusedSequential(*mods).to(DEVICE)
    ref = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.BatchNorm1d(12, momentum=None))
    ref.load_state_dict(FusedSequential(*model[:2]).state_dict())
    ref.to(DEVICE)
    for step in range(3):
        x = torch.randn(40, 6, device=DEVICE)
        launches.clear()
        model(x)
        assert launches["_bn_stats_final_kernel"] == launches["_bn_stats_partial_kernel"] == 0
        ref(x)
        assert_close(model[1].running_mean, ref[1].running_mean)
        assert_close(model[1].running_var, ref[1].running_var)
        assert int(model[1].num_batches_tracked) == step + 1 == int(ref[1].num_batches_tracked)


@pytest.mark.parametrize("final", [True, False], ids=["final", "partials"])
@pytest.mark.parametrize("track", [True, False], ids=["tracked", "untracked"])
def test_untracked_bn_block_linear_statistics_feed_the_next_batch_norm(
    triton_backend, launches, monkeypatch, final, track
):
    # A block whose batch norm computes its statistics inside the Function (no running
    # statistics: track_running_stats=False) and that makes the next batch norm's statistics in
    # its Linear's epilogue: those statistics are not differentiable. The Function once marked
    # them so, then marked only mean and var (each mark_non_differentiable call replaces the
    # last), and with FINAL_STATS off the next batch norm merged differentiable partials in
    # batchnorm_stats, whose backward raised "no autograd formula". Against torch's modules.
    from fusedmlp.autograd import fused_block
    from fusedmlp.nn import fused_block as nn_fused_block

    monkeypatch.setattr(fused_block, "RECOMPUTE_MIN_BYTES", 0)
    monkeypatch.setattr(nn_fused_block, "FINAL_STATS", final)
    torch.manual_seed(0)
    ref = torch.nn.Sequential(
        torch.nn.Linear(5, 6),
        torch.nn.BatchNorm1d(6, track_running_stats=track),
        torch.nn.ReLU(),
        torch.nn.Linear(6, 7),
        torch.nn.BatchNorm1d(7),
        torch.nn.Tanh(),
        torch.nn.Linear(7, 3),
    ).to(DEVICE)
    model = convert(ref)
    assert type(model) is FusedSequential
    for _ in range(2):
        launches.clear()
        assert_step_like(model, ref, torch.randn(8, 5, device=DEVICE))
        # the first block and the Linear after it in one Function (the recomputing path)
        assert launches["_fused_bwd_reduce_kernel"] == 2, dict(launches)


def _autotuner_trials(monkeypatch, trials=2):
    """Make every launch with more than one configuration (autotuned on a GPU, whatever its
    size here) run ``trials`` times first, as triton's autotuner runs a kernel while it times
    its configurations: the tensors named in ``restore_value`` copied back and those in
    ``reset_to_zero`` zeroed around each trial; then the launch itself."""
    import importlib

    for name in ("linear", "batchnorm", "fused_block", "dropout", "cross_entropy", "softmax"):
        module = importlib.import_module(f"fusedmlp.kernels.{name}")

        def launch(kernel, grid, *, configs, restore_value=(), reset_to_zero=(),
                   original=module.launch, **kwargs):  # fmt: skip
            if len(configs) > 1:
                for _ in range(trials):
                    saved = [(kwargs[n], kwargs[n].clone()) for n in restore_value]
                    for n in reset_to_zero:
                        kwargs[n].zero_()
                    original(kernel, grid, configs=configs, **kwargs)
                    for t, copied in saved:
                        t.copy_(copied)
            return original(kernel, grid, configs=configs, restore_value=restore_value,
                            reset_to_zero=reset_to_zero, **kwargs)  # fmt: skip

        monkeypatch.setattr(module, "launch", launch)


def test_epilogue_statistics_running_update_survives_autotuning(
    triton_backend, launches, monkeypatch
):
    # On a GPU the first launch of a shape big enough to tune runs the kernel once per trial
    # of every configuration. The block's forward that updates the running statistics in place
    # (from the Linear's epilogue statistics, ``UPDATE``) was tuned without restoring them:
    # the update was applied once per trial, and the running statistics after the first step
    # were near the batch's own. Every launch of the step is run as the autotuner runs it here.
    _autotuner_trials(monkeypatch)
    model, ref = _mlp_pair(torch.float32)
    x = torch.randn(40, 6, device=DEVICE)
    out, grads = _run(model.layers, x, 0)
    out_ref, grads_ref = _run(ref.layers, x, 0)
    # the block's forward ran with its trials (three launches each: two trials, the launch)
    assert launches["_fused_fwd_kernel"] >= 3
    assert_close(out, out_ref, scale=4)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, scale=8)
    for m, m_ref in zip(model.modules(), ref.modules()):
        if isinstance(m, BatchNorm1d):
            assert_close(m.running_mean, m_ref.running_mean)
            assert_close(m.running_var, m_ref.running_var)


def test_no_epilogue_statistics_where_the_batch_norm_cannot_take_them(triton_backend, launches):
    # Untracked running statistics (the batch norm's Function computes its own), a hook on the
    # batch norm (it runs as a module): the Linear makes no statistics, the results are torch's.
    model, ref = _mlp_pair(torch.float32)
    bn1 = model.layers[1]
    bn1.track_running_stats = False
    bn1.running_mean = bn1.running_var = None
    ref.layers[1].track_running_stats = False
    ref.layers[1].running_mean = ref.layers[1].running_var = None
    seen = []
    model.layers[5].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(12, 6, device=DEVICE)
    out, grads = _run(model.layers, x, 0)
    assert seen == [(12, 40)]
    # the third batch norm alone takes epilogue statistics: the other two run their own pass
    # (one split each: the final statistics from it), the third none
    assert launches["_bn_stats_partial_kernel"] == 2, dict(launches)
    assert launches["_bn_stats_final_kernel"] == 0, dict(launches)
    out_ref, grads_ref = _run(ref.layers, x, 0)
    assert_close(out, out_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, scale=4)


@pytest.mark.parametrize("keep", ["recompute", "keep"])
@pytest.mark.parametrize("shape", [(1,), ()])
def test_a_broadcast_bias_set_after_a_step_runs_as_torch(
    triton_backend, launches, monkeypatch, keep, shape
):
    # F.linear broadcasts a one-element or 0-d bias. Set on the Linears after a first step, it
    # reached the Linear's epilogue statistics (linear_stats) and the block + Linear Function,
    # which refused it ("bias shape (1,) does not match weight shape") where torch's model runs
    from fusedmlp.autograd import fused_block

    if keep == "recompute":
        monkeypatch.setattr(fused_block, "RECOMPUTE_MIN_BYTES", 0)
    model, ref = _mlp_pair(torch.float32)
    x = torch.randn(12, 6, device=DEVICE)
    for net in (model, ref):
        _run(net.layers, x, 0)
        for i in (0, 3, 6, 9):  # the first Linear, those after a block, the head
            net.layers[i].bias = torch.nn.Parameter(torch.full(shape, 0.25 * i, device=DEVICE))
    launches.clear()
    out, grads = _run(model.layers, x, 0)
    # the blocks still run fused, with their own statistics pass
    assert launches["_fused_fwd_kernel"] == 3 and launches["_bn_stats_partial_kernel"] == 3
    out_ref, grads_ref = _run(ref.layers, x, 0)
    assert_close(out, out_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, scale=4)
    for (name, b), b_ref in zip(model.named_buffers(), ref.buffers()):
        assert_close(b.double(), b_ref.double(), dtype=torch.float32, msg=name)


# ----------------------------------------------------------------------------------------------
# The block's dx pass makes dZ^T and dZ's column sums for the Linear before it (_handover)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", ["recompute", "keep"])
def test_block_dx_pass_hands_dz_transposed_to_the_linear(
    triton_backend, launches, monkeypatch, keep
):
    # On the "dz" backward path (fp32: dZ^T for dW) every Linear fed by a BatchNorm block's
    # gradient takes dZ^T and db's column sums from the block's dx pass: no dZ pass of its own
    # (only the head's, whose gradient comes from the loss). Against torch's modules.
    from fusedmlp.autograd import fused_block
    from fusedmlp.kernels import linear as KL

    monkeypatch.setattr(KL, "BACKWARD_PATH", "dz")
    if keep == "recompute":
        monkeypatch.setattr(fused_block, "RECOMPUTE_MIN_BYTES", 0)
    model, ref = _mlp_pair(torch.float32)
    for step in range(2):
        x = torch.randn(70, 6, device=DEVICE)
        launches.clear()
        out, grads = _run(model.layers, x, step)
        assert launches["_linear_dz_kernel"] == 1, dict(launches)  # the head's
        out_ref, grads_ref = _run(ref.layers, x, step)
        assert_close(out, out_ref, scale=4)
        for g, g_ref in zip(grads, grads_ref):
            assert_close(g, g_ref, scale=8)


@pytest.mark.parametrize("case", ["plain", "in-place hook", "read twice", "frozen weight"])
def test_handover_only_for_the_gradient_the_block_made(triton_backend, launches, monkeypatch, case):
    # The Linear takes what the block made only with the very gradient tensor the block
    # returned, unmodified: a hook that changes it in place, or a second reader of the
    # Linear's output (autograd sums the two gradients), make the Linear run its own dZ pass;
    # a frozen weight (no dW) asks for nothing. The gradients are torch's in every case.
    from fusedmlp.autograd._handover import Handover
    from fusedmlp.autograd.linear import linear_stats
    from fusedmlp.kernels import linear as KL

    monkeypatch.setattr(KL, "BACKWARD_PATH", "dz")
    x = torch.randn(40, 6, device=DEVICE)
    w = (torch.randn(12, 6, device=DEVICE) * 0.5).requires_grad_(case != "frozen weight")
    b = torch.randn(12, device=DEVICE).requires_grad_()
    bw = torch.rand(12, device=DEVICE).add_(0.5).requires_grad_()
    bb = torch.randn(12, device=DEVICE).requires_grad_()
    g = torch.randn(40, 12, device=DEVICE)

    def run(fused: bool):
        leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in (x, w, b, bw, bb)]
        rm, rv = torch.zeros(12, device=DEVICE), torch.ones(12, device=DEVICE)
        if fused:
            h = Handover()
            y, partials = linear_stats(*leaves[:3], h)
            out = bn_act_dropout(y, rm, rv, *leaves[3:], 0.1, 1e-5, "relu", partials=partials,
                                 handover=h)  # fmt: skip
        else:
            y = torch.nn.functional.linear(*leaves[:3])
            out = torch.relu(torch.nn.functional.batch_norm(y, rm, rv, *leaves[3:], True))
        if case == "in-place hook":
            y.register_hook(lambda grad: grad.mul_(2.0))
        loss = (out * g).sum() + (y.square().sum() if case == "read twice" else 0.0)
        wanted = [t for t in leaves if t.requires_grad]
        return torch.autograd.grad(loss, wanted)

    launches.clear()
    got = run(True)
    assert launches["_linear_dz_kernel"] == (0 if case == "plain" else 1), dict(launches)
    for a, e in zip(got, run(False)):
        assert_close(a, e, scale=8)


def test_handover_not_taken_is_emptied_when_the_backward_ends(triton_backend, monkeypatch):
    # A backward that stops at the block (torch.autograd.grad of the BN's parameters only)
    # never runs the Linear's: what the block gave (dZ, dZ^T, its column sums) stayed in the
    # graph's Handover for as long as the graph lived. The pass's end empties the slot.
    from fusedmlp.autograd._handover import Handover
    from fusedmlp.autograd.linear import linear_stats
    from fusedmlp.kernels import linear as KL

    monkeypatch.setattr(KL, "BACKWARD_PATH", "dz")
    x = torch.randn(40, 6, device=DEVICE)
    w = (torch.randn(12, 6, device=DEVICE) * 0.5).requires_grad_()
    b = torch.randn(12, device=DEVICE).requires_grad_()
    bw = torch.rand(12, device=DEVICE).add_(0.5).requires_grad_()
    bb = torch.randn(12, device=DEVICE).requires_grad_()
    rm, rv = torch.zeros(12, device=DEVICE), torch.ones(12, device=DEVICE)
    h = Handover()
    y, partials = linear_stats(x, w, b, h)
    out = bn_act_dropout(y, rm, rv, bw, bb, 0.1, 1e-5, "relu", partials=partials, handover=h)
    assert h.want
    got = torch.autograd.grad(out.sum(), [bw, bb])
    assert h._grad is None and h._made is None
    y_ref = torch.nn.functional.linear(x, w, b).detach()
    bw_ref, bb_ref = bw.detach().requires_grad_(), bb.detach().requires_grad_()
    out_ref = torch.relu(torch.nn.functional.batch_norm(y_ref, None, None, bw_ref, bb_ref, True))
    for a, e in zip(got, torch.autograd.grad(out_ref.sum(), [bw_ref, bb_ref])):
        assert_close(a, e, scale=8)


@pytest.mark.parametrize("fullgraph", [False, True])
def test_handover_under_compiled_autograd(triton_backend, launches, monkeypatch, fullgraph):
    # An eager forward (handovers made), its backward under compiled autograd: dynamo traces
    # the block's backward, where queue_callback without fullgraph=True raises AssertionError
    # (not the RuntimeError that give() catches), and with it the Linear's test of the
    # gradient's version was a data-dependent guard. No handover there: torch's gradients.
    import torch._dynamo
    import torch._dynamo.compiled_autograd as ca

    from fusedmlp.kernels import linear as KL

    monkeypatch.setattr(KL, "BACKWARD_PATH", "dz")
    torch._dynamo.reset()
    model, ref = _mlp_pair(torch.float32)
    x = torch.randn(40, 6, device=DEVICE)
    g = torch.randn(40, 5, device=DEVICE)
    loss = (model(x) * g).sum()
    with ca._enable(lambda gm: torch.compile(gm, backend="aot_eager", fullgraph=fullgraph)):
        loss.backward()
    (ref(x) * g).sum().backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        assert_close(p.grad, p_ref.grad, scale=8, msg=name)


@pytest.mark.parametrize("patched", [0, 1, 2, 3])
def test_fused_sequential_runs_a_forward_of_its_own(triton_backend, launches, patched):
    # torch.nn.Sequential calls a child's own ``forward`` (an instance attribute, as
    # accelerate's device hooks or a user's patch set): a block holding such a child runs as
    # its modules, and a Linear with one makes no epilogue statistics for the batch norm
    torch.manual_seed(0)
    model = MLP(5, [16], 3, batchnorm=True, dropout=0.5).to(DEVICE)
    model.layers[3].p = 0.0  # deterministic; the BatchNorm -> ReLU -> Dropout block still fuses
    ref = model.to_torch()
    for net in (model, ref):
        m = net.layers[patched]
        m.forward = (lambda f: lambda x: f(x) * 2 + 1)(m.forward)
    assert_step_like(model, ref, torch.randn(8, 5, device=DEVICE))
    assert launches.total > 0


def test_epilogue_statistics_of_an_overflowing_column_sum_as_torch(triton_backend, launches):
    # Columns of +-1e38 (finite): their sum overflows, torch's CPU batch norm takes the mean
    # +-inf and the variance +inf (the outputs NaN); the Linear's epilogue statistics made the
    # same mean but a NaN variance (the split merge's inf - inf), so the running variance
    # became NaN instead of inf. torch's CUDA Welford makes such statistics NaN or +-inf by
    # where the values fall in its launch: there, non-finite at the same places.
    mods = [Linear(4, 4), BatchNorm1d(4), torch.nn.ReLU()]
    model = FusedSequential(*mods).to(DEVICE)
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4))
        model[0].bias.copy_(torch.tensor([1e38, -1e38, 3e38, 1.0]))
    ref = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU())
    ref.load_state_dict(model.state_dict())
    x = torch.randn(6, 4, device=DEVICE)
    out, out_ref = model(x), ref.to(DEVICE)(x)
    assert launches["_bn_stats_final_kernel"] == launches["_bn_stats_partial_kernel"] == 0
    assert_close(out, out_ref, equal_nan=True)
    for name in ("running_mean", "running_var"):
        ours, theirs = getattr(model[1], name), getattr(ref[1], name)
        if DEVICE == "cpu":
            assert_close(ours, theirs, equal_nan=True, msg=name)
        else:
            assert torch.equal(ours.isfinite(), theirs.isfinite()), (name, ours, theirs)
            assert_close(ours[3:], theirs[3:], msg=name)
    assert model[1].running_var[:3].isinf().all()
