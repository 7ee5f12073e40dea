"""ZSDB3KD pseudo-sample generation (paper Sec. 3.3): noise pushed away from the teacher's boundaries.

Only the :class:`~db3kd.oracle.HardLabelOracle` is used. Per chunk of samples:

1. **Initial noise** ``clamp((U + 0.2) * s1 + N * s2)`` with per-image scales ``s1, s2 ~ U(0, 1)``
   (the authors' code), labelled by the teacher (every query counted); a sample of class m is a
   noise image the teacher labels m (rejection sampling), and its ``T`` start points
   ``o^{m-bar}`` are noise images labelled otherwise.
2. **Each iteration**, for every sample ``o`` of class m, all in lockstep: bisect from ``o`` toward
   each start point for the first point *not* labelled m (Eq. 8); walk the best one along the
   boundary (the untargeted MBD walk, Eq. 4-5) within ``search_budget`` queries; estimate the
   boundary normal at the closest boundary point ``o*`` (Eq. 4) and move the sample away:
   ``o <- o - xi_o * g`` (L2 step, ``g`` unit). A step that would change the sample's label is
   halved (one query per check, up to ``max_halvings``). A sample stops once its distance to the
   boundary has not grown for ``patience`` iterations.
3. Chunks are written atomically to ``out_dir`` as they finish, with the queries they spent; a
   rerun loads finished chunks and generates only the rest, so an interrupted generation resumes
   where it stopped and reports the same total queries. Each chunk's randomness is seeded by
   ``(seed, chunk index)``, so a resumed run produces the same samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from db3kd.training import atomic_save
from db3kd.robustness import (_WalkConfig, _bisect, _check_chunk_request, _chunks, _hit, _mbd_walk, _pair_generators,
                              _sign_gradient, plan_chunks)

__all__ = ["GenerationConfig", "PseudoSamples", "generate_pseudo_samples", "initial_noise"]


@dataclass(frozen=True)
class GenerationConfig:
    """Settings of the generation (paper Sec. 4.5, REFERENCE.md section 2).

    per_class: samples per class (paper 8000); iterations (paper 40 LeNet, 100 AlexNet); xi_o:
    L2 step away from the boundary (paper 0.5 LeNet, 3.0 AlexNet); search_budget: queries per
    minimal-boundary search, per sample and iteration (paper 5000); num_starts: T start points
    per sample; num_directions: Q; tol: bisection stop; patience: iterations without growth
    before a sample stops; chunk_per_class: samples per class in one resumable chunk;
    init_pool: noise images drawn (and queried) per rejection round; init_rounds: rounds before
    giving up on a class; snapshots: iterations whose samples are kept for the figure; noise:
    the initial noise (:func:`initial_noise`; ``authors`` reproduces the released code).
    """

    per_class: int = 8000
    iterations: int = 40
    xi_o: float = 0.5
    search_budget: int = 5000
    num_starts: int = 20
    num_directions: int = 200
    xi_d: float = 0.2
    delta: float = 0.01
    tol: float = 1e-4
    patience: int = 3
    max_halvings: int = 3
    chunk_per_class: int = 20
    init_pool: int = 2000
    init_rounds: int = 20
    snapshots: tuple[int, ...] = (0, 10, 20, 40)
    seed: int = 0
    noise: str = "mixed"


@dataclass
class PseudoSamples:
    """The generated transfer set. x: float32 (N, C, H, W) in [0, 1]; y: int64 (N,) the class the
    teacher assigns; queries: total teacher queries spent (resumed chunks included);
    distance: float32 (N,) final distance to the boundary; snapshots: {iteration: (x, y)} for the
    figure; missing: classes for which no noise image was labelled m."""

    x: torch.Tensor
    y: torch.Tensor
    queries: int
    distance: torch.Tensor
    snapshots: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    missing: list[int] = field(default_factory=list)


NOISE_KINDS = ("authors", "smooth", "mixed")


def initial_noise(n: int, shape, gen: torch.Generator, kind: str = "authors") -> torch.Tensor:
    """Random noise images, float32 (n, *shape) in [0, 1].

    kind ``authors``: ``clamp((U + 0.2) * s1 + N * s2, 0, 1)`` with per-image s1, s2 ~ U(0, 1)
    (the authors' code). ``smooth``: uniform noise on a quarter-resolution grid, bilinearly
    upsampled and scaled by a per-image brightness ~ U(0, 1). ``mixed``: the first half
    ``authors``, the rest ``smooth``. On the suite's MNIST LeNet-5 teacher, 20,000 ``authors``
    images were labelled [1, 41, 793, 744, 1, 302, 0, 169, 17942, 7] per class (class 6 never),
    ``smooth`` ones [452, 1954, 3920, 814, 1771, 2399, 334, 1790, 6286, 280]: rejection sampling
    needs the smooth half to find every class. Raises ValueError for an unknown kind.
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; valid: {', '.join(NOISE_KINDS)}")
    if kind == "mixed":
        half = n // 2
        return torch.cat([initial_noise(half, shape, gen, "authors"), initial_noise(n - half, shape, gen, "smooth")])
    ones = [1] * len(shape)
    if kind == "smooth":
        c, h, w = shape
        grid = torch.rand(n, c, max(1, h // 4), max(1, w // 4), generator=gen)
        up = torch.nn.functional.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
        return (up * torch.rand(n, *ones, generator=gen)).clamp_(0.0, 1.0)
    s1 = torch.rand(n, *ones, generator=gen)
    s2 = torch.rand(n, *ones, generator=gen)
    u = torch.rand(n, *shape, generator=gen)
    z = torch.randn(n, *shape, generator=gen)
    return ((u + 0.2) * s1 + z * s2).clamp_(0.0, 1.0)


def _draw_chunk(oracle, cfg: GenerationConfig, num_classes: int, shape, gen: torch.Generator):
    """Rejection-sample ``chunk_per_class`` noise images per class plus a pool of start points."""
    want = cfg.chunk_per_class
    picked: list[list[torch.Tensor]] = [[] for _ in range(num_classes)]
    pool_x, pool_y = [], []
    for _ in range(cfg.init_rounds):
        x = initial_noise(cfg.init_pool, shape, gen, cfg.noise)
        y = oracle(x)
        pool_x.append(x)
        pool_y.append(y)
        for m in range(num_classes):
            have = sum(t.shape[0] for t in picked[m])
            if have < want:
                picked[m].append(x[y == m][: want - have])
        if all(sum(t.shape[0] for t in picked[m]) >= want for m in range(num_classes)):
            break
    xs = [torch.cat(p) if p else torch.empty(0, *shape) for p in picked]
    ys = [torch.full((t.shape[0],), m, dtype=torch.int64) for m, t in enumerate(xs)]
    return torch.cat(xs), torch.cat(ys), torch.cat(pool_x), torch.cat(pool_y)


def _push_chunk(oracle, cfg: GenerationConfig, o: torch.Tensor, m: torch.Tensor, pool_x, pool_y, gen, keys, shape):
    """Run the iterations on one chunk; returns (final o, distance per sample, snapshots)."""
    a, d = o.shape[0], int(math.prod(shape))
    o = o.reshape(a, d).clone()
    flat_pool = pool_x.reshape(pool_x.shape[0], d)
    walk = _WalkConfig(cfg.num_directions, cfg.xi_d, cfg.delta, cfg.tol, 1e-3, cfg.seed, "hsja")  # the boundary normal
    # T start points per sample: random pool images the teacher labels otherwise
    starts = torch.empty(a, cfg.num_starts, dtype=torch.int64)
    for i in range(a):
        other = (pool_y != m[i]).nonzero().squeeze(1)
        starts[i] = other[torch.randint(0, other.numel(), (cfg.num_starts,), generator=gen)]
    best = torch.zeros(a)
    stale = torch.zeros(a, dtype=torch.int64)
    distance = torch.zeros(a)
    snapshots = {0: o.clone()} if 0 in cfg.snapshots else {}
    gens = _pair_generators(cfg.seed + 1, keys)
    for it in range(1, cfg.iterations + 1):
        live = (stale < cfg.patience).nonzero().squeeze(1)
        if live.numel() == 0:
            break
        # Eq. 8: bisect o -> each start point for the first point not labelled m
        rows_s = live.repeat_interleave(cfg.num_starts)
        rows_e = starts[live].reshape(-1)
        length = (flat_pool[rows_e] - o[rows_s]).norm(dim=1)
        group = torch.arange(live.numel()).repeat_interleave(cfg.num_starts)
        used = torch.zeros(live.numel(), dtype=torch.int64)
        upper, best_row = _bisect(
            oracle, o, flat_pool, rows_s, rows_e, length, torch.zeros_like(length), length.clone(), group,
            live.numel(), m[rows_s], False, cfg.tol, used, cfg.search_budget, shape,
        )
        direction = flat_pool[rows_e[best_row]] - o[live]
        direction /= direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
        # refine with the untargeted MBD walk (Eq. 4-5) within the search budget
        r, direction, _ = _mbd_walk(oracle, o[live], direction, upper, m[live], False, used, cfg.search_budget,
                                    keys[live] * 1000 + it, walk, shape)
        distance[live] = r
        grew = r > best[live] * (1 + 1e-3)
        best[live] = torch.maximum(best[live], r)
        stale[live] = torch.where(grew, torch.zeros_like(stale[live]), stale[live] + 1)
        # Eq. 4 at o*, then move away from the boundary: o <- o - xi_o * g
        o_star = (o[live] + r.unsqueeze(1) * direction).clamp(0.0, 1.0)
        g = _sign_gradient(oracle, o_star, r, m[live], False, [gens[int(i)] for i in live], walk, shape)
        step = torch.full((live.numel(),), cfg.xi_o)
        pending = torch.arange(live.numel())
        for _ in range(cfg.max_halvings + 1):
            if pending.numel() == 0:
                break
            idx = live[pending]
            cand = (o[idx] - step[pending].unsqueeze(1) * g[pending]).clamp(0.0, 1.0)
            keep = ~_hit(oracle(cand.view(-1, *shape)), m[idx], False)
            o[idx[keep]] = cand[keep]
            step[pending[~keep]] *= 0.5
            pending = pending[~keep]
        if it in cfg.snapshots:
            snapshots[it] = o.clone()
    return o.view(a, *shape), distance, {k: v.view(a, *shape) for k, v in snapshots.items()}


def generate_pseudo_samples(oracle, num_classes: int, image_shape, cfg: GenerationConfig, *,
                            out_dir: str | Path | None = None, progress: bool = False,
                            chunks: Sequence[int] | None = None) -> PseudoSamples | int:
    """Generate ``cfg.per_class`` pseudo samples per class through ``oracle`` (paper Sec. 3.3).

    oracle: HardLabelOracle (the only access to the teacher); image_shape: (C, H, W);
    out_dir: folder for resumable chunks (None = no checkpoints). Returns :class:`PseudoSamples`.
    chunks: indices into :func:`db3kd.robustness.plan_chunks` ``(per_class, chunk_per_class)``;
    with out_dir, only those chunks are generated (or found already written) and the call
    returns the queries it spent (int) without assembling. Raises QueryBudgetExceeded when the
    oracle's own budget runs out (finished chunks stay on disk), ValueError for chunks without
    out_dir or outside the plan.
    """
    from tqdm.auto import tqdm

    shape = tuple(image_shape)
    n_chunks = len(plan_chunks(cfg.per_class, cfg.chunk_per_class))  # = ceil(per_class / chunk_per_class)
    if chunks is not None:  # chunks= extension (issue 17)
        chunks = _check_chunk_request(chunks, n_chunks, out_dir)
    start_queries = oracle.queries
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    xs, ys, dists, snaps = [], [], [], {}
    total = 0
    todo = range(n_chunks) if chunks is None else chunks
    for k in tqdm(todo, desc="ZSDB3KD generation", unit="chunk", disable=not progress, leave=False):
        path = out / f"chunk{k:05d}.pt" if out is not None else None
        if path is not None and path.exists():
            if chunks is not None:  # already written: nothing to do for this chunk
                continue
            chunk = torch.load(path, weights_only=True)
        else:
            gen = torch.Generator().manual_seed(cfg.seed * 100_003 + k)
            before = oracle.queries
            o, m, pool_x, pool_y = _draw_chunk(oracle, cfg, num_classes, shape, gen)
            keys = torch.arange(o.shape[0]) + k * cfg.chunk_per_class * num_classes
            if o.shape[0]:
                o, dist, snap = _push_chunk(oracle, cfg, o, m, pool_x, pool_y, gen, keys, shape)
            else:
                dist, snap = torch.zeros(0), {}
            chunk = {"x": (o * 255).round().to(torch.uint8), "y": m, "distance": dist,
                     "snapshots": {int(i): (v * 255).round().to(torch.uint8) for i, v in snap.items()},
                     "queries": oracle.queries - before}
            if path is not None:
                atomic_save(chunk, path)
        if chunks is not None:
            continue
        xs.append(chunk["x"])
        ys.append(chunk["y"])
        dists.append(chunk["distance"])
        total += int(chunk["queries"])
        for i, v in chunk["snapshots"].items():
            snaps.setdefault(int(i), ([], []))
            snaps[int(i)][0].append(v)
            snaps[int(i)][1].append(chunk["y"])
    if chunks is not None:
        return oracle.queries - start_queries
    x = torch.cat(xs).float().div(255.0) if xs else torch.empty(0, *shape)
    y = torch.cat(ys) if ys else torch.empty(0, dtype=torch.int64)
    present = set(y.unique().tolist())
    return PseudoSamples(
        x=x, y=y, queries=total, distance=torch.cat(dists) if dists else torch.zeros(0),
        snapshots={i: (torch.cat(v[0]).float().div(255.0), torch.cat(v[1])) for i, v in snaps.items()},
        missing=[c for c in range(num_classes) if c not in present],
    )
