"""Run a spiking neuron module on STATA's compact, per-timestep token routes.

``run_neuron_on_tokens`` keeps each neuron's membrane per token identity while the kept tokens
change from one timestep to the next. An effst sLIF / PLIF / LIF module whose backend is Triton
goes through the fused kernel of :mod:`effst.ops.token_select` (``routed_neuron``); any other
neuron runs on the full token grid between a scatter and a gather. This lives in ``effst.nn``
because it reads neuron modules (their options, state and hooks); the kernels stay in ops.
"""
from __future__ import annotations

from typing import Optional

import torch

from effst.nn.neurons import SLIF
from effst.ops.layout import FLOAT_DTYPES, normalize_channel_dim, resolve_parameter_layout
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
    if current.dtype not in FLOAT_DTYPES:
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


class TokenRoute:
    """Token identities of a compact ``[T, B, K, C]`` stream: ``index`` ``[T, B, K]`` int64 (the
    token each compact slot holds, unique per ``(t, b)``) out of ``tokens``.

    One route serves every routed neuron after a selection, so what depends only on the route is
    worked out once, here: the index is checked on construction, and :meth:`slots` (the fused
    kernel's inverse map, :func:`~effst.ops.token_select.token_slots`) is computed on the first
    call and then reused. Build a new route for a new selection; do not change ``index`` in place.
    """

    __slots__ = ("index", "tokens", "_slots")

    def __init__(self, index: torch.Tensor, tokens: int):
        if not isinstance(index, torch.Tensor) or index.dim() != 3:
            raise ValueError(f"index: expected a [T, B, K] tensor, got {getattr(index, 'shape', type(index).__name__)}")
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < index.shape[2]:
            raise ValueError(f"tokens: expected an int >= {index.shape[2]} (the compact token count), got {tokens!r}")
        T, B, K = index.shape
        _check_index(index.reshape(T * B, K), T * B, tokens)
        self.index, self.tokens, self._slots = index, tokens, None

    def slots(self) -> torch.Tensor:
        """``token_slots(index, tokens)`` (int32 ``[T, B, tokens]``), computed once per route."""
        if self._slots is None:
            self._slots = token_slots(self.index, self.tokens)
        return self._slots


def _run_fused(neuron, current: torch.Tensor, route: TokenRoute) -> torch.Tensor:
    T, B, K, C = current.shape
    tokens = route.tokens
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
                                           route.slots(), options)
    return spikes


def run_neuron_on_tokens(neuron, current: torch.Tensor, index, tokens: Optional[int] = None, *,
                         backend: str = "auto", fused: bool = True) -> torch.Tensor:
    """Run a multi-step neuron on a compact ``[T, B, K, C]`` input whose kept tokens differ per
    timestep, keeping its membrane per token identity. ``index``: a :class:`TokenRoute` (pass the
    same route to every neuron of a selection: its checks and slot map are then done once), or
    the ``[T, B, K]`` token ids with ``tokens``, the full token count.

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
    if isinstance(index, TokenRoute):
        route = index
        if tokens is not None and tokens != route.tokens:
            raise ValueError(f"tokens: expected None or the route's {route.tokens}, got {tokens!r}")
    else:
        if not isinstance(index, torch.Tensor) or tuple(index.shape) != (T, B, K):
            raise ValueError(f"index: expected shape {(T, B, K)} (one token id per compact slot), "
                             f"got {tuple(getattr(index, 'shape', ()))}")
        route = TokenRoute(index, tokens)
    if tuple(route.index.shape) != (T, B, K):
        raise ValueError(f"index: expected a route of shape {(T, B, K)} (one token id per compact slot), "
                         f"got {tuple(route.index.shape)}")
    if fused and _fusable(neuron, current, route.tokens, backend):
        return _run_fused(neuron, current, route)
    rows = route.index.reshape(T * B, K)
    full = scatter_tokens(current.reshape(T * B, K, C), rows, route.tokens, backend=backend)
    spikes = neuron(full.reshape(T, B, route.tokens, C))
    return gather_tokens(spikes.reshape(T * B, route.tokens, C), rows, backend=backend).reshape(T, B, K, C)
