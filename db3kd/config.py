"""Run configuration: profiles, one settings language, and the resolved, hashable configuration of a run.

Every value a run uses sits in three places: the dataset registry (:mod:`db3kd.datasets`: what
each dataset is, and its per-profile settings), :data:`PROFILE_DEFAULTS` below (what each profile
does for every dataset), and each method's ``Params`` (:mod:`db3kd.registry`). :func:`resolve`
merges them into one :class:`RunConfig`, which every run prints or stores in full and hashes
(:meth:`RunConfig.config_hash`) to address caches.

Profiles:

* ``paper`` -- the paper's settings (GPU scale): full training sets, 100 references per class,
  MBD budgets up to 20k queries per pair, 100 student epochs.
* ``cpu`` -- the same pipeline reduced to finish on 2 CPU cores: a fixed subset of training
  samples for label construction and student training, fewer references, smaller budgets/epochs.
* ``smoke`` -- seconds, for tests.

Settings language (``db3kd run --set KEY=VALUE``, ``--config FILE.yaml``, the harness's
``--set``, and ``resolve(..., overrides=...)``) -- every key of the resolved configuration:

* top-level keys: ``val_fraction``, ``oracle_batch``, ``query_budget``, ``teacher_file``,
  ``image_size`` (and ``dataset``, ``method``, ``profile``, ``seed`` in a file);
* stage keys ``teacher.<field>`` / ``student.<field>`` (:class:`StageConfig`: ``arch``,
  ``epochs``, ``lr``, ``train_subset`` ...);
* method parameters, bare (``tau=0.5``) or as ``params.tau``;
* ``teacher_input.mean`` / ``teacher_input.std``: the input normalisation a user's teacher file
  expects (:class:`TeacherInput`), applied inside the oracle;
* ``extra.<key>``: free-form values carried into the config (and its hash).

Values are YAML scalars (``--set lr_milestones=[30,60]``, ``train_subset=null``), validated by
pydantic; a bad key or value raises one :class:`~db3kd.errors.ConfigError` line naming the key,
the value and the rule. What ``db3kd run --show-config`` prints (:func:`dump_config`) loads back
with :func:`load_config_file` to the same configuration and config hash.

Variants: :func:`config_diff` says what a configuration changes relative to the default of its
(dataset, method, profile); :attr:`RunConfig.variant` names it -- the user's name, else
``default`` when nothing differs, else the 8-hex-digit hash of the difference. Records are keyed
by (dataset, profile, method, variant, seed).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from db3kd.datasets import DATASETS, DatasetSpec, get_dataset
from db3kd.errors import ConfigError

__all__ = [
    "DATASETS",
    "PROFILE_NAMES",
    "PROFILE_DEFAULTS",
    "DatasetSpec",
    "StageConfig",
    "TeacherInput",
    "RunConfig",
    "resolve",
    "validate_model",
    "parse_value",
    "parse_set",
    "load_config_file",
    "dump_config",
    "config_diff",
    "describe_diff",
    "variant_of",
    "diff_hash",
    "profile_values",
    "DEFAULT_VARIANT",
    "TOP_LEVEL_KEYS",
]

PROFILE_NAMES = ("smoke", "cpu", "paper")
DEFAULT_VARIANT = "default"
IDENTITY_KEYS = ("dataset", "method", "profile", "seed")
STAGES = ("teacher", "student")
_VARIANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,47}$")


def validate_model(cls: type[BaseModel], values: dict[str, Any], *, where: str = "config", prefix: str = "") -> BaseModel:
    """``cls(**values)`` turning pydantic's errors into one ConfigError naming key, value and rule.

    ``prefix`` is put before every key in the message (``teacher.`` gives ``teacher.epochs``).
    """
    try:
        return cls(**values)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = prefix + (".".join(str(p) for p in err["loc"]) or "<root>")
            value = err.get("input")
            if err["type"] == "extra_forbidden":
                model, head = cls, ""  # a nested model's own keys (teacher_input.<mean|std>)
                for part in err["loc"][:-1]:
                    field_info = model.model_fields.get(str(part))
                    sub = [a for a in (get_args(field_info.annotation) or (field_info.annotation,))
                           if isinstance(a, type) and issubclass(a, BaseModel)] if field_info else []
                    if not sub:
                        break
                    model, head = sub[0], f"{head}{part}."
                allowed = ", ".join(prefix + head + k for k in sorted(model.model_fields))
                lines.append(f"unknown {where} {key!r} (value {value!r}); allowed keys: {allowed}")
            else:
                lines.append(f"invalid {where} {key}={value!r}: {err['msg']}")
        raise ConfigError("; ".join(lines)) from None


class StageConfig(BaseModel):
    """One training stage (teacher or student): architecture and optimisation.

    epochs >= 1; batch_size >= 1; lr > 0 (with ``schedule="onecycle"`` the peak lr); optimizer adam|sgd;
    lr_milestones: epochs where lr *= lr_gamma; schedule: ``none`` (constant lr, or the milestones) or
    ``onecycle`` (torch.optim.lr_scheduler.OneCycleLR stepped per batch, peak ``lr``; no milestones);
    augment none|crop|crop_flip; train_subset: use only this many training images (None = all);
    pretrained: torchvision weights to start from (e.g. ``IMAGENET1K_V1``; :mod:`db3kd.pretrained`), None = scratch.
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
    schedule: Literal["none", "onecycle"] = "none"
    pretrained: str | None = None

    @model_validator(mode="after")
    def _one_schedule(self):
        if self.schedule == "onecycle" and self.lr_milestones:
            raise ValueError(f"schedule='onecycle' sets the lr of every step; lr_milestones {self.lr_milestones} "
                             "would fight it (give one or the other)")
        return self

    def train_config(self):
        from db3kd.training import TrainConfig

        return TrainConfig(
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, optimizer=self.optimizer,
            weight_decay=self.weight_decay, momentum=self.momentum, lr_milestones=tuple(self.lr_milestones),
            lr_gamma=self.lr_gamma, augment=self.augment, schedule=self.schedule,
        )


