"""Iterative magnitude pruning (effst.prune.imp): exact mask sizes, global threshold, rewinding,
resume mid-IMP bit-identical."""
from fractions import Fraction

import pytest
import torch

from effst.models import build_model
from effst.prune import get_mask
from effst.prune.imp import mask_counts, prunable_weights, prune_round, rewind, run_imp, survivors


def _model(seed=0):
    torch.manual_seed(seed)
    return build_model("spikformer-tiny", depth=2, dim=16, heads=2, hidden=32, backend="reference",
                        token_selector="sts", keep_ratio=0.7)


def _trainer(steps=2):
    """A tiny deterministic trainer: a fresh AdamW each round, random inputs from the global RNG."""
    def train(model, round_index, mark_rewind_point):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
        model.train()
        for step in range(steps):
            x = torch.rand(4, 1, 8, 8) * 3
            y = torch.randint(0, 10, (4,))
            loss = torch.nn.functional.cross_entropy(model(x), y) + sum(model.auxiliary_losses().values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if round_index == 0 and step == 0:
                mark_rewind_point()
        return round_index
    return train


def test_survivors_rounding_rule():
    assert survivors(1000, 0) == 1000 and survivors(1000, 1) == 750 and survivors(1000, 2) == 563  # 562.5 -> 563
    for n in (1, 7, 12345, 9281040):
        for k in range(16):
            assert survivors(n, k) == int(Fraction(n) * Fraction(3, 4) ** k + Fraction(1, 2))
    with pytest.raises(ValueError, match="fraction"):
        survivors(10, 1, fraction=1.0)


def test_mask_sizes_are_exact_and_global():
    model = _model()
    names = [name for name, _ in prunable_weights(model)]
    assert any("proj_conv" in n for n in names) and any("predictors" in n for n in names) and "head" in names
    total = sum(m.weight.numel() for _, m in prunable_weights(model))
    kept_before = None
    for k in range(1, 9):
        prune_round(model, k)
        kept, masked_total = mask_counts(model)
        assert masked_total == total and kept == survivors(total, k)
        masks = {name: get_mask(m).clone() for name, m in prunable_weights(model)}
        if kept_before is not None:   # never revives a pruned weight
            assert all(torch.all(masks[n] <= kept_before[n]) for n in masks)
        kept_before = masks
    assert 1 - kept / total >= 0.89   # 0.75^8 = 10 % kept
    # One threshold over all tensors: after one round every kept |w| >= every pruned |w|.
    fresh = _model(1)
    weights = torch.cat([m.weight.detach().abs().flatten() for _, m in prunable_weights(fresh)])
    prune_round(fresh, 1)
    kept_values = torch.cat([m.weight.detach().abs()[get_mask(m)] for _, m in prunable_weights(fresh)])
    pruned_values = torch.cat([weights_of(m, fresh) for _, m in prunable_weights(fresh)])
    assert kept_values.min() >= pruned_values.max()
    assert weights.numel() == total


def weights_of(module, model):
    return module.parametrizations.weight.original.detach().abs()[~get_mask(module)]


def test_pruned_original_is_zero_and_rewind_restores_early_weights(tmp_path):
    model = _model()
    history = run_imp(model, _trainer(), rounds=2, directory=tmp_path)
    assert [h["round"] for h in history] == [0, 1, 2]
    assert [h["kept"] for h in history] == [history[0]["total"], survivors(history[0]["total"], 1),
                                             survivors(history[0]["total"], 2)]
    for _, module in prunable_weights(model):
        assert torch.all(module.weight[~get_mask(module)] == 0)


def test_resume_mid_imp_is_bit_identical(tmp_path):
    straight = _model()
    run_imp(straight, _trainer(), rounds=3, directory=tmp_path / "a")
    resumed = _model()
    run_imp(resumed, _trainer(), rounds=1, directory=tmp_path / "b")      # "crash" after round 1
    fresh = _model(seed=99)                                               # a new process: other init
    history = run_imp(fresh, _trainer(), rounds=3, directory=tmp_path / "b")
    assert [h["round"] for h in history] == [0, 1, 2, 3]
    a, b = straight.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rewind_takes_a_plain_state_dict_and_refuses_one_that_does_not_fit():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    early = {k: v.clone() for k, v in model.state_dict().items()}     # taken before the masks
    prune_round(model, 1)
    with torch.no_grad():
        model[0].parametrizations.weight.original.mul_(3.0)
    rewind(model, early)
    for i in (0, 1):
        assert torch.equal(model[i].weight, early[f"{i}.weight"] * get_mask(model[i]))
    with pytest.raises(ValueError, match="state: does not fit"):
        rewind(model, {"0.bias": early["0.bias"]})


def test_resume_from_a_folder_that_went_further_stops_at_the_requested_round(tmp_path):
    run_imp(_model(), _trainer(), rounds=2, directory=tmp_path)
    model = _model(seed=5)
    history = run_imp(model, _trainer(), rounds=1, directory=tmp_path)
    assert [h["round"] for h in history] == [0, 1]
    kept, total = mask_counts(model)
    assert kept == survivors(total, 1)
