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
    apply_step, load_checkpoint, make_checkpoint, model_from_checkpoint, model_with_new_parameters, save_atomic,
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


# build_model arguments of token selection (docs/token_sparsity.md); any other model override is
# the architecture itself, which a checkpoint rebuilds as it was.
TOKEN_KEYS = ("token_selector", "keep_ratio", "token_options")
TOKEN_FLAGS = {"token_selector": "--token-selector", "keep_ratio": "--keep-ratio"}  # effst train/finetune/eval


def token_selection_of(overrides: Optional[dict]):
    """The TokenSelection that ``model_overrides`` asks for (None: dense); bad values raise a
    ValueError naming the key, before any work."""
    from effst.models.token_selection import DEFAULT_KEEP_RATIO, TokenSelection

    overrides = overrides or {}
    selector = overrides.get("token_selector")
    if selector is None:
        extra = [k for k in TOKEN_KEYS[1:] if overrides.get(k) is not None]
        if extra:
            named = [f"{k} ({TOKEN_FLAGS[k]})" if k in TOKEN_FLAGS else k for k in extra]
            raise ValueError(f"{', '.join(named)}: only meaningful with a token_selector (--token-selector, or "
                             "model_overrides: {token_selector: ...}) or a checkpoint that has one")
        return None
    options = overrides.get("token_options") or {}
    if not isinstance(options, dict):
        raise ValueError(f"token_options: expected a mapping of TokenSelection fields, got {type(options).__name__}")
    if selector not in DEFAULT_KEEP_RATIO:
        raise ValueError(f"token_selector: expected one of {list(DEFAULT_KEEP_RATIO)}, got {selector!r}")
    ratio = overrides.get("keep_ratio")
    return TokenSelection.from_dict({**options, "selector": selector,
                                     "keep_ratio": DEFAULT_KEEP_RATIO[selector] if ratio is None else ratio})


def _build_with_overrides(ckpt: dict, settings: Settings, command: str) -> tuple[dict, list[str]]:
    """The checkpoint's build step with ``settings.model_overrides`` applied, and the keys changed.

    A checkpoint rebuilds its own architecture, so an override that differs from it is an error
    naming the key, except what ``command`` can change: ``finetune`` adds a token selector to a
    dense checkpoint (or changes the ratio / options of the one it has), ``eval`` evaluates at
    another ``keep_ratio`` (kept-token counts are computed at inference time)."""
    from effst.models import CONFIGS

    step = copy.deepcopy(ckpt["recipe"][0])
    stored = step.setdefault("overrides", {})
    wanted = dict(settings.model_overrides or {})
    stored_selection = token_selection_of(stored)
    token_selection_of({**stored, **wanted})  # the combination is valid
    config = CONFIGS.get(step["name"])
    source = ckpt.get("source") or "(in memory)"

    def current(key):
        if key in stored:
            return stored[key]
        if key == "keep_ratio" and stored_selection is not None:
            return stored_selection.keep_ratio
        return getattr(config, key, None)

    def named(key):  # the flag too, where the command has one (train/finetune/eval: TOKEN_FLAGS)
        flag = TOKEN_FLAGS.get(key) if command in ("finetune", "eval") else None
        return f"model_overrides: {key}" + (f" ({flag})" if flag else "")

    changed = sorted(k for k, v in wanted.items() if v != current(k))
    for key in changed:
        if stored_selection is None and key in TOKEN_KEYS and command == "eval":
            raise ValueError(f"{named(key)} {wanted[key]!r}: the checkpoint {source} is dense, so eval has "
                             f"no trained selector to use; fine-tune it first (effst finetune {source} "
                             "--token-selector ...) and evaluate that checkpoint")
        if key == "token_selector" and stored_selection is not None:
            raise ValueError(f"{named(key)} {wanted[key]!r}: the checkpoint {source} already selects "
                             f"tokens with {stored_selection.selector!r}; fine-tune its dense checkpoint instead")
        allowed = {"finetune": TOKEN_KEYS, "eval": ("keep_ratio",)}.get(command, ())
        if key not in allowed:
            can = f"only {', '.join(allowed)} can change" if allowed else "nothing can change"
            raise ValueError(f"{named(key)} is {current(key)!r} in the checkpoint {source}, {wanted[key]!r} "
                             f"here; {command} rebuilds the checkpoint's model ({can}): drop it or make it match")
        stored[key] = wanted[key]
    return step, changed


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
    selection = getattr(model, "token_selection", None)
    if selection is not None:  # measure_activity's last forward ran in eval mode: the inference counts
        summary["token_selection"] = {**selection.to_dict(), "tokens_per_block": model.tokens_per_block()}
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
    _build_with_overrides(ckpt, settings, "prune")  # model_overrides that differ are refused, not ignored
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
    build, changed = _build_with_overrides(ckpt, settings, "finetune")
    train_split, test_split, _ = load_data(settings)
    recipe = [build] + list(ckpt["recipe"][1:])
    model, new = model_with_new_parameters(ckpt, recipe, new_prefix="selector.", backend=settings.backend,
                                           seed=settings.seed)
    teacher = _token_selection_start(ckpt, model, changed, new, env) if model.token_selection is not None else None
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
    metrics.pop("teacher", None)  # the source's own teacher, if it was distilled too
    if teacher is not None:
        metrics["teacher"] = {"checkpoint": ckpt.get("source"), "weights_sha256": weights_digest(ckpt["model"])}
        if resume:
            _check_same_teacher(Path(out) / CHECKPOINT_NAME, metrics["teacher"])
        model.set_teacher(teacher)
    try:
        result = fit(model, recipe, train_split, test_split, settings, out, env=env, resume=resume, stage="finetune",
                     metrics=metrics)
    finally:
        if teacher is not None:
            model.set_teacher(None)
    selection = model.token_selection
    metrics["stages"][f"fine-tuned ({settings.neuron}" + (f", {selection.selector} {selection.keep_ratio:g})"
                                                          if selection is not None else ")")] = result.test["accuracy"]
    return _finish("finetune", model, recipe, settings, test_split, env, result.test, metrics, result.history, out)


