"""Fused sLIF neuron: Triton kernels, launchers, custom ops, autograd Function, functional API.

Reads top to bottom as the data flows: the per-step recurrence (SPEC section 2), the forward
kernel (one launch for all T), the backward kernel (one launch, reverse time, recomputing the
forward per chunk from checkpoints instead of storing H), their launchers, the torch.library
custom ops that make them opaque to torch.compile, the autograd Function, and finally
:func:`slif`, the public entry point that validates its arguments and picks a backend.

Memory plan per neuron-step (fp32 I/O): forward reads x, writes spikes; backward reads
grad_spikes and x, writes grad_x — 20 bytes, the SPEC section 7 minimum. The only extra
traffic is one fp32 V checkpoint per CHUNK steps (0 when T <= CHUNK) and O(N) parameter
gradients, reduced afterwards by a deterministic torch sum.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from effst.ops.layout import ParameterLayout, reduce_to_parameter, resolve_parameter_layout
from effst.ops.slif_reference import slif_reference
from effst.ops.surrogates import SURROGATE_NAMES, resolve_surrogate, surrogate_grad_triton

# Steps unrolled per chunk. T <= MAX_CHUNK runs as a single fully unrolled chunk (no
# checkpoints); longer sequences checkpoint V every MAX_CHUNK steps and the backward
# recomputes one chunk at a time, holding its x and V in registers.
MAX_CHUNK = 8
FORWARD_BLOCK = 1024
BACKWARD_BLOCK = 512
BACKENDS = ("auto", "reference", "triton", "native")


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
    s = (h >= theta).to(h.dtype)
    if HARD_RESET:
        v = (1.0 - s) * h + s * v_rest
    else:
        v = h - s * theta
    return s, v


@triton.jit
def _load_parameter(ptr, offs, mask, channels, inner):
    """Entry ``(n // inner) % channels`` of a parameter vector for each neuron n."""
    return tl.load(ptr + (offs // inner) % channels, mask=mask, other=0.0)


@triton.jit
def slif_forward_kernel(
    x_ptr, spikes_ptr, w_ptr, theta_ptr, v_init_ptr, v_final_ptr, checkpoint_ptr, scalars_ptr,
    T, N, stride_xt,
    w_channels, w_inner, theta_channels, theta_inner,
    HAS_V_INIT: tl.constexpr, HARD_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr,
    CHUNK: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # int64: tensors past 2**31 elements index correctly
    mask = offs < N
    # Row offsets in int64 too (t * N can pass 2**31 long before N does).
    stride64 = tl.cast(stride_xt, tl.int64)
    N64 = tl.cast(N, tl.int64)
    v_rest = tl.load(scalars_ptr).to(COMPUTE_DTYPE)
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
        for j in tl.static_range(CHUNK):
            t = c * CHUNK + j
            if t < T:
                x = tl.load(x_ptr + t * stride64 + offs, mask=mask, other=0.0)
                h = _charge(v, x.to(COMPUTE_DTYPE), k, v_rest, DECAY_INPUT)
                s, v = _fire_and_reset(h, theta, v_rest, HARD_RESET)
                tl.store(spikes_ptr + t * N64 + offs,
                         s.to(spikes_ptr.dtype.element_ty), mask=mask)
    tl.store(v_final_ptr + offs, v, mask=mask)


@triton.jit
def slif_backward_kernel(
    grad_spikes_ptr, grad_v_final_ptr, x_ptr, w_ptr, theta_ptr, v_init_ptr, checkpoint_ptr,
    scalars_ptr, grad_x_ptr, grad_w_ptr, grad_theta_ptr, grad_v_init_ptr,
    T, N, stride_xt,
    w_channels, w_inner, theta_channels, theta_inner,
    HAS_V_INIT: tl.constexpr, HAS_GRAD_V_FINAL: tl.constexpr, HARD_RESET: tl.constexpr,
    DECAY_INPUT: tl.constexpr, DETACH_RESET: tl.constexpr, SURROGATE: tl.constexpr,
    CHUNK: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    # Row offsets in int64 too (t * N can pass 2**31 long before N does).
    stride64 = tl.cast(stride_xt, tl.int64)
    N64 = tl.cast(N, tl.int64)
    v_rest = tl.load(scalars_ptr).to(COMPUTE_DTYPE)
    alpha = tl.load(scalars_ptr + 1).to(COMPUTE_DTYPE)
    k = tl.sigmoid(_load_parameter(w_ptr, offs, mask, w_channels, w_inner).to(COMPUTE_DTYPE))
    theta = _load_parameter(theta_ptr, offs, mask, theta_channels, theta_inner).to(COMPUTE_DTYPE)
    zero = tl.zeros([BLOCK], dtype=COMPUTE_DTYPE)
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
            v = tl.load(checkpoint_ptr + (c - 1) * N64 + offs, mask=mask, other=0.0)
        elif HAS_V_INIT:
            v = tl.load(v_init_ptr + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        else:
            v = zero + v_rest
        # Recompute the chunk forward, keeping X_t and V_{t-1} in registers.
        xs = ()
        v_prevs = ()
        for j in tl.static_range(CHUNK):
            t = c * CHUNK + j
            x = tl.load(x_ptr + t * stride64 + offs, mask=mask & (t < T),
                        other=0.0).to(COMPUTE_DTYPE)
            xs = xs + (x,)
            v_prevs = v_prevs + (v,)
            h = _charge(v, x, k, v_rest, DECAY_INPUT)
            _, v = _fire_and_reset(h, theta, v_rest, HARD_RESET)
        # Reverse through the chunk.
        for j in tl.static_range(CHUNK - 1, -1, -1):
            t = c * CHUNK + j
            if t < T:
                x = xs[j]
                v_prev = v_prevs[j]
                h = _charge(v_prev, x, k, v_rest, DECAY_INPUT)
                s = (h >= theta).to(COMPUTE_DTYPE)
                psi = surrogate_grad_triton(h - theta, alpha, SURROGATE)
                grad_s = tl.load(grad_spikes_ptr + t * N64 + offs, mask=mask,
                                 other=0.0).to(COMPUTE_DTYPE)
                if HARD_RESET:
                    if DETACH_RESET:
                        dv_dh = 1.0 - s
                        dv_dtheta = zero
                    else:
                        dv_dh = (1.0 - s) + (v_rest - h) * psi
                        dv_dtheta = (h - v_rest) * psi
                else:
                    if DETACH_RESET:
                        dv_dh = zero + 1.0
                        dv_dtheta = -s
                    else:
                        dv_dh = 1.0 - theta * psi
                        dv_dtheta = theta * psi - s
                grad_h = grad_s * psi + carry * dv_dh
                if DECAY_INPUT:
                    grad_x = grad_h * k
                    grad_k += grad_h * (x - (v_prev - v_rest))
                else:
                    grad_x = grad_h
                    grad_k += grad_h * (v_rest - v_prev)
                grad_theta += carry * dv_dtheta - grad_s * psi
                carry = grad_h * (1.0 - k)
                tl.store(grad_x_ptr + t * N64 + offs,
                         grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_w_ptr + offs, grad_k * k * (1.0 - k), mask=mask)
    tl.store(grad_theta_ptr + offs, grad_theta, mask=mask)
    if HAS_V_INIT:
        tl.store(grad_v_init_ptr + offs, carry, mask=mask)


# --------------------------------------------------------------------------- launchers
def compute_dtype_for(x_dtype: torch.dtype) -> torch.dtype:
    """State/parameter dtype of the kernels: float64 for float64 input, float32 otherwise."""
    return torch.float64 if x_dtype == torch.float64 else torch.float32


def _triton_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def chunk_size(T: int) -> int:
    """Steps per unrolled chunk: all of T when small, MAX_CHUNK otherwise."""
    return T if T <= MAX_CHUNK else MAX_CHUNK


@functools.lru_cache(maxsize=64)
def _scalars(v_reset: Optional[float], alpha: float, dtype: torch.dtype, device) -> torch.Tensor:
    """[v_rest, alpha] in the compute dtype, on the device.

    Passed through memory so float64 runs see float64 values, not fp32-rounded kernel
    arguments; cached so the host-to-device copy happens once per configuration, not per call
    (a pageable copy would otherwise stall the host on every launch).
    """
    rest = 0.0 if v_reset is None else v_reset
    return torch.tensor([rest, alpha], dtype=dtype, device=device)


def checkpoint_shape(T: int, N: int) -> tuple[int, int]:
    """Shape of the V checkpoints the Triton forward keeps for its backward."""
    return (triton.cdiv(T, chunk_size(T)) - 1 if T > 0 else 0, N)


def slif_forward_triton_with_checkpoints(
    x2d: torch.Tensor, w: torch.Tensor, theta: torch.Tensor, v_init: Optional[torch.Tensor],
    w_channels: int, w_inner: int, theta_channels: int, theta_inner: int,
    v_reset: Optional[float], surrogate_id: int, alpha: float, detach_reset: bool,
    decay_input: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward over ``x2d = [T, N]`` in one launch: spikes (x dtype), V_T, V checkpoints."""
    T, N = x2d.shape
    cdtype = compute_dtype_for(x2d.dtype)
    spikes = torch.empty((T, N), dtype=x2d.dtype, device=x2d.device)
    v_final = torch.empty((N,), dtype=cdtype, device=x2d.device)
    checkpoints = torch.empty(checkpoint_shape(T, N), dtype=cdtype, device=x2d.device)
    if N == 0:
        return spikes, v_final, checkpoints
    grid = (triton.cdiv(N, FORWARD_BLOCK),)
    slif_forward_kernel[grid](
        x2d, spikes, w, theta, v_init if v_init is not None else v_final, v_final,
        checkpoints if checkpoints.numel() else v_final,
        _scalars(v_reset, alpha, cdtype, x2d.device),
        T, N, x2d.stride(0), w_channels, w_inner, theta_channels, theta_inner,
        HAS_V_INIT=v_init is not None, HARD_RESET=v_reset is not None,
        DECAY_INPUT=decay_input, CHUNK=chunk_size(T), COMPUTE_DTYPE=_triton_dtype(cdtype),
        BLOCK=FORWARD_BLOCK, num_warps=4,
    )
    return spikes, v_final, checkpoints


def slif_forward_triton(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The backend contract's forward: ``(spikes, v_final)``."""
    spikes, v_final, _ = slif_forward_triton_with_checkpoints(*args, **kwargs)
    return spikes, v_final


def slif_backward_triton(
    grad_spikes: torch.Tensor, grad_v_final: Optional[torch.Tensor], x2d: torch.Tensor,
    w: torch.Tensor, theta: torch.Tensor, v_init: Optional[torch.Tensor],
    w_channels: int, w_inner: int, theta_channels: int, theta_inner: int,
    v_reset: Optional[float], surrogate_id: int, alpha: float, detach_reset: bool,
    decay_input: bool, checkpoints: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward in one launch: grad_x [T, N] and per-neuron grads of w, theta and v_init."""
    T, N = x2d.shape
    cdtype = compute_dtype_for(x2d.dtype)
    device = x2d.device
    grad_spikes = grad_spikes.contiguous()
    grad_x = torch.empty((T, N), dtype=x2d.dtype, device=device)
    grad_w = torch.empty((N,), dtype=cdtype, device=device)
    grad_theta = torch.empty((N,), dtype=cdtype, device=device)
    grad_v_init = torch.zeros((N,) if v_init is not None else (1,), dtype=cdtype, device=device)
    if N == 0:
        return grad_x, grad_w, grad_theta, grad_v_init
    if checkpoints is None and checkpoint_shape(T, N)[0] > 0:
        # Called without the forward's checkpoints (backend contract): rebuild them.
        checkpoints = slif_forward_triton_with_checkpoints(
            x2d, w, theta, v_init, w_channels, w_inner, theta_channels, theta_inner, v_reset,
            surrogate_id, alpha, detach_reset, decay_input)[2]
    if checkpoints is None or checkpoints.numel() == 0:
        checkpoints = grad_w  # never read: a single chunk starts from v_init
    grid = (triton.cdiv(N, BACKWARD_BLOCK),)
    slif_backward_kernel[grid](
        grad_spikes, grad_v_final if grad_v_final is not None else grad_w, x2d, w, theta,
        v_init if v_init is not None else grad_w, checkpoints,
        _scalars(v_reset, alpha, cdtype, device), grad_x, grad_w, grad_theta, grad_v_init,
        T, N, x2d.stride(0), w_channels, w_inner, theta_channels, theta_inner,
        HAS_V_INIT=v_init is not None, HAS_GRAD_V_FINAL=grad_v_final is not None,
        HARD_RESET=v_reset is not None, DECAY_INPUT=decay_input, DETACH_RESET=detach_reset,
        SURROGATE=surrogate_id, COMPUTE_DTYPE=_triton_dtype(cdtype),
        BLOCK=BACKWARD_BLOCK, num_warps=4, CHUNK=chunk_size(T),
    )
    return grad_x, grad_w, grad_theta, grad_v_init


# --------------------------------------------------------------------------- backends
def _native_module():
    from effst.ops import slif_native  # built on first use; imported lazily

    return slif_native


def _forward_impl(backend: str, x2d, w, theta, v_init, *config):
    """Run a backend's forward; returns (spikes, v_final, saved) where saved is backend state."""
    if backend == "triton":
        return slif_forward_triton_with_checkpoints(x2d, w, theta, v_init, *config)
    if backend == "native":
        spikes, v_final = _native_module().slif_forward_native(x2d, w, theta, v_init, *config)
        return spikes, v_final, v_final.new_empty((0, x2d.shape[1]))
    raise ValueError(f"backend: expected 'triton' or 'native' for the fused op, got {backend!r}")


def _backward_impl(backend: str, grad_spikes, grad_v_final, x2d, w, theta, v_init, saved, *config):
    if backend == "triton":
        return slif_backward_triton(grad_spikes, grad_v_final, x2d, w, theta, v_init, *config,
                                    checkpoints=saved)
    if backend == "native":
        return _native_module().slif_backward_native(grad_spikes, grad_v_final, x2d, w, theta,
                                                     v_init, *config)
    raise ValueError(f"backend: expected 'triton' or 'native' for the fused op, got {backend!r}")


# --------------------------------------------------------------------------- custom ops
# Registered with torch.library so torch.compile(fullgraph=True) treats the kernels as opaque
# nodes (fake implementations give it the output shapes) instead of breaking the graph.
@torch.library.custom_op("effst::slif_forward", mutates_args=())
def slif_forward_op(
    x2d: torch.Tensor, w: torch.Tensor, theta: torch.Tensor, v_init: Optional[torch.Tensor],
    w_channels: int, w_inner: int, theta_channels: int, theta_inner: int,
    v_reset: Optional[float], surrogate_id: int, alpha: float, detach_reset: bool,
    decay_input: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    config = (w_channels, w_inner, theta_channels, theta_inner, v_reset, surrogate_id, alpha,
              detach_reset, decay_input)
    return _forward_impl(backend, x2d, w, theta, v_init, *config)


@slif_forward_op.register_fake
def _(x2d, w, theta, v_init, w_channels, w_inner, theta_channels, theta_inner, v_reset,
      surrogate_id, alpha, detach_reset, decay_input, backend):
    T, N = x2d.shape
    cdtype = compute_dtype_for(x2d.dtype)
    saved_shape = checkpoint_shape(T, N) if backend == "triton" else (0, N)
    return (x2d.new_empty((T, N)), x2d.new_empty((N,), dtype=cdtype),
            x2d.new_empty(saved_shape, dtype=cdtype))


@torch.library.custom_op("effst::slif_backward", mutates_args=())
def slif_backward_op(
    grad_spikes: torch.Tensor, grad_v_final: Optional[torch.Tensor], x2d: torch.Tensor,
    w: torch.Tensor, theta: torch.Tensor, v_init: Optional[torch.Tensor], saved: torch.Tensor,
    w_channels: int, w_inner: int, theta_channels: int, theta_inner: int,
    v_reset: Optional[float], surrogate_id: int, alpha: float, detach_reset: bool,
    decay_input: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    config = (w_channels, w_inner, theta_channels, theta_inner, v_reset, surrogate_id, alpha,
              detach_reset, decay_input)
    return _backward_impl(backend, grad_spikes, grad_v_final, x2d, w, theta, v_init, saved,
                          *config)


@slif_backward_op.register_fake
def _(grad_spikes, grad_v_final, x2d, w, theta, v_init, saved, w_channels, w_inner,
      theta_channels, theta_inner, v_reset, surrogate_id, alpha, detach_reset, decay_input,
      backend):
    T, N = x2d.shape
    cdtype = compute_dtype_for(x2d.dtype)
    return (x2d.new_empty((T, N)), x2d.new_empty((N,), dtype=cdtype),
            x2d.new_empty((N,), dtype=cdtype),
            x2d.new_empty((N,) if v_init is not None else (1,), dtype=cdtype))


# --------------------------------------------------------------------------- autograd
class SLIFFunction(torch.autograd.Function):
    """Fused sLIF over ``[T, N]``: forward and backward each one kernel launch.

    Inputs are already flattened by :func:`slif`: ``w`` and ``theta`` are the parameter
    vectors in the compute dtype, ``w_layout``/``theta_layout`` say which entry each neuron
    uses, ``v_init`` is ``[N]`` or None. Returns ``(spikes [T, N], v_final [N])``.
    """

    @staticmethod
    def forward(ctx, x2d, w, theta, v_init, w_layout: ParameterLayout,
                theta_layout: ParameterLayout, v_reset, surrogate_id, alpha, detach_reset,
                decay_input, backend):
        config = (w_layout.channels, w_layout.inner, theta_layout.channels, theta_layout.inner,
                  v_reset, surrogate_id, alpha, detach_reset, decay_input)
        spikes, v_final, saved = torch.ops.effst.slif_forward(x2d, w, theta, v_init, *config,
                                                              backend)
        ctx.save_for_backward(x2d, w, theta, v_init, saved)
        ctx.config = config
        ctx.layouts = (w_layout, theta_layout)
        ctx.backend = backend
        ctx.mark_non_differentiable(saved)
        ctx.set_materialize_grads(False)  # an unused final state needs no zero-filled gradient
        return spikes, v_final

    @staticmethod
    def backward(ctx, grad_spikes, grad_v_final):
        x2d, w, theta, v_init, saved = ctx.saved_tensors
        if grad_spikes is None:
            grad_spikes = torch.zeros_like(x2d)
        grad_x, grad_w, grad_theta, grad_v_init = torch.ops.effst.slif_backward(
            grad_spikes, grad_v_final, x2d, w, theta, v_init, saved, *ctx.config, ctx.backend)
        w_layout, theta_layout = ctx.layouts
        return (grad_x, reduce_to_parameter(grad_w, w_layout),
                reduce_to_parameter(grad_theta, theta_layout),
                grad_v_init if v_init is not None else None,
                None, None, None, None, None, None, None, None)


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
    return backend


def _native_status() -> tuple[bool, str]:
    try:
        module = _native_module()
    except Exception as error:  # the module itself failing to import is a reason too
        return False, f"{type(error).__name__}: {error}"
    return module.native_status()


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


def _as_parameter(value, name: str, x: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {value.dtype}")
        if value.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} (where x is), got {value.device}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float or a floating-point tensor, got {type(value).__name__}")
    return torch.tensor(float(value), dtype=compute_dtype_for(x.dtype), device=x.device)


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
):
    """sLIF neuron over ``x = [T, *]`` (SPEC section 2) with learnable decay and threshold.

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

    Returns:
        Spikes in ``x.dtype`` with ``x``'s shape, and the final state if ``return_state``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a tensor [T, *], got {type(x).__name__}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"x: expected a float16/bfloat16/float32/float64 tensor, got {x.dtype}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x: expected shape [T, *] with T >= 1, got {tuple(x.shape)}")
    if v_reset is not None:
        if isinstance(v_reset, bool) or not isinstance(v_reset, (int, float)):
            raise TypeError(f"v_reset: expected a float or None (soft reset), got {type(v_reset).__name__}")
        v_reset = float(v_reset)
    for flag, name in ((detach_reset, "detach_reset"), (decay_input, "decay_input"),
                       (return_state, "return_state")):
        _check_bool(flag, name)
    surrogate_id, alpha = resolve_surrogate(surrogate, alpha)
    w = _as_parameter(w, "w", x)
    theta = _as_parameter(v_threshold, "v_threshold", x)
    step_shape = x.shape[1:]
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
        return slif_reference(x, w, theta, v_reset=v_reset, v_init=v_init, surrogate=surrogate,
                              alpha=alpha, detach_reset=detach_reset, decay_input=decay_input,
                              channel_dim=channel_dim, return_state=return_state)
    T = x.shape[0]
    cdtype = compute_dtype_for(x.dtype)
    x2d = x.reshape(T, -1)
    if x2d.shape[1] > 1 and x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    v_init_flat = v_init.to(cdtype).reshape(-1).contiguous() if v_init is not None else None
    spikes, v_final = SLIFFunction.apply(
        x2d, w.to(cdtype).reshape(-1).contiguous(), theta.to(cdtype).reshape(-1).contiguous(),
        v_init_flat, w_layout, theta_layout, v_reset, surrogate_id, alpha, detach_reset,
        decay_input, chosen)
    spikes = spikes.reshape(x.shape)
    if return_state:
        return spikes, v_final.reshape(step_shape)
    return spikes


__all__ = ["slif", "SLIFFunction", "slif_forward_triton", "slif_backward_triton",
           "resolve_backend", "SURROGATE_NAMES"]
