"""Block-sparse linear layer ``Y = X @ W.T + b`` whose weight keeps only some ``bm x bk`` tiles.

The math and the layout are written out in docs/block_sparse.md; in short, for a weight ``W``
of shape ``[N, K] = [out_features, in_features]`` and a ``[ceil(N/bm), ceil(K/bk)]`` block mask:

* ``values [nnz, bm, bk]`` -- the kept tiles in *row order* (block-row major, columns ascending),
  zero-padded past ``N``/``K`` on the bottom/right edge.
* :class:`BlockLayout` (built once, by :func:`build_block_layout`, when the mask is set):
  CSR/CSC index tensors for the torch implementation, and two *group lookup tables* for the
  Triton kernels. Block-rows are grouped ``row_group`` at a time (``row_group * bm`` >= 64 output
  columns, a wide MMA); each group lists the union of its kept block-columns and, for every such
  column, the value index of each member's tile (-1: not kept, read as zeros). Block-columns are
  grouped the same way for ``dX``.

The kernels (each reads the kept tiles in place, fp32 accumulation, output in the layer dtype):

* forward      persistent; a program owns ``BLOCK_M`` rows x one group of block-rows and walks
               the group's columns: each X slab ``[BLOCK_M, bk]`` is loaded once and feeds an
               MMA ``[BLOCK_M, bk] x [bk, row_group*bm]``; loads pipelined with ``tl.range``.
* grad input   the same over groups of block-columns: ``dX[:, group] += dY[:, r] W_r,group``.
* grad weight  one program per (``col_group`` consecutive entries of a row group, M slice):
               ``dW = dY[:, group]^T X[:, those columns]``, an MMA ``[row_group*bm, col_group*bk]``
               (<= 128 x 128), so dY is read once per ``col_group`` kept columns; the group's
               first program also sums the bias gradient from the dY it already holds. With one M slice the result is written in the layer
               dtype; with several, fp32 partials are summed in a fixed order by one kernel
               that also finishes the bias gradient (deterministic).

Inputs ``[..., K]`` are flattened to ``[M, K]``; they are fp32/fp16/bf16/fp64 with the dtype of
``values``, or bool/uint8 spikes, read as one byte and widened in registers (exact; no gradient),
or a :class:`~effst.ops.spike_bytes.SpikeBytes` (spikes as bytes with a gradient path: its bytes
are read and saved for grad weight, and grad x is returned in its float dtype).
fp32 products follow ``torch.backends.cuda.matmul.allow_tf32`` exactly as ``F.linear`` does.

Launch configurations are cached per (shape, tile, dtype, TF32, layout work: kept tiles and
lookup-table entries); on CUDA the first eager call of a
configuration times a few candidates and keeps the fastest (``EFFST_BSL_AUTOTUNE=0`` keeps the
fixed default), and each kernel is launched through effst.ops.launch's cache of compiled
kernels (``CompiledKernel.run`` after a specialisation's first launch; ``EFFST_BSL_LAUNCH_CACHE=0``
launches through ``kernel[grid]``). Where Triton cannot run (CPU tensors outside
``TRITON_INTERPRET=1``) the same products run as a torch implementation that touches only the kept tiles (``backend='torch'``
selects it anywhere). Eager calls go through one ``torch.autograd.Function``; under
``torch.compile`` the same launchers are wrapped as the custom ops ``effst::block_sparse_linear``
(+ gradient ops) with fake implementations, so graphs trace without breaks.
"""
from __future__ import annotations

import functools
import math
import numbers
import os
from typing import NamedTuple, Optional, Sequence, Union

import torch
import triton
import triton.language as tl

from effst.ops import launch as _launch
from effst.ops.first_order import first_order_only
from effst.ops.layout import BYTE_DTYPES, FLOAT_DTYPES
from effst.ops.spike_bytes import SpikeBytes

BlockSize = Union[int, Sequence[int]]

BACKENDS = ("auto", "triton", "torch")
DEFAULT_BLOCK_SIZE: tuple[int, int] = (128, 128)  # re-exported as effst.prune.DEFAULT_BLOCK_SIZE; why: docs/block_sparse.md
GROUP_WIDTH = 128  # columns a forward / grad-input program produces per block group (MMA width)


# ---------------------------------------------------------------------------------------------
# Block size and block-compressed layout
# ---------------------------------------------------------------------------------------------
def check_block_size(block_size: BlockSize, name: str = "block_size") -> tuple[int, int]:
    """Validate a block size (an int or a ``(rows, cols)`` pair) -> ``(bm, bk)``.

    Each side must be a power of two >= 16 (the smallest tile a tensor-core dot accepts).
    """
    if isinstance(block_size, bool):
        raise TypeError(f"{name}: expected an int or a (rows, cols) pair of ints, got bool")
    if isinstance(block_size, numbers.Integral):
        sides = (block_size, block_size)
    elif isinstance(block_size, (tuple, list, torch.Size)) and len(block_size) == 2:
        sides = tuple(block_size)
    else:
        raise TypeError(f"{name}: expected an int or a (rows, cols) pair of ints, got {block_size!r}")
    for side in sides:
        if isinstance(side, bool) or not isinstance(side, numbers.Integral):
            raise TypeError(f"{name}: expected ints, got {block_size!r}")
        if side < 16 or side & (side - 1):
            raise ValueError(f"{name}: each side must be a power of two >= 16 (16, 32, 64, ...), got {block_size!r}")
    return int(sides[0]), int(sides[1])


