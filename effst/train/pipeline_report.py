"""The pipeline's report: tables over seeds, conclusions in words, and the accuracy plot.

Every "X beat Y" conclusion is a paired comparison (:mod:`effst.train.statistics`): per seed,
X − Y on the same seed and the same pruned model, then a Student-t interval over seeds; the
answer is "inconclusive" when the interval contains 0 or there is a single seed. A baseline at
chance level has learned nothing to compare, so its conclusions are withheld. The control
"baseline fine-tuned for the same extra epochs" separates recovery from pruning from the effect
of training longer.
"""
from __future__ import annotations

import os
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from effst.train.report import command_line, json_safe, machine_description, now_iso, ratio_text, require
from effst.train.statistics import at_chance, mean_spread, paired_comparison

CONTROLS = ("random", "dsp-random")  # random-pruning controls, fine-tuned with sLIF only
BASELINE_FINETUNED = "baseline-finetuned"  # the unpruned baseline, fine-tuned like the pruned models (LIF)
VERDICT_WORDS = {"yes": "Yes", "no": "No", "inconclusive": "Inconclusive"}


def stage_name(method: str, sparsity: float) -> str:
    """Folder and key name of a pruned variant, e.g. ``l1p-p0.9``."""
    return f"{method}-p{sparsity:g}"


