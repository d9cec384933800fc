"""DSP (docs/pruning.md): kept widths, which dims are kept, what is sliced, and that a model whose
pruned dims were already dead computes exactly what it computed before."""
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from effst.models import build_model, build_model_from_spec, count_parameters, record_firing_rates
from effst.prune.dsp import dsp, dsp_random, dsp_weight_sparsity, dsp_widths
from model_helpers import attention_rate, lively, small

# Paper Table III: Spikformer-4-384-1536 (12 heads) on CIFAR10 and 2-256-1024 (16 heads) on
# CIFAR10-DVS at p = 0.2, 0.4, 0.6, 0.8, 0.9.
SPARSITIES = (0.2, 0.4, 0.6, 0.8, 0.9)
CIFAR_SHAPES = ((312, 1228), (240, 921), (156, 614), (84, 307), (48, 153))
DVS_SHAPES = ((192, 819), (144, 614), (96, 409), (48, 204), (16, 102))


@pytest.mark.parametrize("p, shape", list(zip(SPARSITIES, CIFAR_SHAPES)))
def test_widths_match_the_paper_cifar10(p, shape):
    assert dsp_widths(384, 1536, 12, p) == shape
    assert dsp_widths(256, 1024, 16, p, attn_rounding="down") == DVS_SHAPES[SPARSITIES.index(p)]


def test_widths_edge_cases():
    assert dsp_widths(384, 1536, 12, 0.0) == (384, 1536)
    assert dsp_widths(384, 1536, 12, 0.999) == (12, 1)          # one dim per head, one hidden unit
    assert dsp_widths(256, 1024, 16, 0.99, attn_rounding="down") == (16, 10)
    assert dsp_widths(384, 1000, 12, 0.9)[1] == 100            # (1 - 0.9) * 1000 is not 99
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="sparsity"):
            dsp_widths(384, 1536, 12, bad)
    with pytest.raises(TypeError, match="sparsity"):
        dsp_widths(384, 1536, 12, "0.5")
    with pytest.raises(ValueError, match="attn_rounding"):
        dsp_widths(384, 1536, 12, 0.5, attn_rounding="nearest")


def test_spikformer_4_384_shapes_at_every_paper_sparsity():
    model = build_model("spikformer-4-384")
    for p, (width, hidden) in zip(SPARSITIES, CIFAR_SHAPES):
        pruned = dsp(model, p)
        assert (pruned.config.width, pruned.config.hidden) == (width, hidden)
        for block in pruned.blocks:
            a, m = block.attn, block.mlp
            for n in ("q", "k", "v"):
                assert getattr(a, f"{n}_linear").weight.shape == (width, 384)
                assert getattr(a, f"{n}_linear").bias.shape == (width,)
                assert getattr(a, f"{n}_bn").num_features == width
                assert getattr(a, f"{n}_bn").running_mean.shape == (width,)
            assert a.proj_linear.weight.shape == (384, width) and a.proj_bn.num_features == 384
            assert m.fc1.weight.shape == (hidden, 384) and m.fc1_bn.num_features == hidden
            assert m.fc2.weight.shape == (384, hidden) and m.fc2_bn.num_features == 384
        counts = count_parameters(pruned)
        assert counts["blocks"] == 4 * (4 * width * 384 + 2 * hidden * 384)
    # The paper's block parameters at 80 %: 4 * (4*84*384 + 2*307*384) weights = 1.46 M.
    assert round(count_parameters(dsp(model, 0.8))["blocks"] / 1e6, 2) == 1.46
    assert model.blocks[0].attn.q_linear.weight.shape == (384, 384)  # the input model is untouched


def test_spikformer_2_256_shapes_follow_the_paper_dvs_table():
    model = build_model("spikformer-2-256")
    for p, (width, hidden) in zip(SPARSITIES, DVS_SHAPES):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pruned = dsp(model, p)  # the DVS variant rounds the attention width down by default
        messages = [str(w.message) for w in caught if "cannot be met" in str(w.message)]
        if p < 0.9:
            assert messages == []
        else:  # 16 of 256 dims (25.6 asked) leave 8.72 % of the projection weights, not 10 %
            assert len(messages) == 1 and "keep 8.72% of their weights (fewer than the requested 10.00%" in messages[0]
        assert (pruned.config.width, pruned.config.hidden) == (width, hidden)
        a, m = pruned.blocks[1].attn, pruned.blocks[1].mlp
        assert a.q_linear.weight.shape == (width, 256, 1) and a.proj_linear.weight.shape == (256, width, 1)
        assert m.fc1.weight.shape == (hidden, 256, 1) and m.fc2.weight.shape == (256, hidden, 1)
    assert dsp(model, 0.2, attn_rounding="up").config.width == 208


