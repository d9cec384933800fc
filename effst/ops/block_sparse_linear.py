"""Block-sparse linear layer ``Y = X @ W.T + b`` whose weight keeps only some ``bm x bk`` tiles.

Layout (built by :func:`build_block_layout` from a ``[ceil(N/bm), ceil(K/bk)]`` block mask, for
a weight ``W`` of shape ``[N, K] = [out_features, in_features]``):

* ``values``  ``[nnz, bm, bk]`` -- the kept tiles in *row order* (block-row major, columns
  ascending inside a row).  Tiles on the right/bottom edge are zero-padded past ``K``/``N``.
* CSR over output block-rows, for ``Y = X W^T`` and for ``dW``: ``row_ptr [nbr+1]``,
  ``col_idx [nnz]`` (block column of each tile) and ``row_idx [nnz]`` (block row of each tile).
* CSC over input block-columns, for ``dX = dY W``: ``col_ptr [nbc+1]``, ``csc_row_idx [nnz]``
  and ``csc_perm [nnz]`` (index into ``values`` of the i-th tile in column order).

The three products, each one Triton kernel reading the tiles in place (no transposed copy):

* forward     one program per (M tile, block-row): ``Y[m, r] = sum_j X[m, col_j] W_j^T``
* grad input  one program per (M tile, block-column): ``dX[m, c] = sum_i dY[m, row_i] W_i``
* grad weight one program per (kept tile, M split): ``dW_j = dY[:, r_j]^T X[:, c_j]``; the
  splits go to a ``[split, nnz, bm, bk]`` buffer that is summed afterwards (deterministic).
  The bias gradient is summed from the same dY tiles by the first tile of each block-row
  (extra programs sum the block-rows that keep no tile), so dY is read once for dW and db.

Inputs ``[..., K]`` of any leading shape are flattened to ``[M, K]``.  Activations are fp32,
fp16, bf16 (or fp64, for reference runs); they must have the dtype of ``values``.  Binary spike
inputs may be ``bool`` or ``uint8``: they are read as one byte and widened to the weight dtype
in registers (exact for any byte value); such inputs get no gradient (they are integers).
Accumulation is fp32 (fp64 for fp64).  fp32 products follow
``torch.backends.cuda.matmul.allow_tf32`` exactly as ``F.linear`` does.

Where Triton cannot run (a CPU tensor outside ``TRITON_INTERPRET=1``) the same three products
run as a torch gather-based implementation that also touches only the kept tiles (one matmul per
block-row / block-column); ``backend='torch'`` selects it explicitly on any device.
Everything is exposed as the custom ops ``effst::block_sparse_linear`` (+ its two gradient
ops) with fake implementations, so ``torch.compile`` traces through without graph breaks.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import NamedTuple, Optional, Sequence, Union

import torch
import triton
import triton.language as tl

BlockSize = Union[int, Sequence[int]]

BACKENDS = ("auto", "triton", "torch")
_SPIKE_DTYPES = (torch.bool, torch.uint8)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


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
    """Index tensors (int32, on the weight's device) for the kept tiles; see the module doc."""

    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    row_idx: torch.Tensor
    col_ptr: torch.Tensor
    csc_row_idx: torch.Tensor
    csc_perm: torch.Tensor


def build_block_layout(block_mask: torch.Tensor) -> BlockLayout:
    """Row- and column-ordered indices of the True entries of a 2-D block mask (deterministic)."""
    if block_mask.dim() != 2:
        raise ValueError(f"block_mask: expected a 2-D [block_rows, block_cols] mask, got shape {tuple(block_mask.shape)}")
    mask = block_mask.to(torch.bool)
    nbr, nbc = mask.shape
    device = mask.device
    rows, cols = mask.nonzero(as_tuple=True)  # row-major order: the order of `values`
    nnz = rows.numel()
    row_ptr = torch.zeros(nbr + 1, dtype=torch.int64, device=device)
    row_ptr[1:] = mask.sum(dim=1).cumsum(0)
    col_ptr = torch.zeros(nbc + 1, dtype=torch.int64, device=device)
    col_ptr[1:] = mask.sum(dim=0).cumsum(0)
    position = torch.full((nbr, nbc), -1, dtype=torch.int64, device=device)
    position[rows, cols] = torch.arange(nnz, device=device)
    csc_cols, csc_rows = mask.t().nonzero(as_tuple=True)  # column-major order
    csc_perm = position[csc_rows, csc_cols]
    i32 = torch.int32
    return BlockLayout(row_ptr.to(i32), cols.to(i32), rows.to(i32), col_ptr.to(i32), csc_rows.to(i32), csc_perm.to(i32))


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
    x_ptr, w_ptr, b_ptr, y_ptr, row_ptr_ptr, col_idx_ptr,
    M, K, N, stride_xm, stride_ym, num_block_rows,
    HAS_BIAS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr,
    EVEN_K: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # Block-rows vary fastest so consecutive programs reuse the same X rows from L2.
    pid = tl.program_id(0)
    r = pid % num_block_rows
    pid_m = pid // num_block_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BM)
    offs_k = tl.arange(0, BK)
    m_in = offs_m < M
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    # A tile is stored [BM, BK] row-major; read it as its transpose [BK, BM].
    w_tile_t = w_ptr + offs_n[None, :] * BK + offs_k[:, None]
    start = tl.load(row_ptr_ptr + r).to(tl.int64)
    end = tl.load(row_ptr_ptr + r + 1).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BM), dtype=ACC_DTYPE)
    for j in range(start, end):
        c = tl.load(col_idx_ptr + j)
        cols = c * BK + offs_k
        if EVEN_K:
            x = tl.load(x_rows + cols[None, :], mask=m_in[:, None], other=0)
        else:
            x = tl.load(x_rows + cols[None, :], mask=m_in[:, None] & (cols[None, :] < K), other=0)
        w = tl.load(w_tile_t + j * (BM * BK))
        # bool/uint8 spikes are widened here, in registers.
        acc = tl.dot(x.to(w.dtype), w, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    out_cols = r * BM + offs_n
    n_in = out_cols < N
    if HAS_BIAS:
        acc += tl.load(b_ptr + out_cols, mask=n_in, other=0).to(ACC_DTYPE)[None, :]
    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + out_cols[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_in[:, None] & n_in[None, :])


@triton.jit
def _bsl_grad_input_kernel(
    dy_ptr, w_ptr, dx_ptr, col_ptr_ptr, csc_row_idx_ptr, csc_perm_ptr,
    M, K, N, stride_dym, stride_dxm, num_block_cols,
    BM: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr,
    EVEN_N: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    c = pid % num_block_cols
    pid_m = pid // num_block_cols
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BM)
    offs_k = tl.arange(0, BK)
    m_in = offs_m < M
    dy_rows = dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym
    w_tile = w_ptr + offs_n[:, None] * BK + offs_k[None, :]
    start = tl.load(col_ptr_ptr + c).to(tl.int64)
    end = tl.load(col_ptr_ptr + c + 1).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BK), dtype=ACC_DTYPE)
    for i in range(start, end):
        r = tl.load(csc_row_idx_ptr + i)
        p = tl.load(csc_perm_ptr + i).to(tl.int64)
        rows = r * BM + offs_n
        if EVEN_N:
            dy = tl.load(dy_rows + rows[None, :], mask=m_in[:, None], other=0)
        else:
            dy = tl.load(dy_rows + rows[None, :], mask=m_in[:, None] & (rows[None, :] < N), other=0)
        w = tl.load(w_tile + p * (BM * BK))
        acc = tl.dot(dy, w, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    cols = c * BK + offs_k
    dx = dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dxm + cols[None, :]
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=m_in[:, None] & (cols[None, :] < K))


