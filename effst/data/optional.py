"""Optional dependencies of training, data and plotting: one clear message when one is missing.

They are the ``effst[train]`` extra (scikit-learn, matplotlib, tqdm, tensorboard, PyYAML); the
kernels and layers need none of them.
"""
from __future__ import annotations

import importlib
from types import ModuleType

INSTALL_HINT = "pip install 'effst[train]'"


class MissingDependencyError(ImportError):
    """An optional package is not installed; the message says which and how to install it."""


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming it, ``purpose`` and the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = {"sklearn": "scikit-learn", "yaml": "PyYAML"}.get(module.split(".")[0], module.split(".")[0])
        raise MissingDependencyError(f"{package} is needed for {purpose} but is not installed: {INSTALL_HINT}") from error
