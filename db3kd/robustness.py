"""Sample robustness: how far a training sample is from every other class (paper Sec. 3.2.1).

For a sample ``x0`` of class m (its dataset label) and every other class n, ``r[i, n]`` is the
paper's ``r^{m,n}`` (Eq. 2-5), an L2 distance in the units of the image with pixels in [0, 1]:

* **SD** (Eq. 2, :func:`sample_distance`): distance to the nearest reference sample of class n.
  No queries.
* **BD** (Eq. 3, :func:`boundary_distance`): for every reference of class n, bisect the segment
  ``x0 -> ref`` for the first point the teacher labels n; the smallest such distance.
* **MBD** (Eq. 4-5, :func:`minimal_boundary_distance`): from the best BD point, walk along the
  decision boundary towards ``x0`` with a zeroth-order sign-gradient estimate, re-bisecting after
  every step, until the distance stops falling or the per-pair budget is spent.

Conventions shared by all three:

* ``r[i, y[i]] = inf`` (a class is not measured against itself). A class with no usable reference
  also gets ``inf`` (no evidence of vulnerability; Eq. 6 turns it into ``1/r = 0``).
* References are used only when the teacher assigns them to their class (BD/MBD query each
  reference once per call; pass ``teacher_ref_labels`` to reuse answers).
* **Misclassified training samples.** m is always the dataset label (the CE term of Eq. 1 carries
  the ground truth, as in the authors' code). BD/MBD query each ``x0`` once; when the teacher
  labels it n != m, the sample already lies in class n's region, so ``r[i, n] = 0`` with no
  further queries, and every other class is measured as usual. :mod:`db3kd.soft_labels` guards
  ``r -> 0`` by clamping to ``r_min``, which (Eq. 7) makes that soft label nearly uniform: the KD
  term then acts as label smoothing on a sample the teacher disagrees with.
* **Budgets** are per (sample, target class) pair and include that pair's BD queries. The shared
  costs (one query per reference and one per sample) are counted by the oracle but belong to no pair.
* **Batching.** All (sample, target, reference) bisections of a chunk advance in lockstep and go to
  the oracle together; every decision (pruning, step size, line search, random directions) is
  kept per pair, and each pair's random stream is seeded from ``(seed, sample index, target)``,
  so a result never depends on the other samples in its chunk or on the chunk size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

__all__ = [
    "RobustnessResult",
    "sample_distance",
    "boundary_distance",
    "boundary_search",
    "minimal_boundary_distance",
    "minimal_boundary_search",
    "DEFAULT_MILESTONES",
]

DEFAULT_MILESTONES = (1000, 2000, 5000, 10000, 20000)
_MAX_PROBES = 16384  # images built and sent per oracle call inside the engine


@dataclass
class RobustnessResult:
    """What a robustness search measured.

    distances: float32 (N, L), ``r[i, n]`` in L2 pixel units; inf on the sample's own class and
    for classes without usable references. queries: int64 (N, L), queries spent per pair.
    milestones: query counts at which MBD distances were recorded (empty for SD/BD);
    distances_at: float32 (M, N, L), the distance each pair had reached having spent at most
    ``milestones[k]`` queries. shared_queries: queries that belong to no pair (reference and
    sample checks). misclassified: bool (N,), teacher label != dataset label.
    """

    distances: torch.Tensor
    queries: torch.Tensor
    shared_queries: int = 0
    misclassified: torch.Tensor | None = None
    milestones: tuple[int, ...] = ()
    distances_at: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    @property
    def total_queries(self) -> int:
        return int(self.queries.sum()) + int(self.shared_queries)


# ----------------------------------------------------------------------------------------------
# input checks


def _check_inputs(x, y, refs, ref_labels, num_classes):
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor (N, C, H, W), got {getattr(x, 'shape', type(x))}")
    if not isinstance(refs, torch.Tensor) or refs.dim() != 4 or not refs.is_floating_point():
        raise ValueError(f"refs must be a float tensor (R, C, H, W), got {getattr(refs, 'shape', type(refs))}")
    if refs.shape[1:] != x.shape[1:]:
        raise ValueError(f"refs have image shape {tuple(refs.shape[1:])}, x has {tuple(x.shape[1:])}")
    y = torch.as_tensor(y, dtype=torch.int64, device=x.device)
    ref_labels = torch.as_tensor(ref_labels, dtype=torch.int64, device=x.device)
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    if ref_labels.shape != (refs.shape[0],):
        raise ValueError(f"ref_labels must have shape ({refs.shape[0]},), got {tuple(ref_labels.shape)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    for name, lab in (("y", y), ("ref_labels", ref_labels)):
        if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes - 1}], got [{int(lab.min())}, {int(lab.max())}]")
    return y, ref_labels


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="sample", disable=not enabled, leave=False)


# ----------------------------------------------------------------------------------------------
# SD (Eq. 2)


def sample_distance(
    x: torch.Tensor,
    y: torch.Tensor,
    refs: torch.Tensor,
    ref_labels: torch.Tensor,
    num_classes: int,
    *,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Sample distance, paper Eq. 2: ``r[i, n] = min_j ||refs[j] - x[i]||_2`` over references of class n.

    x: float (N, C, H, W); y: int64 (N,) class of each sample; refs: float (R, C, H, W);
    ref_labels: int64 (R,) their classes. Returns float32 (N, L) with ``r[i, y[i]] = inf`` and inf
    for classes with no reference. No teacher queries. Raises ValueError for inconsistent shapes.
    """
    y, ref_labels = _check_inputs(x, y, refs, ref_labels, num_classes)
    n = x.shape[0]
    flat_refs = refs.reshape(refs.shape[0], -1).float()
    out = torch.full((n, num_classes), math.inf, dtype=torch.float32, device=x.device)
    for s, e in _chunks(n, chunk_size):
        d = torch.cdist(x[s:e].reshape(e - s, -1).float(), flat_refs, compute_mode="donot_use_mm_for_euclid_dist")
        idx = ref_labels.unsqueeze(0).expand_as(d)
        out[s:e].scatter_reduce_(1, idx, d, reduce="amin", include_self=True)
    out[torch.arange(n, device=x.device), y] = math.inf
    return out


