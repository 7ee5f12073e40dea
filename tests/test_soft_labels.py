"""Golden values for Eq. 6-7, the released variant, and the KD loss (Eq. 1)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from db3kd.losses import kd_loss, kl_to_targets
from db3kd.soft_labels import label_statistics, robustness_logits, soft_labels_from_robustness

INF = math.inf


def test_eq6_eq7_golden_values():
    # r = (-, 1, 2, 4) for a class-0 sample: S = 1.75, a = (1/S, 1/S^2, 0.5/S^2, 0.25/S^2), p = softmax(a / 0.3)
    r = torch.tensor([[INF, 1.0, 2.0, 4.0]])
    a = robustness_logits(r, torch.tensor([0]))
    s = 1.75
    assert a[0].tolist() == pytest.approx([1 / s, 1 / s**2, 0.5 / s**2, 0.25 / s**2], rel=1e-6)
    p = soft_labels_from_robustness(r, torch.tensor([0]), tau=0.3)
    assert p[0].tolist() == pytest.approx([0.5279875, 0.2333982, 0.1354400, 0.1031743], rel=1e-5)


def test_released_variant_golden_values():
    r = torch.tensor([[INF, 1.0, 2.0, 4.0]])
    p = soft_labels_from_robustness(r, torch.tensor([0]), variant="released")
    assert p[0].tolist() == pytest.approx([0.2610727, 0.2514637, 0.2452551, 0.2422085], rel=1e-5)


def test_entry_on_own_class_is_ignored_and_classes_can_be_permuted():
    r1 = torch.tensor([[123.0, 1.0, 2.0]])
    r2 = torch.tensor([[INF, 1.0, 2.0]])
    assert torch.equal(soft_labels_from_robustness(r1, torch.tensor([0])), soft_labels_from_robustness(r2, torch.tensor([0])))
    p = soft_labels_from_robustness(torch.tensor([[1.0, INF, 2.0]]), torch.tensor([1]))
    q = soft_labels_from_robustness(r2, torch.tensor([0]))
    assert p[0].tolist() == pytest.approx([float(q[0, 1]), float(q[0, 0]), float(q[0, 2])])


@settings(max_examples=60, deadline=None)
@given(
    dists=st.lists(st.floats(1e-3, 50.0), min_size=2, max_size=9),
    m=st.integers(0, 9),
    tau=st.floats(0.05, 5.0),
)
def test_paper_requirements(dists, m, tau):
    """Sec. 3.2.2: (1) argmax is m; (2) smaller distance -> larger activation; rows sum to 1."""
    L = len(dists) + 1
    m = m % L
    r = torch.tensor(dists[:m] + [INF] + dists[m:], dtype=torch.float32).view(1, L)
    y = torch.tensor([m])
    a = robustness_logits(r, y)[0]
    p = soft_labels_from_robustness(r, y, tau)[0]
    assert int(p.argmax()) == m or math.isclose(float(p.max()), float(p[m]), rel_tol=1e-6)
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-5)
    others = [n for n in range(L) if n != m]
    for j in others:
        for k in others:
            if r[0, j] > r[0, k]:
                assert a[j] <= a[k]


def test_requirement_three_more_robust_means_more_mass_on_m():
    y = torch.tensor([0, 0])
    r = torch.tensor([[INF, 1.0, 1.0], [INF, 3.0, 3.0]])
    p = soft_labels_from_robustness(r, y)
    assert p[1, 0] > p[0, 0]


def test_guards_zero_and_infinite_distances():
    y = torch.tensor([0, 0, 0])
    r = torch.tensor([[INF, 0.0, 2.0], [INF, INF, INF], [INF, INF, 2.0]])
    p = soft_labels_from_robustness(r, y)
    assert torch.isfinite(p).all()
    assert p[0].tolist() == pytest.approx([1 / 3] * 3, abs=1e-3)  # r -> 0: nearly uniform, no NaN
    assert p[1].tolist() == [1.0, 0.0, 0.0]  # no evidence against any class: one-hot
    assert torch.allclose(p.sum(1), torch.ones(3))


@pytest.mark.parametrize(
    "kwargs, message",
    [({"tau": 0.0}, "tau must be > 0"), ({"tau": -1.0}, "tau must be > 0"), ({"variant": "x"}, "unknown soft-label variant")],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        soft_labels_from_robustness(torch.tensor([[INF, 1.0]]), torch.tensor([0]), **{"tau": 0.3, **kwargs})


def test_nan_and_negative_distances_are_rejected():
    with pytest.raises(ValueError, match="NaN"):
        robustness_logits(torch.tensor([[INF, math.nan]]), torch.tensor([0]))
    with pytest.raises(ValueError, match=">= 0"):
        robustness_logits(torch.tensor([[INF, -1.0]]), torch.tensor([0]))


def test_kd_loss_golden_values():
    z = torch.tensor([[1.0, 2.0, 0.5]])
    y = torch.tensor([1])
    p = torch.tensor([[0.2, 0.5, 0.3]])
    assert float(kl_to_targets(z, p, 2.0)) == pytest.approx(0.0271845527, rel=1e-5)
    assert float(kd_loss(z, y, p, 2.0)) == pytest.approx(0.4915533368, rel=1e-5)  # Eq. 1, lambda = 1
    hinton = kd_loss(z, y, p, 2.0, w_ce=0.1, w_kd=0.9, tau_squared=True)
    assert float(hinton) == pytest.approx(0.1443012682, rel=1e-5)


def test_kd_loss_uses_batchmean():
    z = torch.tensor([[1.0, 2.0, 0.5]]).repeat(4, 1)
    p = torch.tensor([[0.2, 0.5, 0.3]]).repeat(4, 1)
    assert float(kl_to_targets(z, p, 2.0)) == pytest.approx(0.0271845527, rel=1e-5)  # per sample, not / (B*L)


def test_label_statistics():
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    stats = label_statistics(p, torch.tensor([0, 0]))
    assert stats["true_class_mass"] == pytest.approx(0.75)
    assert stats["target_entropy"] == pytest.approx(math.log(2) / 2, rel=1e-5)
