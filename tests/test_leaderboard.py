"""Leaderboards, references and regression gates from synthetic records (db3kd.records/leaderboard/plots)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from db3kd import leaderboard as lb
from db3kd import records as rec
from db3kd.cli import main as cli_main

PNG = b"\x89PNG\r\n\x1a\n"


def make_record(method, seed, acc, *, dataset="mnist", profile="smoke", qps=10.0, reference_row=False, paper=None,
                milestones=None, distance=None, source="official"):
    config = {"dataset": dataset, "method": method, "profile": profile, "seed": seed,
              "method_params": {"budget": 120, "milestones": [60, 120]}, "student": {"epochs": 2}}
    h = f"{abs(hash((method, seed, dataset, profile))) % 16**12:012x}"
    return {
        "dataset": dataset, "method": method, "profile": profile, "seed": seed,
        "teacher_accuracy": 0.95 + 0.01 * seed, "student_accuracy": acc, "queries_total": int(qps * 100),
        "queries_per_sample": qps, "wall_seconds": 3.0 + seed, "teacher_access": "labels", "data": "full",
        "transfer_set_size": 100, "accuracy_kind": "final", "config_hash": h, "teacher_hash": f"teach{seed:011d}",
        "teacher_checkpoint": f"ckpt{seed:012d}", "numerics": "torch 2.15.0, cpu AVX2, 2 threads",
        "metrics": {"target_entropy": 0.5}, "milestone_accuracy": milestones or {}, "artifacts": {},
        "tables": {"class_distance": distance} if distance else {}, "config": config,
        "command": f"pytest benchmarks -m {dataset} --profile {profile}", "machine": "Linux x86_64, 2 CPUs",
        "data_source": source, "reference_row": reference_row, "paper_accuracy": paper, "git_commit": "abc123",
        "created": f"2026-01-01T00:00:0{seed}+00:00",
    }


def distance_matrix(n=10, shift=0.0):
    return [[None if i == j else round(0.5 + 0.1 * abs(i - j) + shift, 3) for j in range(n)] for i in range(n)]


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    recs = []
    for seed, acc in enumerate([0.80, 0.82, 0.84]):  # mean 82, std 2
        recs.append(make_record("db3kd-mbd", seed, acc, qps=900.0 + seed,
                                milestones={"60": acc - 0.05, "120": acc}, distance=distance_matrix(shift=0.01 * seed)))
    for seed, acc in enumerate([0.90, 0.92]):
        recs.append(make_record("best-method", seed, acc, paper=91.5))
    recs.append(make_record("teacher-row", 0, 0.70, reference_row=True))  # reference rows lead, whatever their accuracy
    recs.append(make_record("weak", 0, 0.50))
    for r in recs:
        rec.write_record(r, root)
    return root


def _md_rows(md: str) -> list[list[str]]:
    lines = [line for line in md.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def _md_table(md: str) -> tuple[list[str], list[list[str]]]:
    """(header of the last table, rows of every markdown table in order, as dicts would be ambiguous)."""
    header, rows, lines = None, [], md.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if not lines[i - 1].startswith("|"):
            header = cells
        elif not set(lines[i].replace("|", "").strip()) <= {"-", ":"}:
            rows.append(dict(zip(header, cells)))
    return header, rows


def test_record_layout_and_json_safety(tmp_path):
    r = make_record("db3kd-mbd", 3, float("nan"))
    r["tables"] = {"class_distance": [[float("nan"), 1.0], [float("inf"), 2.0]]}
    r["config"]["method_params"]["milestones"] = (60, 120)
    path = rec.write_record(r, tmp_path)
    assert path == tmp_path / "records" / "mnist" / "smoke" / "db3kd-mbd-s3.json"
    back = json.loads(path.read_text())  # strict JSON: NaN/inf became null
    assert back["student_accuracy"] is None and back["tables"]["class_distance"][0] == [None, 1.0]
    assert back["config"]["method_params"]["milestones"] == [60, 120]
    with pytest.raises(ValueError, match="student_accuracy"):
        rec.write_record({"dataset": "mnist", "profile": "smoke", "method": "x", "seed": 0}, tmp_path)


def test_tables_order_mean_std_paper_and_configs(results):
    written = lb.write_all(results)
    out = results / "mnist"
    for name in ("smoke.md", "smoke.csv", "smoke.tex", "smoke-accuracy-vs-queries.png", "smoke-mbd-heatmap.png"):
        assert out / name in written and (out / name).is_file(), name
    md = (out / "smoke.md").read_text()
    header, rows = _md_table(md)
    col = set(header)
    assert [r["method"] for r in rows] == ["teacher-row (reference)", "best-method", "db3kd-mbd", "weak"]
    by_method = {r["method"].split()[0]: r for r in rows}
    acc = "student acc. %"
    half = 4.302652729749464 * 2.0 / math.sqrt(3)  # t_{0.975, 2} * std / sqrt(n), in points
    assert by_method["db3kd-mbd"][acc] == f"82.00 ± 2.00 [{82 - half:.2f}, {82 + half:.2f}] (n=3)"
    assert by_method["best-method"][acc].startswith("91.00 ± 1.41 [")
    assert by_method["weak"][acc] == "50.00 (1 seed)"
    # smoke is not the paper's setting: no paper column, a note saying why
    assert "paper %" not in col and "**paper %:** not shown: profile `smoke`" in md
    assert by_method["db3kd-mbd"]["teacher queries / sample"] == "901.0"  # mean queries per sample
    # constant columns move into the header: every record is labels / full / final
    assert "accuracy kind" not in col and "teacher access" not in col
    assert "**Same for every row:**" in md and "accuracy kind: final" in md
    assert "### teacher labels (top-1) · full training data" in md
    # provenance header: command, profile, seeds, machine
    assert "pytest benchmarks -m mnist --profile smoke" in md
    assert "**Profile:** `smoke`" in md and "**Seeds:** 0, 1, 2" in md and "Linux x86_64, 2 CPUs" in md
    # every config link points to a committed config file with the exact config
    links = [c for r in rows for c in r["config"].split()]
    assert len(links) == 7
    for link in links:
        target = link[link.index("(") + 1 : -1]
        assert (out / target).is_file(), target
    cfg = json.loads((out / "configs" / f"{rec.load_records(results, 'mnist', 'smoke')[0]['config_hash']}.json").read_text())
    assert cfg["profile"] == "smoke" and "method_params" in cfg
    # csv: numbers, the statistics columns first
    with open(out / "smoke.csv") as f:
        reader = csv.DictReader(f)
        table = list(reader)
    assert reader.fieldnames[:8] == ["method", "n", "mean", "std", "ci95_low", "ci95_high", "p_vs_student_ce",
                                     "p_vs_label_smoothing"]
    assert [t["method"] for t in table] == ["teacher-row", "best-method", "db3kd-mbd", "weak"]
    assert math.isclose(float(table[2]["mean"]), 82.0) and math.isclose(float(table[2]["std"]), 2.0)
    assert math.isclose(float(table[2]["ci95_low"]), 82 - half, rel_tol=1e-4)
    assert table[2]["p_vs_student_ce"] == ""  # no student-ce record: no test
    assert table[2]["paper_accuracy_pct"] == "99.52"  # the paper's number stays in the csv
    tex = (out / "smoke.tex").read_text()
    assert r"\begin{tabular}" in tex and r"82.00 $\pm$ 2.00 [" in tex and "teacher-row (reference)" in tex


def test_tables_are_regenerated_from_records_only(results, tmp_path):
    lb.write_all(results)
    first = (results / "mnist" / "smoke.md").read_text()
    (results / "mnist" / "smoke.md").unlink()
    assert cli_main(["leaderboard", "--results", str(results)]) == 0
    assert (results / "mnist" / "smoke.md").read_text() == first  # deterministic, nothing but records


def test_synthetic_data_is_announced(tmp_path):
    root = tmp_path / "results"
    rec.write_record(make_record("db3kd-sd", 0, 0.6, dataset="cifar10", source="SYNTHETIC CIFAR-10: fake"), root)
    lb.write_all(root)
    md = (root / "cifar10" / "smoke.md").read_text()
    assert "SYNTHETIC" in md.split("|")[0]  # in the header, above the table
    assert "SYNTHETIC" in (root / "cifar10" / "smoke.tex").read_text()


def test_plots_are_written(results, tmp_path):
    from db3kd import plots

    recs = rec.load_records(results)
    acc = plots.accuracy_vs_queries(recs, tmp_path / "a.png")
    heat = plots.class_distance_heatmap(recs, tmp_path / "h.png")
    for p in (acc, heat):
        data = p.read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000
    # no db3kd-mbd record: no plot (and write_plots removes stale files)
    others = [r for r in recs if r["method"] != "db3kd-mbd"]
    assert plots.accuracy_vs_queries(others, tmp_path / "none.png") is None
    out = tmp_path / "board"
    (out).mkdir()
    (out / "smoke-mbd-heatmap.png").write_bytes(PNG)
    # (the label-only records still make the accuracy-versus-queries frontier)
    assert [p.name for p in plots.write_plots(others, out, "smoke")] == ["smoke-frontier.png"]
    assert not (out / "smoke-mbd-heatmap.png").exists()


def test_tolerance_has_a_floor_and_follows_the_seed_spread():
    assert lb.tolerance([0.5], "smoke") == lb.TOLERANCE_FLOOR["smoke"]
    assert lb.tolerance([0.80, 0.80, 0.80], "cpu") == lb.TOLERANCE_FLOOR["cpu"]
    assert lb.tolerance([0.80, 0.82, 0.84], "paper") == pytest.approx(lb.TOLERANCE_SIGMAS * 0.02)


def test_gate_fails_on_planted_regressions(results, tmp_path):
    recs = rec.load_records(results, "mnist", "smoke")
    refs_dir = tmp_path / "refs"
    path = lb.update_references(refs_dir, "mnist", "smoke", recs)
    refs = lb.load_references(refs_dir, "mnist", "smoke")
    assert path.name == "mnist-smoke.json"
    mbd = refs["db3kd-mbd"]
    assert mbd["student_accuracy"] == pytest.approx(0.82) and mbd["queries_per_sample"] == 902.0
    assert mbd["tolerance"] == pytest.approx(max(lb.TOLERANCE_FLOOR["smoke"], 3 * 0.02))

    ok = make_record("db3kd-mbd", 1, 0.82 - mbd["tolerance"] + 0.001, qps=901.0)
    assert lb.check_gate(ok, refs).status == "pass"
    low = make_record("db3kd-mbd", 1, 0.82 - mbd["tolerance"] - 0.001, qps=901.0)
    result = lb.check_gate(low, refs)
    assert result.failed and "student accuracy" in str(result)
    more_queries = make_record("db3kd-mbd", 1, 0.9, qps=901.5)  # seed 1's reference is exactly 901
    result = lb.check_gate(more_queries, refs)
    assert result.failed and "queries per sample" in str(result)
    new_seed = make_record("db3kd-mbd", 7, 0.9, qps=902.0)  # unknown seed: the largest reference count
    assert lb.check_gate(new_seed, refs).status == "pass"
    missing = make_record("brand-new-method", 0, 0.1)
    result = lb.check_gate(missing, refs)
    assert result.status == "no_reference" and not result.failed and "no stored reference" in str(result)


def test_query_gate_is_exact_on_the_reference_platform_and_slack_elsewhere(results, tmp_path):
    refs_dir = tmp_path / "refs"
    lb.update_references(refs_dir, "mnist", "smoke", rec.load_records(results, "mnist", "smoke"))
    refs = lb.load_references(refs_dir, "mnist", "smoke")
    assert refs["db3kd-mbd"]["teacher_checkpoint_by_seed"]["1"] == "ckpt000000000001"
    slack = lb.QUERY_SLACK_OTHER_PLATFORM
    # the same teacher weights and numerics: one query per sample more than the reference fails
    same = make_record("db3kd-mbd", 1, 0.9, qps=901.0 * (1 + slack / 2))
    result = lb.check_gate(same, refs)
    assert result.failed and "(exact)" in str(result)
    # a teacher retrained on another platform: small drift passes, a real regression still fails
    for key, value in (("teacher_checkpoint", "ckpt-other-machine"), ("numerics", "torch 2.15.0, cpu AVX512, 2 threads")):
        drift = {**same, key: value}
        result = lb.check_gate(drift, refs)
        assert result.status == "pass" and "differ from the reference" in str(result)
        regression = {**drift, "queries_per_sample": 901.0 * (1 + 2 * slack)}
        result = lb.check_gate(regression, refs)
        assert result.failed and "queries per sample" in str(result) and "differ from the reference" in str(result)


def test_update_references_keeps_other_methods(results, tmp_path):
    recs = rec.load_records(results, "mnist", "smoke")
    refs_dir = tmp_path / "refs"
    lb.update_references(refs_dir, "mnist", "smoke", recs)
    lb.update_references(refs_dir, "mnist", "smoke", [make_record("weak", 0, 0.6)])
    refs = lb.load_references(refs_dir, "mnist", "smoke")
    assert refs["weak"]["student_accuracy"] == 0.6 and "db3kd-mbd" in refs


def test_stale_config_files_are_removed(results):
    lb.write_all(results)
    stale = results / "mnist" / "configs" / "000000000000.json"
    stale.write_text("{}")
    lb.write_all(results, only=[("mnist", "smoke")])
    assert not stale.exists()
    assert len(list((results / "mnist" / "configs").glob("*.json"))) == 7


# ------------------------------------------------------------------------------------------- variants


def test_two_variants_of_one_method_are_two_rows_saying_what_differs(tmp_path):
    from db3kd.config import config_diff, resolve

    root = tmp_path / "results"
    default = resolve("mnist", "db3kd-mbd", "smoke", 0)
    ablation = resolve("mnist", "db3kd-mbd", "smoke", 0, overrides={"tau": 0.5, "student.epochs": 5})
    named = ablation.with_variant("tau05")
    old = make_record("db3kd-mbd", 0, 0.80)  # written before variants existed: no variant key -> default
    assert "variant" not in old
    recs = [old]
    for seed, acc in ((0, 0.70), (1, 0.72)):
        r = make_record("db3kd-mbd", seed, acc)
        r.update(variant=ablation.variant, config_diff=config_diff(ablation), config_hash=f"{seed:012d}")
        recs.append(r)
    r = make_record("db3kd-mbd", 0, 0.60)
    r.update(variant=named.variant, config_diff=config_diff(named), config_hash="a" * 12)
    recs.append(r)
    paths = [rec.write_record(r, root) for r in recs]
    assert [p.name for p in paths] == ["db3kd-mbd-s0.json", f"db3kd-mbd@{ablation.variant}-s0.json",
                                       f"db3kd-mbd@{ablation.variant}-s1.json", "db3kd-mbd@tau05-s0.json"]
    assert default.variant == "default" and len(ablation.variant) == 8

    lb.write_all(root)
    md = (root / "mnist" / "smoke.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    assert [c.strip() for c in header.strip("|").split("|")][:2] == ["method", "variant"]
    rows = _md_rows(md)
    assert [(r[0], r[1]) for r in rows] == [
        ("db3kd-mbd", "default"),
        ("db3kd-mbd", f"{ablation.variant}: student.epochs=5, tau=0.5"),
        ("db3kd-mbd", "tau05: student.epochs=5, tau=0.5"),
    ]
    acc = [c.strip() for c in header.strip("|").split("|")].index("student acc. %")
    # n = 2: 71.00 +- t_{0.975, 1} * 1.41 / sqrt 2 = 71.00 +- 12.71
    assert [r[acc] for r in rows] == ["80.00 (1 seed)", "71.00 ± 1.41 [58.29, 83.71] (n=2)", "60.00 (1 seed)"]
    with open(root / "mnist" / "smoke.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["variant"] for t in table] == ["default", ablation.variant, "tau05"]
    # references and gates are per variant
    refs_dir = tmp_path / "refs"
    lb.update_references(refs_dir, "mnist", "smoke", rec.load_records(root, "mnist", "smoke"))
    refs = lb.load_references(refs_dir, "mnist", "smoke")
    assert sorted(refs) == ["db3kd-mbd", f"db3kd-mbd@{ablation.variant}", "db3kd-mbd@tau05"]
    assert lb.check_gate(recs[-1], refs).status == "pass"  # 0.60 is judged against tau05's 0.60, not default's 0.80
    assert lb.check_gate({**recs[-1], "variant": "other"}, refs).status == "no_reference"


def test_a_table_without_variants_has_no_variant_column(results):
    lb.write_all(results)
    header = next(line for line in (results / "mnist" / "smoke.md").read_text().splitlines() if line.startswith("| method"))
    assert "variant" not in header


@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")
def test_variants_in_mlflow_keep_their_own_runs_and_records(tmp_path, monkeypatch):
    """Two settings of one method and seed, tracked: both runs are named by their variant and both come back."""
    from db3kd.config import resolve
    from db3kd.tracking import Tracker, records_from_mlflow, tracked_run
    from tests.test_tracking import fake_run

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'variants.db'}"
    tracker = Tracker(uri, session_id="variants")
    configs = [resolve("digits", "db3kd-sd", "smoke", 0), resolve("digits", "db3kd-sd", "smoke", 0, variant="tau05",
                                                                  overrides={"tau": 0.5})]
    records = [tracked_run(c, tracker, run_fn=fake_run, results_dir=tmp_path / "results") for c in configs]
    assert tracker.failure is None
    assert [r["variant"] for r in records] == ["default", "tau05"]
    assert [Path(r["record_path"]).name for r in records] == ["db3kd-sd-s0.json", "db3kd-sd@tau05-s0.json"]
    import mlflow

    names = sorted(mlflow.MlflowClient(uri).get_run(r["mlflow_run_id"]).data.tags["mlflow.runName"] for r in records)
    assert names == ["digits-db3kd-sd-s0", "digits-db3kd-sd@tau05-s0"]
    back = records_from_mlflow(uri)
    assert sorted(r["variant"] for r in back) == ["default", "tau05"]
    assert next(r for r in back if r["variant"] == "tau05")["config_diff"] == {"tau": 0.5}


def test_mbd_row_says_which_milestone_each_seed_chose_on_val(tmp_path):
    root = tmp_path / "results"
    for seed, chosen in enumerate([120, 60, 120]):
        r = make_record("db3kd-mbd", seed, 0.8 + 0.01 * seed)
        r["metrics"]["chosen_milestone"] = chosen
        rec.write_record(r, root)
    lb.write_all(root)
    names = [row[0] for row in _md_rows((root / "mnist" / "smoke.md").read_text())]
    assert names == ["db3kd-mbd (queries/pair chosen on val: 60 in 1 seed, 120 in 2 seeds)"]
    r = make_record("db3kd-mbd", 3, 0.8)
    r["metrics"]["chosen_milestone"] = 1200
    for seed in range(3):
        (root / "records" / "mnist" / "smoke" / f"db3kd-mbd-s{seed}.json").unlink()
    rec.write_record(r, root)
    lb.write_all(root)
    assert [row[0] for row in _md_rows((root / "mnist" / "smoke.md").read_text())] == [
        "db3kd-mbd (1,200 queries/pair, chosen on val)"]


def test_params_label_follows_a_resumed_study_only_while_the_values_are_the_same(tmp_path, monkeypatch):
    monkeypatch.setenv("DB3KD_TUNED_DIR", str(tmp_path))
    record = make_record("db3kd-bd", 0, 0.9)
    record["config"]["extra"] = {"params": "tuned on val (10 trials)"}
    record["config"]["method_params"]["tau"] = 1.5
    record["config"]["student"]["lr"] = 0.002
    assert lb.params_label(record) == "tuned on val (10 trials)"  # no tuned file: the record's own label
    entry = {"trials": 11, "params": {"tau": 1.5}, "student": {"lr": 0.002}}
    (tmp_path / "mnist-smoke.json").write_text(json.dumps({"db3kd-bd": entry}))
    assert lb.params_label(record) == "tuned on val (11 trials)"  # the longer study kept these values
    entry["params"]["tau"] = 2.0
    (tmp_path / "mnist-smoke.json").write_text(json.dumps({"db3kd-bd": entry}))
    assert lb.params_label(record) == "tuned on val (10 trials)"  # it chose others: the run's label stands
    record["config"]["extra"] = {}
    assert lb.params_label(record) == "paper settings (profile defaults)"
