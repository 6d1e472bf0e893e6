"""Backend switch, lazy imports and the launch helper's bookkeeping."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE, ON_GPU

import fusedmlp
from fusedmlp import backend


def _python(code, **env):
    full_env = {
        k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSEDMLP_BACKEND")
    }
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd="/"
    )


def test_set_get_and_context_manager_restore():
    before = fusedmlp.get_backend()
    with fusedmlp.use_backend("torch"):
        assert fusedmlp.get_backend() == "torch"
        with fusedmlp.use_backend("TRITON"):
            assert fusedmlp.get_backend() == "triton"
        assert fusedmlp.get_backend() == "torch"
    assert fusedmlp.get_backend() == before


def test_context_manager_restores_after_error():
    before = fusedmlp.get_backend()
    with pytest.raises(KeyError), fusedmlp.use_backend("torch"):
        raise KeyError("boom")
    assert fusedmlp.get_backend() == before


def test_unknown_backend_lists_valid_names():
    with pytest.raises(ValueError, match="'auto', 'triton', 'torch'"):
        fusedmlp.set_backend("cuda")
    with pytest.raises(ValueError, match="unknown fusedmlp backend"):
        with fusedmlp.use_backend("nope"):
            pass


def test_environment_variable_selects_backend():
    out = _python("import fusedmlp; print(fusedmlp.get_backend())", FUSEDMLP_BACKEND="torch")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch"
    bad = _python("import fusedmlp", FUSEDMLP_BACKEND="gpu")
    assert bad.returncode != 0
    assert "unknown fusedmlp backend 'gpu'" in bad.stderr


def test_import_is_lazy_and_never_queries_cuda():
    code = (
        "import sys, torch\n"
        "def refuse(*a, **k): raise AssertionError('CUDA queried at import')\n"
        "torch.cuda.is_available = torch.cuda.device_count = torch.cuda.init = refuse\n"
        "import fusedmlp, fusedmlp.nn, fusedmlp.optim, fusedmlp.functional\n"
        "bad = [m for m in sys.modules if m == 'triton' or m.startswith('fusedmlp.kernels')]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_import_works_without_triton():
    code = (
        "import sys, importlib.util\n"
        "_orig = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name.split('.')[0] == 'triton' else _orig(name, *a)\n"
        "sys.modules['triton'] = None\n"
        "import torch, fusedmlp\n"
        "assert not fusedmlp.backend.use_triton(torch.zeros(2))\n"
        "try:\n"
        "    fusedmlp.set_backend('triton')\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert "pip install triton" in out.stdout


def test_auto_uses_fallback_for_cpu_and_float64():
    with fusedmlp.use_backend("auto"):
        assert not backend.use_triton(torch.zeros(2))
        assert not backend.use_triton(torch.zeros(2, dtype=torch.float64))
    with fusedmlp.use_backend("torch"):
        assert not backend.use_triton(torch.zeros(2))


def test_triton_backend_on_cpu_uses_interpreter():
    with fusedmlp.use_backend("triton"):
        if ON_GPU:  # compiled kernels: CPU tensors are refused before any launch
            with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
                backend.use_triton(torch.zeros(2), None)
        else:
            assert backend.use_triton(torch.zeros(2), None)


@pytest.mark.parametrize("late", [False, True], ids=["unset", "set_after_triton_import"])
def test_triton_backend_without_interpreter_says_what_to_do(late):
    # Set after ``import triton``, the variable interprets fusedmlp's kernels but not triton's
    # own @jit library functions they call (``tl.sum``...): the same clear error, before a
    # launch, instead of triton's InterpreterError from inside the kernel.
    code = (
        "import os, torch, triton\n"
        + ("os.environ['TRITON_INTERPRET'] = '1'\n" if late else "")
        + "import fusedmlp\n"
        "fusedmlp.set_backend('triton')\n"
        "try:\n"
        "    fusedmlp.functional.linear(torch.randn(2, 3), torch.randn(4, 3))\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    out = _python(code, CUDA_VISIBLE_DEVICES="")
    assert out.returncode == 0, out.stderr
    assert "use CUDA tensors, or set TRITON_INTERPRET=1" in out.stdout


def test_arg_types_follow_triton_specialisation():
    from fusedmlp.kernels.launch import arg_type

    assert arg_type(torch.zeros(1, dtype=torch.bfloat16)) == "*bf16"
    assert arg_type(torch.zeros(1, dtype=torch.int64)) == "*i64"
    assert arg_type(7) == "i32"
    assert arg_type(2**31) == "i64"
    assert arg_type(0.5) == "fp32"
    assert arg_type(True) == "i1"
    with pytest.raises(TypeError):
        arg_type("x")


def test_dot_precision_follows_torch_matmul_setting():
    from fusedmlp.kernels.launch import dot_precision

    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert dot_precision(torch.float32) == "tf32"
        assert dot_precision(torch.float16) == "ieee"
    finally:
        torch.set_float32_matmul_precision(previous)


def _doubling_kernel_and_configs():
    """A fresh ``y = 2 x`` kernel (its own autotuner and caches per test) and two configurations.
    Defined in a function: the tests keep it out of the sm_90 compile test's records."""
    import triton
    import triton.language as tl

    @triton.jit
    def _double_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)

    configs = [triton.Config({"BLOCK": 16}, num_warps=1), triton.Config({"BLOCK": 32}, num_warps=1)]
    return _double_kernel, configs


