"""MLflow tracking for benchmark sessions: one experiment per dataset, one parent run per session,
one nested run per case. MLflow is imported lazily (only when a run is actually tracked).

* Experiment ``db3kd/<dataset>``.
* Parent run per pytest session (tags ``db3kd.role=session``, ``db3kd.session_id``); all pytest-
  xdist workers of a session find the same parent by that tag (find-or-create under a file lock).
* Child run per case, named like the test id (``mnist-db3kd-mbd-s0``; a variant other than
  ``default`` is part of the name: ``mnist-db3kd-mbd@tau05-s0``), nested through the
  ``mlflow.parentRunId`` tag. Params: the resolved config, flattened (``student.epochs``).
  Metrics: everything the runner logs per epoch (``teacher/train_loss``, ``student/val_accuracy``
  ...), the final teacher/student accuracy, queries total and per sample, wall seconds, and
  ``milestone_accuracy`` at step = queries per pair. Tags: method, dataset, profile,
  teacher_access, config_hash, variant, config_diff, git_commit (also ``mlflow.source.git.commit``),
  seed, data_source.
  Artifacts: ``config.json`` (the resolved config), ``record.json`` and the case's plots; the
  session's tables and plots go to the parent run.

Default store: ``sqlite:///mlflow.db`` in the working directory (git-ignored) unless
``MLFLOW_TRACKING_URI`` or an explicit URI says otherwise. View with
``mlflow ui --backend-store-uri sqlite:///mlflow.db``.

Failure policy: tracking must never cost a result. The first exception raised by MLflow (server
unreachable, HTTP 5xx, locked database ...) disables the :class:`Tracker` for the rest of the
process with ONE :class:`TrackingWarning` naming the URI; every later call is a no-op, and the
case still finishes and writes its record locally. For HTTP URIs the tracker shortens MLflow's
retry policy unless the user set it (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=1``,
``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1``, ``MLFLOW_HTTP_REQUEST_TIMEOUT=20``), so an unreachable
server costs seconds, not minutes.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import tempfile
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "DEFAULT_TRACKING_URI",
    "TrackingWarning",
    "default_tracking_uri",
    "display_uri",
    "experiment_name",
    "flatten",
    "new_session_id",
    "Tracker",
    "CaseRun",
    "tracked_run",
    "records_from_mlflow",
]

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


class TrackingWarning(UserWarning):
    """MLflow tracking failed and was switched off; results are still written locally."""


def default_tracking_uri(uri: str | None = None) -> str:
    """``uri`` if given, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def display_uri(uri: str) -> str:
    """``uri`` with any password replaced by ``***`` (safe to print)."""
    try:
        parts = urlsplit(uri)
        if parts.password:
            netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
            return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        pass
    return uri


def experiment_name(dataset: str) -> str:
    return f"db3kd/{dataset}"


def new_session_id() -> str:
    """``YYYYmmddTHHMMSS-<6 hex>`` (UTC), unique per pytest session."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """{"student": {"epochs": 2}} -> {"student.epochs": "2"}; lists/tuples become JSON text."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            if v:
                out.update(flatten(v, key + "."))
            else:
                out[key] = "{}"
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(list(v), default=str)
        else:
            out[key] = str(v)
    return {k: v[:6000] for k, v in out.items()}


def _finite_metrics(metrics: dict) -> dict[str, float]:
    out = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, bool) or v is None:
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out[str(k)] = f
    return out


