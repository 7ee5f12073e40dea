"""Label construction on Ray (issue 17): same bytes as in-process, exact accounting under a SIGKILL.

One local Ray cluster of 2 CPU workers is shared by the module (about 10 s to start).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from db3kd.config import resolve

NO_CACHE = {"label_cache": False}  # the label cache would answer the second run without Ray
SMOKE = ["run", "--profile", "smoke", "--json", "--no-progress", "--set", "label_cache=false"]  # measure every time


@pytest.fixture(scope="module")
def ray_cluster():
    from db3kd.distributed import connect

    ray = connect(workers=2)
    yield ray
    ray.shutdown()


def _workdir(run_dir: Path) -> Path:
    (workdir,) = [p for p in Path(run_dir).iterdir() if p.is_dir()]
    return workdir


def _labels(run_dir: Path) -> dict:
    return torch.load(_workdir(run_dir) / "soft_labels.pt", weights_only=True)


def _ledgers(workdir: Path) -> dict[str, int]:
    """{ledger file name: queries in it} of a run (db3kd.distributed.QueryLedger files)."""
    from db3kd.distributed import LEDGER_DIR, queries_sent

    out = {}
    for path in sorted((Path(workdir) / LEDGER_DIR).glob("*.log")):
        out[path.name] = sum(int(line) for line in path.read_text().splitlines())
    assert sum(out.values()) == queries_sent(Path(workdir) / LEDGER_DIR)
    return out


def _pid(ledger_name: str) -> int:
    return int(ledger_name.rsplit("-", 2)[-2])  # <role>-<host>-<pid>-<random>.log


@pytest.fixture(scope="module")
def mbd_in_process(tmp_path_factory):
    """The reference: digits smoke DB3KD-MBD run in this process, no Ray."""
    from db3kd.runner import run

    run_dir = tmp_path_factory.mktemp("mbd-local")
    return run(resolve("digits", "db3kd-mbd", "smoke", 0, method_overrides=NO_CACHE), run_dir=run_dir), _labels(run_dir)


def test_chunks_argument_computes_only_the_asked_chunks_then_assembles(tmp_path):
    """The search interface the executor builds on (db3kd.robustness / the engine): chunks=[k] writes
    chunk k and returns the queries it spent; a later call without chunks assembles the same result."""
    from db3kd import HardLabelOracle
    from db3kd.robustness import boundary_search, plan_chunks

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3, bias=False))
    with torch.no_grad():  # class c = the brightest of three pixel groups
        model[1].weight.copy_(torch.stack([(torch.arange(16) // 5 == c).float() for c in range(3)]))
    g = torch.Generator().manual_seed(0)
    x, refs = torch.rand(10, 1, 4, 4, generator=g), torch.rand(12, 1, 4, 4, generator=g)
    y, ref_labels = HardLabelOracle(model)(x), HardLabelOracle(model)(refs)
    assert len(set(ref_labels.tolist())) == 3
    assert plan_chunks(10, 4) == [(0, 4), (4, 8), (8, 10)]
    whole = HardLabelOracle(model)
    expected = boundary_search(whole, x, y, refs, ref_labels, 3, tol=1e-3, chunk_size=4)
    oracle = HardLabelOracle(model)
    spent = boundary_search(oracle, x, y, refs, ref_labels, 3, tol=1e-3, chunk_size=4, chunks=[2],
                            checkpoint_dir=tmp_path)
    assert spent == oracle.queries > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunk00000008-00000010.pt", "shared.pt"]
    assert boundary_search(oracle, x, y, refs, ref_labels, 3, tol=1e-3, chunk_size=4, chunks=[2],
                           checkpoint_dir=tmp_path) == 0  # found already written
    for k in (0, 1):
        boundary_search(oracle, x, y, refs, ref_labels, 3, tol=1e-3, chunk_size=4, chunks=[k], checkpoint_dir=tmp_path)
    before = oracle.queries
    got = boundary_search(oracle, x, y, refs, ref_labels, 3, tol=1e-3, chunk_size=4, checkpoint_dir=tmp_path)
    assert oracle.queries == before  # assembled from the files
    assert torch.equal(got.distances, expected.distances) and torch.equal(got.queries, expected.queries)
    assert got.total_queries == expected.total_queries == whole.queries
    with pytest.raises(ValueError, match=r"outside plan_chunks\(10, 4\)"):
        boundary_search(oracle, x, y, refs, ref_labels, 3, chunk_size=4, chunks=[3], checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="pass a checkpoint_dir"):
        boundary_search(oracle, x, y, refs, ref_labels, 3, chunk_size=4, chunks=[0])


def test_teacher_spec_rebuilds_the_same_oracle_from_weights_or_an_exported_file(tmp_path):
    """What a worker receives (pickled): the built-in teacher's weights or the user's file; the
    rebuilt oracle answers exactly as the driver's, and a wrong digest is refused."""
    import pickle

    from db3kd import HardLabelOracle
    from db3kd.distributed import TeacherSpec
    from db3kd.errors import DB3KDError
    from db3kd.models import get_model
    from db3kd.teacher import checkpoint_digest, load_teacher_file

    torch.manual_seed(0)
    model = get_model("lenet5", num_classes=10, in_channels=1, image_size=16).eval()
    x = torch.rand(64, 1, 16, 16)
    expected = HardLabelOracle(model)(x)
    where = dict(access="labels", input_shape=(1, 16, 16), batch_size=32, num_classes=10)
    builtin = TeacherSpec.builtin(model, arch="lenet5", digest=checkpoint_digest(model.state_dict()), **where)
    path = tmp_path / "teacher.pt"
    torch.jit.save(torch.jit.trace(model, x[:2]), path)
    exported = TeacherSpec.from_file(path, digest=load_teacher_file(path)[1], **where)
    for spec in (builtin, exported):
        sent = []
        oracle = pickle.loads(pickle.dumps(spec)).oracle("cpu", on_answer=sent.append)
        assert torch.equal(oracle(x), expected) and sent == [64]
    with pytest.raises(DB3KDError, match="digest"):
        TeacherSpec.builtin(model, arch="lenet5", digest="0" * 16, **where).model()


