"""MLflow tracking (db3kd.tracking): a real ``mlflow server``, an unreachable one, sessions read back.

The server test starts ``python -m mlflow server`` on a free 127.0.0.1 port with a SQLite backend
in tmp_path, in its own process group, polls ``/health`` until it answers (timeout 120 s), logs a
case through db3kd.tracking, reads it back through the REST API and stops the whole group.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import pytest

from db3kd.config import resolve
from db3kd.tracking import Tracker, TrackingWarning, flatten, tracked_run

REPO = Path(__file__).resolve().parents[1]
# MLflow's own SQLAlchemy store warns about a deprecated loader; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_run(config, *, log, **_):
    """Stands in for db3kd.runner.run: logs per-epoch curves like the runner and returns a record."""
    for epoch in range(3):
        log({"student/train_loss": 1.0 / (epoch + 1), "student/val_accuracy": 0.5 + 0.1 * epoch}, epoch)
    log({"target_entropy": 0.4}, None)
    milestones = {60: 0.6, 120: 0.7} if config.method == "db3kd-mbd" else {}
    for m, acc in milestones.items():
        log({"milestone_accuracy": acc}, m)
    return {
        "dataset": config.dataset, "method": config.method, "profile": config.profile, "seed": config.seed,
        "teacher_accuracy": 0.9, "student_accuracy": 0.7 + 0.01 * config.seed, "queries_total": 1000,
        "queries_per_sample": 10.0, "wall_seconds": 0.1, "teacher_access": "labels", "data": "full",
        "transfer_set_size": 100, "accuracy_kind": "final", "config_hash": config.config_hash(),
        "teacher_hash": "teacher0", "metrics": {"target_entropy": 0.4},
        "milestone_accuracy": {str(k): v for k, v in milestones.items()},
        "tables": {"class_distance": [[None, 1.0], [1.2, None]]}, "artifacts": {}, "device": "cpu",
    }


def _get(url: str, path: str, **query) -> dict:
    with urllib.request.urlopen(f"{url}{path}?{urllib.parse.urlencode(query)}", timeout=30) as resp:
        return json.loads(resp.read())


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no background job workers: starts twice as fast
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
             "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"

    def stop():
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer /health within 120 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)  # poll interval
        yield url
    finally:
        stop()
    with pytest.raises(ProcessLookupError):  # the whole group is gone
        os.killpg(proc.pid, 0)


def test_real_server_round_trip(mlflow_server, tmp_path):
    tracker = Tracker(mlflow_server, session_id="test-session-1", session_name="pytest test session")
    config = resolve("digits", "db3kd-mbd", "smoke", 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = tracked_run(config, tracker, run_fn=fake_run, results_dir=tmp_path / "results",
                             enrich={"command": "pytest test"})
    assert not [w for w in caught if issubclass(w.category, TrackingWarning)], [str(w.message) for w in caught]
    assert tracker.failure is None
    run_id = record["mlflow_run_id"]
    assert run_id and Path(record["record_path"]).is_file()
    tracker.finish_session(["digits"])

    run = _get(mlflow_server, "/api/2.0/mlflow/runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "FINISHED"
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["mlflow.runName"] == "digits-db3kd-mbd-s0"
    for key, value in {"method": "db3kd-mbd", "dataset": "digits", "profile": "smoke", "teacher_access": "labels",
                       "config_hash": config.config_hash(), "seed": "0"}.items():
        assert tags[key] == value, key
    assert "git_commit" in tags
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params == flatten(config.to_dict())
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert metrics["student_accuracy"] == pytest.approx(0.7) and metrics["teacher_accuracy"] == pytest.approx(0.9)
    assert metrics["queries_total"] == 1000 and metrics["queries_per_sample"] == 10.0
    history = _get(mlflow_server, "/api/2.0/mlflow/metrics/get-history", run_id=run_id,
                   metric_key="epoch/student/val_accuracy")["metrics"]
    assert sorted(m["step"] for m in history) == [0, 1, 2]
    milestones = _get(mlflow_server, "/api/2.0/mlflow/metrics/get-history", run_id=run_id,
                      metric_key="milestone/accuracy")["metrics"]
    assert sorted((m["step"], m["value"]) for m in milestones) == [(60, 0.6), (120, 0.7)]
    # no chart mixes units: every metric with a step other than 0 names what its step counts
    assert {k for k in metrics if "/" in k} == {"epoch/student/train_loss", "epoch/student/val_accuracy",
                                                "milestone/accuracy"}
    assert "milestone_accuracy" not in metrics and "student/val_accuracy" not in metrics
    files = {f["path"] for f in _get(mlflow_server, "/api/2.0/mlflow/artifacts/list", run_id=run_id).get("files", [])}
    assert {"config.json", "record.json", "plots"} <= files

    parent = _get(mlflow_server, "/api/2.0/mlflow/runs/get", run_id=tags["mlflow.parentRunId"])["run"]
    ptags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
    assert ptags["db3kd.role"] == "session" and ptags["db3kd.session_id"] == "test-session-1"
    assert parent["info"]["status"] == "FINISHED"
    exp = _get(mlflow_server, "/api/2.0/mlflow/experiments/get", experiment_id=run["info"]["experiment_id"])
    assert exp["experiment"]["name"] == "db3kd/digits"


def test_unreachable_server_warns_once_and_still_writes_the_record(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    tracker = Tracker(uri)
    results = tmp_path / "results"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = tracked_run(resolve("digits", "db3kd-mbd", "smoke", 0), tracker, run_fn=fake_run, results_dir=results)
        second = tracked_run(resolve("digits", "db3kd-sd", "smoke", 1), tracker, run_fn=fake_run, results_dir=results)
    ours = [w for w in caught if issubclass(w.category, TrackingWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert uri in str(ours[0].message)
    for record in (first, second):
        assert record["mlflow_run_id"] is None
        on_disk = json.loads(Path(record["record_path"]).read_text())
        assert on_disk["student_accuracy"] == record["student_accuracy"] and on_disk["config"]["seed"] == record["seed"]
    assert (results / "records" / "digits" / "smoke" / "db3kd-sd-s1.json").is_file()


def test_metric_names_carry_the_unit_of_their_step():
    from db3kd.tracking import metric_name

    assert metric_name("student/val_accuracy", 3) == "epoch/student/val_accuracy"
    assert metric_name("teacher/train_loss", 0) == "epoch/teacher/train_loss"
    assert metric_name("milestone_accuracy", 120) == "milestone/accuracy"
    assert metric_name("milestone_mean_distance", 60) == "milestone/mean_distance"
    assert metric_name("iteration/zskt/kl", 50) == "iteration/zskt/kl"
    assert metric_name("target_entropy", None) == "target_entropy"  # a final scalar


def test_default_store_is_at_the_project_root_from_any_subfolder(tmp_path, monkeypatch):
    from db3kd.tracking import default_tracking_uri, project_root

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "proj" / "benchmarks" / "deep").mkdir(parents=True)
    (tmp_path / "proj" / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    expected = f"sqlite:///{(tmp_path / 'proj').resolve() / 'mlflow.db'}"
    for where in ("proj", "proj/benchmarks", "proj/benchmarks/deep"):
        monkeypatch.chdir(tmp_path / where)
        assert project_root() == (tmp_path / "proj").resolve()
        assert default_tracking_uri() == expected and Tracker().uri == expected
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking_uri() == "http://127.0.0.1:5000"
    assert default_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_artifacts_sit_beside_the_sqlite_store(tmp_path, monkeypatch):
    """Started from a subfolder, a case's artifacts go to mlruns/ beside the database, not into the subfolder."""
    from mlflow.tracking import MlflowClient

    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    tracker = Tracker(uri, session_id="beside")
    record = tracked_run(resolve("digits", "db3kd-sd", "smoke", 0), tracker, run_fn=fake_run, plots=False)
    tracker.finish_session(["digits"])
    run = MlflowClient(uri).get_run(record["mlflow_run_id"])
    assert run.info.artifact_uri.startswith((tmp_path / "mlruns").as_uri())
    assert (tmp_path / "mlruns").is_dir() and not (tmp_path / "sub" / "mlruns").exists()


