"""Performance of the query engine: oracle efficiency, query savings, scaling.

Run: ``uv run pytest benchmarks -m perf --data-root ../shared/datasets`` (add
``--perf-sizes 1000,4000,16000`` or set ``DB3KD_PERF_SIZES`` for the full scaling sweep; default 1000,4000). Writes
``results/performance.md`` and ``results/performance.json``.

Definitions (measured in this process, on this machine):

* **teacher peak throughput**: images per second of the teacher's bare forward pass under
  ``torch.inference_mode`` at its best batch size (swept over powers of two, best of three
  1-second windows) and best memory layout (``contiguous`` and ``channels_last`` both tried),
  measured before and after label construction; the higher is used.
* **teacher layout speedup**: the peak in the fast layout built-in teachers use on this device
  (``channels_last`` on CPU, :mod:`db3kd.layout`) over the default layout's peak, same run.
* **oracle efficiency**: images the oracle answered per second of label construction (BD, MBD
  or ZSDB3KD generation, everything included: probe construction, validation, bookkeeping)
  divided by the teacher's bare forward rate in the peak's layout and at its best batch size,
  measured in 1-second windows before, between and after the chunks of label construction (the
  mean of those windows; :func:`interleaved_run`). The machine's speed drifts by tens of per cent
  within a minute, so a peak measured minutes away would mostly measure the drift; the sweep's
  peak is reported beside it (``oracle_efficiency_*_vs_sweep_peak``). Asserted >= 0.9 for BD and
  MBD; issue 14's goal is 0.95. Label construction runs with the engine's default chunk sizes.
* **MBD against Sign-OPT**: the same walk with every estimator (``geo``, the default, ``tangent``,
  plain Sign-OPT's, ``hsja``); the default's mean distance must be no larger than Sign-OPT's at
  every query milestone (plot: ``results/performance-mbd-estimators.png``).
* **closed-form check** (``mbd_exact_ratio_2k``, goal <= 1.10): mean ratio reached / exact minimal
  distance on the 784-pixel linear teacher of :mod:`db3kd.search.closed_form` at 2,000 queries per
  pair, default estimator and Q = 200; the table gives every estimator at 500 / 1k / 2k / 5k on the
  linear and the ball teacher.
* **MBD against HopSkipJump at equal queries** (``mbd_vs_hsja_1k`` / ``_2k`` / ``_5k``, goal <= 0.85):
  ART's HopSkipJump (extra ``crosscheck``; targeted L2, init_eval 100) through our oracle, started at
  our BD point of each sample's closest class, with max_iter chosen so that it spends about 1k, 2k
  and 5k queries per pair; our mean distance on the same pairs at a per-pair budget equal to
  HopSkipJump's mean queries (ours includes the BD search, HopSkipJump's does not) divided by
  HopSkipJump's mean distance. A white-box bound beside it: C&W-L2 (Carlini and Wagner 2017, Adam
  on the tanh box parametrisation, gradients of the teacher) on the same pairs.
* **engine ceiling** (``engine_ceiling_bd_qps``, ``engine_ceiling_mbd_qps``): queries per second of
  BD and MBD (budget 2000, Q = 200) against a nearly free teacher (a 784 -> 10 linear map) on 2
  threads; ``engine_ceiling_ratio_mbd`` divides the MBD rate by the rate at which ``torch.randn``
  alone fills probes of the MBD probe block's shape in the same process. Asserted against the
  goals of issue 14 (BD >= 300k, MBD >= 120k, ratio >= 0.5); meaningful on a quiet machine only.
* GPU section: ``benchmarks/test_perf_gpu.py`` (``-m "perf and gpu"``).
* **bd_query_ratio**: our BD queries divided by per-reference bisection's (every reference of a
  pair bisected independently to the same tolerance, no pruning) on the same samples; the
  distances agree within the tolerance (checked).
* **ray_overhead**: BD label construction on 4,000 samples as chunk tasks on 2 local Ray workers
  (one thread each) divided by the in-process run with 2 threads (goal <= 1.1; :func:`test_ray_overhead`).
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


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_throughput(model, shape, batch_sizes=(32, 64, 128, 256, 512, 1024, 2048, 4096), seconds=1.0, repeats=3,
                    device="cpu"):
    """{batch size: images/s} of the bare forward pass on ``device`` (best of ``repeats`` windows,
    synchronised on a GPU), and the best (batch, images/s)."""
    rates = {}
    model.eval()
    with torch.inference_mode():
        for bs in batch_sizes:
            x = torch.rand(bs, *shape, device=device)
            model(x)
            _sync(device)
            best = 0.0
            for _ in range(repeats):
                n, start = 0, time.perf_counter()
                while time.perf_counter() - start < seconds:
                    model(x)
                    n += bs
                _sync(device)
                best = max(best, n / (time.perf_counter() - start))
            rates[bs] = best
    top = max(rates, key=rates.get)
    return rates, top, rates[top]


@pytest.fixture(scope="module")
def mnist(request):
    _REPORT["command"] = " ".join(["uv run pytest", *request.config.invocation_params.args])
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


# MBD settings shared by the efficiency run, the Sign-OPT comparison and the HopSkipJump cross-check
MBD_SAMPLES, MBD_REFS, MBD_BUDGET, MBD_Q, MBD_MILESTONES = 200, 10, 600, 40, (150, 300, 600)


def _timed_mbd(model, shape, batch, estimator, samples):
    from db3kd import HardLabelOracle
    from db3kd.robustness import minimal_boundary_search

    x, y, refs, ref_labels = samples
    oracle = HardLabelOracle(model, batch_size=batch, input_shape=shape)
    start = time.perf_counter()
    res = minimal_boundary_search(oracle, x, y, refs, ref_labels, 10, budget=MBD_BUDGET, num_directions=MBD_Q,
                                  tol=1e-4, milestones=MBD_MILESTONES, estimator=estimator)
    return res, oracle.queries, time.perf_counter() - start


def forward_window(model, shape, batch, seconds=1.0) -> float:
    """Images/s of the bare forward pass at ``batch`` during one window of ``seconds``."""
    x = torch.rand(batch, *shape)
    with torch.inference_mode():
        model(x)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(x)
            n += batch
        return n / (time.perf_counter() - start)


def interleaved_run(search, pieces, model, shape, batch, tmp):
    """Label construction ``search`` (boundary_search or minimal_boundary_search with its arguments bound)
    run one chunk at a time (``chunks=[k]`` into ``tmp``; ``pieces`` chunks after the shared answers),
    with a window of the bare forward pass (``model``: the peak's layout, ``batch``: its best batch
    size) before, between and after the chunks. The machine's speed drifts by tens of per cent within
    a minute here, so an efficiency against a peak measured minutes away mostly measures the drift;
    against the windows that bracket it, it measures the engine.

    Returns (result assembled from the chunk files (no further queries), images answered, seconds of
    label construction, window rates)."""
    windows = [forward_window(model, shape, batch)]
    images, seconds = 0, 0.0
    for k in [[]] + [[k] for k in range(pieces)]:
        start = time.perf_counter()
        images += search(checkpoint_dir=tmp, chunks=k)
        seconds += time.perf_counter() - start
        if k:
            windows.append(forward_window(model, shape, batch))
    return search(checkpoint_dir=tmp), images, seconds, windows


def _mean_finite(t: torch.Tensor) -> float:
    return float(t[torch.isfinite(t)].float().mean())


@pytest.fixture(scope="module")
def layout_peaks(mnist):
    """{memory format: (images/s by batch size, best batch, best images/s)} of the teacher's bare forward
    pass, a copy of the same weights in each layout of :data:`db3kd.layout.FORMATS`, measured in turn."""
    import copy

    from db3kd.layout import FORMATS

    config, splits, model = mnist
    shape = tuple(splits.train_x.shape[1:])
    return {name: peak_throughput(copy.deepcopy(model).to(memory_format=fmt), shape) for name, fmt in FORMATS.items()}


@pytest.fixture(scope="module")
def peak(layout_peaks):
    """The best (rates, batch, images/s) over every layout and batch size tried: an oracle efficiency
    measured against it cannot exceed 1 because a layout or batch size was left out."""
    return max(layout_peaks.values(), key=lambda p: p[2])


@pytest.fixture(scope="module")
def peak_model(mnist, layout_peaks, peak):
    """A copy of the teacher in the peak's layout (the windows of :func:`interleaved_run`)."""
    import copy

    from db3kd.layout import FORMATS

    name = next(n for n, p in layout_peaks.items() if p is peak)
    return copy.deepcopy(mnist[2]).to(memory_format=FORMATS[name])


