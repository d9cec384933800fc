"""Dimension Significance-based Pruning (DSP, docs/pruning.md): structured pruning of a
Spikformer's blocks into physically smaller dense matrices, plus the random-dimension control.

Per block:
- SSA: output dimension i of the attention is scored by the mean of the Dimension Value
  Assessment of Wq, Wk and Wv at row i. The paper's DVA formula was lost in extraction; effst
  uses the row L1 norm (mean |w| of the row). The lowest-scoring dims are removed from Wq, Wk,
  Wv (rows and biases), from their BatchNorms and neurons, from the attention neuron, and from
  the projection's input columns. The kept width is ``(1-p)·W`` rounded to a multiple of the
  head count. The paper rounds up on CIFAR10 (312/240/156/84/48 for W = 384, 12 heads at
  p = 0.2/0.4/0.6/0.8/0.9) and down on CIFAR10-DVS (192/144/96/48/16 for W = 256, 16 heads),
  so the default follows the model's variant ('down' for dvs, 'up' otherwise); pass
  ``attn_rounding`` to choose. At least one dim per head is kept.
- MLP: fc1's rows (hidden units) are scored the same way and the lowest removed, with fc1's
  BatchNorm and neuron and fc2's matching input columns; the kept width is
  ``floor((1-p)·hidden)`` (1228/921/614/307/153 for 1536), at least 1.

Kept dims keep their original order. Ties in the score go to the lower index (scores are
computed in float64, so rounding cannot reorder rows of nearly equal mean |w|). Neurons with
per-channel parameters keep the parameters of the kept channels.

Whole dims, a multiple of the head count and at least one dim per head and one hidden unit
cannot express every sparsity: the weights kept in the six projections of a block
(``dim * (4 * attn + 2 * hidden)``) can differ from the requested ``(1 - p)`` share. When the
request needed fewer than one dim per head or than one hidden unit, or when the kept share of
projection weights is more than :data:`SPARSITY_TOLERANCE` (relative) away from ``1 - p``, DSP
warns, naming the requested and the achieved widths and weight sparsity
(:func:`dsp_weight_sparsity` gives the achieved figure).
"""
from __future__ import annotations

import copy
import math
import numbers
import warnings
from dataclasses import replace
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn.utils import skip_init

from effst.models.spikformer import Spikformer, unwrap
from effst.prune.l1p import ceil_count, check_sparsity, floor_count

ATTN_ROUNDINGS = ("up", "down")

#: Relative gap between the kept share of projection weights and ``1 - p`` above which DSP warns.
SPARSITY_TOLERANCE = 0.1

# Decides which of ``width`` dims to keep: (scores or None, width, keep, heads) -> sorted indices.
Chooser = Callable[[Optional[torch.Tensor], int, int, int], torch.Tensor]


def _check_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    return int(value)