class Tracker:
    """MLflow access for one process of a benchmark session; disables itself on the first failure.

    uri: tracking URI (:func:`default_tracking_uri` when None); session_id: shared by every
    pytest-xdist worker of a session (:func:`new_session_id` when None); session_name /
    session_tags: name and tags of the parent runs; enabled=False: never touch MLflow.
    """

    def __init__(self, uri: str | None = None, *, session_id: str | None = None, session_name: str | None = None,
                 session_tags: dict[str, str] | None = None, enabled: bool = True):
        self.uri = default_tracking_uri(uri)
        self.session_id = session_id or new_session_id()
        self.session_name = session_name or f"session {self.session_id}"
        self.session_tags = dict(session_tags or {})
        self.enabled = enabled
        self.failure: str | None = None
        self._client = None
        self._experiments: dict[str, str] = {}
        self._parents: dict[str, str] = {}
        if enabled and self.uri.startswith(("http://", "https://")):
            for k, v in _HTTP_DEFAULTS.items():
                os.environ.setdefault(k, v)

    # -- plumbing ---------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.enabled and self.failure is None

    def _disable(self, exc: BaseException) -> None:
        if self.failure is not None:
            return
        text = " ".join(str(exc).split())
        self.failure = f"{type(exc).__name__}: {text[:300]}"
        warnings.warn(
            f"MLflow tracking at {display_uri(self.uri)} failed ({self.failure}); tracking is disabled for the "
            "rest of this session. Results are still written locally (records under results/records/).",
            TrackingWarning,
            stacklevel=3,
        )

    def call(self, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)`` or None; a failure disables the tracker (locked SQLite is retried)."""
        if not self.active:
            return None
        for attempt in range(4):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - tracking must never fail a case
                if "database is locked" in str(exc) and attempt < 3:
                    time.sleep(0.5 * (attempt + 1))
                    continue
                self._disable(exc)
                return None
        return None

    @contextmanager
    def _lock(self):
        """Inter-process lock per tracking URI (first SQLite migration, experiment/parent find-or-create)."""
        from filelock import FileLock

        from db3kd.teacher import cache_root

        key = hashlib.sha256(f"{self.uri}|{os.getcwd()}".encode()).hexdigest()[:16]
        lock_dir = cache_root() / "locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock_dir / f"mlflow-{key}.lock"), timeout=300):
            yield

    def client(self):
        """The MlflowClient (created on first use, under the lock); None when disabled."""
        if not self.active:
            return None
        if self._client is None:

            def make():
                from mlflow import MlflowClient

                client = MlflowClient(tracking_uri=self.uri)
                client.search_experiments(max_results=1)  # first contact: creates / migrates a SQLite store
                return client

            with self._lock():
                self._client = self.call(make)
        return self._client

    def experiment_id(self, dataset: str) -> str | None:
        """Id of experiment ``db3kd/<dataset>`` (created when missing)."""
        if dataset in self._experiments:
            return self._experiments[dataset]
        client = self.client()
        if client is None:
            return None

        def find_or_create():
            exp = client.get_experiment_by_name(experiment_name(dataset))
            if exp is not None:
                if exp.lifecycle_stage == "deleted":
                    client.restore_experiment(exp.experiment_id)
                return exp.experiment_id
            return client.create_experiment(experiment_name(dataset), tags={"db3kd.dataset": dataset})

        with self._lock():
            eid = self.call(find_or_create)
        if eid is not None:
            self._experiments[dataset] = eid
        return eid

    def parent_run_id(self, dataset: str, *, create: bool = True) -> str | None:
        """The session's parent run in ``db3kd/<dataset>`` (found by session id; created if ``create``)."""
        if dataset in self._parents:
            return self._parents[dataset]
        eid = self.experiment_id(dataset)
        if eid is None:
            return None
        client = self._client

        def find_or_create():
            found = client.search_runs(
                [eid], filter_string=f"tags.`db3kd.session_id` = '{self.session_id}' and tags.`db3kd.role` = 'session'",
                max_results=1)
            if found:
                return found[0].info.run_id
            if not create:
                return None
            tags = {"mlflow.runName": self.session_name, "db3kd.role": "session", "db3kd.session_id": self.session_id,
                    "dataset": dataset, **{k: str(v) for k, v in self.session_tags.items() if v is not None}}
            return client.create_run(eid, tags=tags, run_name=self.session_name).info.run_id

        with self._lock():
            rid = self.call(find_or_create)
        if rid is not None:
            self._parents[dataset] = rid
        return rid

    # -- cases ------------------------------------------------------------------------------------

    def start_case(self, config, *, name: str | None = None, tags: dict[str, Any] | None = None) -> "CaseRun":
        """A nested run for ``config`` (a RunConfig) under the session's parent; a no-op run when disabled."""
        from db3kd.records import case_id

        from db3kd.config import config_diff, describe_diff

        name = name or case_id(config.dataset, config.method, config.seed, config.variant)
        case = CaseRun(self, None, name)
        parent = self.parent_run_id(config.dataset)
        if parent is None:
            return case
        client = self._client
        eid = self._experiments[config.dataset]
        all_tags = {
            "mlflow.runName": name, "mlflow.parentRunId": parent, "db3kd.role": "case",
            "db3kd.session_id": self.session_id, "method": config.method, "dataset": config.dataset,
            "profile": config.profile, "seed": str(config.seed), "config_hash": config.config_hash(),
            "variant": config.variant, "config_diff": describe_diff(config_diff(config))[:5000] or "(default)",
        }
        try:
            from db3kd.registry import get_method

            all_tags["teacher_access"] = get_method(config.method).teacher_access
        except Exception:  # noqa: BLE001
            pass
        from db3kd.records import git_commit

        commit = git_commit()
        if commit:
            all_tags["git_commit"] = commit
            all_tags["mlflow.source.git.commit"] = commit
        all_tags.update({k: str(v) for k, v in (tags or {}).items() if v is not None})

        def create():
            from mlflow.entities import Param, RunTag

            run = client.create_run(eid, tags=all_tags, run_name=name)
            params = [Param(k, v) for k, v in flatten(config.to_dict()).items()]
            for i in range(0, len(params), 100):
                client.log_batch(run.info.run_id, params=params[i:i + 100])
            client.log_dict(run.info.run_id, json.loads(json.dumps(config.to_dict(), default=str)), "config.json")
            return run.info.run_id

        case.run_id = self.call(create)
        return case

    def log_session_artifacts(self, dataset: str, paths: list[str | os.PathLike], artifact_path: str | None = None) -> None:
        """Log files (tables, plots) to the session's parent run of ``dataset`` (if it exists)."""
        rid = self.parent_run_id(dataset, create=False)
        if rid is None:
            return
        for p in paths:
            if Path(p).is_file():
                self.call(self._client.log_artifact, rid, str(p), artifact_path)

    def finish_session(self, datasets: list[str], status: str = "FINISHED") -> None:
        """Mark the session's parent runs of ``datasets`` terminated."""
        for dataset in datasets:
            rid = self.parent_run_id(dataset, create=False)
            if rid is not None:
                self.call(self._client.set_terminated, rid, status)