def test_teacher_layout_speedup(layout_peaks):
    """``teacher_peak_images_per_second`` of the LeNet-5 teacher in its fast layout (the one built-in
    teachers use on this device, :func:`db3kd.layout.memory_format_name`) and ``teacher_layout_speedup``:
    that peak over the default (contiguous) layout's peak, both measured in this process."""
    from db3kd.layout import memory_format_name

    fast = memory_format_name("cpu")
    fast_peak, default_peak = layout_peaks[fast][2], layout_peaks["contiguous"][2]
    _REPORT.update(
        teacher_fast_layout=fast, teacher_peak_fast_layout=fast_peak, teacher_peak_default_layout=default_peak,
        teacher_layout_speedup=fast_peak / default_peak,
        teacher_throughput_by_layout={name: {str(k): v for k, v in rates.items()} for name, (rates, _, _) in layout_peaks.items()},
    )
    _REPORT.setdefault("teacher_peak_images_per_second", fast_peak)
    _write_report()
    assert _REPORT["teacher_layout_speedup"] >= 1.8, _REPORT["teacher_layout_speedup"]


@pytest.fixture(scope="module")
def mbd_ours(mnist, peak, peak_model, tmp_path_factory):
    """Our MBD (default estimator ``geo``, default chunk size) on MBD_SAMPLES training samples, one chunk at a
    time between forward windows (:func:`interleaved_run`): (samples, result, queries, seconds, windows)."""
    from functools import partial

    from db3kd import HardLabelOracle
    from db3kd.robustness import minimal_boundary_search, plan_chunks

    config, splits, model = mnist
    shape = tuple(splits.train_x.shape[1:])
    samples = _samples(splits, MBD_SAMPLES, MBD_REFS)
    oracle = HardLabelOracle(model, batch_size=peak[1], input_shape=shape)
    search = partial(minimal_boundary_search, oracle, *samples, 10, budget=MBD_BUDGET, num_directions=MBD_Q, tol=1e-4,
                     milestones=MBD_MILESTONES)
    pieces = len(plan_chunks(MBD_SAMPLES, _default("minimal_boundary_search", "chunk_size")))
    return (samples, *interleaved_run(search, pieces, peak_model, shape, peak[1], tmp_path_factory.mktemp("mbd")))


