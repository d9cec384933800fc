"""Spikformer (docs/pruning.md): configs, shapes, parameter counts, neuron choice, specs, and the
firing-rate / SOP recorder."""
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from effst.models import (
    CONFIGS,
    E_AC_PJ,
    E_MAC_PJ,
    Spikformer,
    SpikformerConfig,
    build_model,
    build_model_from_spec,
    count_parameters,
    prune_targets,
    record_firing_rates,
)
from effst.nn import LIF, PLIF, SLIF
from effst.nn.block_sparse import BlockSparseLinear
from model_helpers import attention_rate, lively, small


def expected_counts(depth, dim, heads, hidden, in_channels, num_classes, linear_bias=True):
    """Parameter count of the Spikformer of docs/pruning.md from its parts (independent of the code)."""
    widths = (in_channels, dim // 8, dim // 4, dim // 2, dim)
    sps = sum(widths[i] * widths[i + 1] * 9 + 2 * widths[i + 1] for i in range(4)) + dim * dim * 9 + 2 * dim
    weights = 4 * dim * dim + 2 * dim * hidden                 # q, k, v, proj, fc1, fc2
    biases = (4 * dim + hidden + dim) if linear_bias else 0
    batchnorms = 2 * (4 * dim + hidden + dim)
    blocks = depth * (weights + biases + batchnorms)
    head = dim * num_classes + num_classes
    return sps + blocks + head, depth * weights


def test_spikformer_4_384_matches_paper_parameter_count():
    model = build_model("spikformer-4-384")
    counts = count_parameters(model)
    # Paper (Table III): 9.32 M parameters, 7.08 M in the transformer blocks.
    assert round(counts["total"] / 1e6, 2) == 9.32
    assert round(counts["blocks"] / 1e6, 2) == 7.08
    total, blocks = expected_counts(4, 384, 12, 1536, 3, 10)
    assert counts["total"] == total and counts["blocks"] == blocks
    assert counts["total_dense"] == counts["total"]


def test_imagenet_and_dvs_parameter_counts():
    # Paper Table II (ImageNet-100): Spikformer-8-512-2048 has 29.24 M / 25.17 M.
    counts = count_parameters(build_model("spikformer-8-512", num_classes=100))
    assert round(counts["total"] / 1e6, 2) == 29.24
    assert round(counts["blocks"] / 1e6, 2) == 25.17
    # CIFAR10-DVS: bias-free Conv1d projections; blocks 12 * 256^2 * 2 = 1.57 M.
    counts = count_parameters(build_model("spikformer-2-256"))
    total, blocks = expected_counts(2, 256, 16, 1024, 2, 10, linear_bias=False)
    assert counts["total"] == total and counts["blocks"] == blocks


def test_configs_have_the_paper_shapes():
    c = CONFIGS["spikformer-4-384"]
    assert (c.depth, c.dim, c.hidden, c.heads, c.T, c.image_size, c.in_channels) == (4, 384, 1536, 12, 4, 32, 3)
    assert c.tokens() == 64 and c.attn_scale == 0.125 and c.mlp_ratio == 4
    c = CONFIGS["spikformer-2-256"]
    assert (c.depth, c.dim, c.hidden, c.heads, c.T, c.image_size, c.in_channels) == (2, 256, 1024, 16, 16, 128, 2)
    assert c.tokens() == 64 and c.attn_scale == 0.25 and c.variant == "dvs"
    c = CONFIGS["spikformer-8-512"]
    assert (c.depth, c.dim, c.hidden, c.heads, c.T, c.image_size) == (8, 512, 2048, 8, 4, 224)
    assert c.tokens() == 196
    c = CONFIGS["spikformer-tiny"]
    assert (c.image_size, c.in_channels, c.num_classes) == (8, 1, 10)


def test_module_names_and_prune_targets():
    model = small(depth=2)
    names = prune_targets(model)
    assert names[:6] == [f"blocks.0.attn.{n}" for n in ("q_linear", "k_linear", "v_linear", "proj_linear")] + \
        ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    assert len(names) == 12
    for name in names:
        assert isinstance(model.get_submodule(name), nn.Linear)
    dvs = small("spikformer-2-256", depth=1, dim=32, heads=4, hidden=64, image_size=16, T=2)
    for name in prune_targets(dvs):
        layer = dvs.get_submodule(name)
        assert isinstance(layer, nn.Conv1d) and layer.kernel_size == (1,) and layer.bias is None

    class Wrapper(nn.Module):  # stands for DDP: the model under .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert prune_targets(Wrapper(model))[0] == "module.blocks.0.attn.q_linear"
    with pytest.raises(TypeError, match="model"):
        prune_targets(nn.Linear(2, 2))


@pytest.mark.parametrize("neuron, cls", [("lif", LIF), ("plif", PLIF), ("slif", SLIF), ("stl", SLIF)])
def test_neuron_choice_and_settings(neuron, cls):
    model = small(neuron=neuron)
    neurons = dict(model.neurons())
    assert len(neurons) == 5 + 7  # SPS: 4 stages + RPE; block: q, k, v, attn, proj, fc1, fc2
    for name, node in neurons.items():
        assert type(node) is cls
        assert node.surrogate == "sigmoid" and node.alpha == 4.0
        assert node.v_reset == 0.0 and node.detach_reset and node.decay_input
        assert torch.allclose(node.tau, torch.tensor(2.0))
        expected = 0.5 if name.endswith("attn_lif") else 1.0
        assert torch.all(node.v_threshold == expected)
    if neuron in ("slif", "stl"):
        q = model.blocks[0].attn.q_lif
        assert q.channels == model.config.dim and q.w.shape == (model.config.dim,)
        assert isinstance(q.v_threshold, nn.Parameter)
        assert isinstance(q.w, nn.Parameter) == (neuron == "slif")
        assert model.patch_embed.proj_lif.channels == model.config.dim // 8
    per_layer = small(neuron="slif", channels=False)
    assert per_layer.blocks[0].attn.q_lif.w.shape == ()


def test_forward_shapes_layouts_and_odd_sizes():
    model = small()
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert model(torch.randn(2, 4, 1, 8, 8)).shape == (2, 10)          # [B, T, C, H, W] frames
    assert model(torch.randn(1, 1, 9, 7)).shape == (1, 10)             # odd spatial size
    cifar = small("spikformer-4-384", depth=1, dim=32, heads=4, hidden=64, num_classes=7, T=2)
    assert cifar(torch.randn(2, 3, 16, 16)).shape == (2, 7)
    dvs = small("spikformer-2-256", depth=1, dim=32, heads=4, hidden=64, image_size=32, T=3)
    assert dvs(torch.randn(2, 3, 2, 32, 32)).shape == (2, 10)
    imagenet = small("spikformer-8-512", depth=1, dim=32, heads=2, hidden=48, num_classes=5, T=1)
    assert imagenet(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    # Non-contiguous input gives the same result as its contiguous copy.
    x = torch.randn(1, 8, 8, 2).permute(3, 0, 1, 2) * 3
    lively(model, x.contiguous())
    assert attention_rate(model, x) > 0.05
    assert torch.equal(model(x), model(x.contiguous()))


def test_forward_is_stateless_across_calls():
    model = small(neuron="slif")
    x = torch.randn(2, 1, 8, 8) * 3
    lively(model, x)
    assert attention_rate(model, x) > 0.05
    first = model(x)
    model(torch.randn(5, 1, 8, 8))
    assert torch.equal(model(x), first)
    assert all(isinstance(node.v, float) for _, node in model.neurons())


def test_bad_inputs_and_arguments_are_named():
    model = small()
    with pytest.raises(ValueError, match=r"x: expected \[B, 1, H, W\]"):
        model(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="T=4"):
        model(torch.randn(2, 3, 1, 8, 8))
    with pytest.raises(TypeError, match="floating"):
        model(torch.zeros(2, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="neuron"):
        build_model("spikformer-tiny", neuron="izhikevich")
    with pytest.raises(ValueError, match="name"):
        build_model("spikformer-3-1000")
    with pytest.raises(TypeError, match="unknown arguments"):
        build_model("spikformer-tiny", widht=3)
    with pytest.raises(ValueError, match="heads"):
        build_model("spikformer-tiny", heads=3)
    with pytest.raises(ValueError, match="backend"):
        build_model("spikformer-tiny", backend="cuda")
    with pytest.raises(ValueError, match="depth"):
        build_model("spikformer-tiny", depth=0)


def test_spikingjelly_neurons_give_identical_outputs_and_gradients():
    torch.manual_seed(0)
    peer = build_model("spikformer-tiny", neuron="spikingjelly").double()
    ours = small(neuron="lif").double()
    missing, unexpected = ours.load_state_dict(peer.state_dict(), strict=False)
    assert not unexpected and all(k.endswith((".w", ".v_threshold")) for k in missing)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64) * 3
    lively(peer, x)
    ours.load_state_dict(peer.state_dict(), strict=False)
    assert attention_rate(ours, x) > 0.05  # the comparison is not between silent networks
    assert torch.equal(ours.eval()(x), peer.eval()(x))
    ours.train(), peer.train()
    y_ours, y_peer = ours(x), peer(x)
    assert torch.equal(y_ours, y_peer)
    y_ours.square().sum().backward()
    y_peer.square().sum().backward()
    peer_params = dict(peer.named_parameters())
    assert set(peer_params) == {name for name, _ in ours.named_parameters()}
    for name, p in ours.named_parameters():
        assert p.grad is not None and peer_params[name].grad is not None, name
        torch.testing.assert_close(p.grad, peer_params[name].grad, rtol=1e-9, atol=1e-12)
    assert ours.blocks[0].attn.q_linear.weight.grad.abs().sum() > 0


def test_training_step_reaches_neuron_parameters():
    model = small(neuron="slif")
    x, y = torch.randn(8, 1, 8, 8) * 3, torch.randint(0, 10, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    q = model.blocks[0].attn.q_lif
    assert q.w.grad is not None and q.w.grad.abs().sum() > 0
    assert q.v_threshold.grad is not None and q.v_threshold.grad.abs().sum() > 0
    assert model.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0


def test_count_parameters_excludes_pruned_synapses():
    model = small()
    dense = count_parameters(model)
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[:, :5].zero_()  # zeros without a mask are still parameters
    torch_prune.l1_unstructured(model.blocks[0].attn.q_linear, "weight", amount=100)  # masked
    counts = count_parameters(model)
    assert counts["blocks"] == dense["blocks"] - 100
    assert counts["total"] == dense["total"] - 100
    assert counts["blocks_all"] == dense["blocks_all"] - 100
    assert counts["blocks_dense"] == dense["blocks"] and counts["total_dense"] == dense["total"]
    # Block-sparse: only the entries inside kept tiles are parameters.
    fc1 = model.blocks[0].mlp.fc1  # [128, 32]: a 8 x 2 grid of 16 x 16 tiles
    keep = torch.zeros(8, 2, dtype=torch.bool)
    keep[::2, 0] = True
    model.blocks[0].mlp.fc1 = BlockSparseLinear.from_dense(fc1, mask=keep, block_size=(16, 16))
    counts = count_parameters(model)
    assert counts["blocks"] == dense["blocks"] - 100 - (fc1.weight.numel() - 4 * 256)
    assert counts["total"] == dense["total"] - 100 - (fc1.weight.numel() - 4 * 256)
    assert counts["blocks_dense"] == dense["blocks"]


def test_spec_round_trip_rebuilds_the_architecture():
    model = small(neuron="slif", depth=2)
    x = torch.randn(2, 1, 8, 8) * 3
    lively(model, x)
    rebuilt = build_model_from_spec(model.spec())
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    assert attention_rate(model, x) > 0.05
    assert torch.equal(model(x), rebuilt(x))
    assert SpikformerConfig.from_dict(model.config.to_dict()) == model.config
    with pytest.raises(ValueError, match="unknown fields"):
        SpikformerConfig.from_dict({**model.config.to_dict(), "colour": 1})


def test_record_firing_rates_against_hand_counts():
    model = small(neuron="lif")
    x = torch.randn(4, 1, 8, 8) * 3
    lively(model, x)
    captured = {}
    handles = [model.blocks[0].mlp.fc1_lif.register_forward_hook(lambda m, i, o: captured.__setitem__("fc1", o)),
               model.blocks[0].attn.v_lif.register_forward_hook(lambda m, i, o: captured.__setitem__("v", o))]
    with torch.no_grad(), record_firing_rates(model) as rec:
        model(x)
    for h in handles:
        h.remove()
    summary = rec.summary()
    c, T, N = model.config, model.T, model.config.tokens()
    fc1_rate = captured["fc1"].mean().item()
    assert fc1_rate > 0 and captured["v"].mean() > 0
    assert summary["samples"] == 4
    assert math.isclose(summary["firing_rates"]["blocks.0.mlp.fc1_lif"], fc1_rate, rel_tol=1e-9)
    layers = {row["name"]: row for row in summary["layers"]}
    # docs/pruning.md: SOPs = T * firing rate * FLOPs; fc2 is fed by fc1's spikes.
    fc2 = layers["blocks.0.mlp.fc2"]
    assert fc2["spiking_input"]
    assert math.isclose(fc2["sops_per_sample"], T * fc1_rate * N * c.hidden * c.dim, rel_tol=1e-9)
    av = layers["blocks.0.attn.av"]
    assert math.isclose(av["sops_per_sample"], T * captured["v"].mean().item() * N * N * c.width, rel_tol=1e-9)
    # The encoding conv (real-valued image) and the classifier are multiply-accumulates.
    first, head = layers["patch_embed.proj_conv"], layers["head"]
    assert not first["spiking_input"] and not head["spiking_input"]
    assert first["macs_per_sample"] == T * (c.dim // 8) * c.in_channels * 9 * 8 * 8
    assert head["macs_per_sample"] == c.dim * c.num_classes
    energy = sum(r["sops_per_sample"] for r in layers.values()) * E_AC_PJ + \
        (first["macs_per_sample"] + head["macs_per_sample"]) * E_MAC_PJ
    assert math.isclose(summary["energy_mj_per_sample"], energy * 1e-9, rel_tol=1e-9)
    # Pruned synapses do no work.
    with torch.no_grad():
        model.blocks[0].mlp.fc2.weight[:, : c.hidden // 2].zero_()
    with torch.no_grad(), record_firing_rates(model) as rec:
        model(x)
    half = {row["name"]: row for row in rec.layers()}["blocks.0.mlp.fc2"]
    assert half["macs_per_sample"] == fc2["macs_per_sample"] / 2
    assert all(not h for h in model._forward_hooks.values())  # hooks removed


def test_counts_and_records_follow_effst_l1p_masks():
    from effst.prune import l1p

    model = small(neuron="lif").eval()
    dense = count_parameters(model)
    x = torch.randn(2, 1, 8, 8) * 3
    with torch.no_grad(), record_firing_rates(model) as before:
        model(x)
    l1p(model, 0.75, targets=prune_targets(model))
    counts = count_parameters(model)
    assert counts["blocks"] == dense["blocks"] // 4
    assert counts["total"] == dense["total"] - 3 * dense["blocks"] // 4
    assert counts["blocks_dense"] == dense["blocks"]
    with torch.no_grad(), record_firing_rates(model) as after:
        model(x)
    macs = {row["name"]: row["macs_per_sample"] for row in after.layers()}
    for row in before.layers():
        if row["name"] in prune_targets(model):
            assert macs[row["name"]] == row["macs_per_sample"] / 4


def test_spikingjelly_cupy_peer_needs_the_old_version():
    # CI has SpikingJelly 2.0.0, whose LIFNode has no backend argument.
    with pytest.raises(ValueError, match="0.0.0.0.x"):
        build_model("spikformer-tiny", neuron="spikingjelly-cupy")


@pytest.mark.parametrize("where", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fused_triton_backend_matches_the_reference_in_a_model(device, where):
    """A whole Spikformer on the fused Triton kernels against the same model on the reference.
    On the CPU the kernels run under the interpreter (tests/conftest.py), in float32, and must
    agree exactly; on a GPU in float64, so that no spike flips on an FMA rounding difference."""
    if where != device:
        pytest.skip(f"the kernels run on {device} in this session")
    torch.manual_seed(0)
    dtype = torch.float32 if device == "cpu" else torch.float64
    shape = dict(neuron="slif", dim=16, heads=2, hidden=32, T=2)
    reference = small(**shape).to(device, dtype)
    x = torch.randn(2, 1, 8, 8, device=device, dtype=dtype) * 3
    lively(reference, x)
    assert attention_rate(reference, x) > 0.05  # not a comparison of silent networks
    reference.train()
    fused = build_model("spikformer-tiny", backend="triton", **shape).to(device, dtype)
    fused.load_state_dict(reference.state_dict())
    y_ref, y_fused = reference(x), fused(x)
    if device == "cpu":
        assert torch.equal(y_fused, y_ref)
        tol = dict(rtol=1e-4, atol=1e-6)
    else:
        tol = dict(rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(y_fused, y_ref, **tol)
    y_ref.square().sum().backward()
    y_fused.square().sum().backward()
    fused_params = dict(fused.named_parameters())
    for name, p in reference.named_parameters():
        assert p.grad is not None and fused_params[name].grad is not None, name
        torch.testing.assert_close(fused_params[name].grad, p.grad, **tol)
    q = fused.blocks[0].attn.q_lif
    assert q.w.grad.abs().sum() > 0 and q.v_threshold.grad.abs().sum() > 0
