"""Pruning masks as module state: applied in the forward, saved and loaded with ``state_dict``.

A pruned layer carries a ``torch.nn.utils.parametrize`` parametrization on its ``weight``:
``layer.weight`` is computed as ``where(mask, original, 0)`` on every access, so the forward uses
exactly-zero pruned weights and their gradient is exactly zero. The stored ``original`` is also
zeroed where pruned when the mask is applied; with a zero gradient, AdamW's decoupled weight
decay (``w -= lr*wd*w``) and its moments leave it at zero too.

State-dict keys of a pruned layer ``P``:
``P.parametrizations.weight.original`` (the weight) and ``P.parametrizations.weight.0.mask``
(bool, True = kept).  How such a checkpoint loads:

* into a model pruned with the same targets (any sparsity): ``model.load_state_dict(sd)``;
* into any model, pruned or plain: ``load_pruned_state_dict(model, sd)`` (masks are recreated);
* into a plain model as plain weights: ``model.load_state_dict(strip_masks(sd))``;
* :func:`remove` bakes the masks in (plain ``weight`` keys, pruned entries zero).
"""
from __future__ import annotations

from typing import Iterator, Mapping, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

_PARAM = "weight"
_ORIGINAL_SUFFIX = "parametrizations.weight.original"
_MASK_SUFFIX = "parametrizations.weight.0.mask"


