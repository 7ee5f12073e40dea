"""The query engine: exact budgets, criteria, the trusted door, chunks for distribution, estimator=paper."""

from __future__ import annotations

import math

import pytest
import torch

from db3kd import HardLabelOracle
from db3kd.search import (
    Misclassification,
    TargetedMisclassification,
    bisect_segments,
    boundary_distance,
    boundary_search,
    minimal_boundary_search,
    plan_chunks,
)
from tests.conftest import Linear, centred_points
from tests.test_robustness import exact_plane_distance, setup_binary


def test_criteria():
    labels = torch.tensor([0, 1, 2, 1])
    assert TargetedMisclassification(torch.tensor([0, 0, 2, 2]))(labels).tolist() == [True, False, True, False]
    assert Misclassification(torch.tensor([0, 0, 2, 2]))(labels).tolist() == [False, True, False, True]
    sub = TargetedMisclassification(torch.tensor([0, 1, 2, 3]))[torch.tensor([3, 1])]
    assert sub.classes.tolist() == [3, 1] and sub(torch.tensor([3, 0])).tolist() == [True, False]
    # (A, Q) labels are judged against each row's class
    assert Misclassification(torch.tensor([1, 2]))(torch.tensor([[1, 2], [2, 2]])).tolist() == [[False, True], [False, False]]


class _Plane(torch.nn.Module):
    """Class 1 where the first pixel is above ``c``."""

    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x):
        v = x.flatten(1)[:, :1] - self.c
        return torch.cat([-v, v], dim=1)


def test_float32_bisection_needs_extra_rounds_and_never_exceeds_its_budget():
    """Hammer: segments whose length is a power of two times tol (plus an ulp or so). In float32 the
    bracket sometimes needs one more halving than ceil(log2(length / tol)); with that count as the
    budget, no group may spend more."""
    tol = 1e-4
    g = torch.Generator().manual_seed(0)
    k = 2000
    power = torch.randint(3, 14, (k,), generator=g).float()
    length = (tol * 2.0**power * (1 + torch.rand(k, generator=g) * 1e-6)).clamp(max=0.999)
    crossing = torch.rand(k, generator=g) * length
    # one shared plane (first pixel = c); row k's segment runs along the first pixel and crosses it at crossing[k]
    c = 0.5
    start, end = torch.zeros(k, 4), torch.zeros(k, 4)
    idx = torch.arange(k)
    rounds_needed = torch.ceil(torch.log2(length / tol)).long()
    start[:, 0] = c - crossing
    end[:, 0] = start[:, 0] + length
    oracle = HardLabelOracle(_Plane(c))
    unlimited = torch.zeros(k, dtype=torch.int64)
    upper, _ = bisect_segments(oracle, start, end, idx, idx, length, torch.zeros(k), length.clone(), idx, k,
                               TargetedMisclassification(torch.ones(k, dtype=torch.int64)), tol, unlimited, math.inf,
                               (1, 2, 2))
    assert bool((unlimited > rounds_needed).any()), "no row needed an extra round: the hammer lost its edge"
    capped = torch.zeros(k, dtype=torch.int64)
    before = oracle.queries
    upper_c, _ = bisect_segments(oracle, start, end, idx, idx, length, torch.zeros(k), length.clone(), idx, k,
                                 TargetedMisclassification(torch.ones(k, dtype=torch.int64)), tol, capped,
                                 rounds_needed.float(), (1, 2, 2))
    assert bool((capped <= rounds_needed).all())
    assert int(capped.sum()) == oracle.queries - before  # exact accounting
    assert bool((upper_c >= crossing - 1e-6).all())  # still points that hit


@pytest.mark.parametrize("estimator", ["tangent", "sign-opt", "hsja", "paper"])
def test_mbd_never_exceeds_a_pair_budget(binary_linear, estimator):
    """Many budgets, small tolerances: no pair ever spends more than its budget, and every query is counted."""
    model, w, c, x, y, refs, ref_labels = setup_binary(binary_linear, n=12)
    for budget in (25, 31, 47, 64, 90, 133):
        oracle = HardLabelOracle(model)
        res = minimal_boundary_search(oracle, x, y, refs, ref_labels, 2, budget=budget, num_directions=6, tol=1e-6,
                                      estimator=estimator, seed=budget)
        assert int(res.queries.max()) <= budget, (budget, int(res.queries.max()))
        assert res.total_queries == oracle.queries