def _widths(attn_width: int, hidden: int, heads: int, sparsity: float,
            attn_rounding: str) -> tuple[int, int, bool]:
    """(kept attention width, kept hidden width, whether a minimum of one had to be imposed)."""
    sparsity = check_sparsity(sparsity)
    if attn_rounding not in ATTN_ROUNDINGS:
        raise ValueError(f"attn_rounding: expected one of {list(ATTN_ROUNDINGS)}, got {attn_rounding!r}")
    attn_width = _check_count(attn_width, "attn_width")
    hidden = _check_count(hidden, "hidden")
    heads = _check_count(heads, "heads")
    if attn_width % heads != 0:
        raise ValueError(f"attn_width: {attn_width} is not a multiple of heads={heads}")
    # (1 - 0.9) * 1000 is 99.99999999999997 in floats: the counts snap exact products first.
    per_head = (1.0 - sparsity) * attn_width / heads
    per_head = ceil_count(per_head) if attn_rounding == "up" else floor_count(per_head)
    kept_hidden = floor_count((1.0 - sparsity) * hidden)
    clamped = per_head < 1 or kept_hidden < 1
    per_head = min(max(per_head, 1), attn_width // heads)
    kept_hidden = min(max(kept_hidden, 1), hidden)
    return per_head * heads, kept_hidden, clamped


def dsp_widths(attn_width: int, hidden: int, heads: int, sparsity: float,
               attn_rounding: str = "up") -> tuple[int, int]:
    """Kept (attention width, MLP hidden width) at ``sparsity`` (see the module docstring)."""
    kept_attn, kept_hidden, _ = _widths(attn_width, hidden, heads, sparsity, attn_rounding)
    return kept_attn, kept_hidden


def dsp_weight_sparsity(attn_width: int, hidden: int, kept_attn: int, kept_hidden: int) -> float:
    """Share of a block's projection weights (q, k, v, proj, fc1, fc2; biases aside) that DSP
    removes when it keeps ``kept_attn`` of ``attn_width`` attention dims and ``kept_hidden`` of
    ``hidden`` hidden units: ``1 - (4*kept_attn + 2*kept_hidden) / (4*attn_width + 2*hidden)``
    (every projection has the model width D on its other side, which cancels)."""
    for value, name in ((attn_width, "attn_width"), (hidden, "hidden")):
        _check_count(value, name)
    for value, bound, name in ((kept_attn, attn_width, "kept_attn"), (kept_hidden, hidden, "kept_hidden")):
        if _check_count(value, name) > bound:
            raise ValueError(f"{name}: expected at most {bound}, got {value}")
    return 1.0 - (4 * kept_attn + 2 * kept_hidden) / (4 * attn_width + 2 * hidden)


def _warn_if_missed(width: int, hidden: int, heads: int, sparsity: float, kept_attn: int,
                    kept_hidden: int, clamped: bool, rounding: str) -> None:
    achieved = dsp_weight_sparsity(width, hidden, kept_attn, kept_hidden)
    gap = abs((1.0 - achieved) / (1.0 - sparsity) - 1.0)
    if not clamped and gap <= SPARSITY_TOLERANCE:
        return
    why = ("it asks for fewer than one dim per head or than one hidden unit, and DSP keeps at least "
           "one of each" if clamped else
           f"the attention width is rounded {rounding} to a multiple of the {heads} heads and the "
           "hidden width down to whole units")
    more_or_fewer = "more" if achieved < sparsity else "fewer"
    warnings.warn(
        f"dsp: sparsity {sparsity:g} cannot be met on attention width {width} ({heads} heads) and hidden "
        f"width {hidden}: {why}. Kept attention {kept_attn} of {width} (requested "
        f"{(1.0 - sparsity) * width:.4g}), hidden {kept_hidden} of {hidden} (requested "
        f"{(1.0 - sparsity) * hidden:.4g}): the projections keep {1.0 - achieved:.2%} of their weights "
        f"({more_or_fewer} than the requested {1.0 - sparsity:.2%}; weight sparsity {achieved:.2%})",
        UserWarning, stacklevel=4)


# --------------------------------------------------------------------------- choosing dims
def _row_scores(layer: nn.Module) -> torch.Tensor:
    """DVA of each output dim: the mean |w| of its row."""
    weight = layer.weight.detach()
    return weight.abs().reshape(weight.shape[0], -1).double().mean(dim=1)


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    # Stable descending sort: equal scores keep the lower index first.
    order = torch.sort(-scores, stable=True).indices
    return order[:keep].sort().values


def _choose_by_score(head_balanced: bool) -> Chooser:
    def choose(scores: Optional[torch.Tensor], width: int, keep: int, heads: int) -> torch.Tensor:
        assert scores is not None
        if not head_balanced or heads == 1:
            return _top(scores, keep)
        size, per_head = width // heads, keep // heads
        return torch.cat([_top(scores[h * size:(h + 1) * size], per_head) + h * size for h in range(heads)])
    return choose


def _choose_randomly(generator: torch.Generator) -> Chooser:
    def choose(scores: Optional[torch.Tensor], width: int, keep: int, heads: int) -> torch.Tensor:
        return torch.randperm(width, generator=generator)[:keep].sort().values
    return choose


# --------------------------------------------------------------------------- slicing modules
def _check_dense(layer: nn.Module, name: str) -> None:
    plain = type(layer) in (nn.Linear, nn.Conv1d)
    hooked = hasattr(layer, "weight_orig") or hasattr(layer, "parametrizations")
    if not plain or hooked:
        raise TypeError(f"dsp: {name} is a {type(layer).__name__}{' with pruning masks' if hooked else ''}; "
                        "DSP needs the dense nn.Linear / nn.Conv1d projections of an unpruned Spikformer "
                        "(apply DSP instead of, not after, L1P or block-sparse conversion)")
    if isinstance(layer, nn.Conv1d) and (layer.kernel_size != (1,) or layer.groups != 1):
        raise TypeError(f"dsp: {name} is a Conv1d with kernel {layer.kernel_size} and groups {layer.groups}; "
                        "expected kernel_size=1, groups=1")


def _sliced_projection(layer: nn.Module, rows: Optional[torch.Tensor] = None,
                       cols: Optional[torch.Tensor] = None) -> nn.Module:
    """A copy of a Linear / Conv1d(k=1) keeping output ``rows`` and input ``cols``."""
    weight = layer.weight.detach()
    bias = layer.bias.detach() if layer.bias is not None else None
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
        bias = bias.index_select(0, rows.to(weight.device)) if bias is not None else None
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    factory = dict(device=weight.device, dtype=weight.dtype)
    # skip_init: the weights are overwritten below, so do not pay for a random init.
    if isinstance(layer, nn.Conv1d):
        new = skip_init(nn.Conv1d, weight.shape[1], weight.shape[0], kernel_size=1, bias=bias is not None, **factory)
    else:
        new = skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None, **factory)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.weight.requires_grad_(layer.weight.requires_grad)
    new.train(layer.training)
    return new


