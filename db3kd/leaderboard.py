"""Leaderboards and regression gates, generated from run records only (:mod:`db3kd.records`).

Tables, per (dataset, profile), written by :func:`write_group` / :func:`write_all`::

    results/<dataset>/<profile>.md     (tabulate, GitHub markdown, with a provenance header)
    results/<dataset>/<profile>.csv    (pandas, machine-readable numbers)
    results/<dataset>/<profile>.tex    (pandas to_latex)
    results/<dataset>/configs/<config_hash>.json   (the exact resolved config of every cell)
    results/<dataset>/<profile>-accuracy-vs-queries.png, <profile>-mbd-heatmap.png  (db3kd.plots)

One row per (method, variant) (a variant other than ``default`` is keyed ``method@variant``; the
``variant`` column says what it changes from the default, ``tau05: tau=0.5``), grouped by teacher access (none, labels, scores, white box) and data (full,
few-shot, none), one markdown table per group; within a group reference rows (``reference_row=True``,
e.g. teacher / student cross-entropy) first, then by mean student accuracy, best first. Accuracies
are percentages of the test split; ``accuracy kind`` says which student is scored (``final``: the
last epoch, no model selection on the test set). Statistics come from :mod:`db3kd.stats`: mean,
sample std and 95% t interval per method, paired t-tests against ``student-ce`` and
``label-smoothing`` (Holm-corrected, ``*`` below 0.05), and under the tables the paper's Table 1
orderings with one-sided paired p-values. Columns whose value is the same in every row move into
the header; ``paper %`` is shown only when the runs are in the paper's setting
(:func:`paper_comparability`), else a header line says why not. The csv starts with
``method, n, mean, std, ci95_low, ci95_high, p_vs_student_ce, p_vs_label_smoothing`` (percent,
corrected p-values).

Regression gates (:func:`check_gate`) compare one run with the stored reference of its
(dataset, profile) in ``benchmarks/references/<dataset>-<profile>.json``::

    {method: {"student_accuracy": mean, "tolerance": t, "queries_per_sample": q, ...}}

A run fails when ``student_accuracy < reference - tolerance`` or when ``queries_per_sample``
exceeds the reference (the reference of the same seed when stored, else the largest over seeds).
Query counts are deterministic for a seed, a teacher checkpoint and a float platform
(:func:`db3kd.records.numerics`): when the run's teacher checkpoint and numerics equal the
reference's, the query gate is exact. On another platform the built-in teacher retrains to
slightly different weights (CPU instruction sets change float sums) and the boundary searches
take a few other bisection steps; the query gate then allows ``QUERY_SLACK_OTHER_PLATFORM``
(relative) and says so in its message.
``tolerance = max(TOLERANCE_FLOOR[profile], TOLERANCE_SIGMAS * std over seeds)`` -- the floor
covers the run-to-run noise of a single seed (thread counts change floating-point sums) and
makes one-seed references usable. A method without a reference is not gated (status
``no_reference``). :func:`update_references` refreshes a reference file from records.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from db3kd.records import group_records, json_safe, load_records, record_variant, variant_label, write_json_atomic

__all__ = [
    "TOLERANCE_FLOOR",
    "TOLERANCE_SIGMAS",
    "QUERY_SLACK_OTHER_PLATFORM",
    "PROFILE_NOTES",
    "aggregate",
    "write_group",
    "write_all",
    "tolerance",
    "build_references",
    "reference_path",
    "load_references",
    "update_references",
    "GateResult",
    "check_gate",
]

#: Smallest tolerance (accuracy as a fraction) per profile. smoke students train for seconds on a
#: few hundred images, so a single seed moves by several points when thread counts change.
TOLERANCE_FLOOR: dict[str, float] = {"smoke": 0.05, "cpu": 0.02, "paper": 0.005}
#: Tolerance in standard deviations of the per-seed accuracies of the reference.
TOLERANCE_SIGMAS = 3.0
#: Relative slack of the query gate when the run's teacher checkpoint or numerics differ from the
#: reference's. Measured: retrained on another x86_64 machine, the same configuration spent
#: +0.1% to +0.3% queries per sample (digits smoke MBD and ZSDB3KD, MNIST cpu BD).
QUERY_SLACK_OTHER_PLATFORM = 0.01
#: What each profile is, for the table header.
PROFILE_NOTES = {
    "smoke": "seconds-scale settings for tests; numbers are NOT comparable with the paper",
    "cpu": "the paper's pipeline reduced to finish on 2 CPU cores (subsets, fewer epochs and queries)",
    "paper": "the paper's settings (GPU scale)",
}
ACCURACY_KINDS = {"final": "the student after its last epoch (no model selection on the test set)",
                  "best_val": "the student epoch with the best validation accuracy"}


# ------------------------------------------------------------------------------------------------
# aggregation
# ------------------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std


def _unique(values: Iterable[Any]) -> list[Any]:
    out = []
    for v in values:
        if v is not None and v not in out:
            out.append(v)
    return out


def _method_meta(method: str, records: list[dict]) -> tuple[bool, float | None]:
    """(reference_row, paper accuracy %) from the records, else from the registry."""
    ref = any(bool(r.get("reference_row")) for r in records)
    paper = next((r.get("paper_accuracy") for r in records if r.get("paper_accuracy") is not None), None)
    if paper is None or not ref:
        try:
            from db3kd.registry import get_method

            cls = get_method(method)
            ref = ref or bool(getattr(cls, "reference_row", False))
            if paper is None:
                paper = (getattr(cls, "paper_results", {}) or {}).get(records[0]["dataset"])
        except Exception:  # noqa: BLE001 - unregistered (removed / renamed) methods keep their rows
            pass
    return ref, paper


def aggregate(records: Iterable[dict]) -> list[dict]:
    """One dict per method of the given records (one dataset and profile), in leaderboard order.

    Keys: method, reference_row, teacher_access, data, n, seeds, student_mean/std (fractions),
    paper (percent or None), queries_per_sample, wall_seconds, accuracy_kind, teacher_mean/std,
    teacher_checkpoints (digests of the teacher's weights),
    config_hashes ({seed: hash}), configs ({hash: config dict}), data_source.
    """
    records = list(records)
    by_key: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        by_key.setdefault((r["method"], record_variant(r)), []).append(r)
    rows = []
    for (method, variant), rs in by_key.items():
        rs = sorted(rs, key=lambda r: int(r["seed"]))
        accs = [float(r["student_accuracy"]) for r in rs if r.get("student_accuracy") is not None]
        teach = [float(r["teacher_accuracy"]) for r in rs if r.get("teacher_accuracy") is not None]
        qps = [float(r["queries_per_sample"]) for r in rs if r.get("queries_per_sample") is not None]
        wall = [float(r["wall_seconds"]) for r in rs if r.get("wall_seconds") is not None]
        ref, paper = _method_meta(method, rs)
        s_mean, s_std = _mean_std(accs)
        t_mean, t_std = _mean_std(teach)
        rows.append({
            "method": method,
            "variant": variant,
            "label": variant_label(method, variant),
            "config_diff": next((r["config_diff"] for r in rs if r.get("config_diff")), {}),
            "reference_row": ref,
            "teacher_access": ", ".join(_unique(r.get("teacher_access") for r in rs)) or "?",
            "data": ", ".join(_unique(r.get("data") for r in rs)) or "?",
            "n": len(accs),
            "seeds": [int(r["seed"]) for r in rs],
            "student_mean": s_mean,
            "student_std": s_std,
            "paper": paper,
            "queries_per_sample": _mean_std(qps)[0] if qps else float("nan"),
            "wall_seconds": _mean_std(wall)[0] if wall else float("nan"),
            "accuracy_kind": ", ".join(_unique(r.get("accuracy_kind", "final") for r in rs)),
            "teacher_mean": t_mean,
            "teacher_std": t_std,
            "teacher_checkpoints": _unique(r.get("teacher_checkpoint") for r in rs),
            "config_hashes": {int(r["seed"]): r.get("config_hash") for r in rs if r.get("config_hash")},
            "configs": {r["config_hash"]: r["config"] for r in rs if r.get("config_hash") and r.get("config")},
            "data_source": ", ".join(_unique(r.get("data_source", "official") for r in rs)),
        })
    from db3kd import stats

    acc: dict[str, dict[int, float]] = {}
    for r in records:  # pairs share a seed; a variant is its own "method" (its label), the controls are default
        if r.get("student_accuracy") is not None and math.isfinite(float(r["student_accuracy"])):
            acc.setdefault(variant_label(r["method"], record_variant(r)), {})[int(r["seed"])] = float(r["student_accuracy"])
    compared = stats.compare_methods(acc)
    for row in rows:
        s = compared.get(row["label"], {})
        rs_row = by_key[(row["method"], row["variant"])]
        row["ci95_low"], row["ci95_high"] = s.get("ci95_low", float("nan")), s.get("ci95_high", float("nan"))
        for control in stats.CONTROLS:
            key = control.replace("-", "_")
            row[f"p_vs_{key}"] = s.get(f"p_vs_{key}", float("nan"))
            row[f"diff_vs_{key}"] = s.get(f"diff_vs_{key}")
        row["params"] = ", ".join(_unique(params_label(r) for r in rs_row))
        chosen = [int(r["metrics"]["chosen_milestone"]) for r in rs_row
                  if (r.get("metrics") or {}).get("chosen_milestone") is not None]
        # {milestone: number of seeds that chose it}, in query order
        row["chosen_milestones"] = {m: chosen.count(m) for m in sorted(set(chosen))}
        row["student_arch"] = ", ".join(_unique(r.get("student_arch") or (r.get("config") or {}).get("student", {}).get("arch")
                                                for r in rs_row)) or "?"
    rows.sort(key=_row_order)
    return rows


def params_label(record: dict) -> str:
    """Where a run's method parameters came from: ``tuned on val (N trials)`` or the profile's defaults.

    N is the study's trial count when the run was configured; a study resumed later (for example to
    score the defaults too) that kept the same best values reports its current count, since the run's
    values are that longer study's choice as well (the harness reuses such a run instead of redoing it).
    """
    config = record.get("config") or {}
    label = str((config.get("extra") or {}).get("params") or "paper settings (profile defaults)")
    if label.startswith("tuned on val"):
        entry = _current_tuned(config)
        if entry is not None:
            label = f"tuned on val ({entry['trials']} trials)"
    return label


def _current_tuned(config: dict) -> dict | None:
    """The committed tuned entry of the run's (dataset, profile, method) when the run used exactly its
    values, else None."""
    from db3kd.errors import ConfigError
    from db3kd.tuning import load_tuned

    try:
        entry = load_tuned(str(config.get("dataset")), str(config.get("profile")), str(config.get("method")))
    except ConfigError:  # an unreadable tuned file leaves the record's own label
        return None
    if not entry or not isinstance(entry.get("trials"), int):
        return None
    sections = (("params", config.get("method_params") or {}), ("student", config.get("student") or {}))
    same = all(isinstance(entry.get(key), dict) and all(k in used and used[k] == v for k, v in entry[key].items())
               for key, used in sections)
    return entry if same else None


def _group_index(value: str, levels: tuple[str, ...]) -> int:
    return levels.index(value) if value in levels else len(levels)


def _row_order(row: dict):
    """Reference rows (teacher, cross-entropy students) first, then teacher access (none, labels,
    scores, white box), then data (full, few-shot, none); within a group by mean accuracy, best first."""
    from db3kd.registry import ACCESS_LEVELS, DATA_LEVELS

    group = (-1, -1) if row["reference_row"] else (_group_index(row["teacher_access"], ACCESS_LEVELS),
                                                   _group_index(row["data"], DATA_LEVELS))
    return (*group, -(row["student_mean"] if math.isfinite(row["student_mean"]) else -1.0), row["method"],
            row["variant"] != "default", row["variant"])


def variant_cell(row: dict) -> str:
    """``default``, or ``<variant>: <what differs>`` (``tau05: tau=0.5, student.epochs=5``)."""
    from db3kd.config import describe_diff

    diff = describe_diff(row.get("config_diff") or {})
    if row["variant"] == "default":
        return "default"
    return f"{row['variant']}: {diff}" if diff else f"{row['variant']}: (the default configuration)"


def _pct(v: float | None, digits: int = 2) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{100.0 * v:.{digits}f}"


def _acc_cell(mean: float, std: float, n: int, pm: str = "±") -> str:
    if not math.isfinite(mean):
        return "–"
    return f"{_pct(mean)} {pm} {_pct(std)} (n={n})" if n > 1 and math.isfinite(std) else f"{_pct(mean)} (n={n})"


def _num(v: float | None, fmt: str) -> str:
    return "–" if v is None or not math.isfinite(float(v)) else format(float(v), fmt)


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------

_ACC = "student acc. %"
_DIFF = "Δ vs student-ce (points, paired 95% CI)"
_COLUMNS = ["method", "variant", "teacher access", "data", _ACC, _DIFF, "p vs student-ce", "p vs label-smoothing", "paper %",
            "teacher queries / sample", "wall time (s)", "accuracy kind", "teacher acc. %", "teacher checkpoint",
            "student", "params", "config"]
#: Never moved into the header, even when every row agrees.
_ALWAYS_SHOWN = ("method", _ACC, "config")
_GROUP_NAMES = {"none": "no teacher", "labels": "teacher labels (top-1)", "scores": "teacher scores",
                "white_box": "white-box teacher"}
_DATA_NAMES = {"full": "full training data", "few_shot": "few-shot data", "none": "no data"}


def _p_cell(p: float) -> str:
    from db3kd.stats import ALPHA

    if p is None or not math.isfinite(p):
        return "–"
    text = "<0.001" if p < 0.001 else f"{p:.3f}"
    return text + (" *" if p < ALPHA else "")


def _signed(v: float) -> str:
    return f"{100.0 * v:+.2f}"


def _diff_cell(diff: dict | None, p: float, control: str, method: str) -> str:
    if method == control:
        return "control"
    if not diff or not diff.get("n_pairs"):
        return "–"
    if diff["n_pairs"] == 1:
        return f"{_signed(diff['mean_diff'])} (1 seed, no interval)"
    cell = f"{_signed(diff['mean_diff'])} [{_signed(diff['ci95_low'])}, {_signed(diff['ci95_high'])}]"
    from db3kd.stats import ALPHA

    return cell + (" *" if p is not None and math.isfinite(p) and p < ALPHA else "")


def _acc_ci_cell(row: dict) -> str:
    mean, std, n = row["student_mean"], row["student_std"], row["n"]
    if not math.isfinite(mean):
        return "–"
    if n < 2 or not math.isfinite(std):
        return f"{_pct(mean)} (1 seed)" if n == 1 else f"{_pct(mean)} (n={n})"
    return f"{_pct(mean)} ± {_pct(std)} [{_pct(row['ci95_low'])}, {_pct(row['ci95_high'])}] (n={n})"


def paper_comparability(records: list[dict], dataset: str, profile: str) -> str | None:
    """None when these runs are in the paper's setting (the ``paper %`` column is shown), else why not (one line)."""
    reasons = []
    if profile != "paper":
        reasons.append(f"profile `{profile}` is not the paper's setting ({PROFILE_NOTES.get(profile, 'custom profile')})")
    if any(r.get("data_source", "official") != "official" for r in records):
        reasons.append("the data is not the official release")
    try:
        from db3kd.config import DATASETS

        paper_student = DATASETS[dataset].student
    except (ImportError, KeyError, AttributeError):  # unknown dataset: nothing to compare with
        paper_student = None
    archs = _unique(r.get("student_arch") or (r.get("config") or {}).get("student", {}).get("arch") for r in records)
    if paper_student is not None and any(a != paper_student for a in archs):
        reasons.append(f"students {', '.join(map(str, archs))} differ from the paper's column ({paper_student})")
    if any((r.get("config") or {}).get("teacher_file") for r in records):
        reasons.append("the teacher is a user's file, not the paper's teacher")
    return "; ".join(reasons) or None