def records_from_mlflow(uri: str | None = None, datasets: list[str] | None = None) -> list[dict]:
    """The run records stored in MLflow: the ``record.json`` artifact of every FINISHED case run.

    uri: tracking URI (default :func:`default_tracking_uri`); datasets: restrict to these
    experiments ``db3kd/<dataset>`` (default: every ``db3kd/`` experiment). When several runs hold
    the same (dataset, profile, method, variant, seed), the latest one wins, as when a record file
    is overwritten (a record without a variant is variant ``default``). Returns a list of record dicts. Raises
    :class:`db3kd.errors.DB3KDError` naming the URI when the store cannot be read.
    """
    from db3kd.errors import DB3KDError

    uri = default_tracking_uri(uri)
    try:
        from mlflow.artifacts import load_dict
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        names = [experiment_name(d) for d in datasets] if datasets else None
        experiments = [e for e in client.search_experiments()
                       if e.name.startswith("db3kd/") and (names is None or e.name in names)]
        runs = []
        for exp in experiments:
            runs += client.search_runs([exp.experiment_id], filter_string="tags.`db3kd.role` = 'case' and "
                                       "attributes.status = 'FINISHED'", max_results=50000)
        latest: dict[tuple, tuple[int, dict]] = {}
        for run in runs:
            rid = run.info.run_id
            if "record.json" not in {a.path for a in client.list_artifacts(rid)}:
                continue
            record = load_dict(f"{run.info.artifact_uri.rstrip('/')}/record.json")
            key = (record["dataset"], record["profile"], record["method"], record.get("variant") or "default",
                   int(record["seed"]))
            if key not in latest or run.info.start_time >= latest[key][0]:
                latest[key] = (run.info.start_time, record)
    except DB3KDError:
        raise
    except Exception as exc:  # noqa: BLE001 - any store failure becomes one clear error
        raise DB3KDError(f"cannot read run records from MLflow at {display_uri(uri)}: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:300] if str(exc) else ''}") from None
    return [rec for _, (_, rec) in sorted(latest.items())]


