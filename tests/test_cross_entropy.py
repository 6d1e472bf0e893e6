"""fusedmlp cross_entropy / nll_loss / CrossEntropyLoss / NLLLoss against torch's own."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton
from conftest import DEVICE, assert_close

import fusedmlp
from fusedmlp.functional import cross_entropy, nll_loss

KERNEL = "_ce_fwd_kernel"
SCALE = "_ce_scale_kernel"
LOSS = "_ce_loss_kernel"


def _data(n, c, dtype=torch.float32, ignore_index=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=g) * 2).to(dtype)
    t = torch.randint(0, c, (n,), generator=g)
    if ignore_index is not None:
        t[::3] = ignore_index
    w = torch.rand(c, generator=g).to(dtype) + 0.1
    return x.to(DEVICE), t.to(DEVICE), w.to(DEVICE)


def _run(fn, x, t, go, **kw):
    x = x.detach().clone().requires_grad_()
    loss = fn(x, t, **kw)
    loss.backward(go)
    return loss.detach(), x.grad


def _grad_output(reduction, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    if reduction == "none":
        return torch.randn(n, generator=g).to(DEVICE)
    return torch.tensor(0.7).to(DEVICE)


def _expect_launches(launches, backend, fwd=1, scale=1):
    if backend == "triton":
        assert launches[KERNEL] == fwd and launches[SCALE] == scale, dict(launches)
    else:
        assert launches.total == 0, dict(launches)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-100, 2])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("weighted", [False, True])
def test_grid_matches_torch(backend, launches, reduction, ignore_index, label_smoothing, weighted):
    n, c = 7, 70  # 70 classes: two chunks under the interpreter
    x, t, w = _data(n, c, ignore_index=ignore_index if ignore_index != -100 else None)
    kw = dict(
        weight=w if weighted else None,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    go = _grad_output(reduction, n)
    loss, grad = _run(cross_entropy, x, t, go, **kw)
    _expect_launches(launches, backend)
    if backend == "triton":  # 'mean' and 'sum': the sum and division in one launch
        assert launches[LOSS] == (reduction != "none"), dict(launches)
    ref_loss, ref_grad = _run(F.cross_entropy, x, t, go, **kw)
    assert loss.dtype == ref_loss.dtype and loss.shape == ref_loss.shape
    assert_close(loss, ref_loss)
    assert_close(grad, ref_grad)


@pytest.mark.parametrize("pipeline", [True, False])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("weighted", [False, True])
def test_both_first_passes_match_torch(triton_backend, monkeypatch, pipeline, label_smoothing,
                                       weighted):  # fmt: skip
    # The first pass's two forms (PIPELINE: the next chunk loaded ahead, sums per lane; the
    # plain loop), each of which a GPU's autotuner may pick: rows of 1, 5 and 6 chunks of 64,
    # ignored rows, logits rising (odd rows: falling) by 3 over the row, so that the running
    # max moves between chunks while every chunk still weighs in the sums
    from fusedmlp.kernels import cross_entropy as K

    monkeypatch.setattr(
        K, "_FWD_INTERPRET", triton.Config({"BLOCK_C": 64, "PIPELINE": pipeline}, num_warps=4)
    )
    for c in (50, 300, 384):
        x, t, w = _data(6, c, ignore_index=3)
        ramp = torch.linspace(0, 3, c, device=DEVICE)
        x[0::2] += ramp
        x[1::2] += ramp.flip(0)
        kw = dict(weight=w if weighted else None, ignore_index=3, label_smoothing=label_smoothing)
        go = _grad_output("none", 6)
        loss, grad = _run(cross_entropy, x, t, go, reduction="none", **kw)
        ref_loss, ref_grad = _run(F.cross_entropy, x, t, go, reduction="none", **kw)
        assert_close(loss, ref_loss)
        assert_close(grad, ref_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n", [256, 257])
def test_loss_reduction_on_one_program_or_torch(triton_backend, launches, dtype, reduction, n):
    # Up to loss_on_one_program's size (256 rows on CPU, 65,536 on a GPU) one launch sums the
    # row losses and divides; beyond it torch's sum and division. Both are torch's loss, and
    # the gradient's factor (fp16 'mean': 1/N, applied in the backward) is the same.
    from fusedmlp.kernels.cross_entropy import loss_on_one_program

    x, t, w = _data(n, 5, dtype=dtype, ignore_index=3)
    for kw in (dict(), dict(ignore_index=3, weight=w)):  # N on the host / on the device
        launches.clear()
        go = torch.tensor(0.5, device=DEVICE, dtype=dtype)
        loss, grad = _run(cross_entropy, x, t, go, reduction=reduction, **kw)
        assert launches[LOSS] == loss_on_one_program(n, x.device), dict(launches)
        ref_kw = {**kw, "weight": w.float()} if "weight" in kw else kw
        ref_loss, ref_grad = _run(F.cross_entropy, x.float(), t, go.float(), reduction=reduction,
                                  **ref_kw)  # fmt: skip
        assert loss.dtype == dtype and loss.shape == ()
        assert_close(loss, ref_loss.to(dtype), dtype=dtype)
        assert_close(grad, ref_grad.to(dtype), dtype=dtype)


@pytest.mark.parametrize("c", [1, 2, 7, 64, 65, 200])
def test_num_classes_and_chunks(triton_backend, launches, c):
    x, t, w = _data(5, c, ignore_index=-100)
    kw = dict(weight=w, label_smoothing=0.1)
    go = torch.tensor(1.0, device=DEVICE)  # multiplier 1: the in-place backward skips every row
    loss, grad = _run(cross_entropy, x, t, go, **kw)
    assert launches[KERNEL] == 1 and launches[SCALE] == 1
    ref_loss, ref_grad = _run(F.cross_entropy, x, t, go, **kw)
    assert_close(loss, ref_loss)
    assert_close(grad, ref_grad)


def test_262144_classes(triton_backend, monkeypatch):
    from fusedmlp.kernels import cross_entropy as K

    # a realistic chunk (4096 classes, 64 chunks per row) keeps the interpreter fast
    monkeypatch.setattr(
        K, "_FWD_INTERPRET", triton.Config({"BLOCK_C": 4096, "PIPELINE": True}, num_warps=8)
    )
    monkeypatch.setattr(K, "_SCALE_INTERPRET", triton.Config({"BLOCK": 4096}, num_warps=8))
    x, t, w = _data(2, 262_144, ignore_index=None)
    t[1] = 262_143
    go = torch.tensor(3.0, device=DEVICE)
    loss, grad = _run(cross_entropy, x, t, go, label_smoothing=0.05)
    ref_loss, ref_grad = _run(F.cross_entropy, x, t, go, label_smoothing=0.05)
    assert_close(loss, ref_loss)
    assert_close(grad, ref_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_all_ignored_batch(backend, reduction, weighted, dtype):
    # fp16 'mean' keeps 1/sum(w[y]) (infinite here) out of the saved gradient until the backward:
    # the ignored rows must stay 0 there too (found by a wider run of test_fuzz.py).
    x, t, w = _data(4, 9, dtype=dtype)
    t.fill_(-100)
    kw = dict(weight=w if weighted else None, reduction=reduction, label_smoothing=0.1)
    go = _grad_output(reduction, 4)
    loss, grad = _run(cross_entropy, x, t, go, **kw)
    ref_loss, ref_grad = _run(F.cross_entropy, x, t, go, **kw)
    if reduction == "mean":
        assert torch.isnan(loss) and torch.isnan(ref_loss)
    torch.testing.assert_close(loss, ref_loss, equal_nan=True)
    assert torch.equal(grad, torch.zeros_like(grad)) and torch.equal(ref_grad, grad)


@pytest.mark.parametrize("retain_graph", [False, True], ids=["in_place", "new_buffer"])
def test_ignored_rows_stay_zero_under_a_nan_grad_output(backend, launches, retain_graph):
    # torch never scales an ignored row: a NaN grad_output leaves it at 0.
    x, t, _ = _data(6, 11, ignore_index=-100)
    go = torch.randn(6).to(DEVICE)
    go[t == -100] = float("nan")
    go[1] = float("nan")  # a row that is not ignored: NaN, as torch
    grads = []
    for fn in (cross_entropy, F.cross_entropy):
        xx = x.detach().clone().requires_grad_()
        fn(xx, t, reduction="none").backward(go, retain_graph=retain_graph)
        grads.append(xx.grad)
    grad, ref = grads
    assert torch.equal(grad[t == -100], torch.zeros_like(grad[t == -100]))
    torch.testing.assert_close(grad, ref, equal_nan=True)
    _expect_launches(launches, backend)


def _nan_inf_equal(ours, ref):
    """Same values, with NaN and +-inf in the same places."""
    assert torch.equal(ours.isnan(), ref.isnan()), (ours, ref)
    assert torch.equal(ours.isposinf(), ref.isposinf()) and torch.equal(
        ours.isneginf(), ref.isneginf()
    )
    torch.testing.assert_close(ours, ref, equal_nan=True)


@pytest.mark.parametrize("retain_graph", [False, True], ids=["in_place", "new_buffer"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_ignored_rows_with_non_finite_logits_like_torch(
    triton_backend, launches, retain_graph, reduction, label_smoothing
):
    # torch differentiates an ignored row through log_softmax too: 0 * exp(log_softmax(x)),
    # NaN over the row where its log-softmax is NaN (a NaN or +inf logit, all -inf); 0 else.
    inf, nan = float("inf"), float("nan")
    x = torch.randn(6, 70, generator=torch.Generator().manual_seed(0))  # two chunks a row
    x[0, 3], x[1, 66], x[2, 5], x[3] = inf, nan, -inf, -inf
    t = torch.tensor([-100, -100, -100, -100, 4, -100])
    x, t = x.to(DEVICE), t.to(DEVICE)
    go = _grad_output(reduction, 6)
    grads = []
    for fn in (cross_entropy, F.cross_entropy):
        xx = x.detach().clone().requires_grad_()
        loss = fn(xx, t, reduction=reduction, label_smoothing=label_smoothing)
        loss.backward(go, retain_graph=retain_graph)
        grads.append((loss.detach(), xx.grad))
    (loss, grad), (ref_loss, ref_grad) = grads
    assert grad[[0, 1, 3]].isnan().all() and not grad[[2, 4, 5]].isnan().any()
    _nan_inf_equal(loss, ref_loss)
    _nan_inf_equal(grad, ref_grad)
    assert launches[KERNEL] == 1 and launches[SCALE] == 1, dict(launches)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_non_finite_class_weights_like_torch(triton_backend, launches, label_smoothing):
    # With label smoothing every class weight enters the loss: an infinite one (here at a row's
    # max, past the first chunk) makes it inf, not the NaN of inf * 0 in the running sums; the
    # masked smoothing term sends 0 * w[c] back into an ignored row: NaN there, as torch's.
    inf, nan = float("inf"), float("nan")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 150, generator=g)
    x[1, 100] = 10.0
    x = x.to(DEVICE)
    t = torch.tensor([3, 7, 120, -100]).to(DEVICE)
    for col, value in ((100, inf), (5, -inf), (3, nan)):
        w = torch.rand(150, generator=g).add(0.5)
        w[col] = value
        kw = dict(weight=w.to(DEVICE), label_smoothing=label_smoothing, reduction="none")
        go = torch.ones(4, device=DEVICE)
        loss, grad = _run(cross_entropy, x, t, go, **kw)
        ref_loss, ref_grad = _run(F.cross_entropy, x, t, go, **kw)
        _nan_inf_equal(loss, ref_loss)
        _nan_inf_equal(grad, ref_grad)
        with torch.no_grad():
            _nan_inf_equal(cross_entropy(x, t, **kw), ref_loss)
    assert launches[KERNEL] == 3 * 2 and launches[SCALE] == 3, dict(launches)


@pytest.mark.parametrize("retain_graph", [False, True], ids=["in_place", "new_buffer"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_infinite_grad_output_like_torch(triton_backend, launches, retain_graph, label_smoothing):
    # torch's log_softmax backward forms g - p * sum(g): inf - inf (NaN) at the target's column
    # for an infinite grad_output, and at every column with label smoothing.
    inf = float("inf")
    x, t, w = _data(5, 9, ignore_index=-100)
    kw = dict(weight=w, label_smoothing=label_smoothing)
    cases = [("sum", torch.tensor(inf)), ("mean", torch.tensor(-inf))]
    cases.append(("none", torch.tensor([inf, -inf, 1.0, inf, 0.5])))
    for reduction, go in cases:
        grads = []
        for fn in (cross_entropy, F.cross_entropy):
            xx = x.detach().clone().requires_grad_()
            fn(xx, t, reduction=reduction, **kw).backward(go.to(DEVICE), retain_graph=retain_graph)
            grads.append(xx.grad)
        _nan_inf_equal(*grads)
        # the batched path (vmap over the backward) scales with torch's ops: the same NaNs
        xx = x.detach().clone().requires_grad_()
        loss = cross_entropy(xx, t, reduction=reduction, **kw)
        gos = torch.stack([go, torch.ones_like(go)]).to(DEVICE)
        (batched,) = torch.autograd.grad(loss, xx, gos, is_grads_batched=True)
        _nan_inf_equal(batched[0], grads[1])
    assert launches[KERNEL] == 6 and launches[SCALE] == 3, dict(launches)


def test_logits_feed_a_second_loss_term(backend, launches):
    g = torch.Generator().manual_seed(3)
    inp = torch.randn(6, 5, generator=g).to(DEVICE)
    lin = torch.randn(40, 5, generator=g).to(DEVICE)
    t = torch.randint(0, 40, (6,), generator=g).to(DEVICE)

    def run(fn):
        a = inp.clone().requires_grad_()
        logits = a @ lin.t()  # the matmul saved `a`; the second term saves `logits`
        before = logits.detach().clone()
        loss = fn(logits, t, label_smoothing=0.1) + 0.5 * (logits**2).mean()
        loss.backward(retain_graph=True)
        first = a.grad.clone()
        loss.backward()  # the retained graph: the saved gradient buffer must be intact
        assert torch.equal(logits.detach(), before)  # the caller's logits were not written
        return loss.detach(), first, a.grad

    loss, g1, g2 = run(cross_entropy)
    if backend == "triton":
        assert launches[KERNEL] == 1 and launches[SCALE] == 2
    ref_loss, r1, r2 = run(F.cross_entropy)
    assert_close(loss, ref_loss)
    assert_close(g1, r1)
    assert_close(g2, r2)


def test_ignore_index_types_as_torch(backend, launches):
    # torch takes any integer (numpy's, a 0-d integer tensor) and refuses a float or a bool
    x, t, _ = _data(6, 5)
    t[2] = 3
    for ignore_index in (np.int64(3), torch.tensor(3)):
        got = cross_entropy(x, t, ignore_index=ignore_index)
        assert_close(got, F.cross_entropy(x, t, ignore_index=ignore_index))
    for bad in (2.7, 3.0, True):
        with pytest.raises(TypeError, match="ignore_index"):
            F.cross_entropy(x, t, ignore_index=bad)
        with pytest.raises(TypeError, match="ignore_index"):
            cross_entropy(x, t, ignore_index=bad)


def test_ignore_index_torch_refuses_raises_before_any_launch(backend, launches):
    # An ignore_index beyond int64 (torch: ValueError, "Overflow when unpacking long long"; the
    # kernel took 2**63 as a wrapped value and returned a loss) and a 0-d bool or complex tensor
    # (torch: RuntimeError, TypeError; the kernel took them as 1): torch's error, no launch.
    x, t, _ = _data(6, 5)
    t[2] = 1
    for bad in (1 << 63, 1 << 70, -(1 << 63) - 1, torch.tensor(True), torch.tensor(1 + 0j)):
        with pytest.raises(Exception) as theirs:
            F.cross_entropy(x, t, ignore_index=bad)
        with pytest.raises(Exception) as ours:
            cross_entropy(x, t, ignore_index=bad)
        assert type(ours.value) is type(theirs.value), (bad, ours.value, theirs.value)
    assert launches.total == 0, dict(launches)
    # the int64 extremes themselves are integers torch takes
    for edge in (-(1 << 63), (1 << 63) - 1):
        t[3] = edge
        got = cross_entropy(x, t, ignore_index=edge)
        assert_close(got, F.cross_entropy(x, t, ignore_index=edge))


@pytest.mark.parametrize("smoothing", [0.25, 0.3])
def test_float64_label_smoothing_is_fp64_exact(triton_backend, smoothing):
    # The kernel's smoothing argument is fp32: fp64 logits with smoothing take torch's path,
    # whose loss and gradient are fp64-exact
    x, t, _ = _data(4, 11)
    x = x.double()
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    la = cross_entropy(a, t, label_smoothing=smoothing, reduction="sum")
    lb = F.cross_entropy(b, t, label_smoothing=smoothing, reduction="sum")
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-100, 4], ids=["ignore-outside", "ignore-inside"])
@pytest.mark.parametrize("bad", [9, -1, 100])
def test_out_of_range_targets_raise(backend, launches, bad, ignore_index, reduction):
    x, t, _ = _data(5, 9)
    t[3] = bad
    t[1] = ignore_index  # an ignored row beside the bad one
    with pytest.raises(IndexError):  # torch's own error (on CUDA torch device-asserts instead)
        F.cross_entropy(x.cpu(), t.cpu(), ignore_index=ignore_index, reduction=reduction)
    if backend == "torch" and x.is_cuda:
        # The fallback is torch's cross_entropy, whose CUDA kernel device-asserts (and poisons
        # the CUDA context): the torch backend's IndexError is checked on CPU tensors.
        x, t = x.cpu(), t.cpu()
    with pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
        cross_entropy(x, t, ignore_index=ignore_index, reduction=reduction)
    # from the target check's counts (the results queued with them are dropped): made by the
    # loss's one-program reduction where there is one, else by a launch of the check's own
    triton = backend == "triton"
    reduced = reduction != "none"
    assert launches[LOSS] == (triton and reduced), dict(launches)
    assert launches["_ce_check_kernel"] == (triton and not reduced), dict(launches)
    t[1] = 0
    # the same value as ignore_index is fine
    torch.testing.assert_close(
        cross_entropy(x, t, ignore_index=bad), F.cross_entropy(x, t, ignore_index=bad)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_mean_normaliser_read_off_the_target_check(
    triton_backend, launches, monkeypatch, dtype, smoothing
):
    # 'mean' with no class weight and no ignored row: the normaliser N comes from the target
    # check's synchronisation (its 1/N a kernel argument, no launch); bit for bit the device-computed
    # one (taken here with the check off, or with an ignored row present) and torch's value.
    from fusedmlp.autograd import cross_entropy as A

    monkeypatch.setattr(A, "_NO_IGNORED_LAST", [True])  # as after a forward without ignored rows
    x, t, _ = _data(13, 7)
    x = x.to(dtype)

    def run():
        logits = x.detach().clone().requires_grad_(True)
        loss = cross_entropy(logits, t, label_smoothing=smoothing)
        loss.backward()
        return loss, logits.grad

    loss, grad = run()
    n_fast = launches.total
    # the targets counted by the loss's reduction: no launch of the check's own
    assert launches["_ce_check_kernel"] == 0 and launches[LOSS] == 1
    monkeypatch.setattr(A, "CHECK_TARGETS", False)  # the normaliser computed on the device
    slow_loss, slow_grad = run()
    assert torch.equal(loss, slow_loss) and torch.equal(grad, slow_grad)
    # the same kernels (the normaliser's small ops are torch's)
    assert launches["_ce_check_kernel"] == 0 and n_fast == launches.total - n_fast
    ref = x.float().detach().requires_grad_(True)
    F.cross_entropy(ref, t, label_smoothing=smoothing).backward()
    assert_close(
        loss.float(), F.cross_entropy(x.float(), t, label_smoothing=smoothing), dtype=dtype
    )
    assert_close(grad.float(), ref.grad, dtype=dtype)
    # an ignored row: the device normaliser (N - 1 valid rows), still torch's result
    monkeypatch.setattr(A, "CHECK_TARGETS", True)
    t2 = t.clone()
    t2[4] = -100
    got = cross_entropy(x.float(), t2, label_smoothing=smoothing)
    assert_close(got, F.cross_entropy(x.float(), t2, label_smoothing=smoothing))


def test_mean_normaliser_guessed_before_the_counts_arrive(triton_backend, launches, monkeypatch):
    # The loss kernels are queued before the target check's counts reach the host: a 'mean'
    # takes the host's 1/N when the last one had no ignored row. A batch with ignored rows
    # after it launches the loss kernel again with the device normaliser; the next batch
    # without ignored rows then takes the device normaliser (the same bits) and the guess
    # returns after it. Every result is torch's.
    from fusedmlp.autograd import cross_entropy as A

    monkeypatch.setattr(A, "_NO_IGNORED_LAST", [True])
    x, t, _ = _data(13, 7)
    t_ignored = t.clone()
    t_ignored[[2, 9]] = -100
    results = []
    for target, kernels, guess_after in (
        (t, 1, True),  # guessed right
        (t_ignored, 2, False),  # guessed wrong: launched again
        (t_ignored, 1, False),  # the device normaliser from the start
        (t, 1, True),  # the device normaliser, then the guess is back
        (t, 1, True),
    ):
        launches.clear()
        logits = x.detach().clone().requires_grad_(True)
        loss = cross_entropy(logits, target)
        loss.backward()
        assert launches[KERNEL] == kernels and launches[LOSS] == kernels
        assert launches["_ce_check_kernel"] == 0  # the loss's reduction counts the targets
        assert A._NO_IGNORED_LAST[0] is guess_after
        ref = x.detach().clone().requires_grad_(True)
        ref_loss = F.cross_entropy(ref, target)
        ref_loss.backward()
        assert_close(loss, ref_loss)
        assert_close(logits.grad, ref.grad)
        results.append((loss, logits.grad))
    for a, b in zip(results[0], results[3]):  # the host's 1/N and the device normaliser
        assert torch.equal(a, b)
    for a, b in zip(results[1], results[2]):
        assert torch.equal(a, b)
    # an out-of-range target raises also when the kernels were queued on a guess
    bad = t.clone()
    bad[5] = 7
    with pytest.raises(IndexError, match="Target 7 is out of bounds"):
        cross_entropy(x, bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_half_precision(triton_backend, launches, dtype, reduction):
    x, t, w = _data(9, 70, dtype=dtype, ignore_index=1)
    kw = dict(weight=w, ignore_index=1, reduction=reduction, label_smoothing=0.1)
    # a large loss scale, as GradScaler applies
    go = _grad_output(reduction, 9) * 1024
    loss, grad = _run(cross_entropy, x, t, go.to(dtype), **kw)
    assert launches[KERNEL] == 1
    assert loss.dtype == dtype and grad.dtype == dtype
    ref_loss, ref_grad = _run(F.cross_entropy, x.float(), t, go, **{**kw, "weight": w.float()})
    assert_close(loss, ref_loss.to(dtype))
    assert_close(grad, ref_grad.to(dtype), scale=1024 if reduction == "none" else 100)


def test_noncontiguous_unbatched_and_no_grad(backend, launches):
    x, t, w = _data(8, 33)
    xt = x.t().contiguous().t()  # column-major logits
    assert not xt.is_contiguous()
    go = torch.tensor(2.0, device=DEVICE)
    loss, grad = _run(cross_entropy, xt, t, go, weight=w)
    ref_loss, ref_grad = _run(F.cross_entropy, x, t, go, weight=w)
    assert_close(loss, ref_loss)
    assert_close(grad, ref_grad)
    # unbatched [C] logits with a 0-d target
    for reduction in ("mean", "none"):
        assert_close(
            cross_entropy(x[0], t[0], reduction=reduction),
            F.cross_entropy(x[0], t[0], reduction=reduction),
        )
    # logits that do not require grad: the forward alone
    launches.clear()
    with torch.no_grad():
        assert_close(cross_entropy(x, t), F.cross_entropy(x, t))
    _expect_launches(launches, backend, fwd=1, scale=0)


def test_no_gradient_buffer_without_a_graph(triton_backend, monkeypatch):
    from fusedmlp.kernels import cross_entropy as K

    seen = []
    fwd = K.cross_entropy_fwd

    def spy(*args):
        seen.append(args[-1])  # compute_grad
        return fwd(*args)

    monkeypatch.setattr(K, "cross_entropy_fwd", spy)
    x, t, _ = _data(4, 7)
    x.requires_grad_()
    with torch.no_grad():  # logits that require grad, but no graph is recorded
        assert_close(cross_entropy(x, t), F.cross_entropy(x, t))
    cross_entropy(x, t).backward()
    assert seen == [False, True]


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mean_over_rows_that_all_weigh_zero_is_nan_like_torch(
    triton_backend, dtype, label_smoothing
):
    # sum(w[y]) = 0 with rows that are not ignored: torch's 'mean' is 0/0 (NaN) in the loss and
    # the non-ignored rows' gradients, also when label smoothing makes the numerator nonzero.
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).to(DEVICE, dtype)
    t = torch.tensor([0, 0, 1, -100], device=DEVICE)
    w = torch.tensor([0.0, 0.0, 1.0], device=DEVICE, dtype=dtype)
    kw = dict(weight=w, label_smoothing=label_smoothing)
    loss, grad = _run(cross_entropy, x, t, None, **kw)
    ref_loss, ref_grad = _run(F.cross_entropy, x, t, None, **kw)
    torch.testing.assert_close(loss, ref_loss, equal_nan=True)
    torch.testing.assert_close(grad, ref_grad, equal_nan=True)


@pytest.mark.parametrize("offset", [1e3, 1e4, 1e5])
def test_large_logits_keep_full_precision(triton_backend, offset):
    # Against float64: the loss of a logit near 1e4 is of order 1; forming lse = m + log(s)
    # first would keep only ~1e-3 of it in fp32. torch stays within ~1e-6 here, so must we.
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(6, 37, generator=g) + offset).to(DEVICE)
    t = torch.randint(0, 37, (6,), generator=g).to(DEVICE)
    w = torch.rand(37, generator=g).add(0.5).to(DEVICE)
    for kw in (dict(), dict(weight=w, label_smoothing=0.3)):
        loss, grad = _run(cross_entropy, x, t, None, reduction="sum", **kw)
        ref_loss, ref_grad = _run(F.cross_entropy, x.double(), t, None, reduction="sum", **kw64(kw))
        torch.testing.assert_close(loss.double(), ref_loss, rtol=0, atol=2e-5)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=2e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_fp16_logits_spread_past_the_fp16_range(
    triton_backend, launches, reduction, label_smoothing, weighted
):
    # Rows spanning +-60000 in fp16: log-probabilities (x - lse) reach -120000, past fp16's
    # 65504. torch's fp16 cross_entropy stores log_softmax in fp16 (as on a GPU), so those are
    # -inf there and its loss inf (or NaN: 0 * inf under a zero weight) where the exact loss
    # fits fp16 (label smoothing: 6000; weight 0: 0). The kernel computes in fp32 and rounds
    # the loss once, as torch does in float64 before the cast to fp16: compared with that,
    # inf only where the exact value is past 65504. Where torch's fp16 is finite, it agrees.
    x = torch.tensor(
        [
            [60000.0, -60000.0, 0.0, 1.0],
            [-60000.0, 60000.0, 1.0, 0.0],
            [65504.0, -65504.0, 0.0, 0.0],
            [60000.0, 59990.0, -60000.0, 0.0],
            [60000.0, -60000.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, -65504.0],
        ],
        device=DEVICE,
    ).half()
    t = torch.tensor([0, 1, 0, 1, 1, 3], device=DEVICE)
    if reduction != "none":
        t[4:] = -100  # reduced: only the rows whose sum fits fp16
    w = torch.tensor([1.0, 0.5, 2.0, 0.0], device=DEVICE)
    kw = dict(reduction=reduction, label_smoothing=label_smoothing)
    go = _grad_output(reduction, 6)
    loss, grad = _run(cross_entropy, x, t, go.half(), weight=w.half() if weighted else None, **kw)
    assert launches[KERNEL] == 1 and launches[SCALE] == 1, dict(launches)
    assert loss.dtype == grad.dtype == torch.float16
    ref_loss, ref_grad = _run(
        F.cross_entropy,
        x.double(),
        t,
        go.half().double(),
        weight=w.double() if weighted else None,
        **kw,
    )
    for ours, ref in ((loss, ref_loss.half()), (grad, ref_grad.half())):
        torch.testing.assert_close(ours, ref, equal_nan=True, rtol=2e-3, atol=1e-3)
        assert torch.equal(ours.isinf(), ref.isinf())
    assert grad.isfinite().all()
    loss16, grad16 = _run(
        F.cross_entropy, x, t, go.half(), weight=w.half() if weighted else None, **kw
    )
    finite = loss16.isfinite()
    assert_close(loss[finite], loss16[finite])
    assert_close(grad, grad16)
    # 120000 (unweighted) is past fp16; weighted by 0.5 it is 60000 (+4500 of smoothing)
    inf_rows = [False] * 6 if reduction != "none" else [False] * 4 + [not weighted, False]
    assert loss.reshape(-1).isinf().tolist() == inf_rows[: loss.numel()]


def kw64(kw):
    return {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}


def test_uncovered_inputs_go_to_torch(triton_backend, launches):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 4, generator=g).to(DEVICE)  # [N, C, d1]
    t = torch.randint(0, 5, (3, 4), generator=g).to(DEVICE)
    assert_close(
        cross_entropy(x, t, label_smoothing=0.2), F.cross_entropy(x, t, label_smoothing=0.2)
    )
    probs = torch.softmax(torch.randn(3, 5, generator=g), 1).to(DEVICE)
    x2 = x[:, :, 0]
    assert_close(cross_entropy(x2, probs), F.cross_entropy(x2, probs))
    assert launches.total == 0
    with pytest.raises(ValueError):
        cross_entropy(x2, t[:, 0], reduction="avg")
    with pytest.raises(ValueError, match="batch_size"):
        cross_entropy(x2, t[:2, 0])  # batch size mismatch: torch's own error
    assert launches.total == 0


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64_triton(triton_backend, launches, reduction):
    # without label smoothing: fp64 logits with it take torch's path (the kernel's smoothing
    # argument is fp32: test_float64_label_smoothing_is_fp64_exact)
    x, t, w = _data(3, 66, dtype=torch.float64, ignore_index=3)
    x = x.requires_grad_()
    fn = lambda inp: cross_entropy(inp, t, weight=w, ignore_index=3, reduction=reduction)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6, fast_mode=True)
    assert launches[KERNEL] > 0 and launches[SCALE] > 0
    assert_close(fn(x), F.cross_entropy(x, t, weight=w, ignore_index=3, reduction=reduction))


def test_create_graph_backward_with_a_gradient_that_carries_a_graph(triton_backend):
    # loss * loss: the incoming gradient requires grad, so the create_graph backward runs (the
    # saved buffer scaled in place when the graph is not retained) and only a second
    # differentiation raises.
    x, t, _ = _data(3, 5)
    x.requires_grad_()
    loss = cross_entropy(x * 1, t)
    (g,) = torch.autograd.grad(loss * loss, x, create_graph=True, retain_graph=False)
    xr = x.detach().requires_grad_()
    ref_loss = F.cross_entropy(xr * 1, t)
    (ref,) = torch.autograd.grad(ref_loss * ref_loss, xr)
    assert_close(g.detach(), ref)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def test_forward_ad_takes_torchs_path_and_keeps_the_tangent(triton_backend, launches):
    # Inside a forward-AD level the op runs torch's implementation (fusedmlp's Function has
    # no jvp): the tangent is torch's, nothing is launched (backend.use_triton)
    import torch.autograd.forward_ad as fwAD

    x, t, _ = _data(3, 5)
    tangent = torch.randn_like(x)
    with fwAD.dual_level():
        ours = fwAD.unpack_dual(cross_entropy(fwAD.make_dual(x, tangent), t))
        ref = fwAD.unpack_dual(F.cross_entropy(fwAD.make_dual(x, tangent), t))
    assert ours.tangent is not None
    assert_close(ours.primal, ref.primal)
    assert_close(ours.tangent, ref.tangent)
    assert launches.total == 0, dict(launches)


def test_extreme_logits_with_label_smoothing_like_torch(triton_backend):
    # Logits spanning +-3e38: the smoothing sum is kept relative to the running max, so no
    # difference of two logits overflows into inf - inf.
    x = torch.tensor([[3e38, -3e38, 0.0], [-3e38, -3e38, 0.0]], device=DEVICE)
    for t in ([0, 0], [1, 2]):
        tgt = torch.tensor(t, device=DEVICE)
        for w in (None, torch.tensor([1.0, 0.0, 2.0], device=DEVICE)):
            kw = dict(weight=w, label_smoothing=0.1, reduction="none")
            torch.testing.assert_close(
                cross_entropy(x, tgt, **kw), F.cross_entropy(x, tgt, **kw), equal_nan=True
            )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_batched_gradients_like_torch(triton_backend, launches, reduction, dtype):
    # vmap over the backward (autograd.grad(is_grads_batched=True), jacobian(vectorize=True),
    # torch.func.vmap of autograd.grad): a batched grad_output has no storage for a kernel
    # ("Cannot access data pointer"), so the saved gradient is scaled with torch's ops there.
    # An ignored row stays 0 under a NaN multiplier, as torch's.
    from torch.autograd.functional import jacobian

    x, t, w = _data(5, 9, dtype=dtype, ignore_index=-100)
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1)

    def grads(fn):
        xx = x.detach().clone().requires_grad_()
        loss = fn(xx, t, **kw)
        gen = torch.Generator().manual_seed(0)
        go = torch.randn((3, *loss.shape), generator=gen).to(DEVICE, dtype)
        go[2] = float("nan")
        (batched,) = torch.autograd.grad(loss, xx, go, retain_graph=True, is_grads_batched=True)
        vjp = lambda v: torch.autograd.grad(loss, xx, v, retain_graph=True)[0]
        jac = jacobian(lambda a: fn(a, t, **kw), xx.detach(), vectorize=True)
        return batched, torch.func.vmap(vjp)(go), jac

    out = [grads(cross_entropy), grads(F.cross_entropy)]
    # two forwards on the kernel (the loss, the jacobian's), no scaling kernel
    assert launches[KERNEL] == 2 and launches[SCALE] == 0, dict(launches)
    for ours, ref in zip(*out):
        assert_close(ours, ref, equal_nan=True)


def test_gradcheck_batched_grad_float64_triton(triton_backend, launches):
    # gradcheck's batched-gradient check (vmap over autograd.grad) on the Triton path
    x, t, w = _data(3, 7, dtype=torch.float64, ignore_index=-100)
    x = x.requires_grad_()
    fn = lambda inp: cross_entropy(inp, t, weight=w, reduction="none")
    assert torch.autograd.gradcheck(fn, (x,), check_batched_grad=True, fast_mode=True)
    assert launches[KERNEL] > 0 and launches[SCALE] > 0


def test_double_backward_raises(triton_backend):
    # The op saves only its gradient buffer (no tensor that carries the logits' graph), so the
    # create_graph backward itself raises (autograd/_once.py).
    x, t, _ = _data(3, 5)
    x.requires_grad_()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(cross_entropy(x, t), x, create_graph=True)
    # without create_graph: a plain, correct first backward
    (g,) = torch.autograd.grad(cross_entropy(x, t), x)
    (ref,) = torch.autograd.grad(F.cross_entropy(x, t), x)
    torch.testing.assert_close(g, ref)


def test_modules_and_legacy_arguments(backend):
    x, t, w = _data(6, 11, ignore_index=0)
    for kw in (
        dict(),
        dict(weight=w, ignore_index=0, reduction="sum", label_smoothing=0.3),
        dict(size_average=False),
        dict(reduce=False),
    ):
        ours, ref = fusedmlp.nn.CrossEntropyLoss(**kw), torch.nn.CrossEntropyLoss(**kw)
        assert repr(ours) == repr(ref)
        assert ours.state_dict().keys() == ref.state_dict().keys()
        assert_close(ours(x, t), ref(x, t))
        kw.pop("label_smoothing", None)
        lp = torch.log_softmax(x, 1)
        assert_close(fusedmlp.nn.NLLLoss(**kw)(lp, t), torch.nn.NLLLoss(**kw)(lp, t))
        assert_close(nll_loss(lp, t, **kw), F.nll_loss(lp, t, **kw))
    m = fusedmlp.nn.CrossEntropyLoss(weight=w)
    assert "weight" in dict(m.named_buffers()) and torch.equal(m.state_dict()["weight"], w)
    assert isinstance(m, torch.nn.CrossEntropyLoss)


def test_torch_compile_fullgraph(triton_backend, launches):
    from fusedmlp.functional import log_softmax

    x, t, w = _data(6, 70, ignore_index=2)

    def f(inp):
        loss = cross_entropy(inp, t, weight=w, ignore_index=2, label_smoothing=0.1)
        return loss + log_softmax(inp, 0).mean()

    def ref(inp):
        loss = F.cross_entropy(inp, t, weight=w, ignore_index=2, label_smoothing=0.1)
        return loss + F.log_softmax(inp, 0).mean()

    loss, grad = _run(
        lambda inp, _t: torch.compile(f, backend="aot_eager", fullgraph=True)(inp), x, t, None
    )
    assert launches[KERNEL] == 1 and launches["_softmax_fwd_kernel"] == 1
    ref_loss, ref_grad = _run(lambda inp, _t: ref(inp), x, t, None)
    assert_close(loss, ref_loss)
    assert_close(grad, ref_grad)
    bad = t.clone()
    bad[0] = 70
    with pytest.raises(IndexError):
        torch.compile(lambda inp: cross_entropy(inp, bad), backend="aot_eager", fullgraph=True)(x)


def test_autocast_computes_in_fp32_as_torch(backend, launches):
    x, t, w = _data(5, 70, dtype=torch.bfloat16)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        loss, grad = _run(cross_entropy, x, t, None, weight=w)
        torch_loss, torch_grad = _run(F.cross_entropy, x, t, None, weight=w)
    assert loss.dtype == torch_loss.dtype == torch.float32
    assert grad.dtype == torch_grad.dtype == torch.bfloat16
    # The values are checked against fp32 math on the same bf16 inputs: under CUDA autocast
    # torch's own loss is ~7e-4 off that (seen on an H200: 6.2939 for an exact 6.2982), so it
    # is no reference for "computes in fp32".
    ref_loss, ref_grad = _run(F.cross_entropy, x.float(), t, None, weight=w.float())
    assert_close(loss, ref_loss)
    assert_close(grad, ref_grad.to(torch.bfloat16), dtype=torch.bfloat16)
    assert launches[KERNEL] == (1 if backend == "triton" else 0)


def _strided_targets(n: int, C: int, ignore_index: int):
    """``(targets, [out of range, ignored], generator)``: n int64 targets of stride 2 around
    [0, C), every seventh of the storage ``ignore_index``, both counts nonzero."""
    gen = torch.Generator().manual_seed(n)
    t = torch.randint(-3, C + 3, (2 * n,), generator=gen).to(DEVICE)
    t[::7] = ignore_index
    t = t[::2]
    bad = ((t < 0) | (t >= C)) & (t != ignore_index)
    expected = [int(bad.sum()), int((t == ignore_index).sum())]
    assert expected[0] > 0 and expected[1] > 0
    return t, expected, gen


@pytest.mark.parametrize("n", [7, 100])  # one program / one per block with atomics (CPU: > 32)
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_target_check_counts(triton_backend, launches, n, ignore_index):
    """The target check's kernel against the same counts in torch, over strided targets."""
    from fusedmlp.kernels.cross_entropy import count_bad_targets

    t, expected, _ = _strided_targets(n, 10, ignore_index)
    assert count_bad_targets(t, 10, ignore_index).tolist() == expected
    assert launches["_ce_check_kernel"] == 1


@pytest.mark.parametrize("n", [7, 100])  # one block of the loop / several (CPU: 16 a block)
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_loss_reduction_counts_the_targets(triton_backend, launches, n, ignore_index):
    """The loss's one-program reduction with the target check's counts: the counts equal
    torch's over strided targets, and the loss is the same with or without them."""
    from fusedmlp.kernels.cross_entropy import reduce_loss

    t, expected, gen = _strided_targets(n, 10, ignore_index)
    rows = torch.rand(n, generator=gen).to(DEVICE)
    loss, _, counts = reduce_loss(rows, torch.float32, float(n), None, (t, 10, ignore_index))
    assert counts.tolist() == expected
    plain, _, none = reduce_loss(rows, torch.float32, float(n), None)
    assert none is None and torch.equal(loss, plain)
    torch.testing.assert_close(loss, rows.sum() / n)
    assert launches[LOSS] == 2 and launches["_ce_check_kernel"] == 0