# ----------------------------------------------------------------------------- tables
def aggregate(options, jobs: list, results: dict, errors: dict, wall: float, workers: int) -> dict:
    """Rows per (method, sparsity) with one value per seed, activity, times, conclusions."""
    seeds = options.seeds

    def acc(key: str) -> Optional[float]:
        return results[key]["accuracy"] if key in results else None

    def first(keys: list[str], field_name: str):
        for k in keys:
            if k in results:
                return results[k].get(field_name)
        return None

    base_keys = [f"s{s}/baseline" for s in seeds]
    base_params = first(base_keys, "parameters") or {}
    none = [None] * len(seeds)
    rows = [{"method": "baseline", "sparsity": 0.0, "params_blocks": base_params.get("blocks"),
             "params_total": base_params.get("total"), "compression_blocks": 1.0, "compression_total": 1.0,
             "acc_pruned": [acc(k) for k in base_keys], "acc_lif": [acc(f"s{s}/{BASELINE_FINETUNED}/lif") for s in seeds],
             "acc_slif": list(none)}]
    variants = list(dict.fromkeys((j.args["method"], j.args["sparsity"]) for j in jobs if j.kind == "prune"))
    for method, p in variants:
        name = stage_name(method, p)
        keys = {stage: [f"s{s}/{name}/{stage}" for s in seeds] for stage in ("pruned", "lif", "slif")}
        params = first(keys["pruned"], "parameters") or {}
        comp = first(keys["pruned"], "compression") or {}
        rows.append({"method": method, "sparsity": p, "params_blocks": params.get("blocks_nonzero"),
                     "params_total": params.get("total_nonzero"), "compression_blocks": comp.get("blocks"),
                     "compression_total": comp.get("total"),
                     "acc_pruned": [acc(k) for k in keys["pruned"]], "acc_lif": [acc(k) for k in keys["lif"]],
                     "acc_slif": [acc(k) for k in keys["slif"]]})
    activity = {}
    for label, keys in [("baseline (LIF)", base_keys)] + [
            (f"{m} p={p:g} {n}", [f"s{s}/{stage_name(m, p)}/{n}" for s in seeds])
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
        "model": first(base_keys, "model") or train_settings.model or "the dataset's default",
        "T": first(base_keys, "T"),
        "num_classes": first(base_keys, "num_classes"),
        "test_samples": first(base_keys, "test_samples"),
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
    summary["conclusions"] = conclusions(rows, options, summary["num_classes"], summary["test_samples"],
                                         finetune_settings.epochs)
    return json_safe(summary)


def _load_average() -> Optional[list[float]]:
    """1/5/15-minute load averages at the end (other work on the machine slows the wall time)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# ----------------------------------------------------------------------------- conclusions
def _row(rows: list[dict], method: str, p: float) -> Optional[dict]:
    return next((r for r in rows if r["method"] == method and abs(r["sparsity"] - p) < 1e-9), None)


def _verdict(label: str, comparison, detail: str = "") -> str:
    word = VERDICT_WORDS[comparison.verdict]
    return f"{label}: **{word}** — {comparison.describe()}{detail}."


def conclusions(rows: list[dict], options, num_classes: Optional[int], test_samples: Optional[int],
                finetune_epochs: int) -> dict:
    """Verdicts from paired differences over seeds, with their intervals (points of accuracy)."""
    statements: list[str] = []
    facts: dict[str, Any] = {}
    base = rows[0]
    base_values = [v for v in base["acc_pruned"] if v is not None]
    if base_values and num_classes and test_samples and at_chance(statistics.fmean(base_values), num_classes, test_samples):
        statements.append(
            f"The baseline is at chance level ({mean_spread(base['acc_pruned'])} % with {num_classes} classes on "
            f"{test_samples} test samples): it has learned nothing, so no comparison is drawn. Train longer "
            f"(--pretrain-epochs) or check the data.")
        facts["baseline_at_chance"] = True
        return {"statements": statements, "facts": facts}
    facts["baseline_at_chance"] = False

    # 1. sLIF vs LIF fine-tuning: per seed, the mean over settings of (sLIF − LIF) on the same pruned model.
    pairs = [r for r in rows[1:] if r["method"] in ("l1p", "dsp")]
    per_setting = [(r, paired_comparison(r["acc_slif"], r["acc_lif"])) for r in pairs]
    per_setting = [(r, c) for r, c in per_setting if c.n]
    if per_setting:
        n_seeds = len(options.seeds)
        per_seed = []
        for i in range(n_seeds):
            d = [r["acc_slif"][i] - r["acc_lif"][i] for r, _ in per_setting
                 if r["acc_slif"][i] is not None and r["acc_lif"][i] is not None]
            per_seed.append(statistics.fmean(d) if d else None)
        overall = paired_comparison(per_seed, [0.0 if d is not None else None for d in per_seed])
        detail = "; ".join(f"{r['method']} p={r['sparsity']:g} {c.describe()}" for r, c in per_setting)
        statements.append(_verdict("sLIF recovered more than LIF", overall,
                                   f" (sLIF minus LIF fine-tuning, mean over {len(per_setting)} settings per seed; "
                                   f"per setting: {detail})"))
        facts["slif_minus_lif"] = {**overall.to_dict(), "per_setting": [
            {"method": r["method"], "sparsity": r["sparsity"], **c.to_dict()} for r, c in per_setting]}

    # 2. L1P vs random (element), DSP vs random dimensions, after sLIF fine-tuning, at the random sparsity.
    if options.random_sparsity is not None:
        p = options.random_sparsity
        for ours, control, label in (("l1p", "random", "L1P beat random (element) pruning"),
                                     ("dsp", "dsp-random", "DSP beat random-dimension pruning")):
            a, b = _row(rows, ours, p), _row(rows, control, p)
            if a is None or b is None:
                continue
            after = paired_comparison(a["acc_slif"], b["acc_slif"])
            before = paired_comparison(a["acc_pruned"], b["acc_pruned"])
            if not after.n and not before.n:
                continue
            deciding = after if after.n else before
            statements.append(_verdict(
                f"{label} at p={p:g}", deciding,
                f" after sLIF fine-tuning ({mean_spread(a['acc_slif'])} vs {mean_spread(b['acc_slif'])} %); "
                f"without fine-tuning {before.describe()}"))
            facts[f"{ours}_minus_{control}"] = {"sparsity": p, "finetuned": after.to_dict(), "pruned": before.to_dict()}

    # 3. Element vs block L1P, both fine-tuned with sLIF.
    for b in (r for r in rows if r["method"] == "block-l1p"):
        e = _row(rows, "l1p", b["sparsity"])
        if e is None:
            continue
        c = paired_comparison(e["acc_slif"], b["acc_slif"])
        if c.n:
            statements.append(_verdict(
                f"Element L1P more accurate than block L1P ({options.block_size[0]}×{options.block_size[1]} tiles "
                f"requested) at p={b['sparsity']:g}", c,
                f" (both fine-tuned with sLIF; {_count(e['params_blocks'])} vs {_count(b['params_blocks'])} block weights "
                "kept — block L1P removes whole tiles, so on small matrices it can remove more than p; a matrix "
                "with too few tiles of the requested size for p is pruned with halved tiles, down to 16×16, "
                "as the run's warnings name)"))
            facts.setdefault("element_minus_block", []).append({"sparsity": b["sparsity"], **c.to_dict()})

    # 4. The control: how much does the same extra training do for the unpruned baseline?
    control = paired_comparison(base["acc_lif"], base["acc_pruned"])
    if control.n:
        statements.append(
            f"Control — the baseline fine-tuned for the same {finetune_epochs} extra epochs (LIF) changes its accuracy "
            f"by {control.describe()}; compare pruned models with this row, not only with the baseline.")
        facts["baseline_finetuned_minus_baseline"] = control.to_dict()
    n = len(options.seeds)
    statements.append(
        f"Baseline (unpruned, LIF): {mean_spread(base['acc_pruned'])} %. "
        + ("With one seed there is no spread, so every comparison above is inconclusive; run more --seeds."
           if n == 1 else f"Intervals are 95 % Student-t intervals over {n} seeds of paired differences; "
                          "'Inconclusive' means the interval contains 0."))
    return {"statements": statements, "facts": facts}


def _count(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:,.0f}"


# ----------------------------------------------------------------------------- Markdown
def pipeline_markdown(p: dict) -> str:
    """The pipeline report: what was run, the conclusions, the accuracy and size tables."""
    c = p["conclusions"]
    n = len(p["seeds"])
    spread = "mean ± std over seeds" if n > 1 else "one seed, so no spread"
    steps = f" (T={p['T']})" if p.get("T") else ""
    lines = [
        "# effst pipeline report",
        "",
        f"- Date: {p['date']}",
        f"- Machine: {p['machine']}",
        f"- Command: `{p['command']}`",
        f"- Data: {p['data']}; model {p['model']}{steps}; seeds {p['seeds']}; "
        f"sparsities {p['sparsities']}",
        f"- Wall time: {p['wall_time_s']:.0f} s with {p['workers']} worker process(es); the stages used "
        f"{p.get('stage_cpu_seconds', 0):.0f} CPU-seconds in {p.get('stage_seconds', 0):.0f} stage-seconds "
        f"(load average at the end: {p.get('load_average')})",
        f"- Pretraining {p['settings']['train']['epochs']} epochs (lr {p['settings']['train']['lr']}), "
        f"fine-tuning {p['settings']['finetune']['epochs']} epochs (lr {p['settings']['finetune']['lr']}), AdamW + cosine.",
        "",
        "## Conclusions (paired over seeds)",
        "",
    ]
    lines += [f"- {text}" for text in c["statements"]]
    if p.get("errors"):
        lines += ["", "## Failed stages", ""] + [f"- `{k}`: {v}" for k, v in p["errors"].items()]
    lines += ["", f"## Accuracy (%, {spread})", "",
              "Parameters are non-zero counts of the first seed's model: the whole model, and the transformer "
              "blocks' prunable matrices (the paper's \"Param of the ST blocks\").", "",
              "| method | p | params whole model | params blocks | compression (whole / blocks) | pruned, no fine-tuning "
              "| fine-tuned LIF | fine-tuned sLIF | sLIF − LIF (paired) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = p["rows"][0]
    lines.append(f"| baseline | 0 | {_count(base['params_total'])} | {_count(base['params_blocks'])} | 1.00× / 1.00× | "
                 f"{mean_spread(base['acc_pruned'])} | — | — | — |")
    if any(v is not None for v in base["acc_lif"]):
        lines.append(f"| baseline fine-tuned the same extra epochs (control) | 0 | {_count(base['params_total'])} | "
                     f"{_count(base['params_blocks'])} | 1.00× / 1.00× | — | {mean_spread(base['acc_lif'])} | — | — |")
    for r in p["rows"][1:]:
        gain = paired_comparison(r["acc_slif"], r["acc_lif"])
        lines.append(
            f"| {r['method']} | {r['sparsity']:g} | {_count(r['params_total'])} | {_count(r['params_blocks'])} | "
            f"{ratio_text(r['compression_total'])} / {ratio_text(r['compression_blocks'])} | "
            f"{mean_spread(r['acc_pruned'])} | {mean_spread(r['acc_lif'])} | {mean_spread(r['acc_slif'])} | "
            f"{gain.describe() if gain.n else '—'} |")
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


# ----------------------------------------------------------------------------- plot
def plot_pipeline(path: Path, p: dict) -> None:
    """Accuracy vs sparsity, one panel per method, on one shared y-axis."""
    require("matplotlib", "the report plots").use("Agg")
    import matplotlib.pyplot as plt

    rows = p["rows"]
    base_values = [v for v in rows[0]["acc_pruned"] if v is not None]
    tuned_values = [v for v in rows[0]["acc_lif"] if v is not None]
    methods = [m for m in dict.fromkeys(r["method"] for r in rows[1:]) if m not in CONTROLS]
    panels = max(len(methods), 1)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False, sharey=True)

    def errorbar(ax, xs, values_per_x, **style):
        present = [[v for v in values if v is not None] for values in values_per_x]
        keep = [(x, v) for x, v in zip(xs, present) if v]
        if not keep:
            return
        means = [100 * statistics.fmean(v) for _, v in keep]
        errors = [100 * statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in keep]
        ax.errorbar([x for x, _ in keep], means, yerr=errors if any(errors) else None, capsize=3, **style)

    for ax, method in zip(axes[0], methods):
        sel = sorted((r for r in rows[1:] if r["method"] == method), key=lambda r: r["sparsity"])
        xs = [r["sparsity"] for r in sel]
        for key, label, fmt, colour in (("acc_pruned", "pruned, no FT", "s:", "C0"), ("acc_lif", "FT LIF", "o--", "C1"),
                                        ("acc_slif", "FT sLIF", "^-", "C2")):
            errorbar(ax, xs, [r[key] for r in sel], fmt=fmt, color=colour, label=label)
        for r in rows[1:]:
            if r["method"] in CONTROLS and ((method == "dsp") == (r["method"] == "dsp-random")):
                errorbar(ax, [r["sparsity"]], [r["acc_slif"]], fmt="kx", label=f"{r['method']} + sLIF")
        if base_values:
            ax.axhline(100 * statistics.fmean(base_values), color="grey", lw=1, label="baseline")
        if tuned_values:
            ax.axhline(100 * statistics.fmean(tuned_values), color="grey", lw=1, ls="--",
                       label="baseline + same fine-tuning")
        ax.set_title(method)
        ax.set_xlabel("sparsity p")
        if ax.get_legend_handles_labels()[0]:  # no curve when every stage of the panel failed
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel("test accuracy (%)")
    n = len(p["seeds"])
    spread = f"{n} seeds (mean ± std)" if n > 1 else "1 seed (no spread)"
    steps = f", T={p['T']}" if p.get("T") else ""
    fig.suptitle(f"{p['data']}, {p['model']}{steps}, {spread}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
