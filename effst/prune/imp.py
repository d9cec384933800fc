"""Iterative magnitude pruning with late rewinding (the lottery-ticket procedure of SparseSpikformer).

Procedure (docs/token_sparsity.md, "IMP"):

1. every weight tensor of >= 2 dimensions that is a module's ``weight`` (convolutions, linear
   layers, the head, STS predictors) gets a keep-mask (all True) -- biases, BatchNorm, neuron
   parameters and STATA's anchor are not pruned;
2. round 0 trains the dense model; the trainer marks the *rewind point* (e.g. the end of epoch
   20 in the paper; if it never does, the weights before training are used);
3. round k >= 1 removes, globally over all masked tensors, the smallest-|w| survivors so that
   exactly ``kept_k = floor(n * (1 - p)^k + 1/2)`` of the ``n`` prunable weights remain (exact
   rational arithmetic, so ``p = 0.25`` gives ``round(n * 3^k / 4^k)``; ties in |w| go in the
   order the tensors appear in ``model.named_modules()`` and then by flat index), rewinds every
   other value of the model (weights, BatchNorm statistics) to the rewind point, and retrains.

The masks are effst's pruning masks (:class:`effst.prune.masks.WeightMask`: applied in the
forward, pruned weights get zero gradients and stay zero under AdamW). With a ``directory``,
each finished round is saved as ``round-KKK.pt`` (model state with masks, rewind state, RNG
state, history); :func:`run_imp` called again with the same directory resumes after the last
saved round and produces bit-identical results.
"""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from effst.prune.masks import apply_mask, check_module, get_mask

#: Fraction of the surviving weights removed per round (SparseSpikformer: p = 25 %).
DEFAULT_FRACTION = 0.25
_MASK_KEY = "parametrizations.weight.0.mask"

Trainer = Callable[[nn.Module, int, Callable[[], None]], Any]


def _check_fraction(fraction: float) -> Fraction:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise TypeError(f"fraction: expected a float in (0, 1) (share of survivors removed per round), "
                        f"got {type(fraction).__name__}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction: expected a float in (0, 1) (share of survivors removed per round), got {fraction!r}")
    return Fraction(str(fraction))


def survivors(total: int, rounds: int, fraction: float = DEFAULT_FRACTION) -> int:
    """Weights kept after ``rounds`` rounds: ``floor(total * (1 - fraction)^rounds + 1/2)`` exactly."""
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise ValueError(f"total: expected an int >= 0, got {total!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds: expected an int >= 0, got {rounds!r}")
    keep = (1 - _check_fraction(fraction)) ** rounds
    return int(total * keep + Fraction(1, 2))


def prunable_weights(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module whose ``weight`` has >= 2 dimensions, in module order."""
    check_module(model)
    out = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
            out.append((name, module))
    return out


def attach_masks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Give every prunable weight a keep-mask (all True where it has none yet); returns them."""
    weights = prunable_weights(model)
    if not weights:
        raise ValueError("model: has no weight tensor of >= 2 dimensions to prune")
    for _, module in weights:
        if get_mask(module) is not None:
            continue
        apply_mask(module, torch.ones_like(module.weight, dtype=torch.bool), any_weight=True)
    return weights


def prune_round(model: nn.Module, rounds: int, fraction: float = DEFAULT_FRACTION) -> int:
    """Prune globally to exactly :func:`survivors` ``(n, rounds, fraction)`` weights (never
    reviving a pruned one); returns the number kept."""
    weights = attach_masks(model)
    masks = [get_mask(m) for _, m in weights]
    total = sum(mask.numel() for mask in masks)
    target = survivors(total, rounds, fraction)
    alive = sum(int(mask.sum()) for mask in masks)
    if target > alive:
        raise ValueError(f"rounds: the model already keeps {alive} weights, fewer than the {target} "
                         f"round {rounds} keeps; prune rounds in order")
    remove = alive - target
    if remove == 0:
        return alive
    magnitudes = torch.cat([torch.where(mask, m.weight.detach().abs().double(), torch.inf).flatten().cpu()
                            for (_, m), mask in zip(weights, masks)])
    order = torch.sort(magnitudes, stable=True).indices[:remove]  # ties: first in model order
    flat_keep = torch.ones(total, dtype=torch.bool)
    flat_keep[order] = False
    offset = 0
    with torch.no_grad():
        for (_, module), mask in zip(weights, masks):
            n = mask.numel()
            keep = mask & flat_keep[offset:offset + n].view_as(mask).to(mask.device)
            offset += n
            mask.copy_(keep)
            original = module.parametrizations.weight.original
            original.copy_(torch.where(keep, original, torch.zeros((), dtype=original.dtype, device=original.device)))
    return target


def mask_counts(model: nn.Module) -> tuple[int, int]:
    """(kept, total) over every masked weight of ``model``."""
    masks = [get_mask(m) for _, m in prunable_weights(model)]
    masks = [mask for mask in masks if mask is not None]
    return sum(int(mask.sum()) for mask in masks), sum(mask.numel() for mask in masks)


def _weights_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state without its masks (what rewinding restores)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith(_MASK_KEY)}


