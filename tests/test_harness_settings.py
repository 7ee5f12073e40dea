"""`pytest benchmarks --set/--config/--variant`: one configuration language in the harness too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_harness_set_config_and_variant(tmp_path):
    config = tmp_path / "quick.yaml"
    config.write_text("dataset: mnist\nseed: 3\nstudent:\n  epochs: 2\n")  # dataset/seed: the harness's own
    cmd = [sys.executable, "-m", "pytest", "benchmarks", "-m", "digits", "--profile", "smoke",
           "-k", "db3kd-sd or hard-label-kd", "--config", str(config), "--set", "student.epochs=1", "--set", "tau=0.5",
           "--variant", "quick", "--no-tracking", "--results-dir", str(tmp_path / "results"),
           "--run-dir", str(tmp_path / "runs"), "-p", "no:cacheprovider", "-p", "no:randomly", "-rs"]
    env = {**os.environ, "DB3KD_CACHE": str(tmp_path / "cache")}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "hard-label-kd has no parameter 'tau' (set by --set/--config)" in out.stdout
    (path,) = (tmp_path / "results" / "records" / "digits" / "smoke").glob("*.json")
    assert path.name == "db3kd-sd@quick-s0.json"
    record = json.loads(path.read_text())
    assert record["variant"] == "quick" and record["config"]["student"]["epochs"] == 1  # --set beats --config
    assert record["config"]["method_params"]["tau"] == 0.5 and record["seed"] == 0
    assert record["config_diff"] == {"student.epochs": 1, "tau": 0.5}

    bad = subprocess.run([*cmd[:cmd.index("--config")], "--set", "student.epoch=1", *cmd[cmd.index("--no-tracking"):]],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert bad.returncode == 1 and "--set/--config: unknown setting 'student.epoch' (value 1)" in bad.stdout
