"""label-smoothing (baselines.label_smoothing): golden loss values and one short run."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from db3kd.config import resolve
from db3kd.errors import ConfigError
from db3kd.registry import get_method
from db3kd.runner import run
from tests.conftest import fake_splits

Z = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
Y = torch.tensor([1, 2])


@pytest.mark.parametrize("epsilon, expected", [
    # -mean_b sum_l q[b, l] log softmax(z_b)[l], q = (1 - eps) onehot(y) + eps / 3 (float64 by hand)
    (0.0, 0.26512634393268697),  # plain CE
    (0.1, 0.4234596772660203),
    (0.3, 0.7401263439326868),
])
def test_smoothed_cross_entropy_golden(epsilon, expected):
    cls = get_method("label-smoothing")
    assert float(cls(cls.Params(epsilon=epsilon)).objective(Z, Y)) == pytest.approx(expected, abs=1e-6)


def test_metadata_and_bad_epsilon():
    cls = get_method("label-smoothing")
    assert cls.teacher_access == "none" and cls.data == "full" and cls.Params().epsilon == 0.1
    with pytest.raises(ConfigError, match="epsilon"):
        resolve("digits", "label-smoothing", "smoke", method_overrides={"epsilon": 1.0})


def test_runs_without_queries():
    cfg = resolve("digits", "label-smoothing", "smoke")
    cfg = replace(cfg, teacher=cfg.teacher.model_copy(update={"arch": "lenet5-half", "epochs": 1}),
                  student=cfg.student.model_copy(update={"epochs": 1, "batch_size": 16, "train_subset": None}))
    record = run(cfg, splits=fake_splits())
    assert record["queries_total"] == 0 and 0.0 <= record["student_accuracy"] <= 1.0
    assert 0.0 <= record["metrics"]["val_accuracy"] <= 1.0