def _default(function: str, name: str):
    import inspect

    import db3kd.robustness

    return inspect.signature(getattr(db3kd.robustness, function)).parameters[name].default


def test_oracle_efficiency_bd_mbd_and_generation(mnist, peak, peak_model, mbd_ours, benchmark, tmp_path):
    from functools import partial

    from db3kd import HardLabelOracle
    from db3kd.robustness import boundary_search, plan_chunks
    from db3kd.zeroshot import GenerationConfig, generate_pseudo_samples

    config, splits, model = mnist
    shape = tuple(splits.train_x.shape[1:])
    rates, best_batch, peak_before = peak
    samples = _samples(splits, 1000, 20)

    def bd():
        oracle = HardLabelOracle(model, batch_size=best_batch, input_shape=shape)
        search = partial(boundary_search, oracle, *samples, 10, tol=1e-4)
        pieces = len(plan_chunks(1000, _default("boundary_search", "chunk_size")))
        return interleaved_run(search, pieces, peak_model, shape, best_batch, tmp_path / "bd")

    bd_res, bd_images, bd_seconds, bd_windows = benchmark.pedantic(bd, rounds=1, iterations=1)
    _, mbd_res, mbd_images, mbd_seconds, mbd_windows = mbd_ours
    bd_rate, mbd_rate = bd_images / bd_seconds, mbd_images / mbd_seconds
    # ZSDB3KD generation at the cpu profile's settings, 20 pseudo samples per class, between two windows
    gen_oracle = HardLabelOracle(model, batch_size=best_batch, input_shape=shape)
    gen_cfg = GenerationConfig(per_class=20, iterations=3, search_budget=200, num_starts=4, num_directions=20,
                               chunk_per_class=20, init_pool=1000, init_rounds=10, snapshots=())
    gen_windows = [forward_window(peak_model, shape, best_batch)]
    start = time.perf_counter()
    generate_pseudo_samples(gen_oracle, 10, shape, gen_cfg)
    gen_rate = gen_oracle.queries / (time.perf_counter() - start)
    gen_windows.append(forward_window(peak_model, shape, best_batch))
    # the sweep's peak, measured again after label construction (reported: the drift between the two)
    rates_after, best_after, peak_after = peak_throughput(model, shape)

    def mean(v):
        return sum(v) / len(v)

    _REPORT.update(
        teacher_peak_images_per_second=max(peak_before, peak_after), teacher_peak_before=peak_before,
        teacher_peak_after=peak_after,
        teacher_best_batch=best_batch if peak_before >= peak_after else best_after,
        teacher_throughput_by_batch={str(k): max(v, rates_after[k]) for k, v in rates.items()},
        bd_images_per_second=bd_rate, mbd_images_per_second=mbd_rate, generation_images_per_second=gen_rate,
        bd_forward_windows=bd_windows, mbd_forward_windows=mbd_windows, generation_forward_windows=gen_windows,
        oracle_efficiency_bd=bd_rate / mean(bd_windows), oracle_efficiency_mbd=mbd_rate / mean(mbd_windows),
        oracle_efficiency_generation=gen_rate / mean(gen_windows),
        oracle_efficiency_bd_vs_sweep_peak=bd_rate / max(peak_before, peak_after),
        oracle_efficiency_mbd_vs_sweep_peak=mbd_rate / max(peak_before, peak_after),
        bd_queries_per_pair=float(bd_res.queries[torch.isfinite(bd_res.distances)].float().mean()),
        bd_mean_distance=_mean_finite(bd_res.distances),
        mbd_queries_per_pair=float(mbd_res.queries[torch.isfinite(mbd_res.distances)].float().mean()),
    )
    benchmark.extra_info.update({k: v for k, v in _REPORT.items() if isinstance(v, float)})
    _write_report()
    assert _REPORT["oracle_efficiency_bd"] >= 0.9, _REPORT["oracle_efficiency_bd"]
    assert _REPORT["oracle_efficiency_mbd"] >= 0.9, _REPORT["oracle_efficiency_mbd"]


