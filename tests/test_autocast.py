"""torch.autocast: each fusedmlp op follows torch's own autocast policy (dtypes and values).

Reference: torch's modules / functionals under the same autocast region. CPU autocast (bf16)
runs on both backends (the Triton kernels under the interpreter); CUDA autocast (fp16 and bf16)
runs on a GPU only.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, ON_GPU, assert_close

import fusedmlp
import fusedmlp.functional as FF
from fusedmlp.autograd import _amp

CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA autocast needs a GPU")


def _cpu_triton_needs_interpreter(backend, device_type):
    # On a GPU machine the kernels are compiled (no interpreter): CPU tensors cannot take the
    # Triton path there, and the triton backend refuses them by design (test_backend.py).
    if backend == "triton" and device_type == "cpu" and ON_GPU:
        pytest.skip("CPU tensors on the triton backend need the interpreter (CPU-only machines)")


REGIONS = [pytest.param("cpu", torch.bfloat16, id="cpu-bf16")] + [
    pytest.param("cuda", dt, id=f"cuda-{str(dt)[6:]}", marks=CUDA_ONLY)
    for dt in (torch.float16, torch.bfloat16)
]


def _pair(seed=0):
    torch.manual_seed(seed)
    ref = torch.nn.Sequential(
        torch.nn.Linear(6, 16),
        torch.nn.ReLU(),
        torch.nn.BatchNorm1d(16),
        torch.nn.Linear(16, 5),
        torch.nn.LogSoftmax(dim=1),
    )
    ours = fusedmlp.nn.convert(ref)
    return ours, ref


@pytest.mark.parametrize("device_type,dtype", REGIONS)
def test_model_under_autocast_matches_torch(backend, launches, device_type, dtype):
    _cpu_triton_needs_interpreter(backend, device_type)
    ours, ref = _pair()
    ours, ref = ours.to(device_type), ref.to(device_type)
    x = torch.randn(9, 6, device=device_type)
    y = torch.randint(0, 5, (9,), device=device_type)
    with torch.autocast(device_type, dtype=dtype):
        out, ref_out = ours(x), ref(x)
        loss = FF.cross_entropy(out, y)
        ref_loss = F.cross_entropy(ref_out, y)
    assert out.dtype == ref_out.dtype
    assert loss.dtype == ref_loss.dtype == torch.float32
    assert_close(out.float(), ref_out.float(), dtype=dtype, scale=2)
    assert_close(loss, ref_loss, dtype=dtype)
    loss.backward()
    ref_loss.backward()
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert p.grad.dtype == q.grad.dtype == torch.float32
        assert_close(p.grad, q.grad, dtype=dtype, scale=2)
    for name in ("running_mean", "running_var"):
        a, b = ours[2].get_buffer(name), ref[2].get_buffer(name)
        assert a.dtype == b.dtype == torch.float32
        assert_close(a, b, dtype=dtype)
    if backend == "triton" and device_type == DEVICE:
        assert launches.total > 0
    if backend == "torch":
        assert launches.total == 0


@pytest.mark.parametrize("device_type,dtype", REGIONS)
def test_each_op_output_dtype_as_torch(backend, device_type, dtype):
    _cpu_triton_needs_interpreter(backend, device_type)
    torch.manual_seed(0)
    x = torch.randn(7, 5, device=device_type)
    w = torch.randn(3, 5, device=device_type)
    b = torch.randn(3, device=device_type)
    t = torch.randint(0, 5, (7,), device=device_type)
    low = x.to(dtype)
    cw = torch.rand(5, device=device_type)
    bn = [torch.zeros(5, device=device_type), torch.ones(5, device=device_type)]
    bn_ref = [s.clone() for s in bn]
    with torch.autocast(device_type, dtype=dtype):
        cases = [
            (FF.linear(x, w, b), F.linear(x, w, b)),
            (FF.linear(low, w, b, activation="relu"), F.relu(F.linear(low, w, b))),
            (FF.cross_entropy(low, t), F.cross_entropy(low, t)),
            (FF.cross_entropy(low, t, weight=cw), F.cross_entropy(low, t, weight=cw)),
            (FF.nll_loss(low, t), F.nll_loss(low, t)),
            (FF.softmax(low, 1), F.softmax(low, 1)),
            (FF.log_softmax(low, 1), F.log_softmax(low, 1)),
            (FF.softmax(x, 1), F.softmax(x, 1)),
            (FF.dropout(low, 0.0), F.dropout(low, 0.0)),
            (
                FF.batch_norm(low, *bn, training=True),
                F.batch_norm(low, *bn_ref, training=True),
            ),
        ]
    for i, (a, e) in enumerate(cases):
        assert a.dtype == e.dtype, (i, a.dtype, e.dtype)
        assert_close(a.float(), e.float(), dtype=dtype, scale=2)
    for s, r in zip(bn, bn_ref):  # running statistics stay float32
        assert s.dtype == torch.float32
        assert_close(s, r, dtype=dtype)


def test_helpers_follow_torch_eligibility():
    x16, x64 = torch.randn(2, 3).bfloat16(), torch.randn(2, 3, dtype=torch.float64)
    assert _amp.autocast_dtype("cpu") is None
    assert _amp.lower_precision(x16.float(), None)[0].dtype == torch.float32  # no region
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _amp.autocast_dtype("cpu") == torch.bfloat16
        a, none, d = _amp.lower_precision(torch.randn(2), None, x64)
        assert a.dtype == torch.bfloat16 and none is None and d.dtype == torch.float64
        f, d = _amp.fp32(x16, x64)
        assert f.dtype == torch.float32 and d.dtype == torch.float64
        assert _amp.softmax_dtype(x16, None) is None  # CPU autocast leaves softmax alone
        assert _amp.softmax_dtype(x16, torch.float16) == torch.float16
    if ON_GPU:
        with torch.autocast("cuda", dtype=torch.float16):
            x = torch.randn(2, 3, device="cuda", dtype=torch.float16)
            assert _amp.softmax_dtype(x, None) == torch.float32
            assert _amp.fp32(x)[0].dtype == torch.float32
            # a CPU tensor is not eligible for a CUDA region
            assert _amp.lower_precision(torch.randn(2))[0].dtype == torch.float32


def test_autocast_training_step_with_grad_scaler(backend):
    """A full mixed-precision step: autocast forward, GradScaler, fused Adam; as torch's."""
    _cpu_triton_needs_interpreter(backend, "cpu")
    ours, ref = _pair(1)
    opt = fusedmlp.optim.Adam(ours.parameters(), lr=1e-2)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    scalers = [torch.amp.GradScaler("cpu", init_scale=64.0) for _ in range(2)]
    x, y = torch.randn(8, 6), torch.randint(0, 5, (8,))
    for _ in range(3):
        for model, o, s, ce in ((ours, opt, scalers[0], FF), (ref, ref_opt, scalers[1], F)):
            o.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = ce.nll_loss(model(x), y)
            s.scale(loss).backward()
            s.step(o)
            s.update()
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert_close(p.detach(), q.detach(), dtype=torch.bfloat16)