def block_grid_shape(out_features: int, in_features: int, block_size: BlockSize) -> tuple[int, int]:
    """Shape ``(ceil(N/bm), ceil(K/bk))`` of the block mask of an ``[N, K]`` weight."""
    bm, bk = check_block_size(block_size)
    return -(-out_features // bm), -(-in_features // bk)


class BlockLayout(NamedTuple):
    """Index tensors (int32, on the mask's device) of the kept tiles; see the module doc.

    ``row_group_tile`` is ``[entries, row_group]`` and ``col_group_tile`` ``[entries, col_group]``,
    so the group sizes are part of the tensors' shapes (no host synchronisation to read them).
    """

    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    row_idx: torch.Tensor
    col_ptr: torch.Tensor
    csc_row_idx: torch.Tensor
    csc_perm: torch.Tensor
    row_group_ptr: torch.Tensor  # [row groups + 1] entries of each group of block-rows
    row_group_col: torch.Tensor  # [entries] block-column of each entry
    row_group_tile: torch.Tensor  # [entries, row_group] value index of each member's tile, -1 if pruned
    row_group_of: torch.Tensor  # [entries] the group of each entry
    col_group_ptr: torch.Tensor  # [column groups + 1]
    col_group_row: torch.Tensor  # [entries] block-row of each entry
    col_group_tile: torch.Tensor  # [entries, col_group]
    row_group_chunk: torch.Tensor  # [chunks] first entry of each run of col_group entries of a row group (dW)


def group_size(side: int, blocks: int) -> int:
    """Blocks per group so that a group spans ``GROUP_WIDTH`` columns (at most ``blocks``, a power of two)."""
    return max(1, min(GROUP_WIDTH // side, _next_pow2(blocks)))


def _group_entries(position: torch.Tensor, group: int, dummy_for_empty: bool):
    """Lookup table of ``position`` ([blocks, other] value index or -1) grouped ``group`` rows at a time.

    Returns ``(ptr [groups+1], other [entries], tile [entries, group], group_of [entries])``.
    With ``dummy_for_empty`` a group without tiles gets one entry at column 0 whose tiles are all
    -1, so the grad-weight kernel has a program to sum that group's bias gradient.
    """
    blocks, other = position.shape
    groups = -(-blocks // group)
    padded = torch.full((groups * group, other), -1, dtype=torch.int64)
    padded[:blocks] = position
    grouped = padded.view(groups, group, other)
    present = (grouped >= 0).any(dim=1)
    if dummy_for_empty and other > 0:
        present[~present.any(dim=1), 0] = True
    group_of, other_idx = present.nonzero(as_tuple=True)  # group-major, `other` ascending
    tile = grouped[group_of, :, other_idx]  # [entries, group]
    ptr = torch.zeros(groups + 1, dtype=torch.int64)
    ptr[1:] = present.sum(dim=1).cumsum(0)
    return ptr, other_idx, tile.reshape(-1, group), group_of


def build_block_layout(block_mask: torch.Tensor, block_size: BlockSize = (32, 32)) -> BlockLayout:
    """Row-, column- and group-ordered indices of the True entries of a 2-D block mask.

    Deterministic; built on the CPU (once per mask) and moved to the mask's device.
    ``block_size`` sets the group sizes (the kernels' MMA widths): give the tile of the values
    the layout will be used with (:func:`block_sparse_linear` refuses another).
    """
    if block_mask.dim() != 2:
        raise ValueError(f"block_mask: expected a 2-D [block_rows, block_cols] mask, got shape {tuple(block_mask.shape)}")
    bm, bk = check_block_size(block_size)
    device = block_mask.device
    mask = block_mask.detach().to(device="cpu", dtype=torch.bool)
    nbr, nbc = mask.shape
    rows, cols = mask.nonzero(as_tuple=True)  # row-major order: the order of `values`
    nnz = rows.numel()
    row_ptr = torch.zeros(nbr + 1, dtype=torch.int64)
    row_ptr[1:] = mask.sum(dim=1).cumsum(0)
    col_ptr = torch.zeros(nbc + 1, dtype=torch.int64)
    col_ptr[1:] = mask.sum(dim=0).cumsum(0)
    position = torch.full((nbr, nbc), -1, dtype=torch.int64)
    position[rows, cols] = torch.arange(nnz)
    csc_cols, csc_rows = mask.t().nonzero(as_tuple=True)  # column-major order
    csc_perm = position[csc_rows, csc_cols]
    row_groups = _group_entries(position, group_size(bm, nbr), dummy_for_empty=True)
    col_group = group_size(bk, nbc)
    col_groups = _group_entries(position.t(), col_group, dummy_for_empty=False)[:3]
    # dW programs take col_group entries of a row group at a time (the same width as dX's groups).
    group_ptr, _, _, group_of = row_groups
    offset_in_group = torch.arange(group_of.numel()) - group_ptr[group_of]
    chunks = (offset_in_group % col_group == 0).nonzero().flatten()
    tensors = (row_ptr, cols, rows, col_ptr, csc_rows, csc_perm, *row_groups, *col_groups, chunks)
    return BlockLayout(*(t.to(device=device, dtype=torch.int32).contiguous() for t in tensors))


def expand_block_mask(block_mask: torch.Tensor, block_size: BlockSize, shape: Sequence[int]) -> torch.Tensor:
    """Element mask of ``shape`` (``[out, in]``, or ``[out, in, 1]`` for a 1x1 Conv1d) from a tile mask."""
    bm, bk = check_block_size(block_size)
    full = block_mask.repeat_interleave(bm, 0).repeat_interleave(bk, 1)
    return full[: shape[0], : math.prod(shape[1:])].reshape(tuple(shape))


def tiles_with_any(element_mask: torch.Tensor, block_size: BlockSize) -> torch.Tensor:
    """Block mask ``[ceil(N/bm), ceil(K/bk)]`` keeping every tile of an ``[N, K]`` element mask
    that holds at least one True entry."""
    bm, bk = check_block_size(block_size)
    n, k = element_mask.shape
    nbr, nbc = -(-n // bm), -(-k // bk)
    padded = torch.nn.functional.pad(element_mask.to(torch.bool), (0, nbc * bk - k, 0, nbr * bm - n))
    return padded.reshape(nbr, bm, nbc, bk).any(dim=3).any(dim=1)


def dense_to_blocks(weight: torch.Tensor, block_mask: torch.Tensor, block_size: BlockSize) -> torch.Tensor:
    """Kept tiles of a dense ``[N, K]`` weight, in row order, as ``[nnz, bm, bk]`` (zero-padded)."""
    bm, bk = check_block_size(block_size)
    n, k = weight.shape
    nbr, nbc = -(-n // bm), -(-k // bk)
    if tuple(block_mask.shape) != (nbr, nbc):
        raise ValueError(f"block_mask: expected shape {(nbr, nbc)} for a {tuple(weight.shape)} weight and block {(bm, bk)}, got {tuple(block_mask.shape)}")
    padded = torch.nn.functional.pad(weight, (0, nbc * bk - k, 0, nbr * bm - n))
    tiles = padded.reshape(nbr, bm, nbc, bk).permute(0, 2, 1, 3)
    return tiles[block_mask.to(torch.bool)].contiguous()


def blocks_to_dense(values: torch.Tensor, block_mask: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`dense_to_blocks`: the ``[N, K]`` dense weight (zeros off the kept tiles)."""
    nnz, bm, bk = values.shape
    nbr, nbc = block_mask.shape
    tiles = values.new_zeros(nbr, nbc, bm, bk)
    tiles = tiles.index_put((block_mask.to(torch.bool).nonzero(as_tuple=True)), values)
    return tiles.permute(0, 2, 1, 3).reshape(nbr * bm, nbc * bk)[:out_features, :in_features]


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _bsl_forward_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, group_ptr_ptr, group_col_ptr, group_tile_ptr,
    M, K, N, stride_xm, stride_ym, num_groups, num_tiles,
    HAS_BIAS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, EVEN_K: tl.constexpr, ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    offs_w = tl.arange(0, GROUP * BM)  # output columns of the group
    member = offs_w // BM  # which block-row of the group each column belongs to
    within = offs_w % BM
    offs_k = tl.arange(0, BK)
    # Persistent: a program walks tiles (groups fastest, so neighbours share X rows in L2).
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        g = tile % num_groups
        offs_m = (tile // num_groups) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_in = offs_m < M
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        start = tl.load(group_ptr_ptr + g)
        end = tl.load(group_ptr_ptr + g + 1)
        acc = tl.zeros((BLOCK_M, GROUP * BM), dtype=ACC_DTYPE)
        for e in tl.range(start, end, num_stages=NUM_STAGES):
            cols = tl.load(group_col_ptr + e) * BK + offs_k
            if EVEN_K:
                x = tl.load(x_rows + cols[None, :], mask=m_in[:, None], other=0)
            else:
                x = tl.load(x_rows + cols[None, :], mask=m_in[:, None] & (cols[None, :] < K), other=0)
            t = tl.load(group_tile_ptr + e * GROUP + member).to(tl.int64)
            # [BK, GROUP*BM]: member i's tile transposed, zeros where it is pruned.
            w = tl.load(w_ptr + t[None, :] * (BM * BK) + within[None, :] * BK + offs_k[:, None],
                        mask=(t >= 0)[None, :], other=0)
            # bool/uint8 spikes are widened here, in registers.
            acc = tl.dot(x.to(w.dtype), w, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        out_cols = g * (GROUP * BM) + offs_w
        n_in = out_cols < N
        if HAS_BIAS:
            acc += tl.load(b_ptr + out_cols, mask=n_in, other=0).to(ACC_DTYPE)[None, :]
        y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + out_cols[None, :]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_in[:, None] & n_in[None, :])


@triton.jit
def _bsl_grad_input_kernel(
    dy_ptr, w_ptr, dx_ptr, group_ptr_ptr, group_row_ptr, group_tile_ptr,
    M, K, N, stride_dym, stride_dxm, num_groups, num_tiles,
    BM: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
    EVEN_N: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    offs_w = tl.arange(0, GROUP * BK)  # input columns of the group
    member = offs_w // BK
    within = offs_w % BK
    offs_n = tl.arange(0, BM)
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        g = tile % num_groups
        offs_m = (tile // num_groups) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_in = offs_m < M
        dy_rows = dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym
        start = tl.load(group_ptr_ptr + g)
        end = tl.load(group_ptr_ptr + g + 1)
        acc = tl.zeros((BLOCK_M, GROUP * BK), dtype=ACC_DTYPE)
        for e in tl.range(start, end, num_stages=NUM_STAGES):
            rows = tl.load(group_row_ptr + e) * BM + offs_n
            if EVEN_N:
                dy = tl.load(dy_rows + rows[None, :], mask=m_in[:, None], other=0)
            else:
                dy = tl.load(dy_rows + rows[None, :], mask=m_in[:, None] & (rows[None, :] < N), other=0)
            t = tl.load(group_tile_ptr + e * GROUP + member).to(tl.int64)
            w = tl.load(w_ptr + t[None, :] * (BM * BK) + offs_n[:, None] * BK + within[None, :],
                        mask=(t >= 0)[None, :], other=0)
            acc = tl.dot(dy, w, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        cols = g * (GROUP * BK) + offs_w
        dx = dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dxm + cols[None, :]
        tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=m_in[:, None] & (cols[None, :] < K))


@triton.jit
def _bsl_grad_weight_kernel(
    dy_ptr, x_ptr, out_ptr, group_ptr_ptr, group_col_ptr, group_tile_ptr, group_of_ptr, chunk_ptr,
    M, K, N, stride_dym, stride_xm, bias_offset, rows_per_split, split_stride,
    HAS_DB: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr, COLS: tl.constexpr,
    BLOCK_M: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    # A program owns COLS consecutive entries (kept block-columns) of one group of block-rows:
    # dW[group rows, those columns] = dY[:, group]^T X[:, columns], an MMA [GROUP*BM, COLS*BK],
    # so dY is read once per COLS columns. out: [split, nnz*BM*BK + padded N] -- tile
    # gradients, then (HAS_DB, at bias_offset = nnz*BM*BK) the bias gradient.
    first = tl.load(chunk_ptr + tl.program_id(0))
    split = tl.program_id(1)
    g = tl.load(group_of_ptr + first)
    group_end = tl.load(group_ptr_ptr + g + 1)
    offs_w = tl.arange(0, GROUP * BM)
    member = offs_w // BM
    within = offs_w % BM
    offs_c = tl.arange(0, COLS * BK)
    entry = first + offs_c // BK
    within_k = offs_c % BK
    valid = entry < group_end
    cols = tl.load(group_col_ptr + entry, mask=valid, other=0) * BK + within_k
    rows = g * (GROUP * BM) + offs_w
    n_in = rows < N
    k_in = valid & (cols < K)
    m_begin = split * rows_per_split
    m_end = tl.minimum(m_begin + rows_per_split, M)
    acc = tl.zeros((GROUP * BM, COLS * BK), dtype=ACC_DTYPE)
    db = tl.zeros((GROUP * BM,), dtype=ACC_DTYPE)
    for m0 in tl.range(m_begin, m_end, BLOCK_M, num_stages=NUM_STAGES):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_in = offs_m < m_end
        offs_m64 = offs_m.to(tl.int64)[:, None]
        dy = tl.load(dy_ptr + offs_m64 * stride_dym + rows[None, :], mask=m_in[:, None] & n_in[None, :], other=0)
        x = tl.load(x_ptr + offs_m64 * stride_xm + cols[None, :], mask=m_in[:, None] & k_in[None, :], other=0)
        acc = tl.dot(tl.trans(dy), x.to(dy.dtype), acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        if HAS_DB:
            db += tl.sum(dy.to(ACC_DTYPE), axis=0)
    base = out_ptr + split.to(tl.int64) * split_stride
    t = tl.load(group_tile_ptr + entry[None, :] * GROUP + member[:, None], mask=valid[None, :], other=-1).to(tl.int64)
    dest = base + t * (BM * BK) + within[:, None] * BK + within_k[None, :]
    tl.store(dest, acc.to(out_ptr.dtype.element_ty), mask=t >= 0)
    if HAS_DB:
        # The group's first chunk owns its bias slice (every group has at least one entry).
        if tl.load(group_ptr_ptr + g) == first:
            tl.store(base + bias_offset + rows, db.to(out_ptr.dtype.element_ty))


@triton.jit
def _sum_splits_kernel(partial_ptr, out_ptr, numel, num_splits, BLOCK: tl.constexpr):
    """``out = sum_s partial[s]`` in split order (deterministic), cast to the output dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    acc = tl.zeros((BLOCK,), dtype=partial_ptr.dtype.element_ty)
    partial = partial_ptr + offs  # advanced one split at a time: 64-bit pointer arithmetic
    for _ in range(0, num_splits):
        acc += tl.load(partial, mask=inside, other=0)
        partial += numel
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=inside)


# ---------------------------------------------------------------------------------------------
# Launch configuration: fixed under the interpreter, tuned once per shape on the GPU
# ---------------------------------------------------------------------------------------------
class LaunchConfig(NamedTuple):
    block_m: int
    num_warps: int
    num_stages: int
    programs_per_sm: int = 1  # persistent grid size (forward / grad input); M slices target (grad weight)


def _kernels_interpreted() -> bool:
    """True when triton replaced the kernels by its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(_bsl_forward_kernel, triton.runtime.JITFunction)


_INTERPRETER_PROGRAMS = 3  # a small persistent grid, so the interpreter walks the tile loop too


def _cdiv(a: int, b: int) -> int:
    # Host-side integer helpers: triton.cdiv / next_power_of_2 are constexpr functions costing
    # ~3.6 µs per call from Python (11 calls were 40 µs of every fwd+bwd).
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _input_precision(dtype: torch.dtype) -> str:
    # Same rule as F.linear: fp32 products use TF32 only when torch allows it.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _candidates(kind: str, width: int, bk: int, dtype: torch.dtype) -> list[LaunchConfig]:
    """Configurations tried on the GPU, the first being the untuned default (also used under
    torch.compile, CUDA-graph capture and EFFST_BSL_AUTOTUNE=0).

    fp32 and fp64 take smaller M tiles: without TF32 (and in fp64) the products run on the FMA
    units with the operand tiles in registers, and with TF32 a 128-row tile of 128-deep fp32
    slabs over three stages needs 257 KB of shared memory, more than an sm_90 block has. Compiled
    for sm_90 at 128 x 128 tiles these defaults keep to registers and shared memory
    (tests/test_kernel_registers.py). Of the 2-byte candidates, the defaults are spill-free; the
    others are left to the autotuner's timing (with uint8 spikes two of them spill a little)."""
    if dtype == torch.float64:
        return [LaunchConfig(16, 8, 2, 4) if kind == "grad_weight" else LaunchConfig(32, 8, 2, 1)]
    if dtype == torch.float32:
        if kind == "grad_weight":
            return [LaunchConfig(64, 8, 3, 4), LaunchConfig(32, 8, 3, 4)]
        return [LaunchConfig(64, 8, 3, 1), LaunchConfig(32, 8, 2, 1)]
    if kind == "grad_weight":
        return [LaunchConfig(64, 8, 3, 4), LaunchConfig(128, 8, 3, 4), LaunchConfig(64, 4, 4, 2)]
    return [LaunchConfig(128, 8 if width >= 128 else 4, 3, 1), LaunchConfig(128, 4, 4, 2), LaunchConfig(256, 8, 3, 1)]


# Tuned configurations by (kind, device index) + the launcher's tune key: M rounded up to a power
# of two, K, N, the tile (bm, bk), the group sizes, the layout's work (kept tiles and lookup-table
# entries, so two layers of one shape and sparsity whose tiles cluster differently tune apart),
# the dtypes and TF32. Not the exact tiles: a model's layers of one shape and layout work share
# one tuning (each tuning times _candidates: 3 for 2-byte dtypes, 2 for fp32; fp64 has one).
_TUNED: dict[tuple, LaunchConfig] = {}


def _autotune_enabled(device: torch.device) -> bool:
    if device.type != "cuda" or os.environ.get("EFFST_BSL_AUTOTUNE", "1") == "0":
        return False
    # Timing synchronises: never while compiling or capturing a CUDA graph (defaults then).
    return not (torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing())


def _config(kind: str, key: tuple, device: torch.device, width: int, bk: int, dtype: torch.dtype, m: int,
            launch) -> tuple[LaunchConfig, bool]:
    """Launch config of ``kind`` for ``key`` and whether it is final (cacheable); ``launch(cfg)``
    runs the kernel once (for timing)."""
    if device.type != "cuda":
        return LaunchConfig(max(16, min(32, _next_pow2(m))), 4, 1, 1), True
    full_key = (kind, device.index) + key
    found = _TUNED.get(full_key)
    if found is not None:
        return found, True
    candidates = _candidates(kind, width, bk, dtype)
    if os.environ.get("EFFST_BSL_AUTOTUNE", "1") == "0" or len(candidates) == 1:
        _TUNED[full_key] = candidates[0]
        return candidates[0], True
    if not _autotune_enabled(device):
        return candidates[0], False  # compiling or capturing: not cached, tuned on the next eager call
    best, best_ms = candidates[0], math.inf
    for cfg in candidates:
        try:
            ms = triton.testing.do_bench(lambda: launch(cfg), warmup=3, rep=10)
        except Exception:  # noqa: BLE001 - a config that does not fit (shared memory, registers) is skipped
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    _TUNED[full_key] = best
    return best, True


def _persistent_grid(num_tiles: int, device: torch.device, cfg: LaunchConfig) -> int:
    if device.type != "cuda":
        return max(1, min(num_tiles, _INTERPRETER_PROGRAMS))
    return max(1, min(num_tiles, _sm_count(device.index) * cfg.programs_per_sm))


# Everything a launch needs besides its tensors (grid, scalars, compile-time constants, compile
# options, and its dict of compiled kernels), per exact call shape: worked out (and tuned) on the
# first call, a dict lookup after that. The key of a plan holds everything that fixes the
# kernel's binary (shapes, hence every int argument but the input row strides; every pointer's
# dtype; the constexpr flags; TF32) besides what effst.ops.launch adds (device, debug
# settings), so within a plan the compiled kernels are keyed by the row strides' int
# specialisation alone. EFFST_BSL_LAUNCH_CACHE=0 (or EFFST_LAUNCH_CACHE=0): every launch
# through ``kernel[grid](...)``.
_LAUNCHES: dict[tuple, tuple] = {}
_MAX_LAUNCHES = 4096
LAUNCH_CACHE = _launch.switch("EFFST_BSL_LAUNCH_CACHE")
# constexprs in each kernel's signature order (CompiledKernel.run takes them positionally)
_FORWARD_CONSTEXPRS = _launch.constexpr_names(_bsl_forward_kernel)
_GRAD_INPUT_CONSTEXPRS = _launch.constexpr_names(_bsl_grad_input_kernel)
_GRAD_WEIGHT_CONSTEXPRS = _launch.constexpr_names(_bsl_grad_weight_kernel)
_SUM_SPLITS_BLOCK = 1024


class _PersistentPlan(NamedTuple):
    """A forward / grad-input launch of one call shape."""

    grid: tuple
    num_groups: int
    num_tiles: int
    constexprs: dict  # in the kernel's signature order
    options: dict
    compiled: dict  # compiled kernels by specialisation (effst.ops.launch)


class _GradWeightPlan(NamedTuple):
    """A grad-weight launch (and its split reduction) of one call shape."""

    grid: tuple
    buffer_shape: tuple  # (splits, total)
    buffer_dtype: torch.dtype
    tile_numel: int
    rows_per_split: int
    constexprs: dict
    options: dict
    compiled: dict
    reduction: Optional[tuple]  # (grid, compiled kernels) of _sum_splits_kernel; None with one slice


def _in_order(names: tuple, values: dict) -> dict:
    """``values`` (one per name) in the order of ``names``."""
    if set(values) != set(names):
        raise AssertionError(f"constexprs {sorted(values)} do not match the kernel's {sorted(names)}")
    return {name: values[name] for name in names}


def _options(cfg: "LaunchConfig") -> dict:
    return {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _index_dtypes(*tensors: torch.Tensor) -> tuple:
    """Dtypes of the layout tensors a kernel reads (int32 from build_block_layout; any integer
    dtype a hand-made BlockLayout holds compiles its own kernel)."""
    return tuple([t.dtype for t in tensors])


def _new_plan(key: tuple, kind: str, tune_key: tuple, device: torch.device, width: int, bk: int, dtype: torch.dtype,
              m: int, make, run) -> tuple:
    """Launch parameters ``make(cfg)`` for the config of ``kind`` (on CUDA tuned by timing
    ``run(make(candidate))``), remembered under ``key`` once the config is final."""
    cfg, final = _config(kind, tune_key, device, width, bk, dtype, m, lambda candidate: run(make(candidate)))
    plan = make(cfg)
    if final:
        if len(_LAUNCHES) >= _MAX_LAUNCHES:
            _LAUNCHES.clear()
        _LAUNCHES[key] = plan
    return plan


# ---------------------------------------------------------------------------------------------
# Launchers (inputs: 2-D, unit stride along the last dim; outputs in the layer dtype)
# ---------------------------------------------------------------------------------------------
def _persistent_plan(cfg: LaunchConfig, m: int, num_groups: int, device: torch.device, dtype: torch.dtype,
                     names: tuple, **constants) -> _PersistentPlan:
    """(grid, num_groups, num_tiles, constexprs in the order ``names``, options, compiled-kernel
    cache) of a persistent forward / grad-input launch."""
    num_tiles = _cdiv(m, cfg.block_m) * num_groups
    constexprs = _in_order(names, dict(
        constants, BLOCK_M=cfg.block_m, ACC_DTYPE=_acc_dtype(dtype), INPUT_PRECISION=_input_precision(dtype),
        NUM_STAGES=cfg.num_stages))
    return _PersistentPlan((_persistent_grid(num_tiles, device, cfg), 1, 1), num_groups, num_tiles, constexprs,
                           _options(cfg), {})


def _triton_forward(x, values, bias, layout: BlockLayout, out_features: int) -> torch.Tensor:
    m, k = x.shape
    y = torch.empty((m, out_features), dtype=values.dtype, device=x.device)
    if m == 0:
        return y
    has_bias = bias is not None
    # Plain ints in the keys: comparing torch.Size objects in a dict lookup costs a few µs.
    nnz, bm, bk = values.shape
    key = ("forward", x.device, m, k, out_features, nnz, bm, bk, layout.row_group_tile.shape[1],
           layout.row_group_ptr.shape[0], layout.row_group_col.shape[0], values.dtype, x.dtype, bias.dtype if has_bias else None,
           _input_precision(values.dtype),
           _index_dtypes(layout.row_group_ptr, layout.row_group_col, layout.row_group_tile))
    plan = _LAUNCHES.get(key)
    if plan is None:
        group, num_groups = layout.row_group_tile.shape[1], layout.row_group_ptr.shape[0] - 1
        plan = _new_plan(
            key, "forward", (_next_pow2(m), k, out_features, bm, bk, group, nnz, layout.row_group_col.shape[0],
                             values.dtype, x.dtype, _input_precision(values.dtype)),
            x.device, group * bm, bk, values.dtype, m,
            lambda cfg: _persistent_plan(cfg, m, num_groups, x.device, values.dtype, _FORWARD_CONSTEXPRS,
                                         HAS_BIAS=has_bias, BM=bm, BK=bk, GROUP=group, EVEN_K=k % bk == 0),
            lambda candidate: _launch_forward(candidate, x, values, bias, layout, y))
    _launch_forward(plan, x, values, bias, layout, y)
    return y


def _launch_forward(plan, x, values, bias, layout: BlockLayout, y) -> None:
    grid, num_groups, num_tiles, constexprs, options, compiled = plan
    b = bias if bias is not None else values
    stride_xm = x.stride(0)
    _launch.launch(
        _bsl_forward_kernel, grid, compiled if LAUNCH_CACHE else None, _launch.int_key(stride_xm),
        (x, values, b, y, layout.row_group_ptr, layout.row_group_col, layout.row_group_tile,
         x.shape[0], x.shape[1], y.shape[1], stride_xm, y.stride(0), num_groups, num_tiles),
        constexprs, options, (x, values, b, layout.row_group_ptr, layout.row_group_col, layout.row_group_tile))


def _triton_grad_input(grad_y, values, layout: BlockLayout, in_features: int) -> torch.Tensor:
    m, n = grad_y.shape
    grad_x = torch.empty((m, in_features), dtype=values.dtype, device=grad_y.device)
    if m == 0:
        return grad_x
    nnz, bm, bk = values.shape
    key = ("grad_input", grad_y.device, m, n, in_features, nnz, bm, bk, layout.col_group_tile.shape[1],
           layout.col_group_ptr.shape[0], layout.col_group_row.shape[0], values.dtype, grad_y.dtype, _input_precision(values.dtype),
           _index_dtypes(layout.col_group_ptr, layout.col_group_row, layout.col_group_tile))
    plan = _LAUNCHES.get(key)
    if plan is None:
        group, num_groups = layout.col_group_tile.shape[1], layout.col_group_ptr.shape[0] - 1
        plan = _new_plan(
            key, "grad_input", (_next_pow2(m), in_features, n, bm, bk, group, nnz, layout.col_group_row.shape[0],
                                values.dtype, _input_precision(values.dtype)),
            grad_y.device, group * bk, bk, values.dtype, m,
            lambda cfg: _persistent_plan(cfg, m, num_groups, grad_y.device, values.dtype, _GRAD_INPUT_CONSTEXPRS,
                                         BM=bm, BK=bk, GROUP=group, EVEN_N=n % bm == 0),
            lambda candidate: _launch_grad_input(candidate, grad_y, values, layout, grad_x))
    _launch_grad_input(plan, grad_y, values, layout, grad_x)
    return grad_x


def _launch_grad_input(plan, grad_y, values, layout: BlockLayout, grad_x) -> None:
    grid, num_groups, num_tiles, constexprs, options, compiled = plan
    stride_dym = grad_y.stride(0)
    _launch.launch(
        _bsl_grad_input_kernel, grid, compiled if LAUNCH_CACHE else None, _launch.int_key(stride_dym),
        (grad_y, values, grad_x, layout.col_group_ptr, layout.col_group_row, layout.col_group_tile,
         grad_y.shape[0], grad_x.shape[1], grad_y.shape[1], stride_dym, grad_x.stride(0), num_groups, num_tiles),
        constexprs, options, (grad_y, values, layout.col_group_ptr, layout.col_group_row, layout.col_group_tile))


def _grad_weight_splits(m: int, entries: int, cfg: LaunchConfig, device: torch.device) -> int:
    """M slices per program (``entries`` = chunks), so that small layers still fill the GPU (1 on the CPU)."""
    if device.type != "cuda":
        return 1
    target_programs = cfg.programs_per_sm * _sm_count(device.index)
    m_tiles = _cdiv(m, cfg.block_m)
    # Keep at least 8 M tiles per slice so a program amortises its setup.
    return max(1, min(_cdiv(target_programs, max(entries, 1)), m_tiles // 8))


def _triton_grad_weight(grad_y, x, layout: BlockLayout, block_rows: int, block_cols: int, bias_grad: bool,
                        split: Optional[int] = None):
    """Gradients of the kept tiles ``[nnz, bm, bk]`` and (if ``bias_grad``) of the bias ``[N]``
    (else an empty tensor), both in ``grad_y.dtype``. ``split`` forces the number of M slices."""
    m, n = grad_y.shape
    nnz = layout.row_idx.shape[0]
    bm, bk = block_rows, block_cols
    tile_numel = nnz * bm * bk
    entries = layout.row_group_chunk.shape[0]
    key = ("grad_weight", grad_y.device, m, n, x.shape[1], nnz, bm, bk, layout.row_group_tile.shape[1],
           layout.col_group_tile.shape[1], entries, layout.row_group_ptr.shape[0], layout.row_group_col.shape[0],
           grad_y.dtype, x.dtype,
           bias_grad, split, _input_precision(grad_y.dtype),
           _index_dtypes(layout.row_group_ptr, layout.row_group_col, layout.row_group_tile, layout.row_group_of,
                         layout.row_group_chunk))
    plan = _LAUNCHES.get(key)
    if plan is None:
        group, cols = layout.row_group_tile.shape[1], layout.col_group_tile.shape[1]
        if m == 0 or entries == 0:
            total = tile_numel + ((layout.row_group_ptr.shape[0] - 1) * group * bm if bias_grad else 0)
            out = torch.zeros((total,), dtype=grad_y.dtype, device=grad_y.device)
            return out[:tile_numel].view(nnz, bm, bk), out[tile_numel:tile_numel + n]
        plan = _new_plan(
            key, "grad_weight", (_next_pow2(m), x.shape[1], n, bm, bk, group, cols, nnz, entries,
                                 layout.row_group_col.shape[0], grad_y.dtype, x.dtype, bias_grad, split,
                                 _input_precision(grad_y.dtype)),
            grad_y.device, group * bm, bk, grad_y.dtype, m,
            lambda cfg: _grad_weight_plan(cfg, grad_y, x, layout, bm, bk, bias_grad, split),
            lambda candidate: _launch_grad_weight(candidate, grad_y, x, layout))
    return _launch_grad_weight(plan, grad_y, x, layout)


def _grad_weight_plan(cfg: LaunchConfig, grad_y, x, layout: BlockLayout, bm: int, bk: int, bias_grad: bool,
                      split: Optional[int]) -> _GradWeightPlan:
    m, n = grad_y.shape
    dtype = grad_y.dtype
    nnz = layout.row_idx.shape[0]
    group = layout.row_group_tile.shape[1]
    entries = layout.row_group_chunk.shape[0]
    tile_numel = nnz * bm * bk
    total = tile_numel + ((layout.row_group_ptr.shape[0] - 1) * group * bm if bias_grad else 0)
    splits = split if split is not None else _grad_weight_splits(m, entries, cfg, grad_y.device)
    rows_per_split = _cdiv(_cdiv(m, cfg.block_m), splits) * cfg.block_m
    splits = _cdiv(m, rows_per_split)
    # One slice writes the layer dtype directly; several write fp32 partials summed after.
    buffer_dtype = dtype if splits == 1 else (torch.float64 if dtype == torch.float64 else torch.float32)
    constexprs = _in_order(_GRAD_WEIGHT_CONSTEXPRS, dict(
        HAS_DB=bias_grad, BM=bm, BK=bk, GROUP=group, COLS=layout.col_group_tile.shape[1], BLOCK_M=cfg.block_m,
        ACC_DTYPE=_acc_dtype(dtype), INPUT_PRECISION=_input_precision(dtype), NUM_STAGES=cfg.num_stages))
    reduction = ((_cdiv(total, _SUM_SPLITS_BLOCK), 1, 1), {}) if splits > 1 else None
    return _GradWeightPlan((entries, splits, 1), (splits, total), buffer_dtype, tile_numel, rows_per_split,
                           constexprs, _options(cfg), {}, reduction)


def _launch_grad_weight(plan, grad_y, x, layout: BlockLayout):
    grid, buffer_shape, buffer_dtype, tile_numel, rows_per_split, constexprs, options, compiled, reduction = plan
    m, n = grad_y.shape
    splits, total = buffer_shape
    buffer = torch.empty(total if splits == 1 else buffer_shape, dtype=buffer_dtype, device=grad_y.device)
    stride_dym, stride_xm = grad_y.stride(0), x.stride(0)
    _launch.launch(
        _bsl_grad_weight_kernel, grid, compiled if LAUNCH_CACHE else None,
        (_launch.int_key(stride_dym), _launch.int_key(stride_xm)),
        (grad_y, x, buffer, layout.row_group_ptr, layout.row_group_col, layout.row_group_tile,
         layout.row_group_of, layout.row_group_chunk, m, x.shape[1], n, stride_dym, stride_xm, tile_numel,
         rows_per_split, total),
        constexprs, options,
        (grad_y, x, layout.row_group_ptr, layout.row_group_col, layout.row_group_tile, layout.row_group_of,
         layout.row_group_chunk))
    if reduction is None:
        out = buffer
    else:
        out = torch.empty((total,), dtype=grad_y.dtype, device=grad_y.device)
        # both buffers fresh (aligned), every int fixed by the plan: one specialisation
        _launch.launch(_sum_splits_kernel, reduction[0], reduction[1] if LAUNCH_CACHE else None, (),
                       (buffer, out, total, splits), {"BLOCK": _SUM_SPLITS_BLOCK}, {}, ())
    bm, bk = constexprs["BM"], constexprs["BK"]
    return out[:tile_numel].view(-1, bm, bk), out[tile_numel:tile_numel + n]


# ---------------------------------------------------------------------------------------------
# Torch implementation (CPU outside the interpreter, or backend='torch'): kept tiles only.
# One GEMM per block-row (per block-column for dX) over that row's kept tiles, in fp32 (fp64 for
# fp64 layers) and rounded once; per-call work outside the loop is one transpose of each input
# and one reordering of the tiles, and the loop body is two ops (gather the X slabs, multiply).
# ---------------------------------------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tiles_t(t: torch.Tensor, tile: int, blocks: int, dtype: torch.dtype) -> torch.Tensor:
    """``[M, F]`` -> its transpose cut into row tiles, ``[blocks, tile, M]`` (zero-padded past F),
    in ``dtype``: feature-major, so gathering a block-row's slabs copies whole contiguous slabs
    and every product below has the wide M as its output dimension."""
    m, f = t.shape
    out = torch.zeros((blocks * tile, m), dtype=dtype, device=t.device) if f != blocks * tile else \
        torch.empty((f, m), dtype=dtype, device=t.device)
    out[:f].copy_(t.t())
    return out.view(blocks, tile, m)


def _from_tiles_t(t: torch.Tensor, features: int, dtype: torch.dtype, bias=None) -> torch.Tensor:
    """``[F_padded, M]`` (+ ``bias``, added before rounding) -> contiguous ``[M, features]`` in ``dtype``."""
    out = t[:features].t()
    if bias is not None:
        out = out + bias
    return out.to(dtype=dtype, memory_format=torch.contiguous_format)


def _segment_products(w: torch.Tensor, ptr: torch.Tensor, idx: torch.Tensor, src_t: torch.Tensor,
                      tile_in: int, tile_out: int, out_t: torch.Tensor) -> None:
    """``out_t[g]`` = ``w``'s columns of segment g times the gathered source slabs, per segment g
    of ``ptr`` (block-rows for the forward, block-columns for grad-input): one GEMM each.
    ``w`` is ``[tile_out, tiles x tile_in]`` with a segment's tiles side by side, ``src_t`` the
    source cut into ``[blocks, tile_in, M]`` slabs, ``idx`` each tile's slab."""
    m = src_t.shape[2]
    bounds = ptr.tolist()
    for g in range(len(bounds) - 1):
        s, e = bounds[g], bounds[g + 1]
        if s < e:
            slabs = src_t.index_select(0, idx[s:e]).view((e - s) * tile_in, m)
            torch.mm(w[:, s * tile_in:e * tile_in], slabs, out=out_t[g * tile_out:(g + 1) * tile_out])


def _torch_forward(x, values, bias, layout: BlockLayout, out_features: int) -> torch.Tensor:
    m = x.shape[0]
    nnz, bm, bk = values.shape
    nbr, nbc = layout.row_ptr.shape[0] - 1, layout.col_ptr.shape[0] - 1
    acc = _compute_dtype(values.dtype)
    y_t = torch.zeros((nbr * bm, m), dtype=acc, device=x.device)
    if nnz and m:
        w = values.to(acc).transpose(0, 1).reshape(bm, nnz * bk)  # [bm, tiles x bk]: a row's tiles side by side
        _segment_products(w, layout.row_ptr, layout.col_idx, _tiles_t(x, bk, nbc, acc), bk, bm, y_t)
    return _from_tiles_t(y_t, out_features, values.dtype, bias)


def _torch_grad_input(grad_y, values, layout: BlockLayout, in_features: int) -> torch.Tensor:
    m = grad_y.shape[0]
    nnz, bm, bk = values.shape
    nbr, nbc = layout.row_ptr.shape[0] - 1, layout.col_ptr.shape[0] - 1
    acc = _compute_dtype(values.dtype)
    dx_t = torch.zeros((nbc * bk, m), dtype=acc, device=grad_y.device)
    if nnz and m:
        # column order, a column's tiles side by side: [bk, tiles x bm]
        w = values.to(acc).index_select(0, layout.csc_perm).view(nnz * bm, bk).t()
        _segment_products(w, layout.col_ptr, layout.csc_row_idx, _tiles_t(grad_y, bm, nbr, acc), bm, bk, dx_t)
    return _from_tiles_t(dx_t, in_features, values.dtype)


def _torch_grad_weight(grad_y, x, layout: BlockLayout, block_rows: int, block_cols: int, bias_grad: bool):
    m, n = grad_y.shape
    nnz = layout.row_idx.shape[0]
    bm, bk = block_rows, block_cols
    dtype = grad_y.dtype
    acc = _compute_dtype(dtype)
    nbr, nbc = layout.row_ptr.shape[0] - 1, layout.col_ptr.shape[0] - 1
    grad_bias = grad_y.sum(dim=0, dtype=acc).to(dtype) if bias_grad else grad_y.new_empty((0,))
    grad = torch.zeros((nnz, bm, bk), dtype=dtype, device=grad_y.device)
    if nnz == 0 or m == 0:
        return grad, grad_bias
    dy_t = _tiles_t(grad_y, bm, nbr, acc)
    x_t = _tiles_t(x, bk, nbc, acc)
    ptr = layout.row_ptr.tolist()
    for r in range(nbr):
        s, e = ptr[r], ptr[r + 1]
        if s < e:  # a row's tiles are one contiguous run of `values`
            x_r = x_t.index_select(0, layout.col_idx[s:e]).view((e - s) * bk, m)
            grad[s:e] = torch.mm(x_r, dy_t[r].t()).view(e - s, bk, bm).transpose(1, 2)
    return grad, grad_bias


# ---------------------------------------------------------------------------------------------
# Dispatch: one autograd.Function in eager; custom ops (opaque to Dynamo) under torch.compile
# ---------------------------------------------------------------------------------------------
def _use_triton(device: torch.device, backend: str) -> bool:
    if backend == "torch":
        return False
    return device.type == "cuda" or _kernels_interpreted()


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., F]`` as 2-D ``[M, F]`` with unit stride along F (the kernels need it); bool
    spikes viewed as uint8 (the same bytes)."""
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    if t.dim() != 2:
        t = t.reshape(-1, t.shape[-1])
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


def _forward(x, values, bias, layout: BlockLayout, out_features: int, triton_path: bool) -> torch.Tensor:
    if triton_path:
        return _triton_forward(x, values, bias, layout, out_features)
    return _torch_forward(x, values, bias, layout, out_features)


def _grad_input(grad_y, values, layout: BlockLayout, in_features: int, triton_path: bool) -> torch.Tensor:
    if triton_path:
        return _triton_grad_input(grad_y, values, layout, in_features)
    return _torch_grad_input(grad_y, values, layout, in_features)


def _grad_weight(grad_y, x, layout: BlockLayout, bm: int, bk: int, bias_grad: bool, triton_path: bool):
    if triton_path:
        return _triton_grad_weight(grad_y, x, layout, bm, bk, bias_grad)
    return _torch_grad_weight(grad_y, x, layout, bm, bk, bias_grad)


def _backward(needs_x: bool, needs_values: bool, needs_bias: bool, grad_y, x, values, layout, triton_path):
    """(grad x, grad values, grad bias) on 2-D tensors, None for what nobody asked for (no launch for it)."""
    grad_y = _as_rows(grad_y if grad_y.dtype == values.dtype else grad_y.to(values.dtype))
    grad_x = grad_values = grad_bias = None
    if needs_x:
        grad_x = _grad_input(grad_y, values, layout, x.shape[1], triton_path)
    if needs_values:
        grad_values, fused_bias = _grad_weight(grad_y, x, layout, values.shape[1], values.shape[2], needs_bias, triton_path)
        if needs_bias:
            grad_bias = fused_bias
    elif needs_bias:
        acc = torch.float64 if grad_y.dtype == torch.float64 else torch.float32
        grad_bias = grad_y.sum(dim=0, dtype=acc).to(values.dtype)
    return grad_x, grad_values, grad_bias


class BlockSparseLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` for ``x [..., K]`` already validated (see :func:`block_sparse_linear`).

    The only autograd node of an eager call: inputs of any leading shape are flattened and the
    output reshaped inside it (no view/reshape nodes around it)."""

    @staticmethod
    def forward(ctx, x, values, bias, layout, out_features, triton_path):
        ctx.x_dtype = x.dtype
        if type(x) is SpikeBytes:
            # Spikes held as bytes for training: the kernels read the bytes, and the bytes (1 per
            # spike) are what is saved for grad-weight; grad x is returned in x's float dtype.
            x = x.spike_bytes
        x2d = _as_rows(x)
        ctx.save_for_backward(x2d, values)
        ctx.layout, ctx.triton_path, ctx.x_shape = layout, triton_path, x.shape
        return _forward(x2d, values, bias, layout, out_features, triton_path).view(*x.shape[:-1], out_features)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_y):
        x2d, values = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_x, grad_values, grad_bias = _backward(needs[0], needs[1], needs[2], grad_y, x2d, values, ctx.layout, ctx.triton_path)
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
            if grad_x.dtype != ctx.x_dtype:  # SpikeBytes of another float dtype (autocast)
                grad_x = grad_x.to(ctx.x_dtype)
        return grad_x, grad_values, grad_bias, None, None, None


@torch.library.custom_op("effst::block_sparse_linear", mutates_args=())
def _block_sparse_linear_op(
    x: torch.Tensor, values: torch.Tensor, bias: Optional[torch.Tensor], layout: list[torch.Tensor],
    out_features: int, triton_path: bool,
) -> torch.Tensor:
    return _forward(x, values, bias, BlockLayout(*layout), out_features, triton_path)


@_block_sparse_linear_op.register_fake
def _(x, values, bias, layout, out_features, triton_path):
    return x.new_empty((x.shape[0], out_features), dtype=values.dtype)


@torch.library.custom_op("effst::block_sparse_linear_backward", mutates_args=())
def _block_sparse_linear_backward_op(
    grad_y: torch.Tensor, x: torch.Tensor, values: torch.Tensor, layout: list[torch.Tensor],
    needs_x: bool, needs_values: bool, needs_bias: bool, triton_path: bool,
) -> list[torch.Tensor]:
    grad_x, grad_values, grad_bias = _backward(needs_x, needs_values, needs_bias, grad_y, x, values, BlockLayout(*layout), triton_path)
    if grad_values is not None and grad_bias is not None:
        grad_bias = grad_bias.clone()  # a custom op's outputs may not share storage (it is [N], small)
    return [g if g is not None else values.new_empty((0,)) for g in (grad_x, grad_values, grad_bias)]


@_block_sparse_linear_backward_op.register_fake
def _(grad_y, x, values, layout, needs_x, needs_values, needs_bias, triton_path):
    empty = values.new_empty((0,))
    return [
        values.new_empty(x.shape) if needs_x else empty,
        values.new_empty(values.shape) if needs_values else empty,
        values.new_empty((grad_y.shape[1],)) if needs_bias else empty,
    ]


def _op_setup_context(ctx, inputs, output):
    x, values, bias, layout, out_features, triton_path = inputs
    ctx.save_for_backward(x, values, *layout)
    ctx.triton_path = triton_path


def _op_backward(ctx, grad_y):
    x, values, *layout = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grads = _block_sparse_linear_backward_op(grad_y, x, values, layout, needs[0], needs[1], needs[2], ctx.triton_path)
    grad_x, grad_values, grad_bias = (g if need else None for g, need in zip(grads, needs[:3]))
    return grad_x, grad_values, grad_bias, [None] * len(layout), None, None


torch.library.register_autograd("effst::block_sparse_linear", _op_backward, setup_context=_op_setup_context)


# ---------------------------------------------------------------------------------------------
# Public functional entry point (validates everything on every call)
# ---------------------------------------------------------------------------------------------
def block_sparse_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    layout: BlockLayout,
    out_features: int,
    bias: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``x @ W.T + bias`` for the block-compressed weight ``(values, layout)``; x is ``[..., K]``.

    ``x`` is floating with the dtype of ``values``, a bool/uint8 spike tensor (no gradient), or
    a SpikeBytes (bytes read and saved; its gradient in its own float dtype).
    ``backend``: ``'auto'`` (Triton on CUDA or under the interpreter, torch elsewhere),
    ``'triton'`` or ``'torch'``.  Returns ``[..., out_features]`` in ``values.dtype``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout: expected a BlockLayout (from build_block_layout), got {type(layout).__name__}")
    if values.dim() != 3:
        raise ValueError(f"values: expected [nnz_blocks, block_rows, block_cols], got shape {tuple(values.shape)}")
    if values.dtype not in FLOAT_DTYPES:
        raise TypeError(f"values: expected a float32/float16/bfloat16/float64 tensor, got {values.dtype}")
    nnz, bm, bk = values.shape
    check_block_size((bm, bk), "values block shape")
    nbr = layout.row_ptr.numel() - 1
    nbc = layout.col_ptr.numel() - 1
    if layout.col_idx.numel() != nnz:
        raise ValueError(f"layout: describes {layout.col_idx.numel()} blocks but values holds {nnz}")
    groups = (layout.row_group_tile.shape[1], layout.col_group_tile.shape[1])
    if groups != (group_size(bm, nbr), group_size(bk, nbc)):
        # The kernels' MMA widths are group x tile: a layout grouped for other tiles would compile
        # tiles too wide (or too narrow) for the GPU.
        raise ValueError(f"layout: grouped for another tile than values' {(bm, bk)} (groups {groups}); "
                         f"build it with build_block_layout(block_mask, {(bm, bk)})")
    if x.dim() < 1:
        raise ValueError("x: expected a tensor of shape [..., in_features], got a 0-dim tensor")
    in_features = x.shape[-1]
    if -(-in_features // bk) != nbc:
        raise ValueError(f"x: last dim {in_features} does not fit a layout of {nbc} block-columns of width {bk}")
    if -(-out_features // bm) != nbr:
        raise ValueError(f"out_features: {out_features} does not fit a layout of {nbr} block-rows of height {bm}")
    check_input_dtype(x, values.dtype)
    if bias is not None and (bias.shape != (out_features,)):
        raise ValueError(f"bias: expected shape ({out_features},), got {tuple(bias.shape)}")
    if bias is not None and bias.dtype != values.dtype:
        raise TypeError(f"bias: expected dtype {values.dtype}, got {bias.dtype}")
    devices = {t.device for t in (x, values, *layout) + ((bias,) if bias is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"x, values, bias and layout: expected one device, got {sorted(map(str, devices))}")
    if backend == "triton" and not _use_triton(x.device, backend):
        raise RuntimeError("backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)")
    return block_sparse_linear_unchecked(x, values.contiguous(), layout, out_features, bias, _use_triton(x.device, backend))


def check_input_dtype(x: torch.Tensor, weight_dtype: torch.dtype) -> None:
    """``x`` must have the weight dtype, or be bool/uint8 spikes (plain, or held by a
    :class:`~effst.ops.spike_bytes.SpikeBytes` of any float dtype); anything else is an error."""
    if x.dtype not in BYTE_DTYPES and x.dtype != weight_dtype and type(x) is not SpikeBytes:
        raise TypeError(f"x: expected dtype {weight_dtype} (the weight dtype) or bool/uint8 spikes, got {x.dtype}")


def block_sparse_linear_unchecked(
    x: torch.Tensor, values: torch.Tensor, layout: BlockLayout, out_features: int,
    bias: Optional[torch.Tensor], triton_path: bool,
) -> torch.Tensor:
    """:func:`block_sparse_linear` without validation, for callers that validated once
    (``BlockSparseLinear`` at construction); ``triton_path`` from :func:`_use_triton`."""
    if torch.compiler.is_compiling():
        x2d = _as_rows(x)
        y = _block_sparse_linear_op(x2d, values, bias, list(layout), out_features, triton_path)
        return y.view(*x.shape[:-1], out_features)
    return BlockSparseLinearFunction.apply(x, values, bias, layout, out_features, triton_path)


def use_triton(device: torch.device, backend: str) -> bool:
    """Whether ``backend`` runs the Triton kernels for tensors on ``device``."""
    return _use_triton(device, backend)
