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


def _assert_same_gradients(got, want):
    """Bit-identical gradients, None (allow_unused) in the same places."""
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


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
        _assert_same_gradients(got_grads, ref_grads)
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


SLIF_BACKENDS = ["triton", "reference", "native"]


def _slif_chain(backend, spike_dtype, layer, seed=7):
    """x -> effst.slif (per-channel w, theta) -> BlockSparseLinear -> weighted sum: (loss, spikes,
    gradients of x, w, theta, values, bias)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(4, 3, 48, generator=g) * 2).requires_grad_()
    w = torch.randn(48, generator=g).requires_grad_()
    theta = (torch.rand(48, generator=g) + 0.5).requires_grad_()
    weights = torch.randn(4, 3, layer.out_features, generator=g)
    spikes = effst.slif(x, w, theta, backend=backend, spike_dtype=spike_dtype)
    loss = (layer(spikes) * weights).sum()
    return loss, spikes, torch.autograd.grad(loss, [x, w, theta, layer.values, layer.bias])


@pytest.mark.parametrize("byte_dtype", BYTES)
@pytest.mark.parametrize("backend", SLIF_BACKENDS)
def test_slif_to_block_sparse_linear_trains_with_byte_spikes_bit_for_bit(backend, byte_dtype):
    """effst.slif(spike_dtype=uint8/bool) with a gradient needed returns a SpikeBytes holding the
    kernel's bytes; SLIF -> BlockSparseLinear -> loss gives the loss and the gradients of x, w,
    theta, the weight and the bias of spike_dtype=None, bit for bit (fp32), on every backend."""
    layer = _layer(48, 40, "triton" if backend == "triton" else "torch")
    ref_loss, ref_spikes, ref_grads = _slif_chain(backend, None, layer)
    loss, spikes, grads = _slif_chain(backend, byte_dtype, layer)
    assert type(spikes) is SpikeBytes and spikes.dtype == torch.float32 and spikes.grad_fn is not None
    assert spikes.spike_bytes.dtype == byte_dtype
    torch.testing.assert_close(spikes.materialize(), ref_spikes.detach(), rtol=0, atol=0)
    assert ref_spikes.detach().sum() > 0 and (1 - ref_spikes.detach()).sum() > 0  # both kinds present
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert grads[0].abs().sum() > 0  # the surrogate gradient reached x


@pytest.mark.parametrize("backend", SLIF_BACKENDS)
def test_a_spike_bytes_input_to_the_slif_kernels_is_read_as_its_float_values(backend):
    """A SpikeBytes fed straight into another sLIF (its Triton kernels take data pointers, which a
    wrapper tensor does not have): spikes, state and the gradient of the first neuron's input
    equal the float spikes' exactly."""
    g = torch.Generator().manual_seed(8)
    x = (torch.randn(5, 3, 16, generator=g) + 0.4).requires_grad_()
    weights = torch.randn(5, 3, 16, generator=g)
    results = []
    for spike_dtype in (None, torch.uint8):
        first = effst.slif(x, 0.3, 0.5, backend=backend, spike_dtype=spike_dtype)
        second, state = effst.slif(first.transpose(1, 2), 0.5, 0.5, backend=backend, return_state=True)
        loss = (second.transpose(1, 2) * weights).sum()
        results.append((second.detach(), state.detach(), torch.autograd.grad(loss, [x])[0]))
        assert (type(first) is SpikeBytes) == (spike_dtype is not None)
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert results[0][0].sum() > 0 and results[0][2].abs().sum() > 0


def test_a_spike_bytes_input_to_the_token_kernels_is_read_as_its_float_values():
    """STATA's query/key spikes, the tokens gathered/scattered/averaged and STS's scores as a
    SpikeBytes give the float spikes' results (Triton kernels under the interpreter)."""
    from effst.nn import LIF
    from effst.nn.token_routing import run_neuron_on_tokens
    from effst.ops import token_select as ts

    g = torch.Generator().manual_seed(9)
    as_bytes = lambda t: as_spike_bytes(t, torch.uint8)  # noqa: E731
    query, keys = (torch.rand(4, 8, generator=g) < 0.5).float(), (torch.rand(4, 6, 8, generator=g) < 0.5).float()
    x = (torch.rand(4, 6, 5, generator=g) < 0.5).float()
    index = torch.stack([torch.randperm(6, generator=g)[:3].sort().values for _ in range(4)])
    keep = torch.rand(2, 6, generator=g) < 0.6
    keep[:, 0] = True
    cases = [
        (lambda q, k, v: ts.anchor_topk_gather(q, k, v, 3, backend="triton"), (query, keys, x)),
        (lambda s, v: ts.topk_gather(s, v, 2, backend="triton"), (x[..., 0], x)),
        (lambda v: ts.gather_tokens(v, index, backend="triton"), (x,)),
        (lambda v: ts.scatter_tokens(v[:, :3], index, 6, backend="triton"), (x,)),
        (lambda v: ts.masked_mean(v.reshape(2, 2, 6, 5), keep, backend="triton"), (x,)),
        (lambda v: run_neuron_on_tokens(LIF(backend="triton"), v[:, :3].reshape(2, 2, 3, 5),
                                        index.view(2, 2, 3), 6), (x,)),  # the fused routed neuron
    ]
    for fn, args in cases:
        want = fn(*args)
        got = fn(*(as_bytes(a) for a in args))
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert type(a) is torch.Tensor
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", SLIF_BACKENDS)
def test_byte_spikes_without_a_gradient_stay_plain_bytes(backend):
    x = torch.randn(3, 16).requires_grad_()
    with torch.no_grad():
        spikes = effst.slif(x, 0.0, 1.0, backend=backend, spike_dtype=torch.uint8)
    assert type(spikes) is torch.Tensor and spikes.dtype == torch.uint8
    spikes = effst.slif(x.detach(), 0.0, 1.0, backend=backend, spike_dtype=torch.bool)  # nothing requires grad
    assert type(spikes) is torch.Tensor and spikes.dtype == torch.bool


