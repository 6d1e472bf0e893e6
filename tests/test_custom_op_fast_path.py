"""The eager fast path of fusedmlp's custom ops (fusedmlp.autograd._custom_op)."""

import torch
from conftest import DEVICE
from torch.utils._python_dispatch import TorchDispatchMode

import fusedmlp.autograd._custom_op as C
import fusedmlp.autograd.batchnorm as BN
from fusedmlp.autograd._custom_op import fast_eager
from fusedmlp.functional import linear


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_fast_eager_rules():
    x, p = torch.randn(2), torch.nn.Parameter(torch.randn(2))
    with torch.no_grad():
        assert fast_eager(x, p, None, [x, p], 1.0, "relu")
    assert not fast_eager(p)  # grad mode on and an input requires grad: the dispatcher
    assert fast_eager(p.detach(), None)
    with _OpLog():
        assert not fast_eager(x)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
    assert not fast_eager(fake)
    assert not fast_eager([x, fake])


def test_eager_skips_the_dispatcher_and_modes_see_the_op(triton_backend, launches, monkeypatch):
    x = torch.randn(5, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(16, 16, device=DEVICE, requires_grad=True)
    taken = []
    orig = C.fast_eager
    monkeypatch.setattr(C, "fast_eager", lambda *a: taken.append(orig(*a)) or taken[-1])
    y = linear(x, w, None, "relu")
    y.sum().backward()
    assert taken == [True, True] and launches.total > 0  # linear_fwd, linear_bwd: direct calls
    # under a dispatch mode the registered op runs, and is what the mode sees
    with _OpLog() as log:
        y2 = linear(x, w, None, "relu")
    assert taken[-1] is False and "fusedmlp.linear_fwd.default" in log.ops
    torch.testing.assert_close(y2, y)


def test_mutating_ops_bump_versions_but_not_the_running_statistics(triton_backend, launches):
    # The fast path bumps a mutated argument's version as the op's ADInplaceOrView kernel does,
    # except a batch norm's running statistics: torch's batch norm leaves theirs as they are.
    rm, rv = torch.zeros(16, device=DEVICE), torch.ones(16, device=DEVICE)
    mean, var = torch.randn(16, device=DEVICE), torch.rand(16, device=DEVICE)
    v0 = (rm._version, rv._version, mean._version)
    BN.batchnorm_update_running(rm, rv, mean, var, 0.1, None)
    assert (rm._version, rv._version, mean._version) == v0
    torch.testing.assert_close(rm, 0.1 * mean)
    trm, trv = torch.zeros(16, device=DEVICE), torch.ones(16, device=DEVICE)
    torch.nn.functional.batch_norm(var.view(2, 8).repeat(1, 2), trm, trv, training=True)
    assert (trm._version, trv._version) == (0, 0)
    from fusedmlp.optim import SGD

    p = torch.nn.Parameter(torch.randn(16, device=DEVICE))
    p.grad = torch.randn(16, device=DEVICE)
    v = p._version
    SGD([p], lr=0.1).step()
    assert p._version > v and launches.total > 0
