"""Run one (dataset, method, profile, seed): data -> teacher -> oracle -> method -> evaluation -> record.

:func:`run` is what ``db3kd run`` and every benchmark case call. It returns a flat record (a
dict of JSON-serialisable values) with the keys of ``db3kd run --json`` plus bookkeeping
(configuration hash, teacher checkpoint hash, metrics, milestone accuracies).
"""

from __future__ import annotations

import functools
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from db3kd.config import RunConfig

__all__ = ["run", "teacher_access_for", "select_subset", "code_version", "user_teacher_conflict"]


# modules that do not change what a run computes (see code_version)
PRESENTATION_MODULES = frozenset({
    "db3kd/cli.py", "db3kd/leaderboard.py", "db3kd/plots.py", "db3kd/stats.py", "db3kd/tracking.py",
    "db3kd/tuning.py", "db3kd/crosscheck.py", "db3kd/search/closed_form.py",
})


#: packages whose modules define registered methods: the shared core of every run is what
#: :mod:`db3kd.runner` imports without entering them (a method's own modules count for it alone)
METHOD_PACKAGES = ("baselines", "db3kd.methods")


def _source_modules() -> dict[str, tuple[str, Path]]:
    """Every module of the ``db3kd`` and ``baselines`` packages: dotted name -> (``db3kd/search/walk.py``
    as :data:`PRESENTATION_MODULES` spells it, source file)."""
    import baselines
    import db3kd

    modules = {}
    for package in (db3kd, baselines):
        root = Path(package.__file__).resolve().parent
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root)
            parts = (package.__name__, *rel.with_suffix("").parts)
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = (f"{package.__name__}/{rel.as_posix()}", path)
    return modules


@functools.lru_cache(maxsize=None)
def _imports(name: str, path: Path, known: frozenset) -> frozenset:
    """The package modules that ``name`` imports anywhere in its source (lazy imports in functions
    included), or names as a string constant (``"db3kd.oracle"``, a ``"module:attr"`` loader)."""
    import ast

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.split(".")[0] in (
                "db3kd", "baselines"):
            found.add(node.value.partition(":")[0])
    deps = set()
    for target in found:
        while target and target not in known:  # ``from a.b import name`` names a module or an attribute
            target = target.rpartition(".")[0]
        if target and target != name:
            deps.add(target)
    return frozenset(deps)


def _closure(starts, modules: dict[str, tuple[str, Path]], *, enter_methods: bool) -> set[str]:
    known = frozenset(modules)
    seen: set[str] = set()
    stack = list(starts)
    while stack:
        name = stack.pop()
        if name not in modules:  # a plugin module without a source file: nothing to hash
            continue
        key, path = modules[name]
        if name in seen or key in PRESENTATION_MODULES:
            continue
        if not enter_methods and any(name == p or name.startswith(p + ".") for p in METHOD_PACKAGES):
            continue
        seen.add(name)
        if name not in METHOD_PACKAGES:  # a method package's __init__ imports every method of the
            # package to register it: not a dependency of any one of them
            stack.extend(_imports(name, path, known))
    return seen


@functools.lru_cache(maxsize=None)
def code_version(method: str | None = None) -> str:
    """What code produced a record of ``method``: ``<db3kd package version>+<12 hex digits>``, the
    digits a SHA-256 over the relative path and bytes of each ``.py`` file the run can execute (so an
    uncommitted edit counts too): the shared core (every module :mod:`db3kd.runner` imports,
    transitively, outside the method packages :data:`METHOD_PACKAGES`) plus the method's own module
    and what it imports, transitively (imports found anywhere in a file, lazy ones included, and
    module names given as strings). :data:`PRESENTATION_MODULES`, which only read records (tables,
    plots, statistics, the command line, MLflow logging, tuning studies, cross-checks), never count.
    So an edit to ZSKT reruns only ZSKT's cases, an edit to the query engine only the methods that
    use it, an edit to the runner, data, teacher or training code every case; a plugin's method
    (registered from a module outside the packages) counts that module's file too. ``method=None``:
    every module. Stored in every record as ``code_version``; a harness case or a ``--run-dir`` run is
    reused only under the same one. Raises ConfigError for an unregistered method."""
    import hashlib
    from importlib import metadata

    try:
        version = metadata.version("db3kd")
    except metadata.PackageNotFoundError:  # pragma: no cover - source checkout without metadata
        version = "0+unknown"
    modules = _source_modules()
    if method is None:
        names = _closure(modules, modules, enter_methods=True)
    else:
        from db3kd.registry import get_method

        names = _closure(["db3kd.runner"], modules, enter_methods=False)
        own = get_method(method).__module__
        if own not in modules:  # a plugin's method outside db3kd/baselines: its own file counts too
            source = getattr(sys.modules.get(own), "__file__", None)
            if source and Path(source).is_file():
                modules = {**modules, own: (f"<plugin>/{own}.py", Path(source))}
        names |= _closure([own], modules, enter_methods=True)
    h = hashlib.sha256()
    for key, path in sorted(modules[n] for n in names):
        h.update(f"{key}\0".encode())
        h.update(path.read_bytes())
        h.update(b"\0")
    return f"{version}+{h.hexdigest()[:12]}"