@pytest.mark.parametrize("backend", SLIF_BACKENDS)
def test_slif_module_trains_with_byte_spikes(backend):
    """The SLIF module with spike_dtype=uint8: a SpikeBytes in training (w and theta learn the
    same gradients as with float spikes), plain uint8 under no_grad."""
    from effst.nn import SLIF

    x = (torch.randn(4, 2, 16, generator=torch.Generator().manual_seed(3)) * 2).requires_grad_()
    grads = []
    for spike_dtype in (None, torch.uint8):
        neuron = SLIF(channels=16, backend=backend, spike_dtype=spike_dtype)
        spikes = neuron(x)
        assert (type(spikes) is SpikeBytes) == (spike_dtype is not None)
        grads.append(torch.autograd.grad((spikes * torch.arange(16.0)).sum(), [x, neuron.w, neuron.v_threshold]))
        neuron.reset()
        with torch.no_grad():
            assert neuron(x).dtype == (spike_dtype or torch.float32)
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_slif_byte_spikes_with_a_gradient_refused_while_compiling():
    """Traced by torch.compile, the sLIF refuses byte spikes that need a gradient, by name (float
    spikes compile, as tests/test_slif_api.py checks)."""
    x = torch.randn(4, 3, 5, requires_grad=True)
    w, theta = torch.zeros(5, requires_grad=True), torch.full((5,), 0.8, requires_grad=True)

    def f(spike_dtype):
        return torch.compile(lambda x, w, theta: effst.slif(x, w, theta, backend="triton", spike_dtype=spike_dtype) * 2,
                             fullgraph=True, backend="aot_eager")(x, w, theta)

    assert f(None).requires_grad
    with pytest.raises(Exception, match=r"spike_dtype=torch.uint8 with a gradient .* torch.compile"):
        f(torch.uint8)


def test_spikformer_trains_with_byte_spikes_bit_for_bit():
    """spikformer-tiny (sLIF, block-sparse projections): the byte-reading neurons emitting uint8
    spikes in training give the same loss and the same gradient for every parameter as float
    spikes, and the BlockSparseLinear nodes they feed save bytes."""
    from effst import prune
    from effst.benchmarks.sparse import SPIKE_BYTE_READERS
    from effst.models import build_model
    from effst.models.spikformer import prune_targets
    from effst.nn import reset

    torch.manual_seed(15)
    net = build_model("spikformer-tiny", neuron="slif", backend="reference").train()
    targets = prune_targets(net)
    prune.block_l1p(net, 0.5, targets=[t for t in targets if t.endswith("fc2")], block_size=(16, 16))
    prune.to_block_sparse(net, targets=targets)
    x = torch.rand(2, 1, 8, 8) * 3
    y = torch.tensor([1, 3])
    readers = [m for name, m in net.neurons() if name.endswith(SPIKE_BYTE_READERS)]
    results = []
    for spike_dtype in (None, torch.uint8):
        for module in readers:
            module.spike_dtype = spike_dtype
        reset(net)
        loss, saved = _saved(lambda: torch.nn.functional.cross_entropy(net(x), y))
        params = [p for p in net.parameters() if p.requires_grad]
        results.append((loss, torch.autograd.grad(loss, params, allow_unused=True), saved))
    (ref, ref_grads, ref_saved), (got, got_grads, got_saved) = results
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    _assert_same_gradients(got_grads, ref_grads)
    assert sum(1 for entry in got_saved if entry[0] == torch.uint8) >= 2  # proj_linear and fc2 save bytes
    assert not any(entry[0] == torch.uint8 for entry in ref_saved)


def test_token_routed_neurons_still_refuse_byte_spikes_that_need_grad():
    """The fused token-routed neuron cannot return a SpikeBytes: it refuses by name (no silent
    loss of the gradient)."""
    from effst.nn import SLIF
    from effst.nn.token_routing import run_neuron_on_tokens

    neuron = SLIF(channels=4, backend="triton", spike_dtype=torch.uint8)
    current = torch.randn(2, 1, 3, 4, requires_grad=True)
    index = torch.tensor([[[0, 2, 4]], [[1, 2, 3]]])
    with pytest.raises(ValueError, match=r"spike_dtype=torch.uint8: this path \(token-routed neurons\)"):
        run_neuron_on_tokens(neuron, current, index, 5)