def test_mbd_distance_at_each_milestone_against_sign_opt(mnist, peak, mbd_ours):
    """Every estimator, same walk, samples and budget: the default's (``geo``) mean distance at every
    milestone must be no larger than plain Sign-OPT's."""
    from db3kd.plots import distance_vs_queries

    config, splits, model = mnist
    samples, ours = mbd_ours[:2]
    shape = tuple(splits.train_x.shape[1:])
    runs = {"geo (default)": ours}
    runs.update({name: _timed_mbd(model, shape, peak[1], name, samples)[0] for name in ("tangent", "sign-opt", "hsja")})
    curves = {name: {int(m): _mean_finite(res.distances_at[k]) for k, m in enumerate(res.milestones)}
              for name, res in runs.items()}
    _REPORT["mbd_milestones"] = {str(m): {name: curves[name][m] for name in runs} for m in MBD_MILESTONES}
    _REPORT["mbd_plot"] = "performance-mbd-estimators.png"
    distance_vs_queries(curves, RESULTS / _REPORT["mbd_plot"],
                        title=f"MNIST LeNet-5 teacher, {MBD_SAMPLES} samples x 9 target classes, Q = {MBD_Q}")
    _write_report()
    for m in MBD_MILESTONES:
        assert curves["geo (default)"][m] <= curves["sign-opt"][m], (m, curves)


CLOSED_FORM_BUDGETS = (500, 1000, 2000, 5000)


def test_mbd_closed_form_ratio(request):
    """``mbd_exact_ratio_2k`` and the table of every estimator on the two closed-form teachers."""
    _REPORT.setdefault("command", " ".join(["uv run pytest", *request.config.invocation_params.args]))
    from db3kd.search import ESTIMATORS
    from db3kd.search.closed_form import ball_problem, linear_problem, ratio_table

    table = {}
    for problem in (linear_problem(n=20), ball_problem(n=20)):
        table[problem.name] = {est: ratio_table(problem, est, CLOSED_FORM_BUDGETS)["ratio"] for est in ESTIMATORS}
    _REPORT["mbd_closed_form"] = {p: {e: {str(b): v for b, v in r.items()} for e, r in t.items()}
                                  for p, t in table.items()}
    _REPORT["mbd_exact_ratio_2k"] = table["linear"][ESTIMATORS[0]][2000]
    _write_report()
    assert _REPORT["mbd_exact_ratio_2k"] <= 1.10, table["linear"]


HSJA_PAIRS = 20
HSJA_MAX_ITER = {"1k": 6, "2k": 9, "5k": 17}  # ART max_iter giving about 1.2k, 2.1k and 5.1k queries per pair


def _carlini_wagner_l2(model, x, target, steps=1000, rounds=6):
    """White-box C&W-L2 distances float32 (N,) to the target classes (an upper bound on the minimum)."""
    model = model.float().eval()
    n = x.shape[0]
    rows = torch.arange(n)
    best = torch.full((n,), float("inf"))
    c, lo, hi = torch.ones(n), torch.zeros(n), torch.full((n,), float("inf"))
    for _ in range(rounds):
        w = torch.atanh((x * 2 - 1).clamp(-1 + 1e-6, 1 - 1e-6)).clone().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=0.01)
        success = torch.zeros(n, dtype=torch.bool)
        for _ in range(steps):
            xa = (torch.tanh(w) + 1) / 2
            logits = model(xa)
            other = logits.masked_fill(torch.nn.functional.one_hot(target, logits.shape[1]).bool(), -1e9)
            margin = (other.max(1).values - logits[rows, target]).clamp(min=-1e-3)
            dist = (xa - x).flatten(1).norm(dim=1)
            hit = (logits.argmax(1) == target).detach()
            best = torch.where(hit & (dist.detach() < best), dist.detach(), best)
            success |= hit
            opt.zero_grad()
            (dist.pow(2) + c * margin).sum().backward()
            opt.step()
        hi = torch.where(success, torch.minimum(hi, c), hi)
        lo = torch.where(success, lo, torch.maximum(lo, c))
        c = torch.where(torch.isfinite(hi), (lo + hi) / 2, c * 10)
    return best


