"""``effst pipeline``: the paper's comparison, in small by default, over several seeds.

Per seed: pretrain a baseline (LIF) → for L1P and DSP at each sparsity p: prune (accuracy
without fine-tuning), fine-tune with LIF, convert to sLIF and fine-tune; block L1P at each p
(fine-tuned with sLIF, for element-vs-block accuracy); random element pruning and random-
dimension DSP at ``random_sparsity`` (the controls, fine-tuned with sLIF); and the baseline
fine-tuned for the same extra epochs (the control for "training longer"). This module plans the
stages and runs them; :mod:`effst.train.pipeline_workers` runs one stage (in its own folder
``OUT/seed<S>/<stage>/``, with checkpoint and report), :mod:`effst.train.pipeline_report` writes
``OUT/report.{md,json}`` and ``OUT/pipeline.png`` with paired, interval-backed conclusions.
Ctrl-C or SIGTERM stops every worker (each checkpoints) and ``--resume`` continues.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from effst.train.config import load_config_file, normalize_keys, resolve
from effst.train.loop import CHECKPOINT_NAME, Interrupted
from effst.train.pipeline_report import BASELINE_FINETUNED, aggregate, pipeline_markdown, plot_pipeline, stage_name
from effst.train.pipeline_workers import InProcessExecutor, Job, WorkerPool, init_worker, run_job
from effst.train.report import write_json

PIPELINE_KEYS = ("data", "data_dir", "model", "seeds", "sparsities", "methods", "random_sparsity", "block",
                 "block_size", "pretrain_epochs", "finetune_epochs", "workers", "device", "baseline", "progress",
                 "train", "finetune")


@dataclass
class PipelineOptions:
    """What ``effst pipeline`` runs. ``train``/``finetune`` hold extra settings of those stages."""

    data: str = "digits"
    data_dir: Optional[str] = None
    model: Optional[str] = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.8, 0.9])
    methods: list[str] = field(default_factory=lambda: ["l1p", "dsp"])
    random_sparsity: Optional[float] = 0.9
    block: bool = True
    block_size: Optional[list[int]] = None  # None: effst.prune.DEFAULT_BLOCK_SIZE
    pretrain_epochs: Optional[int] = None
    finetune_epochs: Optional[int] = None
    workers: Optional[int] = None
    device: str = "auto"
    baseline: Optional[str] = None
    progress: bool = True  # one overall bar over the stages (the stages themselves print nothing)
    train: dict = field(default_factory=dict)
    finetune: dict = field(default_factory=dict)

    @classmethod
    def from_args(cls, args: argparse.Namespace, saved: Optional[dict] = None) -> "PipelineOptions":
        """Defaults < ``saved`` (a resumed run's own options, from its ``plan.json``) < ``--config``
        file < flags."""
        values: dict[str, Any] = normalize_keys(saved or {}, "plan.json options", PIPELINE_KEYS)
        if args.config is not None:
            values.update(normalize_keys(load_config_file(args.config), "config", PIPELINE_KEYS))
        for key in PIPELINE_KEYS:
            flag = getattr(args, key, None)
            if flag is None:  # not given on the command line
                continue
            values[key] = str(flag) if isinstance(flag, Path) else flag
        return cls(**values).validate()

    def validate(self) -> "PipelineOptions":
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"seeds: expected one or more ints >= 0, got {self.seeds!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: expected distinct values, got {self.seeds!r}")
        for p in list(self.sparsities) + ([self.random_sparsity] if self.random_sparsity is not None else []):
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p < 1.0:
                raise ValueError(f"sparsities: expected numbers in (0, 1), got {p!r}")
        if not self.sparsities:
            raise ValueError("sparsities: expected at least one value")
        for m in self.methods:
            if m not in ("l1p", "dsp"):
                raise ValueError(f"methods: expected 'l1p' and/or 'dsp', got {m!r}")
        if self.block_size is None:
            from effst.train.runs import default_block_size

            self.block_size = list(default_block_size())
        if not isinstance(self.block_size, (list, tuple)) or len(self.block_size) != 2 or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.block_size):
            raise ValueError(f"block_size: expected two positive ints, got {self.block_size!r}")
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1):
            raise ValueError(f"workers: expected an int >= 1, got {self.workers!r}")
        if self.baseline is not None and not Path(self.baseline).is_file():
            raise FileNotFoundError(f"baseline: no such checkpoint {self.baseline}")
        for key in ("train", "finetune"):
            if not isinstance(getattr(self, key), dict):
                raise ValueError(f"{key}: expected a mapping of settings")
        self.train = normalize_keys(self.train, "config.train")
        self.finetune = normalize_keys(self.finetune, "config.finetune")
        self.settings("train", 0)
        self.settings("finetune", 0)
        return self

    def settings(self, stage: str, seed: int, neuron: str = "lif"):
        """Settings of one stage: dataset defaults < the config's section < pipeline options."""
        flags = {"data": self.data, "data_dir": self.data_dir, "model": self.model, "seed": seed,
                 "device": self.device, "progress": False, "neuron": neuron, "threads": None}
        epochs = self.pretrain_epochs if stage == "train" else self.finetune_epochs
        if epochs is not None:
            flags["epochs"] = epochs
        section = self.train if stage == "train" else self.finetune
        return resolve(stage, file_values=section, flag_values={k: v for k, v in flags.items() if v is not None})


# ----------------------------------------------------------------------------- plan
def plan(options: PipelineOptions) -> list[Job]:
    """Every stage of the pipeline, in an order that respects dependencies (paths relative to the run)."""
    jobs: list[Job] = []
    for seed in options.seeds:
        root = Path(f"seed{seed}")
        base = f"s{seed}/baseline"
        jobs.append(Job(base, "pretrain", str(root / "baseline"), {"seed": seed}))
        jobs.append(Job(f"s{seed}/{BASELINE_FINETUNED}/lif", "finetune", str(root / BASELINE_FINETUNED),
                        {"seed": seed, "neuron": "lif"}, after=base))
        variants = [(m, p) for m in options.methods for p in options.sparsities]
        if options.block and "l1p" in options.methods:
            variants += [("block-l1p", p) for p in options.sparsities]
        if options.random_sparsity is not None:
            if "l1p" in options.methods:
                variants.append(("random", options.random_sparsity))
            if "dsp" in options.methods:
                variants.append(("dsp-random", options.random_sparsity))
        for method, p in variants:
            name = stage_name(method, p)
            prune_key = f"s{seed}/{name}/pruned"
            jobs.append(Job(prune_key, "prune", str(root / name / "pruned"),
                            {"seed": seed, "method": method, "sparsity": p}, after=base))
            neurons = ("lif", "slif") if method in ("l1p", "dsp") else ("slif",)
            for neuron in neurons:
                jobs.append(Job(f"s{seed}/{name}/{neuron}", "finetune", str(root / name / f"finetune-{neuron}"),
                                {"seed": seed, "neuron": neuron}, after=prune_key))
    return jobs


# ----------------------------------------------------------------------------- running
def _gpus(options: PipelineOptions) -> int:
    """GPUs the stages run on (0 on the CPU)."""
    import torch

    from effst.train.distributed import resolve_device

    return torch.cuda.device_count() if resolve_device(options.device).type == "cuda" else 0


def default_workers(options: PipelineOptions) -> int:
    """One worker per GPU, or per CPU core (at most 4) on the CPU."""
    gpus = _gpus(options)
    if gpus:
        return gpus
    return max(1, min(os.cpu_count() or 1, 4))


class _Progress:
    """One overall bar over the stages (tqdm), or plain lines; stage results print either way."""

    def __init__(self, enabled: bool, total: int):
        self.bar = None
        if enabled:
            from effst.data.optional import require

            self.bar = require("tqdm", "the progress bar (or pass --no-progress)").tqdm(
                total=total, desc="effst pipeline", unit="stage", file=sys.stderr, dynamic_ncols=True)

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def saved_options(out: Path) -> dict:
    """The options a pipeline run in ``out`` was started with (its ``plan.json``)."""
    import json

    path = Path(out) / "plan.json"
    try:
        return dict(json.loads(path.read_text())["options"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--resume: {path} cannot be read ({type(error).__name__}: {error})") from None


def run_pipeline(options: PipelineOptions, out: str | Path, *, resume: bool = False,
                 shown_as: Optional[str | Path] = None) -> dict:
    """Run every stage (in parallel where independent) into ``out`` and write the pipeline report.

    ``shown_as`` is the folder named in messages when ``out`` is a temporary one (``--overwrite``).
    Raises :class:`~effst.train.loop.Interrupted` after stopping the workers on Ctrl-C / SIGTERM.
    """
    out = Path(out)
    shown = Path(shown_as) if shown_as is not None else out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    jobs = plan(options)
    by_key = {j.key: j for j in jobs}
    workers = options.workers or default_workers(options)
    cores = os.cpu_count() or 1
    threads = max(1, cores // workers)  # on GPUs too: the data pipeline and the host work
    results: dict[str, dict] = {}
    errors: dict[str, str] = {}
    write_json(out / "plan.json", {"options": asdict(options), "jobs": [asdict(j) for j in jobs]})
    gpus = _gpus(options)
    if gpus and options.device.startswith("cuda:"):
        raise ValueError("device: the pipeline spreads its stages over all visible GPUs; pick them with "
                         "CUDA_VISIBLE_DEVICES and pass --device cuda")
    print(f"effst: pipeline: {len(jobs)} stages on {workers} worker process(es) × {threads} thread(s); output {shown}",
          file=sys.stderr, flush=True)

    def source_of(job: Job) -> Optional[str]:
        return str(out / by_key[job.after].out / CHECKPOINT_NAME) if job.after else None

    pending = list(jobs)
    running: dict[futures.Future, Job] = {}
    if workers == 1:  # one worker (e.g. one GPU): run the stages in this process
        executor = InProcessExecutor(threads)
    else:
        ctx = multiprocessing.get_context("spawn")
        executor = WorkerPool(max_workers=workers, mp_context=ctx, initializer=init_worker,
                              initargs=(threads, ctx.Value("i", 0), gpus))
    progress = _Progress(options.progress, len(jobs))
    try:
        while pending or running:
            for job in list(pending):
                if job.after and job.after in errors:
                    errors[job.key] = f"skipped: {job.after} failed"
                    pending.remove(job)
                    progress.advance()
                elif not job.after or job.after in results:
                    running[executor.submit(run_job, job, options, str(out), source_of(job), resume)] = job
                    pending.remove(job)
            if not running:
                break
            done, _ = futures.wait(list(running), return_when=futures.FIRST_COMPLETED)
            for fut in done:
                job = running.pop(fut)
                try:
                    results[job.key] = r = fut.result()
                except (Interrupted, KeyboardInterrupt):  # a stage was stopped (Ctrl-C reached it)
                    raise KeyboardInterrupt from None
                except Exception as exc:  # a failed stage is reported, the others go on
                    errors[job.key] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"  # one line, no module path
                    progress.line(f"effst: {job.key} FAILED: {errors[job.key]}")
                else:
                    progress.line(f"effst: [{len(results)}/{len(jobs)}] {job.key}: accuracy {100 * r['accuracy']:.2f} %"
                                  f"{' (reused)' if r['reused'] else ''} ({time.perf_counter() - t0:.0f} s)")
                progress.advance()
    except KeyboardInterrupt:
        progress.close()
        _stop(executor, running)
        raise Interrupted(shown / "plan.json") from None
    except BaseException:
        progress.close()
        _stop(executor, running)
        raise
    progress.close()
    executor.shutdown(wait=True)
    wall = time.perf_counter() - t0
    summary = aggregate(options, jobs, results, errors, wall, workers)
    write_json(out / "report.json", summary)
    (out / "report.md").write_text(pipeline_markdown(summary))
    plot_pipeline(out / "pipeline.png", summary)
    if errors:
        raise StagesFailed(f"pipeline: {len(errors)} stage(s) failed (see {shown / 'report.md'}; --resume reruns "
                           "them): " + "; ".join(f"{k}: {v}" for k, v in list(errors.items())[:3]))
    return summary


class StagesFailed(RuntimeError):
    """The pipeline ran to its end and wrote its report, but some stages failed (``--resume`` reruns them)."""


def _stop(executor, running: dict) -> None:
    """Ask every worker to stop (each running stage writes its checkpoint), cancel the rest, wait.

    Workers only stop when asked: a SIGINT delivered to the parent alone (``kill -INT``) would
    otherwise leave them training and writing files after the parent has exited."""
    executor.stop_workers()
    for fut in list(running):
        fut.cancel()
    executor.shutdown(wait=True, cancel_futures=True)


__all__ = ["PipelineOptions", "Job", "StagesFailed", "default_workers", "plan", "run_pipeline"]