def _display_rows(rows: list[dict], *, links: bool) -> list[list[str]]:
    """One list of cells per row, in :data:`_COLUMNS` order."""
    out = []
    for row in rows:
        name = row["method"] + (" (reference)" if row["reference_row"] else "")
        if row.get("chosen_milestones"):
            picks = row["chosen_milestones"]
            if len(picks) == 1:
                name += f" ({next(iter(picks)):,} queries/pair, chosen on val)"
            else:
                counts = ", ".join(f"{m:,} in {k} seed{'s' if k > 1 else ''}" for m, k in picks.items())
                name += f" (queries/pair chosen on val: {counts})"
        configs = " ".join(
            (f"[s{seed}](configs/{h}.json)" if links else f"s{seed}: {h}") for seed, h in sorted(row["config_hashes"].items()))
        out.append([
            name, variant_cell(row), row["teacher_access"], row["data"], _acc_ci_cell(row),
            _diff_cell(row.get("diff_vs_student_ce"), row.get("p_vs_student_ce"), "student-ce", row["method"]),
            "control" if row["method"] == "student-ce" else _p_cell(row.get("p_vs_student_ce")),
            "control" if row["method"] == "label-smoothing" else _p_cell(row.get("p_vs_label_smoothing")),
            "–" if row["paper"] is None else f"{float(row['paper']):.2f}",
            _num(row["queries_per_sample"], ".1f"), _num(row["wall_seconds"], ".1f"), row["accuracy_kind"],
            _pct(row["teacher_mean"]) if row["n"] else "–",
            ", ".join(h[:12] for h in row["teacher_checkpoints"]) or "–",
            row.get("student_arch", "?"), row.get("params", "?"),
            configs or "–",
        ])
    return out


