"""Reports of one run (train/prune/finetune/eval): Markdown + JSON + PNG, and the facts every
written figure must carry (machine, command, date). The pipeline's report is
:mod:`effst.train.pipeline_report`."""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from effst.data.optional import require


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
def _matplotlib_pyplot():
    require("matplotlib", "the report plots").use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
        f"- Model: {describe_recipe(s.get('recipe', []), s.get('T'))}",
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
        lines.append(f"Compression ratio (baseline ÷ non-zero): whole model {ratio_text(comp.get('total'))}, "
                     f"blocks {ratio_text(comp.get('blocks'))}.")
        lines.append("")
    tokens = s.get("token_selection")
    if tokens:
        lines += [f"Token selection: {tokens['selector']}, keep ratio {tokens['keep_ratio']:g}; image tokens per "
                  f"block (last test batch): {', '.join(f'{t:.1f}' for t in tokens['tokens_per_block'])}.", ""]
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


def ratio_text(ratio: Optional[float]) -> str:
    """A compression ratio; infinite (None once in JSON) means nothing was kept."""
    if ratio is None or ratio == math.inf:
        return "∞ (nothing kept)"
    return f"{ratio:.2f}×"


def describe_recipe(recipe: list[dict], T: Optional[int] = None) -> str:
    """The model in one line; ``T`` is the model's actual number of time steps (the recipe may
    leave it to the model config)."""
    parts = []
    for step in recipe:
        if step["op"] == "build":
            steps = step.get("T") or T
            parts.append(f"{step['name']} ({step['neuron']}{f', T={steps}' if steps else ''})")
            selector = (step.get("overrides") or {}).get("token_selector")
            if selector is not None:
                from effst.models.token_selection import DEFAULT_KEEP_RATIO

                ratio = step["overrides"].get("keep_ratio")
                parts.append(f"tokens {selector} keep {DEFAULT_KEEP_RATIO[selector] if ratio is None else ratio:g}")
        elif step["op"] == "prune":
            extra = f", block {tuple(step['block_size'])}" if step.get("block_size") else ""
            parts.append(f"{step['method']} p={step['sparsity']}{extra}")
        elif step["op"] == "convert":
            parts.append(f"→ {step['neuron']}{' per channel' if step.get('channels', True) else ''}")
    return " · ".join(parts)


def plot_run(path: Path, s: dict) -> None:
    plt = _matplotlib_pyplot()
    from matplotlib.ticker import MaxNLocator

    hist = s.get("history") or []
    rates = (s.get("activity") or {}).get("firing_rate", {})
    # Only the panels there is data for: a stage without training has no curve to draw.
    fig, axes = plt.subplots(1, 2 if hist else 1, figsize=(11 if hist else 6, 4), squeeze=False)
    axes = list(axes[0])
    title = f"{s['stage']}: {describe_recipe(s.get('recipe', []), s.get('T'))}"
    if hist:
        ax = axes.pop(0)
        epochs = [r["epoch"] for r in hist]
        ax.plot(epochs, [r["train_accuracy"] for r in hist], label="train accuracy")
        test = [(r["epoch"], r["test_accuracy"]) for r in hist if r.get("test_accuracy") is not None]
        if test:
            ax.plot(*zip(*test), marker="o", label="test accuracy")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy")
        ax.legend()
        ax.set_title(title, fontsize=8)
    else:
        title += f"\ntest accuracy {_pct(s.get('test', {}).get('accuracy'))}, no training in this stage; firing rate per layer"
    ax = axes[0]
    if not hist:
        ax.set_title(title, fontsize=8)
    if rates:
        names = list(rates)
        ax.barh(range(len(names)), [rates[n] for n in names])
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("firing rate")
    else:
        ax.text(0.5, 0.5, "no spiking layers recorded", ha="center", va="center")
    if hist:
        ax.set_title("firing rate per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
