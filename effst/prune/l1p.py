"""L1P (docs/pruning.md): element and block magnitude pruning, and the random-pruning control.

Per target matrix ``W`` with ``n`` entries (tiles, for block L1P) and sparsity ``p`` in [0, 1):
``k = ceil(p*n)`` (exact products are not pushed up by float error: p = 0.07, n = 100
gives k = 7); the threshold is the k-th smallest score (1-indexed; score = ``|w|``, or the
tile's L1 norm); every entry with score <= threshold is pruned (ties included, so more than k
may go); ``k = 0`` prunes nothing. Each matrix is pruned independently. A 1x1 ``Conv1d`` weight
``[out, in, 1]`` is the matrix ``[out, in]``.

Targets (``targets=`` of every function here): ``None`` = every ``nn.Linear`` and 1x1
``nn.Conv1d`` in the model, the classifier included (pass names to prune only some, e.g.
Spikformer's ``q/k/v/proj/fc1/fc2``). Otherwise a name, a module class, or a list of them; a
name matches a module whose qualified name equals it or ends with ``"." + name``, or, if it
contains ``* ? [``, matches it as a glob. A named target that is not a linear layer, or that
matches nothing, is an error.

Pruning an already-pruned layer prunes further: scores are taken on the masked weight (pruned
entries score 0) and the new mask is combined with the old one.
"""
from __future__ import annotations

import fnmatch
import math
import warnings
import numbers
from typing import Optional, Sequence, Union

import torch
from torch import nn

from effst.ops.block_sparse_linear import (
    DEFAULT_BLOCK_SIZE,
    BlockSize,
    block_grid_shape,
    check_block_size,
    expand_block_mask,
    tiles_with_any,
)
# ceil_count / floor_count are re-exported: DSP and callers import them from here.
from effst.ops.magnitude import ceil_count, floor_count, keep_above_kth, tile_l1_norms as _tile_norms  # noqa: F401
from effst.prune.masks import apply_mask, check_module, check_weight, get_mask, is_prunable, why_not_prunable
from effst.prune.semi_structured import PATTERN as TWO_FOUR, two_four_mask

# DEFAULT_BLOCK_SIZE: the tile of block L1P / block random pruning wherever none is given (CLI,
# pipeline, to_block_sparse, BlockSparseLinear, the sparse benchmark's Spikformer rows), so that
# accuracy and speed are reported for the same layout. Defined in ops (nn needs it too).

Target = Union[str, type]
Targets = Optional[Union[Target, Sequence[Target]]]


# ---------------------------------------------------------------------------------------------
# Validation and target resolution
# ---------------------------------------------------------------------------------------------
def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    """A sparsity in [0, 1) as float, or a clear error."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"{name}: expected a number in [0, 1), got {type(sparsity).__name__}")
    value = float(sparsity)
    if not (0.0 <= value < 1.0):  # also rejects NaN
        raise ValueError(f"{name}: expected a number in [0, 1) (the fraction removed), got {sparsity!r}")
    return value


def _name_matches(name: str, target: str) -> bool:
    if any(ch in target for ch in "*?["):
        return fnmatch.fnmatchcase(name, target)
    return name == target or name.endswith("." + target)


def resolve_targets(model: nn.Module, targets: Targets = None) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` layers selected by ``targets`` (see the module doc), in model order."""
    named = list(check_module(model, "model_or_module").named_modules())
    if targets is None:
        found = [(n, m) for n, m in named if is_prunable(m)]
        if not found:
            raise ValueError(f"model_or_module: a {type(model).__name__} with no nn.Linear or 1x1 nn.Conv1d "
                             "layer: nothing to prune")
        return found
    if isinstance(targets, (str, type)):
        targets = [targets]
    if not isinstance(targets, (list, tuple)):
        raise TypeError(f"targets: expected None, names (str), module classes or a list of them, got {type(targets).__name__}")
    targets = list(targets)
    if not targets:
        raise ValueError("targets: expected None, a name, a module class or a non-empty list of them, got an empty list")
    selected: dict[str, nn.Module] = {}
    for target in targets:
        if isinstance(target, type):
            if not issubclass(target, nn.Module):
                raise TypeError(f"targets: {target.__name__} is not an nn.Module class")
            if not issubclass(target, (nn.Linear, nn.Conv1d)):
                raise ValueError(f"targets: {target.__name__} is not a linear layer class (nn.Linear or 1x1 nn.Conv1d)")
            hits = [(n, m) for n, m in named if isinstance(m, target)]
        elif isinstance(target, str):
            hits = [(n, m) for n, m in named if _name_matches(n, target)]
        else:
            raise TypeError(f"targets: expected names (str) or module classes, got {type(target).__name__}")
        if not hits:
            available = ", ".join(n or "<root>" for n, m in named if is_prunable(m)) or "none"
            raise ValueError(f"targets: {target!r} matches no module of the model (linear layers: {available})")
        for n, m in hits:
            if not is_prunable(m):
                raise ValueError(f"targets: {target!r} selects {n or '<root>'!r}, which is not a linear layer: {why_not_prunable(m)}")
            selected[n] = m
    return [(n, m) for n, m in named if n in selected]


