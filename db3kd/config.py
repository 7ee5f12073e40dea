"""Run configuration: profiles, validation and the resolved, hashable configuration of a run.

Every value a run uses sits in :data:`DATASETS` (what each dataset is) and :data:`PROFILES`
(how much work each profile does); method hyperparameters live with their method
(:mod:`db3kd.registry`). :func:`resolve` merges them into one :class:`RunConfig`, which every
run prints or stores in full and hashes (:meth:`RunConfig.config_hash`) to address caches.

Profiles:

* ``paper`` -- the paper's settings (GPU scale): full training sets, 100 references per class,
  MBD budgets up to 20k queries per pair, 100 student epochs.
* ``cpu`` -- the same pipeline reduced to finish on 2 CPU cores: a fixed subset of training
  samples for label construction and student training, fewer references, smaller budgets/epochs.
* ``smoke`` -- seconds, for tests.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from db3kd.errors import ConfigError

__all__ = ["DATASETS", "PROFILES", "DatasetSpec", "StageConfig", "RunConfig", "resolve", "validate_model"]

PROFILE_NAMES = ("smoke", "cpu", "paper")


def validate_model(cls: type[BaseModel], values: dict[str, Any], *, where: str = "config") -> BaseModel:
    """``cls(**values)`` turning pydantic's errors into one ConfigError naming key, value and rule."""
    try:
        return cls(**values)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "<root>"
            value = err.get("input")
            if err["type"] == "extra_forbidden":
                allowed = ", ".join(sorted(cls.model_fields))
                lines.append(f"unknown {where} {key!r} (value {value!r}); allowed keys: {allowed}")
            else:
                lines.append(f"invalid {where} {key}={value!r}: {err['msg']}")
        raise ConfigError("; ".join(lines)) from None


class StageConfig(BaseModel):
    """One training stage (teacher or student): architecture and optimisation.

    epochs >= 1; batch_size >= 1; lr > 0; optimizer adam|sgd; lr_milestones: epochs where lr *= lr_gamma;
    augment none|crop_flip; train_subset: use only this many training images (None = all).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    arch: str
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    weight_decay: float = Field(default=0.0, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = Field(default=0.1, gt=0)
    augment: Literal["none", "crop", "crop_flip"] = "none"
    train_subset: int | None = Field(default=None, ge=1)

    def train_config(self):
        from db3kd.training import TrainConfig

        return TrainConfig(
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, optimizer=self.optimizer,
            weight_decay=self.weight_decay, momentum=self.momentum, lr_milestones=tuple(self.lr_milestones),
            lr_gamma=self.lr_gamma, augment=self.augment,
        )


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset is in this suite: classes, the paper's teacher and student, input size."""

    name: str
    num_classes: int
    teacher: str
    student: str
    image_size: int | None = None  # None = native


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec("digits", 10, "lenet5", "lenet5-half"),
    "mnist": DatasetSpec("mnist", 10, "lenet5", "lenet5-half"),
    "fmnist": DatasetSpec("fmnist", 10, "lenet5", "lenet5-half"),
    "cifar10": DatasetSpec("cifar10", 10, "alexnet", "alexnet-half"),
    "cifar100": DatasetSpec("cifar100", 100, "resnet34", "resnet18"),
    "flowers102": DatasetSpec("flowers102", 102, "resnet34", "resnet18", image_size=224),
}

# PROFILES[profile][dataset] -> {"teacher": {...}, "student": {...}, "image_size": ..., "oracle_batch": ...}
# "*" holds values shared by every dataset of the profile; a dataset entry updates it key by key.
_LENET_TEACHER_PAPER = dict(epochs=200, batch_size=1024, lr=5e-4)  # authors' code (REFERENCE.md section 4)
_ALEXNET_TEACHER_PAPER = dict(epochs=200, batch_size=1024, lr=0.1, optimizer="sgd", weight_decay=1e-4,
                              lr_milestones=(60, 120))
