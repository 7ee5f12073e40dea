"""An independent minimal-boundary estimator to cross-check our MBD: ART's HopSkipJump.

HopSkipJump (Chen, Jordan and Wainwright, 2020) as implemented in the adversarial-robustness-toolbox
(``pip install 'db3kd[crosscheck]'``) runs here against our :class:`~db3kd.oracle.HardLabelOracle`
and nothing else: ART sees a black box whose ``predict`` returns the one-hot top-1 label, so every
image it sends is validated and counted by our oracle exactly like our own engine's probes.
Used by ``tests/test_robustness.py`` (linear teacher, exact answer known) and by the perf benchmark
(MNIST LeNet-5, a few hundred (sample, target) pairs, compared with our MBD distances).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["HopSkipJumpResult", "hopskipjump_distances"]


@dataclass
class HopSkipJumpResult:
    """distances: float32 (N,), L2 from each sample to its boundary point (ART's final point,
    bisected back to the boundary; pixels in [0, 1]); queries: int64 (N,) images the oracle answered for each sample; points:
    float32 (N, C, H, W); reached: bool (N,), whether the oracle labels each point its target."""

    distances: torch.Tensor
    queries: torch.Tensor
    points: torch.Tensor
    reached: torch.Tensor


def hopskipjump_distances(
    oracle,
    x: torch.Tensor,
    target: torch.Tensor,
    start: torch.Tensor,
    *,
    num_classes: int,
    max_iter: int = 20,
    max_eval: int = 1000,
    init_eval: int = 100,
    batch_size: int = 256,
    tol: float = 1e-5,
) -> HopSkipJumpResult:
    """Targeted L2 HopSkipJump from ART for every sample, started at a point of its target class.

    oracle: a HardLabelOracle (its queries grow by every image ART sends, plus 2N checks: the start
    points before and the returned points after, attributed to no sample); x: float32 (N, C, H, W)
    in [0, 1]; target: int64 (N,) target class of each sample; start: float32 (N, C, H, W) in
    [0, 1], points the oracle labels ``target`` (e.g. our BD boundary points); max_iter,
    max_eval, init_eval: ART's HopSkipJump settings (iterations, most and first probes of a
    gradient estimate). ART's loop ends with a geometric step into the target region; the
    returned point is projected back onto the boundary by bisecting ``x -> point`` to ``tol``
    (L2 units), as HopSkipJump does at the start of each iteration. Raises ImportError naming the extra when ART is missing and ValueError
    when a start point is not labelled its target (HopSkipJump would search from scratch).
    """
    try:
        from art.attacks.evasion import HopSkipJump
        from art.estimators.classification import BlackBoxClassifier
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the HopSkipJump cross-check needs adversarial-robustness-toolbox: pip install 'db3kd[crosscheck]'"
        ) from exc
    import numpy as np

    x, start = x.float().cpu(), start.float().cpu()
    target = torch.as_tensor(target, dtype=torch.int64).cpu()
    if x.shape != start.shape or target.shape != (x.shape[0],):
        raise ValueError(f"x {tuple(x.shape)}, start {tuple(start.shape)} and target {tuple(target.shape)} disagree")
    start_labels = oracle(start)
    if not torch.equal(start_labels.cpu(), target):
        bad = (start_labels.cpu() != target).nonzero().squeeze(1).tolist()
        raise ValueError(f"start points {bad[:10]} are not labelled their target class by the oracle")

    def predict(batch: np.ndarray) -> np.ndarray:
        labels = oracle(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
        return torch.nn.functional.one_hot(labels.cpu(), num_classes).numpy().astype(np.float32)

    box = BlackBoxClassifier(predict, input_shape=tuple(x.shape[1:]), nb_classes=num_classes, clip_values=(0.0, 1.0))
    attack = HopSkipJump(box, batch_size=batch_size, targeted=True, norm=2, max_iter=max_iter, max_eval=max_eval,
                         init_eval=init_eval, verbose=False)
    points = torch.empty_like(x)
    queries = torch.zeros(x.shape[0], dtype=torch.int64)
    for i in range(x.shape[0]):  # ART attacks one sample at a time anyway; this attributes queries per sample
        before = oracle.queries
        adv = attack.generate(x[i : i + 1].numpy(), y=np.array([int(target[i])]), x_adv_init=start[i : i + 1].numpy())
        points[i] = torch.from_numpy(adv[0])
        queries[i] = oracle.queries - before
    reached = oracle(points).cpu() == target
    # ART's loop ends with a step *into* the target region, not with HopSkipJump's projection onto the
    # boundary: bisect each segment x -> point once more (our engine, queries counted per sample).
    from db3kd.search import TargetedMisclassification, bisect_segments

    flat_x, flat_p = x.flatten(1), points.flatten(1)
    length = (flat_p - flat_x).norm(dim=1)
    rows = reached.nonzero().squeeze(1)
    distances = length.clone()
    if rows.numel():
        idx = torch.arange(rows.numel())
        used = torch.zeros(rows.numel(), dtype=torch.int64)
        upper, _ = bisect_segments(oracle, flat_x[rows], flat_p[rows], idx, idx, length[rows], torch.zeros(rows.numel()),
                                   length[rows].clone(), idx, rows.numel(), TargetedMisclassification(target[rows]),
                                   tol, used, float("inf"), tuple(x.shape[1:]))
        distances[rows] = upper
        queries[rows] += used
        points[rows] = torch.lerp(x[rows], points[rows], (upper / length[rows].clamp_min(1e-12)).view(-1, 1, 1, 1))
    return HopSkipJumpResult(distances=distances, queries=queries, points=points, reached=reached)
