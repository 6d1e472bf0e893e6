"""Fused linear + bias + activation against ``torch.nn.Linear`` followed by torch's activation.

The Triton path runs under the interpreter on CPU (16x16x16 tiles), so the shapes are small
but cross several tiles, ragged edges, the split-M dW reduction and the grouped tile order.
"""

import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, ON_GPU, assert_close, assert_within_magnitude

from fusedmlp.autograd.linear import ACTIVATIONS, apply_activation_torch
from fusedmlp.functional import linear
from fusedmlp.nn import Linear, LinearReLU

FWD, DX, DW, SUM = (
    "_linear_fwd_kernel",
    "_linear_dx_kernel",
    "_linear_dw_kernel",
    "_sum_splits_kernel",
)

TORCH_ACT = {
    None: lambda z, s: z,
    "relu": lambda z, s: torch.relu(z),
    "leaky_relu": lambda z, s: F.leaky_relu(z, s),
    "sigmoid": lambda z, s: torch.sigmoid(z),
    "tanh": lambda z, s: torch.tanh(z),
    "gelu": lambda z, s: F.gelu(z),
    "silu": lambda z, s: F.silu(z),
}
# (activation, negative_slope): negative slopes save the pre-activation, >= 0 the output.
ACT_CASES = [(a, 0.01) for a in ACTIVATIONS] + [("leaky_relu", -0.3), ("leaky_relu", 0.0)]
ACT_IDS = [f"{a}{'' if s == 0.01 else s}" for a, s in ACT_CASES]