def test_launch_reuses_the_autotuned_configuration_directly(monkeypatch):
    """After the autotuner picked a configuration for a key, ``launch`` calls the jitted kernel
    with it directly (no Autotuner.run per call); the key is the autotuner's own. The benchmark
    is stubbed (autotuning needs a GPU); the kernels run under the interpreter."""
    import triton

    from fusedmlp.kernels import launch as L

    # the GPU check runs the tests with FUSEDMLP_AUTOTUNE=0
    monkeypatch.setattr(L, "AUTOTUNE", True)
    _scale_kernel, configs = _doubling_kernel_and_configs()
    tuned = L._autotuned(_scale_kernel, configs, ("n",), (), ())
    benched = []

    def bench(*args, config, **kwargs):
        benched.append(config.kwargs["BLOCK"])
        return 1.0 if config.kwargs["BLOCK"] == 32 else 2.0

    monkeypatch.setattr(tuned, "_bench", bench)
    monkeypatch.setattr(
        L, "_info", lambda k: L._KernelInfo(None, (), frozenset(), False, False, frozenset())
    )
    runs = []
    original_run = tuned.run
    monkeypatch.setattr(tuned, "run", lambda *a, **k: runs.append(1) or original_run(*a, **k))
    x = torch.arange(40, dtype=torch.float32, device=DEVICE)  # compiled kernels need CUDA tensors
    for _ in range(3):
        y = torch.empty_like(x)
        L.launch(_scale_kernel, lambda m: (triton.cdiv(40, m["BLOCK"]),), configs=configs,
                 key=("n",), x_ptr=x, y_ptr=y, n=40)  # fmt: skip
        torch.testing.assert_close(y, x * 2)
    assert benched == [16, 32] and len(runs) == 1  # tuned once, then launched directly
    assert L._BEST[(tuned, (40,), (torch.float32, torch.float32))][0] == {"BLOCK": 32}
    assert L._TENSOR_ARGS[tuned] == ("x_ptr", "y_ptr")
    assert ((40, "torch.float32", "torch.float32")) in tuned.cache  # the autotuner's own key
    # Another dtype is another key: tuned again (the dtypes are read at the learnt names).
    x16 = x.half()
    y16 = torch.empty_like(x16)
    L.launch(_scale_kernel, lambda m: (triton.cdiv(40, m["BLOCK"]),), configs=configs,
             key=("n",), x_ptr=x16, y_ptr=y16, n=40)  # fmt: skip
    torch.testing.assert_close(y16, x16 * 2)
    assert benched == [16, 32, 16, 32] and len(runs) == 2
    assert (tuned, (40,), (torch.float16, torch.float16)) in L._BEST


