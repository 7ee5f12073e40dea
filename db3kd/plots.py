"""Leaderboard plots (matplotlib, Agg backend, PNG), drawn from run records only.

* :func:`accuracy_vs_queries` -- student accuracy versus the query budget per (sample, class)
  pair for DB3KD-MBD (paper Fig. 4): one point per query milestone (``milestone_accuracy``) plus
  the final student at the full budget, mean +- std over seeds, with the teacher, the reference
  rows, the other DB3KD variants and the label-only baselines as horizontal lines.
* :func:`class_distance_heatmap` -- mean minimal boundary distance between classes, from
  DB3KD-MBD's ``tables["class_distance"]`` averaged over seeds (paper Fig. 5): row m, column n is
  the mean distance from a sample of class m to the teacher's boundary with class n.
* :func:`forest_plot` -- each method's mean paired difference to ``student-ce`` (percentage points)
  with its 95% t interval over shared seeds (:mod:`db3kd.stats`); a method with one shared seed
  is drawn as a hollow point marked "1 seed, no interval".
* :func:`distance_vs_queries` -- mean minimal boundary distance versus queries per pair for
  several MBD estimators (the perf benchmark's Sign-OPT comparison).
* :func:`frontier` -- the accuracy-versus-queries frontier of every label-only method (issue 15
  item 5): student accuracy against teacher queries per training sample (log x), one point per
  method variant (vote-kd at each K, MBD at each query milestone, BD, hard-label KD at 1 query).

:func:`write_plots` writes the first two, the forest plot and the frontier beside the leaderboard:
``results/<dataset>/<profile>-accuracy-vs-queries.png``, ``<profile>-mbd-heatmap.png``,
``<profile>-forest.png`` and ``<profile>-frontier.png``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable

__all__ = ["MBD", "accuracy_vs_queries", "class_distance_heatmap", "forest_plot", "distance_vs_queries", "frontier",
           "frontier_points", "write_plots", "plot_paths"]

MBD = "db3kd-mbd"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def _title_suffix(records: list[dict]) -> str:
    r = records[0]
    seeds = sorted({int(x["seed"]) for x in records})
    synthetic = any(str(x.get("data_source", "official")) != "official" for x in records)
    return f"{r['dataset']}, profile {r['profile']}, {len(seeds)} seed{'s' if len(seeds) != 1 else ''}" + (
        ", SYNTHETIC DATA" if synthetic else "")


def plot_paths(out_dir: str | os.PathLike, profile: str) -> dict[str, Path]:
    out_dir = Path(out_dir)
    return {"accuracy_vs_queries": out_dir / f"{profile}-accuracy-vs-queries.png",
            "mbd_heatmap": out_dir / f"{profile}-mbd-heatmap.png", "forest": out_dir / f"{profile}-forest.png",
            "frontier": out_dir / f"{profile}-frontier.png", "zsdb3kd_fig6": out_dir / f"{profile}-zsdb3kd-fig6.png"}


def _budget(record: dict) -> int | None:
    params = (record.get("config") or {}).get("method_params") or {}
    budget = params.get("budget")
    return int(budget) if budget is not None else None


def _comparable(record: dict, method: str) -> bool:
    """Reference lines worth drawing beside ``method``: reference rows (teacher / student CE), the other
    variants of the same family (name prefix before the first '-'), and label-only competitors."""
    family = method.split("-")[0]
    return (bool(record.get("reference_row")) or record.get("method", "").split("-")[0] == family
            or record.get("teacher_access") == "labels")


#: accuracy_vs_queries: reference lines within this many points of the curve set the y range.
ZOOM_POINTS = 3.0


def accuracy_vs_queries(records: Iterable[dict], path: str | os.PathLike, *, method: str = MBD) -> Path | None:
    """Plot ``method``'s student accuracy (%) versus queries per pair; returns the PNG path or None.

    Points: every ``milestone_accuracy`` entry, plus the final student at the query budget
    (``config.method_params.budget``) when the record carries its config. None when ``method``
    has no such point in ``records``.
    """
    records = list(records)
    mine = [r for r in records if r.get("method") == method]
    by_x: dict[int, list[float]] = {}
    per_seed: list[tuple[int, list[tuple[int, float]]]] = []
    for r in mine:
        pts = {int(k): _num(v) for k, v in (r.get("milestone_accuracy") or {}).items() if v is not None}
        budget = _budget(r)
        if budget is not None and budget not in pts and r.get("student_accuracy") is not None:
            pts[budget] = float(r["student_accuracy"])
        seed_pts = sorted((x, 100.0 * y) for x, y in pts.items() if math.isfinite(y))
        per_seed.append((int(r["seed"]), seed_pts))
        for x, y in seed_pts:
            by_x.setdefault(x, []).append(y)
    if not by_x:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.0, 4.6), dpi=120)
    xs = sorted(by_x)
    stats = [_mean_std(by_x[x]) for x in xs]
    means = [m for m, _ in stats]
    stds = [s for _, s in stats]
    for seed, pts in sorted(per_seed):
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", color="tab:blue", alpha=0.3, ms=4, zorder=2)
    n_seeds = len(per_seed)
    spread = f"mean ± std over {n_seeds} seeds" if n_seeds > 1 else "1 seed, no spread"
    ax.errorbar(xs, means, yerr=stds if n_seeds > 1 else None, fmt="-o", color="tab:blue", lw=2, ms=6, capsize=4,
                zorder=3, label=f"{method} ({spread})")
    # reference lines: teacher and the other methods of the same dataset/profile
    teacher = [float(r["teacher_accuracy"]) for r in records if r.get("teacher_accuracy") is not None]
    lines = []
    if teacher:
        lines.append(("teacher", 100.0 * _mean_std(teacher)[0], "black", "--"))
    styles = ["tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
    others = sorted({r["method"] for r in records if r.get("method") != method and _comparable(r, method)})
    for i, other in enumerate(others[: len(styles)]):
        accs = [float(r["student_accuracy"]) for r in records if r.get("method") == other]
        lines.append((other, 100.0 * _mean_std(accs)[0], styles[i % len(styles)], ":"))
    # zoom on the curve and the lines near it (paper Fig. 4 spans about one point); lines far away
    # stay in the legend, marked as off the axis, instead of flattening the curve
    lo = min(m - (s if math.isfinite(s) else 0.0) for m, s in stats)
    hi = max(m + (s if math.isfinite(s) else 0.0) for m, s in stats)
    near = [y for _, y, _, _ in lines if lo - ZOOM_POINTS <= y <= hi + ZOOM_POINTS]
    y_min, y_max = min([lo, *near]), max([hi, *near])
    pad = max(0.25, 0.08 * (y_max - y_min))
    ax.set_ylim(y_min - pad, y_max + pad)
    for label, y, color, ls in lines:
        where = "" if y_min - pad <= y <= y_max + pad else (", below the axis" if y < y_min else ", above the axis")
        ax.axhline(y, color=color, ls=ls, lw=1.3, label=f"{label} ({y:.1f}%{where})", zorder=1)
    if len(xs) > 1 and xs[0] > 0 and xs[-1] / xs[0] >= 8:
        ax.set_xscale("log")
    if len(xs) == 1:
        ax.set_xlim(xs[0] * 0.5, xs[0] * 1.5)
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x:,}" for x in xs])
    ax.minorticks_off()
    ax.set_xlabel("query budget per (sample, class) pair")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title(f"{method}: accuracy vs. queries ({_title_suffix(mine)})", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), framealpha=0.9, borderaxespad=0.0)
    if len(xs) == 1:
        ax.text(0.01, 0.01, "only the final student (milestone students are off in this profile)",
                transform=ax.transAxes, fontsize=7, color="0.4", va="bottom")
    return _save(fig, path)


def class_distance_heatmap(records: Iterable[dict], path: str | os.PathLike, *, method: str = MBD,
                           table: str = "class_distance") -> Path | None:
    """Heatmap of ``method``'s mean class-to-class boundary distance (seed average); PNG path or None."""
    import numpy as np

    mats = []
    mine = []
    for r in records:
        if r.get("method") != method:
            continue
        t = (r.get("tables") or {}).get(table)
        if t:
            mats.append(np.array([[_num(v) for v in row] for row in t], dtype=float))
            mine.append(r)
    if not mats or len({m.shape for m in mats}) != 1:
        return None
    stack = np.stack(mats)
    with np.errstate(all="ignore"):
        finite = np.isfinite(stack)
        mean = np.where(finite.any(0), np.nansum(np.where(finite, stack, 0.0), 0) / np.maximum(finite.sum(0), 1), np.nan)
    n = mean.shape[0]
    plt = _pyplot()
    side = min(11.0, max(5.5, 0.45 * n + 2.5))
    fig, ax = plt.subplots(figsize=(side + 1.2, side), dpi=120)
    cmap = plt.get_cmap("viridis").with_extremes(bad="0.85")
    im = ax.imshow(np.ma.masked_invalid(mean), cmap=cmap, interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label("mean minimal boundary distance (L2, pixels in [0, 1])")
    if n <= 20:
        ticks = list(range(n))
        vmin, vmax = np.nanmin(mean), np.nanmax(mean)
        for i in range(n):
            for j in range(n):
                v = mean[i, j]
                if math.isfinite(v):
                    light = (v - vmin) / max(vmax - vmin, 1e-12) > 0.6
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=max(5, 10 - n // 4),
                            color="black" if light else "white")
                else:
                    ax.text(j, i, "–", ha="center", va="center", fontsize=8, color="0.4")
    else:
        ticks = list(range(0, n, 10))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xlabel("boundary with class n")
    ax.set_ylabel("samples of class m")
    ax.set_title(f"{method}: mean minimal boundary distance between classes\n({_title_suffix(mine)})", fontsize=10)
    return _save(fig, path)


def write_plots(records: Iterable[dict], out_dir: str | os.PathLike, profile: str) -> list[Path]:
    """Write the plots of one (dataset, profile) into ``out_dir``; returns the paths written.

    A plot whose data is absent (no db3kd-mbd record; no student-ce record for the forest plot; no
    label-only record for the frontier) is not written, and a stale file of that
    name is removed so the folder always matches the records.
    """
    records = list(records)
    paths = plot_paths(out_dir, profile)
    written = []
    for key, fn in (("accuracy_vs_queries", accuracy_vs_queries), ("mbd_heatmap", class_distance_heatmap),
                    ("forest", forest_plot), ("frontier", frontier), ("zsdb3kd_fig6", zsdb3kd_curves)):
        p = fn(records, paths[key])
        if p is not None:
            written.append(p)
        elif paths[key].exists():
            paths[key].unlink()
    return written


def zsdb3kd_series(records: Iterable[dict]) -> dict[str, dict]:
    """Paper Fig. 6's lines from ZSDB3KD records with ``tables["fig6"]``, one per configuration (record
    variant and where its parameters came from: tuned on val or the profile's defaults), never pooled
    across configurations: ``{label: {"per_class": {k: [acc % per seed]}, "iterations": {t: [...]},
    "iteration_per_class": int, "records": [...]}}``; the label ends with the seed count."""
    from db3kd.leaderboard import params_label
    from db3kd.records import record_variant

    groups: dict[tuple[str, str], list[tuple[dict, dict]]] = {}
    for r in records:
        c = (r.get("tables") or {}).get("fig6") if r.get("method") == "zsdb3kd" else None
        if c:
            groups.setdefault((record_variant(r), params_label(r)), []).append((r, c))
    out = {}
    for (variant, params), members in sorted(groups.items()):
        n = len({int(r["seed"]) for r, _ in members})
        series = {"records": [r for r, _ in members], "iteration_per_class": members[0][1].get("iteration_per_class")}
        for key in ("per_class", "iterations"):
            xs = sorted({int(k) for _, c in members for k in c.get(key, {})})
            series[key] = {x: [100 * _num(c[key][str(x)]) for _, c in members if str(x) in c.get(key, {})] for x in xs}
        out[f"{variant}: {params} ({n} seed{'s' if n != 1 else ''})"] = series
    return out


def zsdb3kd_curves(records: Iterable[dict], path: str | os.PathLike) -> Path | None:
    """Paper Fig. 6 (:func:`zsdb3kd_series`): student test accuracy (%) against pseudo samples per
    class (left) and against generation iterations (right), one line per configuration, the mean over
    its seeds with min-max bars where it has several; PNG path or None."""
    lines = zsdb3kd_series(records)
    if not lines:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for g, (label, series) in enumerate(lines.items()):
        color = f"C{g % 10}"
        for ax, key in ((axes[0], "per_class"), (axes[1], "iterations")):
            xs = list(series[key])
            mean = [sum(v) / len(v) for v in series[key].values()]
            ax.plot(xs, mean, marker="o", color=color, label=label)
            if len(series["records"]) > 1:
                ax.vlines(xs, [min(v) for v in series[key].values()], [max(v) for v in series[key].values()],
                          color=color, alpha=0.4)
            for x, m in zip(xs, mean):
                ax.annotate(f"{m:.1f}", (x, m), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7,
                            color=color)
    for ax, key, xlabel in ((axes[0], "per_class", "pseudo samples per class (first k of the transfer set)"),
                            (axes[1], "iterations", "generation iterations")):
        xs = sorted({x for series in lines.values() for x in series[key]})
        ax.set_xlabel(xlabel)
        ax.set_ylabel("student test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.margins(x=0.08, y=0.15)
        if key == "per_class":
            ax.set_xscale("log")
            ax.minorticks_off()
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
    pers = sorted({s["iteration_per_class"] for s in lines.values()} - {None})
    axes[1].set_title(f"{', '.join(map(str, pers))} pseudo samples per class at each iteration, labelled again",
                      fontsize=9)
    axes[0].set_title("final transfer set and its soft labels", fontsize=9)
    axes[1].legend(loc="lower right", fontsize=7)  # accuracy rises with iterations: that corner stays empty
    fig.suptitle(f"ZSDB3KD, paper Fig. 6 ({_title_suffix([r for s in lines.values() for r in s['records']])})",
                 fontsize=10)
    return _save(fig, path)


def forest_plot(records: Iterable[dict], path: str | os.PathLike, *, control: str = "student-ce") -> Path | None:
    """Forest plot of every method's difference to ``control`` (points of test accuracy); PNG path or None.

    Per method: the mean of (method - control) over the seeds both have, with the 95% t interval of
    that mean (:func:`db3kd.stats.paired_test`); filled marker when the Holm-corrected two-sided p
    is below :data:`db3kd.stats.ALPHA`. One shared seed: a hollow point and "1 seed, no interval".
    None when ``control`` has no record or no other method shares a seed with it.
    """
    from db3kd import stats

    from db3kd.records import record_variant

    records = [r for r in records if record_variant(r) == "default"]  # one point per method: its default configuration
    acc = stats.per_seed(records)
    if control not in acc:
        return None
    key = control.replace("-", "_")
    compared = stats.compare_methods(acc, controls=(control,))
    rows = [(m, c[f"diff_vs_{key}"], c[f"p_vs_{key}"]) for m, c in compared.items()
            if m != control and c.get(f"diff_vs_{key}") and c[f"diff_vs_{key}"]["n_pairs"] > 0]
    if not rows:
        return None
    rows.sort(key=lambda t: t[1]["mean_diff"])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 0.38 * len(rows) + 1.8), dpi=120)
    for i, (method, d, p) in enumerate(rows):
        x = 100.0 * d["mean_diff"]
        if d["n_pairs"] >= 2 and math.isfinite(d["ci95_low"]):
            lo, hi = 100.0 * d["ci95_low"], 100.0 * d["ci95_high"]
            sig = math.isfinite(p) and p < stats.ALPHA
            ax.errorbar([x], [i], xerr=[[x - lo], [hi - x]], fmt="o", color="tab:blue" if sig else "0.35",
                        capsize=3, ms=5)
            label = f"{method} (n={d['n_pairs']}, p={p:.3g})" if math.isfinite(p) else f"{method} (n={d['n_pairs']})"
        else:
            ax.plot([x], [i], "o", mfc="none", color="0.35", ms=5)
            label = f"{method} (1 seed, no interval)"
        rows[i] = (label, d, p)
    ax.axvline(0.0, color="black", lw=1, ls="--")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r[0] for r in rows], fontsize=8)
    ax.set_xlabel(f"test accuracy minus {control} (percentage points), paired over seeds, 95% t interval")
    max_n = max(r[1]["n_pairs"] for r in rows)
    note = (f"{stats.TEST_NAME}; blue: corrected p < {stats.ALPHA}" if max_n >= 2
            else "1 seed per method: single differences, no intervals, no tests")
    ax.set_title(f"difference to {control} ({_title_suffix(records)})\n{note}", fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, path)


