"""Statistics of a leaderboard: per-method intervals and paired tests between methods (scipy).

Inputs are per-seed student accuracies of one (dataset, profile), ``{method: {seed: accuracy}}``
with accuracies as fractions in [0, 1]. Outputs are in the same units (the leaderboard turns them
into percent).

* :func:`summarize` -- n, mean, sample standard deviation (ddof = 1) and the two-sided 95%
  Student-t confidence interval of the mean, ``mean +- t_{0.975, n-1} * std / sqrt(n)``
  (``scipy.stats.ttest_1samp(...).confidence_interval``). With n = 1 there is no spread: std and
  the interval are NaN, never 0.
* :func:`paired_test` -- methods trained with the same seed form a pair (same subset, same
  initialisation and batch order for the final student, see :mod:`baselines.common`). The test is
  the paired t-test (``scipy.stats.ttest_rel``) on the seeds both methods have; the interval is
  the 95% t interval of the mean paired difference. Fewer than 2 pairs: no test (NaN).
* :func:`holm` -- Holm's step-down adjustment of a family of p-values (Holm 1979): sort the m
  finite p-values ascending, ``p_adj(i) = max_{j <= i} min(1, (m - j + 1) p(j))``. scipy has no
  Holm routine (``scipy.stats.false_discovery_control`` is Benjamini-Hochberg/Yekutieli) and
  statsmodels is not a dependency, hence these few lines.
* :func:`compare_methods` -- every method against ``student-ce`` and ``label-smoothing``: mean
  difference, paired interval, two-sided paired t-test p-value, Holm-corrected within each
  comparison family (all methods against one control).
* :func:`paper_orderings` -- the paper's Table 1 chain (MBD >= BD >= SD > standard KD > surrogate
  KD > student CE > noise logits), each adjacent claim "a above b" with a one-sided paired t-test
  (H1: mean(a - b) > 0), Holm-corrected over the chain.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping

__all__ = [
    "ALPHA",
    "CONTROLS",
    "PAPER_ORDERING",
    "TEST_NAME",
    "Summary",
    "PairedResult",
    "Ordering",
    "summarize",
    "paired_test",
    "holm",
    "per_seed",
    "compare_methods",
    "paper_orderings",
]

#: Significance level of every mark in the tables (after Holm correction).
ALPHA = 0.05
#: The controls every method is tested against (pairs share a seed).
CONTROLS = ("student-ce", "label-smoothing")
#: The paper's Table 1 chain, best first; each adjacent pair is one claim.
#: ``">="`` and ``">"`` are the paper's symbols; both are tested one-sided as "a above b".
PAPER_ORDERING: tuple[tuple[str, str, str], ...] = (
    ("db3kd-mbd", ">=", "db3kd-bd"),
    ("db3kd-bd", ">=", "db3kd-sd"),
    ("db3kd-sd", ">", "standard-kd"),
    ("standard-kd", ">", "surrogate-kd"),
    ("surrogate-kd", ">", "student-ce"),
    ("student-ce", ">", "noise-logits"),
)
TEST_NAME = "paired t-test over shared seeds (scipy.stats.ttest_rel), Holm-corrected"

_NAN = float("nan")


@dataclass(frozen=True)
class Summary:
    """n seeds; mean and sample std (ddof 1) of the accuracies; 95% t interval of the mean (NaN for n < 2)."""

    n: int
    mean: float
    std: float
    ci95_low: float
    ci95_high: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PairedResult:
    """a - b over the seeds both have: n_pairs, mean difference, its 95% t interval, the paired
    t-test's p-value (``alternative``), NaN where fewer than 2 pairs (or zero spread with zero mean)."""

    a: str
    b: str
    n_pairs: int
    mean_diff: float
    ci95_low: float
    ci95_high: float
    p_value: float
    alternative: str = "two-sided"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Ordering:
    """One claim of :data:`PAPER_ORDERING`: ``a relation b``; ``observed``: the means are in the
    claimed order (None when a method has no record); ``p_value``/``p_holm``: one-sided paired
    t-test of mean(a - b) > 0, raw and Holm-corrected over the chain; ``significant``: p_holm < ALPHA."""

    a: str
    relation: str
    b: str
    mean_a: float
    mean_b: float
    n_pairs: int
    mean_diff: float
    observed: bool | None
    p_value: float
    p_holm: float
    significant: bool

    def as_dict(self) -> dict:
        return asdict(self)


