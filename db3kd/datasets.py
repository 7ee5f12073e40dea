"""The dataset registry: what each dataset is, in one place; everything else derives from it.

One :class:`DatasetSpec` per dataset holds its class count, input shape, the paper's teacher and
student architectures, the checksums of its files, its loader and its per-profile settings. The
names the CLI accepts (``db3kd run --dataset``), the benchmark markers (``pytest -m mnist``),
:data:`db3kd.config.DATASETS`, :data:`db3kd.data.DATASETS` and the resolved profiles all read
:data:`DATASETS`. As torchvision's ``FashionMNIST`` overrides only ``MNIST``'s resources and
classes, ``fmnist`` below is ``mnist`` with another folder and other checksums
(:func:`dataclasses.replace`).

This module imports nothing heavy (no torch): loaders are named as ``"module:function"`` and
imported when a dataset is first loaded.

Adding a dataset from outside the package: build a :class:`DatasetSpec` and either call
:func:`register_dataset` on import of your module, or point an entry point of group
``db3kd.datasets`` at the spec (``[project.entry-points."db3kd.datasets"] mydata =
"mypkg.data:SPEC"``); entry points load the first time the registry is read.

Per-profile settings (``profiles``): ``{profile: {"teacher": {...}, "student": {...},
"image_size": int, "oracle_batch": int}}`` update the profile's shared values
(:data:`db3kd.config.PROFILE_DEFAULTS`) key by key for this dataset only.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Callable

__all__ = ["DatasetSpec", "DATASETS", "register_dataset", "get_dataset", "dataset_names", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "db3kd.datasets"


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset is in this suite.

    name: the id (``--dataset``, benchmark marker, record folder); num_classes: labels lie in
    ``0 .. num_classes - 1``; input_shape: (C, H, W) of the images as loaded at native size;
    teacher / student: the paper's architectures (names of :func:`db3kd.models.get_model`);
    loader: ``"module:function"`` or a callable ``loader(spec, root, *, val_fraction, image_size,
    download, cache_dir) -> db3kd.data.DataSplits`` (``root`` is None when ``needs_files`` is
    False); description: the benchmark marker's help text; image_size: the side length runs
    resize to by default (None = native); folder: the dataset's folder under the data root;
    checksums: file name -> SHA-256 of its content; options: loader-specific values (e.g. the
    torchvision class); profiles: per-profile settings (module docstring).
    """

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    teacher: str
    student: str
    loader: str | Callable[..., Any]
    description: str = ""
    image_size: int | None = None
    folder: str | None = None
    checksums: Mapping[str, str] = field(default_factory=dict)
    needs_files: bool = True
    options: Mapping[str, Any] = field(default_factory=dict)
    profiles: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return int(self.input_shape[0])

    def load_fn(self) -> Callable[..., Any]:
        """The loader as a callable (imports its module on first use)."""
        if callable(self.loader):
            return self.loader
        module, _, name = str(self.loader).partition(":")
        return getattr(importlib.import_module(module), name)

    def profile(self, profile: str) -> Mapping[str, Any]:
        """This dataset's settings for ``profile`` ({} when it uses the shared values only)."""
        return self.profiles.get(profile, {})


class _Registry(Mapping[str, DatasetSpec]):
    """name -> DatasetSpec, in registration order; entry points load on first read."""

    def __init__(self) -> None:
        self._specs: dict[str, DatasetSpec] = {}
        self._plugins_loaded = False

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        from importlib.metadata import entry_points

        from db3kd.errors import ConfigError

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                obj = ep.load()
            except Exception as exc:  # noqa: BLE001 - one clear line naming the plugin
                raise ConfigError(f"dataset plugin {ep.name!r} ({ep.value}) failed to import: "
                                  f"{type(exc).__name__}: {exc}") from None
            if isinstance(obj, DatasetSpec):
                register_dataset(obj)

    def __getitem__(self, name: str) -> DatasetSpec:
        self._load_plugins()
        return self._specs[name]

    def __iter__(self) -> Iterator[str]:
        self._load_plugins()
        return iter(list(self._specs))

    def __len__(self) -> int:
        self._load_plugins()
        return len(self._specs)

    def __repr__(self) -> str:
        return f"DATASETS({', '.join(self)})"


