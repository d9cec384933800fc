"""effst.convert: LIF-type neurons -> sLIF with everything carried over; outputs identical before
any training step, inside a Spikformer and inside foreign SpikingJelly networks."""
import copy
import warnings

import pytest
import torch
from torch import nn
from spikingjelly.activation_based import functional, layer, neuron, surrogate

from effst.convert import convert, is_convertible
from effst.models import build_model_from_spec
from effst.nn import LIF, PLIF, SLIF
from model_helpers import attention_rate, lively, small


def spiking_input(batch=4, dtype=torch.float32):
    torch.manual_seed(0)
    return torch.randn(batch, 1, 8, 8, dtype=dtype) * 3


@pytest.mark.parametrize("source", ["lif", "spikingjelly"])
@pytest.mark.parametrize("train", [False, True])
def test_spikformer_outputs_unchanged(source, train):
    torch.manual_seed(0)
    model = small(neuron=source).double()
    x = spiking_input(dtype=torch.float64)
    lively(model, x).train(train)
    assert attention_rate(model, x) > 0.05
    before = model(x)
    convert(model, "slif", channels=True, backend="reference")
    nodes = dict(model.neurons())
    assert len(nodes) == 12 and all(type(n) is SLIF for n in nodes.values())
    assert torch.equal(model(x), before)
    # Carried over: tau 2, V_th 1 (0.5 in attention), hard reset 0, detach_reset, sigmoid(4).
    attn = model.blocks[0].attn.attn_lif
    assert attn.channels == model.config.width and attn.channel_dim == -1
    assert torch.all(attn.v_threshold == 0.5) and torch.allclose(attn.tau, torch.tensor(2.0, dtype=torch.float64))
    assert attn.surrogate == "sigmoid" and attn.alpha == 4.0 and attn.detach_reset and attn.v_reset == 0.0
    assert model.patch_embed.proj_lif.channels == model.config.dim // 8
    assert model.patch_embed.proj_lif.channel_dim == -3
    assert isinstance(attn.w, nn.Parameter) and isinstance(attn.v_threshold, nn.Parameter)
    assert attn.w.dtype == torch.float64 and attn.training == train
    # The converted model records what it is now, so its spec rebuilds it.
    assert model.neuron == "slif" and model.channels
    rebuilt = build_model_from_spec(model.spec()).double().train(train)
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt(x), before)


def test_gradients_match_the_spikingjelly_model():
    torch.manual_seed(0)
    peer = small(neuron="spikingjelly").double()
    x = spiking_input(dtype=torch.float64)
    lively(peer, x).train()
    ours = convert(copy.deepcopy(peer), "slif", backend="reference")
    peer(x).square().sum().backward()
    ours(x).square().sum().backward()
    peer_grads = {n: p.grad for n, p in peer.named_parameters()}
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        if name in peer_grads:
            torch.testing.assert_close(p.grad, peer_grads[name], rtol=1e-9, atol=1e-12)
        else:  # the new intrinsic parameters learn
            assert name.endswith((".w", ".v_threshold")) and p.grad.abs().sum() > 0, name
    assert ours.blocks[0].attn.q_linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("target", ["slif", "stl", "plif", "lif"])
def test_every_target_kind(target):
    model = small(neuron="lif")
    x = spiking_input()
    lively(model, x)
    before = model(x)
    convert(model, target, backend="reference")
    q = model.blocks[0].attn.q_lif
    learn_tau, learn_threshold = {"slif": (True, True), "stl": (False, True), "plif": (True, False),
                                  "lif": (False, False)}[target]
    assert q.learn_tau == learn_tau and q.learn_threshold == learn_threshold
    assert q.w.dim() == (1 if target in ("slif", "stl") else 0)
    assert torch.equal(model(x), before)


def sj_network(step_mode="m"):
    """A foreign SpikingJelly CNN: conv -> BN -> LIF, conv -> PLIF, flatten -> linear -> LIF."""
    torch.manual_seed(0)
    net = nn.Sequential(
        layer.Conv2d(1, 4, 3, padding=1, bias=False), layer.BatchNorm2d(4),
        neuron.LIFNode(tau=3.0, v_threshold=0.8, surrogate_function=surrogate.ATan(alpha=3.0), detach_reset=True),
        layer.Conv2d(4, 6, 3, padding=1),
        neuron.ParametricLIFNode(init_tau=2.5, v_reset=None, decay_input=False,
                                 surrogate_function=surrogate.Rect(alpha=0.8)),
        layer.Flatten(), layer.Linear(6 * 8 * 8, 10),
        neuron.LIFNode(tau=2.0, surrogate_function=surrogate.Sigmoid(alpha=4.0)),
    )
    with torch.no_grad():
        net[4].w.fill_(0.37)  # a learned-looking w, copied exactly (not through tau)
        net[3].weight.mul_(8)  # so that every layer fires
        net[6].weight.mul_(10)
    functional.set_step_mode(net, step_mode)
    return net