# ----------------------------------------------------------------------------------------------
# the engine: lockstep bisection of many segments at once


def _hit(labels: torch.Tensor, target: torch.Tensor, targeted: bool) -> torch.Tensor:
    """Eq. 5's test: targeted -> the teacher answers the target class; untargeted -> anything else."""
    return labels == target if targeted else labels != target


def _label_segment_points(oracle, starts, ends, start_idx, end_idx, frac, shape) -> torch.Tensor:
    """Teacher labels of ``lerp(starts[start_idx], ends[end_idx], frac)``, built in bounded slices."""
    out = torch.empty(frac.shape[0], dtype=torch.int64, device=frac.device)
    for s, e in _chunks(frac.shape[0], _MAX_PROBES):
        pts = torch.lerp(starts[start_idx[s:e]], ends[end_idx[s:e]], frac[s:e, None]).clamp_(0.0, 1.0)
        out[s:e] = oracle(pts.view(e - s, *shape))
    return out


def _bisect(
    oracle,
    starts: torch.Tensor,
    ends: torch.Tensor,
    start_idx: torch.Tensor,
    end_idx: torch.Tensor,
    length: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    group: torch.Tensor,
    num_groups: int,
    target: torch.Tensor,
    targeted: bool,
    tol: float,
    used: torch.Tensor,
    budget: float,
    shape,
):
    """Bisect every row's segment ``starts[start_idx] -> ends[end_idx]`` in lockstep.

    Each row r is a segment of length ``length[r]`` with a bracket ``lo < t* <= hi`` (distances
    from its start; ``hi`` is a point that hits, ``lo`` one that does not). Rows are grouped
    (one group = one (sample, target) pair) and a group's answer is the best upper bound
    ``U[g] = min hi`` over its rows. Query savings over independent bisection, all per group:
    a row is dropped once ``lo >= U[g]`` (it cannot beat the best), and a row is split at
    ``min(midpoint, U[g])``, so one query settles whether it can beat the best at all.
    A group stops when every row has converged (``hi - lo <= tol``) or been dropped, or when one
    more round would take its ``used`` count past ``budget``. Updates ``used`` in place;
    returns ``(U, best_row)``: float (G,), int64 (G,) (``-1`` for groups without rows).
    """
    device = lo.device
    lo, hi = lo.clone(), hi.clone()
    upper = torch.full((num_groups,), math.inf, device=device)
    upper.scatter_reduce_(0, group, hi, reduce="amin", include_self=True)
    while True:
        gu = upper[group]
        active = (lo < gu) & (hi - lo > tol)
        need = torch.zeros(num_groups, dtype=torch.int64, device=device)
        need.scatter_add_(0, group, active.long())
        frozen = used + need > budget  # a round this group cannot afford ends its search
        active &= ~frozen[group]
        rows = active.nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        split = torch.minimum((lo[rows] + hi[rows]) * 0.5, gu[rows])
        labels = _label_segment_points(
            oracle, starts, ends, start_idx[rows], end_idx[rows], split / length[rows], shape
        )
        hit = _hit(labels, target[rows], targeted)
        hi[rows] = torch.where(hit, split, hi[rows])
        lo[rows] = torch.where(hit, lo[rows], split)
        used.scatter_add_(0, group[rows], torch.ones_like(rows))
        upper.scatter_reduce_(0, group[rows], hi[rows], reduce="amin", include_self=True)
    # best row of each group: the one whose hi equals the group's upper bound
    is_best = hi == upper[group]
    best = torch.full((num_groups,), -1, dtype=torch.int64, device=device)
    rows = torch.arange(hi.shape[0], device=device)
    best.scatter_reduce_(0, group[is_best], rows[is_best], reduce="amax", include_self=True)
    return upper, best


