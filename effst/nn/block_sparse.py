"""``BlockSparseLinear``: a drop-in ``nn.Linear`` whose weight keeps only some ``bm x bk`` tiles.

State (what ``state_dict`` holds):

* ``values``  ``[nnz, bm, bk]`` Parameter -- the kept tiles, row-ordered (see
  :mod:`effst.ops.block_sparse_linear`); the only trainable weight storage.
* ``bias``    ``[out_features]`` Parameter (optional).
* ``block_mask`` ``[ceil(out/bm), ceil(in/bk)]`` bool buffer -- which tiles are kept; the
  single source of truth for the index tensors, which are rebuilt from it (non-persistent).

A checkpoint loads into any ``BlockSparseLinear`` with the same ``in_features`` /
``out_features``: the receiving module adopts the checkpoint's block mask and block size.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from effst.ops.block_sparse_linear import (
    BACKENDS,
    DEFAULT_BLOCK_SIZE,
    FLOAT_DTYPES,
    BlockSize,
    block_grid_shape,
    block_sparse_linear_unchecked,
    blocks_to_dense,
    build_block_layout,
    check_block_size,
    check_input_dtype,
    dense_to_blocks,
    expand_block_mask,
    tiles_with_any,
    use_triton,
    BlockLayout,
)
from effst.ops.spike_bytes import SpikeBytes
from effst.ops.magnitude import keep_above_kth, tile_l1_norms

_LAYOUT_BUFFERS = BlockLayout._fields


class BlockSparseLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored as its kept ``block_size`` tiles only.

    Args:
        in_features, out_features: as ``nn.Linear``.
        bias: learn an additive bias.
        block_size: tile shape ``(rows of W, cols of W)`` or an int; powers of two >= 16.
        block_mask: bool ``[ceil(out/bm), ceil(in/bk)]`` of kept tiles (default: all kept).
        backend: ``'auto'`` (Triton on CUDA / under the Triton interpreter, the torch
            gather-based implementation on CPU), ``'triton'`` or ``'torch'``.

    Input ``[..., in_features]`` of any leading shape, floating with the weight dtype (or any
    float dtype under ``torch.autocast``) or bool/uint8 spikes, which are read as bytes and get
    no gradient, or :class:`~effst.ops.spike_bytes.SpikeBytes` (sLIF spikes as bytes in training:
    the bytes are read and saved, the gradient returned in its float dtype). Kept tiles are initialised like ``nn.Linear`` (U(-1/sqrt(in), 1/sqrt(in))).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        block_size: BlockSize = DEFAULT_BLOCK_SIZE,
        block_mask: Optional[torch.Tensor] = None,
        backend: str = "auto",
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype: expected None or one of {FLOAT_DTYPES}, got {dtype!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = check_block_size(block_size)
        self.backend = backend
        grid = block_grid_shape(out_features, in_features, self.block_size)
        if block_mask is None:
            block_mask = torch.ones(grid, dtype=torch.bool, device=device)
        else:
            block_mask = _check_block_mask(block_mask, grid, self.block_size, out_features, in_features, "block_mask")
            block_mask = block_mask.to(device=device if device is not None else block_mask.device)
        self.register_buffer("block_mask", block_mask.clone())
        nnz = int(block_mask.sum())
        bm, bk = self.block_size
        factory = {"device": self.block_mask.device, "dtype": dtype}
        self.values = nn.Parameter(torch.empty((nnz, bm, bk), **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self._set_layout(self.block_mask)
        self.reset_parameters()

    # -- layout --------------------------------------------------------------------------------
    def _set_layout(self, block_mask: torch.Tensor) -> None:
        layout = build_block_layout(block_mask, self.block_size)
        for name in _LAYOUT_BUFFERS:
            self.register_buffer(name, getattr(layout, name), persistent=False)

    @property
    def layout(self) -> BlockLayout:
        """Index tensors of the kept tiles (row- and column-ordered)."""
        buffers = self._buffers  # read directly: nn.Module.__getattr__ costs ~1 µs a name
        return BlockLayout._make([buffers[name] for name in _LAYOUT_BUFFERS])

    @property
    def nnz_blocks(self) -> int:
        """Number of kept tiles."""
        return int(self.values.shape[0])

    @property
    def block_sparsity(self) -> float:
        """Fraction of tiles removed."""
        return 1.0 - self.nnz_blocks / max(self.block_mask.numel(), 1)

    def element_mask(self) -> torch.Tensor:
        """Bool ``[out, in]`` mask of the weight entries that lie in kept tiles."""
        return expand_block_mask(self.block_mask, self.block_size, (self.out_features, self.in_features))

    # -- parameters ----------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``nn.Linear``'s default init on the kept tiles; padding past the edges stays zero."""
        bound = 1.0 / math.sqrt(self.in_features)
        dense = torch.empty(
            (self.out_features, self.in_features), device=self.values.device, dtype=self.values.dtype
        ).uniform_(-bound, bound)
        self.values.copy_(dense_to_blocks(dense, self.block_mask, self.block_size))
        if self.bias is not None:
            self.bias.uniform_(-bound, bound)

    def to_dense(self) -> torch.Tensor:
        """The dense ``[out_features, in_features]`` weight (zeros off the kept tiles; differentiable)."""
        return blocks_to_dense(self.values, self.block_mask, self.out_features, self.in_features)

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the same (dense) weight and bias."""
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None,
            device=self.values.device, dtype=self.values.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        sparsity: Optional[float] = None,
        block_size: BlockSize = DEFAULT_BLOCK_SIZE,
        mask: Optional[torch.Tensor] = None,
        backend: str = "auto",
    ) -> "BlockSparseLinear":
        """Convert an ``nn.Linear`` (pruned or not) to block-compressed storage.

        Which tiles are kept:
        * ``mask`` given: a bool block mask ``[ceil(out/bm), ceil(in/bk)]``, or an element mask
          of the weight's shape (a tile is kept if any of its entries is; entries outside the
          element mask are zeroed);
        * else ``sparsity`` given: block L1P at that sparsity (tiles scored by their L1 norm);
        * else: the layer's own pruning mask if it has one (a ``weight`` parametrization holding a
          bool ``mask`` of the weight's shape, as :mod:`effst.prune` makes), otherwise every tile
          that holds a non-zero weight.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        if mask is not None and sparsity is not None:
            raise ValueError("from_dense: give either mask or sparsity, not both")
        bm, bk = check_block_size(block_size)
        weight = linear.weight.detach()  # the masked weight when the layer is pruned
        out_features, in_features = weight.shape
        grid = block_grid_shape(out_features, in_features, (bm, bk))
        if mask is not None:
            mask = torch.as_tensor(mask, device=weight.device)
            if tuple(mask.shape) == tuple(weight.shape):
                element = _as_bool_mask(mask)
                weight = torch.where(element, weight, torch.zeros_like(weight))
                block_mask = tiles_with_any(element, (bm, bk))
            else:
                block_mask = _check_block_mask(mask, grid, (bm, bk), out_features, in_features, "mask", element_ok=True)
        elif sparsity is not None:
            block_mask = keep_above_kth(tile_l1_norms(weight, bm, bk), _check_sparsity(sparsity))
        else:
            element = _parametrized_mask(linear)
            if element is None:
                element = weight != 0
            block_mask = tiles_with_any(element, (bm, bk))
        module = cls(
            in_features, out_features, bias=linear.bias is not None, block_size=(bm, bk),
            block_mask=block_mask, backend=backend, device=weight.device, dtype=weight.dtype,
        )
        with torch.no_grad():
            module.values.copy_(dense_to_blocks(weight, module.block_mask, (bm, bk)))
            if linear.bias is not None:
                module.bias.copy_(linear.bias.detach())
        return module

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, bias = self.values, self.bias
        if torch.is_autocast_enabled(x.device.type):
            # Like nn.Linear under autocast: compute in the autocast dtype (spikes stay bytes).
            dtype = torch.get_autocast_dtype(x.device.type)
            values = values.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
            if x.is_floating_point() and type(x) is not SpikeBytes:  # (SpikeBytes: read as bytes)
                x = x.to(dtype)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected shape [..., {self.in_features}], got {tuple(x.shape)}")
        if x.dtype != values.dtype:
            check_input_dtype(x, values.dtype)
        triton_path = use_triton(x.device, self.backend)
        if self.backend == "triton" and not triton_path:
            raise RuntimeError("backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)")
        # The layer's own state was validated when it was set (construction, loading); the
        # launch parameters are cached per call shape by the op (one autograd node per call).
        return block_sparse_linear_unchecked(x, values, self.layout, self.out_features, bias, triton_path)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"block_size={self.block_size}, kept_blocks={self.nnz_blocks}/{self.block_mask.numel()}, "
            f"backend={self.backend!r}"
        )

    # -- checkpoints ---------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Adopt the checkpoint's block structure (kept tiles and block size) before the
        # default loader copies tensors, so a checkpoint loads into any module of equal size.
        mask_key, values_key = prefix + "block_mask", prefix + "values"
        if mask_key in state_dict and values_key in state_dict:
            mask, values = state_dict[mask_key], state_dict[values_key]
            try:
                if values.dim() != 3:
                    raise ValueError(f"{values_key}: expected [nnz, bm, bk], got shape {tuple(values.shape)}")
                block = check_block_size((int(values.shape[1]), int(values.shape[2])), f"{values_key} block shape")
                grid = block_grid_shape(self.out_features, self.in_features, block)
                mask = _check_block_mask(mask, grid, block, self.out_features, self.in_features, mask_key)
                if int(mask.sum()) != values.shape[0]:
                    raise ValueError(
                        f"{values_key}: holds {values.shape[0]} tiles but {mask_key} keeps {int(mask.sum())}"
                    )
            except (ValueError, TypeError) as err:
                error_msgs.append(str(err))
                return
            if tuple(mask.shape) != tuple(self.block_mask.shape) or not torch.equal(mask.to(self.block_mask.device), self.block_mask):
                self.block_size = block
                self.block_mask = mask.to(device=self.block_mask.device, dtype=torch.bool).clone()
                self.values = nn.Parameter(
                    torch.empty(tuple(values.shape), device=self.values.device, dtype=self.values.dtype),
                    requires_grad=self.values.requires_grad,
                )
                self._set_layout(self.block_mask)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


