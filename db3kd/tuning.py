"""Equal tuning on the validation split: one Optuna study per (dataset, profile, method).

Every method gets the same number of trials over a declared search space (:func:`search_space`),
plus one trial of its profile's defaults (the ``--params paper`` values, :func:`default_values`),
so that no method's tuned values are worse on validation than its untuned ones:

* the student recipe, common to all methods (:data:`STUDENT_SPACE`): learning rate (log-uniform
  1e-4 .. 1e-2) and epochs (from a quarter of the profile's cap up to the cap). A method whose
  ``Params`` has its own ``lr`` / ``epochs`` fields (FS-BBT, noise input) tunes those instead;
* the method's own knobs: ``Params.search_space`` (a class attribute of simple specs, see
  :func:`to_distribution`), e.g. tau, tau^2 on/off, loss weights, the noise-logits range, BAN
  generations, the label-smoothing epsilon.

Sampler: TPE with a fixed seed (``sampler_seed``, default 0). Its first ``n_startup_trials`` (Optuna's
default, 10) are seeded random draws, so a study of 10 trials is seeded random search, and two
methods with the same search space are offered the same candidates. Pruner: Optuna's MedianPruner on the
validation accuracy the training loop reports after every epoch of the final student (the
``student/val_accuracy`` metric of :func:`db3kd.training.fit`); methods whose final stage reports
nothing per epoch are simply not pruned, nor is the defaults trial (a slow starter such as ZSDB3KD's
defaults were pruned at 16% validation accuracy early on, yet reach 69.9% test accuracy at 100
pseudo samples per class when trained to the end in the Fig. 6 run).

The objective is validation accuracy. The test split is not read during tuning: every trial runs
on :func:`validation_view` of the data, whose "test" split *is* the validation split (the teacher,
trained on the training split and already cached, is shared; its stored test accuracy is the
number computed when it was trained). Studies are resumable through Optuna's RDB storage (a
sqlite file, default ``$DB3KD_CACHE/tuning/<dataset>-<profile>.db``): ``--trials N`` means N
finished trials in all, a rerun adds only the missing ones. Each trial is a nested MLflow run
(``db3kd.tracking``) when tracking is on.

The chosen values go to ``benchmarks/tuned/<dataset>-<profile>.json``::

    {method: {"params": {...}, "student": {"lr": ..., "epochs": ...}, "trials": N, "complete_trials": n,
              "pruned_trials": p, "best_val_accuracy": a, "best_trial": k, "sampler": "TPE(seed=0)",
              "pruner": "...", "seed": s, "command": "db3kd tune ...", "created": "..."}}

:func:`db3kd.config.resolve` applies them by default (``params="tuned"``); ``params="paper"``
(CLI ``--params paper``) keeps the papers' settings.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from db3kd.errors import ConfigError, DB3KDError

__all__ = [
    "STUDENT_SPACE",
    "tuned_dir",
    "tuned_path",
    "load_tuned",
    "to_distribution",
    "search_space",
    "study_name",
    "entry_key",
    "validation_view",
    "tune",
]

#: The student recipe's knobs, tuned for every method: name -> spec (see :func:`to_distribution`).
#: ``("epochs_cap",)`` is an int from max(1, cap // 4) to the profile's cap.
STUDENT_SPACE: dict[str, tuple] = {"lr": ("float", 1e-4, 1e-2, "log"), "epochs": ("epochs_cap",)}


def tuned_dir() -> Path:
    """``$DB3KD_TUNED_DIR`` or the repository's ``benchmarks/tuned``."""
    return Path(os.environ.get("DB3KD_TUNED_DIR") or Path(__file__).resolve().parents[1] / "benchmarks" / "tuned")


def tuned_path(dataset: str, profile: str, directory: str | os.PathLike | None = None) -> Path:
    return Path(directory or tuned_dir()) / f"{dataset}-{profile}.json"


def load_tuned(dataset: str, profile: str, method: str, directory: str | os.PathLike | None = None) -> dict | None:
    """The tuned entry of ``method`` for (dataset, profile), or None when there is none.

    Raises ConfigError naming the file when it is not valid JSON.
    """
    path = tuned_path(dataset, profile, directory)
    if not path.is_file():
        return None
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read tuned values {path}: {exc}") from None
    entry = table.get(method)
    return entry if isinstance(entry, dict) else None


