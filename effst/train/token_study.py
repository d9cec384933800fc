"""``effst pipeline --study tokens``: token sparsification on the embedded digits, CPU-sized.

For each seed: pretrain a dense Spikformer (``spikformer-tiny`` widened to ``depth`` blocks, so
that there are blocks to select tokens in), then fine-tune from it, for every keep ratio, STS
(with the ratio loss and distillation from the dense model), STATA (anchor, alignment losses),
and their random controls; and SparseSpikformer's co-design: STS at rho = ``imp_ratio`` with
iterative magnitude pruning (25 % of the survivors per round, late rewinding to the weights
after the first fine-tuning step of round 0) until at least ``imp_sparsity`` of the prunable weights are gone.

The report (``report.md``, ``summary.json``) gives test accuracy as mean ± sd over seeds,
tokens per block, MACs (x T), SOPs and energy per sample, and for each ratio whether the
selector beat its random control: the paired per-seed differences with a 95 % Student-t
interval, "inconclusive" when the interval contains 0 (never a verdict from the sign of a mean).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

#: The fine-tuned variants compared at each keep ratio.
VARIANTS = ("sts", "sts-random", "stata", "stata-random")


@dataclass
class TokenStudyOptions:
    """What the token study runs (defaults fit the 10-minute CPU budget)."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    ratios: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.9])
    depth: int = 4
    dim: int = 32
    hidden: int = 64
    pretrain_epochs: int = 6
    finetune_epochs: int = 1
    imp_ratio: float = 0.7
    imp_sparsity: float = 0.9
    imp_steps: int = 8
    batch_size: int = 64
    lr: float = 5e-3
    finetune_lr: float = 2e-3
    weight_decay: float = 0.06
    workers: Optional[int] = None

    def validate(self) -> "TokenStudyOptions":
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds) \
                or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: expected distinct ints >= 0, got {self.seeds!r}")
        if not self.ratios or any(isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < 1
                                  for r in self.ratios):
            raise ValueError(f"ratios: expected keep ratios in (0, 1), got {self.ratios!r}")
        for name in ("depth", "dim", "hidden", "pretrain_epochs", "finetune_epochs", "imp_steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if self.depth < 2:
            raise ValueError(f"depth: expected >= 2 (STS selects tokens from block 1 on), got {self.depth}")
        for name in ("imp_ratio", "imp_sparsity"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"{name}: expected a number in (0, 1), got {value!r}")
        for name in ("lr", "finetune_lr", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 1):
            raise ValueError(f"workers: expected an int >= 1, got {self.workers!r}")
        return self

    @property
    def imp_rounds(self) -> int:
        """Rounds of 25 % needed to reach ``imp_sparsity``: the smallest k with 0.75^k <= 1 - sparsity."""
        from effst.prune.imp import survivors

        k, n = 0, 10 ** 9
        while 1 - survivors(n, k) / n < self.imp_sparsity - 1e-12:
            k += 1
        return k


# ----------------------------------------------------------------------------- one job
def _build(options: TokenStudyOptions, selector: Optional[str] = None, ratio: Optional[float] = None):
    from effst.models import build_model

    return build_model("spikformer-tiny", depth=options.depth, dim=options.dim, hidden=options.hidden,
                       token_selector=selector, keep_ratio=ratio if selector else None)


def _train(model, teacher, train_split, options: TokenStudyOptions, *, epochs: int, lr: float, seed: int,
           on_first_step=None, max_steps: Optional[int] = None) -> None:
    from effst.data import batches, num_batches
    from effst.train.loop import make_optimizer, warmup_cosine

    optimizer = make_optimizer(model, lr, options.weight_decay)
    selection = model.token_selection
    if teacher is not None and selection is not None and selection.selector == "sts":
        model.set_teacher(teacher)   # distillation arrives with the auxiliary losses
    steps = num_batches(len(train_split), options.batch_size) * epochs
    if max_steps is not None:
        steps = min(steps, max_steps)
    done = 0
    scheduler = warmup_cosine(optimizer, 0, steps, 0.01)
    model.train()
    for epoch in range(epochs):
        for x, y in batches(train_split, options.batch_size, seed=seed, epoch=epoch, train=True):
            if done == steps:
                return
            done += 1
            logits = model(x)
            loss = F.cross_entropy(logits, y) + sum(model.auxiliary_losses().values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if on_first_step is not None:
                on_first_step()
                on_first_step = None


def _measure(model, test_split, options: TokenStudyOptions) -> dict:
    from effst.models.flops import spikformer_macs
    from effst.train.metrics import evaluate, measure_activity

    accuracy = evaluate(model, test_split, batch_size=256)["accuracy"]
    activity = measure_activity(model, test_split, batch_size=256, max_batches=1)
    tokens = model.tokens_per_block()
    config = model.config
    selection = model.token_selection
    macs = spikformer_macs(config, selection)
    return {"accuracy": accuracy, "tokens_per_block": tokens, "macs": macs["total"], "selector_macs": macs["selector"],
            "sops": activity["sops"], "energy_uj": activity["energy_uj"]}


def _kept_by_part(model) -> dict[str, float]:
    """Kept fraction of the masked weights in the stem, the blocks, the head and the STS predictors
    (one global threshold need not spread the pruning evenly)."""
    from effst.prune import get_mask
    from effst.prune.imp import prunable_weights

    counts: dict[str, list[int]] = {}
    for name, module in prunable_weights(model):
        part = name.split(".")[0] if not name.startswith("selector") else "predictors"
        mask = get_mask(module)
        kept_total = counts.setdefault(part, [0, 0])
        kept_total[0] += int(mask.sum())
        kept_total[1] += mask.numel()
    return {part: kept / total for part, (kept, total) in counts.items()}


def run_job(job: dict, options: TokenStudyOptions, out: str) -> dict:
    """One study job (``dense``, a fine-tuned variant, or ``imp``); returns its measurements."""
    from effst.data import load_digits
    from effst.prune.imp import mask_counts, run_imp

    torch.set_num_threads(1)
    out_dir = Path(out)
    train_split, test_split, _ = load_digits()
    seed, kind = job["seed"], job["kind"]
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    dense_path = out_dir / f"dense-seed{seed}.pt"
    if kind == "dense":
        model = _build(options)
        _train(model, None, train_split, options, epochs=options.pretrain_epochs, lr=options.lr, seed=seed)
        torch.save(model.state_dict(), dense_path)
        result = _measure(model, test_split, options)
    else:
        teacher = _build(options)
        teacher.load_state_dict(torch.load(dense_path, weights_only=True))
        teacher.eval()
        selector = "sts" if kind == "imp" else kind
        ratio = options.imp_ratio if kind == "imp" else job["ratio"]
        model = _build(options, selector, ratio)
        missing, unexpected = model.load_state_dict(teacher.state_dict(), strict=False)
        if unexpected or any(not k.startswith("selector.") for k in missing):
            raise RuntimeError(f"dense weights do not fit the {selector} model: missing {missing}, unexpected {unexpected}")
        if kind == "imp":
            def train(m, round_index, mark):
                _train(m, teacher, train_split, options, epochs=1, lr=options.finetune_lr, max_steps=options.imp_steps,
                       seed=seed * 1000 + round_index, on_first_step=mark if round_index == 0 else None)

            imp_dir = out_dir / f"imp-seed{seed}"
            # The dense model was just (re)trained: rounds left by an earlier run belong to another
            # model and options, so they must not be resumed.
            shutil.rmtree(imp_dir, ignore_errors=True)
            run_imp(model, train, rounds=options.imp_rounds, directory=imp_dir)
            kept, total = mask_counts(model)
            result = _measure(model, test_split, options)
            result["weight_sparsity"] = 1 - kept / total
            result["kept_by_part"] = _kept_by_part(model)
        else:
            _train(model, teacher, train_split, options, epochs=options.finetune_epochs, lr=options.finetune_lr,
                   seed=seed)
            result = _measure(model, test_split, options)
    result.update(job)
    result["seconds"] = time.perf_counter() - t0
    return result


# ----------------------------------------------------------------------------- the study
def _key(job: dict) -> str:
    return job["kind"] if "ratio" not in job else f"{job['kind']}@{job['ratio']:g}"


def run_token_study(options: TokenStudyOptions, out: str | os.PathLike, *, log=print) -> dict:
    """Run the study into ``out`` and write ``summary.json`` and ``report.md``; returns the summary."""
    options.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    workers = options.workers or max(1, min(os.cpu_count() or 1, 4))
    t0 = time.perf_counter()
    results: list[dict] = []
    # A seed's fine-tuning jobs are queued as soon as its dense model exists, so no worker idles
    # while another seed is still pretraining.
    total = len(options.seeds) * (2 + len(VARIANTS) * len(options.ratios))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending = {pool.submit(run_job, {"seed": s, "kind": "dense"}, options, str(out)): s for s in options.seeds}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                seed = pending.pop(future)
                result = future.result()
                results.append(result)
                log(f"effst: token study [{len(results)}/{total}] seed {seed} {_key(result)}: accuracy "
                    f"{100 * result['accuracy']:.2f} % ({time.perf_counter() - t0:.0f} s)")
                if result["kind"] == "dense":
                    jobs = [{"seed": seed, "kind": v, "ratio": r} for r in options.ratios for v in VARIANTS]
                    for job in jobs + [{"seed": seed, "kind": "imp"}]:
                        pending[pool.submit(run_job, job, options, str(out))] = seed
    results.sort(key=lambda r: (options.seeds.index(r["seed"]), _key(r)))
    summary = summarize(options, results, time.perf_counter() - t0)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(markdown(summary))
    return summary


def summarize(options: TokenStudyOptions, results: list[dict], seconds: float) -> dict:
    """Group the per-seed results by method and compare each selector with its random control."""
    from effst.train.statistics import paired_comparison

    rows: dict[str, dict] = {}
    for r in results:
        row = rows.setdefault(_key(r), {"method": r["kind"], "ratio": r.get("ratio"), "per_seed": {}})
        row["per_seed"][r["seed"]] = r
    seeds = options.seeds

    def accuracies(key: str) -> list[Optional[float]]:
        per_seed = rows.get(key, {}).get("per_seed", {})
        return [per_seed[s]["accuracy"] if s in per_seed else None for s in seeds]

    comparisons = []
    for ratio in options.ratios:
        for selector in ("sts", "stata"):
            versus = paired_comparison(accuracies(f"{selector}@{ratio:g}"), accuracies(f"{selector}-random@{ratio:g}"))
            comparisons.append({"selector": selector, "ratio": ratio, "against": f"{selector}-random",
                                **versus.to_dict(), "text": versus.describe()})
            versus_dense = paired_comparison(accuracies(f"{selector}@{ratio:g}"), accuracies("dense"))
            comparisons.append({"selector": selector, "ratio": ratio, "against": "dense",
                                **versus_dense.to_dict(), "text": versus_dense.describe()})
    verdicts = [{"selector": selector, "text": selector_verdict(selector, comparisons)} for selector in ("sts", "stata")]
    return {"options": asdict(options), "imp_rounds": options.imp_rounds, "seconds": seconds,
            "rows": list(rows.values()), "comparisons": comparisons, "verdicts": verdicts}


SELECTOR_NAMES = {"sts": ("STS", "ρ"), "stata": ("STATA", "γ")}


def selector_verdict(selector: str, comparisons: list[dict]) -> str:
    """One sentence over every ratio: does ``selector`` beat its random control on this data?

    Read from the same paired intervals as the table (their verdicts), never from a mean's sign:
    'beats' where the interval lies above 0, 'worse' below 0, 'inconclusive' where it contains 0,
    and no verdict at all where fewer than 2 seeds gave an interval."""
    name, symbol = SELECTOR_NAMES[selector]
    mine = [c for c in comparisons if c["selector"] == selector and c["against"] == f"{selector}-random"]
    if not mine:
        return f"{name}: not run."
    level = f"{100 * mine[0]['confidence']:g} %"

    def at(cs: list[dict]) -> str:
        return f"{symbol} = " + ", ".join(f"{c['ratio']:g}" for c in cs)

    no_interval = [c for c in mine if c["ci_low"] is None]
    better = [c for c in mine if c["ci_low"] is not None and c["verdict"] == "yes"]
    worse = [c for c in mine if c["ci_low"] is not None and c["verdict"] == "no"]
    unclear = [c for c in mine if c["ci_low"] is not None and c["verdict"] == "inconclusive"]
    if len(no_interval) == len(mine):
        return f"{name}: no verdict on its random control (one seed gives no paired interval)."
    if better:
        head = f"{name} beats its random control at {at(better)} on this data (paired {level} interval above 0)"
    elif not worse and not no_interval:
        return (f"{name} does not beat its random control at any ratio on this data "
                f"(paired {level} intervals contain 0).")
    else:
        head = f"{name} does not beat its random control at any ratio on this data"
    rest = []
    if worse:
        rest.append(f"worse at {at(worse)} (paired {level} interval below 0)")
    if unclear:
        rest.append(f"inconclusive at {at(unclear)} (interval contains 0)")
    if no_interval:
        rest.append(f"no interval at {at(no_interval)} (fewer than 2 seeds)")
    if not rest:
        return head + "."
    return head + ("; " if better else ": ") + "; ".join(rest) + "."


def markdown(summary: dict) -> str:
    """The study's report."""
    from effst.train.report import machine_description, now_iso
    from effst.train.statistics import mean_spread

    o = summary["options"]
    lines = [f"# Token sparsification study (embedded digits, spikformer-tiny with {o['depth']} blocks, D={o['dim']})",
             "", f"{now_iso()}, {machine_description()}; {summary['seconds']:.0f} s wall, seeds {o['seeds']}.",
             f"Dense pretraining {o['pretrain_epochs']} epochs; every token variant fine-tuned {o['finetune_epochs']} "
             f"epoch(s) from it; IMP + STS (rho {o['imp_ratio']}) {summary['imp_rounds']} rounds of "
             f"{o['imp_steps']} steps, rewound to the weights after round 0's first step.", "",
             "| method | keep ratio | accuracy % (mean ± sd) | tokens per block | MACs (M, x T) | SOPs (M) | energy (uJ) |",
             "|---|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        runs = list(row["per_seed"].values())
        tokens = [sum(r["tokens_per_block"][i] for r in runs) / len(runs) for i in range(len(runs[0]["tokens_per_block"]))]
        extra = ""
        if row["method"] == "imp":
            extra = f" (weights {100 * sum(r['weight_sparsity'] for r in runs) / len(runs):.1f} % sparse)"
        lines.append(f"| {row['method']}{extra} | {'' if row['ratio'] is None else row['ratio']} | "
                     f"{mean_spread([r['accuracy'] for r in runs])} | {', '.join(f'{t:.1f}' for t in tokens)} | "
                     f"{sum(r['macs'] for r in runs) / len(runs) / 1e6:.2f} | "
                     f"{sum(r['sops'] for r in runs) / len(runs) / 1e6:.3f} | "
                     f"{sum(r['energy_uj'] for r in runs) / len(runs):.3f} |")
    imp_runs = [r for row in summary["rows"] if row["method"] == "imp" for r in row["per_seed"].values()]
    if imp_runs and "kept_by_part" in imp_runs[0]:
        parts = imp_runs[0]["kept_by_part"]
        lines += ["", "IMP keeps, of each part's weights (mean over seeds): " + ", ".join(
            f"{part} {100 * sum(r['kept_by_part'][part] for r in imp_runs) / len(imp_runs):.1f} %" for part in parts)
            + " (one global magnitude threshold: small-init matrices go first)."]
    lines += ["", "## Do the selectors beat their random controls?", ""]
    lines += [f"- {v['text']}" for v in summary.get("verdicts", [])]
    lines += ["", "Paired per-seed differences of test accuracy (selector − other), 95 % Student-t interval; "
              "'inconclusive' when it contains 0.", "",
              "| selector | keep ratio | against | difference | verdict |", "|---|---|---|---|---|"]
    for c in summary["comparisons"]:
        lines.append(f"| {c['selector']} | {c['ratio']} | {c['against']} | {c['text']} | {c['verdict']} |")
    lines += ["", "MACs count the model's convolutions, projections and attention products over T (STS "
              "predictor MACs apart, docs/token_sparsity.md); SOPs and energy (0.9 pJ/AC, 4.6 pJ/MAC) are "
              "measured on one test batch. No GPU step times here: those are in bench/RESULTS.md."]
    return "\n".join(lines) + "\n"


__all__ = ["TokenStudyOptions", "VARIANTS", "run_token_study", "run_job", "summarize", "markdown", "selector_verdict"]
