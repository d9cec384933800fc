"""Benchmark harness: ``effst bench`` / ``python -m effst.benchmarks``.

Suites
    neuron      effst SLIF/PLIF/LIF vs SpikingJelly 2.0.0 and 0.0.0.0.14 (in this package:
                :mod:`effst.benchmarks.neuron`; peers run in isolated environments)
    sparse      ``bench/bench_sparse.py``      ``run(device, quick) -> list[dict]``
    train-step  ``bench/bench_train_step.py``  ``run(device, quick) -> list[dict]``
    native-cpu  ``bench/bench_native_cpu.py``  ``run(quick) -> list[dict]`` (CPU kernels; part
                of ``all`` on the CPU, on request on CUDA)
    all         every suite above

The suites in ``bench/`` are imported by file path from the clone's ``bench/`` folder (found
next to this package, or given by ``--bench-dir``); a suite that is missing or raises becomes
an error row in the results, never a silent gap.

Output (``--out``, default ``results/bench-<device>-<date>``): ``bench.json``, ``bench.md``
(the tables) and PNG plots: ``neuron_time_vs_T.png``, ``sparse_vs_sparsity.png``,
``train_step.png``.

JSON fields (schema ``effst-bench/1``; every one is always present):
    schema, created (ISO time, UTC), command (the process command line), argv (the harness's
    arguments), cwd, device, quick, suites, threads (torch CPU threads), triton_interpret,
    machine {hostname, platform, cpu_model, cpu_count, torch_threads, device, load_average_1m, + gpu_name,
    gpu_capability, gpu_memory_bytes, gpu_l2_bytes, gpu_count, cuda_driver on CUDA or
    cpu_cache_bytes on the CPU}, versions {effst, python, torch, torch_cuda, triton, numpy,
    spikingjelly, cupy}, copy_bandwidth {bytes_per_s (the best of the samples: start of the run and
    after each neuron round), samples_bytes_per_s, buffer_bytes, ms, reps, method},
    peers {name: {label, requirement, status, location, source, error?, runs[]}} (neuron suite),
    train_step_peers {name: {label, status, location, source, seconds, spikingjelly_file}},
    rows [per suite row: suite, status ('ok'|'error'), error (when status is 'error'), ...],
    comparisons [effst vs fastest peer: effst, peer, dtype, T, effst_ms, peer_ms, speedup,
    target, met], neuron {plan, neuron_config, bytes_formula}, suite_seconds {suite: s},
    plots [file names], errors (number of error rows).
Neuron rows add: library, peer, neuron, parameters, kernel, dtype, T, step_shape,
neurons_per_step, ms (median), ms_min, ms_q1, ms_q3, reps, warmup, first_call_ms, input_sets,
peak_memory_bytes (CUDA), firing_rate, neuron_steps, gneuron_steps_per_s,
bytes_per_neuron_step, achieved_bytes_per_s, copy_bandwidth_fraction; with --repeat N > 1 also
rounds, round_ms (ms = median of the rounds' medians).

Exit status: 0 every row ok; 3 finished, but some rows are errors (all reported); 2 bad
arguments; 1 the harness itself failed.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import shlex
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

SUITES = ("neuron", "sparse", "train-step", "native-cpu")
EXTERNAL_SUITES = {  # suite -> (file in bench/, how to call its run())
    "sparse": ("bench_sparse.py", lambda mod, device, quick: mod.run(device, quick)),
    "train-step": ("bench_train_step.py", lambda mod, device, quick: mod.run(device, quick)),
    "native-cpu": ("bench_native_cpu.py", lambda mod, device, quick: mod.run(quick)),
}
REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA = "effst-bench/1"


def _suites_for(names: list[str], device: str) -> list[str]:
    if "all" in names:
        return [s for s in SUITES if s != "native-cpu" or device == "cpu"]
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="effst bench",
        description="Time effst's kernels beside SpikingJelly's; print a table, write JSON and plots.")
    parser.add_argument("suites", nargs="*", metavar="SUITE",
                        help=f"one or more of {', '.join(SUITES)}, all (default: all)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="where to run (default: cuda when available, else cpu)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions (CI)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: results/bench-<device>-<date>)")
    parser.add_argument("--peers", default=None,
                        help="comma-separated SpikingJelly peers for the neuron suite: sj2, sj014, "
                             "or 'none' (default: sj2,sj014)")
    parser.add_argument("--effst-backends", default=None,
                        help="neuron suite: effst backends to time, e.g. native,reference (default: "
                             "triton,native on cuda, auto on cpu; SLIF alone on all but the first)")
    parser.add_argument("--skip-effst", action="store_true",
                        help="neuron suite: time only the peers")
    parser.add_argument("--peers-dir", type=Path, default=REPO_ROOT / ".peers",
                        help="where peer environments are created (default: <repo>/.peers)")
    parser.add_argument("--wheels", type=Path, default=REPO_ROOT / ".whl",
                        help="folder of carried wheels tried before the registry (default: <repo>/.whl)")
    parser.add_argument("--bench-dir", type=Path, default=REPO_ROOT / "bench",
                        help="the clone's bench/ folder with the suite modules and peer runners")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--T", dest="Ts", default=None, help="neuron suite: comma-separated T values")
    parser.add_argument("--shape", default=None,
                        help="neuron suite: per-step shape, e.g. 64x65536 (channels = last dim)")
    parser.add_argument("--dtypes", default=None,
                        help="neuron suite: comma-separated dtypes (float32,bfloat16,float16)")
    parser.add_argument("--suite-timeout", default=None,
                        help="seconds after which a suite is stopped and reported as an error: one "
                             "number for every suite, or per suite, e.g. neuron=170,sparse=60")
    parser.add_argument("--peer-timeout", type=float, default=None,
                        help="seconds one peer subprocess may run (default 600, 300 with --quick on cpu)")
    parser.add_argument("--copy-bytes", type=int, default=None,
                        help="buffer size of the copy-bandwidth measurement (default 1 GiB cuda, "
                             "256 MiB cpu, 64 MiB --quick)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="neuron suite: rounds of the whole suite, ms = median of the rounds' "
                             "medians (default 3 on the CPU, 1 on CUDA and with --quick)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--render", type=Path, default=None, metavar="BENCH_JSON",
                        help="only rewrite the tables and plots of an existing bench.json (in its folder)")
    return parser


class _SuiteTimeout(BaseException):
    """Raised by the alarm; a BaseException so per-case ``except Exception`` cannot swallow it."""


class _Terminated(BaseException):
    """SIGTERM (e.g. from ``timeout``): unwinds so running peer subprocesses are killed too."""


def _on_sigterm(signum, frame):
    raise _Terminated("terminated by SIGTERM")


def _with_timeout(seconds: Optional[float], fn: Callable):
    """Run ``fn()``; raise _SuiteTimeout after ``seconds`` (main thread, POSIX only)."""
    if not seconds or not hasattr(signal, "SIGALRM"):
        return fn()

    def on_alarm(signum, frame):
        raise _SuiteTimeout(f"suite exceeded --suite-timeout {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def load_bench_module(path: Path, bench_dir: Path):
    """Import a suite module by file path, with ``bench_dir`` importable for its helpers."""
    spec = importlib.util.spec_from_file_location(f"effst_bench_suite_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    added = str(bench_dir) not in sys.path
    if added:
        sys.path.insert(0, str(bench_dir))
    try:
        spec.loader.exec_module(module)
    finally:
        if added:
            sys.path.remove(str(bench_dir))
    return module


def _run_external(suite: str, device: str, quick: bool, bench_dir: Path) -> list[dict]:
    filename, call = EXTERNAL_SUITES[suite]
    path = bench_dir / filename
    if not path.is_file():
        return [{"suite": suite, "status": "error",
                 "error": f"suite module {path} not found (run from a clone of effst, or pass --bench-dir)"}]
    module = load_bench_module(path, bench_dir)
    rows = call(module, device, quick)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        return [{"suite": suite, "status": "error",
                 "error": f"{filename}: run() returned {type(rows).__name__}, expected list[dict]"}]
    if not rows:
        return [{"suite": suite, "status": "error", "error": f"{filename}: run() returned no rows"}]
    out = []
    for row in rows:
        row = dict(row)
        row["suite"] = suite
        row.setdefault("status", "ok")
        if row["status"] not in ("ok", "error", "skipped"):
            row["status"] = "error" if row.get("error") else "ok"
        out.append(row)
    return out


def _command_line() -> str:
    """The command as typed: ``effst bench ...`` or ``python -m effst.benchmarks ...``."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    if argv0.name == "__main__.py" and argv0.parent.name == "benchmarks":
        head = [Path(sys.executable).name, "-m", "effst.benchmarks"]
    elif argv0.name == "cli.py" and argv0.parent.name == "effst":
        head = [Path(sys.executable).name, "-m", "effst.cli"]
    else:
        head = [argv0.name]
    return shlex.join(head + sys.argv[1:])


