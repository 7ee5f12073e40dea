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
        "queries_sent", "queries_per_sample", "soft_label_sha256", "wall_seconds"}


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
    for option in ("--dataset", "--method", "--profile", "--seed", "--data-root", "--teacher", "--json", "--set"):
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


def test_methods_json_lists_the_registry(capsys):
    assert main(["methods", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert {"db3kd-sd", "db3kd-bd", "db3kd-mbd"} <= {row["name"] for row in table}
    assert all(set(row) == {"name", "access", "data", "paper"} for row in table)
