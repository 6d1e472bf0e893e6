"""Several Python threads running fusedmlp at once: results equal the same work done serially."""

import copy
import sys
import threading
from collections import OrderedDict

import torch
from conftest import DEVICE


def _train(model, batches, out, key):
    from fusedmlp import nn as fnn
    from fusedmlp import optim as fo

    opt = fo.Adam(model.parameters(), lr=1e-2)
    loss_fn = fnn.CrossEntropyLoss()
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    out[key] = copy.deepcopy(model.state_dict())


def test_threads_train_as_serially(triton_backend):
    # Triton's interpreter keeps the running kernel in module globals: two threads' launches
    # raised "Did you forget to add @triton.jit ?"; a split reduction's arrival counters,
    # shared by the threads, were zeroed by the other thread's launcher mid-kernel.
    from fusedmlp import nn as fnn

    g = torch.Generator().manual_seed(0)
    batches = [
        [
            (
                torch.randn(150, 6, generator=g).to(DEVICE),
                torch.randint(0, 3, (150,), generator=g).to(DEVICE),
            )
        ]
        for _ in range(2)
    ]
    models = []
    for i in range(2):
        torch.manual_seed(i)
        models.append(fnn.MLP(6, [8], 3, batchnorm=True).to(DEVICE))
    serial, parallel = {}, {}
    for i in range(2):
        _train(copy.deepcopy(models[i]), batches[i], serial, i)
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        threads = [
            threading.Thread(target=_train, args=(models[i], batches[i], parallel, i))
            for i in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(previous)
    for i in range(2):
        assert i in parallel
        for k, v in serial[i].items():
            assert torch.equal(parallel[i][k], v), k


def test_lru_cache_hit_evicted_by_another_thread():
    # The optimizers' host-table caches (LRU): another thread's insertion can evict a key
    # between this thread's lookup and its move_to_end, which raised KeyError. The eviction
    # is made to happen at that point here, as a thread switch would.
    from fusedmlp.kernels.multi_tensor import cached

    class EvictedAfterLookup(OrderedDict):
        def get(self, key, default=None):
            value = super().get(key, default)
            self.pop(key, None)
            return value

    cache = EvictedAfterLookup(a=1, b=2)
    assert cached(cache, "a", lambda: 3) == 1
    assert list(cache) == ["b"]
