"""The accuracy-versus-queries frontier (db3kd.plots.frontier) from fake records, and its leaderboard link."""

from __future__ import annotations

import pytest

from db3kd import leaderboard as lb
from db3kd import plots
from db3kd import records as rec
from tests.test_leaderboard import PNG, make_record


def _vote(seed, acc):
    r = make_record("vote-kd", seed, acc, qps=52.0)
    r["config"]["method_params"] = {"votes": 50, "milestones": [10, 20, 50]}
    r["milestone_accuracy"] = {"10": acc - 0.04, "20": acc - 0.02}
    r["tables"] = {"milestone_queries_per_sample": {"10": 12.0, "20": 22.0, "50": 52.0}}
    return r


def fake_records():
    recs = [_vote(0, 0.90), _vote(1, 0.92)]
    mbd = make_record("db3kd-mbd", 0, 0.95, qps=3300.0, milestones={"60": 0.93, "120": 0.95})
    mbd["tables"] = {"milestone_queries_per_sample": {"60": 1800.0, "120": 3300.0}}
    bd = make_record("db3kd-bd", 0, 0.94, qps=670.0)
    bd["config"]["method_params"] = {"tol": 1e-4}
    hard = make_record("hard-label-kd", 0, 0.88, qps=1.0)
    hard["config"]["method_params"] = {}
    scores = make_record("standard-kd", 0, 0.97, qps=1.0)
    scores["teacher_access"] = "scores"  # not label-only: not on the frontier
    ce = make_record("student-ce", 0, 0.89, qps=0.0, reference_row=True)
    ce["teacher_access"] = "none"
    return recs + [mbd, bd, hard, scores, ce]


def test_frontier_points_cover_every_label_only_variant():
    pts = plots.frontier_points(fake_records())
    assert set(pts) == {("vote-kd", "K=10"), ("vote-kd", "K=20"), ("vote-kd", "K=50"), ("db3kd-mbd", "60/pair"),
                        ("db3kd-mbd", "120/pair"), ("db3kd-bd", "final"), ("hard-label-kd", "final")}
    k10 = pts[("vote-kd", "K=10")]
    assert k10["x"] == 12.0 and k10["n"] == 2 and k10["acc"] == pytest.approx([86.0, 88.0])
    assert pts[("vote-kd", "K=50")]["x"] == 52.0 and pts[("vote-kd", "K=50")]["acc"] == pytest.approx([90.0, 92.0])
    assert pts[("db3kd-mbd", "60/pair")]["x"] == 1800.0
    assert pts[("db3kd-mbd", "120/pair")]["acc"] == pytest.approx([95.0])  # the final student, counted once
    assert pts[("hard-label-kd", "final")]["x"] == 1.0


def test_frontier_is_written_by_the_leaderboard_and_linked(tmp_path):
    root = tmp_path / "results"
    for r in fake_records():
        rec.write_record(r, root)
    written = lb.write_all(root)
    png = root / "mnist" / "smoke-frontier.png"
    assert png in written and png.read_bytes()[:8] == PNG
    assert "![smoke-frontier](smoke-frontier.png)" in (root / "mnist" / "smoke.md").read_text()


def test_no_label_only_record_no_frontier(tmp_path):
    ce = make_record("student-ce", 0, 0.89, qps=0.0)
    ce["teacher_access"] = "none"
    assert plots.frontier([ce], tmp_path / "f.png") is None and not (tmp_path / "f.png").exists()


def test_legend_says_one_seed(monkeypatch, tmp_path):
    labels = []
    import matplotlib.axes

    original = matplotlib.axes.Axes.errorbar

    def spy(self, *args, **kwargs):
        labels.append(kwargs.get("label"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", spy)
    plots.frontier(fake_records(), tmp_path / "f.png")
    assert "vote-kd (mean ± std over 2 seeds)" in labels
    assert "db3kd-bd (1 seed)" in labels and "hard-label-kd (1 seed)" in labels
