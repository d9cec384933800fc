"""Token-sparsification kernels: anchor-score top-k with gather, token gather/scatter, masked mean.

Rows: every op works on ``R`` independent rows (``R = T*B`` for STATA's per-timestep token sets,
``R = B`` for SparseSpikformer's per-sample set), each holding ``N`` tokens of ``C`` channels,
``[R, N, C]`` contiguous. Token indices are int64, ascending inside a row (compact order keeps
the original token order, so positional structure survives).

Data flow, top to bottom:

1. :func:`anchor_topk_gather` / :func:`topk_gather` -- one kernel, one program per (row, group):
   the row's token scores (STATA: the number of channels where the anchor's query and token i's
   key both spike, ``popcount(q0 & k_i)``, an integer, so exact; STS: the predictor's keep
   log-probability, read as given), the top ``K`` kept with the deterministic tie-break *higher
   score first, then lower token index*, and the kept tokens' activations copied to a compact
   ``[R, K, C]`` buffer in the same pass. The scores become order-preserving integer keys,
   sorted in registers; the K-th key is the threshold (no host synchronisation). ``topk_gather``
   also takes ``[G, R, N, C]`` activations whose G slices (STS: the T timesteps) share a row's
   selection.
2. :func:`gather_tokens` / :func:`scatter_tokens` -- compact <-> full. They are each other's
   gradient: the gradient of a gather is a scatter into zeros (``index_add`` with unique
   indices, so no atomics and deterministic), and vice versa.
2b. :func:`routed_neuron` (driven by ``effst.nn.token_routing.run_neuron_on_tokens``) -- a neuron whose membrane follows the token identity when the
   kept set changes per timestep (STATA): a dropped (token, t) gets zero input, so its membrane
   decays. For effst's sLIF / PLIF / LIF on Triton one fused kernel per direction does it: one
   program per (sample, token tile, channel tile) of the full grid keeps the membrane in
   registers over T, reads the input of step t from the compact slot that holds the token then
   (:func:`token_slots`, the route's inverse) and writes the spike back there; the backward
   recomputes the forward in registers and walks back in time, parameter gradients as one
   partial per program summed in a fixed order (deterministic). The full-grid current and
   spikes are never materialised. Any other neuron: scatter, run the neuron, gather.
3. :func:`masked_mean` -- ``out[b, c] = sum_{t,n} m[t,b,n] x[t,b,n,c] / sum_{t,n} m[t,b,n]``,
   the head's pooling over kept tokens only.

Where Triton cannot run (a CPU tensor outside ``TRITON_INTERPRET=1``) or ``backend='torch'``,
the same ops run in torch with the same numerics (integer scores, the same tie-break).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from effst.ops.first_order import first_order_only
from effst.ops.slif import _charge, _fire_and_reset, _scalars, reverse_step
from effst.ops.spike_bytes import float_values

BACKENDS = ("auto", "triton", "torch")


def _use_triton(device: torch.device, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    can_run = device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"
    if backend == "triton" and not can_run:
        raise RuntimeError("backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)")
    return backend != "torch" and can_run


def _check_rows(name: str, x: torch.Tensor, dims: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(x).__name__}")
    if x.dim() != dims:
        raise ValueError(f"{name}: expected a {dims}-D tensor, got shape {tuple(x.shape)}")


def _check_index(index: torch.Tensor, rows: int, tokens: int) -> None:
    _check_rows("index", index, 2)
    if index.dtype != torch.int64:
        raise TypeError(f"index: expected int64 token indices, got {index.dtype}")
    if index.shape[0] != rows:
        raise ValueError(f"index: expected {rows} rows, got shape {tuple(index.shape)}")
    if index.numel() and not index.is_cuda and (int(index.min()) < 0 or int(index.max()) >= tokens):
        # Only checked on the CPU: on a GPU the check would synchronise with the host.
        raise ValueError(f"index: token indices must lie in [0, {tokens}), got [{int(index.min())}, {int(index.max())}]")
    if index.shape[1] > 1 and not index.is_cuda and bool((index.sort(dim=1).values.diff(dim=1) == 0).any()):
        # A repeated index would make the scatter (and so the gather's gradient) drop values.
        raise ValueError("index: token indices must be unique within each row")


# ---------------------------------------------------------------------------------------------
# 1. Score + top-k + gather (STATA's anchor scores, or precomputed scores such as STS's)
# ---------------------------------------------------------------------------------------------
_NO_TOKEN = tl.constexpr(-(2 ** 63))  # the int64 key of a token past N (no score maps to it)


@triton.jit
def _order_key(score, valid):
    """Integer keys ordered as the scores (ints as they are; floats from their own bits: the
    magnitude bits, negated for a negative sign, so -0.0 == 0.0, subnormals keep their order,
    and every NaN goes above +inf); tokens past N get the smallest key, which no score maps to.
    Integer operations only: no float widening (Triton's interpreter flushes bfloat16 subnormals
    to zero when widening them) and no float comparison (a GPU may flush subnormals in one)."""
    if score.dtype.is_int():
        key = score.to(tl.int64)
    else:
        if score.dtype.is_fp64():
            bits = score.to(tl.int64, bitcast=True)
            magnitude = bits & 0x7FFFFFFFFFFFFFFF
            infinity = 0x7FF0000000000000
        elif score.dtype.is_fp32():
            bits = score.to(tl.int32, bitcast=True).to(tl.int64)
            magnitude = bits & 0x7FFFFFFF
            infinity = 0x7F800000
        else:
            bits = score.to(tl.int16, bitcast=True).to(tl.int64)
            magnitude = bits & 0x7FFF
            infinity = 0x7F80 if score.dtype.is_bf16() else 0x7C00
        key = tl.where(bits < 0, -magnitude, magnitude)
        key = tl.where(magnitude > infinity, 0x7FFFFFFFFFFFFFFF, key)  # NaN
    return tl.where(valid, key, _NO_TOKEN)


@triton.jit
def _topk_gather_kernel(score_ptr, query_ptr, key_ptr, x_ptr, index_ptr, out_ptr,
                        R, N, W, C, K, score_row_stride, score_token_stride,
                        ANCHOR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    # Program (row, group): the selection of score row ``row`` applied to x[group, row]; groups
    # share the selection (STS: one token set per sample for every timestep), so group 0 alone
    # writes the indices (and the anchor scores).
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1).to(tl.int64)
    tokens = tl.arange(0, BLOCK_N)
    valid = tokens < N
    score_at = score_ptr + row * score_row_stride + tokens * score_token_stride
    if ANCHOR:
        # Scores: popcount(q0 & k_i) over the W attention channels, as int32 (exact).
        score = tl.zeros([BLOCK_N], dtype=tl.int32)
        for w0 in range(0, W, BLOCK_W):
            channels = w0 + tl.arange(0, BLOCK_W)
            in_w = channels < W
            q = tl.load(query_ptr + row * W + channels, mask=in_w, other=0.0)
            k = tl.load(key_ptr + row * N * W + tokens[:, None] * W + channels[None, :],
                        mask=valid[:, None] & in_w[None, :], other=0.0)
            both = (q[None, :] != 0) & (k != 0)
            score += tl.sum(both.to(tl.int32), axis=1)
        tl.store(score_at, score, mask=valid & (group == 0))
    else:
        score = tl.load(score_at, mask=valid, other=0)
    # Keep the K best: higher score first, ties to the lower index, NaN above +inf (torch's
    # stable descending sort). Scores become order-preserving integer keys and are sorted in
    # registers (bitonic, O(N log^2 N), a few values per thread): the K-th key is the threshold,
    # every key above it is kept, and of the keys equal to it the lowest indices fill the rest.
    # (An N x N "who beats whom" matrix spilled at N = 196: 5 KB of stack per thread on sm_90.)
    key = _order_key(score, valid)
    threshold = tl.max(tl.where(tokens == K - 1, tl.sort(key, descending=True), _NO_TOKEN), axis=0)
    above = key > threshold
    tied = key == threshold
    tie_order = tl.cumsum(tied.to(tl.int32), axis=0)
    kept = (above | (tied & (tie_order <= K - tl.sum(above.to(tl.int32), axis=0)))) & valid
    position = tl.cumsum(kept.to(tl.int32), axis=0) - 1  # slot in the ascending compact order
    tl.store(index_ptr + row * K + position, tokens.to(tl.int64), mask=kept & (group == 0))
    source = (group * R + row) * N * C
    target = (group * R + row) * K * C
    for c0 in range(0, C, BLOCK_C):
        channels = c0 + tl.arange(0, BLOCK_C)
        in_c = channels < C
        values = tl.load(x_ptr + source + tokens[:, None] * C + channels[None, :],
                         mask=kept[:, None] & in_c[None, :], other=0.0)
        tl.store(out_ptr + target + position[:, None] * C + channels[None, :], values,
                 mask=kept[:, None] & in_c[None, :])


def topk_tokens_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[R, k]`` (ascending) of the ``k`` best tokens per row of ``scores`` ``[R, N]``:
    higher score first, ties to the lower token index (a stable descending sort; NaN first)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.sort(order, dim=1).values


def anchor_scores_reference(anchor_query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``popcount(q0 & k_i)`` as int64 ``[R, N]`` (float64-free: counts of coinciding spikes)."""
    return ((anchor_query[:, None, :] != 0) & (keys != 0)).sum(dim=-1)


