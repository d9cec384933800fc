"""Training-time augmentation of image batches, seeded by a generator (reproducible per batch)."""
from __future__ import annotations

from typing import Callable

import torch


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random crop of ``x`` [B, ..., H, W] after zero-padding by ``padding``."""
    if padding == 0:
        return x
    b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])  # [B, H]
    cols = (dx[:, None] + torch.arange(w)[None, :])  # [B, W]
    lead = padded.shape[1:-2]
    flat = padded.reshape(b, -1, padded.shape[-2], padded.shape[-1])
    bi = torch.arange(b)[:, None, None]
    out = flat.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # [B, H, W, L]
    return out.permute(0, 3, 1, 2).reshape(b, *lead, h, w)


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Flip each sample of ``x`` [B, ..., H, W] left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    return torch.where(flip.view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)


def crop_flip_augment(padding: int) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """CIFAR augmentation: random crop with ``padding`` then random horizontal flip."""

    def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return random_flip(random_crop(x, padding, gen), gen)

    return augment


def shift_augment(max_shift: int) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """Random translation by up to ``max_shift`` pixels (zero fill): a pad-and-crop."""

    def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return random_crop(x, max_shift, gen)

    return augment
