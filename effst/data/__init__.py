"""Datasets for the training pipeline, all without torchvision or a download.

* ``digits``      — scikit-learn's bundled 8x8 handwritten digits (real data, offline): the
                    embedded default of ``effst pipeline``.
* ``cifar10``     — CIFAR-10 from a local directory in its standard python-pickle format
                    (``cifar-10-batches-py``), random crop (pad 4) and horizontal flip.
* ``cifar10-dvs`` — CIFAR10-DVS from a local directory as T-frame tensors through SpikingJelly's
                    ``CIFAR10DVS`` dataset class (TEBN split: samples 0-99 of each class test).
* ``synthetic``   — class prototypes plus noise, made from a seed: for tests.

One module per dataset; every dataset gives a :class:`DataSplit` per split
(:mod:`effst.data.splits`), and :func:`batches` iterates one epoch of it in an order fixed by
``(seed, epoch)``, with augmentation (:mod:`effst.data.augment`) seeded per batch, so an
interrupted epoch can be resumed at any step and gives the same batches.
"""
from __future__ import annotations

import os
from typing import Optional

from effst.data.augment import crop_flip_augment, random_crop, random_flip, shift_augment
from effst.data.cifar10 import CIFAR10_FILES_TEST, CIFAR10_FILES_TRAIN, CIFAR10_MEAN, CIFAR10_STD, load_cifar10
from effst.data.cifar10_dvs import CIFAR10DVS_CLASSES, load_cifar10_dvs
from effst.data.digits import load_digits
from effst.data.splits import (
    DatasetInfo, DatasetNotFoundError, DataSplit, batches, default_root, epoch_order, num_batches,
)
from effst.data.synthetic import make_synthetic

DATASET_NAMES: tuple[str, ...] = ("digits", "cifar10", "cifar10-dvs", "synthetic")


def load_dataset(
    name: str,
    root: Optional[str | os.PathLike] = None,
    *,
    frames: Optional[int] = None,
    synthetic: Optional[dict] = None,
) -> tuple[DataSplit, DataSplit, DatasetInfo]:
    """Return ``(train, test, info)`` for a dataset name in :data:`DATASET_NAMES`.

    ``root`` is the directory holding the files (CIFAR-10, CIFAR10-DVS); ``frames`` the number
    of frames T CIFAR10-DVS events are integrated into (default 16); ``synthetic`` options of the
    synthetic set (``num_train``, ``num_test``, ``num_classes``, ``in_channels``, ``image_size``,
    ``seed``, ``noise``).
    """
    if not isinstance(name, str) or name not in DATASET_NAMES:
        raise ValueError(f"dataset: expected one of {list(DATASET_NAMES)}, got {name!r}")
    if name == "digits":
        return load_digits()
    if name == "synthetic":
        return make_synthetic(**(synthetic or {}))
    if name == "cifar10":
        return load_cifar10(root if root is not None else default_root("cifar10"))
    return load_cifar10_dvs(root if root is not None else default_root("cifar10-dvs"), frames=16 if frames is None else frames)


__all__ = [
    "CIFAR10DVS_CLASSES",
    "CIFAR10_FILES_TEST",
    "CIFAR10_FILES_TRAIN",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATASET_NAMES",
    "DataSplit",
    "DatasetInfo",
    "DatasetNotFoundError",
    "batches",
    "crop_flip_augment",
    "default_root",
    "epoch_order",
    "load_cifar10",
    "load_cifar10_dvs",
    "load_dataset",
    "load_digits",
    "make_synthetic",
    "num_batches",
    "random_crop",
    "random_flip",
    "shift_augment",
]