def _sliced_batchnorm(bn: nn.BatchNorm1d, keep: torch.Tensor) -> nn.BatchNorm1d:
    reference = next((t for t in list(bn.parameters()) + list(bn.buffers()) if t.is_floating_point()), None)
    factory = dict(device=reference.device, dtype=reference.dtype) if reference is not None else {}
    new = nn.BatchNorm1d(len(keep), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                         track_running_stats=bn.track_running_stats, **factory)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            old = getattr(bn, name)
            if isinstance(old, torch.Tensor):
                getattr(new, name).copy_(old.index_select(0, keep.to(old.device)))
        if bn.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new


def _slice_neuron(node: nn.Module, keep: torch.Tensor, old_width: int) -> None:
    """Keep the per-channel parameters of the kept channels (per-layer ones are untouched)."""
    for name in ("w", "v_threshold"):
        value = getattr(node, name, None)
        if isinstance(value, torch.Tensor) and value.dim() == 1 and value.shape[0] == old_width:
            sliced = value.detach().index_select(0, keep.to(value.device)).clone()
            if isinstance(value, nn.Parameter):
                setattr(node, name, nn.Parameter(sliced, requires_grad=value.requires_grad))
            else:
                setattr(node, name, sliced)
    if getattr(node, "channels", None) == old_width:
        node.channels = len(keep)
    if getattr(node, "effst_channels", None) == old_width:
        node.effst_channels = len(keep)
    if hasattr(node, "reset"):
        node.reset()


# --------------------------------------------------------------------------- the pruning
def _check_rounding(attn_rounding: Optional[str]) -> None:
    if attn_rounding is not None and attn_rounding not in ATTN_ROUNDINGS:
        raise ValueError(f"attn_rounding: expected None or one of {list(ATTN_ROUNDINGS)}, got {attn_rounding!r}")


