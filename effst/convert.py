"""Swap the LIF-type neurons of any ``nn.Module`` for effst's sLIF (or LIF/PLIF/STL), carrying
tau, V_th, reset, surrogate and the rest over so the outputs are unchanged until training
moves them (docs/pruning.md, the paper's pipeline: "replace LIF with sLIF, tau and V_th
initialised from the LIF").

Converted: effst's own ``LIF``/``PLIF``/``SLIF``, and SpikingJelly's ``LIFNode`` and
``ParametricLIFNode`` (2.0.0 ``activation_based``; 0.0.0.0.x ``clock_driven`` and
``activation_based``) and 0.0.0.0.x's ``MultiStepLIFNode``/``MultiStepParametricLIFNode``.
A SpikingJelly node's class must be exactly one of those: a subclass may change the dynamics,
so it is left in place with a warning, as is any other kind of SpikingJelly neuron.

Refused with an error naming the module (and the model left unchanged): SpikingJelly's
``IFNode`` (no leak, tau = infinity, which the sigmoid parametrisation 1/tau = sigmoid(w)
cannot express) and any node with ``store_v_seq=True`` (effst's neurons keep only the final
membrane state, so its ``v_seq`` would be lost).

Per-channel parameters (``channels=True``, for ``slif`` and ``stl``) need the channel count
and the channel dim of the input the neuron sees, before any forward pass. They come from,
in order: an effst neuron that already has channels; the ``effst_channels`` /
``effst_channel_dim`` attributes that :mod:`effst.models` puts on every neuron it builds (set
them on your own neurons the same way); or the layer just before the neuron inside an
``nn.Sequential`` (``Conv*d``/``BatchNorm*d``: its channels at dim 1 of the per-step shape;
``Linear``: its out_features at the last dim). A neuron with none of these gets per-layer
scalars. LIF and PLIF targets are per layer by definition.

The membrane state ``v`` carries over as well, so a conversion between two calls of one
sequence (without a reset) continues it unchanged.

A target form that cannot hold the source's values exactly (for example per-channel
thresholds that differ, converted to ``lif``) is an error, never a silent average.
"""
from __future__ import annotations

import sys
import types
import warnings
from typing import Optional

import torch
from torch import nn

from effst.nn import LIF, PLIF, SLIF
from effst.nn.neuron_kinds import (
    CONVERSION_HOOK,
    is_spiking_neuron,
    is_spikingjelly_lif_subclass,
    spikingjelly_kind,
)
from effst.ops.parametrization import tau_to_w
from effst.ops.slif import BACKENDS

#: Target neuron kinds: what is learned (tau, threshold).
TARGETS: dict[str, tuple[bool, bool]] = {
    "slif": (True, True),
    "stl": (False, True),
    "plif": (True, False),
    "lif": (False, False),
}

# SpikingJelly surrogate class -> (effst name, how SJ's alpha maps to effst's alpha).
# Checked numerically: the first seven are the same functions with the same alpha;
# SpikingJelly's Rect(alpha=a) is a * [|x| < 1/(2a)], effst's rect with alpha 1/a.
_SJ_SURROGATES: dict[str, tuple[str, bool]] = {
    "Sigmoid": ("sigmoid", False),
    "ATan": ("atan", False),
    "PiecewiseQuadratic": ("piecewise_quadratic", False),
    "PiecewiseExp": ("piecewise_exp", False),
    "SoftSign": ("soft_sign", False),
    "SuperSpike": ("super_spike", False),
    "Erf": ("erf", False),
    "Rect": ("rect", True),
}


def is_convertible(module: nn.Module) -> bool:
    """True for the neurons :func:`convert` replaces."""
    return isinstance(module, SLIF) or spikingjelly_kind(module) in ("lif", "plif")


