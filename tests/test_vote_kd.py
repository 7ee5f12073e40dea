"""vote-kd (db3kd.methods.vote): golden mapping values, exact query counts, deterministic streams."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from db3kd.config import resolve
from db3kd.errors import ConfigError
from db3kd.methods.vote import (
    calibrate_temperature,
    perturbation_noise,
    stream_seed,
    vote_counts,
    vote_nll,
    vote_soft_labels,
)
from db3kd.oracle import HardLabelOracle
from db3kd.runner import run
from tests.conftest import Linear, fake_splits


def test_vote_to_soft_label_mapping_golden():
    # K = 10 votes over L = 4 classes, alpha = 1: f = (c + 1) / (10 + 4) = (8, 3, 2, 1) / 14
    counts = torch.tensor([[7, 2, 1, 0]])
    assert torch.allclose(vote_soft_labels(counts, 10, 1.0, 1.0), torch.tensor([[8, 3, 2, 1]]) / 14.0, atol=1e-7)
    # tau = 0.5: p ~ f^2 = (64, 9, 4, 1) / 78
    assert torch.allclose(vote_soft_labels(counts, 10, 1.0, 0.5), torch.tensor([[64, 9, 4, 1]]) / 78.0, atol=1e-7)
    # unanimous votes, L = 3, alpha = 0.5, tau = 2: f = (10.5, 0.5, 0.5) / 11.5, p ~ sqrt(f)
    #   sqrt(10.5) = 3.2404, sqrt(0.5) = 0.7071 -> (0.6961676, 0.1519162, 0.1519162)
    p = vote_soft_labels(torch.tensor([[10, 0, 0]]), 10, 0.5, 2.0)
    assert torch.allclose(p, torch.tensor([[0.6961675653, 0.1519162174, 0.1519162174]]), atol=1e-7)
    # NLL of the true class under the tau = 1 mapping: -log(8/14) for y = 0, -log(3/14) for y = 1
    assert vote_nll(counts, torch.tensor([0]), 10, 1.0, 1.0) == pytest.approx(0.5596157879354228, abs=1e-9)
    assert vote_nll(counts, torch.tensor([1]), 10, 1.0, 1.0) == pytest.approx(1.540445040947149, abs=1e-9)
    with pytest.raises(ValueError, match="alpha and tau"):
        vote_soft_labels(counts, 10, 0.0, 1.0)


def test_calibrated_temperature_minimises_the_validation_nll():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (200,), generator=g)
    # votes agree with the label 60 % of the time, the rest uniform: over-confident at tau = 1
    noisy = torch.where(torch.rand(200, 20, generator=g) < 0.6, y[:, None], torch.randint(0, 5, (200, 20), generator=g))
    counts = torch.nn.functional.one_hot(noisy, 5).sum(1)
    tau, nll = calibrate_temperature(counts, y, 20, 1.0)
    grid = [math.exp(t) for t in torch.linspace(math.log(0.05), math.log(20), 2001).tolist()]
    best = min(vote_nll(counts, y, 20, 1.0, t) for t in grid)
    assert nll == pytest.approx(vote_nll(counts, y, 20, 1.0, tau), abs=1e-12)
    assert nll <= best + 1e-6
    assert nll < vote_nll(counts, y, 20, 1.0, 1.0)


def test_streams_are_keyed_by_seed_stream_and_index_only():
    assert stream_seed(0, "train", 5) != stream_seed(0, "val", 5) != stream_seed(1, "train", 5)
    assert stream_seed(0, "train", 5) == stream_seed(0, "train", 5) < 2**63
    all_rows = perturbation_noise(3, "train", torch.arange(6), 4, (1, 2, 2))
    some_rows = perturbation_noise(3, "train", torch.tensor([4, 1]), 4, (1, 2, 2))
    assert torch.equal(some_rows, all_rows[[4, 1]])
    assert not torch.equal(perturbation_noise(4, "train", torch.arange(6), 4, (1, 2, 2)), all_rows)


def _oracle():
    g = torch.Generator().manual_seed(0)
    return HardLabelOracle(Linear(torch.randn(3, 16, generator=g), torch.zeros(3)), input_shape=(1, 4, 4))


def test_vote_counts_exact_queries_and_independent_of_chunking():
    x = torch.rand(13, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    kwargs = dict(sigmas=[0.1, 0.3], votes=7, milestones=(2, 7), num_classes=3, seed=0, stream="train")
    oracle = _oracle()
    small = vote_counts(oracle, x, torch.arange(13), chunk_size=4, **kwargs)
    assert oracle.queries == 13 * 7 * 2  # K per image per sigma, nothing else
    big = vote_counts(_oracle(), x, torch.arange(13), chunk_size=100, **kwargs)
    assert torch.equal(small, big)
    assert small.shape == (2, 2, 13, 3) and small.dtype == torch.int64
    assert (small[:, 0].sum(-1) == 2).all() and (small[:, 1].sum(-1) == 7).all()
    # the milestone counts are the first k votes of the same draws
    assert (small[:, 0] <= small[:, 1]).all()


@pytest.fixture(scope="module")
def splits():
    return fake_splits(n_val=12)


def _config():
    cfg = resolve("digits", "vote-kd", "smoke")
    teacher = cfg.teacher.model_copy(update={"arch": "lenet5-half", "epochs": 1, "batch_size": 16})
    student = cfg.student.model_copy(update={"epochs": 1, "batch_size": 16, "train_subset": None})
    return replace(cfg, teacher=teacher, student=student)


def test_run_counts_k_per_image_plus_calibration_and_is_deterministic(splits, tmp_path):
    cfg = _config()
    p = cfg.method_params
    record = run(cfg, splits=splits)
    n, n_cal = splits.train_x.shape[0], min(p["calibration_images"], splits.val_x.shape[0])
    calibration = n_cal * p["votes"] * len(p["sigma_grid"])
    assert record["metrics"]["calibration_queries"] == calibration
    assert record["metrics"]["vote_queries"] == n * p["votes"]
    assert record["queries_total"] == n * p["votes"] + calibration
    assert record["queries_per_sample"] == pytest.approx(p["votes"] + calibration / n)
    assert record["metrics"]["sigma"] in p["sigma_grid"]
    assert record["tables"]["milestone_queries_per_sample"][str(p["votes"])] == pytest.approx(record["queries_per_sample"])
    again = run(cfg, splits=splits)
    assert again["student_accuracy"] == record["student_accuracy"]
    assert again["metrics"] == record["metrics"]


def test_fixed_sigma_and_tau_need_no_calibration_and_milestone_students(splits):
    cfg = _config()
    cfg = replace(cfg, method_params={**cfg.method_params, "sigma": 0.2, "tau": 1.5, "votes": 6, "milestones": (2, 6),
                                      "milestone_students": True})
    record = run(cfg, splits=splits)
    assert record["queries_total"] == splits.train_x.shape[0] * 6
    assert record["metrics"]["calibration_queries"] == 0 and record["metrics"]["tau"] == 1.5
    assert set(record["milestone_accuracy"]) == {"2"}  # the final K = 6 student is the record's own
    assert record["tables"]["milestone_queries_per_sample"] == {"2": 2.0, "6": 6.0}


def test_resumed_run_reuses_the_votes_and_counts_them_once(splits, tmp_path):
    cfg = _config()
    first = run(cfg, splits=splits, run_dir=tmp_path)
    (tmp_path / cfg.config_hash() / "record.json").unlink()
    again = run(cfg, splits=splits, run_dir=tmp_path)
    assert again["queries_total"] == first["queries_total"] and again["student_accuracy"] == first["student_accuracy"]


def test_spent_budget_loses_no_vote_and_the_rerun_matches(splits, tmp_path):
    from db3kd.errors import QueryBudgetExceeded

    cfg = replace(_config(), method_params={**_config().method_params, "chunk_size": 8})
    whole = run(cfg, splits=splits)
    budgeted = replace(cfg, query_budget=whole["queries_total"] // 2)
    with pytest.raises(QueryBudgetExceeded):
        run(budgeted, splits=splits, run_dir=tmp_path)
    assert any((tmp_path / budgeted.config_hash() / "checkpoints" / "votes").iterdir())  # finished chunks kept
    # the budget is part of the configuration hash: hand the interrupted folder to the unbudgeted run
    (tmp_path / budgeted.config_hash()).rename(tmp_path / cfg.config_hash())
    again = run(cfg, splits=splits, run_dir=tmp_path)
    assert again["queries_total"] == whole["queries_total"]
    assert again["student_accuracy"] == whole["student_accuracy"] and again["metrics"] == whole["metrics"]


def test_bad_params_are_one_line_errors():
    with pytest.raises(ConfigError, match="sigma_grid"):
        resolve("digits", "vote-kd", "smoke", method_overrides={"sigma_grid": (0.1, -0.2)})
    with pytest.raises(ConfigError, match="votes"):
        resolve("digits", "vote-kd", "smoke", method_overrides={"votes": 0})
