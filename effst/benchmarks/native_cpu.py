"""``native-cpu`` suite: effst's native C++ sLIF kernel on the CPU vs SpikingJelly 2.0.0 (issue 3).

Run through the harness (``effst bench native-cpu --device cpu [--quick]``, which calls
``run(device, quick)``), or directly from a clone:

    .venv/bin/python -m effst.benchmarks.native_cpu [--quick] [--write-results]

``--write-results`` rewrites the "## Native CPU sLIF (issue 3)" section of the clone's
bench/RESULTS.md with this run's table, machine, date, command and thread count.

What is timed (one call = reset the state, forward over T steps, ``torch.autograd.grad`` of
the spikes w.r.t. x and every learnable parameter; :func:`effst.benchmarks.timing.time_neuron`,
the harness's method), fp32, ATan (alpha 2), hard reset to 0, ``detach_reset=True``, tau 2:

* ``effst SLIF``  -- ``effst.nn.SLIF(channels=D, backend='native')``: tau and V_th learned per
  channel (the last dim). The issue's target row.
* ``effst PLIF``  -- ``effst.nn.PLIF(backend='native')``: the same model as the peer.
* ``SpikingJelly 2.0.0 PLIF`` -- ``neuron.ParametricLIFNode(step_mode='m')``, its CPU (torch)
  path, imported from this environment (bootstrap installs spikingjelly==2.0.0).
* ``effst SLIF (soft reset)`` and ``SpikingJelly 2.0.0 PLIF (soft reset)`` -- the same with
  ``v_reset=None`` (issue 9's soft-reset targets).

Shapes (the issue's): x = [4, 64, 64, 384] (T = 4 x 1,572,864 neurons, Spikformer CIFAR) and
[16, 16, 64, 256] (T = 16 x 262,144, Spikformer DVS); ``quick`` uses small ones for CI.
Each implementation is timed in ``rounds`` interleaved rounds, and the copy bandwidth is measured
again at the start of every round (so a change in background load hits all of them alike); a
row's ``ms`` is the median of its round medians, the bandwidth the median over all rounds so far.

Derived: ``gneuron_steps_per_s``; ``achieved_bytes_per_s`` = 20 B per neuron-step (fp32: x and
spikes forward, grad_spikes, x and grad_x backward; docs/benchmarks.md) / time, and
``copy_bandwidth_fraction`` = that / the copy bandwidth measured in the same run;
``speedup_vs_sj_plif`` (against SpikingJelly's PLIF with the same reset), ``soft_vs_hard``
(effst soft-reset SLIF / hard-reset SLIF, same run). Issue 9's targets on the soft-reset SLIF
row: ``soft_vs_hard`` <= 1.1 and >= 4x SpikingJelly. Targets (issue 3) on the SLIF rows of the full run (not ``quick``,
whose tiny shapes measure call overhead): >= 3x faster than SpikingJelly's PLIF at the same
shape and >= 40 % of the copy bandwidth.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import platform
import re
import shlex
import statistics
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from effst.benchmarks import timing

RESULTS_MD = Path(__file__).resolve().parents[2] / "bench" / "RESULTS.md"  # in a clone
SECTION = "## Native CPU sLIF (issue 3)"
SHAPES = ((4, (64, 64, 384)), (16, (16, 64, 256)))
QUICK_SHAPES = ((4, (2, 16, 384)), (16, (2, 8, 256)))
BYTES_PER_NEURON_STEP = 20  # fp32, see the module docstring
TARGET_SPEEDUP = 3.0
TARGET_BANDWIDTH_FRACTION = 0.40
NEURON = dict(tau=2.0, v_threshold=1.0, v_reset=0.0, detach_reset=True, decay_input=True)


def _effst_slif(channels: int, v_reset: Optional[float] = NEURON["v_reset"]):
    import effst.nn

    options = dict(NEURON, v_reset=v_reset)
    module = effst.nn.SLIF(surrogate="atan", channels=channels, channel_dim=-1, backend="native", **options)
    return module, module.reset


def _effst_slif_soft(channels: int):
    return _effst_slif(channels, v_reset=None)


def _effst_plif(channels: int):
    import effst.nn

    module = effst.nn.PLIF(surrogate="atan", backend="native", **NEURON)
    return module, module.reset


def _sj_plif(channels: int, v_reset: Optional[float] = NEURON["v_reset"]):
    from spikingjelly.activation_based import functional, neuron, surrogate

    module = neuron.ParametricLIFNode(init_tau=NEURON["tau"], v_threshold=NEURON["v_threshold"],
                                      v_reset=v_reset, detach_reset=True,
                                      decay_input=True, surrogate_function=surrogate.ATan(alpha=2.0),
                                      step_mode="m")
    return module, lambda: functional.reset_net(module)


def _sj_plif_soft(channels: int):
    return _sj_plif(channels, v_reset=None)


SOFT = " (soft reset)"  # suffix of the neuron name of the soft-reset rows (v_reset=None)
IMPLEMENTATIONS: tuple[tuple[str, str, str, Callable], ...] = (
    # (implementation, neuron, parameters, factory); hard reset to 0 unless the name says soft
    ("effst native", "SLIF", "tau and V_th learned per channel", _effst_slif),
    ("effst native", "PLIF", "tau learned per layer", _effst_plif),
    ("SpikingJelly 2.0.0 (torch, CPU)", "PLIF", "tau learned per layer", _sj_plif),
    ("effst native", "SLIF" + SOFT, "tau and V_th learned per channel", _effst_slif_soft),
    ("SpikingJelly 2.0.0 (torch, CPU)", "PLIF" + SOFT, "tau learned per layer", _sj_plif_soft),
)
TARGET_SOFT_VS_HARD = 1.1  # issue 9: soft reset within 1.1x of hard reset (effst SLIF)
TARGET_SOFT_SPEEDUP = 4.0  # issue 9: >= 4x SpikingJelly's PLIF with the same reset


def _sj_version() -> Optional[str]:
    try:
        from importlib import metadata

        return metadata.version("spikingjelly")
    except Exception:  # not installed
        return None


def run(device: str = "cpu", quick: bool = False, *, rows: Optional[list] = None,
        log: Callable[[str], None] = print) -> list[dict]:
    """Time every implementation at both shapes; one row per (implementation, shape)."""
    from effst.ops.slif_native import native_status

    ok, reason = native_status()
    shapes = QUICK_SHAPES if quick else SHAPES
    rounds, reps, warmup = (1, 3, 1) if quick else (5, 15, 3)
    copy_bytes = (16 if quick else 256) << 20
    copies = []  # copy bandwidth, measured again in every round (the machine's load drifts)
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    common = {"device": "cpu", "dtype": "float32", "surrogate": "atan", "detach_reset": True,
              "threads": torch.get_num_threads(), "date": date,
              "load_average_1m": round(os.getloadavg()[0], 2)}
    rows = [] if rows is None else rows  # filled as the cases are planned, so a stopped suite keeps them
    for T, step_shape in shapes:
        neurons = math.prod(step_shape)
        plan = []
        for implementation, neuron_name, parameters, factory in IMPLEMENTATIONS:
            row = dict(common, implementation=implementation, neuron=neuron_name,
                       parameters=parameters, T=T, step_shape=list(step_shape),
                       neurons_per_step=neurons, status="ok")
            if implementation.startswith("effst") and not ok:
                row.update(status="error", error=f"native extension unavailable: {reason}")
            elif implementation.startswith("SpikingJelly") and _sj_version() != "2.0.0":
                row.update(status="error", error=f"spikingjelly 2.0.0 not installed (found {_sj_version()})")
            rows.append(row)
            if row["status"] == "ok":
                try:
                    module, reset = factory(step_shape[-1])
                    plan.append((row, module, reset, []))
                except Exception as error:  # a peer that cannot be built is a row, not a crash
                    row.update(status="error", error=f"{type(error).__name__}: {error}")
        for _ in range(rounds):
            copies.append(timing.copy_bandwidth("cpu", copy_bytes, reps=5)["bytes_per_s"])
            for row, module, reset, medians in plan:
                if row["status"] != "ok":
                    continue
                try:
                    result = timing.time_neuron(module, reset, T=T, step_shape=step_shape,
                                                dtype=torch.float32, device="cpu", seed=0,
                                                warmup=warmup, reps=reps, max_seconds=None)
                except Exception as error:
                    row.update(status="error", error=f"{type(error).__name__}: {error}")
                    continue
                medians.append(result)
        for row, _, _, results in plan:
            if row["status"] != "ok" or not results:
                continue
            copy = statistics.median(copies)
            ms = statistics.median(r["ms"] for r in results)
            row.update(ms=ms, ms_min=min(r["ms_min"] for r in results), rounds=len(results),
                       reps_per_round=results[0]["reps"], firing_rate=results[0]["firing_rate"],
                       input_sets=results[0]["input_sets"])
            steps = T * neurons
            row["gneuron_steps_per_s"] = steps / (ms * 1e-3) / 1e9
            row["achieved_bytes_per_s"] = BYTES_PER_NEURON_STEP * steps / (ms * 1e-3)
            row["copy_bandwidth_bytes_per_s"] = copy
            row["copy_bandwidth_fraction"] = row["achieved_bytes_per_s"] / copy
        shape_rows = rows[-len(IMPLEMENTATIONS):]
        peers = {soft: next((r for r in shape_rows if r["implementation"].startswith("SpikingJelly")
                             and r["neuron"].endswith(SOFT) == soft and "ms" in r), None)
                 for soft in (False, True)}
        hard_slif = next((r for r in shape_rows if r["implementation"].startswith("effst")
                          and r["neuron"] == "SLIF" and "ms" in r), None)
        for row in shape_rows:
            soft = row["neuron"].endswith(SOFT)
            row["reset"] = "soft" if soft else "hard"
            peer = peers[soft]
            if "ms" in row and peer is not None and row is not peer:
                row["speedup_vs_sj_plif"] = peer["ms"] / row["ms"]
            if row["implementation"].startswith("effst") and row["neuron"] == "SLIF" + SOFT:
                if "ms" in row and hard_slif is not None:
                    row["soft_vs_hard"] = row["ms"] / hard_slif["ms"]
                if not quick:
                    row["target"] = (f"<= {TARGET_SOFT_VS_HARD:g}x the hard-reset SLIF and >= "
                                     f"{TARGET_SOFT_SPEEDUP:g}x SpikingJelly PLIF (soft reset)")
                    if "soft_vs_hard" in row and "speedup_vs_sj_plif" in row:
                        row["target_met"] = bool(row["soft_vs_hard"] <= TARGET_SOFT_VS_HARD and
                                                 row["speedup_vs_sj_plif"] >= TARGET_SOFT_SPEEDUP)
            if row["implementation"].startswith("effst") and row["neuron"] == "SLIF" and not quick:
                row["target"] = (f">= {TARGET_SPEEDUP:g}x SpikingJelly PLIF and >= "
                                 f"{TARGET_BANDWIDTH_FRACTION:.0%} of copy bandwidth")
                if "ms" in row and "speedup_vs_sj_plif" in row:
                    row["target_met"] = bool(row["speedup_vs_sj_plif"] >= TARGET_SPEEDUP and
                                             row["copy_bandwidth_fraction"] >= TARGET_BANDWIDTH_FRACTION)
    return rows


# ----------------------------------------------------------------------------- reporting
def format_table(rows: list[dict]) -> str:
    """Markdown table of the rows."""
    lines = ["| implementation | neuron | x shape | ms (median) | G neuron-steps/s | "
             "of copy bandwidth | vs SJ PLIF | target met |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = "[" + ", ".join(str(s) for s in [r["T"], *r["step_shape"]]) + "]"
        if r["status"] != "ok" or "ms" not in r:
            lines.append(f"| {r['implementation']} | {r['neuron']} | {shape} | error: "
                         f"{r.get('error', 'not timed')} | | | | |")
            continue
        speed = f"{r['speedup_vs_sj_plif']:.2f}x" if "speedup_vs_sj_plif" in r else "1x (peer)"
        if "soft_vs_hard" in r:
            speed += f" ({r['soft_vs_hard']:.2f}x hard SLIF)"
        met = {True: "yes", False: "**no**"}.get(r.get("target_met"), "")
        lines.append(f"| {r['implementation']} | {r['neuron']} | {shape} | {r['ms']:.2f} | "
                     f"{r['gneuron_steps_per_s']:.3f} | {r['copy_bandwidth_fraction']:.1%} | "
                     f"{speed} | {met} |")
    return "\n".join(lines)


def results_section(rows: list[dict], command: str) -> str:
    """The RESULTS.md section for this run."""
    from effst.ops.slif_native import native_build_info

    first = next((r for r in rows if "copy_bandwidth_bytes_per_s" in r), rows[0])
    try:
        build = native_build_info()
        build_text = f"native build {build['source_hash']}, CPU kernel `{build['cpu_isa']}`"
    except RuntimeError as error:
        build_text = f"native extension unavailable ({error})"
    copy_gbs = first.get("copy_bandwidth_bytes_per_s", float("nan")) / 1e9
    return "\n".join([
        SECTION,
        "",
        f"Measured {first['date']} on `{platform.node()}`: {timing.cpu_model()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} with {first['threads']} threads, {build_text}, "
        f"spikingjelly {_sj_version()}; 1-minute load average at the start "
        f"{first['load_average_1m']} (other work on the machine competes for cores and memory).",
        f"Command: `{command}`. Copy bandwidth measured in the same run: {copy_gbs:.1f} GB/s "
        "(`dst.copy_(src)`, 256 MiB fp32, read + write counted; median of one measurement per "
        "round).",
        "",
        "Forward + backward (reset, forward over T, `torch.autograd.grad` w.r.t. x and every "
        "learnable parameter), fp32, ATan, hard reset to 0, `detach_reset=True`. `ms` is the "
        f"median of {first.get('rounds', '?')} interleaved rounds of {first.get('reps_per_round', '?')} "
        "calls each (after warm-up). Bandwidth counts 20 B per neuron-step (docs/benchmarks.md).",
        "",
        format_table(rows),
        "",
        f"Targets (issue 3): effst SLIF (per-channel learnable tau and V_th) >= {TARGET_SPEEDUP:g}x "
        f"faster than SpikingJelly 2.0.0's PLIF at the same shape and >= "
        f"{TARGET_BANDWIDTH_FRACTION:.0%} of the copy bandwidth, both from this one run.",
        "",
    ])


def write_results(rows: list[dict], command: str, path: Path = RESULTS_MD) -> None:
    """Replace (or append) this suite's section of RESULTS.md, leaving the others untouched."""
    text = path.read_text() if path.is_file() else "# effst benchmark results\n"
    section = results_section(rows, command)
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    parser.add_argument("--write-results", action="store_true",
                        help=f"rewrite the '{SECTION[3:]}' section of {RESULTS_MD}")
    args = parser.parse_args(argv)
    rows = run("cpu", quick=args.quick)
    print(format_table(rows))
    if args.write_results:
        command = shlex.join([".venv/bin/python", "-m", "effst.benchmarks.native_cpu", *(argv if argv is not None else sys.argv[1:])])
        write_results(rows, command)
        print(f"wrote the '{SECTION[3:]}' section of {RESULTS_MD}")
    return 0 if all(r["status"] == "ok" for r in rows) else 3


if __name__ == "__main__":
    sys.exit(main())
