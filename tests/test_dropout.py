"""Inverted dropout and Dropout2d: fusedmlp's Philox kernel against torch's dropout semantics.

The masks are a different random stream from torch's, so the values are checked against torch's
rule (``x * keep / (1 - p)``, torch's NaN/Inf propagation, torch's short-cuts and errors) with the
keep mask read from the output, and the stream itself against a Python Philox4x32-10.
"""

import warnings
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from conftest import DEVICE, ON_GPU, assert_close, cast_as_kernels
from torch import Tensor
from torch.utils.checkpoint import checkpoint

import fusedmlp
from fusedmlp.autograd.dropout import dropout2d
from fusedmlp.functional import dropout
from fusedmlp.kernels import dropout as K
from fusedmlp.nn import Dropout, Dropout2d

KERNEL = "_dropout_kernel"


def _expect_launches(launches, backend, n):
    if backend == "triton":
        assert launches[KERNEL] == n, dict(launches)
    else:
        assert launches.total == 0, dict(launches)


def _gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


# ---------------------------------------------------------------- reference Philox4x32-10

_M32 = np.uint64(0xFFFFFFFF)


def _philox4x32_10(key: int, c0, c1, c2=0, c3=0):
    """Philox4x32-10 (Random123) of counters (c0, c1, c2, c3) under a 64-bit key, numpy uint64."""
    k0, k1 = np.uint64(key & 0xFFFFFFFF), np.uint64(key >> 32)
    c0, c1 = np.asarray(c0, np.uint64), np.asarray(c1, np.uint64)
    c2, c3 = np.zeros_like(c0) + np.uint64(c2), np.zeros_like(c0) + np.uint64(c3)
    ma, mb = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        p0, p1 = ma * c0, mb * c2
        c0, c1, c2, c3 = (
            (p1 >> np.uint64(32)) ^ c1 ^ k0,
            p1 & _M32,
            (p0 >> np.uint64(32)) ^ c3 ^ k1,
            p0 & _M32,
        )
        k0 = (k0 + np.uint64(0x9E3779B9)) & _M32
        k1 = (k1 + np.uint64(0xBB67AE85)) & _M32
    return np.stack([c0, c1, c2, c3])


def _reference_keep(seed: int, groups, p: float):
    """The documented stream: group g reads word g % 4 of Philox(seed, g // 4); keep iff
    (word >> 8) >= p * 2^24."""
    groups = np.asarray(groups, np.uint64)
    quad = groups // np.uint64(4)
    words = _philox4x32_10(seed, quad & _M32, quad >> np.uint64(32))
    word = np.take_along_axis(words, (groups % np.uint64(4)).astype(np.int64)[None], 0)[0]
    return (word >> np.uint64(8)).astype(np.float64) >= np.float32(p) * 16777216.0


