"""effst: fused kernels for efficient spiking transformers (sLIF, block-sparse linear, L1P/DSP).

``import effst`` is cheap: the subpackages (and torch/Triton behind them) load on first use of
``effst.slif``, ``effst.convert``, ``effst.nn``, ``effst.models``, ``effst.prune`` and the rest
(PEP 562 module ``__getattr__``), so ``effst --help`` and ``effst --version`` answer at once.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> (module that defines it, attribute in that module or None for the module).
_LAZY: dict[str, tuple[str, str | None]] = {
    "slif": ("effst.ops.slif", "slif"),
    "SpikeBytes": ("effst.ops.spike_bytes", "SpikeBytes"),  # what slif returns for byte spikes in training
    "as_spike_bytes": ("effst.ops.spike_bytes", "as_spike_bytes"),
    "convert": ("effst.convert", "convert"),
    "models": ("effst.models", None),
    "nn": ("effst.nn", None),
    "ops": ("effst.ops", None),
    "prune": ("effst.prune", None),
    "train": ("effst.train", None),
    "data": ("effst.data", None),
    "benchmarks": ("effst.benchmarks", None),
    "cli": ("effst.cli", None),
}

__all__ = ["slif", "SpikeBytes", "as_spike_bytes", "convert", "models", "nn", "prune", "__version__"]

if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from effst import models, nn, prune  # noqa: F401
    from effst.convert import convert  # noqa: F401
    from effst.ops.slif import slif  # noqa: F401
    from effst.ops.spike_bytes import SpikeBytes, as_spike_bytes  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'effst' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    value = importlib.import_module(module_name)
    if attribute is not None:
        value = getattr(value, attribute)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    dunders = {name for name in globals() if name.startswith("__")}
    return sorted(dunders | set(__all__) | set(_LAZY))
