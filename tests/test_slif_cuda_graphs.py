"""sLIF on the GPU without host overhead: no host synchronisation, CUDA graphs in a training
step (state reset inside the graph), torch.compile(mode="reduce-overhead").

All marked ``gpu``: bench/gpu_check.sh runs them on the GPU machine (EFFST_TEST_DEVICE=cuda).
"""
import copy

import pytest
import torch

from effst.nn import LIF, PLIF, SLIF

pytestmark = pytest.mark.gpu


class ResetThenRun(torch.nn.Module):
    """A network whose forward first resets its neurons: the reset is inside the graph."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        for module in self.net.modules():
            if isinstance(module, SLIF):
                module.reset()
        return self.net(x)


def small_network(neuron_cls, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), neuron_cls(**kwargs),
                               torch.nn.Linear(64, 64), SLIF(channels=64, v_reset=None))


def training_step(model, x, target, optimizer=None):
    out = model(x)
    loss = ((out - target) ** 2).mean()
    loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    return out.detach().clone(), grads


def assert_agree(got_out, want_out, got_grads, want_grads, flipped: float, grad_error: float):
    """Spike outputs differ in at most a ``flipped`` fraction of places (a compiled Linear may
    round differently, and a value within an ulp of the threshold then fires differently);
    each gradient within ``grad_error`` relative (L2) error."""
    differing = (got_out.float() != want_out.float()).float().mean().item()
    assert differing <= flipped, f"{differing:.2%} of the spikes differ"
    for got, want in zip(got_grads, want_grads):
        error = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)).item()
        assert error <= grad_error, f"gradient {tuple(want.shape)}: relative error {error:.3g}"


def train_side_by_side(eager_model, eager_call, other_model, other_call, x, target, steps,
                       flipped: float = 0.0, grad_error: float = 1e-5):
    """SGD steps on both copies with the same inputs: outputs and gradients must agree."""
    opt_eager = torch.optim.SGD(eager_model.parameters(), lr=0.1)
    opt_other = torch.optim.SGD(other_model.parameters(), lr=0.1)
    for step in range(steps):
        xs = x + 0.1 * step
        want_out, want_grads = training_step(eager_call, xs, target, opt_eager)
        got_out, got_grads = training_step(other_call, xs, target, opt_other)
        assert_agree(got_out, want_out, got_grads, want_grads, flipped, grad_error)


@pytest.mark.parametrize("neuron_cls,kwargs", [(SLIF, {"channels": 64}), (PLIF, {}), (LIF, {})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_training_step_never_synchronises_the_host(neuron_cls, kwargs, dtype, device):
    model = ResetThenRun(small_network(neuron_cls, **kwargs)).to(device, dtype)
    x = (torch.randn(8, 16, 64, device=device) + 0.5).to(dtype).requires_grad_(True)
    target = torch.rand(8, 16, 64, device=device).to(dtype)
    training_step(model, x, target)  # first call: plans, constants and kernels made here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            training_step(model, x, target)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def test_make_graphed_callables_training_step(device):
    eager = ResetThenRun(small_network(SLIF, channels=64)).to(device)
    graphed_model = copy.deepcopy(eager)
    x = torch.randn(8, 16, 64, device=device) + 0.5
    target = torch.rand(8, 16, 64, device=device)
    graphed = torch.cuda.make_graphed_callables(graphed_model, (x.clone().requires_grad_(False),))
    train_side_by_side(eager, eager, graphed_model, graphed, x, target, steps=3)


@pytest.mark.compile
def test_compile_reduce_overhead_training_step(device):
    eager = ResetThenRun(small_network(SLIF, channels=64)).to(device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(8, 16, 64, device=device) + 0.5
    target = torch.rand(8, 16, 64, device=device)
    # 4 steps: cudagraph trees warm up, record, then replay
    train_side_by_side(eager, eager, compiled_model, compiled, x, target, steps=4,
                       flipped=1e-3, grad_error=2e-2)


def test_parameter_gradients_are_bitwise_deterministic(device):
    # On the GPU the kernel's programs really run concurrently: the in-kernel partials and
    # the fixed-order sum must give identical bits run after run.
    from effst import slif

    torch.manual_seed(3)
    x = torch.randn(12, 64, 4096, device=device) + 0.5
    grads = []
    for _ in range(3):
        w = torch.zeros(64, device=device, requires_grad=True)  # channel dim 0: partials
        theta = torch.ones((), device=device, requires_grad=True)  # per layer: partials
        w_neuron = torch.zeros(64, 4096, device=device, requires_grad=True)
        (slif(x, w, theta, channel_dim=0, backend="triton") * x).sum().backward()
        (slif(x, w_neuron, 1.0, backend="triton") * x).sum().backward()
        grads.append((w.grad.clone(), theta.grad.clone(), w_neuron.grad.clone()))
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other))
