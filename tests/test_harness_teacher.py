"""`pytest benchmarks --teacher T.pt`: a user's TorchScript teacher benchmarked through the harness.

Runs the harness in a subprocess on a TorchScript digits teacher written by
tests.test_teacher_door.write_teacher. The default-suite version selects one method of each
oracle (labels: hard-label-kd, scores: standard-kd) plus the two that must be skipped (white-box ZSKT and
teacher-arch-ce, which needs the teacher's architecture and recipe); the slow version runs every registered method.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_teacher_door import write_teacher

REPO = Path(__file__).resolve().parents[1]
SHORT = "hard-label-kd or standard-kd or zskt or teacher-arch-ce"


def _harness(tmp_path: Path, teacher: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "benchmarks", "-m", "digits", "--profile", "smoke", "--teacher", str(teacher),
           "--no-tracking", "--results-dir", str(tmp_path / "results"), "--run-dir", str(tmp_path / "runs"),
           "-p", "no:cacheprovider", "-p", "no:randomly", "-rs", *extra]
    env = {**os.environ, "DB3KD_CACHE": str(tmp_path / "cache")}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)


def _check(tmp_path: Path, teacher: Path, out: subprocess.CompletedProcess, expected_methods: set[str]) -> None:
    from db3kd.registry import get_method
    from db3kd.teacher import file_sha256

    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-5000:]
    sha = file_sha256(teacher)
    assert f"teacher {teacher} (sha256 {sha})" in out.stdout  # the summary header names the file and its SHA-256
    assert "SKIPPED [1] benchmarks/conftest.py" in out.stdout
    assert ("zskt needs white-box access (the teacher's gradients); a user's teacher file is answered only through "
            "the oracle (labels or scores)") in out.stdout
    assert "teacher-arch-ce trains the teacher's architecture with the teacher's training recipe" in out.stdout
    records = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "results" / "records" / "digits" / "smoke").glob("*.json")}
    assert {r["method"] for r in records.values()} == expected_methods and len(records) == len(expected_methods)
    for name, record in records.items():
        assert record["teacher_file"] == str(teacher) and record["teacher_sha256"] == sha, name
        assert record["teacher_checkpoint"] == sha[:16] and record["teacher_accuracy"] > 0.9, name
        access = get_method(record["method"]).teacher_access
        assert access in ("labels", "scores", "none"), name
        assert (record["queries_total"] > 0) == (access != "none"), name  # label/score methods asked the oracle
        assert record["teacher_deterministic"] is True and record["teacher_warnings"] == [], name
        assert f"not gated     digits-{record['method']}-s0: a user's teacher" in out.stdout, name
    table = (tmp_path / "results" / "digits" / "smoke.md").read_text()
    assert f"`{teacher}` (SHA-256 `{sha}`)" in table
    assert "GATE FAILED" not in out.stdout and "gate passed" not in out.stdout


def test_harness_with_a_users_torchscript_teacher(tmp_path):
    teacher = write_teacher(tmp_path / "T.pt")
    out = _harness(tmp_path, teacher, "-k", SHORT)
    _check(tmp_path, teacher, out, {"hard-label-kd", "standard-kd"})
    assert "2 passed, 2 skipped" in out.stdout


@pytest.mark.slow  # every registered method on the digits smoke profile (a few minutes on 2 cores)
def test_harness_with_a_users_teacher_every_method(tmp_path):
    from db3kd.registry import get_method, method_names
    from db3kd.runner import user_teacher_conflict

    teacher = write_teacher(tmp_path / "T.pt")
    out = _harness(tmp_path, teacher)
    runnable = {m for m in method_names() if not user_teacher_conflict(get_method(m), get_method(m).Params())}
    assert {"zskt", "teacher-ce", "teacher-arch-ce"}.isdisjoint(runnable) and {"db3kd-bd", "db3kd-mbd", "zsdb3kd"} <= runnable
    _check(tmp_path, teacher, out, runnable)
