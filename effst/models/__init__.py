"""Spikformer models (docs/pruning.md), their parameter counts and firing-rate / energy records."""
from effst.models.activity import E_AC_PJ, E_MAC_PJ, FiringRateRecorder, record_firing_rates
from effst.models.spikformer import (
    CONFIGS,
    NEURONS,
    VARIANTS,
    Block,
    MLP,
    SPS,
    SSA,
    Spikformer,
    SpikformerConfig,
    build_model,
    build_model_from_spec,
    count_parameters,
    effective_weight,
    make_neuron,
    prune_targets,
    unwrap,
)
from effst.models.token_selection import SELECTORS, TokenSelection, distillation_loss
from effst.models.flops import spikformer_macs

__all__ = [
    "CONFIGS", "NEURONS", "VARIANTS", "Block", "MLP", "SPS", "SSA", "Spikformer", "SpikformerConfig",
    "build_model", "build_model_from_spec", "count_parameters", "effective_weight", "make_neuron",
    "prune_targets", "unwrap", "record_firing_rates", "SELECTORS", "TokenSelection", "distillation_loss",
    "spikformer_macs", "FiringRateRecorder", "E_AC_PJ", "E_MAC_PJ",
]
