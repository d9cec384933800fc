"""``cifar10-dvs``: CIFAR10-DVS from a local directory as T-frame tensors through SpikingJelly's
``CIFAR10DVS`` dataset class (TEBN split: samples 0-99 of each class test)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from effst.data.augment import random_flip
from effst.data.splits import DatasetInfo, DatasetNotFoundError, DataSplit

CIFAR10DVS_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


def load_cifar10_dvs(root: str | os.PathLike, frames: int = 16) -> tuple[DataSplit, DataSplit, DatasetInfo]:
    """CIFAR10-DVS integrated into ``frames`` frames (split by event number) by SpikingJelly.

    ``root`` must hold what SpikingJelly's ``CIFAR10DVS`` reads: ``events_np/<class>/*.npz``
    (already converted), or ``download/<class>.zip`` (the 10 archives, converted on first use).
    Samples ``0..n/10-1`` of each class are the test set (the TEBN split when all 1000 are there).
    """
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames: expected an int >= 1 (T of the DVS frames), got {frames!r}")
    root = Path(root)
    has_events = (root / "events_np").is_dir()
    has_zips = all((root / "download" / f"{c}.zip").is_file() for c in CIFAR10DVS_CLASSES)
    if not (has_events or has_zips):
        raise DatasetNotFoundError(
            f"CIFAR10-DVS not found under {root}. Download the ten class archives (airplane.zip ... truck.zip) "
            f"from https://figshare.com/articles/dataset/CIFAR10-DVS_New/4724671 into {root / 'download'} "
            f"(SpikingJelly converts them to {root / 'events_np'} on first use), or pass --data-dir DIR."
        )
    try:
        from spikingjelly.datasets.cifar10_dvs import CIFAR10DVS
    except Exception as exc:  # ImportError, or a torchvision built for another torch failing to load
        raise ImportError(
            "CIFAR10-DVS is read through spikingjelly.datasets, which needs spikingjelly==2.0.0 plus torchvision and "
            "torchaudio built for your torch, and h5py; import failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    full = CIFAR10DVS(str(root), data_type="frame", frames_number=frames, split_by="number")
    labels = torch.as_tensor([int(t) for _, t in full.samples], dtype=torch.int64)
    # Position of each file within its class, by the sample number in its name.
    position = torch.as_tensor([_sample_number(p) for p, _ in full.samples], dtype=torch.int64)
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        order = members[position[members].argsort()]
        is_test[order[: max(1, len(order) // 10)]] = True
    idx_train, idx_test = (~is_test).nonzero().flatten(), is_test.nonzero().flatten()
    subset = torch.utils.data.Subset
    train = DataSplit("cifar10-dvs/train", labels[idx_train], source=subset(full, idx_train.tolist()), augment=_flip_only)
    test = DataSplit("cifar10-dvs/test", labels[idx_test], source=subset(full, idx_test.tolist()))
    return train, test, DatasetInfo("cifar10-dvs", 2, 128, 10, frames, "spikformer-2-256")


def _flip_only(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return random_flip(x, gen)


def _sample_number(path: str) -> int:
    stem = Path(path).stem
    digits = stem.rsplit("_", 1)[-1]
    return int(digits) if digits.isdigit() else 0
