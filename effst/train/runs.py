"""The stages of the paper's method, each a function the CLI and the pipeline share.

``pretrain`` (``effst train``) → ``prune`` → ``finetune`` (optionally converting LIF to sLIF) →
``evaluate_checkpoint`` (``effst eval``). Each stage reads/writes an effst checkpoint and leaves
``report.{md,json,png}`` in its output directory. Checkpoints carry, in ``metrics``, the accuracy
after each earlier stage and the parameter counts of the unpruned model, so every report can
state the compression ratio and the accuracy history.
"""
from __future__ import annotations

import copy
import math
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from effst.data import DatasetInfo, load_dataset
from effst.train import distributed as dist_utils
from effst.train.checkpoint import (
    apply_step, load_checkpoint, make_checkpoint, model_from_checkpoint, save_atomic,
)
from effst.train.config import Settings
from effst.train.loop import CHECKPOINT_NAME, fit
from effst.train.metrics import evaluate, measure_activity, parameter_counts
from effst.train.report import command_line, machine_description, now_iso, write_run_report

PRUNE_METHODS = ("l1p", "block-l1p", "dsp", "random", "random-block", "dsp-random")


def configure_threads(settings: Settings) -> None:
    """Use ``settings.threads`` CPU threads, else the cores divided among local processes."""
    import os

    threads = settings.threads or max(1, (os.cpu_count() or 1) // dist_utils.local_world_size())
    torch.set_num_threads(threads)


def load_data(settings: Settings):
    return load_dataset(settings.data, settings.data_dir, frames=settings.frames, synthetic=settings.synthetic)


def build_step(settings: Settings, info: DatasetInfo) -> dict:
    """The recipe's first step: which ``build_model`` call makes this model for this data."""
    from effst.models import CONFIGS

    name = settings.model or info.model
    if name not in CONFIGS:
        raise ValueError(f"model: expected one of {sorted(CONFIGS)}, got {name!r}")
    overrides = dict(settings.model_overrides or {})
    config = CONFIGS[name]
    for key, value in (("in_channels", info.in_channels), ("image_size", info.image_size)):
        if getattr(config, key, value) != value and key not in overrides:
            overrides[key] = value
    return {"op": "build", "name": name, "neuron": settings.neuron, "num_classes": info.num_classes,
            "T": settings.T, "backend": settings.backend, "overrides": overrides}


def _load(checkpoint: str | Path | dict) -> dict:
    return checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)


def default_block_size() -> tuple[int, int]:
    """The block-pruning tile every caller shares (defined once, in effst.prune)."""
    from effst.prune import DEFAULT_BLOCK_SIZE

    return tuple(DEFAULT_BLOCK_SIZE)


def _check_model_name(ckpt: dict, settings: Settings, given: set[str]) -> None:
    """``--model`` given for a checkpoint of another model is an error, not silently ignored."""
    stored = ckpt["recipe"][0].get("name")
    if "model" in given and settings.model is not None and settings.model != stored:
        raise ValueError(f"model: the checkpoint {ckpt.get('source', '')} holds {stored!r}, not {settings.model!r}; "
                         "drop --model (a checkpoint rebuilds its own model)")


def checkpoint_dataset(checkpoint: str | Path | dict) -> Optional[str]:
    """The dataset a checkpoint was trained on (so its per-dataset defaults apply)."""
    return (_load(checkpoint).get("settings") or {}).get("data")


def _data_settings_from(ckpt: dict, settings: Settings, given: set[str]) -> Settings:
    """Take data and model-input settings of a checkpoint unless given on the command line."""
    _check_model_name(ckpt, settings, given)
    saved = ckpt.get("settings") or {}
    keep = {k: saved[k] for k in ("data", "data_dir", "frames", "synthetic") if k in saved and k not in given}
    return replace(settings, **keep).validate()


