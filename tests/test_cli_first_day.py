"""Issue 13, a user's first day: each numbered problem (1, 2, 5, 7, 8) reproduced and now fixed.

Runs go through ``python -m effst.cli`` on tiny synthetic data (a few seconds each); the report
logic is tested directly on constructed results against independent oracles.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _cli import cli_env, run_cli, write_config
from effst.train.run_folder import RunFolder, RunFolderError
from effst.train.statistics import at_chance, difference_interval, mean_spread, paired_comparison, student_t_quantile


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished 1-epoch training run."""
    root = tmp_path_factory.mktemp("trained")
    config = write_config(root)
    result = run_cli("train", "--config", config, "--epochs", "1", "--out", root / "run", "--no-tensorboard")
    assert result.returncode == 0, result.stderr
    return root / "run", config


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


def _one_clean_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("effst: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


# ----------------------------------------------------------------------------- 1. runs are never lost
def test_an_existing_run_is_refused_without_resume_or_overwrite(trained, tmp_path):
    run, config = trained
    before = _snapshot(run)
    result = run_cli("train", "--config", config, "--epochs", "1", "--out", run, "--no-tensorboard")
    _one_clean_line(result, str(run), "--resume", "--overwrite")
    assert _snapshot(run) == before
    # prune into a fine-tuned/trained folder: refused, nothing mixed in.
    result = run_cli("prune", run / "checkpoint.pt", "--method", "l1p", "--sparsity", "0.5", "--out", run)
    _one_clean_line(result, str(run))
    assert _snapshot(run) == before


def test_overwrite_replaces_the_folder_as_a_whole(trained, tmp_path):
    run, config = trained
    target = tmp_path / "target"
    assert run_cli("train", "--config", config, "--epochs", "1", "--out", target, "--no-tensorboard").returncode == 0
    (target / "stale.txt").write_text("from the old run")
    result = run_cli("prune", run / "checkpoint.pt", "--method", "l1p", "--sparsity", "0.5", "--out", target,
                     "--overwrite")
    assert result.returncode == 0, result.stderr
    names = {p.name for p in target.iterdir()}
    assert "stale.txt" not in names and "log.csv" not in names and "checkpoint.pt" in names  # no mix of old and new
    assert [p.name for p in tmp_path.iterdir()] == ["target"]  # no temporary folder left behind
    assert json.loads((target / "report.json").read_text())["stage"] == "prune"


def test_overwrite_never_replaces_a_folder_that_is_not_an_effst_run(tmp_path, monkeypatch):
    # `--out ~/notes --overwrite` deleted the user's files; `--out . --overwrite` failed with
    # "Device or resource busy" and left a `..effst-new-<pid>` folder in the current directory.
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(RunFolderError, match=f"--out {mine}: holds files that are not an effst run \\(todo.txt\\)"):
            RunFolder(mine, overwrite=overwrite, marker=None)
    assert (mine / "todo.txt").read_text() == "precious"
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text("{}")
    monkeypatch.chdir(run)
    for here in (Path("."), run, tmp_path):
        if here == tmp_path:
            (tmp_path / "report.md").write_text("an earlier run at the top")
        with pytest.raises(RunFolderError, match="contains the current directory"):
            RunFolder(here, overwrite=True, marker=None)
    monkeypatch.chdir(tmp_path)
    import effst.train.run_folder as run_folder

    with monkeypatch.context() as patch:  # a read-only parent (root passes chmod, so it is simulated)
        patch.setattr(run_folder, "_can_create_file_in", lambda directory: Path(directory) != tmp_path)
        with pytest.raises(RunFolderError, match=f"--overwrite builds the new run beside it, but {tmp_path} is not"):
            RunFolder(run, overwrite=True, marker=None)
    folder = RunFolder(Path("run/../run"), overwrite=True, marker=None)  # a relative --out: siblings by absolute path
    (folder.create() / "report.json").write_text("new")
    folder.commit()
    assert (run / "report.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "report.md", "run"]


def test_an_overwriting_pipeline_with_failed_stages_is_kept_and_named(tmp_path, capsys):
    # It was discarded with the temporary folder, while the error said "see OUT/report.md": the old run's.
    out = tmp_path / "pipeline"
    out.mkdir()
    (out / "plan.json").write_text("{}")
    (out / "report.md").write_text("the old run")
    config = tmp_path / "p.yaml"
    config.write_text("seeds: [0]\nsparsities: [0.5]\nmethods: [l1p]\nblock: false\nrandom_sparsity: null\n"
                      "workers: 1\ntrain: {batch_size: 1000, synthetic: {num_train: 64, num_test: 16}}\n")
    result = _in_process(capsys, "pipeline", "--data", "synthetic", "--config", config, "--out", out, "--overwrite",
                         "--no-progress")
    _one_clean_line(result, "stage(s) failed", f"see {out / 'report.md'}", "larger than the training set")
    assert (out / "report.md").read_text() != "the old run" and "larger than the training set" in (
        out / "report.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml", "pipeline"]


def test_ctrl_c_before_an_overwrite_run_saved_anything_names_the_kept_run(tmp_path, capsys, monkeypatch):
    import effst.cli as cli

    old = tmp_path / "run"
    old.mkdir()
    (old / "checkpoint.pt").write_text("old")

    def dispatch(args):
        def work(path: Path):
            (path / "log.csv").write_text("new")
            raise KeyboardInterrupt  # a second Ctrl-C, or one while the data loads

        return cli._in_folder(RunFolder(old, overwrite=True), work)

    monkeypatch.setattr(cli, "_dispatch", dispatch)
    assert cli.main(["train", "--out", str(old), "--overwrite"]) == 130
    err = capsys.readouterr().err
    # Not "the run is kept — continue it with --resume": that would resume the old run.
    assert f"interrupted; the new run was discarded and {old} is left as it was" in err and "--resume" not in err
    assert (old / "checkpoint.pt").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["run"]


def test_overwrite_never_deletes_the_checkpoint_it_reads(trained, tmp_path, capsys):
    # `effst eval run/checkpoint.pt --out run --overwrite` replaced the run by its report: the trained
    # model was gone.
    import shutil

    run, config = trained
    outer = tmp_path / "outer"
    copy = outer / "run"
    shutil.copytree(run, copy)
    (outer / "report.json").write_text("{}")  # the folder above is an effst run too
    before = _snapshot(outer)
    source = copy / "checkpoint.pt"
    for args in (["eval", source], ["prune", source, "--method", "l1p", "--sparsity", "0.5"],
                 ["finetune", source, "--config", config], ["pipeline", "--data", "synthetic", "--baseline", source]):
        for out in (copy, outer):
            result = _in_process(capsys, *args, "--out", out, "--overwrite")
            _one_clean_line(result, f"--out {out} --overwrite would delete", str(source))
    assert _snapshot(outer) == before


def test_a_failed_overwrite_keeps_the_old_run(tmp_path):
    old = tmp_path / "run"
    old.mkdir()
    (old / "checkpoint.pt").write_text("old")
    folder = RunFolder(old, overwrite=True)
    work = folder.create()
    assert work != old and work.parent == old.parent
    (work / "checkpoint.pt").write_text("new, half written")
    folder.discard()
    assert (old / "checkpoint.pt").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["run"]
    with pytest.raises(RunFolderError, match="pick one"):
        RunFolder(old, resume=True, overwrite=True)


def _in_process(capsys, *args) -> subprocess.CompletedProcess:
    from effst.cli import main

    status = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, status, "", capsys.readouterr().err)


def test_a_new_run_that_fails_leaves_no_folder_behind(trained, tmp_path, capsys):
    # A run refused after its folder was created (data too small for the batch, a neuron fine-tuning
    # cannot convert to, --model naming another model) must not leave a folder that the next try is
    # refused for ("already holds a run") while --resume finds nothing to resume.
    run, config = trained
    cases = [
        (["train", "--config", config, "--epochs", "1", "--batch-size", "1000"], "larger than the training set"),
        (["finetune", run / "checkpoint.pt", "--config", config, "--neuron", "stl", "--epochs", "1"], "'stl'"),
        (["eval", run / "checkpoint.pt", "--model", "spikformer-4-384"], "not 'spikformer-4-384'"),
        (["prune", run / "checkpoint.pt", "--method", "l1p", "--sparsity", "0.5", "--model", "spikformer-4-384"],
         "not 'spikformer-4-384'"),
    ]
    for i, (args, message) in enumerate(cases):
        out = tmp_path / f"new{i}" / "runs" / "run"  # missing parents are made, and removed again
        _one_clean_line(_in_process(capsys, *args, "--out", out), message)
        assert not (tmp_path / f"new{i}").exists(), args
    # A folder that was there, empty, is left there, empty.
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_clean_line(_in_process(capsys, *cases[0][0], "--out", empty), cases[0][1])
    assert empty.is_dir() and not any(empty.iterdir())


def test_a_failed_run_keeps_what_is_resumable_or_asked_for(tmp_path):
    fresh = RunFolder(tmp_path / "diverged")
    (fresh.create() / "checkpoint.pt").write_text("last good")
    fresh.discard()  # a diverged training run: its last good checkpoint stays
    assert (tmp_path / "diverged" / "checkpoint.pt").read_text() == "last good"
    study = RunFolder(tmp_path / "study", marker="summary.json", keep_partial=True)
    (study.create() / "stage.log").write_text("partial")
    study.discard()
    assert (tmp_path / "study" / "stage.log").is_file()
    nothing = RunFolder(tmp_path / "nothing", marker="summary.json", keep_partial=True)
    nothing.create()
    nothing.discard()
    assert not (tmp_path / "nothing").exists()


def test_training_that_diverges_under_overwrite_names_the_kept_run(tmp_path):
    from effst.cli import _in_folder
    from effst.train.loop import TrainingDiverged

    old = tmp_path / "run"
    old.mkdir()
    (old / "checkpoint.pt").write_text("old")

    def diverge(work: Path):
        (work / "checkpoint.pt").write_text("new, epoch 1")
        raise TrainingDiverged("training diverged: the loss is not finite at epoch 2, step 1", work / "checkpoint.pt")

    with pytest.raises(RuntimeError) as caught:
        _in_folder(RunFolder(old, overwrite=True), diverge)
    message = str(caught.value)
    # The temporary folder is gone, so the message must not point into it: it names the old run, kept.
    assert "effst-new" not in message and f"{old} is left as it was" in message and "epoch 2, step 1" in message
    assert (old / "checkpoint.pt").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["run"]


# ----------------------------------------------------------------------------- 2. no tracebacks
def test_unusable_output_locations_are_one_line_before_any_work(trained, tmp_path, capsys):
    from effst.cli import main

    def in_process(*args) -> subprocess.CompletedProcess:
        status = main([str(a) for a in args])
        return subprocess.CompletedProcess(args, status, "", capsys.readouterr().err)

    run, config = trained
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    cases = [
        (a_file, f"--out {a_file}: is a file"),
        (a_file / "under", f"because {a_file} is a file"),
        (Path("/proc/effst-run"), "/proc is not writable"),  # a read-only location, even for root
    ]
    for out, message in cases:
        _one_clean_line(in_process("train", "--config", config, "--out", out), message)
        # prune/eval check the output before reading the checkpoint: a corrupt checkpoint is not reached.
        _one_clean_line(in_process("prune", corrupt, "--method", "l1p", "--sparsity", "0.5", "--out", out), message)
        _one_clean_line(in_process("eval", corrupt, "--out", out), message)
        _one_clean_line(in_process("pipeline", "--data", "synthetic", "--out", out), message)
    assert a_file.read_text() == "x"


def test_filesystem_errors_during_a_run_are_one_line_with_the_path():
    from effst.cli import _os_error_text

    error = PermissionError(13, "Permission denied", "/data/run/checkpoint.pt")
    assert _os_error_text(error) == "/data/run/checkpoint.pt: Permission denied"
    assert _os_error_text(FileNotFoundError("config: no such file x.yaml")) == "config: no such file x.yaml"


def test_warnings_are_one_line_each_without_source_lines(trained, tmp_path):
    # A tile too large for spikformer-tiny's layers is adapted with a warning per layer; Python's
    # default format printed each with effst's file name and a line of its source code.
    run, _ = trained
    env = {k: v for k, v in cli_env().items() if k != "PYTHONWARNINGS"}
    result = subprocess.run([sys.executable, "-m", "effst.cli", "prune", str(run / "checkpoint.pt"), "--method",
                             "block-l1p", "--sparsity", "0.8", "--block-size", "64", "64", "--out", str(tmp_path / "p")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "tiles cannot express" in line]
    assert warned and all(line.startswith("effst: warning: ") for line in warned), result.stderr
    assert "UserWarning" not in result.stderr and ".py:" not in result.stderr, result.stderr


def test_config_and_setting_errors_are_one_honest_line(tmp_path, capsys):
    # YAML's parse error spanned 8 lines (a source excerpt and a caret); lr=inf was refused with
    # "expected a number in [0.0, inf]", which inf is; a NaN noise made NaN images without a word.
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1\n")
    result = _in_process(capsys, "train", "--config", bad, "--out", tmp_path / "run")
    _one_clean_line(result, f"config {bad}: cannot be parsed (line 2, column 1: expected ',' or ']'")
    assert len(result.stderr.splitlines()) == 2  # the start line and the error
    bad.write_text("lr: .inf\n")
    _one_clean_line(_in_process(capsys, "train", "--config", bad, "--out", tmp_path / "run"),
                    "lr: expected a finite number > 0, got inf")
    bad.write_text("data: synthetic\nsynthetic: {noise: .nan}\n")
    _one_clean_line(_in_process(capsys, "train", "--config", bad, "--out", tmp_path / "run"),
                    "synthetic.noise: expected a finite number >= 0, got nan")
    assert not (tmp_path / "run").exists()


def test_a_corrupt_pipeline_baseline_is_refused_before_any_stage(tmp_path, capsys):
    # It failed in every seed's first stage, after the run folder, plan and an empty plot were made.
    corrupt = tmp_path / "baseline.pt"
    corrupt.write_bytes(b"not a checkpoint")
    out = tmp_path / "pipeline"
    result = _in_process(capsys, "pipeline", "--data", "synthetic", "--seeds", "0", "--baseline", corrupt, "--out", out)
    _one_clean_line(result, f"checkpoint {corrupt}: cannot be read")
    assert "stage" not in result.stderr and not out.exists()


def test_a_pipeline_plot_of_failed_stages_has_no_empty_legend(tmp_path):
    import warnings

    from effst.train.pipeline_report import plot_pipeline

    rows = [{"method": "baseline", "acc_pruned": [None], "acc_lif": [None]},
            {"method": "l1p", "sparsity": 0.5, "acc_pruned": [None], "acc_lif": [None], "acc_slif": [None]}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib: "No artists with labels found to put in legend"
        plot_pipeline(tmp_path / "p.png", {"rows": rows, "seeds": [0], "data": "synthetic", "model": "m", "T": 4})
    assert (tmp_path / "p.png").is_file()


# ----------------------------------------------------------------------------- 5. honest reports
def test_student_t_quantiles_match_the_tables():
    # Two-sided 95 % critical values of Student's t (standard tables).
    for df, value in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045), (1000, 1.962)):
        assert student_t_quantile(0.975, df) == pytest.approx(value, abs=1e-3)
    assert student_t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-9)
    assert student_t_quantile(0.05, 3) == pytest.approx(-2.353, abs=1e-3)
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 3, 17):
        for p in (0.6, 0.9, 0.995):
            assert student_t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-9)


