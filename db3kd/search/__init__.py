"""The query engine: sample robustness through a label-only oracle (paper Sec. 3.2.1 and 3.3).

For a sample ``x0`` of class m (its dataset label) and every other class n, ``r[i, n]`` is the
paper's ``r^{m,n}`` (Eq. 2-5), an L2 distance in the units of the image with pixels in [0, 1]:

* **SD** (Eq. 2, :func:`sample_distance`): distance to the nearest reference sample of class n.
  No queries.
* **BD** (Eq. 3, :func:`boundary_distance`): for every reference of class n, bisect the segment
  ``x0 -> ref`` for the first point the teacher labels n; the smallest such distance.
* **MBD** (Eq. 4-5, :func:`minimal_boundary_distance`): from the best BD point, walk along the
  decision boundary towards ``x0`` with a zeroth-order sign-gradient estimate, re-bisecting after
  every step, until the distance stops falling or the per-pair budget is spent.

Modules, one job each:

* :mod:`~db3kd.search.criteria`: what counts as a hit (:class:`TargetedMisclassification`,
  :class:`Misclassification`), in place of a ``targeted`` flag.
* :mod:`~db3kd.search.bisection`: the lockstep bisection of many segments and the probe path
  (:func:`query`: the oracle's trusted path for the engine's own probes).
* :mod:`~db3kd.search.estimators`: the walk's boundary estimators: ``geo`` (the default,
  coordinate sign bits in an orthonormal frame and a bisected line search, :func:`geo_step`) and
  the sign-gradient estimators of Eq. 4 (``tangent``, ``sign-opt``, ``hsja``, ``paper``), with the
  pairs' random directions (:class:`PairKeys`).
* :mod:`~db3kd.search.closed_form`: teachers with exact minimal distances, to grade them.
* :mod:`~db3kd.search.walk`: the MBD walk (:func:`boundary_walk`).
* :mod:`~db3kd.search.streams`: counter-based random streams keyed by an explicit
  :class:`Stream` id, the seed and the draw's coordinates.
* :mod:`~db3kd.search.distances`: SD, BD, MBD, the chunk driver and :func:`plan_chunks`.
* :mod:`~db3kd.search.checkpoint`: atomic per-chunk files.

Conventions:

* ``r[i, y[i]] = inf`` (a class is not measured against itself). A class with no usable reference
  also gets ``inf`` (no evidence of vulnerability; Eq. 6 turns it into ``1/r = 0``).
* References are used only when the teacher assigns them to their class (one query each per
  call, shared; pass ``teacher_ref_labels`` to reuse answers).
* **Misclassified training samples.** m is always the dataset label. BD/MBD query each ``x0``
  once; when the teacher labels it n != m, ``r[i, n] = 0`` with no further queries.
* **Budgets** are per (sample, target class) pair and include that pair's BD queries; they are
  enforced exactly (a pair never spends more). Shared costs (one query per reference and one per
  sample) are counted by the oracle but belong to no pair.
* **Device.** Samples, references, brackets, directions and probes of a chunk live on the
  oracle's device; finished chunks are written and returned as CPU tensors (results on x's
  device). Caller-supplied images go through the oracle's validating ``__call__``; the engine's
  probes, built inside [0, 1], through its trusted path (counted and budgeted the same way).
* **Determinism.** All (sample, target, reference) bisections of a chunk advance in lockstep and
  every decision is kept per pair; pair (i, n)'s random directions come from the stream
  ``(Stream.MBD, seed, i, n, iteration)``. A result depends on the inputs, the configuration and
  the seed only: not on the chunk size, the batch-mates, resuming, or the process computing it.
"""

from db3kd.search.bisection import bisect_segments, label_segment_points, query
from db3kd.search.criteria import Criterion, Misclassification, TargetedMisclassification
from db3kd.search.distances import (
    DEFAULT_MILESTONES,
    RobustnessResult,
    boundary_distance,
    boundary_search,
    minimal_boundary_distance,
    minimal_boundary_search,
    plan_chunks,
    sample_distance,
)
from db3kd.search.estimators import ESTIMATORS, PairKeys, sign_gradient
from db3kd.search.streams import KeyedGenerator, Stream, stream_key
from db3kd.search.walk import WalkConfig, boundary_walk

__all__ = [
    "Criterion",
    "DEFAULT_MILESTONES",
    "ESTIMATORS",
    "KeyedGenerator",
    "Misclassification",
    "PairKeys",
    "RobustnessResult",
    "Stream",
    "TargetedMisclassification",
    "WalkConfig",
    "bisect_segments",
    "boundary_distance",
    "boundary_search",
    "boundary_walk",
    "label_segment_points",
    "minimal_boundary_distance",
    "minimal_boundary_search",
    "plan_chunks",
    "query",
    "sample_distance",
    "sign_gradient",
    "stream_key",
]
