"""Orchestration of ``effst bench``: run the chosen suites in order, each under its time budget,
and keep every row measured (also of a suite that is stopped or raises).

Suites are modules of this package with ``run(device, quick, *, rows=None, log=print, ...)``:
a suite appends each row to ``rows`` as it finishes, so when its budget runs out the harness
still has what it measured. The neuron suite takes the plan and the peer settings as well.
"""
from __future__ import annotations

import datetime as _dt
import importlib
import inspect
import json
import os
import signal
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

from effst.benchmarks import schema

SUITES = ("neuron", "overhead", "sparse", "train-step", "native-cpu")
#: suite -> module with its run(); the neuron suite is special-cased (plan, peers, comparisons)
SUITE_MODULES = {
    "neuron": "effst.benchmarks.neuron",
    "overhead": "effst.benchmarks.overhead",
    "sparse": "effst.benchmarks.sparse",
    "train-step": "effst.benchmarks.train_step",
    "native-cpu": "effst.benchmarks.native_cpu",
}
CPU_ONLY = ("native-cpu",)  # part of 'all' on the CPU only
REPO_ROOT = Path(__file__).resolve().parents[2]


def suites_for(names: list[str], device: str) -> list[str]:
    """The suites to run, in the canonical order for 'all', else as given (duplicates dropped)."""
    if "all" in names:
        return [s for s in SUITES if s not in CPU_ONLY or device == "cpu"]
    return list(dict.fromkeys(names))


class SuiteTimeout(BaseException):
    """Raised by the alarm; a BaseException so per-case ``except Exception`` cannot swallow it."""


class Terminated(BaseException):
    """SIGTERM (e.g. from ``timeout``): unwinds so running peer subprocesses are killed too."""


def on_sigterm(signum, frame):
    raise Terminated("terminated by SIGTERM")


def with_timeout(seconds: Optional[float], fn: Callable):
    """Run ``fn()``; raise SuiteTimeout after ``seconds`` (main thread, POSIX only)."""
    if not seconds or not hasattr(signal, "SIGALRM"):
        return fn()

    def on_alarm(signum, frame):
        raise SuiteTimeout(f"suite exceeded its budget of {seconds:.0f} s (--suite-timeout); "
                           "the rows it finished are kept")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_module_suite(suite: str, device: str, quick: bool, done: list, log, peers: Optional[dict]) -> list[dict]:
    """Import the suite's module and call its ``run`` with the keywords it accepts."""
    name = SUITE_MODULES[suite]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        return [{"suite": suite, "status": "error", "error": f"suite module {name} not found"}]
    accepted = inspect.signature(module.run).parameters
    kwargs = {key: value for key, value in (("rows", done), ("log", log), ("peers", peers)) if key in accepted}
    rows = module.run(device, quick, **kwargs)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        return [{"suite": suite, "status": "error",
                 "error": f"{name}.run() returned {type(rows).__name__}, expected list[dict]"}]
    if not rows:
        return [{"suite": suite, "status": "error", "error": f"{name}.run() returned no rows"}]
    return rows