def test_sparse_suite_counts_saved_training_bytes_exactly():
    """The spike-bytes row's training count (CPU: batch 1 and 2, linear to the row's batch):
    equal to a direct count at that batch, and the saving is exactly one byte per spike that a
    BlockSparseLinear saves (attention -> proj_linear, fc1 -> fc2: bf16 under autocast -> uint8);
    the loss is unchanged."""
    from effst.benchmarks import sparse

    cifar = {"image_size": 32, "variant": "cifar", "num_classes": 10, "in_channels": 3}
    batch = 3
    row = sparse._spike_bytes_training("cpu", batch, True, cifar)
    elements = sparse.spike_elements(sparse.SPIKE_BYTES_MODEL, cifar)
    into_bsl = sum(n for key, n in elements.items() if key.endswith(("attn.attn_lif", "mlp.fc1_lif")))
    per_image = row["train_saved_bytes_float_spikes_per_image"] - row["train_saved_bytes_uint8_spikes_per_image"]
    assert per_image == into_bsl * 4 * (2 - 1)  # T = 4 steps, 2 B -> 1 B per spike
    assert row["train_saved_saving_bytes"] == per_image * batch > 0
    assert row["train_loss_float_spikes_batch2"] == row["train_loss_uint8_spikes_batch2"]
    # the linear extrapolation against a direct count at the row's batch
    net, x = sparse._build(sparse.SPIKE_BYTES_MODEL, "cpu", batch, cifar, block_sparse=True)
    net.train()
    for module in net.modules():
        if isinstance(module, BlockSparseLinear):
            module.backend = "torch"
    for key, module in net.neurons():
        if key.endswith(sparse.SPIKE_BYTE_READERS):
            module.spike_dtype = torch.uint8

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = net(x)
        return torch.nn.functional.cross_entropy(logits.float(), torch.zeros(batch, dtype=torch.long))

    _, by_dtype = sparse.saved_activation_bytes(forward, list(net.parameters()) + list(net.buffers()))
    assert sum(by_dtype.values()) == row["train_saved_bytes_uint8_spikes"]
    assert by_dtype["uint8"] >= into_bsl * 4 * batch


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_slif_to_block_sparse_linear_with_byte_spikes(device, dtype, monkeypatch):
    """On CUDA: the Triton sLIF's byte spikes (SpikeBytes) into the Triton BlockSparseLinear give
    the loss and the gradients of float spikes exactly (fp32 and bf16 layers). Autotuning off:
    the two input dtypes are tuned apart, and another grad-weight M split sums in another order."""
    monkeypatch.setenv("EFFST_BSL_AUTOTUNE", "0")
    layer = _layer(256, 128, "triton", block=(64, 64), dtype=dtype).to(device)
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(4, 64, 256, generator=g) * 2).to(device=device, dtype=dtype).requires_grad_()
    w = torch.randn(256, generator=g).to(device).requires_grad_()
    weights = torch.randn(4, 64, 128, generator=g).to(device=device, dtype=dtype)
    results = []
    for spike_dtype in (None, torch.uint8):
        spikes = effst.slif(x, w, 1.0, backend="triton", spike_dtype=spike_dtype)
        assert (type(spikes) is SpikeBytes) == (spike_dtype is not None)
        loss = (layer(spikes).float() * weights).sum()
        results.append((loss, torch.autograd.grad(loss, [x, w, layer.values, layer.bias])))
    (ref, ref_grads), (got, got_grads) = results
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_spike_bytes_row_trains_with_float_and_uint8_spikes(device, monkeypatch):
    """The spike-bytes row's training part on CUDA (32x32 shape, quick): counted at the row's
    batch, saving exactly 1 B per spike saved by proj_linear / fc2, the same loss (autotuning
    off, as above), both steps timed."""
    monkeypatch.setenv("EFFST_BSL_AUTOTUNE", "0")
    from effst.benchmarks import sparse

    cifar = {"image_size": 32, "variant": "cifar", "num_classes": 10, "in_channels": 3}
    row = sparse._spike_bytes_training("cuda", 4, True, cifar)
    elements = sparse.spike_elements(sparse.SPIKE_BYTES_MODEL, cifar)
    into_bsl = sum(n for key, n in elements.items() if key.endswith(("attn.attn_lif", "mlp.fc1_lif")))
    assert row["train_saved_saving_bytes"] == into_bsl * 4 * 4  # batch 4, T = 4, 2 B -> 1 B
    assert row["train_loss_float_spikes_batch4"] == row["train_loss_uint8_spikes_batch4"]
    for key in ("train_ms_float_spikes", "train_ms_uint8_spikes", "train_speedup_uint8_spikes"):
        assert row[key] > 0, key
