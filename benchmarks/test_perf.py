"""Performance of the query engine: oracle efficiency, query savings, scaling.

Run: ``uv run pytest benchmarks -m perf --data-root ../shared/datasets`` (add
``--perf-sizes 1000,4000,16000`` or set ``DB3KD_PERF_SIZES`` for the full scaling sweep; default 1000,4000). Writes
``results/performance.md`` and ``results/performance.json``.

Definitions (measured in this process, on this machine):

* **teacher peak throughput**: images per second of the teacher's bare forward pass under
  ``torch.inference_mode`` at its best batch size (swept over powers of two).
* **oracle efficiency**: images the oracle answered per second of label construction (BD or
  MBD, everything included: probe construction, validation, bookkeeping) divided by that peak.
* **bd_query_ratio**: our BD queries divided by per-reference bisection's (every reference of a
  pair bisected independently to the same tolerance, no pruning) on the same samples; the
  distances agree within the tolerance (checked).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.perf

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
_REPORT: dict = {}


def _mnist_setup(data_root):
    from db3kd.config import resolve
    from db3kd.data import load_dataset
    from db3kd.errors import DatasetNotFoundError
    from db3kd.teacher import get_teacher

    config = resolve("mnist", "db3kd-bd", "cpu", 0)
    try:
        splits = load_dataset("mnist", data_root)
    except DatasetNotFoundError as exc:
        pytest.skip(str(exc).splitlines()[0])
    teacher = get_teacher(splits, config.teacher, seed=0)
    return config, splits, teacher.model


def peak_throughput(model, shape, batch_sizes=(32, 64, 128, 256, 512, 1024, 2048, 4096), seconds=1.0):
    """{batch size: images/s} of the bare forward pass, and the best (batch, images/s)."""
    rates = {}
    model.eval()
    with torch.inference_mode():
        for bs in batch_sizes:
            x = torch.rand(bs, *shape)
            model(x)
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                model(x)
                n += bs
            rates[bs] = n / (time.perf_counter() - start)
    best = max(rates, key=rates.get)
    return rates, best, rates[best]


@pytest.fixture(scope="module")
def mnist(request):
    data_root = request.config.getoption("--data-root", default=None) or os.environ.get("DB3KD_DATA")
    return _mnist_setup(data_root)


def _samples(splits, n, refs_per_class, seed=0):
    from db3kd.methods.decision_based import pick_references
    from db3kd.runner import select_subset

    idx = select_subset(splits.train_y, n)
    x = splits.train_x[idx].float().div(255.0)
    y = splits.train_y[idx]
    ref_idx = pick_references(y, 10, refs_per_class, seed)
    return x, y, x[ref_idx], y[ref_idx]


def test_oracle_efficiency_bd_and_mbd(mnist, benchmark):
    from db3kd import HardLabelOracle
    from db3kd.robustness import boundary_search, minimal_boundary_search

    config, splits, model = mnist
    shape = tuple(splits.train_x.shape[1:])
    rates, best_batch, peak = peak_throughput(model, shape)
    x, y, refs, ref_labels = _samples(splits, 1000, 20)

    def bd():
        oracle = HardLabelOracle(model, batch_size=best_batch, input_shape=shape)
        start = time.perf_counter()
        res = boundary_search(oracle, x, y, refs, ref_labels, 10, tol=1e-4)
        return oracle.queries / (time.perf_counter() - start), res

    bd_rate, bd_res = benchmark.pedantic(bd, rounds=1, iterations=1)
    xm, ym, refs_m, ref_labels_m = _samples(splits, 200, 10)
    oracle = HardLabelOracle(model, batch_size=best_batch, input_shape=shape)
    start = time.perf_counter()
    mbd_res = minimal_boundary_search(oracle, xm, ym, refs_m, ref_labels_m, 10, budget=600, num_directions=40,
                                      tol=1e-4, milestones=(150, 300, 600))
    mbd_rate = oracle.queries / (time.perf_counter() - start)
    _REPORT.update(
        teacher_peak_images_per_second=peak, teacher_best_batch=best_batch,
        teacher_throughput_by_batch={str(k): v for k, v in rates.items()},
        bd_images_per_second=bd_rate, mbd_images_per_second=mbd_rate,
        oracle_efficiency_bd=bd_rate / peak, oracle_efficiency_mbd=mbd_rate / peak,
        bd_queries_per_pair=float(bd_res.queries[torch.isfinite(bd_res.distances)].float().mean()),
        bd_mean_distance=float(bd_res.distances[torch.isfinite(bd_res.distances)].mean()),
        mbd_milestones={str(m): {
            "mean_distance": float(mbd_res.distances_at[k][torch.isfinite(mbd_res.distances_at[k])].mean())}
            for k, m in enumerate(mbd_res.milestones)},
        mbd_queries_per_pair=float(mbd_res.queries[torch.isfinite(mbd_res.distances)].float().mean()),
    )
    benchmark.extra_info.update({k: v for k, v in _REPORT.items() if isinstance(v, float)})
    _write_report()
    assert _REPORT["oracle_efficiency_bd"] > 0 and _REPORT["oracle_efficiency_mbd"] > 0


def test_bd_query_ratio_against_per_reference_bisection(mnist, benchmark):
    from db3kd import HardLabelOracle
    from db3kd.robustness import _bisect, boundary_search

    config, splits, model = mnist
    shape = tuple(splits.train_x.shape[1:])
    x, y, refs, ref_labels = _samples(splits, 100, 20)
    tol = 1e-4
    ours = boundary_search(HardLabelOracle(model, batch_size=256), x, y, refs, ref_labels, 10, tol=tol)

    def per_reference():
        # every (sample, reference) row is its own group: plain bisection, no pruning, no capping
        oracle = HardLabelOracle(model, batch_size=256)
        keep = oracle(refs) == ref_labels
        r, rl = refs[keep], ref_labels[keep]
        pred = oracle(x)
        flat_x, flat_r = x.reshape(len(x), -1), r.reshape(len(r), -1)
        bi, ri = torch.meshgrid(torch.arange(len(x)), torch.arange(len(r)), indexing="ij")
        bi, ri = bi.reshape(-1), ri.reshape(-1)
        rows = (rl[ri] != y[bi]) & ~((pred[bi] != y[bi]) & (rl[ri] == pred[bi]))
        bi, ri = bi[rows], ri[rows]
        length = torch.cdist(flat_x, flat_r, compute_mode="donot_use_mm_for_euclid_dist")[bi, ri]
        used = torch.zeros(len(bi), dtype=torch.int64)
        hi, _ = _bisect(oracle, flat_x, flat_r, bi, ri, length, torch.zeros_like(length), length.clone(),
                        torch.arange(len(bi)), len(bi), rl[ri], True, tol, used, float("inf"), shape)
        dist = torch.full((len(x), 10), float("inf"))
        dist.view(-1).scatter_reduce_(0, bi * 10 + rl[ri], hi, reduce="amin", include_self=True)
        return int(used.sum()), dist

    naive_queries, naive_dist = benchmark.pedantic(per_reference, rounds=1, iterations=1)
    finite = torch.isfinite(naive_dist) & torch.isfinite(ours.distances)
    assert (ours.distances[finite] - naive_dist[finite]).abs().max() <= 2 * tol + 1e-5
    ratio = int(ours.queries.sum()) / naive_queries
    _REPORT.update(bd_query_ratio=ratio, bd_queries_ours=int(ours.queries.sum()), bd_queries_per_reference=naive_queries,
                   bd_max_distance_difference=float((ours.distances[finite] - naive_dist[finite]).abs().max()))
    benchmark.extra_info["bd_query_ratio"] = ratio
    _write_report()
    assert ratio <= 1 / 3


_SCALING_SCRIPT = r"""
import json, resource, sys, time, torch
from db3kd import HardLabelOracle
from db3kd.data import load_dataset
from db3kd.config import resolve
from db3kd.teacher import get_teacher
from db3kd.methods.decision_based import pick_references
from db3kd.runner import select_subset
from db3kd.robustness import boundary_search
n, root = int(sys.argv[1]), sys.argv[2]
splits = load_dataset("mnist", root)
model = get_teacher(splits, resolve("mnist", "db3kd-bd", "cpu", 0).teacher, seed=0).model
idx = select_subset(splits.train_y, n)
x, y = splits.train_x[idx].float().div(255.0), splits.train_y[idx]
ref = pick_references(y, 10, 20, 0)
oracle = HardLabelOracle(model, batch_size=256)
start = time.perf_counter()
boundary_search(oracle, x, y, x[ref], y[ref], 10, tol=1e-4)
print(json.dumps({"samples": n, "wall_seconds": time.perf_counter() - start, "queries": oracle.queries,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def test_label_construction_scaling(request, mnist):
    """Wall time and peak memory of BD label construction (cpu profile) for growing sample counts."""
    chosen = request.config.getoption("--perf-sizes", default=None) or os.environ.get("DB3KD_PERF_SIZES", "1000,4000")
    sizes = [int(s) for s in str(chosen).split(",")]
    data_root = request.config.getoption("--data-root", default=None) or os.environ.get("DB3KD_DATA") or "data"
    rows = []
    for n in sizes:
        out = subprocess.run([sys.executable, "-c", _SCALING_SCRIPT, str(n), str(data_root)], capture_output=True,
                             text=True, check=True, cwd=os.getcwd())
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    _REPORT["bd_scaling"] = rows
    _write_report()
    assert all(r["queries"] > 0 for r in rows)


def _write_report():
    RESULTS.mkdir(exist_ok=True)
    report = dict(_REPORT)
    report["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, " + (
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
    report["command"] = "uv run pytest benchmarks -m perf --data-root ../shared/datasets"
    (RESULTS / "performance.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    lines = ["# Query-engine performance", "", f"Command: `{report['command']}`  ", f"Machine: {report['machine']}  ",
             "Teacher: the cpu-profile MNIST LeNet-5 (seed 0); BD on 1,000 training samples, 20 references per class, "
             "tol 1e-4; MBD on 200 samples, 10 references per class, budget 600, Q = 40.", ""]
    for key in ("teacher_peak_images_per_second", "teacher_best_batch", "bd_images_per_second",
                "mbd_images_per_second", "oracle_efficiency_bd", "oracle_efficiency_mbd", "bd_query_ratio",
                "bd_queries_ours", "bd_queries_per_reference", "bd_max_distance_difference", "bd_queries_per_pair",
                "bd_mean_distance", "mbd_queries_per_pair"):
        if key in report:
            value = report[key]
            lines.append(f"- {key}: {value:.4g}" if isinstance(value, float) else f"- {key}: {value}")
    if "mbd_milestones" in report:
        lines += ["", "MBD mean distance at each query milestone (queries per pair):", ""]
        lines += [f"- {m}: {v['mean_distance']:.4f}" for m, v in report["mbd_milestones"].items()]
    if "bd_scaling" in report:
        lines += ["", "| samples | wall s | queries | peak RSS MiB |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['samples']} | {r['wall_seconds']:.1f} | {r['queries']} | {r['peak_rss_mib']:.0f} |"
                  for r in report["bd_scaling"]]
    (RESULTS / "performance.md").write_text("\n".join(lines) + "\n")
