"""Zeroth-order sign-gradient estimators of the boundary at a point (paper Eq. 4-5), and their directions.

Directions. Pair a's q-th direction at a step is ``u[a, q] = signs[a] * block[q]``: ``block``
(Q, D) is one standard-normal block shared by every pair at that step (keyed by the stream,
the seed and the step), ``signs`` (A, D) a random sign per pair and coordinate (keyed by the
stream, the seed, the pair's own coordinates and the step). A standard normal vector is
invariant under coordinate sign flips, so each pair's Q directions are exactly i.i.d. N(0, I)
(unit-normalised for every estimator but ``paper``), independent across steps, and
uncorrelated between pairs; a pair's directions depend on its key alone (not on its chunk, its
batch-mates or the worker), and the engine draws D values per pair instead of Q * D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from db3kd.search.bisection import probe_slice, query
from db3kd.search.criteria import Criterion
from db3kd.search.streams import Stream, combine, normal, rademacher, stream_key

__all__ = ["ESTIMATORS", "PairKeys", "sign_gradient"]

ESTIMATORS = ("tangent", "sign-opt", "hsja", "paper")


@dataclass(frozen=True)
class PairKeys:
    """Random-stream keys of A pairs: ``pair`` int64 (A,) and the step's shared block key ``shared``
    (int64, 0-dim; the key of the non-existent pair whose fields are all -1)."""

    pair: torch.Tensor
    shared: torch.Tensor

    @classmethod
    def of(cls, stream: Stream, seed: int, *fields: torch.Tensor, device=None) -> "PairKeys":
        """Keys ``(stream, seed, *fields)``; fields: int64 (A,) tensors (e.g. sample index, class)."""
        pair = stream_key(stream, seed, *fields, device=device)
        shared = stream_key(stream, seed, *([-1] * len(fields)), device=device)
        return cls(pair=pair, shared=shared)

    def directions(self, rows: torch.Tensor | None, step, num_directions: int, dim: int, *, unit: bool = True):
        """(signs float32 (A, D), block float32 (Q, D)) of ``rows`` (None = all) at ``step``
        (an int or int64 tensor); block rows unit-norm when ``unit``."""
        pair = self.pair if rows is None else self.pair[rows]
        step = torch.as_tensor(step, dtype=torch.int64, device=pair.device)
        signs = rademacher(combine(pair, step), dim)
        block = normal(combine(self.shared, step), num_directions * dim).view(num_directions, dim)
        if unit:
            block = block / block.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return signs, block


def sign_gradient(oracle, xb, r, criterion: Criterion, signs, block, estimator: str, delta: float, shape,
                  origin=None) -> torch.Tensor:
    """Eq. 4: ``g = (1/Q) sum_q sign(probe_q) u_q`` for A boundary points; ``sign = +1`` on a hit (Eq. 5).

    xb: float32 (A, D) boundary points; r: float32 (A,) their distances from ``origin``;
    criterion: A rows; signs (A, D), block (Q, D): the directions ``u[a, q] = signs[a] * block[q]``
    (:meth:`PairKeys.directions`); origin: float32 (A, D), the samples ``x0`` the on-sphere
    estimators' directions start from (``theta = (xb - x0) / r``). Every probe is clamped to
    [0, 1] and sent through the oracle's trusted path (A * Q queries). Returns float32 (A, D):
    unit-norm, except for ``paper`` (the raw mean). Estimators:

    * ``"tangent"`` (default): Sign-OPT's probes ``x0 + r (theta + delta u) / |theta + delta u|``
      (on the sphere around x0), mean sign subtracted before averaging (HopSkipJump's baseline):
      the estimate stays in the sphere's tangent plane and ignores the bias of ``xb`` lying a hair
      inside the target region.
    * ``"sign-opt"``: the same probes, raw signs (Cheng et al. 2020, Alg. 1).
    * ``"hsja"``: probes ``xb + delta r u`` (off the sphere) with the baseline; approaches the
      boundary normal (ZSDB3KD's step away from the boundary uses it).
    * ``"paper"``: Eq. 4-5 as printed: probes ``xb + eps_g u`` with raw Gaussian u (not
      normalised) and ``eps_g = delta r / sqrt(D)`` (a probe radius of about ``delta r``; the paper
      only says "a very small scalar"), raw signs, ``g`` the plain mean (not normalised).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown MBD estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")
    on_sphere = estimator in ("tangent", "sign-opt")
    if on_sphere and origin is None:
        raise ValueError(f"the {estimator} estimator needs the samples (origin) its directions start from")
    q, d = block.shape
    a = xb.shape[0]
    grads = torch.empty_like(xb)
    step = max(1, probe_slice(xb.device) // q)
    buf = xb.new_empty(min(step, a), q, d)  # probes, then the weighted directions: reused across slices
    buf2 = xb.new_empty(min(step, a), q, d) if on_sphere else None
    for s in range(0, a, step):
        e = min(s + step, a)
        sg, rr = signs[s:e].unsqueeze(1), r[s:e].view(-1, 1, 1)
        probes = buf[: e - s]
        if on_sphere:
            theta = (xb[s:e] - origin[s:e]) / r[s:e, None]
            w = torch.addcmul(theta.unsqueeze(1), sg * delta, block, out=buf2[: e - s])  # theta + delta u  (a, Q, D)
            torch.addcmul(origin[s:e].unsqueeze(1), w, rr / w.norm(dim=2, keepdim=True), out=probes)
        else:
            eps = delta * rr if estimator == "hsja" else delta * rr / math.sqrt(d)
            torch.addcmul(xb[s:e].unsqueeze(1), sg * eps, block, out=probes)
        labels = query(oracle, probes.clamp_(0.0, 1.0).view(-1, *shape)).view(e - s, q)
        sign = criterion[s:e](labels).to(xb.dtype).mul_(2.0).sub_(1.0)
        if estimator in ("sign-opt", "paper"):
            weights = sign
        else:
            centred = sign - sign.mean(dim=1, keepdim=True)
            degenerate = centred.abs().sum(dim=1, keepdim=True) == 0  # all probes agree: keep raw signs
            weights = torch.where(degenerate, sign, centred)
        # sum_q weights[a, q] u[a, q] = signs[a] * sum_q weights[a, q] block[q]   (elementwise: batch-independent)
        g = torch.mul(weights.unsqueeze(2), block, out=probes).sum(dim=1).mul_(signs[s:e]).div_(q)
        grads[s:e] = g if estimator == "paper" else g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return grads