def _layout(rows: list[dict], cells: list[list[str]], *, show_paper: bool) -> tuple[list[str], dict[str, str]]:
    """(columns kept, {column: value} of the columns every row agrees on, moved into the header)."""
    drop = {} if show_paper else {"paper %": None}
    constant = {}
    if len(rows) > 1:
        for j, col in enumerate(_COLUMNS):
            values = {c[j] for c in cells}
            if col not in _ALWAYS_SHOWN and col not in drop and len(values) == 1:
                constant[col] = next(iter(values))
    keep = [c for c in _COLUMNS if c not in drop and c not in constant]
    return keep, constant


def _select(cells: list[list[str]], keep: list[str]) -> list[list[str]]:
    idx = [_COLUMNS.index(c) for c in keep]
    return [[c[i] for i in idx] for c in cells]


def _group_tables(rows: list[dict], cells: list[list[str]], keep: list[str]) -> list[str]:
    """Markdown: one table per (teacher access, data) group, under a heading naming the group."""
    from tabulate import tabulate

    lines: list[str] = []
    groups: dict[tuple[str, str] | None, list[int]] = {}
    for i, row in enumerate(rows):  # rows are already in group order
        groups.setdefault(None if row["reference_row"] else (row["teacher_access"], row["data"]), []).append(i)
    for group, members in groups.items():
        if group is None:  # the reference rows keep their access and data columns
            cols = keep
            lines += ["### reference rows (the teacher and cross-entropy students)", ""]
        else:
            access, data = group
            cols = [c for c in keep if c not in ("teacher access", "data")]
            lines += [f"### {_GROUP_NAMES.get(access, access)} · {_DATA_NAMES.get(data, data)} "
                      f"(teacher access `{access}`, data `{data}`)", ""]
        lines.append(tabulate(_select([cells[i] for i in members], cols), headers=cols, tablefmt="github",
                              disable_numparse=True))
        lines.append("")
    return lines