def _t(*shape, dtype=torch.float32, gen=None, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _reference(x, w, b, act, slope, gy):
    """torch.nn.Linear + torch's activation, forward and the three gradients (same dtype)."""
    x, w = _leaf(x), _leaf(w)
    b = _leaf(b) if b is not None else None
    with warnings.catch_warnings():  # "Initializing zero-element tensors is a no-op"
        warnings.simplefilter("ignore", UserWarning)
        lin = torch.nn.Linear(
            w.shape[1], w.shape[0], bias=b is not None, device=DEVICE, dtype=w.dtype
        )
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    y = TORCH_ACT[act](lin(x), slope)
    y.backward(gy)
    return y.detach(), x.grad, lin.weight.grad, (lin.bias.grad if b is not None else None)


def _ours(x, w, b, act, slope, gy):
    x, w = _leaf(x), _leaf(w)
    b = _leaf(b) if b is not None else None
    y = linear(x, w, b, act, slope)
    y.backward(gy)
    return y.detach(), x.grad, w.grad, (b.grad if b is not None else None)


def _check(ours, ref, dtype, scale=1.0):
    names = ("y", "dx", "dw", "db")
    for name, a, e in zip(names, ours, ref):
        if e is None:
            assert a is None, name
            continue
        assert a.shape == e.shape and a.dtype == e.dtype, name
        # gradients sum over rows: widen by the magnitude of what they reduce
        assert_close(a, e, dtype=dtype, scale=scale, msg=lambda m, n=name: f"{n}: {m}")


@pytest.fixture(params=[True, False], ids=["combined", "separate"])
def combined(request, monkeypatch):
    """A small backward's dX tiles launched with its dW/db kernel (the default), or by the dX
    kernel of the big ones (``kernels.linear.COMBINED_BACKWARD``)."""
    from fusedmlp.kernels import linear as KL

    monkeypatch.setattr(KL, "COMBINED_BACKWARD", request.param)
    return request.param


def _expect(launches, backend, dw_split=1):
    """The launches of one forward and backward of a small (untuned) linear with every
    gradient: the dX tiles ride in the dW kernel's launch unless the dW reduction is split."""
    from fusedmlp.kernels import linear as KL

    if backend == "torch":
        assert launches.total == 0, dict(launches)
    else:
        dx = 0 if KL.COMBINED_BACKWARD and dw_split == 1 else 1
        assert launches[FWD] == 1 and launches[DX] == dx and launches[DW] == 1, dict(launches)
        assert launches[SUM] == 0, dict(launches)  # a split's last programs merge it


# ----------------------------------------------------------------------------- every activation


@pytest.mark.parametrize("act,slope", ACT_CASES, ids=ACT_IDS)
def test_every_activation_matches_torch(backend, launches, combined, act, slope):
    g = torch.Generator().manual_seed(0)
    x = _t(3, 11, 33, gen=g)  # M = 33, K = 33: three row tiles, three K steps
    w = _t(17, 33, gen=g, scale=0.2)
    b = _t(17, gen=g)
    gy = _t(3, 11, 17, gen=g)
    ours = _ours(x, w, b, act, slope, gy)
    _expect(launches, backend)
    _check(ours, _reference(x, w, b, act, slope, gy), torch.float32)


def test_activation_names_and_torch_fallback_helper():
    assert ACTIVATIONS == (None, "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "silu")
    z = torch.linspace(-4, 4, 17)
    for act, slope in ACT_CASES:
        torch.testing.assert_close(
            apply_activation_torch(z, act, slope), TORCH_ACT[act](z, slope), rtol=0, atol=0
        )
    with pytest.raises(ValueError, match="swish"):
        apply_activation_torch(z, "swish", 0.01)


# ------------------------------------------------------------------------- shapes, bias, strides


@pytest.mark.parametrize(
    "lead,k,n",
    [
        ((1,), 1, 1),
        ((7,), 1, 7),
        ((1,), 7, 1),
        ((65,), 7, 5),  # a 1-tile dW grid: split-M reduction + second stage
        ((2, 3, 5), 17, 19),  # 4-D input
        ((), 9, 3),  # 1-D input, as torch.nn.Linear allows
    ],
    ids=["1x1x1", "7x1x7", "1x7x1", "65x7x5-split", "4d", "1d"],
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_shapes_and_bias(triton_backend, launches, combined, lead, k, n, bias):
    from fusedmlp.kernels.linear import dw_split

    g = torch.Generator().manual_seed(1)
    x = _t(*lead, k, gen=g)
    w = _t(n, k, gen=g)
    b = _t(n, gen=g) if bias else None
    gy = _t(*lead, n, gen=g)
    ours = _ours(x, w, b, "tanh", 0.01, gy)
    m = x.numel() // k
    _expect(launches, "triton", dw_split(m, n, k, torch.device(DEVICE)))
    _check(ours, _reference(x, w, b, "tanh", 0.01, gy), torch.float32)


def test_split_reduction_is_deterministic_and_matches_unsplit(
    triton_backend, launches, arrivals, monkeypatch
):
    from fusedmlp.kernels import linear as K

    g = torch.Generator().manual_seed(2)
    x, w, b, gy = _t(97, 5, gen=g), _t(6, 5, gen=g), _t(6, gen=g), _t(97, 6, gen=g)
    ref = _reference(x, w, b, "silu", 0.01, gy)
    results = []
    for split in (1, 3, 3, 7):
        monkeypatch.setattr(K, "dw_split", lambda M, N, K_, device, s=split: s)
        launches.clear()
        arrivals.clear()
        results.append(_ours(x, w, b, "silu", 0.01, gy))
        # the split was taken, in one launch: its last programs merged it
        assert launches[DW] == 1 and launches[SUM] == 0, (split, dict(launches))
        assert len(arrivals) == (split > 1) and arrivals.all_reset(), split
        _check(results[-1], ref, torch.float32)
    for a, e in zip(results[1], results[2]):  # same split twice: bitwise equal
        assert torch.equal(a, e)


@pytest.mark.parametrize("path", ["fused", "dz"])
def test_split_merge_launch_where_a_tile_has_too_many_partials(
    triton_backend, launches, arrivals, interpreter_splits, monkeypatch, path
):
    # Past MERGE_MAX_BYTES of partials a tile, a launch of their own merges the slices (and
    # db's column sums): the same gradients, to the bit, as the tiles' last programs' merge.
    from fusedmlp.kernels import linear as K

    monkeypatch.setattr(K, "BACKWARD_PATH", path)
    g = torch.Generator().manual_seed(3)
    x, w, b, gy = _t(100, 10, gen=g), _t(12, 10, gen=g), _t(12, gen=g), _t(100, 12, gen=g)
    merged = _ours(x, w, b, "relu", 0.01, gy)
    assert launches[SUM] == 0 and len(arrivals) == 1 and arrivals.all_reset(), dict(launches)
    monkeypatch.setattr(K, "MERGE_MAX_BYTES", 0)
    launches.clear()
    launched = _ours(x, w, b, "relu", 0.01, gy)
    assert launches[SUM] == 1 and len(arrivals) == 1, dict(launches)
    for a, e in zip(merged, launched):
        assert torch.equal(a, e)
    _check(launched, _reference(x, w, b, "relu", 0.01, gy), torch.float32)


def test_small_backward_keeps_its_split_to_what_its_tiles_merge(
    triton_backend, launches, arrivals, interpreter_splits, monkeypatch
):
    # A small problem (SMALL_MERGE_MACS) caps its dW split at the slices its tiles' last
    # programs merge (MERGE_MAX_BYTES a tile: 2 slices of a 12 x 10 fp32 tile here), for one
    # launch less; a larger one keeps its split (4) and the merge launch.
    from fusedmlp.kernels import linear as K

    monkeypatch.setattr(K, "BACKWARD_PATH", "fused")
    monkeypatch.setattr(K, "MERGE_MAX_BYTES", 2 * 12 * 10 * 4)
    splits = []
    merges = K.merges_in_kernel
    monkeypatch.setattr(
        K, "merges_in_kernel", lambda split, *a: splits.append(split) or merges(split, *a)
    )
    g = torch.Generator().manual_seed(4)
    x, w, b, gy = _t(100, 10, gen=g), _t(12, 10, gen=g), _t(12, gen=g), _t(100, 12, gen=g)
    ref = _reference(x, w, b, "relu", 0.01, gy)
    _check(_ours(x, w, b, "relu", 0.01, gy), ref, torch.float32)
    assert splits == [2] and launches[SUM] == 0 and len(arrivals) == 1, (splits, dict(launches))
    assert arrivals.all_reset()
    monkeypatch.setattr(K, "SMALL_MERGE_MACS", 0)
    splits.clear()
    launches.clear()
    _check(_ours(x, w, b, "relu", 0.01, gy), ref, torch.float32)
    assert splits == [4] and launches[SUM] == 1, (splits, dict(launches))


@pytest.mark.parametrize("m,k,n", [(0, 5, 3), (5, 0, 3), (40, 0, 3), (5, 3, 0)])
def test_empty_dimensions(triton_backend, m, k, n):
    # empty batch, in_features = 0 (y = act(bias), split db), out_features = 0: as torch
    g = torch.Generator().manual_seed(13)
    x, w, b, gy = _t(m, k, gen=g), _t(n, k, gen=g), _t(n, gen=g), _t(m, n, gen=g)
    _check(
        _ours(x, w, b, "sigmoid", 0.01, gy),
        _reference(x, w, b, "sigmoid", 0.01, gy),
        torch.float32,
    )


def _layout(t, how):
    """The same values as ``t`` (2-D) in a non-contiguous layout."""
    if how == "transposed":
        return t.t().contiguous().t()
    if how == "sliced":
        wide = torch.zeros(t.shape[0], 2 * t.shape[1] + 1, device=t.device, dtype=t.dtype)
        wide[:, 1::2] = t
        return wide[:, 1::2]
    if how == "expanded":  # stride-0 rows (as the gradient of a sum)
        return t[:1].expand_as(t)
    return t


@pytest.mark.parametrize(
    "x_how,g_how,w_how",
    [
        ("transposed", "sliced", "contiguous"),
        ("sliced", "transposed", "transposed"),
        ("contiguous", "expanded", "sliced"),
    ],
)
def test_noncontiguous_inputs_and_grad_outputs(backend, launches, x_how, g_how, w_how):
    g = torch.Generator().manual_seed(3)
    x = _layout(_t(37, 21, gen=g), x_how)
    w = _layout(_t(19, 21, gen=g), w_how)
    b = _t(19, gen=g)
    gy = _layout(_t(37, 19, gen=g), g_how)
    assert not x.is_contiguous() or x_how == "contiguous"
    assert not gy.is_contiguous()
    ours = _ours(x, w, b, "sigmoid", 0.01, gy)
    _expect(launches, backend)
    _check(ours, _reference(x, w, b, "sigmoid", 0.01, gy), torch.float32)


def test_3d_input_permuted_batch_dims(triton_backend):
    # [..., in] whose leading dims cannot be flattened by a view: reshaped (copied) once.
    g = torch.Generator().manual_seed(4)
    x = _t(5, 3, 9, gen=g).transpose(0, 1)
    w, b, gy = _t(4, 9, gen=g), _t(4, gen=g), _t(3, 5, 4, gen=g)
    _check(_ours(x, w, b, "gelu", 0.01, gy), _reference(x, w, b, "gelu", 0.01, gy), torch.float32)


# ------------------------------------------------------------------------------- half precision


@pytest.mark.parametrize(
    "dtype,act",
    [
        (torch.float16, "relu"),
        (torch.float16, "gelu"),
        (torch.bfloat16, "tanh"),
        (torch.bfloat16, "silu"),
    ],
    ids=["fp16-relu", "fp16-gelu", "bf16-tanh", "bf16-silu"],
)
def test_half_precision_triton_path(triton_backend, launches, combined, dtype, act):
    g = torch.Generator().manual_seed(5)
    x = _t(2, 20, 40, gen=g, dtype=dtype)
    w = _t(24, 40, gen=g, dtype=dtype, scale=0.15)
    b = _t(24, gen=g, dtype=dtype)
    gy = _t(2, 20, 24, gen=g, dtype=dtype)
    ours = _ours(x, w, b, act, 0.01, gy)
    _expect(launches, "triton")
    ref = _reference(x, w, b, act, 0.01, gy)
    # dw and db sum 40 rows of O(1) terms: one unit of the dtype's tolerance per output is tight
    # (fp32 accumulation in both; torch and the kernel round dZ identically).
    _check(ours, ref, dtype, scale=2.0)


# --------------------------------------------------------------------------- "dz" backward path

DZ = "_linear_dz_kernel"
TRANSPOSE = "_transpose_kernel"


@pytest.fixture
def dz_path(monkeypatch):
    """The backward's "dz" path (dZ pass, then the forward GEMM kernel for dX and dW)."""
    from fusedmlp.kernels import linear as kernels

    monkeypatch.setattr(kernels, "BACKWARD_PATH", "dz")


@pytest.mark.parametrize(
    "dtype,act,slope",
    [
        (torch.float32, None, 0.01),
        (torch.float32, "relu", 0.01),
        (torch.float32, "leaky_relu", -0.3),
        (torch.float32, "gelu", 0.01),
        (torch.float16, "sigmoid", 0.01),
        (torch.bfloat16, "relu", 0.01),
        (torch.bfloat16, None, 0.01),
    ],
    ids=["fp32-none", "fp32-relu", "fp32-leaky-0.3", "fp32-gelu", "fp16-sigmoid", "bf16-relu",
         "bf16-none"],
)  # fmt: skip
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_dz_backward_path_matches_torch(triton_backend, launches, dz_path, dtype, act, slope, bias):
    g = torch.Generator().manual_seed(11)
    x = _t(3, 13, 37, gen=g, dtype=dtype)  # M = 39 rows: three row splits, a partial tile
    w = _t(21, 37, gen=g, dtype=dtype, scale=0.2)
    b = _t(21, gen=g, dtype=dtype) if bias else None
    gy = _t(3, 13, 21, gen=g, dtype=dtype).transpose(0, 1).contiguous().transpose(0, 1)
    ours = _ours(x, w, b, act, slope, gy)
    # forward + dX + dW through the GEMM kernel; the dZ pass (column sums), and their merge
    assert launches["_linear_fwd_kernel"] == 3, dict(launches)
    assert launches[DX] == 0 and launches[DW] == 0, dict(launches)
    assert launches[DZ] == (1 if (act or dtype == torch.float32 or bias) else 0), dict(launches)
    assert launches[SUM] == (1 if bias else 0), dict(launches)
    # fp32's K-major copies of X (for dW) and W (for dX): TF32 wgmma reads no other operand
    assert launches[TRANSPOSE] == (2 if dtype == torch.float32 else 0), dict(launches)
    ref = _reference(x, w, b, act, slope, gy)
    _check(ours, ref, dtype, scale=2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["row-major", "sliced", "column-view", "empty"])
def test_transpose_contiguous_equals_torch(launches, dtype, layout):
    # the dz path's copies: bit-equal to x.t().contiguous(), tiles at partial edges in both
    # dimensions (37 x 45 against 16 x 32 interpreter tiles), any strides; no launch where
    # x.t() is contiguous already (a fused block's recomputed output)
    from fusedmlp.kernels.linear import transpose_contiguous

    g = torch.Generator().manual_seed(5)
    x = {
        "row-major": lambda: _t(37, 45, gen=g),
        "sliced": lambda: _t(40, 91, gen=g)[2:39, 1::2],
        "column-view": lambda: _t(45, 37, gen=g).t(),
        "empty": lambda: _t(0, 45, gen=g),
    }[layout]().to(dtype)
    y = transpose_contiguous(x)
    assert y.is_contiguous() and y.dtype == dtype and y.shape == (x.shape[1], x.shape[0])
    assert torch.equal(y, x.t().contiguous())
    launched = layout in ("row-major", "sliced")
    assert launches[TRANSPOSE] == (1 if launched else 0), dict(launches)


def test_dz_backward_path_only_requested_gradients(triton_backend, launches, dz_path):
    g = torch.Generator().manual_seed(12)
    x, w, b = _t(9, 8, gen=g), _leaf(_t(5, 8, gen=g)), _leaf(_t(5, gen=g))
    gy = _t(9, 5, gen=g)
    y = linear(x, w, b, "relu")  # x needs no gradient: no dX GEMM
    y.backward(gy)
    assert launches["_linear_fwd_kernel"] == 2 and launches[SUM] == 1, dict(launches)
    ref = _reference(x, w.detach(), b.detach(), "relu", 0.01, gy)
    assert_close(w.grad, ref[2], dtype=torch.float32)
    assert_close(b.grad, ref[3], dtype=torch.float32)


@pytest.mark.parametrize(
    "dtype,act,bias",
    [(torch.float32, "relu", True), (torch.float32, None, False), (torch.bfloat16, "gelu", True)],
    ids=["fp32-relu-bias", "fp32-none-nobias", "bf16-gelu-bias"],
)
def test_dz_backward_splits_a_narrow_dw_over_the_batch(
    triton_backend, launches, arrivals, dz_path, interpreter_splits, dtype, act, bias
):
    # A [12, 10] dW (one nominal tile of 16 x 16 under the interpreter, for 4 "SMs") over 100
    # rows: its GEMM runs in 32-row slices (4 programs per tile; the last one 4 rows deep),
    # whose fp32 partials the tile's last program sums, with the dZ pass's db column sums.
    from fusedmlp.kernels.linear import dz_dw_split

    assert dz_dw_split(100, 12, 10, torch.device("cpu")) == 4
    g = torch.Generator().manual_seed(13)
    x = _t(100, 10, gen=g, dtype=dtype)
    w = _t(12, 10, gen=g, dtype=dtype, scale=0.3)
    b = _t(12, gen=g, dtype=dtype) if bias else None
    gy = _t(100, 12, gen=g, dtype=dtype)
    ours = _ours(x, w, b, act, 0.01, gy)
    # forward, dX, and dW's split launch, which merges its partials (and the column sums)
    assert launches["_linear_fwd_kernel"] == 3 and launches[SUM] == 0, dict(launches)
    assert len(arrivals) == 1 and arrivals.all_reset()
    ref = _reference(x, w, b, act, 0.01, gy)
    _check(ours, ref, dtype, scale=2.0)


def test_dz_backward_dw_split_can_be_turned_off(triton_backend, launches, dz_path, monkeypatch):
    from fusedmlp.kernels import linear as kernels

    g = torch.Generator().manual_seed(14)
    x, w, gy = _t(100, 10, gen=g), _t(12, 10, gen=g, scale=0.3), _t(100, 12, gen=g)
    monkeypatch.setattr(kernels, "DZ_DW_SPLIT", False)
    ours = _ours(x, w, None, "relu", 0.01, gy)
    assert launches["_linear_fwd_kernel"] == 3 and launches[SUM] == 0, dict(launches)
    _check(ours, _reference(x, w, None, "relu", 0.01, gy), torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU's own split sizes")
def test_dz_backward_dw_split_on_a_gpu(triton_backend, launches, arrivals):
    # The bench step's TF32 layer at a quarter of its batch, on the path a GPU chooses: dz,
    # with dW's 4096-deep reduction in slices (4 on 132 SMs), checked against float64 within
    # TF32's rounding bound (as tests/test_configs.py).
    from fusedmlp.kernels import linear as kernels

    M, N, K = 4096, 1024, 1024
    device = torch.device("cuda")
    split = kernels.dz_dw_split(M, N, K, device)
    g = torch.Generator().manual_seed(15)
    x = _leaf(torch.randn(M, K, generator=g).to(device))
    w = _leaf((torch.randn(N, K, generator=g) / K**0.5).to(device))
    b = _leaf(torch.randn(N, generator=g).to(device))
    gy = torch.randn(M, N, generator=g).to(device)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        assert kernels.backward_path(torch.float32, "tf32", M, N, K, device) == "dz"
        linear(x, w, b).backward(gy)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert launches["_linear_fwd_kernel"] == 3, dict(launches)
    # the slices (split > 1) and db merged by the tiles' last programs: no launch of their own
    assert launches[SUM] == 0 and len(arrivals) == 1 and arrivals.all_reset(), dict(launches)
    assert split > 1, split
    x64, w64, g64 = x.detach().double(), w.detach().double(), gy.double()
    for actual, expected, magnitude in (
        (x.grad, g64 @ w64, g64.abs() @ w64.abs()),
        (w.grad, g64.T @ x64, g64.T.abs() @ x64.abs()),
        (b.grad, g64.sum(0), g64.abs().sum(0)),
    ):
        assert_within_magnitude(actual, expected, magnitude, 2**-8)


def test_dz_dw_split_policy():
    from fusedmlp.kernels import linear as kernels

    cuda, h100 = torch.device("cuda"), 132
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "sm_count", lambda device: h100)
        # the bench step's layer: 64 tiles of 128 x 128, about two programs per SM
        assert kernels.dz_dw_split(16384, 1024, 1024, cuda) == 4
        assert kernels.dz_dw_split(16384, 2048, 2048, cuda) == 1  # 256 tiles: no split
        assert kernels.dz_dw_split(2048, 1024, 1024, cuda) == 2  # at least 1024 rows a slice
        assert kernels.dz_dw_split(1 << 20, 128, 128, cuda) == 16  # at most 16 slices


def test_backward_path_policy():
    from fusedmlp.kernels.linear import backward_path

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    big = (16384, 1024, 1024)
    assert backward_path(torch.float32, "tf32", *big, cuda) == "dz"
    assert backward_path(torch.float32, "ieee", *big, cuda) == "fused"
    assert backward_path(torch.float32, "tf32", 64, 256, 256, cuda) == "fused"
    assert backward_path(torch.float32, "tf32", *big, cpu) == "fused"
    assert backward_path(torch.float64, "ieee", *big, cuda) == "fused"
    assert backward_path(torch.bfloat16, "ieee", 8192, 8192, 8192, cuda) == "dz"
    assert backward_path(torch.float16, "ieee", *big, cuda) == "fused"
    assert backward_path(torch.float32, "tf32", 65536, 128, 128, cuda) == "fused"  # narrow dW


# ------------------------------------------------------------------------------ TMA forward

TMA = "_linear_fwd_tma_kernel"


@pytest.fixture
def tma(monkeypatch):
    """The TMA forward (``FUSEDMLP_TMA``) at every size and tile count."""
    from fusedmlp.kernels import linear as kernels

    monkeypatch.setattr(kernels, "TMA", True)
    monkeypatch.setattr(kernels, "TMA_TF32", True)
    monkeypatch.setattr(kernels, "TMA_MIN_MACS", 0)
    monkeypatch.setattr(kernels, "TMA_MIN_WAVES", 0)


@pytest.mark.parametrize(
    "dtype,act,slope",
    [
        (torch.bfloat16, "relu", 0.01),
        (torch.bfloat16, None, 0.01),
        (torch.float16, "leaky_relu", -0.3),  # stores the pre-activation too
        (torch.float16, "gelu", 0.01),
    ],
    ids=["bf16-relu", "bf16-none", "fp16-leaky-0.3", "fp16-gelu"],
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_tma_forward_matches_torch(triton_backend, launches, tma, dtype, act, slope, bias):
    g = torch.Generator().manual_seed(21)
    # M = 40 and N = 72 over 16 x 32 tiles: 9 output tiles for the interpreter's 3 persistent
    # programs, with partial tiles in M, N and K (K = 40 over 16-deep steps: zero-filled reads).
    x = _t(2, 20, 40, gen=g, dtype=dtype)
    w = _t(72, 40, gen=g, dtype=dtype, scale=0.15)
    b = _t(72, gen=g, dtype=dtype) if bias else None
    gy = _t(2, 20, 72, gen=g, dtype=dtype)
    ours = _ours(x, w, b, act, slope, gy)
    assert launches[TMA] == 1 and launches[FWD] == 0, dict(launches)
    ref = _reference(x, w, b, act, slope, gy)
    _check(ours, ref, dtype, scale=2.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_tma_forward_runs_the_dz_backward_gemms(triton_backend, launches, tma, dz_path, dtype):
    # dW = dZ^T X and dX = dZ W take transposed views: every operand orientation of the kernel.
    g = torch.Generator().manual_seed(22)
    x = _t(40, 48, gen=g, dtype=dtype)
    w = _t(56, 48, gen=g, dtype=dtype, scale=0.15)
    b = _t(56, gen=g, dtype=dtype)
    gy = _t(40, 56, gen=g, dtype=dtype)
    ours = _ours(x, w, b, "relu", 0.01, gy)
    assert launches[TMA] == 3 and launches[FWD] == 0, dict(launches)
    ref = _reference(x, w, b, "relu", 0.01, gy)
    _check(ours, ref, dtype, scale=2.0)


@pytest.mark.parametrize(
    "how",
    [
        "k-unaligned",
        "row-stride-unaligned",
        "no-unit-stride",
        "broadcast-rows",
        "fp32",
        "below-threshold",
    ],
)
def test_tma_forward_falls_back_to_the_pointer_kernel(triton_backend, launches, tma, how):
    from fusedmlp.kernels import linear as kernels

    g = torch.Generator().manual_seed(23)
    dtype = torch.float32 if how == "fp32" else torch.bfloat16
    k = 37 if how == "k-unaligned" else 40  # 74-byte rows: not a TMA row stride
    x = _t(24, k, gen=g, dtype=dtype)
    if how == "row-stride-unaligned":
        x = _t(24, 44, gen=g, dtype=dtype)[:, :40]
    elif how == "no-unit-stride":
        x = _t(24, 80, gen=g, dtype=dtype)[:, ::2]
    elif how == "broadcast-rows":  # row stride 0: 16-byte "aligned", but no TMA tensor map
        x = _t(1, k, gen=g, dtype=dtype).expand(24, k)
    elif how == "below-threshold":
        kernels.TMA_MIN_MACS = 24 * 32 * 40 + 1
    w = _t(32, k, gen=g, dtype=dtype, scale=0.2)
    b = _t(32, gen=g, dtype=dtype)
    y = linear(x, w, b, "relu")
    assert launches[FWD] == 1 and launches[TMA] == 0, dict(launches)
    ref = torch.relu(torch.nn.functional.linear(x.float(), w.float(), b.float())).to(dtype)
    assert_close(y, ref, dtype=dtype, scale=2.0)


@pytest.mark.parametrize(
    "dtype,act,bias,rows",
    [
        (torch.float32, "relu", True, 100),
        (torch.float32, None, False, 96),
        (torch.bfloat16, "gelu", True, 100),
    ],
    ids=["tf32-relu-bias-100", "tf32-none-nobias-96", "bf16-gelu-bias-100"],
)
def test_tma_dw_split_merges_its_slices_as_torch_sums(
    triton_backend, launches, arrivals, tma, tf32, dz_path, interpreter_splits, monkeypatch,
    dtype, act, bias, rows,
):  # fmt: skip
    # A [16, 32] dW is one 16 x 32 TMA tile for the interpreter's 3 persistent programs: the
    # TMA kernel runs it in 2 K slices of 64 rows (the last one 32 or 36 rows deep), whose
    # fp32 partials, and the dZ pass's db column sums, the tile's last item merges.
    from fusedmlp.kernels import linear as kernels

    depths = []
    rule = kernels._tma_split_depth
    monkeypatch.setattr(
        kernels, "_tma_split_depth", lambda *a: depths.append(rule(*a)) or depths[-1]
    )
    g = torch.Generator().manual_seed(25)
    x = _t(rows, 32, gen=g, dtype=dtype)
    w = _t(16, 32, gen=g, dtype=dtype, scale=0.3)
    b = _t(16, gen=g, dtype=dtype) if bias else None
    gy = _t(rows, 16, gen=g, dtype=dtype)
    ours = _ours(x, w, b, act, 0.01, gy)
    assert depths == [64], depths
    # forward, dX and the split dW on the TMA kernel; no merge launch, no pointer GEMM
    assert launches[TMA] == 3 and launches[FWD] == 0 and launches[SUM] == 0, dict(launches)
    assert len(arrivals) == 1 and arrivals.all_reset()
    ref = _reference(x, w, b, act, 0.01, gy)
    _check(ours, ref, torch.bfloat16 if dtype == torch.float32 else dtype, scale=2.0)
    # FUSEDMLP_TMA_SPLIT=0, with the default wave rule: the pointer kernel's split
    monkeypatch.setattr(kernels, "TMA_SPLIT", False)
    monkeypatch.setattr(kernels, "TMA_MIN_WAVES", 1)
    launches.clear()
    again = _ours(x, w, b, act, 0.01, gy)
    assert launches[FWD] == 1 and launches[TMA] == 2 and launches[SUM] == 0, dict(launches)
    _check(again, ref, torch.bfloat16 if dtype == torch.float32 else dtype, scale=2.0)


def test_tma_launch_configurations_share_the_block_shape():
    import triton

    from fusedmlp.kernels import linear as kernels
    from fusedmlp.kernels.launch import Tma, arg_type, launch

    x = torch.zeros(32, 64, dtype=torch.bfloat16)
    desc = Tma(x, ("BLOCK_M", "BLOCK_K"))
    assert arg_type(desc) == "tensordesc<bf16[{BLOCK_M}, {BLOCK_K}]>"
    two = [
        triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}),
        triton.Config({"BLOCK_M": 32, "BLOCK_K": 16}),
    ]
    with pytest.raises(ValueError, match="share the block shape"):
        launch(kernels._linear_fwd_tma_kernel, (1,), configs=two, tma=("x_desc",), x_desc=desc)
    for size, configs in kernels._TMA_CONFIGS.items():  # one block shape per element size
        shapes = {tuple(c.kwargs[n] for n in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) for c in configs}
        assert shapes == {(128, 256, {2: 64, 4: 16}[size])}, size


def test_tma_forward_needs_a_wave_of_output_tiles(triton_backend, launches, monkeypatch):
    # The persistent kernel runs one program per SM: fewer output tiles than programs (the
    # TF32 dW GEMM's 1024 x 1024 outputs on an H100) keep the pointer kernel. Here 3 programs,
    # and the device's tiles (128 x 256 on a GPU, 16 x 32 under the interpreter).
    from fusedmlp.kernels import linear as kernels

    monkeypatch.setattr(kernels, "TMA", True)
    monkeypatch.setattr(kernels, "TMA_MIN_MACS", 0)
    monkeypatch.setattr(kernels, "_tma_programs", lambda device: 3)
    assert kernels.TMA_MIN_WAVES == 1
    tile = (kernels._TMA_CONFIGS[2][0] if ON_GPU else kernels._TMA_INTERPRET).kwargs
    bm, bn = tile["BLOCK_M"], tile["BLOCK_N"]
    g = torch.Generator().manual_seed(5)
    w = _t(bn, 24, gen=g, dtype=torch.float16)
    for m, kernel in ((2 * bm, FWD), (3 * bm, TMA)):  # 2 tiles, then 3
        x = _t(m, 24, gen=g, dtype=torch.float16)
        launches.clear()
        y = linear(x, w, None, "relu")
        assert launches[kernel] == 1 and launches.total == 1, (m, dict(launches))
        assert_close(y, torch.relu(x.float() @ w.float().t()).half(), dtype=torch.float16)


def test_tma_forward_takes_tf32_unless_told_not_to(
    triton_backend, launches, tma, tf32, monkeypatch
):
    # FUSEDMLP_TMA unset: 16-bit and TF32 GEMMs (the whole step's kernels 2.36 ms against 2.57
    # on an H200); FUSEDMLP_TMA=16: 16-bit GEMMs only
    from fusedmlp.kernels import linear as kernels

    if os.environ.get("FUSEDMLP_TMA", "") == "":
        assert kernels.TMA and kernels.TMA_TF32

    g = torch.Generator().manual_seed(6)
    x, w = _t(40, 48, gen=g), _t(56, 48, gen=g)
    for opt_in, kernel in ((False, FWD), (True, TMA)):
        monkeypatch.setattr(kernels, "TMA_TF32", opt_in)
        launches.clear()
        linear(x, w, None, "relu")
        assert launches[kernel] == 1 and launches.total == 1, (opt_in, dict(launches))
    launches.clear()
    linear(x.half(), w.half(), None, "relu")
    assert launches[TMA] == 1, dict(launches)


@pytest.fixture
def tf32(monkeypatch):
    """torch's matmul precision "high": fp32 GEMMs may use TF32 (the kernels' DOT_PRECISION)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("dz", [False, True], ids=["fused-bwd", "dz-bwd"])
def test_tma_forward_tf32_takes_k_major_operands(triton_backend, launches, tma, tf32, dz):
    from fusedmlp.kernels import linear as kernels

    g = torch.Generator().manual_seed(24)
    x = _t(40, 48, gen=g)
    w = _t(56, 48, gen=g, scale=0.15)
    b = _t(56, gen=g)
    gy = _t(40, 56, gen=g)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "BACKWARD_PATH", "dz" if dz else "fused")
        ours = _ours(x, w, b, "tanh", 0.01, gy)
        # dz: dW and dX through the forward GEMM on K-major copies (TF32 wgmma's only layout)
        assert launches[TMA] == (3 if dz else 1) and launches[FWD] == 0, dict(launches)
        launches.clear()
        y = linear(x.t().contiguous().t(), w, b, "tanh")  # x transposed: not K-major
        assert launches[FWD] == 1 and launches[TMA] == 0, dict(launches)
    # tanh, not relu: TF32 rounding (ours and torch's differ) flips relu's mask where the
    # pre-activation is near 0, and a flipped element moves dX by gy * w (seen on an H100)
    ref = _reference(x, w, b, "tanh", 0.01, gy)
    # TF32 on a GPU (10-bit mantissa, torch's GEMMs too): a bf16-sized tolerance
    _check(ours, ref, torch.bfloat16, scale=2.0)
    assert_close(y, ref[0], dtype=torch.bfloat16)


# ------------------------------------------------------------------------------------ gradcheck


@pytest.mark.parametrize("act,slope", ACT_CASES, ids=ACT_IDS)
def test_gradcheck_float64_triton_path(triton_backend, combined, act, slope):
    g = torch.Generator().manual_seed(6)
    x = _t(2, 9, 5, dtype=torch.float64, gen=g).requires_grad_()
    w = _t(18, 5, dtype=torch.float64, gen=g).requires_grad_()
    b = _t(18, dtype=torch.float64, gen=g).requires_grad_()
    f = lambda x, w, b: linear(x, w, b, act, slope)
    assert torch.autograd.gradcheck(f, (x, w, b), fast_mode=True)


def test_gradcheck_float64_split_path_and_full_jacobian(triton_backend, launches, arrivals):
    g = torch.Generator().manual_seed(7)
    # split-M dW: 1 tile of dW, M long enough to split (dw_split: 32 rows a slice under the
    # interpreter, 512 on a GPU)
    m = 40 if DEVICE == "cpu" else 1100
    x = _t(m, 3, dtype=torch.float64, gen=g).requires_grad_()
    w = _t(2, 3, dtype=torch.float64, gen=g).requires_grad_()
    b = _t(2, dtype=torch.float64, gen=g).requires_grad_()
    f = lambda x, w, b: linear(x, w, b, "leaky_relu", -0.5)
    assert torch.autograd.gradcheck(f, (x, w, b), fast_mode=True)
    assert launches[FWD] > 0 and len(arrivals) > 0 and arrivals.all_reset(), dict(launches)
    # the full Jacobian (slow mode) on a tiny problem
    xs, ws, bs = (t[:3].detach().requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: linear(x, w, b, "gelu"), (xs, ws[:2], bs))


# ---------------------------------------------------------------------- which gradients run


def test_only_requested_gradients_are_computed(triton_backend, launches):
    g = torch.Generator().manual_seed(8)
    x, w, b, gy = _t(9, 6, gen=g), _t(5, 6, gen=g), _t(5, gen=g), _t(9, 5, gen=g)
    ref = _reference(x, w, b, "relu", 0.01, gy)
    # frozen layer, input needs grad: no dW launch (nor dW programs)
    xl = _leaf(x)
    linear(xl, w, b, "relu").backward(gy)
    assert_close(xl.grad, ref[1])
    assert launches[DX] == 1 and launches[DW] == 0, dict(launches)
    # every gradient: one launch for all (a small backward's dX rides with dW and db)
    launches.clear()
    xl, wl, bl = _leaf(x), _leaf(w), _leaf(b)
    linear(xl, wl, bl, "relu").backward(gy)
    for got, want in zip((xl.grad, wl.grad, bl.grad), ref[1:]):
        assert_close(got, want)
    assert launches[DX] == 0 and launches[DW] == 1, dict(launches)
    # first layer: no dX launch; bias only -> db programs only
    launches.clear()
    wl, bl = _leaf(w), _leaf(b)
    linear(x, wl, bl, "relu").backward(gy)
    assert_close(wl.grad, ref[2])
    assert_close(bl.grad, ref[3])
    assert launches[DX] == 0 and launches[DW] == 1, dict(launches)
    launches.clear()
    bl = _leaf(b)
    linear(x, w, bl, "relu").backward(gy)
    assert_close(bl.grad, ref[3])
    assert launches[DX] == 0 and launches[DW] == 1, dict(launches)


@pytest.mark.parametrize("out", [1, 3])
@pytest.mark.parametrize("shape", [(), (1,)])
def test_one_element_bias_broadcasts_like_torch(backend, launches, shape, out):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(out, 5, generator=g).to(DEVICE).requires_grad_()
    b = torch.randn(shape, generator=g).to(DEVICE).requires_grad_()
    y = linear(x, w, b, "tanh")
    ref = torch.tanh(F.linear(x, w, b))
    assert_close(y, ref)
    gy = torch.randn(4, out, generator=g).to(DEVICE)
    grads = torch.autograd.grad(y, (x, w, b), gy)
    ref_grads = torch.autograd.grad(ref, (x, w, b), gy)
    for a, r in zip(grads, ref_grads):
        assert a.shape == r.shape
        assert_close(a, r)
    assert (launches.total > 0) == (backend == "triton")


def test_relu_gradient_at_nan_and_inf_like_torch(backend):
    # torch's relu backward zeroes where the output is <= 0: a NaN output passes the gradient.
    x = torch.tensor([[math.inf, 1.0], [-math.inf, 2.0], [math.nan, -1.0], [1.0, 0.5]])
    x = x.to(DEVICE).requires_grad_()
    w = torch.tensor([[1.0, 0.0], [0.5, -2.0], [0.0, 1.0]], device=DEVICE, requires_grad=True)
    gy = torch.randn(4, 3, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    grads = torch.autograd.grad(linear(x, w, None, "relu"), (x, w), gy)
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    ref = torch.autograd.grad(F.relu(F.linear(xr, wr)), (xr, wr), gy)
    for a, r in zip(grads, ref):
        torch.testing.assert_close(a, r, equal_nan=True)


def _assert_like_torch(ours, ref, dtype):
    """Same NaN and signed-inf places, the finite values within the dtype's tolerance."""
    for name, a, e in zip(("y", "dx", "dw", "db"), ours, ref):
        if e is None:
            assert a is None, name
            continue
        assert_close(a, e, dtype=dtype, equal_nan=True, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dz", [False, True], ids=["fused", "dz"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("slope", [math.inf, -math.inf, math.nan])
def test_leaky_relu_non_finite_slope_gradients_like_torch(
    triton_backend, launches, monkeypatch, combined, dz, dtype, slope
):
    # torch takes an infinite or NaN slope: NaN only where z <= 0 meets it (0 * inf, * NaN).
    # The backward kernels' masked-off lanes (M, N not multiples of the tile) must not add a
    # 0 * slope of their own to dX, dW and db.
    from fusedmlp.kernels import linear as K

    if dz:
        monkeypatch.setattr(K, "BACKWARD_PATH", "dz")
    g = torch.Generator().manual_seed(21)
    x, w, b = _t(5, 7, gen=g, dtype=dtype), _t(6, 7, gen=g, dtype=dtype), _t(6, gen=g, dtype=dtype)
    gy = _t(5, 6, gen=g, dtype=dtype)
    gy[0, :3] = 0.0  # 0 * slope where z <= 0: torch's NaN
    ours = _ours(x, w, b, "leaky_relu", slope, gy)
    assert launches[FWD] >= 1 and launches["_linear_dz_kernel" if dz else DW] == 1, dict(launches)
    _assert_like_torch(ours, _reference(x, w, b, "leaky_relu", slope, gy), dtype)


# pre-activations at the ends of the range: overflow of exp(-z), exp(z), z * z; no subnormal
# results (a GPU may flush those) and no gelu in (-13, -5) (torch's CPU-vectorised gelu
# backward rounds its tiny derivative there to 0, its scalar and CUDA ones do not)
_EXTREMES = [math.inf, -math.inf, math.nan, 3e38, -3e38, 1e30, -1e30, 100.0, -100.0, 95.0,
             -95.0, 89.5, -89.5, 20.0, -20.0, 1.0, -1.0, 0.3, -0.3, 1e-8, -1e-8, 0.0]  # fmt: skip


@pytest.mark.parametrize("grad", ["random", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act,slope", ACT_CASES, ids=ACT_IDS)
def test_extreme_preactivations_like_torch(
    triton_backend, launches, monkeypatch, act, slope, dtype, grad
):
    # z = 1 * v for each v: y = act(v) and dW[n] = db[n] = dY * act'(v), with the derivative
    # read from what the forward saved; an infinite dY shows where it is 0 (inf * 0 = NaN as
    # torch's: sigmoid's y = 0 where exp(-z) overflows, as torch's 1 / (1 + exp(-z)))
    if DEVICE == "cpu":
        # torch's CPU-vectorised gelu (seen with torch 2.13 on AVX2/AVX512 machines) gives
        # gelu(inf) = NaN and gelu(3e38) = inf; its scalar path, one element at a time, and
        # CUDA's give inf and 3e38
        monkeypatch.setitem(
            TORCH_ACT, "gelu", lambda z, s: torch.cat([F.gelu(c) for c in z.split(1, -1)], -1)
        )
    v = torch.tensor(_EXTREMES).to(device=DEVICE, dtype=dtype)
    x = torch.ones(1, 1, device=DEVICE, dtype=dtype)
    w, b = v[:, None].clone(), torch.zeros_like(v)
    if grad == "random":
        gy = _t(1, v.numel(), gen=torch.Generator().manual_seed(22), dtype=dtype)
    else:
        gy = torch.full((1, v.numel()), float(grad), device=DEVICE, dtype=dtype)
    ours = _ours(x, w, b, act, slope, gy)
    assert launches[FWD] == 1 and launches[DW] == 1, dict(launches)
    _assert_like_torch(ours, _reference(x, w, b, act, slope, gy), dtype)


def test_double_backward_is_a_clear_error(triton_backend):
    x = torch.randn(4, 3, device=DEVICE, requires_grad=True)
    w = torch.randn(2, 3, device=DEVICE, requires_grad=True)
    (gx,) = torch.autograd.grad(linear(x, w, None, "tanh").sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()
    # without create_graph the first backward is plain and correct
    (gx2,) = torch.autograd.grad(linear(x, w, None, "tanh").sum(), x)
    assert_close(gx2, gx.detach())


def test_output_modified_in_place_is_detected(triton_backend):
    # relu saves its output for backward: an in-place change must not give silent garbage.
    x = torch.randn(4, 3, device=DEVICE, requires_grad=True)
    w = torch.randn(2, 3, device=DEVICE, requires_grad=True)
    y = linear(x, w, None, "relu")
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    # gelu saves the pre-activation instead: in-place ops on its output are fine (not a view)
    y = linear(x, w, None, "gelu")
    y.mul_(2)
    y.sum().backward()
    xr = x.detach().clone().requires_grad_()
    (2 * F.gelu(F.linear(xr, w.detach()))).sum().backward()
    assert_close(x.grad, xr.grad)


# ------------------------------------------------------------------------------------ bad inputs


def test_bad_inputs_raise_before_launch(backend, launches):
    x = torch.randn(4, 3, device=DEVICE)
    w = torch.randn(5, 2, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"\(4, 3\).*\(5, 2\)"):
        linear(x, w)
    w = torch.randn(5, 3, device=DEVICE)
    with pytest.raises(RuntimeError, match="same dtype"):
        linear(x, w.double())
    with pytest.raises(RuntimeError, match="bias"):
        linear(x, w, torch.randn(5, device=DEVICE, dtype=torch.float16))
    with pytest.raises(RuntimeError, match=r"bias shape \(4,\)"):
        linear(x, w, torch.randn(4, device=DEVICE))
    with pytest.raises(RuntimeError, match="same device"):
        linear(x, w.to("meta"))
    with pytest.raises(RuntimeError, match="2-D"):  # (a 1-D weight is torch's x @ w)
        linear(x, torch.randn(1, 5, 3, device=DEVICE))
    with pytest.raises(RuntimeError):  # a 1-D weight of the wrong length
        linear(x, torch.randn(2, device=DEVICE))
    with pytest.raises(RuntimeError, match="0-d"):
        linear(torch.tensor(1.0, device=DEVICE), w)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        linear(x, w, activation="swish")
    with pytest.raises(TypeError, match="negative_slope"):
        linear(x, w, activation="leaky_relu", negative_slope="0.1")
    with pytest.raises(ValueError, match="unknown activation"):
        Linear(3, 5, activation="Relu")
    assert launches.total == 0, dict(launches)


# ---------------------------------------------------------------------------------------- modules


@pytest.mark.parametrize("bias", [True, False])
def test_module_init_state_dict_and_outputs_match_torch(backend, launches, bias):
    torch.manual_seed(10)
    ours = Linear(13, 6, bias=bias, activation="leaky_relu", negative_slope=0.2, device=DEVICE)
    torch.manual_seed(10)
    ref = torch.nn.Linear(13, 6, bias=bias, device=DEVICE)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():  # same init, same RNG draws
        assert torch.equal(ours.state_dict()[k], v), k
    # load both ways
    other = torch.nn.Linear(13, 6, bias=bias, device=DEVICE)
    ours.load_state_dict(other.state_dict())
    back = torch.nn.Linear(13, 6, bias=bias, device=DEVICE)
    back.load_state_dict(ours.state_dict())
    assert torch.equal(back.weight, other.weight)
    x = torch.randn(4, 7, 13, device=DEVICE)
    y = ours(x)
    assert_close(y, F.leaky_relu(other(x), 0.2))
    if backend == "triton":
        assert launches[FWD] == 1
    else:
        assert launches.total == 0


def test_module_repr_dtype_device_and_linear_relu(backend):
    m = Linear(3, 4, activation="tanh", dtype=torch.float64)
    assert m.weight.dtype == torch.float64 and m.bias.shape == (4,)
    assert repr(m) == "Linear(in_features=3, out_features=4, bias=True, activation=tanh)"
    assert "negative_slope=0.1" in repr(Linear(3, 4, activation="leaky_relu", negative_slope=0.1))
    assert repr(Linear(3, 4, bias=False)) == "Linear(in_features=3, out_features=4, bias=False)"
    r = LinearReLU(5, 2, device=DEVICE)
    assert r.activation == "relu" and isinstance(r, Linear)
    assert "activation=relu" in repr(r)
    x = torch.randn(3, 5, device=DEVICE, requires_grad=True)
    r(x).sum().backward()
    xr = x.detach().clone().requires_grad_()
    torch.relu(F.linear(xr, r.weight, r.bias)).sum().backward()
    assert_close(x.grad, xr.grad)


def test_autocast_casts_like_torch_linear(backend, launches):
    g = torch.Generator().manual_seed(12)
    x, w, b = _t(6, 20, gen=g), _t(24, 20, gen=g), _t(24, gen=g)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = linear(x, w, b.half(), "tanh")  # a float16 bias is cast too
        ref = torch.tanh(F.linear(x, w, b))
    assert y.dtype == ref.dtype == torch.bfloat16
    assert_close(y, ref)
    assert launches[FWD] == (1 if backend == "triton" else 0), dict(launches)


def test_custom_ops_pass_opcheck(triton_backend):
    g = torch.Generator().manual_seed(11)
    x, w, b = _t(5, 4, gen=g), _t(3, 4, gen=g), _t(3, gen=g)
    torch.library.opcheck(
        torch.ops.fusedmlp.linear_fwd,
        (x, w, b, "gelu", 0.01),
        test_utils=("test_schema", "test_faketensor"),
    )
    y, z = torch.ops.fusedmlp.linear_fwd(x, w, b, "gelu", 0.01)
    gy = _t(5, 3, gen=g)
    torch.library.opcheck(
        torch.ops.fusedmlp.linear_bwd,
        (gy, x, w, z, "gelu", 0.01, True, True, True, []),
        test_utils=("test_schema", "test_faketensor"),
    )


# ------------------------------------------------------------ torch's shapes beyond [out, in] (probe)


@pytest.mark.parametrize("x_shape", [(5, 4), (4,), (2, 3, 4)])
def test_1d_weight_without_bias_as_torch(triton_backend, launches, x_shape):
    # F.linear takes a 1-D weight: input @ weight, the last dim dropped
    torch.manual_seed(0)
    x = torch.randn(*x_shape, device=DEVICE, requires_grad=True)
    w = torch.randn(4, device=DEVICE, requires_grad=True)
    ref = F.linear(x, w)
    gy = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (x, w), gy)
    ours = linear(x, w)
    assert ours.shape == ref.shape
    assert_close(ours, ref)
    for g, r in zip(torch.autograd.grad(ours, (x, w), gy), ref_grads):
        assert_close(g, r)
    assert launches.total > 0
    with pytest.raises(RuntimeError):  # torch refuses a 1-D weight with a bias here
        linear(torch.randn(5, 4, device=DEVICE), w.detach(), torch.ones(1, device=DEVICE))


@pytest.mark.parametrize("b_shape", [(1, 3), (5, 3), (5, 1)])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_2d_input_with_bias_broadcast_over_output_as_torch(triton_backend, launches, b_shape,
                                                          activation):  # fmt: skip
    # F.linear's addmm expands a bias to the output [rows, out]
    torch.manual_seed(1)
    x = torch.randn(5, 4, device=DEVICE, requires_grad=True)
    w = torch.randn(3, 4, device=DEVICE, requires_grad=True)
    b = torch.randn(*b_shape, device=DEVICE, requires_grad=True)
    ref = apply_activation_torch(F.linear(x, w, b), activation)
    gy = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (x, w, b), gy)
    ours = linear(x, w, b, activation)
    assert ours.shape == ref.shape
    assert_close(ours, ref)
    for g, r in zip(torch.autograd.grad(ours, (x, w, b), gy), ref_grads):
        assert g.shape == r.shape
        assert_close(g, r)
    assert launches.total > 0
    with pytest.raises(RuntimeError):  # one that would grow the output: torch's error too
        linear(x, w, torch.ones(2, 5, 3, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, torch.bool])
def test_dtypes_the_kernels_do_not_take_run_torch_linear(triton_backend, launches, dtype):
    """Integer, bool and complex operands take F.linear itself, on the Triton backend too: its
    result where torch computes one, its error type where torch refuses (bool; relu of complex)."""
    x, w, b = (torch.ones(*s, device=DEVICE).to(dtype) for s in ((2, 3), (4, 3), (4,)))
    for act, torch_act in ((None, lambda t: t), ("relu", torch.relu)):
        try:
            expected = torch_act(F.linear(x, w, b))
        except Exception as e:  # noqa: BLE001 (torch's own error, whatever its type)
            with pytest.raises(type(e)):
                linear(x, w, b, act)
        else:
            got = linear(x, w, b, act)
            assert got.dtype == expected.dtype and torch.equal(got, expected)
    module = Linear(3, 4, device=DEVICE).to(dtype) if dtype.is_complex else None
    if module is not None:
        assert torch.equal(module(x), F.linear(x, module.weight, module.bias))
    assert launches.total == 0
