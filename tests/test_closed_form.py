"""MBD estimators against teachers whose minimal boundary distances are exact in closed form (784 pixels).

The table these tests check (mean reached / exact at 500, 1,000, 2,000 and 5,000 queries per pair, every
estimator, both teachers) is written by ``uv run pytest benchmarks -m perf`` to results/performance.md.
"""

from __future__ import annotations

import pytest

from db3kd.search import ESTIMATORS
from db3kd.search.closed_form import ball_problem, linear_problem, ratio_table
from db3kd.search.walk import WalkConfig

BUDGETS = (500, 1000, 2000, 5000)
PROBLEMS = {"linear": linear_problem, "ball": ball_problem}


@pytest.fixture(scope="module")
def tables():
    out = {}
    for name, make in PROBLEMS.items():
        problem = make(n=8)
        out[name] = {est: ratio_table(problem, est, BUDGETS) for est in ESTIMATORS}
    return out


def test_the_default_estimator_is_geo():
    from db3kd.methods.decision_based import MBDParams

    assert ESTIMATORS[0] == "geo" and WalkConfig(200, 0.2, 0.01, 1e-5).estimator == "geo"
    assert MBDParams().estimator == "geo"


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_every_estimator_stays_above_the_exact_distance_within_budget(tables, problem, estimator):
    t = tables[problem][estimator]
    assert t["queries_exact"] and t["max_pair_queries"] <= BUDGETS[-1]
    # every reported distance belongs to a point the teacher labels the target: never below the minimum
    assert min(t["min_ratio"].values()) >= 1 - 1e-4, t
    ratios = [t["ratio"][b] for b in BUDGETS]
    assert all(later <= earlier + 1e-6 for earlier, later in zip(ratios, ratios[1:])), ratios


@pytest.mark.parametrize("problem", PROBLEMS)
def test_geo_is_within_10_percent_at_2000_queries_and_2_percent_at_5000(tables, problem):
    ratio = tables[problem]["geo"]["ratio"]
    assert ratio[2000] <= 1.10, ratio
    assert ratio[5000] <= 1.02, ratio


@pytest.mark.parametrize("problem", PROBLEMS)
def test_geo_is_closer_than_every_other_estimator_from_2000_queries(tables, problem):
    for budget in (2000, 5000):
        geo = tables[problem]["geo"]["ratio"][budget]
        others = {e: tables[problem][e]["ratio"][budget] for e in ESTIMATORS if e != "geo"}
        assert all(geo < v for v in others.values()), (budget, geo, others)


def test_exact_distances_are_what_the_teachers_say():
    """The closed forms themselves: the exact minimal point is labelled the other class, a hair short is not."""
    import torch

    for make in PROBLEMS.values():
        p = make(n=4)
        assert bool((p.y == 0).all()) and bool((p.ref_labels == 1).all())
        if p.name == "linear":
            normal = p.teacher.w.view(1, -1).expand(4, -1)
        else:
            normal = p.teacher.centre.view(1, -1) - p.x.flatten(1)
        normal = normal / normal.norm(dim=1, keepdim=True)
        for scale, label in ((1 + 1e-4, 1), (1 - 1e-4, 0)):
            point = p.x.flatten(1) + (scale * p.exact).unsqueeze(1) * normal
            assert bool((point >= 0).all() and (point <= 1).all())  # the box does not bind
            assert bool((p.teacher(point.view(p.x.shape)).argmax(1) == label).all())


def test_code_version_ignores_presentation_modules_only(tmp_path, monkeypatch):
    """A finished case is reused after an edit to a table or plot module, never after one to code
    it runs: an engine edit reruns the methods that use the engine, a ZSKT edit only ZSKT, a runner
    edit everything."""
    import shutil
    from pathlib import Path

    import baselines
    import db3kd
    from db3kd import runner

    root = Path(db3kd.__file__).resolve().parent
    assert all((root.parent / m).is_file() for m in runner.PRESENTATION_MODULES)
    for package in (db3kd, baselines):
        copy = tmp_path / package.__name__
        shutil.copytree(Path(package.__file__).resolve().parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
        monkeypatch.setattr(package, "__file__", str(copy / "__init__.py"))

    def versions():
        runner._imports.cache_clear()
        return {m: runner.code_version.__wrapped__(m) for m in (None, "student-ce", "zskt", "db3kd-mbd", "zsdb3kd")}

    def edit(rel):
        path = tmp_path / rel
        path.write_text(path.read_text() + "\n# an edit\n")

    before = versions()
    assert len(set(before.values())) == len(before)
    edit("db3kd/plots.py")
    assert versions() == before
    edit("db3kd/search/walk.py")  # the query engine
    after = versions()
    assert [m for m in before if after[m] != before[m]] == [None, "db3kd-mbd", "zsdb3kd"]
    edit("baselines/zskt.py")
    again = versions()
    assert [m for m in after if again[m] != after[m]] == [None, "zskt"]
    edit("db3kd/training.py")  # the shared core
    last = versions()
    assert all(last[m] != again[m] for m in last)

