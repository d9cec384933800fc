"""Token selectors (STS, STATA, random controls) in Spikformer: the math against float64
references, compact vs masked forwards, checkpoints, MAC counts."""
import math

import pytest
import torch
import torch.nn.functional as F

from effst.models import build_model, build_model_from_spec, CONFIGS
from effst.models.flops import spikformer_macs, token_schedule
from effst.models.token_selection import (
    TokenSelection,
    align_blocks_default,
    distillation_loss,
    inter_alignment_loss,
    intra_alignment_loss,
    keep_count,
    ratio_loss,
    stata_blocks_default,
    sts_blocks_default,
)

TINY = dict(depth=4, dim=32, heads=4, hidden=64, backend="reference")


def _images(batch=6, seed=0):
    return torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 3


def _model(selector, ratio=None, seed=0, **options):
    torch.manual_seed(seed)
    return build_model("spikformer-tiny", token_selector=selector, keep_ratio=ratio,
                       token_options=options or None, **TINY)


def test_schedules_and_rounding():
    assert sts_blocks_default(4) == (1, 2, 3) and sts_blocks_default(2) == (1,) and sts_blocks_default(1) == (0,)
    assert stata_blocks_default(4) == (1,) and stata_blocks_default(8) == (2, 5)
    assert align_blocks_default(4) == (0, 2, 3) and align_blocks_default(8) == (0, 3, 7)


def test_keep_count_reproduces_the_authors_int_of_a_float64_product():
    """SparseSpikformer's code: ``int(init_n * token_ratio[i])``, ``token_ratio = [r, r**2, r**3]``."""
    spec_table = {0.9: [64, 57, 51, 46], 0.8: [64, 51, 40, 32], 0.7: [64, 44, 31, 21],
                  0.6: [64, 38, 23, 13], 0.5: [64, 32, 16, 8]}        # TOKEN_SPARSITY.md §2.3, N = 64
    for rho, tokens in spec_table.items():
        assert [64] + [keep_count(64, rho ** i) for i in (1, 2, 3)] == tokens, rho
        config = CONFIGS["spikformer-4-384"]
        assert [n for n, _ in token_schedule(config, TokenSelection("sts", rho))] == tokens
    # 90 * 0.7 is 62.99999999999999 in float64: the authors' int() keeps 62, not 63.
    assert 90 * 0.7 < 63 and keep_count(90, 0.7) == int(90 * 0.7) == 62
    # Exact products stay exact; at least one token is kept.
    assert keep_count(10, 0.3) == 3 and keep_count(64, 0.5) == 32 and keep_count(3, 0.1) == 1
    assert keep_count(1, 0.2) == 1


def test_mac_counts_match_sparsespikformer_table():
    config = CONFIGS["spikformer-4-384"]
    paper = {1.0: 3.74, 0.9: 3.44, 0.8: 3.24, 0.7: 3.04, 0.6: 2.88, 0.5: 2.75}
    for rho, gmacs in paper.items():
        selection = None if rho == 1.0 else TokenSelection("sts", rho)
        total = spikformer_macs(config, selection)["total"] / 1e9
        assert abs(total - gmacs) / gmacs < 0.01, (rho, total)
    assert token_schedule(config, TokenSelection("sts", 0.7)) == [(64, 64), (44, 44), (31, 31), (21, 21)]
    # STATA gamma=0.5 on 4 blocks: anchor + 64 tokens until block 1's SSA, then anchor + 32.
    assert token_schedule(config, TokenSelection("stata", 0.5)) == [(65, 65), (65, 33), (33, 33), (33, 33)]
    # Hand count of one dense block: 4 D^2 n + 2 n^2 D + 2 D F n, times T = 4, four blocks.
    n, d, f = 64, 384, 1536
    assert spikformer_macs(config)["blocks"] == 4 * 4 * (4 * d * d * n + 2 * n * n * d + 2 * d * f * n)


def test_ratio_loss_float64_reference():
    g = torch.Generator().manual_seed(1)
    decisions = [(torch.rand(5, 16, generator=g) < p).double() for p in (0.8, 0.6, 0.4)]
    targets = [0.7, 0.49, 0.343]
    expected = sum(sum((float(d[b].sum()) / 16 - t) ** 2 for b in range(5)) / 5
                   for d, t in zip(decisions, targets)) / 3
    assert math.isclose(float(ratio_loss(decisions, targets)), expected, rel_tol=1e-12)


def test_distillation_is_kl_teacher_student():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 10, generator=g, dtype=torch.float64), torch.randn(4, 10, generator=g, dtype=torch.float64)
    p, q = t.softmax(-1), s.softmax(-1)
    assert math.isclose(float(distillation_loss(s, t)), float((p * (p.log() - q.log())).sum() / 4), rel_tol=1e-10)


def test_intra_alignment_float64_reference():
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(3, 5, 7, generator=g, dtype=torch.float64).requires_grad_()
    maps.data[0, 1] = maps.data[0, 3]        # a tie in norm: the lower index ranks first
    loss = intra_alignment_loss(maps)
    total, pairs = 0.0, 0
    for b in range(3):
        norms = [float(maps[b, i].detach().norm()) for i in range(5)]
        order = sorted(range(5), key=lambda i: (-norms[i], i))
        for r in range(2):
            total += float((maps[b, order[r + 2]] - maps[b, order[r]]).detach().norm())
            pairs += 1
    assert math.isclose(float(loss.detach()), total / pairs, rel_tol=1e-12)
    loss.backward()
    # The top half is the detached teacher: only the bottom ranks receive gradient.
    for b in range(3):
        norms = maps[b].detach().norm(dim=1)
        top = torch.sort(norms, descending=True, stable=True).indices[:2]
        assert torch.all(maps.grad[b, top] == 0)


