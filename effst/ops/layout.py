"""Memory layout of sLIF tensors and parameters: the one place that defines it.

Every backend sees the input as a 2-D ``[T, N]`` view (time first, the per-step shape
flattened to N neurons, unit stride along N). A parameter of any allowed form (per layer,
per channel, per neuron) is a 1-D vector of ``channels`` values, and neuron ``n`` uses entry

    (n // inner) % channels

so one formula serves all three forms: per layer is ``channels=1``, per neuron is
``channels=N, inner=1``, per channel along dim d is ``channels=shape[d]`` with ``inner`` the
product of the per-step dims after d. Kernels return parameter gradients per neuron
(``[N]``) or, where a kernel can, per program (effst/ops/slif.py); either is summed to the
parameter by a fixed-order torch sum (deterministic, no atomics). The element dtypes the
kernels take are named here too (``FLOAT_DTYPES``, ``BYTE_DTYPES``), once for every op.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

#: The floating dtypes every effst kernel takes (inputs, parameters, spikes as autograd sees them).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Spikes held as one byte each (spike_dtype=; the block-sparse kernels read them as such).
BYTE_DTYPES = (torch.uint8, torch.bool)


@dataclass(frozen=True)
class ParameterLayout:
    """Which parameter entry each neuron of the flattened per-step shape uses."""

    form: str  # "layer" | "channel" | "neuron"
    channels: int
    inner: int


def resolve_parameter_layout(
    shape: Sequence[int], step_shape: Sequence[int], channel_dim: int, name: str
) -> ParameterLayout:
    """Classify a parameter shape against the per-step input shape or raise a clear error."""
    shape = tuple(int(s) for s in shape)
    step_shape = tuple(int(s) for s in step_shape)
    numel = 1
    for s in step_shape:
        numel *= s
    if shape == ():
        return ParameterLayout("layer", 1, max(numel, 1))
    if shape == step_shape:
        return ParameterLayout("neuron", max(numel, 1), 1)
    if len(shape) == 1:
        dim = normalize_channel_dim(channel_dim, len(step_shape))
        if shape[0] == step_shape[dim]:
            inner = 1
            for s in step_shape[dim + 1:]:
                inner *= s
            return ParameterLayout("channel", shape[0], inner)
        expected = f"(), ({step_shape[dim]},) [per channel along dim {channel_dim} of the per-step shape] or {step_shape} [per neuron]"
    else:
        expected = f"() [per layer], (C,) [per channel] or {step_shape} [per neuron]"
    raise ValueError(f"{name}: shape {shape} matches no parameter form; expected {expected}")


def normalize_channel_dim(channel_dim: int, step_ndim: int) -> int:
    """Map ``channel_dim`` (may be negative) to an index of the per-step shape, or raise."""
    if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
        raise TypeError(f"channel_dim: expected an int, got {type(channel_dim).__name__}")
    if not -step_ndim <= channel_dim < step_ndim:
        raise ValueError(
            f"channel_dim: expected a dim of the per-step shape (range [{-step_ndim}, {step_ndim - 1}]), got {channel_dim}"
        )
    return channel_dim % step_ndim


def reduce_to_parameter(per_neuron: torch.Tensor, channels: int, inner: int) -> torch.Tensor:
    """Sum a per-neuron gradient ``[N]`` onto the ``[channels]`` parameter, deterministically."""
    if inner == 1 and channels == per_neuron.numel():
        return per_neuron  # per neuron: already the parameter's shape
    return per_neuron.reshape(-1, channels, inner).sum(dim=(0, 2))
