"""``effst pipeline``: the paper's comparison, in small by default, over several seeds.

Per seed: pretrain a baseline (LIF) → for L1P and DSP at each sparsity p: prune (accuracy
without fine-tuning), fine-tune with LIF, convert to sLIF and fine-tune; block L1P at each p
(fine-tuned with sLIF, for element-vs-block accuracy); random element pruning and random-
dimension DSP at ``random_sparsity`` (the controls, fine-tuned with sLIF). Every stage is the
same function the ``train``/``prune``/``finetune`` subcommands run, in its own directory
``OUT/seed<S>/<stage>/`` with checkpoint and report; independent stages run in parallel worker
processes (one CPU thread each). The pipeline report (``OUT/report.{md,json}``,
``OUT/pipeline.png``) states plainly whether sLIF recovered more than LIF and whether L1P beat
random pruning, with the numbers.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import multiprocessing
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from effst.train.config import load_config_file, normalize_keys, resolve
from effst.train.loop import Interrupted
from effst.train.report import (
    command_line, json_safe, machine_description, mean_std, now_iso, pipeline_markdown, plot_pipeline, write_json,
)

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
    block_size: list[int] = field(default_factory=lambda: [16, 16])
    pretrain_epochs: Optional[int] = None
    finetune_epochs: Optional[int] = None
    workers: Optional[int] = None
    device: str = "auto"
    baseline: Optional[str] = None
    progress: bool = False
    train: dict = field(default_factory=dict)
    finetune: dict = field(default_factory=dict)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "PipelineOptions":
        """Defaults < ``--config`` file < flags."""
        values: dict[str, Any] = {}
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
        if len(self.block_size) != 2 or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.block_size):
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
                 "device": self.device, "progress": self.progress, "neuron": neuron, "threads": None}
        epochs = self.pretrain_epochs if stage == "train" else self.finetune_epochs
        if epochs is not None:
            flags["epochs"] = epochs
        section = self.train if stage == "train" else self.finetune
        return resolve(stage, file_values=section, flag_values={k: v for k, v in flags.items() if v is not None})


# ----------------------------------------------------------------------------- jobs
@dataclass
class Job:
    key: str
    kind: str  # pretrain | prune | finetune
    out: str
    args: dict
    after: Optional[str] = None  # key of the job whose checkpoint this one starts from


def plan(options: PipelineOptions, out: Path) -> list[Job]:
    """Every stage of the pipeline, in an order that respects dependencies."""
    jobs: list[Job] = []
    for seed in options.seeds:
        root = out / f"seed{seed}"
        base = f"s{seed}/baseline"
        jobs.append(Job(base, "pretrain", str(root / "baseline"), {"seed": seed}))
        variants = [(m, p) for m in options.methods for p in options.sparsities]
        if options.block and "l1p" in options.methods:
            variants += [("block-l1p", p) for p in options.sparsities]
        if options.random_sparsity is not None:
            if "l1p" in options.methods:
                variants.append(("random", options.random_sparsity))
            if "dsp" in options.methods:
                variants.append(("dsp-random", options.random_sparsity))
        for method, p in variants:
            name = f"{method}-p{p:g}"
            prune_key = f"s{seed}/{name}/pruned"
            jobs.append(Job(prune_key, "prune", str(root / name / "pruned"),
                            {"seed": seed, "method": method, "sparsity": p}, after=base))
            neurons = ("lif", "slif") if method in ("l1p", "dsp") else ("slif",)
            for neuron in neurons:
                jobs.append(Job(f"s{seed}/{name}/{neuron}", "finetune", str(root / name / f"finetune-{neuron}"),
                                {"seed": seed, "neuron": neuron}, after=prune_key))
    return jobs


def _init_worker(threads: int, gpu_counter, gpus: int) -> None:
    import faulthandler

    faulthandler.enable()  # a native crash in a stage prints where it happened
    if gpus > 0:  # one GPU per worker: pin it before anything initialises CUDA
        with gpu_counter.get_lock():
            index = gpu_counter.value
            gpu_counter.value += 1
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
    import torch

    torch.set_num_threads(threads)


def run_job(job: Job, options: PipelineOptions, source: Optional[str], resume: bool) -> dict:
    """Run one stage (in a worker process); returns the compact result the report needs."""
    import warnings

    from effst.train import runs

    warnings.filterwarnings("ignore", message=".*native sLIF extension unavailable.*")
    out = Path(job.out)
    report = out / "report.json"
    if resume and report.is_file() and (out / "checkpoint.pt").is_file():
        import json

        summary = json.loads(report.read_text())
        if summary.get("complete"):
            return _compact(job, summary, reused=True)
    seed = job.args["seed"]
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    if job.kind == "pretrain":
        if options.baseline is not None:
            settings = options.settings("finetune", seed)
            summary = runs.evaluate_checkpoint(options.baseline, settings, out=out)
            out.mkdir(parents=True, exist_ok=True)
            import shutil

            shutil.copyfile(options.baseline, out / "checkpoint.pt")
        else:
            settings = options.settings("train", seed)
            summary = runs.pretrain(settings, out, resume=resume and (out / "checkpoint.pt").is_file())
    elif job.kind == "prune":
        settings = options.settings("finetune", seed)
        summary = runs.prune(source, job.args["method"], job.args["sparsity"], out, settings,
                             block_size=tuple(options.block_size), seed=seed)
    else:
        settings = options.settings("finetune", seed, neuron=job.args["neuron"])
        summary = runs.finetune(source, settings, out, resume=resume and (out / "checkpoint.pt").is_file())
    summary["complete"] = True
    summary["job_seconds"] = time.perf_counter() - t0
    summary["job_cpu_seconds"] = time.process_time() - cpu0
    write_json(report, summary)
    return _compact(job, summary, reused=False)


def _compact(job: Job, s: dict, reused: bool) -> dict:
    return {
        "key": job.key, "kind": job.kind, "out": job.out, "args": job.args, "reused": reused,
        "accuracy": s["accuracy"], "parameters": s["parameters"], "compression": s["compression"],
        "mean_firing_rate": s["activity"]["mean_firing_rate"], "sops": s["activity"]["sops"],
        "energy_uj": s["activity"]["energy_uj"], "firing_rate": s["activity"]["firing_rate"],
        "epoch_time_median_s": s.get("epoch_time_median_s"), "seconds": s.get("job_seconds"),
        "cpu_seconds": s.get("job_cpu_seconds"),
    }


# ----------------------------------------------------------------------------- running
class _InProcess:
    """The executor interface, running each stage at once in this process."""

    def __init__(self, threads: int):
        import torch

        torch.set_num_threads(threads)

    def submit(self, fn, *args) -> futures.Future:
        future: futures.Future = futures.Future()
        try:
            future.set_result(fn(*args))
        except Interrupted:
            raise KeyboardInterrupt from None
        except Exception as exc:
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


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


def run_pipeline(options: PipelineOptions, out: str | Path, *, resume: bool = False) -> dict:
    """Run every stage (in parallel where independent) and write the pipeline report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    jobs = plan(options, out)
    by_key = {j.key: j for j in jobs}
    workers = options.workers or default_workers(options)
    cores = os.cpu_count() or 1
    threads = max(1, cores // workers)  # on GPUs too: the data pipeline and the host work
    results: dict[str, dict] = {}
    errors: dict[str, str] = {}
    write_json(out / "plan.json", {"options": asdict(options), "jobs": [asdict(j) for j in jobs]})
    print(f"effst: pipeline: {len(jobs)} stages on {workers} worker process(es) × {threads} thread(s); output {out}",
          file=sys.stderr)

    def source_of(job: Job) -> Optional[str]:
        return str(Path(by_key[job.after].out) / "checkpoint.pt") if job.after else None

    pending = list(jobs)
    running: dict[futures.Future, Job] = {}
    ctx = multiprocessing.get_context("spawn")
    gpus = _gpus(options)
    if gpus and options.device.startswith("cuda:"):
        raise ValueError("device: the pipeline spreads its stages over all visible GPUs; pick them with "
                         "CUDA_VISIBLE_DEVICES and pass --device cuda")
    if workers == 1:  # one worker (e.g. one GPU): run the stages in this process
        executor = _InProcess(threads)
    else:
        executor = futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                               initargs=(threads, ctx.Value("i", 0), gpus))
    try:
        while pending or running:
            for job in list(pending):
                if job.after and job.after in errors:
                    errors[job.key] = f"skipped: {job.after} failed"
                    pending.remove(job)
                elif not job.after or job.after in results:
                    running[executor.submit(run_job, job, options, source_of(job), resume)] = job
                    pending.remove(job)
            if not running:
                break
            done, _ = futures.wait(list(running), return_when=futures.FIRST_COMPLETED)
            for fut in done:
                job = running.pop(fut)
                try:
                    results[job.key] = fut.result()
                    r = results[job.key]
                    print(f"effst: [{len(results)}/{len(jobs)}] {job.key}: accuracy {100 * r['accuracy']:.2f} %"
                          f"{' (reused)' if r['reused'] else ''} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
                except Interrupted:  # a stage was stopped by Ctrl-C: stop the pipeline
                    raise KeyboardInterrupt from None
                except Exception as exc:  # a failed stage is reported, the others go on
                    errors[job.key] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                    print(f"effst: {job.key} FAILED: {errors[job.key]}", file=sys.stderr)
    except KeyboardInterrupt:
        executor.shutdown(wait=True, cancel_futures=True)
        print(f"effst: pipeline interrupted; finished stages are kept — continue with "
              f"`effst pipeline --resume --out {out}`", file=sys.stderr)
        raise
    executor.shutdown(wait=True)
    wall = time.perf_counter() - t0
    summary = aggregate(options, jobs, results, errors, wall, workers)
    write_json(out / "report.json", summary)
    (out / "report.md").write_text(pipeline_markdown(summary))
    plot_pipeline(out / "pipeline.png", summary)
    if errors:
        raise RuntimeError(f"pipeline: {len(errors)} stage(s) failed (see {out / 'report.md'}): "
                           + "; ".join(f"{k}: {v}" for k, v in list(errors.items())[:3]))
    return summary


# ----------------------------------------------------------------------------- report
def aggregate(options: PipelineOptions, jobs: list[Job], results: dict, errors: dict, wall: float,
              workers: int) -> dict:
    """Tables and plain conclusions over seeds."""
    seeds = options.seeds

    def acc(key: str) -> Optional[float]:
        return results[key]["accuracy"] if key in results else None

    def first(prefix_keys: list[str], field_name: str):
        for k in prefix_keys:
            if k in results:
                return results[k][field_name]
        return None

    base_keys = [f"s{s}/baseline" for s in seeds]
    base_params = first(base_keys, "parameters") or {}
    rows = [{"method": "baseline", "sparsity": 0.0, "params_blocks": base_params.get("blocks"),
             "compression_blocks": 1.0, "acc_pruned": [acc(k) for k in base_keys],
             "acc_lif": [None] * len(seeds), "acc_slif": [None] * len(seeds)}]
    variants = []
    for job in jobs:
        if job.kind == "prune":
            variants.append((job.args["method"], job.args["sparsity"]))
    variants = list(dict.fromkeys(variants))
    for method, p in variants:
        name = f"{method}-p{p:g}"
        keys = {stage: [f"s{s}/{name}/{stage}" for s in seeds] for stage in ("pruned", "lif", "slif")}
        params = first(keys["pruned"], "parameters") or {}
        comp = first(keys["pruned"], "compression") or {}
        rows.append({"method": method, "sparsity": p, "params_blocks": params.get("blocks_nonzero"),
                     "compression_blocks": comp.get("blocks"),
                     "acc_pruned": [acc(k) for k in keys["pruned"]], "acc_lif": [acc(k) for k in keys["lif"]],
                     "acc_slif": [acc(k) for k in keys["slif"]]})
    activity = {}
    for label, keys in [("baseline (LIF)", base_keys)] + [
            (f"{m} p={p:g} {n}", [f"s{s}/{m}-p{p:g}/{n}" for s in seeds])
            for m, p in variants for n in ("lif", "slif")]:
        found = [results[k] for k in keys if k in results]
        if found:
            activity[label] = {f: statistics.fmean(r[f] for r in found) for f in ("mean_firing_rate", "sops", "energy_uj")}
    epoch_times = {}
    for label, kind, neuron in (("pretraining", "pretrain", None), ("fine-tuning LIF", "finetune", "lif"),
                                ("fine-tuning sLIF", "finetune", "slif")):
        t = [r["epoch_time_median_s"] for r in results.values()
             if r["kind"] == kind and (neuron is None or r["args"].get("neuron") == neuron) and r["epoch_time_median_s"]]
        if t:
            epoch_times[label] = statistics.median(t)
    train_settings = options.settings("train", seeds[0])
    finetune_settings = options.settings("finetune", seeds[0])
    summary = {
        "date": now_iso(),
        "machine": machine_description(),
        "command": command_line(),
        "data": options.data,
        "model": train_settings.model or _dataset_model(options.data),
        "seeds": seeds,
        "sparsities": options.sparsities,
        "options": asdict(options),
        "settings": {"train": train_settings.to_dict(), "finetune": finetune_settings.to_dict()},
        "wall_time_s": wall,
        "workers": workers,
        "stage_seconds": sum(r.get("seconds") or 0.0 for r in results.values()),
        "stage_cpu_seconds": sum(r.get("cpu_seconds") or 0.0 for r in results.values()),
        "load_average": _load_average(),
        "rows": rows,
        "activity": activity,
        "epoch_time_s": epoch_times,
        "stages": results,
        "errors": errors,
    }
    summary["conclusions"] = conclusions(rows, seeds, options)
    return json_safe(summary)


def _load_average() -> Optional[list[float]]:
    """1/5/15-minute load averages at the end (other work on the machine slows the wall time)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _dataset_model(name: str) -> str:
    return {"digits": "spikformer-tiny", "synthetic": "spikformer-tiny", "cifar10": "spikformer-4-384",
            "cifar10-dvs": "spikformer-2-256"}.get(name, "?")


def _diffs(a: list, b: list) -> list[float]:
    return [x - y for x, y in zip(a, b) if x is not None and y is not None]


def conclusions(rows: list[dict], seeds: list[int], options: PipelineOptions) -> dict:
    """Plain-language answers with the numbers behind them (accuracy differences in points)."""
    statements: list[str] = []
    facts: dict[str, Any] = {}
    n_seeds = len(seeds)

    # 1. sLIF vs LIF fine-tuning.
    pairs = [r for r in rows[1:] if r["method"] in ("l1p", "dsp")]
    per_setting = []
    all_diffs = []
    for r in pairs:
        d = _diffs(r["acc_slif"], r["acc_lif"])
        if d:
            per_setting.append((r["method"], r["sparsity"], statistics.fmean(d), sum(x > 0 for x in d), len(d)))
            all_diffs += d
    if per_setting:
        mean_gain = statistics.fmean(all_diffs)
        wins = sum(1 for *_, m, _, _ in per_setting if m > 0)
        answer = "Yes" if mean_gain > 0 else ("No (equal)" if mean_gain == 0 else "No")
        detail = ", ".join(f"{m} p={p:g} {100 * g:+.2f}" for m, p, g, _, _ in per_setting)
        statements.append(
            f"sLIF recovered more than LIF: **{answer}** — fine-tuning with sLIF minus fine-tuning with LIF, "
            f"mean {100 * mean_gain:+.2f} accuracy points over {len(per_setting)} settings × {n_seeds} seeds; sLIF ahead in "
            f"{wins} of {len(per_setting)} settings and {sum(x > 0 for x in all_diffs)} of {len(all_diffs)} runs ({detail}).")
        facts["slif_minus_lif"] = {"mean_points": 100 * mean_gain, "settings_won": wins, "settings": len(per_setting),
                                   "runs_won": sum(x > 0 for x in all_diffs), "runs": len(all_diffs),
                                   "per_setting": [{"method": m, "sparsity": p, "mean_points": 100 * g}
                                                   for m, p, g, _, _ in per_setting]}

    # 2. L1P vs random (element), DSP vs random dims, at the random sparsity.
    def row(method: str, p: float) -> Optional[dict]:
        return next((r for r in rows if r["method"] == method and abs(r["sparsity"] - p) < 1e-9), None)

    if options.random_sparsity is not None:
        p = options.random_sparsity
        for ours, control, label in (("l1p", "random", "L1P beat random (element) pruning"),
                                     ("dsp", "dsp-random", "DSP beat random-dimension pruning")):
            a, b = row(ours, p), row(control, p)
            if a is None or b is None:
                continue
            d_pruned = _diffs(a["acc_pruned"], b["acc_pruned"])
            d_ft = _diffs(a["acc_slif"], b["acc_slif"])
            if not d_ft and not d_pruned:
                continue
            m_ft = statistics.fmean(d_ft) if d_ft else None
            m_pr = statistics.fmean(d_pruned) if d_pruned else None
            deciding = m_ft if m_ft is not None else m_pr
            answer = "Yes" if deciding > 0 else ("No (equal)" if deciding == 0 else "No")
            statements.append(
                f"{label} at p={p:g}: **{answer}** — after sLIF fine-tuning {_ms_text(a['acc_slif'])} vs "
                f"{_ms_text(b['acc_slif'])} % ({'—' if m_ft is None else f'{100 * m_ft:+.2f}'} points); "
                f"without fine-tuning {_ms_text(a['acc_pruned'])} vs {_ms_text(b['acc_pruned'])} % "
                f"({'—' if m_pr is None else f'{100 * m_pr:+.2f}'} points).")
            facts[f"{ours}_minus_{control}"] = {"sparsity": p, "finetuned_points": None if m_ft is None else 100 * m_ft,
                                                "pruned_points": None if m_pr is None else 100 * m_pr}

    # 3. Element vs block L1P (issue 4's experiment).
    block_rows = [r for r in rows if r["method"] == "block-l1p"]
    if block_rows:
        parts = []
        per = []
        for b in block_rows:
            e = row("l1p", b["sparsity"])
            if e is None:
                continue
            d = _diffs(e["acc_slif"], b["acc_slif"])
            if d:
                per.append(statistics.fmean(d))
                parts.append(f"p={b['sparsity']:g}: element {_ms_text(e['acc_slif'])} vs block {_ms_text(b['acc_slif'])} %, "
                             f"{_count(e['params_blocks'])} vs {_count(b['params_blocks'])} block weights kept")
        if per:
            statements.append(
                f"Element vs block L1P ({options.block_size[0]}×{options.block_size[1]} tiles), both fine-tuned with sLIF: "
                f"element L1P is {'more' if statistics.fmean(per) > 0 else 'less'} accurate by "
                f"{abs(100 * statistics.fmean(per)):.2f} points on average ({'; '.join(parts)}). Block L1P prunes "
                f"ceil(p·tiles) whole tiles per matrix, so on small matrices it removes more than p of the weights.")
            facts["element_minus_block_points"] = 100 * statistics.fmean(per)
    base = mean_std(rows[0]["acc_pruned"])
    if base[0] is not None:
        statements.append(f"Baseline (unpruned, LIF): {_ms_text(rows[0]['acc_pruned'])} %. With {n_seeds} seeds, "
                          "differences smaller than the ± spread are not evidence either way.")
    return {"statements": statements, "facts": facts}


def _count(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:,.0f}"


def _ms_text(values: list) -> str:
    m, sd = mean_std(values)
    return "—" if m is None else f"{100 * m:.2f} ± {100 * sd:.2f}"
