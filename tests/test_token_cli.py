"""Token selection as ordinary options of ``effst train/finetune/eval`` and the YAML config (issue 12).

A dense checkpoint fine-tuned with a selector keeps its weights (the selector's are new) and, for
STS, distils from the dense model; eval uses the checkpoint's selector and may evaluate at another
keep ratio; model_overrides that conflict with a checkpoint are refused by name, never ignored; a
run with a selector stopped mid-run and resumed ends bit-identical to an uninterrupted one; the
token study writes its rows and one verdict sentence per selector.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from _cli import assert_same_weights, state_of, write_config
from effst.cli import main

# spikformer-tiny on 8x8 synthetic images has 16 tokens; two blocks so that STS selects at block 1
# and STATA prunes in block 0 (depth // 3 = 0).
TWO_BLOCKS = "tensorboard: false\nmodel_overrides: {depth: 2}\n"


@pytest.fixture(autouse=True)
def _cpu_path(monkeypatch):
    """The commands as a CPU user runs them: the token kernels' torch path, not Triton's
    interpreter (the kernels have their own tests)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A dense two-block model trained one epoch on the tiny synthetic data."""
    root = tmp_path_factory.mktemp("dense")
    config = write_config(root, TWO_BLOCKS)
    assert main(["train", "--config", str(config), "--epochs", "1", "--out", str(root / "run")]) == 0
    return root / "run" / "checkpoint.pt", config


def _log_columns(out: Path) -> list[str]:
    with open(out / "log.csv") as f:
        return next(csv.reader(f))


def test_finetune_adds_sts_to_a_dense_checkpoint_and_eval_reports_it(dense, tmp_path, capsys):
    ckpt, _ = dense
    # The keep ratio from the config's model_overrides, the selector from the flag: both honoured.
    config = write_config(tmp_path, "tensorboard: false\nmodel_overrides: {depth: 2, keep_ratio: 0.6}\n")
    out = tmp_path / "sts"
    code, _, err = _cli(capsys, "finetune", ckpt, "--config", config, "--neuron", "lif", "--token-selector", "sts",
                        "--epochs", "1", "--lr", "1e-9", "--weight-decay", "0", "--out", out)
    assert code == 0, err
    assert "adding token selection 'sts' (keep_ratio 0.6" in err
    assert "newly initialised: selector.predictors.0.0.weight" in err
    assert "distillation teacher: the checkpoint's dense model" in err
    # The distillation and ratio losses were trained on (the teacher was set).
    assert {"aux_distillation", "aux_ratio"} <= set(_log_columns(out))
    new, old = state_of(out / "checkpoint.pt"), state_of(ckpt)
    assert new["recipe"][0]["overrides"] == {**old["recipe"][0]["overrides"], "token_selector": "sts",
                                             "keep_ratio": 0.6}
    assert new["recipe"][1:] == old["recipe"][1:]
    # Every dense weight was loaded (lr 1e-9: they barely moved), only the predictors are new;
    # BatchNorm running statistics move with every training forward.
    fresh = sorted(k for k in new["model"] if k not in old["model"])
    assert fresh and all(k.startswith("selector.predictors.") for k in fresh)
    for key, value in old["model"].items():
        if "running_" not in key and "num_batches_tracked" not in key:
            assert torch.allclose(new["model"][key].float(), value.float(), atol=1e-5), key
    # eval uses the checkpoint's selector: 16 tokens, then int(16 * 0.6) = 9 at block 1.
    code, printed, err = _cli(capsys, "eval", out / "checkpoint.pt", "--out", tmp_path / "eval")
    assert code == 0, err
    assert "token selection sts at keep ratio 0.6: image tokens per block 16, 9" in printed
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["token_selection"]["tokens_per_block"] == [16.0, 9.0]
    assert "tokens sts keep 0.6" in (tmp_path / "eval" / "report.md").read_text()
    # --keep-ratio (or the config's keep_ratio) evaluates at another ratio, and says so.
    code, printed, err = _cli(capsys, "eval", out / "checkpoint.pt", "--token-selector", "sts", "--keep-ratio", "0.5")
    assert code == 0, err
    assert "keep_ratio 0.5 (the checkpoint was trained at 0.6)" in err
    assert "image tokens per block 16, 8" in printed
    half = write_config(tmp_path / "eval", "model_overrides: {keep_ratio: 0.5}\n")
    code, printed, err = _cli(capsys, "eval", out / "checkpoint.pt", "--config", half)
    assert code == 0, err
    assert "image tokens per block 16, 8" in printed


@pytest.mark.parametrize("overrides, command, message", [
    ("{token_selector: stata}", "eval-sts", "model_overrides: token_selector (--token-selector) 'stata': the checkpoint"),
    ("{keep_ratio: 0.5}", "eval-dense", "keep_ratio (--keep-ratio): only meaningful with a token_selector"),
    ("{token_selector: sts}", "eval-dense", "is dense, so eval has no trained selector"),
    ("{depth: 3}", "finetune", "model_overrides: depth is 2 in the checkpoint"),
    ("{depth: 2, dim: 64}", "eval-dense", "model_overrides: dim is 32 in the checkpoint"),
    ("{token_selector: sts}", "prune", "model_overrides: token_selector is None in the checkpoint"),
    ("{token_selector: sts, keep_ratio: 1.5}", "finetune", "keep_ratio: expected a float in (0, 1]"),
], ids=["eval-other-selector", "eval-ratio-dense", "eval-add-selector", "finetune-depth", "eval-dim", "prune",
        "bad-ratio"])
def test_model_overrides_that_conflict_with_the_checkpoint_are_refused_by_name(dense, tmp_path, capsys, overrides,
                                                                                command, message):
    ckpt, _ = dense
    config = write_config(tmp_path, f"tensorboard: false\nmodel_overrides: {overrides}\n")
    if command == "eval-sts":  # an STS checkpoint: 0 epochs is not allowed, so a cheap 1-step fine-tune
        source, plain = tmp_path / "sts", tmp_path / "plain"
        plain.mkdir()
        code, _, err = _cli(capsys, "finetune", ckpt, "--config", write_config(plain, TWO_BLOCKS),
                            "--neuron", "lif", "--token-selector", "sts", "--epochs", "1", "--out", source)
        assert code == 0, err
        ckpt = source / "checkpoint.pt"
    args = {"eval-sts": ["eval", ckpt], "eval-dense": ["eval", ckpt], "finetune": ["finetune", ckpt, "--neuron", "lif"],
            "prune": ["prune", ckpt, "--method", "l1p", "--sparsity", "0.5"]}[command]
    code, _, err = _cli(capsys, *args, "--config", config, "--out", tmp_path / "out")
    assert code == 2, err
    error = [line for line in err.splitlines() if line.startswith("effst: error: ")]
    assert len(error) == 1 and message in error[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["eval", "--token-selector", "sts"], "model_overrides: token_selector (--token-selector) 'sts': the checkpoint"),
    (["eval", "--keep-ratio", "0.5"], "keep_ratio (--keep-ratio): only meaningful with a token_selector"),
    (["finetune", "--keep-ratio", "0.5"], "keep_ratio (--keep-ratio): only meaningful with a token_selector"),
    (["finetune", "--token-selector", "sts", "--keep-ratio", "0"], "keep_ratio: expected a float in (0, 1]"),
], ids=["eval-selector", "eval-ratio", "finetune-ratio-alone", "finetune-bad-ratio"])
def test_token_flags_on_a_dense_checkpoint_fail_in_one_line_naming_the_flag(dense, tmp_path, capsys, args, message):
    ckpt, config = dense
    code, _, err = _cli(capsys, args[0], ckpt, *args[1:], "--config", config, "--out", tmp_path / "out")
    assert code == 2, err
    assert err.splitlines()[-1].startswith("effst: error: ") and message in err.splitlines()[-1], err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("stage", ["train-sts", "train-stata", "finetune-sts"])
def test_a_run_with_a_selector_resumes_bit_identical(dense, tmp_path, capsys, stage):
    """STS draws Gumbel noise every step (the RNG must resume), STATA routes tokens, and the STS
    fine-tune distils from the dense checkpoint again after --resume."""
    ckpt, _ = dense
    config = write_config(tmp_path, TWO_BLOCKS)
    command, selector = stage.split("-")
    head = ["train"] if command == "train" else ["finetune", ckpt, "--neuron", "lif"]
    args = head + ["--config", config, "--epochs", "2", "--token-selector", selector, "--keep-ratio", "0.5"]
    code, _, err = _cli(capsys, *args, "--out", tmp_path / "whole")
    assert code == 0, err
    code, _, err = _cli(capsys, *args, "--out", tmp_path / "run", "--stop-after-steps", "3")  # mid-epoch 0
    assert code == 130, err
    stopped = state_of(tmp_path / "run" / "checkpoint.pt")
    assert (stopped["progress"]["epoch"], stopped["progress"]["step"]) == (0, 3)
    assert stopped["recipe"][0]["overrides"]["token_selector"] == selector
    resume = ["train"] if command == "train" else ["finetune", ckpt]
    code, _, err = _cli(capsys, *resume, "--out", tmp_path / "run", "--resume")
    assert code == 0, err
    final, expected = state_of(tmp_path / "run" / "checkpoint.pt"), state_of(tmp_path / "whole" / "checkpoint.pt")
    assert final["recipe"] == expected["recipe"]
    assert_same_weights(final["model"], expected["model"])
    assert_same_weights(final["optimizer"]["state"][0], expected["optimizer"]["state"][0])
    # A selector's own auxiliary losses were logged the same way.
    rows = [list(csv.DictReader(open(d / "log.csv"))) for d in (tmp_path / "run", tmp_path / "whole")]
    drop = ("epoch_time_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows[0]] == \
           [{k: v for k, v in r.items() if k not in drop} for r in rows[1]]


def test_resume_refuses_another_selector(dense, tmp_path, capsys):
    config = write_config(tmp_path, TWO_BLOCKS)
    args = ["train", "--config", config, "--epochs", "2", "--out", tmp_path / "run", "--token-selector", "sts"]
    assert _cli(capsys, *args, "--stop-after-steps", "2")[0] == 130
    code, _, err = _cli(capsys, "train", "--out", tmp_path / "run", "--resume", "--token-selector", "stata")
    assert code == 2
    assert "made for another model" in err and "token_selector" in err


def test_a_resumed_sts_finetune_refuses_another_teacher(dense, tmp_path, capsys):
    ckpt, _ = dense
    config = write_config(tmp_path, TWO_BLOCKS)
    out = tmp_path / "run"
    args = ["--config", config, "--neuron", "lif", "--epochs", "2", "--token-selector", "sts", "--out", out]
    assert _cli(capsys, "finetune", ckpt, *args, "--stop-after-steps", "2")[0] == 130
    teacher = state_of(out / "checkpoint.pt")["metrics"]["teacher"]
    assert teacher["checkpoint"] == str(ckpt) and len(teacher["weights_sha256"]) == 64
    other = tmp_path / "other"
    assert _cli(capsys, "train", "--config", config, "--epochs", "1", "--seed", "1", "--out", other)[0] == 0
    code, _, err = _cli(capsys, "finetune", other / "checkpoint.pt", "--out", out, "--resume")
    assert code == 2
    assert f"distilled from the dense model of {ckpt}" in err and "holds other weights" in err


def _comparison(selector: str, ratio: float, x: list, y: list) -> dict:
    from effst.train.statistics import paired_comparison

    return {"selector": selector, "ratio": ratio, "against": f"{selector}-random", **paired_comparison(x, y).to_dict()}


def test_the_overall_verdict_comes_from_the_paired_intervals_not_a_mean():
    from effst.train.token_study import selector_verdict

    # A positive mean whose interval contains 0 is no win.
    wobbly = _comparison("sts", 0.5, [0.50, 0.60, 0.55], [0.50, 0.58, 0.57 - 0.03])
    assert wobbly["mean"] > 0 and wobbly["verdict"] == "inconclusive"
    assert selector_verdict("sts", [wobbly]) == \
        "STS does not beat its random control at any ratio on this data (paired 95 % intervals contain 0)."
    better = _comparison("stata", 0.7, [0.50, 0.60, 0.55], [0.45, 0.54, 0.50])
    worse = _comparison("stata", 0.9, [0.50, 0.60, 0.55], [0.55, 0.66, 0.60])
    assert (better["verdict"], worse["verdict"]) == ("yes", "no")
    assert selector_verdict("stata", [better, worse]) == (
        "STATA beats its random control at γ = 0.7 on this data (paired 95 % interval above 0); "
        "worse at γ = 0.9 (paired 95 % interval below 0).")
    assert selector_verdict("stata", [worse, {**wobbly, "selector": "stata", "against": "stata-random", "ratio": 0.5}]) \
        == ("STATA does not beat its random control at any ratio on this data: worse at γ = 0.9 (paired 95 % "
            "interval below 0); inconclusive at γ = 0.5 (interval contains 0).")
    # One seed: no interval, hence no verdict, whatever the sign of the difference.
    single = _comparison("sts", 0.7, [0.60], [0.50])
    assert single["ci_low"] is None
    assert selector_verdict("sts", [single]) == "STS: no verdict on its random control (one seed gives no paired interval)."
    assert selector_verdict("sts", [wobbly, single]) == (
        "STS does not beat its random control at any ratio on this data: inconclusive at ρ = 0.5 (interval contains "
        "0); no interval at ρ = 0.7 (fewer than 2 seeds).")
    assert selector_verdict("stata", [wobbly]) == "STATA: not run."
    one_seed = _comparison("sts", 0.5, [0.9], [0.1])
    assert selector_verdict("sts", [one_seed]) == "STS: no verdict on its random control (one seed gives no paired interval)."


def test_token_study_end_to_end_writes_rows_and_verdicts(tmp_path):
    from effst.train.token_study import TokenStudyOptions, run_token_study, selector_verdict

    options = TokenStudyOptions(seeds=[0, 1], ratios=[0.5], depth=2, dim=16, hidden=32, pretrain_epochs=1,
                                finetune_epochs=1, imp_sparsity=0.4, imp_steps=2, batch_size=256, workers=2)
    assert options.imp_rounds == 2  # 0.75 ** 2 = 56 % kept
    summary = run_token_study(options, tmp_path, log=lambda line: None)
    assert json.loads((tmp_path / "summary.json").read_text())["verdicts"] == summary["verdicts"]
    rows = {(r["method"], r["ratio"]): r for r in summary["rows"]}
    assert set(rows) == {("dense", None), ("imp", None), ("sts", 0.5), ("sts-random", 0.5), ("stata", 0.5),
                         ("stata-random", 0.5)}
    assert all(sorted(r["per_seed"]) == [0, 1] for r in rows.values())
    # 16 tokens (8x8 digits, pooled once): STS keeps int(16 * 0.5) = 8 from block 1; STATA prunes
    # in block 0 after its attention, so block 1 sees 8 tokens too.
    for method in ("sts", "sts-random", "stata", "stata-random"):
        assert rows[(method, 0.5)]["per_seed"][0]["tokens_per_block"] == [16.0, 8.0], method
    assert rows[("imp", None)]["per_seed"][1]["weight_sparsity"] == pytest.approx(1 - 0.75 ** 2, abs=1e-3)
    assert [(c["selector"], c["against"]) for c in summary["comparisons"]] == \
        [("sts", "sts-random"), ("sts", "dense"), ("stata", "stata-random"), ("stata", "dense")]
    assert all(c["n"] == 2 and c["ci_low"] is not None for c in summary["comparisons"])
    report = (tmp_path / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| method")
             and not line.startswith("| selector")]
    assert len(table) == 6 + 4
    for v in summary["verdicts"]:
        assert v["text"] == selector_verdict(v["selector"], summary["comparisons"])
        assert f"- {v['text']}" in report
    assert [v["selector"] for v in summary["verdicts"]] == ["sts", "stata"]
    assert summary["verdicts"][0]["text"].startswith("STS ") and summary["verdicts"][1]["text"].startswith("STATA ")
