"""Checkpoints: written atomically, read with clear errors, and able to rebuild their model.

A checkpoint is a plain dict saved with ``torch.save`` and read with ``weights_only=True`` (no
pickled code). Besides the state dicts it stores the model's *recipe*: the ``build_model``
call and the structural steps applied since (pruning, DSP, neuron conversion). Loading replays
the recipe on a freshly built model, which reproduces every shape, mask buffer and module type,
and then loads the weights strictly — so a pruned, converted model loads like any other.
"""
from __future__ import annotations

import copy
import os
import random
import warnings
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

FORMAT = "effst-checkpoint"
SOURCE_KEY = "source"  # set by load_checkpoint: the file a checkpoint dict was read from
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or not an effst checkpoint."""


# ----------------------------------------------------------------------------- writing
def save_atomic(obj: dict, path: str | os.PathLike) -> Path:
    """Write ``obj`` to ``path`` via a temporary file and ``os.replace``: never a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def make_checkpoint(
    model: torch.nn.Module,
    recipe: list[dict],
    *,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[Any] = None,
    progress: Optional[dict] = None,
    settings: Optional[dict] = None,
    metrics: Optional[dict] = None,
) -> dict:
    """Assemble a checkpoint dict (state on CPU) from a model and its training state."""
    model = unwrap(model)
    return {
        "format": FORMAT,
        "version": VERSION,
        "recipe": copy.deepcopy(recipe),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": _to_cpu(optimizer.state_dict()) if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "progress": dict(progress or {}),
        "settings": copy.deepcopy(settings or {}),
        "metrics": copy.deepcopy(metrics or {}),
        "rng": rng_state(),
    }


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# ----------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """Every RNG the training touches, in types ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": _tuple_to_list(random.getstate()),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    random.setstate(_list_to_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _tuple_to_list(obj: Any) -> Any:
    return [_tuple_to_list(v) for v in obj] if isinstance(obj, (tuple, list)) else obj


def _list_to_tuple(obj: Any) -> Any:
    return tuple(_list_to_tuple(v) for v in obj) if isinstance(obj, list) else obj


