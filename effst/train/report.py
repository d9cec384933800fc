"""Reports: Markdown + JSON + PNG for one run (train/prune/finetune/eval) and for a pipeline."""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

import torch


def machine_description(device: Optional[torch.device | str] = None) -> str:
    """Machine, as every written figure must name it."""
    cpu = platform.processor() or platform.machine()
    text = f"{platform.node()} ({platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, {cpu}); torch {torch.__version__}"
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        text += f"; GPU {torch.cuda.get_device_name(torch.device(device))}"
    return text


def now_iso() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def command_line() -> str:
    return " ".join(["effst" if i == 0 and a.endswith(("effst", "cli.py")) else a for i, a in enumerate(sys.argv)])


def json_safe(obj: Any) -> Any:
    """Make ``obj`` JSON-serialisable (tensors to lists, NaN to None, paths to str)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return json_safe(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=2))
    tmp.replace(path)


def _pct(x: Optional[float]) -> str:
    return "—" if x is None else f"{100 * x:.2f} %"


def _num(x: Optional[float], digits: int = 3) -> str:
    if x is None:
        return "—"
    if abs(x) >= 1e4:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


# ----------------------------------------------------------------------------- one run
def write_run_report(out: Path, summary: dict) -> dict:
    """Write ``report.json``, ``report.md`` and ``report.png`` for one run into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", summary)
    (out / "report.md").write_text(run_markdown(summary))
    plot_run(out / "report.png", summary)
    return summary


def run_markdown(s: dict) -> str:
    params, act = s.get("parameters", {}), s.get("activity", {})
    lines = [
        f"# effst {s['stage']} report",
        "",
        f"- Date: {s.get('date')}",
        f"- Machine: {s.get('machine')}",
        f"- Command: `{s.get('command')}`",
        f"- Model: {describe_recipe(s.get('recipe', []))}",
        f"- Data: {s.get('data')} (test set {s.get('test', {}).get('samples', '—')} samples)",
        "",
        "## Accuracy",
        "",
    ]
    for label, value in s.get("accuracy_by_stage", {}).items():
        lines.append(f"- {label}: {_pct(value)}")
    lines += ["", "## Size", "",
              "| | stored | non-zero |", "|---|---:|---:|",
              f"| whole model | {params.get('total', 0):,} | {params.get('total_nonzero', 0):,} |",
              f"| transformer blocks | {params.get('blocks', 0):,} | {params.get('blocks_nonzero', 0):,} |", ""]
    comp = s.get("compression")
    if comp:
        lines.append(f"Compression ratio (baseline ÷ non-zero): whole model {comp['total']:.2f}×, blocks {comp['blocks']:.2f}×.")
        lines.append("")
    if act:
        lines += ["## Activity and energy (per test sample)", "",
                  f"- Mean firing rate: {act.get('mean_firing_rate', 0):.4f}",
                  f"- Synaptic operations (AC): {act.get('sops', 0):,.0f}; MACs (non-spiking inputs): {act.get('macs', 0):,.0f}",
                  f"- Theoretical energy: {act.get('energy_uj', 0):.4f} µJ (E_AC 0.9 pJ, E_MAC 4.6 pJ)", "",
                  "| layer | firing rate |", "|---|---:|"]
        for name, rate in act.get("firing_rate", {}).items():
            lines.append(f"| {name} | {rate:.4f} |")
        lines.append("")
    hist = s.get("history") or []
    if hist:
        lines += ["## Training", "", "| epoch | lr | train loss | train acc | test acc | time (s) |", "|---:|---:|---:|---:|---:|---:|"]
        for r in hist:
            lines.append(f"| {r['epoch']} | {r['lr']:.3g} | {r['train_loss']:.4f} | {_pct(r['train_accuracy'])} | "
                         f"{_pct(r.get('test_accuracy'))} | {r['epoch_time_s']:.2f} |")
        lines += ["", f"Median time per epoch: {s.get('epoch_time_median_s', 0):.2f} s.", ""]
    return "\n".join(lines)


def describe_recipe(recipe: list[dict]) -> str:
    parts = []
    for step in recipe:
        if step["op"] == "build":
            parts.append(f"{step['name']} ({step['neuron']}, T={step.get('T') or 'default'})")
        elif step["op"] == "prune":
            extra = f", block {tuple(step['block_size'])}" if step.get("block_size") else ""
            parts.append(f"{step['method']} p={step['sparsity']}{extra}")
        elif step["op"] == "convert":
            parts.append(f"→ {step['neuron']}{' per channel' if step.get('channels', True) else ''}")
    return " · ".join(parts)