def _clean(values: Iterable[float]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def summarize(values: Iterable[float]) -> Summary:
    """:class:`Summary` of per-seed accuracies (fractions). NaN/None entries are dropped.

    n = 0: every field NaN; n = 1: mean only (std and interval NaN: one seed has no spread).
    """
    xs = _clean(values)
    n = len(xs)
    if n == 0:
        return Summary(0, _NAN, _NAN, _NAN, _NAN)
    mean = math.fsum(xs) / n
    if n == 1:
        return Summary(1, mean, _NAN, _NAN, _NAN)
    from scipy import stats

    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    if std == 0.0:
        return Summary(n, mean, 0.0, mean, mean)
    with warnings.catch_warnings():  # nearly equal values: scipy warns about precision, the interval is still right
        warnings.simplefilter("ignore", RuntimeWarning)
        ci = stats.ttest_1samp(xs, 0.0).confidence_interval(0.95)
    return Summary(n, mean, std, float(ci.low), float(ci.high))


def paired_test(a: Mapping[int, float], b: Mapping[int, float], *, alternative: str = "two-sided",
                names: tuple[str, str] = ("a", "b")) -> PairedResult:
    """Paired t-test of ``a - b`` over the seeds both mappings hold (``{seed: accuracy}``).

    alternative: ``two-sided`` | ``greater`` (H1: mean(a - b) > 0) | ``less``. Returns a
    :class:`PairedResult`; the interval is always the two-sided 95% t interval of the mean
    difference. With fewer than 2 pairs there is no test (p NaN). With zero spread of the
    differences: p = 1 when they are all 0, else scipy's limit (0 or 1 by direction).
    """
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be two-sided, greater or less, got {alternative!r}")
    seeds = sorted(s for s in set(a) & set(b)
                   if a[s] is not None and b[s] is not None and math.isfinite(a[s]) and math.isfinite(b[s]))
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    n = len(diffs)
    if n == 0:
        return PairedResult(names[0], names[1], 0, _NAN, _NAN, _NAN, _NAN, alternative)
    mean = math.fsum(diffs) / n
    if n == 1:
        return PairedResult(names[0], names[1], 1, mean, _NAN, _NAN, _NAN, alternative)
    spread = summarize(diffs)
    if spread.std == 0.0:
        if mean == 0.0:
            p = 1.0
        elif alternative == "two-sided":
            p = 0.0
        else:
            p = 0.0 if (mean > 0) == (alternative == "greater") else 1.0
    else:
        from scipy import stats

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            p = float(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds], alternative=alternative).pvalue)
    return PairedResult(names[0], names[1], n, mean, spread.ci95_low, spread.ci95_high, p, alternative)


def holm(pvalues: Iterable[float]) -> list[float]:
    """Holm step-down adjusted p-values, in the input order; NaN entries stay NaN and do not count in m."""
    ps = [float(p) if p is not None else _NAN for p in pvalues]
    finite = sorted((p, i) for i, p in enumerate(ps) if math.isfinite(p))
    m = len(finite)
    out = [_NAN] * len(ps)
    running = 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def per_seed(records: Iterable[dict]) -> dict[str, dict[int, float]]:
    """``{method: {seed: student_accuracy}}`` from run records (records without an accuracy are skipped)."""
    out: dict[str, dict[int, float]] = {}
    for r in records:
        acc = r.get("student_accuracy")
        if acc is None or not math.isfinite(float(acc)):
            continue
        out.setdefault(r["method"], {})[int(r["seed"])] = float(acc)
    return out


def compare_methods(accuracies: Mapping[str, Mapping[int, float]],
                    controls: Iterable[str] = CONTROLS) -> dict[str, dict]:
    """Per method: :func:`summarize` fields plus, for each control c present, ``diff_vs_<c>``
    (a :class:`PairedResult` dict, two-sided) and ``p_vs_<c>`` (its Holm-corrected p-value; the
    family is every other method tested against c). A control's own row has NaN against itself.
    Keys use ``_`` for ``-`` in the control's name (``p_vs_student_ce``)."""
    out: dict[str, dict] = {m: summarize(v.values()).as_dict() for m, v in accuracies.items()}
    for control in controls:
        key = control.replace("-", "_")
        others = [m for m in accuracies if m != control]
        if control not in accuracies:
            for m in accuracies:
                out[m][f"diff_vs_{key}"] = None
                out[m][f"p_vs_{key}"] = _NAN
            continue
        tests = {m: paired_test(accuracies[m], accuracies[control], names=(m, control)) for m in others}
        adjusted = holm(tests[m].p_value for m in others)
        out[control][f"diff_vs_{key}"] = None
        out[control][f"p_vs_{key}"] = _NAN
        for m, p in zip(others, adjusted):
            out[m][f"diff_vs_{key}"] = tests[m].as_dict()
            out[m][f"p_vs_{key}"] = p
    return out


def paper_orderings(accuracies: Mapping[str, Mapping[int, float]],
                    chain: tuple[tuple[str, str, str], ...] = PAPER_ORDERING) -> list[Ordering]:
    """Each claim of ``chain`` checked on these accuracies (see :class:`Ordering`)."""
    tests, rows = [], []
    for a, rel, b in chain:
        if a in accuracies and b in accuracies:
            t = paired_test(accuracies[a], accuracies[b], alternative="greater", names=(a, b))
            ma, mb = summarize(accuracies[a].values()).mean, summarize(accuracies[b].values()).mean
            observed = ma >= mb if rel == ">=" else ma > mb
        else:
            t = PairedResult(a, b, 0, _NAN, _NAN, _NAN, _NAN, "greater")
            ma = summarize(accuracies.get(a, {}).values()).mean
            mb = summarize(accuracies.get(b, {}).values()).mean
            observed = None
        tests.append(t)
        rows.append((a, rel, b, ma, mb, observed))
    adjusted = holm(t.p_value for t in tests)
    return [Ordering(a, rel, b, ma, mb, t.n_pairs, t.mean_diff, observed, t.p_value, p,
                     bool(math.isfinite(p) and p < ALPHA))
            for (a, rel, b, ma, mb, observed), t, p in zip(rows, tests, adjusted)]
