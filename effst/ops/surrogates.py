"""Surrogate gradients of the Heaviside spike function: the one definition everyone imports.

Each surrogate is a name, a default alpha and a derivative sigma'(x) of the spike with
respect to ``x = H - theta`` (docs/slif.md). The integer id of a surrogate is its position
in :data:`SURROGATE_NAMES`; the Triton kernels (``surrogate_grad_triton`` below) and the
native header (``kernels/slif_recurrence.cuh``) switch on that id, and the tests check every
implementation against :func:`surrogate_grad` here.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

# Order matters: the position is the id used by every kernel.
SURROGATE_NAMES: tuple[str, ...] = (
    "sigmoid",
    "atan",
    "piecewise_quadratic",
    "piecewise_exp",
    "soft_sign",
    "super_spike",
    "erf",
    "rect",
)

DEFAULT_ALPHA: dict[str, float] = {
    "sigmoid": 4.0,
    "atan": 2.0,
    "piecewise_quadratic": 1.0,
    "piecewise_exp": 1.0,
    "soft_sign": 2.0,
    "super_spike": 1.0,
    "erf": 2.0,
    "rect": 1.0,
}


def resolve_surrogate(surrogate: str, alpha: Optional[float]) -> tuple[int, float]:
    """Validate a surrogate name and alpha; return ``(surrogate_id, alpha)``."""
    if not isinstance(surrogate, str) or surrogate not in DEFAULT_ALPHA:
        raise ValueError(
            f"surrogate: expected one of {list(SURROGATE_NAMES)}, got {surrogate!r}"
        )
    if alpha is None:
        alpha = DEFAULT_ALPHA[surrogate]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha: expected a positive float or None, got {type(alpha).__name__}")
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha <= 0.0:
        raise ValueError(f"alpha: expected a finite value > 0, got {alpha}")
    return SURROGATE_NAMES.index(surrogate), alpha


def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        what = f"dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x: expected a floating-point tensor, got {what}")


def surrogate_grad(x: torch.Tensor, surrogate: str, alpha: Optional[float] = None) -> torch.Tensor:
    """sigma'(x): derivative of the spike w.r.t. ``x = H - theta`` (torch, any float dtype);
    ``alpha`` None = the surrogate's default."""
    _check_input(x)
    _, alpha = resolve_surrogate(surrogate, alpha)
    return _surrogate_grad(x, surrogate, alpha)


def _surrogate_grad(x: torch.Tensor, surrogate: str, alpha: float) -> torch.Tensor:
    """:func:`surrogate_grad` without validation (the autograd backward calls it every step)."""
    if surrogate == "sigmoid":
        s = torch.sigmoid(alpha * x)
        return alpha * s * (1.0 - s)
    if surrogate == "atan":
        return (alpha / 2.0) / (1.0 + (math.pi / 2.0 * alpha * x) ** 2)
    if surrogate == "piecewise_quadratic":
        return torch.clamp(alpha - alpha * alpha * x.abs(), min=0.0)
    if surrogate == "piecewise_exp":
        return (alpha / 2.0) * torch.exp(-alpha * x.abs())
    if surrogate == "soft_sign":
        return 1.0 / (2.0 * alpha * (1.0 / alpha + x.abs()) ** 2)
    if surrogate == "super_spike":
        return alpha / (1.0 + x.abs()) ** 2
    if surrogate == "erf":
        return (alpha / math.sqrt(math.pi)) * torch.exp(-((alpha * x) ** 2))
    if surrogate == "rect":
        return (x.abs() < alpha / 2.0).to(x.dtype) / alpha
    raise ValueError(f"surrogate: expected one of {list(SURROGATE_NAMES)}, got {surrogate!r}")


class SpikeFunction(torch.autograd.Function):
    """Heaviside forward (spike when ``x >= 0``), surrogate derivative backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, surrogate: str, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.surrogate = surrogate
        ctx.alpha = alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_spike: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad_spike * _surrogate_grad(x, ctx.surrogate, ctx.alpha), None, None


def spike(x: torch.Tensor, surrogate: str = "atan", alpha: Optional[float] = None) -> torch.Tensor:
    """Heaviside spike of ``x`` with the named surrogate gradient (autograd-aware)."""
    _check_input(x)
    _, alpha = resolve_surrogate(surrogate, alpha)
    return SpikeFunction.apply(x, surrogate, alpha)


@triton.jit
def surrogate_grad_triton(x, alpha, SURROGATE: tl.constexpr):
    """sigma'(x) inside Triton kernels; ``SURROGATE`` is the id in SURROGATE_NAMES."""
    if SURROGATE == 0:  # sigmoid
        s = tl.sigmoid(alpha * x)
        g = alpha * s * (1.0 - s)
    elif SURROGATE == 1:  # atan
        u = 1.5707963267948966 * alpha * x
        g = (alpha * 0.5) / (1.0 + u * u)
    elif SURROGATE == 2:  # piecewise_quadratic
        g = tl.maximum(alpha - alpha * alpha * tl.abs(x), 0.0)
    elif SURROGATE == 3:  # piecewise_exp
        g = (alpha * 0.5) * tl.exp(-alpha * tl.abs(x))
    elif SURROGATE == 4:  # soft_sign
        d = 1.0 / alpha + tl.abs(x)
        g = 1.0 / (2.0 * alpha * d * d)
    elif SURROGATE == 5:  # super_spike
        d = 1.0 + tl.abs(x)
        g = alpha / (d * d)
    elif SURROGATE == 6:  # erf
        ax = alpha * x
        g = (alpha * 0.5641895835477563) * tl.exp(-(ax * ax))
    else:  # rect
        g = tl.where(tl.abs(x) < alpha * 0.5, 1.0 / alpha, 0.0)
    return g
