"""The fair protocol of issue 18: statistics in the tables, grouping, orderings, forest plot,
teacher seed, one-cycle schedule, tuned parameters, milestone selection on validation."""

from __future__ import annotations

import csv
import math

import pytest

from db3kd import leaderboard as lb
from db3kd import records as rec
from db3kd import stats

from test_leaderboard import PNG, make_record

ACC = {  # per-seed accuracies (fractions) of a fake cpu table
    "student-ce": [0.88, 0.91, 0.92],
    "label-smoothing": [0.89, 0.91, 0.93],
    "db3kd-mbd": [0.90, 0.92, 0.95],
    "db3kd-bd": [0.89, 0.915, 0.94],
    "db3kd-sd": [0.94, 0.9705, 0.98],  # +6, +6.05, +6 points over student-ce
    "noise-logits": [0.80, 0.81, 0.83],
    "zsdb3kd": [0.70],
}
ACCESS = {"student-ce": ("none", "full"), "label-smoothing": ("none", "full"), "db3kd-sd": ("none", "full"),
          "noise-logits": ("none", "full"), "db3kd-mbd": ("labels", "full"), "db3kd-bd": ("labels", "full"),
          "zsdb3kd": ("labels", "none")}


@pytest.fixture
def board(tmp_path):
    root = tmp_path / "results"
    for method, accs in ACC.items():
        for seed, acc in enumerate(accs):
            r = make_record(method, seed, acc, profile="cpu", reference_row=method == "student-ce")
            r["teacher_access"], r["data"] = ACCESS[method]
            r["teacher_accuracy"], r["teacher_checkpoint"] = 0.993, "ckpt-shared"
            rec.write_record(r, root)
    lb.write_all(root)
    return root / "mnist"


def _tables(md: str) -> dict[str, tuple[list[str], list[list[str]]]]:
    """{group heading: (header, rows)} of every markdown table under a '### ' heading."""
    out, heading, lines = {}, None, md.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("### "):
            heading = line[4:]
        if line.startswith("|") and not lines[i - 1].startswith("|"):
            block = []
            for follow in lines[i:]:
                if not follow.startswith("|"):
                    break
                block.append([c.strip() for c in follow.strip("|").split("|")])
            out[heading] = (block[0], block[2:])
    return out


def test_csv_has_the_statistics_of_issue_18(board):
    with open(board / "cpu.csv") as f:
        reader = csv.DictReader(f)
        rows = {r["method"]: r for r in reader}
    assert reader.fieldnames[:8] == ["method", "n", "mean", "std", "ci95_low", "ci95_high", "p_vs_student_ce",
                                     "p_vs_label_smoothing"]
    acc = {m: dict(enumerate(v)) for m, v in ACC.items()}
    expected = stats.compare_methods(acc)
    mbd = rows["db3kd-mbd"]
    assert int(mbd["n"]) == 3 and float(mbd["mean"]) == pytest.approx(100 * sum(ACC["db3kd-mbd"]) / 3, abs=1e-4)
    s = stats.summarize(ACC["db3kd-mbd"])
    assert float(mbd["ci95_low"]) == pytest.approx(100 * s.ci95_low, abs=1e-4)
    assert float(mbd["p_vs_student_ce"]) == pytest.approx(expected["db3kd-mbd"]["p_vs_student_ce"], abs=1e-6)
    assert float(mbd["p_vs_label_smoothing"]) == pytest.approx(expected["db3kd-mbd"]["p_vs_label_smoothing"], abs=1e-6)
    assert float(mbd["diff_vs_student_ce"]) == pytest.approx(2.0, abs=1e-4)
    # 1 seed: no spread, no interval, no test
    z = rows["zsdb3kd"]
    assert z["n"] == "1" and z["std"] == "" and z["ci95_low"] == "" and z["p_vs_student_ce"] == ""
    assert rows["student-ce"]["p_vs_student_ce"] == ""