def _orderings_lines(records: list[dict]) -> list[str]:
    """The paper's Table 1 orderings checked on these records (one line per claim)."""
    from db3kd import stats

    acc = stats.per_seed(r for r in records if record_variant(r) == "default")
    claims = stats.paper_orderings(acc)
    if not any(o.a in acc or o.b in acc for o in claims):
        return []
    lines = ["## The paper's Table 1 orderings, here", "",
             "Paper: MBD >= BD >= SD > standard KD > surrogate KD > student CE > noise logits. Each claim "
             "`a > b` is tested one-sided (H1: mean over seeds of a - b > 0) with a paired t-test over the seeds "
             "both have, Holm-corrected over the chain; *holds* means the means are in the paper's order here, "
             f"*significant* that the corrected p < {stats.ALPHA}.", ""]
    for o in claims:
        claim = f"`{o.a}` {o.relation.replace('>=', '≥')} `{o.b}`"
        if o.observed is None:
            missing = [m for m in (o.a, o.b) if m not in acc]
            lines.append(f"- {claim}: not measured (no record of {', '.join(missing)})")
            continue
        means = f"{_pct(o.mean_a)} vs {_pct(o.mean_b)}"
        verdict = "holds" if o.observed else "does NOT hold"
        if o.n_pairs < 2:
            lines.append(f"- {claim}: {verdict} on the means ({means}); untested: {o.n_pairs} shared seed(s), "
                         "a paired test needs 2 or more")
            continue
        lines.append(f"- {claim}: {verdict} on the means ({means}, mean paired difference {_signed(o.mean_diff)} "
                     f"points over {o.n_pairs} seeds); one-sided p = {_p_cell(o.p_value).rstrip(' *')}, "
                     f"Holm {_p_cell(o.p_holm).rstrip(' *')}: {'significant' if o.significant else 'not significant'}")
    lines.append("")
    return lines