def test_kept_dims_are_the_highest_scoring_rows():
    torch.manual_seed(0)
    model = small(neuron="slif", depth=2)
    width, hidden = model.config.width, model.config.hidden
    with torch.no_grad():
        for _, node in model.neurons():  # distinct per-channel values to follow through slicing
            if node.w.dim() == 1:
                node.w.copy_(torch.randn_like(node.w))
                node.v_threshold.copy_(torch.rand_like(node.v_threshold) + 0.5)
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm1d)):
            bn.running_mean.normal_()
            bn.weight.normal_()
    p = 0.6
    pruned = dsp(model, p)
    new_width, new_hidden = dsp_widths(width, hidden, model.config.heads, p)
    for old, new in zip(model.blocks, pruned.blocks):
        a = old.attn
        # Oracle: the mean over q, k, v of each row's mean |w|, top new_width, original order.
        score = sum(getattr(a, f"{n}_linear").weight.abs().mean(dim=1) for n in "qkv") / 3
        keep = torch.sort(torch.argsort(score, descending=True)[:new_width]).values
        for n in "qkv":
            assert torch.equal(getattr(new.attn, f"{n}_linear").weight, getattr(a, f"{n}_linear").weight[keep])
            assert torch.equal(getattr(new.attn, f"{n}_linear").bias, getattr(a, f"{n}_linear").bias[keep])
            for t in ("weight", "bias", "running_mean", "running_var"):
                assert torch.equal(getattr(getattr(new.attn, f"{n}_bn"), t), getattr(getattr(a, f"{n}_bn"), t)[keep])
            node, old_node = getattr(new.attn, f"{n}_lif"), getattr(a, f"{n}_lif")
            assert node.channels == new_width
            assert torch.equal(node.w, old_node.w[keep]) and torch.equal(node.v_threshold, old_node.v_threshold[keep])
            assert isinstance(node.w, nn.Parameter)
        assert torch.equal(new.attn.attn_lif.v_threshold, a.attn_lif.v_threshold[keep])
        assert torch.equal(new.attn.proj_linear.weight, a.proj_linear.weight[:, keep])
        assert torch.equal(new.attn.proj_linear.bias, a.proj_linear.bias)
        assert torch.equal(new.attn.proj_lif.w, a.proj_lif.w)  # the residual width is not pruned
        m = old.mlp
        keep = torch.sort(torch.argsort(m.fc1.weight.abs().mean(dim=1), descending=True)[:new_hidden]).values
        assert torch.equal(new.mlp.fc1.weight, m.fc1.weight[keep])
        assert torch.equal(new.mlp.fc1_bn.running_mean, m.fc1_bn.running_mean[keep])
        assert torch.equal(new.mlp.fc1_lif.w, m.fc1_lif.w[keep])
        assert torch.equal(new.mlp.fc2.weight, m.fc2.weight[:, keep])
    # Gradients flow into the new, smaller model's parameters.
    pruned(torch.randn(2, 1, 8, 8) * 3).sum().backward()
    assert pruned.blocks[0].mlp.fc1.weight.grad.shape == (new_hidden, model.config.dim)


def _kill_dims(model, attn_dead, hidden_dead):
    """Zero the given dims' rows and BatchNorm affine: those neurons can never fire."""
    with torch.no_grad():
        for block in model.blocks:
            for n in "qkv":
                layer, bn = getattr(block.attn, f"{n}_linear"), getattr(block.attn, f"{n}_bn")
                layer.weight[attn_dead] = 0
                if layer.bias is not None:
                    layer.bias[attn_dead] = 0
                bn.weight[attn_dead] = 0
                bn.bias[attn_dead] = 0
            block.mlp.fc1.weight[hidden_dead] = 0
            if block.mlp.fc1.bias is not None:
                block.mlp.fc1.bias[hidden_dead] = 0
            block.mlp.fc1_bn.weight[hidden_dead] = 0
            block.mlp.fc1_bn.bias[hidden_dead] = 0


