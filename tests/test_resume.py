"""Interrupted training resumes exactly; checkpoints are atomic; bad checkpoints give clear errors."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from _cli import assert_same_weights, run_cli, state_of, write_config
from effst.train.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_atomic

EPOCHS = "3"


def _log_rows(out: Path) -> list[dict]:
    with open(out / "log.csv") as f:
        return [{k: v for k, v in row.items() if k != "epoch_time_s"} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One 3-epoch training run from scratch, the reference for every resume test."""
    root = tmp_path_factory.mktemp("uninterrupted")
    config = write_config(root)
    result = run_cli("train", "--config", config, "--epochs", EPOCHS, "--out", root / "run", "--no-tensorboard")
    assert result.returncode == 0, result.stderr
    return root / "run", config


@pytest.mark.parametrize("stop_after", [6, 4], ids=["mid-epoch", "epoch-boundary"])
def test_resume_after_interruption_gives_the_same_weights(uninterrupted, tmp_path, stop_after):
    reference, config = uninterrupted
    out = tmp_path / "run"
    args = ["train", "--config", config, "--epochs", EPOCHS, "--out", out, "--no-tensorboard"]
    # --stop-after-steps sends this process a real SIGINT at that step: Ctrl-C's path.
    stopped = run_cli(*args, "--stop-after-steps", stop_after)
    assert stopped.returncode == 130, stopped.stderr
    assert "stopping after this step" in stopped.stderr and "--resume" in stopped.stderr
    # The checkpoint left behind loads and says where training stopped.
    ckpt = load_checkpoint(out / "checkpoint.pt")
    steps_per_epoch = ckpt["progress"]["steps_per_epoch"]
    assert steps_per_epoch == 4
    assert (ckpt["progress"]["epoch"], ckpt["progress"]["step"]) == divmod(stop_after, steps_per_epoch)
    assert not ckpt["progress"]["finished"]
    model_from_checkpoint(ckpt)
    # Issue 13 (7): --resume alone restores the run's own settings (epochs, data, batch size, seed,
    # …) instead of falling back to the defaults.
    resumed = run_cli("train", "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out} with the settings saved in its checkpoint" in resumed.stderr
    final, expected = state_of(out / "checkpoint.pt"), state_of(reference / "checkpoint.pt")
    assert final["progress"]["finished"]
    assert_same_weights(final["model"], expected["model"])
    assert_same_weights(final["optimizer"]["state"][0], expected["optimizer"]["state"][0])
    assert final["scheduler"]["last_epoch"] == expected["scheduler"]["last_epoch"] == 12
    assert _log_rows(out) == _log_rows(reference)  # same losses and accuracies, epoch by epoch


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the garbage file starts like a pickle
def test_corrupt_or_missing_checkpoints_give_clear_errors(uninterrupted, tmp_path):
    reference, config = uninterrupted
    good = (reference / "checkpoint.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x04this is not a checkpoint" * 10)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(2)}, foreign)
    for path, message in ((truncated, "truncated or corrupt"), (garbage, "corrupt"),
                          (foreign, "not an effst checkpoint"), (tmp_path / "absent.pt", "no such file")):
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path)
    # Through the command line: one line naming the file, exit status 2, no traceback.
    result = run_cli("eval", truncated)
    assert result.returncode == 2
    assert f"effst: error: checkpoint {truncated}" in result.stderr and "Traceback" not in result.stderr


def test_resume_from_a_corrupt_or_missing_checkpoint_is_a_clear_error(uninterrupted, tmp_path, capsys):
    from effst.cli import main

    reference, config = uninterrupted
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes((reference / "checkpoint.pt").read_bytes()[:100])
    args = ["train", "--config", str(config), "--epochs", "1", "--no-tensorboard", "--resume"]
    assert main(args + ["--out", str(out)]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "empty")]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert not (tmp_path / "empty").exists()  # issue 13 (8): a failed --resume leaves no empty folder


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_atomic({"format": "x", "value": torch.ones(3)}, path)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"format": "x", "value": torch.zeros(3)}, path)
    assert path.read_bytes() == before  # the old checkpoint is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left


def test_warmup_cosine_schedule_and_weight_decay_groups():
    from effst.models import build_model
    from effst.train.loop import make_optimizer, warmup_cosine

    model = build_model("spikformer-tiny", neuron="slif")
    optimizer = make_optimizer(model, lr=1.0, weight_decay=0.05)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"])
    # Neuron tau/threshold and BatchNorm parameters are never pulled toward zero.
    q_lif = model.blocks[0].attn.q_lif
    assert any(p is q_lif.w for p in plain["params"]) and any(p is q_lif.v_threshold for p in plain["params"])
    scheduler = warmup_cosine(optimizer, warmup_steps=4, total_steps=20, min_lr_ratio=0.1)
    lrs = []
    for _ in range(20):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # cosine decay after warmup
    assert scheduler.get_last_lr()[0] == pytest.approx(0.1)  # ends at min_lr_ratio