def test_tables_are_grouped_marked_and_say_what_they_test(board):
    md = (board / "cpu.md").read_text()
    tables = _tables(md)
    headings = list(tables)
    assert headings == ["reference rows (the teacher and cross-entropy students)",
                        "no teacher · full training data (teacher access `none`, data `full`)",
                        "teacher labels (top-1) · full training data (teacher access `labels`, data `full`)",
                        "teacher labels (top-1) · no data (teacher access `labels`, data `none`)"]
    header, ref = tables[headings[0]]
    assert [r[0] for r in ref] == ["student-ce (reference)"] and "teacher access" in header
    assert ref[0][header.index("p vs student-ce")] == "control"
    header, rows = tables[headings[1]]
    assert [r[0] for r in rows] == ["db3kd-sd", "label-smoothing", "noise-logits"]
    col = {c: i for i, c in enumerate(header)}
    sd = rows[0]
    assert sd[col["p vs student-ce"]].endswith(" *")  # db3kd-sd: +6 points on every seed
    assert sd[col["Δ vs student-ce (points, paired 95% CI)"]].startswith("+6.02 [")
    z = tables[headings[3]][1][0]
    assert z[col["student acc. %"]] == "70.00 (1 seed)"
    assert z[col["Δ vs student-ce (points, paired 95% CI)"]] == "-18.00 (1 seed, no interval)"
    # constants in the header, not in the columns
    assert "teacher checkpoint" not in col and "teacher checkpoint: ckpt-shared" in md
    assert "paper %" not in col and "not shown: profile `cpu`" in md
    assert "paired t-test over shared seeds (scipy.stats.ttest_rel), Holm-corrected" in md
    assert "mean ± std over seeds" not in md


def test_orderings_paragraph_is_generated_from_the_records(board):
    md = (board / "cpu.md").read_text()
    section = md[md.index("## The paper's Table 1 orderings, here"):]
    lines = [line for line in section.splitlines() if line.startswith("- ")]
    assert len(lines) == len(stats.PAPER_ORDERING)
    acc = {m: dict(enumerate(v)) for m, v in ACC.items()}
    o = {(x.a, x.b): x for x in stats.paper_orderings(acc)}
    mbd_bd = o[("db3kd-mbd", "db3kd-bd")]
    assert lines[0].startswith("- `db3kd-mbd` ≥ `db3kd-bd`: holds on the means")
    assert f"p = {mbd_bd.p_value:.3f}" in lines[0]
    assert lines[1].startswith("- `db3kd-bd` ≥ `db3kd-sd`: does NOT hold")
    assert "not measured (no record of standard-kd)" in lines[2]
    ce_noise = o[("student-ce", "noise-logits")]
    assert lines[5].startswith("- `student-ce` > `noise-logits`: holds") and ce_noise.observed


def test_forest_plot_is_written_and_honest_about_one_seed(board, tmp_path):
    from db3kd import plots

    path = board / "cpu-forest.png"
    assert path.read_bytes().startswith(PNG) and "cpu-forest.png" in (board / "cpu.md").read_text()
    records = rec.load_records(board.parent, "mnist", "cpu")
    assert plots.forest_plot([r for r in records if r["method"] != "student-ce"], tmp_path / "f.png") is None
    one = [r for r in records if int(r["seed"]) == 0]
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    seen = {}
    real_save = plots._save

    def grab(fig, p):
        ax = fig.axes[0]
        seen["labels"] = [t.get_text() for t in ax.get_yticklabels()]
        seen["title"] = ax.get_title()
        return real_save(fig, p)

    plots._save = grab
    try:
        assert plots.forest_plot(one, tmp_path / "one.png") is not None
    finally:
        plots._save = real_save
    assert all(label.endswith("(1 seed, no interval)") for label in seen["labels"])
    assert "1 seed per method" in seen["title"]
    plt.close("all")


def test_one_seed_table_claims_no_spread(tmp_path):
    root = tmp_path / "results"
    for m, acc in (("student-ce", 0.9), ("db3kd-bd", 0.91)):
        rec.write_record(make_record(m, 0, acc, profile="cpu"), root)
    lb.write_all(root)
    md = (root / "mnist" / "cpu.md").read_text()
    assert "1 seed per method" in md and "± " not in md.split("###")[1]
    tex = (root / "mnist" / "cpu.tex").read_text()
    assert "1 seed per method, no spread" in tex and "pm" not in tex


