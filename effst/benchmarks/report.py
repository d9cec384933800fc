"""Presenting results: the printed table, the Markdown file and the PNG plots."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Optional

# Columns of the neuron table: (header, row key, format, divisor)
NEURON_COLUMNS = [
    ("library", "library", "{}", 1),
    ("neuron", "neuron", "{}", 1),
    ("kernel", "kernel", "{}", 1),
    ("dtype", "dtype", "{}", 1),
    ("T", "T", "{}", 1),
    ("N/step", "neurons_per_step", "{}", 1),
    ("eager ms", "ms", "{:.3f}", 1),
    ("kernel ms", "kernel_ms", "{:.3f}", 1),
    ("G n-steps/s", "gneuron_steps_per_s", "{:.3f}", 1),
    ("eager GB/s", "achieved_bytes_per_s", "{:.1f}", 1e9),
    ("eager of copy BW", "copy_bandwidth_fraction", "{:.1%}", 1),
    ("kernel of copy BW", "kernel_copy_bandwidth_fraction", "{:.1%}", 1),
    ("peak MiB", "peak_memory_bytes", "{:.0f}", 2**20),
]
NEURON_KEYS = ("library", "neuron", "kernel", "dtype", "T", "neurons_per_step")  # shown on error rows too
# Row keys never shown in a generic table (long text or bookkeeping)
HIDDEN = {"suite", "traceback", "stderr_tail", "note", "method", "id", "step_shape", "ms_q1", "ms_q3",
          "ms_min", "warmup", "first_call_ms", "input_sets", "parameters", "device", "peer",
          "backend_requested", "bytes_per_neuron_step", "neuron_steps", "error", "date", "machine",
          "command", "timing_method", "kernel_graph_error", "kernel_method", "kernel_requested",
          "kernel_achieved_bytes_per_s", "impl", "image_size", "overrides", "kernel_ms_min", "kernel_reps",
          "calls_per_round", "us_min", "numpy_int_compat_applied"}
HIDDEN_SUFFIXES = ("_q1", "_q3", "_reps", "_method", "_error")  # spread and bookkeeping: in the JSON


def _cell(value, fmt: str = "{}", divisor: float = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and fmt == "{}":
        return f"{value:.4g}"
    try:
        return fmt.format(value / divisor if divisor != 1 else value)
    except (ValueError, TypeError):
        return str(value)


def neuron_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the neuron table (error rows carry their message in the last column)."""
    header = [h for h, _, _, _ in NEURON_COLUMNS] + ["status"]
    cells = []
    for row in rows:
        ok = row.get("status") == "ok"
        line = [_cell(row.get(key), fmt, divisor) if ok or key in NEURON_KEYS else "-"
                for _, key, fmt, divisor in NEURON_COLUMNS]
        line.append("ok" if ok else f"{str(row.get('status')).upper()}: " + _short(row.get("error"), 160))
        cells.append(line)
    return header, cells


