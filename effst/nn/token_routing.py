"""Run a spiking neuron module on STATA's compact, per-timestep token routes.

``run_neuron_on_tokens`` keeps each neuron's membrane per token identity while the kept tokens
change from one timestep to the next. An effst sLIF / PLIF / LIF module whose backend is Triton
goes through the fused kernel of :mod:`effst.ops.token_select` (``routed_neuron``); any other
neuron runs on the full token grid between a scatter and a gather. This lives in ``effst.nn``
because it reads neuron modules (their options, state and hooks); the kernels stay in ops.
"""
from __future__ import annotations

import torch

from effst.nn.neurons import SLIF
from effst.ops.layout import normalize_channel_dim, resolve_parameter_layout
from effst.ops.slif import check_integer_spikes_need_no_grad, resolve_backend
from effst.ops.token_select import (MAX_ROUTED_T, _check_index, _check_rows, _use_triton, gather_tokens,
                                    routed_neuron, scatter_tokens, token_slots)


def _has_hooks(module: torch.nn.Module) -> bool:
    """True when calling ``module`` would run forward hooks (its own or global ones)."""
    from torch.nn.modules import module as torch_module

    return bool(module._forward_hooks or module._forward_pre_hooks or torch_module._global_forward_hooks
                or torch_module._global_forward_pre_hooks)


def _fusable(neuron, current: torch.Tensor, tokens: int, backend: str) -> bool:
    """True when ``neuron`` is an effst sLIF/PLIF/LIF that would run its Triton kernel here, with
    per-layer or last-dim per-channel parameters, T <= MAX_ROUTED_T and a state that fits."""
    if not isinstance(neuron, SLIF) or neuron.step_mode != "m" or not _use_triton(current.device, backend):
        return False
    if _has_hooks(neuron):
        return False           # hooks (record_firing_rates) see the neuron's own call, as before
    if current.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return False
    if current.shape[0] > MAX_ROUTED_T or resolve_backend(neuron.backend, current.device) != "triton":
        return False
    T, B, K, C = current.shape
    step = (B, tokens, C)
    for parameter, name in ((neuron.w, "w"), (neuron.v_threshold, "v_threshold")):
        if parameter.device != current.device:
            return False
        try:
            layout = resolve_parameter_layout(parameter.shape, step, neuron.channel_dim, name)
        except ValueError:
            return False       # the neuron itself reports the error
        # The kernel reads entry c % channels for channel c of the LAST dim: a per-channel
        # parameter along another dim (tokens with C = 1 also has inner == 1) runs unfused.
        if not (layout.form == "layer" or (layout.form == "channel" and layout.channels == C
                                           and normalize_channel_dim(neuron.channel_dim, 3) == 2)):
            return False
    state = neuron.v
    return not isinstance(state, torch.Tensor) or tuple(state.shape) == step


def _run_fused(neuron, current: torch.Tensor, index: torch.Tensor, tokens: int) -> torch.Tensor:
    T, B, K, C = current.shape
    cdtype = torch.float64 if current.dtype == torch.float64 else torch.float32
    state = neuron.v
    v_init = neuron._initial_membrane((B, tokens, C), cdtype, current.device)
    if v_init is not None:
        v_init = v_init.contiguous()
    if neuron.spike_dtype is not None:
        check_integer_spikes_need_no_grad(neuron.spike_dtype, (current, neuron.w, neuron.v_threshold, state))
    options = (neuron.v_reset, neuron.surrogate_id, neuron.alpha, neuron.detach_reset, neuron.decay_input,
               neuron.spike_dtype)
    spikes, neuron.v = routed_neuron(current.contiguous(), neuron.w.to(cdtype).reshape(-1),
                                           neuron.v_threshold.to(cdtype).reshape(-1), v_init,
                                           token_slots(index, tokens), options)
    return spikes


def run_neuron_on_tokens(neuron, current: torch.Tensor, index: torch.Tensor, tokens: int, *,
                         backend: str = "auto", fused: bool = True) -> torch.Tensor:
    """Run a multi-step neuron on a compact ``[T, B, K, C]`` input whose kept tokens ``index``
    ``[T, B, K]`` differ per timestep, keeping its membrane per token identity.

    A dropped (token, t) gets zero input current, so its membrane decays as the neuron's own
    dynamics say, and its spike is not output. For an effst sLIF / PLIF / LIF neuron whose own
    backend is Triton (with per-layer or per-channel parameters along the last dim and
    ``T <= MAX_ROUTED_T``), one fused kernel does it (one more for the backward): it walks the
    full token grid with the membrane in registers and reads / writes only the compact slots,
    so the full-grid current and spikes are never materialised. Otherwise (any other neuron,
    ``backend='torch'``, ``fused=False``, or a neuron with forward hooks, which must see its own
    call) the current is scattered to all ``tokens``, the neuron runs there and the kept spikes
    are gathered back. Both leave the neuron's state
    ``[B, tokens, C]`` in ``neuron.v`` and give the same spikes and gradients.
    """
    _check_rows("current", current, 4)
    T, B, K, C = current.shape
    if not isinstance(index, torch.Tensor) or tuple(index.shape) != (T, B, K):
        raise ValueError(f"index: expected shape {(T, B, K)} (one token id per compact slot), "
                         f"got {tuple(getattr(index, 'shape', ()))}")
    _check_index(index.reshape(T * B, K), T * B, tokens)
    if fused and _fusable(neuron, current, tokens, backend):
        return _run_fused(neuron, current, index, tokens)
    full = scatter_tokens(current.reshape(T * B, K, C), index.reshape(T * B, K), tokens, backend=backend)
    spikes = neuron(full.reshape(T, B, tokens, C))
    return gather_tokens(spikes.reshape(T * B, tokens, C), index.reshape(T * B, K), backend=backend).reshape(T, B, K, C)
