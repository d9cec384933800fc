"""``synthetic``: class prototypes plus Gaussian noise, made from a seed (for tests)."""
from __future__ import annotations

import math

import torch

from effst.data.splits import DatasetInfo, DataSplit


def make_synthetic(
    num_train: int = 256,
    num_test: int = 128,
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 8,
    seed: int = 0,
    noise: float = 0.5,
) -> tuple[DataSplit, DataSplit, DatasetInfo]:
    """Learnable random data: one random prototype image per class plus Gaussian noise."""
    for key, value, low in (("num_train", num_train, 1), ("num_test", num_test, 1), ("num_classes", num_classes, 2),
                            ("in_channels", in_channels, 1), ("image_size", image_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"synthetic.{key}: expected an int >= {low}, got {value!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise ValueError(f"synthetic.noise: expected a finite number >= 0, got {noise!r}")  # NaN made NaN images
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"synthetic.seed: expected an int, got {seed!r}")
    gen = torch.Generator().manual_seed(int(seed))
    prototypes = torch.rand(num_classes, in_channels, image_size, image_size, generator=gen)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=gen)]
        x = prototypes[labels] + float(noise) * torch.randn(n, in_channels, image_size, image_size, generator=gen)
        return x, labels

    x_train, y_train = draw(num_train)
    x_test, y_test = draw(num_test)
    info = DatasetInfo("synthetic", in_channels, image_size, num_classes, None, "spikformer-tiny")
    return DataSplit("synthetic/train", y_train, x_train), DataSplit("synthetic/test", y_test, x_test), info
