"""The results file ``bench.json``: its schema name, fields, and the row statuses.

JSON fields (schema ``effst-bench/2``; every one is always present):
    schema, created (ISO time, UTC), command (the process command line), argv (the harness's
    arguments), cwd, device, quick, suites, threads (torch CPU threads), triton_interpret,
    machine {hostname, platform, cpu_model, cpu_count, torch_threads, device, load_average_1m, +
    gpu_name, gpu_capability, gpu_memory_bytes, gpu_l2_bytes, gpu_count, cuda_driver on CUDA or
    cpu_cache_bytes on the CPU}, versions {effst, python, torch, torch_cuda, triton, numpy,
    spikingjelly, cupy}, copy_bandwidth {bytes_per_s (the best of the samples: start of the run
    and after each neuron round), samples_bytes_per_s, buffer_bytes, ms, reps, method},
    peers {name: {label, requirement, status, location, source, error?, runs[]}} (neuron suite),
    train_step_peers {name: {label, status, location, source, seconds, spikingjelly_file,
    numpy_int_compat_applied}}, rows [per suite row: suite, status, error (unless ok), ...],
    comparisons [effst vs fastest peer: effst, peer, dtype, T, effst_ms, peer_ms, speedup,
    effst_kernel_ms, peer_kernel_ms, kernel_speedup, target, met], neuron {plan, neuron_config,
    bytes_formula}, suite_seconds {suite: s}, suite_budgets {suite: s}, plots [file names],
    errors (number of error rows).

Row status: ``ok``; ``error`` (counted, exit status 3); ``unavailable`` (the implementation is
not in the peer as installed, e.g. SpikingJelly 2.0.0's native CUDA operators, which its wheel
does not build: reported with the peer's message, not counted as an error); ``skipped``.

Neuron rows add: library, peer, neuron, parameters, kernel (the implementation that ran),
implementation, dtype, T, step_shape, neurons_per_step, ms (eager wall, median), ms_min, ms_q1,
ms_q3, reps, warmup, first_call_ms, input_sets, peak_memory_bytes (CUDA), firing_rate,
neuron_steps, gneuron_steps_per_s, bytes_per_neuron_step, achieved_bytes_per_s,
copy_bandwidth_fraction; on CUDA kernel_ms, kernel_ms_min, kernel_method (CUDA-graph replay or
profiler), kernel_graph_error (why a call could not be captured), kernel_profiler_ms (effst rows:
the profiler's figure as well, compared against peers only the profiler can time), kernel_achieved_bytes_per_s,
kernel_copy_bandwidth_fraction; note (e.g. the numpy.int shim of 0.0.0.0.14); with --repeat N > 1
also rounds, round_ms (ms = median of the rounds' medians).
Overhead rows: library, op, kernel, shape, threads, us (median per call), us_q1, us_q3,
calls_per_round, rounds, ratio_to_baseline, target, target_met, kernel_ms (CUDA).
Train-step rows: library, neuron, kernel, mode ('eager' | 'cuda-graph'), step ('train' |
'inference'), model, token_selector, keep_ratio, tokens, batch, T, dtype, ms, images_per_s,
kernel_ms (CUDA), peak_memory_bytes, speedup_vs_<peer>, slif_over_lif, speedup_vs_dense,
target_speedup, target_met, group ('token-selection' for the token rows, compared only with
their own dense rows of the same model, step and mode).
"""
from __future__ import annotations

SCHEMA = "effst-bench/2"
STATUSES = ("ok", "error", "unavailable", "skipped")


def new_result(**facts) -> dict:
    """A results dict with every documented top-level field (``facts`` fill the known ones)."""
    result = {
        "schema": SCHEMA, "created": None, "command": None, "argv": [], "cwd": None, "device": None,
        "quick": False, "suites": [], "threads": None, "triton_interpret": False, "machine": {},
        "versions": {}, "copy_bandwidth": None, "peers": {}, "train_step_peers": {}, "rows": [],
        "comparisons": [], "neuron": None, "suite_seconds": {}, "suite_budgets": {}, "plots": [],
        "errors": 0,
    }
    unknown = set(facts) - set(result)
    if unknown:
        raise KeyError(f"new_result: unknown fields {sorted(unknown)}")
    result.update(facts)
    return result


def normalise_row(row: dict, suite: str) -> dict:
    """A suite's row with ``suite`` and a known ``status`` (an unknown status is an error row)."""
    row = dict(row)
    row["suite"] = suite
    row.setdefault("status", "ok")
    if row["status"] not in STATUSES:
        row["error"] = f"unknown row status {row['status']!r} (expected one of {STATUSES}); {row.get('error') or ''}"
        row["status"] = "error"
    return row


def count_errors(rows: list[dict]) -> int:
    return sum(1 for r in rows if r.get("status") == "error")