@triton.jit
def _bsl_grad_weight_kernel(
    dy_ptr, x_ptr, partial_ptr, db_partial_ptr, row_ptr_ptr, row_idx_ptr, col_idx_ptr,
    M, K, N, stride_dym, stride_xm, nnz, n_padded, rows_per_split,
    HAS_DB: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # Programs 0..nnz-1: one kept tile each. With HAS_DB, programs nnz..nnz+nbr-1 sum the bias
    # gradient of block-rows that keep no tile (no tile program reads their dY).
    j = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = tl.arange(0, BM)
    offs_k = tl.arange(0, BK)
    m_begin = split * rows_per_split
    m_end = tl.minimum(m_begin + rows_per_split, M)
    db_out = db_partial_ptr + split.to(tl.int64) * n_padded
    if j < nnz:
        r = tl.load(row_idx_ptr + j)
        c = tl.load(col_idx_ptr + j)
        rows = r * BM + offs_n
        cols = c * BK + offs_k
        n_in = rows < N
        k_in = cols < K
        acc = tl.zeros((BM, BK), dtype=ACC_DTYPE)
        db = tl.zeros((BM,), dtype=ACC_DTYPE)
        for m0 in range(m_begin, m_end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_in = offs_m < m_end
            offs_m64 = offs_m.to(tl.int64)[:, None]
            dy = tl.load(dy_ptr + offs_m64 * stride_dym + rows[None, :], mask=m_in[:, None] & n_in[None, :], other=0)
            x = tl.load(x_ptr + offs_m64 * stride_xm + cols[None, :], mask=m_in[:, None] & k_in[None, :], other=0)
            acc = tl.dot(tl.trans(dy), x.to(dy.dtype), acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            if HAS_DB:
                # The bias gradient rides on the dY tile already in registers (one pass over dY).
                db += tl.sum(dy.to(ACC_DTYPE), axis=0)
        out = partial_ptr + (split.to(tl.int64) * nnz + j) * (BM * BK) + offs_n[:, None] * BK + offs_k[None, :]
        tl.store(out, acc)
        if HAS_DB:
            # Only the first tile of each block-row writes its row's bias slice.
            first = tl.load(row_ptr_ptr + r) == j
            tl.store(db_out + rows, db, mask=(offs_n < BM) & first)
    else:
        r = j - nnz
        if tl.load(row_ptr_ptr + r) == tl.load(row_ptr_ptr + r + 1):
            rows = r * BM + offs_n
            n_in = rows < N
            db = tl.zeros((BM,), dtype=ACC_DTYPE)
            for m0 in range(m_begin, m_end, BLOCK_M):
                offs_m = m0 + tl.arange(0, BLOCK_M)
                m_in = offs_m < m_end
                dy = tl.load(dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym + rows[None, :],
                             mask=m_in[:, None] & n_in[None, :], other=0)
                db += tl.sum(dy.to(ACC_DTYPE), axis=0)
            tl.store(db_out + rows, db)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _kernels_interpreted() -> bool:
    """True when triton replaced the kernels by its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(_bsl_forward_kernel, triton.runtime.JITFunction)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _input_precision(dtype: torch.dtype) -> str:
    # Same rule as F.linear: fp32 products use TF32 only when torch allows it.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _tile_m(m: int, cap: int) -> int:
    # Small problems (and the interpreter) do not pay for a 128-row tile of padding.
    return max(16, min(cap, triton.next_power_of_2(max(m, 1))))


def _num_warps(bm: int, bk: int) -> int:
    return 8 if max(bm, bk) >= 64 else 4


def _triton_forward(x, values, bias, row_ptr, col_idx, out_features):
    m, k = x.shape
    nnz, bm, bk = values.shape
    nbr = row_ptr.numel() - 1
    y = torch.empty((m, out_features), dtype=values.dtype, device=x.device)
    if m == 0:
        return y
    block_m = _tile_m(m, 128)
    grid = (triton.cdiv(m, block_m) * nbr,)
    _bsl_forward_kernel[grid](
        x, values, bias if bias is not None else values, y, row_ptr, col_idx,
        m, k, out_features, x.stride(0), y.stride(0), nbr,
        HAS_BIAS=bias is not None, BM=bm, BK=bk, BLOCK_M=block_m, EVEN_K=k % bk == 0,
        ACC_DTYPE=_acc_dtype(values.dtype), INPUT_PRECISION=_input_precision(values.dtype),
        num_warps=_num_warps(bm, bk), num_stages=3,
    )
    return y


def _triton_grad_input(grad_y, values, col_ptr, csc_row_idx, csc_perm, in_features):
    m, n = grad_y.shape
    nnz, bm, bk = values.shape
    nbc = col_ptr.numel() - 1
    grad_x = torch.empty((m, in_features), dtype=values.dtype, device=grad_y.device)
    if m == 0:
        return grad_x
    block_m = _tile_m(m, 128)
    grid = (triton.cdiv(m, block_m) * nbc,)
    _bsl_grad_input_kernel[grid](
        grad_y, values, grad_x, col_ptr, csc_row_idx, csc_perm,
        m, in_features, n, grad_y.stride(0), grad_x.stride(0), nbc,
        BM=bm, BK=bk, BLOCK_M=block_m, EVEN_N=n % bm == 0,
        ACC_DTYPE=_acc_dtype(values.dtype), INPUT_PRECISION=_input_precision(values.dtype),
        num_warps=_num_warps(bm, bk), num_stages=3,
    )
    return grad_x


def _grad_values_split(m: int, nnz: int, block_m: int, device: torch.device) -> int:
    """How many M slices each tile's reduction is cut into, to fill the GPU when nnz is small."""
    if device.type != "cuda":
        return 1
    target_programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    m_tiles = triton.cdiv(m, block_m)
    # Keep at least 8 M tiles per slice so a program amortises its setup.
    return max(1, min(triton.cdiv(target_programs, max(nnz, 1)), m_tiles // 8))


def _triton_grad_weight(grad_y, x, row_ptr, row_idx, col_idx, block_rows, block_cols, bias_grad, split=None):
    """Gradients of the kept tiles ``[nnz, bm, bk]`` and (if ``bias_grad``) of the bias ``[N]``."""
    m, n = grad_y.shape
    k = x.shape[1]
    nnz = row_idx.numel()
    bm, bk = block_rows, block_cols
    dtype = grad_y.dtype
    acc_torch = torch.float64 if dtype == torch.float64 else torch.float32
    nbr = row_ptr.numel() - 1
    grad_bias = grad_y.new_empty((0,))
    if m == 0 or nnz == 0:
        if bias_grad:
            grad_bias = grad_y.sum(dim=0, dtype=acc_torch).to(dtype)
        return torch.zeros((nnz, bm, bk), dtype=dtype, device=grad_y.device), grad_bias
    block_m = _tile_m(m, 64)
    if split is None:
        split = _grad_values_split(m, nnz, block_m, grad_y.device)
    rows_per_split = triton.cdiv(triton.cdiv(m, block_m), split) * block_m
    split = triton.cdiv(m, rows_per_split)
    partial = torch.empty((split, nnz, bm, bk), dtype=acc_torch, device=grad_y.device)
    db_partial = torch.empty((split, nbr * bm) if bias_grad else (1,), dtype=acc_torch, device=grad_y.device)
    programs = nnz + nbr if bias_grad else nnz
    _bsl_grad_weight_kernel[(programs, split)](
        grad_y, x, partial, db_partial, row_ptr, row_idx, col_idx,
        m, k, n, grad_y.stride(0), x.stride(0), nnz, nbr * bm, rows_per_split,
        HAS_DB=bias_grad, BM=bm, BK=bk, BLOCK_M=block_m,
        ACC_DTYPE=_acc_dtype(dtype), INPUT_PRECISION=_input_precision(dtype),
        num_warps=_num_warps(bm, bk), num_stages=3,
    )
    grad_values = (partial[0] if split == 1 else partial.sum(dim=0)).to(dtype)
    if bias_grad:
        grad_bias = (db_partial[0] if split == 1 else db_partial.sum(dim=0))[:n].to(dtype)
    return grad_values, grad_bias


# ---------------------------------------------------------------------------------------------
# Torch implementation (CPU outside the interpreter, or backend='torch'): kept tiles only
# ---------------------------------------------------------------------------------------------
def _tiles_t(t: torch.Tensor, tile: int, dtype: torch.dtype) -> torch.Tensor:
    """``[M, F]`` -> its transpose cut into row tiles, ``[ceil(F/tile), tile, M]``, zero-padded.

    Feature-major so that gathering the tiles a block-row (or column) needs is a copy of whole
    contiguous slabs and every product below has the wide M as its output dimension.
    """
    m, f = t.shape
    groups = -(-f // tile)
    out = torch.zeros((groups * tile, m), dtype=dtype, device=t.device)
    out[:f] = t.t()
    return out.view(groups, tile, m)


def _torch_forward(x, values, bias, row_ptr, col_idx, out_features):
    m = x.shape[0]
    nnz, bm, bk = values.shape
    nbr = row_ptr.numel() - 1
    x_t = _tiles_t(x, bk, values.dtype)
    y_t = values.new_zeros((nbr * bm, m))
    ptr = row_ptr.tolist()
    cols_all = col_idx.long()
    for r in range(nbr):
        s, e = ptr[r], ptr[r + 1]
        if s == e:
            continue
        x_r = x_t.index_select(0, cols_all[s:e]).reshape((e - s) * bk, m)
        w_r = values[s:e].permute(1, 0, 2).reshape(bm, (e - s) * bk)
        torch.mm(w_r, x_r, out=y_t[r * bm:(r + 1) * bm])
    y = y_t[:out_features].t()
    if bias is not None:
        y = y + bias
    return y.contiguous()


def _torch_grad_input(grad_y, values, col_ptr, csc_row_idx, csc_perm, in_features):
    m = grad_y.shape[0]
    nnz, bm, bk = values.shape
    nbc = col_ptr.numel() - 1
    dy_t = _tiles_t(grad_y, bm, values.dtype)
    dx_t = values.new_zeros((nbc * bk, m))
    ptr = col_ptr.tolist()
    rows_all, perm_all = csc_row_idx.long(), csc_perm.long()
    for c in range(nbc):
        s, e = ptr[c], ptr[c + 1]
        if s == e:
            continue
        dy_c = dy_t.index_select(0, rows_all[s:e]).reshape((e - s) * bm, m)
        w_c = values.index_select(0, perm_all[s:e]).reshape((e - s) * bm, bk)
        torch.mm(w_c.t(), dy_c, out=dx_t[c * bk:(c + 1) * bk])
    return dx_t[:in_features].t().contiguous()


def _torch_grad_weight(grad_y, x, row_ptr, row_idx, col_idx, block_rows, block_cols, bias_grad):
    m = grad_y.shape[0]
    nnz = row_idx.numel()
    bm, bk = block_rows, block_cols
    dtype = grad_y.dtype
    grad = torch.zeros((nnz, bm, bk), dtype=dtype, device=grad_y.device)
    grad_bias = grad_y.new_empty((0,))
    if bias_grad:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        grad_bias = grad_y.sum(dim=0, dtype=acc).to(dtype)
    if nnz == 0 or m == 0:
        return grad, grad_bias
    dy_t = _tiles_t(grad_y, bm, dtype)
    x_t = _tiles_t(x, bk, dtype)
    rows = row_idx.long()
    cols_all = col_idx.long()
    # Tiles are row-ordered: each block-row's tiles are one contiguous run of `values`.
    boundaries = torch.nonzero(rows[1:] != rows[:-1]).flatten().add(1).tolist()
    starts = [0] + boundaries
    ends = boundaries + [nnz]
    row_list = rows.tolist()
    for s, e in zip(starts, ends):
        x_r = x_t.index_select(0, cols_all[s:e]).reshape((e - s) * bk, m)
        g = dy_t[row_list[s]] @ x_r.t()  # [bm, n*bk]
        grad[s:e] = g.reshape(bm, e - s, bk).permute(1, 0, 2)
    return grad, grad_bias


# ---------------------------------------------------------------------------------------------
# Custom ops (dispatch, fake implementations, autograd)
# ---------------------------------------------------------------------------------------------
def _use_triton(device: torch.device, backend: str) -> bool:
    if backend == "torch":
        return False
    return device.type == "cuda" or _kernels_interpreted()


def _on_device(device: torch.device):
    """Launch Triton kernels on the tensors' GPU, not on whichever one is current."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D tensor with unit stride along its last dim (the kernels need it)."""
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


@torch.library.custom_op("effst::block_sparse_linear", mutates_args=())
def _block_sparse_linear_op(
    x: torch.Tensor, values: torch.Tensor, bias: Optional[torch.Tensor],
    row_ptr: torch.Tensor, col_idx: torch.Tensor, row_idx: torch.Tensor,
    col_ptr: torch.Tensor, csc_row_idx: torch.Tensor, csc_perm: torch.Tensor,
    out_features: int, backend: str,
) -> torch.Tensor:
    x = _as_rows(x)
    values = values.contiguous()
    if _use_triton(x.device, backend):
        with _on_device(x.device):
            return _triton_forward(x, values, bias, row_ptr, col_idx, out_features)
    return _torch_forward(x, values, bias, row_ptr, col_idx, out_features)


@_block_sparse_linear_op.register_fake
def _(x, values, bias, row_ptr, col_idx, row_idx, col_ptr, csc_row_idx, csc_perm, out_features, backend):
    return x.new_empty((x.shape[0], out_features), dtype=values.dtype)


@torch.library.custom_op("effst::block_sparse_linear_grad_input", mutates_args=())
def _grad_input_op(
    grad_y: torch.Tensor, values: torch.Tensor, col_ptr: torch.Tensor, csc_row_idx: torch.Tensor,
    csc_perm: torch.Tensor, in_features: int, backend: str,
) -> torch.Tensor:
    grad_y = _as_rows(grad_y.to(values.dtype))
    values = values.contiguous()
    if _use_triton(grad_y.device, backend):
        with _on_device(grad_y.device):
            return _triton_grad_input(grad_y, values, col_ptr, csc_row_idx, csc_perm, in_features)
    return _torch_grad_input(grad_y, values, col_ptr, csc_row_idx, csc_perm, in_features)


@_grad_input_op.register_fake
def _(grad_y, values, col_ptr, csc_row_idx, csc_perm, in_features, backend):
    return grad_y.new_empty((grad_y.shape[0], in_features), dtype=values.dtype)


@torch.library.custom_op("effst::block_sparse_linear_grad_weight", mutates_args=())
def _grad_weight_op(
    grad_y: torch.Tensor, x: torch.Tensor, row_ptr: torch.Tensor, row_idx: torch.Tensor, col_idx: torch.Tensor,
    block_rows: int, block_cols: int, bias_grad: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_y = _as_rows(grad_y)
    x = _as_rows(x)
    if _use_triton(grad_y.device, backend):
        with _on_device(grad_y.device):
            return _triton_grad_weight(grad_y, x, row_ptr, row_idx, col_idx, block_rows, block_cols, bias_grad)
    return _torch_grad_weight(grad_y, x, row_ptr, row_idx, col_idx, block_rows, block_cols, bias_grad)


@_grad_weight_op.register_fake
def _(grad_y, x, row_ptr, row_idx, col_idx, block_rows, block_cols, bias_grad, backend):
    grad_bias = grad_y.new_empty((grad_y.shape[1],) if bias_grad else (0,))
    return grad_y.new_empty((row_idx.shape[0], block_rows, block_cols)), grad_bias


def _setup_context(ctx, inputs, output):
    x, values, bias, row_ptr, col_idx, row_idx, col_ptr, csc_row_idx, csc_perm, out_features, backend = inputs
    ctx.save_for_backward(x, values, row_ptr, row_idx, col_idx, col_ptr, csc_row_idx, csc_perm)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.backend = backend


def _backward(ctx, grad_y):
    x, values, row_ptr, row_idx, col_idx, col_ptr, csc_row_idx, csc_perm = ctx.saved_tensors
    grad_y = grad_y.to(values.dtype)
    grad_x = grad_values = grad_bias = None
    want_bias = ctx.has_bias and ctx.needs_input_grad[2]
    if ctx.needs_input_grad[0]:
        grad_x = _grad_input_op(grad_y, values, col_ptr, csc_row_idx, csc_perm, x.shape[1], ctx.backend).to(x.dtype)
    if ctx.needs_input_grad[1]:
        grad_values, fused_bias = _grad_weight_op(
            grad_y, x, row_ptr, row_idx, col_idx, values.shape[1], values.shape[2], want_bias, ctx.backend
        )
        if want_bias:
            grad_bias = fused_bias.to(ctx.bias_dtype)
    elif want_bias:
        acc = torch.float64 if grad_y.dtype == torch.float64 else torch.float32
        grad_bias = grad_y.sum(dim=0, dtype=acc).to(ctx.bias_dtype)
    return grad_x, grad_values, grad_bias, None, None, None, None, None, None, None, None


torch.library.register_autograd("effst::block_sparse_linear", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public functional entry point
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

    ``x`` is floating with the dtype of ``values``, or a bool/uint8 spike tensor (no gradient).
    ``backend``: ``'auto'`` (Triton on CUDA or under the interpreter, torch elsewhere),
    ``'triton'`` or ``'torch'``.  Returns ``[..., out_features]`` in ``values.dtype``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if values.dim() != 3:
        raise ValueError(f"values: expected [nnz_blocks, block_rows, block_cols], got shape {tuple(values.shape)}")
    if values.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"values: expected a float32/float16/bfloat16/float64 tensor, got {values.dtype}")
    nnz, bm, bk = values.shape
    check_block_size((bm, bk), "values block shape")
    nbr = layout.row_ptr.numel() - 1
    nbc = layout.col_ptr.numel() - 1
    if layout.col_idx.numel() != nnz:
        raise ValueError(f"layout: describes {layout.col_idx.numel()} blocks but values holds {nnz}")
    if x.dim() < 1:
        raise ValueError("x: expected a tensor of shape [..., in_features], got a 0-dim tensor")
    in_features = x.shape[-1]
    if -(-in_features // bk) != nbc:
        raise ValueError(f"x: last dim {in_features} does not fit a layout of {nbc} block-columns of width {bk}")
    if -(-out_features // bm) != nbr:
        raise ValueError(f"out_features: {out_features} does not fit a layout of {nbr} block-rows of height {bm}")
    if x.dtype in _SPIKE_DTYPES:
        if x.dtype == torch.bool:
            x = x.view(torch.uint8)  # same bytes, read as one byte each
    elif x.dtype != values.dtype:
        raise TypeError(
            f"x: expected dtype {values.dtype} (the weight dtype) or bool/uint8 spikes, got {x.dtype}"
        )
    if bias is not None and (bias.shape != (out_features,)):
        raise ValueError(f"bias: expected shape ({out_features},), got {tuple(bias.shape)}")
    if bias is not None and bias.dtype != values.dtype:
        raise TypeError(f"bias: expected dtype {values.dtype}, got {bias.dtype}")
    if backend == "triton" and not _use_triton(x.device, backend):
        raise RuntimeError("backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, in_features)
    y = _block_sparse_linear_op(
        x2d, values, bias, layout.row_ptr, layout.col_idx, layout.row_idx,
        layout.col_ptr, layout.csc_row_idx, layout.csc_perm, int(out_features), backend,
    )
    return y.reshape(*lead, out_features)