def test_small_problems_launch_their_small_configuration_untuned(monkeypatch):
    """A launch whose ``work`` is below ``worth_tuning``'s size runs its ``small_config`` without
    autotuning on a GPU, and the sm_90 compile test sees it among the kernel's configurations."""
    import triton

    from fusedmlp.kernels import launch as L
    from fusedmlp.kernels import linear as KL

    monkeypatch.setattr(L, "AUTOTUNE", True)
    _double_kernel, configs = _doubling_kernel_and_configs()
    small = triton.Config({"BLOCK": 8}, num_warps=1)
    x = torch.arange(40, dtype=torch.float32, device=DEVICE)
    y = torch.empty_like(x)
    # Under the interpreter: recorded with the small configuration among the GPU ones (in a
    # record of its own: the sm_90 compile test cannot import a kernel defined in a test).
    # Compiled launches (a GPU) record nothing: the sm_90 compile test runs on CPU machines.
    monkeypatch.setattr(L, "LAUNCHED", {})
    L.launch(_double_kernel, lambda m: (triton.cdiv(40, m["BLOCK"]),), configs=configs,
             key=("n",), small_config=small, work=40, x_ptr=x, y_ptr=y, n=40)  # fmt: skip
    torch.testing.assert_close(y, x * 2)
    recs = [r for r in L.LAUNCHED if r.name.endswith("_double_kernel")]
    if ON_GPU:
        assert not recs
    else:
        assert recs and all(small in r.gpu_configs and len(r.gpu_configs) == 3 for r in recs)
    # As on a GPU (the interpreted kernel stands in for the compiled one): no autotuner is
    # built or run, the small configuration's tiles are launched.
    monkeypatch.setattr(
        L, "_info", lambda k: L._KernelInfo(None, (), frozenset(), False, False, frozenset())
    )
    monkeypatch.setattr(L, "_autotuned", lambda *a: pytest.fail("autotuned a small problem"))
    grids = []

    def grid(meta):
        grids.append(meta["BLOCK"])
        return (triton.cdiv(40, meta["BLOCK"]),)

    y = torch.empty_like(x)
    L.launch(_double_kernel, grid, configs=configs, key=("n",), small_config=small, work=40,
             x_ptr=x, y_ptr=y, n=40)  # fmt: skip
    torch.testing.assert_close(y, x * 2)
    assert grids == [8]
    # The linear launchers' threshold: a GEMM of 2^28 multiply-adds or more is tuned.
    # The thresholds: 2^22 elements, 2^28 multiply-adds for the GEMMs (the linear launchers'
    # small tile: the 64 x 64 one, 4 warps).
    assert not L.worth_tuning((1 << 22) - 1) and L.worth_tuning(1 << 22)
    assert not L.worth_tuning(4095 * 256 * 256, gemm=True)
    assert L.worth_tuning(4096 * 256 * 256, gemm=True)
    args = KL._launch_configs("fwd", torch.float32, "ieee", 64, 256, 64)
    assert args["work"] == 64 * 256 * 64 and args["gemm"] is True
    assert args["small_config"].kwargs["BLOCK_M"] == 64 and args["small_config"].num_warps == 4


def test_direct_launch_defers_to_triton_when_its_knobs_are_set(monkeypatch):
    # The direct launch (kernels/launch.py) skips JITFunction.run only while the knobs that
    # run() keys its compiled-kernel cache on, or checks at every launch, are at their defaults:
    # debug mode, proton's instrumentation, fpsan casts, a stages inspection hook, and the
    # global values a kernel read when it compiled.
    from types import SimpleNamespace

    from triton import knobs

    from fusedmlp.kernels import launch as L

    scope = {"SCALE": 2}
    kernel = SimpleNamespace(debug=False, used_global_vals={("SCALE", id(scope)): (2, scope)})
    assert L._plain_knobs(kernel)
    for obj, name, value in [
        (knobs.runtime, "debug", True),
        (knobs.compilation, "instrumentation_mode", "fpsan"),
        (knobs.runtime, "add_stages_inspection_hook", lambda: ("k", "h")),
    ]:
        with monkeypatch.context() as m:
            m.setattr(obj, name, value)
            assert not L._plain_knobs(kernel), name
    assert not L._plain_knobs(SimpleNamespace(debug=True, used_global_vals={}))
    scope["SCALE"] = 3  # JITFunction.run raises for a changed global: so must the launch
    assert not L._plain_knobs(kernel)


