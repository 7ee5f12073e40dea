"""DB3KD with training data (paper Sec. 3.2): robustness -> soft labels (Eq. 6-7) -> KD (Eq. 1).

Three registered methods differ only in how the robustness ``r[i, n]`` is measured:
``db3kd-sd`` (Eq. 2, no queries), ``db3kd-bd`` (Eq. 3) and ``db3kd-mbd`` (Eq. 4-5).
References: ``refs_per_class`` random training images of each class (paper: 100), drawn from
the method's training data with a generator seeded by ``label_seed`` (default 0; None = the run
seed), which also seeds MBD's random probes. The robustness result is cached on disk
(``$DB3KD_CACHE/labels/``) under a key of the teacher checkpoint, the label-construction
parameters, ``label_seed`` and the training images, so the soft labels of a dataset are built once
and shared by every student seed and tuning trial (:func:`label_cache_key`); the record's metrics
say ``label_seed`` and whether the labels came from the cache (``labels_cached``; their queries
are still counted, as paid by the run that built them).

DB3KD-MBD's reported student is chosen on the validation split among the students of the query
milestones (the paper reports the best *test* accuracy over 1k-20k queries; we never select on
test): metrics ``chosen_milestone`` and ``chosen_milestone_val_accuracy``; the test accuracy of
every milestone's student is kept for the accuracy-versus-queries curve only.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from db3kd.context import MethodContext, MethodOutput
from db3kd.registry import Method, MethodParams, register_method

PAPER = "Wang, Zero-Shot Knowledge Distillation from a Decision-Based Black-Box Model, ICML 2021"


class DB3KDParams(MethodParams):
    """Shared DB3KD hyperparameters (paper Sec. 4.1). tau: Eq. 1 / Eq. 7 temperature (paper 0.3);
    w_ce, w_kd: Eq. 1 weights (lambda = w_kd = 1); soft_labels: ``paper`` (Eq. 6-7) or
    ``released`` (authors' code: Eq. 6 only, T = 20); refs_per_class: S (paper 100);
    tol: bisection stop in L2 units (paper 1e-5); chunk_size: samples per lockstep chunk and per
    checkpoint file (BD 256, MBD 128: enough pairs per round to fill the teacher's batches; the labels
    do not depend on it);
    tau_squared: multiply the KL term by tau^2 (Hinton's correction; Eq. 1 as printed has none);
    label_seed: seed of the references and MBD's probes (0; None = the run seed): with a fixed
    seed the labels are computed once per dataset and only the student varies with the run seed;
    label_cache: reuse and keep the robustness result in ``$DB3KD_CACHE/labels`` (True; never used
    when the run has a query budget, whose point is to spend queries; False always measures)."""

    tau: float = Field(default=0.3, gt=0)
    w_ce: float = Field(default=1.0, ge=0)
    w_kd: float = Field(default=1.0, ge=0)
    tau_squared: bool = False
    soft_labels: Literal["paper", "released"] = "paper"
    refs_per_class: int = Field(default=100, ge=1)
    tol: float = Field(default=1e-5, gt=0)
    chunk_size: int = Field(default=256, ge=1)
    label_seed: int | None = Field(default=0, ge=0)
    label_cache: bool = True

    profile_overrides: ClassVar[dict] = {
        "paper/flowers102": {"refs_per_class": 20},
        "cpu": {"refs_per_class": 20, "tol": 1e-4},
        # smoke's 200 samples would be one chunk at 256: four keep resume and distribution over workers exercised
        "smoke": {"refs_per_class": 4, "tol": 1e-3, "chunk_size": 64},
        # the AlexNet teacher answers ~500 images/s on 2 CPU cores: fewer references keep the smoke run short
        "smoke/cifar10": {"refs_per_class": 2},
    }
    search_space: ClassVar[dict] = {"tau": ("float", 0.1, 20.0, "log"), "tau_squared": ("categorical", (False, True)),
                                    "w_ce": ("float", 0.0, 1.0), "w_kd": ("float", 0.1, 10.0, "log")}


#: Parameters that shape the student only, not the robustness: left out of the label cache key.
_STUDENT_ONLY = ("tau", "w_ce", "w_kd", "tau_squared", "soft_labels", "milestone_students", "label_cache")


def _engine_source_digest() -> str:
    """SHA-256 prefix of the query engine's source (db3kd/robustness.py, db3kd/oracle.py, db3kd/search/):
    a changed engine never reuses labels cached by an older one."""
    import hashlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = [root / "robustness.py", root / "oracle.py", *sorted((root / "search").glob("*.py"))]
    h = hashlib.sha256()
    for f in files:
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def label_cache_key(ctx: MethodContext, method: str, params: "DB3KDParams", label_seed: int) -> str | None:
    """24 hex digits of SHA-256 over the teacher checkpoint, the method, its label-construction
    parameters, ``label_seed``, torch's version, the engine's source and the training images and
    labels; None when the teacher's checkpoint is unknown (nothing is cached then)."""
    import hashlib
    import json

    if ctx.teacher_checkpoint is None:
        return None
    h = hashlib.sha256()
    spec = {k: v for k, v in params.model_dump().items() if k not in _STUDENT_ONLY}
    h.update(json.dumps({"teacher": ctx.teacher_checkpoint, "method": method, "params": spec, "label_seed": label_seed,
                         "torch": torch.__version__, "engine": _engine_source_digest(), "format": 1},
                        sort_keys=True, default=str).encode())
    for t in (ctx.train_x, ctx.train_y):
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def pick_references(y: torch.Tensor, num_classes: int, per_class: int, seed: int) -> torch.Tensor:
    """Indices (int64) of ``per_class`` random images of each class (all of a class if it has fewer)."""
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(num_classes):
        idx = (y == c).nonzero().squeeze(1)
        picks.append(idx[torch.randperm(idx.numel(), generator=gen)[:per_class]])
    return torch.cat(picks)


class _DB3KD(Method):
    """Template: measure robustness, build soft labels, train the student with Eq. 1."""

    paper = PAPER
    teacher_access = "labels"
    data = "full"
    Params = DB3KDParams

    def robustness(self, ctx: MethodContext, x: torch.Tensor, refs: torch.Tensor, ref_labels: torch.Tensor):
        raise NotImplementedError  # returns a db3kd.search.RobustnessResult-like object

    def soft_labels(self, r: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from db3kd.soft_labels import soft_labels_from_robustness

        return soft_labels_from_robustness(r, y, self.params.tau, variant=self.params.soft_labels)

    def train_student(self, ctx: MethodContext, targets: torch.Tensor, *, desc: str = "student", seed_offset: int = 0):
        from db3kd.losses import kd_loss

        p = self.params
        tau = 20.0 if p.soft_labels == "released" else p.tau
        y = ctx.train_y.to(ctx.device)
        targets = targets.to(ctx.device)
        student = ctx.new_model(seed_offset=seed_offset)

        def loss(logits, _xb, idx):
            return kd_loss(logits, y[idx], targets[idx], tau, w_ce=p.w_ce, w_kd=p.w_kd, tau_squared=p.tau_squared)

        ctx.train(student, loss, desc=desc, seed_offset=seed_offset)
        return student

    def run(self, ctx: MethodContext) -> MethodOutput:
        from db3kd.soft_labels import label_statistics

        x = ctx.train_x.float().div(255.0)
        label_seed = ctx.seed if self.params.label_seed is None else self.params.label_seed
        self.label_seed = label_seed
        ref_idx = pick_references(ctx.train_y, ctx.num_classes, self.params.refs_per_class, label_seed)
        before = getattr(ctx.teacher, "queries", 0)
        result, cache_path, cached = self._cached_robustness(ctx, x, ref_idx, label_seed)
        # chunks reloaded from an interrupted run were paid for there: count them once, here
        resumed = result.total_queries - (getattr(ctx.teacher, "queries", 0) - before)
        r = result.distances
        targets = self.soft_labels(r, ctx.train_y)
        finite = r[torch.isfinite(r)]
        metrics = {
            **label_statistics(targets, ctx.train_y),
            "mean_robustness": float(finite.mean()) if finite.numel() else float("nan"),
            "teacher_misclassified": float(result.misclassified.float().mean()) if result.misclassified is not None else 0.0,
            "label_seed": float(label_seed),
            "labels_cached": float(cached),
        }
        ctx.log(metrics, None)
        from db3kd.training import atomic_save

        atomic_save({"distances": r, "soft_labels": targets, "queries": result.queries}, ctx.workdir / "soft_labels.pt")
        student = self.train_student(ctx, targets)
        artifacts = {"soft_labels": str(ctx.workdir / "soft_labels.pt")}
        if cache_path is not None:
            artifacts["label_cache"] = str(cache_path)
        output = MethodOutput(student=student, metrics=metrics, artifacts=artifacts, resumed_queries=resumed,
                              soft_labels=targets)
        output.tables["class_distance"] = _class_distance_matrix(r, ctx.train_y, ctx.num_classes)
        self.after_training(ctx, result, output)
        return output

    def _cached_robustness(self, ctx: MethodContext, x: torch.Tensor, ref_idx: torch.Tensor, label_seed: int):
        """(robustness result, cache file or None, whether it was loaded from the cache)."""
        from dataclasses import fields

        from db3kd.teacher import cache_root

        use = self.params.label_cache and getattr(ctx.config, "query_budget", None) is None
        key = label_cache_key(ctx, self.name, self.params, label_seed) if use else None
        if key is None:
            return self.robustness(ctx, x, x[ref_idx], ctx.train_y[ref_idx]), None, False
        from filelock import FileLock

        from db3kd.training import atomic_save

        path = cache_root() / "labels" / f"{self.name}-{key}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):  # parallel seeds wait for the first instead of measuring again
            if path.exists():
                state = torch.load(path, map_location="cpu", weights_only=False)  # our own cache file
                return state["type"](**state["fields"]), path, True
            result = self.robustness(ctx, x, x[ref_idx], ctx.train_y[ref_idx])
            atomic_save({"type": type(result), "fields": {f.name: getattr(result, f.name) for f in fields(result)},
                         "label_seed": label_seed}, path)
            return result, path, False

    def after_training(self, ctx, result, output) -> None:
        """Hook for per-milestone students (MBD)."""


def _class_distance_matrix(r: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[list[float]]:
    """Mean finite r[i, n] over samples of class m, as a (L, L) nested list (paper Fig. 5); NaN where none."""
    out = torch.full((num_classes, num_classes), float("nan"))
    for m in range(num_classes):
        rows = r[y == m]
        for n in range(num_classes):
            col = rows[:, n]
            col = col[torch.isfinite(col)]
            if col.numel():
                out[m, n] = col.mean()
    return out.tolist()


@register_method
class DB3KDSampleDistance(_DB3KD):
    """DB3KD-SD: robustness = distance to the nearest reference of each class (Eq. 2). No queries."""

    name = "db3kd-sd"
    teacher_access = "none"  # Eq. 2 never asks the teacher
    paper_results = {"mnist": 99.15, "fmnist": 90.86, "cifar10": 77.66, "flowers102": 93.18}

    def robustness(self, ctx, x, refs, ref_labels):
        from db3kd.search import RobustnessResult, sample_distance

        r = sample_distance(x, ctx.train_y, refs, ref_labels, ctx.num_classes)
        return RobustnessResult(distances=r, queries=torch.zeros_like(r, dtype=torch.int64))


@register_method
class DB3KDBoundaryDistance(_DB3KD):
    """DB3KD-BD: robustness = distance to the teacher's boundary along segments to references (Eq. 3)."""

    name = "db3kd-bd"
    paper_results = {"mnist": 99.51, "fmnist": 90.68, "cifar10": 77.92, "flowers102": 93.30}

    def robustness(self, ctx, x, refs, ref_labels):
        from db3kd.search import boundary_search, plan_chunks

        p = self.params
        return ctx.executor.search(boundary_search, ctx.teacher, x, ctx.train_y, refs, ref_labels, ctx.num_classes,
                                   num_chunks=len(plan_chunks(x.shape[0], p.chunk_size)), tol=p.tol,
                                   chunk_size=p.chunk_size, progress=ctx.progress,
                                   checkpoint_dir=ctx.checkpoint_dir("robustness"))


class MBDParams(DB3KDParams):
    """DB3KD-MBD adds: budget (queries per (sample, target) pair, BD included; paper 1k-20k, best
    reported), num_directions (Q, paper 200), xi_d (initial step, fraction of the distance; paper
    0.2), delta (probe radius as a fraction of the current distance r: 0.01, i.e. 0.01 r; the
paper gives no value; the authors' code (REFERENCE.md section 4) adds a vector of norm
eps_g = 0.001 to the unit search direction, about 0.001 r, and divides it by 10 on step-size
resets; our 0.01 is ten times that, kept from the first engine and not re-measured against 0.001
here -- ``--set delta=0.001`` runs the authors' radius), milestones (query counts at which
    distances are recorded), milestone_students (train one student per milestone for the
    accuracy-versus-queries curve, paper Fig. 4), estimator (the boundary estimator of the walk:
    ``geo`` (default: one sign bit per coordinate of an orthonormal frame, then a line search by
    bisection for the step; num_directions coordinates per iteration, ``xi_d`` unused; see
    :func:`db3kd.search.estimators.geo_step`), or Eq. 4's sign gradients ``tangent`` (Sign-OPT's
    probes with HopSkipJump's baseline, the default before), plain ``sign-opt``, ``hsja``
    (off-sphere probes), ``paper`` (Eq. 4-5 as printed: off-sphere Gaussian probes, raw signs,
    fixed step ``xi_d``); see :func:`db3kd.search.estimators.sign_gradient`)."""

    budget: int = Field(default=20000, ge=1)
    num_directions: int = Field(default=200, ge=2)
    xi_d: float = Field(default=0.2, gt=0)
    delta: float = Field(default=0.01, gt=0)
    milestones: tuple[int, ...] = (1000, 2000, 5000, 10000, 20000)
    milestone_students: bool = True
    estimator: Literal["geo", "tangent", "sign-opt", "hsja", "paper"] = "geo"
    chunk_size: int = Field(default=128, ge=1)

    profile_overrides: ClassVar[dict] = {
        "paper/flowers102": {"refs_per_class": 20},
        "cpu": {"refs_per_class": 10, "tol": 1e-4, "budget": 400, "num_directions": 30,
                "milestones": (150, 250, 400)},
        "smoke": {"refs_per_class": 4, "tol": 1e-3, "budget": 120, "num_directions": 20,
                  "milestones": (60, 120), "milestone_students": False, "chunk_size": 32},
        "smoke/cifar10": {"refs_per_class": 2, "budget": 60, "num_directions": 8, "milestones": (30, 60)},
    }


@register_method
class DB3KDMinimalBoundaryDistance(_DB3KD):
    """DB3KD-MBD: BD's boundary point walked along the boundary by sign-gradient steps (Eq. 4-5)."""

    name = "db3kd-mbd"
    Params = MBDParams
    paper_results = {"mnist": 99.52, "fmnist": 91.45, "cifar10": 78.30, "flowers102": 93.77}

    def robustness(self, ctx, x, refs, ref_labels):
        from db3kd.search import minimal_boundary_search, plan_chunks

        p = self.params
        return ctx.executor.search(
            minimal_boundary_search, ctx.teacher, x, ctx.train_y, refs, ref_labels, ctx.num_classes,
            num_chunks=len(plan_chunks(x.shape[0], p.chunk_size)), budget=p.budget,
            num_directions=p.num_directions, xi_d=p.xi_d, delta=p.delta, tol=p.tol,
            milestones=[m for m in p.milestones if m <= p.budget], seed=self.label_seed, estimator=p.estimator,
            chunk_size=p.chunk_size,
            progress=ctx.progress, checkpoint_dir=ctx.checkpoint_dir("robustness"),
        )

    def after_training(self, ctx, result, output) -> None:
        """One student per query milestone (paper Fig. 4); the reported one is chosen on validation.

        The final student (trained on the distances at the full budget) is the last milestone's:
        milestones at or above the budget are not trained again. Among the candidates the best
        validation accuracy wins (ties: fewer queries); its milestone is ``metrics["chosen_milestone"]``.
        The test accuracy of each candidate goes to ``milestone_accuracy`` for the curve only.
        """
        from db3kd.training import evaluate

        p = self.params
        output.metrics["queries_per_pair_mean"] = float(result.queries[torch.isfinite(result.distances)].float().mean())
        # queries per training sample a run stopped at each milestone would have spent (frontier plot)
        n, shared = max(int(result.queries.shape[0]), 1), result.total_queries - int(result.queries.sum())
        output.tables["milestone_queries_per_sample"] = {
            str(int(m)): (shared + int(result.queries.clamp(max=int(m)).sum())) / n for m in (result.milestones or [])}
        val = {p.budget: evaluate(output.student, ctx.val_x, ctx.val_y, device=ctx.device)}
        students = {p.budget: output.student}
        if p.milestone_students and result.distances_at is not None and ctx.evaluate_milestone is not None:
            for k, milestone in enumerate(result.milestones):
                milestone = int(milestone)
                if milestone >= p.budget:  # the final student already is this milestone's
                    continue
                targets = self.soft_labels(result.distances_at[k], ctx.train_y)
                student = self.train_student(ctx, targets, desc=f"milestone{milestone}", seed_offset=0)
                students[milestone] = student
                val[milestone] = evaluate(student, ctx.val_x, ctx.val_y, device=ctx.device)
                acc = ctx.evaluate_milestone(student)
                output.milestone_accuracy[milestone] = acc
                ctx.log({"milestone_accuracy": acc, "milestone_val_accuracy": val[milestone],
                         "milestone_mean_distance": float(
                             result.distances_at[k][torch.isfinite(result.distances_at[k])].mean())}, milestone)
            output.milestone_accuracy[p.budget] = ctx.evaluate_milestone(output.student)
        chosen = max(val, key=lambda m: (val[m], -m))
        output.student = students[chosen]
        output.metrics["chosen_milestone"] = float(chosen)
        output.metrics["chosen_milestone_val_accuracy"] = float(val[chosen])
        output.tables["milestone_val_accuracy"] = {str(m): v for m, v in sorted(val.items())}
