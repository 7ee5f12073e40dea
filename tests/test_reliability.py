"""Reliability: kill -9 and resume, determinism, and a table of malformed inputs with exact errors."""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from db3kd import ConfigError, DatasetNotFoundError, DB3KDError, HardLabelOracle, QueryBudgetExceeded
from db3kd.cli import main
from tests.conftest import shared_data_or_skip

# label_cache=false: every run measures its robustness (the kill points below are in that stage)
SMOKE = ["run", "--profile", "smoke", "--method", "db3kd-bd", "--json", "--no-progress", "--set", "label_cache=false"]


def _cli(args, env, cwd):
    return [sys.executable, "-m", "db3kd.cli", *args]


def _soft_labels(run_dir: Path) -> dict:
    (workdir,) = [p for p in run_dir.iterdir() if p.is_dir()]
    return torch.load(workdir / "soft_labels.pt", weights_only=True)


def _kill_when(cmd, env, cwd, appears: str, run_dir: Path, timeout: float = 300) -> bool:
    """Start cmd, SIGKILL it as soon as a file matching ``appears`` exists under run_dir.
    Returns True when the process was killed before it finished."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if list(run_dir.glob(f"*/{appears}")):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return not list(run_dir.glob("*/record.json"))
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"{appears} never appeared")


def test_kill_minus_nine_at_several_points_then_resume(tmp_path):
    env = dict(os.environ, DB3KD_CACHE=str(tmp_path / "cache"))
    ref_dir = tmp_path / "uninterrupted"
    ref = json.loads(subprocess.run(_cli([*SMOKE, "--run-dir", str(ref_dir)], env, tmp_path), env=env, cwd=tmp_path,
                                    capture_output=True, text=True, check=True).stdout)
    expected = _soft_labels(ref_dir)
    killed_before_finish = 0
    for point in ("checkpoints/robustness/shared.pt", "checkpoints/robustness/chunk00000064-00000128.pt",
                  "checkpoints/train-student.pt"):
        run_dir = tmp_path / point.replace("/", "_")
        killed_before_finish += _kill_when(_cli([*SMOKE, "--run-dir", str(run_dir)], env, tmp_path), env, tmp_path,
                                           point, run_dir)
        for path in run_dir.rglob("*.pt"):  # a kill mid-write may leave a temporary file, never a torn final one
            if ".tmp" not in path.name:
                torch.load(path, map_location="cpu", weights_only=False)
        out = subprocess.run(_cli([*SMOKE, "--run-dir", str(run_dir)], env, tmp_path), env=env, cwd=tmp_path,
                             capture_output=True, text=True, check=True)
        resumed = json.loads(out.stdout)
        got = _soft_labels(run_dir)
        assert torch.equal(got["soft_labels"], expected["soft_labels"]), point
        assert torch.equal(got["queries"], expected["queries"]), point
        assert resumed["queries_total"] == ref["queries_total"], point  # no query counted twice or lost
        assert resumed["student_accuracy"] == ref["student_accuracy"], point
    assert killed_before_finish >= 2


def test_finished_run_is_not_recomputed(tmp_path, monkeypatch):
    import db3kd.runner as runner_module
    from db3kd.config import resolve

    config = resolve("digits", "db3kd-sd", "smoke", 0)
    first = runner_module.run(config, run_dir=tmp_path)
    monkeypatch.setattr("db3kd.data.load_dataset", lambda *a, **k: pytest.fail("recomputed a finished run"))
    assert runner_module.run(config, run_dir=tmp_path) == first


def test_same_seed_gives_bit_identical_results_three_times():
    from db3kd.config import resolve
    from db3kd.runner import run

    config = resolve("digits", "db3kd-bd", "smoke", 3)
    runs = [run(config) for _ in range(3)]
    labels = [torch.load(Path(r["workdir"]) / "soft_labels.pt", weights_only=True)["soft_labels"] for r in runs]
    assert all(torch.equal(labels[0], other) for other in labels[1:])
    assert len({r["queries_total"] for r in runs}) == 1
    assert len({r["student_accuracy"] for r in runs}) == 1
    assert len({r["teacher_checkpoint"] for r in runs}) == 1 and len(runs[0]["teacher_checkpoint"]) == 16


def test_teacher_checkpoint_digest_follows_every_weight_bit():
    from db3kd.models import get_model
    from db3kd.teacher import checkpoint_digest

    torch.manual_seed(0)
    state = get_model("lenet5-half").state_dict()
    digest = checkpoint_digest(state)
    assert digest == checkpoint_digest({k: v.clone() for k, v in reversed(state.items())})  # order-free copy
    flipped = {k: v.clone() for k, v in state.items()}
    name = next(iter(flipped))
    flipped[name].view(-1)[0] = torch.nextafter(flipped[name].view(-1)[0], torch.tensor(1.0))  # one ulp
    assert checkpoint_digest(flipped) != digest
    bn = get_model("alexnet-quarter").state_dict()  # BatchNorm: 0-dim int64 counters, float buffers
    assert any(v.dim() == 0 for v in bn.values()) and len(checkpoint_digest(bn)) == 16
    bumped = {k: (v + 1 if k.endswith("num_batches_tracked") else v) for k, v in bn.items()}
    assert checkpoint_digest(bumped) != checkpoint_digest(bn)


def test_exhausted_budget_stops_cleanly_and_keeps_finished_work(tmp_path, capsys):
    code = main([*SMOKE, "--query-budget", "3000", "--run-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 3
    assert "stopped cleanly after" in err and "3000" in err and "Traceback" not in err
    assert list(tmp_path.glob("*/checkpoints/robustness/shared.pt"))


def test_read_only_run_folder_gives_a_clear_error(tmp_path):
    from db3kd.training import atomic_save

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root): read-only folders are not enforced")
        with pytest.raises(DB3KDError, match="cannot write"):
            atomic_save({"a": 1}, folder / "x.pt")
        assert not list(folder.iterdir())
    finally:
        folder.chmod(0o700)


def test_atomic_save_failure_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    from db3kd.training import atomic_save

    def full_disk(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(DB3KDError, match="No space left"):
        atomic_save({"a": 1}, tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# malformed inputs: each with its exact error type and message


def _config(**kw):
    from db3kd.config import resolve

    args = dict(dataset="digits", method="db3kd-bd", profile="smoke", seed=0)
    overrides = kw.pop("overrides", None)
    args.update(kw)
    return resolve(**args, method_overrides=overrides)


CONFIG_CASES = [
    (dict(dataset="imagenet"), "unknown dataset 'imagenet'"),
    (dict(method="nope"), "unknown method 'nope'"),
    (dict(profile="huge"), "unknown profile 'huge'"),
    (dict(seed=-1), "invalid seed=-1"),
    (dict(seed="a"), "invalid seed='a'"),
    (dict(query_budget=-5), "invalid query_budget=-5"),
    (dict(overrides={"bogus": 1}), "unknown method parameter 'bogus'"),
    (dict(overrides={"tau": 0}), "invalid method parameter tau=0"),
    (dict(overrides={"tau": -0.3}), "invalid method parameter tau=-0.3"),
    (dict(overrides={"tau": "warm"}), "invalid method parameter tau='warm'"),
    (dict(overrides={"refs_per_class": 0}), "invalid method parameter refs_per_class=0"),
    (dict(overrides={"tol": 0}), "invalid method parameter tol=0"),
    (dict(overrides={"soft_labels": "mine"}), "invalid method parameter soft_labels='mine'"),
    (dict(method="db3kd-mbd", overrides={"budget": -1}), "invalid method parameter budget=-1"),
    (dict(method="db3kd-mbd", overrides={"num_directions": 1}), "invalid method parameter num_directions=1"),
    (dict(method="db3kd-mbd", overrides={"budget": "many"}), "invalid method parameter budget='many'"),
]


@pytest.mark.parametrize("kwargs, message", CONFIG_CASES)
def test_malformed_config(kwargs, message):
    with pytest.raises(ConfigError) as info:
        _config(**kwargs)
    assert message in str(info.value)


def _oracle():
    torch.manual_seed(0)
    return HardLabelOracle(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)), input_shape=(1, 2, 2))


ORACLE_CASES = [
    (lambda: torch.full((1, 1, 2, 2), math.nan), ValueError, "contains NaN"),
    (lambda: torch.full((1, 1, 2, 2), -math.inf), ValueError, "contains inf"),
    (lambda: torch.full((1, 1, 2, 2), 2.0), ValueError, "must lie in [0, 1]"),
    (lambda: torch.zeros(1, 1, 2, 2, dtype=torch.uint8), ValueError, "floating-point"),
    (lambda: torch.zeros(4), ValueError, "rank 4"),
    (lambda: torch.zeros(1, 3, 2, 2), ValueError, "image shape (3, 2, 2)"),
    (lambda: torch.zeros(1, 1, 5, 5), ValueError, "image shape (1, 5, 5)"),
    (lambda: "image.png", ValueError, "must be a torch.Tensor"),
]


@pytest.mark.parametrize("make, error, message", ORACLE_CASES)
def test_malformed_oracle_input(make, error, message):
    with pytest.raises(error) as info:
        _oracle()(make())
    assert message in str(info.value)


def test_oracle_budget_exhausted_message():
    oracle = HardLabelOracle(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)), budget=5)
    oracle(torch.zeros(4, 1, 2, 2))
    with pytest.raises(QueryBudgetExceeded) as info:
        oracle(torch.zeros(2, 1, 2, 2))
    assert str(info.value).startswith("query budget exceeded: budget is 5 queries, 4 already answered")


def _mnist_copy(tmp_path, corrupt=None):
    src = shared_data_or_skip() / "MNIST" / "raw"
    dst = tmp_path / "root" / "MNIST" / "raw"
    shutil.copytree(src, dst)
    if corrupt:
        corrupt(dst)
    return tmp_path / "root"


def _truncate(dst):
    path = dst / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])


def _flip_byte(dst):
    path = dst / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(gzip.decompress(path.read_bytes()))
    data[100] ^= 1
    path.write_bytes(gzip.compress(bytes(data)))


def _remove(dst):
    (dst / "train-images-idx3-ubyte.gz").unlink()


DATA_CASES = [
    (None, "nowhere", "nowhere"),
    (_truncate, "copy", "t10k-labels-idx1-ubyte"),
    (_flip_byte, "copy", "checksum mismatch"),
    (_remove, "copy", "train-images-idx3-ubyte"),
]


@pytest.mark.parametrize("corrupt, where, message", DATA_CASES)
def test_malformed_data_files_through_the_cli(tmp_path, capsys, monkeypatch, corrupt, where, message):
    monkeypatch.setenv("DB3KD_CACHE", str(tmp_path / "fresh-cache"))  # no verified copy from an earlier test
    root = tmp_path / "nowhere" if where == "nowhere" else _mnist_copy(tmp_path, corrupt)
    code = main(["run", "--dataset", "mnist", "--profile", "smoke", "--data-root", str(root),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_wrong_channel_count_in_cifar_files(tmp_path):
    import pickle

    from db3kd.data import load_dataset
    from db3kd.fakedata import write_fake_cifar10

    root = write_fake_cifar10(tmp_path, n_train_per_class=2, n_test_per_class=1)
    batch = Path(root) / "cifar-10-batches-py" / "data_batch_1"
    with open(batch, "rb") as f:
        d = pickle.load(f, encoding="latin1")
    d["data"] = d["data"][:, :1024]  # one channel instead of three
    with open(batch, "wb") as f:
        pickle.dump(d, f)
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", root)
    assert "data_batch_1" in str(info.value)


def test_bad_user_teacher_and_wrong_input_size(tmp_path, capsys):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))  # expects 28x28, digits are 16x16
    path = tmp_path / "teacher.pt"
    torch.jit.save(torch.jit.trace(model, torch.rand(2, 1, 28, 28)), path)
    code = main(["run", "--profile", "smoke", "--teacher", str(path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "teacher" in err and "Traceback" not in err