def test_help_does_not_import_ray():
    code = "import sys\nfrom db3kd.cli import main\ntry:\n    main(['run', '--help'])\nexcept SystemExit:\n    pass\n" \
           "assert 'ray' not in sys.modules, 'db3kd --help imported ray'"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_missing_ray_is_one_clear_error(monkeypatch):
    from db3kd.distributed import import_ray
    from db3kd.errors import DB3KDError

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(DB3KDError, match="need Ray, which is not installed here.*uv sync"):
        import_ray()


def test_bd_through_the_cli_same_json_and_soft_labels_with_two_ray_workers(ray_cluster, tmp_path, capsys):
    from db3kd.cli import main

    outs = {}
    for name, extra in (("local", []), ("ray", ["--workers", "2"])):
        assert main([*SMOKE, "--run-dir", str(tmp_path / name), *extra]) == 0
        outs[name] = json.loads(capsys.readouterr().out)
    local, remote = outs["local"], outs["ray"]
    for key in ("queries_total", "queries_sent", "student_accuracy", "soft_label_sha256", "teacher_accuracy"):
        assert remote[key] == local[key], key
    assert local["queries_sent"] == local["queries_total"] > 0 and len(local["soft_label_sha256"]) == 64
    a, b = _labels(tmp_path / "local"), _labels(tmp_path / "ray")
    for key in ("soft_labels", "distances", "queries"):
        assert torch.equal(a[key], b[key]), key
    # the chunks really ran in the workers: one ledger per chunk task, none from this process
    ledgers = _ledgers(_workdir(tmp_path / "ray"))
    chunk_ledgers = {n: q for n, q in ledgers.items() if n.startswith("chunk")}
    assert len(chunk_ledgers) == 4 and all(_pid(n) != os.getpid() for n in chunk_ledgers)  # 200 samples / 64
    assert len({_pid(n) for n in chunk_ledgers}) == 2  # both workers took chunks
    assert sum(chunk_ledgers.values()) == int(b["queries"].sum())  # the driver sent only the shared answers