@pytest.mark.parametrize(
    ("key", "counter", "expected"),
    [
        ((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 2, (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0xA4093822, 0x299F31D0),
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_reference_philox_known_answers(key, counter, expected):
    """The Python reference is Random123's philox4x32_10 (its known-answer vectors)."""
    c0, c1, c2, c3 = counter
    out = _philox4x32_10(key[0] | (key[1] << 32), np.array([c0]), np.array([c1]), c2, c3)
    assert [int(v) for v in out[:, 0]] == list(expected)


@triton.jit
def _words_kernel(seed_ptr, group_ptr, out_ptr, N: tl.constexpr):
    # The kernels' own Philox word of each element group (elementwise: group = element).
    offs = tl.arange(0, N)
    group = tl.load(group_ptr + offs)
    r = K.philox_word(tl.load(seed_ptr), group // 4, group % 4)
    tl.store(out_ptr + offs, r.to(tl.int64))


def test_philox_word_64bit_counters_match_reference():
    """Group indices beyond 2^32 and 2^34 (tensors beyond 2^31 elements) neither wrap nor repeat.

    Checks the kernels' Philox helper (``philox_word``, which ``philox_keep`` reads) at
    indices no test tensor reaches; ``test_kernel_stream_matches_reference`` checks the kernel
    itself.
    """
    seed = (0x1234_5678 << 32) | 0x9ABC_DEF0
    groups = np.array(
        [0, 1, 2, 3, 4, 5, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**34 + 3, 2**40 + 6, 17]
        + [2**32 * 4 + k for k in range(2)],
        dtype=np.int64,
    )
    groups = np.concatenate([groups, np.arange(16 - groups.size) + 2**35])
    out = torch.empty(16, dtype=torch.int64, device=DEVICE)
    _words_kernel[(1,)](
        torch.tensor([seed], device=DEVICE),
        torch.from_numpy(groups).to(DEVICE),
        out,
        N=16,
    )
    g = groups.astype(np.uint64)
    quad = g // np.uint64(4)
    words = _philox4x32_10(seed, quad & _M32, quad >> np.uint64(32))
    expected = np.take_along_axis(words, (g % np.uint64(4)).astype(np.int64)[None], 0)[0]
    np.testing.assert_array_equal(out.cpu().numpy().astype(np.uint64), expected)
    assert len(set(expected.tolist())) == expected.size  # 2^32 apart: different words


@pytest.mark.parametrize(("shape", "inner"), [((3, 1000), 1), ((2, 5, 7), 7)])
def test_kernel_stream_matches_reference(shape, inner):
    seed = 2**40 + 12345  # uses both halves of the Philox key
    x = torch.ones(shape, device=DEVICE)
    out = K.dropout_apply(x, torch.tensor([seed], device=DEVICE), 0.3, inner)
    groups = np.arange(x.numel()) // inner
    keep = _reference_keep(seed, groups, 0.3).reshape(shape)
    np.testing.assert_array_equal((out != 0).cpu().numpy(), keep)


# ---------------------------------------------------------------- semantics


def test_lecture_example(backend, launches):
    """3x9 ones, p = 0.75: outputs are 0 or 4; the gradient flows only through kept units, x4."""
    torch.manual_seed(0)
    x = torch.ones(3, 9, device=DEVICE, requires_grad=True)
    y = Dropout(p=0.75)(x)
    assert set(y.detach().unique().tolist()) <= {0.0, 4.0}
    kept = y.detach() != 0
    assert 0 < kept.sum() < 27
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, kept.float() * 4)
    _expect_launches(launches, backend, 2)


@pytest.mark.parametrize("p", [0.2, 0.75])
def test_keep_rate_and_mean_on_200k(backend, launches, p):
    torch.manual_seed(1)
    x = torch.rand(200_000, device=DEVICE) + 0.5
    y = dropout(x, p)
    kept = y != 0
    assert abs(kept.double().mean().item() - (1 - p)) < 0.01
    assert abs(y.double().mean().item() / x.double().mean().item() - 1) < 0.02
    assert_close(y[kept], x[kept] / (1 - p))
    _expect_launches(launches, backend, 1)


def test_masks_do_not_repeat_across_tiles(triton_backend):
    block = max(c.kwargs["BLOCK"] for c in [K.INTERPRET_CONFIG, *K.GPU_CONFIGS])
    m = dropout(torch.ones(4, block, device=DEVICE), 0.5, generator=_gen(3)) != 0
    for i in range(4):
        for j in range(i + 1, 4):
            agree = (m[i] == m[j]).float().mean().item()
            assert 0.45 < agree < 0.55, (i, j, agree)
    rows = m.reshape(-1, 64)  # no short period either (groups of 4 share a Philox call)
    assert torch.unique(rows, dim=0).shape[0] == rows.shape[0]


def test_same_seed_same_mask_successive_calls_differ(backend):
    x = torch.ones(64, 33, device=DEVICE)
    torch.manual_seed(5)
    a, b = dropout(x), dropout(x)
    torch.manual_seed(5)
    c = dropout(x)
    assert torch.equal(a, c)
    assert not torch.equal(a, b)
    state = torch.cuda.get_rng_state() if DEVICE == "cuda" else torch.get_rng_state()
    d = dropout(x, generator=_gen(7))
    e = dropout(x, generator=_gen(7))
    f = dropout(x, generator=_gen(8))
    assert torch.equal(d, e) and not torch.equal(d, f)
    after = torch.cuda.get_rng_state() if DEVICE == "cuda" else torch.get_rng_state()
    assert torch.equal(state, after)  # generator= leaves the default generator alone


@pytest.mark.parametrize("op", [dropout, dropout2d])
def test_generator_under_vmap_draws_a_mask_per_sample(backend, op):
    """vmap(randomness="different") of dropout with ``generator=``: a mask per sample, as
    ``F.dropout`` draws under vmap (the noise was made unbatched, which vmap refuses)."""
    x = torch.ones(6, 4, 64, device=DEVICE)
    g = _gen(0)
    y = torch.func.vmap(lambda a: op(a, 0.5, True, generator=g), randomness="different")(x)
    assert set(y.unique().tolist()) <= {0.0, 2.0}
    assert not all(torch.equal(y[0], y[i]) for i in range(1, 6))


def test_eval_p0_empty_return_input(backend, launches):
    x = torch.randn(7, 33, device=DEVICE, requires_grad=True)
    assert dropout(x, 0.5, training=False) is x
    assert dropout(x, 0.0) is x
    assert dropout(x, 0.0, inplace=True) is x  # torch: no in-place error when nothing runs
    e = torch.empty(0, 3, device=DEVICE)
    assert dropout(e, 0.5) is e
    x3 = x[None]
    with pytest.warns(UserWarning, match="3D input"):
        assert dropout2d(x3, 0.5, training=False) is x3
    m = Dropout(0.5).eval()
    assert m(x) is x
    m2 = Dropout2d(0.5).eval()
    x4 = x.reshape(1, 7, 3, 11)
    assert m2(x4) is x4
    assert F.dropout(x, 0.0) is x and F.dropout(x, 0.5, training=False) is x  # torch's behaviour
    assert launches.total == 0


def test_p_one_matches_torch(backend, launches):
    vals = [float("nan"), float("inf"), -float("inf"), 1.0, -2.0, 0.0]
    x = torch.tensor(vals * 3, device=DEVICE, requires_grad=True)
    xt = x.detach().clone().requires_grad_(True)
    y, yt = dropout(x, 1.0), F.dropout(xt, 1.0)
    torch.testing.assert_close(y, yt, equal_nan=True)
    g = torch.tensor([1.0, float("nan"), 3.0] * 6, device=DEVICE)
    y.backward(g)
    yt.backward(g)
    torch.testing.assert_close(x.grad, xt.grad, equal_nan=True)
    x4 = x.detach().reshape(1, 18, 1, 1)
    torch.testing.assert_close(dropout2d(x4, 1.0), F.dropout2d(x4, 1.0), equal_nan=True)
    _expect_launches(launches, backend, 3)


@pytest.mark.parametrize(
    "make", ["Dropout", "Dropout2d", "Dropout_inplace", "bn_block", "linear_block"]
)
def test_p_one_leaves_the_random_generator_as_torch(backend, make):
    """torch's dropout draws nothing at p = 1 (nothing is kept): the random numbers drawn after
    it are the same as without it, for the modules and for a converted model's fused blocks."""
    torch.manual_seed(0)
    if make.startswith("Dropout"):
        cls = make.split("_")[0]
        inplace = make.endswith("inplace")
        ours = getattr(fusedmlp.nn, cls)(1.0, inplace=inplace)
        ref = getattr(torch.nn, cls)(1.0, inplace=inplace)
    else:
        body = [torch.nn.BatchNorm1d(16)] if make == "bn_block" else [torch.nn.Linear(16, 16)]
        ref = torch.nn.Sequential(*body, torch.nn.ReLU(), torch.nn.Dropout(1.0)).to(DEVICE)
        ours = fusedmlp.nn.convert(ref)
    x = torch.randn(4, 16, 1, device=DEVICE)
    x = x if make.startswith("Dropout2d") else x.squeeze(-1)
    outs, draws = [], []
    for m in (ref, ours):
        torch.manual_seed(1)
        outs.append(m(x.clone()))
        draws.append(torch.rand(8, device=DEVICE))
    torch.testing.assert_close(outs[1], outs[0])
    torch.testing.assert_close(draws[1], draws[0])


def test_nan_inf_propagate_like_torch(backend):
    """Multiply form: a dropped NaN/Inf gives NaN, a kept one NaN/Inf (torch's dropout)."""
    x = torch.rand(4096, device=DEVICE)
    x[::3] = float("nan")
    x[1::5] = float("inf")
    x[2::7] = -float("inf")
    torch.manual_seed(3)
    y = dropout(x, 0.5)
    torch.manual_seed(3)
    keep = dropout(torch.ones_like(x), 0.5) != 0  # same seed and indices: the same mask
    assert 0 < keep.sum() < x.numel()
    torch.testing.assert_close(y, x * (keep * 2.0), equal_nan=True)
    assert torch.isnan(y[~keep & torch.isinf(x)]).all()


def test_one_element_tensor_p_is_taken_as_torch_takes_it(backend):
    x = torch.ones(64, device=DEVICE)
    p = torch.tensor(0.5)
    for ours, theirs in [(dropout(x, p), F.dropout(x, p)), (Dropout(p)(x), torch.nn.Dropout(p)(x))]:
        assert ours.shape == theirs.shape
        assert set(ours.unique().tolist()) <= {0.0, 2.0}
    with pytest.raises(ValueError, match="between 0 and 1"):
        dropout(x, torch.tensor(1.5))


@pytest.mark.parametrize("p", [-0.1, 1.1])
def test_bad_p_raises_at_construction_and_call(backend, launches, p):
    x = torch.ones(2, 3, 4, 5, device=DEVICE)
    for cls, torch_cls in [(Dropout, torch.nn.Dropout), (Dropout2d, torch.nn.Dropout2d)]:
        with pytest.raises(ValueError, match="between 0 and 1"):
            torch_cls(p)
        with pytest.raises(ValueError, match="between 0 and 1"):
            cls(p)
        m = cls(0.5)
        m.p = p
        with pytest.raises(ValueError, match="between 0 and 1"):
            m(x)
    with pytest.raises(ValueError, match="between 0 and 1"):
        dropout(x, p)
    with pytest.raises(ValueError, match="between 0 and 1"):
        dropout2d(x, p)
    assert launches.total == 0


@pytest.mark.parametrize("p", [0.1, 0.3, 0.7])
def test_float64_scale_is_fp64_exact(triton_backend, launches, p):
    # the kept elements are x / (1 - p) as torch's fp64 dropout makes them, forward and backward
    x = torch.randn(200, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y = dropout(x, p)
    assert launches["_dropout_kernel"] == 1
    kept = y != 0
    scale = 1.0 / (1.0 - p)
    assert torch.equal(y[kept], x.detach()[kept] * scale)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad[kept], torch.full_like(x.grad[kept], scale))
    assert not x.grad[~kept].any()


def test_nan_p_raises_torchs_error(backend, launches):
    # NaN passes the range checks in Python (torch's too); torch's C++ dropout refuses it with a
    # RuntimeError, at the call: the modules take it at construction, as torch's
    x = torch.ones(2, 3, 4, 5, device=DEVICE)
    nan = float("nan")
    for ours, theirs in [(dropout, F.dropout), (dropout2d, F.dropout2d)]:
        with pytest.raises(RuntimeError, match="between 0 and 1"):
            theirs(x, nan)
        with pytest.raises(RuntimeError, match="between 0 and 1"):
            ours(x, nan)
    for cls, torch_cls in [(Dropout, torch.nn.Dropout), (Dropout2d, torch.nn.Dropout2d)]:
        with pytest.raises(RuntimeError, match="between 0 and 1"):
            torch_cls(nan)(x)
        with pytest.raises(RuntimeError, match="between 0 and 1"):
            cls(nan)(x)
    assert launches.total == 0


def test_bad_dtype_raises_before_launch(backend, launches):
    x = torch.arange(12, device=DEVICE)
    with pytest.raises(RuntimeError):
        F.dropout(x, 0.5)  # torch refuses integer inputs too
    with pytest.raises(RuntimeError):
        dropout(x, 0.5)
    with pytest.raises(TypeError, match="Tensor"):
        dropout([1.0, 2.0], 0.5)
    assert launches.total == 0


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_other_dtypes_like_torch(backend, launches, dtype):
    """Dtypes the kernel does not take are torch's dropout's: at p = 1 (nothing kept) torch
    multiplies them by 0, otherwise it refuses integers and bool (complex it drops)."""
    x = torch.ones(2, 3, 4, device=DEVICE).to(dtype)
    for ours, theirs in ((Dropout, torch.nn.Dropout), (Dropout2d, torch.nn.Dropout2d)):
        for inplace in (False, True):
            out = ours(1.0, inplace)(x.clone())
            ref = theirs(1.0, inplace)(x.clone())
            assert out.dtype == ref.dtype and torch.equal(out, ref)
            torch.manual_seed(0)
            try:
                ref = theirs(0.5, inplace)(x.clone())
            except RuntimeError:
                with pytest.raises(RuntimeError):
                    ours(0.5, inplace)(x.clone())
            else:
                out = ours(0.5, inplace)(x.clone())
                assert out.dtype == ref.dtype and out.shape == ref.shape
    assert launches.total == 0


def test_checkpoint_recomputation(backend, launches):
    """torch.utils.checkpoint restores the RNG state: the recomputed seed, hence mask, is the same."""

    def block(t):
        return dropout(t.sin(), 0.5) * 3

    x = torch.randn(33, 65, device=DEVICE, requires_grad=True)
    g = torch.randn(33, 65, device=DEVICE)
    torch.manual_seed(11)
    y = block(x)
    y.backward(g)
    ref = x.grad
    x.grad = None
    torch.manual_seed(11)
    y2 = checkpoint(block, x, use_reentrant=False)
    y2.backward(g)
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, ref, rtol=0, atol=0)
    _expect_launches(launches, backend, 2 + 3)  # plain fwd+bwd; checkpoint fwd, recompute, bwd
    # The test can fail: without the RNG restore the recomputation draws another mask.
    x.grad = None
    torch.manual_seed(11)
    y3 = checkpoint(block, x, use_reentrant=False, preserve_rng_state=False)
    y3.backward(g)
    assert not torch.equal(x.grad, ref)


def test_gradient_with_other_strides(backend, launches):
    x = (torch.rand(33, 65, device=DEVICE) + 0.5).requires_grad_(True)
    torch.manual_seed(2)
    y = dropout(x, 0.4)
    g = torch.randn(65, 33, device=DEVICE).t()  # transposed storage
    assert not g.is_contiguous()
    y.backward(g)
    keep = y.detach() != 0
    assert_close(x.grad, g * keep / 0.6)
    _expect_launches(launches, backend, 2)


def _transposed(t):
    return t.reshape(33, 65).t()


def _sliced(t):
    return t.reshape(33, 65)[:, ::2]


def _expanded(t):
    return t.reshape(33, 65)[:, :1].expand(33, 7)


def _permuted_3d(t):
    return t.reshape(5, 3, 143).permute(2, 0, 1)


def _six_dims(t):  # more non-mergeable dims than the kernel addresses: the copy path
    return t[:1296].reshape(2, 3, 4, 3, 2, 9).permute(5, 4, 3, 2, 1, 0)


@pytest.mark.parametrize("make", [_transposed, _sliced, _expanded, _permuted_3d, _six_dims])
def test_noncontiguous_input_mask_follows_logical_index(triton_backend, launches, make):
    x = make(torch.rand(33 * 65, device=DEVICE) + 0.5)
    assert not x.is_contiguous()
    torch.manual_seed(4)
    y = dropout(x, 0.5)
    torch.manual_seed(4)
    yc = dropout(x.contiguous(), 0.5)
    torch.testing.assert_close(y, yc, rtol=0, atol=0)
    assert_close(y, x * (yc != 0) * 2.0)
    assert launches[KERNEL] == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(triton_backend, launches, dtype):
    x = (torch.rand(7, 129, device=DEVICE) + 0.5).to(dtype).requires_grad_(True)
    torch.manual_seed(6)
    y = dropout(x, 0.3)
    assert y.dtype == dtype
    torch.manual_seed(6)
    y32 = dropout(x.detach().float(), 0.3)
    keep = y32 != 0
    torch.testing.assert_close(y != 0, keep)  # the mask depends on (seed, index) only
    assert_close(y, (x.detach().float() * keep / 0.7).to(dtype))  # torch's fp32 math, rounded
    g = torch.randn(7, 129, device=DEVICE).to(dtype)
    y.backward(g)
    assert x.grad.dtype == dtype
    assert_close(x.grad, (g.float() * keep / 0.7).to(dtype))
    assert launches[KERNEL] == 3


def test_inplace_like_torch(backend, launches):
    a = (torch.rand(9, 33, device=DEVICE) + 0.5).requires_grad_(True)
    h = a * 1.0
    torch.manual_seed(8)
    out = dropout(h, 0.5, inplace=True)
    assert out is h
    torch.manual_seed(8)
    ref = dropout(a.detach() * 1.0, 0.5)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(a.grad, (ref != 0) * 2.0)
    h2 = a.detach().clone()
    assert Dropout(0.5, inplace=True)(h2) is h2
    h4 = h2.reshape(1, 9, 3, 11)
    assert Dropout2d(0.5, inplace=True)(h4) is h4
    _expect_launches(launches, backend, 5)  # h fwd, ref fwd, h bwd, two modules


def test_inplace_on_leaf_requiring_grad_raises_like_torch(backend, launches):
    a = torch.rand(9, 33, device=DEVICE, requires_grad=True)
    for fn in (F.dropout, dropout):
        with pytest.raises(RuntimeError, match="a leaf Variable that requires grad"):
            fn(a, 0.5, inplace=True)
        with pytest.raises(RuntimeError, match="a view of a leaf Variable"):
            fn(a[:3], 0.5, inplace=True)
    assert launches.total == 0
    with torch.no_grad():
        before = a.detach().clone()
        assert dropout(a, 0.5, inplace=True) is a
    keep = a.detach() != 0
    torch.testing.assert_close(a.detach(), before * keep * 2.0)


# ---------------------------------------------------------------- Dropout2d


def test_dropout2d_drops_whole_channels(backend, launches):
    x = (torch.rand(4, 16, 5, 7, device=DEVICE) + 0.5).requires_grad_(True)
    torch.manual_seed(9)
    y = Dropout2d(0.5)(x)
    nz = (y.detach() != 0).flatten(2)
    kept = nz.all(-1)
    assert (kept | ~nz.any(-1)).all()  # every channel is all kept or all dropped
    assert 0 < kept.sum() < 64
    mask = kept[..., None, None].float()
    assert_close(y, x * mask * 2.0)
    y.backward(torch.ones_like(y))
    assert_close(x.grad, mask.expand_as(x) * 2.0)
    _expect_launches(launches, backend, 2)


def test_dropout2d_keep_rate_and_channels_last(triton_backend):
    x = torch.ones(50, 80, 3, 2, device=DEVICE)
    torch.manual_seed(10)
    y = dropout2d(x, 0.3)
    rate = (y[:, :, 0, 0] != 0).double().mean().item()
    assert abs(rate - 0.7) < 0.03
    torch.manual_seed(10)
    ycl = dropout2d(x.to(memory_format=torch.channels_last), 0.3)
    torch.testing.assert_close(ycl, y, rtol=0, atol=0)  # the mask follows the logical index


def test_dropout2d_3d_2d_1d_inputs_like_torch(backend):
    x3 = torch.rand(6, 40, 9, device=DEVICE) + 0.5
    for fn in (F.dropout2d, dropout2d):
        with pytest.warns(UserWarning, match="3D input to dropout2d"):
            y = fn(x3, 0.5)
        nz = y != 0
        assert (nz.all(-1) | ~nz.any(-1)).all()  # [N, C, L]: one decision per (n, c)
        x2 = torch.rand(64, 40, device=DEVICE) + 0.5
        with pytest.warns(UserWarning, match="2-D input to dropout2d"):
            y2 = fn(x2, 0.5)
        assert 0.3 < (y2 != 0).float().mean() < 0.7  # elementwise
        x1 = torch.ones(5, device=DEVICE)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(RuntimeError, match="at least 2 dimensions"):
                fn(x1, 0.5)


# ---------------------------------------------------------------- gradcheck, modules, compile


def test_gradcheck_float64_triton_path(triton_backend, launches):
    x = torch.randn(3, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    f = lambda t: dropout(t, 0.4, generator=_gen(0))  # the same mask on every call
    assert torch.autograd.gradcheck(f, (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(
        f, (x[:2, :3].detach().requires_grad_(True),), fast_mode=True
    )
    assert launches[KERNEL] > 0


def test_modules_are_drop_in():
    for cls, torch_cls in [(Dropout, torch.nn.Dropout), (Dropout2d, torch.nn.Dropout2d)]:
        m, t = cls(0.3, inplace=True), torch_cls(0.3, inplace=True)
        assert isinstance(m, torch_cls)
        assert repr(m) == repr(t) and m.p == 0.3 and m.inplace
        assert dict(m.state_dict()) == {}
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4), Dropout(0.5))
    mlp.eval()
    x = torch.randn(3, 4)
    torch.testing.assert_close(mlp(x), mlp[0](x))


def test_torch_compile_fullgraph(triton_backend, launches):
    def f(t):
        return dropout(t, 0.5).sum()

    x = torch.rand(7, 33, device=DEVICE, requires_grad=True)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.manual_seed(12)
    compiled(x).backward()
    g = x.grad
    x.grad = None
    torch.manual_seed(12)
    f(x).backward()
    torch.testing.assert_close(g, x.grad, rtol=0, atol=0)
    assert launches[KERNEL] == 4


def test_torch_backend_is_torchs_own_dropout():
    x = torch.ones(4, 4, device=DEVICE)
    with fusedmlp.use_backend("torch"):
        torch.manual_seed(0)
        a = dropout(x, 0.5)
    torch.manual_seed(0)
    b = F.dropout(x, 0.5)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # torch path = torch's dropout itself


# ------------------------------------------------------------ argument checks as torch's (probe)


@pytest.mark.parametrize("training", [1, 0, None, np.bool_(True), torch.tensor(True)])
def test_training_must_be_a_bool_as_torch(triton_backend, launches, training):
    # torch's argument parser refuses anything but a bool for ``train``, whatever p is
    x = torch.randn(4, 6, device=DEVICE)
    for p in (0.5, 0.0):
        for fn in (F.dropout, dropout):
            with pytest.raises(TypeError, match="train"):
                fn(x, p, training)
    for fn in (F.dropout2d, dropout2d):
        with pytest.raises(TypeError, match="train"):
            fn(x.view(1, 2, 2, 6), 0.5, training)
    assert launches.total == 0


@pytest.mark.parametrize(
    "p, error",
    [
        (torch.tensor([0.3]), TypeError),  # not 0-d: the parser refuses it
        (torch.tensor(0.3, requires_grad=True), TypeError),
        (torch.tensor([0.3, 0.2]), RuntimeError),  # torch's ``p < 0.0`` test is ambiguous
        (torch.tensor([]), RuntimeError),
        (torch.tensor([1.5]), ValueError),
    ],
)
def test_tensor_p_refused_as_torch(triton_backend, launches, p, error):
    x = torch.randn(4, 6, device=DEVICE)
    for fn in (F.dropout, dropout):
        with pytest.raises(error):
            fn(x, p)
    assert launches.total == 0


def test_tensor_p_0d_taken_and_range_checked_before_input(triton_backend, launches):
    x = torch.randn(8, 16, device=DEVICE)
    y = dropout(x, torch.tensor(0.25, device=DEVICE))
    keep = y != 0
    assert_close(y, torch.where(keep, x / 0.75, 0))
    assert launches.total > 0
    for fn in (F.dropout, dropout):  # torch's range test runs before its argument parser
        with pytest.raises(ValueError):
            fn([1.0, 2.0], 2.0)
    for fn in (F.dropout2d, dropout2d):  # and dropout2d reads input.dim() next
        with pytest.raises(AttributeError):
            fn([1.0, 2.0], 0.5)


# ------------------------------------------------------------ bug sweep against torch (regressions)


@pytest.mark.parametrize("p", [0.04, 0.09, 0.42])
def test_float32_scale_is_torchs(backend, launches, p):
    # torch's fp32 dropout scales by 1 / float32(1 - p) (a float32 reciprocal of the keep
    # probability), which is 1 ulp from float32(1 / (1 - p)) at these p: every kept element was
    # 1 ulp off torch's. Its gradient: the forward's noise on the CPU; on CUDA its
    # native_dropout_backward's float32(1 / (1 - p)), 1 ulp from its own forward's scale. The
    # kept values and the gradient are torch's exactly, on each device.
    x = (torch.rand(8, 16, device=DEVICE) + 0.5).requires_grad_(True)
    torch_scale, grad_scale = _scales_as_torchs(dropout, F.dropout, x, p)
    assert torch_scale != torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)  # the trap
    assert (grad_scale == torch_scale) == (DEVICE == "cpu")
    _expect_launches(launches, backend, 2)


def _scales_as_torchs(ours, theirs, x, p):
    """``ours(x, p)`` (a dropout) and its gradient of ones against torch's ``theirs``: the kept
    values are ``x`` times torch's forward scale, the gradient is torch's exactly (0 or its
    gradient scale). Returns torch's (forward scale, gradient scale)."""
    torch_scale = F.dropout(torch.ones(256, device=DEVICE), p).max()  # read from its output
    y = ours(x, p)
    kept = y.detach() != 0
    assert 0 < kept.sum() < x.numel()
    assert torch.equal(y.detach(), torch.where(kept, x.detach() * torch_scale, 0.0))
    y.backward(torch.ones_like(y))
    xt = x.detach().clone().requires_grad_(True)
    theirs(xt, p).backward(torch.ones_like(xt))  # torch's gradient: 0 or its scale
    grad_scale = xt.grad.max()
    assert set(xt.grad.unique().tolist()) == {0.0, grad_scale.item()}
    assert torch.equal(x.grad, torch.where(kept, grad_scale, 0.0))
    return torch_scale, grad_scale


def _cuda_scales(monkeypatch):
    """``scale_arg`` choosing the scales a CUDA device gets, on whatever device this runs."""
    original = K.scale_arg

    def cuda_scale_arg(p, dtype, **kw):
        return original(p, dtype, **{**kw, "device": torch.device("cuda")})

    monkeypatch.setattr(K, "scale_arg", cuda_scale_arg)


@pytest.mark.filterwarnings("ignore:dropout2d")  # torch's, for a 2-D input
@pytest.mark.parametrize("shape", [(8, 32, 3, 2), (8, 32, 1, 1), (8, 32)])
@pytest.mark.parametrize("cuda_rule", [False, True], ids=["device", "cuda-scales"])
@pytest.mark.parametrize("p", [0.04, 0.09, 0.42])
def test_dropout2d_gradient_scale_is_its_forward_scale(
    backend, launches, monkeypatch, p, cuda_rule, shape
):
    # torch's dropout2d (feature_dropout) multiplies by its noise, 1 / float32(1 - p), in its
    # forward and backward alike, on every device: only elementwise dropout's CUDA backward
    # (native_dropout_backward) scales by float32(1 / (1 - p)), 1 ulp off at these p. The
    # kernel took that CUDA gradient scale for dropout2d too, and later still where a channel
    # is one element ([N, C], [N, C, 1, 1]: the kernel's elementwise indexing).
    if cuda_rule:
        _cuda_scales(monkeypatch)
    torch.manual_seed(0)  # 256 channels: some dropped, some kept
    x = (torch.rand(shape, device=DEVICE) + 0.5).requires_grad_(True)
    torch_scale, grad_scale = _scales_as_torchs(dropout2d, F.dropout2d, x, p)
    assert grad_scale == torch_scale
    _expect_launches(launches, backend, 2)


@pytest.mark.filterwarnings("ignore:dropout2d")
@pytest.mark.parametrize("shape", [(8, 32, 3, 2), (8, 32)])
@pytest.mark.parametrize("cuda_rule", [False, True], ids=["device", "cuda-scales"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_dropout2d_16bit_scales_by_torchs_noise_in_its_dtype(
    backend, launches, monkeypatch, dtype, cuda_rule, shape
):
    # torch's dropout2d multiplies by a noise tensor of the data's dtype, 1 / float32(1 - p)
    # rounded to fp16/bf16, in forward and backward, on every device; the kernel multiplied by
    # the fp32 scale: kept values up to 1 ulp of the dtype off (bf16, p = 0.1, x = 1.75: torch
    # 1.9375, the kernel 1.9453125).
    if cuda_rule:
        _cuda_scales(monkeypatch)
    p = 0.1
    torch.manual_seed(0)
    x = (torch.rand(shape, device=DEVICE) + 1).to(dtype).requires_grad_(True)
    noise = F.dropout2d(torch.ones(64, 4, 1, 1, device=DEVICE, dtype=dtype), p).max()
    y = dropout2d(x, p)
    kept = y.detach() != 0
    assert 0 < kept.sum() < x.numel()
    # torch's product x * noise: in fp32, rounded once (as the kernels round, cast_as_kernels)
    cast = cast_as_kernels if backend == "triton" else torch.Tensor.to
    expected = torch.where(kept, cast(x.detach().float() * noise.float(), dtype), 0)
    if backend == "torch" or ON_GPU:
        assert torch.equal(expected, torch.where(kept, x.detach() * noise, 0))
    assert torch.equal(y.detach(), expected)
    g = torch.rand_like(x) + 1
    y.backward(g)
    assert torch.equal(x.grad, torch.where(kept, cast(g.float() * noise.float(), dtype), 0))
    xt = x.detach().clone().requires_grad_(True)  # torch's gradient is the same rule
    F.dropout2d(xt, p).backward(torch.ones_like(xt))
    assert set(xt.grad.unique().tolist()) == {0.0, noise.item()}
    fp32_scale = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(1.0 - p).float()
    fp32_scaled = torch.where(kept, cast(x.detach().float() * fp32_scale, dtype), 0)
    assert not torch.equal(fp32_scaled, expected)  # the trap: the fp32 scale differs somewhere
    _expect_launches(launches, backend, 2)


class _Float:
    def __float__(self):
        return 0.5

    def __lt__(self, other):
        return False

    __gt__ = __lt__


def _raised(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - the error itself is compared
            return type(e), str(e)
    return None


@pytest.mark.parametrize(
    "p",
    [
        Fraction(1, 2),  # a numbers.Real that torch's parser refuses: it was taken
        Decimal("0.5"),
        np.array(0.5),  # a 0-d array is no numpy scalar
        _Float(),
    ],
    ids=["Fraction", "Decimal", "ndarray", "__float__"],
)
def test_p_types_torchs_parser_refuses(backend, launches, p):
    x = torch.ones(2, 3, 4, device=DEVICE)
    for ours, theirs in [(dropout, F.dropout), (dropout2d, F.dropout2d)]:
        expected = _raised(theirs, x, p)
        assert expected is not None and expected[0] is TypeError
        assert _raised(ours, x, p) == expected  # same type, same message
    for ours, theirs in [(Dropout, torch.nn.Dropout), (Dropout2d, torch.nn.Dropout2d)]:
        assert _raised(ours(p), x) == _raised(theirs(p), x)
    assert launches.total == 0


@pytest.mark.parametrize("p", [np.float32(0.5), np.int64(1), np.bool_(False), True])
def test_p_numpy_and_bool_scalars_taken_as_torch(backend, p):
    x = torch.ones(4, 8, device=DEVICE)
    for ours, theirs in [(dropout, F.dropout), (dropout2d, F.dropout2d)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y, t = ours(x, p), theirs(x, p)
        assert y.shape == t.shape
        assert set(y.unique().tolist()) == set(t.unique().tolist())


@pytest.mark.parametrize(
    "args",
    [
        ([1.0, 2.0], float("nan")),  # the input's type error before p's NaN
        ([1.0, 2.0], torch.tensor([0.3])),  # the input's before p's type
        ([1.0, 2.0], 0.5),
        (None, 0.0),
        ("x", float("nan"), 1),  # the train type error before p's NaN
        ("x", Fraction(1, 2), 1),  # p's type error before train's
        ("x", 0.5, np.bool_(True)),
    ],
)
def test_argument_errors_in_torchs_order_and_words(backend, launches, args):
    # torch's order: its range test, then its argument parser (input, p, train: position
    # order), then its C++ NaN check. The NaN check ran before the parser (a RuntimeError
    # where torch raises a TypeError), and the messages were not torch's.
    args = tuple(torch.ones(3, 4, device=DEVICE) if a == "x" else a for a in args)
    expected = _raised(F.dropout, *args)
    assert expected is not None
    assert _raised(dropout, *args) == expected
    if isinstance(args[0], Tensor):
        x4 = args[0].reshape(1, 3, 2, 2)
        assert _raised(dropout2d, x4, *args[1:]) == _raised(F.dropout2d, x4, *args[1:])
    assert launches.total == 0


class _ViewOf(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        return t.view(-1)

    @staticmethod
    def backward(ctx, g):
        return g.view(3, 4)


def _no_grad_view_of_leaf():
    a = torch.rand(3, 4, device=DEVICE, requires_grad=True)
    with torch.no_grad():
        return a[1]


def _no_grad_view():
    a = torch.rand(3, 4, device=DEVICE, requires_grad=True) * 2
    with torch.no_grad():
        return a[1]


def _multi_output_view():
    return (torch.rand(3, 4, device=DEVICE, requires_grad=True) * 2).unbind(0)[1]


def _custom_function_view():
    return _ViewOf.apply(torch.rand(3, 4, device=DEVICE, requires_grad=True) * 2)


def _inference_mode_view():
    a = torch.rand(3, 4, device=DEVICE, requires_grad=True) * 2
    with torch.inference_mode():
        return a[1]


@pytest.mark.parametrize(
    "make",
    [
        _no_grad_view_of_leaf,  # was "a leaf Variable that requires grad ...", not torch's
        _no_grad_view,
        _multi_output_view,  # torch's error, but after the kernel ran
        _custom_function_view,
        _inference_mode_view,
    ],
)
def test_inplace_on_views_torch_refuses_raises_its_error_before_launch(backend, launches, make):
    for fn, theirs in [(dropout, F.dropout), (dropout2d, F.dropout2d)]:
        torch.manual_seed(0)
        ref = make()
        expected = _raised(theirs, ref, 0.5, True, True)
        assert expected is not None and expected[0] is RuntimeError
        torch.manual_seed(0)
        v = make()
        before, version = v.detach().clone(), v._version
        assert _raised(fn, v, 0.5, True, True) == expected
        assert v._version == version and torch.equal(v.detach(), before)  # untouched
    assert launches.total == 0