def summarize(stage: str, model: torch.nn.Module, recipe: list[dict], settings: Settings, test_split, device,
              test: dict, metrics: dict, history: Optional[list] = None, out: Optional[Path] = None) -> dict:
    """Measure activity and size, assemble the run summary, and write the report (when ``out``)."""
    model = model.to(device)
    activity = measure_activity(model, test_split, batch_size=settings.eval_batch_size, device=device,
                                amp=settings.amp, max_batches=settings.measure_batches, workers=settings.workers)
    params = parameter_counts(model)
    reference = metrics.get("reference_params") or params
    compression = {  # infinite (None in JSON) when nothing is kept
        "total": reference["total"] / params["total_nonzero"] if params["total_nonzero"] else math.inf,
        "blocks": reference["blocks"] / params["blocks_nonzero"] if params["blocks_nonzero"] else math.inf,
    }
    times = [r["epoch_time_s"] for r in (history or [])]
    summary = {
        "stage": stage,
        "date": now_iso(),
        "machine": machine_description(device),
        "command": command_line(),
        "data": settings.data,
        "recipe": recipe,
        "T": getattr(model, "T", None),  # the model's actual time steps (the recipe may leave T to its config)
        "settings": settings.to_dict(),
        "test": test,
        "accuracy": test["accuracy"],
        "accuracy_by_stage": metrics.get("stages", {}),
        "parameters": params,
        "reference_parameters": reference,
        "compression": compression,
        "activity": activity,
        "history": history or [],
        "epoch_time_median_s": statistics.median(times) if times else None,
    }
    if out is not None:
        write_run_report(Path(out), summary)
    return summary


def pretrain(settings: Settings, out: str | Path, *, resume: bool = False,
             env: Optional[dist_utils.DistEnv] = None) -> dict:
    """Train a model from scratch (``effst train``); returns the run summary."""
    from effst.models import build_model

    env = env or dist_utils.setup(settings.device)
    train_split, test_split, info = load_data(settings)
    step = build_step(settings, info)
    torch.manual_seed(settings.seed)
    model = build_model(step["name"], neuron=step["neuron"], num_classes=step["num_classes"], T=step["T"],
                        backend=step["backend"], **step["overrides"])
    recipe = [step]
    reference = parameter_counts(model)
    metrics = {"reference_params": reference, "stages": {}}
    result = fit(model, recipe, train_split, test_split, settings, out, env=env, resume=resume, stage="train",
                 metrics=metrics)
    metrics["stages"] = {"trained": result.test["accuracy"]}
    return _finish("train", model, recipe, settings, test_split, env, result.test, metrics, result.history, out)


def _finish(stage, model, recipe, settings, test_split, env, test, metrics, history, out) -> dict:
    """Write the final checkpoint metrics and the report (main rank only)."""
    out = Path(out)
    summary = {}
    if env.is_main:
        ckpt_path = out / CHECKPOINT_NAME
        ckpt = load_checkpoint(ckpt_path)
        ckpt.pop("source", None)
        ckpt["metrics"] = {**ckpt.get("metrics", {}), **metrics, "test": test}
        save_atomic(ckpt, ckpt_path)
        summary = summarize(stage, model, recipe, settings, test_split, env.device, test, metrics, history, out)
    dist_utils.barrier(env)
    return summary


def prune_step(method: str, sparsity: float, *, block_size: Optional[tuple[int, int]] = None, seed: int = 0) -> dict:
    """Recipe step for a pruning method (validated)."""
    if method not in PRUNE_METHODS:
        raise ValueError(f"method: expected one of {list(PRUNE_METHODS)}, got {method!r}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity: expected a number in [0, 1), got {sparsity!r}")
    step: dict = {"op": "prune", "method": method, "sparsity": float(sparsity)}
    if method == "block-l1p" or method == "random-block":
        if block_size is None or len(block_size) != 2 or any(int(b) < 1 for b in block_size):
            raise ValueError(f"block_size: expected two positive ints (rows, cols), got {block_size!r}")
        step["block_size"] = [int(b) for b in block_size]
    if method == "random-block":
        step.update(method="random", structure="block")
    elif method == "random":
        step["structure"] = "element"
    if method in ("random", "random-block", "dsp-random"):
        step["seed"] = int(seed)
    if method in ("l1p", "block-l1p", "random", "random-block"):
        step["targets"] = None  # the caller fills in effst.models.prune_targets(model)
    return step