def _prune(model: nn.Module, sparsity: float, choose: Chooser, attn_rounding: Optional[str],
           scored: bool) -> Spikformer:
    sparsity = check_sparsity(sparsity)
    inner, _ = unwrap(model)
    config = inner.config
    if attn_rounding is None:
        attn_rounding = "down" if config.variant == "dvs" else "up"
    width, hidden = config.width, config.hidden
    new_width, new_hidden, clamped = _widths(width, hidden, config.heads, sparsity, attn_rounding)
    for i, block in enumerate(inner.blocks):
        attn, mlp = block.attn, block.mlp
        prefix = f"blocks.{i}"
        for name in ("q_linear", "k_linear", "v_linear", "proj_linear"):
            _check_dense(getattr(attn, name), f"{prefix}.attn.{name}")
        for name in ("fc1", "fc2"):
            _check_dense(getattr(mlp, name), f"{prefix}.mlp.{name}")
        if attn.q_linear.weight.shape[0] != width or mlp.fc1.weight.shape[0] != hidden:
            raise ValueError(f"dsp: {prefix} has widths ({attn.q_linear.weight.shape[0]}, "
                             f"{mlp.fc1.weight.shape[0]}) but the config says ({width}, {hidden})")
    inner.reset()  # a membrane state left by a forward is part of an autograd graph: not copyable
    pruned: Spikformer = copy.deepcopy(inner)
    for block in pruned.blocks:
        attn, mlp = block.attn, block.mlp
        scores = None
        if scored:
            scores = sum(_row_scores(getattr(attn, f"{n}_linear")) for n in ("q", "k", "v")) / 3.0
        keep = choose(scores, width, new_width, config.heads)
        for n in ("q", "k", "v"):
            setattr(attn, f"{n}_linear", _sliced_projection(getattr(attn, f"{n}_linear"), rows=keep))
            setattr(attn, f"{n}_bn", _sliced_batchnorm(getattr(attn, f"{n}_bn"), keep))
            _slice_neuron(getattr(attn, f"{n}_lif"), keep, width)
        # attn @ v keeps v's dims, so the attention neuron sees the kept dims too.
        _slice_neuron(attn.attn_lif, keep, width)
        attn.proj_linear = _sliced_projection(attn.proj_linear, cols=keep)

        scores = _row_scores(mlp.fc1) if scored else None
        keep = choose(scores, hidden, new_hidden, 1)
        mlp.fc1 = _sliced_projection(mlp.fc1, rows=keep)
        mlp.fc1_bn = _sliced_batchnorm(mlp.fc1_bn, keep)
        _slice_neuron(mlp.fc1_lif, keep, hidden)
        mlp.fc2 = _sliced_projection(mlp.fc2, cols=keep)

    pruned.config = replace(config, attn_dim=new_width, hidden=new_hidden)
    pruned.reset()
    _warn_if_missed(width, hidden, config.heads, sparsity, new_width, new_hidden, clamped, attn_rounding)
    return pruned


def dsp(model: nn.Module, sparsity: float, *, attn_rounding: Optional[str] = None,
        head_balanced: bool = False) -> Spikformer:
    """DSP-prune a Spikformer at ``sparsity`` p in [0, 1); returns a new, smaller model.

    Args:
        model: a Spikformer (or one wrapped by DDP / torch.compile) with dense projections;
            it is deep-copied and left unchanged.
        sparsity: fraction of attention and MLP dims to remove.
        attn_rounding: round the attention width 'up' or 'down' to a multiple of the head
            count; None (default) = 'down' for the DVS variant, 'up' otherwise (the paper's
            CIFAR10-DVS and CIFAR10 shapes).
        head_balanced: keep the same number of dims in every head, chosen within the head
            (preserves which head each kept dim belongs to); default False ranks all dims
            together as the paper describes.

    Returns:
        The pruned Spikformer; its ``config`` has the new ``attn_dim`` and ``hidden``, so
        ``build_model_from_spec(pruned.spec())`` rebuilds its architecture.
    """
    _check_rounding(attn_rounding)
    if not isinstance(head_balanced, bool):
        raise TypeError(f"head_balanced: expected a bool, got {type(head_balanced).__name__}")
    return _prune(model, sparsity, _choose_by_score(head_balanced), attn_rounding, scored=True)


def dsp_random(model: nn.Module, sparsity: float, seed: int = 0, *,
               attn_rounding: Optional[str] = None) -> Spikformer:
    """The paper's control: the same shapes as :func:`dsp`, dims chosen uniformly at random
    (reproducible from ``seed``)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    _check_rounding(attn_rounding)
    generator = torch.Generator().manual_seed(seed)
    return _prune(model, sparsity, _choose_randomly(generator), attn_rounding, scored=False)


__all__ = ["dsp", "dsp_random", "dsp_widths", "dsp_weight_sparsity", "ATTN_ROUNDINGS", "SPARSITY_TOLERANCE"]