def _refuse_if_inexpressible(name: str, module: nn.Module) -> None:
    """Raise for a SpikingJelly neuron whose behaviour an effst neuron cannot reproduce."""
    cls = type(module).__name__
    if spikingjelly_kind(module) == "if":
        raise ValueError(
            f"{name} ({cls}): an integrate-and-fire neuron has no leak (tau = infinity), and effst's "
            "neurons parametrise the decay as 1/tau = sigmoid(w) with a finite tau > 1 (docs/slif.md), "
            "so no effst neuron reproduces it; replace it with a LIFNode first if a leak is wanted")
    if getattr(module, "store_v_seq", False):
        raise ValueError(
            f"{name} ({cls}): store_v_seq=True keeps the membrane potential of every step in "
            ".v_seq, which effst's neurons do not record (they keep the final state only); set "
            "store_v_seq=False on it before converting if nothing reads v_seq")


# --------------------------------------------------------------------------- reading a source
class _Source:
    """A neuron's settings in effst terms: w and theta tensors (scalar or per channel) and the rest."""

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        if isinstance(module, SLIF):
            self.w = module.w.detach().clone()
            self.theta = module.v_threshold.detach().clone()
            self.v_reset = module.v_reset
            self.surrogate, self.alpha = module.surrogate, module.alpha
            self.detach_reset, self.decay_input = module.detach_reset, module.decay_input
            self.step_mode = module.step_mode
            self.backend = module.backend
            self.channels = module.channels
            self.channel_dim = module.channel_dim
            return
        kind = spikingjelly_kind(module)
        reference = next((t for t in list(module.parameters()) + list(module.buffers())
                          if t.is_floating_point()), None)
        # float64 so that nothing is rounded before the target's dtype is known.
        like = dict(dtype=torch.float64,
                    device=reference.device if reference is not None else torch.device("cpu"))
        if kind == "plif":
            self.w = module.w.detach().clone().to(**like).reshape(())
        else:
            tau = module.tau
            tau = float(tau.item()) if isinstance(tau, torch.Tensor) else float(tau)
            self.w = torch.tensor(tau_to_w(tau), **like)
        theta = module.v_threshold
        self.theta = (theta.detach().clone().to(**like) if isinstance(theta, torch.Tensor)
                      else torch.tensor(float(theta), **like))
        if self.theta.numel() != 1:
            raise ValueError(f"{name}: a tensor v_threshold of shape {tuple(self.theta.shape)} is not supported")
        self.theta = self.theta.reshape(())
        v_reset = module.v_reset
        self.v_reset = None if v_reset is None else float(v_reset)
        self.surrogate, self.alpha = _sj_surrogate(name, module.surrogate_function)
        self.detach_reset = bool(module.detach_reset)
        self.decay_input = bool(getattr(module, "decay_input", True))
        mode = getattr(module, "step_mode", None)
        if mode is None:  # 0.0.0.0.x clock_driven: MultiStep* classes are multi-step, others single-step
            mode = "m" if type(module).__name__.startswith("MultiStep") else "s"
        if mode not in ("s", "m"):
            raise ValueError(f"{name}: unknown step_mode {mode!r}")
        self.step_mode = mode
        self.backend = None
        self.channels = None
        self.channel_dim = -1


def _sj_surrogate(name: str, function) -> tuple[str, float]:
    cls = type(function).__name__
    if cls not in _SJ_SURROGATES:
        raise ValueError(f"{name}: surrogate {cls} has no effst equivalent; supported: "
                         f"{sorted(_SJ_SURROGATES)}")
    if not getattr(function, "spiking", True):
        raise ValueError(f"{name}: surrogate {cls} is in non-spiking (primitive) mode; effst neurons always spike")
    effst_name, reciprocal = _SJ_SURROGATES[cls]
    alpha = float(function.alpha)
    return effst_name, (1.0 / alpha if reciprocal else alpha)


def _channels_from_layer(layer: nn.Module) -> Optional[tuple[int, int]]:
    """(channels, channel_dim of the per-step shape) a neuron right after ``layer`` sees."""
    while len(layer._modules) > 0:  # a container: its last leaf runs last
        children = [m for m in layer.children()]
        layer = children[-1]
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return layer.out_channels, 1
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        return layer.num_features, 1
    if isinstance(layer, nn.Linear):
        return layer.out_features, -1
    return None