def _matrix(weight: torch.Tensor) -> torch.Tensor:
    """The 2-D ``[out, in]`` view of a Linear / 1x1 Conv1d weight."""
    return weight.reshape(weight.shape[0], -1)


def _scores_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Masks of one matrix
# ---------------------------------------------------------------------------------------------
def l1p_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Element L1P keep-mask (bool, weight's shape) of one weight matrix."""
    sparsity = check_sparsity(sparsity)
    weight = check_weight(weight)
    scores = weight.detach().abs().to(_scores_dtype(weight))
    return keep_above_kth(scores, sparsity)


def tile_l1_norms(weight: torch.Tensor, block_size: BlockSize) -> torch.Tensor:
    """L1 norm (float64) of every ``bm x bk`` tile of the ``[out, in]`` matrix (edge tiles: their real entries)."""
    return _tile_norms(_matrix(check_weight(weight)), *check_block_size(block_size))


def block_l1p_mask(weight: torch.Tensor, sparsity: float, block_size: BlockSize = DEFAULT_BLOCK_SIZE) -> torch.Tensor:
    """Block L1P keep-mask over tiles, bool ``[ceil(out/bm), ceil(in/bk)]``."""
    sparsity = check_sparsity(sparsity)
    return keep_above_kth(tile_l1_norms(weight, block_size), sparsity)


def fit_block_pruning(weight: torch.Tensor, sparsity: float, block_size: BlockSize, name: str = "") -> tuple[tuple[int, int], float]:
    """``(tile, sparsity)`` that block pruning uses on ``weight``, so it never keeps nothing.

    ``block_size`` and ``sparsity`` as given if they keep at least one tile (``n - ceil(p*n) >= 1``
    of the ``n`` tiles); else the larger tile side (rows on a tie) is halved step by step down to
    16x16 until one does; if even 16x16 keeps nothing, 16x16 with the sparsity lowered to
    ``(n-1)/n`` (the single highest-scoring tile kept). Each adaptation warns, naming the layer.
    """
    sparsity = check_sparsity(sparsity)
    block = check_block_size(block_size)
    shape = tuple(_matrix(check_weight(weight)).shape)
    label = name or "<root>"

    def tiles(b):
        n = math.prod(block_grid_shape(*shape, b))
        return n - ceil_count(sparsity * n), n

    candidate = block
    while tiles(candidate)[0] < 1 and candidate != (16, 16):
        bm, bk = candidate
        candidate = (bm // 2, bk) if (bm >= bk and bm > 16) or bk == 16 else (bm, bk // 2)
    kept, n = tiles(candidate)
    if kept >= 1:
        if candidate != block:
            warnings.warn(
                f"{label}: {block} tiles cannot express sparsity {sparsity} on its {shape} weight "
                f"({tiles(block)[1]} tile(s), none would be kept); using {candidate} tiles ({kept} of {n} kept)",
                UserWarning, stacklevel=4,
            )
        return candidate, sparsity
    lowered = (n - 1) / n
    warnings.warn(
        f"{label}: even 16x16 tiles cannot express sparsity {sparsity} on its {shape} weight ({n} tiles, "
        f"none would be kept); keeping its highest-scoring tile: sparsity {lowered:.4g} on this layer",
        UserWarning, stacklevel=4,
    )
    return candidate, lowered


def _random_keep(num: int, sparsity: float, already_pruned: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Keep-mask over ``num`` items pruning ``max(ceil(p*num), already)`` of them uniformly at random
    among the not yet pruned (flat bool, CPU)."""
    target = ceil_count(sparsity * num)
    keep = ~already_pruned.reshape(-1).cpu()
    extra = target - int((~keep).sum())
    if extra > 0:
        candidates = keep.nonzero().flatten()
        order = torch.randperm(candidates.numel(), generator=generator)
        keep[candidates[order[:extra]]] = False
    return keep


# ---------------------------------------------------------------------------------------------
# Model-level pruning
# ---------------------------------------------------------------------------------------------
def _warn_if_emptied(name: str, weight: torch.Tensor, keep: torch.Tensor, sparsity: float) -> None:
    """Element pruning follows the rule even when it removes every weight of a layer (``ceil(p*n) = n``
    on a small matrix, or every ``|w|`` tied with the threshold); say so, since the layer then
    outputs only its bias."""
    if weight.numel() and not bool(keep.any()):
        n = weight.numel()
        why = (f"ceil({sparsity:g} * {n}) = {n}" if ceil_count(sparsity * n) >= n else
               "every remaining |w| ties with the threshold, and ties are pruned")
        warnings.warn(f"{name or '<root>'}: sparsity {sparsity:g} prunes all {n} weights of its "
                      f"{tuple(weight.shape)} weight ({why}); the layer outputs only its bias",
                      UserWarning, stacklevel=3)


def _combine(module: nn.Module, keep: torch.Tensor) -> torch.Tensor:
    old = get_mask(module)
    return keep if old is None else keep & old


def l1p(model_or_module: nn.Module, sparsity: float, targets: Targets = None, pattern: Optional[str] = None) -> nn.Module:
    """Element L1P at ``sparsity`` on every target matrix; masks become module state. Returns the model.

    ``pattern="2:4"`` (sparsity must be 0.5): keep the 2 largest ``|w|`` of every 4 consecutive
    inputs instead of a global threshold (:mod:`effst.prune.semi_structured`: groups, tie rule,
    and :func:`effst.prune.to_semi_structured` for PyTorch's sparse kernels).
    """
    sparsity = check_sparsity(sparsity)
    if pattern not in (None, TWO_FOUR):
        raise ValueError(f"pattern: expected None (unstructured) or {TWO_FOUR!r}, got {pattern!r}")
    if pattern == TWO_FOUR and sparsity != 0.5:
        raise ValueError(f"sparsity: pattern='2:4' keeps 2 of every 4 weights, i.e. sparsity 0.5, got {sparsity!r}")
    chosen = resolve_targets(model_or_module, targets)
    keeps = []  # every mask is computed (and validated) before any layer changes
    for name, module in chosen:
        if pattern == TWO_FOUR:
            try:
                keeps.append(two_four_mask(module.weight))
            except ValueError as err:
                raise ValueError(f"{name or '<root>'}: {err}") from None
        else:
            keeps.append(l1p_mask(module.weight, sparsity))
    for (name, module), keep in zip(chosen, keeps):
        keep = _combine(module, keep)
        _warn_if_emptied(name, module.weight, keep, sparsity)
        apply_mask(module, keep, structure=pattern or "element")
    return model_or_module


def block_l1p(
    model_or_module: nn.Module, sparsity: float, targets: Targets = None, block_size: BlockSize = DEFAULT_BLOCK_SIZE
) -> nn.Module:
    """Block L1P: prune the lowest-L1 ``sparsity`` fraction of ``block_size`` tiles per matrix.

    A matrix too small for ``block_size`` at this sparsity gets a smaller tile, with a warning
    (:func:`fit_block_pruning`; a layer that even 16x16 tiles would empty keeps its best tile);
    the tile used is recorded with the mask.

    The result converts to ``BlockSparseLinear`` with :func:`effst.prune.to_block_sparse`.
    """
    sparsity = check_sparsity(sparsity)
    requested = check_block_size(block_size)
    chosen = resolve_targets(model_or_module, targets)
    fits = [fit_block_pruning(module.weight, sparsity, requested, name) for name, module in chosen]
    for (_, module), (block, layer_sparsity) in zip(chosen, fits):
        weight = module.weight
        keep = expand_block_mask(block_l1p_mask(weight, layer_sparsity, block), block, weight.shape)
        apply_mask(module, _combine(module, keep), structure="block", block_size=block)
    return model_or_module


def random(
    model_or_module: nn.Module,
    sparsity: float,
    structure: str = "element",
    seed: Optional[int] = None,
    targets: Targets = None,
    block_size: BlockSize = DEFAULT_BLOCK_SIZE,
) -> nn.Module:
    """Random pruning control: exactly ``ceil(p*n)`` random entries (or tiles) per matrix.

    ``structure``: ``'element'`` or ``'block'``; ``seed`` makes it reproducible (any device).
    Block tiles too large for a matrix are adapted as in :func:`block_l1p`.
    """
    sparsity = check_sparsity(sparsity)
    if structure not in ("element", "block"):
        raise ValueError(f"structure: expected 'element' or 'block', got {structure!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed: expected an int or None, got {type(seed).__name__}")
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    requested = check_block_size(block_size) if structure == "block" else None
    chosen = resolve_targets(model_or_module, targets)
    fits = [fit_block_pruning(m.weight, sparsity, requested, n) if requested else (None, sparsity) for n, m in chosen]
    for (name, module), (block, layer_sparsity) in zip(chosen, fits):
        weight = module.weight
        old = get_mask(module)
        if structure == "element":
            pruned = torch.zeros(weight.shape, dtype=torch.bool) if old is None else ~old.cpu()
            keep = _random_keep(weight.numel(), sparsity, pruned, generator).reshape(weight.shape)
            _warn_if_emptied(name, weight, keep, sparsity)
        else:
            grid = block_grid_shape(*_matrix(weight).shape, block)
            if old is None:
                pruned_tiles = torch.zeros(grid, dtype=torch.bool)
            else:  # a tile counts as pruned when none of its entries is kept
                pruned_tiles = ~tiles_with_any(_matrix(old).cpu(), block)
            tiles = _random_keep(pruned_tiles.numel(), layer_sparsity, pruned_tiles, generator).reshape(grid)
            keep = expand_block_mask(tiles, block, weight.shape)
        keep = keep.to(weight.device)
        apply_mask(module, _combine(module, keep), structure=structure, block_size=block)
    return model_or_module