def _valid_references(refs, ref_labels, teacher_ref_labels):
    """Keep the references the teacher assigns to their class; returns (refs, labels)."""
    keep = torch.as_tensor(teacher_ref_labels, device=ref_labels.device) == ref_labels
    return refs[keep], ref_labels[keep]


def _teacher_labels(oracle, x):
    before = oracle.queries
    labels = torch.cat([oracle(x[s:e]) for s, e in _chunks(x.shape[0], _MAX_PROBES)])
    return labels, oracle.queries - before


@dataclass
class _ChunkBD:
    """BD state of one chunk, handed to the MBD walk: per pair (B*L), its distance, queries and
    the segment end that realised it."""

    upper: torch.Tensor  # float (B*L,)
    used: torch.Tensor  # int64 (B*L,)
    best_end: torch.Tensor  # int64 (B*L,), index into the valid references, -1 if none


def _bd_chunk(oracle, x, y, pred, refs, ref_labels, num_classes, tol, budget) -> _ChunkBD:
    """Lockstep BD (Eq. 3) for one chunk of samples against every valid reference of every other class."""
    b, num_l = x.shape[0], num_classes
    device = x.device
    flat_x = x.reshape(b, -1)
    flat_r = refs.reshape(refs.shape[0], -1)
    # rows: every (sample, reference) with reference class != sample class and != teacher's wrong label
    bi, ri = torch.meshgrid(torch.arange(b, device=device), torch.arange(refs.shape[0], device=device), indexing="ij")
    bi, ri = bi.reshape(-1), ri.reshape(-1)
    t = ref_labels[ri]
    keep = (t != y[bi]) & ~((pred[bi] != y[bi]) & (t == pred[bi]))
    bi, ri, t = bi[keep], ri[keep], t[keep]
    length = torch.cdist(flat_x, flat_r, compute_mode="donot_use_mm_for_euclid_dist")[bi, ri]  # batch-independent
    keep = length > 0
    bi, ri, t, length = bi[keep], ri[keep], t[keep], length[keep]
    group = bi * num_l + t
    used = torch.zeros(b * num_l, dtype=torch.int64, device=device)
    upper, best = _bisect(
        oracle, flat_x, flat_r, bi, ri, length, torch.zeros_like(length), length.clone(), group, b * num_l,
        t, True, tol, used, math.inf if budget is None else budget, x.shape[1:],
    )
    # no usable (sample, reference) row at all (e.g. a teacher that labels everything one class): every pair stays inf
    best_end = torch.where(best >= 0, ri[best.clamp(min=0)], -1) if ri.numel() else torch.full_like(best, -1)
    # a misclassified sample already sits in its predicted class's region: distance 0, no queries
    wrong = (pred != y).nonzero().squeeze(1)
    upper[wrong * num_l + pred[wrong]] = 0.0
    return _ChunkBD(upper=upper, used=used, best_end=best_end)