def plot_run(path: Path, s: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = s.get("history") or []
    rates = (s.get("activity") or {}).get("firing_rate", {})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    if hist:
        epochs = [r["epoch"] for r in hist]
        ax.plot(epochs, [r["train_accuracy"] for r in hist], label="train accuracy")
        test = [(r["epoch"], r["test_accuracy"]) for r in hist if r.get("test_accuracy") is not None]
        if test:
            ax.plot(*zip(*test), marker="o", label="test accuracy")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy")
        ax.legend()
    else:
        ax.text(0.5, 0.5, f"no training in this stage\naccuracy {_pct(s.get('test', {}).get('accuracy'))}",
                ha="center", va="center")
    ax.set_title(f"{s['stage']}: {describe_recipe(s.get('recipe', []))}", fontsize=8)
    ax = axes[1]
    if rates:
        names = list(rates)
        ax.barh(range(len(names)), [rates[n] for n in names])
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("firing rate")
    ax.set_title("firing rate per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- pipeline
def mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _int(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:,.0f}"


def _ms(values: list[float]) -> str:
    m, sd = mean_std(values)
    if m is None:
        return "—"
    return f"{100 * m:.2f} ± {100 * sd:.2f}"


def pipeline_markdown(p: dict) -> str:
    """The pipeline report: what was run, the accuracy table, the plain conclusions."""
    c = p["conclusions"]
    lines = [
        "# effst pipeline report",
        "",
        f"- Date: {p['date']}",
        f"- Machine: {p['machine']}",
        f"- Command: `{p['command']}`",
        f"- Data: {p['data']}; model {p['model']}; seeds {p['seeds']}; sparsities {p['sparsities']}",
        f"- Wall time: {p['wall_time_s']:.0f} s with {p['workers']} worker process(es); the stages used "
        f"{p.get('stage_cpu_seconds', 0):.0f} CPU-seconds in {p.get('stage_seconds', 0):.0f} stage-seconds "
        f"(load average at the end: {p.get('load_average')})",
        f"- Pretraining {p['settings']['train']['epochs']} epochs (lr {p['settings']['train']['lr']}), "
        f"fine-tuning {p['settings']['finetune']['epochs']} epochs (lr {p['settings']['finetune']['lr']}), AdamW + cosine.",
        "",
        "## Conclusions (on this data, mean over seeds)",
        "",
    ]
    lines += [f"- {text}" for text in c["statements"]]
    if p.get("errors"):
        lines += ["", "## Failed stages", ""] + [f"- `{k}`: {v}" for k, v in p["errors"].items()]
    lines += ["", "## Accuracy (%, mean ± std over seeds)", "",
              "| method | p | params blocks (non-zero) | compression (blocks) | pruned, no fine-tuning | fine-tuned LIF | fine-tuned sLIF | sLIF − LIF |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = p["rows"][0]
    lines.append(f"| baseline | 0 | {_int(base['params_blocks'])} | 1.00× | {_ms(base['acc_pruned'])} | — | — | — |")
    for r in p["rows"][1:]:
        gain = [s - l for s, l in zip(r["acc_slif"], r["acc_lif"]) if s is not None and l is not None]
        lines.append(
            f"| {r['method']} | {r['sparsity']} | {_int(r['params_blocks'])} | "
            f"{'—' if r['compression_blocks'] is None else format(r['compression_blocks'], '.2f') + '×'} | "
            f"{_ms(r['acc_pruned'])} | {_ms(r['acc_lif'])} | {_ms(r['acc_slif'])} | "
            f"{'—' if not gain else f'{100 * statistics.fmean(gain):+.2f}'} |")
    lines += ["", "## Activity and energy (per test sample, mean over seeds)", "",
              "| model | mean firing rate | SOPs | energy (µJ) |", "|---|---:|---:|---:|"]
    for label, a in p["activity"].items():
        lines.append(f"| {label} | {a['mean_firing_rate']:.4f} | {a['sops']:,.0f} | {a['energy_uj']:.4f} |")
    lines += ["", "Firing rate per layer of every model is in each stage's `report.md` / `report.json` "
              "(`seed<S>/<stage>/`).", "",
              "## Time per epoch (median over runs)", ""]
    for label, t in p["epoch_time_s"].items():
        lines.append(f"- {label}: {t:.2f} s")
    lines += ["", "![accuracy vs sparsity](pipeline.png)", ""]
    return "\n".join(lines)


def plot_pipeline(path: Path, p: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = p["rows"]
    base_mean, base_std = mean_std(rows[0]["acc_pruned"])
    controls = ("random", "dsp-random")
    methods = [m for m in dict.fromkeys(r["method"] for r in rows[1:]) if m not in controls]
    fig, axes = plt.subplots(1, max(len(methods), 1), figsize=(5.5 * max(len(methods), 1), 4), squeeze=False)
    for ax, method in zip(axes[0], methods):
        sel = sorted((r for r in rows[1:] if r["method"] == method), key=lambda r: r["sparsity"])
        xs = [r["sparsity"] for r in sel]
        for key, label, style, colour in (("acc_pruned", "pruned, no FT", "s:", "C0"), ("acc_lif", "FT LIF", "o--", "C1"),
                                          ("acc_slif", "FT sLIF", "^-", "C2")):
            ms = [mean_std(r[key]) for r in sel]
            if all(m is None for m, _ in ms):
                continue
            ax.errorbar(xs, [100 * (m or 0) for m, _ in ms], yerr=[100 * (sd or 0) for _, sd in ms], fmt=style,
                        color=colour, capsize=3, label=label)
        for r in rows[1:]:
            if r["method"] in controls and ((method == "dsp") == (r["method"] == "dsp-random")):
                m, sd = mean_std(r["acc_slif"])
                if m is not None:
                    ax.errorbar([r["sparsity"]], [100 * m], yerr=[100 * sd], fmt="kx", capsize=3, label=f"{r['method']} + sLIF")
        if base_mean is not None:
            ax.axhline(100 * base_mean, color="grey", lw=1, label="baseline")
        ax.set_title(method)
        ax.set_xlabel("sparsity p")
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=7)
    fig.suptitle(f"{p['data']}, {p['model']}, {len(p['seeds'])} seeds (mean ± std)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