def _parametrized_mask(linear: nn.Linear) -> Optional[torch.Tensor]:
    """The bool keep-mask of a masked weight parametrization (effst.prune's), else None.

    Read by duck typing so that ``nn`` does not import ``prune`` (which imports ``nn``)."""
    if not torch.nn.utils.parametrize.is_parametrized(linear, "weight"):
        return None
    for p in linear.parametrizations["weight"]:
        mask = getattr(p, "mask", None)
        if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.shape == linear.weight.shape:
            return mask
    return None


def _check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity: expected a number in [0, 1), got {type(sparsity).__name__}")
    if not (0.0 <= float(sparsity) < 1.0):  # also rejects NaN
        raise ValueError(f"sparsity: expected a number in [0, 1) (the fraction removed), got {sparsity!r}")
    return float(sparsity)


def _check_block_mask(mask, grid, block_size, out_features, in_features, name: str, element_ok=False) -> torch.Tensor:
    """A bool block mask of shape ``grid`` or a clear error naming the argument ``name``."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a bool tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(grid):
        also = f" or an element mask of shape {(out_features, in_features)}" if element_ok else ""
        raise ValueError(
            f"{name}: expected a block mask of shape {tuple(grid)} (tiles of {tuple(block_size)} over a "
            f"[{out_features}, {in_features}] weight){also}, got shape {tuple(mask.shape)}"
        )
    return _as_bool_mask(mask, name)


def _as_bool_mask(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """``mask`` as bool; a float mask or integers other than 0/1 are an error, not truncated."""
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.is_complex() or bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"{name}: expected a bool (or 0/1 integer) tensor, got dtype {mask.dtype}")
        mask = mask.to(torch.bool)
    return mask
