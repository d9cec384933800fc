"""Benchmark harness: ``effst bench`` / ``python -m effst.benchmarks``.

Suites (modules of this package, so an installed effst runs all of them):
    neuron      effst SLIF/PLIF/LIF fwd+bwd vs SpikingJelly 2.0.0 and 0.0.0.0.14 (cupy), eager
                wall and kernel time (:mod:`~effst.benchmarks.neuron`; peers run in isolated
                environments through the runners in a clone's ``bench/peers/``)
    overhead    eager wall per tiny fwd+bwd call vs a plain PyTorch baseline (:mod:`~effst.benchmarks.overhead`)
    sparse      block-sparse linear layers (:mod:`~effst.benchmarks.sparse`)
    train-step  Spikformer training step, eager and CUDA graphs, token selection
                (:mod:`~effst.benchmarks.train_step`)
    native-cpu  the native C++ sLIF kernel vs SpikingJelly's CPU PLIF (:mod:`~effst.benchmarks.native_cpu`;
                part of ``all`` on the CPU, on request on CUDA)
    all         every suite above

One module per job: :mod:`~effst.benchmarks.cli` (arguments, exit status),
:mod:`~effst.benchmarks.harness` (running the suites under their budgets),
:mod:`~effst.benchmarks.schema` (the ``bench.json`` fields and row statuses),
:mod:`~effst.benchmarks.report` (tables, ``bench.md``, plots), :mod:`~effst.benchmarks.timing`
(how everything is timed; loaded by path inside the peers' environments too) and
:mod:`~effst.benchmarks.peers` (the peer environments). Importing this package imports none of
them (no torch): ``effst bench --help`` stays fast.

Output (``--out``, default ``results/bench-<device>-<date>``): ``bench.json``, ``bench.md`` (the
tables) and PNG plots, one per suite.
"""
from __future__ import annotations

from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``effst bench``; returns the exit status (see :mod:`effst.benchmarks.cli`)."""
    from effst.benchmarks.cli import main as cli_main

    return cli_main(argv)