def test_paired_intervals_and_verdicts():
    # The issue's case: +0.35 points with a ±2–3 spread over three seeds is not a "Yes".
    slif, lif = [0.80, 0.84, 0.78], [0.81, 0.80, 0.7995]
    c = paired_comparison(slif, lif)
    diffs = [a - b for a, b in zip(slif, lif)]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    assert c.mean == pytest.approx(mean)
    assert (c.low, c.high) == pytest.approx((mean - 4.302653 * sd / math.sqrt(3), mean + 4.302653 * sd / math.sqrt(3)))
    assert c.low < 0 < c.high and c.verdict == "inconclusive"
    assert paired_comparison([0.9, 0.91, 0.92], [0.8, 0.805, 0.81]).verdict == "yes"
    assert paired_comparison([0.7, 0.71, 0.72], [0.8, 0.805, 0.81]).verdict == "no"
    single = paired_comparison([0.9], [0.1])
    assert single.verdict == "inconclusive" and single.low is None and "no spread" in single.describe()
    assert paired_comparison([0.9, None, 0.8], [0.1, 0.2, None]).n == 1  # only complete pairs count
    assert mean_spread([0.5]) == "50.00" and mean_spread([0.5, 0.7]) == "60.00 ± 14.14" and mean_spread([None]) == "—"
    with pytest.raises(ValueError, match="x, y"):
        paired_comparison([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="differences"):
        difference_interval([float("nan"), 1.0])


def test_chance_level_is_the_binomial_band_around_guessing():
    assert at_chance(0.125, 10, 32) and at_chance(0.25, 10, 32)  # 3 standard errors: 0.1 + 0.159
    assert not at_chance(0.30, 10, 32) and not at_chance(0.15, 10, 10_000)


def _rows(seeds: int, base: list, slif_gain: list, control_gap: list) -> list[dict]:
    """Constructed pipeline rows: L1P and DSP at p=0.9, block L1P, random controls."""
    def r(method, pruned, lif, slif):
        return {"method": method, "sparsity": 0.9, "params_blocks": 100, "params_total": 1000,
                "compression_blocks": 10.0, "compression_total": 2.0, "acc_pruned": pruned, "acc_lif": lif,
                "acc_slif": slif}
    lif = [b - 0.05 for b in base]
    slif = [x + g for x, g in zip(lif, slif_gain)]
    rows = [{"method": "baseline", "sparsity": 0.0, "params_blocks": 1000, "params_total": 3000,
             "compression_blocks": 1.0, "compression_total": 1.0, "acc_pruned": base,
             "acc_lif": [b + 0.01 for b in base], "acc_slif": [None] * seeds},
            r("l1p", lif, lif, slif), r("dsp", lif, lif, slif), r("block-l1p", lif, [None] * seeds, slif),
            r("random", lif, [None] * seeds, [s - g for s, g in zip(slif, control_gap)]),
            r("dsp-random", lif, [None] * seeds, [s - g for s, g in zip(slif, control_gap)])]
    return rows


def _options(seeds: int):
    from effst.train.pipeline import PipelineOptions

    return PipelineOptions(data="synthetic", seeds=list(range(seeds)), sparsities=[0.9], block_size=[16, 16])


def test_conclusions_come_from_paired_intervals():
    from effst.train.pipeline_report import conclusions

    # sLIF ahead by +0.35 points on average but with a large spread; L1P clearly above random.
    rows = _rows(3, [0.90, 0.92, 0.91], [0.03, -0.02, 0.0005], [0.05, 0.06, 0.055])
    c = conclusions(rows, _options(3), num_classes=10, test_samples=300, finetune_epochs=2)
    text = " ".join(c["statements"])
    assert "sLIF recovered more than LIF: **Inconclusive**" in text and "95 % CI" in text
    assert "L1P beat random (element) pruning at p=0.9: **Yes**" in text
    assert c["facts"]["slif_minus_lif"]["verdict"] == "inconclusive"
    assert "baseline fine-tuned for the same 2 extra epochs" in text
    consistent = _rows(3, [0.90, 0.92, 0.91], [0.03, 0.031, 0.029], [-0.05, -0.06, -0.055])
    text = " ".join(conclusions(consistent, _options(3), 10, 300, 2)["statements"])
    assert "sLIF recovered more than LIF: **Yes**" in text and "DSP beat random-dimension pruning at p=0.9: **No**" in text


def test_one_seed_shows_no_spread_and_claims_nothing():
    from effst.train.pipeline_report import conclusions

    c = conclusions(_rows(1, [0.9], [0.05], [0.2]), _options(1), 10, 300, 2)
    text = " ".join(c["statements"])
    assert "**Yes**" not in text and "**No**" not in text and "±" not in text and "no spread" in text


def test_a_baseline_at_chance_withholds_the_conclusions():
    from effst.train.pipeline_report import conclusions

    c = conclusions(_rows(3, [0.11, 0.09, 0.125], [0.05, 0.06, 0.05], [0.1, 0.1, 0.1]), _options(3), 10, 32, 2)
    assert c["facts"]["baseline_at_chance"] and len(c["statements"]) == 1
    assert "chance level" in c["statements"][0] and "**" not in c["statements"][0]


def test_reports_name_the_real_T_and_plot_without_empty_panels(tmp_path):
    from effst.train.report import describe_recipe, plot_run, ratio_text

    recipe = [{"op": "build", "name": "spikformer-tiny", "neuron": "lif", "T": None}]
    assert describe_recipe(recipe, 4) == "spikformer-tiny (lif, T=4)" and "default" not in describe_recipe(recipe)
    assert ratio_text(None) == "∞ (nothing kept)" and ratio_text(math.inf) == "∞ (nothing kept)"
    import matplotlib.pyplot as plt

    made = []
    real_subplots = plt.subplots
    plt.subplots = lambda *a, **k: made.append(real_subplots(*a, **k)) or made[-1]
    try:
        plot_run(tmp_path / "prune.png", {"stage": "prune", "recipe": recipe, "T": 4, "test": {"accuracy": 0.5},
                                          "activity": {"firing_rate": {"blocks.0.lif": 0.1}}})
        plot_run(tmp_path / "train.png", {"stage": "train", "recipe": recipe, "T": 4, "history": [
            {"epoch": e, "train_accuracy": 0.1 * e, "test_accuracy": 0.1 * e} for e in (1, 2, 3)],
            "activity": {"firing_rate": {"blocks.0.lif": 0.1}}})
    finally:
        plt.subplots = real_subplots
    (prune_fig, prune_axes), (train_fig, train_axes) = made
    assert prune_axes.size == 1  # no training, no empty training panel
    ticks = train_axes[0][0].get_xticks()
    assert all(float(t).is_integer() for t in ticks)  # whole epochs only
    assert "T=4" in prune_axes[0][0].get_title()


def test_pipeline_plot_panels_share_the_accuracy_axis(tmp_path):
    import matplotlib.pyplot as plt

    from effst.train.pipeline_report import plot_pipeline

    made = []
    real_subplots = plt.subplots
    plt.subplots = lambda *a, **k: made.append((k, real_subplots(*a, **k))) or made[-1][1]
    try:
        plot_pipeline(tmp_path / "p.png", {"rows": _rows(2, [0.9, 0.91], [0.01, 0.02], [0.1, 0.1]), "seeds": [0, 1],
                                           "data": "synthetic", "model": "spikformer-tiny", "T": 4})
    finally:
        plt.subplots = real_subplots
    kwargs, (fig, axes) = made[0]
    assert kwargs.get("sharey") is True and axes.size == 3  # l1p, dsp, block-l1p
    assert axes[0][0].get_shared_y_axes().joined(axes[0][0], axes[0][2])
    assert "T=4" in fig._suptitle.get_text()


# ----------------------------------------------------------------------------- 7. surprises
def test_eval_with_another_model_and_mismatched_weights_are_short_errors(trained, tmp_path):
    run, _ = trained
    _one_clean_line(run_cli("eval", run / "checkpoint.pt", "--model", "spikformer-4-384"),
                    "holds 'spikformer-tiny', not 'spikformer-4-384'")
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    name = next(k for k, v in ckpt["model"].items() if v.dim() == 2)
    ckpt["model"][name] = torch.zeros(3, 3)
    del ckpt["model"][next(k for k in ckpt["model"] if k.endswith("running_mean"))]
    bad = tmp_path / "mismatched.pt"
    torch.save(ckpt, bad)
    result = run_cli("eval", bad)
    _one_clean_line(result, f"checkpoint {bad}", "1 missing", "1 with another shape")
    assert len(result.stderr.splitlines()) <= 2  # the start line and the error


def test_resuming_a_finished_run_with_other_epochs_is_refused(trained, tmp_path, capsys):
    # --resume --epochs 2 on a finished 1-epoch run used to report "overridden here: epochs 1 -> 2",
    # train nothing and exit 0.
    import shutil

    run, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = _snapshot(copy)
    result = _in_process(capsys, "train", "--out", copy, "--resume", "--epochs", "2")
    _one_clean_line(result, f"the run in {copy} already finished its 1 epoch(s)", "effst finetune", "--neuron lif")
    # Other training settings cannot change a finished run either: refused, not "overridden here".
    result = _in_process(capsys, "train", "--out", copy, "--resume", "--seed", "7", "--lr", "0.5")
    _one_clean_line(result, f"the run in {copy} has finished", "lr", "seed 0 -> 7")
    assert _snapshot(copy) == before


def test_resuming_a_pipeline_with_options_its_finished_stages_ignore_is_refused(tmp_path, capsys):
    # Finished stages are reused on --resume: a new --finetune-epochs would apply to the unfinished
    # stages only, and the report would mix both without a word.
    from dataclasses import asdict

    from effst.train.pipeline import PipelineOptions

    out = tmp_path / "pipeline"
    out.mkdir()
    options = PipelineOptions(data="synthetic", seeds=[0], finetune_epochs=2).validate()
    (out / "plan.json").write_text(json.dumps({"options": asdict(options), "jobs": []}))
    before = _snapshot(out)
    result = _in_process(capsys, "pipeline", "--out", out, "--resume", "--finetune-epochs", "3")
    _one_clean_line(result, "--resume: finetune_epochs 2 -> 3", str(out), "--overwrite")
    assert _snapshot(out) == before


def test_finetune_resume_restores_per_layer(trained, tmp_path, capsys):
    # --resume promises the run's own settings, but --per-layer was not among them: the resumed
    # run rebuilt per-channel neurons and failed on a recipe dump of 300 characters.
    run, config = trained
    out = tmp_path / "finetune"
    args = ["finetune", run / "checkpoint.pt", "--out", out]
    assert _in_process(capsys, *args, "--config", config, "--per-layer", "--epochs", "2",
                       "--stop-after-steps", "2").returncode == 130
    result = _in_process(capsys, *args, "--resume")
    assert result.returncode == 0, result.stderr
    recipe = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["recipe"]
    assert recipe[-1] == {"op": "convert", "neuron": "slif", "channels": False}
    # A changed neuron is named in one short line.
    result = _in_process(capsys, *args, "--resume", "--neuron", "plif")
    _one_clean_line(result, "made for another model (step 2 (convert): neuron 'slif' in the checkpoint, 'plif' here)")


def test_resuming_past_the_asked_epochs_is_refused():
    from effst.train.loop import _check_epochs_reachable

    recipe = [{"op": "build", "neuron": "lif"}, {"op": "convert", "neuron": "slif"}]
    where = Path("run/checkpoint.pt")
    _check_epochs_reachable({"epoch": 2, "step": 5, "finished": False}, 3, where, recipe)  # mid-epoch 3 of 3: fine
    _check_epochs_reachable({"epoch": 2, "step": 0, "finished": False}, 2, where, recipe)  # stopped at its end
    _check_epochs_reachable({"epoch": 4, "step": 0, "finished": True}, 4, where, recipe)
    with pytest.raises(ValueError, match="resume with --epochs 3 or more"):
        _check_epochs_reachable({"epoch": 2, "step": 5, "finished": False}, 2, where, recipe)
    with pytest.raises(ValueError, match="--neuron slif"):
        _check_epochs_reachable({"epoch": 4, "step": 0, "finished": True}, 3, where, recipe)


def test_stl_neuron_is_accepted():
    from effst.cli import _settings, build_parser

    args = build_parser().parse_args(["train", "--data", "synthetic", "--neuron", "stl"])
    settings, given = _settings("train", args)
    assert settings.neuron == "stl" and "neuron" in given


class _Countdown(torch.nn.Module):
    """A classifier whose output turns NaN from its ``bad_call``-th forward pass on; it also
    reports an auxiliary loss, as token selection does."""

    def __init__(self, bad_call: int):
        super().__init__()
        self.linear = torch.nn.Linear(64, 10)
        self.calls = 0
        self.bad_call = bad_call

    def forward(self, x):
        self.calls += 1 if self.training else 0
        out = self.linear(x.flatten(1))
        self._aux = out.pow(2).mean() * 1e-3
        return out * float("nan") if self.training and self.calls >= self.bad_call else out

    def auxiliary_losses(self):
        return {"penalty": self._aux}


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    from effst.data import load_dataset
    from effst.train.checkpoint import load_checkpoint
    from effst.train.config import resolve
    from effst.train.loop import TrainingDiverged, fit

    settings = resolve("train", flag_values={"data": "synthetic", "epochs": 3, "batch_size": 16, "progress": False,
                                             "tensorboard": False, "synthetic": {"num_train": 64, "num_test": 16}})
    train, test, _ = load_dataset("synthetic", synthetic={"num_train": 64, "num_test": 16})
    recipe = [{"op": "build", "name": "countdown"}]
    with pytest.raises(TrainingDiverged, match="not finite at epoch 2, step 2; the last good checkpoint"):
        fit(_Countdown(bad_call=6), recipe, train, test, settings, tmp_path)  # 4 steps per epoch: epoch 2, step 2
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["progress"]["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    log = (tmp_path / "log.csv").read_text().splitlines()
    assert log[0].endswith("aux_penalty") and len(log) == 2  # the auxiliary loss is logged per epoch


PIPELINE_CONFIG = """\
seeds: [0]
sparsities: [0.9]
methods: [l1p]
block: false
random_sparsity: null
workers: 2
train: {epochs: 400, batch_size: 16, threads: 1, synthetic: {num_train: 64, num_test: 16}}
finetune: {epochs: 400, batch_size: 16, threads: 1, synthetic: {num_train: 64, num_test: 16}}
"""


def test_sigint_to_the_pipeline_parent_stops_its_workers(tmp_path):
    (tmp_path / "p.yaml").write_text(PIPELINE_CONFIG)
    out = tmp_path / "run"
    started = time.monotonic()
    # SIGINT at its default in the child: a test runner started as a background job without job
    # control ignores SIGINT, the child would inherit that, and Python then installs no
    # KeyboardInterrupt handler (as for any program started that way, e.g. under nohup)
    parent = subprocess.Popen([sys.executable, "-m", "effst.cli", "pipeline", "--data", "synthetic", "--config",
                               str(tmp_path / "p.yaml"), "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = parent.stderr.readline()
        assert first.startswith("effst pipeline: starting") and time.monotonic() - started < 5  # issue 13 (8)
        checkpoint = out / "seed0" / "baseline" / "checkpoint.pt"
        while not checkpoint.exists():  # a worker is training (its first epoch is saved)
            assert parent.poll() is None and time.monotonic() - started < 300
            time.sleep(0.2)
        parent.send_signal(signal.SIGINT)  # to the parent only, not its process group
        _, err = parent.communicate(timeout=120)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert parent.returncode == 130, err
    assert err.count("interrupted") == 1 and f"--resume --out {out}" in err and "Traceback" not in err, err
    assert "stopping after this step" not in err  # the workers stay quiet: one message
    assert "effst pipeline" in err  # the overall progress bar
    # The workers stopped with the parent: nothing is written after it exited.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    time.sleep(3)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    progress = torch.load(checkpoint, map_location="cpu", weights_only=True)["progress"]
    assert not progress["finished"]  # stopped mid-run with a resumable checkpoint


# ----------------------------------------------------------------------------- 8. friction
def test_version_and_help_are_instant_and_import_no_torch():
    code = ("import sys\nfrom effst.cli import main\n"
            "for argv in (['--help'], ['--version'], ['pipeline', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton', 'numpy'))\n"
            "print('HEAVY', heavy)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=60)
    assert "HEAVY []" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
    version = subprocess.run([sys.executable, "-m", "effst.cli", "--version"], capture_output=True, text=True,
                             env=cli_env(), timeout=60)
    from effst import __version__

    assert version.returncode == 0 and version.stdout.strip() == f"effst {__version__}"


def test_training_prints_one_line_per_epoch_with_accuracy(tmp_path):
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace("progress: false\n", ""))  # the default: progress on
    result = run_cli("train", "--config", config, "--epochs", "2", "--out", tmp_path / "run", "--no-tensorboard")
    assert result.returncode == 0, result.stderr
    for epoch in (1, 2):
        assert f"effst: train epoch {epoch}/2: loss " in result.stderr
    assert result.stderr.count("test accuracy") == 2
