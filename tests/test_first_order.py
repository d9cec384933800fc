"""Second derivatives: the fused kernels' backwards have no derivative of their own, so asking
for one through them must raise (not silently treat their gradients as constants), while a
first-order gradient taken with create_graph=True is unchanged. Token gather / scatter are
linear: their backwards go through the differentiable ops, so second derivatives work."""
import pytest
import torch

from effst import slif
from effst.nn import SLIF, BlockSparseLinear
from effst.nn import token_routing
from effst.nn.token_routing import run_neuron_on_tokens
from effst.ops.token_select import gather_tokens, scatter_tokens
from test_token_kernels import random_route

F64 = torch.float64
TWICE = "once_differentiable"  # PyTorch's message when a marked backward is differentiated


def _second_derivative_raises(output: torch.Tensor, leaf: torch.Tensor, weight: torch.Tensor):
    # a loss whose gradient w.r.t. the output depends on the leaf: the backward's incoming
    # gradient requires grad, so without the mark the second derivative would silently miss the
    # path through the kernels' own backward
    (first,) = torch.autograd.grad(((output * weight) ** 2).sum(), leaf, create_graph=True)
    with pytest.raises(RuntimeError, match=TWICE):
        (first ** 2).sum().backward()
    return first


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_slif_create_graph_keeps_the_first_derivative_and_refuses_the_second(backend):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 3, 8, generator=g, dtype=F64) + 0.6).requires_grad_()
    w = torch.zeros(8, dtype=F64, requires_grad=True)
    weight = torch.randn(4, 3, 8, generator=g, dtype=F64)
    (plain,) = torch.autograd.grad(((slif(x, w, 1.0, backend=backend) * weight) ** 2).sum(), x)
    if backend == "reference":  # torch ops all the way: second derivatives exist
        (first,) = torch.autograd.grad(((slif(x, w, 1.0, backend=backend) * weight) ** 2).sum(), x,
                                       create_graph=True)
        torch.autograd.grad((first ** 2).sum(), x)
    else:
        first = _second_derivative_raises(slif(x, w, 1.0, backend=backend), x, weight)
    assert torch.equal(first.detach(), plain)


def test_slif_module_triton_refuses_a_second_derivative():
    neuron = SLIF(channels=8, backend="triton").double()
    x = (torch.randn(4, 3, 8, dtype=F64) + 0.6).requires_grad_()
    _second_derivative_raises(neuron(x), x, torch.randn(4, 3, 8, dtype=F64))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_block_sparse_linear_refuses_a_second_derivative(backend):
    torch.manual_seed(1)
    layer = BlockSparseLinear.from_dense(torch.nn.Linear(32, 32).double(), block_size=16,
                                         mask=torch.tensor([[True, False], [True, True]]), backend=backend)
    x = torch.randn(5, 32, dtype=F64, requires_grad=True)
    _second_derivative_raises(layer(x), x, torch.randn(5, 32, dtype=F64))


def test_routed_neuron_refuses_a_second_derivative():
    T, B, N, K, C = 3, 2, 9, 4, 8
    g = torch.Generator().manual_seed(2)
    neuron = SLIF(channels=C, backend="triton").double()
    index = random_route(T, B, N, K, g)
    current = (torch.rand(T, B, K, C, generator=g, dtype=F64) * 2).requires_grad_()
    assert token_routing._fusable(neuron, current, N, "triton")
    spikes = run_neuron_on_tokens(neuron, current, index, N, backend="triton")
    _second_derivative_raises(spikes, current, torch.randn(T, B, K, C, generator=g, dtype=F64))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_token_gather_and_scatter_have_second_derivatives(backend):
    g = torch.Generator().manual_seed(3)
    index = torch.sort(torch.rand(2, 7, generator=g).argsort(dim=1)[:, :4], dim=1).values
    x = torch.randn(2, 7, 3, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: gather_tokens(t, index, backend=backend) ** 2, (x,))
    y = torch.randn(2, 4, 3, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: scatter_tokens(t, index, 7, backend=backend) ** 2, (y,))