class TeacherInput(BaseModel):
    """The preprocessing a user's teacher expects, applied inside the oracle: the teacher sees
    ``(x - mean) / std`` per channel while every distance, query and soft label stays in [0, 1]
    pixel units. mean, std: one value (all channels) or one per channel; std > 0.
    E.g. ``--set teacher_input.mean=[0.1307] --set teacher_input.std=[0.3081]`` (torchvision's MNIST)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    mean: tuple[float, ...] = Field(default=(0.0,), min_length=1)
    std: tuple[float, ...] = Field(default=(1.0,), min_length=1)

    @field_validator("std")
    @classmethod
    def _positive(cls, std):
        if any(not (s > 0) or s != s or s == float("inf") for s in std):
            raise ValueError(f"every std must be a finite number > 0, got {list(std)}")
        return std

    @field_validator("mean")
    @classmethod
    def _finite(cls, mean):
        if any(m != m or abs(m) == float("inf") for m in mean):
            raise ValueError(f"every mean must be finite, got {list(mean)}")
        return mean

    def check_channels(self, channels: int) -> None:
        """Raise ConfigError unless mean and std have 1 or ``channels`` entries."""
        for key, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, channels):
                raise ConfigError(f"invalid teacher_input.{key}={list(values)!r}: needs 1 or {channels} values "
                                  f"(one per image channel)")


class _TopLevel(BaseModel):
    """The settable top-level keys of a run (their rules)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    image_size: int | None = Field(default=None, ge=1)
    oracle_batch: int | str = "auto"  # images per teacher forward; "auto": measured per device and model (db3kd.layout)
    teacher_file: str | None = None
    query_budget: int | None = Field(default=None, ge=0)
    val_fraction: float = Field(default=0.1, ge=0, lt=1)
    teacher_seed: int = Field(default=0, ge=0)  # the teacher's own seed, shared by every method and run seed
    teacher_input: TeacherInput | None = None  # a user's teacher's input normalisation (None: [0, 1] pixels)

    @field_validator("oracle_batch", mode="before")
    @classmethod
    def _oracle_batch(cls, v):
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError("must be a positive int or 'auto' (measured per device and model)")


TOP_LEVEL_KEYS = tuple(_TopLevel.model_fields)

