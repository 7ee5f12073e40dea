"""Teachers whose minimal boundary distances are known in closed form, to grade MBD estimators.

Both are two-class label-only teachers on 1x28x28 images (D = 784, MNIST's size) with pixels in
[0, 1], and both come with samples, references of the other class and the exact minimal L2
distance of every sample to the other class (the minimal point lies inside the pixel box, so the
box constraint never binds):

* :func:`linear_problem`: class 1 where ``w . x > c`` (a hyperplane at distance about 1 from the
  samples, random unit normal ``w``); exact distance ``|w . x - c|``.
* :func:`ball_problem`: class 1 inside the ball ``|x - centre| < R`` (R = 2, samples at distance
  about 3 from the centre); exact distance ``|x - centre| - R``. The boundary curves away from the
  sample, so an estimator that assumes a flat boundary has to keep correcting itself.

:func:`ratio_table` runs an estimator on one problem and reports the mean ratio reached / exact at
the given per-pair query counts (the table of the closed-form check, ``tests/test_closed_form.py``
and the ``mbd_exact_ratio_2k`` benchmark key).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

__all__ = ["ClosedFormProblem", "ball_problem", "linear_problem", "ratio_table"]

SHAPE = (1, 28, 28)


class _Linear(nn.Module):
    """logits (N, 2) = (0, w . x - c)."""

    def __init__(self, w: torch.Tensor, c: float):
        super().__init__()
        self.register_buffer("w", w)
        self.c = c

    def forward(self, x):
        s = x.flatten(1) @ self.w - self.c
        return torch.stack([torch.zeros_like(s), s], dim=1)


class _Ball(nn.Module):
    """logits (N, 2) = (0, R^2 - |x - centre|^2): class 1 inside the ball."""

    def __init__(self, centre: torch.Tensor, radius: float):
        super().__init__()
        self.register_buffer("centre", centre)
        self.radius = radius

    def forward(self, x):
        s = self.radius ** 2 - (x.flatten(1) - self.centre).pow(2).sum(1)
        return torch.stack([torch.zeros_like(s), s], dim=1)


@dataclass
class ClosedFormProblem:
    """teacher: nn.Module (N, 1, 28, 28) -> logits (N, 2); x: float32 (N, 1, 28, 28) samples in
    [0, 1], all of class 0; y: int64 (N,) zeros; refs / ref_labels: class-1 references; exact:
    float32 (N,) exact minimal L2 distance of each sample to class 1."""

    name: str
    teacher: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    refs: torch.Tensor
    ref_labels: torch.Tensor
    exact: torch.Tensor


def _points(n: int, gen: torch.Generator, spread: float = 0.15) -> torch.Tensor:
    return 0.5 + spread * (torch.rand(n, *SHAPE, generator=gen) * 2 - 1)


def linear_problem(n: int = 20, seed: int = 0) -> ClosedFormProblem:
    """A hyperplane teacher: ``n`` samples around the cube's centre at distance ~1 (0.8-1.2) from the plane."""
    gen = torch.Generator().manual_seed(seed)
    d = SHAPE[0] * SHAPE[1] * SHAPE[2]
    w = torch.randn(d, generator=gen)
    w /= w.norm()
    c = float(w.sum() * 0.5) + 1.0
    x = _points(n, gen)
    refs = _points(30, gen) + 2.0 * w.view(1, *SHAPE)
    teacher = _Linear(w, c).eval()
    return ClosedFormProblem("linear", teacher, x, teacher(x).argmax(1), refs, teacher(refs).argmax(1),
                             (c - x.flatten(1) @ w).abs())


def ball_problem(n: int = 20, seed: int = 0, radius: float = 2.0, gap: float = 1.0) -> ClosedFormProblem:
    """A ball teacher of radius ``radius`` around the cube's centre; samples at distance ``radius + gap``."""
    gen = torch.Generator().manual_seed(seed)
    d = SHAPE[0] * SHAPE[1] * SHAPE[2]
    centre = torch.full((d,), 0.5)
    u = torch.randn(n, d, generator=gen)
    u /= u.norm(dim=1, keepdim=True)
    x = (centre + (radius + gap) * u).view(n, *SHAPE)
    v = torch.randn(30, d, generator=gen)
    refs = (centre + 0.75 * radius * v / v.norm(dim=1, keepdim=True)).view(30, *SHAPE)  # inside, off the centre
    teacher = _Ball(centre, radius).eval()
    return ClosedFormProblem("ball", teacher, x, teacher(x).argmax(1), refs, teacher(refs).argmax(1),
                             (x.flatten(1) - centre).norm(dim=1) - radius)


def ratio_table(problem: ClosedFormProblem, estimator: str, budgets: Sequence[int] = (500, 1000, 2000, 5000), *,
                num_directions: int = 200, tol: float = 1e-5, seed: int = 0) -> dict:
    """Run MBD with ``estimator`` up to ``max(budgets)`` queries per pair and compare with the exact distance.

    Returns {"ratio": {budget: mean reached/exact}, "max_ratio": {...}, "min_ratio": {...},
    "queries_exact": bool (the oracle's count equals the result's total), "max_pair_queries": int}."""
    from db3kd.oracle import HardLabelOracle
    from db3kd.search.distances import minimal_boundary_search

    budgets = tuple(sorted(budgets))
    oracle = HardLabelOracle(problem.teacher, input_shape=SHAPE)
    res = minimal_boundary_search(oracle, problem.x, problem.y, problem.refs, problem.ref_labels, 2,
                                  budget=budgets[-1], num_directions=num_directions, tol=tol, milestones=budgets,
                                  estimator=estimator, seed=seed)
    idx = torch.arange(problem.x.shape[0])
    at = res.distances_at[:, idx, 1 - problem.y] / problem.exact  # (M, N)
    return {"ratio": {b: float(at[k].mean()) for k, b in enumerate(budgets)},
            "max_ratio": {b: float(at[k].max()) for k, b in enumerate(budgets)},
            "min_ratio": {b: float(at[k].min()) for k, b in enumerate(budgets)},
            "queries_exact": res.total_queries == oracle.queries, "max_pair_queries": int(res.queries.max())}