def run(net, x, step_mode):
    functional.reset_net(net)
    if step_mode == "m":
        return net(x)
    return torch.stack([net(x_t) for x_t in x])


@pytest.mark.parametrize("step_mode", ["m", "s"])
def test_foreign_spikingjelly_network_outputs_unchanged(step_mode):
    net = sj_network(step_mode).double()
    x = torch.randn(4, 3, 1, 8, 8, dtype=torch.float64) * 3
    before = run(net, x, step_mode)
    assert 0.02 < before.mean() < 0.98
    plif_w = net[4].w.detach().clone()
    functional.reset_net(net)  # caches the resettable modules: convert must invalidate that cache
    convert(net, "slif", channels=True, backend="reference")
    assert [type(m) for m in net if is_convertible(m)] == [SLIF, SLIF, SLIF]
    after = run(net, x, step_mode)
    assert torch.equal(after, before)
    lif, plif, out = net[2], net[4], net[7]
    # Channel counts come from the preceding layer: BatchNorm2d(4) -> 4 and Conv2d(4, 6) -> 6
    # at dim 1 of the per-step shape; Linear(., 10) -> 10 at the last dim.
    assert (lif.channels, lif.channel_dim) == (4, 1)
    assert (plif.channels, plif.channel_dim) == (6, 1)
    assert (out.channels, out.channel_dim) == (10, -1)
    assert lif.surrogate == "atan" and lif.alpha == 3.0 and lif.v_reset == 0.0 and lif.detach_reset
    assert torch.allclose(lif.tau, torch.tensor(3.0, dtype=torch.float64))
    assert torch.all(lif.v_threshold == 0.8)
    assert plif.v_reset is None and not plif.decay_input and plif.surrogate == "rect" and plif.alpha == 1.25
    assert torch.all(plif.w == plif_w)  # copied exactly, not re-derived through tau
    assert all(m.step_mode == step_mode for m in (lif, plif, out))


def test_foreign_gradients_match():
    net = sj_network().double()
    ours = convert(copy.deepcopy(net), "slif", backend="reference")
    x = torch.randn(4, 3, 1, 8, 8, dtype=torch.float64) * 3
    for model in (net, ours):
        functional.reset_net(model)
        model(x).sum().backward()
    theirs = dict(net.named_parameters())
    assert set(theirs) <= {name for name, _ in ours.named_parameters()}
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        if name == "4.w":  # per channel now: the channels' gradients add up to the scalar's
            torch.testing.assert_close(p.grad.sum(), theirs[name].grad, rtol=1e-9, atol=1e-12)
        elif name in theirs:
            torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-9, atol=1e-12)


def test_per_layer_when_channels_false_or_unknown():
    net = sj_network()
    convert(net, "slif", channels=False)
    assert all(m.channels is None for m in net if isinstance(m, SLIF))
    # A neuron directly inside a non-Sequential parent has no known channel count.
    holder = nn.Module()
    holder.node = neuron.LIFNode(step_mode="m")
    convert(holder, "slif")
    assert isinstance(holder.node, SLIF) and holder.node.channels is None
    # A neuron as the root module is returned converted.
    node = convert(neuron.LIFNode(tau=4.0, step_mode="m"), "slif")
    assert isinstance(node, SLIF) and torch.allclose(node.tau, torch.tensor(4.0))


def test_annotated_foreign_neuron_gets_channels():
    node = neuron.LIFNode(step_mode="m")
    node.effst_channels, node.effst_channel_dim = 5, -2
    holder = nn.ModuleDict({"node": node})
    convert(holder, "stl")
    assert (holder["node"].channels, holder["node"].channel_dim) == (5, -2)
    assert not holder["node"].learn_tau


def test_effst_per_channel_sources():
    model = small(neuron="slif")
    x = spiking_input()
    lively(model, x)
    with torch.no_grad():
        model.blocks[0].attn.q_lif.v_threshold[0] = 0.7
    before = model(x)
    convert(model, "slif", channels=True)
    assert torch.equal(model(x), before)
    assert model.blocks[0].attn.q_lif.v_threshold[0] == 0.7
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q_lif.*v_threshold differs across channels"):
        convert(model, "lif")
    uniform = small(neuron="slif")
    convert(uniform, "plif")  # uniform per-channel values fit one per-layer value
    assert type(uniform.blocks[0].attn.q_lif) is PLIF and uniform.blocks[0].attn.q_lif.w.dim() == 0
    convert(uniform, "lif")
    assert type(uniform.blocks[0].attn.q_lif) is LIF


