"""Datasets of the training pipeline: digits, CIFAR-10 pickles, CIFAR10-DVS, synthetic; batching."""
from __future__ import annotations

import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from effst.data import (
    CIFAR10_MEAN, CIFAR10_STD, DatasetNotFoundError, batches, load_cifar10, load_cifar10_dvs, load_dataset,
    make_synthetic, num_batches, random_crop, random_flip,
)


def test_digits_is_the_real_sklearn_set_split_per_class():
    from sklearn.datasets import load_digits

    train, test, info = load_dataset("digits")
    assert (info.in_channels, info.image_size, info.num_classes, info.model) == (1, 8, 10, "spikformer-tiny")
    assert len(train) + len(test) == 1797 and len(test) == 360
    ref = load_digits()
    # Every image of both splits is one of sklearn's, with its label, and none is in both.
    ref_images = torch.as_tensor(ref.images, dtype=torch.float32)
    lookup = {tuple(img.flatten().tolist()): int(t) for img, t in zip(ref_images, ref.target)}
    for split in (train, test):
        for img, label in zip(split.images, split.labels):
            assert lookup[tuple(img.flatten().tolist())] == int(label)
    assert torch.bincount(test.labels, minlength=10).min() >= 35  # stratified: 10 % of each class
    # Same split every call (does not depend on a run's seed).
    train2, test2, _ = load_dataset("digits")
    assert torch.equal(test.labels, test2.labels) and torch.equal(test.images, test2.images)


def test_digits_batches_are_scaled_and_augmentation_only_in_training():
    train, test, _ = load_dataset("digits")
    x, y = next(batches(test, 50, train=False))
    assert x.shape == (50, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, test.images[:50] / 16.0)  # evaluation: in order, no augmentation
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_epoch_order_depends_on_seed_and_epoch_and_start_resumes_mid_epoch():
    train, _, _ = make_synthetic(num_train=100, num_test=10)
    full = list(batches(train, 16, seed=3, epoch=2))
    assert len(full) == num_batches(100, 16) == 6  # last incomplete batch dropped
    again = list(batches(train, 16, seed=3, epoch=2))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full, again))
    other = list(batches(train, 16, seed=3, epoch=3))
    assert not torch.equal(full[0][1], other[0][1])
    tail = list(batches(train, 16, seed=3, epoch=2, start=4))
    assert len(tail) == 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[4:], tail))


def test_ranks_split_training_and_evaluation_without_overlap():
    train, test, _ = make_synthetic(num_train=90, num_test=37)
    # Mark each sample by its index so the batches say which samples they hold.
    train.images = torch.arange(90, dtype=torch.float32).view(90, 1, 1, 1).expand(90, 1, 8, 8).clone()
    train.augment = None
    seen = []
    for rank in range(2):
        xs = [x for x, _ in batches(train, 8, seed=0, epoch=0, rank=rank, world_size=2)]
        assert len(xs) == num_batches(90, 8, world_size=2) == 5
        seen.append(torch.cat(xs)[:, 0, 0, 0].long())
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
    test.images = torch.arange(37, dtype=torch.float32).view(37, 1, 1, 1).expand(37, 1, 8, 8).clone()
    evaluated = torch.cat([torch.cat([x for x, _ in batches(test, 10, train=False, rank=r, world_size=2)])
                           for r in range(2)])[:, 0, 0, 0].long()
    assert sorted(evaluated.tolist()) == list(range(37))  # every test sample exactly once


@pytest.mark.parametrize("padding", [1, 4])
def test_random_crop_output_is_a_crop_of_the_padded_input(padding):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 5, 7)
    out = random_crop(x, padding, gen)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    offsets = set()
    for b in range(x.shape[0]):
        matches = [(dy, dx) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)
                   if torch.equal(padded[b, :, dy:dy + 5, dx:dx + 7], out[b])]
        assert matches, f"sample {b} is not a crop of its padded image"
        offsets.add(matches[0])
    assert len(offsets) > 1  # random, not one fixed offset


