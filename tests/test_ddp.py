"""Two-process DDP training on the CPU (gloo) through torchrun, one short epoch."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

from _cli import cli_env, write_config
from effst.train.checkpoint import load_checkpoint, model_from_checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_gloo(tmp_path):
    config = write_config(tmp_path)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "effst.cli", "train", "--config", str(config), "--epochs", "1", "--out", str(out),
           "--no-tensorboard", "--device", "cpu"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=cli_env())
    assert result.returncode == 0, result.stderr[-4000:]
    ckpt = load_checkpoint(out / "checkpoint.pt")
    progress = ckpt["progress"]
    assert progress["world_size"] == 2 and progress["finished"]
    assert progress["steps_per_epoch"] == 64 // (2 * 16)  # each rank took half of every epoch
    history = progress["history"]
    assert len(history) == 1 and history[0]["step"] == 2
    report = json.loads((out / "report.json").read_text())
    assert report["test"]["samples"] == 32  # both ranks' shards of the test set, all-reduced
    model_from_checkpoint(ckpt)
    assert result.stdout.count("effst: train: test accuracy") == 1  # only rank 0 reports
