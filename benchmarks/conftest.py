"""db3kd benchmark harness: ``pytest benchmarks -m DATASET [--profile P] [--seeds N] ...``.

One test case per (dataset, method, seed), generated from the method registry, so a newly
registered method is benchmarked without touching this folder. Test ids read
``mnist-db3kd-mbd-s0``; each case carries the marker of its dataset (digits, mnist, fmnist,
cifar10, cifar100, flowers102); cpu/paper-profile cases are also ``slow`` and paper-profile
cases ``gpu`` (``perf`` marks the query-engine performance tests of test_perf.py). Select with ``-m``:

    uv run pytest benchmarks -m digits --profile smoke
    uv run pytest benchmarks -m mnist --profile smoke --data-root ../shared/datasets [-n 2]
    uv run pytest benchmarks -m cifar10 --profile smoke      # synthetic CIFAR-10 if the real files are absent

Options: ``--profile {smoke,cpu,paper}`` (default paper with CUDA, else cpu), ``--seeds N``
(seeds 0..N-1, default 1), ``--data-root PATH`` (default $DB3KD_DATA, else ./data),
``--tracking-uri URI`` (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db), ``--no-tracking``,
``--update-references``, ``--results-dir`` (default results/), ``--references-dir`` (default
benchmarks/references/), ``--device``.

Per case: the run is timed by pytest-benchmark as one round; its record goes to
``results/records/<dataset>/<profile>/<method>-s<seed>.json`` and to a nested MLflow run; the
regression gate of ``benchmarks/references/<dataset>-<profile>.json`` is applied. At the end of
the session (the xdist controller, once) the tables and plots of every (dataset, profile) that
ran are regenerated from all its records, and references are refreshed with
``--update-references``. A dataset whose files are missing is skipped with the paths looked at;
only ``cifar10`` under the smoke profile falls back to a synthetic copy in torchvision's format,
announced as such in the warning, the record, the table and the terminal summary.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from db3kd.datasets import DATASETS as REGISTERED_DATASETS  # the dataset registry (light: no torch)

HERE = Path(__file__).resolve().parent
PROFILES = ("smoke", "cpu", "paper")
DATASET_MARKERS = {name: spec.description for name, spec in REGISTERED_DATASETS.items()}  # one per registry entry
OTHER_MARKERS = {
    "slow": "long-running test, excluded from the default run (select with -m slow)",
    "gpu": "meant for a CUDA GPU (paper-profile benchmark cases)",
    "perf": "performance of the query engine (benchmarks/test_perf.py)",
}
SYNTHETIC_CIFAR10 = (
    "SYNTHETIC CIFAR-10: db3kd.fakedata.write_fake_cifar10 (class-coloured stripe images in torchvision's "
    "cifar-10-batches-py format, NOT the real CIFAR-10), used because the real files were not found under {root}"
)


class SyntheticDataWarning(UserWarning):
    """A benchmark ran on synthetic data; its numbers say nothing about the method."""


@dataclass(frozen=True)
class Case:
    dataset: str
    method: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.dataset}-{self.method}-s{self.seed}"


# ---------------------------------------------------------------------------------------------------
# options, markers, parametrisation
# ---------------------------------------------------------------------------------------------------


def pytest_addoption(parser):
    g = parser.getgroup("db3kd", "db3kd benchmarks")
    g.addoption("--profile", choices=PROFILES, default=None,
                help="run profile: smoke | cpu | paper (default: paper when CUDA is available, else cpu)")
    g.addoption("--seeds", type=int, default=1, metavar="N", help="seeds 0..N-1 per (dataset, method) (default: 1)")
    g.addoption("--data-root", default=None, metavar="PATH",
                help="dataset folder (default: $DB3KD_DATA, else ./data); e.g. ../shared/datasets")
    g.addoption("--tracking-uri", default=None, metavar="URI",
                help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    g.addoption("--no-tracking", action="store_true", help="do not log to MLflow")
    g.addoption("--update-references", action="store_true",
                help="refresh benchmarks/references/<dataset>-<profile>.json from this session's records "
                     "(gates are not applied)")
    g.addoption("--results-dir", default=None, metavar="PATH", help="where records and tables go (default: results/)")
    g.addoption("--references-dir", default=None, metavar="PATH",
                help="regression references (default: benchmarks/references/)")
    g.addoption("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.addoption("--perf-sizes", default=None, metavar="N,N,...",
                help="test_perf.py: training-set sizes of the scaling sweep (default 1000,4000)")


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")


def pytest_configure(config):
    for name, text in {**DATASET_MARKERS, **OTHER_MARKERS}.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    # MLflow's SQLAlchemy store warns about a deprecated loader on every session; not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore:The ``noload`` loader strategy is deprecated")
    seeds = config.getoption("seeds")
    if seeds is not None and seeds < 1:
        raise pytest.UsageError(f"--seeds must be >= 1, got {seeds}")
    state = _State(config)
    config._db3kd = state  # noqa: SLF001 - one object per process, reached from hooks and fixtures
    _STATE_HOLDER["state"] = state
    if _is_worker(config):
        count = int(config.workerinput.get("workercount", os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1)))
        try:
            import torch

            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(count, 1)))
        except ImportError:  # pragma: no cover
            pass


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """xdist controller -> workers: one session id (one MLflow parent run) and the command line."""
    state = node.config._db3kd  # noqa: SLF001
    node.workerinput["db3kd_session_id"] = state.session_id
    node.workerinput["db3kd_command"] = state.command


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    from db3kd.config import DATASETS
    from db3kd.registry import method_names

    state = metafunc.config._db3kd  # noqa: SLF001
    profile = state.profile
    extra = []
    if profile != "smoke":
        extra.append(pytest.mark.slow)
    if profile == "paper":
        extra.append(pytest.mark.gpu)
    params = []
    for dataset in DATASETS:
        for method in method_names():
            for seed in range(state.seeds):
                case = Case(dataset, method, seed)
                params.append(pytest.param(case, id=case.id, marks=[getattr(pytest.mark, dataset), *extra]))
    metafunc.parametrize("case", params)


# ---------------------------------------------------------------------------------------------------
# per-process state
# ---------------------------------------------------------------------------------------------------


class _State:
    """Options, the shared data cache, the MLflow tracker, and what the session produced."""

    def __init__(self, config):
        from db3kd.records import command_line
        from db3kd.tracking import new_session_id

        self.config = config
        opt = config.getoption
        self._profile = opt("profile")
        self.seeds = opt("seeds") or 1
        self.data_root = opt("data_root")
        self.tracking_uri = opt("tracking_uri")
        self.tracking = not opt("no_tracking")
        self.update_references = opt("update_references")
        root = Path(str(config.rootpath))
        self.results_dir = Path(opt("results_dir") or root / "results").resolve()
        self.references_dir = Path(opt("references_dir") or HERE / "references").resolve()
        self._device = opt("device")
        if _is_worker(config):
            self.session_id = config.workerinput.get("db3kd_session_id") or new_session_id()
            self.command = config.workerinput.get("db3kd_command") or command_line(config.workerinput.get("mainargv"))
        else:
            self.session_id = new_session_id()
            self.command = ("uv run " if os.environ.get("UV_RUN_RECURSION_DEPTH") else "") + command_line(sys.argv)
        self._splits: dict = {}
        self._tracker = None
        self.outcomes: list[dict] = []  # filled by pytest_runtest_logreport (controller sees workers' too)
        self.summary: list[str] = []

    @property
    def profile(self) -> str:
        if self._profile is None:
            import torch

            self._profile = "paper" if torch.cuda.is_available() else "cpu"
        return self._profile

    @property
    def device(self) -> str:
        if self._device is None:
            import torch

            self._device = "cuda" if torch.cuda.is_available() else "cpu"
        return self._device

    @property
    def tracker(self):
        if self._tracker is None:
            from db3kd.tracking import Tracker

            self._tracker = Tracker(
                self.tracking_uri, session_id=self.session_id, enabled=self.tracking,
                session_name=f"pytest {self.profile} {self.session_id}",
                session_tags={"profile": self.profile, "command": self.command, "seeds": str(self.seeds)},
            )
        return self._tracker

    # -- data -------------------------------------------------------------------------------------

    def splits_for(self, cfg):
        """(splits, data_source, data_root) of cfg's dataset, loaded once per process; skips when missing."""
        key = (cfg.dataset, cfg.image_size, cfg.val_fraction)
        if key not in self._splits:
            self._splits[key] = self._load(cfg)
        value = self._splits[key]
        if isinstance(value, str):
            pytest.skip(value)
        if value[1] != "official":
            warnings.warn(value[1], SyntheticDataWarning, stacklevel=2)
        return value

    def _load(self, cfg):
        from db3kd.data import load_dataset, resolve_data_root
        from db3kd.errors import DatasetNotFoundError

        root = None if cfg.dataset == "digits" else str(resolve_data_root(self.data_root))
        try:
            splits, notes = _load_quiet(load_dataset, cfg, root)
            return splits, ("official" if not notes else "UNOFFICIAL FILES: " + notes[0]), root
        except DatasetNotFoundError as exc:
            if cfg.dataset == "cifar10" and cfg.profile == "smoke":
                fake = _fake_cifar10_root()
                splits, _ = _load_quiet(load_dataset, cfg, str(fake))
                source = SYNTHETIC_CIFAR10.format(root=root)
                return splits, source, str(fake)
            first = str(exc).strip()
            return f"skipped, not faked (files missing): {first}"