def _header_lines(records: list[dict], dataset: str, profile: str, results_dir: Path) -> list[str]:
    seeds = sorted({int(r["seed"]) for r in records})
    commands = _unique(r.get("command") for r in sorted(records, key=lambda r: str(r.get("created", ""))))
    machines = _unique(r.get("machine") for r in records)
    numerics = _unique(r.get("numerics") for r in records)
    commits = _unique((r.get("git_commit") or "")[:12] for r in records)
    sources = _unique(r.get("data_source", "official") for r in records)
    roots = _unique(r.get("data_root") for r in records)
    kinds = _unique(r.get("accuracy_kind", "final") for r in records)
    created = sorted(str(r.get("created")) for r in records if r.get("created"))
    lines = [f"# Leaderboard: {dataset}, profile `{profile}`", ""]
    synthetic = [s for s in sources if s != "official"]
    if synthetic:
        lines += [f"> **WARNING: SYNTHETIC / UNOFFICIAL DATA.** {'; '.join(synthetic)}. "
                  "These numbers measure the pipeline, not the method.", ""]
    teachers = _unique((r.get("teacher_file"), r.get("teacher_sha256")) for r in records if r.get("teacher_file"))
    if teachers:
        lines += ["> **Teacher: a user's file**, queried only through the oracle: "
                  + "; ".join(f"`{f}` (SHA-256 `{h}`)" for f, h in teachers)
                  + (". White-box methods and methods that need the teacher's training recipe are not run; "
                     "rows are not gated against the built-in teacher's references." if len(teachers) == 1 else
                     ". WARNING: several teachers in one table."), ""]
    lines += [
        f"Generated by `db3kd leaderboard` from {len(records)} record(s) in "
        f"`{(Path('records') / dataset / profile).as_posix()}/` -- do not edit by hand.",
        "",
        "- **Command(s):** " + "; ".join(f"`{c}`" for c in commands) if commands else "- **Command(s):** unknown",
        f"- **Profile:** `{profile}` ({PROFILE_NOTES.get(profile, 'custom profile')})",
        f"- **Seeds:** {', '.join(map(str, seeds))} ({len(seeds)} seed{'s' if len(seeds) != 1 else ''})",
        "- **Machine:** " + ("; ".join(machines) if machines else "unknown"),
        "- **Numerics:** " + ("; ".join(f"`{n}`" for n in numerics) if numerics else "unknown")
        + " (with the teacher checkpoint, what makes query counts reproducible bit for bit)",
        "- **Data:** " + ", ".join(sources) + (f" (from {', '.join(f'`{r}`' for r in roots)})" if roots else ""),
        "- **Git commit(s):** " + (", ".join(f"`{c}`" for c in commits if c) or "unknown"),
        "- **Runs:** " + (f"{created[0]} .. {created[-1]}" if created else "unknown"),
        "- **Accuracy:** test-split accuracy in %; "
        + "; ".join(f"`{k}` = {ACCURACY_KINDS.get(k, k)}" for k in kinds) + ". " + _spread_sentence(records),
        "- **Queries / sample:** teacher queries divided by the number of training images the student used "
        "(counted by the oracle).",
        "- **Config:** the exact resolved configuration of each seed, committed in `configs/<config_hash>.json`.",
        "",
    ]
    return lines


