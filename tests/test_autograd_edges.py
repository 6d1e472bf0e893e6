"""Autograd edge cases against torch's own ops: which gradients a backward makes differentiable
(create_graph), gradients fed in odd shapes, hooks, in-place edits, transforms."""

import pytest
import torch
from conftest import DEVICE, assert_close

import fusedmlp
from fusedmlp.autograd.fused_block import linear_act_dropout


@pytest.mark.parametrize("activation", [None, "relu"])
def test_gradient_penalty_through_linear_act_dropout_is_never_dropped(
    triton_backend, launches, activation
):
    # Linear -> [ReLU] -> Dropout with the dropout in the GEMM's epilogue, where nothing reads
    # its output next (the end of a converted Sequential). Its input gradient dz @ W depends on
    # W: torch's is differentiable again. It was returned as a plain tensor (the piecewise-linear
    # activation was taken as "linear in the incoming gradient alone"), so a gradient penalty
    # silently lost its term (or, alone, was refused as "does not require grad").
    torch.manual_seed(0)
    x = torch.randn(4, 6, device=DEVICE, requires_grad=True)
    w = torch.randn(16, 6, device=DEVICE, requires_grad=True)
    b = torch.randn(16, device=DEVICE, requires_grad=True)
    y = linear_act_dropout(x, w, b, activation, 0.01, 0.3)
    assert type(y.grad_fn).__name__ == "LinearActDropoutFunctionBackward"
    assert launches["_linear_fwd_kernel"] == 1 and launches.total == 1
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    # torch's ops with the same mask (the kept elements' scale read off the output)
    x2, w2 = x.detach().requires_grad_(), w.detach().requires_grad_()
    z2 = torch.nn.functional.linear(x2, w2, b.detach())
    a2 = torch.relu(z2) if activation else z2
    scale = torch.where(y.detach() != 0, y.detach() / a2.detach(), 0.0)
    (ref,) = torch.autograd.grad((a2 * scale).sum(), x2, create_graph=True)
    assert ref.requires_grad and gx.requires_grad
    assert_close(gx.detach(), ref.detach())
    with pytest.raises(RuntimeError, match="double backward"):
        (y.square().mean() + gx.square().sum()).backward()


def test_gradient_penalty_at_the_end_of_a_converted_sequential_raises(triton_backend, launches):
    # The same through the public API: Linear -> Dropout at the end of a converted Sequential
    # runs as one fused Function. torch's penalty term reaches the weight; fusedmlp's must
    # raise (double backward is not supported), never leave the weight's gradient without it.
    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.3)).to(DEVICE)
    ours = fusedmlp.nn.convert(seq)
    x = torch.randn(4, 6, device=DEVICE, requires_grad=True)
    y = ours(x)
    assert type(y.grad_fn).__name__ == "LinearActDropoutFunctionBackward"
    assert launches.total == 1
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    assert gx.requires_grad  # as torch's: it depends on the weight
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(gx.square().sum(), ours[0].weight)