def test_mbd_against_hopskipjump_at_equal_queries(mnist):
    """``mbd_vs_hsja_1k``, ``_2k``, ``_5k``: ours / ART's HopSkipJump at equal queries, same pairs, same BD start."""
    pytest.importorskip("art", reason="adversarial-robustness-toolbox (extra 'crosscheck') is not installed")
    from db3kd import HardLabelOracle
    from db3kd.crosscheck import hopskipjump_distances
    from db3kd.robustness import boundary_search, minimal_boundary_search

    config, splits, model = mnist
    shape = tuple(splits.train_x.shape[1:])
    x, y, refs, ref_labels = _samples(splits, HSJA_PAIRS, MBD_REFS)
    oracle = HardLabelOracle(model, input_shape=shape)
    bd = boundary_search(oracle, x, y, refs, ref_labels, 10, tol=1e-5)
    target = bd.distances.argmin(dim=1)  # each sample's closest class by BD
    r_bd = bd.distances.gather(1, target[:, None]).squeeze(1)
    rows = (torch.isfinite(r_bd) & (r_bd > 0)).nonzero().squeeze(1)
    x, y, target, r_bd = x[rows], y[rows], target[rows], r_bd[rows]
    best_ref = bd.extra["best_ref"][rows, target]
    u = refs[best_ref] - x
    start = x + r_bd.view(-1, 1, 1, 1) * u / u.flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # our BD points
    hsja = {k: hopskipjump_distances(oracle, x, target, start, num_classes=10, max_iter=it, max_eval=10000,
                                     init_eval=100, tol=1e-5) for k, it in HSJA_MAX_ITER.items()}
    budgets = {k: int(h.queries.float().mean()) for k, h in hsja.items()}
    # ours on the same pairs only: per target class, with that class's references (the same BD start)
    ours = torch.zeros(len(budgets), rows.numel())
    ms = (1, *budgets.values())
    for c in target.unique():
        g = (target == c).nonzero().squeeze(1)
        keep = ref_labels == c
        res = minimal_boundary_search(HardLabelOracle(model, input_shape=shape), x[g], y[g], refs[keep],
                                      ref_labels[keep], 10, budget=max(ms), milestones=ms, tol=1e-5)
        at = res.distances_at[:, torch.arange(g.numel()), c]
        assert torch.equal(at[0], r_bd[g])  # the walk starts where HopSkipJump starts
        ours[:, g] = at[1:]
    white_box = _carlini_wagner_l2(model, x, target)
    out = {}
    for k, (key, h) in enumerate(hsja.items()):
        _REPORT[f"mbd_vs_hsja_{key}"] = float(ours[k].mean() / h.distances.mean())
        out[key] = {"queries_per_pair_hopskipjump": float(h.queries.float().mean()), "budget_ours": budgets[key],
                    "mean_distance_ours": float(ours[k].mean()), "median_distance_ours": float(ours[k].median()),
                    "mean_distance_hopskipjump": float(h.distances.mean()),
                    "median_distance_hopskipjump": float(h.distances.median()), "max_iter": HSJA_MAX_ITER[key],
                    "reached": bool(h.reached.all())}
    _REPORT["mbd_vs_hsja"] = {"pairs": int(rows.numel()), "bd_mean_distance": float(r_bd.mean()),
                              "white_box_cw_mean_distance": float(white_box.mean()),
                              "white_box_cw_median_distance": float(white_box.median()), "at": out}
    _write_report()
    assert all(v["reached"] for v in out.values())
    # a sanity bound, not the goal (0.85): two estimators of the same minimum stay within a factor
    assert all(0.5 < _REPORT[f"mbd_vs_hsja_{k}"] < 1.2 for k in HSJA_MAX_ITER), out


def test_bd_query_ratio_against_per_reference_bisection(mnist, benchmark):
    from db3kd import HardLabelOracle
    from db3kd.search import TargetedMisclassification, bisect_segments, boundary_search

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
        hi, _ = bisect_segments(oracle, flat_x, flat_r, bi, ri, length, torch.zeros_like(length), length.clone(),
                                torch.arange(len(bi)), len(bi), TargetedMisclassification(rl[ri]), tol, used,
                                float("inf"), shape)
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


# the engine ceiling: a nearly free teacher (a 784 -> 10 linear map), 2 threads, synthetic images
CEILING_THREADS, CEILING_BD_SAMPLES, CEILING_MBD_SAMPLES, CEILING_REFS, CEILING_Q = 2, 256, 32, 20, 200
CEILING_GOALS = {"engine_ceiling_bd_qps": 300_000, "engine_ceiling_mbd_qps": 120_000, "engine_ceiling_ratio_mbd": 0.5}


def _ceiling_setup():
    from db3kd import HardLabelOracle

    g = torch.Generator().manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    with torch.no_grad():
        teacher[1].weight.copy_(torch.randn(10, 784, generator=g) * 0.05)
        teacher[1].bias.copy_(-teacher[1].weight.sum(1) * 0.5)  # boundaries through the cube's centre
    x = torch.rand(CEILING_BD_SAMPLES, 1, 28, 28, generator=g)
    pool = torch.rand(2000, 1, 28, 28, generator=g)
    oracle = HardLabelOracle(teacher)
    y, pool_y = oracle(x), oracle(pool)
    idx = torch.cat([(pool_y == c).nonzero().squeeze(1)[:CEILING_REFS] for c in range(10)])
    return teacher, x, y, pool[idx], pool_y[idx]