def test_torch_func_transforms_run_torchs_implementation(triton_backend, launches):
    # torch.func (grad, vmap, jvp, jacrev) needs vmap and forward-AD rules that fusedmlp's
    # autograd Functions do not have: under a transform every op takes torch's path (no launch)
    # and gives torch's results; outside one the same calls launch the kernels.
    import torch.nn.functional as F

    from fusedmlp import functional as FF
    from fusedmlp import nn as fnn

    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 8, generator=g).to(DEVICE)
    y = torch.randint(0, 4, (5,), generator=g).to(DEVICE)
    ours = fnn.Linear(8, 4, activation="relu", device=DEVICE)
    ref = torch.nn.Linear(8, 4, device=DEVICE)
    ref.load_state_dict(ours.state_dict())

    def loss(module, act):
        def f(params, x, y):
            out = torch.func.functional_call(module, params, (x,))
            return FF.cross_entropy(act(out), y) if act else F.cross_entropy(out, y)

        return f

    params = {k: v.detach() for k, v in ours.named_parameters()}
    got = torch.func.grad(loss(ours, None))(params, x, y)
    want = torch.func.grad(loss(ref, torch.relu))(params, x, y)
    for k in params:
        torch.testing.assert_close(got[k], want[k])
    # per-sample gradients (vmap of grad), forward AD and a Jacobian
    per = torch.func.vmap(torch.func.grad(loss(ours, None)), in_dims=(None, 0, 0))
    got = per(params, x.unsqueeze(1), y.unsqueeze(1))
    want = torch.func.vmap(torch.func.grad(loss(ref, torch.relu)), in_dims=(None, 0, 0))(
        params, x.unsqueeze(1), y.unsqueeze(1)
    )
    for k in params:
        assert got[k].shape == (5, *params[k].shape)
        torch.testing.assert_close(got[k], want[k])
    tangent = torch.ones_like(x)
    _, jvp_ours = torch.func.jvp(ours, (x,), (tangent,))
    _, jvp_ref = torch.func.jvp(lambda t: torch.relu(ref(t)), (x,), (tangent,))
    torch.testing.assert_close(jvp_ours, jvp_ref)
    jac = torch.func.jacrev(lambda t: FF.softmax(t, 1))(x)
    torch.testing.assert_close(jac, torch.func.jacrev(lambda t: torch.softmax(t, 1))(x))
    # forward AD (torch.autograd.forward_ad) outside torch.func: torch's path too
    import torch.autograd.forward_ad as fwAD

    bn, tbn = fnn.BatchNorm1d(8, device=DEVICE), torch.nn.BatchNorm1d(8, device=DEVICE)
    for f, r in ((ours, lambda t: torch.relu(ref(t))), (lambda t: FF.softmax(t, 1),
                 lambda t: torch.softmax(t, 1)), (bn, tbn)):  # fmt: skip
        with fwAD.dual_level():
            got = fwAD.unpack_dual(f(fwAD.make_dual(x, tangent)))
            want = fwAD.unpack_dual(r(fwAD.make_dual(x, tangent)))
        torch.testing.assert_close(got.primal, want.primal)
        torch.testing.assert_close(got.tangent, want.tangent)
    assert launches.total == 0, dict(launches)
    ours(x)  # no transform, no forward-AD level: the kernel
    assert launches.total == 1, dict(launches)


def test_meta_tensors_take_torchs_ops_on_the_triton_backend(triton_backend, launches):
    """Meta tensors (shape-only, e.g. a model built on device="meta" before loading weights)
    run no kernel: on the 'triton' backend too they take torch's ops, which give the shapes,
    as the 'auto' backend does; an optimizer step over meta params is torch's no-op."""
    from fusedmlp import nn as fnn
    from fusedmlp import optim as fo

    model = fnn.MLP(8, [16], 4, batchnorm=True, dropout=0.1).to("meta")
    ref = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)).to("meta")
    x = torch.randn(5, 8, device="meta")
    out = model(x)
    assert out.device.type == "meta" and out.shape == ref(x).shape == (5, 4)
    fnn.CrossEntropyLoss()(out, torch.zeros(5, dtype=torch.long, device="meta")).backward()
    for opt in (fo.Adam(model.parameters()), fo.SGD(model.parameters(), lr=0.1, momentum=0.9)):
        opt.step()
    assert all(p.device.type == "meta" for p in model.parameters())
    assert launches.total == 0


