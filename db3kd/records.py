"""Run records on disk: one JSON file per (dataset, profile, method, variant, seed).

Layout (``results_dir`` is ``results/`` in the repository)::

    results/records/<dataset>/<profile>/<method>-s<seed>.json             (variant "default")
    results/records/<dataset>/<profile>/<method>@<variant>-s<seed>.json   (any other variant)

The variant (:attr:`db3kd.config.RunConfig.variant`) is the user's name for a configuration or
the hash of what it changes from the default; a record without the key (written before variants
existed) is variant ``default``, so its file name is unchanged.

A record is the dict :func:`db3kd.runner.run` returns plus what is needed to trust and reproduce
it (added by :func:`enrich`): the resolved configuration (``config``), the command that produced
it (``command``), the machine (``machine``, a one-line summary, ``host``, the details, and
``numerics``, what decides its float arithmetic), the
data source (``data_source``: ``official``, or a sentence saying the files are synthetic or
unofficial), the git commit, the UTC time, the method's paper number and whether it is a
reference row, and the MLflow run id when tracked. Every leaderboard table is generated from
these files only (:mod:`db3kd.leaderboard`).

Writes are atomic (temporary file in the same folder, then ``os.replace``), so two pytest-xdist
workers finishing at the same moment never leave a half-written record. Non-finite floats are
stored as ``null`` (JSON has no NaN).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

__all__ = [
    "RECORD_VERSION",
    "record_path",
    "json_safe",
    "write_json_atomic",
    "write_record",
    "read_record",
    "load_records",
    "group_records",
    "enrich",
    "machine_info",
    "machine_summary",
    "git_commit",
    "command_line",
    "case_id",
    "variant_label",
    "record_variant",
]

RECORD_VERSION = 1
DEFAULT_VARIANT = "default"
_REQUIRED = ("dataset", "profile", "method", "seed", "student_accuracy")


def variant_label(method: str, variant: str | None = None) -> str:
    """``method`` for the default variant, else ``method@variant`` (file names, run names, reference keys)."""
    return method if not variant or variant == DEFAULT_VARIANT else f"{method}@{variant}"


def record_variant(record: dict) -> str:
    """The record's variant; ``default`` for a record without one."""
    return record.get("variant") or DEFAULT_VARIANT


def case_id(dataset: str, method: str, seed: int, variant: str | None = None) -> str:
    """The benchmark case id, e.g. ``mnist-db3kd-mbd-s0`` or ``mnist-db3kd-mbd@tau05-s0`` (also the MLflow run name)."""
    return f"{dataset}-{variant_label(method, variant)}-s{int(seed)}"


def record_path(results_dir: str | os.PathLike, dataset: str, profile: str, method: str, seed: int,
                variant: str | None = None) -> Path:
    """``<results_dir>/records/<dataset>/<profile>/<method>[@<variant>]-s<seed>.json`` (no suffix for ``default``)."""
    return Path(results_dir) / "records" / dataset / profile / f"{variant_label(method, variant)}-s{int(seed)}.json"


