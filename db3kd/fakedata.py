"""Small, learnable fake datasets written in torchvision's exact on-disk formats.

CIFAR-10, CIFAR-100 and Flowers102 have no offline copy on these machines. The writers here produce tiny stand-ins
that the *real* loaders (:func:`db3kd.data.load_dataset`, i.e. torchvision's ``CIFAR10`` / ``CIFAR100`` /
``Flowers102``) read unchanged, so tests and benchmarks exercise the same code paths without internet.

Every class gets its own template image: a colour (one of several evenly spaced hues) modulated by a sinusoidal
stripe pattern whose orientation depends on the class, plus per-image brightness jitter and Gaussian pixel noise.
Classes are therefore easy to separate: a small CNN learns them in seconds. The files are *not* the official
release, so the loaders emit a warning saying so (their md5s differ from torchvision's list).

All writers are deterministic for a given ``seed`` and return the data root to pass to ``load_dataset``.
"""

from __future__ import annotations

import colorsys
import math
import os
import pickle
from pathlib import Path
from typing import Union

import numpy as np

__all__ = ["class_images", "write_fake_cifar10", "write_fake_cifar100", "write_fake_flowers102"]

PathLike = Union[str, os.PathLike]


def class_images(
    label: int, num_classes: int, n: int, height: int, width: int, rng: np.random.Generator, noise: float = 0.08
) -> np.ndarray:
    """``n`` RGB images of class ``label`` as uint8 ``(n, height, width, 3)`` (HWC, values 0..255).

    The class template is hue ``label % n_hues`` (``n_hues = min(num_classes, 10)``) times a stripe pattern with
    orientation index ``label // n_hues``; each image adds a brightness factor in [0.85, 1.15] and Gaussian noise of
    standard deviation ``noise`` (in [0, 1] units).
    """
    n_hues = min(num_classes, 10)
    n_pat = max(1, math.ceil(num_classes / n_hues))
    hue_i, pat_i = label % n_hues, label // n_hues
    rgb = np.array(colorsys.hsv_to_rgb(hue_i / n_hues, 0.85, 0.95), dtype=np.float32)
    theta = math.pi * pat_i / n_pat
    yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    freq = 3.0
    stripes = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)))
    # Single-pattern datasets (<= 10 classes) still get stripes, so images are not flat colour fields.
    template = rgb[None, None, :] * (0.4 + 0.6 * stripes[:, :, None].astype(np.float32))
    bright = rng.uniform(0.85, 1.15, size=(n, 1, 1, 1)).astype(np.float32)
    imgs = template[None] * bright + rng.normal(0.0, noise, size=(n, height, width, 3)).astype(np.float32)
    return (np.clip(imgs, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _dataset(num_classes: int, n_per_class: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled (images uint8 (N, size, size, 3), labels int64 (N,)) with ``n_per_class`` images per class."""
    x = np.concatenate([class_images(c, num_classes, n_per_class, size, size, rng) for c in range(num_classes)])
    y = np.repeat(np.arange(num_classes, dtype=np.int64), n_per_class)
    perm = rng.permutation(len(y))
    return x[perm], y[perm]


def _cifar_rows(x: np.ndarray) -> np.ndarray:
    """HWC uint8 (N, 32, 32, 3) -> CIFAR rows (N, 3072): 1024 red, then 1024 green, then 1024 blue values."""
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2).reshape(len(x), 3 * 32 * 32))


def _pickle(obj, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_fake_cifar10(
    root: PathLike, n_train_per_class: int = 20, n_test_per_class: int = 10, seed: int = 0
) -> Path:
    """Write a fake CIFAR-10 to ``<root>/cifar-10-batches-py/`` and return ``root`` (as a Path).

    Format (the official python version, as torchvision's ``CIFAR10`` reads it): pickled dicts (protocol 2)
    ``data_batch_1`` .. ``data_batch_5`` (the ``10 * n_train_per_class`` training images split as evenly as
    possible) and ``test_batch``, each ``{"batch_label": str, "labels": list[int] (0..9), "data": uint8 ndarray
    (n, 3072) with rows of 1024 R, 1024 G, 1024 B values of a 32x32 image, "filenames": list[str]}``, plus
    ``batches.meta`` = ``{"label_names": list of 10 str, "num_cases_per_batch": int, "num_vis": 3072}``.
    """
    rng = np.random.default_rng(seed)
    base = Path(root) / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    x, y = _dataset(10, n_train_per_class, 32, rng)
    for i, idx in enumerate(np.array_split(np.arange(len(y)), 5), start=1):
        _pickle(
            {
                "batch_label": f"training batch {i} of 5",
                "labels": [int(v) for v in y[idx]],
                "data": _cifar_rows(x[idx]),
                "filenames": [f"fake_{i}_{j:05d}.png" for j in range(len(idx))],
            },
            base / f"data_batch_{i}",
        )
    xt, yt = _dataset(10, n_test_per_class, 32, rng)
    _pickle(
        {
            "batch_label": "testing batch 1 of 1",
            "labels": [int(v) for v in yt],
            "data": _cifar_rows(xt),
            "filenames": [f"fake_test_{j:05d}.png" for j in range(len(yt))],
        },
        base / "test_batch",
    )
    _pickle({"label_names": names, "num_cases_per_batch": int(math.ceil(len(y) / 5)), "num_vis": 3072},
            base / "batches.meta")
    return Path(root)


def write_fake_cifar100(root: PathLike, n_train_per_class: int = 5, n_test_per_class: int = 2, seed: int = 0) -> Path:
    """Write a fake CIFAR-100 to ``<root>/cifar-100-python/`` and return ``root`` (as a Path).

    Format (the official python version, as torchvision's ``CIFAR100`` reads it): pickled dicts (protocol 2)
    ``train`` and ``test``, each ``{"batch_label": str, "fine_labels": list[int] (0..99), "coarse_labels":
    list[int] (0..19), "data": uint8 ndarray (n, 3072) with rows of 1024 R, 1024 G, 1024 B values of a 32x32
    image, "filenames": list[str]}``, plus ``meta`` = ``{"fine_label_names": 100 str, "coarse_label_names": 20 str}``.
    Coarse label of fine class ``c`` is ``c // 5``.
    """
    rng = np.random.default_rng(seed)
    base = Path(root) / "cifar-100-python"
    base.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train_per_class), ("test", n_test_per_class)):
        x, y = _dataset(100, n, 32, rng)
        _pickle(
            {
                "batch_label": f"{'training' if split == 'train' else 'testing'} batch 1 of 1",
                "fine_labels": [int(v) for v in y],
                "coarse_labels": [int(v) // 5 for v in y],
                "data": _cifar_rows(x),
                "filenames": [f"fake_{split}_{j:05d}.png" for j in range(len(y))],
            },
            base / split,
        )
    _pickle(
        {
            "fine_label_names": [f"fake_class_{c:03d}" for c in range(100)],
            "coarse_label_names": [f"fake_superclass_{c:02d}" for c in range(20)],
        },
        base / "meta",
    )
    return Path(root)


def write_fake_flowers102(root: PathLike, n_per_class_per_split: int = 2, image_size: int = 64, seed: int = 0) -> Path:
    """Write a fake Oxford Flowers102 to ``<root>/flowers-102/`` and return ``root`` (as a Path).

    Format (the official release, as torchvision's ``Flowers102`` reads it):

    * ``jpg/image_00001.jpg`` ... : RGB JPEGs (quality 95), ``image_size`` pixels high and ``image_size * 5 // 4``
      wide (not square, so the loader's Resize + CenterCrop is exercised);
    * ``imagelabels.mat``: MATLAB file with ``labels``, a 1 x N uint8 array of 1-based class ids (1..102), entry
      ``i`` for ``image_{i+1:05d}.jpg``;
    * ``setid.mat``: MATLAB file with ``trnid``, ``valid``, ``tstid``, 1 x K uint16 arrays of 1-based image ids.

    Each of the three splits holds ``n_per_class_per_split`` images of each of the 102 classes; image ids are
    shuffled so splits and classes are interleaved as in the real release.
    """
    from PIL import Image
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    base = Path(root) / "flowers-102"
    jpg = base / "jpg"
    jpg.mkdir(parents=True, exist_ok=True)
    n_classes = 102
    per_split = n_classes * n_per_class_per_split
    n_total = 3 * per_split
    ids = rng.permutation(n_total) + 1  # 1-based image ids, shuffled
    labels = np.zeros(n_total, dtype=np.uint8)  # 1-based class of image id i at index i - 1
    setid = {}
    h, w = image_size, image_size * 5 // 4
    for s, key in enumerate(("trnid", "valid", "tstid")):
        split_ids = ids[s * per_split : (s + 1) * per_split]
        split_labels = np.repeat(np.arange(n_classes), n_per_class_per_split)
        for c in range(n_classes):
            imgs = class_images(c, n_classes, n_per_class_per_split, h, w, rng)
            for img, image_id in zip(imgs, split_ids[split_labels == c]):
                Image.fromarray(img).save(jpg / f"image_{int(image_id):05d}.jpg", quality=95)
        labels[split_ids - 1] = split_labels + 1
        setid[key] = np.sort(split_ids).astype(np.uint16)[None, :]
    savemat(base / "imagelabels.mat", {"labels": labels[None, :]})
    savemat(base / "setid.mat", setid)
    return Path(root)
