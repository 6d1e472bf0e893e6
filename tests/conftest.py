"""Shared fixtures: interpreter set-up, backends, devices, tolerances, launch counting.

On a machine without a GPU every Triton kernel runs under Triton's interpreter, which is read
when ``@triton.jit`` runs, so ``TRITON_INTERPRET`` is set here, before anything imports triton.
"""

import os
import shutil
import subprocess
import sys
import zlib

_HAS_GPU = shutil.which("nvidia-smi") is not None and (
    subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
)
if not _HAS_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import collections  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import fusedmlp  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
if not ON_GPU:
    # The tests' tensors are tiny: a second intra-op thread only adds contention on 2 cores.
    torch.set_num_threads(1)

# (rtol, atol) per dtype, against torch's own implementation in the same dtype.
# bf16's is wide also because Triton's interpreter (3.6 and 3.9) rounds fp32 -> bf16 casts
# toward zero (up to 1 ulp, 2^-8 relative; a GPU's cvt.rn rounds to nearest): under the
# interpreter a kernel's bf16 outputs sit up to 2-3 ulps from torch's.
TOLERANCES = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def cast_as_kernels(t, dtype):
    """fp32 ``t`` cast to ``dtype`` as the kernels' stores round it here: to nearest, except
    bf16 under the interpreter, which rounds toward zero (``TOLERANCES``)."""
    if dtype == torch.bfloat16 and not ON_GPU:
        return (t.float().view(torch.int32) & -65536).view(torch.float32).to(dtype)
    return t.to(dtype)


def tol(dtype):
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


def assert_close(actual, expected, dtype=None, scale=1.0, **kw):
    """``torch.testing.assert_close`` with the per-dtype tolerance table (``scale`` widens it)."""
    dtype = dtype or expected.dtype
    rtol, atol = TOLERANCES[dtype]
    kw.setdefault("rtol", rtol * scale)
    kw.setdefault("atol", atol * scale)
    torch.testing.assert_close(actual, expected, **kw)


def assert_step_like(model, ref, x):
    """One training step of ``model`` and its torch twin ``ref`` on ``x``: the outputs, then
    (after ``out.square().sum().backward()``) every parameter's gradient and every buffer
    (running statistics) agree, in ``named_parameters`` / ``named_buffers`` order."""
    outs = [net(x) for net in (model, ref)]
    assert_close(outs[0], outs[1])
    for out in outs:
        out.square().sum().backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        assert_close(p.grad, p_ref.grad, msg=name)
    for (name, b), b_ref in zip(model.named_buffers(), ref.buffers()):
        assert_close(b.double(), b_ref.double(), dtype=torch.float32, msg=name)


def saved_loaded_copied(module):
    """``(loaded, copied, state)``: ``module`` through ``torch.save``/``torch.load`` whole (not
    weights only), its ``copy.deepcopy``, and its ``state_dict`` through ``torch.save`` and
    ``torch.load(weights_only=True)`` (a careful user's checkpoint)."""
    import copy
    import io

    def through_file(obj, **load_kw):
        buf = io.BytesIO()
        torch.save(obj, buf)
        buf.seek(0)
        return torch.load(buf, **load_kw)

    return (
        through_file(module, weights_only=False),
        copy.deepcopy(module),
        through_file(module.state_dict(), weights_only=True),
    )


def assert_within_magnitude(actual, expected, magnitude, unit):
    """Each element of ``actual`` (a sum of products: a GEMM's output, a column sum) within
    ``unit`` times ``magnitude`` (the sum of the products' magnitudes, which bounds the
    summation's rounding) of ``expected`` (its float64 value), plus 1e-6."""
    err = (actual.double() - expected).abs()
    assert (err <= unit * magnitude + 1e-6).all(), (err / magnitude).max().item()


@pytest.fixture(autouse=True)
def _seed(request):
    """Seed torch per test from its id: a test draws the same inputs whatever ran before it (a
    ``-k`` subset, another order, the GPU run's curated list)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _fresh_ce_guess(monkeypatch):
    """Cross-entropy's guess of the 'mean' normaliser follows the last forward
    (``fusedmlp.autograd.cross_entropy._NO_IGNORED_LAST``): each test starts from a fresh
    process's state, whatever ran before it, so its launch counts do not depend on the order."""
    from fusedmlp.autograd import cross_entropy

    monkeypatch.setattr(cross_entropy, "_NO_IGNORED_LAST", [False])


