"""Per-layer and total sparsity and parameter counts of a (pruned) model."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from effst.nn.block_sparse import BlockSparseLinear
from effst.nn.weight_counts import weight_counts, weight_mask  # noqa: F401 (also exported here)
from effst.prune.masks import _mask_parametrization, check_module, is_prunable


@dataclass
class LayerReport:
    """One linear layer: dense weight entries, entries kept, and the resulting sparsity."""

    name: str
    kind: str  # "Linear" | "Conv1d" | "BlockSparseLinear"
    shape: tuple[int, ...]
    structure: str  # "dense" | "element" | "block" (mask of block L1P / random block) | "block-compressed"
    params: int
    kept: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.params if self.params else 0.0


@dataclass
class PruneReport:
    """Sparsity of the linear layers and parameter counts of the whole model.

    ``params``/``kept``/``sparsity``: over the linear layers listed in ``layers``.
    ``model_params``: every parameter of the model counted dense (a BlockSparseLinear as its
    dense ``out x in`` weight); ``model_kept``: the same minus every pruned entry, those of
    masked non-linear layers (IMP's convolutions) included.
    """

    layers: list[LayerReport] = field(default_factory=list)
    model_params: int = 0
    model_kept: int = 0

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def kept(self) -> int:
        return sum(layer.kept for layer in self.layers)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.params if self.params else 0.0

    @property
    def compression_ratio(self) -> float:
        """Dense parameters / kept parameters of the whole model."""
        return self.model_params / self.model_kept if self.model_kept else float("inf")

    def to_dict(self) -> dict:
        """Plain-data form (JSON-serialisable)."""
        return {
            "layers": [dict(asdict(layer), shape=list(layer.shape), sparsity=layer.sparsity) for layer in self.layers],
            "params": self.params,
            "kept": self.kept,
            "sparsity": self.sparsity,
            "model_params": self.model_params,
            "model_kept": self.model_kept,
            "compression_ratio": self.compression_ratio,
        }

    def __str__(self) -> str:
        width = max([len(layer.name) for layer in self.layers] + [5])
        lines = [f"{'layer':<{width}}  {'kind':<17} {'structure':<16} {'params':>10} {'kept':>10} {'sparsity':>8}"]
        for layer in self.layers:
            lines.append(
                f"{layer.name:<{width}}  {layer.kind:<17} {layer.structure:<16} {layer.params:>10} {layer.kept:>10} {layer.sparsity:>8.2%}"
            )
        lines.append(f"{'linear total':<{width}}  {'':<17} {'':<16} {self.params:>10} {self.kept:>10} {self.sparsity:>8.2%}")
        lines.append(
            f"model: {self.model_params} parameters, {self.model_kept} kept, compression {self.compression_ratio:.2f}x"
        )
        return "\n".join(lines)


def report(model: nn.Module) -> PruneReport:
    """Sparsity of every nn.Linear / 1x1 Conv1d / BlockSparseLinear in ``model`` and totals."""
    check_module(model)
    result = PruneReport()
    seen: set[int] = set()
    pruned_total = 0
    dense_extra = 0  # BlockSparseLinear: dense size minus stored values size
    for name, module in model.named_modules():
        if isinstance(module, BlockSparseLinear):
            params, kept = weight_counts(module)
            result.layers.append(LayerReport(name, "BlockSparseLinear", (module.out_features, module.in_features),
                                             "block-compressed", params, kept))
            pruned_total += params - kept
            dense_extra += params - module.values.numel()
        elif is_prunable(module):
            weight = module.weight
            mask_p = _mask_parametrization(module)
            _, kept = weight_counts(module)
            structure = "dense" if mask_p is None else mask_p.structure
            # isinstance, not type().__name__: a masked layer's class is torch's "ParametrizedLinear".
            kind = "Linear" if isinstance(module, nn.Linear) else "Conv1d"
            result.layers.append(LayerReport(name, kind, tuple(weight.shape), structure, weight.numel(), kept))
            pruned_total += weight.numel() - kept
        elif isinstance(getattr(module, "weight", None), torch.Tensor) and weight_mask(module) is not None:
            # a masked layer that is not a linear one (IMP prunes convolutions too): not listed,
            # but its pruned entries are not kept parameters of the model
            params, kept = weight_counts(module)
            pruned_total += params - kept
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            result.model_params += p.numel()
    result.model_params += dense_extra
    result.model_kept = result.model_params - pruned_total
    return result