_RESNET_PAPER = dict(epochs=200, batch_size=128, lr=0.1, optimizer="sgd", weight_decay=5e-4,
                     lr_milestones=(60, 120, 160), lr_gamma=0.2, augment="crop_flip")  # CIFAR-100 recipe
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {
        "*": {"teacher": _LENET_TEACHER_PAPER, "student": dict(epochs=100, batch_size=512, lr=5e-3),
              "oracle_batch": "auto"},
        "digits": {"teacher": dict(epochs=100, batch_size=64, lr=1e-3)},
        "cifar10": {"teacher": _ALEXNET_TEACHER_PAPER},
        "cifar100": {"teacher": _RESNET_PAPER, "student": _RESNET_PAPER},
        "flowers102": {"teacher": _RESNET_PAPER, "student": dict(_RESNET_PAPER, epochs=200, batch_size=32)},
    },
    "cpu": {
        "*": {"teacher": dict(epochs=3, batch_size=128, lr=1e-3),
              "student": dict(epochs=20, batch_size=128, lr=5e-3, train_subset=2000), "oracle_batch": "auto"},
        "digits": {"teacher": dict(epochs=30, batch_size=64, lr=1e-3),
                   "student": dict(epochs=40, batch_size=64, lr=5e-3, train_subset=None)},
        "cifar10": {"teacher": dict(epochs=5, batch_size=128, lr=1e-3, train_subset=10000),
                    "student": dict(epochs=10, batch_size=128, lr=1e-3, train_subset=1000)},
        "cifar100": {"teacher": dict(epochs=3, batch_size=128, lr=1e-3, train_subset=10000),
                     "student": dict(epochs=5, batch_size=128, lr=1e-3, train_subset=1000)},
        "flowers102": {"image_size": 64, "teacher": dict(epochs=10, batch_size=32, lr=1e-3),
                       "student": dict(epochs=10, batch_size=32, lr=1e-3, train_subset=None)},
    },
    "smoke": {
        "*": {"teacher": dict(epochs=1, batch_size=64, lr=1e-3, train_subset=2000),
              "student": dict(epochs=10, batch_size=32, lr=5e-3, train_subset=200), "oracle_batch": 256},
        "digits": {"teacher": dict(epochs=8, batch_size=64, lr=2e-3, train_subset=None),
                   "student": dict(epochs=10, batch_size=32, lr=5e-3, train_subset=200)},
        "cifar10": {"teacher": dict(epochs=2, batch_size=32, lr=1e-3, train_subset=None)},
        "cifar100": {"teacher": dict(arch="resnet18", epochs=1, batch_size=32, lr=1e-3, train_subset=None),
                     "student": dict(arch="resnet18", epochs=1, batch_size=32, lr=1e-3, train_subset=100)},
        "flowers102": {"image_size": 32, "teacher": dict(arch="resnet18", epochs=1, batch_size=16, lr=1e-3),
                       "student": dict(arch="resnet18", epochs=1, batch_size=16, lr=1e-3, train_subset=None)},
    },
}


@dataclass(frozen=True)
class RunConfig:
    """The fully resolved configuration of one run. Everything that changes a result is in here."""

    dataset: str
    method: str
    profile: str
    seed: int
    num_classes: int
    image_size: int | None
    teacher: StageConfig
    student: StageConfig
    method_params: dict[str, Any]
    oracle_batch: int | str = "auto"  # images per teacher forward; "auto": measured per device and model (db3kd.layout)
    teacher_file: str | None = None  # a user's TorchScript / torch.export teacher replaces the built-in one
    query_budget: int | None = None  # total queries the method's oracle will answer (None = unlimited)
    val_fraction: float = 0.1
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["teacher"] = self.teacher.model_dump()
        d["student"] = self.student.model_dump()
        return d

    def config_hash(self) -> str:
        """12 hex digits of sha256 over the canonical JSON of :meth:`to_dict`."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def with_seed(self, seed: int) -> "RunConfig":
        return replace(self, seed=seed)


def _merged(profile: str, dataset: str) -> dict[str, Any]:
    table = PROFILES[profile]
    merged: dict[str, Any] = {}
    for key in ("*", dataset):
        for k, v in table.get(key, {}).items():
            merged[k] = {**merged.get(k, {}), **v} if isinstance(v, dict) else v
    return merged


def resolve(
    dataset: str = "digits",
    method: str = "db3kd-bd",
    profile: str = "cpu",
    seed: int = 0,
    *,
    method_overrides: dict[str, Any] | None = None,
    teacher_file: str | None = None,
    query_budget: int | None = None,
) -> RunConfig:
    """Resolve (dataset, method, profile, seed) into a :class:`RunConfig`.

    Raises ConfigError for an unknown dataset, method or profile, a negative seed, or a bad
    method override (unknown key, wrong type, out of range).
    """
    from db3kd.registry import get_method

    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")
    if profile not in PROFILE_NAMES:
        raise ConfigError(f"unknown profile {profile!r}; valid profiles: {', '.join(PROFILE_NAMES)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"invalid seed={seed!r}: must be an integer >= 0")
    if query_budget is not None and (isinstance(query_budget, bool) or not isinstance(query_budget, int) or query_budget < 0):
        raise ConfigError(f"invalid query_budget={query_budget!r}: must be an integer >= 0 (or None for unlimited)")
    spec = DATASETS[dataset]
    merged = _merged(profile, dataset)
    teacher = validate_model(StageConfig, {"arch": spec.teacher, **merged["teacher"]}, where="teacher setting")
    student = validate_model(StageConfig, {"arch": spec.student, **merged["student"]}, where="student setting")
    cls = get_method(method)
    params = cls.Params.for_profile(profile, dataset, method_overrides)
    return RunConfig(
        dataset=dataset, method=method, profile=profile, seed=seed, num_classes=spec.num_classes,
        image_size=merged.get("image_size", spec.image_size), teacher=teacher, student=student,
        method_params=params.model_dump(), oracle_batch=merged.get("oracle_batch", "auto"), teacher_file=teacher_file,
        query_budget=query_budget,
    )