class WeightMask(nn.Module):
    """Parametrization ``weight -> where(mask, weight, 0)``; ``mask`` is a bool buffer."""

    def __init__(self, mask: torch.Tensor, structure: str = "element", block_size: Optional[tuple[int, int]] = None) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool).clone())
        # How the mask was made; informational (conversion to BlockSparseLinear reads block_size).
        self.structure = structure
        self.block_size = block_size

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        # Assigning layer.weight = W stores W with the pruned entries zeroed.
        return torch.where(self.mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


def check_weight(weight: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """A floating-point tensor of at least one dimension (a weight to score), or a clear error."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor (a weight matrix), got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {weight.dtype}")
    if weight.dim() < 1:
        raise ValueError(f"{name}: expected a tensor of >= 1 dimension ([out, in] or [out, in, 1]), got a scalar")
    return weight


def check_module(model: nn.Module, name: str = "model") -> nn.Module:
    """``model`` if it is an ``nn.Module``, else a clear error naming the argument."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name}: expected an nn.Module, got {type(model).__name__}")
    return model


STRUCTURES = ("element", "block", "2:4")


def is_prunable(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and 1x1, ungrouped ``nn.Conv1d`` (the layers L1P targets)."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv1d) and tuple(module.kernel_size) == (1,) and module.groups == 1


def why_not_prunable(module: nn.Module) -> str:
    """Human-readable reason a module is not an L1P target (empty if it is one)."""
    if is_prunable(module):
        return ""
    if isinstance(module, nn.Conv1d):
        return f"Conv1d with kernel_size={tuple(module.kernel_size)} and groups={module.groups} (only 1x1, groups=1 convolutions are linear layers)"
    return f"{type(module).__name__} is not nn.Linear or a 1x1 nn.Conv1d"


def _mask_parametrization(module: nn.Module) -> Optional[WeightMask]:
    if not parametrize.is_parametrized(module, _PARAM):
        return None
    for p in module.parametrizations[_PARAM]:
        if isinstance(p, WeightMask):
            return p
    return None


def get_mask(module: nn.Module) -> Optional[torch.Tensor]:
    """The bool keep-mask of a pruned layer's weight (same shape), or None if not pruned."""
    p = _mask_parametrization(check_module(module, "module"))
    return None if p is None else p.mask


def is_pruned(module: nn.Module) -> bool:
    """Whether the layer carries a pruning mask."""
    return _mask_parametrization(check_module(module, "module")) is not None


def apply_mask(
    module: nn.Module, mask: torch.Tensor, *, structure: str = "element", block_size: Optional[tuple[int, int]] = None,
    any_weight: bool = False,
) -> nn.Module:
    """Attach (or replace) the keep-mask of ``module.weight`` and zero the pruned entries.

    ``mask`` is a bool (or 0/1 integer) tensor of the weight's shape; True = kept. ``structure``
    (one of :data:`STRUCTURES`) and ``block_size`` record how the mask was made. The layer must
    be a linear one (``nn.Linear``, 1x1 ``nn.Conv1d``) unless ``any_weight``: then any module
    whose ``weight`` has >= 2 dimensions (IMP masks convolutions too).
    """
    check_module(module, "module")
    if structure not in STRUCTURES:
        raise ValueError(f"structure: expected one of {list(STRUCTURES)}, got {structure!r}")
    if any_weight:
        weight = getattr(module, _PARAM, None)
        if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
            raise TypeError(f"module: {type(module).__name__} has no weight tensor of >= 2 dimensions to mask")
    elif not is_prunable(module):
        raise TypeError(f"module: {why_not_prunable(module)}")
    weight = module.weight
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a bool tensor of shape {tuple(weight.shape)}, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"mask: expected shape {tuple(weight.shape)} (the weight's), got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.is_complex() or bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"mask: expected a bool (or 0/1 integer) tensor, got dtype {mask.dtype}")
    mask = mask.to(device=weight.device, dtype=torch.bool)
    existing = _mask_parametrization(module)
    if existing is not None:
        existing.mask.copy_(mask)
        existing.structure, existing.block_size = structure, block_size
    else:
        if parametrize.is_parametrized(module, _PARAM):
            raise ValueError(
                f"module: its weight already has a parametrization ({type(module.parametrizations[_PARAM][0]).__name__}); "
                "effst.prune masks only unparametrized weights"
            )
        parametrize.register_parametrization(module, _PARAM, WeightMask(mask, structure, block_size))
    with torch.no_grad():
        original = module.parametrizations[_PARAM].original
        original.copy_(torch.where(mask, original, torch.zeros((), dtype=original.dtype, device=original.device)))
    return module


def pruned_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for every layer of ``model`` that carries a pruning mask."""
    for name, module in check_module(model).named_modules():
        if is_pruned(module):
            yield name, module


def remove(model: nn.Module) -> nn.Module:
    """Make pruning permanent: plain ``weight`` parameters (pruned entries stay zero), no masks.

    After this, fine-tuning may move the zeros again; the state_dict has plain keys.
    """
    check_module(model)
    for _, module in list(pruned_modules(model)):
        parametrize.remove_parametrizations(module, _PARAM, leave_parametrized=True)
    return model


def strip_masks(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A pruned model's state_dict with plain ``P.weight`` keys (masked values) and no masks,
    loadable with ``strict=True`` into the unpruned model."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict: expected a mapping of names to tensors, got {type(state_dict).__name__}")
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(_MASK_SUFFIX):
            continue
        if key.endswith(_ORIGINAL_SUFFIX):
            prefix = key[: -len(_ORIGINAL_SUFFIX)]
            mask = state_dict.get(prefix + _MASK_SUFFIX)
            if mask is not None:
                value = torch.where(mask.to(value.device, torch.bool), value, torch.zeros((), dtype=value.dtype, device=value.device))
            out[prefix + _PARAM] = value
        else:
            out[key] = value
    return out


def load_pruned_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
    """Load a checkpoint whether it or ``model`` is pruned, adapting the mask structure.

    * A layer pruned in the checkpoint gets that mask in ``model`` (created if absent).
    * A layer pruned in ``model`` but plain in the checkpoint keeps its current mask; the
      loaded weight is masked by it.
    Returns ``model.load_state_dict``'s result.
    """
    modules = dict(check_module(model).named_modules())
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict: expected a mapping of names to tensors, got {type(state_dict).__name__}")
    state = dict(state_dict)
    for key in list(state):
        if key.endswith(_MASK_SUFFIX):
            prefix = key[: -len(_MASK_SUFFIX)]
            name = prefix[:-1] if prefix.endswith(".") else prefix
            module = modules.get(name)
            if module is None:
                continue  # reported as unexpected by load_state_dict
            if not is_pruned(module):  # any layer with a weight: IMP checkpoints mask convolutions
                apply_mask(module, state[key].to(torch.bool), any_weight=True)
    for name, module in pruned_modules(model):
        prefix = f"{name}." if name else ""
        if prefix + _PARAM in state and prefix + _ORIGINAL_SUFFIX not in state:
            state[prefix + _ORIGINAL_SUFFIX] = state.pop(prefix + _PARAM)
            state.setdefault(prefix + _MASK_SUFFIX, get_mask(module).clone())
    result = model.load_state_dict(state, strict=strict)
    with torch.no_grad():
        for _, module in pruned_modules(model):
            original = module.parametrizations[_PARAM].original
            original.copy_(torch.where(get_mask(module), original, torch.zeros((), dtype=original.dtype, device=original.device)))
    return result
