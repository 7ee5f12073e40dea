"""ZSDB3KD generation: exact query accounting, resume after an interruption, oracle-only access."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from db3kd import HardLabelOracle, QueryBudgetExceeded
from db3kd.zeroshot import GenerationConfig, generate_pseudo_samples, initial_noise

CFG = GenerationConfig(per_class=4, iterations=3, xi_o=0.5, search_budget=80, num_starts=2, num_directions=8,
                       tol=1e-3, chunk_per_class=2, init_pool=200, init_rounds=5, snapshots=(0, 3), seed=1)


class CountingTeacher(nn.Module):
    """A fixed random 3-class classifier on 1x6x6 images that counts every image it sees."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(3, 36, generator=g), requires_grad=False)
        self.bias = nn.Parameter(-self.weight.sum(1) * 0.45, requires_grad=False)
        self.seen = 0

    def forward(self, x):
        self.seen += x.shape[0]
        return x.flatten(1) @ self.weight.T + self.bias


@pytest.mark.parametrize("kind", ["authors", "smooth", "mixed"])
def test_every_noise_kind_is_an_image_batch_in_range(kind):
    x = initial_noise(9, (3, 8, 8), torch.Generator().manual_seed(0), kind)
    assert x.shape == (9, 3, 8, 8) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.std()) > 0


def test_smooth_noise_is_smoother_than_the_authors_noise():
    g = torch.Generator().manual_seed(1)
    authors, smooth = initial_noise(64, (1, 28, 28), g, "authors"), initial_noise(64, (1, 28, 28), g, "smooth")

    def roughness(x):  # mean absolute difference between horizontal neighbours, relative to the spread
        return float((x[..., 1:] - x[..., :-1]).abs().mean() / x.std())

    assert roughness(smooth) < 0.5 * roughness(authors)


def test_unknown_noise_kind_is_refused():
    with pytest.raises(ValueError, match="unknown noise kind 'pink'.*authors, smooth, mixed"):
        initial_noise(2, (1, 4, 4), torch.Generator(), "pink")


