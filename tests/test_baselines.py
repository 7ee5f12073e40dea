"""Baselines (package ``baselines``): golden loss values and one short run of every registered method.

Golden values were computed by hand-written float64 NumPy code independent of the package (each
formula is repeated in the test's comment) on the fixed tensors below:

    z (student logits) = [[1, 2, 0.5], [0, -1, 3]],  y = [1, 2]
    t (white-box teacher logits) = [[3, 1, 0], [0.5, 0.5, 2]]
    p (score-oracle probabilities) = [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from db3kd.config import resolve
from db3kd.models import get_model
from db3kd.registry import get_method, method_names
from db3kd.runner import run
from tests.conftest import fake_splits

from baselines.common import query_all, tempered_probs
from baselines.features import FeatureTap, penultimate_features
from baselines.sskd import ProjectedModel, head_loss, keep_ranked, rotations, view_similarity
from baselines.tf_kd import virtual_teacher

Z = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
Y = torch.tensor([1, 2])
T = torch.tensor([[3.0, 1.0, 0.0], [0.5, 0.5, 2.0]])
P = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
CE = 0.26512634393268697  # mean_b -log softmax(z_b)[y_b]


def method(name: str, **params):
    cls = get_method(name)
    return cls(cls.Params(**params))


# ------------------------------------------------------------------------------------------------ golden losses


@pytest.mark.parametrize("name", ["teacher-ce", "student-ce", "hard-label-kd"])
def test_cross_entropy_methods(name):
    assert float(method(name).objective(Z, Y)) == pytest.approx(CE, abs=1e-6)


def test_tempered_probs_equal_softmax_at_temperature():
    # p^(1/tau) / sum p^(1/tau) == softmax(z / tau) for p = softmax(z)
    for tau in (0.3, 1.0, 4.0):
        assert torch.allclose(tempered_probs(torch.softmax(T, 1), tau), torch.softmax(T / tau, 1), atol=1e-6)
    assert torch.equal(tempered_probs(P, 1.0).argmax(1), P.argmax(1))
    assert torch.isfinite(tempered_probs(torch.tensor([[1.0, 0.0, 0.0]]), 0.3)).all()  # zero mass stays finite
    with pytest.raises(ValueError):
        tempered_probs(P, 0.0)


def test_standard_kd_loss():
    # CE + KL(p^(1/0.3)/sum || softmax(z/0.3)), batchmean, w_ce = w_kd = 1, no tau^2 (paper Eq. 1)
    m = method("standard-kd")
    assert (m.params.tau, m.params.w_ce, m.params.w_kd, m.params.tau_squared) == (0.3, 1.0, 1.0, False)
    assert float(m.objective(Z, Y, m.targets(P))) == pytest.approx(2.336382274906291, abs=1e-5)
    # tau^2 scales only the KL term
    m2 = method("standard-kd", tau_squared=True)
    kl = 2.336382274906291 - CE
    assert float(m2.objective(Z, Y, m2.targets(P))) == pytest.approx(CE + 0.09 * kl, abs=1e-5)


def test_surrogate_kd_loss():
    # CE + KL(softmax(t/0.3) || softmax(z/0.3))
    m = method("surrogate-kd")
    assert float(m.objective(Z, Y, torch.softmax(T / 0.3, 1))) == pytest.approx(1.9830122393642593, abs=1e-5)


def test_noise_logits_targets_and_loss():
    m = method("noise-logits")
    r = torch.tensor([[9.0, 2.0, 4.0], [1.0, 2.0, 9.0]])
    # Eq. 6-7, row 0 (m = 1): S = 1/9 + 1/4, a = [(1/9)/S^2, 1/S, (1/4)/S^2], p = softmax(a / 0.3)
    s = 1 / 9 + 1 / 4
    a = torch.tensor([(1 / 9) / s**2, 1 / s, (1 / 4) / s**2])
    targets = m.targets(r, Y)
    assert torch.allclose(targets[0], torch.softmax(a / 0.3, 0), atol=1e-6)
    assert torch.allclose(targets[1], torch.tensor([0.2797790323, 0.1333876273, 0.5868333404]), atol=1e-6)
    assert float(m.objective(Z, Y, targets)) == pytest.approx(2.133036954470554, abs=1e-5)
    # random robustness: seeded, inside [r_low, r_high]
    r1, r2 = m.robustness(50, 10, seed=3), m.robustness(50, 10, seed=3)
    assert torch.equal(r1, r2) and float(r1.min()) >= 1.0 and float(r1.max()) <= 5.0
    assert not torch.equal(r1, m.robustness(50, 10, seed=4))


def test_noise_logits_rejects_an_empty_range():
    from db3kd.errors import ConfigError

    with pytest.raises(ConfigError, match="r_high"):
        resolve("digits", "noise-logits", "smoke", method_overrides={"r_low": 3.0, "r_high": 2.0})


def test_ban_loss():
    # BAN defaults tau = 1, w_ce = 0, w_kd = 1: KL(softmax(t) || softmax(z))
    m = method("ban")
    assert float(m.objective(Z, Y, torch.softmax(T, 1))) == pytest.approx(0.5804689306731845, abs=1e-6)


def test_tf_kd_self_loss():
    # 0.05 CE + 0.95 * 36 * KL(softmax(t/6) || softmax(z/6))
    m = method("tf-kd-self")
    assert float(m.objective(Z, Y, torch.softmax(T / 6, 1))) == pytest.approx(0.7192166191704203, abs=1e-5)


def test_tf_kd_reg_virtual_teacher_and_losses():
    pd = virtual_teacher(Y, 3, 0.99)
    assert torch.allclose(pd, torch.tensor([[0.005, 0.99, 0.005], [0.005, 0.005, 0.99]]))
    # paper: 0.9 CE + 0.1 KL(pd^(1/20)/sum || softmax(z/20))
    assert float(method("tf-kd-reg").objective(Z, Y)) == pytest.approx(0.23891311919190905, abs=1e-5)
    # released code: 0.9 CE + 0.1 * 100 * KL(softmax(pd/20) || softmax(z)) / K   (nn.KLDivLoss() "mean")
    code = method("tf-kd-reg", mode="reference_code")
    assert float(code.objective(Z, Y)) == pytest.approx(2.651670204362177, abs=1e-5)


# SSKD: 2 images x 4 views (rows 0-3 image 0 at 0/90/180/270 degrees, rows 4-7 image 1), 3 classes, D = 2
S_LOGITS = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.2, 0.1], [0.0, 1.0, 0.0], [0.3, -0.2, 0.4],
                         [-1.0, 0.5, 2.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.2, 0.1, -0.3]])
T_LOGITS = torch.tensor([[2.0, 0.0, -1.0], [1.0, 0.5, 0.0], [0.0, 2.0, 1.0], [0.5, 0.0, 1.5],
                         [-1.0, 0.0, 2.5], [0.0, 1.0, 0.5], [1.5, 0.0, 1.0], [0.0, 0.5, 1.0]])
S_PROJ = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8], [0.0, 1.0], [0.6, 0.8], [1.0, 0.2], [-1.0, 0.5]])
T_PROJ = torch.tensor([[1.0, 0.2], [0.9, 0.1], [0.1, 1.0], [0.8, 0.6], [0.2, 1.0], [0.3, 1.0], [1.0, 0.1], [-0.2, 1.0]])
Y_SSKD = torch.tensor([0, 2])


def test_sskd_similarity_and_filter():
    sim = view_similarity(T_PROJ)  # (3B, B): rotated views (rows 1,2,3,5,6,7) x normal views (rows 0, 4)
    assert sim.shape == (6, 2)
    assert float(sim[0, 0]) == pytest.approx((0.9 * 1.0 + 0.1 * 0.2) / math.hypot(0.9, 0.1) / math.hypot(1.0, 0.2), abs=1e-6)
    # rows 1 and 4 rank their own source image second (wrong); keep all correct + int(2 * 0.75) = 1 wrong (row 1 first)
    assert keep_ranked(sim, torch.tensor([0, 0, 0, 1, 1, 1]), 0.75).tolist() == [0, 1, 2, 3, 5]
    assert keep_ranked(sim, torch.tensor([0, 0, 0, 1, 1, 1]), 0.0).tolist() == [0, 2, 3, 5]
    assert keep_ranked(sim, torch.tensor([0, 0, 0, 1, 1, 1]), 1.0).tolist() == list(range(6))
    # class ranks of the rotated views' teacher logits vs labels [0,0,0,2,2,2]: [0, 2, 1, 1, 1, 0];
    # keeping half of the 4 wrong ones keeps the two best-ranked (rank 1: rows 2, 3)
    t_rot = T_LOGITS[[1, 2, 3, 5, 6, 7]]
    assert keep_ranked(t_rot, torch.tensor([0, 0, 0, 2, 2, 2]), 0.5).tolist() == [0, 2, 3, 5]


def test_sskd_losses():
    # stage 1: mean_j -log softmax(S_t[j])[j // 3]
    assert float(head_loss(T_PROJ)) == pytest.approx(0.6719834138760228, abs=1e-5)
    # stage 2: 0.1 CE(normal) + 0.9 * 16 KL_4(normal) + 2.7 * 16 KL_4(rotated, all kept)
    #          + 10 * 0.25 KL_0.5(similarities, rows [0, 1, 2, 3, 5] kept)
    m = method("sskd")
    total, parts = m.objective(S_LOGITS, S_PROJ, T_LOGITS, T_PROJ, Y_SSKD)
    assert parts["ce"] == pytest.approx(0.32445863055076873, abs=1e-5)
    assert parts["kd"] == pytest.approx(0.10837004688828603, abs=1e-5)
    assert parts["tf"] == pytest.approx(0.15874694980772758, abs=1e-5)
    assert parts["ss"] == pytest.approx(0.05957902285528216, abs=1e-5)
    assert parts["kept_tf"] == 1.0 and parts["kept_ss"] == pytest.approx(5 / 6)
    assert float(total) == pytest.approx(1.1543858982882202, abs=1e-5)


def test_rotations_layout():
    x = torch.arange(2 * 1 * 2 * 2, dtype=torch.float32).view(2, 1, 2, 2)
    r = rotations(x)
    assert r.shape == (8, 1, 2, 2)
    assert torch.equal(r[0], x[0]) and torch.equal(r[4], x[1])
    assert torch.equal(r[1], torch.rot90(x[0], 1, dims=(1, 2))) and torch.equal(r[7], torch.rot90(x[1], 3, dims=(1, 2)))


@pytest.mark.parametrize("arch, shape", [("lenet5-half", (1, 16, 16)), ("alexnet-quarter", (3, 32, 32)),
                                         ("resnet18", (3, 16, 16))])
def test_feature_tap_gives_the_final_layer_input(arch, shape):
    torch.manual_seed(0)
    model = get_model(arch, num_classes=10, in_channels=shape[0], image_size=shape[1]).eval()
    tap = FeatureTap(model)
    x = torch.rand(3, *shape)
    with torch.no_grad():
        logits = model(x)
        assert tap.features.shape == (3, tap.dim)
        assert torch.allclose(tap.layer(tap.features), logits, atol=1e-5)
    tap.remove()
    model(x)
    assert tap.features is None  # hook removed
    assert penultimate_features(model, x).shape == (3, tap.dim)


def test_projected_model_frozen_backbone_does_not_train():
    torch.manual_seed(0)
    backbone = get_model("lenet5-half", num_classes=10, in_channels=1, image_size=16)
    frozen = ProjectedModel(backbone, freeze_backbone=True).train()
    before = [p.clone() for p in backbone.parameters()]
    logits = frozen(torch.rand(4, 1, 16, 16))
    assert logits.shape == (4, 10) and frozen.projection.shape == (4, 100)
    frozen(rotations(torch.rand(2, 1, 16, 16)))
    head_loss(frozen.projection).backward()
    opt = torch.optim.SGD([p for p in frozen.parameters() if p.requires_grad], lr=1.0)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, backbone.parameters()))
    assert not backbone.training and frozen.head.training
    assert frozen.release() is backbone and count_hooks(backbone) == 0


def count_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


def test_query_all_asks_each_image_once():
    from db3kd.oracle import HardLabelOracle

    torch.manual_seed(0)
    model = get_model("lenet5-half", num_classes=10, in_channels=1, image_size=16)
    oracle = HardLabelOracle(model, batch_size=7, input_shape=(1, 16, 16))
    x = torch.randint(0, 256, (25, 1, 16, 16), dtype=torch.uint8)
    labels = query_all(oracle, x, chunk=10)
    assert labels.dtype == torch.int64 and labels.shape == (25,) and oracle.queries == 25


# ------------------------------------------------------------------------------- one short run of every method


@pytest.fixture(scope="module")
def splits():
    return fake_splits(n_val=10)


def _tiny_config(name: str):
    """The smoke configuration with a LeNet5-half teacher, one epoch per stage, all 40 images."""
    cfg = resolve("digits", name, "smoke")
    teacher = cfg.teacher.model_copy(update={"arch": "lenet5-half", "epochs": 1, "batch_size": 16})
    student = cfg.student.model_copy(update={"epochs": 1, "batch_size": 16, "train_subset": None})
    fields = get_method(name).Params.model_fields
    params = {**cfg.method_params, **{k: 1 for k in ("aux_epochs", "head_epochs") if k in fields}}
    return replace(cfg, teacher=teacher, student=student, method_params=params)


EXPECTED_QUERIES = {"standard-kd": 40, "hard-label-kd": 40}
BASELINE_NAMES = ("teacher-ce", "student-ce", "standard-kd", "surrogate-kd", "noise-logits", "hard-label-kd", "ban",
                  "tf-kd-self", "tf-kd-reg", "sskd")


@pytest.mark.parametrize("name", [n if n in BASELINE_NAMES else pytest.param(n, marks=pytest.mark.slow)
                                  for n in method_names()])
def test_every_method_runs_one_epoch(name, splits, tmp_path):
    """Baselines run in the default suite; other methods (DB3KD's own, tested elsewhere) only with -m slow."""
    record = run(_tiny_config(name), splits=splits, run_dir=tmp_path)
    assert 0.0 <= record["student_accuracy"] <= 1.0
    assert record["method"] == name and record["teacher_access"] == get_method(name).teacher_access
    if record["teacher_access"] == "none":
        assert record["queries_total"] == 0
    if name in EXPECTED_QUERIES:
        assert record["queries_total"] == EXPECTED_QUERIES[name] == splits.train_x.shape[0]
        assert record["queries_per_sample"] == 1.0
    if name in BASELINE_NAMES:
        assert 0.0 <= record["metrics"]["val_accuracy"] <= 1.0


def test_ban_records_every_generation(splits, tmp_path):
    cfg = _tiny_config("ban")
    record = run(replace(cfg, method_params={**cfg.method_params, "generations": 3}), splits=splits, run_dir=tmp_path)
    rows = record["tables"]["generations"]
    assert [r["generation"] for r in rows] == [0, 1, 2, 3]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in rows)
    assert 0.0 <= record["metrics"]["ensemble_test_accuracy"] <= 1.0


@pytest.mark.parametrize("name", ["standard-kd", "hard-label-kd"])
def test_resumed_run_reuses_answers_and_counts_them_once(name, splits, tmp_path):
    cfg = _tiny_config(name)
    first = run(cfg, splits=splits, run_dir=tmp_path)
    (tmp_path / cfg.config_hash() / "record.json").unlink()  # as if interrupted after the last epoch
    again = run(cfg, splits=splits, run_dir=tmp_path)
    assert first["queries_total"] == again["queries_total"] == splits.train_x.shape[0]
    assert again["student_accuracy"] == first["student_accuracy"]
