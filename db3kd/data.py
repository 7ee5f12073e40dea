"""Dataset loading for db3kd: every dataset comes back as uint8 image tensors split into train/val/test.

Images are stored as ``torch.uint8`` tensors of shape ``(N, C, H, W)`` (pixel values 0..255) to save memory;
:func:`to_float` turns them into float32 in [0, 1] when a model needs them. No mean/std normalisation is applied
anywhere. Labels are ``torch.int64`` tensors of shape ``(N,)`` with values in ``0 .. num_classes - 1``.

Datasets (see :data:`DATASETS`):

* ``digits``: scikit-learn's embedded 8x8 handwritten digits, upsampled to 16x16; needs no files.
* ``mnist`` / ``fmnist``: torchvision's ``MNIST`` / ``FashionMNIST`` layout ``<root>/<MNIST|FashionMNIST>/raw/``,
  gzip-compressed or not; compressed files are extracted into a writable cache and verified by SHA-256.
* ``cifar10`` / ``cifar100``: torchvision's ``cifar-10-batches-py`` / ``cifar-100-python`` pickle folders.
* ``flowers102``: torchvision's ``flowers-102`` folder (``jpg/``, ``imagelabels.mat``, ``setid.mat``).

Missing or corrupt files raise :class:`~db3kd.errors.DatasetNotFoundError` whose message names the path(s) and
the problem, and says how to get the files.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import uuid
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import datasets as tv_datasets
from torchvision import transforms as tv_transforms
from torchvision.datasets.utils import calculate_md5

from db3kd.datasets import DATASETS as _REGISTRY
from db3kd.datasets import DatasetSpec
from db3kd.errors import DB3KDError, DatasetNotFoundError

__all__ = [
    "DATASETS",
    "DataSplits",
    "load_dataset",
    "resolve_cache_dir",
    "resolve_data_root",
    "to_float",
]

PathLike = Union[str, os.PathLike]

#: Names accepted by :func:`load_dataset`: the dataset registry (:data:`db3kd.datasets.DATASETS`), a
#: read-only mapping name -> :class:`~db3kd.datasets.DatasetSpec`.
DATASETS = _REGISTRY

#: Default side length for Flowers102 images when ``image_size`` is not given.
FLOWERS102_DEFAULT_SIZE = _REGISTRY["flowers102"].image_size

#: Native side length of the ``digits`` images after upsampling (the sklearn originals are 8x8).
DIGITS_SIZE = _REGISTRY["digits"].input_shape[-1]

# SHA-256 of the decompressed IDX files, per torchvision folder (from the registry's entries).
MNIST_SHA256 = {spec.folder: dict(spec.checksums) for spec in (_REGISTRY["mnist"], _REGISTRY["fmnist"])}

_HINT_DATA_ROOT = "pass --data-root DIR or set the environment variable DB3KD_DATA"
_HINT_DOWNLOAD = "where there is internet access, pass --download (torchvision download=True) to fetch the files"


# --------------------------------------------------------------------------------------------------------------------
# Public helpers
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class DataSplits:
    """One dataset split three ways, as uint8 images and int64 labels.

    Attributes:
        name: canonical dataset name (one of :data:`DATASETS`).
        num_classes: number of classes; labels lie in ``0 .. num_classes - 1``.
        train_x: ``torch.uint8`` ``(N_train, C, H, W)``, pixel values 0..255: the official training set *minus*
            the validation split (Flowers102: its official train split).
        train_y: ``torch.int64`` ``(N_train,)``.
        val_x, val_y: the validation split, same dtypes/layout (may hold 0 images when ``val_fraction == 0``).
        test_x, test_y: the official test split, same dtypes/layout.
        root: where the files were read from (``"sklearn"`` for ``digits``).
    """

    name: str
    num_classes: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    root: str
    _fingerprint: list = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        shape = None
        for split in ("train", "val", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.dtype != torch.uint8 or x.ndim != 4:
                raise ValueError(f"{split}_x must be a uint8 tensor (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
            if y.dtype != torch.int64 or y.ndim != 1 or len(y) != len(x):
                raise ValueError(f"{split}_y must be an int64 tensor ({len(x)},), got {y.dtype} {tuple(y.shape)}")
            if shape is None:
                shape = tuple(x.shape[1:])
            elif tuple(x.shape[1:]) != shape:
                raise ValueError(f"{split}_x image shape {tuple(x.shape[1:])} differs from train_x's {shape}")

    @property
    def channels(self) -> int:
        """Number of image channels C (1 for greyscale, 3 for RGB)."""
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> int:
        """Image side length in pixels (images are square: H == W)."""
        return int(self.train_x.shape[-1])

    def fingerprint(self) -> str:
        """Short (16 hex digits) SHA-256 over the name, class count, shapes, dtypes and contents of all six tensors.

        Identical data gives an identical fingerprint on every machine, so it serves as a cache key. Computed once
        and remembered.
        """
        if not self._fingerprint:
            h = hashlib.sha256()
            h.update(f"{self.name}|{self.num_classes}".encode())
            for key in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
                t = getattr(self, key).detach().cpu()
                h.update(f"|{key}:{t.dtype}:{tuple(t.shape)}|".encode())
                h.update(np.ascontiguousarray(t.numpy()).reshape(-1).view(np.uint8).data)
            self._fingerprint.append(h.hexdigest()[:16])
        return self._fingerprint[0]

    def __repr__(self) -> str:
        return (
            f"DataSplits(name={self.name!r}, num_classes={self.num_classes}, "
            f"image=({self.channels}, {self.image_size}, {self.image_size}), train={len(self.train_y)}, "
            f"val={len(self.val_y)}, test={len(self.test_y)}, root={self.root!r})"
        )


def to_float(x: torch.Tensor) -> torch.Tensor:
    """Convert uint8 images (any shape, values 0..255) to float32 in [0, 1] (divide by 255; no normalisation).

    Raises:
        TypeError: if ``x`` is not a uint8 tensor (guards against scaling already-float images twice).
    """
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8:
        raise TypeError(f"to_float expects a torch.uint8 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    return x.to(torch.float32).div_(255.0)


def resolve_data_root(data_root: PathLike | None = None) -> Path:
    """Directory that holds dataset files: ``data_root`` if given, else env ``DB3KD_DATA``, else ``./data``.

    Returns an absolute :class:`pathlib.Path` (``~`` expanded). The directory need not exist.
    """
    if data_root is None or str(data_root) == "":
        data_root = os.environ.get("DB3KD_DATA") or "data"
    return Path(data_root).expanduser().absolute()


def resolve_cache_dir(cache_dir: PathLike | None = None) -> Path:
    """Writable cache for extracted files: ``cache_dir`` if given, else env ``DB3KD_CACHE``, else ``./.cache/db3kd``.

    Returns an absolute :class:`pathlib.Path` (``~`` expanded). The directory is created only when needed.
    """
    if cache_dir is None or str(cache_dir) == "":
        cache_dir = os.environ.get("DB3KD_CACHE") or os.path.join(".cache", "db3kd")
    return Path(cache_dir).expanduser().absolute()


def load_dataset(
    name: str,
    data_root: PathLike | None = None,
    *,
    val_fraction: float = 0.1,
    image_size: int | None = None,
    download: bool = False,
    cache_dir: PathLike | None = None,
) -> DataSplits:
    """Load a dataset as uint8 train/val/test tensors.

    Args:
        name: one of :data:`DATASETS` (case-insensitive); its registry entry names the loader.
        data_root: folder holding the dataset files in torchvision's layout; default :func:`resolve_data_root`
            (env ``DB3KD_DATA``, else ``./data``). Never written to, except by ``download=True``. Unused for
            ``digits``.
        val_fraction: fraction of the official training set held out as validation, in ``[0, 1)``. The split is a
            fixed permutation (``torch.Generator().manual_seed(0)``), independent of any run seed. Ignored for
            ``flowers102``, which has an official validation split.
        image_size: if given, every split is resized to ``image_size x image_size`` pixels (bilinear, antialiased;
            Flowers102: Resize + CenterCrop). Default: native size (digits 16, MNIST/FMNIST 28, CIFAR 32,
            Flowers102 224).
        download: let torchvision download missing files into ``data_root`` (needs internet). Unused for
            ``digits``.
        cache_dir: writable folder where gzip-compressed MNIST/FMNIST files are extracted; default
            :func:`resolve_cache_dir` (env ``DB3KD_CACHE``, else ``./.cache/db3kd``).

    Returns:
        :class:`DataSplits` with uint8 ``(N, C, H, W)`` images and int64 ``(N,)`` labels.

    Raises:
        ValueError: unknown ``name``, ``val_fraction`` outside ``[0, 1)`` or ``image_size < 1``.
        DatasetNotFoundError: files missing (the message lists the paths looked for and how to get the files), or
            truncated/corrupt (the message names the file and the problem, e.g. a checksum mismatch).
    """
    key = str(name).strip().lower()
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names are: {', '.join(DATASETS)}")
    if not isinstance(val_fraction, (int, float)) or not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    if image_size is not None and (isinstance(image_size, bool) or int(image_size) != image_size or image_size < 1):
        raise ValueError(f"image_size must be a positive integer or None, got {image_size!r}")
    image_size = None if image_size is None else int(image_size)

    spec = DATASETS[key]
    root = resolve_data_root(data_root) if spec.needs_files else None
    return spec.load_fn()(spec, root, val_fraction=float(val_fraction), image_size=image_size, download=download,
                          cache_dir=resolve_cache_dir(cache_dir))


# --------------------------------------------------------------------------------------------------------------------
# Shared internals
# --------------------------------------------------------------------------------------------------------------------


def _val_split(n: int, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (train_idx, val_idx) over ``range(n)``; both sorted, disjoint, covering everything."""
    n_val = int(round(val_fraction * n))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def _resize(x: torch.Tensor, size: int | None, chunk: int = 1024) -> torch.Tensor:
    """Resize uint8 (N, C, H, W) to (N, C, size, size) with antialiased bilinear interpolation, rounding to uint8."""
    if size is None or (x.shape[-2] == size and x.shape[-1] == size):
        return x
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=torch.uint8)
    for i in range(0, x.shape[0], chunk):
        xf = x[i : i + chunk].to(torch.float32)
        y = F.interpolate(xf, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[i : i + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _make_splits(name, train_x, train_y, test_x, test_y, val_fraction, image_size, root) -> DataSplits:
    tr, va = _val_split(len(train_y), val_fraction)
    return DataSplits(
        name=name,
        num_classes=DATASETS[name].num_classes,
        train_x=_resize(train_x[tr].contiguous(), image_size),
        train_y=train_y[tr].to(torch.int64).contiguous(),
        val_x=_resize(train_x[va].contiguous(), image_size),
        val_y=train_y[va].to(torch.int64).contiguous(),
        test_x=_resize(test_x.contiguous(), image_size),
        test_y=test_y.to(torch.int64).contiguous(),
        root=str(root),
    )


def _check_arrays(name: str, what: str, x: torch.Tensor, y: torch.Tensor, channels: int, hw: tuple | None) -> None:
    """Validate loaded (N, C, H, W) uint8 images and labels; raise DatasetNotFoundError describing the problem."""
    n_cls = DATASETS[name].num_classes
    problem = None
    if x.ndim != 4 or x.shape[1] != channels:
        problem = f"expected images of shape (N, {channels}, H, W), got {tuple(x.shape)}"
    elif hw is not None and tuple(x.shape[2:]) != tuple(hw):
        problem = f"expected {hw[0]}x{hw[1]} images, got {tuple(x.shape[2:])}"
    elif len(x) != len(y):
        problem = f"{len(x)} images but {len(y)} labels"
    elif len(y) == 0:
        problem = "no images"
    elif int(y.min()) < 0 or int(y.max()) >= n_cls:
        problem = f"labels must lie in 0..{n_cls - 1}, found {int(y.min())}..{int(y.max())}"
    if problem:
        raise DatasetNotFoundError(f"{name}: {what} is corrupt or not in the expected format: {problem}")


def _reraise(e: BaseException) -> None:
    """Let our own errors and out-of-memory propagate unchanged."""
    if isinstance(e, (DB3KDError, MemoryError, KeyboardInterrupt)):
        raise e


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _md5(path: Path) -> str:
    return calculate_md5(str(path))


def _download_failed(name: str, root: Path, e: BaseException) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{name}: download into {root} failed ({type(e).__name__}: {e}). Downloading needs internet access and a "
        f"writable data root; otherwise place the files under the data root yourself ({_HINT_DATA_ROOT})."
    )


# --------------------------------------------------------------------------------------------------------------------
# digits (scikit-learn, embedded)
# --------------------------------------------------------------------------------------------------------------------


def _fetch_if_missing(key: str, root: Path, download: bool, missing: Callable[[], bool], fetch: Callable[[], object]) -> None:
    """Run torchvision's download (``fetch``) when asked to and ``missing()``; any failure becomes one
    DatasetNotFoundError naming the dataset and the data root."""
    if download and missing():
        try:
            fetch()
        except Exception as e:  # noqa: BLE001 - any torchvision/network failure becomes one clear error
            _reraise(e)
            raise _download_failed(key, root, e) from e


def _files_not_found(key: str, root: Path, looked: list[str], how: str) -> DatasetNotFoundError:
    """The error for absent dataset files: what was looked for, where, and how to get them."""
    where = "" if root.is_dir() else f" (the data root {root} does not exist)"
    return DatasetNotFoundError(
        f"{key}: dataset files not found{where}. Looked for:\n" + "\n".join(f"  {line}" for line in looked)
        + f"\nHow to get them: {how}"
    )


def load_digits(spec: DatasetSpec, root: Path | None, *, val_fraction: float, image_size: int | None,
                download: bool = False, cache_dir: Path | None = None) -> DataSplits:
    """scikit-learn's embedded digits, upsampled to ``spec.input_shape`` (no files, ``root`` unused)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x8 = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) * (255.0 / 16.0)  # (1797, 1, 8, 8), 0..255
    size = image_size or spec.input_shape[-1]
    x = F.interpolate(x8, size=(size, size), mode="bilinear", align_corners=False, antialias=size < 8)
    x = x.round_().clamp_(0, 255).to(torch.uint8)
    y = torch.as_tensor(d.target, dtype=torch.int64)
    idx_rest, idx_test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=d.target, random_state=0)
    idx_rest = torch.as_tensor(np.sort(idx_rest))
    idx_test = torch.as_tensor(np.sort(idx_test))
    return _make_splits(spec.name, x[idx_rest], y[idx_rest], x[idx_test], y[idx_test], val_fraction, None, "sklearn")


# --------------------------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST
# --------------------------------------------------------------------------------------------------------------------

def _locate_mnist_files(raw_dir: Path, files) -> dict[str, list[Path]]:
    """For each IDX file name, the existing candidates in preference order (uncompressed first, then ``.gz``)."""
    return {f: [p for p in (raw_dir / f, raw_dir / f"{f}.gz") if p.is_file()] for f in files}


def _cache_write_error(cache_raw: Path, e: BaseException) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"cannot write extracted dataset files to the cache folder {cache_raw} ({type(e).__name__}: {e}); "
        f"pass cache_dir=... or set the environment variable DB3KD_CACHE to a writable folder"
    )


def _verifies(path: Path, expected: str) -> bool:
    try:
        return path.is_file() and _sha256(path) == expected
    except OSError:
        return False


def _check_file(path: Path, expected: str) -> str | None:
    """Problem string for an uncompressed IDX file whose SHA-256 is not ``expected`` (None if it verifies)."""
    try:
        got = _sha256(path)
    except OSError as e:
        return f"{path}: cannot be read ({type(e).__name__}: {e})"
    if got != expected:
        return f"{path}: checksum mismatch: expected sha256 {expected}, got {got}"
    return None


def _copy_to_cache(src: Path, dest: Path, expected: str) -> None:
    """Copy an already-verified uncompressed file into the cache (atomically), unless a verified copy is there."""
    if _verifies(dest, expected):
        return
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    except OSError as e:
        raise _cache_write_error(dest.parent, e) from e
    finally:
        tmp.unlink(missing_ok=True)


def _extract_verified(src_gz: Path, dest: Path, expected: str) -> str | None:
    """Decompress ``src_gz`` into ``dest`` (atomically) if its content has SHA-256 ``expected``.

    Returns None on success, else a string naming ``src_gz`` and the problem (bad gzip stream, checksum mismatch).
    Raises DatasetNotFoundError if the cache folder cannot be written.
    """
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    try:
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fout = open(tmp, "wb")
        except OSError as e:
            raise _cache_write_error(dest.parent, e) from e
        h = hashlib.sha256()
        with fout:
            try:
                fin = gzip.open(src_gz, "rb")
            except OSError as e:
                return f"{src_gz}: cannot be read ({type(e).__name__}: {e})"
            with fin:
                while True:
                    try:
                        b = fin.read(1 << 20)
                    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
                        return f"{src_gz}: truncated or not a valid gzip file ({type(e).__name__}: {e})"
                    if not b:
                        break
                    h.update(b)
                    try:
                        fout.write(b)
                    except OSError as e:
                        raise _cache_write_error(dest.parent, e) from e
        got = h.hexdigest()
        if got != expected:
            return f"{src_gz}: checksum mismatch of the decompressed content: expected sha256 {expected}, got {got}"
        try:
            os.replace(tmp, dest)
        except OSError as e:
            raise _cache_write_error(dest.parent, e) from e
        return None
    finally:
        tmp.unlink(missing_ok=True)


def load_mnist_like(spec: DatasetSpec, root: Path, *, val_fraction: float, image_size: int | None,
                    download: bool = False, cache_dir: Path) -> DataSplits:
    """An MNIST-format dataset: the IDX files ``spec.checksums`` under ``<root>/<spec.folder>/raw/``, read by
    torchvision's ``spec.options["torchvision_class"]`` (MNIST, FashionMNIST, ...)."""
    key, folder, checksums = spec.name, spec.folder, dict(spec.checksums)
    tv_cls = getattr(tv_datasets, spec.options["torchvision_class"])
    hw = tuple(spec.input_shape[1:])
    raw_dir = root / folder / "raw"
    found = _locate_mnist_files(raw_dir, checksums)

    _fetch_if_missing(key, root, download, lambda: not all(found.values()),
                      lambda: tv_cls(str(root), train=True, download=True))
    found = _locate_mnist_files(raw_dir, checksums)

    missing = [f for f, c in found.items() if not c]
    if missing:
        raise _files_not_found(
            key, root, [f"{raw_dir / f}  (or {raw_dir / f}.gz)" for f in missing],
            f"on these machines an offline copy lives in ../shared/datasets relative to the "
            f"project checkout: use --data-root ../shared/datasets (or set DB3KD_DATA); {_HINT_DOWNLOAD}; or copy "
            f"torchvision's {folder}/raw/ files (gzip-compressed or not) under the data root.",
        )

    # Verify every file; uncompressed ones in the data root are used in place, gzip ones go through the cache.
    problems: list[str] = []
    chosen: dict[str, Path] = {}
    cache_raw = cache_dir / folder / "raw"
    for fname, cands in found.items():
        expected = checksums[fname]
        cached = cache_raw / fname
        file_problems = []
        for cand in cands:
            if cand.suffix == ".gz":
                if _verifies(cached, expected):  # extracted and verified on an earlier run: reuse it
                    chosen[fname] = cached
                    break
                problem = _extract_verified(cand, cached, expected)
            else:
                problem = _check_file(cand, expected)
            if problem:
                file_problems.append(problem)
                continue
            chosen[fname] = cached if cand.suffix == ".gz" else cand
            break
        if fname not in chosen:
            problems.extend(file_problems)
    if problems:
        raise DatasetNotFoundError(
            f"{key}: dataset files under {raw_dir} are truncated or corrupt:\n"
            + "\n".join(f"  {p}" for p in problems)
            + f"\nReplace them with the official files ({_HINT_DOWNLOAD}; on these machines use "
            f"--data-root ../shared/datasets)."
        )

    # torchvision reads one folder: the data root if every file verified there uncompressed, else the cache.
    in_place = all(p.parent == raw_dir for p in chosen.values())
    if not in_place:
        for fname, p in chosen.items():
            if p.parent == raw_dir:
                _copy_to_cache(p, cache_raw / fname, checksums[fname])
    read_root = root if in_place else cache_dir
    try:
        train = tv_cls(str(read_root), train=True, download=False)
        test = tv_cls(str(read_root), train=False, download=False)
        train_x, train_y = train.data.unsqueeze(1), train.targets
        test_x, test_y = test.data.unsqueeze(1), test.targets
    except Exception as e:  # noqa: BLE001
        _reraise(e)
        raise DatasetNotFoundError(
            f"{key}: torchvision could not read the files in {read_root / folder / 'raw'} "
            f"({type(e).__name__}: {e})"
        ) from e
    _check_arrays(key, f"train files in {read_root / folder / 'raw'}", train_x, train_y, spec.channels, hw)
    _check_arrays(key, f"test files in {read_root / folder / 'raw'}", test_x, test_y, spec.channels, hw)
    return _make_splits(key, train_x, train_y, test_x, test_y, val_fraction, image_size, raw_dir)


# --------------------------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# --------------------------------------------------------------------------------------------------------------------


class _CIFAR10Files(tv_datasets.CIFAR10):
    """torchvision's CIFAR10 with the md5 check replaced by an existence check (db3kd validates content itself)."""

    def _file_paths(self) -> list[Path]:
        base = Path(self.root) / self.base_folder
        return [base / f for f, _ in self.train_list + self.test_list] + [base / self.meta["filename"]]

    def _check_integrity(self) -> bool:
        return all(p.is_file() for p in self._file_paths())

    def _load_meta(self) -> None:
        path = Path(self.root) / self.base_folder / self.meta["filename"]
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
        self.classes = data[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class _CIFAR100Files(_CIFAR10Files):
    base_folder = tv_datasets.CIFAR100.base_folder
    url = tv_datasets.CIFAR100.url
    filename = tv_datasets.CIFAR100.filename
    tgz_md5 = tv_datasets.CIFAR100.tgz_md5
    train_list = tv_datasets.CIFAR100.train_list
    test_list = tv_datasets.CIFAR100.test_list
    meta = tv_datasets.CIFAR100.meta


_CIFAR_INFO = {"CIFAR10": _CIFAR10Files, "CIFAR100": _CIFAR100Files}


def _diagnose_cifar(cls, base: Path, num_classes: int) -> list[str]:
    """Open every CIFAR pickle individually and describe what is wrong with each (empty list: nothing found)."""
    problems = []
    label_key = "labels" if cls.meta["key"] == "label_names" else "fine_labels"
    for fname, _ in cls.train_list + cls.test_list:
        path = base / fname
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
        except Exception as e:  # noqa: BLE001
            _reraise(e)
            problems.append(f"{path}: cannot be unpickled, truncated or corrupt ({type(e).__name__}: {e})")
            continue
        if not isinstance(entry, dict) or "data" not in entry or label_key not in entry:
            problems.append(f"{path}: not a CIFAR batch (expected a dict with 'data' and '{label_key}')")
            continue
        data, labels = np.asarray(entry["data"]), np.asarray(entry[label_key])
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
            problems.append(
                f"{path}: wrong image shape or channel count: expected uint8 rows of 3*32*32=3072 values "
                f"(3 channels of 32x32), got {data.dtype} {data.shape}"
            )
        elif len(labels) != len(data):
            problems.append(f"{path}: {len(data)} images but {len(labels)} labels")
        elif len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            problems.append(f"{path}: labels must lie in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}")
    meta = base / cls.meta["filename"]
    try:
        with open(meta, "rb") as f:
            names = pickle.load(f, encoding="latin1")[cls.meta["key"]]
        if len(names) != num_classes:
            problems.append(f"{meta}: expected {num_classes} class names, got {len(names)}")
    except Exception as e:  # noqa: BLE001
        _reraise(e)
        problems.append(f"{meta}: cannot be read as CIFAR metadata ({type(e).__name__}: {e})")
    return problems


def _warn_if_unofficial(name: str, checks: list[tuple[Path, str]]) -> None:
    """Emit one UserWarning if any file's md5 differs from torchvision's official list."""
    bad = [str(p) for p, md5 in checks if _md5(p) != md5]
    if bad:
        warnings.warn(
            f"{name}: {len(bad)} file(s) are not the official release (md5 differs from torchvision's list), "
            f"e.g. {bad[0]}; results on this data are not comparable to published numbers",
            UserWarning,
            stacklevel=4,
        )


def load_cifar(spec: DatasetSpec, root: Path, *, val_fraction: float, image_size: int | None,
               download: bool = False, cache_dir: Path | None = None) -> DataSplits:
    """A CIFAR-format dataset (torchvision's pickle batches), ``spec.options["torchvision_class"]`` CIFAR10 or
    CIFAR100; contents are validated here and unofficial files (md5) warned about."""
    key = spec.name
    cls = _CIFAR_INFO[spec.options["torchvision_class"]]
    base = root / cls.base_folder
    num_classes = spec.num_classes
    files = [base / f for f, _ in cls.train_list + cls.test_list] + [base / cls.meta["filename"]]

    _fetch_if_missing(key, root, download, lambda: not all(p.is_file() for p in files),
                      lambda: cls(str(root), train=True, download=True))
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise _files_not_found(
            key, root, [str(p) for p in missing],
            f"{_HINT_DOWNLOAD}, or unpack torchvision's {cls.filename} under the data root "
            f"({_HINT_DATA_ROOT}). There is no offline copy on these machines; for tests, "
            f"db3kd.fakedata.write_fake_{key}(root) writes a small fake copy in the same format.",
        )

    try:
        train = cls(str(root), train=True, download=False)
        test = cls(str(root), train=False, download=False)
        tr_x = torch.from_numpy(np.ascontiguousarray(train.data)).permute(0, 3, 1, 2).contiguous()
        te_x = torch.from_numpy(np.ascontiguousarray(test.data)).permute(0, 3, 1, 2).contiguous()
        tr_y = torch.as_tensor(np.asarray(train.targets), dtype=torch.int64)
        te_y = torch.as_tensor(np.asarray(test.targets), dtype=torch.int64)
        n_names = len(train.classes)
    except Exception as e:  # noqa: BLE001
        _reraise(e)
        problems = _diagnose_cifar(cls, base, num_classes) or [f"{base}: {type(e).__name__}: {e}"]
        raise DatasetNotFoundError(
            f"{key}: dataset files are truncated or corrupt:\n" + "\n".join(f"  {p}" for p in problems)
        ) from e
    try:
        _check_arrays(key, f"training batches in {base}", tr_x, tr_y, spec.channels, tuple(spec.input_shape[1:]))
        _check_arrays(key, f"test batch in {base}", te_x, te_y, spec.channels, tuple(spec.input_shape[1:]))
        if n_names != num_classes:
            raise DatasetNotFoundError(f"{key}: {base / cls.meta['filename']} lists {n_names} classes, not {num_classes}")
    except DatasetNotFoundError as e:
        problems = _diagnose_cifar(cls, base, num_classes)
        if problems:
            raise DatasetNotFoundError(
                f"{key}: dataset files are truncated or corrupt:\n" + "\n".join(f"  {p}" for p in problems)
            ) from e
        raise
    _warn_if_unofficial(
        key, [(base / f, md5) for f, md5 in cls.train_list + cls.test_list] + [(base / cls.meta["filename"], cls.meta["md5"])]
    )
    return _make_splits(key, tr_x, tr_y, te_x, te_y, val_fraction, image_size, base)


# --------------------------------------------------------------------------------------------------------------------
# Flowers102
# --------------------------------------------------------------------------------------------------------------------


class _Flowers102Files(tv_datasets.Flowers102):
    """torchvision's Flowers102 with the md5 check replaced by an existence check (db3kd validates content itself)."""

    def _check_integrity(self) -> bool:
        if not self._images_folder.is_dir():
            return False
        return all((self._base_folder / self._file_dict[k][0]).is_file() for k in ("label", "setid"))


def load_flowers102(spec: DatasetSpec, root: Path, *, val_fraction: float, image_size: int | None,
                    download: bool = False, cache_dir: Path | None = None) -> DataSplits:
    """Oxford Flowers102 with its official train/val/test split (``val_fraction`` unused), resized and
    centre-cropped to ``image_size`` (default ``spec.image_size``)."""
    image_size = image_size or spec.image_size or spec.input_shape[-1]
    cls = _Flowers102Files
    base = root / spec.folder
    needed = [base / "jpg", base / cls._file_dict["label"][0], base / cls._file_dict["setid"][0]]

    def _missing() -> list[Path]:
        return [p for p in needed if not (p.is_dir() if p.name == "jpg" else p.is_file())]

    _fetch_if_missing(spec.name, root, download, lambda: bool(_missing()),
                      lambda: cls(str(root), split="train", download=True))
    missing = _missing()
    if missing:
        raise _files_not_found(
            spec.name, root, [f"{p}{'/ (folder of image_NNNNN.jpg)' if p.name == 'jpg' else ''}" for p in missing],
            f"{_HINT_DOWNLOAD}, or unpack 102flowers.tgz and put imagelabels.mat and setid.mat "
            f"into {base} ({_HINT_DATA_ROOT}). There is no offline copy on these machines; for tests, "
            f"db3kd.fakedata.write_fake_flowers102(root) writes a small fake copy in the same format.",
        )

    transform = tv_transforms.Compose(
        [tv_transforms.Resize(image_size), tv_transforms.CenterCrop(image_size), tv_transforms.PILToTensor()]
    )
    out = {}
    for split in ("train", "val", "test"):
        try:
            ds = cls(str(root), split=split, download=False)
            files, labels = list(ds._image_files), list(ds._labels)
        except Exception as e:  # noqa: BLE001
            _reraise(e)
            raise DatasetNotFoundError(
                f"{spec.name}: cannot read the {split} split from {base / 'setid.mat'} and {base / 'imagelabels.mat'}: "
                f"truncated or corrupt ({type(e).__name__}: {e})"
            ) from e
        x = torch.empty((len(files), 3, image_size, image_size), dtype=torch.uint8)
        for i, path in enumerate(files):
            try:
                img = ds.loader(path)
                t = transform(img)
            except Exception as e:  # noqa: BLE001
                _reraise(e)
                problem = "missing" if not Path(path).is_file() else "truncated or corrupt"
                raise DatasetNotFoundError(
                    f"{spec.name}: image {path} (listed in setid.mat, {split} split) is {problem} "
                    f"({type(e).__name__}: {e})"
                ) from e
            if t.shape != (3, image_size, image_size):
                raise DatasetNotFoundError(
                    f"{spec.name}: image {path} has wrong shape or channel count {tuple(t.shape)} after resizing"
                )
            x[i] = t
        y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        _check_arrays(spec.name, f"the {split} split in {base}", x, y, 3, (image_size, image_size))
        out[split] = (x, y)
    _warn_if_unofficial(spec.name, [(base / f, md5) for k, (f, md5) in cls._file_dict.items() if k != "image"])
    return DataSplits(
        name=spec.name,
        num_classes=spec.num_classes,
        train_x=out["train"][0],
        train_y=out["train"][1],
        val_x=out["val"][0],
        val_y=out["val"][1],
        test_x=out["test"][0],
        test_y=out["test"][1],
        root=str(base),
    )
