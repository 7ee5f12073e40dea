"""Zero- and few-shot baselines: noise-input, ZSKT, FS-BBT (scores and labels) and belief matching.

Query accounting is checked against an independent count of the images every oracle answered;
teacher access against what each method actually receives; the transition-curve evaluation on
closed-form cases (a model against itself has MTE 0).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

import baselines.fs_bbt  # noqa: F401  (registers fs-bbt, fs-bbt-labels)
import baselines.zero_shot  # noqa: F401  (registers noise-input)
import baselines.zskt  # noqa: F401  (registers zskt)
from baselines.fs_bbt import CVAE, FSBBT, FSBBTLabels, mixup_pool, sample_cvae
from baselines.zero_shot import NoiseInput, OnlineAugment, label_transfer_set, sample_noise
from baselines.zskt import ZSKT, Generator, attention_points
from db3kd import oracle as oracle_module
from db3kd.belief_matching import transition_curves
from db3kd.config import resolve
from tests.conftest import fake_splits
from db3kd.context import MethodContext
from db3kd.data import DataSplits
from db3kd.models import get_model
from db3kd.oracle import HardLabelOracle, ScoreOracle
from db3kd.registry import get_method
from db3kd.runner import run, teacher_access_for

METHODS = ("noise-input", "zskt", "fs-bbt", "fs-bbt-labels")
TINY = {
    "noise-input": {"num_images": 48, "epochs": 1, "batch_size": 16},
    "fs-bbt": {"shots_per_class": 2, "m_mix": 60, "cvae_epochs": 1, "cvae_batch_size": 16, "epochs": 1,
               "batch_size": 16},
    "zskt": {"iterations": 2, "batch_size": 8, "gen_channels": 8, "student_steps": 2, "log_every": 1,
             "mte_images": 3, "mte_steps": 2},
}
TINY["fs-bbt-labels"] = TINY["fs-bbt"]


@pytest.fixture(scope="module")
def splits():
    return fake_splits()


def _tiny_config(name: str, teacher_arch: str = "lenet5"):
    cfg = resolve("digits", name, "smoke", method_overrides=TINY[name])
    teacher = cfg.teacher.model_copy(update={"arch": teacher_arch, "epochs": 1, "batch_size": 16})
    student = cfg.student.model_copy(update={"epochs": 1, "batch_size": 16, "train_subset": None})
    return replace(cfg, teacher=teacher, student=student)


@pytest.fixture
def answered(monkeypatch):
    """Counts every image any oracle answers, independently of the oracle's own counter."""
    count = {"images": 0}
    original = oracle_module._Oracle.__call__

    def counting(self, x):
        out = original(self, x)
        count["images"] += int(x.shape[0])
        return out

    monkeypatch.setattr(oracle_module._Oracle, "__call__", counting)
    return count


# ------------------------------------------------------------------------------------- registry metadata


def test_metadata():
    expected = {"noise-input": ("labels", "none"), "zskt": ("white_box", "none"), "fs-bbt": ("scores", "few_shot"),
                "fs-bbt-labels": ("labels", "few_shot")}
    for name, (access, data) in expected.items():
        cls = get_method(name)
        assert (cls.teacher_access, cls.data) == (access, data)
    assert get_method("fs-bbt").paper_results == {"mnist": 98.42, "fmnist": 84.73, "cifar10": 74.10, "cifar100": 56.28}
    paper = get_method("fs-bbt").Params.for_profile("paper", "fmnist")
    assert (paper.m_mix, paper.cvae_epochs, paper.epochs, paper.batch_size) == (48000, 200, 50, 64)
    assert get_method("fs-bbt").Params.for_profile("paper", "cifar10").m_mix == 40000
    z = get_method("zskt").Params()
    assert (z.iterations, z.beta, z.student_steps, z.lr_student, z.lr_generator, z.kl_reduction) == (
        80000, 250.0, 10, 2e-3, 1e-3, "batchmean")


# ------------------------------------------------------------------------------------- query accounting


@pytest.mark.parametrize("name", ["noise-input", "fs-bbt", "fs-bbt-labels"])
def test_queries_equal_images_answered(name, splits, answered):
    record = run(_tiny_config(name), splits=splits)
    m = record["metrics"]
    if name == "noise-input":
        expected = TINY[name]["num_images"]
    else:  # n_real + m_mix: every real image once, every MixUp pair kept or replaced by one CVAE image
        expected = min(2 * 10, splits.train_x.shape[0]) + TINY[name]["m_mix"]
        assert m["n_real"] + m["n_mixup"] + m["n_cvae"] == expected
    # the teacher's own test-set evaluation goes through no oracle here (built-in teacher)
    assert record["queries_total"] == answered["images"] == record["transfer_set_size"] == expected
    assert record["queries_per_sample"] == 1.0
    assert 0.0 <= record["student_accuracy"] <= 1.0


