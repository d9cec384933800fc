"""Pruning: L1P (element and block), the random control, reports, and mask helpers.

Masks are module state (``state_dict`` keys ``*.parametrizations.weight.0.mask``), applied in
the forward; see :mod:`effst.prune.masks` for how pruned checkpoints load.
"""
from effst.prune.convert import to_block_sparse
from effst.prune.l1p import (
    DEFAULT_BLOCK_SIZE,
    block_l1p,
    block_l1p_mask,
    check_sparsity,
    expand_block_mask,
    fit_block_pruning,
    l1p,
    l1p_mask,
    random,
    resolve_targets,
    tile_l1_norms,
)
from effst.prune.masks import (
    WeightMask,
    apply_mask,
    get_mask,
    is_prunable,
    is_pruned,
    load_pruned_state_dict,
    pruned_modules,
    remove,
    strip_masks,
)
from effst.prune.report import LayerReport, PruneReport, report
from effst.prune.semi_structured import is_two_four, semi_structured_constraints, to_semi_structured, two_four_mask

__all__ = [
    "l1p", "block_l1p", "random", "report", "to_block_sparse", "dsp", "dsp_random", "dsp_weight_sparsity",
    "l1p_mask", "block_l1p_mask", "tile_l1_norms", "expand_block_mask", "check_sparsity", "resolve_targets",
    "WeightMask", "apply_mask", "get_mask", "is_prunable", "is_pruned", "pruned_modules", "remove",
    "strip_masks", "load_pruned_state_dict", "LayerReport", "PruneReport",
    "DEFAULT_BLOCK_SIZE", "fit_block_pruning", "to_semi_structured", "two_four_mask", "is_two_four",
    "semi_structured_constraints",
]
# Structured pruning (DSP) is exported below by its own module.
from effst.prune.dsp import dsp, dsp_random, dsp_weight_sparsity