def test_initial_noise_is_in_range_and_seeded():
    a = initial_noise(5, (1, 6, 6), torch.Generator().manual_seed(3))
    b = initial_noise(5, (1, 6, 6), torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1


def test_queries_equal_images_the_teacher_answered_and_samples_keep_their_class(tmp_path):
    teacher = CountingTeacher()
    oracle = HardLabelOracle(teacher)
    out = generate_pseudo_samples(oracle, 3, (1, 6, 6), CFG, out_dir=tmp_path)
    assert out.queries == oracle.queries == teacher.seen  # every image the teacher saw was counted
    assert out.x.shape[1:] == (1, 6, 6) and out.x.shape[0] == out.y.shape[0]
    assert set(out.y.tolist()) | set(out.missing) == {0, 1, 2}
    # samples were moved away from the boundary without changing their class (uint8 rounding aside)
    assert (teacher(out.x).argmax(1) == out.y).float().mean() >= 0.9
    assert set(out.snapshots) == {0, 3}


def test_resume_after_interruption_gives_identical_samples_and_query_total(tmp_path):
    full = generate_pseudo_samples(HardLabelOracle(CountingTeacher()), 3, (1, 6, 6), CFG, out_dir=tmp_path / "a")
    # interrupt: the oracle's budget runs out part-way (after the first chunk is on disk)
    first_chunk = torch.load(next((tmp_path / "a").glob("chunk00000.pt")), weights_only=True)["queries"]
    broken = HardLabelOracle(CountingTeacher(), budget=first_chunk + 10)
    with pytest.raises(QueryBudgetExceeded):
        generate_pseudo_samples(broken, 3, (1, 6, 6), CFG, out_dir=tmp_path / "b")
    assert len(list((tmp_path / "b").glob("chunk*.pt"))) == 1
    assert not list((tmp_path / "b").glob("*.tmp*"))  # nothing half-written looks finished
    fresh = HardLabelOracle(CountingTeacher())
    resumed = generate_pseudo_samples(fresh, 3, (1, 6, 6), CFG, out_dir=tmp_path / "b")
    assert torch.equal(resumed.x, full.x) and torch.equal(resumed.y, full.y)
    assert resumed.queries == full.queries
    assert fresh.queries == full.queries - first_chunk  # the finished chunk was not recomputed


def test_generation_takes_only_an_oracle():
    import inspect

    params = list(inspect.signature(generate_pseudo_samples).parameters)
    assert params[0] == "oracle" and "model" not in params and "teacher" not in params


def test_chunks_generated_by_separate_workers_assemble_to_the_single_process_result(tmp_path):
    single = generate_pseudo_samples(HardLabelOracle(CountingTeacher()), 3, (1, 6, 6), CFG)
    workers = [HardLabelOracle(CountingTeacher()), HardLabelOracle(CountingTeacher())]
    spent = [generate_pseudo_samples(workers[0], 3, (1, 6, 6), CFG, out_dir=tmp_path, chunks=[1]),
             generate_pseudo_samples(workers[1], 3, (1, 6, 6), CFG, out_dir=tmp_path, chunks=[0, 1])]
    assert spent == [w.queries for w in workers]
    assembler = HardLabelOracle(CountingTeacher())
    merged = generate_pseudo_samples(assembler, 3, (1, 6, 6), CFG, out_dir=tmp_path)
    assert assembler.queries == 0
    assert torch.equal(merged.x, single.x) and torch.equal(merged.y, single.y) and merged.queries == single.queries
    with pytest.raises(ValueError, match="outside"):
        generate_pseudo_samples(HardLabelOracle(CountingTeacher()), 3, (1, 6, 6), CFG, out_dir=tmp_path, chunks=[5])


def test_every_sample_runs_every_iteration_unless_patience_is_set():
    """Default (patience None): no early stop, as in the authors' code; patience=1 stops samples whose
    noisy distance estimate did not grow, so the same generation spends fewer queries."""
    from dataclasses import replace

    cfg = replace(CFG, iterations=6, snapshots=())
    assert GenerationConfig().patience is None
    full = generate_pseudo_samples(HardLabelOracle(CountingTeacher()), 3, (1, 6, 6), cfg)
    early = generate_pseudo_samples(HardLabelOracle(CountingTeacher()), 3, (1, 6, 6), replace(cfg, patience=1))
    assert early.queries < full.queries


def test_fig6_curves_are_recorded_with_their_queries(tmp_path):
    """``curve_students``: one accuracy per subset size and per snapshot, the relabelling queries
    reported apart and included in the run's total; the plot is drawn from the record."""
    from db3kd.config import resolve
    from db3kd.plots import zsdb3kd_curves
    from db3kd.runner import run

    config = resolve("digits", "zsdb3kd", "smoke", method_overrides={
        "curve_students": True, "curve_per_class": (2, 6), "curve_iteration_per_class": 2})
    record = run(config, progress=False)
    fig6 = record["tables"]["fig6"]
    assert set(fig6["per_class"]) == {"2", "6"} and set(fig6["iterations"]) == {"0", "1", "2"}
    assert fig6["per_class"]["6"] == record["student_accuracy"]  # all of the transfer set: the final student
    assert all(0.0 <= v <= 1.0 for part in ("per_class", "iterations") for v in fig6[part].values())
    assert record["metrics"]["curve_queries"] == sum(fig6["iteration_queries"].values()) > 0
    assert zsdb3kd_curves([record], tmp_path / "fig6.png").is_file()


def test_fig6_lines_are_per_configuration_never_pooled(tmp_path):
    """Two configurations (a variant with the defaults, one tuned) are two lines; seeds of one
    configuration are pooled into its mean."""
    from db3kd.plots import zsdb3kd_curves, zsdb3kd_series

    def record(seed, variant, params, acc):
        extra = {"params": params} if params else {}
        return {"method": "zsdb3kd", "seed": seed, "variant": variant, "dataset": "mnist", "profile": "cpu",
                "config": {"extra": extra}, "tables": {"fig6": {
                    "per_class": {"10": acc / 2, "1000": acc}, "iterations": {"0": acc / 3, "20": acc},
                    "iteration_per_class": 100}}}

    records = [record(0, "fig6", None, 0.75), record(0, "fig6-tuned", "tuned on val (10 trials)", 0.9),
               record(1, "fig6-tuned", "tuned on val (10 trials)", 0.8), {"method": "zskt", "seed": 0}]
    lines = zsdb3kd_series(records)
    assert list(lines) == ["fig6: paper settings (profile defaults) (1 seed)",
                           "fig6-tuned: tuned on val (10 trials) (2 seeds)"]
    assert lines["fig6: paper settings (profile defaults) (1 seed)"]["per_class"] == {10: [37.5], 1000: [75.0]}
    assert lines["fig6-tuned: tuned on val (10 trials) (2 seeds)"]["iterations"][20] == [90.0, 80.0]
    assert zsdb3kd_curves(records, tmp_path / "fig6.png").is_file()


def test_the_transfer_set_is_cached_across_student_settings():
    """A run that changes only the student (tau) reuses the generation and its labels: nothing is sent."""
    from db3kd.config import resolve
    from db3kd.runner import run

    first = run(resolve("digits", "zsdb3kd", "smoke", method_overrides={"tau": 0.3}))
    again = run(resolve("digits", "zsdb3kd", "smoke", method_overrides={"tau": 2.0}))
    assert again["queries_sent"] == 0 and again["queries_total"] == first["queries_total"] > 0
    assert again["soft_label_sha256"] != first["soft_label_sha256"]  # same distances, another temperature
    measured = run(resolve("digits", "zsdb3kd", "smoke", method_overrides={"tau": 2.0, "label_cache": False}))
    assert measured["queries_sent"] == measured["queries_total"] == first["queries_total"]