def test_walk_enforces_the_budget_even_when_its_cost_prediction_is_wrong(binary_linear, monkeypatch):
    """The prediction Q (+ geo's line search) + 1 + ceil(log2(r / tol)) only decides whether a pair starts an
    iteration. With a prediction that ignores the bisection entirely (it keeps the iteration's fixed cost:
    the estimator's probes and the test query), pairs start iterations they cannot finish: the bisection
    must still stop each pair at its budget, and every query must be counted."""
    import db3kd.search.walk as walk

    def fixed_cost_only(r, cfg):
        return torch.full_like(r, cfg.num_directions + 1 + (walk.PENCIL_STEPS if cfg.estimator == "geo" else 0)).long()

    monkeypatch.setattr(walk, "predicted_cost", fixed_cost_only)
    model, w, c, x, y, refs, ref_labels = setup_binary(binary_linear, n=12)
    for budget in (40, 77, 150):
        for estimator in ("geo", "tangent"):
            oracle = HardLabelOracle(model)
            res = minimal_boundary_search(oracle, x, y, refs, ref_labels, 2, budget=budget, num_directions=6, tol=1e-6,
                                          estimator=estimator)
            assert int(res.queries.max()) == budget, estimator  # the walk ran into the budget ...
            assert res.total_queries == oracle.queries  # ... and no query went uncounted


def test_paper_estimator_walks_towards_the_plane(binary_linear):
    model, w, c, x, y, refs, ref_labels = setup_binary(binary_linear, n=10)
    idx, other = torch.arange(x.shape[0]), 1 - y
    bd = boundary_distance(HardLabelOracle(model), x, y, refs, ref_labels, 2, tol=1e-5)[idx, other]
    res = minimal_boundary_search(HardLabelOracle(model), x, y, refs, ref_labels, 2, budget=2000, num_directions=50,
                                  tol=1e-5, estimator="paper", xi_d=0.02)
    exact = exact_plane_distance(x, w, c)
    mbd = res.distances[idx, other]
    assert (mbd >= exact - 1e-5).all() and (mbd <= bd + 1e-7).all()
    assert float((mbd - exact).sum()) < 0.7 * float((bd - exact).sum())  # it moved towards the plane


