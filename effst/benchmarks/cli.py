"""Command line of ``effst bench`` / ``python -m effst.benchmarks``: arguments, their checks, exit status.

Exit status: 0 every row ok; 3 finished, but some rows are errors (all reported); 2 bad
arguments; 1 the harness itself failed or was terminated.
"""
from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path
from typing import Optional

from effst.benchmarks import harness
from effst.benchmarks.harness import REPO_ROOT, SUITES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="effst bench",
        description="Time effst's kernels beside SpikingJelly's; print a table, write JSON and plots.")
    parser.add_argument("suites", nargs="*", metavar="SUITE",
                        help=f"one or more of {', '.join(SUITES)}, all (default: all; native-cpu is part of all "
                             "on the CPU only)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="where to run (default: cuda when available, else cpu)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions (CI)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: results/bench-<device>-<date>)")
    parser.add_argument("--peers", default=None,
                        help="comma-separated SpikingJelly peers for the neuron suite: sj2, sj014, "
                             "or 'none' (default: sj014,sj2)")
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
                        help="the clone's bench/ folder with the peer runners (bench/peers/)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--T", dest="Ts", default=None, help="neuron suite: comma-separated T values")
    parser.add_argument("--shape", default=None,
                        help="neuron suite: per-step shape, e.g. 64x65536 (channels = last dim)")
    parser.add_argument("--dtypes", default=None,
                        help="neuron suite: comma-separated dtypes (float32,bfloat16,float16)")
    parser.add_argument("--suite-timeout", default=None,
                        help="seconds after which a suite is stopped (its finished rows are kept, plus one "
                             "error row): one number for every suite, or per suite, e.g. neuron=170,sparse=60")
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


def command_line() -> str:
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


def parse_suite_timeouts(text: Optional[str]) -> dict[str, float]:
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
        previous = signal.signal(signal.SIGTERM, harness.on_sigterm)
    try:
        if args.render is not None:
            return harness.render(args.render)
        return harness.run(args, args_list, command_line())
    except SystemExit as exc:  # argument errors found after parsing
        print(exc, file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def neuron_plan(args, device: str):
    """The neuron suite's plan: defaults for the device, then the command-line overrides."""
    from effst.benchmarks import neuron
    from effst.benchmarks import peers as peers_mod

    plan = neuron.default_plan(device, args.quick)
    if args.peers is not None:
        plan.peers = tuple(p.strip() for p in args.peers.split(",") if p.strip() and p.strip() != "none")
    for name in plan.peers:
        if name not in peers_mod.PEERS:
            raise SystemExit(f"effst bench: --peers: unknown peer {name!r}; expected some of "
                             f"{list(peers_mod.PEERS)} or 'none'")
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
