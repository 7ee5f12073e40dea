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
   halved (one query per check, up to ``max_halvings``). Every sample runs all ``iterations``
   (the authors' code; Fig. 6's accuracy grows with them). With ``patience`` set, a sample stops
   once its distance has not grown by 0.1% for that many iterations: an early stop on a noisy
   distance estimate (a 100-query search at the cpu profile), which froze most samples after a few
   iterations when it was the default (3).
3. Chunks are written atomically to ``out_dir`` as they finish, with the queries they spent; a
   rerun loads finished chunks and generates only the rest, so an interrupted generation resumes
   where it stopped and reports the same total queries.

Everything of a chunk (noise, samples, start points, brackets, directions, probes) lives on the
oracle's device; the engine's probes go through the oracle's trusted path. Randomness comes from
counter-based streams (:mod:`db3kd.search.streams`) with their own stream ids, disjoint from
label construction's: the noise from ``(GENERATION_NOISE, seed, chunk)``, the start points from
``(GENERATION_STARTS, seed, chunk)``, the walk of sample i at iteration t from
``(GENERATION_WALK, seed, i, t)`` and the step away from ``(GENERATION_STEP, seed, i, t)``, i the
sample's index over all chunks. A chunk's result depends on its index only, not on the process
that computes it or on which other chunks ran.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from db3kd.search import (
    KeyedGenerator,
    Misclassification,
    PairKeys,
    Stream,
    WalkConfig,
    bisect_segments,
    boundary_walk,
    query,
    sign_gradient,
    stream_key,
)
from db3kd.search.checkpoint import load_unit
from db3kd.training import atomic_save

__all__ = ["GenerationConfig", "PseudoSamples", "generate_pseudo_samples", "initial_noise"]


