"""SD, BD and MBD against classifiers whose distances are known in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from db3kd import HardLabelOracle
from db3kd.robustness import (
    boundary_distance,
    boundary_search,
    minimal_boundary_distance,
    minimal_boundary_search,
    sample_distance,
)
from tests.conftest import Linear, centred_points


def exact_plane_distance(x, w, c):
    return (x.flatten(1) @ w - c).abs()


def exact_segment_crossing(x0, ref, w, c):
    """Distance from x0 along x0 -> ref to the plane w.x = c (a single crossing)."""
    a, b = float(x0.flatten() @ w - c), float(ref.flatten() @ w - c)
    t = a / (a - b)
    return t * float((ref - x0).norm())


def setup_binary(binary_linear, n=40):
    model, w, c = binary_linear
    x = centred_points(n)
    y = model(x).argmax(1)
    refs = centred_points(30, seed=2)
    ref_labels = model(refs).argmax(1)
    return model, w, c, x, y, refs, ref_labels


def test_sample_distance_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    x, refs = torch.rand(13, 1, 3, 3, generator=g), torch.rand(21, 1, 3, 3, generator=g)
    y, ref_labels = torch.randint(0, 4, (13,), generator=g), torch.randint(0, 4, (21,), generator=g)
    ref_labels[ref_labels == 3] = 2  # class 3 has no reference -> inf
    r = sample_distance(x, y, refs, ref_labels, 4, chunk_size=5)
    for i in range(13):
        for n in range(4):
            d = [float((refs[j] - x[i]).norm()) for j in range(21) if ref_labels[j] == n]
            expected = math.inf if (n == y[i] or not d) else min(d)
            assert r[i, n].item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_boundary_distance_equals_exact_crossing_within_tolerance(binary_linear):
    model, w, c, x, y, refs, ref_labels = setup_binary(binary_linear)
    tol = 1e-5
    res = boundary_search(HardLabelOracle(model), x, y, refs, ref_labels, 2, tol=tol, chunk_size=7)
    for i in range(x.shape[0]):
        n = 1 - int(y[i])
        crossings = [exact_segment_crossing(x[i], refs[j], w, c) for j in range(30) if ref_labels[j] == n]
        got = res.distances[i, n].item()
        assert min(crossings) - 1e-6 <= got <= min(crossings) + tol + 1e-5
        assert math.isinf(res.distances[i, y[i]].item())


def test_boundary_distance_spends_far_fewer_queries_than_per_reference_bisection(binary_linear):
    model, w, c, x, y, refs, ref_labels = setup_binary(binary_linear)
    oracle = HardLabelOracle(model)
    res = boundary_search(oracle, x, y, refs, ref_labels, 2, tol=1e-5)
    # per-reference bisection: ceil(log2(length / tol)) queries for every (sample, other-class reference)
    naive = 0
    for i in range(x.shape[0]):
        for j in range(30):
            if ref_labels[j] != y[i]:
                naive += math.ceil(math.log2(float((refs[j] - x[i]).norm()) / 1e-5))
    assert res.total_queries == oracle.queries
    assert res.queries.sum() * 3 <= naive


def test_queries_are_accounted_exactly(binary_linear):
    model, w, c, x, y, refs, ref_labels = setup_binary(binary_linear)
    oracle = HardLabelOracle(model)
    res = minimal_boundary_search(oracle, x, y, refs, ref_labels, 2, budget=400, num_directions=20)
    assert res.total_queries == oracle.queries
    assert res.shared_queries == x.shape[0] + refs.shape[0]
    assert int(res.queries.max()) <= 400


def test_mbd_reaches_the_exact_minimal_distance(binary_linear):
    model, w, c, x, y, refs, ref_labels = setup_binary(binary_linear, n=20)
    oracle = HardLabelOracle(model)
    bd = boundary_distance(HardLabelOracle(model), x, y, refs, ref_labels, 2, tol=1e-5)
    res = minimal_boundary_search(oracle, x, y, refs, ref_labels, 2, budget=3000, num_directions=100, tol=1e-5)
    exact = exact_plane_distance(x, w, c)
    idx = torch.arange(x.shape[0])
    other = 1 - y
    mbd = res.distances[idx, other]
    assert (mbd >= exact - 1e-5).all()  # never below the true minimum: every value is a labelled point
    assert (mbd <= bd[idx, other] + 1e-7).all()  # never worse than BD
    # stated tolerance: within 2% of the exact distance (or 2e-3 absolute) at 3000 queries per pair
    assert ((mbd - exact) <= torch.maximum(0.02 * exact, torch.tensor(2e-3))).all()
    # milestones are monotone and end at the final distance
    at = res.distances_at[:, idx, other]
    assert (at[1:] <= at[:-1] + 1e-7).all()
    assert torch.equal(at[-1], mbd)


def test_results_do_not_depend_on_batch_mates(binary_linear):
    model, w, c, x, y, refs, ref_labels = setup_binary(binary_linear, n=12)
    kwargs = dict(budget=300, num_directions=16, seed=3)
    together = minimal_boundary_search(HardLabelOracle(model), x, y, refs, ref_labels, 2, chunk_size=12, **kwargs)
    chunked = minimal_boundary_search(HardLabelOracle(model), x, y, refs, ref_labels, 2, chunk_size=5, **kwargs)
    assert torch.equal(together.distances, chunked.distances)
    assert torch.equal(together.queries, chunked.queries)
    bd1 = boundary_search(HardLabelOracle(model), x, y, refs, ref_labels, 2, chunk_size=12)
    bd2 = boundary_search(HardLabelOracle(model), x, y, refs, ref_labels, 2, chunk_size=1)
    assert torch.equal(bd1.distances, bd2.distances) and torch.equal(bd1.queries, bd2.queries)


def test_per_pair_budget_is_respected_by_bd(binary_linear):
    model, w, c, x, y, refs, ref_labels = setup_binary(binary_linear)
    res = boundary_search(HardLabelOracle(model), x, y, refs, ref_labels, 2, budget=15)
    assert int(res.queries.max()) <= 15
    sd = sample_distance(x, y, refs, ref_labels, 2)
    finite = torch.isfinite(res.distances)
    assert (res.distances[finite] <= sd[finite] + 1e-6).all()  # still a valid upper bound


def test_misclassified_samples_and_unusable_references():
    """Three classes along one axis; the teacher mislabels a sample and a reference."""
    # class = argmax of (-(x-0.2)^2, -(x-0.5)^2, -(x-0.8)^2) on the mean pixel: boundaries at 0.35 and 0.65
    w = torch.tensor([[0.4], [1.0], [1.6]])
    b = torch.tensor([-0.04, -0.25, -0.64])

    class Axis(torch.nn.Module):
        def forward(self, x):
            m = x.flatten(1).mean(1, keepdim=True)
            return m @ w.T + b

    x = torch.tensor([0.2, 0.3, 0.45]).view(3, 1, 1, 1)
    y = torch.tensor([0, 0, 0])  # the third is labelled 0 but the teacher says 1
    refs = torch.tensor([0.5, 0.8, 0.6, 0.9]).view(4, 1, 1, 1)
    ref_labels = torch.tensor([1, 2, 2, 1])  # the teacher says 0.6 -> 1 and 0.9 -> 2: two refs unusable
    res = boundary_search(HardLabelOracle(Axis()), x, y, refs, ref_labels, 3, tol=1e-6)
    assert res.misclassified.tolist() == [False, False, True]
    assert res.distances[2, 1].item() == 0.0  # already in class 1's region
    assert res.distances[0, 1].item() == pytest.approx(0.15, abs=1e-5)
    assert res.distances[0, 2].item() == pytest.approx(0.45, abs=1e-5)  # only ref 0.8 is usable for class 2
    assert res.shared_queries == 7


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(x=torch.rand(2, 4)), "x must be"),
        (dict(y=torch.tensor([0, 1, 2])), "y must have shape"),
        (dict(y=torch.tensor([0, 5])), r"y must lie in \[0, 1\]"),
        (dict(refs=torch.rand(3, 1, 2, 2)), "image shape"),
    ],
)
def test_bad_input(binary_linear, bad, message):
    model, *_ = binary_linear
    args = dict(x=centred_points(2), y=torch.tensor([0, 1]), refs=centred_points(3), ref_labels=torch.tensor([0, 1, 1]))
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        boundary_distance(HardLabelOracle(model), args["x"], args["y"], args["refs"], args["ref_labels"], 2)


def test_mbd_rejects_a_missing_budget(binary_linear):
    model, *_ = binary_linear
    with pytest.raises(ValueError, match="budget"):
        minimal_boundary_distance(HardLabelOracle(model), centred_points(1), torch.tensor([0]), centred_points(2),
                                  torch.tensor([0, 1]), 2, budget=0)


def test_sign_opt_estimator_also_walks_to_the_plane(binary_linear):
    """The plain Sign-OPT estimator (the comparison baseline) is a working MBD estimator too."""
    model, w, c, x, y, refs, ref_labels = setup_binary(binary_linear, n=10)
    idx, other = torch.arange(x.shape[0]), 1 - y
    bd = boundary_distance(HardLabelOracle(model), x, y, refs, ref_labels, 2, tol=1e-5)[idx, other]
    res = minimal_boundary_search(HardLabelOracle(model), x, y, refs, ref_labels, 2, budget=2000, num_directions=50,
                                  tol=1e-5, estimator="sign-opt")
    exact = exact_plane_distance(x, w, c)
    mbd = res.distances[idx, other]
    assert (mbd >= exact - 1e-5).all() and (mbd <= bd + 1e-7).all()
    # a walk that moved: most of the BD-to-plane gap is closed
    assert float((mbd - exact).sum()) < 0.2 * float((bd - exact).sum())


def test_unknown_estimator_is_refused(binary_linear):
    model, *_ = binary_linear
    with pytest.raises(ValueError, match="unknown MBD estimator .nes.*tangent, sign-opt, hsja"):
        minimal_boundary_search(HardLabelOracle(model), centred_points(1), torch.tensor([0]), centred_points(2),
                                torch.tensor([0, 1]), 2, budget=100, estimator="nes")


def test_hopskipjump_cross_check_on_the_linear_teacher(binary_linear):
    """ART's HopSkipJump, fed only labels through our oracle, lands on the same plane as our MBD."""
    pytest.importorskip("art", reason="adversarial-robustness-toolbox (extra 'crosscheck') is not installed")
    from db3kd.crosscheck import hopskipjump_distances

    model, w, c, x, y, refs, ref_labels = setup_binary(binary_linear, n=8)
    idx, other = torch.arange(x.shape[0]), 1 - y
    ours = minimal_boundary_search(HardLabelOracle(model), x, y, refs, ref_labels, 2, budget=1500, num_directions=50,
                                   tol=1e-5)
    oracle = HardLabelOracle(model)
    start = torch.stack([refs[(ref_labels == int(t)).nonzero()[0, 0]] for t in other])  # a reference of class `other`
    before = oracle.queries
    hsja = hopskipjump_distances(oracle, x, other, start, num_classes=2, max_iter=20, max_eval=200, init_eval=50)
    exact = exact_plane_distance(x, w, c)
    assert oracle.queries > before  # every HopSkipJump query went through our oracle and was counted
    assert (hsja.distances >= exact - 1e-4).all()
    assert torch.allclose(hsja.distances, exact, rtol=0.05, atol=2e-3)
    assert torch.allclose(ours.distances[idx, other], exact, rtol=0.05, atol=2e-3)
