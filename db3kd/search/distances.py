"""Sample robustness ``r[i, n]`` (paper Sec. 3.2.1): SD (Eq. 2), BD (Eq. 3), MBD (Eq. 4-5), chunked.

The driver keeps the work of a chunk of samples on the oracle's device from start to end and
writes each finished chunk (CPU tensors) atomically; see :mod:`db3kd.search` for the conventions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from db3kd.search.bisection import bisect_segments, probe_slice
from db3kd.search.checkpoint import chunk_name, resumable
from db3kd.search.criteria import TargetedMisclassification
from db3kd.search.estimators import ESTIMATORS, PairKeys
from db3kd.search.streams import Stream
from db3kd.search.walk import WalkConfig, boundary_walk

__all__ = [
    "DEFAULT_MILESTONES",
    "RobustnessResult",
    "plan_chunks",
    "sample_distance",
    "boundary_search",
    "boundary_distance",
    "minimal_boundary_search",
    "minimal_boundary_distance",
]

DEFAULT_MILESTONES = (1000, 2000, 5000, 10000, 20000)


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


def plan_chunks(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """The chunks ``[(start, end), ...]`` that label construction splits ``n`` samples into.

    Index k of this list is what ``chunks=[k, ...]`` of :func:`boundary_search` and
    :func:`minimal_boundary_search` selects; chunk k's file is ``chunk{start:08d}-{end:08d}.pt``.
    Raises ValueError for n < 0 or chunk_size < 1.
    """
    if n < 0 or chunk_size < 1:
        raise ValueError(f"plan_chunks needs n >= 0 and chunk_size >= 1, got n={n}, chunk_size={chunk_size}")
    return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


# ----------------------------------------------------------------------------------------------
# input checks


def _check_range(name: str, t: torch.Tensor) -> None:
    if t.numel() == 0:
        return
    lo, hi = torch.aminmax(t.float())
    lo, hi = float(lo), float(hi)
    if not (lo >= 0.0 and hi <= 1.0):  # NaN fails both
        raise ValueError(f"{name} values must be finite and lie in [0, 1], got min {lo:.6g} and max {hi:.6g}")


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


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="sample", disable=not enabled, leave=False)


def engine_device(oracle, x: torch.Tensor) -> torch.device:
    """Where the engine works: the oracle's device (``oracle.device``), else x's."""
    return torch.device(getattr(oracle, "device", x.device))


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
    for s, e in plan_chunks(n, chunk_size):
        d = torch.cdist(x[s:e].reshape(e - s, -1).float(), flat_refs, compute_mode="donot_use_mm_for_euclid_dist")
        idx = ref_labels.unsqueeze(0).expand_as(d)
        out[s:e].scatter_reduce_(1, idx, d, reduce="amin", include_self=True)
    out[torch.arange(n, device=x.device), y] = math.inf
    return out


# ----------------------------------------------------------------------------------------------
# BD (Eq. 3) of one chunk


@dataclass
class _ChunkBD:
    """BD state of one chunk, handed to the MBD walk: per pair (B*L), its distance, queries and
    the segment end that realised it."""

    upper: torch.Tensor  # float32 (B*L,)
    used: torch.Tensor  # int64 (B*L,)
    best_end: torch.Tensor  # int64 (B*L,), index into the valid references, -1 if none


def _bd_chunk(oracle, x, y, pred, refs, ref_labels, num_classes, tol, budget) -> _ChunkBD:
    """Lockstep BD (Eq. 3) for one chunk of samples against every valid reference of every other class."""
    b, num_l = x.shape[0], num_classes
    device = x.device
    flat_x = x.reshape(b, -1)
    flat_r = refs.reshape(refs.shape[0], -1)
    # rows: every (sample, reference) with reference class != sample class and != teacher's wrong label
    bi = torch.arange(b, device=device).repeat_interleave(refs.shape[0])
    ri = torch.arange(refs.shape[0], device=device).repeat(b)
    t = ref_labels[ri]
    keep = (t != y[bi]) & ~((pred[bi] != y[bi]) & (t == pred[bi]))
    length = torch.cdist(flat_x, flat_r, compute_mode="donot_use_mm_for_euclid_dist").view(-1)  # batch-independent
    keep &= length > 0
    rows = keep.nonzero().squeeze(1)
    bi, ri, t, length = bi[rows], ri[rows], t[rows], length[rows]
    group = bi * num_l + t
    used = torch.zeros(b * num_l, dtype=torch.int64, device=device)
    upper, best = bisect_segments(
        oracle, flat_x, flat_r, bi, ri, length, torch.zeros_like(length), length.clone(), group, b * num_l,
        TargetedMisclassification(t), tol, used, math.inf if budget is None else budget, x.shape[1:],
    )
    best_end = torch.where(best >= 0, ri[best.clamp(min=0)] if ri.numel() else best, torch.full_like(best, -1))
    # a misclassified sample already sits in its predicted class's region: distance 0, no queries
    wrong = torch.zeros(b * num_l, dtype=torch.bool, device=device)
    wrong[torch.arange(b, device=device) * num_l + pred] = pred != y
    upper = torch.where(wrong, torch.zeros_like(upper), upper)
    return _ChunkBD(upper=upper, used=used, best_end=best_end)


# ----------------------------------------------------------------------------------------------
# public entry points


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
    chunk_size: int = 256,
    teacher_ref_labels: torch.Tensor | None = None,
    progress: bool = False,
    checkpoint_dir=None,
    chunks: Sequence[int] | None = None,
) -> RobustnessResult | int:
    """Boundary distance, paper Eq. 3, with its query accounting; see :func:`boundary_distance`.

    checkpoint_dir: folder where the shared answers (``shared.pt``: the teacher's labels of the
    references and samples) and every finished chunk (``chunk{start:08d}-{end:08d}.pt``, see
    :func:`plan_chunks`) are written atomically; a rerun with the same inputs loads finished
    chunks instead of querying again (their queries stay in the totals).

    chunks: indices into ``plan_chunks(len(x), chunk_size)``. With chunks (checkpoint_dir
    required), only those chunks are computed (or found already written), each written as it
    finishes, and the call returns the number of queries it spent (int) without assembling a
    result: the entry point for distributing label construction over processes (``chunks=[]``
    writes ``shared.pt`` only). A chunk file depends only on the inputs, the configuration and
    the chunk's index, never on the process, device placement of its batch-mates or the order in
    which chunks run; ``shared.pt`` is deterministic, so processes that write it concurrently
    replace it with identical bytes. Without chunks every chunk is assembled into a
    :class:`RobustnessResult`, loading finished ones from checkpoint_dir.
    """
    return _search(oracle, x, y, refs, ref_labels, num_classes, tol=tol, budget=budget, chunk_size=chunk_size,
                   teacher_ref_labels=teacher_ref_labels, progress=progress, walk=None, checkpoint_dir=checkpoint_dir,
                   chunks=chunks)


def boundary_distance(oracle, x, y, refs, ref_labels, num_classes, **kwargs) -> torch.Tensor:
    """Boundary distance, paper Eq. 3: ``r[i, n]`` = min over references of class n of the distance
    from ``x[i]`` to the first point on the segment ``x[i] -> ref`` that the teacher labels n.

    oracle: a :class:`~db3kd.oracle.HardLabelOracle` (the engine runs on its device); x: float
    (N, C, H, W) in [0, 1]; y: int64 (N,) dataset labels; refs: float (R, C, H, W) in [0, 1];
    ref_labels: int64 (R,). Keywords: tol (bisection stop, L2 units, paper 1e-5), budget
    (queries per (sample, target) pair, None = unlimited), chunk_size (samples per lockstep
    chunk), teacher_ref_labels (reuse the teacher's answers on refs), progress, checkpoint_dir.
    Returns float32 (N, L) on x's device, ``r[i, y[i]] = inf``; each value is a point the teacher
    labels n, within ``tol`` of the crossing. Raises ValueError (bad input), QueryBudgetExceeded
    (the oracle's own budget ran out).
    """
    return boundary_search(oracle, x, y, refs, ref_labels, num_classes, **kwargs).distances


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
    estimator: str = "geo",
    chunk_size: int = 128,
    teacher_ref_labels: torch.Tensor | None = None,
    progress: bool = False,
    checkpoint_dir=None,
    chunks: Sequence[int] | None = None,
) -> RobustnessResult | int:
    """Minimal boundary distance with its query accounting and milestone record; see
    :func:`minimal_boundary_distance` (and :func:`boundary_search` for checkpoint_dir and chunks)."""
    if budget is None or budget < 1:
        raise ValueError(f"MBD needs a positive per-pair budget, got {budget!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown MBD estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")
    if milestones is None:
        milestones = tuple(m for m in DEFAULT_MILESTONES if m < budget) + (budget,)
    cfg = WalkConfig(num_directions, xi_d, delta, tol, min_step, estimator)
    return _search(oracle, x, y, refs, ref_labels, num_classes, tol=tol, budget=budget, chunk_size=chunk_size,
                   teacher_ref_labels=teacher_ref_labels, progress=progress, walk=(cfg, tuple(milestones), seed),
                   checkpoint_dir=checkpoint_dir, chunks=chunks)


def minimal_boundary_distance(oracle, x, y, refs, ref_labels, num_classes, *, budget: int = 2000, **kwargs):
    """Minimal boundary distance, paper Eq. 4-5: BD's best boundary point walked along the boundary.

    Arguments as :func:`boundary_distance`, plus: budget (queries per (sample, target class) pair,
    BD's included), num_directions (Q, paper 200), xi_d (initial step as a fraction of the
    current distance, paper 0.2), delta (probe radius as a fraction of the distance), tol
    (bisection stop, L2 units), min_step (stop once the adapted step falls below it), milestones
    (query counts at which to record distances), seed (pair (i, n)'s directions come from the
    stream ``(Stream.MBD, seed, i, n)``, i the index into x), estimator (``"geo"``, the
    default, :func:`db3kd.search.estimators.geo_step`; ``"tangent"``, ``"sign-opt"``, ``"hsja"``,
    ``"paper"``: :func:`db3kd.search.estimators.sign_gradient`). Returns float32 (N, L); every value is the
    distance to a point the teacher labels n and is never larger than BD's.
    """
    return minimal_boundary_search(oracle, x, y, refs, ref_labels, num_classes, budget=budget, **kwargs).distances


# ----------------------------------------------------------------------------------------------
# driver shared by BD and MBD


def _answer_all(oracle, x: torch.Tensor, device) -> torch.Tensor:
    """The teacher's labels int64 (N,) of caller-supplied images, through the validating door."""
    out = [oracle(x[s:e].to(device)) for s, e in plan_chunks(x.shape[0], probe_slice(device))]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64, device=device)


def _search(oracle, x, y, refs, ref_labels, num_classes, *, tol, budget, chunk_size, teacher_ref_labels,
            progress, walk, checkpoint_dir=None, chunks=None):
    y, ref_labels = _check_inputs(x, y, refs, ref_labels, num_classes)
    if tol <= 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if budget is not None and budget < 0:
        raise ValueError(f"budget must be >= 0 queries per pair, got {budget}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n, num_l = x.shape[0], num_classes
    plan = plan_chunks(n, chunk_size)
    if chunks is not None:
        if checkpoint_dir is None:
            raise ValueError("chunks=... computes chunks into checkpoint_dir: pass a checkpoint_dir")
        chunks = [int(k) for k in chunks]
        bad = [k for k in chunks if not 0 <= k < len(plan)]
        if bad:
            raise ValueError(f"chunk indices {bad[:5]} are outside plan_chunks({n}, {chunk_size}) (0..{len(plan) - 1})")
    if teacher_ref_labels is not None:
        _check_range("refs", refs)  # the engine interpolates towards them without the oracle seeing them
    device = engine_device(oracle, x)
    start_queries = oracle.queries

    def shared_answers():
        before = oracle.queries
        ref_answers = teacher_ref_labels
        if ref_answers is None:
            ref_answers = _answer_all(oracle, refs, device)
        pred = _answer_all(oracle, x, device)
        return {"ref_answers": torch.as_tensor(ref_answers).cpu(), "pred": pred.cpu(), "queries": oracle.queries - before}

    answers = resumable(checkpoint_dir, "shared.pt", shared_answers)
    keep = answers["ref_answers"].to(ref_labels.device) == ref_labels
    refs_d = refs[keep].to(device).float()
    ref_labels_d = ref_labels[keep].to(device)
    pred = answers["pred"].to(device)
    y_d = y.to(device)
    flat_refs = refs_d.reshape(refs_d.shape[0], -1)

    def compute(k):
        s, e = plan[k]
        return lambda: _chunk(oracle, x[s:e].to(device).float(), y_d[s:e], pred[s:e], refs_d, ref_labels_d, flat_refs,
                              s, num_l, tol, budget, walk)

    if chunks is not None:
        for k in chunks:
            resumable(checkpoint_dir, chunk_name(*plan[k]), compute(k))
        return oracle.queries - start_queries

    out_device = x.device
    distances = torch.full((n, num_l), math.inf, dtype=torch.float32)
    queries = torch.zeros((n, num_l), dtype=torch.int64)
    milestones = walk[1] if walk else ()
    at = torch.full((len(milestones), n, num_l), math.inf, dtype=torch.float32) if walk else None
    best_ref = torch.full((n, num_l), -1, dtype=torch.int64)
    kept = keep.nonzero().squeeze(1).cpu()  # valid reference k is refs[kept[k]]
    bar = _progress(n, "MBD" if walk else "BD", progress)
    for k, (s, e) in enumerate(plan):
        done = resumable(checkpoint_dir, chunk_name(s, e), compute(k))
        distances[s:e], queries[s:e] = done["distances"], done["queries"]
        if at is not None:
            at[:, s:e] = done["at"]
        if "best_end" in done:  # chunks checkpointed before the field existed keep -1
            b = done["best_end"]
            best_ref[s:e] = torch.where(b >= 0, kept[b.clamp(min=0)] if kept.numel() else b, b)
        bar.update(e - s)
    bar.close()
    idx = torch.arange(n)
    y_cpu = y.cpu()
    distances[idx, y_cpu] = math.inf
    if at is not None:
        at[:, idx, y_cpu] = math.inf
    return RobustnessResult(
        distances=distances.to(out_device), queries=queries.to(out_device), shared_queries=int(answers["queries"]),
        misclassified=(answers["pred"] != y_cpu).to(out_device), milestones=tuple(milestones),
        distances_at=at.to(out_device) if at is not None else None, extra={"best_ref": best_ref},
    )


def _chunk(oracle, xc, y, pred, refs, ref_labels, flat_refs, start, num_l, tol, budget, walk) -> dict:
    """BD (and the MBD walk when ``walk``) for samples ``start:start + len(xc)``, on xc's device;
    returns CPU tensors: distances (B, L), queries (B, L), at (M, B, L) or None."""
    b = xc.shape[0]
    state = _bd_chunk(oracle, xc, y, pred, refs, ref_labels, num_l, tol, budget)
    r = state.upper
    record = None
    if walk is not None:
        cfg, ms, seed = walk
        device = xc.device
        x0 = xc.reshape(b, -1).repeat_interleave(num_l, dim=0)  # (B*L, D), pair p = (p // L, p % L)
        end = flat_refs[state.best_end.clamp(min=0)] if flat_refs.shape[0] else x0
        direction = end - x0
        direction /= direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
        target = torch.arange(num_l, device=device).repeat(b)
        sample = torch.arange(start, start + b, device=device).repeat_interleave(num_l)
        keys = PairKeys.of(Stream.MBD, seed, sample, target, device=device)
        walkable = state.best_end >= 0
        r_walk = torch.where(walkable, r, torch.full_like(r, math.inf))
        r_walked, _, record = boundary_walk(
            oracle, x0, direction, r_walk, TargetedMisclassification(target), state.used, budget, keys, cfg,
            xc.shape[1:], ms,
        )
        r = torch.where(walkable, r_walked, r)
        record = torch.where(walkable.unsqueeze(0), record, r.unsqueeze(0)).view(len(ms), b, num_l).cpu()
    return {"distances": r.view(b, num_l).cpu(), "queries": state.used.view(b, num_l).cpu(), "at": record,
            "best_end": state.best_end.view(b, num_l).cpu()}
