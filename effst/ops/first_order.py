"""Backwards that are first-order only: their kernels have no derivative of their own.

Without a mark, ``create_graph=True`` through such a backward would silently treat its outputs
as constants (a wrong second derivative). ``torch.autograd.function.once_differentiable`` marks
them so that differentiating twice raises, but costs 1-2 µs on every backward; this applies it
only when a graph is being created (grad mode is on inside a backward only then).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch.autograd.function import once_differentiable


def first_order_only(backward: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate an ``autograd.Function.backward`` (below ``@staticmethod``)."""
    marked = once_differentiable(backward)

    @functools.wraps(backward)
    def dispatch(ctx: Any, *grads: Any) -> Any:
        if torch.is_grad_enabled():  # create_graph=True
            return marked(ctx, *grads)
        return backward(ctx, *grads)

    return dispatch