def frontier_points(records: Iterable[dict]) -> dict[tuple[str, str], dict]:
    """The frontier's points from run records: {(method, variant): {"x", "acc", "n", "sort"}}.

    Label-only methods (``teacher_access == "labels"``) with queries only. Each record gives its
    final student at ``queries_per_sample`` (variant ``final``, or the method's own final label:
    ``K=<votes>`` for vote-kd, ``<budget>/pair`` for MBD) and, where the record carries
    ``tables["milestone_queries_per_sample"]``, one point per ``milestone_accuracy`` entry at that
    milestone's queries per sample (a milestone equal to the final one is the final student).
    x: mean queries per training sample over seeds; acc: list of accuracies (%), one per seed.
    """
    points: dict[tuple[str, str], dict] = {}

    def add(method: str, variant: str, x: float, acc: float, sort: float) -> None:
        p = points.setdefault((method, variant), {"xs": [], "acc": [], "sort": sort})
        p["xs"].append(float(x))
        p["acc"].append(100.0 * float(acc))

    for r in records:
        if r.get("teacher_access") != "labels" or r.get("student_accuracy") is None:
            continue
        q = _num(r.get("queries_per_sample"))
        if not (math.isfinite(q) and q > 0):
            continue
        method = str(r["method"])
        params = (r.get("config") or {}).get("method_params") or {}
        unit = "K=" if "votes" in params else ""
        suffix = "/pair" if "budget" in params else ""
        final = params.get("votes", params.get("budget"))
        final_label = f"{unit}{int(final)}{suffix}" if final is not None else "final"
        add(method, final_label, q, float(r["student_accuracy"]), float(final or 0))
        at = (r.get("tables") or {}).get("milestone_queries_per_sample") or {}
        for k, acc in (r.get("milestone_accuracy") or {}).items():
            if acc is None or str(k) not in at or (final is not None and int(k) == int(final)):
                continue
            add(method, f"{unit}{int(k)}{suffix}", float(at[str(k)]), float(acc), float(k))
    for p in points.values():
        p["x"] = sum(p["xs"]) / len(p["xs"])
        p["n"] = len(p["acc"])
    return points


