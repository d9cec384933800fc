"""How many synapses a layer keeps: the one place pruned weights are counted.

Both :func:`effst.prune.report` and :func:`effst.models.count_parameters` count with these, so
they live here, below both (``effst.prune`` imports the models for DSP).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from effst.nn.block_sparse import BlockSparseLinear


def weight_mask(module: nn.Module) -> Optional[torch.Tensor]:
    """The keep-mask of a layer's weight, wherever the pruning code keeps it: a parametrization of
    ``weight`` holding a ``mask`` tensor (effst.prune's ``WeightMask``), or any buffer whose name
    ends in 'mask' and whose shape is the weight's (torch.nn.utils.prune's ``weight_mask``); None
    for an unpruned layer."""
    if parametrize.is_parametrized(module, "weight"):
        for parametrization in module.parametrizations["weight"]:
            mask = getattr(parametrization, "mask", None)
            if isinstance(mask, torch.Tensor):
                return mask
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    for name, buffer in module.named_buffers():
        if "mask" in name.rsplit(".", 1)[-1] and tuple(buffer.shape) == tuple(weight.shape):
            return buffer
    return None


def weight_counts(module: nn.Module) -> tuple[int, int]:
    """``(dense entries, kept entries)`` of a layer's weight: a block-sparse layer keeps the
    entries of its stored tiles, a masked layer its mask's True entries, any other layer all."""
    if isinstance(module, BlockSparseLinear):
        return module.out_features * module.in_features, int(module.element_mask().sum())
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__}: has no weight tensor to count")
    mask = weight_mask(module)
    return weight.numel(), weight.numel() if mask is None else int(torch.count_nonzero(mask))


__all__ = ["weight_mask", "weight_counts"]
