"""One ``torch.autograd.Function`` per op over its torch.library custom ops, plus the dispatch
between the Triton path and the torch fallback (``fusedmlp.backend.use_triton``).

Kernel modules are imported inside the custom ops' implementations, never at import time.
"""