# ------------------------------------------------------------------------------------------------
# profiles: the values shared by every dataset of a profile. A dataset's own values (its
# registry entry's ``profiles``, db3kd/datasets.py) update these key by key.
# ------------------------------------------------------------------------------------------------
_LENET_TEACHER_PAPER = dict(epochs=200, batch_size=1024, lr=5e-4)  # authors' code (REFERENCE.md section 4)
PROFILE_DEFAULTS: dict[str, dict[str, Any]] = {
    "paper": {"teacher": _LENET_TEACHER_PAPER, "student": dict(epochs=100, batch_size=512, lr=5e-3),
              "oracle_batch": "auto"},
    # cpu students train on 10,000 images, the same for every method and seed (runner.select_subset, seed 0)
    "cpu": {"teacher": dict(epochs=3, batch_size=128, lr=1e-3),
            "student": dict(epochs=20, batch_size=128, lr=5e-3, train_subset=10000), "oracle_batch": "auto"},
    "smoke": {"teacher": dict(epochs=1, batch_size=64, lr=1e-3, train_subset=2000),
              "student": dict(epochs=10, batch_size=32, lr=5e-3, train_subset=200), "oracle_batch": 256},
}


def profile_values(profile: str, dataset: str) -> dict[str, Any]:
    """The merged profile settings of (profile, dataset): shared values updated by the dataset's own."""
    merged: dict[str, Any] = {}
    for table in (PROFILE_DEFAULTS[profile], get_dataset(dataset).profile(profile)):
        for k, v in table.items():
            merged[k] = {**merged.get(k, {}), **v} if isinstance(v, dict) else v
    return merged


#: keys of ``RunConfig.extra`` that label provenance (``params``: "tuned on val (N trials)") and
#: are kept in the record but left out of the config hash
PROVENANCE_KEYS = ("params",)