def to_distribution(spec: tuple, *, cap: int | None = None):
    """An Optuna distribution from a simple spec.

    ``("float", low, high)`` | ``("float", low, high, "log")`` | ``("int", low, high)`` |
    ``("categorical", (choice, ...))`` | ``("epochs_cap",)`` (int from max(1, cap // 4) to cap).
    Raises ConfigError for anything else.
    """
    import optuna.distributions as d

    kind = spec[0] if spec else None
    if kind == "float" and len(spec) in (3, 4):
        return d.FloatDistribution(float(spec[1]), float(spec[2]), log=len(spec) == 4 and spec[3] == "log")
    if kind == "int" and len(spec) == 3:
        return d.IntDistribution(int(spec[1]), int(spec[2]))
    if kind == "categorical" and len(spec) == 2:
        return d.CategoricalDistribution(tuple(spec[1]))
    if kind == "epochs_cap" and cap is not None:
        return d.IntDistribution(max(1, cap // 4), max(1, cap))
    raise ConfigError(f"invalid search-space spec {spec!r}: expected ('float', lo, hi[, 'log']), ('int', lo, hi), "
                      "('categorical', choices) or ('epochs_cap',)")


def search_space(method: str, profile: str, dataset: str) -> dict[str, Any]:
    """``{"student.<name>" | "<param>": optuna distribution}`` of ``method`` at (profile, dataset).

    The method's ``Params.search_space`` plus :data:`STUDENT_SPACE`; a Params field named like a
    student knob (``lr``, ``epochs``) replaces it, with the method's profile value as the epoch cap.
    A Params class with ``tune_student_recipe = False`` (ZSKT, whose own loop trains the student
    with ``lr_student`` for ``iterations``: the student recipe never reaches it) gets its own space only.
    """
    from db3kd.config import resolve
    from db3kd.registry import get_method

    cls = get_method(method)
    base = resolve(dataset, method, profile, params="paper")
    own = dict(getattr(cls.Params, "search_space", {}) or {})
    space: dict[str, Any] = {}
    for name, spec in (STUDENT_SPACE if getattr(cls.Params, "tune_student_recipe", True) else {}).items():
        if name in cls.Params.model_fields:  # the method's own recipe knob
            value = base.method_params.get(name)
            cap = int(value) if isinstance(value, int) and not isinstance(value, bool) else getattr(base.student, name)
            own.setdefault(name, spec)
            if spec[0] == "epochs_cap":
                space[name] = to_distribution(spec, cap=cap)
                own.pop(name)
            continue
        space[f"student.{name}"] = to_distribution(spec, cap=getattr(base.student, name, None))
    for name, spec in own.items():
        if name not in cls.Params.model_fields:
            raise ConfigError(f"{cls.__name__}.search_space names {name!r}, which is not one of its parameters")
        space[name] = to_distribution(spec)
    return space


def entry_key(method: str, settings: dict[str, Any] | None = None) -> str:
    """``method``, or ``method@k1=v1,k2=v2`` (sorted) for a study run under fixed ``settings``."""
    if not settings:
        return method
    return method + "@" + ",".join(f"{k}={settings[k]}" for k in sorted(settings))


def study_name(dataset: str, profile: str, method: str, seed: int, space: dict[str, Any], storage: str) -> str:
    """``<dataset>-<profile>-<method>-seed<seed>``, or with ``-space<8 hex digits>`` of ``space``
    appended when the study of the plain name (in ``storage``) sampled another search space: a
    changed space starts a new study instead of mixing its trials with the old one's."""
    import hashlib

    import optuna

    name = f"{dataset}-{profile}-{method}-seed{seed}"
    try:
        old = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return name
    if all(t.distributions == space for t in old.trials if t.distributions):
        return name
    digest = hashlib.sha256(repr(sorted((k, repr(v)) for k, v in space.items())).encode()).hexdigest()[:8]
    return f"{name}-space{digest}"


def validation_view(splits):
    """A copy of ``splits`` whose test split is the validation split (the real test split is dropped).

    It keeps the original's data fingerprint, so the cached teacher (trained on the same training
    split, validated on the same validation split) is found, not retrained. Raises DB3KDError when
    there is no validation split.
    """
    if splits.val_x.shape[0] == 0:
        raise DB3KDError("tuning needs a validation split, but val_fraction = 0 left none")
    fingerprint = splits.fingerprint()
    view = replace(splits, test_x=splits.val_x, test_y=splits.val_y)
    view._fingerprint.append(fingerprint)  # noqa: SLF001 - same training data, same teacher
    return view


def _suggest(trial, name: str, dist):
    """One value from ``dist`` through Optuna's public suggest API."""
    import optuna.distributions as d

    if isinstance(dist, d.FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, log=dist.log)
    if isinstance(dist, d.IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, log=dist.log)
    return trial.suggest_categorical(name, dist.choices)


def _split(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    method = {k: v for k, v in values.items() if not k.startswith("student.")}
    student = {k[len("student."):]: v for k, v in values.items() if k.startswith("student.")}
    return method, student


def default_values(space: dict[str, Any], base) -> tuple[dict[str, Any], list[str]]:
    """The profile's defaults (``params="paper"``) of every knob in ``space``, as an Optuna trial
    would suggest them: (values inside their distribution, names whose default lies outside it and
    are left to the sampler). ``base``: a configuration resolved with ``params="paper"``."""
    import optuna.distributions as d

    values, outside = {}, []
    for name, dist in space.items():
        if name.startswith("student."):
            value = getattr(base.student, name[len("student."):])
        else:  # a method's own lr / epochs default to None: "the student recipe's"
            value = base.method_params.get(name)
            if value is None and hasattr(base.student, name):
                value = getattr(base.student, name)
        if isinstance(dist, (d.FloatDistribution, d.IntDistribution)):
            inside = value is not None and not isinstance(value, bool) and dist.low <= value <= dist.high
        else:
            inside = value in dist.choices
        if inside:
            values[name] = value
        else:
            outside.append(name)
    return values, outside


def tune(
    dataset: str,
    method: str,
    trials: int,
    *,
    profile: str = "cpu",
    seed: int = 0,
    sampler_seed: int = 0,
    storage: str | None = None,
    data_root: str | None = None,
    device: str = "cpu",
    tracking_uri: str | None = None,
    tracking: bool = True,
    out_dir: str | os.PathLike | None = None,
    command: str | None = None,
    progress: bool = False,
    splits=None,
    settings: dict[str, Any] | None = None,
    on_trial: Callable[[dict], None] | None = None,
    defaults_trial: bool = True,
) -> dict:
    """Run (or resume) the study of ``method`` on (dataset, profile) to ``trials`` finished trials.

    Each trial resolves the configuration with ``params="paper"`` plus the trial's values, runs it
    on :func:`validation_view` (objective: the student's validation accuracy, a fraction) with run
    seed ``seed``, and reports the final student's per-epoch validation accuracy to the pruner.
    ``trials`` counts the sampler's trials; with ``defaults_trial`` (the default) the study also
    scores the profile's defaults (:func:`default_values`) once, as an enqueued trial with user
    attribute ``defaults`` that the pruner never stops, so the chosen values are never worse on
    validation than the defaults (a sampled trial the pruner stops is not a candidate; a defaults
    trial pruned by an older version is scored again). The entry's ``trials`` counts
    every finished trial, the defaults' included; ``defaults_trial`` gives its number, state and score.
    Writes the best values into ``<out_dir>/<dataset>-<profile>.json`` (other methods' entries are
    kept) and returns this method's entry. ``settings`` (``db3kd run --set`` keys, e.g.
    ``{"per_class": 1000}``) are held fixed in every trial; such a study is its own entry,
    ``METHOD@key=value,...`` (:func:`entry_key`), which no run applies by default: pass its values
    with ``--set`` (and ``--set extra.params=...`` to label them). Raises ConfigError for a bad method, profile or space,
    DB3KDError when no trial finished.
    """
    import tempfile

    import optuna

    from db3kd.config import resolve
    from db3kd.data import load_dataset
    from db3kd.records import command_line, write_json_atomic
    from db3kd.runner import run
    from db3kd.teacher import cache_root, get_teacher

    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"invalid trials={trials!r}: must be an integer >= 1")
    space = search_space(method, profile, dataset)
    settings = dict(settings or {})
    base = resolve(dataset, method, profile, seed, params="paper", overrides=settings)
    key = entry_key(method, settings)
    if splits is None:
        splits = load_dataset(dataset, data_root, val_fraction=base.val_fraction, image_size=base.image_size)
    if not base.teacher_file:  # train (or load) the shared teacher on the real splits first
        get_teacher(splits, base.teacher, seed=base.teacher_seed, device=device, progress=progress)
    view = validation_view(splits)
    if storage is None:
        path = cache_root() / "tuning" / f"{dataset}-{profile}.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{path}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=sampler_seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    study = optuna.create_study(study_name=study_name(dataset, profile, key, seed, space, storage), storage=storage,
                                sampler=sampler, pruner=pruner, direction="maximize", load_if_exists=True)
    from db3kd.tracking import Tracker

    tracker = Tracker(tracking_uri, enabled=tracking, session_name=f"tune {dataset} {profile} {method}",
                      session_tags={"profile": profile, "role": "tuning", "method": method})
    done = lambda: [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE,  # noqa: E731
                                                           optuna.trial.TrialState.PRUNED)]

    def objective(trial: "optuna.Trial") -> float:
        values = {name: _suggest(trial, name, dist) for name, dist in space.items()}
        method_values, student_values = _split(values)
        config = resolve(dataset, method, profile, seed, params="paper", overrides=settings, method_overrides=method_values,
                         student_overrides=student_values)
        case = tracker.start_case(config, name=f"tune-{dataset}-{method}-t{trial.number}",
                                  tags={"study": study.study_name, "trial": trial.number, "role": "tuning"})

        def log(metrics: dict, step=None) -> None:
            case.log(metrics, step)
            value = metrics.get("student/val_accuracy")
            if value is not None and step is not None and math.isfinite(value):
                trial.report(float(value), int(step))
                if not trial.user_attrs.get("defaults") and trial.should_prune():  # the defaults run to the end
                    raise optuna.TrialPruned(f"val accuracy {value:.4f} after epoch {step} below the median")

        with tempfile.TemporaryDirectory(prefix="db3kd-tune-") as tmp:
            try:
                record = run(config, device=device, progress=progress, log=log, splits=view, run_dir=tmp)
            except optuna.TrialPruned:
                case.end("KILLED")
                raise
            except BaseException:
                case.end("FAILED")
                raise
        val = float(record["student_accuracy"])  # scored on validation_view: the validation split
        case.log({"val_accuracy": val}, 0)
        case.end("FINISHED")
        if on_trial is not None:
            on_trial({"number": trial.number, "values": values, "val_accuracy": val})
        return val

    defaults, outside = default_values(space, base)

    def is_defaults(t) -> bool:
        """A defaults trial of today's defaults (one scored with other values counts as sampled)."""
        return bool(t.user_attrs.get("defaults")) and t.user_attrs.get("defaults_outside_space", []) == outside and all(
            t.params.get(k) == v for k, v in defaults.items())

    sampled = [t for t in done() if not is_defaults(t)]
    missing = trials - len(sampled)
    if defaults_trial and not any(is_defaults(t) and t.state == optuna.trial.TrialState.COMPLETE for t in done()):
        # a defaults trial left RUNNING by a killed process never finishes, and one pruned before
        # the defaults were exempt from pruning was never scored: enqueue it again, unless
        # one is already waiting (not Optuna's skip_if_exists, which also counts the stale one)
        waiting = [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING and t.user_attrs.get("defaults")]
        if not waiting:
            study.enqueue_trial(defaults, user_attrs={"defaults": True, "defaults_outside_space": outside})
        missing = max(missing, 0) + 1
    if missing > 0:
        study.optimize(objective, n_trials=missing, catch=())
    tracker.finish_session([dataset])
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise DB3KDError(f"no trial of study {study.study_name} finished (all pruned or failed); rerun with more trials")
    best = study.best_trial
    method_values, student_values = _split(best.params)
    entry = {
        "params": method_values, "student": student_values, "trials": len(done()), "complete_trials": len(complete),
        "pruned_trials": len(done()) - len(complete), "best_val_accuracy": best.value, "best_trial": best.number,
        **({"settings": settings} if settings else {}),
        "seed": seed, "sampler": f"TPESampler(seed={sampler_seed})",
        "pruner": "MedianPruner(n_startup_trials=5, n_warmup_steps=1) on the final student's per-epoch val accuracy",
        "search_space": {k: repr(v) for k, v in space.items()}, "study": study.study_name,
        "defaults_trial": next(({"number": t.number, "state": t.state.name, "val_accuracy": t.value,
                                 "outside_space": t.user_attrs.get("defaults_outside_space", [])}
                                for t in sorted(done(), key=lambda t: (t.state == optuna.trial.TrialState.COMPLETE,
                                                                       t.number), reverse=True)
                                if is_defaults(t)), None),
        "command": command or command_line(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    path = tuned_path(dataset, profile, out_dir)
    from db3kd.leaderboard import path_lock

    with path_lock("tuned", path):  # two studies of one dataset may finish at once: neither entry is lost
        table = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        table[key] = entry
        write_json_atomic(dict(sorted(table.items())), path)
    entry["path"] = str(path)
    return entry
