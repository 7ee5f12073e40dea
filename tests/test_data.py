"""Tests for db3kd.data (dataset loading) and db3kd.fakedata (fake on-disk datasets)."""

from __future__ import annotations

import gzip
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from db3kd.data import DATASETS, DataSplits, load_dataset, resolve_cache_dir, resolve_data_root, to_float
from db3kd.errors import DatasetNotFoundError
from db3kd.fakedata import write_fake_cifar10, write_fake_cifar100, write_fake_flowers102

SHARED = Path(__file__).parents[1].parent / "shared" / "datasets"

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
IDX_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def _need_shared(folder: str) -> Path:
    raw = SHARED / folder / "raw"
    if not raw.is_dir():
        pytest.skip(f"offline dataset copy not found at {raw}")
    return SHARED


def _rows(x: torch.Tensor) -> set[bytes]:
    return {bytes(r) for r in x.flatten(1).numpy()}


def _check_splits(s: DataSplits, name: str, num_classes: int, shape: tuple[int, int, int]) -> None:
    assert s.name == name and s.num_classes == num_classes
    assert (s.channels, s.image_size, s.image_size) == shape
    for x, y in ((s.train_x, s.train_y), (s.val_x, s.val_y), (s.test_x, s.test_y)):
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        assert tuple(x.shape[1:]) == shape and x.shape[0] == y.shape[0]
        if len(y):
            assert 0 <= int(y.min()) and int(y.max()) < num_classes


# ---------------------------------------------------------------------------------------------------------- digits


def test_digits_shapes_splits_and_labels():
    s = load_dataset("digits")
    _check_splits(s, "digits", 10, (1, 16, 16))
    assert s.root == "sklearn"
    assert len(s.test_y) == 360  # fixed stratified 20 % of 1797
    assert len(s.train_y) + len(s.val_y) == 1797 - 360
    assert len(s.val_y) == round(0.1 * 1437)
    assert torch.bincount(s.test_y, minlength=10).min() >= 35  # stratified: ~36 per class
    assert set(s.train_y.tolist()) == set(range(10))
    assert int(s.train_x.max()) == 255 and int(s.train_x.min()) == 0  # 0..16 scaled to 0..255


def test_digits_is_deterministic_and_val_is_disjoint():
    a, b = load_dataset("digits"), load_dataset("digits")
    for key in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, key), getattr(b, key))
    assert a.fingerprint() == b.fingerprint() and len(a.fingerprint()) == 16
    train, val, test = _rows(a.train_x), _rows(a.val_x), _rows(a.test_x)
    assert len(train) == len(a.train_x) and len(val) == len(a.val_x)  # the 1797 digits are all distinct
    assert not train & val and not train & test and not val & test
    # The held-out rows are exactly the val_fraction=0 training set, and a different split changes the key.
    full = load_dataset("digits", val_fraction=0.0)
    assert len(full.val_y) == 0 and _rows(full.train_x) == train | val
    assert full.fingerprint() != a.fingerprint()


def test_image_size_and_to_float():
    s = load_dataset("digits", image_size=28, val_fraction=0.2)
    _check_splits(s, "digits", 10, (1, 28, 28))
    f = to_float(s.test_x[:5])
    assert f.dtype == torch.float32 and f.shape == (5, 1, 28, 28)
    assert 0.0 <= float(f.min()) and float(f.max()) <= 1.0
    assert torch.allclose(f * 255, s.test_x[:5].float())
    with pytest.raises(TypeError):
        to_float(f)


