"""Pure-torch sLIF: a per-step loop whose gradients come from autograd.

This is the oracle for the fused kernels: it shares no backward code with them (the
kernels' backward is derived by hand, this one by autograd through the loop), works in any
float dtype including float64, and keeps the original tensor shapes (no flattening), so a
layout bug in the kernels cannot hide here too.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from effst.ops.layout import normalize_channel_dim, resolve_parameter_layout
from effst.ops.surrogates import SpikeFunction, resolve_surrogate

Scalar = Union[float, torch.Tensor]


def broadcastable_parameter(param: torch.Tensor, step_shape: torch.Size, channel_dim: int, name: str) -> torch.Tensor:
    """View a parameter so it broadcasts against one time step of the input."""
    layout = resolve_parameter_layout(param.shape, step_shape, channel_dim, name)
    if layout.form == "channel":
        dim = normalize_channel_dim(channel_dim, len(step_shape))
        shape = [1] * len(step_shape)
        shape[dim] = param.shape[0]
        return param.reshape(shape)
    return param


def _in(value: Scalar, dtype: torch.dtype, device) -> torch.Tensor:
    """A number or tensor as a tensor of ``dtype`` (a Python float is not rounded via float32)."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype)
    return torch.tensor(value, dtype=dtype, device=device)


def slif_reference(
    x: torch.Tensor,
    w: Scalar,
    v_threshold: Scalar,
    *,
    v_reset: Optional[float] = 0.0,
    v_init: Optional[torch.Tensor] = None,
    surrogate: str = "atan",
    alpha: Optional[float] = None,
    detach_reset: bool = False,
    decay_input: bool = True,
    channel_dim: int = -1,
    return_state: bool = False,
):
    """sLIF over ``x = [T, *]`` by a Python loop over T (docs/slif.md); autograd backward.

    Arguments mean what they mean in :func:`effst.slif`. Computes in float64 for float64 input
    and in float32 otherwise (the state is float32 whatever the input dtype, as in the fused
    kernels: a bfloat16 membrane would fire differently); the spikes come back in ``x.dtype``
    and the final state in the compute dtype.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        what = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x: expected a floating-point tensor [T, *], got {what}")
    _, alpha = resolve_surrogate(surrogate, alpha)
    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc = x.to(cdtype)
    w = _in(w, cdtype, x.device)
    theta = _in(v_threshold, cdtype, x.device)
    step_shape = x.shape[1:]
    k = torch.sigmoid(broadcastable_parameter(w, step_shape, channel_dim, "w"))
    theta = broadcastable_parameter(theta, step_shape, channel_dim, "v_threshold")
    rest = 0.0 if v_reset is None else float(v_reset)
    if v_init is None:
        v = torch.full(step_shape, rest, dtype=cdtype, device=x.device)
    else:
        v = _in(v_init, cdtype, x.device).expand(step_shape)
    spikes = []
    for t in range(x.shape[0]):
        if decay_input:
            h = v + k * (xc[t] - (v - rest))
        else:
            h = v - k * (v - rest) + xc[t]
        s = SpikeFunction.apply(h - theta, surrogate, alpha)
        s_reset = s.detach() if detach_reset else s
        if v_reset is None:
            v = h - s_reset * theta
        else:
            v = (1.0 - s_reset) * h + s_reset * rest
        spikes.append(s)
    out = torch.stack(spikes).to(x.dtype)
    if return_state:
        return out, v
    return out