def _load_quiet(load_dataset, cfg, root):
    """load_dataset, turning the 'not the official release' warning into a note."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = load_dataset(cfg.dataset, root, val_fraction=cfg.val_fraction, image_size=cfg.image_size)
    notes = []
    for w in caught:
        if "not the official release" in str(w.message):
            notes.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return splits, notes


def _fake_cifar10_root() -> Path:
    """A synthetic CIFAR-10 in torchvision's format, written once (file lock; shared by xdist workers)."""
    from filelock import FileLock

    from db3kd.data import resolve_cache_dir
    from db3kd.fakedata import write_fake_cifar10

    root = resolve_cache_dir() / "fakedata" / "cifar10-v1"
    root.mkdir(parents=True, exist_ok=True)
    done = root / "COMPLETE"
    with FileLock(str(root) + ".lock", timeout=600):
        if not done.exists():
            write_fake_cifar10(root, n_train_per_class=20, n_test_per_class=10, seed=0)
            done.write_text("db3kd.fakedata.write_fake_cifar10(root, n_train_per_class=20, n_test_per_class=10, seed=0)\n")
    return root


# ---------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def db3kd_bench(pytestconfig):
    """The per-process benchmark state (data loaded once per session and shared by every case)."""
    return pytestconfig._db3kd  # noqa: SLF001


