"""Fused sLIF neuron: Triton kernels, launchers, autograd Function, functional API.

Reads top to bottom as the data flows: the per-step recurrence (docs/slif.md),
the forward kernel (one launch for all T), the backward kernel (one launch, reverse time,
recomputing the forward per chunk from checkpoints instead of storing H), the launch plan
(everything about a call that depends only on shapes, dtypes and options: built once per
shape by the modules, per call by :func:`slif`), the launchers, the autograd Function that
calls them directly, the torch.library ops used only while torch.compile traces, and finally
:func:`slif`, the public entry point that validates its arguments and picks a backend.

Memory plan per neuron-step (fp32 I/O): forward reads x, writes spikes; backward reads
grad_spikes and x, writes grad_x — 20 bytes, the docs/benchmarks.md minimum. The only extra
traffic is one fp32 V checkpoint per CHUNK steps (0 when T <= CHUNK). Parameter gradients
are summed inside the backward kernel to one partial per program wherever a program's
neurons all share one parameter entry (per-layer parameters always; per-channel ones when
the channel's span of neurons is at least MIN_PARTIAL_ROW long), or, for shorter spans
(channel-last), to one partial per column of a [rows, columns] tile (1 value per 16 neurons),
then one small deterministic torch sum; only per-neuron parameters store one value per neuron.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from effst.ops import launch as _launch
from effst.ops.first_order import first_order_only
from effst.ops.layout import (BYTE_DTYPES, FLOAT_DTYPES, normalize_channel_dim, reduce_to_parameter,
                              resolve_parameter_layout)
from effst.ops.slif_reference import slif_reference
from effst.ops.spike_bytes import SpikeBytes, as_spike_bytes, compile_error, float_values
from effst.ops.surrogates import SURROGATE_NAMES, resolve_surrogate, surrogate_grad_triton

# Steps unrolled per chunk. T <= MAX_CHUNK runs as a single fully unrolled chunk (no
# checkpoints); longer sequences checkpoint V every MAX_CHUNK steps and the backward
# recomputes one chunk at a time, holding its x, V and incoming gradients in registers.
# Launch parameters: reasoned defaults, overridable by environment variables so a GPU run can
# try others without editing code (bench/tune_slif.py sweeps them; see bench/RESULTS.md).
MAX_CHUNK = int(os.environ.get("EFFST_SLIF_MAX_CHUNK", 8))
FORWARD_BLOCK = int(os.environ.get("EFFST_SLIF_FORWARD_BLOCK", 1024))
FORWARD_WARPS = int(os.environ.get("EFFST_SLIF_FORWARD_WARPS", 4))
BACKWARD_BLOCK = int(os.environ.get("EFFST_SLIF_BACKWARD_BLOCK", 512))
BACKWARD_WARPS = int(os.environ.get("EFFST_SLIF_BACKWARD_WARPS", 4))
# Forward variant: 1 loads all of a chunk's x tiles before its serial recurrence (CHUNK loads in
# flight per thread, no branch per step); 0 (default until a GPU run measures both) loads one
# step at a time. Both are exact; docs/slif.md ("Kernels") says what each costs.
FORWARD_PRELOAD = os.environ.get("EFFST_SLIF_FORWARD_PRELOAD", "0") == "1"
# A per-channel parameter gets per-program partial gradients when each channel covers runs of
# at least this many consecutive neurons (the backward grid then follows those runs, so no
# program straddles two channels); shorter runs would leave most of a program's lanes idle.
MIN_PARTIAL_ROW = 128
# Shorter runs (channel-last: runs of one neuron) take the tiled backward instead: neurons as
# [rows, row_len], row_len a multiple of the channel period, each program owning one
# [BACKWARD_BLOCK // TILE_COLUMNS, TILE_COLUMNS] tile (columns contiguous: coalesced) and
# summing it over rows to TILE_COLUMNS partials, 1 value per 16 neurons at the defaults. (A
# program looping over several tiles would store fewer partials, but the loop costs 38
# registers on sm_90, 124 -> 162: 3 instead of 4 programs per SM.) A power of 2; 0 turns the
# tiled backward off (per-neuron gradients, as before it existed: for A/B timing on a GPU).
TILE_COLUMNS = int(os.environ.get("EFFST_SLIF_TILE_COLUMNS", 32))
if TILE_COLUMNS < 0 or TILE_COLUMNS & (TILE_COLUMNS - 1):
    raise ValueError(f"EFFST_SLIF_TILE_COLUMNS: expected 0 (tiling off) or a power of 2, got {TILE_COLUMNS}")
MAX_GRID_ROWS = 65535  # CUDA's limit on grid dimension 1
BACKENDS = ("auto", "reference", "triton", "native")
SPIKE_DTYPES = (None, *BYTE_DTYPES)


# --------------------------------------------------------------------------- Triton kernels
@triton.jit
def _charge(v, x, k, v_rest, DECAY_INPUT: tl.constexpr):
    """H_t from V_{t-1} and X_t."""
    if DECAY_INPUT:
        h = v + k * (x - (v - v_rest))
    else:
        h = v - k * (v - v_rest) + x
    return h


@triton.jit
def _fire_and_reset(h, theta, v_rest, HARD_RESET: tl.constexpr):
    """S_t (spike when H_t >= theta) and V_t after the reset."""
    fired = h >= theta
    s = fired.to(h.dtype)
    if HARD_RESET:
        v = tl.where(fired, v_rest, h)  # = (1 - S) H + S V_r, in one select
    else:
        v = h - s * theta
    return s, v


@triton.jit
def _load_parameter(ptr, offs, mask, channels, inner):
    """Entry ``(n // inner) % channels`` of a parameter vector for each neuron n."""
    return tl.load(ptr + (offs // inner) % channels, mask=mask, other=0.0)


@triton.jit
def _rest_potential(scalars_ptr, REST_IS_ZERO: tl.constexpr, HARD_RESET: tl.constexpr,
                    COMPUTE_DTYPE: tl.constexpr):
    """V_rest: 0 when known at compile time (V_r = 0, or soft reset), so its terms fold away."""
    if REST_IS_ZERO or not HARD_RESET:
        return 0.0
    else:
        return tl.load(scalars_ptr).to(COMPUTE_DTYPE)


@triton.jit
def slif_forward_kernel(
    x_ptr, spikes_ptr, w_ptr, theta_ptr, v_init_ptr, v_final_ptr, checkpoint_ptr, scalars_ptr,
    T, N, stride_xt,
    w_channels, w_inner, theta_channels, theta_inner,
    HAS_V_INIT: tl.constexpr, HARD_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr,
    CHUNK: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
    REST_IS_ZERO: tl.constexpr = False, PRELOAD: tl.constexpr = False,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # int64: tensors past 2**31 elements index correctly
    mask = offs < N
    # Row offsets in int64 too (t * N can pass 2**31 long before N does).
    stride64 = tl.cast(stride_xt, tl.int64)
    N64 = tl.cast(N, tl.int64)
    v_rest = _rest_potential(scalars_ptr, REST_IS_ZERO, HARD_RESET, COMPUTE_DTYPE)
    k = tl.sigmoid(_load_parameter(w_ptr, offs, mask, w_channels, w_inner).to(COMPUTE_DTYPE))
    theta = _load_parameter(theta_ptr, offs, mask, theta_channels, theta_inner).to(COMPUTE_DTYPE)
    if HAS_V_INIT:
        v = tl.load(v_init_ptr + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    else:
        v = tl.zeros([BLOCK], dtype=COMPUTE_DTYPE) + v_rest
    num_chunks = tl.cdiv(T, CHUNK)
    for c in range(num_chunks):
        if c > 0:  # V entering chunk c, for the backward's recomputation
            tl.store(checkpoint_ptr + (c - 1) * N64 + offs, v, mask=mask)
        if PRELOAD:
            # All of the chunk's x loads in flight before the serial recurrence needs the
            # first, and no branch per step (a branch per step makes the compiler move V
            # through shared memory, with two barriers, every step when x's register layout
            # differs from V's: 8 fp16 per thread). Steps past T (last chunk only) load
            # nothing, store nothing and keep V.
            xs = ()
            for j in tl.static_range(CHUNK):
                t = c * CHUNK + j
                xs = xs + (tl.load(x_ptr + t * stride64 + offs, mask=mask & (t < T),
                                   other=0.0),)
            for j in tl.static_range(CHUNK):
                t = c * CHUNK + j
                h = _charge(v, xs[j].to(COMPUTE_DTYPE), k, v_rest, DECAY_INPUT)
                fired = h >= theta
                _, v_next = _fire_and_reset(h, theta, v_rest, HARD_RESET)
                tl.store(spikes_ptr + t * N64 + offs, fired.to(spikes_ptr.dtype.element_ty),
                         mask=mask & (t < T))
                v = tl.where(t < T, v_next, v)
        else:  # one load per step, issued when the step begins
            for j in tl.static_range(CHUNK):
                t = c * CHUNK + j
                if t < T:
                    x = tl.load(x_ptr + t * stride64 + offs, mask=mask, other=0.0)
                    h = _charge(v, x.to(COMPUTE_DTYPE), k, v_rest, DECAY_INPUT)
                    fired = h >= theta
                    _, v = _fire_and_reset(h, theta, v_rest, HARD_RESET)
                    # a comparison result converts exactly to float, uint8 and bool outputs
                    tl.store(spikes_ptr + t * N64 + offs,
                             fired.to(spikes_ptr.dtype.element_ty), mask=mask)
    tl.store(v_final_ptr + offs, v, mask=mask)


@triton.jit
def reverse_step(grad_s, carry, x, v_prev, k, theta, v_rest, alpha, zero,
                 HARD_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr, DETACH_RESET: tl.constexpr,
                 SURROGATE: tl.constexpr):
    """Reverse one sLIF step from its input ``x`` and ``V_{t-1}``, given dL/dS_t (``grad_s``)
    and dL/dV_t (``carry``): ``(dL/dX_t, dL/dV_{t-1}, dL/dk, dL/dtheta)``, the last two per
    neuron (what a caller does not use is compiled away). The one copy of the backward step:
    the sLIF kernel and the token-routed neuron (effst/ops/token_select.py) both call it."""
    h = _charge(v_prev, x, k, v_rest, DECAY_INPUT)
    s = (h >= theta).to(h.dtype)
    psi = surrogate_grad_triton(h - theta, alpha, SURROGATE)
    # dV_t/dH_t and dV_t/dtheta: the reset's own terms, plus the path through the spike's
    # surrogate unless detach_reset cuts it.
    if HARD_RESET:
        if DETACH_RESET:
            dv_dh = 1.0 - s
            dv_dtheta = zero
        else:  # (V_r - H) psi written as -(H - V_r) psi: one product, the same bits
            dv_dtheta = (h - v_rest) * psi
            dv_dh = (1.0 - s) - dv_dtheta
    else:
        if DETACH_RESET:
            dv_dh = zero + 1.0
            dv_dtheta = -s
        else:
            dv_dh = 1.0 - theta * psi
            dv_dtheta = theta * psi - s
    grad_h = grad_s * psi + carry * dv_dh
    if DECAY_INPUT:
        grad_k = grad_h * (x - (v_prev - v_rest))
        grad_x = grad_h * k
    else:
        grad_k = grad_h * (v_rest - v_prev)
        grad_x = grad_h
    return grad_x, grad_h * (1.0 - k), grad_k, carry * dv_dtheta - grad_s * psi


@triton.jit
def _backward_neurons(
    offs, mask, grad_spikes_ptr, grad_v_final_ptr, x_ptr, w_ptr, theta_ptr, v_init_ptr,
    checkpoint_ptr, grad_x_ptr, T, N64, stride64, v_rest, alpha,
    w_channels, w_inner, theta_channels, theta_inner,
    HAS_V_INIT: tl.constexpr, HAS_GRAD_V_FINAL: tl.constexpr, HARD_RESET: tl.constexpr,
    DECAY_INPUT: tl.constexpr, DETACH_RESET: tl.constexpr, SURROGATE: tl.constexpr,
    NEED_GRAD_X: tl.constexpr, NEED_GRAD_W: tl.constexpr, NEED_GRAD_THETA: tl.constexpr,
    CHUNK: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
):
    """The backward of the neurons at ``offs`` (any shape) over all T, in reverse time.

    Stores grad_x; returns ``(grad_k, grad_theta, carry, k)`` per neuron: the gradient sums of
    k = sigmoid(w) and theta, and the gradient reaching V_0 (grad_v_init).
    """
    k = tl.sigmoid(_load_parameter(w_ptr, offs, mask, w_channels, w_inner).to(COMPUTE_DTYPE))
    theta = _load_parameter(theta_ptr, offs, mask, theta_channels, theta_inner).to(COMPUTE_DTYPE)
    zero = tl.zeros(offs.shape, dtype=COMPUTE_DTYPE)
    # carry: gradient reaching V_t from step t+1 (plus the final state's own gradient)
    if HAS_GRAD_V_FINAL:
        carry = tl.load(grad_v_final_ptr + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    else:
        carry = zero
    grad_k = zero
    grad_theta = zero
    num_chunks = tl.cdiv(T, CHUNK)
    for chunk_from_end in range(num_chunks):
        c = num_chunks - 1 - chunk_from_end
        if c > 0:
            # .to: when T <= CHUNK the launcher passes a placeholder of x's dtype here (never
            # read), and both branches must still type-check as COMPUTE_DTYPE.
            v = tl.load(checkpoint_ptr + (c - 1) * N64 + offs, mask=mask,
                        other=0.0).to(COMPUTE_DTYPE)
        elif HAS_V_INIT:
            v = tl.load(v_init_ptr + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        else:
            v = zero + v_rest
        # Recompute the chunk forward, keeping X_t, V_{t-1} and the incoming spike gradient in
        # registers; all of the chunk's loads are issued before the serial reverse walk.
        xs = ()
        v_prevs = ()
        grads_s = ()
        for j in tl.static_range(CHUNK):
            t = c * CHUNK + j
            x = tl.load(x_ptr + t * stride64 + offs, mask=mask & (t < T),
                        other=0.0).to(COMPUTE_DTYPE)
            grads_s = grads_s + (tl.load(grad_spikes_ptr + t * N64 + offs, mask=mask & (t < T),
                                         other=0.0).to(COMPUTE_DTYPE),)
            xs = xs + (x,)
            v_prevs = v_prevs + (v,)
            h = _charge(v, x, k, v_rest, DECAY_INPUT)
            _, v = _fire_and_reset(h, theta, v_rest, HARD_RESET)
        # Reverse through the chunk.
        for j in tl.static_range(CHUNK - 1, -1, -1):
            t = c * CHUNK + j
            if t < T:
                grad_x, carry_prev, step_k, step_theta = reverse_step(
                    grads_s[j], carry, xs[j], v_prevs[j], k, theta, v_rest, alpha, zero,
                    HARD_RESET, DECAY_INPUT, DETACH_RESET, SURROGATE)
                if NEED_GRAD_W:
                    grad_k += step_k
                if NEED_GRAD_THETA:
                    grad_theta += step_theta
                carry = carry_prev
                if NEED_GRAD_X:
                    tl.store(grad_x_ptr + t * N64 + offs,
                             grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
    return grad_k, grad_theta, carry, k


@triton.jit
def slif_backward_kernel(
    grad_spikes_ptr, grad_v_final_ptr, x_ptr, w_ptr, theta_ptr, v_init_ptr, checkpoint_ptr,
    scalars_ptr, grad_x_ptr, grad_w_ptr, grad_theta_ptr, grad_v_init_ptr,
    T, N, stride_xt, row_len,
    w_channels, w_inner, theta_channels, theta_inner,
    HAS_V_INIT: tl.constexpr, HAS_GRAD_V_FINAL: tl.constexpr, HARD_RESET: tl.constexpr,
    DECAY_INPUT: tl.constexpr, DETACH_RESET: tl.constexpr, SURROGATE: tl.constexpr,
    NEED_GRAD_X: tl.constexpr, NEED_GRAD_W: tl.constexpr, NEED_GRAD_THETA: tl.constexpr,
    W_PARTIAL: tl.constexpr, THETA_PARTIAL: tl.constexpr,
    CHUNK: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
    REST_IS_ZERO: tl.constexpr = False, TILE_ROWS: tl.constexpr = 0,
    SKIP_GRAD_V_INIT: tl.constexpr = False,
):
    # Neurons viewed as [rows, row_len] (the last row may be short when TILE_ROWS > 0).
    # TILE_ROWS = 0: grid (column blocks, rows), a program owns BLOCK neurons of one row; when
    # every row uses one parameter entry (W_PARTIAL / THETA_PARTIAL) it sums its neurons'
    # gradients to one partial.
    # TILE_ROWS > 0 (row_len a multiple of every per-channel parameter's period, so a neuron's
    # entry depends on its column only): grid (column blocks, row tiles), a program owns a
    # [TILE_ROWS, BLOCK] tile and sums each partial parameter's gradient over its rows, writing
    # BLOCK partials, one per column, at [tile, columns] of a [row tiles, row_len] buffer.
    col_block = tl.program_id(0).to(tl.int64)
    cols = col_block * BLOCK + tl.arange(0, BLOCK)
    row_len64 = tl.cast(row_len, tl.int64)
    col_mask = cols < row_len64
    # Row offsets in int64 too (t * N can pass 2**31 long before N does).
    stride64 = tl.cast(stride_xt, tl.int64)
    N64 = tl.cast(N, tl.int64)
    v_rest = _rest_potential(scalars_ptr, REST_IS_ZERO, HARD_RESET, COMPUTE_DTYPE)
    alpha = tl.load(scalars_ptr + 1).to(COMPUTE_DTYPE)
    if not TILE_ROWS:  # (an AOT compile that leaves TILE_ROWS out gets None: this path)
        row = tl.program_id(1).to(tl.int64)
        offs = row * row_len64 + cols
        mask = col_mask
        partial_offs = row * tl.num_programs(0) + col_block  # one partial per program
        partial_mask = None
    else:
        tile = tl.program_id(1).to(tl.int64)
        rows = tile * TILE_ROWS + tl.arange(0, TILE_ROWS).to(tl.int64)
        offs = rows[:, None] * row_len64 + cols[None, :]
        mask = col_mask[None, :] & (offs < N64)
        partial_offs = tile * row_len64 + cols  # one per column: [row tiles, row_len]
        partial_mask = col_mask
    grad_k, grad_theta, carry, k = _backward_neurons(
        offs, mask, grad_spikes_ptr, grad_v_final_ptr, x_ptr, w_ptr, theta_ptr, v_init_ptr,
        checkpoint_ptr, grad_x_ptr, T, N64, stride64, v_rest, alpha,
        w_channels, w_inner, theta_channels, theta_inner, HAS_V_INIT, HAS_GRAD_V_FINAL,
        HARD_RESET, DECAY_INPUT, DETACH_RESET, SURROGATE, NEED_GRAD_X, NEED_GRAD_W,
        NEED_GRAD_THETA, CHUNK, COMPUTE_DTYPE)
    # partials: sums over the program's neurons (over its tile's rows when tiled)
    if NEED_GRAD_W:
        grad_w = tl.where(mask, grad_k * k * (1.0 - k), 0.0)
        if W_PARTIAL:
            tl.store(grad_w_ptr + partial_offs, tl.sum(grad_w, axis=0), mask=partial_mask)
        else:
            tl.store(grad_w_ptr + offs, grad_w, mask=mask)
    if NEED_GRAD_THETA:
        grad_theta = tl.where(mask, grad_theta, 0.0)
        if THETA_PARTIAL:
            tl.store(grad_theta_ptr + partial_offs, tl.sum(grad_theta, axis=0),
                     mask=partial_mask)
        else:
            tl.store(grad_theta_ptr + offs, grad_theta, mask=mask)
    if HAS_V_INIT:
        if not SKIP_GRAD_V_INIT:  # (v_init read, its gradient not wanted)
            tl.store(grad_v_init_ptr + offs, carry, mask=mask)


# --------------------------------------------------------------------------- launch plan
def compute_dtype_for(x_dtype: torch.dtype) -> torch.dtype:
    """State/parameter dtype of the kernels: float64 for float64 input, float32 otherwise."""
    return torch.float64 if x_dtype == torch.float64 else torch.float32


def chunk_size(T: int) -> int:
    """Steps per unrolled chunk: all of T when small, MAX_CHUNK otherwise."""
    return T if T <= MAX_CHUNK else MAX_CHUNK


def checkpoint_shape(T: int, N: int) -> tuple[int, int]:
    """Shape of the V checkpoints the Triton forward keeps for its backward."""
    return (triton.cdiv(T, chunk_size(T)) - 1 if T > 0 else 0, N)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class SLIFPlan:
    """Everything about an sLIF call that depends only on shapes, dtypes and options.

    Built (and validated) once per input shape by the modules, per call by :func:`slif`; the
    autograd Function reads it instead of re-deriving layouts and launch grids on every call.
    Parameter ``p`` (``w`` or ``theta``) is a vector of ``p_channels`` entries and neuron n uses
    entry ``(n // p_inner) % p_channels`` (effst/ops/layout.py).
    """

    backend: str  # 'triton' or 'native'
    T: int
    N: int
    x_dtype: torch.dtype
    compute_dtype: torch.dtype
    spike_dtype: torch.dtype
    w_channels: int
    w_inner: int
    theta_channels: int
    theta_inner: int
    v_reset: Optional[float]
    surrogate_id: int
    alpha: float
    detach_reset: bool
    decay_input: bool
    chunk: int
    # backward grid (column_blocks, rows): neurons viewed as [N / row_len, row_len],
    # backward_block-wide programs per row; tiled (tile_rows > 0): ``rows`` counts row tiles,
    # a program owns [tile_rows, backward_block], row_len is a multiple of every channel period
    row_len: int
    rows: int
    column_blocks: int
    backward_block: int
    w_partial: bool  # the backward writes one w-gradient partial per program (tiled: per column)
    theta_partial: bool
    tile_rows: int = 0  # > 0: the tiled backward (short channel runs), see _tile_grid
    # integer spike_dtype with a gradient needed: the forward returns a SpikeBytes (see
    # spike_bytes_plan); never set by make_plan
    spike_bytes_grad: bool = False
    # launch configuration, fixed when the plan is made (EFFST_SLIF_* overrides included)
    forward_block: int = FORWARD_BLOCK
    forward_warps: int = FORWARD_WARPS
    forward_preload: bool = FORWARD_PRELOAD
    backward_warps: int = BACKWARD_WARPS
    # Compiled Triton kernels of this plan by specialisation (see _launch); never compared.
    launch_cache: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    # Per input (x, w, theta, v_init): [calls left before the backward asks the engine again
    # whether the input's gradient will be used, the current wait], after the engine answered
    # "captured by autograd.grad" (an exception, ~12 us) for it; see _edges_that_run.
    capture_hints: list = field(default_factory=lambda: [[0, 0] for _ in range(4)],
                                compare=False, hash=False, repr=False)

    @property
    def programs(self) -> int:
        return self.rows * self.column_blocks

    def parameter_gradient_size(self, partial: bool) -> int:
        """Length of the raw gradient buffer: partials ([rows, row_len] when tiled) or N."""
        if not partial:
            return self.N
        return self.rows * self.row_len if self.tile_rows else self.programs

    @cached_property
    def native_args(self) -> tuple:
        """The options of the effst_native ops, in their schema order."""
        return (self.w_channels, self.w_inner, self.theta_channels, self.theta_inner,
                self.v_reset, self.surrogate_id, self.alpha, self.detach_reset, self.decay_input)

    @cached_property
    def spike_bytes_plan(self) -> "SLIFPlan":
        """This plan, returning its byte spikes as a differentiable SpikeBytes (training)."""
        return replace(self, spike_bytes_grad=True)

    @cached_property
    def launch(self) -> "_LaunchConfig":
        """Grids, constexprs and buffer sizes of the Triton launches (worked out once)."""
        return _LaunchConfig(self)


def make_plan(
    backend: str, x_shape: tuple, x_dtype: torch.dtype, w_layout, theta_layout,
    v_reset: Optional[float], surrogate_id: int, alpha: float, detach_reset: bool,
    decay_input: bool, spike_dtype: Optional[torch.dtype] = None, partials: bool = True,
) -> SLIFPlan:
    """The plan for an already validated call (``*_layout`` from resolve_parameter_layout)."""
    T = int(x_shape[0])
    N = 1
    for s in x_shape[1:]:
        N *= int(s)
    # Rows of the backward grid: the shortest run of neurons sharing a channel entry, when
    # long enough; then every program's neurons share one entry of each non-neuron parameter.
    row_len = N
    spans = [layout.inner for layout in (w_layout, theta_layout) if layout.form == "channel"]
    long_runs = spans and min(spans) >= MIN_PARTIAL_ROW and N // min(spans) <= MAX_GRID_ROWS
    if partials and long_runs:
        row_len = min(spans)
    row_len = max(row_len, 1)
    block = max(min(BACKWARD_BLOCK, _next_power_of_2(row_len)), 16)
    rows, tile_rows = N // row_len, 0
    if partials and spans and not long_runs and N > 0 and TILE_COLUMNS > 0:
        # short channel runs (or too many rows of long ones): the tiled grid, if it fits
        tiled = _tile_grid(N, w_layout, theta_layout)
        if tiled[3] <= MAX_GRID_ROWS:
            row_len, tile_rows, block, rows = tiled

    def partial(layout) -> bool:
        return partials and layout.form != "neuron" and (tile_rows > 0
                                                         or layout.inner % row_len == 0)

    return SLIFPlan(
        backend=backend, T=T, N=N, x_dtype=x_dtype, compute_dtype=compute_dtype_for(x_dtype),
        spike_dtype=x_dtype if spike_dtype is None else spike_dtype,
        w_channels=w_layout.channels, w_inner=w_layout.inner,
        theta_channels=theta_layout.channels, theta_inner=theta_layout.inner,
        v_reset=v_reset, surrogate_id=surrogate_id, alpha=alpha, detach_reset=detach_reset,
        decay_input=decay_input, chunk=chunk_size(T), row_len=row_len, rows=rows,
        column_blocks=triton.cdiv(row_len, block), backward_block=block,
        w_partial=partial(w_layout), theta_partial=partial(theta_layout), tile_rows=tile_rows,
        forward_block=FORWARD_BLOCK, forward_warps=FORWARD_WARPS, forward_preload=FORWARD_PRELOAD,
        backward_warps=BACKWARD_WARPS)


def _tile_grid(N: int, w_layout, theta_layout) -> tuple[int, int, int, int]:
    """``(row_len, tile_rows, tile_columns, row_tiles)`` of the tiled backward.

    row_len: a multiple of the channel period (channels * inner, or the lcm of two per-channel
    parameters' periods: both divide N) that fills whole column blocks best, so a neuron's
    parameter entry depends on its column alone and few lanes idle. The last row may be short.
    """
    period = 1  # (plain loops: torch.compile traces this)
    for layout in (w_layout, theta_layout):
        if layout.form == "channel":
            a, b = period, layout.channels * layout.inner
            while b:
                a, b = b, a % b
            period = period // a * layout.channels * layout.inner
    columns = min(TILE_COLUMNS, BACKWARD_BLOCK)  # powers of 2
    row_len = period
    if period < columns * 8:  # else idle lanes < 1/8 of the last column block anyway
        # the multiple of the period with the fewest idle lanes per column (the smallest on
        # ties); none idle from columns / gcd(period, columns) multiples on
        best_idle = columns
        for m in range(1, min(8 * columns, N) // period + 2):
            n = period * m
            idle = triton.cdiv(n, columns) * columns - n
            if idle * row_len < best_idle * n:
                row_len, best_idle = n, idle
            if idle == 0:
                break
    tile_rows = max(BACKWARD_BLOCK // columns, 1)
    return row_len, tile_rows, columns, triton.cdiv(triton.cdiv(N, row_len), tile_rows)


def reduce_parameter_gradient(raw: torch.Tensor, plan: SLIFPlan, partial: bool, channels: int,
                              inner: int) -> torch.Tensor:
    """The backward kernel's per-program partials or per-neuron values summed to ``[channels]``.

    A fixed-order torch sum: deterministic, no atomics.
    """
    if not partial:
        return reduce_to_parameter(raw, channels, inner)
    if plan.tile_rows:
        # [row tiles, row_len] column partials: over tiles, then over the columns of each entry
        # (column j uses entry (j // inner) % channels; row_len is a multiple of the period)
        # One sum (a tiny call pays per torch op): row_len is a multiple of channels * inner,
        # so the flat buffer splits into [-1, channels, inner] with every column on its entry.
        if channels == 1:
            return raw.sum().reshape(1)
        return raw.reshape(-1, channels, inner).sum(dim=(0, 2))
    # program p = row * column_blocks + block; row r holds neurons of entry (r // q) % channels
    q = inner // plan.row_len
    return raw.reshape(-1, channels, q * plan.column_blocks).sum(dim=(0, 2))


# --------------------------------------------------------------------------- launchers
_scalar_cache: dict = {}


def _scalars(v_reset: Optional[float], alpha: float, dtype: torch.dtype, device) -> torch.Tensor:
    """[v_rest, alpha] in the compute dtype, on the device.

    Passed through memory so float64 runs see float64 values, not fp32-rounded kernel
    arguments; cached so the host-to-device copy happens once per configuration and device,
    never per call (and never inside a CUDA graph capture after the first eager call).
    """
    key = (v_reset, alpha, dtype, device)
    cached = _scalar_cache.get(key)
    if cached is None:
        rest = 0.0 if v_reset is None else v_reset
        cached = _scalar_cache[key] = torch.tensor([rest, alpha], dtype=dtype, device=device)
    return cached


def _triton_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


class _LaunchConfig:
    """The parts of a plan's two launches that never change between calls."""

    def __init__(self, plan: SLIFPlan):
        T, N = plan.T, plan.N
        self.plan_options = (plan.v_reset, plan.alpha, plan.compute_dtype)
        self.forward_grid = (triton.cdiv(N, plan.forward_block), 1, 1)
        self.backward_grid = (plan.column_blocks, plan.rows, 1)
        self.checkpoint_shape = checkpoint_shape(T, N)
        self.w_size = plan.parameter_gradient_size(plan.w_partial)
        self.theta_size = plan.parameter_gradient_size(plan.theta_partial)
        # room for the raw w gradient in the buffer it shares with theta's: a multiple of 16
        # values, so theta's part starts 16-byte aligned (Triton's pointer specialisation)
        self.w_span = -(-self.w_size // 16) * 16
        self.theta_span = -(-self.theta_size // 16) * 16
        # One torch sum reduces both parameter gradients when their raw values line up (same
        # layout, both partials or both per neuron): the raw [2, ...] view it sums, as
        # (values per part, then the split of those into [-1, channels, run]); None otherwise.
        # Per-neuron parameters (channels == N) need no sum at all.
        # Tiled partials ([row tiles, row_len], row_len a multiple of channels * inner) split
        # the same way with run = inner.
        self.joint_reduction = None
        if (plan.w_partial == plan.theta_partial and plan.w_channels == plan.theta_channels
                and plan.w_inner == plan.theta_inner
                and not (plan.w_inner == 1 and plan.w_channels == N)
                and not (plan.tile_rows and plan.w_channels == 1)):
            if plan.tile_rows or not plan.w_partial:
                run = plan.w_inner
            else:
                run = plan.w_inner // plan.row_len * plan.column_blocks
            self.joint_reduction = (self.w_size, (2, -1, plan.w_channels, run))
        compute = _triton_dtype(plan.compute_dtype)
        hard_reset = plan.v_reset is not None
        rest_is_zero = plan.v_reset == 0.0  # V_r = 0 folded at compile time (soft reset: always)
        # constexprs in each kernel's signature order (a test checks it), after the flags that
        # change per call (HAS_V_INIT; HAS_GRAD_V_FINAL and the NEED_GRAD_* flags; the tail's
        # SKIP_GRAD_V_INIT is set per call too, by constexprs)
        self.forward_constexprs = {"HARD_RESET": hard_reset, "DECAY_INPUT": plan.decay_input,
                                   "CHUNK": plan.chunk, "COMPUTE_DTYPE": compute,
                                   "BLOCK": plan.forward_block, "REST_IS_ZERO": rest_is_zero,
                                   "PRELOAD": plan.forward_preload}
        self.backward_constexprs = {"HARD_RESET": hard_reset, "DECAY_INPUT": plan.decay_input,
                                    "DETACH_RESET": plan.detach_reset,
                                    "SURROGATE": plan.surrogate_id}
        self.backward_tail = {"W_PARTIAL": plan.w_partial, "THETA_PARTIAL": plan.theta_partial,
                              "CHUNK": plan.chunk, "COMPUTE_DTYPE": compute,
                              "BLOCK": plan.backward_block, "REST_IS_ZERO": rest_is_zero,
                              "TILE_ROWS": plan.tile_rows,
                              "SKIP_GRAD_V_INIT": False}  # (per call: see constexprs)
        self.channel_ints = (plan.w_channels, plan.w_inner, plan.theta_channels, plan.theta_inner)
        self.forward_options = {"num_warps": plan.forward_warps}
        self.backward_options = {"num_warps": plan.backward_warps}
        self.stride_key = _launch.int_key(N)  # x's row stride when x is contiguous
        self._constexprs: dict = {}  # per-call flags -> every constexpr of that launch
        self._scalars: dict = {}  # device -> _scalars(...) of this plan

    def scalars(self, device) -> torch.Tensor:
        """The plan's [v_rest, alpha] tensor on ``device`` (see :func:`_scalars`)."""
        scalars = self._scalars.get(device)
        if scalars is None:
            plan = self.plan_options
            scalars = self._scalars[device] = _scalars(plan[0], plan[1], plan[2], device)
        return scalars

    def constexprs(self, flags: tuple) -> dict:
        """Every constexpr of a launch, in signature order, given its per-call flags:
        ``("forward", HAS_V_INIT)`` or ``("backward", HAS_V_INIT, HAS_GRAD_V_FINAL,
        NEED_GRAD_X, NEED_GRAD_W, NEED_GRAD_THETA, SKIP_GRAD_V_INIT)``; made once per flags."""
        constexprs = self._constexprs.get(flags)
        if constexprs is None:
            if flags[0] == "forward":
                constexprs = {"HAS_V_INIT": flags[1], **self.forward_constexprs}
            else:
                constexprs = {"HAS_V_INIT": flags[1], "HAS_GRAD_V_FINAL": flags[2],
                              **self.backward_constexprs, "NEED_GRAD_X": flags[3],
                              "NEED_GRAD_W": flags[4], "NEED_GRAD_THETA": flags[5],
                              **self.backward_tail, "SKIP_GRAD_V_INIT": flags[6]}
            self._constexprs[flags] = constexprs
        return constexprs


# Cached launches (effst/ops/launch.py): each plan keeps the CompiledKernels of its launches in
# plan.launch_cache. The plan fixes the grids, the constexprs other than the per-call flags,
# the options, every pointer's dtype (the launchers cast every tensor to the plan's dtypes) and
# every int argument but the row stride of x; so the key within a plan is the kernel, the
# per-call flags (HAS_V_INIT, HAS_GRAD_V_FINAL, NEED_GRAD_*) and the stride's int
# specialisation. EFFST_SLIF_LAUNCH_CACHE=0 (or EFFST_LAUNCH_CACHE=0) launches every call
# through ``kernel[grid](...)``.
LAUNCH_CACHE = _launch.switch("EFFST_SLIF_LAUNCH_CACHE")


def _kernel_vector(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``p`` (any shape) as a contiguous 1-D tensor of ``dtype`` (itself when it is one)."""
    if p.dtype != dtype:
        p = p.to(dtype)
    if p.dim() != 1 or not p.is_contiguous():
        p = p.reshape(-1).contiguous()
    return p


def _forward(x: torch.Tensor, stride_t: int, w: torch.Tensor, theta: torch.Tensor,
             v_init: Optional[torch.Tensor], plan: SLIFPlan, spikes: torch.Tensor,
             v_final: torch.Tensor) -> Optional[torch.Tensor]:
    """Launch the forward into ``spikes`` / ``v_final`` (contiguous, any shape); returns the
    V checkpoints (None when T fits one chunk: there are none). ``x``'s memory holds T rows
    ``stride_t`` apart of N unit-stride neurons; ``w``, ``theta``, ``v_init`` are contiguous
    vectors in the compute dtype."""
    cfg = plan.launch
    checkpoints = (torch.empty(*cfg.checkpoint_shape, dtype=plan.compute_dtype, device=x.device)
                   if cfg.checkpoint_shape[0] else None)
    if plan.N == 0:
        return checkpoints
    has_v_init = v_init is not None
    v_init_arg = v_init if has_v_init else v_final
    checkpoint_arg = v_final if checkpoints is None else checkpoints
    flags = ("forward", has_v_init)
    _launch.launch(slif_forward_kernel, cfg.forward_grid,
                   plan.launch_cache if LAUNCH_CACHE else None,
                   (flags, cfg.stride_key if stride_t == plan.N else _launch.int_key(stride_t)),
                   (x, spikes, w, theta, v_init_arg, v_final, checkpoint_arg,
                    cfg.scalars(x.device), plan.T, plan.N, stride_t, *cfg.channel_ints),
                   cfg.constexprs(flags), cfg.forward_options, (x, w, theta, v_init_arg))
    return checkpoints


def _backward(grad_spikes: torch.Tensor, grad_v_final: Optional[torch.Tensor], x: torch.Tensor,
              stride_t: int, w: torch.Tensor, theta: torch.Tensor,
              v_init: Optional[torch.Tensor], checkpoints: Optional[torch.Tensor], plan: SLIFPlan,
              grad_x: Optional[torch.Tensor], grad_w: Optional[torch.Tensor],
              grad_theta: Optional[torch.Tensor], grad_v_init: Optional[torch.Tensor]) -> None:
    """Launch the backward into the given gradient buffers (None: not wanted, also
    ``grad_v_init`` beside a ``v_init``; ``grad_w`` / ``grad_theta`` raw: per-program
    partials or per-neuron values, see the plan).
    ``grad_spikes`` and ``grad_v_final`` are contiguous in x's / the compute dtype."""
    cfg = plan.launch
    dummy = x if checkpoints is None else checkpoints  # never read when its flag is off
    has_v_init = v_init is not None
    has_grad_v_final = grad_v_final is not None
    need_x, need_w, need_theta = grad_x is not None, grad_w is not None, grad_theta is not None
    grad_v_final_arg = grad_v_final if has_grad_v_final else dummy
    v_init_arg = v_init if has_v_init else dummy
    flags = ("backward", has_v_init, has_grad_v_final, need_x, need_w, need_theta,
             has_v_init and grad_v_init is None)
    _launch.launch(slif_backward_kernel, cfg.backward_grid,
                   plan.launch_cache if LAUNCH_CACHE else None,
                   (flags, cfg.stride_key if stride_t == plan.N else _launch.int_key(stride_t)),
                   (grad_spikes, grad_v_final_arg, x, w, theta, v_init_arg, dummy,
                    cfg.scalars(x.device), grad_x if need_x else dummy,
                    grad_w if need_w else dummy, grad_theta if need_theta else dummy,
                    grad_v_init if grad_v_init is not None else dummy,
                    plan.T, plan.N, stride_t, plan.row_len, *cfg.channel_ints),
                   cfg.constexprs(flags), cfg.backward_options,
                   (grad_spikes, grad_v_final_arg, x, w, theta, v_init_arg, dummy))


def _check_kernel_input(x2d: torch.Tensor, plan: SLIFPlan) -> None:
    if x2d.dtype != plan.x_dtype or x2d.dim() != 2 or tuple(x2d.shape) != (plan.T, plan.N):
        raise ValueError(f"x2d: expected a [{plan.T}, {plan.N}] tensor of {plan.x_dtype} (the "
                         f"plan's), got {tuple(x2d.shape)} {x2d.dtype}")


def triton_forward(x2d: torch.Tensor, w: torch.Tensor, theta: torch.Tensor,
                   v_init: Optional[torch.Tensor], plan: SLIFPlan):
    """Forward over ``x2d = [T, N]`` in one launch: spikes, V_T and the V checkpoints."""
    _check_kernel_input(x2d, plan)
    if plan.N > 1 and x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    cdtype = plan.compute_dtype
    spikes = torch.empty((plan.T, plan.N), dtype=plan.spike_dtype, device=x2d.device)
    v_final = torch.empty((plan.N,), dtype=cdtype, device=x2d.device)
    checkpoints = _forward(x2d, x2d.stride(0), _kernel_vector(w, cdtype),
                           _kernel_vector(theta, cdtype),
                           None if v_init is None else _kernel_vector(v_init, cdtype), plan,
                           spikes, v_final)
    if checkpoints is None:  # (this API always returns a tensor; [0, N] when there are none)
        checkpoints = torch.empty(plan.launch.checkpoint_shape, dtype=cdtype, device=x2d.device)
    return spikes, v_final, checkpoints


def triton_backward(grad_spikes: torch.Tensor, grad_v_final: Optional[torch.Tensor],
                    x2d: torch.Tensor, w: torch.Tensor, theta: torch.Tensor,
                    v_init: Optional[torch.Tensor], checkpoints: torch.Tensor, plan: SLIFPlan,
                    need_x: bool = True, need_w: bool = True, need_theta: bool = True):
    """Backward in one launch: ``(grad_x, grad_w raw, grad_theta raw, grad_v_init)``.

    Raw parameter gradients are per-program partials or per-neuron values (see the plan);
    :func:`reduce_parameter_gradient` sums them. Gradients nobody needs are neither computed
    nor allocated (returned as None).
    """
    _check_kernel_input(x2d, plan)
    if plan.N > 1 and x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    cdtype = plan.compute_dtype
    device = x2d.device
    grad_x = torch.empty((plan.T, plan.N), dtype=x2d.dtype, device=device) if need_x else None
    grad_w = (torch.empty((plan.launch.w_size,), dtype=cdtype, device=device)
              if need_w else None)
    grad_theta = (torch.empty((plan.launch.theta_size,), dtype=cdtype, device=device)
                  if need_theta else None)
    grad_v_init = torch.empty((plan.N,), dtype=cdtype, device=device) if v_init is not None else None
    if plan.N == 0:
        for g in (grad_w, grad_theta):
            if g is not None:
                g.zero_()
        return grad_x, grad_w, grad_theta, grad_v_init
    _backward(_contiguous_as(grad_spikes, x2d.dtype),
              None if grad_v_final is None else _kernel_vector(grad_v_final, cdtype),
              x2d, x2d.stride(0), _kernel_vector(w, cdtype), _kernel_vector(theta, cdtype),
              None if v_init is None else _kernel_vector(v_init, cdtype),
              checkpoints if checkpoints.numel() else None, plan, grad_x, grad_w, grad_theta,
              grad_v_init)
    return grad_x, grad_w, grad_theta, grad_v_init


def _contiguous_as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if t.dtype != dtype:
        t = t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()


def _plan_args(plan: SLIFPlan) -> tuple:
    return plan.native_args


def run_forward(x2d, w, theta, v_init, plan: SLIFPlan):
    """The plan's backend forward: ``(spikes, v_final, saved)``, saved = backend state."""
    if plan.backend == "triton":
        return triton_forward(x2d, w, theta, v_init, plan)
    spikes, v_final = torch.ops.effst_native.slif_forward(x2d, w, theta, v_init, *_plan_args(plan))
    if plan.spike_dtype != spikes.dtype:
        spikes = spikes.to(plan.spike_dtype)
    # no backend state: an empty tensor (not a view of v_final: a library op's outputs must
    # not alias each other, which torch.compile checks)
    return spikes, v_final, v_final.new_empty((0,))


def run_backward(grad_spikes, grad_v_final, x2d, w, theta, v_init, saved, plan: SLIFPlan,
                 need_x: bool, need_w: bool, need_theta: bool):
    """The plan's backend backward: ``(grad_x, grad_w, grad_theta, grad_v_init)``, reduced."""
    if grad_v_final is not None and not grad_v_final.is_contiguous():
        grad_v_final = grad_v_final.contiguous()  # e.g. the stride-0 gradient of v.sum()
    if plan.backend == "triton":
        grad_x, grad_w, grad_theta, grad_v_init = triton_backward(
            grad_spikes, grad_v_final, x2d, w, theta, v_init, saved, plan, need_x, need_w,
            need_theta)
        if grad_w is not None:
            grad_w = reduce_parameter_gradient(grad_w, plan, plan.w_partial, plan.w_channels,
                                               plan.w_inner)
        if grad_theta is not None:
            grad_theta = reduce_parameter_gradient(grad_theta, plan, plan.theta_partial,
                                                   plan.theta_channels, plan.theta_inner)
        return grad_x, grad_w, grad_theta, grad_v_init
    grad_x, grad_w, grad_theta, grad_v_init = torch.ops.effst_native.slif_backward(
        grad_spikes, grad_v_final, x2d, w, theta, v_init, *_plan_args(plan))
    return (grad_x if need_x else None,
            reduce_to_parameter(grad_w, plan.w_channels, plan.w_inner) if need_w else None,
            reduce_to_parameter(grad_theta, plan.theta_channels, plan.theta_inner)
            if need_theta else None,
            grad_v_init if v_init is not None else None)


# The backend contract (every fused backend implements it; the tests call it directly):
# per-neuron parameter gradients, no plan object.
def slif_forward_triton(x2d: torch.Tensor, w: torch.Tensor, theta: torch.Tensor,
                        v_init: Optional[torch.Tensor], w_channels: int, w_inner: int,
                        theta_channels: int, theta_inner: int, v_reset: Optional[float],
                        surrogate_id: int, alpha: float, detach_reset: bool,
                        decay_input: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Contract forward over ``x2d = [T, N]``: ``(spikes, v_final)``."""
    plan = _contract_plan(x2d, w_channels, w_inner, theta_channels, theta_inner, v_reset,
                          surrogate_id, alpha, detach_reset, decay_input)
    spikes, v_final, _ = triton_forward(x2d, w, theta, v_init, plan)
    return spikes, v_final


def slif_backward_triton(grad_spikes: torch.Tensor, grad_v_final: Optional[torch.Tensor],
                         x2d: torch.Tensor, w: torch.Tensor, theta: torch.Tensor,
                         v_init: Optional[torch.Tensor], w_channels: int, w_inner: int,
                         theta_channels: int, theta_inner: int, v_reset: Optional[float],
                         surrogate_id: int, alpha: float, detach_reset: bool, decay_input: bool):
    """Contract backward: grad_x [T, N] and per-neuron grads of w, theta (and v_init, or a
    [1] zero placeholder without v_init); rebuilds the forward's checkpoints itself."""
    plan = _contract_plan(x2d, w_channels, w_inner, theta_channels, theta_inner, v_reset,
                          surrogate_id, alpha, detach_reset, decay_input)
    checkpoints = triton_forward(x2d, w, theta, v_init, plan)[2]
    grad_x, grad_w, grad_theta, grad_v_init = triton_backward(
        grad_spikes, grad_v_final, x2d, w, theta, v_init, checkpoints, plan)
    if grad_v_init is None:
        grad_v_init = x2d.new_zeros((1,), dtype=plan.compute_dtype)
    return grad_x, grad_w, grad_theta, grad_v_init


@dataclass(frozen=True)
class _Layout:  # the (channels, inner) pair of a parameter, for plans built from raw ints
    form: str
    channels: int
    inner: int


def _contract_plan(x2d, w_channels, w_inner, theta_channels, theta_inner, v_reset,
                   surrogate_id, alpha, detach_reset, decay_input) -> SLIFPlan:
    return make_plan("triton", tuple(x2d.shape), x2d.dtype,
                     _Layout("channel", int(w_channels), int(w_inner)),
                     _Layout("channel", int(theta_channels), int(theta_inner)), v_reset,
                     int(surrogate_id), float(alpha), bool(detach_reset), bool(decay_input),
                     partials=False)


# --------------------------------------------------------------------------- autograd
class SLIFFunction(torch.autograd.Function):
    """Fused sLIF: forward and backward each one kernel launch.

    Takes the call's own tensors: ``x [T, *]``, ``w`` / ``theta`` in any shape holding their
    plan's channel counts (any floating dtype), ``v_init`` holding N values or None, ``plan``
    from :func:`make_plan`. Returns ``(spikes shaped like x, v_final shaped like one step)``.
    The [T, N] view, the parameters' flattening and compute dtype, and the gradients' shapes
    and dtypes are all dealt with in here, so the autograd graph holds this one node. In eager
    mode the kernels are launched directly; while torch.compile traces, the same launchers
    run behind the ``effst::slif_forward`` / ``effst::slif_backward`` library ops (opaque
    graph nodes).
    """

    @staticmethod
    def forward(ctx, x, w, theta, v_init, plan: SLIFPlan):
        cdtype = plan.compute_dtype
        T, N = plan.T, plan.N
        if torch.compiler.is_compiling():
            x2d = x.reshape(T, N)
            w_k, theta_k = _kernel_vector(w, cdtype), _kernel_vector(theta, cdtype)
            v_k = None if v_init is None else _kernel_vector(v_init, cdtype)
            spikes, v_final, saved = torch.ops.effst.slif_forward(x2d, w_k, theta_k, v_k,
                                                                  *_op_args(plan))
            spikes, v_final = spikes.view(x.shape), v_final.view(x.shape[1:])
            stride_t = N
        else:
            if x.dtype != plan.x_dtype:
                raise ValueError(f"x: expected dtype {plan.x_dtype} (the plan's), got {x.dtype}")
            dense = x.is_contiguous()
            if dense:
                x2d, stride_t = x, N  # the kernels only need the pointer and the row stride
            else:
                x2d = x.reshape(T, N)
                if N > 1 and x2d.stride(1) != 1:
                    x2d = x2d.contiguous()
                stride_t = x2d.stride(0)
            w_k, theta_k = _kernel_vector(w, cdtype), _kernel_vector(theta, cdtype)
            v_k = None if v_init is None else _kernel_vector(v_init, cdtype)
            # (empty_like: the cheapest allocation; x's strides are the contiguous ones)
            spikes = (torch.empty_like(x, dtype=plan.spike_dtype) if dense else
                      torch.empty(x.shape, dtype=plan.spike_dtype, device=x.device))
            step_shape = x.shape[1:]  # (sizes as separate ints: torch.empty's fast argument path)
            v_final = (torch.empty(*step_shape, dtype=cdtype, device=x.device) if step_shape else
                       torch.empty((), dtype=cdtype, device=x.device))
            saved = _forward(x2d, stride_t, w_k, theta_k, v_k, plan, spikes, v_final)
        ctx.save_for_backward(x2d, w_k, theta_k, v_k, saved)  # (saved: None without checkpoints)
        ctx.plan = plan
        ctx.stride_t = stride_t
        ctx.shapes = (x.shape, w.shape, w.dtype, theta.shape, theta.dtype,
                      None if v_init is None else v_init.shape,
                      None if v_init is None else v_init.dtype)
        if plan.spike_bytes_grad:  # bytes held in a tensor autograd sees in x's float dtype
            spikes = SpikeBytes(spikes, x.dtype)
        elif not spikes.is_floating_point():
            ctx.mark_non_differentiable(spikes)
        ctx.set_materialize_grads(False)  # an unused output needs no zero-filled gradient
        return spikes, v_final

    @staticmethod
    @first_order_only
    def backward(ctx, grad_spikes, grad_v_final):
        x2d, w, theta, v_init, saved = ctx.saved_tensors
        plan = ctx.plan
        x_shape, w_shape, w_dtype, theta_shape, theta_dtype, v_shape, v_dtype = ctx.shapes
        need_x, need_w, need_theta, need_v = ctx.needs_input_grad[:4]
        if torch.compiler.is_compiling():
            # (also compiled autograd tracing the backward of an eager forward, which saved x
            # in its own shape and no checkpoint tensor when T fits one chunk)
            x2d = x2d.reshape(plan.T, plan.N)
            if saved is None:
                saved = x2d.new_empty(checkpoint_shape(plan.T, plan.N), dtype=plan.compute_dtype)
            if grad_spikes is None:  # only the final state was used
                grad_spikes = torch.zeros_like(x2d)
            if grad_v_final is not None:
                grad_v_final = grad_v_final.reshape(-1)
            present = iter(torch.ops.effst.slif_backward(
                grad_spikes.reshape(plan.T, plan.N), grad_v_final, x2d, w, theta, v_init, saved,
                *_op_args(plan), need_x, need_w, need_theta))
            grad_x, grad_w, grad_theta, grad_v_init = (
                next(present) if wanted else None
                for wanted in (need_x, need_w, need_theta, v_init is not None))
            if grad_x is not None:
                grad_x = grad_x.view(x_shape)
        else:
            if need_x + need_w + need_theta + need_v > 1:  # else the one edge runs: no question
                need_x, need_w, need_theta, need_v = _edges_that_run(
                    ctx, plan.capture_hints, need_x, need_w, need_theta, need_v)
            grad_x, grad_w, grad_theta, grad_v_init = _eager_backward(
                grad_spikes, grad_v_final, x2d, ctx.stride_t, w, theta, v_init, saved, plan,
                x_shape, need_x, need_w, need_theta, need_v)
        return (grad_x, _as_input(grad_w, w_shape, w_dtype),
                _as_input(grad_theta, theta_shape, theta_dtype),
                _as_input(grad_v_init, v_shape, v_dtype) if need_v else None, None)


_will_engine_execute_node = torch._C._will_engine_execute_node
#: calls during which a leaf input that autograd.grad captured is assumed captured again;
#: doubled at each new "captured" answer for that input, up to CAPTURE_HINT_MAX_CALLS
CAPTURE_HINT_CALLS = 32
CAPTURE_HINT_MAX_CALLS = 4096


def _edges_that_run(ctx, hints: list, need_x: bool, need_w: bool, need_theta: bool,
                    need_v: bool) -> list:
    """Which of x, w, theta, v_init the engine will pass a gradient on to, among those that
    require one: ``autograd.grad(spikes.sum(), [x])`` needs no parameter gradient even when w
    and theta are learnable, and ``backward(inputs=[w])`` no grad_x (what
    task_should_compute_output tells the C++ node, csrc/slif_autograd.cpp).

    ``torch._C._will_engine_execute_node`` answers in ~0.1 us, except for a leaf that
    ``autograd.grad`` captures (one of its ``inputs``): that raises (~12 us, as a C++
    exception) and means "yes". Two things keep that rare. The node runs, so one of its edges
    is used: the last edge not yet known unused needs no question (x is asked last:
    ``autograd.grad(out, [x])`` asks no leaf that raises). And after a "captured" answer,
    ``hints`` (the plan's, per input) keeps that gradient on without asking for the next
    CAPTURE_HINT_CALLS calls, twice as many after each further "captured" answer (loops repeat
    one request) up to CAPTURE_HINT_MAX_CALLS, and back to asking every call after a plain
    answer. A gradient is skipped only on a "no"; any exception means "compute it".
    """
    needs = [need_x, need_w, need_theta, need_v]
    maybe = need_x + need_w + need_theta + need_v  # edges not known to be unused
    edges = None
    for i in (1, 2, 3, 0):
        if not needs[i]:
            continue
        if maybe == 1:  # every other edge is unused, and the node runs: this one is used
            break
        hint = hints[i]
        if hint[0]:
            hint[0] -= 1
            continue
        if edges is None:
            edges = ctx.next_functions
        try:
            used = _will_engine_execute_node(edges[i][0])
        except RuntimeError:  # a leaf autograd.grad captures (or no engine task): computed
            hint[1] = hint[0] = min(max(2 * hint[1], CAPTURE_HINT_CALLS), CAPTURE_HINT_MAX_CALLS)
            continue
        hint[1] = 0
        if not used:
            needs[i] = False
            maybe -= 1
    return needs


# autograd.Function.apply ends in the C apply of torch._C._FunctionBase (slif_with_plan).
_apply_slif = super(torch.autograd.Function, SLIFFunction).apply
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead
_functorch_transforms_active = torch._C._are_functorch_transforms_active


def _as_input(grad: Optional[torch.Tensor], shape, dtype) -> Optional[torch.Tensor]:
    """A gradient in its input's shape and dtype."""
    if grad is None:
        return None
    if grad.shape != shape:
        grad = grad.view(shape)
    return grad if grad.dtype == dtype else grad.to(dtype)


def _eager_backward(grad_spikes, grad_v_final, x2d, stride_t, w, theta, v_init, checkpoints,
                    plan: SLIFPlan, x_shape, need_x: bool, need_w: bool, need_theta: bool,
                    need_v: bool):
    """The Triton backward of SLIFFunction: buffers, one launch, parameter sums."""
    cfg = plan.launch
    cdtype = plan.compute_dtype
    device = x2d.device
    if grad_spikes is None:  # only the final state was used
        grad_spikes = torch.zeros(x_shape, dtype=plan.x_dtype, device=device)
    elif grad_spikes.dtype != plan.x_dtype or not grad_spikes.is_contiguous():
        grad_spikes = _contiguous_as(grad_spikes, plan.x_dtype)
    if grad_v_final is not None:
        grad_v_final = _kernel_vector(grad_v_final, cdtype)  # e.g. the stride-0 grad of v.sum()
    if need_x:  # (x2d is x when x is contiguous: empty_like, the cheapest allocation)
        grad_x = (torch.empty_like(x2d) if x2d.shape == x_shape and x2d.is_contiguous() else
                  torch.empty(x_shape, dtype=plan.x_dtype, device=device))
    else:
        grad_x = None
    # the raw parameter gradients share one buffer (and, when they line up, one sum); sizes
    # as ints, not tuples: torch.empty's fast argument path (~1.5 us less per allocation)
    raw_w = raw_theta = None
    joint = need_w and need_theta and plan.N and cfg.joint_reduction
    if need_w and need_theta:
        raw = torch.empty(cfg.w_span + cfg.theta_span, dtype=cdtype, device=device)
        if joint:  # the kernel needs where each part starts, the joint sum the whole buffer
            raw_w, raw_theta = raw, raw[cfg.w_span:]
        else:
            raw_w, raw_theta = raw[:cfg.w_size], raw[cfg.w_span:cfg.w_span + cfg.theta_size]
    elif need_w:
        raw_w = torch.empty(cfg.w_size, dtype=cdtype, device=device)
    elif need_theta:
        raw_theta = torch.empty(cfg.theta_size, dtype=cdtype, device=device)
    grad_v_init = (torch.empty(plan.N, dtype=cdtype, device=device)
                   if need_v and v_init is not None else None)
    if plan.N == 0:
        for g in (raw_w, raw_theta):
            if g is not None:
                g.zero_()
    else:
        _backward(grad_spikes, grad_v_final, x2d, stride_t, w, theta, v_init, checkpoints, plan,
                  grad_x, raw_w, raw_theta, grad_v_init)
    if joint:
        size, shape = cfg.joint_reduction  # (the two parts line up: equal sizes and spans)
        if size != cfg.w_span:  # padded parts
            raw = raw.view(2, cfg.w_span)[:, :size]
        both = raw.view(shape).sum(dim=(1, 3))
        return grad_x, both[0], both[1], grad_v_init
    grad_w = (None if raw_w is None else
              reduce_parameter_gradient(raw_w, plan, plan.w_partial, plan.w_channels, plan.w_inner))
    grad_theta = (None if raw_theta is None else
                  reduce_parameter_gradient(raw_theta, plan, plan.theta_partial,
                                            plan.theta_channels, plan.theta_inner))
    return grad_x, grad_w, grad_theta, grad_v_init


# --------------------------------------------------------------------------- compile-time ops
# While torch.compile traces, the launchers run inside these torch.library ops, so the graph
# holds them as opaque nodes with fake (shape-only) implementations. Eager calls never pass
# through them (a custom op's Python dispatch costs tens of microseconds per call).
def _op_args(plan: SLIFPlan) -> tuple:
    return (plan.backend, plan.spike_dtype, plan.w_channels, plan.w_inner, plan.theta_channels,
            plan.theta_inner, plan.v_reset, plan.surrogate_id, plan.alpha, plan.detach_reset,
            plan.decay_input)


def _plan_from_op_args(x2d, backend, spike_dtype, w_channels, w_inner, theta_channels,
                       theta_inner, v_reset, surrogate_id, alpha, detach_reset,
                       decay_input) -> SLIFPlan:
    def layout(channels, inner):
        form = "neuron" if inner == 1 and channels == x2d.shape[1] else "channel"
        return _Layout(form, channels, inner)

    return make_plan(backend, tuple(x2d.shape), x2d.dtype, layout(w_channels, w_inner),
                     layout(theta_channels, theta_inner), v_reset, surrogate_id, alpha,
                     detach_reset, decay_input, spike_dtype)


@torch.library.custom_op("effst::slif_forward", mutates_args=())
def slif_forward_op(
    x2d: torch.Tensor, w: torch.Tensor, theta: torch.Tensor, v_init: Optional[torch.Tensor],
    backend: str, spike_dtype: torch.dtype, w_channels: int, w_inner: int, theta_channels: int,
    theta_inner: int, v_reset: Optional[float], surrogate_id: int, alpha: float,
    detach_reset: bool, decay_input: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = _plan_from_op_args(x2d, backend, spike_dtype, w_channels, w_inner, theta_channels,
                              theta_inner, v_reset, surrogate_id, alpha, detach_reset,
                              decay_input)
    return run_forward(x2d, w, theta, v_init, plan)


@slif_forward_op.register_fake
def _(x2d, w, theta, v_init, backend, spike_dtype, *rest):
    T, N = x2d.shape
    cdtype = compute_dtype_for(x2d.dtype)
    saved_shape = checkpoint_shape(T, N) if backend == "triton" else (0,)
    return (x2d.new_empty((T, N), dtype=spike_dtype), x2d.new_empty((N,), dtype=cdtype),
            x2d.new_empty(saved_shape, dtype=cdtype))


@torch.library.custom_op("effst::slif_backward", mutates_args=())
def slif_backward_op(
    grad_spikes: torch.Tensor, grad_v_final: Optional[torch.Tensor], x2d: torch.Tensor,
    w: torch.Tensor, theta: torch.Tensor, v_init: Optional[torch.Tensor], saved: torch.Tensor,
    backend: str, spike_dtype: torch.dtype, w_channels: int, w_inner: int, theta_channels: int,
    theta_inner: int, v_reset: Optional[float], surrogate_id: int, alpha: float,
    detach_reset: bool, decay_input: bool, need_x: bool, need_w: bool, need_theta: bool,
) -> list[torch.Tensor]:
    """The gradients that were asked for, in the order x, w, theta, v_init (None ones left out:
    a library op cannot return None)."""
    plan = _plan_from_op_args(x2d, backend, spike_dtype, w_channels, w_inner, theta_channels,
                              theta_inner, v_reset, surrogate_id, alpha, detach_reset,
                              decay_input)
    grads = run_backward(grad_spikes, grad_v_final, x2d, w, theta, v_init, saved, plan, need_x,
                         need_w, need_theta)
    return [g for g in grads if g is not None]


@slif_backward_op.register_fake
def _(grad_spikes, grad_v_final, x2d, w, theta, v_init, saved, backend, spike_dtype,
      w_channels, w_inner, theta_channels, theta_inner, v_reset, surrogate_id, alpha,
      detach_reset, decay_input, need_x, need_w, need_theta):
    T, N = x2d.shape
    cdtype = compute_dtype_for(x2d.dtype)
    grads = (x2d.new_empty((T, N)) if need_x else None,
             x2d.new_empty((w_channels,), dtype=cdtype) if need_w else None,
             x2d.new_empty((theta_channels,), dtype=cdtype) if need_theta else None,
             x2d.new_empty((N,), dtype=cdtype) if v_init is not None else None)
    return [g for g in grads if g is not None]


# --------------------------------------------------------------------------- public API
# CUDA 'auto' choice between the two fused backends; see bench/RESULTS.md. Until a GPU run
# has measured both side by side, Triton is the default.
CUDA_AUTO_BACKEND = "triton"
_warned_native_fallback = False


def triton_can_run(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors only through its interpreter."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``backend`` (possibly 'auto') to the implementation that will run, or raise."""
    global _warned_native_fallback
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            return CUDA_AUTO_BACKEND
        ok, reason = _native_status()
        if ok:
            return "native"
        if not _warned_native_fallback:
            warnings.warn(f"effst: native sLIF extension unavailable ({reason}); "
                          "backend='auto' falls back to the pure-torch reference", stacklevel=3)
            _warned_native_fallback = True
        return "reference"
    if backend == "triton" and not triton_can_run(device):
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors (got {device.type}); on the CPU use "
            "backend='native' or 'reference', or set TRITON_INTERPRET=1 before importing triton")
    if backend == "native":
        ok, reason = _native_status()
        if not ok:
            raise RuntimeError(f"backend='native': the native extension is unavailable: {reason}")
        from effst.ops import slif_native

        slif_native.require_device_support(device)
    return backend


def _native_status() -> tuple[bool, str]:
    try:
        from effst.ops import slif_native
    except Exception as error:  # the module itself failing to import is a reason too
        return False, f"{type(error).__name__}: {error}"
    return slif_native.native_status()


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


def check_spike_dtype(spike_dtype) -> None:
    """``spike_dtype`` must be None (x's dtype), torch.uint8 or torch.bool."""
    if spike_dtype not in SPIKE_DTYPES:
        raise ValueError(f"spike_dtype: expected None (x's dtype), torch.uint8 or torch.bool, "
                         f"got {spike_dtype!r}")


def byte_spikes_need_grad(spike_dtype, tensors) -> bool:
    """Whether spikes of integer ``spike_dtype`` must carry a gradient (grad mode on and one of
    ``tensors`` requiring grad): then they are returned as a SpikeBytes."""
    return (spike_dtype is not None and torch.is_grad_enabled()
            and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors))


def check_integer_spikes_need_no_grad(spike_dtype, tensors) -> None:
    """For paths that cannot return spikes as a SpikeBytes (the token-routed neuron,
    effst/nn/token_routing.py): refuse integer spikes where autograd would need a gradient.
    (effst.slif and the SLIF modules return a SpikeBytes there instead.)"""
    if byte_spikes_need_grad(spike_dtype, tensors):
        raise ValueError(
            f"spike_dtype={spike_dtype}: this path (token-routed neurons) gives integer spikes no "
            "gradient, but an input requires grad; use spike_dtype=None (spikes in x's dtype) "
            "here for training, or run under torch.no_grad() / torch.inference_mode()")


def _spikes_as(spikes: torch.Tensor, spike_dtype, tensors) -> torch.Tensor:
    """Float 0/1 spikes of the reference / native backends in integer ``spike_dtype``: a
    SpikeBytes keeping their gradient path when one is needed, else plain bytes."""
    if byte_spikes_need_grad(spike_dtype, tensors):
        return as_spike_bytes(spikes, spike_dtype, check_values=False)
    return spikes.to(spike_dtype)


def _as_parameter(value, name: str, x: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {value.dtype}")
        if value.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} (where x is), got {value.device}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float or a floating-point tensor, got {type(value).__name__}")
    if not math.isfinite(value):  # (tensors are not scanned: that would synchronise with the GPU)
        raise ValueError(f"{name}: expected a finite value, got {value}")
    return torch.tensor(float(value), dtype=compute_dtype_for(x.dtype), device=x.device)


def slif_with_plan(x: torch.Tensor, w: torch.Tensor, theta: torch.Tensor,
                   v_init: Optional[torch.Tensor], plan: SLIFPlan):
    """Run a fused backend on validated inputs: ``(spikes like x, v_final like one step)``.

    The modules call this with a plan cached per input shape; ``w`` / ``theta`` hold their
    plan's channel counts in any shape and floating dtype, ``v_init`` holds N values in the
    compute dtype (any shape) or is None. Reshapes, casts and parameter-gradient sums happen
    inside the one autograd node of either backend.
    """
    if type(x) is SpikeBytes:  # (spikes of another neuron: the kernels need a data pointer)
        x = float_values(x)
    if plan.spike_dtype is not plan.x_dtype and byte_spikes_need_grad(plan.spike_dtype,
                                                                        (x, w, theta, v_init)):
        return _slif_spike_bytes(x, w, theta, v_init, plan)
    if torch.compiler.is_compiling():
        return SLIFFunction.apply(x, w, theta, v_init, plan)
    if plan.backend == "native":
        # One operator call: its autograd, the [T, N] view and the parameter-gradient sums
        # live in C++ (csrc/slif_autograd.cpp), so the backward runs no Python at all.
        spikes, v_final = torch.ops.effst_native.slif.default(x, w, theta, v_init,
                                                              *plan.native_args)
        if plan.spike_dtype != spikes.dtype:
            spikes = spikes.to(plan.spike_dtype)
        return spikes, v_final
    if _functorch_transforms_active():
        return SLIFFunction.apply(x, w, theta, v_init, plan)
    # What SLIFFunction.apply does outside functorch transforms (unwrap dead functorch
    # wrappers, then the C apply) without its Python wrapper: ~4-6 us less per call (1 thread).
    return _apply_slif(_unwrap_if_dead(x), _unwrap_if_dead(w), _unwrap_if_dead(theta),
                       None if v_init is None else _unwrap_if_dead(v_init), plan)


def _slif_spike_bytes(x, w, theta, v_init, plan: SLIFPlan):
    """:func:`slif_with_plan` for integer spikes that need a gradient: spikes as a SpikeBytes
    (the kernel's bytes, autograd's view in x's dtype); the backward is unchanged."""
    if torch.compiler.is_compiling():
        raise compile_error(plan.spike_dtype)
    if plan.backend == "native":  # (its op writes float spikes)
        spikes, v_final = torch.ops.effst_native.slif.default(x, w, theta, v_init,
                                                              *plan.native_args)
        return _spikes_as(spikes, plan.spike_dtype, (x, w, theta, v_init)), v_final
    return SLIFFunction.apply(x, w, theta, v_init, plan.spike_bytes_plan)


def slif(
    x: torch.Tensor,
    w: Union[torch.Tensor, float],
    v_threshold: Union[torch.Tensor, float],
    *,
    v_reset: Optional[float] = 0.0,
    v_init: Optional[Union[torch.Tensor, float]] = None,
    surrogate: str = "atan",
    alpha: Optional[float] = None,
    detach_reset: bool = False,
    decay_input: bool = True,
    channel_dim: int = -1,
    backend: str = "auto",
    return_state: bool = False,
    spike_dtype: Optional[torch.dtype] = None,
):
    """sLIF neuron over ``x = [T, *]`` (docs/slif.md) with learnable decay and threshold.

    Args:
        x: input current, time first, float16/bfloat16/float32/float64.
        w: decay logit (``1/tau = sigmoid(w)``); shape ``()``, ``(C,)`` or the per-step shape.
        v_threshold: firing threshold, same three forms as ``w`` (independently).
        v_reset: reset potential (hard reset), or None for soft reset (subtract threshold).
        v_init: membrane potential before step 1 (broadcastable to the per-step shape);
            default ``v_reset`` (0 for soft reset).
        surrogate, alpha: surrogate gradient (see ``effst.ops.surrogates``); alpha None = default.
        detach_reset: no gradient through the reset.
        decay_input: ``H = V + k(X - (V - V_r))`` if True, else ``H = V - k(V - V_r) + X``.
        channel_dim: dim of the per-step shape a ``(C,)`` parameter indexes.
        backend: 'auto', 'reference', 'triton' or 'native'.
        return_state: also return the final membrane potential (per-step shape, fp32/fp64).
        spike_dtype: None (spikes in x's dtype), or torch.uint8 / torch.bool (1 byte per
            spike). Without a gradient needed: a plain uint8/bool tensor. With one (grad mode
            on and an input requiring grad): a :class:`~effst.ops.spike_bytes.SpikeBytes`, a
            tensor of x's float dtype for autograd holding the bytes (``.spike_bytes``), so the
            surrogate gradient flows to x as with float spikes; ``BlockSparseLinear`` reads and
            saves its bytes, other ops read its float value (docs/block_sparse.md, "Spikes as
            bytes").

    Returns:
        Spikes with ``x``'s shape, and the final state if ``return_state``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a tensor [T, *], got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x: expected a float16/bfloat16/float32/float64 tensor, got {x.dtype}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x: expected shape [T, *] with T >= 1, got {tuple(x.shape)}")
    if v_reset is not None:
        if isinstance(v_reset, bool) or not isinstance(v_reset, (int, float)):
            raise TypeError(f"v_reset: expected a float or None (soft reset), got {type(v_reset).__name__}")
        if not math.isfinite(v_reset):
            raise ValueError(f"v_reset: expected a finite value or None (soft reset), got {v_reset}")
        v_reset = float(v_reset)
    for flag, name in ((detach_reset, "detach_reset"), (decay_input, "decay_input"),
                       (return_state, "return_state")):
        _check_bool(flag, name)
    check_spike_dtype(spike_dtype)
    surrogate_id, alpha = resolve_surrogate(surrogate, alpha)
    w = _as_parameter(w, "w", x)
    theta = _as_parameter(v_threshold, "v_threshold", x)
    step_shape = x.shape[1:]
    if len(step_shape) > 0:  # checked even when no (C,) parameter reads it: bad input is never ignored
        normalize_channel_dim(channel_dim, len(step_shape))
    elif isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
        raise TypeError(f"channel_dim: expected an int, got {type(channel_dim).__name__}")
    w_layout = resolve_parameter_layout(w.shape, step_shape, channel_dim, "w")
    theta_layout = resolve_parameter_layout(theta.shape, step_shape, channel_dim, "v_threshold")
    if v_init is not None:
        v_init = _as_parameter(v_init, "v_init", x)
        try:
            v_init = v_init.expand(step_shape)
        except RuntimeError:
            raise ValueError(f"v_init: expected a shape broadcastable to the per-step shape "
                             f"{tuple(step_shape)}, got {tuple(v_init.shape)}") from None
    chosen = resolve_backend(backend, x.device)
    if chosen == "reference":
        out = slif_reference(x, w, theta, v_reset=v_reset, v_init=v_init, surrogate=surrogate,
                             alpha=alpha, detach_reset=detach_reset, decay_input=decay_input,
                             channel_dim=channel_dim, return_state=return_state)
        if spike_dtype is None:
            return out
        if return_state:
            return _spikes_as(out[0], spike_dtype, (x, w, theta, v_init)), out[1]
        return _spikes_as(out, spike_dtype, (x, w, theta, v_init))
    plan = make_plan(chosen, tuple(x.shape), x.dtype, w_layout, theta_layout, v_reset,
                     surrogate_id, alpha, detach_reset, decay_input, spike_dtype)
    cdtype = plan.compute_dtype
    v_init_flat = v_init.to(cdtype).reshape(-1).contiguous() if v_init is not None else None
    spikes, v_final = slif_with_plan(x, w, theta, v_init_flat, plan)
    if return_state:
        return spikes, v_final
    return spikes


__all__ = ["slif", "slif_with_plan", "make_plan", "SLIFPlan", "SLIFFunction",
           "slif_forward_triton", "slif_backward_triton", "resolve_backend", "SURROGATE_NAMES",
           "SPIKE_DTYPES"]
