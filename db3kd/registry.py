"""The method registry: the one seam every distillation method plugs into.

A method is one class, registered with :func:`register_method`, that declares

* ``name`` (the CLI and benchmark id), ``paper`` (citation),
* ``teacher_access``: ``none`` | ``labels`` | ``scores`` | ``white_box`` -- what of the teacher it
  may see. The runner hands it exactly that: nothing, a :class:`~db3kd.oracle.HardLabelOracle`,
  a :class:`~db3kd.oracle.ScoreOracle`, or the module itself;
* ``data``: ``full`` | ``few_shot`` | ``none`` -- which training data it uses;
* ``Params``: a pydantic model of its hyperparameters whose defaults are the paper's values,
  with ``profile_overrides`` (per profile, optionally per dataset) for the reduced profiles;
* ``paper_results``: the paper's accuracy (percent) per dataset, shown beside ours;

and implements ``run(ctx) -> MethodOutput``. Nothing else in the code base names a method:
the CLI, the runner and the benchmark harness enumerate the registry.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from db3kd.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from db3kd.context import MethodContext, MethodOutput

__all__ = [
    "ACCESS_LEVELS",
    "DATA_LEVELS",
    "MethodParams",
    "Method",
    "register_method",
    "get_method",
    "method_names",
    "method_table",
]

ACCESS_LEVELS = ("none", "labels", "scores", "white_box")
DATA_LEVELS = ("full", "few_shot", "none")
_BUILTIN_MODULES = ("db3kd.methods", "baselines")
_REGISTRY: dict[str, type["Method"]] = {}
_loaded = False


class MethodParams(BaseModel):
    """Base of every method's hyperparameters: unknown keys and wrong types are errors.

    ``profile_overrides`` maps a profile (``smoke``, ``cpu``, ``paper``) to values replacing the
    paper defaults; a key ``"<profile>/<dataset>"`` applies to one dataset only and wins.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    profile_overrides: ClassVar[dict[str, dict[str, Any]]] = {}
    #: What :mod:`db3kd.tuning` may tune besides the student recipe: {field: spec}, e.g.
    #: ``{"tau": ("float", 0.1, 20.0, "log"), "tau_squared": ("categorical", (False, True))}``.
    search_space: ClassVar[dict[str, tuple]] = {}

    @classmethod
    def for_profile(cls, profile: str, dataset: str, overrides: dict[str, Any] | None = None) -> "MethodParams":
        """The resolved parameters for (profile, dataset), with user ``overrides`` applied last."""
        values: dict[str, Any] = {}
        values.update(cls.profile_overrides.get(profile, {}))
        values.update(cls.profile_overrides.get(f"{profile}/{dataset}", {}))
        values.update(overrides or {})
        from db3kd.config import validate_model

        return validate_model(cls, values, where="method parameter")


class Method:
    """Base class of a registered distillation method (see the module docstring)."""

    name: ClassVar[str]
    paper: ClassVar[str]
    teacher_access: ClassVar[str]
    data: ClassVar[str] = "full"
    Params: ClassVar[type[MethodParams]] = MethodParams
    paper_results: ClassVar[dict[str, float]] = {}
    reference_row: ClassVar[bool] = False  # teacher / student CE rows lead the leaderboard

    def __init__(self, params: MethodParams):
        self.params = params

    def run(self, ctx: "MethodContext") -> "MethodOutput":  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def describe(cls) -> dict[str, str]:
        return {"name": cls.name, "access": cls.teacher_access, "data": cls.data, "paper": cls.paper}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator adding a :class:`Method` subclass to the registry.

    Raises ValueError at import for a duplicate name or invalid metadata.
    """
    for attr in ("name", "paper", "teacher_access", "data"):
        if not isinstance(getattr(cls, attr, None), str) or not getattr(cls, attr):
            raise ValueError(f"method class {cls.__name__} must define a non-empty string {attr!r}")
    if cls.teacher_access not in ACCESS_LEVELS:
        raise ValueError(f"method {cls.name!r}: teacher_access must be one of {ACCESS_LEVELS}, got {cls.teacher_access!r}")
    if cls.data not in DATA_LEVELS:
        raise ValueError(f"method {cls.name!r}: data must be one of {DATA_LEVELS}, got {cls.data!r}")
    if not (isinstance(cls.Params, type) and issubclass(cls.Params, MethodParams)):
        raise ValueError(f"method {cls.name!r}: Params must subclass MethodParams")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"duplicate method name {cls.name!r}: already registered by {_REGISTRY[cls.name].__module__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)


def method_names() -> list[str]:
    """Every registered method name, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``; raises ConfigError listing the valid names."""
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; valid methods: {', '.join(sorted(_REGISTRY))}") from None


def method_table() -> list[dict[str, str]]:
    """One dict per method with keys name, access, data, paper (what ``db3kd methods`` prints)."""
    return [get_method(n).describe() for n in method_names()]