def boundary_search(
    oracle,
    x: torch.Tensor,
    y: torch.Tensor,
    refs: torch.Tensor,
    ref_labels: torch.Tensor,
    num_classes: int,
    *,
    tol: float = 1e-5,
    budget: int | None = None,
    chunk_size: int = 64,
    teacher_ref_labels: torch.Tensor | None = None,
    progress: bool = False,
    checkpoint_dir=None,
) -> RobustnessResult:
    """Boundary distance, paper Eq. 3, with its query accounting; see :func:`boundary_distance`.

    checkpoint_dir: folder where every finished chunk is written atomically; a rerun with the same
    inputs loads finished chunks instead of querying again (their queries stay in the totals).
    """
    return _search(oracle, x, y, refs, ref_labels, num_classes, tol=tol, budget=budget, chunk_size=chunk_size,
                   teacher_ref_labels=teacher_ref_labels, progress=progress, walk=None, checkpoint_dir=checkpoint_dir)


def boundary_distance(oracle, x, y, refs, ref_labels, num_classes, **kwargs) -> torch.Tensor:
    """Boundary distance, paper Eq. 3: ``r[i, n]`` = min over references of class n of the distance
    from ``x[i]`` to the first point on the segment ``x[i] -> ref`` that the teacher labels n.

    oracle: a :class:`~db3kd.oracle.HardLabelOracle`; x: float (N, C, H, W) in [0, 1]; y: int64 (N,)
    dataset labels; refs: float (R, C, H, W) in [0, 1]; ref_labels: int64 (R,). Keywords: tol
    (bisection stop, L2 units, paper 1e-5), budget (queries per (sample, target) pair, None =
    unlimited), chunk_size (samples per lockstep chunk), teacher_ref_labels (reuse the teacher's
    answers on refs), progress. Returns float32 (N, L), ``r[i, y[i]] = inf``; each value is a
    point the teacher labels n, within ``tol`` of the crossing. Raises ValueError (bad input),
    QueryBudgetExceeded (the oracle's own budget ran out).
    """
    return boundary_search(oracle, x, y, refs, ref_labels, num_classes, **kwargs).distances


# ----------------------------------------------------------------------------------------------
# MBD (Eq. 4-5): a sign-gradient walk along the boundary


@dataclass(frozen=True)
class _WalkConfig:
    num_directions: int  # Q
    xi_d: float  # initial step, as a fraction of the current distance
    delta: float  # probe radius, as a fraction of the current distance
    tol: float
    min_step: float
    seed: int
    estimator: str = "tangent"  # see _sign_gradient


ESTIMATORS = ("tangent", "sign-opt", "hsja")