def test_zskt_queries_no_oracle(splits, answered):
    record = run(_tiny_config("zskt"), splits=splits)
    assert record["queries_total"] == 0 and answered["images"] == 0
    assert record["transfer_set_size"] == 2 * 8
    assert record["metrics"]["beta_effective"] == 250.0 and record["metrics"]["attention_points"] == 2
    assert record["tables"]["zskt"]["kl_reduction"] == "batchmean"
    assert record["tables"]["zskt"]["transition_curves"]["split"] == "validation"


# ------------------------------------------------------------------------------------- teacher access


@pytest.mark.parametrize("name, kind", [("zskt", nn.Module), ("fs-bbt-labels", HardLabelOracle),
                                        ("fs-bbt", ScoreOracle), ("noise-input", HardLabelOracle)])
def test_each_method_receives_exactly_its_access(name, kind, splits, monkeypatch):
    cls = get_method(name)
    seen = {}
    original = cls.run

    def spy(self, ctx):
        seen["teacher"] = ctx.teacher
        if name == "zskt":
            seen["before"] = {k: v.clone() for k, v in ctx.teacher.state_dict().items()}
            seen["flags"] = [p.requires_grad for p in ctx.teacher.parameters()]
        return original(self, ctx)

    monkeypatch.setattr(cls, "run", spy)
    run(_tiny_config(name), splits=splits)
    teacher = seen["teacher"]
    assert isinstance(teacher, kind)
    if kind is HardLabelOracle:
        assert not isinstance(teacher, ScoreOracle)
    if name == "zskt":  # the module, frozen: its weights are unchanged and its flags restored
        assert not isinstance(teacher, (HardLabelOracle, ScoreOracle))
        after = teacher.state_dict()
        assert all(torch.equal(seen["before"][k], after[k]) for k in after)
        assert [p.requires_grad for p in teacher.parameters()] == seen["flags"]


# ------------------------------------------------------------------------------------- one step of each method


def _context(name: str, splits: DataSplits, tmp_path, teacher: nn.Module, *, hide_labels: bool = True):
    cfg = _tiny_config(name)
    cls = get_method(name)
    params = cls.Params(**cfg.method_params)
    view = teacher_access_for(cls.teacher_access, teacher, cfg, tuple(splits.train_x.shape[1:]), torch.device("cpu"))
    ctx = MethodContext(config=cfg, params=params, train_x=splits.train_x, train_y=None if hide_labels else splits.train_y,
                        val_x=splits.val_x, val_y=splits.val_y, num_classes=10, teacher=view,
                        device=torch.device("cpu"), workdir=tmp_path, log=lambda metrics, step=None: None)
    return cls(params), ctx


@pytest.mark.parametrize("name", METHODS)
def test_one_short_training_step_changes_the_student(name, splits, tmp_path):
    """Tiny data, one epoch / one iteration; ground-truth labels hidden (train_y=None): none of
    these methods may read them."""
    torch.manual_seed(0)
    teacher = get_model("lenet5", 10, 1, 16)
    method, ctx = _context(name, splits, tmp_path, teacher)
    fresh = ctx.new_model()  # same seed offset as the method's student: same initial weights
    out = method.run(ctx)
    changed = any(not torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), out.student.state_dict().values()))
    assert changed
    assert all(isinstance(v, float) for v in out.metrics.values())
    if name != "zskt":
        assert out.transfer_set_size == ctx.teacher.queries


def test_zskt_uses_beta_zero_without_comparable_blocks(splits, tmp_path):
    class Flat(nn.Module):  # no convolution: nothing to match attention with
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(256, 10)

        def forward(self, x):
            return self.fc(x.flatten(1))

    method, ctx = _context("zskt", splits, tmp_path, Flat())
    out = method.run(ctx)
    assert out.metrics["beta_effective"] == 0.0 and out.metrics["attention_points"] == 0.0
    assert "no convolutional stages" in out.tables["zskt"]["beta_reason"]


def test_attention_points_are_conv_stages():
    t, s = get_model("lenet5", 10, 1, 28), get_model("lenet5-half", 10, 1, 28)
    assert [n for n, _ in attention_points(t)] == ["features.1", "features.4"] == [n for n, _ in attention_points(s)]
    assert len(attention_points(get_model("alexnet-quarter", 10, 3, 32))) == 5
    assert [n for n, _ in attention_points(get_model("resnet18", 10, 3, 32))] == ["layer1", "layer2", "layer3", "layer4"]


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 16, 16), (3, 32, 32), (1, 30, 30)])
def test_generator_shape_and_range(shape):
    g = Generator(100, shape, width=8)
    for output in ("sigmoid", "clamp"):
        g.output = output
        x = g(torch.randn(4, 100))
        assert x.shape == (4, *shape) and x.min() >= 0 and x.max() <= 1


# ------------------------------------------------------------------------------------- FS-BBT pieces


def test_mixup_pool_drops_near_copies():
    x = torch.randint(0, 256, (10, 1, 4, 4), dtype=torch.uint8)
    mixed, dropped = mixup_pool(x, 1000, 1.0, 2, 0.05, torch.Generator().manual_seed(0))
    assert mixed.shape[0] + dropped == 1000 and mixed.dtype == torch.uint8
    assert 40 <= dropped <= 180  # lam rounded to 2 decimals: P(lam <= 0.05 or >= 0.95) ~ 0.105