def _run_with_a_figure():
    """A temporary db3kd-* workdir holding a PNG, and a fake run whose record lists it as an artifact."""
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="db3kd-test-"))
    (workdir / "pseudo-samples.png").write_bytes(b"\x89PNG fake")

    def run_with_artifact(config, *, log, **kw):
        record = fake_run(config, log=log, **kw)
        record.update(artifacts={"pseudo_samples_png": str(workdir / "pseudo-samples.png")}, workdir=str(workdir))
        return record

    return workdir, run_with_artifact


def test_method_artifacts_are_logged_and_the_temporary_workdir_removed(tmp_path, monkeypatch):
    """A run without run_dir works in a temporary db3kd-* folder: its figure ends up in MLflow, the
    folder is gone, and the record points at the MLflow copy."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    workdir, run_with_artifact = _run_with_a_figure()
    uri = f"sqlite:///{tmp_path / 'art.db'}"
    tracker = Tracker(uri, session_id="artifacts")
    record = tracked_run(resolve("digits", "zsdb3kd", "smoke", 0), tracker, run_fn=run_with_artifact)
    tracker.finish_session(["digits"])
    assert not workdir.exists() and record["workdir"] is None
    assert record["artifacts"] == {"pseudo_samples_png": "mlflow:artifacts/pseudo-samples.png"}
    logged = [a.path for a in MlflowClient(uri).list_artifacts(record["mlflow_run_id"], "artifacts")]
    assert logged == ["artifacts/pseudo-samples.png"]
    assert "figures" not in record  # no results folder: nothing copied


def test_figures_are_copied_beside_the_leaderboard(tmp_path, monkeypatch):
    """With a results folder, a method's PNG figure lands in results/<dataset>/figures and the table shows it."""
    from db3kd.leaderboard import write_all

    monkeypatch.chdir(tmp_path)
    _, run_with_artifact = _run_with_a_figure()
    results = tmp_path / "results"
    tracker = Tracker(f"sqlite:///{tmp_path / 'fig.db'}", session_id="figures")
    record = tracked_run(resolve("digits", "zsdb3kd", "smoke", 0), tracker, run_fn=run_with_artifact, results_dir=results)
    assert record["figures"] == {"pseudo_samples_png": "figures/smoke-zsdb3kd-s0-pseudo-samples.png"}
    assert (results / "digits" / "figures" / "smoke-zsdb3kd-s0-pseudo-samples.png").read_bytes() == b"\x89PNG fake"
    write_all(results)
    table = (results / "digits" / "smoke.md").read_text()
    assert "![zsdb3kd-s0 pseudo_samples_png](figures/smoke-zsdb3kd-s0-pseudo-samples.png)" in table


