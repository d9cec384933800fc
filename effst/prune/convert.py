"""Swap block-pruned ``nn.Linear`` layers for ``effst.nn.BlockSparseLinear`` (same function)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from effst.nn.block_sparse import BlockSparseLinear
from effst.ops.block_sparse_linear import (
    BACKENDS,
    DEFAULT_BLOCK_SIZE,
    BlockSize,
    check_block_size,
    expand_block_mask,
    tiles_with_any,
)
from effst.prune.l1p import Targets, resolve_targets
from effst.prune.masks import _mask_parametrization, check_module


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def to_block_sparse(
    model: nn.Module, targets: Targets = None, block_size: Optional[BlockSize] = None, backend: str = "auto"
) -> nn.Module:
    """Replace every pruned ``nn.Linear`` (or the ``targets``) by an equal ``BlockSparseLinear``.

    ``block_size`` defaults to the one block L1P / block random pruning used (else ``DEFAULT_BLOCK_SIZE``).
    A layer's mask must be block-aligned for that block size (every tile fully kept or fully
    pruned): a ``BlockSparseLinear`` trains every entry of its kept tiles, so converting an
    element-pruned layer would let its pruned entries move. Returns the model (modified in
    place; a bare ``nn.Linear`` passed as ``model`` is returned converted).
    """
    check_module(model)
    if block_size is not None:
        check_block_size(block_size)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    if targets is None:
        chosen = [(n, m) for n, m in model.named_modules() if _mask_parametrization(m) is not None]
    else:
        chosen = resolve_targets(model, targets)
    converted = {}
    for name, module in chosen:
        if not isinstance(module, nn.Linear):
            raise ValueError(f"targets: {name or '<root>'!r} is a {type(module).__name__}; only nn.Linear converts to BlockSparseLinear")
        p = _mask_parametrization(module)
        block = check_block_size(block_size if block_size is not None else (p.block_size if p is not None and p.block_size else DEFAULT_BLOCK_SIZE))
        if p is not None:
            tiles = tiles_with_any(p.mask, block)
            if not torch.equal(expand_block_mask(tiles, block, p.mask.shape), p.mask):
                raise ValueError(
                    f"{name or '<root>'}: its pruning mask is not made of whole {block} tiles "
                    f"({p.structure} pruning); prune with effst.prune.block_l1p(..., block_size={block}) first"
                )
            converted[name] = BlockSparseLinear.from_dense(module, block_size=block, mask=tiles, backend=backend)
        else:
            converted[name] = BlockSparseLinear.from_dense(module, block_size=block, backend=backend)
    if "" in converted:
        return converted[""]
    for name, new in converted.items():
        _set_submodule(model, name, new)
    return model
