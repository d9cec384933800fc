"""Stateful neurons under torch.utils.checkpoint: the recompute runs inside the backward pass,
after the first forward has already updated the membrane state. A recompute that found a stored
state would start from the wrong one (silently wrong gradients), so it is refused by name; a
checkpointed function that resets its neurons first gives the gradients of the plain run."""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from effst.nn import LIF, SLIF, reset

F64 = torch.float64


def _network(backend: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 6), SLIF(channels=6, backend=backend),
                               torch.nn.Linear(6, 6), LIF(backend=backend)).double()


def _gradients(model, x, run):
    model.zero_grad()
    out = run(model, x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=F64).view_as(out)).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_checkpoint_with_reset_inside_matches_the_plain_run(backend, reentrant):
    model = _network(backend)
    x = torch.randn(5, 3, 6, dtype=F64, requires_grad=True) + 0.8

    def reset_then_run(m, inputs):
        reset(m)
        return m(inputs)

    want = _gradients(model, x, reset_then_run)
    got = _gradients(model, x, lambda m, inputs: checkpoint(reset_then_run, m, inputs, use_reentrant=reentrant))
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_checkpoint_recompute_with_a_stored_state_is_refused(backend, reentrant):
    model = _network(backend)
    x = torch.randn(5, 3, 6, dtype=F64, requires_grad=True) + 0.8
    reset(model)
    out = checkpoint(model, x, use_reentrant=reentrant)   # leaves a tensor state behind
    with pytest.raises(RuntimeError, match="SLIF: called during a backward pass"):
        out.sum().backward()