def test_jit_trace_records_torchs_ops(triton_backend, launches):
    """torch.jit.trace (which the TorchScript torch.onnx.export uses) sees traced 0-d sizes
    that no launcher takes: while it records, every op takes torch's path, and the trace holds
    torch's ops; the traced module equals the eager one on another batch size."""
    import warnings

    from fusedmlp import nn as fnn

    torch.manual_seed(0)
    model = fnn.MLP(4, [8], 3, batchnorm=True).to(DEVICE).eval()
    x = torch.randn(6, 4, device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # check_trace=False: the check runs the eager model again, on the kernels
        traced = torch.jit.trace(model, x, check_trace=False)
    assert launches.total == 0
    other = torch.randn(2, 4, device=DEVICE)
    torch.testing.assert_close(traced(other), model(other))
    assert launches.total > 0  # the eager model on the kernels


@pytest.mark.parametrize(
    "op",
    ["linear-none", "linear-relu", "linear-sigmoid", "linear-gelu", "softmax", "log_softmax",
     "batch_norm-train", "batch_norm-eval"],
)  # fmt: skip
def test_batched_gradients_as_torch(triton_backend, launches, op):
    """vmap over the backward only (torch.autograd.grad(..., is_grads_batched=True), as
    jacobian(vectorize=True) and gradcheck's check_batched_grad run it): the forward ran on the
    kernels, and the backward takes the batched gradients in torch's ops, equal to torch's."""
    import torch.nn.functional as F

    from fusedmlp import functional as FF
    from fusedmlp.autograd.linear import apply_activation_torch

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 6, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(5, 6, generator=g).to(DEVICE).requires_grad_()
    b = torch.randn(5, generator=g).to(DEVICE).requires_grad_()
    if op.startswith("linear"):
        act = {"none": None}.get(op.split("-")[1], op.split("-")[1])
        inputs = (x, w, b)
        ours = FF.linear(x, w, b, act)
        ref = apply_activation_torch(F.linear(x, w, b), act)
    elif op.startswith("batch_norm"):
        train = op.endswith("train")
        w, b = w[:, 0].detach().requires_grad_(), b.detach().requires_grad_()  # 5 channels
        x = torch.randn(3, 5, 4, generator=g).to(DEVICE).requires_grad_()
        stats = torch.randn(5, generator=g).to(DEVICE), torch.rand(5, generator=g).to(DEVICE) + 0.5
        inputs = (x, w, b)
        ours = FF.batch_norm(x, *(t.clone() for t in stats), w, b, training=train)
        ref = F.batch_norm(x, *(t.clone() for t in stats), w, b, training=train)
    else:
        inputs = (x,)
        ours = getattr(FF, op)(x, -1)
        ref = getattr(F, op)(x, -1)
    assert launches.total > 0
    grads = torch.randn(3, *ours.shape, generator=g).to(DEVICE)
    got = torch.autograd.grad(ours, inputs, grads, is_grads_batched=True)
    want = torch.autograd.grad(ref, inputs, grads, is_grads_batched=True)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("slope", [0.2, 1e40])
def test_batched_gradients_of_float64_leaky_relu_keep_its_slope(triton_backend, launches, slope):
    """The batched backward's slope is a float64 for float64 tensors: ``torch.where`` of two
    Python scalars made a float32 tensor, 0.2 rounded and 1e40 an overflow error."""
    import torch.nn.functional as F

    from fusedmlp import functional as FF

    x = -torch.rand(3, 4, dtype=torch.float64, device=DEVICE) - 0.5  # negative pre-activations
    w = torch.eye(4, dtype=torch.float64, device=DEVICE)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = F.leaky_relu(F.linear(xr, w), slope)
    ours = FF.linear(xf, w, None, "leaky_relu", slope)
    assert launches.total > 0
    v = torch.rand(2, 3, 4, dtype=torch.float64, device=DEVICE)
    (want,) = torch.autograd.grad(ref, xr, v, is_grads_batched=True)
    (got,) = torch.autograd.grad(ours, xf, v, is_grads_batched=True)
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0)


def test_batched_gradients_of_dropout_and_the_fused_blocks_clear_error(triton_backend, launches):
    """Dropout's batched gradients are its plain gradients slice by slice; the fused blocks,
    which have no batched backward, raise a clear error, not the kernel's."""
    from fusedmlp import functional as FF
    from fusedmlp import nn as fnn

    x = torch.randn(4, 6, device=DEVICE, requires_grad=True)
    y = FF.dropout(x, 0.5, True)
    grads = torch.randn(3, 4, 6, device=DEVICE)
    (got,) = torch.autograd.grad(y, x, grads, is_grads_batched=True, retain_graph=True)
    for i in range(3):
        (want,) = torch.autograd.grad(y, x, grads[i], retain_graph=True)
        torch.testing.assert_close(got[i], want)
    out = fnn.MLP(6, [8], 3, batchnorm=True, dropout=0.1).to(DEVICE)(x)
    grads = torch.randn(2, *out.shape, device=DEVICE)
    with pytest.raises(RuntimeError, match="batched gradients .* are not supported"):
        torch.autograd.grad(out, x, grads, is_grads_batched=True)
    assert launches.total > 0


