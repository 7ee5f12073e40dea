"""HardLabelOracle / ScoreOracle: counting, budget, batching, validation, opacity."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from db3kd import HardLabelOracle, QueryBudgetExceeded, ScoreOracle
from tests.conftest import Linear


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 5))


def images(n, seed=0):
    return torch.rand(n, 3, 2, 2, generator=torch.Generator().manual_seed(seed))


def test_labels_match_model_argmax_and_are_int64():
    model = tiny_model()
    x = images(37)
    oracle = HardLabelOracle(model, batch_size=8)
    labels = oracle(x)
    assert labels.dtype == torch.int64 and labels.shape == (37,)
    assert torch.equal(labels, model(x).argmax(1))
    assert oracle.queries == 37


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 50), min_size=1, max_size=8), batch=st.integers(1, 64),
       budget=st.one_of(st.none(), st.integers(0, 200)))
def test_counting_and_budget_property(sizes, batch, budget):
    """queries == images answered; a call that would pass the budget raises before counting anything."""
    model = tiny_model()
    oracle = HardLabelOracle(model, budget=budget, batch_size=batch)
    answered = 0
    for i, n in enumerate(sizes):
        x = images(n, seed=i)
        if budget is not None and answered + n > budget:
            with pytest.raises(QueryBudgetExceeded) as info:
                oracle(x)
            assert info.value.budget == budget and info.value.queries == answered
            assert str(budget) in str(info.value) and str(answered) in str(info.value)
        else:
            assert oracle(x).shape == (n,)
            answered += n
        assert oracle.queries == answered
        if budget is not None:
            assert oracle.remaining == budget - answered


def test_budget_raised_before_the_model_runs():
    calls = []

    class Spy(nn.Module):
        def forward(self, x):
            calls.append(x.shape[0])
            return torch.zeros(x.shape[0], 3)

    oracle = HardLabelOracle(Spy(), budget=10, batch_size=4)
    oracle(images(10))
    assert calls == [4, 4, 2]
    with pytest.raises(QueryBudgetExceeded, match="budget is 10"):
        oracle(images(1))
    assert calls == [4, 4, 2] and oracle.queries == 10


def test_runs_under_inference_mode():
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append(torch.is_inference_mode_enabled())
            return torch.zeros(x.shape[0], 2)

    HardLabelOracle(Spy())(images(3))
    assert seen == [True]


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.rand(3, 12), "rank 4"),
        (torch.rand(2, 3, 2), "rank 4"),
        (torch.randint(0, 2, (2, 3, 2, 2)), "floating-point"),
        (torch.full((2, 3, 2, 2), math.nan), "NaN"),
        (torch.full((2, 3, 2, 2), math.inf), "inf"),
        (torch.full((2, 3, 2, 2), 1.5), r"\[0, 1\]"),
        (torch.full((2, 3, 2, 2), -0.1), r"\[0, 1\]"),
        ([[0.5]], "torch.Tensor"),
    ],
)
def test_bad_input_names_the_problem_and_costs_nothing(x, message):
    oracle = HardLabelOracle(tiny_model())
    with pytest.raises(ValueError, match=message):
        oracle(x)
    assert oracle.queries == 0


def test_wrong_image_shape_is_rejected():
    oracle = HardLabelOracle(tiny_model(), input_shape=(3, 2, 2))
    with pytest.raises(ValueError, match=r"image shape \(1, 2, 2\)"):
        oracle(torch.rand(2, 1, 2, 2))


@pytest.mark.parametrize("kwargs", [{"budget": -1}, {"budget": 1.5}, {"batch_size": 0}])
def test_bad_constructor_arguments(kwargs):
    with pytest.raises(ValueError):
        HardLabelOracle(tiny_model(), **kwargs)


def test_model_is_not_reachable_through_the_public_api():
    model = tiny_model()
    oracle = HardLabelOracle(model)
    reachable = list(vars(oracle).values()) + [getattr(oracle, a) for a in dir(oracle) if not a.startswith("__")]
    assert not any(isinstance(v, nn.Module) for v in reachable)
    assert not any(isinstance(v, nn.Parameter) for v in reachable)
    for name in ("model", "module", "parameters", "logits", "state_dict"):
        assert not hasattr(oracle, name)


def test_score_oracle_returns_probabilities_and_counts():
    model = tiny_model()
    oracle = ScoreOracle(model, batch_size=5)
    p = oracle(images(12))
    assert p.shape == (12, 5) and p.dtype == torch.float32
    assert torch.allclose(p.sum(1), torch.ones(12), atol=1e-6)
    assert oracle.queries == 12


def test_accepts_torchscript_and_exported_teachers(tmp_path):
    model = tiny_model()
    x = images(6)
    expected = model(x).argmax(1)
    traced = torch.jit.trace(model, x)
    assert torch.equal(HardLabelOracle(traced)(x), expected)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert torch.equal(HardLabelOracle(exported)(x), expected)


def test_linear_fixture_labels(binary_linear):
    model, w, c = binary_linear
    x = torch.full((1, 1, 4, 4), 0.5) + 0.1 * w.view(1, 1, 4, 4)
    assert HardLabelOracle(model)(x).item() == 1