def test_mbd_on_two_ray_workers_is_bit_identical(ray_cluster, tmp_path, mbd_in_process):
    from db3kd.distributed import RayExecutor
    from db3kd.runner import run

    local, local_labels = mbd_in_process
    remote = run(resolve("digits", "db3kd-mbd", "smoke", 0, method_overrides=NO_CACHE), run_dir=tmp_path, executor=RayExecutor(workers=2))
    for key in ("queries_total", "queries_sent", "student_accuracy", "soft_label_sha256"):
        assert remote[key] == local[key], key
    got = _labels(tmp_path)
    for key in ("soft_labels", "distances", "queries"):
        assert torch.equal(got[key], local_labels[key]), key


def test_worker_killed_mid_chunk_is_retried_with_the_same_result(ray_cluster, tmp_path, mbd_in_process):
    """SIGKILL a worker while it computes a chunk: Ray retries the task; soft labels and
    queries_total are unchanged, queries_sent grows by exactly what the killed attempt sent."""
    from db3kd.distributed import LEDGER_DIR, RayExecutor
    from db3kd.runner import run

    local, local_labels = mbd_in_process
    config = resolve("digits", "db3kd-mbd", "smoke", 0, method_overrides=NO_CACHE)
    ledger_dir = tmp_path / config.config_hash() / LEDGER_DIR
    box: dict = {}

    def driver():
        try:
            box["record"] = run(config, run_dir=tmp_path, executor=RayExecutor(workers=2))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            box["error"] = exc

    thread = threading.Thread(target=driver)
    thread.start()
    victim, deadline = None, time.monotonic() + 120
    while victim is None and thread.is_alive() and time.monotonic() < deadline:
        for path in ledger_dir.glob("chunk*.log"):
            if path.stat().st_size > 0:  # this attempt has started sending queries
                victim = path
                os.kill(_pid(path.name), signal.SIGKILL)
                break
        time.sleep(0.002)
    thread.join(timeout=300)
    assert victim is not None, "no chunk task was seen sending queries"
    assert "error" not in box, box.get("error")
    remote = box["record"]
    killed = sum(int(line) for line in victim.read_text().splitlines())
    assert killed > 0
    assert remote["queries_total"] == local["queries_total"]
    assert remote["student_accuracy"] == local["student_accuracy"]
    assert remote["soft_label_sha256"] == local["soft_label_sha256"]
    got = _labels(tmp_path)
    for key in ("soft_labels", "distances", "queries"):
        assert torch.equal(got[key], local_labels[key]), key
    # the killed attempt's queries were lost work: billed, not counted in the total
    assert remote["queries_sent"] == remote["queries_total"] + killed
    retried = [n for n in _ledgers(ledger_dir.parent) if n.startswith(victim.name.split("-")[0] + "-")]
    assert len(retried) == 2  # the killed attempt and its retry, each with its own ledger


def test_query_budget_is_refused_on_ray(ray_cluster):
    from db3kd.config import resolve as resolve_config
    from db3kd.distributed import RayExecutor
    from db3kd.errors import ConfigError
    from db3kd.runner import run

    config = resolve_config("digits", "db3kd-bd", "smoke", 0, query_budget=1000)
    with pytest.raises(ConfigError, match="--query-budget cannot be combined with --workers"):
        run(config, executor=RayExecutor(workers=2))


@pytest.mark.slow
def test_zsdb3kd_generation_and_labelling_on_ray_are_bit_identical(ray_cluster, tmp_path):
    """ZSDB3KD: pseudo-sample chunks and their MBD labelling as Ray tasks give the in-process record."""
    from db3kd.distributed import RayExecutor
    from db3kd.runner import run

    config = resolve("digits", "zsdb3kd", "smoke", 0, method_overrides=NO_CACHE)  # measured twice, not cached
    local = run(config, run_dir=tmp_path / "local")
    remote = run(config, run_dir=tmp_path / "ray", executor=RayExecutor(workers=2))
    for key in ("queries_total", "queries_sent", "student_accuracy", "soft_label_sha256", "metrics"):
        assert remote[key] == local[key], key