@pytest.mark.slow  # trains a digits teacher in the isolated test cache (about a minute on 2 cores)
def test_unreachable_server_with_the_real_runner(tmp_path, monkeypatch):
    """The real runner (digits, db3kd-sd, smoke) completes and writes its record with tracking down."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{free_port()}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = tracked_run(resolve("digits", "db3kd-sd", "smoke", 0), Tracker(uri), results_dir=tmp_path)
    assert [str(w.message) for w in caught if issubclass(w.category, TrackingWarning)] == [
        next(str(w.message) for w in caught if issubclass(w.category, TrackingWarning))]
    assert 0.0 <= record["student_accuracy"] <= 1.0
    assert json.loads(Path(record["record_path"]).read_text())["config_hash"] == record["config_hash"]


def _search(uri, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return mlflow.search_runs(experiment_names=["db3kd/digits"], output_format="pandas")


def test_finished_session_reads_back_nested(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the SQLite store's default artifact root (./mlruns) goes here
    uri = f"sqlite:///{tmp_path / 'session.db'}"
    tracker = Tracker(uri, session_id="tiny-session")
    cases = [resolve("digits", m, "smoke", s) for m in ("db3kd-sd", "db3kd-mbd") for s in (0, 1)]
    records = {f"{c.dataset}-{c.method}-s{c.seed}": tracked_run(c, tracker, run_fn=fake_run) for c in cases}
    tracker.finish_session(["digits"])
    assert tracker.failure is None

    runs = _search(uri, monkeypatch)
    parents = runs[runs["tags.db3kd.role"] == "session"]
    assert len(parents) == 1 and parents.iloc[0]["status"] == "FINISHED"
    parent_id = parents.iloc[0]["run_id"]
    children = runs[runs["tags.db3kd.role"] == "case"]
    assert sorted(children["tags.mlflow.runName"]) == sorted(records)
    assert (children["tags.mlflow.parentRunId"] == parent_id).all()
    for _, row in children.iterrows():
        record = records[row["tags.mlflow.runName"]]
        assert row["run_id"] == record["mlflow_run_id"] and row["status"] == "FINISHED"
        assert row["metrics.student_accuracy"] == pytest.approx(record["student_accuracy"])
        assert row["metrics.queries_per_sample"] == pytest.approx(10.0)
        assert row["params.student.epochs"] == str(resolve("digits", record["method"], "smoke", 0).student.epochs)

    # the leaderboard rebuilt from MLflow alone: every case's record comes back, and the table lists both methods
    from db3kd.cli import main
    from db3kd.tracking import records_from_mlflow

    back = {f"{r['dataset']}-{r['method']}-s{r['seed']}": r for r in records_from_mlflow(uri)}
    assert sorted(back) == sorted(records)
    assert all(back[k]["student_accuracy"] == records[k]["student_accuracy"] for k in records)
    assert main(["leaderboard", "--from-mlflow", uri, "--results", str(tmp_path / "board")]) == 0
    table = (tmp_path / "board" / "digits" / "smoke.md").read_text()
    assert "db3kd-sd" in table and "db3kd-mbd" in table and "4 record(s)" in table


@pytest.mark.slow
def test_pytest_benchmark_session_under_xdist(tmp_path, monkeypatch):
    """`pytest benchmarks -n 2` (digits, smoke, db3kd-sd, 2 seeds): one parent run, both cases nested, tables."""
    uri = f"sqlite:///{tmp_path / 'bench.db'}"
    results, refs = tmp_path / "results", tmp_path / "refs"
    cmd = [sys.executable, "-m", "pytest", "benchmarks", "-m", "digits", "--profile", "smoke", "-k", "db3kd-sd",
           "--seeds", "2", "-n", "2", "--tracking-uri", uri, "--results-dir", str(results),
           "--references-dir", str(refs), "-p", "no:cacheprovider", "-p", "no:randomly"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "not gated" in out.stdout and "digits-db3kd-sd-s1" in out.stdout
    runs = _search(uri, monkeypatch)
    parents = runs[runs["tags.db3kd.role"] == "session"]
    assert len(parents) == 1
    children = runs[runs["tags.db3kd.role"] == "case"]
    assert sorted(children["tags.mlflow.runName"]) == ["digits-db3kd-sd-s0", "digits-db3kd-sd-s1"]
    assert (children["tags.mlflow.parentRunId"] == parents.iloc[0]["run_id"]).all()
    assert children["metrics.student_accuracy"].notna().all()
    assert (results / "digits" / "smoke.md").is_file()
    assert len(list((results / "records" / "digits" / "smoke").glob("*.json"))) == 2