@pytest.fixture
def interpreter_splits(monkeypatch):
    """The interpreter's split rules on any device, for the split reductions of batch norm
    (statistics, gradient sums) and of a Linear's dW (fused and dz paths, and the TMA kernel's
    K slices): a GPU splits only past 256 rows (batch norm) or from 512 and 1024 rows (dW), so
    that tests of small problems take the splits and their merges there too."""
    from fusedmlp.kernels import batchnorm as KB
    from fusedmlp.kernels import linear as KL

    cpu = torch.device("cpu")
    bn_rule = KB._splits
    monkeypatch.setattr(KB, "_splits", lambda R, C, device: bn_rule(R, C, cpu))
    for name in ("dw_split", "dz_dw_split", "_tma_split_depth"):
        rule = getattr(KL, name)
        monkeypatch.setattr(KL, name, lambda M, N, K, device, rule=rule: rule(M, N, K, cpu))


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    """Run the test under each backend; ``triton`` on CPU runs the interpreter."""
    with fusedmlp.use_backend(request.param):
        yield request.param


@pytest.fixture
def triton_backend():
    with fusedmlp.use_backend("triton"):
        yield "triton"


class LaunchCounter(collections.Counter):
    """Counts Triton kernel launches by kernel name."""

    @property
    def total(self):
        return sum(self.values())


@pytest.fixture
def launches(monkeypatch):
    """Counter of Triton launches during the test: proves the Triton path ran.

    Under the interpreter it wraps the interpreter's grid executor; on a GPU it uses triton's
    launch hook.
    """
    counter = LaunchCounter()
    if not ON_GPU:
        from triton.runtime import interpreter

        original = interpreter.GridExecutor.__call__

        def counting(self, *args, **kwargs):
            counter[self.fn.__name__] += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(interpreter.GridExecutor, "__call__", counting)
        yield counter
        return
    import triton

    def hook(metadata):
        data = metadata.get() if hasattr(metadata, "get") else metadata
        counter[data["name"]] += 1

    chain = triton.knobs.runtime.launch_enter_hook
    if hasattr(chain, "add"):
        chain.add(hook)
        try:
            yield counter
        finally:
            chain.remove(hook)
    else:  # older triton: a plain attribute
        previous = triton.knobs.runtime.launch_enter_hook
        triton.knobs.runtime.launch_enter_hook = hook
        try:
            yield counter
        finally:
            triton.knobs.runtime.launch_enter_hook = previous


@pytest.fixture
def arrivals(monkeypatch):
    """The counters every split reduction merged by its last program took
    (``fusedmlp.kernels.arrival``), in launch order: proves that path ran. Each launch leaves
    its counters at zero (``all_reset``): every block's last program merged it once."""
    from fusedmlp.kernels import arrival

    taken = Arrivals()
    original = arrival.arrival_counters

    def counting(device, n):
        counters = original(device, n)
        taken.append(counters)
        return counters

    for name, module in list(sys.modules.items()):
        if name.startswith("fusedmlp.kernels.") and hasattr(module, "arrival_counters"):
            monkeypatch.setattr(module, "arrival_counters", counting)
    return taken


class Arrivals(list):
    def all_reset(self) -> bool:
        return all(int(c.count_nonzero()) == 0 for c in self)


def pytest_configure(config):
    # The repository root is the package (its __init__.py is there), so pytest would import it a
    # second time under the checkout folder's name, registering every custom op and launch record
    # twice. Point that name at the installed package instead.
    if (config.rootpath / "__init__.py").exists():
        sys.modules.setdefault(config.rootpath.name, fusedmlp)


def pytest_collection_modifyitems(config, items):
    # The sm_90 compile test compiles what the rest of the run launched: it goes last.
    items.sort(key=lambda item: "test_sm90_compile" in item.nodeid)