@pytest.fixture
def run_case(db3kd_bench, benchmark, request):
    """``run_case(case) -> record``: run, time, record, track and gate one benchmark case."""

    def _run(case: Case) -> dict:
        from db3kd.config import resolve
        from db3kd.leaderboard import check_gate, load_references
        from db3kd.tracking import tracked_run

        state = db3kd_bench
        cfg = resolve(case.dataset, case.method, state.profile, case.seed)
        splits, source, root = state.splits_for(cfg)
        record = tracked_run(
            cfg, state.tracker, results_dir=state.results_dir,
            timer=lambda fn: benchmark.pedantic(fn, rounds=1, iterations=1),
            enrich={"command": state.command, "data_source": source, "data_root": root,
                    "extra": {"session_id": state.session_id, "test_id": case.id}},
            tags={"test_id": case.id},
            data_root=root, device=state.device, splits=splits,
        )
        if source != "official":
            status, messages = "no_reference", [f"{case.id}: not gated, the data is not the official release"]
        elif state.update_references:
            status, messages = "update", ["reference will be refreshed from this run (--update-references)"]
        else:
            gate = check_gate(record, load_references(state.references_dir, cfg.dataset, cfg.profile))
            status, messages = gate.status, gate.messages
        benchmark.extra_info.update({
            "method": cfg.method, "dataset": cfg.dataset, "profile": cfg.profile, "seed": cfg.seed,
            "teacher_accuracy": record["teacher_accuracy"], "student_accuracy": record["student_accuracy"],
            "queries_total": record["queries_total"], "queries_per_sample": record["queries_per_sample"],
            "mlflow_run_id": record.get("mlflow_run_id"), "config_hash": record["config_hash"],
            "data_source": source, "gate": status,
        })
        request.node.user_properties.append(("db3kd", {
            "id": case.id, "dataset": cfg.dataset, "profile": cfg.profile, "method": cfg.method, "seed": cfg.seed,
            "record_path": record.get("record_path"), "mlflow_run_id": record.get("mlflow_run_id"),
            "student_accuracy": record["student_accuracy"], "queries_per_sample": record["queries_per_sample"],
            "data_source": source, "gate": status, "gate_messages": messages,
            "tracking_failure": state.tracker.failure,
        }))
        if status == "fail":
            pytest.fail("regression gate failed:\n  " + "\n  ".join(m for m in messages if " < " in m or " > " in m),
                        pytrace=False)
        return record

    return _run


