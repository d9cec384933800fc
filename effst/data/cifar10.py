"""``cifar10``: CIFAR-10 from a local directory in its python-pickle format
(``cifar-10-batches-py``), random crop (pad 4) and horizontal flip."""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from effst.data.augment import crop_flip_augment
from effst.data.splits import DatasetInfo, DatasetNotFoundError, DataSplit

# Per-channel statistics of the CIFAR-10 training set (0-1 pixel scale).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_FILES_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_FILES_TEST = ("test_batch",)


def _cifar10_dir(root: Path) -> Path:
    """The directory holding the pickle batches: ``root`` itself or ``root/cifar-10-batches-py``."""
    for candidate in (root, root / "cifar-10-batches-py"):
        if all((candidate / f).is_file() for f in CIFAR10_FILES_TRAIN + CIFAR10_FILES_TEST):
            return candidate
    missing = [f for f in CIFAR10_FILES_TRAIN + CIFAR10_FILES_TEST if not (root / f).is_file()
               and not (root / "cifar-10-batches-py" / f).is_file()]
    raise DatasetNotFoundError(
        f"CIFAR-10 not found under {root} (missing {', '.join(missing)}). Download the python version "
        f"'cifar-10-python.tar.gz' from https://www.cs.toronto.edu/~kriz/cifar.html and extract it there "
        f"(tar xzf cifar-10-python.tar.gz -C {root}) so that {root / 'cifar-10-batches-py' / 'data_batch_1'} "
        f"exists, or pass --data-dir DIR (or set EFFST_DATA)."
    )


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as exc:  # a truncated or foreign file: say which one
        raise ValueError(f"CIFAR-10 batch {path} is not a valid python-pickle CIFAR-10 batch: {exc}") from exc
    if len(data) != len(labels):
        raise ValueError(f"CIFAR-10 batch {path}: {len(data)} images but {len(labels)} labels")
    return data, labels


def load_cifar10(root: str | os.PathLike) -> tuple[DataSplit, DataSplit, DatasetInfo]:
    """CIFAR-10 from its python-pickle batches (uint8 kept in memory, normalised per batch)."""
    directory = _cifar10_dir(Path(root))

    def read(files: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [_read_cifar_batch(directory / f) for f in files]
        return torch.from_numpy(np.concatenate([p[0] for p in parts])), torch.from_numpy(np.concatenate([p[1] for p in parts]))

    x_train, y_train = read(CIFAR10_FILES_TRAIN)
    x_test, y_test = read(CIFAR10_FILES_TEST)
    norm = dict(mean=CIFAR10_MEAN, std=CIFAR10_STD, scale=255.0)
    train = DataSplit("cifar10/train", y_train, x_train, augment=crop_flip_augment(4), **norm)
    test = DataSplit("cifar10/test", y_test, x_test, **norm)
    return train, test, DatasetInfo("cifar10", 3, 32, 10, None, "spikformer-4-384")
