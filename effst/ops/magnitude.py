"""Magnitude scores and the keep rule shared by L1P (``effst.prune``) and
``BlockSparseLinear.from_dense`` (``effst.nn``), kept here so ``nn`` need not import ``prune``.

Rule (docs/pruning.md): of ``n`` scores and sparsity ``p``, ``k = ceil(p*n)``
(robust to float error: p = 0.07, n = 100 gives 7); the threshold is the k-th smallest score;
every score <= threshold is pruned (ties included); ``k = 0`` prunes nothing.
"""
from __future__ import annotations

import math

import torch


def _snap(product: float) -> float:
    """``product`` as the integer it is meant to be when it differs from one only by float
    representation error (0.07 * 100 is 7.000000000000001), else unchanged (1e-12 relative)."""
    nearest = round(product)
    return float(nearest) if abs(product - nearest) <= 1e-12 * abs(product) else product


def ceil_count(product: float) -> int:
    """``ceil(product)`` robust to float error, e.g. ``k = ceil(p*n)``."""
    return math.ceil(_snap(product))


def floor_count(product: float) -> int:
    """``floor(product)`` robust to float error, e.g. DSP's ``floor((1-p)*hidden)``."""
    return math.floor(_snap(product))


def keep_above_kth(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask of ``scores``: prune the ``k = ceil(p*n)`` smallest and every tie of the k-th."""
    n = scores.numel()
    k = ceil_count(sparsity * n)
    if k == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    flat = scores.reshape(-1)
    if bool(torch.isnan(flat).any()):
        raise ValueError("weight: contains NaN; magnitude pruning needs finite weights")
    threshold = torch.kthvalue(flat, k).values
    return scores > threshold


def tile_l1_norms(matrix: torch.Tensor, block_rows: int, block_cols: int) -> torch.Tensor:
    """L1 norm of every ``block_rows x block_cols`` tile of a 2-D ``[out, in]`` matrix, float64
    ``[ceil(out/bm), ceil(in/bk)]`` (edge tiles: their real entries). Summed in float64 so that
    rounding cannot reorder tiles of nearly equal norm."""
    w = matrix.detach().abs().to(torch.float64)
    n, k = w.shape
    nbr, nbc = -(-n // block_rows), -(-k // block_cols)
    w = torch.nn.functional.pad(w, (0, nbc * block_cols - k, 0, nbr * block_rows - n))
    return w.reshape(nbr, block_rows, nbc, block_cols).sum(dim=(1, 3))