#: Every registered dataset (a read-only mapping name -> :class:`DatasetSpec`).
DATASETS = _Registry()


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add ``spec`` to :data:`DATASETS`; returns it. Raises ValueError for a duplicate name or bad fields."""
    if not isinstance(spec, DatasetSpec):
        raise ValueError(f"register_dataset expects a DatasetSpec, got {type(spec).__name__}")
    if not spec.name or not spec.name.replace("_", "").replace("-", "").isalnum() or spec.name != spec.name.lower():
        raise ValueError(f"dataset name must be lowercase letters, digits, '-' or '_', got {spec.name!r}")
    if spec.num_classes < 2 or len(spec.input_shape) != 3:
        raise ValueError(f"dataset {spec.name!r}: needs num_classes >= 2 and input_shape (C, H, W)")
    old = DATASETS._specs.get(spec.name)
    if old is not None and old != spec:
        raise ValueError(f"duplicate dataset name {spec.name!r}")
    DATASETS._specs[spec.name] = spec
    return spec


def get_dataset(name: str) -> DatasetSpec:
    """The spec registered as ``name``; raises :class:`db3kd.errors.ConfigError` listing the valid names."""
    try:
        return DATASETS[name]
    except KeyError:
        from db3kd.errors import ConfigError

        raise ConfigError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}") from None


def dataset_names() -> list[str]:
    """Every registered dataset name, in registration order."""
    return list(DATASETS)


# ------------------------------------------------------------------------------------------------
# the built-in datasets. Per-dataset profile values sit in each entry's ``profiles``; the values
# shared by every dataset of a profile are db3kd.config.PROFILE_DEFAULTS.
# ------------------------------------------------------------------------------------------------

_ALEXNET_TEACHER_PAPER = dict(epochs=200, batch_size=1024, lr=0.1, optimizer="sgd", weight_decay=1e-4,
                              lr_milestones=(60, 120))
_RESNET_PAPER = dict(epochs=200, batch_size=128, lr=0.1, optimizer="sgd", weight_decay=5e-4,
                     lr_milestones=(60, 120, 160), lr_gamma=0.2, augment="crop_flip")  # CIFAR-100 recipe

DIGITS = register_dataset(DatasetSpec(
    name="digits", num_classes=10, input_shape=(1, 16, 16), teacher="lenet5", student="lenet5-half",
    loader="db3kd.data:load_digits", description="scikit-learn 8x8 digits (embedded, needs no files)",
    needs_files=False,
    profiles={
        "paper": {"teacher": dict(epochs=100, batch_size=64, lr=1e-3)},
        "cpu": {"teacher": dict(epochs=30, batch_size=64, lr=1e-3),
                "student": dict(epochs=40, batch_size=64, lr=5e-3, train_subset=None)},
        "smoke": {"teacher": dict(epochs=8, batch_size=64, lr=2e-3, train_subset=None),
                  "student": dict(epochs=10, batch_size=32, lr=5e-3, train_subset=200)},
    },
))

# SHA-256 of the *decompressed* IDX files (shared/datasets/SHA256SUMS.raw.txt): they identify the
# official content whatever the compression.
MNIST = register_dataset(DatasetSpec(
    name="mnist", num_classes=10, input_shape=(1, 28, 28), teacher="lenet5", student="lenet5-half",
    loader="db3kd.data:load_mnist_like", description="MNIST (torchvision layout under --data-root)",
    folder="MNIST", options={"torchvision_class": "MNIST"},
    checksums={
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
))

FMNIST = register_dataset(replace(
    MNIST, name="fmnist", description="Fashion-MNIST (torchvision layout under --data-root)",
    folder="FashionMNIST", options={"torchvision_class": "FashionMNIST"},
    checksums={
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
))

CIFAR10 = register_dataset(DatasetSpec(
    name="cifar10", num_classes=10, input_shape=(3, 32, 32), teacher="alexnet", student="alexnet-half",
    loader="db3kd.data:load_cifar", description="CIFAR-10 (cifar-10-batches-py; smoke profile: synthetic copy when absent)",
    folder="cifar-10-batches-py", options={"torchvision_class": "CIFAR10"},
    profiles={
        "paper": {"teacher": _ALEXNET_TEACHER_PAPER},
        "cpu": {"teacher": dict(epochs=5, batch_size=128, lr=1e-3, train_subset=10000),
                "student": dict(epochs=10, batch_size=128, lr=1e-3, train_subset=1000)},
        "smoke": {"teacher": dict(epochs=2, batch_size=32, lr=1e-3, train_subset=None)},
    },
))

CIFAR100 = register_dataset(replace(
    CIFAR10, name="cifar100", num_classes=100, teacher="resnet34", student="resnet18",
    description="CIFAR-100 (cifar-100-python under --data-root)", folder="cifar-100-python",
    options={"torchvision_class": "CIFAR100"},
    profiles={
        "paper": {"teacher": _RESNET_PAPER, "student": _RESNET_PAPER},
        "cpu": {"teacher": dict(epochs=3, batch_size=128, lr=1e-3, train_subset=10000),
                "student": dict(epochs=5, batch_size=128, lr=1e-3, train_subset=1000)},
        "smoke": {"teacher": dict(arch="resnet18", epochs=1, batch_size=32, lr=1e-3, train_subset=None),
                  "student": dict(arch="resnet18", epochs=1, batch_size=32, lr=1e-3, train_subset=100)},
    },
))

FLOWERS102 = register_dataset(DatasetSpec(
    name="flowers102", num_classes=102, input_shape=(3, 224, 224), teacher="resnet34", student="resnet18",
    loader="db3kd.data:load_flowers102", description="Oxford Flowers102 (flowers-102 under --data-root)",
    image_size=224, folder="flowers-102",
    profiles={
        "paper": {"teacher": _RESNET_PAPER, "student": dict(_RESNET_PAPER, epochs=200, batch_size=32)},
        "cpu": {"image_size": 64, "teacher": dict(epochs=10, batch_size=32, lr=1e-3),
                "student": dict(epochs=10, batch_size=32, lr=1e-3, train_subset=None)},
        "smoke": {"image_size": 32, "teacher": dict(arch="resnet18", epochs=1, batch_size=16, lr=1e-3),
                  "student": dict(arch="resnet18", epochs=1, batch_size=16, lr=1e-3, train_subset=None)},
    },
))