def _parse_ints(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise SystemExit(f"effst bench: {name}: expected comma-separated positive integers, got {text!r}")
    if not values or any(v < 1 for v in values):
        raise SystemExit(f"effst bench: {name}: expected positive integers, got {text!r}")
    return values


def _parse_suite_timeouts(text: Optional[str]) -> dict[str, float]:
    """``'90'`` -> every suite 90 s; ``'neuron=170,sparse=60'`` -> per suite (others unlimited)."""
    if not text:
        return {}
    try:
        if "=" not in text:
            value = float(text)
            if value <= 0:
                raise ValueError
            return {suite: value for suite in SUITES}
        out = {}
        for item in text.split(","):
            name, _, value = item.partition("=")
            name = name.strip()
            if name not in SUITES or float(value) <= 0:
                raise ValueError
            out[name] = float(value)
        return out
    except ValueError:
        raise SystemExit(f"effst bench: --suite-timeout: expected seconds > 0 or SUITE=SECONDS,... with SUITE "
                         f"in {', '.join(SUITES)}; got {text!r}")


def render(json_path: Path, log: Callable[[str], None] = print) -> int:
    """Rewrite bench.md and the plots next to an existing ``bench.json``."""
    from effst.benchmarks import report

    try:
        result = json.loads(json_path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"effst bench: --render: cannot read {json_path}: {exc}")
    if result.get("schema") != SCHEMA:
        raise SystemExit(f"effst bench: --render: {json_path} is not an {SCHEMA} results file")
    result["plots"] = []
    _write_tables_and_plots(result, json_path.parent, report, False, log)
    json_path.write_text(json.dumps(report.finite(result), indent=1))
    return 3 if any(r.get("status") == "error" for r in result["rows"]) else 0


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``effst bench``; returns the exit status (see the module docstring)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:
        return int(exc.code or 0) if exc.code in (0, None) else 2
    unknown = [s for s in args.suites if s not in (*SUITES, "all")]
    if unknown:
        print(f"effst bench: SUITE: expected some of {', '.join(SUITES)}, all; got {', '.join(unknown)}",
              file=sys.stderr)
        return 2
    args.suites = args.suites or ["all"]
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if args.render is not None:
            return render(args.render)
        return _main(args, args_list)
    except SystemExit as exc:  # argument errors found after parsing
        print(exc, file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _neuron_plan(args, device: str):
    """The neuron suite's plan: defaults for the device, then the command-line overrides."""
    from effst.benchmarks import neuron

    plan = neuron.default_plan(device, args.quick)
    if args.peers is not None:
        plan.peers = tuple(p.strip() for p in args.peers.split(",") if p.strip() and p.strip() != "none")
    for name in plan.peers:
        if name not in neuron.peers_mod.PEERS:
            raise SystemExit(f"effst bench: --peers: unknown peer {name!r}; expected some of "
                             f"{list(neuron.peers_mod.PEERS)} or 'none'")
    plan.effst = not args.skip_effst
    if args.Ts:
        plan.Ts = _parse_ints(args.Ts, "--T")
    if args.shape:
        plan.step_shape = _parse_ints(args.shape, "--shape")
    if args.dtypes:
        plan.dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
        for d in plan.dtypes:
            if d not in ("float32", "bfloat16", "float16", "float64"):
                raise SystemExit(f"effst bench: --dtypes: expected float32, bfloat16, float16 or float64, got {d!r}")
    if args.effst_backends:
        plan.effst_backends = tuple(b.strip() for b in args.effst_backends.split(",") if b.strip())
        for b in plan.effst_backends:
            if b not in ("auto", "reference", "triton", "native"):
                raise SystemExit(f"effst bench: --effst-backends: expected some of auto, reference, triton, "
                                 f"native; got {b!r}")
    if args.peer_timeout is not None:
        plan.peer_timeout = args.peer_timeout
    if args.repeat is not None:
        if args.repeat < 1:
            raise SystemExit(f"effst bench: --repeat: expected a positive integer, got {args.repeat}")
        plan.repeat = args.repeat
    return plan


def _main(args, args_list: list[str]) -> int:
    import torch

    import effst
    from effst.benchmarks import neuron, report, timing, train_step

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("effst bench: --device cuda: no CUDA device is visible to torch "
                         f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"effst bench: --threads: expected a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    plan = _neuron_plan(args, device)
    suites = _suites_for(args.suites, device)
    suite_timeouts = _parse_suite_timeouts(args.suite_timeout)
    now = _dt.datetime.now(_dt.timezone.utc)
    out = args.out or Path("results") / f"bench-{device}-{now.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "bench.json"
    wheels = args.wheels if args.wheels.is_dir() else None
    # peer runners are the harness's own scripts: from --bench-dir when it has them, else the clone's
    runner_dir = args.bench_dir / "peers"
    if not runner_dir.is_dir():
        runner_dir = REPO_ROOT / "bench" / "peers"
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    result = {
        "schema": SCHEMA,
        "created": now.isoformat(timespec="seconds"),
        "command": _command_line(),
        "argv": args_list,
        "cwd": os.getcwd(),
        "device": device,
        "quick": args.quick,
        "suites": suites,
        "threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "machine": timing.machine(device),
        "versions": {"effst": effst.__version__, **timing.versions()},
        "copy_bandwidth": None,
        "peers": {},
        "train_step_peers": {},
        "rows": [],
        "comparisons": [],
        "neuron": None,
        "suite_seconds": {},
        "plots": [],
        "errors": 0,
    }

    def save():
        result["errors"] = sum(1 for r in result["rows"] if r.get("status") == "error")
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

    def run_neuron(done: list[dict]) -> list[dict]:
        outcome = neuron.run(device, args.quick, copy_bandwidth=measure_copy, peers_dir=args.peers_dir,
                             wheels=wheels, runner_dir=runner_dir, plan=plan, log=log, rows=done)
        result["peers"] = outcome["peers"]
        result["comparisons"] = outcome["comparisons"]
        result["neuron"] = {k: outcome[k] for k in ("plan", "neuron_config", "bytes_formula")}
        return outcome["rows"]

    def run_external(suite: str, done: list[dict]) -> list[dict]:
        done.extend(_run_external(suite, device, args.quick, args.bench_dir))
        if suite == "train-step" and plan.peers:
            result["train_step_peers"] = train_step.add_peer_rows(
                done, device=device, peer_names=plan.peers, peers_dir=args.peers_dir, wheels=wheels,
                runner_dir=runner_dir, suite_path=args.bench_dir / EXTERNAL_SUITES[suite][0],
                timeout=plan.peer_timeout, threads=torch.get_num_threads(), quick=args.quick, log=log)
        return done

    for suite in suites:
        start = time.perf_counter()
        log(f"effst bench: --- suite {suite} ---")
        done: list[dict] = []  # the suite's rows so far: kept when it is stopped midway
        try:
            rows = _with_timeout(suite_timeouts.get(suite), lambda: run_neuron(done) if suite == "neuron"
                                 else run_external(suite, done))
        except (Exception, _SuiteTimeout, _Terminated) as exc:
            if suite == "neuron":
                neuron.derive(done, result["copy_bandwidth"]["bytes_per_s"])
            rows = list(done) + [{"suite": suite, "status": "error", "error": f"{type(exc).__name__}: {exc}",
                                  "traceback": traceback.format_exc()[-3000:]}]
            if isinstance(exc, _Terminated):  # keep what was measured, then stop
                result["rows"].extend(rows)
                save()
                log(f"effst bench: terminated during suite {suite}; partial results in {json_path}")
                return 1
        for row in rows:
            row.setdefault("suite", suite)
        result["rows"].extend(rows)
        result["suite_seconds"][suite] = round(time.perf_counter() - start, 2)
        save()

    _write_tables_and_plots(result, out, report, args.no_plots, log)
    save()
    errors = result["errors"]
    log(f"effst bench: wrote {json_path}" + (f"; {errors} error row(s), see the tables" if errors else ""))
    return 3 if errors else 0


def _write_tables_and_plots(result: dict, out: Path, report, no_plots: bool, log) -> None:
    title = (f"{result['machine'].get('gpu_name') or result['machine']['cpu_model']} "
             f"({result['device']}, {result['threads']} threads), {result['created'][:10]}, "
             f"torch {result['versions']['torch']}")
    versions = ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v)
    peer_versions = ", ".join(f"{info.get('label')} ({info.get('source') or info.get('status')})"
                              for info in result["peers"].values())
    md = [f"# effst bench — {title}", "", f"Command: `{result['command']}` ({result['created']})", "",
          f"Versions: {versions}" + (f"; peers: {peer_versions}" if peer_versions else ""), "",
          f"Copy bandwidth (measured, read+write): {result['copy_bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s; "
          f"machine load (1-min average at start): {result['machine'].get('load_average_1m')}", ""]
    for suite, rows in report.iter_suites(result):
        header, cells = report.suite_table(suite, rows)
        log(f"\n== {suite} ==\n" + report.format_text(header, cells))
        md += [f"## {suite}", "", report.format_markdown(header, cells), ""]
    if result["comparisons"]:
        header, cells = report.comparisons_table(result["comparisons"])
        log("\n== effst vs peers ==\n" + report.format_text(header, cells))
        md += ["## effst vs peers", "", report.format_markdown(header, cells), ""]
    if result["neuron"]:
        md += ["Bytes model: " + result["neuron"]["bytes_formula"], ""]
    for name, info in result["peers"].items():
        if info.get("status") != "ok":
            md += [f"Peer {name} ({info.get('label')}): ERROR {info.get('error')}", ""]
    (out / "bench.md").write_text("\n".join(md))
    if no_plots:
        return
    plotters = {"neuron": ("neuron_time_vs_T.png", report.plot_neuron),
                "sparse": ("sparse_vs_sparsity.png", report.plot_sparse),
                "train-step": ("train_step.png", report.plot_bars)}
    for suite, rows in report.iter_suites(result):
        if suite not in plotters:
            continue
        name, plot = plotters[suite]
        try:
            if plot(rows, out / name, f"{suite}: {title}"):
                result["plots"].append(name)
        except Exception as exc:  # a plot must not lose the measurements
            log(f"effst bench: plot {name} failed: {type(exc).__name__}: {exc}")