@pytest.mark.parametrize("name, extra", [
    ("spikformer-tiny", {}),
    ("spikformer-2-256", dict(depth=2, dim=32, heads=4, hidden=64, image_size=64, T=2)),  # Conv1d layout
])
def test_pruning_dead_dims_preserves_the_function(name, extra):
    torch.manual_seed(1)
    model = small(name, neuron="slif", **extra).double()
    width, hidden, heads = model.config.width, model.config.hidden, model.config.heads
    per_head = width // heads
    # Half of every head's dims and half of the hidden units are dead; DSP at p = 0.5 must
    # remove exactly those, and the head structure is kept because each head loses the same.
    attn_dead = torch.cat([h * per_head + torch.randperm(per_head)[: per_head // 2] for h in range(heads)])
    hidden_dead = torch.randperm(hidden)[: hidden // 2]
    x = torch.randn(3, *((model.T,) if model.config.variant == "dvs" else ()), model.config.in_channels,
                    model.config.image_size, model.config.image_size, dtype=torch.float64) * 3
    lively(model, x)
    _kill_dims(model, attn_dead, hidden_dead)
    assert attention_rate(model, x) > 0.05
    for train in (False, True):
        model.train(train)
        before = model(x)
        for pruned in (dsp(model, 0.5), dsp(model, 0.5, head_balanced=True)):
            assert (pruned.config.width, pruned.config.hidden) == (width // 2, hidden // 2)
            assert torch.equal(pruned(x), before)


def test_head_balanced_keeps_dims_inside_their_heads():
    torch.manual_seed(2)
    model = small(depth=1)
    with torch.no_grad():  # head 0 has all the strong dims
        for n in "qkv":
            getattr(model.blocks[0].attn, f"{n}_linear").weight[:8] *= 100
    global_pick = dsp(model, 0.75)
    balanced = dsp(model, 0.75, head_balanced=True)
    q = model.blocks[0].attn.q_linear.weight
    assert torch.equal(global_pick.blocks[0].attn.q_linear.weight, q[:8])          # all from head 0
    rows = balanced.blocks[0].attn.q_linear.weight
    kept = [int((q == row).all(dim=1).nonzero()) for row in rows]
    assert [k // 8 for k in kept] == [0, 0, 1, 1, 2, 2, 3, 3]                   # two per head


def test_dsp_random_is_a_reproducible_control():
    model = small(depth=2)
    a, b, c = dsp_random(model, 0.5, seed=3), dsp_random(model, 0.5, seed=3), dsp_random(model, 0.5, seed=4)
    scored = dsp(model, 0.5)
    for x in (a, b, c):
        assert (x.config.width, x.config.hidden) == (scored.config.width, scored.config.hidden)
    assert torch.equal(a.blocks[1].mlp.fc1.weight, b.blocks[1].mlp.fc1.weight)
    assert not torch.equal(a.blocks[1].mlp.fc1.weight, c.blocks[1].mlp.fc1.weight)
    with pytest.raises(TypeError, match="seed"):
        dsp_random(model, 0.5, seed="x")


def test_pruned_model_spec_round_trip_and_second_pruning():
    model = small(neuron="slif")
    x = torch.randn(2, 1, 8, 8) * 3
    pruned = dsp(lively(model, x), 0.5)
    rebuilt = build_model_from_spec(pruned.spec())
    rebuilt.load_state_dict(pruned.state_dict())  # strict: every shape matches
    rebuilt.eval()
    assert attention_rate(pruned, x) > 0.05
    assert torch.equal(rebuilt(x), pruned(x))
    again = dsp(pruned, 0.5)  # widths shrink from the already-pruned ones
    assert again.config.width == dsp_widths(pruned.config.width, pruned.config.hidden, 4, 0.5)[0]


def test_dsp_rejects_what_it_cannot_prune():
    model = small()
    with pytest.raises(ValueError, match="sparsity"):
        dsp(model, 1.0)
    with pytest.raises(TypeError, match="sparsity"):
        dsp(model, True)
    with pytest.raises(TypeError, match="model"):
        dsp(nn.Sequential(nn.Linear(2, 2)), 0.5)
    torch_prune.l1_unstructured(model.blocks[0].mlp.fc1, "weight", amount=0.5)
    with pytest.raises(TypeError, match="blocks.0.mlp.fc1"):
        dsp(model, 0.5)


# --------------------------------------------------------------------- the request it cannot meet
def _kept_share(width, hidden, a, h):
    """Oracle: share of a block's q/k/v/proj (a x D each) and fc1/fc2 (h x D each) weights kept."""
    return (4 * a + 2 * h) / (4 * width + 2 * hidden)


@pytest.mark.parametrize("p", [0.95, 0.99, 0.999])
def test_very_high_sparsity_warns_with_the_achieved_weight_sparsity(p):
    """spikformer-tiny (D = 32, 4 heads, hidden 128): one dim per head and whole hidden units
    cannot reach these sparsities; DSP says so and by how much, and dsp_weight_sparsity agrees."""
    model = small()
    with pytest.warns(UserWarning, match=r"dsp: sparsity .* cannot be met") as caught:
        pruned = dsp(model, p)
    a, h = pruned.config.width, pruned.config.hidden
    achieved = 1 - _kept_share(32, 128, a, h)
    assert a >= 4 and a % 4 == 0 and h >= 1
    assert dsp_weight_sparsity(32, 128, a, h) == pytest.approx(achieved, abs=1e-15)
    assert f"weight sparsity {achieved:.2%}" in str(caught[0].message)
    assert abs(_kept_share(32, 128, a, h) / (1 - p) - 1) > 0.1   # it really missed
    kept = sum(getattr(b.attn, f"{n}_linear").weight.numel() for b in pruned.blocks for n in "qkv") \
        + sum(b.attn.proj_linear.weight.numel() + b.mlp.fc1.weight.numel() + b.mlp.fc2.weight.numel()
              for b in pruned.blocks)
    total = sum(getattr(b.attn, f"{n}_linear").weight.numel() for b in model.blocks for n in "qkv") \
        + sum(b.attn.proj_linear.weight.numel() + b.mlp.fc1.weight.numel() + b.mlp.fc2.weight.numel()
              for b in model.blocks)
    assert kept / total == pytest.approx(1 - achieved, abs=1e-12)


def test_dsp_random_warns_like_dsp():
    with pytest.warns(UserWarning, match="cannot be met"):
        dsp_random(small(), 0.99, seed=1)


def test_no_warning_where_the_request_is_met():
    """Within 10 % of the requested kept share (every CIFAR10 shape of the paper): silent."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for p in (0.0, 0.5, 0.8, 0.9):
            dsp(small(), p)
    for p, (a, h) in zip(SPARSITIES, CIFAR_SHAPES):
        assert abs(_kept_share(384, 1536, a, h) / (1 - p) - 1) <= 0.1


def test_widths_oracle_over_many_shapes():
    """dsp_widths against the spec typed out: attention (1-p)W rounded to a multiple of the heads
    (at least one per head), hidden floor((1-p)H) (at least 1), exact decimal arithmetic."""
    from fractions import Fraction
    for heads, per_head, hidden in ((1, 7, 13), (4, 8, 128), (12, 32, 1536), (16, 16, 1024), (3, 5, 10)):
        width = heads * per_head
        for p in ("0", "0.05", "0.1", "0.25", "0.3", "0.45", "0.5", "0.66", "0.7", "0.9", "0.97"):
            keep = 1 - Fraction(p)
            for rounding in ("up", "down"):
                ph = keep * per_head
                ph = math.ceil(ph) if rounding == "up" else math.floor(ph)
                want = (min(max(ph, 1), per_head) * heads, min(max(math.floor(keep * hidden), 1), hidden))
                assert dsp_widths(width, hidden, heads, float(p), rounding) == want, (heads, width, hidden, p, rounding)


def test_dsp_widths_rejects_bad_counts():
    for args, name in (((384, 1536, 0), "heads"), ((384, 1536, 12.0), "heads"), ((0, 1536, 12), "attn_width"),
                       ((384, -1, 12), "hidden"), ((384, 1536, True), "heads"), ((385, 1536, 12), "attn_width")):
        with pytest.raises(ValueError, match=name):
            dsp_widths(*args, 0.5)
    with pytest.raises(ValueError, match="kept_attn"):
        dsp_weight_sparsity(384, 1536, 400, 10)
    with pytest.raises(ValueError, match="kept_hidden"):
        dsp_weight_sparsity(384, 1536, 12, 0)
