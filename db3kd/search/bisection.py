"""Lockstep bisection of many segments at once (paper Eq. 3 and Eq. 8), and the engine's probe path.

Every tensor stays on the oracle's device. A round of :func:`bisect_segments` is one batch of
probes (built by interpolating both segment ends, clamped to [0, 1]) sent through the oracle's
trusted path, and one host synchronisation (the count of rows still active), whatever the
number of rows.
"""

from __future__ import annotations

import math

import torch

from db3kd.search.criteria import Criterion

__all__ = ["probe_slice", "query", "label_segment_points", "bisect_segments"]

# images built and sent per oracle call inside the engine: on a CPU, slices that stay in cache
# (measured on 2 cores: MBD ~2x faster at 1024 than at 8192 probes of 784 floats); on a GPU, large
# slices keep the device busy. Memory stays bounded either way.
PROBE_SLICE = {"cpu": 1024}
PROBE_SLICE_ACCELERATOR = 32768


def probe_slice(device) -> int:
    """Images per oracle call inside the engine on ``device`` (a torch.device or its type string)."""
    kind = torch.device(device).type
    return PROBE_SLICE.get(kind, PROBE_SLICE_ACCELERATOR)


def query(oracle, x: torch.Tensor) -> torch.Tensor:
    """Teacher labels int64 (N,) of the engine's own probes x: float32 (N, C, H, W), built inside [0, 1].

    Uses the oracle's trusted path (``_answer_trusted``: counts every image and enforces the budget
    exactly like ``oracle(x)``, without validation's device-to-host sync) when it has one, else
    ``oracle(x)``. Raises QueryBudgetExceeded before a call that would exceed the oracle's budget.
    """
    trusted = getattr(oracle, "_answer_trusted", None)
    return trusted(x) if trusted is not None else oracle(x)


def label_segment_points(oracle, starts, ends, start_idx, end_idx, frac, shape) -> torch.Tensor:
    """Teacher labels int64 (K,) of ``lerp(starts[start_idx], ends[end_idx], frac)``, clamped to [0, 1].

    starts: float32 (S, D); ends: float32 (E, D); start_idx, end_idx: int64 (K,); frac: float32 (K,)
    in [0, 1]; shape: the image shape (C, H, W) with C*H*W = D. Built and queried in slices of
    :func:`probe_slice` rows.
    """
    k = frac.shape[0]
    out = torch.empty(k, dtype=torch.int64, device=frac.device)
    step = probe_slice(frac.device)
    buf_a = starts.new_empty(min(step, k), starts.shape[1])  # reused across slices (no allocation per slice)
    buf_b = ends.new_empty(min(step, k), ends.shape[1])
    for s in range(0, k, step):
        e = min(s + step, k)
        a = torch.index_select(starts, 0, start_idx[s:e], out=buf_a[: e - s])
        b = torch.index_select(ends, 0, end_idx[s:e], out=buf_b[: e - s])
        pts = a.lerp_(b, frac[s:e, None]).clamp_(0.0, 1.0)
        out[s:e] = query(oracle, pts.view(e - s, *shape))
    return out


def bisect_segments(
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
    criterion: Criterion,
    tol: float,
    used: torch.Tensor,
    budget: float,
    shape,
):
    """Bisect every row's segment ``starts[start_idx] -> ends[end_idx]`` in lockstep (paper Eq. 3).

    Row k is a segment of length ``length[k]`` (float32 (K,), L2 units) with a bracket
    ``lo[k] < t* <= hi[k]`` of distances from its start (``hi`` hits, ``lo`` does not);
    ``criterion`` (K rows) says what a hit is. Rows are grouped (group: int64 (K,) in
    [0, num_groups); one group = one (sample, target) pair) and a group's answer is its best upper
    bound ``U[g] = min hi``. Query savings over independent bisection, all per group: a row is
    dropped once ``lo >= U[g]`` (it cannot beat the best) and split at ``min(midpoint, U[g])``,
    so one query settles whether a far row can win at all.

    Budget (exact): a group's round costs one query per active row; a group whose ``used`` count
    plus that cost would exceed ``budget`` stops before the round, so ``used <= budget`` always
    holds (float32 midpoints may need one round more than ``ceil(log2(length / tol))``; this
    never lets a pair overspend). A group also stops when every row has converged
    (``hi - lo <= tol``) or been dropped. ``used``: int64 (G,), updated in place.
    Returns ``(U, best_row)``: float32 (G,) (inf for groups without rows), int64 (G,) (-1 if none).
    One host synchronisation per round.
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
        active &= (used + need <= budget)[group]  # a round this group cannot afford ends its search
        rows = active.nonzero().squeeze(1)  # the round's one host synchronisation
        if rows.numel() == 0:
            break
        g_rows = group[rows]
        split = torch.minimum((lo[rows] + hi[rows]) * 0.5, gu[rows])
        labels = label_segment_points(oracle, starts, ends, start_idx[rows], end_idx[rows], split / length[rows], shape)
        hit = criterion[rows](labels)
        hi[rows] = torch.where(hit, split, hi[rows])
        lo[rows] = torch.where(hit, lo[rows], split)
        used.scatter_add_(0, g_rows, torch.ones_like(rows))
        upper.scatter_reduce_(0, g_rows, hi[rows], reduce="amin", include_self=True)
    # best row of each group: the one whose hi equals the group's upper bound (the last such row)
    is_best = hi == upper[group]
    best = torch.full((num_groups,), -1, dtype=torch.int64, device=device)
    idx = torch.arange(hi.shape[0], device=device)
    best.scatter_reduce_(0, group, torch.where(is_best, idx, torch.full_like(idx, -1)), reduce="amax", include_self=True)
    return upper, best