def user_teacher_conflict(method_cls, params=None) -> str | None:
    """Why ``method_cls`` cannot be benchmarked against a user's teacher file, or None when it can.

    A user's teacher is answered only through the oracle: label (``labels``) and score
    (``scores``) methods query it, teacher-free methods (``none``) run as before; a white-box
    method needs the module's gradients, and a method whose class sets ``needs_teacher_recipe``
    (True, or a function of its params) trains the teacher's architecture with the teacher's
    training recipe, neither of which a teacher file provides.
    """
    if method_cls.teacher_access == "white_box":
        return (f"{method_cls.name} needs white-box access (the teacher's gradients); a user's teacher file is "
                "answered only through the oracle (labels or scores)")
    needs = getattr(method_cls, "needs_teacher_recipe", False)
    if callable(needs):
        needs = needs(params)
    if needs:
        return (f"{method_cls.name} trains the teacher's architecture with the teacher's training recipe, which a "
                "user's teacher file does not provide")
    return None


def select_subset(y: torch.Tensor, k: int | None, *, seed: int = 0) -> torch.Tensor:
    """Indices (int64) of a fixed random subset of size k (all indices when k is None or >= N).

    The subset depends only on ``seed`` (default 0, not the run seed), so every method and seed of
    a profile trains on the same images.
    """
    n = y.shape[0]
    if k is None or k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def _door_kwargs(config: RunConfig) -> dict:
    """Oracle keywords for a user's teacher file: output checks naming the file, input normalisation."""
    if not config.teacher_file:
        return {}
    norm = config.teacher_input
    return {"num_classes": config.num_classes, "name": f"teacher {config.teacher_file}",
            "input_norm": None if norm is None else (norm.mean, norm.std)}


def teacher_access_for(access: str, model, config: RunConfig, image_shape, device, on_answer=None):
    """What a method with ``access`` receives: None, a label oracle, a score oracle or the module.

    For a user's teacher file (``config.teacher_file``) the oracles also check every answer
    (finite float logits, one per class) and feed the teacher ``config.teacher_input``'s normalisation.
    on_answer: told the size of every oracle call (the run's query ledger). The oracles' batch size
    is ``config.oracle_batch``, or measured for (device, model) when it is ``"auto"``
    (:func:`db3kd.layout.resolve_oracle_batch`)."""
    from db3kd.layout import resolve_oracle_batch
    from db3kd.oracle import HardLabelOracle, ScoreOracle

    if access == "none":
        return None
    if access in ("labels", "scores"):
        batch = resolve_oracle_batch(config.oracle_batch, model, image_shape, device)
        cls = HardLabelOracle if access == "labels" else ScoreOracle
        return cls(model, budget=config.query_budget, batch_size=batch, device=device, input_shape=image_shape,
                   on_answer=on_answer, **_door_kwargs(config))
    if access == "white_box":
        from db3kd.oracle import as_callable_model

        return as_callable_model(model)
    raise ValueError(f"unknown teacher access {access!r}")