class CaseRun:
    """One case's nested run. ``log(metrics, step)`` is the runner's metric sink; no-op when untracked."""

    def __init__(self, tracker: Tracker, run_id: str | None, name: str):
        self.tracker, self.run_id, self.name = tracker, run_id, name
        self._logged: set[tuple[str, int]] = set()

    @property
    def tracked(self) -> bool:
        return self.run_id is not None and self.tracker.active

    def log(self, metrics: dict, step: int | None = None) -> None:
        if not self.tracked:
            return
        from mlflow.entities import Metric

        values = _finite_metrics(metrics)
        step = int(step or 0)
        ts = int(time.time() * 1000)
        batch = [Metric(k, v, ts, step) for k, v in values.items()]
        self._logged.update((k, step) for k in values)
        for i in range(0, len(batch), 500):
            self.tracker.call(self.tracker._client.log_batch, self.run_id, metrics=batch[i:i + 500])

    def log_record(self, record: dict) -> None:
        """Final metrics of a finished run record (and milestone accuracies at step = milestone)."""
        if not self.tracked:
            return
        final = {k: record.get(k) for k in ("teacher_accuracy", "student_accuracy", "queries_total",
                                             "queries_per_sample", "wall_seconds", "transfer_set_size")}
        final.update({k: v for k, v in (record.get("metrics") or {}).items() if (k, 0) not in self._logged})
        self.log(final, 0)
        for milestone, acc in (record.get("milestone_accuracy") or {}).items():
            if ("milestone_accuracy", int(milestone)) not in self._logged:
                self.log({"milestone_accuracy": acc}, int(milestone))

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.tracked:
            for k, v in tags.items():
                if v is not None:
                    self.tracker.call(self.tracker._client.set_tag, self.run_id, k, str(v))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.tracked and Path(path).is_file():
            self.tracker.call(self.tracker._client.log_artifact, self.run_id, str(path), artifact_path)

    def log_dict(self, obj: dict, name: str) -> None:
        if self.tracked:
            from db3kd.records import json_safe

            self.tracker.call(self.tracker._client.log_dict, self.run_id, json_safe(obj), name)

    def end(self, status: str = "FINISHED") -> None:
        if self.tracked:
            self.tracker.call(self.tracker._client.set_terminated, self.run_id, status)


