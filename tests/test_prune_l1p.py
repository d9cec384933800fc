"""L1P / block L1P / random pruning (docs/pruning.md), masks as module state, reports, conversion.

The oracles here are written independently of effst.prune: sort |w| (or tile L1 norms), take
the k-th smallest with k = ceil(p*n), prune everything <= it.
"""
import copy
import math
from fractions import Fraction

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import effst.prune as prune
from effst.nn.block_sparse import BlockSparseLinear


def l1p_count(p: float, n: int) -> int:
    """docs/pruning.md, L1P: k = ceil(p n) with p as written (0.07 * 100 = 7, not 8)."""
    return math.ceil(Fraction(str(p)) * n)


def oracle_keep(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Prune every score <= the k-th smallest (ties included), k = l1p_count(p, n)."""
    k = l1p_count(p, scores.numel())
    if k == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = scores.flatten().sort().values[k - 1]
    return scores > threshold


def oracle_tile_norms(w: torch.Tensor, bm: int, bk: int) -> torch.Tensor:
    rows, cols = math.ceil(w.shape[0] / bm), math.ceil(w.shape[1] / bk)
    out = torch.zeros(rows, cols, dtype=torch.float64)
    for r in range(rows):
        for c in range(cols):
            out[r, c] = math.fsum(abs(float(v)) for v in w[r * bm:(r + 1) * bm, c * bk:(c + 1) * bk].flatten())
    return out


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(48, 96)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(96, 40)
        self.conv = nn.Conv1d(40, 24, kernel_size=1, bias=False)
        self.conv3 = nn.Conv1d(24, 24, kernel_size=3, padding=1)  # not a target: never pruned
        self.head = nn.Linear(24, 10)

    def forward(self, x):  # x [B, L, 48]
        h = self.fc2(self.act(self.fc1(x)))
        h = self.conv(h.transpose(1, 2))
        return self.head(h.mean(dim=2))


@pytest.mark.parametrize("p", [0.0, 0.1, 0.25, 0.5, 0.77, 0.9, 0.95])
@pytest.mark.parametrize("shape", [(37, 53), (64, 48), (1, 7)])
def test_l1p_mask_matches_spec(p, shape):
    g = torch.Generator().manual_seed(int(p * 100) + shape[0])
    w = torch.randn(shape, generator=g)
    keep = prune.l1p_mask(w, p)
    assert torch.equal(keep, oracle_keep(w.abs(), p))
    assert int((~keep).sum()) == math.ceil(p * w.numel())  # no ties in a random matrix
    if (~keep).any() and keep.any():
        assert w.abs()[~keep].max() < w.abs()[keep].min()


@pytest.mark.parametrize("percent", [7, 14, 28, 55, 56, 30])
def test_count_is_exact_where_p_times_n_has_float_error(percent):
    # In floats 0.07 * 100 == 7.000000000000001: a naive ceil would prune 8 of 100.
    p = percent / 100
    w = torch.randn(10, 10, generator=torch.Generator().manual_seed(percent))
    assert int((~prune.l1p_mask(w, p)).sum()) == percent
    layer = nn.Linear(10, 10)
    prune.random(layer, p, seed=0)
    assert int((~prune.get_mask(layer)).sum()) == percent
    tiles = prune.block_l1p_mask(torch.randn(160, 160), p, block_size=16)  # 100 tiles
    assert int((~tiles).sum()) == percent


def test_ties_at_the_threshold_are_pruned_too():
    w = torch.tensor([[0.5, -0.5, 0.5, 2.0], [0.1, 3.0, -0.5, 4.0]])
    keep = prune.l1p_mask(w, 0.25)  # k = 2: threshold = 0.5, every |w| <= 0.5 goes
    assert torch.equal(keep, w.abs() > 0.5)
    assert int((~keep).sum()) == 5


def test_l1p_per_matrix_targets_and_conv1x1():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.fc2.weight.mul_(100.0)  # each matrix is pruned on its own, whatever the scales
    dense = {n: m.weight.detach().clone() for n, m in net.named_modules() if hasattr(m, "weight")}
    out = prune.l1p(net, 0.6, targets=["fc1", "fc2", "conv"])
    assert out is net
    for name in ("fc1", "fc2", "conv"):
        layer = getattr(net, name)
        assert prune.is_pruned(layer)
        expected = oracle_keep(dense[name].abs(), 0.6)
        assert torch.equal(prune.get_mask(layer), expected)
        assert torch.equal(layer.weight, dense[name] * expected)
        assert int((layer.weight == 0).sum()) == math.ceil(0.6 * dense[name].numel())
    assert not prune.is_pruned(net.head) and not prune.is_pruned(net.conv3)
    kinds = {layer.name: layer.kind for layer in prune.report(net).layers}
    assert kinds["conv"] == "Conv1d" and kinds["fc1"] == "Linear"  # not torch's "Parametrized*" class names
    net(torch.randn(2, 5, 48))  # still runs


def test_default_targets_are_every_linear_and_1x1_conv():
    net = Net()
    prune.l1p(net, 0.5)
    assert [n for n, _ in prune.pruned_modules(net)] == ["fc1", "fc2", "conv", "head"]
    single = nn.Linear(10, 10)
    prune.l1p(single, 0.3)
    assert int((single.weight == 0).sum()) == 30


def test_target_forms_and_errors():
    net = Net()
    assert [n for n, _ in prune.resolve_targets(net, nn.Linear)] == ["fc1", "fc2", "head"]
    assert [n for n, _ in prune.resolve_targets(net, "fc*")] == ["fc1", "fc2"]
    for bad, match in (("act", "not a linear layer"), ("conv3", "kernel_size"), ("nope", "matches no module"),
                       (nn.ReLU, "not a linear layer class"), ([], "empty"), (3, "expected None"), ([3], "expected names")):
        with pytest.raises((ValueError, TypeError), match=match):
            prune.l1p(net, 0.5, targets=bad)
    assert not any(True for _ in prune.pruned_modules(net))  # nothing half-done


@pytest.mark.parametrize("bad", [1.0, 1.2, -0.1, float("nan"), True, "0.5", None])
def test_sparsity_outside_range_is_an_error(bad):
    with pytest.raises((ValueError, TypeError), match="sparsity"):
        prune.l1p(nn.Linear(4, 4), bad)
    with pytest.raises((ValueError, TypeError), match="sparsity"):
        prune.block_l1p(nn.Linear(32, 32), bad, block_size=16)
    with pytest.raises((ValueError, TypeError), match="sparsity"):
        prune.random(nn.Linear(4, 4), bad)


@pytest.mark.parametrize("bad", [8, 24, 48, (16, 20), (0, 16), 2.0])
def test_block_size_must_be_power_of_two_at_least_16(bad):
    with pytest.raises((ValueError, TypeError), match="block_size"):
        prune.block_l1p(nn.Linear(64, 64), 0.5, block_size=bad)


@pytest.mark.parametrize("p", [0.3, 0.5, 0.9])
@pytest.mark.parametrize("block", [(16, 16), (32, 16), (16, 64)])
def test_block_l1p_prunes_lowest_l1_tiles(p, block):
    torch.manual_seed(1)
    layer = nn.Linear(100, 70)  # not multiples of the block: edge tiles hold fewer entries
    w = layer.weight.detach().clone()
    prune.block_l1p(layer, p, block_size=block)
    norms = oracle_tile_norms(w, *block)
    tiles = oracle_keep(norms, p)
    assert int((~tiles).sum()) == math.ceil(p * norms.numel())
    full = tiles.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:70, :100]
    assert torch.equal(prune.get_mask(layer), full)
    assert torch.equal(layer.weight, w * full)


def test_random_pruning_counts_seed_and_structure():
    a, b, c = nn.Linear(50, 30), nn.Linear(50, 30), nn.Linear(50, 30)
    prune.random(a, 0.7, seed=3)
    prune.random(b, 0.7, seed=3)
    prune.random(c, 0.7, seed=4)
    assert int((~prune.get_mask(a)).sum()) == math.ceil(0.7 * 1500)
    assert torch.equal(prune.get_mask(a), prune.get_mask(b))
    assert not torch.equal(prune.get_mask(a), prune.get_mask(c))
    blk = nn.Linear(64, 48)
    prune.random(blk, 0.5, structure="block", seed=0, block_size=16)
    tiles = prune.get_mask(blk).reshape(3, 16, 4, 16)
    per_tile = tiles.any(dim=3).any(dim=1)
    assert torch.equal(tiles.all(dim=3).all(dim=1), per_tile)  # whole tiles only
    assert int((~per_tile).sum()) == 6
    with pytest.raises(ValueError, match="structure"):
        prune.random(nn.Linear(4, 4), 0.5, structure="row")


def test_repruning_only_removes_more():
    torch.manual_seed(2)
    layer = nn.Linear(40, 40)
    prune.l1p(layer, 0.5)
    first = prune.get_mask(layer).clone()
    prune.l1p(layer, 0.8)
    second = prune.get_mask(layer)
    assert not (second & ~first).any()
    assert int((~second).sum()) == math.ceil(0.8 * 1600)
    prune.random(layer, 0.9, seed=0)
    assert int((~prune.get_mask(layer)).sum()) == math.ceil(0.9 * 1600)


@pytest.mark.parametrize("method", ["l1p", "block_l1p"])
def test_masks_survive_adamw_with_weight_decay(method):
    torch.manual_seed(3)
    net = Net()
    if method == "l1p":
        prune.l1p(net, 0.7, targets=["fc1", "fc2", "conv"])
    else:
        prune.block_l1p(net, 0.7, targets=["fc1", "fc2"], block_size=16)
    masks = {n: prune.get_mask(m).clone() for n, m in prune.pruned_modules(net)}
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(4, 6, 48)
    for _ in range(20):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
    for name, mask in masks.items():
        layer = net.get_submodule(name)
        assert torch.equal(prune.get_mask(layer), mask)
        assert bool((layer.weight[~mask] == 0).all())
        assert bool((layer.parametrizations.weight.original[~mask] == 0).all())
        assert bool((layer.weight[mask] != 0).any())  # the kept weights did train
    # The forward uses exactly the masked weight.
    h = torch.randn(3, 48)
    assert torch.equal(net.fc1(h), F.linear(h, net.fc1.parametrizations.weight.original * masks["fc1"], net.fc1.bias))


def test_checkpoint_round_trips(tmp_path):
    torch.manual_seed(4)
    net = Net()
    prune.l1p(net, 0.5, targets=["fc1", "conv"])
    path = tmp_path / "pruned.pt"
    torch.save(net.state_dict(), path)
    state = torch.load(path)
    x = torch.randn(2, 5, 48)
    expected = net(x)
    # 1) into a model pruned the same way (any sparsity): plain load_state_dict, strict.
    same = Net()
    prune.l1p(same, 0.1, targets=["fc1", "conv"])
    same.load_state_dict(state)
    assert torch.equal(same(x), expected)
    assert torch.equal(prune.get_mask(same.fc1), prune.get_mask(net.fc1))
    # 2) into a plain model, keeping the masks.
    plain = Net()
    prune.load_pruned_state_dict(plain, state)
    assert prune.is_pruned(plain.fc1) and prune.is_pruned(plain.conv) and not prune.is_pruned(plain.fc2)
    assert torch.equal(plain(x), expected)
    # 3) into a plain model as plain weights.
    stripped = Net()
    stripped.load_state_dict(prune.strip_masks(state))
    assert torch.equal(stripped(x), expected)
    # 4) remove() bakes the masks in.
    baked = copy.deepcopy(net)
    prune.remove(baked)
    assert not any(True for _ in prune.pruned_modules(baked))
    assert "fc1.weight" in baked.state_dict() and torch.equal(baked(x), expected)
    # 5) a plain checkpoint into a pruned model keeps the model's masks.
    pruned = Net()
    prune.l1p(pruned, 0.5, targets="fc1")
    mask = prune.get_mask(pruned.fc1).clone()
    prune.load_pruned_state_dict(pruned, Net().state_dict())
    assert torch.equal(prune.get_mask(pruned.fc1), mask) and bool((pruned.fc1.weight[~mask] == 0).all())


def test_report_counts():
    net = Net()
    prune.l1p(net, 0.5, targets=["fc1"])
    prune.block_l1p(net, 0.5, targets=["fc2"], block_size=16)
    rep = prune.report(net)
    rows = {layer.name: layer for layer in rep.layers}
    assert set(rows) == {"fc1", "fc2", "conv", "head"}
    assert rows["fc1"].params == 48 * 96 and rows["fc1"].kept == 48 * 96 - math.ceil(0.5 * 48 * 96)
    assert rows["fc2"].structure == "block" and rows["conv"].structure == "dense" and rows["conv"].sparsity == 0
    total = sum(p.numel() for p in net.parameters())
    pruned = (48 * 96 - rows["fc1"].kept) + (96 * 40 - rows["fc2"].kept)
    assert rep.model_params == total and rep.model_kept == total - pruned
    assert rep.sparsity == pytest.approx(pruned / sum(r.params for r in rep.layers))
    assert "fc1" in str(rep) and rep.to_dict()["model_kept"] == total - pruned


def test_block_l1p_converts_to_block_sparse_linear():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(48, 80), nn.ReLU(), nn.Linear(80, 40))
    prune.block_l1p(net, 0.75, block_size=(16, 16))
    x = torch.randn(3, 7, 48)
    expected = net(x)
    before = prune.report(net)
    converted = prune.to_block_sparse(copy.deepcopy(net), backend="torch")
    assert isinstance(converted[0], BlockSparseLinear) and isinstance(converted[2], BlockSparseLinear)
    assert converted[0].nnz_blocks == 15 - math.ceil(0.75 * 15)  # 5 x 3 tiles of 16 x 16
    torch.testing.assert_close(converted(x), expected, rtol=1e-5, atol=1e-5)
    after = prune.report(converted)
    assert after.kept == before.kept and after.model_kept == before.model_kept
    # Element-pruned layers are refused: their zeros inside kept tiles would train again.
    elem = nn.Linear(48, 80)
    prune.l1p(elem, 0.5)
    with pytest.raises(ValueError, match="not made of whole"):
        prune.to_block_sparse(elem, block_size=16)
    with pytest.raises(ValueError, match="only nn.Linear"):
        prune.to_block_sparse(Net(), targets="conv")


def test_apply_mask_errors():
    layer = nn.Linear(8, 4)
    with pytest.raises(ValueError, match=r"mask: expected shape \(4, 8\)"):
        prune.apply_mask(layer, torch.ones(8, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        prune.apply_mask(layer, torch.full((4, 8), 0.5))
    with pytest.raises(TypeError, match="not nn.Linear"):
        prune.apply_mask(nn.ReLU(), torch.ones(1, dtype=torch.bool))


def test_block_pruning_never_keeps_nothing():
    """A tile too large for a matrix at the requested sparsity is halved (warning); a matrix
    that even 16x16 tiles would empty keeps its single best tile (warning); 0 blocks never."""
    torch.manual_seed(9)
    net = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 128), nn.Linear(256, 256))
    with pytest.warns(UserWarning) as caught:
        prune.block_l1p(net, 0.8, block_size=(32, 32))
    messages = " ".join(str(w.message) for w in caught)
    assert "0: even 16x16" in messages and "1: (32, 32) tiles cannot express" in messages
    assert "2:" not in messages  # 64 tiles of 32x32: 12 kept, nothing to adapt
    masks = [m.parametrizations.weight[0] for m in net]
    assert masks[2].block_size == (32, 32)
    assert masks[0].block_size == (16, 16) and int(masks[0].mask.sum()) == 256  # 1 of 4 tiles
    # (128, 32) weight: 32x32 -> 4 tiles, 0 kept; 16x32 -> 8 tiles, 8 - ceil(6.4) = 1 kept.
    assert masks[1].block_size == (16, 32) and int(masks[1].mask.sum()) == 16 * 32
    rep = prune.report(net)
    assert all(layer.kept > 0 for layer in rep.layers) and math.isfinite(rep.compression_ratio)
    converted = prune.to_block_sparse(net, backend="torch")  # each layer with the tile it was pruned with
    assert [m.block_size for m in converted] == [(16, 16), (16, 32), (32, 32)]
    # Random block pruning follows the same rule.
    with pytest.warns(UserWarning, match="cannot express"):
        prune.random(nn.Linear(32, 32), 0.9, structure="block", seed=0, block_size=(32, 32))
    assert prune.fit_block_pruning(torch.zeros(64, 64), 0.5, 32) == ((32, 32), 0.5)
    # The default tile is the one fastest on the H200 (docs/block_sparse.md), halved the same way.
    assert prune.DEFAULT_BLOCK_SIZE == (128, 128)
    wide = nn.Linear(256, 256)
    with pytest.warns(UserWarning, match=r"\(128, 128\) tiles cannot express .* using \(64, 128\) tiles \(1 of 8 kept\)"):
        prune.block_l1p(wide, 0.8)
    assert wide.parametrizations.weight[0].block_size == (64, 128)


def oracle_two_four(w: torch.Tensor) -> torch.Tensor:
    """Per group of 4 inputs: keep the two largest |w|; on equal |w| the lower index first."""
    keep = torch.zeros_like(w, dtype=torch.bool)
    for o in range(w.shape[0]):
        for g in range(0, w.shape[1], 4):
            ranked = sorted(range(4), key=lambda i: (-abs(float(w[o, g + i])), i))
            for i in ranked[:2]:
                keep[o, g + i] = True
    return keep


def test_two_four_mask_and_its_errors():
    torch.manual_seed(10)
    w = torch.randn(6, 16)
    w[0, :4] = torch.tensor([0.5, -0.5, 0.5, 0.1])  # ties: indices 0 and 1 kept
    w[1, 4:8] = 0.0  # all equal: the first two
    net = nn.Sequential(nn.Linear(16, 6), nn.ReLU(), nn.Conv1d(16, 8, 1))
    with torch.no_grad():
        net[0].weight.copy_(w)
    prune.l1p(net, 0.5, pattern="2:4")
    keep = prune.get_mask(net[0])
    assert torch.equal(keep, oracle_two_four(w))
    assert keep[0, :4].tolist() == [True, True, False, False] and keep[1, 4:8].tolist() == [True, True, False, False]
    assert int(keep.sum()) == w.numel() // 2 and prune.is_two_four(net[0].weight)
    assert net[0].parametrizations.weight[0].structure == "2:4"
    assert torch.equal(prune.get_mask(net[2]).squeeze(-1), oracle_two_four(net[2].weight.detach().squeeze(-1)))
    with pytest.raises(ValueError, match="sparsity 0.5"):
        prune.l1p(nn.Linear(8, 4), 0.6, pattern="2:4")
    with pytest.raises(ValueError, match="pattern"):
        prune.l1p(nn.Linear(8, 4), 0.5, pattern="1:4")
    odd = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 6), nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"2: .*multiple of 4, got 6"):
        prune.l1p(odd, 0.5, pattern="2:4")
    assert not any(prune.is_pruned(m) for m in odd)  # nothing changed before the error


def test_to_semi_structured_errors_on_cpu():
    """to_semi_structured refuses, naming every layer concerned and leaving the model as it was:
    no 2:4 layer; weights PyTorch's semi-structured format cannot take (dtype, shape: checked
    from PyTorch's own tables, so on the CPU too); weights off CUDA. 2:4-pruned 1x1 Conv1d
    layers stay masked, with a warning."""
    net = nn.Sequential(nn.Linear(64, 32))
    with pytest.raises(ValueError, match="pattern='2:4'"):
        prune.to_semi_structured(net)
    prune.l1p(net, 0.5, pattern="2:4")
    backend, constraints = prune.semi_structured_constraints()
    assert torch.float32 not in constraints or backend == "cutlass"
    with pytest.raises(ValueError, match=r"0: its dtype torch.float32 is not one cusparselt takes \(.*float16, bfloat16"):
        prune.to_semi_structured(net)
    half = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 24), nn.Linear(24, 16), nn.Conv1d(16, 8, 1)).half()
    prune.l1p(half, 0.5, pattern="2:4")
    rows, cols = constraints[torch.float16]
    with pytest.raises(ValueError, match=rf"^torch.sparse.to_sparse_semi_structured cannot take these weights: "
                                         rf"1: its \(24, 32\) weight is not a multiple of \({rows}, {cols}\).*; "
                                         rf"2: its \(16, 24\) weight"), pytest.warns(UserWarning, match="3: 2:4-pruned but not nn.Linear"):
        prune.to_semi_structured(half)
    fits = nn.Sequential(nn.Linear(64, 32), nn.Conv1d(32, 8, 1)).half()
    prune.l1p(fits, 0.5, pattern="2:4")
    with pytest.raises(RuntimeError, match="0: its weight is on cpu.*only on CUDA"), pytest.warns(UserWarning, match="1: 2:4"):
        prune.to_semi_structured(fits)
    assert all(prune.is_pruned(m) for m in (*net, *half, *fits))  # left as they were


@pytest.mark.gpu
def test_to_semi_structured_matches_masked_dense_on_gpu(device):
    torch.manual_seed(11)
    net = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128)).to(device=device, dtype=torch.float16)
    prune.l1p(net, 0.5, pattern="2:4")
    x = torch.randn(64, 128, device=device, dtype=torch.float16)
    with torch.no_grad():
        expected = net(x).float()
        prune.to_semi_structured(net)
        got = net(x).float()
    assert not prune.is_pruned(net[0]) and type(net[0].weight.data).__name__.startswith("SparseSemiStructured")
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    older = nn.Sequential(nn.Linear(64, 32)).to(device=device, dtype=torch.float16)
    prune.l1p(older, 0.5, pattern="2:4")
    real = torch.cuda.get_device_capability
    torch.cuda.get_device_capability = lambda device=None: (7, 5)
    try:
        with pytest.raises(RuntimeError, match="compute capability 7.5"):
            prune.to_semi_structured(older)
    finally:
        torch.cuda.get_device_capability = real
    assert prune.is_pruned(older[0])


def test_pipeline_and_sparse_benchmark_prune_with_the_default_tile(monkeypatch):
    """Accuracy (the pipeline's block-L1P runs) and speed (the sparse suite's Spikformer rows)
    are reported for the same layout: both prune with prune.DEFAULT_BLOCK_SIZE unless told
    otherwise, and the suite converts each layer with the tile block L1P stored for it."""
    from effst.benchmarks import sparse
    from effst.train.pipeline import PipelineOptions

    assert tuple(PipelineOptions().validate().block_size) == prune.DEFAULT_BLOCK_SIZE
    assert tuple(PipelineOptions(block_size=[32, 64]).validate().block_size) == (32, 64)
    calls = []
    real = prune.block_l1p
    monkeypatch.setattr(prune, "block_l1p", lambda *a, **k: (calls.append(k.get("block_size")), real(*a, **k))[1])
    with pytest.warns(UserWarning, match="cannot express"):  # the tiny model's matrices halve the tile
        net, _ = sparse._build("spikformer-tiny", "cpu", 1, {}, block_sparse=True)
    assert calls == [prune.DEFAULT_BLOCK_SIZE]
    converted = [m for m in net.modules() if isinstance(m, BlockSparseLinear)]
    assert converted and all(m.block_sparsity > 0 for m in converted)
    assert tuple(sparse._default_block()) == prune.DEFAULT_BLOCK_SIZE
