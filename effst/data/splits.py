"""Splits and batches: a :class:`DataSplit` per split, and :func:`batches` over one epoch of it.

The order of an epoch is a function of ``(seed, epoch)`` and augmentation is seeded per batch,
so an interrupted epoch can be resumed at any step and gives the same batches.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where they were looked for; the message says where to put them."""


@dataclass
class DataSplit:
    """One split of a dataset.

    In-memory datasets keep ``images`` (uint8 or float, [n, C, H, W] or [n, T, C, H, W]) and
    ``labels``; file-backed ones (CIFAR10-DVS) keep a ``source`` dataset read per sample.
    ``augment`` (train splits only) maps a float batch and a generator to an augmented batch.
    """

    name: str
    labels: torch.Tensor
    images: Optional[torch.Tensor] = None
    source: Optional[torch.utils.data.Dataset] = None
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None
    scale: float = 1.0
    augment: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = None

    def __len__(self) -> int:
        return int(self.labels.numel())

    def fetch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images and int64 labels of the samples at ``index`` (no augmentation)."""
        if self.images is not None:
            x = self.images[index].to(torch.float32)
        else:
            x = torch.stack([torch.as_tensor(np.asarray(self.source[int(i)][0]), dtype=torch.float32) for i in index])
        return x, self.labels[index]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Scale to [0, 1] (``scale``) and standardise per channel when mean/std are set."""
        if self.scale != 1.0:
            x = x / self.scale
        if self.mean is not None:
            shape = [1] * x.dim()
            shape[-3] = -1
            mean = torch.tensor(self.mean, dtype=x.dtype).view(shape)
            std = torch.tensor(self.std, dtype=x.dtype).view(shape)
            x = (x - mean) / std
        return x


@dataclass
class DatasetInfo:
    """Shapes and defaults that follow from the dataset."""

    name: str
    in_channels: int
    image_size: int
    num_classes: int
    frames: Optional[int]  # T of the input itself for frame data, None for static images
    model: str  # the effst.models config the paper uses on it
    extra: dict = field(default_factory=dict)


def default_root(name: str) -> Path:
    """Where a dataset is looked for when no ``--data-dir`` is given: ``$EFFST_DATA/<name>``."""
    base = Path(os.environ.get("EFFST_DATA", Path.home() / ".cache" / "effst" / "data"))
    return base / name


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """Sample order of one epoch, a function of ``(seed, epoch)`` only."""
    if not shuffle:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
    return torch.randperm(n, generator=gen)


def num_batches(n: int, batch_size: int, world_size: int = 1, drop_last: bool = True) -> int:
    """Batches per epoch and rank (training drops the last incomplete batch)."""
    per_rank = n // world_size if drop_last else -(-n // world_size)
    return per_rank // batch_size if drop_last else -(-per_rank // batch_size)


def batches(
    split: DataSplit,
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    train: bool = True,
    rank: int = 0,
    world_size: int = 1,
    start: int = 0,
    num_workers: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Iterate one epoch of ``split`` as normalised ``(x, y)`` batches.

    Training shuffles (order from ``(seed, epoch)``), drops the last incomplete batch so every
    rank runs the same number of steps, and augments with a generator seeded by
    ``(seed, epoch, batch index)``; ``start`` skips the first batches (mid-epoch resume).
    Evaluation keeps the order and every sample; rank r takes samples r, r + world_size, ...
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    n = len(split)
    order = epoch_order(n, seed, epoch, shuffle=train)
    if train:
        order = order[: (n // world_size) * world_size]
    order = order[rank::world_size]
    count = num_batches(n, batch_size, world_size, drop_last=train)
    index_batches = [order[i * batch_size:(i + 1) * batch_size] for i in range(start, count)]

    def finish(i: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if train and split.augment is not None:
            gen = torch.Generator().manual_seed((int(seed) * 100_003 + int(epoch)) * 1_000_003 + start + i)
            x = split.augment(x, gen)
        return split.normalize(x), y

    if split.source is None or num_workers == 0:
        for i, idx in enumerate(index_batches):
            x, y = split.fetch(idx)
            yield finish(i, x, y)
        return
    loader = torch.utils.data.DataLoader(
        _Batched(split), batch_size=None, sampler=index_batches, num_workers=num_workers, persistent_workers=False
    )
    for i, (x, y) in enumerate(loader):
        yield finish(i, x, y)


class _Batched(torch.utils.data.Dataset):
    """Reads a whole batch of a file-backed split in a DataLoader worker."""

    def __init__(self, split: DataSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split.fetch(index)
