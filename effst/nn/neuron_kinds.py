"""What kind of spiking neuron a module is: effst's own, or one of SpikingJelly's classes.

Both :mod:`effst.models` (which lists a model's neurons) and :mod:`effst.convert` (which
replaces them) need this, so it lives here, below both. SpikingJelly is recognised by class
name and package, never imported: it is an optional dependency.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from effst.nn.neurons import SLIF

#: SpikingJelly LIF-type classes (2.0.0 ``activation_based``; 0.0.0.0.x ``clock_driven`` and
#: ``activation_based``), by the effst kind whose dynamics they have.
SPIKINGJELLY_LIF_CLASSES = ("LIFNode", "MultiStepLIFNode")
SPIKINGJELLY_PLIF_CLASSES = ("ParametricLIFNode", "MultiStepParametricLIFNode")
#: SpikingJelly integrate-and-fire classes: no leak (tau = infinity), H_t = V_{t-1} + X_t.
SPIKINGJELLY_IF_CLASSES = ("IFNode", "MultiStepIFNode")

#: Name of the method a container defines to be told that :func:`effst.convert` changed the
#: kind of its neurons: ``on_neurons_converted(neuron: str, channels: bool, backend)``.
CONVERSION_HOOK = "on_neurons_converted"


def is_spikingjelly_class(cls: type) -> bool:
    """True for a class defined in the ``spikingjelly`` package."""
    return cls.__module__.split(".")[0] == "spikingjelly"


def spikingjelly_kind(module: nn.Module) -> Optional[str]:
    """``'lif'``, ``'plif'`` or ``'if'`` for a SpikingJelly node of exactly one of the known
    classes; None for anything else (a subclass included: it may change the dynamics)."""
    cls = type(module)
    if not is_spikingjelly_class(cls):
        return None
    for kind, names in (("lif", SPIKINGJELLY_LIF_CLASSES), ("plif", SPIKINGJELLY_PLIF_CLASSES),
                        ("if", SPIKINGJELLY_IF_CLASSES)):
        if cls.__name__ in names:
            return kind
    return None


def is_spikingjelly_lif_subclass(module: nn.Module) -> bool:
    """True for a user class derived from a SpikingJelly LIF/PLIF/IF node (not one itself)."""
    known = SPIKINGJELLY_LIF_CLASSES + SPIKINGJELLY_PLIF_CLASSES + SPIKINGJELLY_IF_CLASSES
    return spikingjelly_kind(module) is None and any(
        is_spikingjelly_class(c) and c.__name__ in known for c in type(module).__mro__[1:])


def is_spiking_neuron(module: nn.Module) -> bool:
    """True for effst neurons and any SpikingJelly neuron (a subclass of its ``BaseNode``)."""
    if isinstance(module, SLIF):
        return True
    return any(is_spikingjelly_class(c) and c.__name__ == "BaseNode" for c in type(module).__mro__)


__all__ = [
    "SPIKINGJELLY_LIF_CLASSES", "SPIKINGJELLY_PLIF_CLASSES", "SPIKINGJELLY_IF_CLASSES", "CONVERSION_HOOK",
    "is_spikingjelly_class", "spikingjelly_kind", "is_spikingjelly_lif_subclass", "is_spiking_neuron",
]
