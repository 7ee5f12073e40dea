"""Resumable harness sessions: SIGKILL a `pytest benchmarks` session midway, start it again, and
get the same records as an uninterrupted session, the finished cases reused (not rerun) and
counted in the terminal summary, the interrupted one resumed from its --run-dir checkpoints.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CASES = "db3kd-bd or db3kd-mbd or db3kd-sd"  # collection order: db3kd-bd, db3kd-mbd, db3kd-sd
SAME = ("student_accuracy", "teacher_accuracy", "queries_total", "queries_per_sample", "config_hash",
        "teacher_checkpoint", "code_version", "milestone_accuracy", "metrics")


def _cmd(results: Path, runs: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "benchmarks", "-m", "digits", "--profile", "smoke", "-k", CASES,
            "--no-tracking", "--results-dir", str(results), "--run-dir", str(runs), "-p", "no:cacheprovider",
            "-p", "no:randomly", *extra]


def _records(results: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (results / "records" / "digits" / "smoke").glob("*.json")}


def _mid_mbd(runs: Path) -> bool:
    """A case folder with a finished BD/MBD chunk but no record.json: killed now, it is midway."""
    return any(not (d / "record.json").exists() and list(d.glob("checkpoints/robustness/chunk*.pt"))
               for d in runs.iterdir() if d.is_dir()) if runs.is_dir() else False


@pytest.mark.slow  # three harness sessions on digits/smoke (about 2-3 minutes on 2 busy cores)
def test_killed_session_resumes_with_the_same_records(tmp_path):
    # the reference session gets a cache of its own: with the killed session's, its cached labels
    # would answer db3kd-mbd at once and there would be no midway to kill (the teacher retrains bit for bit)
    ref_env = {**os.environ, "DB3KD_CACHE": str(tmp_path / "ref-cache")}
    env = {**os.environ, "DB3KD_CACHE": str(tmp_path / "cache")}  # the killed session and its restarts
    ref = subprocess.run(_cmd(tmp_path / "ref", tmp_path / "ref-runs"), cwd=REPO, env=ref_env, capture_output=True,
                         text=True, timeout=1800)
    assert ref.returncode == 0, ref.stdout[-4000:] + ref.stderr[-2000:]
    expected = _records(tmp_path / "ref")
    assert sorted(expected) == ["db3kd-bd-s0", "db3kd-mbd-s0", "db3kd-sd-s0"]

    results, runs = tmp_path / "results", tmp_path / "runs"
    proc = subprocess.Popen(_cmd(results, runs), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 900
    try:
        while not (_records(results) and _mid_mbd(runs)):
            assert proc.poll() is None, "the session finished before it could be killed midway"
            assert time.monotonic() < deadline, "no finished case and no half-done MBD within 900 s"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finished = _records(results)
    assert sorted(finished) == ["db3kd-bd-s0"]  # killed during db3kd-mbd, db3kd-sd not started
    before = (results / "records" / "digits" / "smoke" / "db3kd-bd-s0.json").read_bytes()

    again = subprocess.run(_cmd(results, runs), cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    assert "1 reused (a record with the same config hash, teacher checkpoint and code version exists; --rerun runs " \
           "them again): digits-db3kd-bd-s0" in again.stdout
    assert "3 passed" in again.stdout
    assert (results / "records" / "digits" / "smoke" / "db3kd-bd-s0.json").read_bytes() == before  # not rerun
    got = _records(results)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert {k: got[name].get(k) for k in SAME} == {k: expected[name].get(k) for k in SAME}, name
    assert (results / "digits" / "smoke.md").is_file()

    # --rerun runs every case again (from scratch: no checkpoint reused), with the same numbers
    forced = subprocess.run(_cmd(results, runs, "--rerun", "-k", "db3kd-sd"), cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=1800)
    assert forced.returncode == 0 and "reused" not in forced.stdout, forced.stdout[-3000:]
    assert _records(results)["db3kd-sd-s0"]["created"] != got["db3kd-sd-s0"]["created"] or \
        _records(results)["db3kd-sd-s0"]["session_id"] != got["db3kd-sd-s0"]["session_id"]


def test_finished_cases_of_every_seed_are_reused(tmp_path):
    """Seeds share one teacher (``teacher_seed``): the reuse check must look up that teacher, not
    one trained with the run seed (which made every seed but 0 rerun)."""
    env = {**os.environ, "DB3KD_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "pytest", "benchmarks", "-m", "digits", "--profile", "smoke", "--seeds", "2",
           "-k", "digits-student-ce-s", "--no-tracking", "--results-dir", str(tmp_path / "results"),
           "--run-dir", str(tmp_path / "runs"), "-p", "no:cacheprovider", "-p", "no:randomly"]
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0 and "2 passed" in first.stdout, first.stdout[-3000:] + first.stderr[-2000:]
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "2 reused" in again.stdout and "digits-student-ce-s1" in again.stdout, again.stdout[-3000:]
