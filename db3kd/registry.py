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

Method modules are found through the entry-point group ``db3kd.methods`` (the way pytest finds
plugins): this project declares ``db3kd.methods`` and ``baselines`` in its ``pyproject.toml``;
an outside package adds its own module (or ``module:Class``) to the same group and its methods
appear in ``db3kd methods``, ``db3kd run --method`` and the benchmark harness::

    [project.entry-points."db3kd.methods"]
    my-method = "my_package.my_method"
"""

from __future__ import annotations

import json
import os
from importlib import metadata as _metadata
from pathlib import Path
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
    "method_listing",
    "ENTRY_POINT_GROUP",
]

ACCESS_LEVELS = ("none", "labels", "scores", "white_box")
DATA_LEVELS = ("full", "few_shot", "none")
ENTRY_POINT_GROUP = "db3kd.methods"
_REGISTRY: dict[str, type["Method"]] = {}
_loaded = False


class MethodParams(BaseModel):
    """Base of every method's hyperparameters: unknown keys and wrong types are errors.

    ``profile_overrides`` maps a profile (``smoke``, ``cpu``, ``paper``) to values replacing the
    paper defaults; a key ``"<profile>/<dataset>"`` applies to one dataset only and wins.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    profile_overrides: ClassVar[dict[str, dict[str, Any]]] = {}

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


def _entry_points() -> list:
    return list(_metadata.entry_points(group=ENTRY_POINT_GROUP))


def _load_builtin() -> None:
    """Import every module of the ``db3kd.methods`` entry-point group once (registration happens on
    import); an entry point naming a :class:`Method` subclass registers it. Raises ConfigError naming
    a plugin that fails to import, or saying that no method is registered at all."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for ep in _entry_points():
        try:
            obj = ep.load()
        except Exception as exc:  # noqa: BLE001 - one clear line naming the plugin
            raise ConfigError(f"method plugin {ep.name!r} ({ep.value}, entry-point group {ENTRY_POINT_GROUP}) "
                              f"failed to import: {type(exc).__name__}: {exc}") from exc
        if isinstance(obj, type) and issubclass(obj, Method) and _REGISTRY.get(getattr(obj, "name", None)) is not obj:
            register_method(obj)
    if not _REGISTRY:
        raise ConfigError(f"no methods registered: the entry-point group {ENTRY_POINT_GROUP!r} is empty; "
                          "reinstall the project (`uv sync`) so its pyproject entry points are installed")


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
    """One dict per method with keys name, access, data, paper."""
    return [get_method(n).describe() for n in method_names()]


# ------------------------------------------------------------------------------------------------
# the listing of ``db3kd methods``: metadata plus every parameter with its default and rule
# ------------------------------------------------------------------------------------------------

_RULES = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "multiple_of": "multiple of ", "min_length": "min length ",
          "max_length": "max length "}


def _type_name(annotation: Any) -> str:
    import typing

    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        inner = " | ".join(_type_name(a) for a in args)
        name = getattr(origin, "__name__", "")
        return inner if name in ("Union", "UnionType", "") else f"{name}[{inner}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _param_rows(params_cls: type[MethodParams]) -> list[dict[str, Any]]:
    rows = []
    for name, info in params_cls.model_fields.items():
        rules = []
        for m in info.metadata:
            for attr, sym in _RULES.items():
                if getattr(m, attr, None) is not None:
                    rules.append(f"{sym}{getattr(m, attr)}")
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        rows.append({"name": name, "type": _type_name(info.annotation), "default": default,
                     "required": info.is_required(), "rule": ", ".join(rules),
                     "doc": info.description or ""})
    return rows


def method_info(cls: type[Method]) -> dict[str, Any]:
    """:meth:`Method.describe` plus ``params`` (name, type, default, required, rule, doc of each) and
    ``profile_overrides`` (the reduced profiles' values, keys sorted); JSON-serialisable."""
    from db3kd.records import json_safe

    return json_safe({**cls.describe(), "params": _param_rows(cls.Params),
                      "profile_overrides": {k: dict(sorted(v.items()))
                                            for k, v in sorted(cls.Params.profile_overrides.items())}})


def _source_key() -> str:
    """Hash over the entry points and the size/mtime of every source file of the packages they name:
    a listing cached under this key is current."""
    import hashlib
    import importlib.util

    h = hashlib.sha256(ENTRY_POINT_GROUP.encode())
    tops = {"db3kd"}
    for ep in sorted(_entry_points(), key=lambda e: (e.name, e.value)):
        h.update(f"|{ep.name}={ep.value}".encode())
        tops.add(ep.value.split(":")[0].split(".")[0])
    for top in sorted(tops):
        spec = importlib.util.find_spec(top)
        roots = list(spec.submodule_search_locations or []) if spec else []
        files = [Path(spec.origin)] if spec and spec.origin and not roots else []
        for root in roots:
            files += sorted(Path(root).rglob("*.py"))
        for f in files:
            st = f.stat()
            h.update(f"|{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def method_listing() -> list[dict[str, Any]]:
    """:func:`method_info` of every method, sorted by name (what ``db3kd methods`` prints).

    Importing the method modules costs seconds (they import torch), so in a process that has not
    loaded them yet the listing comes from a cache file (``$DB3KD_CACHE`` or ``.cache/db3kd``,
    ``method-listing-<key>.json``) keyed by :func:`_source_key`: any change to an entry point or to
    a source file of the packages they name rebuilds it.
    """
    if _loaded:
        return [method_info(get_method(n)) for n in method_names()]
    cache = Path(os.environ.get("DB3KD_CACHE", ".cache/db3kd")) / f"method-listing-{_source_key()}.json"
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    rows = [method_info(get_method(n)) for n in method_names()]
    try:
        from db3kd.records import write_json_atomic

        write_json_atomic(rows, cache)
    except OSError:  # a read-only cache folder only costs speed
        pass
    return rows
