"""Machinery shared by the baselines: CE training, Hinton KD from cached or white-box targets.

Every baseline is a composition of three steps, written once here:

* :func:`train_ce` -- a fresh model trained with cross-entropy on the method's training data
  (``ctx.train_y`` or, for hard-label KD, the teacher's labels);
* :class:`KDMethod.distil` -- a fresh student trained with Hinton KD (paper Eq. 1) against
  per-batch target probabilities from a *target function* ``fn(batch_x, idx) -> (B, L)``;
* target functions: :func:`cached_targets` (answers computed once, looked up by ``idx``:
  score-oracle answers, noise-logit soft labels) and :func:`model_targets` (a frozen white-box
  model run on the very batch the student sees, so augmentation stays consistent).

Seeds: the final student of every method is built with ``seed_offset=0`` (the same
initialisation and batch order as ``student-ce``, so a row differs from ``student-ce`` only by its
loss); auxiliary models (surrogates, earlier generations, self-teachers) use
``AUX_SEED_OFFSET * k`` for k = 1, 2, ...
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from db3kd.context import MethodContext
from db3kd.losses import kd_loss
from db3kd.registry import Method, MethodParams

__all__ = [
    "AUX_SEED_OFFSET",
    "TargetFn",
    "KDParams",
    "KDMethod",
    "to_float01",
    "tempered_probs",
    "query_all",
    "query_training_set",
    "cached_targets",
    "model_targets",
    "ce_objective",
    "train_ce",
    "final_val_accuracy",
]

AUX_SEED_OFFSET = 100
TargetFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``fn(batch_x, idx) -> target_probs``: batch_x float (B, C, H, W) as the student sees it,
idx int64 (B,) indices into ``ctx.train_x``; returns float (B, L) rows summing to 1."""


