"""``digits``: scikit-learn's bundled 8x8 handwritten digits (real data, offline), the embedded
default of ``effst pipeline``."""
from __future__ import annotations

import numpy as np
import torch

from effst.data.augment import shift_augment
from effst.data.optional import require
from effst.data.splits import DatasetInfo, DataSplit


def load_digits(test_fraction: float = 0.2) -> tuple[DataSplit, DataSplit, DatasetInfo]:
    """scikit-learn's 1797 8x8 digits, pixel values 0..16, split per class with a fixed seed.

    The split does not depend on the run's seed, so every seed is tested on the same images.
    """
    sklearn_datasets = require("sklearn.datasets", "the digits dataset")
    train_test_split = require("sklearn.model_selection", "the digits dataset").train_test_split

    bunch = sklearn_datasets.load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1)  # [n, 1, 8, 8]
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=0, stratify=bunch.target
    )
    idx_train, idx_test = torch.as_tensor(np.sort(idx_train)), torch.as_tensor(np.sort(idx_test))
    train = DataSplit("digits/train", labels[idx_train], images[idx_train], scale=16.0, augment=shift_augment(1))
    test = DataSplit("digits/test", labels[idx_test], images[idx_test], scale=16.0)
    return train, test, DatasetInfo("digits", 1, 8, 10, None, "spikformer-tiny")
