"""Run one (dataset, method, profile, seed): data -> teacher -> oracle -> method -> evaluation -> record.

:func:`run` is what ``db3kd run`` and every benchmark case call. It returns a flat record (a
dict of JSON-serialisable values) with the keys of ``db3kd run --json`` plus bookkeeping
(configuration hash, teacher checkpoint hash, metrics, milestone accuracies).
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch

from db3kd.config import RunConfig

__all__ = ["run", "teacher_access_for", "select_subset"]


def select_subset(y: torch.Tensor, k: int | None, *, seed: int = 0) -> torch.Tensor:
    """Indices (int64) of a fixed random subset of size k (all indices when k is None or >= N).

    The subset depends only on ``seed`` (default 0, not the run seed), so every method and seed of
    a profile trains on the same images.
    """
    n = y.shape[0]
    if k is None or k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def teacher_access_for(access: str, model, config: RunConfig, image_shape, device):
    """What a method with ``access`` receives: None, a label oracle, a score oracle or the module.

    The oracles' batch size is ``config.oracle_batch``, or measured for (device, model) when it is
    ``"auto"`` (:func:`db3kd.layout.resolve_oracle_batch`).
    """
    from db3kd.layout import resolve_oracle_batch
    from db3kd.oracle import HardLabelOracle, ScoreOracle

    if access == "none":
        return None
    if access in ("labels", "scores"):
        batch = resolve_oracle_batch(config.oracle_batch, model, image_shape, device)
        cls = HardLabelOracle if access == "labels" else ScoreOracle
        return cls(model, budget=config.query_budget, batch_size=batch, device=device, input_shape=image_shape)
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
) -> dict[str, Any]:
    """Run ``config`` end to end and return its record.

    data_root: dataset folder (else $DB3KD_DATA, else ./data); device: torch device for training
    and the teacher; run_dir: when given, the run lives in ``run_dir/<config hash>``: every long
    stage checkpoints there atomically, a rerun resumes from whatever is complete, and a finished
    run (``record.json``) is returned without recomputation; otherwise artifacts go to a fresh
    temporary folder. log(metrics, step): metric sink (e.g. MLflow); splits: pre-loaded
    :class:`db3kd.data.DataSplits` to reuse. Raises DatasetNotFoundError, ConfigError,
    QueryBudgetExceeded as they occur.
    """
    import json
    import tempfile

    if run_dir is not None:
        workdir = Path(run_dir) / config.config_hash()
        finished = workdir / "record.json"
        if finished.exists():
            return json.loads(finished.read_text())
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix=f"db3kd-{config.config_hash()}-"))
    from db3kd.context import MethodContext
    from db3kd.data import load_dataset
    from db3kd.registry import get_method
    from db3kd.teacher import get_teacher, load_teacher_file
    from db3kd.training import evaluate, seed_everything

    started = time.perf_counter()
    log = log or (lambda metrics, step=None: None)
    dev = torch.device(device)
    method_cls = get_method(config.method)
    params = method_cls.Params(**config.method_params)
    if splits is None:
        splits = load_dataset(config.dataset, data_root, val_fraction=config.val_fraction, image_size=config.image_size)
    image_shape = tuple(splits.train_x.shape[1:])

    # teacher: a user's exported model, or the built-in one (trained once, then cached)
    if config.teacher_file:
        teacher_model, teacher_hash = load_teacher_file(config.teacher_file)
        teacher_checkpoint = teacher_hash  # the file's own SHA-256 prefix
        from db3kd.oracle import HardLabelOracle

        from db3kd.layout import resolve_oracle_batch

        judge = HardLabelOracle(teacher_model, batch_size=resolve_oracle_batch(config.oracle_batch, teacher_model,
                                                                               image_shape, dev),
                                device=dev, input_shape=image_shape)
        try:
            pred = judge(splits.test_x.float().div(255.0))
        except (RuntimeError, TypeError, IndexError) as exc:
            from db3kd.errors import DB3KDError

            raise DB3KDError(
                f"teacher {config.teacher_file} failed on a batch of {config.dataset} images of shape "
                f"{image_shape} (C, H, W), float32 in [0, 1]: {str(exc).splitlines()[0][:300]}"
            ) from None
        teacher_accuracy = float((pred.cpu() == splits.test_y).float().mean())
    else:
        trained = get_teacher(splits, config.teacher, seed=config.seed, device=dev, progress=progress, log=log)
        teacher_model, teacher_hash, teacher_accuracy = trained.model, trained.key, trained.test_accuracy
        teacher_checkpoint = trained.checkpoint

    subset = select_subset(splits.train_y, config.student.train_subset)
    teacher_view = teacher_access_for(method_cls.teacher_access, teacher_model, config, image_shape, dev)

    def evaluate_milestone(model) -> float:
        return evaluate(model, splits.test_x, splits.test_y, device=dev)

    ctx = MethodContext(
        config=config, params=params, train_x=splits.train_x[subset], train_y=splits.train_y[subset],
        val_x=splits.val_x, val_y=splits.val_y, num_classes=splits.num_classes, teacher=teacher_view, device=dev,
        workdir=workdir, log=log, progress=progress, evaluate_milestone=evaluate_milestone, resumable=run_dir is not None,
    )
    seed_everything(config.seed)
    output = method_cls(params).run(ctx)
    student_accuracy = evaluate(output.student, splits.test_x, splits.test_y, device=dev)
    queries = int(getattr(teacher_view, "queries", 0) or 0) + output.resumed_queries
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
        "queries_per_sample": queries / max(size, 1),
        "wall_seconds": wall,
        "teacher_access": method_cls.teacher_access,
        "data": method_cls.data,
        "transfer_set_size": size,
        "accuracy_kind": "final",
        "config_hash": config.config_hash(),
        "teacher_hash": teacher_hash,
        "teacher_checkpoint": teacher_checkpoint,
        "teacher_arch": "user-file" if config.teacher_file else config.teacher.arch,
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
