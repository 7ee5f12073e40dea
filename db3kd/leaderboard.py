"""Leaderboards and regression gates, generated from run records only (:mod:`db3kd.records`).

Tables, per (dataset, profile), written by :func:`write_group` / :func:`write_all`::

    results/<dataset>/<profile>.md     (tabulate, GitHub markdown, with a provenance header)
    results/<dataset>/<profile>.csv    (pandas, machine-readable numbers)
    results/<dataset>/<profile>.tex    (pandas to_latex)
    results/<dataset>/configs/<config_hash>.json   (the exact resolved config of every cell)
    results/<dataset>/<profile>-accuracy-vs-queries.png, <profile>-mbd-heatmap.png  (db3kd.plots)

One row per (method, variant): reference rows (methods with ``reference_row=True``, e.g. teacher /
student cross-entropy) first, then by mean student accuracy, best first. The ``variant`` column
names each configuration and says what it changes from the default of its (dataset, method,
profile) (``tau05: tau=0.5, student.epochs=5``); records without a variant are ``default``. Accuracies are percentages of
the test split; ``accuracy kind`` says which student is scored (``final``: the last epoch, no
model selection on the test set).

Regression gates (:func:`check_gate`) compare one run with the stored reference of its
(dataset, profile) in ``benchmarks/references/<dataset>-<profile>.json``::

    {method: {"student_accuracy": mean, "tolerance": t, "queries_per_sample": q, ...}}

(a variant other than ``default`` has its own key ``method@variant``).

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

    Keys: method, variant, config_diff ({setting: value} it changes from the default), reference_row,
    teacher_access, data, n, seeds, student_mean/std (fractions),
    paper (percent or None), queries_per_sample, wall_seconds, accuracy_kind, teacher_mean/std,
    teacher_checkpoints (digests of the teacher's weights),
    config_hashes ({seed: hash}), configs ({hash: config dict}), data_source.
    """
    by_method: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        by_method.setdefault((r["method"], record_variant(r)), []).append(r)
    rows = []
    for (method, variant), rs in by_method.items():
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
    rows.sort(key=lambda row: (not row["reference_row"],
                               -(row["student_mean"] if math.isfinite(row["student_mean"]) else -1.0),
                               row["method"], row["variant"] != "default", row["variant"]))
    return rows


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

_COLUMNS = ["method", "variant", "teacher access", "data", "student acc. % (mean ± std, n seeds)", "paper %",
            "teacher queries / sample", "wall time (s)", "accuracy kind", "teacher acc. %",
            "teacher checkpoint", "config"]


def _columns(rows: list[dict]) -> list[str]:
    """The table's columns: ``variant`` only when some row is not the default configuration."""
    return _COLUMNS if any(row["variant"] != "default" for row in rows) else [c for c in _COLUMNS if c != "variant"]


def _display_rows(rows: list[dict], *, links: bool) -> list[list[str]]:
    """One list of cells per row, in the order of :func:`_columns`."""
    show_variant = "variant" in _columns(rows)
    out = []
    for row in rows:
        name = row["method"] + (" (reference)" if row["reference_row"] else "")
        configs = " ".join(
            (f"[s{seed}](configs/{h}.json)" if links else f"s{seed}: {h}") for seed, h in sorted(row["config_hashes"].items()))
        out.append([
            name, variant_cell(row), row["teacher_access"], row["data"],
            _acc_cell(row["student_mean"], row["student_std"], row["n"]),
            "–" if row["paper"] is None else f"{float(row['paper']):.2f}",
            _num(row["queries_per_sample"], ".1f"), _num(row["wall_seconds"], ".1f"), row["accuracy_kind"],
            _acc_cell(row["teacher_mean"], row["teacher_std"], row["n"]).replace(f" (n={row['n']})", ""),
            ", ".join(h[:12] for h in row["teacher_checkpoints"]) or "–",
            configs or "–",
        ])
        if not show_variant:
            del out[-1][1]
    return out


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
        + "; ".join(f"`{k}` = {ACCURACY_KINDS.get(k, k)}" for k in kinds)
        + ". Mean ± sample standard deviation over seeds. `paper %` is the number the method's paper reports "
        "(paper-scale settings).",
        "- **Queries / sample:** teacher queries divided by the number of training images the student used "
        "(counted by the oracle).",
        "- **Config:** the exact resolved configuration of each seed, committed in `configs/<config_hash>.json`.",
        "",
    ]
    return lines


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
    lines.append(tabulate(_display_rows(rows, links=True), headers=_columns(rows), tablefmt="github",
                          disable_numparse=True))
    lines.append("")
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

    # csv: numbers, not display strings
    csv_rows = []
    for row in rows:
        csv_rows.append({
            "method": row["method"], "variant": row["variant"], "config_diff": variant_cell(row),
            "reference_row": row["reference_row"], "teacher_access": row["teacher_access"],
            "data": row["data"], "student_accuracy_pct_mean": _round(100 * row["student_mean"]),
            "student_accuracy_pct_std": _round(100 * row["student_std"]), "n_seeds": row["n"],
            "seeds": " ".join(map(str, row["seeds"])), "paper_accuracy_pct": row["paper"],
            "queries_per_sample": _round(row["queries_per_sample"]), "wall_seconds": _round(row["wall_seconds"]),
            "accuracy_kind": row["accuracy_kind"], "teacher_accuracy_pct_mean": _round(100 * row["teacher_mean"]),
            "teacher_checkpoints": " ".join(row["teacher_checkpoints"]),
            "config_files": " ".join(f"configs/{h}.json" for _, h in sorted(row["config_hashes"].items())),
            "data_source": row["data_source"], "profile": profile, "dataset": dataset,
        })
    csv = out_dir / f"{profile}.csv"
    _write_text(csv, pd.DataFrame(csv_rows).to_csv(index=False))
    written.append(csv)

    # latex
    tex_rows = [[_latex_escape(c) for c in r] for r in _display_rows(rows, links=False)]
    columns = _columns(rows)
    acc_cols = [i for i, c in enumerate(columns) if c.startswith(("student acc.", "teacher acc."))]
    for r in tex_rows:
        for i in acc_cols:
            r[i] = r[i].replace("±", r"$\pm$")
    frame = pd.DataFrame(tex_rows, columns=[_latex_escape(c).replace("±", r"$\pm$") for c in columns])
    caption = (f"{dataset}, profile {profile}: student test accuracy (\\%, mean $\\pm$ std over "
               f"{len({int(r['seed']) for r in records})} seed(s)), generated from records by db3kd leaderboard.")
    if any(r.get("data_source", "official") != "official" for r in records):
        caption += " SYNTHETIC DATA: not comparable with published numbers."
    tex = out_dir / f"{profile}.tex"
    _write_text(tex, frame.to_latex(index=False, escape=False, caption=caption, label=f"tab:{dataset}-{profile}"))
    written.append(tex)
    return written + plot_files


def _round(v: float, digits: int = 4):
    return None if v is None or not math.isfinite(v) else round(float(v), digits)


def _write_text(path: Path, text: str) -> None:
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    os.replace(tmp, path)


@contextmanager
def results_lock(results_dir: str | os.PathLike):
    """An inter-process lock for regenerating the tables of ``results_dir`` (pytest-xdist, parallel sessions)."""
    import hashlib

    from filelock import FileLock

    from db3kd.teacher import cache_root

    key = hashlib.sha256(str(Path(results_dir).resolve()).encode()).hexdigest()[:16]
    lock_dir = cache_root() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_dir / f"results-{key}.lock"), timeout=600):
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