def test_paper_column_only_in_the_paper_setting(tmp_path):
    recs = [make_record("db3kd-bd", 0, 0.99, profile="paper")]
    recs[0]["student_arch"] = "lenet5-half"
    assert lb.paper_comparability(recs, "mnist", "paper") is None
    recs[0]["student_arch"] = "lenet5-fifth"
    assert "differ from the paper's column (lenet5-half)" in lb.paper_comparability(recs, "mnist", "paper")
    assert "profile `cpu`" in lb.paper_comparability(recs, "mnist", "cpu")


# --- teachers: one per (dataset, profile), own seed; one-cycle schedule -----------------------------


def test_teacher_seed_is_the_teachers_own_not_the_run_seed(monkeypatch):
    from db3kd import config as cfgmod
    from db3kd import runner

    a, b = cfgmod.resolve("digits", "student-ce", "smoke", 0), cfgmod.resolve("digits", "student-ce", "smoke", 3)
    assert a.teacher_seed == b.teacher_seed == 0 and a.teacher == b.teacher
    assert cfgmod.resolve("digits", "student-ce", "smoke", 3, teacher_seed=2).teacher_seed == 2
    with pytest.raises(Exception, match="teacher_seed"):
        cfgmod.resolve("digits", "student-ce", "smoke", 0, teacher_seed=-1)
    seen = {}

    class Stop(Exception):
        pass

    def fake_get_teacher(splits, stage, *, seed, **kw):
        seen["seed"] = seed
        raise Stop

    import db3kd.teacher

    monkeypatch.setattr(db3kd.teacher, "get_teacher", fake_get_teacher)
    with pytest.raises(Stop):
        runner.run(b)
    assert seen["seed"] == 0  # run seed 3, teacher seed 0


def test_cpu_profile_teachers_and_student_data():
    from db3kd.config import resolve

    mnist, fmnist = resolve("mnist", "student-ce", "cpu"), resolve("fmnist", "student-ce", "cpu")
    assert (mnist.teacher.schedule, mnist.teacher.epochs, mnist.teacher.batch_size) == ("onecycle", 12, 128)
    assert fmnist.teacher.epochs == 24 and mnist.teacher.train_subset is None  # the whole 54,000-image split
    assert mnist.student.train_subset >= 10000 and fmnist.student.train_subset >= 10000


def test_onecycle_schedule_steps_once_per_batch(monkeypatch):
    import torch

    from db3kd.config import StageConfig, validate_model
    from db3kd.errors import ConfigError
    from db3kd.training import fit

    with pytest.raises(ConfigError, match="onecycle"):
        validate_model(StageConfig, {"arch": "lenet5", "epochs": 2, "batch_size": 8, "lr": 1e-3,
                                     "schedule": "onecycle", "lr_milestones": (1,)})
    stage = validate_model(StageConfig, {"arch": "lenet5", "epochs": 3, "batch_size": 16, "lr": 1e-2,
                                         "schedule": "onecycle"})
    lrs = []
    real = torch.optim.lr_scheduler.OneCycleLR

    class Spy(real):
        def step(self, *a, **k):
            super().step(*a, **k)
            lrs.append(self.get_last_lr()[0])

    monkeypatch.setattr(torch.optim.lr_scheduler, "OneCycleLR", Spy)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = torch.rand(40, 1, 4, 4)
    y = torch.randint(0, 3, (40,))
    fit(model, x, lambda logits, _xb, idx: torch.nn.functional.cross_entropy(logits, y[idx]), stage.train_config(),
        seed=0)
    assert len(lrs) == 1 + 3 * 3  # the constructor's initial step, then 3 epochs x ceil(40 / 16) batches
    peak = max(lrs)
    assert peak == pytest.approx(1e-2, rel=0.05) and lrs[-1] < 0.1 * peak and lrs[0] < 0.1 * peak  # warm-up, then anneal


# --- DB3KD: labels cached once per dataset, MBD's milestone chosen on validation ------------------------