def test_two_threads_tuning_one_key_at_once_each_launch_once(monkeypatch):
    """DataParallel's replicas (and autograd's per-device threads) can reach an untuned key
    together; triton's Autotuner keeps the call it tunes in attributes (arguments, the
    restore_value copies), so the second thread's run raised, or restored its tensors from the
    other's. The benchmark is stubbed (a sleep lets the threads interleave, as a GPU's
    synchronisation would), and so is the kernel's run."""
    import random
    import threading
    import time

    import triton
    import triton.language as tl

    from fusedmlp.kernels import launch as L

    @triton.jit
    def _increment_kernel(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)

    def bench(fn, quantiles=None):
        fn()
        time.sleep(random.uniform(0.002, 0.01))
        return [1.0, 1.0, 1.0] if quantiles else 1.0

    def run(self, *args, grid=None, warmup=False, **kwargs):  # the kernel's effect, in torch
        kwargs["x_ptr"].add_(1)  # (the interpreter's runs would share its patched tl module)

    monkeypatch.setattr(type(_increment_kernel), "run", run)
    monkeypatch.setattr(L, "AUTOTUNE", True)
    monkeypatch.setattr(L, "_time_config", bench)
    monkeypatch.setattr(
        L, "_info", lambda k: L._KernelInfo(None, (), frozenset(), False, False, frozenset())
    )
    configs = [triton.Config({"BLOCK": b}, num_warps=1) for b in (8, 16, 32, 64)]
    xs = [torch.zeros(40, device=DEVICE) for _ in range(4)]
    errors = []

    def work(x):
        try:
            L.launch(_increment_kernel, lambda m: (triton.cdiv(40, m["BLOCK"]),),
                     configs=configs, key=("n",), restore_value=("x_ptr",), x_ptr=x, n=40)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(x,)) for x in xs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for x in xs:  # each tensor incremented once: restored after every trial, launched once
        torch.testing.assert_close(x, torch.ones_like(x))


def test_tuning_switches_warn_on_values_they_do_not_know(monkeypatch):
    """A kernel module reads its switch at its first import, mid-run: a bad value warns and
    keeps the default (``FUSEDMLP_MERGE_MAX_BYTES=abc`` was an int() traceback there, and
    ``FUSEDMLP_LINEAR_BWD=bogus`` a silent "auto")."""
    from fusedmlp import _env

    monkeypatch.setenv("FUSEDMLP_MERGE_MAX_BYTES", "abc")
    with pytest.warns(RuntimeWarning, match="FUSEDMLP_MERGE_MAX_BYTES='abc' is not a whole"):
        assert _env.byte_count("FUSEDMLP_MERGE_MAX_BYTES", 512) == 512
    monkeypatch.setenv("FUSEDMLP_MERGE_MAX_BYTES", " 0 ")
    assert _env.byte_count("FUSEDMLP_MERGE_MAX_BYTES", 512) == 0
    monkeypatch.setenv("FUSEDMLP_LINEAR_BWD", "bogus")
    with pytest.warns(RuntimeWarning, match="one of 'auto', 'fused', 'dz'"):
        assert _env.choice("FUSEDMLP_LINEAR_BWD", ("auto", "fused", "dz"), "auto") == "auto"
    monkeypatch.setenv("FUSEDMLP_LINEAR_BWD", "dz")
    assert _env.choice("FUSEDMLP_LINEAR_BWD", ("auto", "fused", "dz"), "auto") == "dz"
    for text, on in (("0", False), ("1", True), ("", True)):
        monkeypatch.setenv("FUSEDMLP_AUTOTUNE", text)
        assert _env.switch("FUSEDMLP_AUTOTUNE") is on
    monkeypatch.setenv("FUSEDMLP_AUTOTUNE", "off")
    with pytest.warns(RuntimeWarning, match="FUSEDMLP_AUTOTUNE='off'"):
        assert _env.switch("FUSEDMLP_AUTOTUNE") is True
    monkeypatch.undo()
    # the kernel modules read them through these: a bad value imports with a warning
    code = "import warnings; warnings.simplefilter('error'); import fusedmlp.kernels.linear"
    out = _python(code, FUSEDMLP_MERGE_MAX_BYTES="abc", CUDA_VISIBLE_DEVICES="")
    assert out.returncode != 0 and "FUSEDMLP_MERGE_MAX_BYTES='abc'" in out.stderr
    assert "invalid literal" not in out.stderr