class _DoorCounter(HardLabelOracle):
    """Counts calls through the validating door and through the trusted path."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.validated_calls = 0
        self.trusted_calls = 0

    def __call__(self, x):
        self.validated_calls += 1
        return super().__call__(x)

    def _answer_trusted(self, x):
        self.trusted_calls += 1
        return super()._answer_trusted(x)


def test_caller_images_are_validated_and_probes_take_the_trusted_path(binary_linear):
    model, w, c, x, y, refs, ref_labels = setup_binary(binary_linear, n=8)
    oracle = _DoorCounter(model)
    res = minimal_boundary_search(oracle, x, y, refs, ref_labels, 2, budget=200, num_directions=10)
    assert oracle.validated_calls == 2  # the references and the samples, once each
    assert oracle.trusted_calls > 10 and res.total_queries == oracle.queries
    bad = x.clone()
    bad[0, 0, 0, 0] = 1.5
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        minimal_boundary_search(_DoorCounter(model), bad, y, refs, ref_labels, 2, budget=200, num_directions=10)


def test_oracle_calls_do_not_grow_with_the_number_of_pairs(binary_linear):
    """No loop over pairs inside an iteration: an Eq. 4 estimate is one oracle call for 2 or 40 pairs,
    and BD on three copies of the samples makes as many oracle calls as on one copy."""
    from db3kd.search import PairKeys, Stream, sign_gradient

    model, *_ = binary_linear
    for a in (2, 40):
        oracle = _DoorCounter(model)
        xb, x0 = centred_points(a).flatten(1), centred_points(a, seed=5).flatten(1)
        r = (xb - x0).norm(dim=1)
        signs, block = PairKeys.of(Stream.MBD, 0, torch.arange(a), torch.zeros(a, dtype=torch.int64)).directions(
            None, 1, 4, 16)
        sign_gradient(oracle, xb, r, TargetedMisclassification(torch.ones(a, dtype=torch.int64)), signs, block,
                      "tangent", 0.01, (1, 4, 4), origin=x0)
        assert oracle.trusted_calls == 1 and oracle.queries == 4 * a
    calls = []
    x, refs = centred_points(4), centred_points(6, seed=2)
    for copies in (1, 3):
        xs = x.repeat(copies, 1, 1, 1)
        oracle = _DoorCounter(model)
        boundary_search(oracle, xs, model(xs).argmax(1), refs, model(refs).argmax(1), 2, chunk_size=64)
        calls.append(oracle.trusted_calls)
    assert calls[0] == calls[1], calls


def test_plan_chunks():
    assert plan_chunks(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert plan_chunks(0, 4) == []
    with pytest.raises(ValueError, match="chunk_size"):
        plan_chunks(3, 0)


def _three_class():
    g = torch.Generator().manual_seed(5)
    model = Linear(torch.randn(3, 16, generator=g), torch.zeros(3))
    x = centred_points(14, seed=3, spread=0.8)
    refs = centred_points(12, seed=4, spread=0.8)
    return model, x, model(x).argmax(1), refs, model(refs).argmax(1)


@pytest.mark.parametrize("search", ["bd", "mbd"])
def test_chunks_computed_by_separate_workers_assemble_to_the_single_process_result(tmp_path, search):
    model, x, y, refs, ref_labels = _three_class()
    kwargs = dict(chunk_size=4, tol=1e-4)
    if search == "mbd":
        kwargs.update(budget=150, num_directions=8, seed=2)
    run = boundary_search if search == "bd" else minimal_boundary_search
    single = run(HardLabelOracle(model), x, y, refs, ref_labels, 3, **kwargs)
    plan = plan_chunks(x.shape[0], 4)
    workers = [HardLabelOracle(model), HardLabelOracle(model)]
    spent = [run(workers[0], x, y, refs, ref_labels, 3, checkpoint_dir=tmp_path, chunks=[2, 0], **kwargs),
             run(workers[1], x, y, refs, ref_labels, 3, checkpoint_dir=tmp_path, chunks=[1, 3, 0], **kwargs)]
    assert spent == [w.queries for w in workers]
    assert len(list(tmp_path.glob("chunk*.pt"))) == len(plan)
    assembler = HardLabelOracle(model)
    merged = run(assembler, x, y, refs, ref_labels, 3, checkpoint_dir=tmp_path, **kwargs)
    assert assembler.queries == 0  # everything was on disk
    assert torch.equal(merged.distances, single.distances) and torch.equal(merged.queries, single.queries)
    assert merged.total_queries == single.total_queries
    # the shared answers are the same bytes whichever process wrote them
    other = tmp_path / "other"
    run(HardLabelOracle(model), x, y, refs, ref_labels, 3, checkpoint_dir=other, chunks=[], **kwargs)
    assert (other / "shared.pt").read_bytes() == (tmp_path / "shared.pt").read_bytes()


def test_chunks_need_a_checkpoint_dir_and_valid_indices(tmp_path):
    model, x, y, refs, ref_labels = _three_class()
    with pytest.raises(ValueError, match="checkpoint_dir"):
        boundary_search(HardLabelOracle(model), x, y, refs, ref_labels, 3, chunks=[0])
    with pytest.raises(ValueError, match="outside plan_chunks"):
        boundary_search(HardLabelOracle(model), x, y, refs, ref_labels, 3, chunks=[99], checkpoint_dir=tmp_path)


def test_mbd_results_do_not_depend_on_chunk_size_with_three_classes():
    model, x, y, refs, ref_labels = _three_class()
    kwargs = dict(budget=200, num_directions=8, seed=1, tol=1e-4)
    a = minimal_boundary_search(HardLabelOracle(model), x, y, refs, ref_labels, 3, chunk_size=14, **kwargs)
    b = minimal_boundary_search(HardLabelOracle(model), x, y, refs, ref_labels, 3, chunk_size=3, **kwargs)
    assert torch.equal(a.distances, b.distances) and torch.equal(a.queries, b.queries)
    assert torch.equal(a.distances_at, b.distances_at)
