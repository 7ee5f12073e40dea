"""db3kd.stats on hand-checkable numbers (closed forms of the t distribution with 2 degrees of freedom)."""

from __future__ import annotations

import math

import pytest

from db3kd import stats

T975_DF2 = 4.302652729749464  # t_{0.975, 2}


def _t2_cdf(t: float) -> float:
    """Student t CDF with 2 degrees of freedom: 1/2 + t / (2 sqrt(2 + t^2)) (closed form)."""
    return 0.5 + t / (2.0 * math.sqrt(2.0 + t * t))


def test_summary_mean_sample_std_and_t_interval():
    s = stats.summarize([0.80, 0.82, 0.84])
    assert s.n == 3 and s.mean == pytest.approx(0.82) and s.std == pytest.approx(0.02)
    half = T975_DF2 * 0.02 / math.sqrt(3)
    assert (s.ci95_low, s.ci95_high) == pytest.approx((0.82 - half, 0.82 + half))


def test_one_seed_has_no_spread_and_no_interval():
    s = stats.summarize([0.9])
    assert s.n == 1 and s.mean == 0.9
    assert math.isnan(s.std) and math.isnan(s.ci95_low) and math.isnan(s.ci95_high)
    assert stats.summarize([]).n == 0 and math.isnan(stats.summarize([None, float("nan")]).mean)


def test_paired_t_test_matches_the_closed_form():
    a = {0: 0.90, 1: 0.92, 2: 0.95, 7: 0.5}  # seed 7 has no partner: not a pair
    b = {0: 0.88, 1: 0.91, 2: 0.92}
    r = stats.paired_test(a, b, names=("a", "b"))
    # differences 0.02, 0.01, 0.03: mean 0.02, std 0.01, t = 0.02 / (0.01 / sqrt 3) = 2 sqrt 3
    t = 2 * math.sqrt(3)
    assert r.n_pairs == 3 and r.mean_diff == pytest.approx(0.02)
    assert r.p_value == pytest.approx(2 * (1 - _t2_cdf(t)))  # 0.07418
    half = T975_DF2 * 0.01 / math.sqrt(3)
    assert (r.ci95_low, r.ci95_high) == pytest.approx((0.02 - half, 0.02 + half))
    greater = stats.paired_test(a, b, alternative="greater")
    assert greater.p_value == pytest.approx(1 - _t2_cdf(t))  # one-sided: half of it
    less = stats.paired_test(a, b, alternative="less")
    assert less.p_value == pytest.approx(_t2_cdf(t))
    # scipy agrees on a case with 4 pairs too
    from scipy.stats import ttest_rel

    x, y = {i: v for i, v in enumerate([0.1, 0.4, 0.3, 0.35])}, {i: v for i, v in enumerate([0.2, 0.1, 0.25, 0.3])}
    assert stats.paired_test(x, y).p_value == pytest.approx(ttest_rel(list(x.values()), list(y.values())).pvalue)


def test_paired_test_edge_cases():
    one = stats.paired_test({0: 0.9}, {0: 0.8})
    assert one.n_pairs == 1 and one.mean_diff == pytest.approx(0.1) and math.isnan(one.p_value)
    assert math.isnan(one.ci95_low)
    assert stats.paired_test({0: 0.9}, {1: 0.8}).n_pairs == 0
    same = stats.paired_test({0: 0.9, 1: 0.8}, {0: 0.9, 1: 0.8})
    assert same.p_value == 1.0 and same.mean_diff == 0.0
    shifted = stats.paired_test({0: 0.75, 1: 0.5}, {0: 0.5, 1: 0.25}, alternative="greater")  # exact in binary
    assert shifted.p_value == 0.0
    with pytest.raises(ValueError, match="alternative"):
        stats.paired_test({}, {}, alternative="bigger")


def test_holm_step_down():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adj = stats.holm([0.02, float("nan"), 0.5])
    assert adj[0] == pytest.approx(0.04) and math.isnan(adj[1]) and adj[2] == pytest.approx(0.5)
    assert stats.holm([0.9, 0.8]) == [1.0, 1.0]  # capped at 1
    assert stats.holm([]) == []


def test_compare_methods_holm_within_each_control_family():
    acc = {
        "student-ce": {0: 0.88, 1: 0.91, 2: 0.92},
        "label-smoothing": {0: 0.89, 1: 0.91, 2: 0.93},
        "good": {0: 0.90, 1: 0.92, 2: 0.95},
        "single": {0: 0.99},
    }
    out = stats.compare_methods(acc)
    assert math.isnan(out["student-ce"]["p_vs_student_ce"]) and out["student-ce"]["diff_vs_student_ce"] is None
    # family vs student-ce: label-smoothing, good, single (no test: NaN, not counted)
    raw_ls = stats.paired_test(acc["label-smoothing"], acc["student-ce"]).p_value
    raw_good = stats.paired_test(acc["good"], acc["student-ce"]).p_value
    assert raw_good == pytest.approx(2 * (1 - _t2_cdf(2 * math.sqrt(3))))
    expected = stats.holm([raw_ls, raw_good])
    assert out["label-smoothing"]["p_vs_student_ce"] == pytest.approx(expected[0])
    assert out["good"]["p_vs_student_ce"] == pytest.approx(expected[1])
    assert math.isnan(out["single"]["p_vs_student_ce"]) and out["single"]["diff_vs_student_ce"]["n_pairs"] == 1
    assert out["good"]["diff_vs_student_ce"]["mean_diff"] == pytest.approx(0.02)
    assert out["good"]["n"] == 3 and out["single"]["n"] == 1 and math.isnan(out["single"]["std"])
    # without a label-smoothing record: NaN, no crash
    del acc["label-smoothing"]
    assert math.isnan(stats.compare_methods(acc)["good"]["p_vs_label_smoothing"])


def test_paper_orderings_one_sided_and_missing_methods():
    acc = {
        "db3kd-mbd": {0: 0.90, 1: 0.92, 2: 0.95},
        "db3kd-bd": {0: 0.88, 1: 0.91, 2: 0.92},
        "db3kd-sd": {0: 0.95, 1: 0.96, 2: 0.97},
    }
    rows = {(o.a, o.b): o for o in stats.paper_orderings(acc)}
    mbd_bd = rows[("db3kd-mbd", "db3kd-bd")]
    assert mbd_bd.observed is True and mbd_bd.n_pairs == 3
    assert mbd_bd.p_value == pytest.approx(1 - _t2_cdf(2 * math.sqrt(3)))
    bd_sd = rows[("db3kd-bd", "db3kd-sd")]
    assert bd_sd.observed is False and bd_sd.p_value > 0.5
    # Holm over the two testable claims
    assert mbd_bd.p_holm == pytest.approx(stats.holm([mbd_bd.p_value, bd_sd.p_value])[0])
    missing = rows[("standard-kd", "surrogate-kd")]
    assert missing.observed is None and missing.n_pairs == 0 and math.isnan(missing.p_value) and not missing.significant
    assert len(rows) == len(stats.PAPER_ORDERING)