def _spread_sentence(records: list[dict]) -> str:
    """What the accuracy cells show, true to the number of seeds each method has."""
    from db3kd.stats import ALPHA, TEST_NAME

    counts = {}
    for r in records:
        counts.setdefault(r["method"], set()).add(int(r["seed"]))
    ns = sorted({len(v) for v in counts.values()})
    if ns == [1]:
        return ("1 seed per method: the cells are single runs, with no spread, no interval and no test; one "
                "evaluation on 10,000 test images alone has a standard error of about 0.17 points at 97%.")
    return (f"Seeds per method: {', '.join(map(str, ns))}. With n >= 2: mean ± sample standard deviation "
            f"[95% Student-t interval of the mean] (n seeds); a method with 1 seed shows its single run. "
            f"Δ and p: {TEST_NAME} within each control's family (all methods against student-ce, all against "
            f"label-smoothing); * marks corrected p < {ALPHA}.")


def _latex_escape(text: str) -> str:
    repl = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
            "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "–": "--"}
    return "".join(repl.get(ch, ch) for ch in text)


def write_group(records: list[dict], results_dir: str | os.PathLike, dataset: str, profile: str) -> list[Path]:
    """Write the tables, config files and plots of one (dataset, profile); returns the paths written."""
    import pandas as pd
    from tabulate import tabulate

    from db3kd import plots

    results_dir = Path(results_dir)
    out_dir = results_dir / dataset
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = aggregate(records)
    written: list[Path] = []

    # exact resolved configs beside the table
    for row in rows:
        for h, cfg in row["configs"].items():
            written.append(write_json_atomic(cfg, out_dir / "configs" / f"{h}.json"))

    # markdown
    plot_files = plots.write_plots(records, out_dir, profile)
    lines = _header_lines(records, dataset, profile, results_dir)
    cells = _display_rows(rows, links=True)
    why_not = paper_comparability(records, dataset, profile)
    keep, constant = _layout(rows, cells, show_paper=why_not is None)
    if lines and lines[-1] == "":
        lines.pop()  # the notes below continue the header's list
    if why_not is not None:
        lines.append(f"- **paper %:** not shown: {why_not}. The papers' numbers are in `{profile}.csv` "
                     "(`paper_accuracy_pct`) and REFERENCE.md.")
    if constant:
        lines.append("- **Same for every row:** " + "; ".join(
            f"{k}: {v}" + (" (not measured: no record, or too few shared seeds)" if v == "–" else "")
            for k, v in constant.items()))
    pretrained = _unique(f"{stage} {(r.get('config') or {}).get(stage, {}).get('arch')} from {w}"
                         for r in records for stage in ("teacher", "student")
                         if (w := ((r.get("config") or {}).get(stage) or {}).get("pretrained")))
    if pretrained:
        lines.append("- **Pretrained:** " + "; ".join(pretrained) + " (torchvision weights): these are NOT "
                     "from-scratch results")
    lines.append("")
    lines += _group_tables(rows, cells, keep)
    lines += _orderings_lines(records)
    if plot_files:
        lines.append("## Plots")
        lines.append("")
        for p in plot_files:
            lines.append(f"![{p.stem}]({p.name})")
            lines.append("")
    figures = [(f"{variant_label(r['method'], r.get('variant'))}-s{r['seed']}", name, rel)
               for r in sorted(records, key=lambda r: (r["method"], record_variant(r), int(r["seed"])))
               for name, rel in sorted((r.get("figures") or {}).items()) if (out_dir / rel).is_file()]
    if figures:
        lines += ["## Method figures", ""]
        for case, name, rel in figures:
            lines += [f"**{case}**: `{name}`", "", f"![{case} {name}]({rel})", ""]
    md = out_dir / f"{profile}.md"
    _write_text(md, "\n".join(lines))
    written.append(md)

    # csv: numbers, not display strings; accuracies and differences in percent, p-values Holm-corrected
    csv_rows = []
    for row in rows:
        diff = row.get("diff_vs_student_ce") or {}
        csv_rows.append({
            "method": row["method"], "n": row["n"], "mean": _round(100 * row["student_mean"]),
            "std": _round(100 * row["student_std"]), "ci95_low": _round(100 * row["ci95_low"]),
            "ci95_high": _round(100 * row["ci95_high"]), "p_vs_student_ce": _round(row.get("p_vs_student_ce"), 6),
            "p_vs_label_smoothing": _round(row.get("p_vs_label_smoothing"), 6),
            "diff_vs_student_ce": _round(100 * diff["mean_diff"]) if diff.get("n_pairs") else None,
            "diff_ci95_low": _round(100 * diff["ci95_low"]) if diff.get("n_pairs") else None,
            "diff_ci95_high": _round(100 * diff["ci95_high"]) if diff.get("n_pairs") else None,
            "test": "paired t-test (scipy.stats.ttest_rel), Holm over each control's family",
            "variant": row["variant"], "config_diff": variant_cell(row),
            "reference_row": row["reference_row"], "teacher_access": row["teacher_access"], "data": row["data"],
            "seeds": " ".join(map(str, row["seeds"])), "paper_accuracy_pct": row["paper"],
            "paper_comparable": why_not is None,
            "queries_per_sample": _round(row["queries_per_sample"]), "wall_seconds": _round(row["wall_seconds"]),
            "accuracy_kind": row["accuracy_kind"], "teacher_accuracy_pct_mean": _round(100 * row["teacher_mean"]),
            "teacher_checkpoints": " ".join(row["teacher_checkpoints"]), "student_arch": row.get("student_arch"),
            "params": row.get("params"),
            "config_files": " ".join(f"configs/{h}.json" for _, h in sorted(row["config_hashes"].items())),
            "data_source": row["data_source"], "profile": profile, "dataset": dataset,
        })
    csv = out_dir / f"{profile}.csv"
    _write_text(csv, pd.DataFrame(csv_rows).to_csv(index=False))
    written.append(csv)

    # latex: one flat table (the group columns kept unless constant)
    tex_cells = _display_rows(rows, links=False)
    tex_rows = [[_latex_escape(c).replace("±", r"$\pm$").replace("Δ", r"$\Delta$") for c in r]
                for r in _select(tex_cells, keep)]
    frame = pd.DataFrame(tex_rows, columns=[_latex_escape(c).replace("Δ", r"$\Delta$") for c in keep])
    n_max = max((row["n"] for row in rows), default=0)
    spread = ("mean $\\pm$ sample std [95\\% t interval] where a method has 2 or more seeds" if n_max > 1
              else "1 seed per method, no spread")
    caption = (f"{dataset}, profile {profile}: student test accuracy (\\%, {spread}), generated from records by "
               f"db3kd leaderboard.")
    if constant:
        caption += " Same for every row: " + _latex_escape("; ".join(f"{k}: {v}" for k, v in constant.items())) + "."
    if why_not is not None:
        caption += " Not comparable with the paper's numbers: " + _latex_escape(why_not) + "."
    if any(r.get("data_source", "official") != "official" for r in records):
        caption += " SYNTHETIC DATA: not comparable with published numbers."
    tex = out_dir / f"{profile}.tex"
    _write_text(tex, frame.to_latex(index=False, escape=False, caption=caption, label=f"tab:{dataset}-{profile}"))
    written.append(tex)
    return written + plot_files


