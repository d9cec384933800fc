"""Spikes as bytes in training (issue 10): SpikeBytes (effst/ops/spike_bytes.py) carries the
sLIF's surrogate-gradient path while holding one byte per spike, and BlockSparseLinear reads and
saves the bytes. CPU; Triton paths under the interpreter (conftest)."""
import copy
import pickle

import pytest
import torch

import effst
from effst.nn.block_sparse import BlockSparseLinear
from effst.ops.spike_bytes import SpikeBytes, as_spike_bytes

BYTES = [torch.uint8, torch.bool]


def _spikes(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) > 0.6).to(dtype).requires_grad_()


def _layer(in_features, out_features, backend, seed=1, block=(16, 16), dtype=torch.float32):
    torch.manual_seed(seed)
    mask = torch.rand(-(-out_features // block[0]), -(-in_features // block[1])) > 0.4
    mask[0, 0] = True
    return BlockSparseLinear(in_features, out_features, block_size=block, block_mask=mask,
                             backend=backend, dtype=dtype)


def _saved(fn):
    """Run ``fn`` under saved_tensors_hooks: (its result, [(dtype, bytes) of each saved tensor]),
    a SpikeBytes listed as ("SpikeBytes", its bytes' dtype, their size)."""
    saved = []

    def pack(t):
        if isinstance(t, SpikeBytes):
            b = t.spike_bytes
            saved.append(("SpikeBytes", b.dtype, b.numel() * b.element_size()))
        else:
            saved.append((t.dtype, t.numel() * t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("byte_dtype", BYTES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_block_sparse_linear_reads_and_saves_bytes_with_the_same_gradients(backend, byte_dtype):
    """BlockSparseLinear on SpikeBytes: same output and gradients (spikes, values, bias) as on the
    float spikes, bit for bit in fp32; the node saves the uint8 bytes (1 byte per spike)."""
    layer = _layer(48, 40, backend)
    spikes = _spikes((3, 5, 48))
    grad_y = torch.randn(3, 5, 40)

    def run(x):
        out, saved = _saved(lambda: layer(x))
        grads = torch.autograd.grad(out, [spikes, layer.values, layer.bias], grad_y)
        return out, grads, saved

    ref, ref_grads, ref_saved = run(spikes)
    x = as_spike_bytes(spikes, byte_dtype)
    got, got_grads, got_saved = run(x)
    assert type(got) is torch.Tensor and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    for g, r in zip(got_grads, ref_grads):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, rtol=0, atol=0)
    # saved: x (fp32 -> the plain uint8 bytes: bool is read through a uint8 view) and the values
    assert ref_saved[0] == (torch.float32, spikes.numel() * 4)
    assert got_saved[0] == (torch.uint8, spikes.numel())
    assert got_saved[1:] == ref_saved[1:]


def test_block_sparse_linear_under_autocast_keeps_bytes_and_returns_a_float32_gradient():
    """Under bf16 autocast the weights are cast and SpikeBytes stays bytes (not cast to bf16):
    the same output and gradients as the float32 spikes, which autocast casts."""
    layer = _layer(32, 32, "torch")
    spikes = _spikes((6, 32), seed=3)
    results = []
    for x in (spikes, as_spike_bytes(spikes)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, saved = _saved(lambda: layer(x))
        results.append((out, torch.autograd.grad(out.float().square().sum(), [spikes, layer.values]), saved))
    (ref, ref_grads, _), (got, got_grads, got_saved) = results
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert got_grads[0].dtype == torch.float32
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=0)
    assert (torch.uint8, spikes.numel()) in got_saved


def test_views_keep_bytes_and_share_them():
    spikes = _spikes((2, 3, 4))
    x = as_spike_bytes(spikes)
    for view in (x.reshape(6, 4), x.view(2, 12), x.flatten(), x.flatten(1), x.transpose(0, 2),
                 x.permute(2, 0, 1), x.mT, x[1], x[:, 1:], x[..., None], x.unsqueeze(0).squeeze(0),
                 x.expand(5, 2, 3, 4), x.detach(), x.clone(), *x.unbind(1), *x.split(1, dim=2)):
        assert type(view) is SpikeBytes and view.dtype == torch.float32
        assert view.spike_bytes.dtype == torch.uint8
        assert view.spike_bytes.shape == view.shape and view.spike_bytes.stride() == view.stride()
    assert x.reshape(6, 4).spike_bytes.data_ptr() == x.spike_bytes.data_ptr()  # a view, no copy
    torch.testing.assert_close(x.transpose(0, 2).materialize(), spikes.detach().transpose(0, 2),
                               rtol=0, atol=0)
    # the gradient flows through views
    layer = _layer(12, 8, "torch")
    (grad,) = torch.autograd.grad(layer(x.reshape(2, 12)).sum(), [spikes])
    (ref,) = torch.autograd.grad(layer(spikes.reshape(2, 12)).sum(), [spikes])
    torch.testing.assert_close(grad, ref, rtol=0, atol=0)


@pytest.mark.parametrize("byte_dtype", BYTES)
def test_any_other_op_reads_the_float_value_with_its_gradient(byte_dtype):
    """Ops that do not read bytes see the float values: x * 2, nn.Linear (which saves the
    SpikeBytes itself: bytes only), a sum, comparisons, printing, .float()."""
    spikes = _spikes((4, 6), seed=5)
    x = as_spike_bytes(spikes, byte_dtype)
    linear = torch.nn.Linear(6, 3)
    w = torch.randn(4, 6, requires_grad=True)
    for f, saves_spikes in ((lambda s: s * 2, False), (lambda s: (s * w).sum(1), True),
                            (linear, True), (lambda s: torch.cat([s, s]), False),
                            (lambda s: s.sum(), False), (lambda s: torch.matmul(s, w.t()), True)):
        ref = f(spikes)
        got, saved = _saved(lambda: f(x))
        assert type(got) is torch.Tensor
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        g = torch.randn_like(ref)
        got_grads = torch.autograd.grad(got, [spikes, *linear.parameters(), w], g, allow_unused=True)
        ref_grads = torch.autograd.grad(ref, [spikes, *linear.parameters(), w], g, allow_unused=True)
        for a, b in zip(got_grads, ref_grads):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        if saves_spikes:  # what autograd saves of the spikes is their bytes
            assert ("SpikeBytes", byte_dtype, spikes.numel()) in saved
    assert bool((x == spikes).all()) and bool((x >= spikes).all())
    assert x.float().sum().item() == spikes.sum().item()
    assert torch.equal(x.to(torch.float64), spikes.detach().double())
    assert "SpikeBytes(" in repr(x) and f"stored as {byte_dtype}" in repr(x)


def test_pickle_and_deepcopy_keep_the_bytes():
    x = as_spike_bytes(_spikes((3, 4))).detach()
    for copied in (pickle.loads(pickle.dumps(x)), copy.deepcopy(x)):
        assert type(copied) is SpikeBytes and copied.dtype == x.dtype
        assert torch.equal(copied.spike_bytes, x.spike_bytes)
        assert copied.spike_bytes.data_ptr() != x.spike_bytes.data_ptr()
    with pytest.raises(RuntimeError, match="only graph leaves"):
        copy.deepcopy(as_spike_bytes(_spikes((3, 4))))


def test_refuses_writes_bad_arguments_and_compile():
    x = as_spike_bytes(_spikes((3, 4))).detach()
    for write in (lambda: x.add_(1), lambda: x.zero_(), lambda: torch.mul(x, 2, out=x),
                  lambda: x.copy_(torch.zeros(3, 4))):
        with pytest.raises(RuntimeError, match="read-only"):
            write()
    torch.zeros(3, 4).copy_(x)  # reading it into another tensor is fine
    with pytest.raises(TypeError, match="^spike_bytes:"):
        SpikeBytes(torch.zeros(3), torch.float32)
    with pytest.raises(TypeError, match="^dtype:"):
        SpikeBytes(torch.zeros(3, dtype=torch.uint8), torch.int32)
    with pytest.raises(ValueError, match="^spikes: expected 0/1"):
        as_spike_bytes(torch.tensor([0.0, 0.5]))
    with pytest.raises(TypeError, match="^byte_dtype:"):
        as_spike_bytes(torch.tensor([0.0, 1.0]), torch.int8)



def test_torch_compile_runs_it_eagerly_or_refuses_with_fullgraph():
    """Dynamo cannot trace SpikeBytes: torch.compile breaks the graph there and runs it eagerly
    (right values and gradient); fullgraph=True refuses; made while tracing, it raises."""
    spikes = _spikes((3, 4))
    x = as_spike_bytes(spikes)
    got = torch.compile(lambda s: s * 3, backend="eager")(x)
    torch.testing.assert_close(got, spikes * 3, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(got.sum(), [spikes])
    torch.testing.assert_close(grad, torch.full_like(spikes, 3.0), rtol=0, atol=0)
    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(lambda s: s * 2, backend="eager", fullgraph=True)(x.detach())
    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(lambda b: SpikeBytes(b, torch.float32) * 1, backend="eager",
                      fullgraph=True)(torch.ones(3, dtype=torch.uint8))