def _uniform(t: torch.Tensor) -> bool:
    return t.numel() <= 1 or bool((t == t.reshape(-1)[0]).all())


def _build(source: _Source, neuron: str, channels: Optional[tuple[int, int]], backend: str,
           device: torch.device, dtype: torch.dtype) -> SLIF:
    learn_tau, learn_threshold = TARGETS[neuron]
    per_channel = channels is not None
    for value, what in ((source.w, "tau"), (source.theta, "v_threshold")):
        if value.numel() > 1 and not per_channel and not _uniform(value):
            raise ValueError(
                f"{source.name}: its {what} differs across channels but the target neuron "
                f"{neuron!r} (channels={'per channel' if per_channel else 'per layer'}) holds one "
                f"value per layer; convert to 'slif' or 'stl' with channels=True to keep them")
    common = dict(tau=2.0, v_threshold=1.0, v_reset=source.v_reset, surrogate=source.surrogate,
                  alpha=source.alpha, detach_reset=source.detach_reset, decay_input=source.decay_input,
                  backend=backend)
    if not per_channel and neuron == "lif":
        node = LIF(**common)
    elif not per_channel and neuron == "plif":
        node = PLIF(**common)
    else:
        count, dim = channels if per_channel else (None, -1)
        node = SLIF(**common, learn_tau=learn_tau, learn_threshold=learn_threshold, channels=count,
                    channel_dim=dim)
    node.step_mode = source.step_mode
    node = node.to(device=device, dtype=dtype)
    with torch.no_grad():
        for target, value, what in ((node.w, source.w, "tau"), (node.v_threshold, source.theta, "v_threshold")):
            if value.numel() > 1 and target.numel() > 1 and value.numel() != target.numel():
                raise ValueError(f"{source.name}: its per-channel {what} has {value.numel()} entries, "
                                 f"the target has {target.numel()} channels")
            if target.numel() == 1 or value.numel() == 1:  # one value (uniform: checked above)
                value = value.reshape(-1)[0]
            # Copy the source's values exactly (PLIF's w is copied, not re-derived through tau).
            target.copy_(value.to(target.dtype).expand_as(target))
    return node


def _resolve_channels(source: _Source, module: nn.Module, previous: Optional[nn.Module], neuron: str,
                      channels: bool) -> Optional[tuple[int, int]]:
    if source.channels is not None:
        # Already per channel: stays so for a per-channel target; a per-layer target takes
        # the values if they are uniform (_build raises otherwise).
        if neuron in ("slif", "stl") and channels:
            return source.channels, source.channel_dim
        return None
    if not channels or neuron not in ("slif", "stl"):
        return None
    annotated = getattr(module, "effst_channels", None)
    if annotated is not None:
        return int(annotated), int(getattr(module, "effst_channel_dim", -1))
    if previous is not None:
        return _channels_from_layer(previous)
    return None