def run(args, args_list: list[str], command: str, log: Callable[[str], None] = print) -> int:
    """Run the suites of the parsed ``args``; write bench.json (after every suite), bench.md, plots."""
    import torch

    import effst
    from effst.benchmarks import neuron, report, timing
    from effst.benchmarks.cli import neuron_plan, parse_suite_timeouts

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("effst bench: --device cuda: no CUDA device is visible to torch "
                         f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"effst bench: --threads: expected a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    plan = neuron_plan(args, device)
    suites = suites_for(args.suites, device)
    budgets = parse_suite_timeouts(args.suite_timeout)
    now = _dt.datetime.now(_dt.timezone.utc)
    out = args.out or Path("results") / f"bench-{device}-{now.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "bench.json"
    wheels = args.wheels if args.wheels.is_dir() else None
    # peer runners are the harness's own scripts: from --bench-dir when it has them, else the clone's
    runner_dir = args.bench_dir / "peers"
    if not runner_dir.is_dir():
        runner_dir = REPO_ROOT / "bench" / "peers"
    result = schema.new_result(
        created=now.isoformat(timespec="seconds"), command=command, argv=args_list, cwd=os.getcwd(),
        device=device, quick=args.quick, suites=suites, threads=torch.get_num_threads(),
        triton_interpret=os.environ.get("TRITON_INTERPRET") == "1", machine=timing.machine(device),
        versions={"effst": effst.__version__, **timing.versions()},
        suite_budgets={s: budgets[s] for s in suites if s in budgets})

    def save():
        result["errors"] = schema.count_errors(result["rows"])
        json_path.write_text(json.dumps(report.finite(result), indent=1))

    log(f"effst bench: suites {', '.join(suites)} on {device} "
        f"({result['machine'].get('gpu_name') or result['machine']['cpu_model']}, "
        f"{result['threads']} torch threads){' --quick' if args.quick else ''}; results in {out}")
    if result["triton_interpret"]:
        log("effst bench: WARNING: TRITON_INTERPRET=1 is set; Triton timings would be the interpreter's")
    copy_bytes = args.copy_bytes or ((1 << 30) if device == "cuda" else (64 << 20) if args.quick else (256 << 20))
    copy_samples: list[float] = []

    def measure_copy() -> float:
        """Measure the copy bandwidth once more; the best sample is the machine's limit."""
        sample = timing.copy_bandwidth(device, copy_bytes)
        copy_samples.append(sample["bytes_per_s"])
        if result["copy_bandwidth"] is None or sample["bytes_per_s"] >= result["copy_bandwidth"]["bytes_per_s"]:
            result["copy_bandwidth"] = sample
        result["copy_bandwidth"]["samples_bytes_per_s"] = list(copy_samples)
        return result["copy_bandwidth"]["bytes_per_s"]

    copy_bw = measure_copy()
    log(f"effst bench: measured copy bandwidth {copy_bw / 1e9:.1f} GB/s (read+write, {copy_bytes >> 20} MiB buffer)")
    save()
    peer_settings = {"names": plan.peers, "peers_dir": args.peers_dir, "wheels": wheels, "runner_dir": runner_dir,
                     "timeout": plan.peer_timeout, "threads": torch.get_num_threads()}

    def run_suite(suite: str, done: list[dict]) -> list[dict]:
        if suite == "neuron":
            outcome = neuron.run(device, args.quick, copy_bandwidth=measure_copy, peers_dir=args.peers_dir,
                                 wheels=wheels, runner_dir=runner_dir, plan=plan, log=log, rows=done)
            result["peers"] = outcome["peers"]
            result["comparisons"] = outcome["comparisons"]
            result["neuron"] = {k: outcome[k] for k in ("plan", "neuron_config", "bytes_formula")}
            return outcome["rows"]
        try:
            return run_module_suite(suite, device, args.quick, done, log, peer_settings)
        finally:
            if suite == "train-step" and "info" in peer_settings:
                result["train_step_peers"] = peer_settings.pop("info")

    for suite in suites:
        start = time.perf_counter()
        log(f"effst bench: --- suite {suite} ---" + (f" (budget {budgets[suite]:.0f} s)" if suite in budgets else ""))
        done: list[dict] = []  # the suite's rows so far: kept when it is stopped midway
        try:
            rows = with_timeout(budgets.get(suite), lambda: run_suite(suite, done))
        except (Exception, SuiteTimeout, Terminated) as exc:
            if suite == "neuron":
                neuron.derive(done, result["copy_bandwidth"]["bytes_per_s"])
            rows = list(done) + [{"suite": suite, "status": "error", "error": f"{type(exc).__name__}: {exc}",
                                  "traceback": traceback.format_exc()[-3000:]}]
            if isinstance(exc, Terminated):  # keep what was measured, then stop
                result["rows"].extend(schema.normalise_row(r, suite) for r in rows)
                save()
                log(f"effst bench: terminated during suite {suite}; partial results in {json_path}")
                return 1
        result["rows"].extend(schema.normalise_row(r, suite) for r in rows)
        result["suite_seconds"][suite] = round(time.perf_counter() - start, 2)
        save()
        if device == "cuda":
            torch.cuda.empty_cache()

    report.write_tables_and_plots(result, out, args.no_plots, log)
    save()
    errors = result["errors"]
    log(f"effst bench: wrote {json_path}" + (f"; {errors} error row(s), see the tables" if errors else ""))
    return 3 if errors else 0


def render(json_path: Path, log: Callable[[str], None] = print) -> int:
    """Rewrite bench.md and the plots next to an existing ``bench.json``."""
    from effst.benchmarks import report

    try:
        result = json.loads(json_path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"effst bench: --render: cannot read {json_path}: {exc}")
    if result.get("schema") != schema.SCHEMA:
        raise SystemExit(f"effst bench: --render: {json_path} is not an {schema.SCHEMA} results file")
    result["plots"] = []
    report.write_tables_and_plots(result, json_path.parent, False, log)
    json_path.write_text(json.dumps(report.finite(result), indent=1))
    return 3 if schema.count_errors(result["rows"]) else 0