def test_inter_alignment_float64_reference():
    g = torch.Generator().manual_seed(4)
    maps = [torch.rand(2, 4, 6, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    expected = sum(float((maps[i][b] - maps[j][b]).detach().norm()) for i in range(3) for j in range(i + 1, 3)
                   for b in range(2)) / 2 / 3
    loss = inter_alignment_loss(maps)
    assert math.isclose(float(loss), expected, rel_tol=1e-12)
    loss.backward()
    assert maps[2].grad is None or torch.all(maps[2].grad == 0)   # the deepest map only teaches


def test_gumbel_straight_through_gradient():
    """Hard Gumbel-Softmax: forward exactly one-hot, backward the soft sample's gradient."""
    logits = torch.randn(5, 9, 2, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 9, dtype=torch.float64)
    torch.manual_seed(5)
    hard = F.gumbel_softmax(logits, tau=1.0, hard=True)[..., 0]
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    (hard * weight).sum().backward()
    grad_hard = logits.grad.clone()
    logits.grad = None
    torch.manual_seed(5)
    soft = F.gumbel_softmax(logits, tau=1.0, hard=False)[..., 0]
    (soft * weight).sum().backward()
    assert torch.allclose(grad_hard, logits.grad, atol=1e-12)


def test_stata_scores_are_the_anchor_rows_of_attention():
    """Eq. 9: the head-mean anchor row of q k^T * s equals s/H * popcount(q0 & k_i)."""
    model = _model("stata", 0.5)
    model.eval()
    x = model.patch_embed(model.time_major(_images()))
    T, B, N, D = x.shape
    x = torch.cat([model.selector.anchor[:, None, None, :].expand(T, B, 1, D), x], dim=2)
    model.reset()
    _, scores, queries, keys = model.blocks[0].attn(x, details=True)
    heads = model.config.heads
    anchor_row = scores[:, :, :, 0, 1:].double().mean(dim=2)
    popcount = ((queries[:, :, :1, :] != 0) & (keys[:, :, 1:, :] != 0)).sum(-1).double()
    assert torch.allclose(anchor_row, model.blocks[0].attn.scale / heads * popcount, atol=1e-12)


def test_sts_training_masks_attention_and_reports_ratio_loss():
    model = _model("sts", 0.7)
    model.train()
    torch.manual_seed(0)
    logits = model(_images())
    losses = model.auxiliary_losses()
    assert set(losses) == {"ratio"} and losses["ratio"].requires_grad
    (logits.sum() + losses["ratio"]).backward()
    for predictor in model.selector.predictors:
        assert predictor[0].weight.grad is not None and predictor[0].weight.grad.abs().sum() > 0
    assert model.tokens_per_block()[0] == 16.0


def test_sts_compact_equals_masked_on_kept_tokens(monkeypatch):
    """Eval: the compact forward (gather kept tokens) gives the logits of the mask-mode forward
    with the same exact top-k decisions (kept queries only see kept keys, the head pools the
    kept tokens)."""
    from effst.ops import token_select

    model = _model("sts", 0.6)
    x = _images(seed=1)
    _calibrate_batchnorm(model, x)       # neurons fire: the kept set matters
    model.eval()
    fused = []
    real = token_select._select_and_gather
    monkeypatch.setattr(token_select, "_select_and_gather", lambda *args: fused.append(args[1]) or real(*args))
    compact = model(x)
    assert fused == [9, 5, 3]            # the fused score -> top-k -> gather kernel made every selection
    assert model.tokens_per_block() == [16.0, 9.0, 5.0, 3.0]
    model.selector.selection = TokenSelection.from_dict({**model.selector.selection.to_dict(), "mode": "mask"})
    masked = model(x)
    assert model.tokens_per_block() == [16.0, 9.0, 5.0, 3.0]
    assert torch.allclose(compact, masked, atol=1e-5, rtol=1e-5)


def test_stata_drops_tokens_in_training_and_adds_alignment_losses():
    model = _model("stata", 0.5)
    model.train()
    logits = model(_images())
    assert model.tokens_per_block() == [16.0, 16.0, 8.0, 8.0]
    losses = model.auxiliary_losses()
    assert set(losses) == {"intra_alignment", "inter_alignment"}
    (logits.sum() + sum(losses.values())).backward()
    assert model.selector.anchor.grad is not None


def test_one_block_models_select_tokens():
    for selector, tokens in (("sts", [11.0]), ("stata", [16.0]), ("sts-random", [11.0])):
        model = build_model("spikformer-tiny", token_selector=selector, keep_ratio=0.7, backend="reference")
        model.eval()
        assert model(_images()).shape == (6, 10) and model.tokens_per_block() == tokens


def test_random_controls_have_no_auxiliary_losses():
    for selector, tokens in (("sts-random", [16.0, 11.0, 7.0, 5.0]), ("stata-random", [16.0, 16.0, 8.0, 8.0])):
        model = _model(selector, 0.7 if selector == "sts-random" else 0.5)
        model.eval()
        model(_images())
        assert model.auxiliary_losses() == {} and model.tokens_per_block() == tokens


@pytest.mark.parametrize("selector", ["sts", "stata"])
def test_spec_round_trip_rebuilds_the_same_model(selector):
    model = _model(selector, 0.6, sts_blocks=[1, 3] if selector == "sts" else None)
    model.eval()
    rebuilt = build_model_from_spec(model.spec())
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    assert rebuilt.token_selection == model.token_selection
    x = _images(seed=2)
    assert torch.equal(model(x), rebuilt(x))


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="token_selector"):
        build_model("spikformer-tiny", token_selector="topk")
    with pytest.raises(ValueError, match="keep_ratio"):
        build_model("spikformer-tiny", depth=4, token_selector="sts", keep_ratio=1.5)
    with pytest.raises(ValueError, match="keep_ratio"):
        build_model("spikformer-tiny", keep_ratio=0.5)
    with pytest.raises(ValueError, match="sts_blocks"):
        build_model("spikformer-tiny", token_selector="sts", token_options={"sts_blocks": []})
    with pytest.raises(ValueError, match="sts_blocks: block indices \\[4\\]"):
        build_model("spikformer-tiny", token_selector="sts", depth=4, token_options={"sts_blocks": [4]})
    with pytest.raises(ValueError, match="token layout"):
        build_model("spikformer-2-256", token_selector="stata")
    with pytest.raises(ValueError, match="unknown fields"):
        build_model("spikformer-tiny", depth=4, token_selector="sts", token_options={"rho": 0.5})


def test_token_study_verdicts_come_from_paired_intervals():
    from effst.train.token_study import TokenStudyOptions, markdown, summarize

    options = TokenStudyOptions(seeds=[0, 1, 2], ratios=[0.5]).validate()

    def result(kind, seed, accuracy, ratio=0.5):
        row = {"seed": seed, "kind": kind, "accuracy": accuracy, "tokens_per_block": [16.0, 8.0, 4.0, 2.0],
               "macs": 1e6, "selector_macs": 0, "sops": 1e5, "energy_uj": 0.1}
        return row if kind in ("dense", "imp") else {**row, "ratio": ratio}

    results = [result("dense", s, 0.80) for s in range(3)]
    results += [result("sts", s, a) for s, a in enumerate((0.70, 0.72, 0.71))]
    results += [result("sts-random", s, a) for s, a in enumerate((0.60, 0.61, 0.62))]     # STS clearly better
    results += [result("stata", s, a) for s, a in enumerate((0.70, 0.60, 0.65))]
    results += [result("stata-random", s, a) for s, a in enumerate((0.66, 0.66, 0.62))]   # mean +0.003, wide
    results += [{**result("imp", s, 0.5), "weight_sparsity": 0.925} for s in range(3)]
    summary = summarize(options, results, 1.0)
    verdicts = {(c["selector"], c["against"]): c["verdict"] for c in summary["comparisons"]}
    assert verdicts[("sts", "sts-random")] == "yes"
    assert verdicts[("stata", "stata-random")] == "inconclusive"     # positive mean, interval contains 0
    assert verdicts[("sts", "dense")] == "no"
    text = markdown(summary)
    assert "inconclusive" in text and "92.5 % sparse" in text
    # The IMP jobs mark the rewind point after round 0's first step (late rewinding), not before.
    assert "rewound to the dense" not in text and "first step" in text
    assert options.imp_rounds == 9     # 0.75^8 keeps 10.01 %: nine rounds for >= 90 % sparsity
    with pytest.raises(ValueError, match="ratios"):
        TokenStudyOptions(ratios=[1.5]).validate()


def test_teacher_adds_the_distillation_term_in_training_only():
    teacher = _model(None, seed=1)
    student = _model("sts", 0.7)
    student.set_teacher(teacher)
    student.train()
    x = _images(seed=3)
    torch.manual_seed(0)
    logits = student(x)
    teacher.eval()
    expected = 0.5 * distillation_loss(logits, teacher(x))
    assert torch.allclose(student.auxiliary_losses()["distillation"], expected)
    assert "selector.teacher" not in str(list(student.state_dict()))
    assert not any(k.startswith("_teacher") for k in student.state_dict())
    student.eval()
    student(x)
    assert "distillation" not in student.auxiliary_losses()
    with pytest.raises(ValueError, match="teacher"):
        _model("stata", 0.5).set_teacher(teacher)


def test_cli_token_options_fail_early_with_named_flags(tmp_path, capsys):
    from effst.cli import main

    assert main(["pipeline", "--study", "tokens", "--sparsities", "0.5", "--out", str(tmp_path / "a")]) != 0
    assert "--sparsities" in capsys.readouterr().err
    assert main(["train", "--keep-ratio", "0.5", "--out", str(tmp_path / "b")]) != 0
    assert "--keep-ratio: only meaningful with --token-selector" in capsys.readouterr().err
    assert main(["train", "--token-selector", "sts", "--keep-ratio", "1.5", "--out", str(tmp_path / "c")]) != 0
    assert "keep_ratio" in capsys.readouterr().err


def test_sts_predictor_macs_count_the_tokens_entering_its_block():
    d, n = 32, 16
    per_token = d * (d // 2) + (d // 2) * 2
    one_block = build_model("spikformer-tiny", token_selector="sts", keep_ratio=0.5, backend="reference")
    assert spikformer_macs(one_block.config, one_block.token_selection)["selector"] == n * per_token
    config = build_model("spikformer-tiny", **TINY).config
    selection = TokenSelection("sts", 0.5, sts_blocks=(0, 2))     # 16 -> 8 at block 0 -> 4 at block 2
    assert token_schedule(config, selection) == [(8, 8), (8, 8), (4, 4), (4, 4)]
    assert spikformer_macs(config, selection)["selector"] == (16 + 8) * per_token
    with pytest.raises(TypeError, match="selection"):
        spikformer_macs(config, "sts")


def test_more_bad_options_are_named():
    from effst.models.spikformer import Spikformer

    with pytest.raises(TypeError, match="config: expected a SpikformerConfig"):
        Spikformer("spikformer-tiny", token_selection=TokenSelection("sts", 0.5))
    with pytest.raises(TypeError, match="token_options: expected a dict"):
        build_model("spikformer-tiny", token_selector="sts", token_options="mode=mask")
    with pytest.raises(ValueError, match="gumbel_tau"):
        build_model("spikformer-tiny", token_selector="sts", token_options={"gumbel_tau": math.inf})
    with pytest.raises(ValueError, match="sts_blocks"):
        build_model("spikformer-tiny", token_selector="sts", token_options={"sts_blocks": 1})
    for selector in ("stata", "stata-random"):
        with pytest.raises(ValueError, match="mode"):
            build_model("spikformer-tiny", token_selector=selector, token_options={"mode": "mask"})
    assert build_model("spikformer-tiny", token_selector="stata", token_options={"mode": "compact"},
                       backend="reference").token_selection.mode == "compact"


def test_token_study_imp_job_does_not_resume_rounds_of_an_earlier_run(tmp_path, monkeypatch):
    from effst.train import token_study

    options = token_study.TokenStudyOptions(seeds=[0], ratios=[0.5], depth=2, dim=16, hidden=32,
                                            imp_sparsity=0.2, imp_steps=1).validate()
    torch.save(token_study._build(options).state_dict(), tmp_path / "dense-seed0.pt")
    calls = []
    monkeypatch.setattr(token_study, "_train", lambda *args, **kwargs: calls.append(kwargs["seed"]))
    monkeypatch.setattr(token_study, "_measure", lambda *args: {"accuracy": 0.0})
    token_study.run_job({"seed": 0, "kind": "imp"}, options, str(tmp_path))
    first = len(calls)
    assert first == options.imp_rounds + 1
    token_study.run_job({"seed": 0, "kind": "imp"}, options, str(tmp_path))   # a second run, same folder
    assert len(calls) == 2 * first


def test_inter_alignment_refuses_maps_that_would_broadcast():
    with pytest.raises(ValueError, match="maps: expected one shape"):
        inter_alignment_loss([torch.rand(2, 1, 5), torch.rand(2, 3, 5)])


def test_loss_inputs_of_the_wrong_rank_are_named():
    with pytest.raises(ValueError, match="maps: expected a \\[B, G, N\\]"):
        intra_alignment_loss(torch.rand(4, 5))
    with pytest.raises(ValueError, match="decisions: expected \\[B, N\\]"):
        ratio_loss([torch.rand(5)], [0.5])


def _stata_full_grid_reference(model, images, maps=None):
    """Independent oracle of the STATA forward (eval): every token stays on the full grid, a
    dropped (token, t) gets zero input current at every neuron and is masked out as a key; the
    top-k is a plain sort by (-head-mean anchor score, token index) among the kept tokens."""
    selection = model.token_selection
    model.reset()
    x = model.patch_embed(model.time_major(images))
    T, B, N, D = x.shape
    x = torch.cat([model.selector.anchor[:, None, None, :].to(x.dtype).expand(T, B, 1, D), x], dim=2)
    keep = torch.ones(T, B, N + 1, dtype=x.dtype)
    for i, block in enumerate(model.blocks):
        a, m = block.attn, block.mlp

        def fire(neuron, current):
            return neuron(current * keep[..., None])

        q, k, v = (a._heads(fire(getattr(a, f"{p}_lif"), a._project(x, getattr(a, f"{p}_linear"), getattr(a, f"{p}_bn"))))
                   for p in ("q", "k", "v"))
        scores = (q @ k.transpose(-2, -1)) * a.scale * keep[:, :, None, None, :]
        y = fire(a.attn_lif, (scores @ v).transpose(2, 3).reshape(T, B, N + 1, -1))
        x = x + fire(a.proj_lif, a._project(y, a.proj_linear, a.proj_bn))
        if maps is not None and i in selection.align_blocks:
            maps.append(scores[:, :, :, 0, 1:])        # anchor rows, 0 at dropped keys
        if i in selection.stata_blocks:
            anchor_row = scores[:, :, :, 0, 1:].mean(dim=2)
            count = keep_count(int(keep[0, 0, 1:].sum()), selection.keep_ratio)
            new = torch.zeros_like(keep)
            new[..., 0] = 1
            for t in range(T):
                for b in range(B):
                    kept = sorted((j for j in range(N) if keep[t, b, j + 1] > 0),
                                  key=lambda j: (-float(anchor_row[t, b, j]), j))[:count]
                    new[t, b, [j + 1 for j in kept]] = 1
            keep = new
        x = x + fire(m.fc2_lif, m._project(fire(m.fc1_lif, m._project(x, m.fc1, m.fc1_bn)), m.fc2, m.fc2_bn))
    kept = keep[..., 1:]
    pooled = (x[:, :, 1:] * kept[..., None]).sum(dim=(0, 2)) / kept.sum(dim=(0, 2))[:, None]
    model.reset()
    return model.head(pooled)


def _calibrate_batchnorm(model, images):
    """Running statistics := those of one training batch, then BatchNorm in eval mode: an
    untrained model's neurons fire (with the initial statistics the anchors stay silent and
    every score ties at 0), and a full-grid oracle can match the compact model."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for module in norms:
        module.momentum = 1.0
    with torch.no_grad():
        model(images)
    for module in norms:
        module.eval()


def test_stata_forward_equals_a_full_grid_reference():
    model = _model("stata", 0.6, stata_blocks=[0, 2]).double().train()      # two drops: 16 -> 9 -> 5
    images = _images(batch=2, seed=3).double()
    _calibrate_batchnorm(model, images)
    model.eval()
    maps = []
    with torch.no_grad():
        assert torch.allclose(model(images), _stata_full_grid_reference(model, images, maps=maps), atol=1e-12, rtol=0)
    assert all(bool((m > 0).any()) for m in maps)     # the anchors fire: the ranking is not all ties


def test_the_student_cannot_be_its_own_teacher():
    model = _model("sts", 0.7)
    with pytest.raises(ValueError, match="teacher: expected a separate"):
        model.set_teacher(model)


def test_stata_fused_routed_neurons_leave_outputs_and_gradients_unchanged(monkeypatch):
    """After STATA's drop the blocks' neurons run the fused per-token-identity kernel (Triton
    neurons); the logits, auxiliary losses and every parameter gradient equal those of the torch
    path (reference neurons: scatter the current to all tokens, run the neuron, gather)."""
    from effst.nn import SLIF
    from effst.nn import token_routing

    fused_calls, slot_maps = [], []
    real = token_routing._run_fused
    monkeypatch.setattr(token_routing, "_run_fused", lambda *args: fused_calls.append(1) or real(*args))
    real_slots = token_routing.token_slots
    monkeypatch.setattr(token_routing, "token_slots", lambda *args: slot_maps.append(1) or real_slots(*args))
    results = []
    for backend in ("triton", "reference"):
        torch.manual_seed(0)
        model = build_model("spikformer-tiny", token_selector="stata", keep_ratio=0.5, depth=2, dim=16, heads=2,
                            hidden=32, backend="reference").double()
        for module in model.blocks.modules():
            if isinstance(module, SLIF):
                module.backend = backend
        model.train()
        logits = model(_images(batch=2, seed=4).double())
        losses = model.auxiliary_losses()
        (logits.logsumexp(-1).sum() + sum(losses.values())).backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        results.append((logits.detach(), {k: v.detach() for k, v in losses.items()}, grads))
    assert len(fused_calls) == 2 + 7      # block 0's MLP after the drop, then all of block 1
    assert len(slot_maps) == 1            # one selection, one route: its slot map is made once
    (logits, losses, grads), (ref_logits, ref_losses, ref_grads) = results
    assert torch.allclose(logits, ref_logits, atol=1e-12, rtol=0)
    assert losses.keys() == ref_losses.keys() and all(torch.allclose(losses[k], ref_losses[k]) for k in losses)
    assert grads.keys() == ref_grads.keys() and "selector.anchor" in grads
    for name in grads:
        assert torch.allclose(grads[name], ref_grads[name], atol=1e-10, rtol=1e-10), name


# ----------------------------------------------------------------------- independent oracles
# Written from TOKEN_SPARSITY.md (not from effst's selector code); they reuse only the model's
# layers (projections, BatchNorm, neurons, predictors, head) and redo the token logic by hand.
def _block_by_hand(block, x, key_weight, fire=lambda neuron, current: neuron(current)):
    """One Spikformer block with the attention scores multiplied by ``key_weight`` ``[T|1, B, N, N]``
    (1 = use the key); returns the new residual stream and the scores ``[T, B, H, N, N]``."""
    a, m = block.attn, block.mlp
    T, B, N, _ = x.shape
    q, k, v = (a._heads(fire(getattr(a, f"{p}_lif"), a._project(x, getattr(a, f"{p}_linear"), getattr(a, f"{p}_bn"))))
               for p in ("q", "k", "v"))
    scores = (q @ k.transpose(-2, -1)) * a.scale
    y = fire(a.attn_lif, ((scores * key_weight[:, :, None]) @ v).transpose(2, 3).reshape(T, B, N, -1))
    x = x + fire(a.proj_lif, a._project(y, a.proj_linear, a.proj_bn))
    x = x + fire(m.fc2_lif, m._project(fire(m.fc1_lif, m._project(x, m.fc1, m.fc1_bn)), m.fc2, m.fc2_bn))
    return x, scores


def _sts_training_oracle(model, images, seed):
    """STS in training (spec §2.2-2.5, S2-S5): the predictor on the T-mean, a 2-way hard
    Gumbel-Softmax (tau 1, column 0 = keep) multiplied into the previous decision, attention
    ``A'_ij = A_ij (d_j + (1 - d_j) delta_ij)``, pooling = mean over T and the kept tokens (a
    sample with none kept: all tokens, effst's documented choice), ratio loss
    ``2 * mean_i mean_b (kept fraction - rho^i)^2``. The Gumbel draws come from the same seed in
    the same order as the model's."""
    s = model.token_selection
    torch.manual_seed(seed)
    model.reset()
    x = model.patch_embed(model.time_major(images))
    T, B, N, _ = x.shape
    d = torch.ones(B, N, dtype=x.dtype)
    ratio_terms = []
    for i, block in enumerate(model.blocks):
        if i in s.sts_blocks:
            site = s.sts_blocks.index(i)
            logp = model.selector.predictors[site](x.mean(dim=0))
            d = d * F.gumbel_softmax(logp, tau=1.0, hard=True)[..., 0]
            ratio_terms.append(sum((d[b].sum() / N - s.keep_ratio ** (site + 1)) ** 2 for b in range(B)) / B)
        # weight[b, i, j] = d[b, j] for j != i, 1 on the diagonal (a dropped query sees itself)
        weight = torch.where(torch.eye(N, dtype=torch.bool), torch.ones((), dtype=x.dtype), d[:, None, :].expand(B, N, N))
        x, _ = _block_by_hand(block, x, weight[None])
    pooled = []
    for b in range(B):
        kept = [n for n in range(N) if d[b, n] > 0] or list(range(N))
        pooled.append(x[:, b, kept].sum(dim=(0, 1)) / (T * len(kept)))
    model.reset()
    return model.head(torch.stack(pooled)), 2.0 * sum(ratio_terms) / len(ratio_terms)


@pytest.mark.parametrize("seed", [0, 3])
def test_sts_training_forward_and_gradients_equal_a_spec_oracle(seed):
    model = _model("sts", 0.7).double().train()
    images = _images(batch=3, seed=seed).double()
    torch.manual_seed(seed)
    logits = model(images)
    ratio = model.auxiliary_losses()["ratio"]
    (logits.square().sum() + ratio).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    expected_logits, expected_ratio = _sts_training_oracle(model, images, seed)
    assert torch.allclose(logits, expected_logits, atol=1e-12, rtol=0)
    assert math.isclose(float(ratio.detach()), float(expected_ratio.detach()), rel_tol=1e-12)
    (expected_logits.square().sum() + expected_ratio).backward()
    predictor = [n for n in grads if n.startswith("selector.predictors")]
    assert predictor and any(grads[n].abs().sum() > 0 for n in predictor)     # straight-through reaches it
    for name, grad in grads.items():
        assert torch.allclose(grad, model.get_parameter(name).grad, atol=1e-10, rtol=1e-10), name


def _alignment_oracle(maps, selection):
    """STATA Eqs. 10-12 with the spec defaults (T9-T11) on anchor-row maps ``[T, B, H, N]`` (0 at
    dropped tokens): phi_T[t] = head mean, phi_H[h] = T mean; intra: sort each group by l2 norm
    (descending, ties to the lower index), rank r + G/2 against rank r, l2 distance, mean over
    pairs and samples, T and H terms added, mean over blocks; inter: mean over block pairs of the
    sample-mean l2 distance between the phi_T maps. Both weighted 0.01."""
    def intra(group):
        G = len(group)
        order = sorted(range(G), key=lambda g: (-float(group[g].norm()), g))
        return [float((group[order[r + G // 2]] - group[order[r]]).norm()) for r in range(G // 2)]

    T, B, H, _ = maps[0].shape
    per_block = []
    for m in maps:
        t_terms = [v for b in range(B) for v in intra([m[t, b].mean(dim=0) for t in range(T)])]
        h_terms = [v for b in range(B) for v in intra([m[:, b, h].mean(dim=0) for h in range(H)])]
        per_block.append(sum(t_terms) / len(t_terms) + sum(h_terms) / len(h_terms))
    phi = [m.mean(dim=2) for m in maps]                                   # [T, B, N]
    pairs = [(i, j) for i in range(len(phi)) for j in range(i + 1, len(phi))]
    inter = sum(sum(float((phi[i][:, b] - phi[j][:, b]).norm()) for b in range(B)) / B for i, j in pairs) / len(pairs)
    return {"intra_alignment": selection.intra_weight * sum(per_block) / len(per_block),
            "inter_alignment": selection.inter_weight * inter}


def test_stata_alignment_losses_equal_a_spec_oracle():
    """Training-mode STATA (BatchNorm on running statistics so a full-grid oracle can match):
    the model's alignment losses equal Eqs. 10-11 on the anchor rows of a full-grid forward
    where dropped (token, t) get zero input and are masked as keys."""
    model = _model("stata", 0.5).double().train()
    images = _images(batch=2, seed=5).double()
    _calibrate_batchnorm(model, images)
    with torch.no_grad():
        model(images)
        losses = {k: float(v) for k, v in model.auxiliary_losses().items()}
        maps = []
        _stata_full_grid_reference(model, images, maps=maps)
    assert len(maps) == 3 and all(bool((m > 0).any()) for m in maps)      # blocks {0, 2, 3}, anchors fire
    expected = _alignment_oracle(maps, model.token_selection)
    assert losses.keys() == expected.keys()
    for name, value in expected.items():
        assert value > 0 and math.isclose(losses[name], value, rel_tol=1e-10), name


# ----------------------------------------------------------------------- no host synchronisation
# Issue 12 / brief H8: the STATA training step and STS inference are captured whole in a CUDA
# graph by the train-step bench, so nothing on their CUDA path may read a tensor value on the
# host, create a tensor from host data, or take a data-dependent shape.
class _HostSyncRecorder:
    """Records, on CPU tensors, the calls that synchronise with the host on CUDA tensors.

    * a dispatch mode (it also sees the autograd backward): ``_local_scalar_dense`` (``.item()``,
      ``bool()``, ``int()``, ``float()``, a Python branch on a tensor), data-dependent shapes
      (``nonzero``, ``masked_select``, ``unique*``, ``argwhere``, ``repeat_interleave`` without
      ``output_size``, indexing with a boolean mask), ``equal``, and ``lift_fresh`` (a tensor
      built from Python data: a host-to-device copy on CUDA);
    * a function mode (the Python-level forward): ``tolist``, ``numpy``, ``cpu``, ``__array__``,
      a factory (``zeros``, ``arange``, ...) called without ``device=`` (a CPU tensor, copied to the
      GPU when it meets a CUDA one); and ``Tensor.is_cuda`` answers True, so guards written
      ``if not t.is_cuda: <check values>`` take the branch a CUDA tensor takes.

    Triton's interpreter (the CPU stand-in for a kernel launch) runs unrecorded.
    """

    DISPATCH = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
                "unique_consecutive", "argwhere", "equal", "is_nonzero", "lift_fresh", "masked_scatter"}
    FUNCTIONS = {"tolist", "numpy", "cpu", "__array__"}
    FACTORIES = {"zeros", "ones", "empty", "full", "arange", "eye", "rand", "randn", "randint", "linspace"}

    def __init__(self):
        from torch.overrides import TorchFunctionMode
        from torch.utils._python_dispatch import TorchDispatchMode

        self.calls: list[str] = []
        self.ops = 0             # operations seen while recording (the step did run under the modes)
        self.paused = False
        recorder, is_cuda = self, torch.Tensor.is_cuda.__get__

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if not recorder.paused:
                    recorder.ops += 1
                    name = func.overloadpacket.__name__
                    if name in recorder.DISPATCH:
                        recorder.record(f"aten.{name}")
                    elif name == "repeat_interleave" and kwargs.get("output_size") is None:
                        recorder.record("aten.repeat_interleave without output_size")
                    elif name in ("index", "index_put", "index_put_") and any(
                            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                            for i in (args[1] if len(args) > 1 else ()) or ()):
                        recorder.record(f"aten.{name} with a boolean mask")
                return func(*args, **kwargs)

        class Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if not recorder.paused:
                    if func == is_cuda:       # a method-wrapper: equal, not identical, per access
                        return True
                    name = getattr(func, "__name__", None)
                    if name in recorder.FUNCTIONS:
                        recorder.record(f"Tensor.{name}")
                    elif name in recorder.FACTORIES and getattr(torch, name) is func and (kwargs or {}).get(
                            "device") is None:
                        recorder.record(f"torch.{name} without device=")
                return func(*args, **(kwargs or {}))

        self._modes = (Function(), Dispatch())

    def record(self, what: str) -> None:
        import os
        import traceback

        import effst

        root = os.path.dirname(effst.__file__) + os.sep
        frames = [f for f in traceback.extract_stack()[:-2] if f.filename.startswith(root)]
        where = f"effst/{frames[-1].filename[len(root):]}:{frames[-1].lineno} ({frames[-1].line})" if frames \
            else "outside effst (e.g. a torch op's autograd backward)"
        self.calls.append(f"{what} at {where}")

    def __enter__(self):
        import triton.runtime.interpreter as interpreter

        self._patched = interpreter.InterpretedFunction.run
        recorder, run = self, self._patched

        def unrecorded(function, *args, **kwargs):
            recorder.paused, before = True, recorder.paused
            try:
                return run(function, *args, **kwargs)
            finally:
                recorder.paused = before

        interpreter.InterpretedFunction.run = unrecorded
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        import triton.runtime.interpreter as interpreter

        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        interpreter.InterpretedFunction.run = self._patched
        return False


def test_host_sync_recorder_catches_the_usual_syncing_calls():
    """The recorder below is the CPU test's only instrument: each pattern it should catch, caught
    (also inside an autograd backward), and the is_cuda guard takes the CUDA branch."""
    from effst.ops import token_select

    class ReadsInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 1

        @staticmethod
        def backward(ctx, grad):
            return grad * float(grad.sum())

    x = torch.tensor([0.5, 2.0, 3.0], requires_grad=True)
    cases = {"item": lambda: x.sum().item(), "branch": lambda: bool(x.sum() > 0), "mask": lambda: x[x > 1],
             "nonzero": lambda: x.nonzero(), "tolist": lambda: x.tolist(), "host data": lambda: torch.tensor([1.0]),
             "no device": lambda: torch.zeros(3, dtype=x.dtype) + x,
             "backward": lambda: ReadsInBackward.apply(x).sum().backward()}
    for name, call in cases.items():
        with _HostSyncRecorder() as recorder:
            call()
        assert recorder.calls, name
    index = torch.tensor([[0, 2]]).expand(2, 2)
    with _HostSyncRecorder() as recorder:
        token_select._check_index(index, 2, 3)   # the value checks it makes off CUDA are skipped
        y = torch.sort(x.detach() * 2, stable=True).values.cumsum(0) + torch.zeros(3, device=x.device)
    assert recorder.calls == [], recorder.calls
    with _HostSyncRecorder() as recorder:
        torch.tensor([1])
    assert recorder.calls and "lift_fresh" in recorder.calls[0]
    assert y.shape == (3,)


def _token_steps(selector: str):
    """(model, step) for the two steps the train-step bench captures: STATA's training step
    (forward, cross-entropy plus the auxiliary losses, backward) and STS's inference forward."""
    torch.manual_seed(0)
    model = build_model("spikformer-tiny", token_selector=selector, depth=2, dim=16, heads=2, hidden=32, T=2,
                        backend="triton")
    images, labels = _images(batch=2, seed=7), torch.tensor([1, 3])
    if selector == "stata":
        model.train()

        def step():
            logits = model(images)
            loss = F.cross_entropy(logits, labels) + sum(model.auxiliary_losses().values())
            loss.backward()
            return logits
    else:
        model.eval()

        def step():
            with torch.no_grad():
                return model(images)
    return model, step


@pytest.mark.parametrize("selector", ["stata", "sts"])
def test_token_selection_step_has_no_host_sync_on_its_cuda_path(selector, monkeypatch):
    """STATA training / STS inference (Triton kernels through the interpreter, the neurons' and
    the token ops' CUDA branches) call nothing that synchronises the host. A first step runs
    unrecorded (caches made once, as the bench's warm-up does)."""
    from effst.nn import token_routing

    model, step = _token_steps(selector)
    fused = []
    real = token_routing._run_fused
    monkeypatch.setattr(token_routing, "_run_fused", lambda *args: fused.append(1) or real(*args))
    step()
    with _HostSyncRecorder() as recorder:
        logits = step()
    assert recorder.calls == [], "\n".join(recorder.calls)
    assert recorder.ops > 100, recorder.ops
    assert torch.isfinite(logits).all() and logits.shape == (2, 10)
    assert model.tokens_per_block()[-1] < model.config.tokens()                 # tokens were dropped
    assert (len(fused) > 0) == (selector == "stata")                            # the fused routed neurons ran


def _cuda_token_model(selector: str, device: str, images: torch.Tensor):
    """STATA in training mode; STS in eval mode with BatchNorm calibrated on ``images`` (with the
    initial running statistics an untrained model's neurons stay silent: constant logits)."""
    torch.manual_seed(0)
    model = build_model("spikformer-4-384", token_selector=selector, depth=2, T=2, backend="triton").to(device)
    if selector == "stata":
        return model.train()
    _calibrate_batchnorm(model.train(), images)
    return model.eval()


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12))


@pytest.mark.gpu
@pytest.mark.parametrize("selector", ["stata", "sts"])
def test_token_selection_step_never_syncs_and_replays_in_a_cuda_graph(selector, device):
    """On CUDA (Spikformer-4-384's CIFAR shape, two blocks, T = 2): the STATA training step
    (forward, loss with the alignment terms, backward, AdamW(capturable=True)) and STS inference
    run under ``set_sync_debug_mode('error')``; captured in one CUDA graph (forward and backward),
    a replay on a NEW input (copied into the captured one) gives the eager logits and gradients
    on that input, so the token choice is made inside the graph; and the train-step bench's
    ``cuda-graph`` rows for both selectors run."""
    from effst.benchmarks.train_step import time_train_step

    train = selector == "stata"
    g = torch.Generator().manual_seed(3)
    first, second = (torch.rand(4, 3, 32, 32, generator=g).to(device) * 2 for _ in range(2))
    second[..., :16] = 0       # unlike the first: logits 0.41 (STATA) / 0.79 (STS) apart relatively (CPU)
    model = _cuda_token_model(selector, device, first)
    labels = torch.tensor([1, 3, 5, 7], device=device)
    static = first.clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=True) if train else None

    def step(update: bool = False):
        if not train:
            with torch.no_grad():
                return model(static)
        logits = model(static)
        (F.cross_entropy(logits, labels) + sum(model.auxiliary_losses().values())).backward()
        if update:
            optimizer.step()
        return logits

    step(update=True)                      # kernels compiled, caches made, optimizer state created
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            step(update=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    # capture forward (+ backward) after warm-up on a side stream, as torch.cuda.graphs documents
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()                          # on the first input
    on_first = captured.detach().clone()
    static.copy_(second)
    graph.replay()
    torch.cuda.synchronize()
    replayed = captured.detach().clone()
    replayed_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    eager = step().detach()
    eager_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert model.tokens_per_block()[-1] < model.config.tokens()
    assert _relative_error(replayed, eager) <= 1e-2, (_relative_error(replayed, eager), replayed, eager)
    assert _relative_error(on_first, eager) > 0.1, "the two inputs give the same logits: the check is blind"
    assert replayed_grads.keys() == eager_grads.keys() and (not train or "selector.anchor" in eager_grads)
    errors = {n: _relative_error(replayed_grads[n], eager_grads[n]) for n in eager_grads}
    assert all(e <= 2e-2 for e in errors.values()), {n: e for n, e in errors.items() if e > 2e-2}
    # the bench's own rows (the whole step in one graph, bf16 autocast), at test size
    row = time_train_step("lif", device=device, batch=4, T=2, model="spikformer-4-384", overrides={"depth": 2},
                          token_selector=selector, keep_ratio=0.5 if train else 0.7, train=train,
                          mode="cuda-graph", reps=2, warmup=2, backend="triton")
    assert row["status"] == "ok" and row["mode"] == "cuda-graph" and row["ms"] > 0, row
    assert row["tokens_per_block"][-1] < row["tokens"], row