def test_engine_ceiling(request, benchmark):
    """Queries per second of BD and MBD against a zero-cost teacher, and MBD's rate over the rate at
    which torch.randn alone fills probes of the MBD probe block's shape, in this process."""
    from db3kd import HardLabelOracle
    from db3kd.search import boundary_search, minimal_boundary_search
    from db3kd.search.bisection import probe_slice

    _REPORT.setdefault("command", " ".join(["uv run pytest", *request.config.invocation_params.args]))
    threads = torch.get_num_threads()
    torch.set_num_threads(CEILING_THREADS)
    try:
        teacher, x, y, refs, ref_labels = _ceiling_setup()

        def rate(run):
            best = 0.0
            for _ in range(2):  # best of two: the first pays warm-up
                oracle = HardLabelOracle(teacher, batch_size=8192)
                start = time.perf_counter()
                run(oracle)
                best = max(best, oracle.queries / (time.perf_counter() - start))
            return best

        bd = rate(lambda o: boundary_search(o, x, y, refs, ref_labels, 10, tol=1e-5))
        mbd = benchmark.pedantic(lambda: rate(lambda o: minimal_boundary_search(
            o, x[:CEILING_MBD_SAMPLES], y[:CEILING_MBD_SAMPLES], refs, ref_labels, 10, budget=2000,
            num_directions=CEILING_Q, tol=1e-5)), rounds=1, iterations=1)
        shape = (max(1, probe_slice("cpu") // CEILING_Q), CEILING_Q, 784)
        out, fill = torch.empty(shape), 0.0
        for _ in range(3):
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < 1.0:
                torch.randn(shape, out=out)
                n += shape[0] * shape[1]
            fill = max(fill, n / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(threads)
    _REPORT.update(engine_ceiling_bd_qps=bd, engine_ceiling_mbd_qps=mbd, engine_ceiling_randn_probes_per_second=fill,
                   engine_ceiling_ratio_mbd=mbd / fill, engine_ceiling_threads=CEILING_THREADS)
    benchmark.extra_info.update({k: _REPORT[k] for k in CEILING_GOALS})
    _write_report()
    for key, goal in CEILING_GOALS.items():
        assert _REPORT[key] >= goal, (key, _REPORT[key], goal)


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


_RUN_KEYS = ("machine", "load_average_at_write", "command", "kept_from_earlier_runs")


def _write_report():
    """Write results/performance.json and .md: this run's keys, plus (listed under
    ``kept_from_earlier_runs``) the keys of an earlier run's file that this run did not measure, so
    that running one perf test replaces its own keys and leaves the others in place."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "performance.json"
    earlier = json.loads(path.read_text()) if path.exists() else {}
    kept = sorted(k for k in earlier if k not in _REPORT and k not in _RUN_KEYS)
    report = {**{k: earlier[k] for k in kept}, **_REPORT}
    report["kept_from_earlier_runs"] = sorted(set(kept) | (set(earlier.get("kept_from_earlier_runs", [])) & set(kept)))
    report["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, " + (
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
    report["load_average_at_write"] = os.getloadavg()[0]
    report.setdefault("command", "uv run pytest benchmarks -m perf --data-root ../shared/datasets")
    (RESULTS / "performance.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    lines = ["# Query-engine performance", "", f"Command: `{report['command']}`  ", f"Machine: {report['machine']}  ",
             f"1-minute load average when written: {report['load_average_at_write']:.2f}  ",
             (f"Kept from an earlier run of the same file (not measured by this command): "
              f"{', '.join(report['kept_from_earlier_runs'])}  " if report["kept_from_earlier_runs"] else "Every key "
              "below was measured by this command.  "),
             "Teacher: the cpu-profile MNIST LeNet-5 (seed 0). BD: 1,000 training samples, 20 references per class, "
             f"tol 1e-4. MBD: {MBD_SAMPLES} samples, {MBD_REFS} references per class, budget {MBD_BUDGET} queries per "
             f"pair, Q = {MBD_Q}, tol 1e-4. Generation: ZSDB3KD at the cpu profile's search settings, 20 pseudo "
             "samples per class, 3 iterations.", "",
             "Oracle efficiency = images answered per second during label construction (everything included, "
             "default chunk sizes) / the teacher's bare forward rate in the peak's layout at its best batch size, "
             "measured in 1-second windows before, between and after the chunks of label construction (their mean; "
             "`bd_forward_windows`, `mbd_forward_windows`). This machine's speed drifts by tens of per cent within a "
             "minute, so the sweep's peak (best layout and batch size, measured before and after: "
             "`teacher_peak_before`, `teacher_peak_after`) is only reported beside it "
             "(`oracle_efficiency_*_vs_sweep_peak`).", "",
             f"Engine ceiling: BD ({CEILING_BD_SAMPLES} samples) and MBD ({CEILING_MBD_SAMPLES} samples, budget 2000, "
             f"Q = {CEILING_Q}) against a nearly free teacher (a 784 -> 10 linear map), {CEILING_REFS} references per "
             f"class, tol 1e-5, random 28x28 images, {CEILING_THREADS} threads, best of two runs; the ratio divides "
             "MBD's rate by the rate at which torch.randn alone fills probes of the MBD probe block's shape in the "
             "same process. Goals (issue 14): " + ", ".join(f"{k} >= {v:g}" for k, v in CEILING_GOALS.items()) + ".",
             ""]
    for key in ("teacher_peak_images_per_second", "teacher_peak_before", "teacher_peak_after", "teacher_best_batch",
                "teacher_fast_layout", "teacher_peak_fast_layout", "teacher_peak_default_layout", "teacher_layout_speedup",
                "bd_images_per_second", "mbd_images_per_second", "generation_images_per_second",
                "oracle_efficiency_bd", "oracle_efficiency_mbd", "oracle_efficiency_generation",
                "oracle_efficiency_bd_vs_sweep_peak", "oracle_efficiency_mbd_vs_sweep_peak", "bd_query_ratio",
                "bd_queries_ours", "bd_queries_per_reference", "bd_max_distance_difference", "bd_queries_per_pair",
                "bd_mean_distance", "mbd_queries_per_pair", "ray_overhead", "engine_ceiling_bd_qps",
                "engine_ceiling_mbd_qps", "engine_ceiling_randn_probes_per_second", "engine_ceiling_ratio_mbd",
                "engine_ceiling_threads", "mbd_exact_ratio_2k", "mbd_vs_hsja_1k", "mbd_vs_hsja_2k", "mbd_vs_hsja_5k"):
        if key in report:
            value = report[key]
            lines.append(f"- {key}: {value:.4g}" if isinstance(value, float) else f"- {key}: {value}")
    if "mbd_milestones" in report and "geo (default)" in next(iter(report["mbd_milestones"].values())):
        names = list(next(iter(report["mbd_milestones"].values())))
        lines += ["", "MBD mean distance at each query milestone (lower is better), same walk, samples and budget, "
                  "every estimator: `geo` (the default: coordinate sign bits in an orthonormal frame and a bisected "
                  "line search), `tangent` (Sign-OPT's on-sphere probes with HopSkipJump's mean-sign baseline, the "
                  "default before), plain Sign-OPT (Cheng et al. 2020) and off-sphere HopSkipJump-style probes:", "",
                  "| queries per pair | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
        lines += [f"| {m} | " + " | ".join(f"{v[n]:.4f}" for n in names) + " |"
                  for m, v in report["mbd_milestones"].items()]
        if "mbd_plot" in report:
            lines += ["", f"![MBD distance versus queries]({report['mbd_plot']})"]
    if "mbd_closed_form" in report:
        cf = report["mbd_closed_form"]
        budgets = list(next(iter(next(iter(cf.values())).values())))
        lines += ["", "Closed-form check (`db3kd.search.closed_form`, 784 pixels, 20 samples, Q = 200, tol 1e-5): mean "
                  "ratio of the distance reached to the exact minimal distance, at each per-pair query count "
                  f"(`mbd_exact_ratio_2k` = {report['mbd_exact_ratio_2k']:.4f}, goal <= 1.10):", "",
                  "| teacher | estimator | " + " | ".join(budgets) + " |", "| --- | --- |" + " --- |" * len(budgets)]
        lines += [f"| {p} | {e} | " + " | ".join(f"{r[b]:.3f}" for b in budgets) + " |"
                  for p, t in cf.items() for e, r in t.items()]
    if "mbd_vs_hsja" in report:
        hv = report["mbd_vs_hsja"]
        lines += ["", f"MBD against ART's HopSkipJump at equal queries ({hv['pairs']} MNIST pairs: each sample and its "
                  f"closest class by BD, both started at our BD point, mean BD distance {hv['bd_mean_distance']:.4f}; "
                  "HopSkipJump targeted L2, init_eval 100, max_eval 10000, final bisection tol 1e-5; our per-pair budget "
                  "= HopSkipJump's mean queries, BD included). Goal of issue 15: ratio <= 0.85.", "",
                  "| key | HopSkipJump queries/pair | our budget | ours mean (median) | HopSkipJump mean (median) | ratio |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| mbd_vs_hsja_{k} | {v['queries_per_pair_hopskipjump']:.0f} | {v['budget_ours']} | "
                  f"{v['mean_distance_ours']:.4f} ({v['median_distance_ours']:.4f}) | {v['mean_distance_hopskipjump']:.4f} "
                  f"({v['median_distance_hopskipjump']:.4f}) | {report[f'mbd_vs_hsja_{k}']:.3f} |"
                  for k, v in hv["at"].items()]
        lines += ["", f"White-box bound on the same pairs: C&W-L2 with the teacher's gradients reaches a mean distance of "
                  f"{hv['white_box_cw_mean_distance']:.4f} (median {hv['white_box_cw_median_distance']:.4f}); a ratio "
                  "of 0.85 at 5k would need a label-only walk within "
                  f"{100 * (0.85 * hv['at']['5k']['mean_distance_hopskipjump'] / hv['white_box_cw_mean_distance'] - 1):.1f}% "
                  "of that bound."]
    if "ray_overhead_seconds" in report:
        ro = report["ray_overhead_seconds"]
        lines += ["", f"ray_overhead: BD label construction on {ro['samples']} MNIST samples (cpu profile, chunks of 64), "
                  f"2 local Ray workers of 1 thread {ro['ray_2_workers_1_thread']:.1f} s / in-process with 2 threads "
                  f"{ro['in_process_2_threads']:.1f} s = {report['ray_overhead']:.3f} (goal <= 1.1); scaling over GPUs: "
                  f"{ro['scaling_over_gpus']}."]
    if "bd_scaling" in report:
        lines += ["", "BD label construction at the cpu profile (20 references per class, tol 1e-4), each size in a "
                  "fresh process; peak RSS is the whole process, dataset included:", "",
                  "| samples | wall s | queries | peak RSS MiB |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['samples']} | {r['wall_seconds']:.1f} | {r['queries']} | {r['peak_rss_mib']:.0f} |"
                  for r in report["bd_scaling"]]
    (RESULTS / "performance.md").write_text("\n".join(lines) + "\n")


def test_ray_overhead(mnist, tmp_path):
    """``ray_overhead``: wall time of BD label construction (cpu profile: 20 references per class,
    tol 1e-4, chunks of 64) on 4,000 MNIST training samples with 2 local Ray workers of one torch
    thread each, divided by the same construction in this process with 2 threads; both measured
    in this run, the Ray cluster started and its workers warmed (torch imported) beforehand, the
    chunk files and the driver's shared answers and assembly inside the timing. Goal: <= 1.1.
    ``DB3KD_RAY_OVERHEAD_SAMPLES`` changes the sample count (e.g. to check the test at a small size).
    The distances and query counts must be bit-identical. A scaling figure over several GPUs needs
    a machine with more than one; none is measured here."""
    from db3kd import HardLabelOracle
    from db3kd.distributed import RayExecutor, TeacherSpec
    from db3kd.robustness import boundary_search, plan_chunks

    config, splits, model = mnist
    n = int(os.environ.get("DB3KD_RAY_OVERHEAD_SAMPLES", "4000"))
    shape = tuple(splits.train_x.shape[1:])
    x, y, refs, ref_labels = _samples(splits, n, 20)
    from db3kd.layout import resolve_oracle_batch

    chunk, batch = 64, resolve_oracle_batch(config.oracle_batch, model, shape)  # "auto": measured once, cached
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        oracle = HardLabelOracle(model, batch_size=batch, input_shape=shape)
        start = time.perf_counter()
        local = boundary_search(oracle, x, y, refs, ref_labels, 10, tol=1e-4, chunk_size=chunk)
        local_seconds = time.perf_counter() - start

        spec = TeacherSpec.builtin(model, arch=config.teacher.arch, digest=_digest(model), access="labels",
                                   input_shape=shape, batch_size=batch, num_classes=10)
        executor = RayExecutor(workers=2, threads=1).bind(lambda: spec, tmp_path / "queries_sent")
        warm = min(n, 4 * chunk)  # both workers start and import torch before the timing
        executor.search(boundary_search, HardLabelOracle(model, batch_size=batch, input_shape=shape), x[:warm],
                        y[:warm], refs, ref_labels, 10, num_chunks=len(plan_chunks(warm, chunk)), tol=1e-4,
                        chunk_size=chunk, checkpoint_dir=tmp_path / "warm-up")
        driver = HardLabelOracle(model, batch_size=batch, input_shape=shape)
        start = time.perf_counter()
        remote = executor.search(boundary_search, driver, x, y, refs, ref_labels, 10,
                                 num_chunks=len(plan_chunks(n, chunk)), tol=1e-4, chunk_size=chunk,
                                 checkpoint_dir=tmp_path / "ray")
        ray_seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
        import ray

        ray.shutdown()
    assert torch.equal(remote.distances, local.distances) and torch.equal(remote.queries, local.queries)
    assert remote.total_queries == local.total_queries == oracle.queries
    _REPORT.update(ray_overhead=ray_seconds / local_seconds, ray_overhead_seconds={
        "in_process_2_threads": local_seconds, "ray_2_workers_1_thread": ray_seconds, "samples": n,
        "queries": local.total_queries, "scaling_over_gpus": "not measured: needs a machine with more than one GPU"})
    _write_report()
    assert _REPORT["ray_overhead"] <= 1.1, _REPORT["ray_overhead_seconds"]


def _digest(model) -> str:
    from db3kd.teacher import checkpoint_digest

    return checkpoint_digest(model.state_dict())