@pytest.mark.slow
def test_mbd_labels_cached_across_seeds_and_milestone_chosen_on_val(tmp_path, monkeypatch):
    """About 60 s on 2 loaded cores: digits smoke MBD with milestone students, seeds 0 and 1."""
    from db3kd.config import resolve
    from db3kd.data import load_dataset
    from db3kd.runner import run

    monkeypatch.setenv("DB3KD_CACHE", str(tmp_path / "cache"))
    splits = load_dataset("digits")
    first = run(resolve("digits", "db3kd-mbd", "smoke", 0, method_overrides={"milestone_students": True}), splits=splits)
    second = run(resolve("digits", "db3kd-mbd", "smoke", 1, method_overrides={"milestone_students": True}), splits=splits)
    assert first["metrics"]["labels_cached"] == 0.0 and second["metrics"]["labels_cached"] == 1.0
    assert first["metrics"]["label_seed"] == second["metrics"]["label_seed"] == 0.0
    assert second["queries_total"] == first["queries_total"] > 0  # the cached labels' cost is still reported
    for r in (first, second):
        val = r["tables"]["milestone_val_accuracy"]
        assert set(val) == {"60", "120"} and set(r["milestone_accuracy"]) == {"60", "120"}
        chosen = int(r["metrics"]["chosen_milestone"])
        assert val[str(chosen)] == max(val.values()) and r["metrics"]["chosen_milestone_val_accuracy"] == val[str(chosen)]
        assert r["student_accuracy"] == pytest.approx(r["milestone_accuracy"][str(chosen)])


def test_teacher_ce_row_is_the_shared_teacher(tmp_path):
    """teacher-ce scores the very teacher every method distils from (one teacher per dataset and profile)."""
    from test_baselines import _tiny_config

    from db3kd.runner import run
    from tests.conftest import fake_splits

    splits = fake_splits(n_val=10)
    row = run(_tiny_config("teacher-ce"), splits=splits, run_dir=tmp_path)
    other = run(_tiny_config("student-ce").with_seed(2), splits=splits, run_dir=tmp_path)
    assert row["student_accuracy"] == row["teacher_accuracy"] and row["teacher_access"] == "white_box"
    assert row["teacher_checkpoint"] == other["teacher_checkpoint"] and other["teacher_seed"] == 0
    assert 0.0 <= row["metrics"]["val_accuracy"] <= 1.0 and row["queries_total"] == 0


# --- Flowers102: ImageNet-pretrained starting points ------------------------------------------------


def test_pretrained_weights_from_a_file_a_test_writes(tmp_path, monkeypatch):
    import torch
    import torchvision

    from db3kd.config import resolve
    from db3kd.errors import DB3KDError
    from db3kd.models import get_model
    from db3kd.pretrained import load_pretrained, weights_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = weights_file("resnet18", "IMAGENET1K_V1")
    assert path == tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    model = get_model("resnet18", num_classes=102, in_channels=3, image_size=224)
    with pytest.raises(DB3KDError, match="not found: .*resnet18-f37072fd.pth"):
        load_pretrained(model, "resnet18", "IMAGENET1K_V1", download=False)

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(DB3KDError, match="not downloadable.*copy https://download.pytorch.org/models/resnet18"):
        load_pretrained(model, "resnet18", "IMAGENET1K_V1")
    torch.manual_seed(5)
    imagenet = torchvision.models.resnet18(weights=None)  # stands in for the ImageNet file: 1000 classes
    path.parent.mkdir(parents=True)
    torch.save(imagenet.state_dict(), path)
    fc_before = model.fc.weight.clone()
    info = load_pretrained(model, "resnet18", "IMAGENET1K_V1")
    assert torch.equal(model.conv1.weight, imagenet.conv1.weight) and torch.equal(model.layer4[1].bn2.bias,
                                                                                 imagenet.layer4[1].bn2.bias)
    assert torch.equal(model.fc.weight, fc_before) and "fc.weight" in info["kept"]  # 102 classes, not 1000
    assert info["file"] == str(path) and len(info["sha256"]) == 16
    # the paper profile asks for it on Flowers102 (Sec. 4.1: Adam 5e-3, 200 epochs, ImageNet starts)
    cfg = resolve("flowers102", "student-ce", "paper")
    assert cfg.teacher.pretrained == cfg.student.pretrained == "IMAGENET1K_V1"
    assert (cfg.student.optimizer, cfg.student.lr, cfg.student.epochs) == ("adam", 5e-3, 200)
    assert resolve("flowers102", "student-ce", "cpu").student.pretrained is None