def frontier(records: Iterable[dict], path: str | os.PathLike) -> Path | None:
    """Student accuracy (%) against teacher queries per training sample (log x) for every label-only
    method of ``records`` (one dataset and profile), from :func:`frontier_points`: one marker per
    variant, the variants of a method joined in query order, error bars (sample std over seeds)
    where a variant has several seeds; the legend gives each method's seed count ("1 seed" when
    n = 1) and, for few-shot or zero-shot methods, the kind of transfer set their per-sample
    counts refer to. Teacher and student-ce accuracies are horizontal lines. Returns the PNG path, or None
    when no label-only record spent queries."""
    records = list(records)
    points = frontier_points(records)
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.0, 5.0), dpi=120)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    methods = sorted({m for m, _ in points}, key=lambda m: min(p["x"] for (mm, _), p in points.items() if mm == m))
    for i, method in enumerate(methods):
        mine = sorted(((v, p) for (m, v), p in points.items() if m == method), key=lambda vp: (vp[1]["x"], vp[1]["sort"]))
        xs = [p["x"] for _, p in mine]
        stats = [_mean_std(p["acc"]) for _, p in mine]
        ns = sorted({p["n"] for _, p in mine})
        seeds = (f"{ns[0]} seed" if ns == [1] else f"mean ± std over {ns[0]} seeds" if len(ns) == 1
                 else f"{ns[0]}-{ns[-1]} seeds per point")
        data = {str(r.get("data", "full")) for r in records if r.get("method") == method} - {"full"}
        if data:  # few-shot / zero-shot methods count queries per image of their own transfer set
            seeds += f"; transfer set: {', '.join(sorted(data))}"
        color, marker = colors[i % len(colors)], markers[i % len(markers)]
        ax.errorbar(xs, [m for m, _ in stats], yerr=[s if p["n"] > 1 else 0.0 for (_, s), (_, p) in zip(stats, mine)],
                    fmt="-" + marker, color=color, lw=1.5, ms=6, capsize=3, label=f"{method} ({seeds})", zorder=3)
        if len(mine) > 1 or mine[0][0] != "final":
            for (variant, _), x, (m, _) in zip(mine, xs, stats):
                ax.annotate(variant, (x, m), textcoords="offset points", xytext=(4, 5), fontsize=7, color=color)
    lines = []
    teacher = [float(r["teacher_accuracy"]) for r in records if r.get("teacher_accuracy") is not None]
    if teacher:
        lines.append(("teacher", 100.0 * _mean_std(teacher)[0], "black", "--"))
    ce = [float(r["student_accuracy"]) for r in records if r.get("method") == "student-ce"]
    if ce:
        lines.append((f"student-ce, no queries ({'1 seed' if len(ce) == 1 else f'mean of {len(ce)} seeds'})",
                      100.0 * _mean_std(ce)[0], "0.4", ":"))
    for label, y, color, ls in lines:
        ax.axhline(y, color=color, ls=ls, lw=1.2, label=f"{label}: {y:.2f}%", zorder=1)
    ax.set_xscale("log")
    all_x = [p["x"] for p in points.values()]
    ax.set_xlim(min(all_x) / 2.0, max(all_x) * 3.0)  # room for the variant labels
    ax.set_xlabel("teacher queries per training sample (log scale, calibration included)")
    ax.set_ylabel("student test accuracy (%)")
    synthetic = any(str(x.get("data_source", "official")) != "official" for x in records)
    r0 = records[0]
    ax.set_title(f"Accuracy vs. queries, label-only methods ({r0['dataset']}, profile {r0['profile']}"
                 f"{', SYNTHETIC DATA' if synthetic else ''})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), framealpha=0.9, borderaxespad=0.0)
    return _save(fig, path)


def distance_vs_queries(curves: dict[str, dict[int, float]], path: str | os.PathLike, *, title: str = "",
                        reference: dict[str, float] | None = None) -> Path:
    """One line per estimator: ``curves[name] = {queries per pair: mean distance}`` (L2 pixel units);
    ``reference`` adds horizontal lines (e.g. BD's mean distance). Returns the PNG path."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        q = sorted(curve)
        ax.plot(q, [curve[k] for k in q], marker="o", label=name)
    for name, value in (reference or {}).items():
        ax.axhline(value, linestyle="--", color="grey", linewidth=1)
        ax.annotate(name, (ax.get_xlim()[0], value), textcoords="offset points", xytext=(4, 3), fontsize=8)
    ax.set_xlabel("teacher queries per (sample, target class) pair")
    ax.set_ylabel("mean minimal boundary distance (L2)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _save(fig, path) -> Path:
    """Write ``fig`` as PNG to ``path`` (folders created) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
