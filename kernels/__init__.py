"""Triton kernels and their launchers, one file per op.

These modules import triton and define ``@triton.jit`` functions, so they are imported lazily
(by ``fusedmlp.autograd`` at the first Triton-path call), after ``TRITON_INTERPRET`` is settled.
"""