def convert(model: nn.Module, neuron: str = "slif", channels: bool = True, *,
            backend: Optional[str] = None) -> nn.Module:
    """Replace every LIF-type neuron in ``model`` by an effst neuron, in place.

    Args:
        model: any module; its effst ``LIF``/``PLIF``/``SLIF`` and SpikingJelly
            ``LIFNode``/``ParametricLIFNode``/``MultiStepLIFNode`` neurons are replaced.
            ``IFNode`` or ``store_v_seq=True`` anywhere is a ``ValueError`` naming the module
            (nothing is replaced then).
        neuron: ``'slif'`` (learned tau and V_th), ``'stl'`` (learned V_th), ``'plif'``
            (learned tau, per layer) or ``'lif'`` (fixed, per layer).
        channels: per-channel tau/V_th for ``slif``/``stl`` where the channel count is known
            (see the module docstring); otherwise per-layer scalars.
        backend: sLIF backend of the new neurons; None keeps an effst neuron's backend and
            uses ``'auto'`` for SpikingJelly ones.

    Returns:
        ``model`` (the new neuron itself if ``model`` is a neuron). Outputs are unchanged
        until a training step. A model built by :func:`effst.models.build_model` records the
        new neuron kind, so ``model.spec()`` rebuilds the converted architecture.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if neuron not in TARGETS:
        raise ValueError(f"neuron: expected one of {list(TARGETS)}, got {neuron!r}")
    if not isinstance(channels, bool):
        raise TypeError(f"channels: expected a bool, got {type(channels).__name__}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend: expected None or one of {list(BACKENDS)}, got {backend!r}")

    _refuse_if_inexpressible("model", model)
    if is_convertible(model):
        return _convert_one("model", model, None, neuron, channels, backend, model)

    # Build every replacement first and assign them after, so that a neuron refused half-way
    # through leaves the model as it was.
    replaced: dict[int, nn.Module] = {}
    assignments: list[tuple[nn.Module, str, int]] = []
    for parent_name, parent in list(model.named_modules()):
        children = list(parent._modules.items())
        for index, (child_name, child) in enumerate(children):
            if child is None:
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if id(child) not in replaced:
                if is_spikingjelly_lif_subclass(child):
                    warnings.warn(f"convert: {name} ({type(child).__name__}) subclasses a SpikingJelly neuron "
                                  "and may change its dynamics; left unconverted", stacklevel=2)
                    continue
                _refuse_if_inexpressible(name, child)
                if not is_convertible(child):
                    if is_spiking_neuron(child):
                        warnings.warn(f"convert: {name} ({type(child).__name__}) is not a LIF-type neuron; "
                                      "left unconverted", stacklevel=2)
                    continue
                previous = children[index - 1][1] if index > 0 and isinstance(parent, nn.Sequential) else None
                replaced[id(child)] = _convert_one(name, child, previous, neuron, channels, backend, model)
            assignments.append((parent, child_name, id(child)))
    for parent, child_name, key in assignments:
        setattr(parent, child_name, replaced[key])

    # SpikingJelly caches the resettable modules of a net; the old neurons are gone now.
    try:
        from spikingjelly.activation_based import functional as sj_functional

        invalidate = getattr(sj_functional, "invalidate_reset_cache", None)
        if invalidate is not None:
            invalidate(model)
    except ImportError:
        pass

    # Containers that record their neuron kind (a Spikformer, for its spec()) are told.
    for inner in model.modules():
        hook = getattr(inner, CONVERSION_HOOK, None)
        if callable(hook):
            hook(neuron, channels, backend)
    return model


def _convert_one(name: str, module: nn.Module, previous: Optional[nn.Module], neuron: str, channels: bool,
                 backend: Optional[str], root: nn.Module) -> nn.Module:
    source = _Source(name, module)
    chosen = backend or source.backend or "auto"
    # The new neuron lives where the old one (or else the model) keeps its tensors; its
    # parameters are float64 in a float64 model and float32 otherwise (as effst's neurons).
    reference = next((t for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()),
                     None)
    if reference is None:
        reference = next((t for t in root.parameters() if t.is_floating_point()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = torch.float64 if reference is not None and reference.dtype == torch.float64 else torch.float32
    node = _build(source, neuron, _resolve_channels(source, module, previous, neuron, channels), chosen,
                  device, dtype)
    for attribute in ("effst_channels", "effst_channel_dim"):
        if hasattr(module, attribute):
            setattr(node, attribute, getattr(module, attribute))
    # The membrane state carries over too, so converting between two calls of a sequence
    # (without a reset) continues it unchanged.
    state = getattr(module, "v", None)
    if isinstance(state, torch.Tensor):
        node.v = state
    elif isinstance(state, (int, float)) and not isinstance(state, bool):
        node.v = float(state)
    node.train(module.training)
    return node


class _CallableModule(types.ModuleType):
    """``effst.convert`` names both this module and its function: importing the module (as
    ``from effst.convert import ...`` does) rebinds the package attribute to the module, so the
    module forwards calls to :func:`convert` and ``effst.convert(model)`` works either way."""

    def __call__(self, model: nn.Module, neuron: str = "slif", channels: bool = True, *,
                 backend: Optional[str] = None) -> nn.Module:
        return convert(model, neuron, channels, backend=backend)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["convert", "is_spiking_neuron", "is_convertible", "TARGETS"]
