"""The MBD walk (paper Eq. 4-5): boundary points moved along the boundary towards their samples."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from db3kd.search.bisection import bisect_segments, label_segment_points
from db3kd.search.criteria import Criterion
from db3kd.search.estimators import ESTIMATORS, PENCIL_STEPS, PairKeys, geo_step, sign_gradient

__all__ = ["WalkConfig", "boundary_walk", "predicted_cost"]


@dataclass(frozen=True)
class WalkConfig:
    """Settings of the walk. num_directions: Q (paper 200); xi_d: initial step as a fraction of the
    current distance (``paper``: the fixed step of Eq. 4's update, in L2 units, paper 0.2); delta:
    probe radius as a fraction of the distance; tol: bisection stop (L2 units); min_step: a pair
    stops once its adapted step falls below it; estimator: one of :data:`ESTIMATORS` (default ``geo``,
    which ignores ``xi_d``: its step comes from its line search)."""

    num_directions: int
    xi_d: float
    delta: float
    tol: float
    min_step: float = 1e-3
    estimator: str = "geo"

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown MBD estimator {self.estimator!r}; valid: {', '.join(ESTIMATORS)}")


def predicted_cost(r: torch.Tensor, cfg: WalkConfig) -> torch.Tensor:
    """int64 (A,): the queries one more iteration is expected to cost, ``Q + 1 + ceil(log2(r / tol))``
    (``geo``: plus its line search's :data:`~db3kd.search.estimators.PENCIL_STEPS`).

    A prediction only (float32 bisection may need one more round): it decides whether a pair starts
    an iteration; the budget itself is enforced exactly by the bisection."""
    extra = PENCIL_STEPS if cfg.estimator == "geo" else 0
    return cfg.num_directions + extra + 1 + torch.ceil(torch.log2((r / cfg.tol).clamp_min(1.0))).long()


def boundary_walk(
    oracle,
    x0: torch.Tensor,
    direction: torch.Tensor,
    r: torch.Tensor,
    criterion: Criterion,
    used: torch.Tensor,
    budget: int,
    keys: PairKeys,
    cfg: WalkConfig,
    shape,
    milestones: Sequence[int] = (),
    on_iteration: Callable[[], None] | None = None,
):
    """Walk every pair's boundary point ``x0 + r * direction`` along the boundary towards ``x0``.

    x0, direction: float32 (A, D) (direction unit-norm), on the oracle's device; r: float32 (A,)
    current boundary distance (inf or 0 = nothing to walk); criterion: A rows; used: int64 (A,)
    queries already spent per pair (updated in place); budget: queries per pair; keys: the
    pairs' random streams (iteration t draws from ``keys`` at step t, t = 1, 2, ...).

    One iteration per active pair: estimate the boundary at ``x_b`` (Eq. 4, Q queries; ``geo``: Q
    coordinate signs and the line search's 8, :func:`~db3kd.search.estimators.geo_step`), step
    outside ``x_hat = x_b + xi * r * g`` (``paper``: ``x_b + xi_d * g``; ``geo``: ``g`` is already the
    line search's step and ``xi`` a trust factor that starts at 1 and never exceeds it), test the new direction
    at the current distance (1 query; a miss rejects the step), then bisect it (Eq. 3) within
    the pair's remaining budget. The step factor xi starts at ``xi_d``, doubles after an
    accepted step and halves after a rejected one; a pair stops when xi falls below
    ``min_step`` or its next iteration is predicted (Q + 1 + ceil(log2(r / tol))) to exceed
    ``budget``. ``paper`` keeps xi fixed and stops a pair at its first step that does not
    shorten the distance (the paper's "until it cannot be further minimized"). A pair never
    spends more than ``budget``: the bisection enforces it exactly. Host synchronisations per
    iteration: one, plus one per bisection round. Returns ``(r, direction, record)`` with record
    float32 (M, A): the distance reached within each milestone.
    """
    a, d = x0.shape
    device = r.device
    q = cfg.num_directions
    paper = cfg.estimator == "paper"
    r, direction = r.clone(), direction.clone()
    geo = cfg.estimator == "geo"
    xi = torch.full((a,), 1.0 if geo else cfg.xi_d, device=device)  # geo: trust factor of the line-search step
    alive = torch.isfinite(r) & (r > 0)
    record = r.unsqueeze(0).repeat(len(milestones), 1)  # a milestone below the BD cost keeps BD's distance
    ms = torch.tensor(list(milestones), dtype=torch.int64, device=device).view(-1, 1)

    def write_record():
        if len(milestones):
            torch.where(used.unsqueeze(0) <= ms, r.unsqueeze(0), record, out=record)

    write_record()
    t = 0
    while True:
        active = alive & (xi >= cfg.min_step) & (used + predicted_cost(r, cfg) <= budget)
        rows = active.nonzero().squeeze(1)  # host synchronisation
        n = rows.numel()
        if n == 0:
            break
        t += 1
        crit = criterion[rows]
        x0r, dr, rr = x0[rows], direction[rows], r[rows]
        xb = torch.addcmul(x0r, dr, rr.unsqueeze(1))
        if geo:
            signs, block = keys.coordinates(rows, t, q, d)
            g = geo_step(oracle, xb, rr, dr, crit, signs, block, cfg.delta, shape)
        else:
            signs, block = keys.directions(rows, t, q, d, unit=not paper)
            g = sign_gradient(oracle, xb, rr, crit, signs, block, cfg.estimator, cfg.delta, shape, origin=x0r)
        scale = torch.full_like(rr, cfg.xi_d) if paper else xi[rows] * rr
        x_hat = torch.addcmul(xb, g, scale.unsqueeze(1)).clamp_(0.0, 1.0)
        step = x_hat - x0r
        reach = step.norm(dim=1)
        new_dir = step / reach.clamp_min(1e-12).unsqueeze(1)
        probe_at = torch.minimum(rr, reach)
        ends = x0r + new_dir  # unit segment: the point at distance s is lerp(x0, ends, s)
        idx = torch.arange(n, device=device)
        hit = crit(label_segment_points(oracle, x0r, ends, idx, idx, probe_at, shape)) & (reach > 0)
        pair_used = used[rows] + (q + 1 + (PENCIL_STEPS if geo else 0))
        # misses get an empty bracket (lo = hi): the bisection skips them without a query
        lo = torch.where(hit, torch.zeros_like(probe_at), probe_at)
        upper, _ = bisect_segments(oracle, x0r, ends, idx, idx, torch.ones_like(probe_at), lo, probe_at, idx, n, crit,
                                   cfg.tol, pair_used, budget, shape)
        used[rows] = pair_used
        better = hit & (upper < rr)
        r[rows] = torch.where(better, upper, rr)
        direction[rows] = torch.where(better.unsqueeze(1), new_dir, dr)
        if paper:
            alive[rows] = better
        else:
            xi[rows] = torch.where(better, (xi[rows] * 2).clamp(max=1.0), xi[rows] * 0.5)
        write_record()
        if on_iteration is not None:
            on_iteration()
    return r, direction, record