def json_safe(obj: Any) -> Any:
    """A copy of ``obj`` that ``json.dumps(..., allow_nan=False)`` accepts.

    NaN/inf -> None, tuples/sets -> lists, paths -> str, numpy/torch scalars -> Python numbers,
    dict keys -> str; anything else unknown -> ``str(obj)``.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    item = getattr(obj, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return json_safe(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    tolist = getattr(obj, "tolist", None)  # arrays / tensors
    if callable(tolist):
        return json_safe(tolist())
    return str(obj)


def write_json_atomic(obj: Any, path: str | os.PathLike, *, indent: int | None = 2) -> Path:
    """Write ``json_safe(obj)`` to ``path`` atomically (temp file in the same folder + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(json_safe(obj), indent=indent, sort_keys=True, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def write_record(record: dict, results_dir: str | os.PathLike = "results") -> Path:
    """Write ``record`` to its place under ``results_dir`` (atomically) and return the path.

    Raises ValueError if a key the leaderboard needs (dataset, profile, method, seed,
    student_accuracy) is missing.
    """
    missing = [k for k in _REQUIRED if k not in record]
    if missing:
        raise ValueError(f"record lacks required key(s) {missing}; it has {sorted(record)}")
    path = record_path(results_dir, record["dataset"], record["profile"], record["method"], record["seed"],
                       record_variant(record))
    return write_json_atomic({k: v for k, v in record.items() if k not in ("record_path", "_path")}, path)


def read_record(path: str | os.PathLike) -> dict:
    """One record; ``path`` is remembered under the key ``_path``."""
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    record["_path"] = str(path)
    return record


def load_records(results_dir: str | os.PathLike = "results", dataset: str | None = None,
                 profile: str | None = None) -> list[dict]:
    """Every record under ``results_dir/records`` (optionally of one dataset / profile), sorted by path.

    Files that are not valid JSON records are skipped with a warning naming them.
    """
    import warnings

    base = Path(results_dir) / "records"
    pattern = f"{dataset or '*'}/{profile or '*'}/*.json"
    out = []
    for path in sorted(base.glob(pattern)):
        try:
            record = read_record(path)
        except (OSError, json.JSONDecodeError) as exc:
            warnings.warn(f"skipping unreadable record {path}: {exc}", stacklevel=2)
            continue
        if not all(k in record for k in _REQUIRED):
            warnings.warn(f"skipping {path}: not a db3kd record (needs keys {_REQUIRED})", stacklevel=2)
            continue
        out.append(record)
    return out


def group_records(records: Iterable[dict]) -> dict[tuple[str, str], list[dict]]:
    """{(dataset, profile): [records]} in sorted key order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["profile"]), []).append(r)
    return dict(sorted(groups.items()))


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What the run ran on: OS, CPU count, torch threads, Python/torch versions, GPU name."""
    info: dict[str, Any] = {
        "system": platform.system(),
        "release": platform.release(),
        "arch": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "device": str(device),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        if str(device).startswith("cuda") and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    except Exception:  # noqa: BLE001 - the record must be written whatever torch says
        pass
    return info


def numerics(info: dict[str, Any]) -> str:
    """What decides the float arithmetic of a run, from :func:`machine_info`: torch version,
    device (GPU name), the CPU instruction set torch dispatches to and the thread count, e.g.
    ``torch 2.15.0, cpu AVX2, 2 threads``. Two runs with the same teacher checkpoint and the same
    ``numerics`` give the same labels and so the same query counts."""
    device = str(info.get("device", "cpu"))
    where = info.get("gpu") or f"{device} {info.get('cpu_capability', '?')}"
    return f"torch {info.get('torch', '?')}, {where}, {info.get('torch_threads', '?')} threads"


def machine_summary(info: dict[str, Any]) -> str:
    """One line, e.g. ``Linux x86_64, 2 CPUs (2 torch threads), device cpu, torch 2.9.1, Python 3.11.9``."""
    parts = [f"{info.get('system', '?')} {info.get('arch', '?')}", f"{info.get('cpu_count', '?')} CPUs"]
    if "torch_threads" in info:
        n = info["torch_threads"]
        parts[-1] += f" ({n} torch thread{'s' if n != 1 else ''})"
    device = str(info.get("device", "cpu"))
    parts.append(f"device {device}" + (f" ({info['gpu']})" if info.get("gpu") else ""))
    if info.get("torch"):
        parts.append(f"torch {info['torch']}")
    parts.append(f"Python {info.get('python', '?')}")
    return ", ".join(parts)


def git_commit(repo: str | os.PathLike | None = None) -> str | None:
    """``git rev-parse HEAD`` of ``repo`` (default: this package's checkout), or None (read-only)."""
    repo = Path(repo) if repo is not None else Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else None


def command_line(argv: list[str] | None = None) -> str:
    """The command as a user would retype it: ``pytest benchmarks -m mnist ...`` (program path shortened)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return ""
    prog = Path(argv[0]).name
    if prog in ("pytest", "py.test", "__main__.py") or prog.startswith("pytest"):
        prog = "pytest"
    elif prog.startswith("python") and len(argv) > 2 and argv[1] == "-m":
        prog, argv = f"python -m {argv[2]}", [argv[0]] + argv[3:]
    return " ".join([prog] + [shlex.quote(a) for a in argv[1:]])


def enrich(
    record: dict,
    *,
    config: dict | None = None,
    command: str | None = None,
    device: str | None = None,
    data_source: str = "official",
    data_root: str | None = None,
    extra: dict | None = None,
) -> dict:
    """``record`` plus the provenance keys described in the module docstring (a new dict).

    ``paper_accuracy`` and ``reference_row`` come from the method registry when the method is
    registered (else they are left as given / None / False).
    """
    out = dict(record)
    info = machine_info(device or str(record.get("device", "cpu")))
    out.update(
        record_version=RECORD_VERSION,
        command=command if command is not None else command_line(),
        host=info,
        machine=machine_summary(info),
        numerics=numerics(info),
        data_source=data_source,
        data_root=data_root,
        git_commit=git_commit(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    if config is not None:
        out["config"] = config
        if "variant" not in out or "config_diff" not in out:
            try:  # a record built from a bare config dict: its variant from what differs from the default
                from db3kd.config import config_diff, diff_hash

                diff = config_diff(config)
                out.setdefault("config_diff", diff)
                out.setdefault("variant", DEFAULT_VARIANT if not diff else diff_hash(diff))
            except Exception:  # noqa: BLE001 - an unregistered method / dataset still gets a record
                pass
    out.setdefault("reference_row", False)
    out.setdefault("paper_accuracy", None)
    try:
        from db3kd.registry import get_method

        cls = get_method(out["method"])
        out["reference_row"] = bool(getattr(cls, "reference_row", False))
        out["paper_accuracy"] = (getattr(cls, "paper_results", {}) or {}).get(out["dataset"])
        out.setdefault("method_paper", getattr(cls, "paper", None))
    except Exception:  # noqa: BLE001 - an unregistered method still gets a record
        pass
    if extra:
        out.update(extra)
    return out