def to_float01(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (0..255) -> float32 in [0, 1]; float input is returned as float32 unchanged."""
    return x.float().div(255.0) if x.dtype == torch.uint8 else x.float()


def tempered_probs(p: torch.Tensor, tau: float) -> torch.Tensor:
    """Probabilities at temperature ``tau`` from probabilities at temperature 1.

    ``p_tau[l] = p[l]^(1/tau) / sum_k p[k]^(1/tau)``, computed as ``softmax(log p / tau)``. For
    ``p = softmax(z)`` this equals ``softmax(z / tau)`` exactly (the normaliser of p cancels), so a
    score oracle, which only returns ``softmax(z)`` at T = 1, still gives Hinton's ``p_t^tau``.
    p: float (N, L), rows summing to 1; zeros are clamped to the smallest positive float32
    (a class the teacher gives no mass stays at ~0). Returns float32 (N, L).
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    logp = p.float().clamp_min(torch.finfo(torch.float32).tiny).log()
    return torch.softmax(logp / tau, dim=1)


def query_all(oracle, x: torch.Tensor, *, chunk: int = 4096) -> torch.Tensor:
    """Ask ``oracle`` about every image of ``x`` exactly once (one query per image).

    x: uint8 (N, C, H, W); converted to float in [0, 1] ``chunk`` images at a time, so a large
    training set is never held in float32 at once. Returns the concatenated answers on the CPU:
    int64 (N,) for a HardLabelOracle, float32 (N, L) for a ScoreOracle.
    """
    answers = [oracle(to_float01(x[s : s + chunk])).cpu() for s in range(0, x.shape[0], chunk)]
    return torch.cat(answers)


def query_training_set(ctx: MethodContext, name: str) -> tuple[torch.Tensor, int]:
    """The teacher's answers for every image of ``ctx.train_x`` (one query each), and the resumed count.

    In a resumable run (``ctx.resumable``) the answers are saved atomically to
    ``ctx.workdir / f"{name}.pt"``; a rerun of an interrupted run loads them instead of asking again
    and returns their number as the second value, to be reported as ``MethodOutput.resumed_queries``
    (the queries were paid for by the earlier process). Otherwise returns (answers, 0).
    """
    from db3kd.training import atomic_save

    path = ctx.workdir / f"{name}.pt" if ctx.resumable else None
    n = int(ctx.train_x.shape[0])
    if path is not None and path.exists():
        answers = torch.load(path, map_location="cpu", weights_only=True)
        if answers.shape[0] == n:
            return answers, n
    answers = query_all(ctx.teacher, ctx.train_x)
    if path is not None:
        atomic_save(answers, path)
    return answers, 0


def cached_targets(probs: torch.Tensor) -> TargetFn:
    """Target function looking up precomputed per-sample targets: ``fn(_, idx) = probs[idx]``."""

    def fn(_xb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return probs[idx.to(probs.device)]

    return fn


def model_targets(model: nn.Module, tau: float) -> TargetFn:
    """Target function of a frozen white-box model: ``fn(xb, _) = softmax(model(xb) / tau)``.

    The model is put in eval mode and run without gradients on the student's own batch.
    """
    model.eval()

    def fn(xb: torch.Tensor, _idx: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(model(xb).float() / tau, dim=1)

    return fn


def _epochs(epochs: int | None) -> dict:
    return {} if epochs is None else {"epochs": epochs}


def final_val_accuracy(history: list[dict]) -> float:
    """Validation accuracy (fraction) after the last epoch of a ``ctx.train`` history (NaN if none)."""
    return float(history[-1].get("val_accuracy", float("nan"))) if history else float("nan")


def ce_objective(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``CE(softmax(z), y) = -mean_b log softmax(z_b)[y_b]``. logits float (B, L); y int64 (B,). Scalar."""
    return F.cross_entropy(logits, y)


def train_ce(
    ctx: MethodContext,
    arch: str | None = None,
    *,
    labels: torch.Tensor | None = None,
    desc: str = "student",
    seed_offset: int = 0,
    stage=None,
    epochs: int | None = None,
) -> tuple[nn.Module, list[dict]]:
    """A fresh ``arch`` model (default: the student's) trained with :func:`ce_objective`.

    labels: int64 (N,) targets aligned with ``ctx.train_x`` (default ``ctx.train_y``; hard-label
    KD passes the teacher's answers). stage: a :class:`db3kd.config.StageConfig` recipe (default
    the student's); epochs: overrides the recipe's epochs. Returns (model, per-epoch history).
    """
    y = (ctx.train_y if labels is None else labels).to(ctx.device)
    model = ctx.new_model(arch, seed_offset=seed_offset)

    def loss(logits: torch.Tensor, _xb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return ce_objective(logits, y[idx])

    history = ctx.train(model, loss, stage=stage, desc=desc, seed_offset=seed_offset, **_epochs(epochs))
    return model, history


class KDParams(MethodParams):
    """Hinton KD weights, paper Eq. 1: ``w_ce * CE + w_kd * c * KL(p_t^tau || p_s^tau)``.

    tau: temperature (> 0; DB3KD paper 0.3); w_ce, w_kd: term weights (paper lambda = w_kd = 1);
    tau_squared: multiply the KL by tau^2 (Hinton's gradient-scale correction; Eq. 1 as printed
    has no such factor, so False by default). KL uses ``reduction="batchmean"``.
    """

    tau: float = Field(default=0.3, gt=0)
    w_ce: float = Field(default=1.0, ge=0)
    w_kd: float = Field(default=1.0, ge=0)
    tau_squared: bool = False

    search_space: ClassVar[dict] = {"tau": ("float", 0.1, 20.0, "log"), "tau_squared": ("categorical", (False, True)),
                                    "w_ce": ("float", 0.0, 1.0), "w_kd": ("float", 0.1, 10.0, "log")}


class KDMethod(Method):
    """Base of the baselines whose student loss is Hinton KD against per-sample target probabilities."""

    Params = KDParams
    data = "full"

    def objective(self, logits: torch.Tensor, y: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
        """The student loss (Eq. 1). logits float (B, L); y int64 (B,); target_probs float (B, L) at tau."""
        p = self.params
        return kd_loss(logits, y, target_probs, p.tau, w_ce=p.w_ce, w_kd=p.w_kd, tau_squared=p.tau_squared)

    def distil(
        self,
        ctx: MethodContext,
        targets: TargetFn,
        *,
        arch: str | None = None,
        desc: str = "student",
        seed_offset: int = 0,
        epochs: int | None = None,
    ) -> tuple[nn.Module, list[dict]]:
        """A fresh ``arch`` model (default: the student's) trained with :meth:`objective`.

        targets: a :data:`TargetFn`. Returns (model, per-epoch history).
        """
        y = ctx.train_y.to(ctx.device)
        student = ctx.new_model(arch, seed_offset=seed_offset)

        def loss(logits: torch.Tensor, xb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return self.objective(logits, y[idx], targets(xb, idx))

        history = ctx.train(student, loss, desc=desc, seed_offset=seed_offset, **_epochs(epochs))
        return student, history

    def self_distil_chain(
        self, ctx: MethodContext, generations: int, *, aux_epochs: int | None = None, prefix: str = "gen"
    ) -> tuple[list[nn.Module], list[dict]]:
        """Teacher-free KD chain (Born-Again Networks, TF-KD self): generation 0 is a student-architecture
        model trained with CE; generation k (1 <= k <= ``generations``) is a fresh one trained with
        :meth:`objective` against ``softmax(z_{k-1}(x) / tau)`` of generation k - 1.

        Auxiliary generations (0 .. generations - 1) train for ``aux_epochs`` (None: the recipe's) with
        seed offsets ``AUX_SEED_OFFSET * (k + 1)``; the last one uses the student recipe and seed offset 0.
        Returns (the models of generations 0 .. generations, one row per generation with
        ``generation`` and ``val_accuracy``).
        """
        if generations < 1:
            raise ValueError(f"generations must be >= 1, got {generations}")
        model, history = train_ce(ctx, desc=f"{prefix}0", seed_offset=AUX_SEED_OFFSET, epochs=aux_epochs)
        models, rows = [model], [{"generation": 0, "val_accuracy": final_val_accuracy(history)}]
        for k in range(1, generations + 1):
            last = k == generations
            model, history = self.distil(
                ctx, model_targets(models[-1], self.params.tau), desc="student" if last else f"{prefix}{k}",
                seed_offset=0 if last else AUX_SEED_OFFSET * (k + 1), epochs=None if last else aux_epochs,
            )
            models.append(model)
            rows.append({"generation": k, "val_accuracy": final_val_accuracy(history)})
        return models, rows
