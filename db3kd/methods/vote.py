"""vote-kd: soft labels from K noisy label-only queries per training image (issue 15 item 4).

The query-frugal end of the accuracy-versus-queries curve. Every training image ``x_i`` is asked
``K`` times through the :class:`~db3kd.oracle.HardLabelOracle` with a Gaussian perturbation,
``x_i + sigma * z_{i,k}`` clamped to [0, 1] (``z`` standard normal, one stream per sample); the
vote counts ``c[i, l]`` (how many of the K answers were l, ``sum_l c[i, l] = K``) are the
randomized-smoothing estimate of the teacher's class probabilities around ``x_i`` (Cohen, Rosenfeld,
Kolter, ICML 2019). They become a soft label through a calibrated mapping in the spirit of
DBKD-PLM's decision-to-probability conversion (Zhou et al., ACL 2023):

* additive (Dirichlet / Laplace) smoothing: ``f[i, l] = (c[i, l] + alpha) / (K + L * alpha)``;
* a temperature: ``p[i] = softmax(log f[i] / tau)``, i.e. ``p[i, l] ~ (c[i, l] + alpha)^(1 / tau)``.

Calibration uses the validation split only (never the test split): ``calibration_images`` random
validation images are voted on exactly like training images, once per candidate ``sigma`` of
``sigma_grid`` (the same ``z`` for every sigma: common random numbers), and

* ``tau`` minimises the validation negative log-likelihood ``-mean log p[j, y_j]`` of the mapped
  votes against the validation labels (scipy's bounded scalar minimiser over ``log tau``);
* ``sigma`` is the grid value whose calibrated NLL is lowest (ties: the smaller sigma).

Every calibration query goes through the same oracle and is counted (``calibration_queries``);
a fixed ``sigma`` and ``tau`` skip calibration entirely. The student is trained with paper Eq. 1
(:func:`db3kd.losses.kd_loss`: CE + KL against ``p`` at the calibrated ``tau``), as DB3KD is.

Milestones: the first k of the K votes give the counts of a run with K = k, so one run yields
one student per ``milestones`` value (the accuracy-versus-queries frontier) at no extra query;
``tau`` is recalibrated per milestone on the first k validation votes (also free).

Queries: exactly ``K`` per training image plus ``calibration_images * K * len(sigma_grid)``
(``* 1`` with a fixed sigma; 0 with fixed sigma and tau).

Resumable: in a resumable run every finished chunk of votes is saved in the run directory and
reloaded by a rerun (a spent ``--query-budget`` or a kill loses no answered query); reloaded
queries are reported as resumed, so the record's total is the same as an uninterrupted run's.

Random streams: ``z_{i, .}`` comes from a generator seeded by a 63-bit BLAKE2 hash of
(method, stream, run seed, sample index), stream ``train`` or ``val``: independent of the chunk
size and of batch-mates, disjoint from every other stream by construction.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import ClassVar

import torch
from pydantic import Field, model_validator

from db3kd.context import MethodContext, MethodOutput
from db3kd.registry import Method, MethodParams, register_method

__all__ = ["VoteKDParams", "VoteKD", "vote_soft_labels", "vote_nll", "calibrate_temperature", "stream_seed",
           "perturbation_noise", "vote_counts"]

PAPER = ("db3kd suite baseline (not in Wang, ICML 2021): randomized-smoothing vote counts (Cohen et al., ICML 2019) "
         "mapped to soft labels as in DBKD-PLM (Zhou et al., Decision-based Black-box KD for Pre-trained Language "
         "Models, ACL 2023)")
TAU_BOUNDS = (0.05, 20.0)  # search interval of the calibrated temperature
PROBE_FLOATS = 1 << 24  # float32 values of perturbed probes held at once (64 MiB)


class VoteKDParams(MethodParams):
    """vote-kd hyperparameters.

    votes: K, noisy queries per training image (default 100; cpu 50, smoke 8).
    milestones: vote counts k <= K with their own student (accuracy versus queries); values above
    ``votes`` are dropped, K itself is always the final student. milestone_students: train them.
    sigma: per-pixel std of the Gaussian perturbation ([0, 1] pixel units), None = chosen from
    ``sigma_grid`` on validation. alpha: additive-smoothing pseudo-count per class (> 0; 1 = Laplace).
    tau: mapping temperature and Eq. 1 temperature, None = calibrated on validation NLL.
    calibration_images: validation images voted on for the calibration.
    w_ce, w_kd, tau_squared: Eq. 1 weights (as :class:`baselines.common.KDParams`).
    chunk_size: training images per oracle call (K images each); results do not depend on it.
    Search space for tuning on validation (``search_space``): alpha log-uniform in [0.1, 10], the
    tau^2 factor on or off (sigma and tau are calibrated on validation by the method itself).
    """

    votes: int = Field(default=100, ge=1, le=100_000)
    milestones: tuple[int, ...] = (10, 30, 100)
    milestone_students: bool = True
    sigma: float | None = Field(default=None, gt=0)
    sigma_grid: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)
    alpha: float = Field(default=1.0, gt=0)
    tau: float | None = Field(default=None, gt=0)
    calibration_images: int = Field(default=1000, ge=1)
    w_ce: float = Field(default=1.0, ge=0)
    w_kd: float = Field(default=1.0, ge=0)
    tau_squared: bool = False
    chunk_size: int = Field(default=256, ge=1)

    search_space: ClassVar[dict[str, tuple]] = {"alpha": ("float", 0.1, 10.0, "log"),
                                                "tau_squared": ("categorical", (False, True))}
    profile_overrides: ClassVar[dict] = {
        "cpu": {"votes": 50, "milestones": (10, 20, 50), "calibration_images": 200, "sigma_grid": (0.05, 0.1, 0.2, 0.4)},
        "smoke": {"votes": 8, "milestones": (4, 8), "milestone_students": False, "calibration_images": 40,
                  "sigma_grid": (0.1, 0.3)},
    }

    @model_validator(mode="after")
    def _check(self):
        if not self.sigma_grid or any(not s > 0 for s in self.sigma_grid):
            raise ValueError(f"sigma_grid must hold positive values, got {self.sigma_grid}")
        if any(k < 1 for k in self.milestones):
            raise ValueError(f"milestones must be >= 1, got {self.milestones}")
        return self

    def vote_milestones(self) -> tuple[int, ...]:
        """Sorted distinct milestones <= votes, always ending with ``votes``."""
        return tuple(sorted({k for k in self.milestones if k <= self.votes} | {self.votes}))


# --------------------------------------------------------------------------------------------- mapping


def vote_soft_labels(counts: torch.Tensor, votes: int, alpha: float, tau: float) -> torch.Tensor:
    """Soft labels from vote counts: ``p = softmax(log((c + alpha) / (K + L * alpha)) / tau)``.

    counts: integer or float (N, L), rows summing to ``votes`` (K); alpha > 0 pseudo-count;
    tau > 0. Returns float32 (N, L), rows summing to 1. ``p[l]`` is proportional to
    ``(c[l] + alpha)^(1 / tau)``. Raises ValueError for alpha <= 0, tau <= 0 or a bad shape.
    """
    if not alpha > 0 or not tau > 0:
        raise ValueError(f"alpha and tau must be > 0, got alpha={alpha}, tau={tau}")
    if counts.dim() != 2:
        raise ValueError(f"counts must have shape (N, L), got {tuple(counts.shape)}")
    c = counts.double()
    f = (c + alpha) / (votes + counts.shape[1] * alpha)
    return torch.softmax(f.log() / tau, dim=1).float()


def vote_nll(counts: torch.Tensor, y: torch.Tensor, votes: int, alpha: float, tau: float) -> float:
    """Mean negative log-likelihood (nats) of labels y (N,) under :func:`vote_soft_labels`."""
    logf = ((counts.double() + alpha) / (votes + counts.shape[1] * alpha)).log()
    logp = torch.log_softmax(logf / tau, dim=1)
    return float(-logp.gather(1, y.view(-1, 1).to(logp.device)).mean())


def calibrate_temperature(counts: torch.Tensor, y: torch.Tensor, votes: int, alpha: float) -> tuple[float, float]:
    """The temperature minimising :func:`vote_nll` on (counts, y), searched over ``log tau`` in
    ``TAU_BOUNDS`` with scipy's bounded Brent minimiser (xatol 1e-4). Returns (tau, nll)."""
    from scipy.optimize import minimize_scalar

    lo, hi = (math.log(b) for b in TAU_BOUNDS)
    res = minimize_scalar(lambda t: vote_nll(counts, y, votes, alpha, math.exp(t)), bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-4})
    return math.exp(float(res.x)), float(res.fun)