def tracked_run(
    config,
    tracker: Tracker,
    *,
    results_dir: str | os.PathLike | None = None,
    timer: Callable[[Callable[[], dict]], dict] | None = None,
    run_fn: Callable[..., dict] | None = None,
    enrich: dict | None = None,
    tags: dict[str, Any] | None = None,
    plots: bool = True,
    **run_kwargs,
) -> dict:
    """Run ``config`` with its metrics streamed to a nested MLflow run; return the enriched record.

    ``run_fn`` (default :func:`db3kd.runner.run`) is called as ``run_fn(config, log=..., **run_kwargs)``,
    through ``timer`` when given (e.g. ``lambda fn: benchmark.pedantic(fn, rounds=1, iterations=1)``).
    The record gets the provenance of :func:`db3kd.records.enrich` (keyword arguments in
    ``enrich``), ``mlflow_run_id`` (None when untracked) and, when ``results_dir`` is given, is
    written to ``results_dir/records/...`` (its path under the key ``record_path``). A tracking
    failure never stops the case; an exception of the run itself ends the MLflow run FAILED and
    propagates.
    """
    from db3kd import records as rec

    if run_fn is None:
        from db3kd.runner import run as run_fn
    from db3kd.config import config_diff

    case = tracker.start_case(config, tags=tags)

    def call() -> dict:
        return run_fn(config, log=case.log, **run_kwargs)

    try:
        raw = timer(call) if timer is not None else call()
    except BaseException:
        case.end("FAILED")
        raise
    raw = {**raw, "variant": config.variant, "config_diff": config_diff(config)}
    record = rec.enrich(raw, config=config.to_dict(), device=run_kwargs.get("device"), **(enrich or {}))
    record["mlflow_run_id"] = case.run_id
    record["mlflow_tracking_uri"] = display_uri(tracker.uri) if case.run_id else None
    _keep_artifacts(case, record, temporary=run_kwargs.get("run_dir") is None, results_dir=results_dir)
    if results_dir is not None:
        record["record_path"] = str(rec.write_record(record, results_dir))
    case.log_record(record)
    case.set_tags({"data_source": record.get("data_source"), "teacher_hash": record.get("teacher_hash"),
                   "teacher_checkpoint": record.get("teacher_checkpoint"), "numerics": record.get("numerics")})
    if case.tracked:
        case.log_dict(record, "record.json")
        if plots:
            _log_case_plots(case, record)
    case.end("FINISHED")
    return record


ARTIFACT_LIMIT_BYTES = 20 * 2**20


def _keep_artifacts(case: CaseRun, record: dict, *, temporary: bool, results_dir: str | os.PathLike | None = None) -> None:
    """Log the method's artifact files (figures, soft labels, transfer sets up to 20 MiB) to the
    case's MLflow run under ``artifacts/``. A run without ``run_dir`` worked in a temporary folder:
    it is removed, and the record then points at the MLflow copies (``mlflow:artifacts/<file>``),
    or says that a file was not kept. With ``results_dir``, PNG figures (e.g. ZSDB3KD's Fig. 6) are
    also copied to ``results_dir/<dataset>/figures/<profile>-<method>[@<variant>]-s<seed>-<file>.png`` and listed
    in ``record["figures"]`` relative to ``results_dir/<dataset>``, where the leaderboard shows them."""
    import shutil

    from db3kd.records import variant_label

    kept = {}
    for name, path in (record.get("artifacts") or {}).items():
        p = Path(path)
        if results_dir is not None and p.suffix.lower() == ".png" and p.is_file():
            dest = (Path(results_dir) / record["dataset"] / "figures"
                    / f"{record['profile']}-{variant_label(record['method'], record.get('variant'))}-s{record['seed']}-{p.name}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dest)
            record.setdefault("figures", {})[name] = f"figures/{dest.name}"
        if case.tracked and p.is_file() and p.stat().st_size <= ARTIFACT_LIMIT_BYTES:
            case.log_artifact(p, "artifacts")
            kept[name] = f"mlflow:artifacts/{p.name}" if temporary else str(p)
        else:
            kept[name] = str(p) if not temporary else "not kept (no run_dir; pass one to keep artifacts)"
    record["artifacts"] = kept
    workdir = record.get("workdir")
    if temporary and workdir and Path(workdir).name.startswith("db3kd-") and Path(workdir).is_dir():
        shutil.rmtree(workdir, ignore_errors=True)
        record["workdir"] = None


def _log_case_plots(case: CaseRun, record: dict) -> None:
    from db3kd import plots

    with tempfile.TemporaryDirectory(prefix="db3kd-plots-") as tmp:
        for fn, name in ((plots.accuracy_vs_queries, "accuracy-vs-queries.png"),
                         (plots.class_distance_heatmap, "class-distance-heatmap.png")):
            try:
                path = fn([record], Path(tmp) / name, method=record["method"])
            except Exception as exc:  # noqa: BLE001 - a plot must not fail the case
                warnings.warn(f"could not draw {name} for {case.name}: {exc}", stacklevel=2)
                continue
            if path is not None:
                case.log_artifact(path, "plots")