def test_student_architecture_is_selectable():
    from db3kd.config import resolve
    from db3kd.errors import ConfigError

    assert resolve("mnist", "db3kd-bd", "cpu", student_arch="lenet5-1/5").student.arch == "lenet5-fifth"
    assert resolve("cifar10", "db3kd-bd", "cpu", student_arch="alexnet-quarter").student.arch == "alexnet-quarter"
    with pytest.raises(ConfigError, match="unknown student architecture 'lenet7'"):
        resolve("mnist", "db3kd-bd", "cpu", student_arch="lenet7")


def test_label_cache_key_follows_what_shapes_the_labels_only():
    from types import SimpleNamespace

    import torch

    from db3kd.methods.decision_based import MBDParams, label_cache_key

    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    y = torch.tensor([0, 1])
    ctx = SimpleNamespace(teacher_checkpoint="abc", train_x=x, train_y=y)
    p = MBDParams()
    key = label_cache_key(ctx, "db3kd-mbd", p, 0)
    assert key == label_cache_key(ctx, "db3kd-mbd", MBDParams(tau=4.0, w_kd=2.0, tau_squared=True), 0)  # student-only
    assert key != label_cache_key(ctx, "db3kd-mbd", MBDParams(budget=300), 0)
    assert key != label_cache_key(ctx, "db3kd-mbd", p, 1)  # the label seed
    assert key != label_cache_key(ctx, "db3kd-bd", p, 0)
    assert key != label_cache_key(SimpleNamespace(teacher_checkpoint="abd", train_x=x, train_y=y), "db3kd-mbd", p, 0)
    assert key != label_cache_key(SimpleNamespace(teacher_checkpoint="abc", train_x=x, train_y=1 - y), "db3kd-mbd", p, 0)
    assert label_cache_key(SimpleNamespace(teacher_checkpoint=None, train_x=x, train_y=y), "db3kd-mbd", p, 0) is None


def test_label_cache_reuses_once_and_stays_out_of_query_budget_runs(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import torch

    from db3kd.methods.decision_based import DB3KDBoundaryDistance, DB3KDParams
    from db3kd.robustness import RobustnessResult

    monkeypatch.setenv("DB3KD_CACHE", str(tmp_path))
    calls = []

    def measure(ctx, x, refs, ref_labels):
        calls.append(1)
        return RobustnessResult(distances=torch.full((2, 2), 0.5), queries=torch.full((2, 2), 7, dtype=torch.int64))

    x = torch.arange(2 * 16, dtype=torch.uint8).view(2, 1, 4, 4)
    y = torch.tensor([0, 1])
    ctx = SimpleNamespace(teacher_checkpoint="abc", train_x=x, train_y=y, config=SimpleNamespace(query_budget=None))
    method = DB3KDBoundaryDistance(DB3KDParams())
    monkeypatch.setattr(method, "robustness", measure)
    ref_idx = torch.tensor([0, 1])
    first, path, cached = method._cached_robustness(ctx, x.float(), ref_idx, 0)
    assert not cached and path.is_file() and len(calls) == 1
    again, _, cached = method._cached_robustness(ctx, x.float(), ref_idx, 0)
    assert cached and len(calls) == 1 and torch.equal(again.distances, first.distances)
    assert again.total_queries == first.total_queries == 28
    ctx.config.query_budget = 10  # a budget run spends its own queries
    _, path, cached = method._cached_robustness(ctx, x.float(), ref_idx, 0)
    assert not cached and path is None and len(calls) == 2
    ctx.config.query_budget = None
    off = DB3KDBoundaryDistance(DB3KDParams(label_cache=False))
    monkeypatch.setattr(off, "robustness", measure)
    assert off._cached_robustness(ctx, x.float(), ref_idx, 0)[1:] == (None, False) and len(calls) == 3
