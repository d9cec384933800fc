"""Datasets for the training pipeline, all without torchvision or a download.

* ``digits``      — scikit-learn's bundled 8x8 handwritten digits (real data, offline): the
                    embedded default of ``effst pipeline``.
* ``cifar10``     — CIFAR-10 from a local directory in its standard python-pickle format
                    (``cifar-10-batches-py``), random crop (pad 4) and horizontal flip.
* ``cifar10-dvs`` — CIFAR10-DVS from a local directory as T-frame tensors through SpikingJelly's
                    ``CIFAR10DVS`` dataset class (TEBN split: samples 0-99 of each class test).
* ``synthetic``   — class prototypes plus noise, made from a seed: for tests.

Every dataset gives a :class:`DataSplit` per split; :func:`batches` iterates one epoch of it in
an order fixed by ``(seed, epoch)``, with augmentation seeded per batch, so an interrupted epoch
can be resumed at any step and gives the same batches.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

DATASET_NAMES: tuple[str, ...] = ("digits", "cifar10", "cifar10-dvs", "synthetic")

# Per-channel statistics of the CIFAR-10 training set (0-1 pixel scale).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_FILES_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_FILES_TEST = ("test_batch",)
CIFAR10DVS_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


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


# ----------------------------------------------------------------------------- digits
def load_digits(test_fraction: float = 0.2) -> tuple[DataSplit, DataSplit, DatasetInfo]:
    """scikit-learn's 1797 8x8 digits, pixel values 0..16, split per class with a fixed seed.

    The split does not depend on the run's seed, so every seed is tested on the same images.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1)  # [n, 1, 8, 8]
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=0, stratify=bunch.target
    )
    idx_train, idx_test = torch.as_tensor(np.sort(idx_train)), torch.as_tensor(np.sort(idx_test))
    train = DataSplit("digits/train", labels[idx_train], images[idx_train], scale=16.0, augment=shift_augment(1))
    test = DataSplit("digits/test", labels[idx_test], images[idx_test], scale=16.0)
    return train, test, DatasetInfo("digits", 1, 8, 10, None, "spikformer-tiny")


def shift_augment(max_shift: int) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """Random translation by up to ``max_shift`` pixels (zero fill): a pad-and-crop."""

    def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return random_crop(x, max_shift, gen)

    return augment


# ----------------------------------------------------------------------------- synthetic
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


# ----------------------------------------------------------------------------- CIFAR-10
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


# ----------------------------------------------------------------------------- CIFAR10-DVS
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


# ----------------------------------------------------------------------------- batching
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


__all__ = [
    "DATASET_NAMES",
    "DataSplit",
    "DatasetInfo",
    "DatasetNotFoundError",
    "batches",
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
]