def rewind(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` (a :func:`_weights_state` snapshot, or a plain ``state_dict`` taken before
    the masks were attached) and re-zero the pruned weights. Every value of the model but the
    masks must be in ``state``, and nothing else."""
    if not isinstance(state, dict):
        raise TypeError(f"state: expected a state dict, got {type(state).__name__}")
    state = dict(state)
    for name, module in prunable_weights(model):
        prefix = f"{name}." if name else ""
        plain, stored = f"{prefix}weight", f"{prefix}parametrizations.weight.original"
        if get_mask(module) is not None and plain in state and stored not in state:
            state[stored] = state.pop(plain)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(_MASK_KEY)]
    if missing or unexpected:
        raise ValueError(f"state: does not fit the model (missing {missing}, unexpected {unexpected}); "
                         "nothing would be rewound there")
    with torch.no_grad():
        for _, module in prunable_weights(model):
            mask = get_mask(module)
            if mask is not None:
                original = module.parametrizations.weight.original
                original.copy_(torch.where(mask, original, torch.zeros((), dtype=original.dtype, device=original.device)))


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash never leaves a half-written round


def run_imp(model: nn.Module, train: Trainer, *, rounds: int, fraction: float = DEFAULT_FRACTION,
            directory: Optional[Union[str, os.PathLike]] = None) -> list[dict]:
    """Iterative magnitude pruning with late rewinding; returns one record per round.

    Args:
        model: the dense model (masks are attached in place).
        train: ``train(model, round, mark_rewind_point)`` trains one round (a fresh optimizer and
            schedule each round); in round 0 it calls ``mark_rewind_point()`` once at the rewind
            epoch. Its return value is stored in the round's record as ``"result"``.
        rounds: pruning rounds after the dense round 0 (kept fraction ``(1 - fraction)^rounds``).
        directory: where ``round-KKK.pt`` files go; an existing one resumes after its last round.

    Each record: ``round``, ``kept``, ``total``, ``sparsity`` (of the prunable weights), ``result``.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds: expected an int >= 0, got {rounds!r}")
    _check_fraction(fraction)
    if not callable(train):
        raise TypeError(f"train: expected a callable train(model, round, mark_rewind_point), got {type(train).__name__}")
    if directory is not None and not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory: expected None or a path (str or os.PathLike), got {type(directory).__name__}")
    attach_masks(model)
    folder = None if directory is None else Path(directory)
    history: list[dict] = []
    start = 0
    rewind_state: Optional[dict] = None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        # The newest round not past ``rounds``: a folder that went further resumes at the
        # requested round exactly (every round's file is kept).
        saved = sorted((p for p in folder.glob("round-*.pt") if p.stem[6:].isdigit() and int(p.stem[6:]) <= rounds),
                       key=lambda p: int(p.stem[6:]))
        if saved:
            ckpt = torch.load(saved[-1], map_location="cpu", weights_only=False)
            if ckpt.get("fraction") != fraction:
                raise ValueError(f"fraction: {directory} was pruned with fraction={ckpt.get('fraction')}, got {fraction}")
            model.load_state_dict(ckpt["model"])
            rewind_state, history = ckpt["rewind_state"], ckpt["history"]
            _set_rng_state(ckpt["rng"])
            start = ckpt["round"] + 1
    for r in range(start, rounds + 1):
        if r == 0:
            initial = _weights_state(model)
            marked: dict = {}

            def mark_rewind_point() -> None:
                marked["state"] = _weights_state(model)

            result = train(model, 0, mark_rewind_point)
            rewind_state = marked.get("state", initial)
        else:
            prune_round(model, r, fraction)
            rewind(model, rewind_state)
            result = train(model, r, lambda: None)
        kept, total = mask_counts(model)
        history.append({"round": r, "kept": kept, "total": total, "sparsity": 1 - kept / total, "result": result})
        if folder is not None:
            _save(folder / f"round-{r:03d}.pt", {"round": r, "fraction": fraction, "model": model.state_dict(),
                                                  "rewind_state": rewind_state, "history": history, "rng": _rng_state()})
    return history


__all__ = ["DEFAULT_FRACTION", "survivors", "prunable_weights", "attach_masks", "prune_round", "mask_counts",
           "rewind", "run_imp"]
