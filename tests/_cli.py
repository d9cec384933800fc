"""Helpers shared by the CLI tests: run ``python -m effst.cli`` in a subprocess on tiny data."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

# Tiny synthetic data: 64 training samples (4 steps of 16), 32 test samples.
SYNTHETIC_CONFIG = """\
data: synthetic
synthetic: {num_train: 64, num_test: 32, noise: 0.3}
batch_size: 16
eval_batch_size: 32
threads: 1
progress: false
"""


def write_config(directory: Path, extra: str = "") -> Path:
    path = directory / "tiny.yaml"
    path.write_text(SYNTHETIC_CONFIG + extra)
    return path


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONWARNINGS"] = "ignore"
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m effst.cli ARGS`` with captured output."""
    return subprocess.run([sys.executable, "-m", "effst.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=cli_env())


def state_of(checkpoint: Path) -> dict:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    """Bit-for-bit equality of two state dicts."""
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"
