"""The command line end to end: help, the embedded default, real MNIST, a user's teacher, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from db3kd.cli import main
from tests.conftest import shared_data_or_skip

KEYS = {"dataset", "method", "profile", "seed", "teacher_accuracy", "student_accuracy", "queries_total",
        "queries_sent", "queries_per_sample", "soft_label_sha256", "wall_seconds", "config_hash", "variant"}


def run_json(capsys, *args):
    assert main(["run", *args, "--json", "--no-progress"]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    record = json.loads(out)
    assert set(record) == KEYS
    return record


def test_help_answers_at_once_without_heavy_imports():
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "db3kd.cli", "--help"], capture_output=True, text=True, check=True)
    assert time.perf_counter() - started < 3.0
    for word in ("run", "methods", "leaderboard"):
        assert word in out.stdout
    probe = "import sys, db3kd.cli; db3kd.cli.build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "False"


def test_run_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for option in ("--dataset", "--method", "--profile", "--seed", "--data-root", "--teacher", "--json", "--set",
                   "--config", "--variant", "--record", "--show-config"):
        assert option in text


def test_smoke_run_on_embedded_digits(capsys):
    record = run_json(capsys, "--profile", "smoke", "--method", "db3kd-bd")
    assert record["dataset"] == "digits" and record["method"] == "db3kd-bd"
    assert 0.0 <= record["student_accuracy"] <= 1.0 and 0.0 <= record["teacher_accuracy"] <= 1.0
    assert record["queries_total"] > 0
    assert record["queries_per_sample"] == pytest.approx(record["queries_total"] / 200)


def test_end_to_end_on_real_mnist_at_smoke_profile(capsys):
    root = shared_data_or_skip()
    for method in ("db3kd-sd", "db3kd-bd", "db3kd-mbd"):
        record = run_json(capsys, "--dataset", "mnist", "--method", method, "--profile", "smoke", "--data-root", str(root))
        assert record["teacher_accuracy"] > 0.8  # a 1-epoch LeNet-5 on 2000 images
        assert record["student_accuracy"] > 0.5  # 200 images, 10 epochs: far above the 0.1 floor
        assert (record["queries_total"] == 0) == (method == "db3kd-sd")


def test_users_own_teacher_file_is_used_through_the_oracle(tmp_path, capsys):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 10))
    example = torch.rand(4, 1, 16, 16)
    scripted = tmp_path / "teacher.pt"
    torch.jit.save(torch.jit.trace(model, example), scripted)
    exported = tmp_path / "teacher.pt2"
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},)), exported)
    for path in (scripted, exported):
        record = run_json(capsys, "--profile", "smoke", "--teacher", str(path))
        assert record["queries_total"] > 0
        assert 0.0 <= record["teacher_accuracy"] <= 0.3  # an untrained linear teacher


def test_bad_teacher_file_and_missing_data_give_one_clear_error(tmp_path, capsys):
    bogus = tmp_path / "teacher.pt"
    bogus.write_bytes(b"not a model")
    assert main(["run", "--profile", "smoke", "--teacher", str(bogus)]) == 2
    assert "neither a torch.export program" in capsys.readouterr().err
    assert main(["run", "--dataset", "mnist", "--profile", "smoke", "--data-root", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err


def test_unknown_method_lists_valid_names(capsys):
    assert main(["run", "--method", "no-such-method"]) == 2
    err = capsys.readouterr().err
    assert "no-such-method" in err and "db3kd-mbd" in err


def test_bad_override_names_key_value_and_rule(capsys):
    assert main(["run", "--set", "tau=-1"]) == 2
    assert "tau" in capsys.readouterr().err
    assert main(["run", "--set", "bogus=1"]) == 2
    err = capsys.readouterr().err
    assert "bogus" in err and "allowed keys" in err
    for args, message in [
        (["--set", "student.epochs=0"], "invalid setting student.epochs=0: Input should be greater than or equal to 1"),
        (["--set", "student.epoch=3"], "unknown setting 'student.epoch' (value 3); allowed keys: student.arch"),
        (["--set", "val_fraction=2"], "invalid setting val_fraction=2: Input should be less than 1"),
        (["--set", "student.epochs"], "--set expects KEY=VALUE"),
        (["--config", "nowhere.yaml"], "cannot read configuration file nowhere.yaml"),
        (["--set", "tau=0.5", "--variant", "default"], "reserved for the default configuration"),
    ]:
        assert main(["run", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_show_config_is_yaml_with_every_setting(capsys):
    import yaml

    assert main(["run", "--show-config", "--profile", "smoke", "--set", "student.epochs=3", "--set", "tau=0.5",
                 "--set", "val_fraction=0.2", "--set", "teacher.arch=lenet5-half", "--variant", "mine"]) == 0
    out = capsys.readouterr().out
    shown = yaml.safe_load(out)
    assert shown["student"]["epochs"] == 3 and shown["method_params"]["tau"] == 0.5
    assert shown["val_fraction"] == 0.2 and shown["teacher"]["arch"] == "lenet5-half" and shown["variant"] == "mine"
    assert "# variant: mine (teacher.arch=lenet5-half, student.epochs=3, tau=0.5, val_fraction=0.2)" in out


def test_set_and_a_config_file_give_the_same_record_and_record_writes_variants(tmp_path, capsys):
    """The issue's done-when at smoke scale: --set reaches the stages; --show-config > c.yaml; --config c.yaml
    gives the same record; --record puts two variants of one method in one leaderboard."""
    fast = ["--profile", "smoke", "--set", "student.epochs=1", "--set", "teacher.epochs=1"]
    results = tmp_path / "results"
    first = run_json(capsys, *fast, "--record", "--no-tracking", "--results", str(results))
    assert main(["run", *fast, "--show-config"]) == 0
    config = tmp_path / "c.yaml"
    config.write_text(capsys.readouterr().out)
    again = run_json(capsys, "--config", str(config))
    for key in KEYS - {"wall_seconds", "queries_sent"}:
        assert again[key] == first[key], key
    # the second run reuses the first one's cached labels (counted in queries_total): it sends no query
    assert first["queries_sent"] == first["queries_total"] > 0 and again["queries_sent"] == 0
    cfg_record = json.loads(next((results / "records" / "digits" / "smoke").glob("db3kd-bd@*-s0.json")).read_text())
    assert cfg_record["config"]["student"]["epochs"] == 1 and cfg_record["config"]["teacher"]["epochs"] == 1
    assert cfg_record["variant"] == first["variant"] != "default"
    assert cfg_record["config_diff"] == {"teacher.epochs": 1, "student.epochs": 1}
    assert cfg_record["mlflow_run_id"] is None and "db3kd run --profile smoke --set student.epochs=1" in cfg_record["command"]
    tau = run_json(capsys, "--config", str(config), "--set", "tau=0.5", "--variant", "tau05", "--record",
                   "--no-tracking", "--results", str(results))
    assert tau["variant"] == "tau05" and (results / "records" / "digits" / "smoke" / "db3kd-bd@tau05-s0.json").is_file()
    assert main(["leaderboard", "--results", str(results)]) == 0
    table = (results / "digits" / "smoke.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| db3kd-bd ")]
    assert len(rows) == 2
    assert any(f"{first['variant']}: student.epochs=1, teacher.epochs=1" in r for r in rows)  # keys sorted on disk
    assert any("tau05: student.epochs=1, tau=0.5, teacher.epochs=1" in r for r in rows)


def test_methods_json_lists_the_registry(capsys):
    assert main(["methods", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert {"db3kd-sd", "db3kd-bd", "db3kd-mbd"} <= {row["name"] for row in table}
    assert all({"name", "access", "data", "paper", "params"} <= set(row) for row in table)