@pytest.mark.parametrize("shape, arch", [((1, 16, 16), "mlp"), ((3, 32, 32), "conv"), ((3, 20, 20), "conv")])
def test_cvae_shapes_and_balanced_samples(shape, arch):
    model = CVAE(shape, 10, latent=2, arch=arch)
    x = torch.rand(6, *shape)
    loss = model.loss(x, torch.arange(6), torch.randn(6, 2))
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    images, labels = sample_cvae(model, 25, 10, torch.Generator().manual_seed(0))
    assert images.shape == (25, *shape) and images.dtype == torch.uint8
    counts = torch.bincount(labels, minlength=10)
    assert counts.max() - counts.min() <= 1


def test_label_transfer_set_and_noise():
    model = get_model("lenet5-half", 10, 1, 16)
    x = sample_noise(30, (1, 16, 16), "zsdb3kd", torch.Generator().manual_seed(0))
    assert x.dtype == torch.uint8 and x.shape == (30, 1, 16, 16)
    labels_oracle, scores_oracle = HardLabelOracle(model), ScoreOracle(model)
    t_l, y_l = label_transfer_set(labels_oracle, x, 10)
    t_s, y_s = label_transfer_set(scores_oracle, x, 10)
    assert torch.equal(y_l, y_s) and torch.equal(t_l.argmax(1), y_l) and torch.all(t_l.sum(1) == 1)
    assert torch.allclose(t_s.sum(1), torch.ones(30)) and labels_oracle.queries == scores_oracle.queries == 30


def test_online_augment_mixes_targets_like_inputs():
    aug = OnlineAugment("none", 1.0, seed=0)
    xb = torch.rand(8, 1, 4, 4)
    idx = torch.arange(8)
    mixed = aug(xb, idx)
    lam, perm = aug._lam, aug._perm
    assert torch.allclose(mixed, lam.view(-1, 1, 1, 1) * xb + (1 - lam.view(-1, 1, 1, 1)) * xb[perm])
    t = torch.eye(8)
    assert torch.allclose(aug.mix(t).sum(1), torch.ones(8))
    assert torch.equal(OnlineAugment("shift_rotate", 1.0, seed=0)(xb, idx), OnlineAugment("shift_rotate", 1.0, seed=0)(xb, idx))


# ------------------------------------------------------------------------------------- belief matching


def _tiny_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4))


def test_transition_curves_of_a_model_against_itself_have_zero_error():
    net = _tiny_net(0)
    x = torch.rand(10, 1, 4, 4)
    res = transition_curves(net, net, x, None, 4, steps=5, n=6)
    assert res["teacher_kind"] == "module" and res["mte"] == 0.0
    assert res["curves"].shape == res["teacher_curve"].shape == res["error_curve"].shape == (6,)
    assert res["n_images"] == 6 and res["n_walks"] == 6 * 3 and res["student_pj"].shape == (18, 6)
    assert torch.all((res["curves"] >= 0) & (res["curves"] <= 1))
    assert res["curves"][-1] > res["curves"][0]  # the walk raises p_j
    other = transition_curves(net, _tiny_net(1), torch.rand(300, 1, 4, 4), None, 4, steps=5, n=6)
    assert 1 <= other["n_images"] <= 6 and other["mte"] > 0


def test_transition_curves_with_label_and_score_oracles():
    net = _tiny_net(0)
    x = torch.rand(10, 1, 4, 4)
    labels = HardLabelOracle(net, input_shape=(1, 4, 4))
    res = transition_curves(net, labels, x, None, 4, steps=3, n=5)
    assert res["teacher_kind"] == "labels" and res["mte"] != res["mte"]  # NaN: no probabilities
    assert res["curves"].shape == (4,) and "label-only" in res["note"]
    assert res["queries"] == labels.queries == 10 + res["n_walks"] * 4  # agreement scan + every step of every walk
    scores = transition_curves(net, ScoreOracle(net, input_shape=(1, 4, 4)), x, None, 4, steps=3, n=5, clip=True)
    assert scores["teacher_kind"] == "scores" and scores["mte"] == pytest.approx(0.0, abs=1e-6)


def test_transition_curves_restricts_to_agreeing_correct_images():
    net = _tiny_net(0)
    x = torch.rand(12, 1, 4, 4)
    with torch.no_grad():
        pred = net(x).argmax(1)
    y = pred.clone()
    y[:4] = (pred[:4] + 1) % 4  # four images the model gets wrong
    res = transition_curves(net, net, x, y, 4, steps=1, n=None)
    assert res["n_images"] == 8


# ------------------------------------------------------------------------------------- real digits, trained teacher


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_smoke_profile_on_digits(name, answered):
    record = run(resolve("digits", name, "smoke"))
    assert record["queries_total"] == answered["images"]
    assert record["queries_total"] == (0 if name == "zskt" else record["transfer_set_size"])