def _round(v: float | None, digits: int = 4):
    return None if v is None or not math.isfinite(v) else round(float(v), digits)


def _write_text(path: Path, text: str) -> None:
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    os.replace(tmp, path)


def path_lock(kind: str, path: str | os.PathLike):
    """An inter-process lock (a ``filelock.FileLock`` in ``<cache>/locks``) named by ``kind`` and
    ``path``'s resolved location, for the read-modify-write of files that parallel processes share."""
    import hashlib

    from filelock import FileLock

    from db3kd.teacher import cache_root

    key = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:16]
    lock_dir = cache_root() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(str(lock_dir / f"{kind}-{key}.lock"), timeout=600)


@contextmanager
def results_lock(results_dir: str | os.PathLike):
    """An inter-process lock for regenerating the tables of ``results_dir`` (pytest-xdist, parallel sessions)."""
    with path_lock("results", results_dir):
        yield


def write_all(results_dir: str | os.PathLike = "results", *, only: Iterable[tuple[str, str]] | None = None) -> list[Path]:
    """Regenerate every table (or those of the ``only`` (dataset, profile) pairs) from the records.

    Returns the paths written. Config files under ``<dataset>/configs/`` that no record of the
    dataset refers to are removed. Holds an inter-process lock while writing.
    """
    only = set(only) if only is not None else None
    written: list[Path] = []
    with results_lock(results_dir):
        all_records = load_records(results_dir)
        datasets = set()
        for (dataset, profile), records in group_records(all_records).items():
            if only is None or (dataset, profile) in only:
                written += write_group(records, results_dir, dataset, profile)
                datasets.add(dataset)
        for dataset in sorted(datasets):  # configs no record refers to any more (e.g. a changed default)
            used = {r.get("config_hash") for r in all_records if r["dataset"] == dataset}
            for stale in (Path(results_dir) / dataset / "configs").glob("*.json"):
                if stale.stem not in used:
                    stale.unlink()
    return written


# ------------------------------------------------------------------------------------------------
# references and gates
# ------------------------------------------------------------------------------------------------


def tolerance(accuracies: list[float], profile: str) -> float:
    """``max(TOLERANCE_FLOOR[profile], TOLERANCE_SIGMAS * sample std)`` (floor alone for one seed)."""
    floor = TOLERANCE_FLOOR.get(profile, max(TOLERANCE_FLOOR.values()))
    _, std = _mean_std(accuracies)
    spread = TOLERANCE_SIGMAS * std if math.isfinite(std) else 0.0
    return round(max(floor, spread), 6)


