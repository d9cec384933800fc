"""How tau is parametrised: the one place that says ``1/tau = sigmoid(w)`` (PLIF convention).

Keeping tau > 1 by construction means a learned tau can never make the membrane explode.
"""
from __future__ import annotations

import math
from typing import Union

import torch

Number = Union[int, float]


def check_tau(tau: Number, name: str = "tau") -> float:
    """Validate a membrane time constant given as a number: finite and > 1."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"{name}: expected a float > 1, got {type(tau).__name__}")
    tau = float(tau)
    if not math.isfinite(tau) or tau <= 1.0:
        raise ValueError(f"{name}: expected a finite value > 1 (decay 1/tau must lie in (0, 1)), got {tau}")
    return tau


def tau_to_w(tau: Union[Number, torch.Tensor]) -> Union[float, torch.Tensor]:
    """Decay logit ``w`` with ``sigmoid(w) = 1/tau``: ``w = -log(tau - 1)``.

    ``tau`` is a number or a floating-point tensor, every value finite and > 1 (an infinite tau,
    a neuron without leak, has no finite ``w``)."""
    if isinstance(tau, torch.Tensor):
        if not tau.is_floating_point():
            raise TypeError(f"tau: expected a floating-point tensor, got dtype {tau.dtype}")
        if not bool((torch.isfinite(tau) & (tau > 1)).all()):
            raise ValueError("tau: expected every value finite and > 1 (decay 1/tau in (0, 1))")
        return -torch.log(tau - 1.0)
    return -math.log(check_tau(tau) - 1.0)


def _check_w(w: torch.Tensor) -> torch.Tensor:
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        what = f"dtype {w.dtype}" if isinstance(w, torch.Tensor) else type(w).__name__
        raise TypeError(f"w: expected a floating-point tensor (the decay logit), got {what}")
    return w


def w_to_decay(w: torch.Tensor) -> torch.Tensor:
    """Decay ``k = 1/tau = sigmoid(w)`` of a floating-point tensor ``w``."""
    return torch.sigmoid(_check_w(w))


def w_to_tau(w: torch.Tensor) -> torch.Tensor:
    """Membrane time constant ``tau = 1/sigmoid(w) = 1 + exp(-w)`` of a floating-point tensor ``w``."""
    return 1.0 + torch.exp(-_check_w(w))