# ---------------------------------------------------------------------------------------------------
# session end: tables, references, MLflow parent runs, summary
# ---------------------------------------------------------------------------------------------------


_STATE_HOLDER: dict = {}  # the process's _State, for hooks that get no config


def pytest_runtest_logreport(report):
    if report.when != "call":
        return
    for name, value in getattr(report, "user_properties", ()):
        if name == "db3kd" and isinstance(value, dict):
            state = _STATE_HOLDER.get("state")
            if state is not None:
                state.outcomes.append(value)


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    state = getattr(config, "_db3kd", None)
    if state is None or _is_worker(config) or not state.outcomes:
        return
    from db3kd.leaderboard import update_references, write_all
    from db3kd.records import read_record

    groups = sorted({(o["dataset"], o["profile"]) for o in state.outcomes if o.get("record_path")})
    lines = state.summary
    if state.update_references:
        for dataset, profile in groups:
            recs = [read_record(o["record_path"]) for o in state.outcomes
                    if (o["dataset"], o["profile"]) == (dataset, profile) and o.get("record_path")
                    and o["data_source"] == "official"]  # never a reference from synthetic data
            if not recs:
                lines.append(f"references NOT updated for {dataset}/{profile}: no run on the official data")
                continue
            path = update_references(state.references_dir, dataset, profile, recs)
            lines.append(f"references updated: {_rel(path)} ({len(recs)} run(s))")
    written = write_all(state.results_dir, only=groups)
    for dataset, profile in groups:
        mine = [p for p in written if p.parent.name == dataset]
        plots = [p.name for p in mine if p.suffix == ".png" and p.name.startswith(profile + "-")]
        lines.append(f"tables regenerated: {_rel(state.results_dir / dataset / (profile + '.md'))} (+ .csv, .tex, "
                     f"{len([p for p in written if p.parent.name == 'configs' and p.parent.parent.name == dataset])} "
                     f"config file(s)" + (f", plots {', '.join(plots)}" if plots else "") + ")")
    # gates
    for o in sorted(state.outcomes, key=lambda o: o["id"]):
        if o["gate"] == "fail":
            lines.append(f"GATE FAILED   {o['id']}: " + "; ".join(o["gate_messages"]))
        elif o["gate"] == "no_reference" and o["data_source"] != "official":
            lines.append(f"not gated     {o['id']}: synthetic / unofficial data")
        elif o["gate"] == "no_reference":
            lines.append(f"not gated     {o['id']}: no reference in {_rel(state.references_dir)}/"
                         f"{o['dataset']}-{o['profile']}.json (create: --update-references)")
        elif o["gate"] == "pass":
            lines.append(f"gate passed   {o['id']}: " + "; ".join(o["gate_messages"]))
    for source in sorted({o["data_source"] for o in state.outcomes if o["data_source"] != "official"}):
        lines.append(f"NOTICE: {source}")
    # MLflow: session artifacts on the parent runs, then close them
    tracked = [o for o in state.outcomes if o.get("mlflow_run_id")]
    failures = sorted({o["tracking_failure"] for o in state.outcomes if o.get("tracking_failure")})
    if tracked:
        from db3kd.tracking import Tracker, display_uri

        tracker = state._tracker  # noqa: SLF001 - same process (no xdist): reuse its MLflow client
        if tracker is None or not tracker.active:
            tracker = Tracker(state.tracking_uri, session_id=state.session_id, enabled=state.tracking)
        datasets = sorted({o["dataset"] for o in tracked})
        for dataset in datasets:
            files = [p for p in written if p.parent.name == dataset]  # tables and plots, not configs/
            tracker.log_session_artifacts(dataset, files, "leaderboard")
        tracker.finish_session(datasets, "FINISHED" if exitstatus == 0 else "FAILED")
        uri = display_uri(tracker.uri)
        lines.append(f"MLflow: {len(tracked)} run(s) in {uri}, experiments "
                     + ", ".join(f"db3kd/{d}" for d in datasets) + f", session {state.session_id}"
                     + (f"; view with: uv run mlflow ui --backend-store-uri {uri}" if not uri.startswith("http") else ""))
    if failures:
        lines.append("MLflow tracking was disabled after a failure: " + failures[0])


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    state = getattr(config, "_db3kd", None)
    if state is None or _is_worker(config) or not state.summary:
        return
    terminalreporter.write_sep("-", f"db3kd benchmarks (profile {state.profile}, {state.seeds} seed(s))")
    for line in state.summary:
        terminalreporter.write_line(line)
