"""The ``effst`` command end to end on synthetic data: pipeline, the single stages, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from _cli import run_cli, write_config
from effst.data import load_dataset
from effst.train.checkpoint import load_checkpoint, model_from_checkpoint
from effst.train.metrics import evaluate

PIPELINE_CONFIG = """\
seeds: [0]
sparsities: [0.9]
workers: 2
train: {epochs: 2, batch_size: 16, threads: 1, synthetic: {num_train: 64, num_test: 32, noise: 0.3}}
finetune: {epochs: 1, batch_size: 16, threads: 1, synthetic: {num_train: 64, num_test: 32, noise: 0.3}}
"""


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    (root / "pipeline.yaml").write_text(PIPELINE_CONFIG)
    result = run_cli("pipeline", "--data", "synthetic", "--config", root / "pipeline.yaml", "--out", root / "run",
                     timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return root / "run", result


def test_pipeline_runs_every_stage_and_writes_the_report(pipeline_run):
    out, result = pipeline_run
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").is_file() and (out / "pipeline.png").stat().st_size > 1000
    assert report["errors"] == {}
    # baseline and its fine-tuned control; L1P and DSP at 0.9 (pruned, LIF, sLIF); block L1P
    # (pruned, sLIF); random and random-dimension controls (pruned, sLIF).
    assert len(report["stages"]) == 2 + 2 * 3 + 3 * 2
    methods = [(r["method"], r["sparsity"]) for r in report["rows"]]
    assert methods == [("baseline", 0.0), ("l1p", 0.9), ("dsp", 0.9), ("block-l1p", 0.9), ("random", 0.9),
                       ("dsp-random", 0.9)]
    for row in report["rows"]:
        assert all(0.0 <= a <= 1.0 for a in row["acc_pruned"])
    l1p = report["rows"][1]
    assert l1p["acc_lif"][0] is not None and l1p["acc_slif"][0] is not None
    assert l1p["compression_blocks"] > 5  # 90 % of the block weights gone
    dsp = report["rows"][2]
    assert dsp["params_blocks"] < report["rows"][0]["params_blocks"] / 5
    statements = " ".join(report["conclusions"]["statements"])
    assert report["rows"][0]["acc_lif"][0] is not None  # the baseline + same fine-tuning control ran
    assert report["T"] and report["num_classes"] == 10 and report["test_samples"] == 32
    # Chance level, computed here independently: 10 classes, 32 test samples, 3 binomial SEs.
    baseline = report["rows"][0]["acc_pruned"][0]
    if baseline <= 0.1 + 3 * (0.1 * 0.9 / 32) ** 0.5:  # two epochs on this tiny set may learn nothing
        assert report["conclusions"]["facts"]["baseline_at_chance"]
        assert statements.startswith("The baseline is at chance level") and "**" not in statements
    else:  # one seed: every verdict is inconclusive, whatever the means say
        for phrase in ("sLIF recovered more than LIF: **Inconclusive**",
                       "L1P beat random (element) pruning at p=0.9: **Inconclusive**",
                       "DSP beat random-dimension pruning at p=0.9: **Inconclusive**",
                       "Element L1P more accurate than block L1P", "baseline fine-tuned for the same 1 extra epochs"):
            assert phrase in statements
    assert "±" not in statements
    md = (out / "report.md").read_text()
    assert "Conclusions" in md and "sLIF − LIF" in md and "Time per epoch" in md and "±" not in md
    assert "baseline fine-tuned the same extra epochs (control)" in md and "params whole model" in md
    assert "effst: pipeline report" in result.stdout


def test_every_stage_checkpoint_loads_and_reproduces_its_accuracy(pipeline_run):
    out, _ = pipeline_run
    report = json.loads((out / "report.json").read_text())
    _, test, _ = load_dataset("synthetic", synthetic={"num_train": 64, "num_test": 32, "noise": 0.3})
    for key, stage in report["stages"].items():
        ckpt = load_checkpoint(out / stage["out"] / "checkpoint.pt")
        model = model_from_checkpoint(ckpt)
        assert evaluate(model, test, batch_size=32)["accuracy"] == pytest.approx(stage["accuracy"]), key
    slif = load_checkpoint(out / "seed0" / "l1p-p0.9" / "finetune-slif" / "checkpoint.pt")
    assert [s["op"] for s in slif["recipe"]] == ["build", "prune", "convert"]
    model = model_from_checkpoint(slif)
    # The sLIF neurons learned per-channel tau and threshold, and pruned weights stayed zero.
    q_lif = model.blocks[0].attn.q_lif
    assert q_lif.w.requires_grad and q_lif.w.shape == (q_lif.effst_channels,)
    from effst.models import count_parameters

    assert count_parameters(model)["blocks"] <= 0.1 * count_parameters(model)["blocks_dense"] + 1
    stage_report = json.loads((out / "seed0" / "l1p-p0.9" / "finetune-slif" / "report.json").read_text())
    assert set(stage_report["activity"]["firing_rate"]) >= {"blocks.0.attn.q_lif", "blocks.0.mlp.fc2_lif"}
    assert stage_report["activity"]["energy_uj"] > 0 and stage_report["history"][0]["epoch_time_s"] > 0
    assert "pruned (l1p p=0.9), no fine-tuning" in stage_report["accuracy_by_stage"]


def test_pipeline_resume_reuses_finished_stages(pipeline_run):
    out, _ = pipeline_run
    before = json.loads((out / "report.json").read_text())
    # Issue 13 (7): --resume alone brings back the run's options (data, seeds, epochs, …).
    result = run_cli("pipeline", "--out", out, "--resume", "--workers", "1")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "options saved in its plan.json; overridden here: workers 2 -> 1" in result.stderr
    assert result.stderr.count("(reused)") == len(before["stages"])
    after = json.loads((out / "report.json").read_text())
    assert after["rows"] == before["rows"] and after["conclusions"] == before["conclusions"]


def test_single_stages_through_the_cli(tmp_path):
    config = write_config(tmp_path)
    base = tmp_path / "base"
    r = run_cli("train", "--config", config, "--epochs", "1", "--out", base, "--lr", "0.004")
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout
    report = json.loads((base / "report.json").read_text())
    assert report["settings"]["lr"] == 0.004 and report["settings"]["batch_size"] == 16  # flag > file > default
    assert (base / "report.png").is_file() and (base / "tb").is_dir() and (base / "log.csv").is_file()
    pruned = tmp_path / "pruned"
    r = run_cli("prune", base / "checkpoint.pt", "--method", "dsp", "--sparsity", "0.5", "--out", pruned)
    assert r.returncode == 0, r.stderr
    tuned = tmp_path / "tuned"
    r = run_cli("finetune", pruned / "checkpoint.pt", "--neuron", "slif", "--epochs", "1", "--out", tuned,
                "--no-tensorboard")
    assert r.returncode == 0, r.stderr
    r = run_cli("eval", tuned / "checkpoint.pt", "--out", tmp_path / "eval")
    assert r.returncode == 0, r.stderr
    evaluated = json.loads((tmp_path / "eval" / "report.json").read_text())
    tuned_report = json.loads((tuned / "report.json").read_text())
    assert evaluated["accuracy"] == pytest.approx(tuned_report["accuracy"])
    assert evaluated["data"] == "synthetic"  # data settings come from the checkpoint
    assert evaluated["compression"]["blocks"] == pytest.approx(2.0, rel=0.05)  # DSP at p=0.5


@pytest.mark.parametrize("args, message", [
    (["train", "--data", "mnist"], "data: expected one of"),
    (["train", "--data", "synthetic", "--epochs", "0"], "epochs: expected an int >= 1"),
    (["train", "--data", "synthetic", "--lr", "-1"], "lr: expected"),
    (["train", "--data", "cifar10", "--data-dir", "/nonexistent/cifar"], "cifar-10-python.tar.gz"),
    (["prune", "/nonexistent.pt", "--method", "l1p", "--sparsity", "0.5"], "no such file"),
    (["pipeline", "--sparsities", "1.5"], "sparsities: expected numbers in (0, 1)"),
    (["pipeline", "--seeds", "1", "1"], "seeds: expected distinct"),
])
def test_bad_input_is_a_clear_error(args, message, capsys):
    from effst.cli import main

    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_input_through_the_console_command():
    result = run_cli("train", "--data", "synthetic", "--batch-size", "0")
    assert result.returncode == 2
    assert "effst: error: batch_size: expected an int >= 1, got 0" in result.stderr and "Traceback" not in result.stderr


def test_config_file_errors_name_the_key(tmp_path, capsys):
    from effst.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("data: synthetic\nepochz: 3\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown setting 'epochz'" in capsys.readouterr().err
    bad.write_text("[1, 2")
    assert main(["train", "--config", str(bad)]) == 2
    assert "cannot be parsed" in capsys.readouterr().err


def test_prune_rejects_bad_sparsity_before_work(tmp_path):
    from effst.train.runs import prune_step

    with pytest.raises(ValueError, match="sparsity"):
        prune_step("l1p", 1.0)
    with pytest.raises(ValueError, match="method"):
        prune_step("magnitude", 0.5)
    with pytest.raises(ValueError, match="block_size"):
        prune_step("block-l1p", 0.5, block_size=(0, 16))


def test_bench_subcommand_forwards_to_the_harness(capsys):
    from effst.cli import main

    try:
        status = main(["bench", "--help"])
    except SystemExit as stop:  # argparse's --help may exit instead of returning
        status = stop.code
    assert status == 0
    assert "usage: effst bench" in capsys.readouterr().out