# ----------------------------------------------------------------------------- reading
def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint; a missing, truncated, corrupt or foreign file raises CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: not a regular file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, TypeError,
            AttributeError, ImportError, IndexError, MemoryError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint {path}: cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "the file is truncated or corrupt — use an earlier checkpoint or retrain"
        ) from exc
    except Exception as exc:  # pickle.UnpicklingError and anything else torch.load raises on garbage
        raise CheckpointError(
            f"checkpoint {path}: cannot be read ({type(exc).__name__}); the file is corrupt or not an effst checkpoint"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: not an effst checkpoint (no '{FORMAT}' header)")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path}: format version {ckpt.get('version')!r}, this effst reads {VERSION}")
    for key in ("recipe", "model", "progress"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {path}: incomplete, the '{key}' entry is missing")
    ckpt[SOURCE_KEY] = str(path)  # for error messages; never saved again (make_checkpoint builds anew)
    return ckpt


# ----------------------------------------------------------------------------- recipes
def apply_step(model: torch.nn.Module, step: dict) -> torch.nn.Module:
    """Apply one structural recipe step (other than ``build``) to ``model``; returns the model."""
    op = step["op"]
    if op == "prune":
        import effst.prune as prune

        method = step["method"]
        sparsity = step["sparsity"]
        targets = step.get("targets")
        if method == "l1p":
            return _returned(prune.l1p(model, sparsity, targets=targets), model)
        if method == "block-l1p":
            return _returned(prune.block_l1p(model, sparsity, targets=targets, block_size=tuple(step["block_size"])), model)
        if method == "random":
            return _returned(prune.random(model, sparsity, targets=targets, structure=step.get("structure", "element"),
                                          seed=step["seed"], **({"block_size": tuple(step["block_size"])} if step.get("block_size") else {})), model)
        if method == "dsp":
            from effst.prune.dsp import dsp

            return dsp(model, sparsity)
        if method == "dsp-random":
            from effst.prune.dsp import dsp_random

            return dsp_random(model, sparsity, step["seed"])
        raise CheckpointError(f"recipe: unknown pruning method {method!r}")
    if op == "convert":
        from effst.convert import convert

        return convert(model, neuron=step["neuron"], channels=step.get("channels", True))
    raise CheckpointError(f"recipe: unknown step {op!r}")


def _returned(result: Any, model: torch.nn.Module) -> torch.nn.Module:
    """Pruning functions may prune in place (returning a report) or return the model."""
    return result if isinstance(result, torch.nn.Module) else model


def build_from_recipe(recipe: list[dict], *, seed: int = 0) -> torch.nn.Module:
    """Rebuild the (untrained) model a recipe describes: same modules, shapes and buffers,
    initialised from ``seed`` (what a checkpoint does not hold keeps that initialisation)."""
    if not recipe or recipe[0].get("op") != "build":
        raise CheckpointError("recipe: must start with a 'build' step")
    from effst.models import build_model

    first = recipe[0]
    with torch.random.fork_rng(devices=[]):  # replaying must not consume the caller's RNG
        torch.manual_seed(seed)
        model = build_model(first["name"], neuron=first["neuron"], num_classes=first.get("num_classes"),
                            T=first.get("T"), backend=first.get("backend", "auto"), **first.get("overrides", {}))
        # The steps' warnings (e.g. a block tile adapted to a small matrix) were shown when the
        # steps were first applied; replaying them on every load must not repeat them.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for step in recipe[1:]:
                model = apply_step(model, step)
    return model


def model_from_checkpoint(ckpt: dict, *, backend: Optional[str] = None) -> torch.nn.Module:
    """The trained model stored in a checkpoint dict (on CPU, eval mode)."""
    model, _ = model_with_new_parameters(ckpt, ckpt["recipe"], backend=backend)
    return model


def model_with_new_parameters(ckpt: dict, recipe: list[dict], *, new_prefix: Optional[str] = None,
                              backend: Optional[str] = None, seed: int = 0) -> tuple[torch.nn.Module, list[str]]:
    """The model ``recipe`` builds, with every weight of the checkpoint loaded strictly, and the
    names of the entries it has that the checkpoint lacks (allowed only under ``new_prefix``,
    e.g. a token selector's ``'selector.'``; they keep their initialisation from ``seed``)."""
    recipe = copy.deepcopy(recipe)
    if backend is not None:
        recipe[0]["backend"] = backend
    model = build_from_recipe(recipe, seed=seed)
    expected = model.state_dict()
    new = [k for k in expected if k not in ckpt["model"] and new_prefix is not None and k.startswith(new_prefix)]
    mismatch = weight_mismatch({k: v for k, v in expected.items() if k not in new}, ckpt["model"])
    if mismatch:
        raise CheckpointError(f"checkpoint {ckpt.get(SOURCE_KEY, '(in memory)')}: its weights do not fit the model its "
                              f"recipe builds ({mismatch})")
    model.load_state_dict({**{k: expected[k] for k in new}, **ckpt["model"]}, strict=True)
    if backend is not None:
        set_backend(model, backend)
    return model.eval(), new


def weight_mismatch(expected: dict, stored: dict, show: int = 2) -> str:
    """A one-line summary of how ``stored`` differs from ``expected`` ('' when they fit)."""
    missing = [k for k in expected if k not in stored]
    unexpected = [k for k in stored if k not in expected]
    reshaped = [f"{k} {tuple(stored[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
                if k in stored and tuple(stored[k].shape) != tuple(expected[k].shape)]
    parts = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("with another shape", reshaped)):
        if names:
            more = f", … {len(names) - show} more" if len(names) > show else ""
            parts.append(f"{len(names)} {label}: {', '.join(names[:show])}{more}")
    return "; ".join(parts)


def set_backend(model: torch.nn.Module, backend: str) -> None:
    """Point every effst neuron of ``model`` at ``backend`` (e.g. after moving to another device)."""
    for module in model.modules():
        if hasattr(module, "backend") and isinstance(getattr(module, "backend"), str) and module.__module__.startswith("effst"):
            module.backend = backend