@dataclass(frozen=True)
class GenerationConfig:
    """Settings of the generation (paper Sec. 4.5, REFERENCE.md section 2).

    per_class: samples per class (paper 8000); iterations (paper 40 LeNet, 100 AlexNet); xi_o:
    L2 step away from the boundary (paper 0.5 LeNet, 3.0 AlexNet); search_budget: queries per
    minimal-boundary search, per sample and iteration (paper 5000); num_starts: T start points
    per sample; num_directions: Q; tol: bisection stop; patience: iterations without growth
    before a sample stops (None, the default: no early stop, every sample runs all iterations); chunk_per_class: samples per class in one resumable chunk;
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
    patience: int | None = None
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


def _rand(gen, *shape) -> torch.Tensor:
    return gen.rand(*shape) if isinstance(gen, KeyedGenerator) else torch.rand(*shape, generator=gen)


def _randn(gen, *shape) -> torch.Tensor:
    return gen.randn(*shape) if isinstance(gen, KeyedGenerator) else torch.randn(*shape, generator=gen)


def initial_noise(n: int, shape, gen: torch.Generator | KeyedGenerator, kind: str = "authors") -> torch.Tensor:
    """Random noise images, float32 (n, *shape) in [0, 1], on the generator's device.

    gen: a ``torch.Generator`` or a :class:`~db3kd.search.streams.KeyedGenerator` (what
    generation uses). kind ``authors``: ``clamp((U + 0.2) * s1 + N * s2, 0, 1)`` with per-image
    s1, s2 ~ U(0, 1) (the authors' code). ``smooth``: uniform noise on a quarter-resolution grid,
    bilinearly upsampled and scaled by a per-image brightness ~ U(0, 1). ``mixed``: the first half
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
        grid = _rand(gen, n, c, max(1, h // 4), max(1, w // 4))
        up = torch.nn.functional.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
        return (up * _rand(gen, n, *ones)).clamp_(0.0, 1.0)
    s1 = _rand(gen, n, *ones)
    s2 = _rand(gen, n, *ones)
    u = _rand(gen, n, *shape)
    z = _randn(gen, n, *shape)
    return ((u + 0.2) * s1 + z * s2).clamp_(0.0, 1.0)


def _draw_chunk(oracle, cfg: GenerationConfig, num_classes: int, shape, gen: KeyedGenerator):
    """Rejection-sample ``chunk_per_class`` noise images per class plus a pool of start points.

    Returns (o float32 (A, D), m int64 (A,), pool float32 (P, D), pool labels int64 (P,)), on
    the generator's device. The noise is built inside [0, 1]: it goes through the trusted path.
    """
    want = cfg.chunk_per_class
    picked: list[list[torch.Tensor]] = [[] for _ in range(num_classes)]
    have = [0] * num_classes
    pool_x, pool_y = [], []
    for _ in range(cfg.init_rounds):
        x = initial_noise(cfg.init_pool, shape, gen, cfg.noise)
        y = query(oracle, x)
        pool_x.append(x)
        pool_y.append(y)
        counts = torch.bincount(y, minlength=num_classes).tolist()  # one host synchronisation per round
        for m in range(num_classes):
            if have[m] < want and counts[m]:
                take = (y == m).nonzero().squeeze(1)[: want - have[m]]
                picked[m].append(x[take])
                have[m] += int(take.numel())
        if all(h >= want for h in have):
            break
    d = int(math.prod(shape))
    device = gen.device
    xs = [torch.cat(p).view(-1, d) if p else torch.empty(0, d, device=device) for p in picked]
    ys = [torch.full((t.shape[0],), m, dtype=torch.int64, device=device) for m, t in enumerate(xs)]
    return torch.cat(xs), torch.cat(ys), torch.cat(pool_x).view(-1, d), torch.cat(pool_y)


def _start_points(m: torch.Tensor, pool_y: torch.Tensor, num_classes: int, count: int, gen: KeyedGenerator):
    """int64 (A, T): for each sample of class m[a], T random pool indices whose label is not m[a]."""
    # row c of `order` lists the pool indices labelled != c first (stable), `other[c]` of them
    order = torch.argsort((pool_y.unsqueeze(0) == torch.arange(num_classes, device=pool_y.device).unsqueeze(1)).to(
        torch.int32), dim=1, stable=True)
    other = (pool_y.unsqueeze(0) != torch.arange(num_classes, device=pool_y.device).unsqueeze(1)).sum(1)
    pick = gen.randint(other[m].clamp_min(1).unsqueeze(1), (m.shape[0], count))
    return order[m.unsqueeze(1), pick]


def _push_chunk(oracle, cfg: GenerationConfig, o, m, pool_x, pool_y, sample, num_classes, shape, gen):
    """Run the iterations on one chunk (o float32 (A, D), m int64 (A,), sample int64 (A,) global
    indices); returns (final o, distance per sample, snapshots), on o's device."""
    a, d = o.shape
    device = o.device
    o = o.clone()
    walk = WalkConfig(cfg.num_directions, cfg.xi_d, cfg.delta, cfg.tol, 1e-3, "hsja")  # the boundary normal
    starts = _start_points(m, pool_y, num_classes, cfg.num_starts, gen)  # (A, T)
    best = torch.zeros(a, device=device)
    stale = torch.zeros(a, dtype=torch.int64, device=device)
    distance = torch.zeros(a, device=device)
    snapshots = {0: o.clone()} if 0 in cfg.snapshots else {}
    for it in range(1, cfg.iterations + 1):
        alive = stale < cfg.patience if cfg.patience is not None else torch.ones_like(stale, dtype=torch.bool)
        live = alive.nonzero().squeeze(1)  # host synchronisation
        n = live.numel()
        if n == 0:
            break
        crit = Misclassification(m[live])
        # Eq. 8: bisect o -> each start point for the first point not labelled m
        rows_s = live.repeat_interleave(cfg.num_starts)
        rows_e = starts[live].reshape(-1)
        length = (pool_x[rows_e] - o[rows_s]).norm(dim=1)
        group = torch.arange(n, device=device).repeat_interleave(cfg.num_starts)
        used = torch.zeros(n, dtype=torch.int64, device=device)
        upper, best_row = bisect_segments(
            oracle, o, pool_x, rows_s, rows_e, length, torch.zeros_like(length), length.clone(), group, n,
            Misclassification(m[rows_s]), cfg.tol, used, cfg.search_budget, shape,
        )
        direction = pool_x[rows_e[best_row]] - o[live]
        direction /= direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
        # refine with the untargeted MBD walk (Eq. 4-5) within the search budget
        it_t = torch.full((n,), it, dtype=torch.int64, device=device)
        keys = PairKeys.of(Stream.GENERATION_WALK, cfg.seed, sample[live], it_t, device=device)
        r, direction, _ = boundary_walk(oracle, o[live], direction, upper, crit, used, cfg.search_budget, keys, walk,
                                        shape)
        distance[live] = r
        grew = r > best[live] * (1 + 1e-3)
        best[live] = torch.maximum(best[live], r)
        stale[live] = torch.where(grew, torch.zeros_like(stale[live]), stale[live] + 1)
        # Eq. 4 at o*, then move away from the boundary: o <- o - xi_o * g
        o_star = (o[live] + r.unsqueeze(1) * direction).clamp(0.0, 1.0)
        signs, block = PairKeys.of(Stream.GENERATION_STEP, cfg.seed, sample[live], it_t, device=device).directions(
            None, 0, cfg.num_directions, d)
        g = sign_gradient(oracle, o_star, r, crit, signs, block, "hsja", cfg.delta, shape)
        step = torch.full((n,), cfg.xi_o, device=device)
        pending = torch.arange(n, device=device)
        for _ in range(cfg.max_halvings + 1):
            if pending.numel() == 0:
                break
            idx = live[pending]
            cand = (o[idx] - step[pending].unsqueeze(1) * g[pending]).clamp(0.0, 1.0)
            keep = ~crit[pending](query(oracle, cand.view(-1, *shape)))
            o[idx] = torch.where(keep.unsqueeze(1), cand, o[idx])
            step[pending] = torch.where(keep, step[pending], step[pending] * 0.5)
            pending = pending[~keep]  # host synchronisation
        if it in cfg.snapshots:
            snapshots[it] = o.clone()
    return o, distance, snapshots


def _chunk_path(out: Path | None, k: int) -> Path | None:
    return out / f"chunk{k:05d}.pt" if out is not None else None


def _generate_chunk(oracle, cfg: GenerationConfig, num_classes: int, shape, k: int, device) -> dict:
    """Chunk k of the generation (CPU uint8 images, labels, distances, snapshots, queries spent)."""
    before = oracle.queries
    gen = KeyedGenerator(stream_key(Stream.GENERATION_NOISE, cfg.seed, k), device=device)
    o, m, pool_x, pool_y = _draw_chunk(oracle, cfg, num_classes, shape, gen)
    sample = torch.arange(o.shape[0], device=device) + k * cfg.chunk_per_class * num_classes
    if o.shape[0]:
        starts_gen = KeyedGenerator(stream_key(Stream.GENERATION_STARTS, cfg.seed, k), device=device)
        o, dist, snap = _push_chunk(oracle, cfg, o, m, pool_x, pool_y, sample, num_classes, shape, starts_gen)
    else:
        dist, snap = torch.zeros(0, device=device), {}

    def to_uint8(v):
        return (v.view(-1, *shape) * 255).round().to(torch.uint8).cpu()

    return {"x": to_uint8(o), "y": m.cpu(), "distance": dist.cpu(),
            "snapshots": {int(i): to_uint8(v) for i, v in snap.items()}, "queries": oracle.queries - before}


def generate_pseudo_samples(oracle, num_classes: int, image_shape, cfg: GenerationConfig, *,
                            out_dir: str | Path | None = None, progress: bool = False,
                            chunks: Sequence[int] | None = None) -> PseudoSamples | int:
    """Generate ``cfg.per_class`` pseudo samples per class through ``oracle`` (paper Sec. 3.3).

    oracle: HardLabelOracle (the only access to the teacher; the generation runs on its device);
    image_shape: (C, H, W); out_dir: folder for resumable chunks ``chunk{k:05d}.pt`` (None = no
    checkpoints), k in ``range(ceil(per_class / chunk_per_class))``. Returns
    :class:`PseudoSamples` (CPU tensors). chunks: chunk indices k; with chunks (out_dir
    required) only those chunks are generated (or found already written), each written
    atomically, and the call returns the queries it spent (int) without assembling: a chunk's
    file depends on cfg and k only, never on the process that computes it. Raises
    QueryBudgetExceeded when the oracle's own budget runs out: finished chunks stay on disk;
    ValueError for chunk indices outside the plan or chunks without out_dir.
    """
    from tqdm.auto import tqdm

    shape = tuple(image_shape)
    n_chunks = math.ceil(cfg.per_class / cfg.chunk_per_class)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    device = torch.device(getattr(oracle, "device", "cpu"))
    if chunks is not None:
        if out is None:
            raise ValueError("chunks=... generates chunks into out_dir: pass an out_dir")
        bad = [int(k) for k in chunks if not 0 <= int(k) < n_chunks]
        if bad:
            raise ValueError(f"chunk indices {bad[:5]} are outside the generation's {n_chunks} chunks")
        start = oracle.queries
        for k in chunks:
            path = _chunk_path(out, int(k))
            if not path.exists():
                atomic_save(_generate_chunk(oracle, cfg, num_classes, shape, int(k), device), path)
        return oracle.queries - start
    xs, ys, dists, snaps = [], [], [], {}
    total = 0
    for k in tqdm(range(n_chunks), desc="ZSDB3KD generation", unit="chunk", disable=not progress, leave=False):
        path = _chunk_path(out, k)
        chunk = load_unit(path) if path is not None else None
        if chunk is None:
            chunk = _generate_chunk(oracle, cfg, num_classes, shape, k, device)
            if path is not None:
                atomic_save(chunk, path)
        xs.append(chunk["x"])
        ys.append(chunk["y"])
        dists.append(chunk["distance"])
        total += int(chunk["queries"])
        for i, v in chunk["snapshots"].items():
            snaps.setdefault(int(i), ([], []))
            snaps[int(i)][0].append(v)
            snaps[int(i)][1].append(chunk["y"])
    x = torch.cat(xs).float().div(255.0) if xs else torch.empty(0, *shape)
    y = torch.cat(ys) if ys else torch.empty(0, dtype=torch.int64)
    present = set(y.unique().tolist())
    return PseudoSamples(
        x=x, y=y, queries=total, distance=torch.cat(dists) if dists else torch.zeros(0),
        snapshots={i: (torch.cat(v[0]).float().div(255.0), torch.cat(v[1])) for i, v in snaps.items()},
        missing=[c for c in range(num_classes) if c not in present],
    )