def weights_digest(state: dict) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and bytes (identifies a teacher's weights)."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _check_same_teacher(path: Path, teacher: dict) -> None:
    """A resumed distillation must distil from the weights it started with, or it is another run."""
    saved = (load_checkpoint(path).get("metrics") or {}).get("teacher")
    if saved is not None and saved.get("weights_sha256") != teacher["weights_sha256"]:
        raise ValueError(f"checkpoint: the run in {path.parent} distilled from the dense model of "
                         f"{saved.get('checkpoint')}, and {teacher['checkpoint']} holds other weights; resume it with "
                         "the checkpoint it was started from")


def _token_selection_start(ckpt: dict, model: torch.nn.Module, changed: list[str], new: list[str], env):
    """Say in one line what fine-tuning changes in the selection and which tensors start new;
    return the distillation teacher: the checkpoint's own dense model, for STS (spec §2)."""
    import sys

    selection = model.token_selection
    dense = token_selection_of(ckpt["recipe"][0].get("overrides")) is None
    teacher = None
    if selection.selector == "sts":
        teacher = model_from_checkpoint(ckpt).to(env.device) if dense else None
    what = (f"{'adding' if dense else 'changing' if changed else 'keeping'} token selection {selection.selector!r} "
            f"(keep_ratio {selection.keep_ratio:g}" + (f"; {', '.join(changed)} from the settings)" if changed else ")"))
    fresh = f"newly initialised: {', '.join(new)}" if new else "no newly initialised tensors"
    distill = ("; distillation teacher: the checkpoint's dense model" if teacher is not None else
               "; no distillation (the checkpoint is not dense)" if selection.selector == "sts" else "")
    if env.is_main:
        print(f"effst: finetune: {what}; {fresh}{distill}", file=sys.stderr, flush=True)
    return teacher


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
    build, changed = _build_with_overrides(ckpt, settings, "eval")
    _, test_split, _ = load_data(settings)
    recipe = [build] + list(ckpt["recipe"][1:])
    model, _ = model_with_new_parameters(ckpt, recipe, backend=settings.backend if "backend" in given else None)
    model = model.to(device)
    if changed:
        import sys

        print(f"effst: eval: keep_ratio {build['overrides']['keep_ratio']:g} (the checkpoint was trained at "
              f"{token_selection_of(ckpt['recipe'][0].get('overrides')).keep_ratio:g})", file=sys.stderr, flush=True)
    test = evaluate(model, test_split, batch_size=settings.eval_batch_size, device=device, amp=settings.amp,
                    workers=settings.workers)
    metrics = copy.deepcopy(ckpt.get("metrics", {}))
    metrics.setdefault("stages", {})["evaluated"] = test["accuracy"]
    history = (ckpt.get("progress") or {}).get("history")
    return summarize("eval", model, recipe, settings, test_split, device, test, metrics, history, out)