def test_shared_neuron_is_replaced_once():
    node = neuron.LIFNode(step_mode="m")
    net = nn.Sequential(layer.Linear(3, 3), node, layer.Linear(3, 3), node)
    convert(net, "slif")
    assert net[1] is net[3] and isinstance(net[1], SLIF)


def test_errors_and_warnings():
    with pytest.raises(ValueError, match="neuron"):
        convert(nn.Sequential(), "izhikevich")
    with pytest.raises(TypeError, match="channels"):
        convert(nn.Sequential(), "slif", channels=1)
    with pytest.raises(ValueError, match="backend"):
        convert(nn.Sequential(), "slif", backend="gpu")
    with pytest.raises(TypeError, match="model"):
        convert("not a module")
    bad = nn.Sequential(neuron.LIFNode(surrogate_function=surrogate.PiecewiseLeakyReLU(), step_mode="m"))
    with pytest.raises(ValueError, match=r"^0: surrogate PiecewiseLeakyReLU has no effst equivalent"):
        convert(bad)

    class MyLIF(neuron.LIFNode):
        pass

    net = nn.Sequential(MyLIF(step_mode="m"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert(net)
    assert isinstance(net[0], MyLIF) and any("MyLIF" in str(w.message) for w in caught)


def test_spikingjelly_0_0_0_0_x_multistep_node_is_recognised():
    """0.0.0.0.x is not installable beside 2.0.0; a stand-in with its class name, module path and
    attributes checks that the converter reads it (multi-step, tau as a float, backend ignored)."""
    class MultiStepLIFNode(nn.Module):
        def __init__(self):
            super().__init__()
            self.tau, self.decay_input, self.v_threshold, self.v_reset = 2.0, True, 0.5, 0.0
            self.surrogate_function = surrogate.Sigmoid(alpha=4.0)
            self.detach_reset, self.backend = True, "cupy"

    MultiStepLIFNode.__module__ = "spikingjelly.clock_driven.neuron"
    net = nn.Sequential(nn.Linear(4, 6), MultiStepLIFNode())
    convert(net, "slif")
    node = net[1]
    assert isinstance(node, SLIF) and node.step_mode == "m" and node.channels == 6
    assert torch.all(node.v_threshold == 0.5) and node.surrogate == "sigmoid" and node.detach_reset


@pytest.mark.parametrize("make", [
    lambda: neuron.IFNode(step_mode="m"),
    lambda: neuron.IFNode(v_reset=None, step_mode="s"),
], ids=["hard-reset", "soft-reset"])
def test_integrate_and_fire_is_refused_by_path_and_nothing_changes(make):
    """IF has no leak (tau = infinity): 1/tau = sigmoid(w) cannot express it, so it is refused
    with the module's path, and the LIF before it is not converted either (no half-done model)."""
    first = neuron.LIFNode(step_mode="m")
    net = nn.Sequential(layer.Linear(3, 4), first, nn.Sequential(layer.Linear(4, 4), make()))
    with pytest.raises(ValueError, match=r"^2\.1 \(IFNode\): an integrate-and-fire neuron has no leak"):
        convert(net, "slif")
    assert net[1] is first and type(net[2][1]) is neuron.IFNode
    with pytest.raises(ValueError, match=r"^model \(IFNode\)"):
        convert(make(), "lif")


def test_spikingjelly_0_0_0_0_x_multistep_if_node_is_refused():
    class MultiStepIFNode(nn.Module):
        pass

    MultiStepIFNode.__module__ = "spikingjelly.clock_driven.neuron"
    net = nn.Sequential(nn.Linear(4, 6), MultiStepIFNode())
    with pytest.raises(ValueError, match=r"^1 \(MultiStepIFNode\).*no leak"):
        convert(net, "slif")


@pytest.mark.parametrize("cls", ["LIFNode", "ParametricLIFNode"])
def test_store_v_seq_is_refused_not_dropped(cls):
    node = getattr(neuron, cls)(step_mode="m", store_v_seq=True)
    net = nn.Sequential(layer.Linear(3, 4), node)
    with pytest.raises(ValueError, match=rf"^1 \({cls}\): store_v_seq=True"):
        convert(net, "slif")
    assert net[1] is node
    node.store_v_seq = False
    convert(net, "slif")
    assert isinstance(net[1], SLIF)


def test_other_spikingjelly_neurons_stay_with_a_warning():
    other = neuron.QIFNode(step_mode="m")
    net = nn.Sequential(layer.Linear(3, 4), other, layer.Linear(4, 4), neuron.LIFNode(step_mode="m"))
    with pytest.warns(UserWarning, match=r"convert: 1 \(QIFNode\) is not a LIF-type neuron; left unconverted"):
        convert(net, "slif")
    assert net[1] is other and isinstance(net[3], SLIF)


def test_effst_convert_is_callable_as_module_and_function():
    """``effst.convert`` names a module and its function; either binding converts."""
    import effst
    import effst.convert as module

    for entry in (effst.convert, module, module.convert):
        net = nn.Sequential(layer.Linear(3, 4), neuron.LIFNode(step_mode="m"))
        assert entry(net, "stl") is net and isinstance(net[1], SLIF) and not net[1].learn_tau


def test_convert_does_not_import_the_models_package():
    """Layering: convert sits above nn and below models; the Spikformer learns of a conversion
    through its ``on_neurons_converted`` hook, not through an import of models in convert."""
    import ast
    import inspect

    import effst.convert as module

    tree = ast.parse(inspect.getsource(module))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not any(name and name.startswith(("effst.models", "effst.train", "effst.cli")) for name in imported)


@pytest.mark.parametrize("v_reset", [0.0, None])
def test_membrane_state_carries_over_mid_sequence(v_reset):
    """Converted between two calls without a reset, the neuron continues the sequence."""
    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(5, 6), neuron.LIFNode(tau=3.0, v_reset=v_reset, step_mode="m")).double()
    first, second = (torch.randn(3, 4, 5, dtype=torch.float64) + 0.5 for _ in range(2))
    with torch.no_grad():
        net[0].weight.mul_(4)  # so that the neurons fire
        net(first)
        ours = convert(copy.deepcopy(net), "slif", backend="reference")
        expected = net(second)
        assert 0.05 < expected.mean() < 0.95
        assert torch.equal(ours(second), expected)
        ours[1].reset()  # the state mattered: from rest the outputs differ
        assert not torch.equal(ours(second), expected)


SJ_SURROGATE_CLASSES = ("Sigmoid", "ATan", "PiecewiseQuadratic", "PiecewiseExp", "SoftSign", "SuperSpike",
                        "Erf", "Rect")


@pytest.mark.parametrize("index", range(len(SJ_SURROGATE_CLASSES) * 3))
def test_converted_neuron_is_the_spikingjelly_neuron_float64(index):
    """Every surrogate (a non-default alpha; Rect's alpha is the reciprocal of effst's), each
    reset, decay_input, detach_reset and target kind: the converted neuron gives SpikingJelly
    2.0.0's spikes exactly and its x (and PLIF w) gradients to 1e-9, with tau and V_th carried
    over (w = -log(tau - 1))."""
    import math
    name = SJ_SURROGATE_CLASSES[index % len(SJ_SURROGATE_CLASSES)]
    v_reset = (0.0, -0.3, None)[index % 3]
    detach, decay = bool(index % 2), bool((index // 2) % 2)
    target = ("slif", "stl", "plif", "lif")[index % 4]
    parametric = index % 5 in (0, 3)
    tau = (1.7, 2.0, 5.0)[(index // 3) % 3]
    kw = dict(v_threshold=0.7, v_reset=v_reset, detach_reset=detach, decay_input=decay, step_mode="m",
              surrogate_function=getattr(surrogate, name)(alpha=0.8 if name == "Rect" else 1.3))
    node = (neuron.ParametricLIFNode(init_tau=tau, **kw) if parametric else neuron.LIFNode(tau=tau, **kw))
    net = nn.Sequential(nn.Linear(5, 5), node).double()
    g = torch.Generator().manual_seed(index)
    x = torch.randn(7, 3, 5, generator=g, dtype=torch.float64) + 0.5
    weights = torch.randn(7, 3, 5, generator=g, dtype=torch.float64)
    xs = x.clone().requires_grad_(True)
    (node(xs) * weights).sum().backward()
    node.reset()
    with torch.no_grad():
        want_spikes = node(x)
    node.reset()
    convert(net, target, backend="native")
    new = net[1]
    assert float(new.v_threshold.detach().reshape(-1)[0]) == 0.7
    w_expected = node.w.detach().double() if parametric else torch.tensor(-math.log(tau - 1.0), dtype=torch.float64)
    assert torch.equal(new.w.detach().reshape(-1)[0], w_expected.reshape(()))
    xe = x.clone().requires_grad_(True)
    spikes = new(xe)
    (spikes * weights).sum().backward()
    what = f"{name} v_reset={v_reset} detach={detach} decay={decay} -> {target}"
    assert torch.equal(spikes.detach(), want_spikes), what
    torch.testing.assert_close(xe.grad, xs.grad, rtol=1e-9, atol=1e-9, msg=lambda m: f"{what}: {m}")
    if parametric and target in ("slif", "plif"):
        torch.testing.assert_close(new.w.grad.sum(), node.w.grad.double().reshape(()), rtol=1e-9, atol=1e-9)
