"""The worker side of ``effst pipeline``: one stage per call, in a worker process or in-process.

A stage is the same function the ``train``/``prune``/``finetune`` subcommands run
(:mod:`effst.train.runs`), writing into its own folder ``<run>/seed<S>/<stage>/``. Workers do not
print the "stopping" notice on Ctrl-C: the parent prints the one "interrupted" message.
"""
from __future__ import annotations

import concurrent.futures as futures
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from effst.train.loop import CHECKPOINT_NAME, Interrupted, StopRequest
from effst.train.report import write_json


@dataclass
class Job:
    """One stage: ``out`` is relative to the pipeline's run folder (so the folder can be moved)."""

    key: str
    kind: str  # pretrain | prune | finetune
    out: str
    args: dict
    after: Optional[str] = None  # key of the job whose checkpoint this one starts from


def init_worker(threads: int, gpu_counter, gpus: int) -> None:
    """Worker-process set-up: quiet stop requests, one GPU per worker, ``threads`` CPU threads."""
    import faulthandler

    faulthandler.enable()  # a native crash in a stage prints where it happened
    StopRequest.interactive = False
    # Outside a training loop a stray SIGINT must not kill the worker (the pool would break):
    # fit() installs its own handler while it trains, and the parent asks workers to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if gpus > 0:  # one GPU per worker: pin it before anything initialises CUDA
        with gpu_counter.get_lock():
            index = gpu_counter.value
            gpu_counter.value += 1
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
    import torch

    torch.set_num_threads(threads)


def run_job(job: Job, options, root: str, source: Optional[str], resume: bool) -> dict:
    """Run one stage under ``root``; returns the compact result the report needs."""
    import warnings

    from effst.train import runs

    warnings.filterwarnings("ignore", message=".*native sLIF extension unavailable.*")
    out = Path(root) / job.out
    report = out / "report.json"
    if resume and report.is_file() and (out / CHECKPOINT_NAME).is_file():
        summary = json.loads(report.read_text())
        if summary.get("complete"):
            return compact(job, summary, reused=True)
    seed = job.args["seed"]
    resume_stage = resume and (out / CHECKPOINT_NAME).is_file()
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    if job.kind == "pretrain":
        if options.baseline is not None:
            settings = options.settings("finetune", seed)
            summary = runs.evaluate_checkpoint(options.baseline, settings, out=out)
            out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(options.baseline, out / CHECKPOINT_NAME)
        else:
            settings = options.settings("train", seed)
            summary = runs.pretrain(settings, out, resume=resume_stage)
    elif job.kind == "prune":
        settings = options.settings("finetune", seed)
        summary = runs.prune(source, job.args["method"], job.args["sparsity"], out, settings,
                             block_size=tuple(options.block_size), seed=seed)
    else:
        settings = options.settings("finetune", seed, neuron=job.args["neuron"])
        summary = runs.finetune(source, settings, out, resume=resume_stage)
    summary["complete"] = True
    summary["job_seconds"] = time.perf_counter() - t0
    summary["job_cpu_seconds"] = time.process_time() - cpu0
    write_json(report, summary)
    return compact(job, summary, reused=False)


def compact(job: Job, s: dict, reused: bool) -> dict:
    """The part of a stage's summary the pipeline report uses."""
    build = (s.get("recipe") or [{}])[0]
    return {
        "key": job.key, "kind": job.kind, "out": job.out, "args": job.args, "reused": reused,
        "accuracy": s["accuracy"], "test_samples": (s.get("test") or {}).get("samples"),
        "model": build.get("name"), "num_classes": build.get("num_classes"), "T": s.get("T") or build.get("T"),
        "parameters": s["parameters"], "compression": s["compression"],
        "mean_firing_rate": s["activity"]["mean_firing_rate"], "sops": s["activity"]["sops"],
        "energy_uj": s["activity"]["energy_uj"], "firing_rate": s["activity"]["firing_rate"],
        "epoch_time_median_s": s.get("epoch_time_median_s"), "seconds": s.get("job_seconds"),
        "cpu_seconds": s.get("job_cpu_seconds"),
    }


class InProcessExecutor:
    """The executor interface, running each stage at once in this process (one worker)."""

    def __init__(self, threads: int):
        import torch

        torch.set_num_threads(threads)

    def submit(self, fn, *args) -> futures.Future:
        future: futures.Future = futures.Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:  # Interrupted and KeyboardInterrupt reach the caller via the future / directly
            future.set_exception(exc)
        return future

    def stop_workers(self) -> None:
        pass

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


class WorkerPool(futures.ProcessPoolExecutor):
    """A process pool whose running stages can be asked to stop (they checkpoint and return)."""

    def stop_workers(self) -> None:
        """Send SIGINT to every worker: a training stage stops after its step with a checkpoint."""
        for process in list((getattr(self, "_processes", None) or {}).values()):
            if process.is_alive() and process.pid is not None:
                try:
                    os.kill(process.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass


__all__ = ["InProcessExecutor", "Interrupted", "Job", "WorkerPool", "compact", "init_worker", "run_job"]