def test_random_crop_keeps_leading_dims_and_flip_mirrors():
    gen = torch.Generator().manual_seed(1)
    frames = torch.randn(4, 3, 2, 6, 6)  # [B, T, C, H, W]
    out = random_crop(frames, 2, gen)
    assert out.shape == frames.shape
    x = torch.randn(64, 2, 3, 3)
    flipped = random_flip(x, gen)
    same = [torch.equal(flipped[i], x[i]) for i in range(64)]
    mirrored = [torch.equal(flipped[i], x[i].flip(-1)) for i in range(64)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 0 < sum(mirrored) < 64


def _write_cifar(directory: Path, per_batch: int = 4) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        with open(directory / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
        written[name] = (data, labels)
    return written


@pytest.mark.parametrize("nested", [False, True])
def test_cifar10_reads_the_python_pickle_format(tmp_path, nested):
    written = _write_cifar(tmp_path / "cifar-10-batches-py" if nested else tmp_path)
    train, test, info = load_cifar10(tmp_path)
    assert (info.in_channels, info.image_size, info.num_classes, info.model) == (3, 32, 10, "spikformer-4-384")
    assert len(train) == 20 and len(test) == 4
    data, labels = written["test_batch"]
    # Rows of 3072 bytes are the R, G, B planes of a 32x32 image, row-major.
    expected = torch.from_numpy(data.reshape(4, 3, 32, 32)).float() / 255.0
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    x, y = next(batches(test, 4, train=False))
    assert torch.allclose(x, (expected - mean) / std, atol=1e-6)
    assert y.tolist() == labels
    assert torch.equal(train.labels[:4], torch.tensor(written["data_batch_1"][1]))
    xt, _ = next(batches(train, 4, seed=0, epoch=0))
    assert xt.shape == (4, 3, 32, 32)  # crop + flip keep the size


def test_cifar10_missing_or_corrupt_files_say_what_to_do(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"cifar-10-python.tar.gz.*data_batch_1"):
        load_cifar10(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="--data-dir"):
        load_dataset("cifar10", tmp_path / "nowhere")
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_3"):
        load_cifar10(tmp_path)


def test_synthetic_is_learnable_and_validated():
    train, test, info = make_synthetic(num_train=40, num_test=20, num_classes=4, in_channels=2, image_size=6, seed=5)
    assert train.images.shape == (40, 2, 6, 6) and info.num_classes == 4
    again, _, _ = make_synthetic(num_train=40, num_test=20, num_classes=4, in_channels=2, image_size=6, seed=5)
    assert torch.equal(train.images, again.images)
    # Nearest class mean classifies the test set well: the labels are in the images.
    means = torch.stack([train.images[train.labels == c].mean(0) for c in range(4)])
    pred = ((test.images[:, None] - means[None]) ** 2).flatten(2).sum(-1).argmin(1)
    assert float((pred == test.labels).float().mean()) > 0.9
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic(num_classes=1)
    with pytest.raises(ValueError, match="dataset: expected one of"):
        load_dataset("mnist")


def test_batch_size_is_validated():
    train, _, _ = make_synthetic(num_train=8, num_test=8)
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(train, 0))


# ----------------------------------------------------------------------------- CIFAR10-DVS
def test_cifar10_dvs_missing_directory_says_where_to_put_files(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"airplane.zip.*download"):
        load_cifar10_dvs(tmp_path)
    with pytest.raises(ValueError, match="frames"):
        load_cifar10_dvs(tmp_path, frames=0)


def _torchvision_stand_in(monkeypatch) -> None:
    """SpikingJelly's dataset package imports torchvision and torchaudio at module level (neither
    is a dependency of effst, and no torchvision wheel matches torch 2.13): when they cannot be
    imported, provide the names it imports, with torchvision's DatasetFolder semantics (classes =
    sorted sub-directories, samples = sorted (path, class index) pairs). Only the download /
    extract helpers are inert, and this test starts from already converted events."""
    try:
        import torchaudio  # noqa: F401
        import torchvision.datasets  # noqa: F401
        return
    except Exception:
        pass

    class DatasetFolder(torch.utils.data.Dataset):
        def __init__(self, root, loader, extensions=None, transform=None, target_transform=None):
            root = Path(root)
            self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
            self.samples = [(str(p), self.class_to_idx[c]) for c in self.classes
                            for p in sorted((root / c).iterdir()) if p.suffix in tuple(extensions or ())]
            self.targets = [t for _, t in self.samples]
            self.loader, self.transform, self.target_transform = loader, transform, target_transform

        def __len__(self):
            return len(self.samples)

        def __getitem__(self, index):
            path, target = self.samples[index]
            sample = self.loader(path)
            return sample, target

    def inert(*args, **kwargs):
        raise AssertionError("the test data is already converted: nothing may be downloaded or extracted")

    tv = types.ModuleType("torchvision")
    datasets = types.ModuleType("torchvision.datasets")
    utils = types.ModuleType("torchvision.datasets.utils")
    transforms = types.ModuleType("torchvision.transforms")
    datasets.DatasetFolder = DatasetFolder
    utils.extract_archive = utils.check_integrity = utils.download_url = utils.verify_str_arg = inert
    tv.datasets, tv.transforms, datasets.utils = datasets, transforms, utils
    for name, module in (("torchvision", tv), ("torchvision.datasets", datasets), ("torchvision.datasets.utils", utils),
                         ("torchvision.transforms", transforms), ("torchaudio", types.ModuleType("torchaudio"))):
        monkeypatch.setitem(sys.modules, name, module)
    for name in [m for m in sys.modules if m.startswith("spikingjelly.datasets")]:
        monkeypatch.delitem(sys.modules, name)


def test_cifar10_dvs_frames_through_spikingjelly(tmp_path, monkeypatch):
    """Real SpikingJelly CIFAR10DVS class on a small event set in its converted (events_np) form."""
    pytest.importorskip("spikingjelly")
    _torchvision_stand_in(monkeypatch)
    from effst.data import CIFAR10DVS_CLASSES

    rng = np.random.default_rng(0)
    per_class = 10
    for c in CIFAR10DVS_CLASSES:
        d = tmp_path / "events_np" / c
        d.mkdir(parents=True)
        for i in range(per_class):
            n = 200
            np.savez(d / f"cifar10_{c}_{i}.npz", t=np.sort(rng.integers(0, 10_000, n)).astype(np.int64),
                     x=rng.integers(0, 128, n).astype(np.int64), y=rng.integers(0, 128, n).astype(np.int64),
                     p=rng.integers(0, 2, n).astype(np.int64))
    train, test, info = load_cifar10_dvs(tmp_path, frames=4)
    assert (info.in_channels, info.image_size, info.frames, info.model) == (2, 128, 4, "spikformer-2-256")
    assert len(train) == 90 and len(test) == 10  # sample 0 of each class is the test set (10 %)
    assert sorted(test.labels.tolist()) == list(range(10))
    x, y = next(batches(test, 5, train=False))
    assert x.shape == (5, 4, 2, 128, 128) and x.dtype == torch.float32
    # Frames integrate events: all 200 events of a sample land in its 4 frames.
    assert torch.allclose(x.sum(dim=(1, 2, 3, 4)), torch.full((5,), 200.0))
    xt, _ = next(batches(train, 3, seed=0, epoch=0))
    assert xt.shape == (3, 4, 2, 128, 128)