def _check_k(k: int, tokens: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= tokens:
        raise ValueError(f"k: expected an int in [1, {tokens}], got {k!r}")


#: Elements of the [tokens, channels] tiles the top-k + gather kernel loads at once: every
#: element carries a 64-bit address, so 2048 per 4 warps (16 per thread) keeps the kernel at
#: <= 128 registers and spill-free on sm_90 at N = 64 and N = 196 (4096 took 184-241 registers).
TOPK_GATHER_TILE = 2048


def topk_gather_blocks(tokens: int, channels_w: int, channels: int) -> dict:
    """The launch's block sizes for ``tokens`` tokens, ``channels_w`` score channels (STATA's
    W) and ``channels`` gathered channels (C)."""
    block_n = triton.next_power_of_2(tokens)
    width = max(1, TOPK_GATHER_TILE // block_n)
    return {"BLOCK_N": block_n, "BLOCK_W": min(64, width, triton.next_power_of_2(max(channels_w, 1))),
            "BLOCK_C": min(64, width, triton.next_power_of_2(max(channels, 1)))}


def _select_and_gather(x: torch.Tensor, k: int, scores: torch.Tensor, query: Optional[torch.Tensor] = None,
                       keys: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch :func:`_topk_gather_kernel` on ``x`` ``[G, R, N, C]``: with ``query``/``keys`` the
    anchor scores are computed into ``scores`` (an empty int32 ``[R, N]``), else ``scores`` is
    read (any strides). Returns ``(index [R, k], compact [G, R, k, C])``, the gather's gradient
    attached."""
    G, R, N, C = x.shape
    index = torch.empty(R, k, dtype=torch.int64, device=x.device)
    compact = torch.empty(G, R, k, C, dtype=x.dtype, device=x.device)
    anchor = query is not None
    if R and G:
        W = keys.shape[2] if anchor else 1
        _topk_gather_kernel[(R, G)](scores, query if anchor else scores, keys if anchor else scores,
                                    x.detach().contiguous(), index, compact, R, N, W, C, k,
                                    scores.stride(0), scores.stride(1), ANCHOR=anchor,
                                    **topk_gather_blocks(N, W, C))
    if x.requires_grad:
        # The fused kernel already compacted the values; reattach the gather's gradient.
        rows = index.expand(G, R, k).reshape(G * R, k)
        compact = _ReattachGather.apply(x.reshape(G * R, N, C), rows, compact.view(G * R, k, C)).view(G, R, k, C)
    return index, compact


def anchor_topk_gather(anchor_query: torch.Tensor, keys: torch.Tensor, x: torch.Tensor, k: int, *,
                       backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score tokens against an anchor query, keep the best ``k`` per row and compact them.

    Args:
        anchor_query: ``[R, W]`` spikes of the anchor token's query (all heads concatenated).
        keys: ``[R, N, W]`` spikes of the tokens' keys.
        x: ``[R, N, C]`` activations to compact (e.g. the residual stream).
        k: tokens kept per row, ``1 <= k <= N``.

    Returns ``(scores [R, N] int32, index [R, k] int64 ascending, compact [R, k, C])``. The
    selection carries no gradient; ``compact`` is ``x`` gathered (its gradient scatters back).
    """
    anchor_query, keys, x = float_values(anchor_query), float_values(keys), float_values(x)
    _check_rows("anchor_query", anchor_query, 2)
    _check_rows("keys", keys, 3)
    _check_rows("x", x, 3)
    R, N, W = keys.shape
    if tuple(anchor_query.shape) != (R, W):
        raise ValueError(f"anchor_query: expected shape {(R, W)} to match keys {tuple(keys.shape)}, "
                         f"got {tuple(anchor_query.shape)}")
    if tuple(x.shape[:2]) != (R, N):
        raise ValueError(f"x: expected shape [{R}, {N}, C] to match keys, got {tuple(x.shape)}")
    _check_k(k, N)
    if not _use_triton(x.device, backend):
        scores = anchor_scores_reference(anchor_query, keys).to(torch.int32)
        index = topk_tokens_reference(scores, k)
        return scores, index, gather_tokens(x, index, backend="torch")
    scores = torch.empty(R, N, dtype=torch.int32, device=x.device)
    index, compact = _select_and_gather(x[None], k, scores, anchor_query.contiguous(), keys.contiguous())
    return scores, index, compact[0]


def topk_gather(scores: torch.Tensor, x: torch.Tensor, k: int, *,
                backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``k`` best-scored tokens per row and compact them, in one pass (SparseSpikformer's
    STS at inference: ``scores`` = the predictor's keep log-probability).

    Args:
        scores: ``[R, N]`` precomputed scores (float or integer, any strides, e.g. a column of the
            predictor's ``[R, N, 2]`` output); ties go to the lower token index, NaN ranks first,
            exactly as :func:`topk_tokens_reference`. No gradient flows to them.
        x: ``[R, N, C]``, or ``[G, R, N, C]`` where the G slices (timesteps) share row r's selection.
        k: tokens kept per row, ``1 <= k <= N``.

    Returns ``(index [R, k] int64 ascending, compact)`` with ``compact`` shaped like ``x`` with
    ``k`` tokens; its gradient scatters back to ``x``.
    """
    scores, x = float_values(scores), float_values(x)
    _check_rows("scores", scores, 2)
    if scores.dtype == torch.bool or scores.is_complex():
        raise TypeError(f"scores: expected a real float or integer tensor, got {scores.dtype}")
    if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4):
        raise ValueError(f"x: expected a [R, N, C] or [G, R, N, C] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    R, N = scores.shape
    if tuple(x.shape[-3:-1]) != (R, N):
        raise ValueError(f"x: expected shape [..., {R}, {N}, C] to match scores {tuple(scores.shape)}, "
                         f"got {tuple(x.shape)}")
    if scores.device != x.device:
        raise ValueError(f"scores: expected a tensor on {x.device} (x's device), got {scores.device}")
    _check_k(k, N)
    grouped = x if x.dim() == 4 else x[None]
    scores = scores.detach()
    if _use_triton(x.device, backend):
        index, compact = _select_and_gather(grouped, k, scores)
    else:
        G, C = grouped.shape[0], grouped.shape[3]
        index = topk_tokens_reference(scores, k)
        rows = index.expand(G, R, k).reshape(G * R, k)
        compact = gather_tokens(grouped.reshape(G * R, N, C), rows, backend="torch").view(G, R, k, C)
    return index, compact if x.dim() == 4 else compact[0]


class _ReattachGather(torch.autograd.Function):
    """Identity on an already gathered tensor whose gradient scatters back to ``x``."""

    @staticmethod
    def forward(ctx, x, index, compact):
        ctx.save_for_backward(index)
        ctx.tokens = x.shape[1]
        return compact.view_as(compact)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors  # (through the Function: a second derivative is a gather)
        return _ScatterTokens.apply(grad.contiguous(), index, ctx.tokens, "auto"), None, None


# ---------------------------------------------------------------------------------------------
# 2. Gather / scatter along the token axis
# ---------------------------------------------------------------------------------------------
@triton.jit
def _move_tokens_kernel(src_ptr, index_ptr, dst_ptr, N, K, C, SCATTER: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    # Gather: compact[r, s] = full[r, index[r, s]]; scatter: full[r, index[r, s]] = compact[r, s].
    # Indices are unique per row, so every destination is written by one program: no atomics.
    row = tl.program_id(0).to(tl.int64)
    slots = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    channels = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_k = slots < K
    mask = in_k[:, None] & (channels < C)[None, :]
    token = tl.load(index_ptr + row * K + slots, mask=in_k, other=0)
    full = row * N * C + token[:, None] * C + channels[None, :]
    compact = row * K * C + slots[:, None] * C + channels[None, :]
    if SCATTER:
        tl.store(dst_ptr + full, tl.load(src_ptr + compact, mask=mask, other=0.0), mask=mask)
    else:
        tl.store(dst_ptr + compact, tl.load(src_ptr + full, mask=mask, other=0.0), mask=mask)


def _grid(R: int, K: int, C: int) -> tuple[tuple[int, int, int], int, int]:
    block_k = min(32, triton.next_power_of_2(max(K, 1)))
    block_c = min(128, triton.next_power_of_2(max(C, 1)))
    return (R, triton.cdiv(K, block_k), triton.cdiv(C, block_c)), block_k, block_c


def _gather(x: torch.Tensor, index: torch.Tensor, backend: str) -> torch.Tensor:
    R, N, C = x.shape
    K = index.shape[1]
    if not _use_triton(x.device, backend):
        return torch.gather(x, 1, index[:, :, None].expand(R, K, C))
    out = torch.empty(R, K, C, dtype=x.dtype, device=x.device)
    if out.numel():
        grid, block_k, block_c = _grid(R, K, C)
        _move_tokens_kernel[grid](x.contiguous(), index.contiguous(), out, N, K, C, SCATTER=False,
                                  BLOCK_K=block_k, BLOCK_C=block_c)
    return out


def _scatter(x: torch.Tensor, index: torch.Tensor, tokens: int, backend: str) -> torch.Tensor:
    R, K, C = x.shape
    out = torch.zeros(R, tokens, C, dtype=x.dtype, device=x.device)
    if not _use_triton(x.device, backend):
        return out.index_put_((torch.arange(R, device=x.device)[:, None], index), x)
    if x.numel():
        grid, block_k, block_c = _grid(R, K, C)
        _move_tokens_kernel[grid](x.contiguous(), index.contiguous(), out, tokens, K, C, SCATTER=True,
                                  BLOCK_K=block_k, BLOCK_C=block_c)
    return out


class _GatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index, backend):
        ctx.save_for_backward(index)
        ctx.tokens, ctx.backend = x.shape[1], backend
        return _gather(x, index, backend)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors  # (through the Function: differentiable again)
        return _ScatterTokens.apply(grad.contiguous(), index, ctx.tokens, ctx.backend), None, None


class _ScatterTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index, tokens, backend):
        ctx.save_for_backward(index)
        ctx.backend = backend
        return _scatter(x, index, tokens, backend)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors  # (through the Function: differentiable again)
        return _GatherTokens.apply(grad.contiguous(), index, ctx.backend), None, None, None


def gather_tokens(x: torch.Tensor, index: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``out[r, s] = x[r, index[r, s]]``: ``[R, N, C]`` -> ``[R, K, C]``; the gradient scatters back
    (dropped tokens get zero gradient). ``index``: int64 ``[R, K]``, unique per row."""
    x = float_values(x)
    _check_rows("x", x, 3)
    _check_index(index, x.shape[0], x.shape[1])
    return _GatherTokens.apply(x, index, backend)


def scatter_tokens(x: torch.Tensor, index: torch.Tensor, tokens: int, *, backend: str = "auto") -> torch.Tensor:
    """Inverse of :func:`gather_tokens`: ``[R, K, C]`` -> ``[R, tokens, C]`` with zeros at the
    tokens ``index`` does not name. ``index``: int64 ``[R, K]``, unique per row."""
    x = float_values(x)
    _check_rows("x", x, 3)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < x.shape[1]:
        raise ValueError(f"tokens: expected an int >= {x.shape[1]} (the compact token count), got {tokens!r}")
    _check_index(index, x.shape[0], tokens)
    if index.shape[1] != x.shape[1]:
        raise ValueError(f"index: expected {x.shape[1]} indices per row (x's tokens), got {index.shape[1]}")
    return _ScatterTokens.apply(x, index, tokens, backend)


# ---------------------------------------------------------------------------------------------
# 2b. A neuron whose membrane follows the token identity (STATA), fused
# ---------------------------------------------------------------------------------------------
#: Longest T the fused routed neuron unrolls (its backward keeps every step in registers);
#: longer runs take the scatter -> neuron -> gather path.
MAX_ROUTED_T = 16
ROUTED_FORWARD_BLOCK = (16, 64)     # (tokens, channels) per program; reasoned, not tuned
#: The backward keeps T steps of state per element in registers: at T = 16 a program of 8 x 64
#: spilled on sm_90 (bf16 current, rect surrogate; fp64: 0.5-2.9 KB of stack per thread).
ROUTED_BACKWARD_BLOCK = (8, 32)     # fp32 compute: <= 128 registers at T = 16, every surrogate
ROUTED_BACKWARD_BLOCK_FP64 = (8, 16)


@triton.jit
def _routed_load(slot_ptr, x_ptr, b, t, tokens, channels, grid_mask, B, N, K, C, COMPUTE_DTYPE: tl.constexpr):
    """Step ``t`` of the neurons ``(b, tokens, channels)``: which are kept (the slot that holds
    each token at ``t``; -1 = dropped), their compact offsets, and the input (0 where dropped)."""
    slot = tl.load(slot_ptr + (t * B + b) * N + tokens, mask=tokens < N, other=-1)
    kept = (slot >= 0)[:, None] & grid_mask
    compact = ((t * B + b) * K + slot.to(tl.int64))[:, None] * C + channels[None, :]
    return kept, compact, tl.load(x_ptr + compact, mask=kept, other=0.0).to(COMPUTE_DTYPE)


@triton.jit
def _routed_tile(w_ptr, theta_ptr, scalars_ptr, N, C, w_channels, theta_channels,
                 COMPUTE_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """The program's sample, tokens, channels, mask, state offsets, k = sigmoid(w), theta, V_rest."""
    tiles = tl.cdiv(N, BLOCK_N)
    b = (tl.program_id(0) // tiles).to(tl.int64)
    tokens = (tl.program_id(0) % tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    channels = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_c = channels < C
    grid_mask = (tokens < N)[:, None] & in_c[None, :]
    state = (b * N + tokens)[:, None] * C + channels[None, :]
    k = tl.sigmoid(tl.load(w_ptr + channels % w_channels, mask=in_c, other=0.0).to(COMPUTE_DTYPE))[None, :]
    theta = tl.load(theta_ptr + channels % theta_channels, mask=in_c, other=0.0).to(COMPUTE_DTYPE)[None, :]
    v_rest = tl.load(scalars_ptr).to(COMPUTE_DTYPE)
    return b, tokens, channels, grid_mask, state, k, theta, v_rest


@triton.jit
def _routed_neuron_forward_kernel(x_ptr, slot_ptr, w_ptr, theta_ptr, v_init_ptr, scalars_ptr, spikes_ptr, v_final_ptr,
                                  B, N, K, C, w_channels, theta_channels, T: tl.constexpr,
                                  HAS_V_INIT: tl.constexpr, HARD_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr,
                                  COMPUTE_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    # One program per (sample, BLOCK_N tokens, BLOCK_C channels) of the FULL token grid; the
    # membrane stays in registers over all T and each step reads / writes the compact slot.
    b, tokens, channels, grid_mask, state, k, theta, v_rest = _routed_tile(
        w_ptr, theta_ptr, scalars_ptr, N, C, w_channels, theta_channels, COMPUTE_DTYPE, BLOCK_N, BLOCK_C)
    if HAS_V_INIT:
        v = tl.load(v_init_ptr + state, mask=grid_mask, other=0.0).to(COMPUTE_DTYPE)
    else:
        v = tl.zeros([BLOCK_N, BLOCK_C], dtype=COMPUTE_DTYPE) + v_rest
    for t in tl.static_range(T):
        kept, compact, x = _routed_load(slot_ptr, x_ptr, b, t, tokens, channels, grid_mask, B, N, K, C,
                                        COMPUTE_DTYPE)
        h = _charge(v, x, k, v_rest, DECAY_INPUT)
        tl.store(spikes_ptr + compact, (h >= theta).to(spikes_ptr.dtype.element_ty), mask=kept)
        _, v = _fire_and_reset(h, theta, v_rest, HARD_RESET)
    tl.store(v_final_ptr + state, v, mask=grid_mask)


@triton.jit
def _routed_neuron_backward_kernel(grad_s_ptr, grad_v_final_ptr, x_ptr, slot_ptr, w_ptr, theta_ptr, v_init_ptr,
                                   scalars_ptr, grad_x_ptr, grad_w_ptr, grad_theta_ptr, grad_v_init_ptr,
                                   B, N, K, C, w_channels, theta_channels, T: tl.constexpr,
                                   HAS_V_INIT: tl.constexpr, HAS_GRAD_V_FINAL: tl.constexpr,
                                   HARD_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr, DETACH_RESET: tl.constexpr,
                                   SURROGATE: tl.constexpr, NEED_GRAD_W: tl.constexpr,
                                   NEED_GRAD_THETA: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                                   BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    b, tokens, channels, grid_mask, state, k, theta, v_rest = _routed_tile(
        w_ptr, theta_ptr, scalars_ptr, N, C, w_channels, theta_channels, COMPUTE_DTYPE, BLOCK_N, BLOCK_C)
    alpha = tl.load(scalars_ptr + 1).to(COMPUTE_DTYPE)
    if HAS_V_INIT:
        v = tl.load(v_init_ptr + state, mask=grid_mask, other=0.0).to(COMPUTE_DTYPE)
    else:
        v = tl.zeros([BLOCK_N, BLOCK_C], dtype=COMPUTE_DTYPE) + v_rest
    # Recompute the forward (nothing is saved on the full grid), keeping V_{t-1} and the step's
    # compact offsets in registers; then walk back in time.
    v_prevs = ()
    for t in tl.static_range(T):
        v_prevs = v_prevs + (v,)
        _, _, x = _routed_load(slot_ptr, x_ptr, b, t, tokens, channels, grid_mask, B, N, K, C, COMPUTE_DTYPE)
        _, v = _fire_and_reset(_charge(v, x, k, v_rest, DECAY_INPUT), theta, v_rest, HARD_RESET)
    zero = tl.zeros([BLOCK_N, BLOCK_C], dtype=COMPUTE_DTYPE)
    grad_k = zero
    grad_theta = zero
    carry = zero            # dL/dV_t, from step t + 1 (and from the final state's own gradient)
    if HAS_GRAD_V_FINAL:
        carry = tl.load(grad_v_final_ptr + state, mask=grid_mask, other=0.0).to(COMPUTE_DTYPE)
    for t in tl.static_range(T - 1, -1, -1):
        kept, compact, x = _routed_load(slot_ptr, x_ptr, b, t, tokens, channels, grid_mask, B, N, K, C,
                                        COMPUTE_DTYPE)
        grad_s = tl.load(grad_s_ptr + compact, mask=kept, other=0.0).to(COMPUTE_DTYPE)
        grad_x, carry, step_k, step_theta = reverse_step(grad_s, carry, x, v_prevs[t], k, theta, v_rest, alpha,
                                                         zero, HARD_RESET, DECAY_INPUT, DETACH_RESET, SURROGATE)
        grad_k += step_k
        grad_theta += step_theta
        tl.store(grad_x_ptr + compact, grad_x.to(grad_x_ptr.dtype.element_ty), mask=kept)
    # Parameter gradients: one partial per program and channel, summed by the host in a fixed
    # order (deterministic, no atomics).
    partial = tl.program_id(0).to(tl.int64) * C + channels
    if NEED_GRAD_W:
        tl.store(grad_w_ptr + partial, tl.sum(tl.where(grid_mask, grad_k * k * (1.0 - k), 0.0), axis=0),
                 mask=channels < C)
    if NEED_GRAD_THETA:
        tl.store(grad_theta_ptr + partial, tl.sum(tl.where(grid_mask, grad_theta, 0.0), axis=0), mask=channels < C)
    if HAS_V_INIT:
        tl.store(grad_v_init_ptr + state, carry, mask=grid_mask)


def token_slots(index: torch.Tensor, tokens: int) -> torch.Tensor:
    """Inverse of a route: ``slots[t, b, n]`` = the compact slot holding token ``n`` at ``(t, b)``,
    or -1 where it was dropped (int32 ``[T, B, tokens]``); ``index`` is ``[T, B, K]``, unique per row."""
    T, B, K = index.shape
    slots = torch.full((T, B, tokens), -1, dtype=torch.int32, device=index.device)
    return slots.scatter_(2, index, torch.arange(K, dtype=torch.int32, device=index.device).expand(T, B, K))


class _RoutedNeuron(torch.autograd.Function):
    """Fused per-token-identity neuron: ``(current [T, B, K, C], w [Cw], theta [Ct], v_init
    [B, N, C] or None, slots [T, B, N]) -> (spikes [T, B, K, C], v_final [B, N, C])``."""

    @staticmethod
    def forward(ctx, current, w, theta, v_init, slots, options):
        T, B, K, C = current.shape
        N = slots.shape[2]
        v_reset, surrogate_id, alpha, detach_reset, decay_input, spike_dtype = options
        cdtype = torch.float64 if current.dtype == torch.float64 else torch.float32
        spikes = torch.empty_like(current, dtype=current.dtype if spike_dtype is None else spike_dtype)
        v_final = torch.empty(B, N, C, dtype=cdtype, device=current.device)
        scalars = _scalars(v_reset, alpha, cdtype, current.device)
        block_n, block_c = ROUTED_FORWARD_BLOCK
        if v_final.numel():
            grid = (B * triton.cdiv(N, block_n), triton.cdiv(C, block_c))
            _routed_neuron_forward_kernel[grid](
                current, slots, w, theta, v_final if v_init is None else v_init, scalars, spikes, v_final,
                B, N, K, C, w.numel(), theta.numel(), T=T, HAS_V_INIT=v_init is not None,
                HARD_RESET=v_reset is not None, DECAY_INPUT=decay_input, COMPUTE_DTYPE=_tl_dtype(cdtype),
                BLOCK_N=block_n, BLOCK_C=block_c)
        ctx.save_for_backward(current, w, theta, v_init, slots, scalars)
        ctx.options = options
        if not spikes.is_floating_point():
            ctx.mark_non_differentiable(spikes)
        ctx.set_materialize_grads(False)
        return spikes, v_final

    @staticmethod
    @first_order_only
    def backward(ctx, grad_spikes, grad_v_final):
        current, w, theta, v_init, slots, scalars = ctx.saved_tensors
        v_reset, surrogate_id, _, detach_reset, decay_input, _ = ctx.options
        need_w, need_theta = ctx.needs_input_grad[1:3]
        T, B, K, C = current.shape
        N = slots.shape[2]
        block_n, block_c = ROUTED_BACKWARD_BLOCK_FP64 if scalars.dtype == torch.float64 else ROUTED_BACKWARD_BLOCK
        programs = B * triton.cdiv(N, block_n)
        if grad_spikes is None:
            grad_spikes = torch.zeros_like(current)
        cdtype = scalars.dtype
        grad_x = torch.empty_like(current)
        grad_w = torch.empty(programs, C, dtype=cdtype, device=current.device) if need_w else None
        grad_theta = torch.empty(programs, C, dtype=cdtype, device=current.device) if need_theta else None
        grad_v_init = torch.empty_like(v_init) if v_init is not None else None
        if programs and C:
            _routed_neuron_backward_kernel[(programs, triton.cdiv(C, block_c))](
                grad_spikes.contiguous(), grad_v_final.contiguous() if grad_v_final is not None else scalars, current,
                slots, w, theta, v_init if v_init is not None else scalars, scalars, grad_x,
                grad_w if need_w else scalars, grad_theta if need_theta else scalars,
                grad_v_init if v_init is not None else scalars, B, N, K, C, w.numel(), theta.numel(), T=T,
                HAS_V_INIT=v_init is not None, HAS_GRAD_V_FINAL=grad_v_final is not None,
                HARD_RESET=v_reset is not None, DECAY_INPUT=decay_input, DETACH_RESET=detach_reset,
                SURROGATE=surrogate_id, NEED_GRAD_W=need_w, NEED_GRAD_THETA=need_theta,
                COMPUTE_DTYPE=_tl_dtype(cdtype), BLOCK_N=block_n, BLOCK_C=block_c)

        def to_parameter(partials, parameter):
            if partials is None:
                return None
            total = partials.sum(dim=0)                     # fixed-order reduction: deterministic
            return total.sum().reshape(parameter.shape) if parameter.numel() == 1 else total

        return grad_x, to_parameter(grad_w, w), to_parameter(grad_theta, theta), grad_v_init, None, None


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def routed_neuron(current: torch.Tensor, w: torch.Tensor, theta: torch.Tensor,
                  v_init: Optional[torch.Tensor], slots: torch.Tensor, options: tuple):
    """The fused per-token-identity neuron (differentiable): ``current`` ``[T, B, K, C]``,
    ``w`` / ``theta`` flat per-layer (1) or per-channel (C) in the compute dtype, ``v_init``
    ``[B, N, C]`` or None, ``slots`` from :func:`token_slots`, ``options`` = ``(v_reset,
    surrogate_id, alpha, detach_reset, decay_input, spike_dtype)``; returns ``(spikes
    [T, B, K, C], v_final [B, N, C])``. ``effst.nn.token_routing`` decides when a neuron module
    can run through it."""
    return _RoutedNeuron.apply(float_values(current), w, theta, v_init, slots, options)


# ---------------------------------------------------------------------------------------------
# 3. Masked mean pooling over kept tokens
# ---------------------------------------------------------------------------------------------
@triton.jit
def _masked_mean_kernel(x_ptr, mask_ptr, out_ptr, T, B, N, C,
                        ACC_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_c = channels < C
    total = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    count = tl.zeros([BLOCK_N], dtype=ACC_DTYPE)
    for t in range(0, T):
        base = (t * B + b) * N
        for n0 in range(0, N, BLOCK_N):
            tokens = n0 + tl.arange(0, BLOCK_N)
            in_n = tokens < N
            m = tl.load(mask_ptr + base + tokens, mask=in_n, other=0.0).to(ACC_DTYPE)
            values = tl.load(x_ptr + (base + tokens)[:, None] * C + channels[None, :],
                             mask=in_n[:, None] & in_c[None, :], other=0.0).to(ACC_DTYPE)
            total += tl.sum(values * m[:, None], axis=0)
            count += m
    tl.store(out_ptr + b * C + channels, total / tl.sum(count, axis=0), mask=in_c)


def masked_mean_reference(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum_{t,n} m x / sum_{t,n} m`` over ``x`` ``[T, B, N, C]`` with ``mask`` ``[T, B, N]``."""
    m = mask.to(x.dtype)
    return (x * m[..., None]).sum(dim=(0, 2)) / m.sum(dim=(0, 2))[:, None]


class _MaskedMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, backend):
        ctx.save_for_backward(mask)
        ctx.dtype = x.dtype
        if not _use_triton(x.device, backend):
            return masked_mean_reference(x, mask)
        T, B, N, C = x.shape
        out = torch.empty(B, C, dtype=x.dtype, device=x.device)
        block_c = min(128, triton.next_power_of_2(max(C, 1)))
        acc = tl.float64 if x.dtype == torch.float64 else tl.float32
        _masked_mean_kernel[(B, triton.cdiv(C, block_c))](x.contiguous(), mask.contiguous().to(x.dtype), out,
                                                           T, B, N, C, ACC_DTYPE=acc,
                                                           BLOCK_N=min(32, triton.next_power_of_2(N)),
                                                           BLOCK_C=block_c)
        return out

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        m = mask.to(grad.dtype)
        count = m.sum(dim=(0, 2))  # [B]
        return m[..., None] * (grad / count[:, None])[None, :, None, :], None, None


def masked_mean(x: torch.Tensor, mask: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Mean of ``x`` ``[T, B, N, C]`` over T and the kept tokens: ``mask`` ``[T, B, N]`` (or ``[B, N]``,
    the same set at every t) of 0/1 (bool or float; no gradient flows to it). -> ``[B, C]``.
    Every sample must keep at least one token."""
    x = float_values(x)
    _check_rows("x", x, 4)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a tensor, got {type(mask).__name__}")
    if mask.dim() == 2:
        mask = mask.unsqueeze(0).expand(x.shape[0], *mask.shape)
    if tuple(mask.shape) != tuple(x.shape[:3]):
        raise ValueError(f"mask: expected shape {tuple(x.shape[:3])} or {tuple(x.shape[1:3])}, got {tuple(mask.shape)}")
    if not mask.is_cuda and mask.numel() and bool((mask.detach().to(torch.float64).sum(dim=(0, 2)) == 0).any()):
        # Checked off the GPU only (a host sync there); an empty sample would silently give NaN.
        raise ValueError("mask: every sample must keep at least one token")
    return _MaskedMean.apply(x, mask.detach(), backend)


__all__ = ["anchor_topk_gather", "topk_gather", "anchor_scores_reference", "topk_tokens_reference", "gather_tokens",
           "scatter_tokens", "routed_neuron", "token_slots", "MAX_ROUTED_T", "masked_mean", "masked_mean_reference", "BACKENDS"]