def reference_path(references_dir: str | os.PathLike, dataset: str, profile: str) -> Path:
    return Path(references_dir) / f"{dataset}-{profile}.json"


def load_references(references_dir: str | os.PathLike, dataset: str, profile: str) -> dict[str, dict]:
    """The reference file of (dataset, profile) as {method: {...}}; {} when there is none."""
    import json

    path = reference_path(references_dir, dataset, profile)
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def build_references(records: Iterable[dict], profile: str) -> dict[str, dict]:
    """{method: reference} from records of one (dataset, profile): mean accuracy, tolerance, max queries.
    A variant other than ``default`` is keyed ``method@variant``."""
    by_method: dict[str, list[dict]] = {}
    for r in records:
        by_method.setdefault(variant_label(r["method"], record_variant(r)), []).append(r)
    out = {}
    for method, rs in sorted(by_method.items()):
        rs = sorted(rs, key=lambda r: int(r["seed"]))
        accs = [float(r["student_accuracy"]) for r in rs]
        qps = {str(r["seed"]): float(r["queries_per_sample"]) for r in rs if r.get("queries_per_sample") is not None}
        out[method] = {
            "student_accuracy": round(_mean_std(accs)[0], 6),
            "tolerance": tolerance(accs, profile),
            "queries_per_sample": max(qps.values()) if qps else None,
            "queries_per_sample_by_seed": qps,
            "student_accuracy_by_seed": {str(r["seed"]): round(float(r["student_accuracy"]), 6) for r in rs},
            "n_seeds": len(rs),
            "config_hashes": {str(r["seed"]): r.get("config_hash") for r in rs},
            "teacher_checkpoint_by_seed": {str(r["seed"]): r.get("teacher_checkpoint") for r in rs},
            "numerics_by_seed": {str(r["seed"]): r.get("numerics") for r in rs},
            "git_commit": _unique(r.get("git_commit") for r in rs)[:1][0] if _unique(r.get("git_commit") for r in rs) else None,
            "command": _unique(r.get("command") for r in rs)[:1][0] if _unique(r.get("command") for r in rs) else None,
        }
    return out


def update_references(references_dir: str | os.PathLike, dataset: str, profile: str, records: Iterable[dict]) -> Path:
    """Replace the references of the methods in ``records`` (others are kept); returns the file path."""
    refs = load_references(references_dir, dataset, profile)
    refs.update(build_references(records, profile))
    return write_json_atomic(dict(sorted(refs.items())), reference_path(references_dir, dataset, profile))


@dataclass
class GateResult:
    """status: ``pass`` | ``fail`` | ``no_reference``; messages: why (one line each)."""

    status: str
    messages: list[str] = field(default_factory=list)
    reference: dict | None = None

    @property
    def failed(self) -> bool:
        return self.status == "fail"

    def __str__(self) -> str:
        return f"{self.status}: " + "; ".join(self.messages)


def check_gate(record: dict, references: dict[str, dict]) -> GateResult:
    """Gate one run record against ``references`` ({method: reference}) of its (dataset, profile)."""
    method = variant_label(record["method"], record_variant(record))
    ref = references.get(method)
    case = f"{record['dataset']}-{method}-s{record['seed']} ({record['profile']})"
    if not ref:
        return GateResult("no_reference", [f"{case}: no stored reference for {method!r}, not gated"])
    msgs, failed = [], False
    acc = float(record["student_accuracy"])
    floor = float(ref["student_accuracy"]) - float(ref.get("tolerance", 0.0))
    if acc < floor:
        failed = True
        msgs.append(f"{case}: student accuracy {acc:.4f} < reference {ref['student_accuracy']:.4f} - tolerance "
                    f"{ref.get('tolerance', 0.0):.4f} = {floor:.4f}")
    else:
        msgs.append(f"accuracy {acc:.4f} >= {floor:.4f}")
    seed = str(record["seed"])
    by_seed = ref.get("queries_per_sample_by_seed") or {}
    q_ref = by_seed.get(seed, ref.get("queries_per_sample"))
    q = record.get("queries_per_sample")
    if q_ref is not None and q is not None:
        same = (seed in by_seed
                and (ref.get("teacher_checkpoint_by_seed") or {}).get(seed) == record.get("teacher_checkpoint")
                and (ref.get("numerics_by_seed") or {}).get(seed) == record.get("numerics"))
        slack = 0.0 if same else QUERY_SLACK_OTHER_PLATFORM
        limit = float(q_ref) * (1 + slack)
        how = "exact" if same else (f"+{slack:.0%}: teacher checkpoint or numerics differ from the reference's, "
                                    f"{record.get('teacher_checkpoint')} / {record.get('numerics')}")
        if float(q) > limit * (1 + 1e-9) + 1e-9:
            failed = True
            msgs.append(f"{case}: {float(q):.3f} teacher queries per sample > reference {float(q_ref):.3f} ({how})")
        else:
            msgs.append(f"queries/sample {float(q):.3f} <= {float(q_ref):.3f} ({how})")
    return GateResult("fail" if failed else "pass", msgs, json_safe(ref))