def prune(checkpoint: str | Path | dict, method: str, sparsity: float, out: str | Path, settings: Settings, *,
          given: frozenset = frozenset(), block_size: Optional[tuple[int, int]] = None, seed: int = 0) -> dict:
    """Prune a trained checkpoint (``effst prune``): accuracy without fine-tuning, new checkpoint."""
    env = dist_utils.DistEnv(0, 1, 0, dist_utils.resolve_device(settings.device))
    ckpt = _load(checkpoint)
    settings = _data_settings_from(ckpt, settings, set(given))
    _, test_split, _ = load_data(settings)
    model = model_from_checkpoint(ckpt)
    step = prune_step(method, sparsity, block_size=block_size, seed=seed)
    if "targets" in step:
        from effst.models import prune_targets

        step["targets"] = list(prune_targets(model))
    model = apply_step(model, step).to(env.device)
    recipe = list(ckpt["recipe"]) + [step]
    test = evaluate(model, test_split, batch_size=settings.eval_batch_size, device=env.device, amp=settings.amp,
                    workers=settings.workers)
    metrics = copy.deepcopy(ckpt.get("metrics", {}))
    metrics.setdefault("stages", {})[f"pruned ({method} p={sparsity}), no fine-tuning"] = test["accuracy"]
    metrics.setdefault("reference_params", parameter_counts(model_from_checkpoint(ckpt)))
    out = Path(out)
    save_atomic(make_checkpoint(model, recipe, progress={"epoch": 0, "step": 0, "finished": True, "stage": "prune"},
                                settings=settings.to_dict(), metrics={**metrics, "test": test}), out / CHECKPOINT_NAME)
    return summarize("prune", model, recipe, settings, test_split, env.device, test, metrics, None, out)


def finetune(checkpoint: str | Path | dict, settings: Settings, out: str | Path, *, given: frozenset = frozenset(),
             resume: bool = False, channels: bool = True, env: Optional[dist_utils.DistEnv] = None) -> dict:
    """Fine-tune a (pruned) checkpoint (``effst finetune``); ``settings.neuron`` 'slif'/'plif'
    first converts every LIF neuron, carrying tau, V_th, reset and surrogate over."""
    env = env or dist_utils.setup(settings.device)
    ckpt = _load(checkpoint)
    settings = _data_settings_from(ckpt, settings, set(given))
    train_split, test_split, _ = load_data(settings)
    model = model_from_checkpoint(ckpt, backend=settings.backend)
    recipe = list(ckpt["recipe"])
    current = _current_neuron(recipe)
    if settings.neuron != current:
        if settings.neuron not in ("slif", "plif", "lif"):
            raise ValueError(f"neuron: fine-tuning converts to 'slif', 'plif' or 'lif', got {settings.neuron!r}")
        step = {"op": "convert", "neuron": settings.neuron, "channels": bool(channels)}
        model = apply_step(model, step)
        recipe.append(step)
    metrics = copy.deepcopy(ckpt.get("metrics", {}))
    metrics.setdefault("stages", {})
    metrics.setdefault("reference_params", parameter_counts(model))
    result = fit(model, recipe, train_split, test_split, settings, out, env=env, resume=resume, stage="finetune",
                 metrics=metrics)
    metrics["stages"][f"fine-tuned ({settings.neuron})"] = result.test["accuracy"]
    return _finish("finetune", model, recipe, settings, test_split, env, result.test, metrics, result.history, out)


def _current_neuron(recipe: list[dict]) -> str:
    neuron = recipe[0]["neuron"]
    for step in recipe[1:]:
        if step["op"] == "convert":
            neuron = step["neuron"]
    return neuron


def evaluate_checkpoint(checkpoint: str | Path | dict, settings: Settings, *, given: frozenset = frozenset(),
                        out: Optional[str | Path] = None) -> dict:
    """Accuracy, size, firing rates and energy of a checkpoint (``effst eval``)."""
    device = dist_utils.resolve_device(settings.device)
    ckpt = _load(checkpoint)
    settings = _data_settings_from(ckpt, settings, set(given))
    _, test_split, _ = load_data(settings)
    model = model_from_checkpoint(ckpt, backend=settings.backend if "backend" in given else None).to(device)
    test = evaluate(model, test_split, batch_size=settings.eval_batch_size, device=device, amp=settings.amp,
                    workers=settings.workers)
    metrics = copy.deepcopy(ckpt.get("metrics", {}))
    metrics.setdefault("stages", {})["evaluated"] = test["accuracy"]
    history = (ckpt.get("progress") or {}).get("history")
    return summarize("eval", model, ckpt["recipe"], settings, test_split, device, test, metrics, history, out)