def test_bad_arguments():
    with pytest.raises(ValueError, match="imagenet.*digits.*mnist.*fmnist.*cifar10.*cifar100.*flowers102"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("digits", val_fraction=1.0)
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("digits", image_size=0)
    assert tuple(DATASETS) == ("digits", "mnist", "fmnist", "cifar10", "cifar100", "flowers102")


def test_resolve_data_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DB3KD_DATA", str(tmp_path / "env-root"))
    assert resolve_data_root() == tmp_path / "env-root"
    assert resolve_data_root(tmp_path / "explicit") == tmp_path / "explicit"  # the argument wins
    monkeypatch.delenv("DB3KD_DATA")
    monkeypatch.chdir(tmp_path)
    assert resolve_data_root() == tmp_path / "data"
    monkeypatch.setenv("DB3KD_CACHE", str(tmp_path / "c"))
    assert resolve_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DB3KD_CACHE")
    assert resolve_cache_dir() == tmp_path / ".cache" / "db3kd"


# --------------------------------------------------------------------------------------------- MNIST / FashionMNIST


@pytest.fixture(scope="module")
def mnist_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("db3kd-cache")


@pytest.fixture(scope="module")
def mnist(mnist_cache) -> DataSplits:
    return load_dataset("mnist", _need_shared("MNIST"), cache_dir=mnist_cache)


def test_mnist_real_files(mnist, mnist_cache):
    _check_splits(mnist, "mnist", 10, (1, 28, 28))
    assert (len(mnist.train_y), len(mnist.val_y), len(mnist.test_y)) == (54000, 6000, 10000)
    assert torch.bincount(mnist.test_y, minlength=10).tolist() == MNIST_TEST_COUNTS
    all_y = torch.cat([mnist.train_y, mnist.val_y])
    assert torch.bincount(all_y, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    mean = torch.cat([mnist.train_x, mnist.val_x]).double().mean().item()
    assert mean == pytest.approx(33.32, abs=0.01)
    assert mnist.root == str(SHARED / "MNIST" / "raw")
    assert sorted(p.name for p in (mnist_cache / "MNIST" / "raw").iterdir()) == sorted(IDX_FILES)


def test_mnist_cache_is_reused_and_uncompressed_files_read_in_place(mnist, mnist_cache, tmp_path):
    cached = mnist_cache / "MNIST" / "raw"
    before = {p.name: p.stat().st_mtime_ns for p in cached.iterdir()}
    again = load_dataset("mnist", SHARED, cache_dir=mnist_cache)
    assert {p.name: p.stat().st_mtime_ns for p in cached.iterdir()} == before  # verified, not re-extracted
    assert again.fingerprint() == mnist.fingerprint()
    # A data root holding the uncompressed files is read in place: nothing is written to the cache.
    in_place = load_dataset("mnist", mnist_cache, cache_dir=tmp_path / "unused")
    assert not (tmp_path / "unused").exists()
    assert torch.equal(in_place.test_x, mnist.test_x) and in_place.fingerprint() == mnist.fingerprint()


def test_fmnist_real_files(tmp_path):
    s = load_dataset("fmnist", _need_shared("FashionMNIST"), cache_dir=tmp_path)
    _check_splits(s, "fmnist", 10, (1, 28, 28))
    assert (len(s.train_y), len(s.val_y), len(s.test_y)) == (54000, 6000, 10000)
    assert torch.bincount(s.test_y, minlength=10).tolist() == [1000] * 10
    assert torch.bincount(torch.cat([s.train_y, s.val_y]), minlength=10).tolist() == [6000] * 10
    assert torch.cat([s.train_x, s.val_x]).double().mean().item() == pytest.approx(72.94, abs=0.01)


@pytest.fixture
def mnist_copy(tmp_path) -> Path:
    """A writable copy of the four MNIST .gz files at <tmp>/root/MNIST/raw/."""
    src = _need_shared("MNIST") / "MNIST" / "raw"
    dst = tmp_path / "root" / "MNIST" / "raw"
    dst.mkdir(parents=True)
    for f in IDX_FILES:
        shutil.copyfile(src / f"{f}.gz", dst / f"{f}.gz")
    return dst


def test_truncated_gz_names_the_file(mnist_copy, tmp_path):
    bad = mnist_copy / "train-labels-idx1-ubyte.gz"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetNotFoundError, match="truncated") as exc:
        load_dataset("mnist", mnist_copy.parents[1], cache_dir=tmp_path / "cache")
    assert str(bad) in str(exc.value)
    assert not (tmp_path / "cache" / "MNIST" / "raw" / "train-labels-idx1-ubyte").exists()


def test_checksum_mismatch_names_the_file(mnist_copy, tmp_path):
    bad = mnist_copy / "t10k-labels-idx1-ubyte.gz"
    bad.unlink()
    raw = mnist_copy / "t10k-labels-idx1-ubyte"  # an uncompressed file is accepted, but must verify
    raw.write_bytes(gzip.decompress((_need_shared("MNIST") / "MNIST/raw/t10k-labels-idx1-ubyte.gz").read_bytes())[:-1] + b"\x00")
    with pytest.raises(DatasetNotFoundError, match="checksum mismatch: expected") as exc:
        load_dataset("mnist", mnist_copy.parents[1], cache_dir=tmp_path / "cache")
    assert str(raw) in str(exc.value)


@pytest.mark.parametrize("name", ["mnist", "fmnist", "cifar10", "cifar100", "flowers102"])
def test_missing_root_says_where_it_looked(name, tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as exc:
        load_dataset(name, root, cache_dir=tmp_path / "cache")
    msg = str(exc.value)
    assert str(root) in msg and "not found" in msg and "--download" in msg
    assert isinstance(exc.value, FileNotFoundError)
    if name in ("mnist", "fmnist"):
        assert "--data-root ../shared/datasets" in msg and "train-images-idx3-ubyte" in msg
    assert not root.exists() and not (tmp_path / "cache").exists()


def test_download_failure_is_wrapped(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    def offline(*args, **kwargs):
        raise OSError("network is unreachable (simulated)")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    with pytest.raises(DatasetNotFoundError, match="download into .* failed.*simulated"):
        load_dataset("cifar10", tmp_path, download=True)


# ----------------------------------------------------------------------------------------- fake CIFAR / Flowers102


def test_fake_cifar10_roundtrip(tmp_path):
    root = write_fake_cifar10(tmp_path, n_train_per_class=10, n_test_per_class=4)
    assert sorted(p.name for p in (root / "cifar-10-batches-py").iterdir()) == sorted(
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    )
    with pytest.warns(UserWarning, match="not the official release"):
        s = load_dataset("cifar10", root)
    _check_splits(s, "cifar10", 10, (3, 32, 32))
    assert (len(s.train_y), len(s.val_y), len(s.test_y)) == (90, 10, 40)
    assert torch.bincount(s.test_y, minlength=10).tolist() == [4] * 10
    assert s.root == str(root / "cifar-10-batches-py")
    # Same seed, same files, same data.
    other = write_fake_cifar10(tmp_path / "again", n_train_per_class=10, n_test_per_class=4)
    with pytest.warns(UserWarning):
        assert load_dataset("cifar10", other).fingerprint() == s.fingerprint()


def test_fake_cifar10_is_learnable(tmp_path):
    root = write_fake_cifar10(tmp_path, n_train_per_class=10, n_test_per_class=10)
    with pytest.warns(UserWarning):
        s = load_dataset("cifar10", root, val_fraction=0.0)
    x, xt = to_float(s.train_x).flatten(1), to_float(s.test_x).flatten(1)
    centroids = torch.stack([x[s.train_y == c].mean(0) for c in range(10)])
    acc = (torch.cdist(xt, centroids).argmin(1) == s.test_y).float().mean().item()
    assert acc > 0.9


def test_fake_cifar100_roundtrip_and_env_root(tmp_path, monkeypatch):
    root = write_fake_cifar100(tmp_path, n_train_per_class=3, n_test_per_class=1)
    monkeypatch.setenv("DB3KD_DATA", str(root))
    with pytest.warns(UserWarning, match="not the official release"):
        s = load_dataset("cifar100", image_size=16)  # data root from the environment
    _check_splits(s, "cifar100", 100, (3, 16, 16))
    assert (len(s.train_y), len(s.val_y), len(s.test_y)) == (270, 30, 100)
    assert sorted(s.test_y.tolist()) == list(range(100))


def test_fake_flowers102_roundtrip(tmp_path):
    root = write_fake_flowers102(tmp_path, n_per_class_per_split=1, image_size=24)
    with pytest.warns(UserWarning, match="not the official release"):
        s = load_dataset("flowers102", root, image_size=20)
    _check_splits(s, "flowers102", 102, (3, 20, 20))
    for y in (s.train_y, s.val_y, s.test_y):  # official splits, 0-based labels, one image per class each
        assert sorted(y.tolist()) == list(range(102))


def test_corrupt_cifar_batches_name_the_file(tmp_path):
    root = write_fake_cifar10(tmp_path, n_train_per_class=2, n_test_per_class=1)
    base = root / "cifar-10-batches-py"
    batch = base / "data_batch_3"
    data = batch.read_bytes()
    batch.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetNotFoundError, match="data_batch_3.*unpickled"):
        load_dataset("cifar10", root)
    batch.write_bytes(data)
    with open(base / "test_batch", "rb") as f:
        entry = pickle.load(f)
    entry["data"] = entry["data"][:, :1024]  # one channel instead of three
    with open(base / "test_batch", "wb") as f:
        pickle.dump(entry, f, protocol=2)
    with pytest.raises(DatasetNotFoundError, match="test_batch.*channel"):
        load_dataset("cifar10", root)


def test_flowers102_missing_image_is_named(tmp_path):
    root = write_fake_flowers102(tmp_path, n_per_class_per_split=1, image_size=16)
    victim = sorted((root / "flowers-102" / "jpg").iterdir())[7]
    victim.unlink()
    with pytest.raises(DatasetNotFoundError, match=victim.name):
        load_dataset("flowers102", root, image_size=16)


def test_datasplits_rejects_wrong_dtype():
    x, y = torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="uint8"):
        DataSplits("digits", 10, x.float(), y, x, y, x, y, "sklearn")
    s = DataSplits("digits", 10, x, y, x[:0], y[:0], x, y, "sklearn")
    assert s.channels == 1 and s.image_size == 4 and np.all(s.val_x.numpy() == 0)