def generic_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header (union of row keys, first-seen order) and cells for a suite we do not know."""
    keys: list[str] = []
    for row in rows:
        for key in row:
            if key not in HIDDEN and not key.endswith(HIDDEN_SUFFIXES) and key not in keys and key != "status":
                keys.append(key)
    header = keys + ["status"]
    cells = []
    for row in rows:
        line = [_short(_cell(row.get(k)), 40) for k in keys]
        status = row.get("status", "ok")
        line.append(status if status != "error" else "ERROR: " + _short(row.get("error"), 160))
        cells.append(line)
    return header, cells


def _short(text, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_text(header: list[str], cells: list[list[str]]) -> str:
    """Fixed-width table for the terminal."""
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def format_markdown(header: list[str], cells: list[list[str]]) -> str:
    """GitHub Markdown table."""
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in line) + " |" for line in cells]
    return "\n".join(lines)


def suite_table(suite: str, rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    return neuron_table(rows) if suite == "neuron" else generic_table(rows)


def comparisons_table(comparisons: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["effst", "vs", "dtype", "T", "effst ms", "peer ms", "speedup / fraction", "effst kernel ms",
              "peer kernel ms", "kernel speedup", "target", "met"]
    cells = []
    for c in comparisons:
        value = c.get("speedup")
        if value is not None:
            shown, target_fmt = f"{value:.2f}x", "{:.1f}x"
        elif c.get("eager_over_kernel") is not None:
            shown, target_fmt = f"{c['eager_over_kernel']:.2f}x (eager/kernel)", "<= {:.1f}x"
        elif c.get("copy_bandwidth_fraction") is not None:
            shown, target_fmt = f"{c['copy_bandwidth_fraction']:.1%}", "{:.0%}"
        else:
            shown, target_fmt = "-", "{}"
        target = c.get("target")
        cells.append([c["effst"], c["peer"], c["dtype"], str(c["T"]), _cell(c.get("effst_ms"), "{:.3f}"),
                      _cell(c.get("peer_ms"), "{:.3f}"), shown, _cell(c.get("effst_kernel_ms"), "{:.3f}"),
                      _cell(c.get("peer_kernel_ms"), "{:.3f}"), _cell(c.get("kernel_speedup"), "{:.2f}x"),
                      "-" if target is None else target_fmt.format(target),
                      "-" if c.get("met") is None else ("yes" if c["met"] else "NO")])
    return header, cells


# ---------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_neuron(rows: list[dict], path: Path, title: str) -> Optional[Path]:
    """Time (ms, log) vs T, one panel per dtype, one line per implementation."""
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return None
    plt = _pyplot()
    dtypes = sorted({r["dtype"] for r in ok})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(5.5 * len(dtypes), 4.2), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        lines: dict[str, list] = {}
        for r in ok:
            if r["dtype"] == dtype:
                lines.setdefault(f"{r['library']} {r['neuron']} ({r['kernel']})", []).append((r["T"], r["ms"]))
        for label, points in sorted(lines.items()):
            points.sort()
            style = "-o" if label.startswith("effst") else "--s"
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=label, markersize=4)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (time steps)")
        ax.set_ylabel("forward+backward, ms (median)")
        ax.set_title(dtype)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


SPARSE_Y_KEYS = ("speedup_fwd_bwd", "speedup", "speedup_vs_dense", "tflops_ratio", "tflops")
SPARSE_GROUP_KEYS = ("impl", "library", "kernel", "pass", "mode", "direction", "input", "input_kind",
                     "dtype", "block", "block_size", "shape")


def plot_sparse(rows: list[dict], path: Path, title: str) -> Optional[Path]:
    """Throughput metric (speedup over dense, or TFLOP/s) vs sparsity, one line per configuration."""
    ok = [r for r in rows if r.get("status", "ok") == "ok" and _number(r.get("sparsity")) is not None]
    ykey = next((k for k in SPARSE_Y_KEYS if any(_number(r.get(k)) is not None for r in ok)), None)
    if not ok or ykey is None:
        return None
    plt = _pyplot()
    lines: dict[str, list] = {}
    for r in ok:
        y = _number(r.get(ykey))
        if y is None:
            continue
        label = ", ".join(f"{k}={r[k]}" for k in SPARSE_GROUP_KEYS if k in r)
        lines.setdefault(label, []).append((_number(r["sparsity"]), y))
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in sorted(lines.items())[:24]:  # more lines than this is unreadable
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], "-o", label=label, markersize=3)
    if ykey.startswith("speedup") or ykey == "tflops_ratio":
        ax.axhline(1.0, color="k", linewidth=0.8)
    ax.set_xlabel("sparsity")
    ax.set_ylabel(ykey)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bars(rows: list[dict], path: Path, title: str) -> Optional[Path]:
    """Median ms per row (e.g. a training step per implementation)."""
    ok = [r for r in rows if r.get("status", "ok") == "ok" and _number(r.get("ms")) is not None]
    if not ok:
        return None
    plt = _pyplot()
    keys = ("library", "op", "neuron", "kernel", "mode", "step", "token_selector", "keep_ratio", "model", "dtype",
            "batch")
    labels = [", ".join(str(r[k]) for k in keys if r.get(k) is not None) or str(i) for i, r in enumerate(ok)]
    fig, ax = plt.subplots(figsize=(11, 0.8 + 0.35 * len(ok)))
    ax.barh(range(len(ok)), [_number(r["ms"]) for r in ok])
    ax.set_yticks(range(len(ok)), labels, fontsize=7)
    ax.set_xlabel("ms (median)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def finite(obj):
    """JSON-safe copy: non-finite floats become None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return str(obj)


def iter_suites(report: dict) -> Iterable[tuple[str, list[dict]]]:
    order = []
    for row in report["rows"]:
        if row.get("suite") not in order:
            order.append(row.get("suite"))
    for suite in order:
        yield suite, [r for r in report["rows"] if r.get("suite") == suite]


# ---------------------------------------------------------------------------- writing the files

#: suite -> (PNG file, plotter); every suite's plot is one file (the device tool returns <= 8)
PLOTS = {"neuron": ("neuron_time_vs_T.png", plot_neuron),
         "overhead": ("overhead.png", plot_bars),
         "sparse": ("sparse_vs_sparsity.png", plot_sparse),
         "train-step": ("train_step.png", plot_bars)}


def write_tables_and_plots(result: dict, out: Path, no_plots: bool = False, log=print) -> None:
    """Print every suite's table, write ``bench.md`` and the plots next to ``bench.json``."""
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
    if result.get("suite_seconds"):
        md += ["Suite seconds: " + ", ".join(f"{k} {v}" for k, v in result["suite_seconds"].items()), ""]
    for suite, rows in iter_suites(result):
        header, cells = suite_table(suite, rows)
        log(f"\n== {suite} ==\n" + format_text(header, cells))
        md += [f"## {suite}", "", format_markdown(header, cells), ""]
        notes = sorted({str(r["note"]) for r in rows if r.get("note")})
        md += [f"Note: {n}" for n in notes] + ([""] if notes else [])
    if result["comparisons"]:
        header, cells = comparisons_table(result["comparisons"])
        log("\n== effst vs peers ==\n" + format_text(header, cells))
        md += ["## effst vs peers", "", format_markdown(header, cells), ""]
    if result["neuron"]:
        md += ["Bytes model: " + result["neuron"]["bytes_formula"], ""]
    for name, info in result["peers"].items():
        if info.get("status") != "ok":
            md += [f"Peer {name} ({info.get('label')}): ERROR {info.get('error')}", ""]
    (out / "bench.md").write_text("\n".join(md))
    if no_plots:
        return
    for suite, rows in iter_suites(result):
        if suite not in PLOTS:
            continue
        name, plot = PLOTS[suite]
        try:
            if plot(rows, out / name, f"{suite}: {title}") and name not in result["plots"]:
                result["plots"].append(name)
        except Exception as exc:  # a plot must not lose the measurements
            log(f"effst bench: plot {name} failed: {type(exc).__name__}: {exc}")