# --------------------------------------------------------------------------------------------- votes


def stream_seed(seed: int, stream: str, index: int) -> int:
    """63-bit generator seed of sample ``index`` in ``stream`` (``train``, ``val``, ...) under run ``seed``:
    BLAKE2b of ``vote-kd/<stream>/<seed>/<index>``, so different streams never share a key."""
    digest = hashlib.blake2b(f"vote-kd/{stream}/{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def perturbation_noise(seed: int, stream: str, indices: torch.Tensor, votes: int, shape, device="cpu") -> torch.Tensor:
    """Standard normal ``z`` float32 (len(indices), votes, C, H, W) on ``device``; row i depends only on
    (seed, stream, indices[i]) (one generator per sample, reseeded from :func:`stream_seed`)."""
    device = torch.device(device)
    gen = torch.Generator(device=device)
    out = torch.empty((len(indices), votes, *shape), device=device)
    for row, index in enumerate(indices.tolist()):
        gen.manual_seed(stream_seed(seed, stream, int(index)))
        out[row] = torch.randn((votes, *shape), generator=gen, device=device)
    return out


def vote_counts(oracle, x: torch.Tensor, indices: torch.Tensor, *, sigmas, votes: int, milestones, num_classes: int,
                seed: int, stream: str, chunk_size: int = 256, checkpoint_dir=None) -> torch.Tensor:
    """Vote counts of every image of ``x`` under each sigma, at each milestone.

    oracle: a HardLabelOracle (``len(sigmas) * len(x) * votes`` queries, exactly, less those of chunks
    reloaded from ``checkpoint_dir``); x: uint8 or float (N, C, H, W) in [0, 1]; indices: int64 (N,)
    the images' sample indices (keys of their noise streams); sigmas: per-pixel noise std values;
    milestones: vote counts k <= votes at which the counts of the first k votes are kept.
    checkpoint_dir: a folder where each finished chunk is saved atomically (and reloaded instead of
    asked again), so an interrupted run or a spent query budget loses no answered query.
    Returns int64 (len(sigmas), len(milestones), N, L).
    """
    milestones = list(milestones)
    if not milestones or max(milestones) > votes or min(milestones) < 1:
        raise ValueError(f"milestones must lie in [1, {votes}], got {milestones}")
    n, shape = int(x.shape[0]), tuple(x.shape[1:])
    # at most PROBE_FLOATS probe values per chunk (results do not depend on the chunk size)
    chunk_size = max(1, min(chunk_size, PROBE_FLOATS // (votes * math.prod(shape))))
    out = torch.zeros((len(sigmas), len(milestones), n, num_classes), dtype=torch.int64)
    at = torch.tensor(milestones) - 1
    device = getattr(oracle, "device", torch.device("cpu"))
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        saved = None if checkpoint_dir is None else Path(checkpoint_dir) / f"{stream}-{start}-{stop}.pt"
        if saved is not None and saved.exists():
            out[:, :, start:stop] = torch.load(saved, map_location="cpu", weights_only=True)
            continue
        xb = x[start : start + chunk_size].to(device)
        xb = xb.float().div(255.0) if xb.dtype == torch.uint8 else xb.float()
        z = perturbation_noise(seed, stream, indices[start : start + chunk_size], votes, shape, device)
        for s, sigma in enumerate(sigmas):
            probes = (xb[:, None] + float(sigma) * z).clamp_(0.0, 1.0).flatten(0, 1)
            labels = oracle(probes).view(len(xb), votes)
            cum = torch.nn.functional.one_hot(labels, num_classes).cumsum(1)  # (B, K, L)
            out[s, :, start : start + len(xb)] = cum[:, at.to(cum.device)].transpose(0, 1).cpu()
        if saved is not None:
            from db3kd.training import atomic_save

            atomic_save(out[:, :, start:stop].clone(), saved)
    return out


# --------------------------------------------------------------------------------------------- method


@register_method
class VoteKD(Method):
    """vote-kd: randomized-smoothing votes of a label-only teacher -> calibrated soft labels -> Eq. 1."""

    name = "vote-kd"
    paper = PAPER
    teacher_access = "labels"
    data = "full"
    Params = VoteKDParams
    paper_results: ClassVar[dict[str, float]] = {}

    def calibrate(self, ctx: MethodContext, milestones: tuple[int, ...]) -> dict:
        """Choose sigma and one tau per milestone on the validation split (see the module docstring).

        Returns {"sigma", "taus" (one per milestone), "queries" (the calibration's exact cost, whether asked
        now or reloaded from an interrupted run), "table" (one row per sigma tried)}.
        """
        p = self.params
        sigmas = [p.sigma] if p.sigma is not None else list(p.sigma_grid)
        if p.sigma is not None and p.tau is not None:
            return {"sigma": p.sigma, "taus": [p.tau] * len(milestones), "queries": 0, "table": []}
        n_val = int(ctx.val_x.shape[0])
        if n_val == 0:
            raise ValueError("vote-kd calibrates sigma / tau on the validation split, which is empty; "
                             "set both sigma and tau to run without it")
        gen = torch.Generator().manual_seed(stream_seed(ctx.seed, "calibration-subset", 0))
        idx = torch.randperm(n_val, generator=gen)[: p.calibration_images].sort().values
        counts = vote_counts(ctx.teacher, ctx.val_x[idx], idx, sigmas=sigmas, votes=p.votes, milestones=milestones,
                             num_classes=ctx.num_classes, seed=ctx.seed, stream="val", chunk_size=p.chunk_size,
                             checkpoint_dir=ctx.checkpoint_dir("votes"))
        y = ctx.val_y[idx]
        rows, taus_by_sigma = [], []
        for s, sigma in enumerate(sigmas):
            taus = [p.tau if p.tau is not None else calibrate_temperature(counts[s, m], y, k, p.alpha)[0]
                    for m, k in enumerate(milestones)]
            final = counts[s, -1]
            rows.append({"sigma": float(sigma), "tau": taus[-1], "val_nll": vote_nll(final, y, p.votes, p.alpha, taus[-1]),
                         "vote_agreement": float(final.gather(1, y.view(-1, 1)).float().mean() / p.votes),
                         "majority_accuracy": float((final.argmax(1) == y).float().mean())})
            taus_by_sigma.append(taus)
        best = min(range(len(sigmas)), key=lambda s: (rows[s]["val_nll"], sigmas[s]))
        return {"sigma": float(sigmas[best]), "taus": taus_by_sigma[best], "queries": len(sigmas) * len(idx) * p.votes,
                "table": rows}

    def train_student(self, ctx: MethodContext, targets: torch.Tensor, tau: float, *, desc: str = "student"):
        """A fresh student trained with paper Eq. 1 against ``targets`` float (N, L) at temperature ``tau``."""
        from db3kd.losses import kd_loss

        p = self.params
        y, targets = ctx.train_y.to(ctx.device), targets.to(ctx.device)
        student = ctx.new_model()

        def loss(logits, _xb, idx):
            return kd_loss(logits, y[idx], targets[idx], tau, w_ce=p.w_ce, w_kd=p.w_kd, tau_squared=p.tau_squared)

        ctx.train(student, loss, desc=desc)
        return student

    def run(self, ctx: MethodContext) -> MethodOutput:
        from db3kd.soft_labels import label_statistics
        from db3kd.training import atomic_save

        p = self.params
        milestones = p.vote_milestones()
        n = int(ctx.train_x.shape[0])
        before = ctx.teacher.queries
        cal = self.calibrate(ctx, milestones)
        counts = vote_counts(ctx.teacher, ctx.train_x, torch.arange(n), sigmas=[cal["sigma"]], votes=p.votes,
                             milestones=milestones, num_classes=ctx.num_classes, seed=ctx.seed, stream="train",
                             chunk_size=p.chunk_size, checkpoint_dir=ctx.checkpoint_dir("votes"))[0]
        # chunks reloaded from an interrupted run were paid for there: count them once, here
        cal_q, vote_q = int(cal["queries"]), n * p.votes
        resumed = cal_q + vote_q - (ctx.teacher.queries - before)
        taus = [float(t) for t in cal["taus"]]
        final = counts[-1]
        targets = vote_soft_labels(final, p.votes, p.alpha, taus[-1])
        if ctx.resumable:
            atomic_save({"counts": counts, "soft_labels": targets, "sigma": cal["sigma"], "taus": torch.tensor(taus)},
                        ctx.workdir / "votes.pt")
        metrics = {
            **label_statistics(targets, ctx.train_y),
            "sigma": float(cal["sigma"]), "tau": taus[-1], "calibration_queries": float(cal_q),
            "vote_queries": float(vote_q),
            "vote_agreement": float(final.gather(1, ctx.train_y.view(-1, 1)).float().mean() / p.votes),
            "teacher_majority_agreement": float((final.argmax(1) == ctx.train_y).float().mean()),
        }
        ctx.log(metrics, None)
        output = MethodOutput(student=self.train_student(ctx, targets, taus[-1]), metrics=metrics, resumed_queries=resumed)
        # queries per training sample spent by a run stopped at each milestone (calibration included)
        output.tables["milestone_queries_per_sample"] = {str(k): k + cal_q / max(n, 1) for k in milestones}
        output.tables["sigma_calibration"] = cal["table"]
        output.tables["milestone_tau"] = {str(k): t for k, t in zip(milestones, taus)}
        if p.milestone_students and ctx.evaluate_milestone is not None:
            for m, k in enumerate(milestones[:-1]):  # the last milestone is the final student, trained once
                student = self.train_student(ctx, vote_soft_labels(counts[m], k, p.alpha, taus[m]), taus[m],
                                             desc=f"votes{k}")
                acc = ctx.evaluate_milestone(student)
                output.milestone_accuracy[int(k)] = acc
                ctx.log({"milestone_accuracy": acc}, int(k))
        return output