def run(
    config: RunConfig,
    *,
    data_root: str | Path | None = None,
    device: str = "cpu",
    progress: bool = False,
    run_dir: str | Path | None = None,
    log: Callable[[dict, int | None], None] | None = None,
    splits=None,
    fresh: bool = False,
    executor=None,
) -> dict[str, Any]:
    """Run ``config`` end to end and return its record.

    data_root: dataset folder (else $DB3KD_DATA, else ./data); device: torch device for training
    and the teacher; run_dir: when given, the run lives in ``run_dir/<config hash>``: every long
    stage checkpoints there atomically, a rerun resumes from whatever is complete, and a finished
    run (``record.json``) is returned without recomputation; otherwise artifacts go to a fresh
    temporary folder. What ``run_dir`` holds is used only under the same :func:`code_version` (and,
    for a teacher file, the same file bytes): otherwise, or with ``fresh=True``, the config's folder
    is emptied first. log(metrics, step): metric sink (e.g. MLflow); splits: pre-loaded
    :class:`db3kd.data.DataSplits` to reuse; executor: how label construction runs
    (:class:`db3kd.distributed.ChunkExecutor`, default in-process, or ``RayExecutor``: the same
    record, bit for bit). The record's ``queries_sent`` counts every query any oracle of the run
    sent, interrupted and retried work included (``queries_total`` counts each finished piece of
    work once); ``soft_label_sha256`` is the digest of the soft labels the student was trained
    on (None for methods without).

    A user's teacher file is checked at the door before any query counts (:func:`db3kd.teacher.check_teacher`):
    wrong output width, integer or non-finite outputs raise TeacherOutputError; a non-deterministic
    or near-chance teacher gives a TeacherWarning, also kept in the record (``teacher_door``,
    ``teacher_warnings``). Raises DatasetNotFoundError, ConfigError, QueryBudgetExceeded,
    TeacherOutputError, DB3KDError as they occur.
    """
    import json
    import shutil
    import tempfile
    import warnings

    from db3kd.errors import ConfigError
    from db3kd.registry import get_method
    from db3kd.teacher import TeacherWarning, file_sha256

    method_cls = get_method(config.method)
    params = method_cls.Params(**config.method_params)
    if config.teacher_input is not None and not config.teacher_file:
        raise ConfigError("teacher_input (the input normalisation of a user's teacher) needs a teacher file "
                          "(--teacher PATH); the built-in teacher takes [0, 1] pixels")
    if config.teacher_file:
        conflict = user_teacher_conflict(method_cls, params)
        if conflict:
            raise ConfigError(f"method {config.method!r} cannot use teacher file {config.teacher_file}: {conflict}")
    manifest = {"code_version": code_version(config.method),
                "teacher_sha256": file_sha256(config.teacher_file) if config.teacher_file and Path(config.teacher_file).is_file() else None}
    if run_dir is not None:
        workdir = Path(run_dir) / config.config_hash()
        stamp = workdir / "run.json"
        if workdir.exists() and (fresh or not stamp.exists() or json.loads(stamp.read_text()) != manifest):
            shutil.rmtree(workdir)  # another code version / teacher file (or asked to): start afresh
        finished = workdir / "record.json"
        if finished.exists():
            return json.loads(finished.read_text())
        workdir.mkdir(parents=True, exist_ok=True)
        from db3kd.records import write_json_atomic

        write_json_atomic(manifest, stamp)
    else:
        workdir = Path(tempfile.mkdtemp(prefix=f"db3kd-{config.config_hash()}-"))
    from db3kd.context import MethodContext
    from db3kd.distributed import LEDGER_DIR, ChunkExecutor, QueryLedger, TeacherSpec, queries_sent, soft_label_sha256
    from db3kd.data import load_dataset
    from db3kd.teacher import DOOR_PROBE, check_teacher, get_teacher, load_teacher_file, near_chance_warning
    from db3kd.training import evaluate, seed_everything

    started = time.perf_counter()
    log = log or (lambda metrics, step=None: None)
    dev = torch.device(device)
    executor = executor or ChunkExecutor()
    if executor.distributed and config.query_budget is not None:
        raise ConfigError("a query budget is enforced by one oracle in one process: --query-budget cannot be combined "
                          "with --workers / --ray-address")
    if splits is None:
        splits = load_dataset(config.dataset, data_root, val_fraction=config.val_fraction, image_size=config.image_size)
    image_shape = tuple(splits.train_x.shape[1:])
    door, teacher_warnings = None, []

    # teacher: a user's exported model (checked at the door), or the built-in one (trained once, then cached)
    if config.teacher_file:
        if config.teacher_input is not None:
            config.teacher_input.check_channels(image_shape[0])
        teacher_model, teacher_hash = load_teacher_file(config.teacher_file)
        teacher_checkpoint = teacher_hash  # the file's own SHA-256 prefix
        from db3kd.oracle import HardLabelOracle

        from db3kd.layout import resolve_oracle_batch

        kw = _door_kwargs(config)
        batch = resolve_oracle_batch(config.oracle_batch, teacher_model, image_shape, dev)
        test_x = splits.test_x.float().div(255.0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TeacherWarning)
            door = check_teacher(teacher_model, test_x[:DOOR_PROBE], config.num_classes, name=kw["name"], device=dev,
                                 batch_size=batch, input_norm=kw["input_norm"]).as_record()
        judge = HardLabelOracle(teacher_model, batch_size=batch, device=dev, input_shape=image_shape, **kw)
        pred = judge(test_x)  # the judge is not the method's oracle: its queries are not counted toward the run
        teacher_accuracy = float((pred.cpu() == splits.test_y).float().mean())
        chance = near_chance_warning(teacher_accuracy, config.num_classes, name=kw["name"], dataset=config.dataset)
        for w in caught:
            if issubclass(w.category, TeacherWarning):
                teacher_warnings.append(str(w.message))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if chance:
            teacher_warnings.append(chance)
        for text in teacher_warnings:
            warnings.warn(text, TeacherWarning, stacklevel=2)
    else:
        trained = get_teacher(splits, config.teacher, seed=config.teacher_seed, device=dev, progress=progress, log=log)
        teacher_model, teacher_hash, teacher_accuracy = trained.model, trained.key, trained.test_accuracy
        teacher_checkpoint = trained.checkpoint

    subset = select_subset(splits.train_y, config.student.train_subset)
    ledger = QueryLedger(workdir / LEDGER_DIR, "driver")
    teacher_view = teacher_access_for(method_cls.teacher_access, teacher_model, config, image_shape, dev,
                                      on_answer=ledger.add)

    def teacher_spec() -> TeacherSpec:  # what a distributed executor's workers rebuild the oracle from
        where = dict(digest=teacher_checkpoint, access=method_cls.teacher_access, input_shape=image_shape,
                     batch_size=getattr(teacher_view, "batch_size", None) or 256, num_classes=splits.num_classes)
        if config.teacher_file:
            from dataclasses import replace

            return replace(TeacherSpec.from_file(config.teacher_file, **where), oracle_kwargs=_door_kwargs(config))
        return TeacherSpec.builtin(teacher_model, arch=config.teacher.arch, **where)

    def evaluate_milestone(model) -> float:
        return evaluate(model, splits.test_x, splits.test_y, device=dev)

    ctx = MethodContext(
        config=config, params=params, train_x=splits.train_x[subset], train_y=splits.train_y[subset],
        val_x=splits.val_x, val_y=splits.val_y, num_classes=splits.num_classes, teacher=teacher_view, device=dev,
        workdir=workdir, log=log, progress=progress, evaluate_milestone=evaluate_milestone, resumable=run_dir is not None,
        executor=executor.bind(teacher_spec, workdir / LEDGER_DIR),
        teacher_checkpoint=teacher_checkpoint,
    )
    seed_everything(config.seed)
    output = method_cls(params).run(ctx)
    student_accuracy = evaluate(output.student, splits.test_x, splits.test_y, device=dev)
    queries = int(getattr(teacher_view, "queries", 0) or 0) + output.resumed_queries
    ledger.close()
    size = output.transfer_set_size if output.transfer_set_size is not None else int(subset.numel())
    wall = time.perf_counter() - started
    record = {
        "dataset": config.dataset,
        "method": config.method,
        "profile": config.profile,
        "seed": config.seed,
        "teacher_accuracy": teacher_accuracy,
        "student_accuracy": student_accuracy,
        "queries_total": queries,
        "queries_sent": queries_sent(workdir / LEDGER_DIR),
        "soft_label_sha256": soft_label_sha256(output.soft_labels),
        "queries_per_sample": queries / max(size, 1),
        "wall_seconds": wall,
        "teacher_access": method_cls.teacher_access,
        "data": method_cls.data,
        "transfer_set_size": size,
        "accuracy_kind": "final",
        "config_hash": config.config_hash(),
        "teacher_hash": teacher_hash,
        "teacher_checkpoint": teacher_checkpoint,
        "teacher_seed": None if config.teacher_file else config.teacher_seed,
        "teacher_arch": "user-file" if config.teacher_file else config.teacher.arch,
        "teacher_file": config.teacher_file,
        "teacher_sha256": manifest["teacher_sha256"],
        "teacher_door": door,
        "teacher_deterministic": None if door is None else door["deterministic"],
        "teacher_warnings": teacher_warnings,
        "code_version": manifest["code_version"],
        "student_arch": config.student.arch,
        "metrics": output.metrics,
        "milestone_accuracy": {str(k): v for k, v in output.milestone_accuracy.items()},
        "artifacts": output.artifacts,
        "tables": output.tables,
        "device": str(dev),
        "oracle_batch": getattr(teacher_view, "batch_size", None),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "workdir": str(workdir),
        "config": config.to_dict(),
    }
    from db3kd.records import json_safe, write_json_atomic

    record = json.loads(json.dumps(json_safe(record)))  # plain JSON data: identical whether fresh or reloaded
    if run_dir is not None:
        write_json_atomic(record, workdir / "record.json")
    return record