@dataclass(frozen=True)
class RunConfig:
    """The fully resolved configuration of one run. Everything that changes a result is in here.

    ``variant_name`` (the user's ``--variant``) labels the configuration; it is not part of
    :meth:`to_dict` or the hash (the same settings give the same hash whatever their name).
    """

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
    teacher_seed: int = 0  # the teacher's own seed: one teacher per (dataset, profile), shared by every method and seed
    teacher_file: str | None = None  # a user's TorchScript / torch.export teacher replaces the built-in one
    query_budget: int | None = None  # total queries the method's oracle will answer (None = unlimited)
    val_fraction: float = 0.1
    extra: dict[str, Any] = field(default_factory=dict)
    teacher_input: TeacherInput | None = None  # a user's teacher's input normalisation (None: [0, 1] pixels)
    variant_name: str | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("variant_name")
        d["teacher"] = self.teacher.model_dump()
        d["student"] = self.student.model_dump()
        d["teacher_input"] = None if self.teacher_input is None else self.teacher_input.model_dump()
        return d

    def config_hash(self) -> str:
        """12 hex digits of sha256 over the canonical JSON of :meth:`to_dict`, less the provenance
        labels of ``extra`` (:data:`PROVENANCE_KEYS`): they say where values came from, not what
        is computed, so a tuning study resumed without changing its choice reuses finished runs."""
        d = self.to_dict()
        d["extra"] = {k: v for k, v in d["extra"].items() if k not in PROVENANCE_KEYS}
        blob = json.dumps(d, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def with_seed(self, seed: int) -> "RunConfig":
        return replace(self, seed=seed)

    def with_variant(self, name: str | None) -> "RunConfig":
        """The same configuration labelled ``name`` (None: named by :func:`variant_of`). Raises ConfigError
        for a malformed name, or ``default`` on a configuration that differs from the default."""
        name = _check_variant_name(name)
        if name == DEFAULT_VARIANT and config_diff(self):
            raise ConfigError(f"invalid variant={name!r}: reserved for the default configuration, and this one "
                              f"differs from it ({describe_diff(config_diff(self))})")
        return replace(self, variant_name=name)

    @property
    def variant(self) -> str:
        """The variant's name: the user's, else ``default``, else the hash of :func:`config_diff`."""
        return variant_of(self)


# ------------------------------------------------------------------------------------------------
# values and keys
# ------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def parse_value(text: str) -> Any:
    """A ``--set`` value as YAML scalar / flow value: ``5`` -> 5, ``5e-4`` -> 0.0005, ``[30, 60]`` -> [30, 60],
    ``null`` / ``None`` / empty -> None, ``true`` -> True; anything else stays a string."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        if value == "None":
            return None
        if _NUMBER.match(value.strip()):  # YAML 1.1 reads 1e-5 (no dot) as a string
            return float(value)
    return value


def parse_set(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["student.epochs=5", "tau=0.5"]`` -> ``{"student.epochs": 5, "tau": 0.5}`` (typed by :func:`parse_value`).

    Later items win. Raises ConfigError for an item that is not ``KEY=VALUE``.
    """
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key or any(c.isspace() for c in key):
            raise ConfigError(f"--set expects KEY=VALUE (e.g. student.epochs=5), got {item!r}")
        out[key] = parse_value(value.strip())
    return out


def _flatten_sections(values: Mapping[str, Any]) -> dict[str, Any]:
    """Nested sections to dotted keys: {"teacher": {"epochs": 3}} -> {"teacher.epochs": 3};
    ``method_params`` becomes ``params.``; an empty section contributes nothing."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        key = str(key)
        if key in (*STAGES, "method_params", "params", "extra") and isinstance(value, Mapping):
            head = "params" if key == "method_params" else key
            for sub, v in value.items():
                out[f"{head}.{sub}"] = v
        else:
            out[key] = value
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML configuration file as flat/dotted settings (the keys :func:`resolve` takes as ``overrides``),
    plus ``dataset``, ``method``, ``profile``, ``seed`` and ``variant`` when the file has them.

    Accepts what :func:`dump_config` writes (nested ``teacher:``/``student:``/``method_params:``
    sections) and flat dotted keys (``student.epochs: 5``). Raises ConfigError naming the file for
    a missing file, invalid YAML or a top level that is not a mapping.
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = " ".join(str(exc).split())
        raise ConfigError(f"configuration file {path} is not valid YAML: {first[:300]}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"configuration file {path} must hold a mapping of settings, got {type(data).__name__}")
    return _flatten_sections(data)


def _plain(obj: Any) -> Any:
    """JSON-shaped copy (tuples -> lists) for YAML / hashing."""
    return json.loads(json.dumps(obj, default=str))


def dump_config(config: RunConfig) -> str:
    """The configuration as YAML that :func:`load_config_file` reads back to the same config hash.

    A comment header names the config hash and the variant; a user-named variant is a key.
    """
    import yaml

    diff = config_diff(config)
    lines = ["# db3kd run configuration: `db3kd run --config FILE` loads it back (same config hash)",
             f"# config hash: {config.config_hash()}",
             f"# variant: {config.variant}" + (f" ({describe_diff(diff)})" if diff else "")]
    body = _plain(config.to_dict())
    if config.variant_name:
        body["variant"] = config.variant_name
    return "\n".join(lines) + "\n" + yaml.safe_dump(body, sort_keys=False, default_flow_style=False)


def _check_variant_name(name: str | None) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str) or not _VARIANT_RE.match(name):
        raise ConfigError(f"invalid variant={name!r}: a variant name is 1-48 letters, digits or . _ + = - "
                          "(starting with a letter or digit)")
    return name


def _split(settings: Mapping[str, Any], method: str, params_cls) -> tuple[dict, dict, dict, dict, dict]:
    """Route settings to (identity, top-level, {stage: values}, method params, extra)."""
    identity: dict[str, Any] = {}
    top: dict[str, Any] = {}
    stages: dict[str, dict[str, Any]] = {s: {} for s in STAGES}
    params: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in _flatten_sections(settings).items():
        head, dot, rest = key.partition(".")
        if dot and head in STAGES:
            stages[head][rest] = value
        elif dot and head in ("params", "method_params"):
            params[rest] = value
        elif dot and head == "teacher_input":
            if not isinstance(top.get("teacher_input"), dict):
                top["teacher_input"] = {}
            top["teacher_input"][rest] = value
        elif dot and head == "extra":
            extra[rest] = value
        elif key in IDENTITY_KEYS or key == "num_classes":
            identity[key] = value
        elif key in TOP_LEVEL_KEYS:
            top[key] = value
        elif not dot and key in params_cls.model_fields:
            params[key] = value
        elif key in (*STAGES, "params", "method_params", "extra"):
            raise ConfigError(f"invalid setting {key}={value!r}: {key} is a section; set its keys as {key}.<name>")
        else:
            raise ConfigError(f"unknown setting {key!r} (value {value!r}); allowed keys: {_allowed(method, params_cls)}")
    return identity, top, stages, params, extra


def _allowed(method: str, params_cls) -> str:
    stage = "|".join(StageConfig.model_fields)
    names = ", ".join(sorted(params_cls.model_fields)) or "(none)"
    return (f"{', '.join(TOP_LEVEL_KEYS)}, teacher.<{stage}>, student.<{stage}>, extra.<name>, "
            f"and the parameters of method {method} (bare or params.<name>): {names}")


# ------------------------------------------------------------------------------------------------
# resolution
# ------------------------------------------------------------------------------------------------


def resolve(
    dataset: str = "digits",
    method: str = "db3kd-bd",
    profile: str = "cpu",
    seed: int = 0,
    *,
    overrides: Mapping[str, Any] | None = None,
    method_overrides: Mapping[str, Any] | None = None,
    teacher_file: str | None = None,
    query_budget: int | None = None,
    variant: str | None = None,
    teacher_input: Mapping[str, Any] | None = None,
    teacher_seed: int | None = None,
    student_arch: str | None = None,
    student_overrides: Mapping[str, Any] | None = None,
    params: Literal["tuned", "paper"] = "tuned",
) -> RunConfig:
    """Resolve (dataset, method, profile, seed) and settings into a :class:`RunConfig`.

    overrides: settings in the language of the module docstring (``{"student.epochs": 5,
    "tau": 0.5, "val_fraction": 0.2}``; nested sections as :func:`load_config_file` returns them
    are accepted too; ``dataset``/``method``/``profile``/``seed`` keys must equal the arguments,
    ``num_classes`` the dataset's); method_overrides: method parameters only (applied after
    ``overrides``); teacher_file / query_budget / teacher_input: as the top-level keys, winning over
    ``overrides``; variant: the user's name for this configuration (:attr:`RunConfig.variant`).
    teacher_seed: the teacher's own seed (default 0; one teacher per dataset and profile, shared by
    every method and run seed). student_arch: a registered model replacing the dataset's student
    (e.g. ``lenet5-1/5``, ``alexnet-quarter``: the paper's Table 1 columns). student_overrides:
    student stage fields. params: ``tuned`` (default) applies the values chosen on the validation
    split in ``benchmarks/tuned/<dataset>-<profile>.json`` (:mod:`db3kd.tuning`) when the method has
    an entry there, beneath every explicit setting, and records ``extra["params"] = "tuned on val
    (N trials)"``; ``paper`` keeps the papers' settings (the profile's defaults).

    Raises ConfigError for an unknown dataset, method, profile or key, a negative seed, or a bad
    value (wrong type, out of range), naming the key, the value and the rule.
    """
    from db3kd.registry import get_method

    params_source = params  # the name `params` is reused below for the method parameters among the settings
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")
    if profile not in PROFILE_NAMES:
        raise ConfigError(f"unknown profile {profile!r}; valid profiles: {', '.join(PROFILE_NAMES)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"invalid seed={seed!r}: must be an integer >= 0")
    if query_budget is not None and (isinstance(query_budget, bool) or not isinstance(query_budget, int) or query_budget < 0):
        raise ConfigError(f"invalid query_budget={query_budget!r}: must be an integer >= 0 (or None for unlimited)")
    cls = get_method(method)
    spec = DATASETS[dataset]
    identity, top, stages, params, extra = _split(overrides or {}, method, cls.Params)
    given = {"dataset": dataset, "method": method, "profile": profile, "seed": seed, "num_classes": spec.num_classes}
    for key, value in identity.items():
        if value != given[key]:
            rule = (f"the dataset {dataset} has {spec.num_classes} classes" if key == "num_classes"
                    else f"pass it as the {key} argument (it is {given[key]!r})")
            raise ConfigError(f"invalid setting {key}={value!r}: {rule}")
    if params_source not in ("tuned", "paper"):
        raise ConfigError(f"invalid params={params_source!r}: 'tuned' (values chosen on validation) or 'paper'")
    tuned = None
    if params_source == "tuned":
        from db3kd.tuning import load_tuned

        tuned = load_tuned(dataset, profile, method)
    tuned_student = dict((tuned or {}).get("student") or {})
    tuned_params = dict((tuned or {}).get("params") or {})
    if tuned is not None:
        extra = {"params": f"tuned on val ({int(tuned.get('trials', 0))} trials)", **dict(extra)}
    if student_arch is not None:
        from db3kd.models import _ALIASES, model_names  # the registry's alias table: lenet5-1/5 -> lenet5-fifth

        canonical = _ALIASES.get(str(student_arch).lower())
        if canonical is None:
            raise ConfigError(f"unknown student architecture {student_arch!r}; registered: {', '.join(model_names())}")
        stages["student"] = {**stages["student"], "arch": canonical}
    if student_overrides:
        stages["student"] = {**stages["student"], **dict(student_overrides)}
    if teacher_seed is not None:
        top["teacher_seed"] = teacher_seed
    if teacher_file is not None:
        top["teacher_file"] = str(teacher_file)
    if query_budget is not None:
        top["query_budget"] = query_budget
    if teacher_input is not None:
        top["teacher_input"] = dict(teacher_input) if isinstance(teacher_input, Mapping) else teacher_input
    merged = profile_values(profile, dataset)
    base_top = {"image_size": merged.get("image_size", spec.image_size),
                "oracle_batch": merged.get("oracle_batch", "auto")}
    run = validate_model(_TopLevel, {**base_top, **top}, where="setting")
    stage_cfg = {}
    for stage in STAGES:
        values = {"arch": getattr(spec, stage), **merged[stage], **(tuned_student if stage == "student" else {}),
                  **stages[stage]}
        stage_cfg[stage] = validate_model(StageConfig, values, where="setting", prefix=f"{stage}.")
    method_params = cls.Params.for_profile(profile, dataset, {**tuned_params, **params, **(method_overrides or {})})
    config = RunConfig(
        dataset=dataset, method=method, profile=profile, seed=seed, num_classes=spec.num_classes,
        image_size=run.image_size, teacher=stage_cfg["teacher"], student=stage_cfg["student"],
        method_params=method_params.model_dump(), oracle_batch=run.oracle_batch, teacher_file=run.teacher_file,
        query_budget=run.query_budget, val_fraction=run.val_fraction, extra=dict(extra), teacher_input=run.teacher_input,
        teacher_seed=run.teacher_seed,
    )
    return config.with_variant(variant) if variant is not None else config


# ------------------------------------------------------------------------------------------------
# variants
# ------------------------------------------------------------------------------------------------


def _flat_settings(d: Mapping[str, Any], param_names: set[str]) -> dict[str, Any]:
    """A to_dict()-shaped config as settings keys; method parameters bare (``params.X`` if the name clashes)."""
    out: dict[str, Any] = {}
    for key, value in _plain(dict(d)).items():
        if key in STAGES or key == "extra":
            for sub, v in (value or {}).items():
                out[f"{key}.{sub}"] = v
        elif key == "method_params":
            for sub, v in (value or {}).items():
                clash = sub in TOP_LEVEL_KEYS or sub in IDENTITY_KEYS or sub in (*STAGES, "extra", "num_classes")
                out[f"params.{sub}" if clash else sub] = v
        elif key not in IDENTITY_KEYS and key != "variant":
            out[key] = value
    return out


def config_diff(config: RunConfig | Mapping[str, Any]) -> dict[str, Any]:
    """What ``config`` changes relative to the default resolution of its (dataset, method, profile, seed):
    ``{setting key: value}`` in the settings language (``{"tau": 0.5, "student.epochs": 5}``), {} for the
    default. ``config`` is a :class:`RunConfig` or its :meth:`~RunConfig.to_dict`. A key the default does
    not have (or no longer has) counts as changed. Feeding the result back as ``overrides`` reproduces it.
    """
    d = config.to_dict() if isinstance(config, RunConfig) else dict(config)
    default = resolve(d["dataset"], d["method"], d["profile"], int(d.get("seed", 0)))
    names = set(default.method_params)
    ours, base = _flat_settings(d, names), _flat_settings(default.to_dict(), names)
    missing = object()
    return {k: v for k, v in ours.items() if base.get(k, missing) != v}


def describe_diff(diff: Mapping[str, Any]) -> str:
    """``{"tau": 0.5, "student.epochs": 5}`` -> ``"tau=0.5, student.epochs=5"`` ("" for the default)."""
    def text(v: Any) -> str:  # strings bare unless they hold characters a one-line header cannot show
        return v if isinstance(v, str) and v.isprintable() else json.dumps(v)

    return ", ".join(f"{k}={text(v)}" for k, v in diff.items())


def diff_hash(diff: Mapping[str, Any]) -> str:
    """8 hex digits of sha256 over the canonical JSON of a :func:`config_diff`."""
    return hashlib.sha256(json.dumps(_plain(dict(diff)), sort_keys=True).encode()).hexdigest()[:8]


def variant_of(config: RunConfig | Mapping[str, Any], name: str | None = None) -> str:
    """The variant of ``config``: ``name`` or the config's own ``variant_name`` when given, else
    ``default`` when :func:`config_diff` is empty, else :func:`diff_hash` of the difference."""
    name = name or (config.variant_name if isinstance(config, RunConfig) else None)
    if name:
        return name
    diff = config_diff(config)
    return DEFAULT_VARIANT if not diff else diff_hash(diff)