def _pair_generators(seed: int, keys: torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per pair, seeded from (seed, key) so a pair's stream ignores its batch-mates."""
    gens = []
    for k in keys.tolist():
        g = torch.Generator()
        g.manual_seed((seed * 1_000_003 + int(k) * 7_919 + 0x9E3779B9) % (2**63 - 1))
        gens.append(g)
    return gens


def _sign_gradient(oracle, xb, r, target, targeted, gens, cfg, shape, origin=None) -> torch.Tensor:
    """Eq. 4: ``g = (1/Q) sum_q sign(x_b + delta u_q) u_q`` for A pairs, unit-normalised.

    xb: float (A, D) boundary points; r: float (A,) their distances (the probe radius is
    ``delta * r``); target: int64 (A,); gens: A generators (one per pair). ``sign = +1`` when a
    probe hits (Eq. 5). All Q probes of a pair go to the oracle in the same call. Returns float (A, D).

    ``cfg.estimator`` picks the estimator (``origin``: float (A, D), the samples ``x0`` the
    directions start from; ``theta`` = unit direction from ``x0`` to ``x_b``):

    * ``"sign-opt"``: plain Sign-OPT (Cheng et al. 2020, Alg. 1): each probe is the point at the
      same distance r along the perturbed direction ``theta + delta u_q`` (on the sphere around
      ``x0``); a hit means ``g(theta + delta u_q) <= g(theta)``; the raw signs are averaged.
    * ``"tangent"`` (default): Sign-OPT's probes, with the mean sign subtracted before averaging
      (HopSkipJump's baseline, Chen et al. 2020): the estimate stays in the sphere's tangent
      plane, so a unit step turns the direction by the full step, and the baseline removes the
      bias of ``x_b`` lying a hair inside the target region.
    * ``"hsja"``: probes ``x_b + delta r u_q`` around the boundary point (off the sphere) with the
      baseline; the estimate approaches the boundary normal, whose radial part is wasted by the
      re-projection along the new direction (measured worse than Sign-OPT; kept for comparison).
    """
    if cfg.estimator not in ESTIMATORS:
        raise ValueError(f"unknown MBD estimator {cfg.estimator!r}; valid: {', '.join(ESTIMATORS)}")
    on_sphere = cfg.estimator in ("sign-opt", "tangent")
    if on_sphere and origin is None:
        raise ValueError(f"the {cfg.estimator} estimator needs the samples (origin) its directions start from")
    q, d = cfg.num_directions, xb.shape[1]
    grads = torch.empty_like(xb)
    for s, e in _chunks(xb.shape[0], max(1, _MAX_PROBES // q)):
        u = torch.stack([torch.randn(q, d, generator=gens[i]) for i in range(s, e)]).to(xb.device)
        u /= u.norm(dim=2, keepdim=True)
        radius = (cfg.delta * r[s:e]).view(-1, 1, 1)
        probes = xb[s:e].unsqueeze(1) + radius * u
        if on_sphere:  # back onto the sphere of radius r around x0: x0 + r (theta + delta u) / |theta + delta u|
            offset = probes - origin[s:e].unsqueeze(1)
            probes = origin[s:e].unsqueeze(1) + offset * (r[s:e].view(-1, 1, 1) / offset.norm(dim=2, keepdim=True))
        labels = oracle(probes.clamp_(0.0, 1.0).view(-1, *shape)).view(e - s, q)
        sign = _hit(labels, target[s:e].unsqueeze(1), targeted).float() * 2 - 1
        if cfg.estimator == "sign-opt":
            weights = sign
        else:
            centred = sign - sign.mean(dim=1, keepdim=True)
            degenerate = centred.abs().sum(dim=1, keepdim=True) == 0  # all probes agree: keep raw signs
            weights = torch.where(degenerate, sign, centred)
        g = (weights.unsqueeze(2) * u).mean(dim=1)
        grads[s:e] = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return grads


def _mbd_walk(
    oracle,
    x0: torch.Tensor,
    direction: torch.Tensor,
    r: torch.Tensor,
    target: torch.Tensor,
    targeted: bool,
    used: torch.Tensor,
    budget: int,
    keys: torch.Tensor,
    cfg: _WalkConfig,
    shape,
    milestones: Sequence[int] = (),
    on_iteration: Callable[[], None] | None = None,
):
    """Walk every pair's boundary point ``x0 + r * direction`` along the boundary towards ``x0``.

    x0, direction: float (A, D) (direction unit-norm); r: float (A,) current boundary distance
    (inf = nothing to walk); target: int64 (A,); used: int64 (A,) queries already spent per pair
    (updated in place). One iteration per pair: estimate the boundary normal at ``x_b`` (Eq. 4,
    Q queries), step outside ``x_hat = x_b + xi * r * g``, test the new direction at the current
    distance (1 query; a miss rejects the step), then bisect it (Eq. 3). A pair's step factor xi
    starts at ``xi_d``, doubles after an accepted step and halves after a rejected one; the pair
    stops when xi falls below ``min_step`` or its next iteration could exceed ``budget``.
    Returns ``(r, direction, record)`` with record float (M, A): the distance reached within each
    milestone.
    """
    a = r.shape[0]
    r, direction = r.clone(), direction.clone()
    xi = torch.full((a,), cfg.xi_d, device=r.device)
    record = torch.empty((len(milestones), a), device=r.device)
    ms = torch.tensor(list(milestones), dtype=torch.int64, device=r.device).view(-1, 1)

    def write_record():
        if len(milestones):
            ok = used.unsqueeze(0) <= ms
            record.copy_(torch.where(ok, r.unsqueeze(0), record))

    record.copy_(r.unsqueeze(0).expand_as(record))  # a milestone below the BD cost keeps BD's distance
    write_record()
    gens = _pair_generators(cfg.seed, keys)
    finite = torch.isfinite(r) & (r > 0)
    while True:
        bisect_steps = torch.ceil(torch.log2((r / cfg.tol).clamp_min(1.0))).long()
        cost = cfg.num_directions + 1 + bisect_steps
        active = finite & (xi >= cfg.min_step) & (used + cost <= budget)
        rows = active.nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        xb = x0[rows] + r[rows, None] * direction[rows]
        g = _sign_gradient(oracle, xb, r[rows], target[rows], targeted, [gens[i] for i in rows.tolist()], cfg, shape,
                           origin=x0[rows])
        used[rows] += cfg.num_directions
        x_hat = (xb + (xi[rows] * r[rows]).unsqueeze(1) * g).clamp_(0.0, 1.0)
        step = x_hat - x0[rows]
        reach = step.norm(dim=1)
        new_dir = step / reach.clamp_min(1e-12).unsqueeze(1)
        probe_at = torch.minimum(r[rows], reach)
        idx = torch.arange(len(rows), device=r.device)
        starts = x0[rows]
        ends = x0[rows] + new_dir  # unit segment: point at distance s is lerp(start, end, s)
        labels = _label_segment_points(oracle, starts, ends, idx, idx, probe_at, shape)
        used[rows] += 1
        hit = _hit(labels, target[rows], targeted) & (reach > 0)
        accepted = torch.zeros(len(rows), dtype=torch.bool, device=r.device)
        if hit.any():
            sub = hit.nonzero().squeeze(1)
            length = torch.ones(len(sub), device=r.device)
            pair_used = used[rows[sub]].clone()
            upper, _ = _bisect(
                oracle, starts[sub], ends[sub], torch.arange(len(sub), device=r.device),
                torch.arange(len(sub), device=r.device), length, torch.zeros(len(sub), device=r.device),
                probe_at[sub], torch.arange(len(sub), device=r.device), len(sub), target[rows[sub]], targeted,
                cfg.tol, pair_used, math.inf, shape,
            )
            used[rows[sub]] = pair_used
            better = upper < r[rows[sub]]
            win = rows[sub[better]]
            r[win] = upper[better]
            direction[win] = new_dir[sub[better]]
            accepted[sub[better]] = True
        xi[rows] = torch.where(accepted, (xi[rows] * 2).clamp(max=1.0), xi[rows] * 0.5)
        write_record()
        if on_iteration is not None:
            on_iteration()
    return r, direction, record


def minimal_boundary_search(
    oracle,
    x: torch.Tensor,
    y: torch.Tensor,
    refs: torch.Tensor,
    ref_labels: torch.Tensor,
    num_classes: int,
    *,
    budget: int = 2000,
    num_directions: int = 200,
    xi_d: float = 0.2,
    delta: float = 0.01,
    tol: float = 1e-5,
    min_step: float = 1e-3,
    milestones: Sequence[int] | None = None,
    seed: int = 0,
    estimator: str = "tangent",
    chunk_size: int = 32,
    teacher_ref_labels: torch.Tensor | None = None,
    progress: bool = False,
    checkpoint_dir=None,
) -> RobustnessResult:
    """Minimal boundary distance with its query accounting and milestone record; see
    :func:`minimal_boundary_distance` (and :func:`boundary_search` for checkpoint_dir)."""
    if budget is None or budget < 1:
        raise ValueError(f"MBD needs a positive per-pair budget, got {budget!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown MBD estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")
    if milestones is None:
        milestones = tuple(m for m in DEFAULT_MILESTONES if m < budget) + (budget,)
    cfg = _WalkConfig(num_directions, xi_d, delta, tol, min_step, seed, estimator)
    return _search(oracle, x, y, refs, ref_labels, num_classes, tol=tol, budget=budget, chunk_size=chunk_size,
                   teacher_ref_labels=teacher_ref_labels, progress=progress, walk=(cfg, tuple(milestones)),
                   checkpoint_dir=checkpoint_dir)


def minimal_boundary_distance(oracle, x, y, refs, ref_labels, num_classes, *, budget: int = 2000, **kwargs):
    """Minimal boundary distance, paper Eq. 4-5: BD's best boundary point walked along the boundary.

    Arguments as :func:`boundary_distance`, plus: budget (queries per (sample, target class) pair,
    BD's included), num_directions (Q, paper 200), xi_d (initial step as a fraction of the
    current distance, paper 0.2), delta (probe radius as a fraction of the distance), tol
    (bisection stop, L2 units), min_step (stop once the adapted step falls below it), milestones
    (query counts at which to record distances), seed, estimator (``"tangent"``, the default:
    Sign-OPT's on-sphere probes with HopSkipJump's mean-sign baseline; ``"sign-opt"``: plain
    Sign-OPT; ``"hsja"``: off-sphere probes; see :func:`_sign_gradient`). Returns float32 (N, L); every value is
    the distance to a point the teacher labels n and is never larger than BD's.
    """
    return minimal_boundary_search(oracle, x, y, refs, ref_labels, num_classes, budget=budget, **kwargs).distances


# ----------------------------------------------------------------------------------------------
# driver shared by BD and MBD


def _resumable(checkpoint_dir, name: str, compute):
    """compute() once: its result is saved atomically under checkpoint_dir/name and reloaded on reruns."""
    if checkpoint_dir is None:
        return compute()
    from pathlib import Path

    from db3kd.training import atomic_save

    path = Path(checkpoint_dir) / name
    if path.exists():
        return torch.load(path, map_location="cpu", weights_only=True)
    value = compute()
    atomic_save(value, path)
    return value


def _search(oracle, x, y, refs, ref_labels, num_classes, *, tol, budget, chunk_size, teacher_ref_labels,
            progress, walk, checkpoint_dir=None) -> RobustnessResult:
    y, ref_labels = _check_inputs(x, y, refs, ref_labels, num_classes)
    if tol <= 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if budget is not None and budget < 0:
        raise ValueError(f"budget must be >= 0 queries per pair, got {budget}")
    n, num_l = x.shape[0], num_classes

    def shared_answers():
        before = oracle.queries
        ref_answers = teacher_ref_labels
        if ref_answers is None:
            ref_answers = torch.cat([oracle(refs[s:e]) for s, e in _chunks(refs.shape[0], _MAX_PROBES)])
        pred, _ = _teacher_labels(oracle, x)
        return {"ref_answers": torch.as_tensor(ref_answers), "pred": pred, "queries": oracle.queries - before}

    answers = _resumable(checkpoint_dir, "shared.pt", shared_answers)
    refs, ref_labels = _valid_references(refs, ref_labels, answers["ref_answers"].to(x.device))
    pred, shared = answers["pred"].to(x.device), int(answers["queries"])
    distances = torch.full((n, num_l), math.inf, dtype=torch.float32, device=x.device)
    queries = torch.zeros((n, num_l), dtype=torch.int64, device=x.device)
    milestones = walk[1] if walk else ()
    at = torch.full((len(milestones), n, num_l), math.inf, dtype=torch.float32, device=x.device) if walk else None
    bar = _progress(n, "MBD" if walk else "BD", progress)
    flat_refs = refs.reshape(refs.shape[0], -1)
    for s, e in _chunks(n, chunk_size):
        done = _resumable(checkpoint_dir, f"chunk{s:08d}-{e:08d}.pt",
                          lambda: _chunk(oracle, x, y, pred, refs, ref_labels, flat_refs, s, e, num_l, tol, budget, walk))
        distances[s:e], queries[s:e] = done["distances"], done["queries"]
        if at is not None:
            at[:, s:e] = done["at"]
        bar.update(e - s)
    bar.close()
    idx = torch.arange(n, device=x.device)
    distances[idx, y] = math.inf
    if at is not None:
        at[:, idx, y] = math.inf
    return RobustnessResult(
        distances=distances, queries=queries, shared_queries=shared, misclassified=(pred != y),
        milestones=tuple(milestones), distances_at=at,
    )


def _chunk(oracle, x, y, pred, refs, ref_labels, flat_refs, s, e, num_l, tol, budget, walk) -> dict:
    """BD (and the MBD walk when ``walk``) for samples s:e; returns distances, queries, milestone record."""
    xc = x[s:e].float()
    state = _bd_chunk(oracle, xc, y[s:e], pred[s:e], refs, ref_labels, num_l, tol, budget)
    r = state.upper
    record = None
    if walk is not None:
        cfg, ms = walk
        b = e - s
        x0 = xc.reshape(b, -1).repeat_interleave(num_l, dim=0)  # (B*L, D), pair p = (p // L, p % L)
        end = flat_refs[state.best_end.clamp(min=0)]
        direction = end - x0
        direction /= direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
        target = torch.arange(num_l, device=x.device).repeat(b)
        keys = (torch.arange(s, e, device=x.device).repeat_interleave(num_l) * num_l + target).cpu()
        walkable = state.best_end >= 0
        r_walk = torch.where(walkable, r, torch.full_like(r, math.inf))
        r_walked, _, record = _mbd_walk(
            oracle, x0, direction, r_walk, target, True, state.used, budget, keys, cfg, xc.shape[1:], ms
        )
        r = torch.where(walkable, r_walked, r)
        record = torch.where(walkable.unsqueeze(0), record, r.unsqueeze(0)).view(len(ms), e - s, num_l)
    return {"distances": r.view(e - s, num_l), "queries": state.used.view(e - s, num_l), "at": record}
