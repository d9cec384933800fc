"""2:4 semi-structured sparsity: the mask rule and the swap to PyTorch's sparse weights.

``l1p(model, 0.5, pattern="2:4")`` keeps, in every group of 4 consecutive weights along the
input dimension (``W[o, 4g : 4g+4]``, the grouping PyTorch's semi-structured format and the
sparse tensor cores use), the 2 of largest ``|w|``. Ties: among equal magnitudes the lower input
index is kept (a stable descending sort), so exactly 2 of every 4 are kept and the result does
not depend on the device. ``in_features`` must be a multiple of 4.

:func:`to_semi_structured` then stores such weights as
``torch.sparse.to_sparse_semi_structured`` tensors (cuSPARSELt / CUTLASS kernels, CUDA only,
compute capability >= 8.0); this module does not implement the product itself.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from effst.prune.masks import _mask_parametrization, check_weight

PATTERN = "2:4"
GROUP = 4
KEEP = 2


def two_four_mask(weight: torch.Tensor) -> torch.Tensor:
    """Keep-mask (bool, weight's shape) keeping the 2 largest ``|w|`` of every 4 along the input dim.

    ``weight`` is ``[out, in]`` (or ``[out, in, 1]`` for a 1x1 Conv1d) with ``in % 4 == 0``.
    """
    matrix = check_weight(weight).detach().reshape(weight.shape[0], -1)
    out_features, in_features = matrix.shape
    if in_features % GROUP:
        raise ValueError(
            f"weight: 2:4 sparsity groups 4 consecutive inputs, so in_features must be a multiple of 4, "
            f"got {in_features}"
        )
    scores = matrix.abs().to(torch.float64 if matrix.dtype == torch.float64 else torch.float32)
    if bool(torch.isnan(scores).any()):
        raise ValueError("weight: contains NaN; magnitude pruning needs finite weights")
    groups = scores.reshape(out_features, in_features // GROUP, GROUP)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :KEEP], True)
    return keep.reshape(weight.shape)


def is_two_four(mask_or_weight: torch.Tensor) -> bool:
    """Whether every group of 4 along the input dim holds at most 2 non-zero (kept) entries."""
    matrix = mask_or_weight.reshape(mask_or_weight.shape[0], -1)
    if matrix.shape[1] % GROUP:
        return False
    return bool(((matrix != 0).reshape(matrix.shape[0], -1, GROUP).sum(-1) <= KEEP).all())


def semi_structured_constraints() -> tuple[str, dict[torch.dtype, tuple[int, int]]]:
    """``(backend, {dtype: (rows multiple, cols multiple)})`` of the weights
    ``torch.sparse.to_sparse_semi_structured`` accepts in this PyTorch (cuSPARSELt unless
    PyTorch is forced to CUTLASS), read from PyTorch's own tables so that the checks below say
    what PyTorch would refuse, on any device."""
    from torch.sparse import semi_structured as sst

    cls = sst.SparseSemiStructuredTensorCUTLASS if sst.SparseSemiStructuredTensor._FORCE_CUTLASS \
        else sst.SparseSemiStructuredTensorCUSPARSELT
    return cls.BACKEND, {dtype: (c.sparse_min_rows, c.sparse_min_cols) for dtype, c in cls._DTYPE_SHAPE_CONSTRAINTS.items()}


def _unsupported(weight: torch.Tensor) -> str:
    """Why PyTorch's semi-structured format cannot hold ``weight`` (``""`` if it can)."""
    backend, constraints = semi_structured_constraints()
    if weight.dtype not in constraints:
        names = ", ".join(str(d).replace("torch.", "") for d in constraints)
        return f"its dtype {weight.dtype} is not one {backend} takes ({names})"
    rows, cols = constraints[weight.dtype]
    out_features, in_features = weight.shape
    if out_features % rows or in_features % cols:
        return (f"its {tuple(weight.shape)} weight is not a multiple of ({rows}, {cols}) "
                f"(out_features, in_features), as {backend} needs for {weight.dtype}")
    return ""


def to_semi_structured(model: nn.Module) -> nn.Module:
    """Store the weight of every 2:4-pruned ``nn.Linear`` as a PyTorch semi-structured sparse tensor.

    The layers must be on a CUDA device of compute capability >= 8.0 (PyTorch's semi-structured
    kernels, cuSPARSELt or CUTLASS, are GPU only), in a dtype and shape PyTorch takes (with
    cuSPARSELt: float16/bfloat16, both dims multiples of 16; :func:`semi_structured_constraints`).
    The mask is baked in (the layer becomes a plain ``nn.Linear`` with a sparse, non-trainable
    weight: inference only). 2:4-pruned 1x1 ``Conv1d`` layers stay masked dense layers, with a
    warning naming them. Returns the model (modified in place). Anything else is an error naming
    every layer concerned, raised before any layer changes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    two_four = [(n or "<root>", m) for n, m in model.named_modules()
                if (p := _mask_parametrization(m)) is not None and p.structure == PATTERN]
    chosen = [(n, m) for n, m in two_four if isinstance(m, nn.Linear)]
    if not chosen:
        raise ValueError("model: no nn.Linear pruned with pattern='2:4' (prune with effst.prune.l1p(model, 0.5, pattern='2:4') first)")
    others = [n for n, m in two_four if not isinstance(m, nn.Linear)]
    if others:
        warnings.warn(f"{', '.join(others)}: 2:4-pruned but not nn.Linear; they stay masked dense layers "
                      "(PyTorch's semi-structured weights serve linear layers only)", UserWarning, stacklevel=2)
    unsupported = [f"{n}: {why}" for n, m in chosen if (why := _unsupported(m.weight))]
    if unsupported:
        raise ValueError("torch.sparse.to_sparse_semi_structured cannot take these weights: " + "; ".join(unsupported))
    for label, module in chosen:
        weight = module.weight
        if weight.device.type != "cuda":
            raise RuntimeError(
                f"{label}: its weight is on {weight.device}; PyTorch's semi-structured sparse kernels "
                "(cuSPARSELt/CUTLASS) run only on CUDA GPUs of compute capability >= 8.0. Move the model "
                "to the GPU first, or keep the masked dense layers on the CPU."
            )
        capability = torch.cuda.get_device_capability(weight.device)
        if capability < (8, 0):
            raise RuntimeError(f"{label}: {weight.device} has compute capability {capability[0]}.{capability[1]}; "
                               "PyTorch's semi-structured sparse kernels need >= 8.0 (Ampere or newer)")
        if not is_two_four(weight):
            raise ValueError(f"{label}: its weight has more than 2 non-zeros in some group of 4 inputs")
    from torch.sparse import to_sparse_semi_structured

    converted = []  # every layer converts before any is changed: an error leaves the model as it was
    for label, module in chosen:
        dense = module.weight.detach()
        try:
            converted.append((module, to_sparse_semi_structured(dense)))
        except (RuntimeError, ValueError, NotImplementedError) as err:
            raise RuntimeError(f"{label}: torch.sparse.to_sparse_semi_structured refused its "
                               f"{tuple(dense.shape)} {dense.dtype} weight: {err}") from None
    for module, sparse in converted:
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        module.weight = nn.Parameter(sparse, requires_grad=False)
    return model
