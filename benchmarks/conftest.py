"""db3kd benchmark harness: ``pytest benchmarks -m DATASET --profile P [--seeds N] ...``.

One test case per (dataset, method, seed), generated from the method registry, so a newly
registered method is benchmarked without touching this folder. Test ids read
``mnist-db3kd-mbd-s0``; each case carries the marker of its dataset (digits, mnist, fmnist,
cifar10, cifar100, flowers102); cpu/paper-profile cases are also ``slow`` and paper-profile
cases ``gpu`` (``perf`` marks the query-engine performance tests of test_perf.py). Select with
``-m``; a ``-m`` on the command line replaces the default ``-m 'not slow'``, so ``-m mnist``
selects every MNIST case of the profile:

    uv run pytest benchmarks -m digits --profile smoke
    uv run pytest benchmarks -m mnist --profile cpu --data-root ../shared/datasets [-n 2]
    uv run pytest benchmarks -m cifar10 --profile smoke      # synthetic CIFAR-10 if the real files are absent
    uv run pytest benchmarks -m fmnist --profile cpu --teacher model.pt2 --data-root ../shared/datasets

Options: ``--profile {smoke,cpu,paper}`` (default cpu; required when CUDA is visible, never
silently paper), ``--seeds N`` (seeds 0..N-1, default 1), ``--data-root PATH`` (default
$DB3KD_DATA, else ./data), ``--teacher FILE`` (your TorchScript / torch.export teacher instead
of the built-in one), ``--rerun``, ``--run-dir DIR``, ``--tracking-uri URI`` (default
$MLFLOW_TRACKING_URI, else ``mlflow.db`` at the project root), ``--no-tracking``,
``--update-references``, ``--results-dir`` (default results/, with --teacher
results/teachers/<file>-<sha256 prefix>/), ``--references-dir`` (default benchmarks/references/),
``--device`` / ``--devices 0,1`` (xdist worker k uses GPU ``k mod count``), ``--workers N`` /
``--ray-address ADDR`` (run the cases as Ray tasks, one GPU each where the cluster has GPUs:
every selected case is submitted when the first one runs, and each test collects its own
record; not with ``-n``).

Per case: a record already in the results folder for the same configuration hash, teacher
checkpoint and code version (:func:`db3kd.runner.code_version`) is reused (``--rerun`` runs it
again); otherwise the run, resumable from ``--run-dir`` (default ``<cache>/runs``, as ``db3kd run
--run-dir``), is timed by pytest-benchmark as one round, its record goes to
``results/records/<dataset>/<profile>/<method>-s<seed>.json`` and to a nested MLflow run, and the
regression gate of ``benchmarks/references/<dataset>-<profile>.json`` is applied. With
``--teacher``, white-box methods and methods that need the teacher's training recipe are
skipped with the reason (:func:`db3kd.runner.user_teacher_conflict`). At the end of the session
(the xdist controller, once) the tables and plots of every (dataset, profile) that ran are
regenerated from all its records, and references are refreshed with ``--update-references``.
On Ray the record, gate, tables and MLflow run are made on the driver exactly as in-process
(the case's metrics are replayed into its MLflow run when it returns); pytest-benchmark then
times the wait for the case's result, the record's ``wall_seconds`` the run itself. A
dataset whose files are missing is skipped with the paths looked at; only ``cifar10`` under the
smoke profile falls back to a synthetic copy in torchvision's format, announced as such in the
warning, the record, the table and the terminal summary.
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
                help="run profile: smoke | cpu | paper (default cpu; required when CUDA is visible)")
    g.addoption("--seeds", type=int, default=1, metavar="N", help="seeds 0..N-1 per (dataset, method) (default: 1)")
    g.addoption("--data-root", default=None, metavar="PATH",
                help="dataset folder (default: $DB3KD_DATA, else ./data); e.g. ../shared/datasets")
    g.addoption("--teacher", default=None, metavar="FILE",
                help="benchmark against your own teacher: a TorchScript (torch.jit.save) or torch.export (.pt2) "
                     "model, queried only through the oracle; white-box methods and methods that need the "
                     "teacher's training recipe are skipped")
    g.addoption("--rerun", action="store_true",
                help="run every selected case again, even when a record for the same configuration hash, teacher "
                     "checkpoint and code version exists (default: reuse it)")
    g.addoption("--run-dir", default=None, metavar="DIR",
                help="where unfinished cases checkpoint and resume, as `db3kd run --run-dir` (default: <cache>/runs, "
                     "the cache being $DB3KD_CACHE or .cache/db3kd)")
    g.addoption("--tracking-uri", default=None, metavar="URI",
                help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<project root>/mlflow.db)")
    g.addoption("--no-tracking", action="store_true", help="do not log to MLflow")
    g.addoption("--update-references", action="store_true",
                help="refresh benchmarks/references/<dataset>-<profile>.json from this session's records "
                     "(gates are not applied)")
    g.addoption("--results-dir", default=None, metavar="PATH",
                help="where records and tables go (default: results/; with --teacher: "
                     "results/teachers/<file stem>-<sha256 prefix>/)")
    g.addoption("--references-dir", default=None, metavar="PATH",
                help="regression references (default: benchmarks/references/)")
    g.addoption("--device", default=None,
                help="torch device for every worker (default: a GPU per worker when CUDA is visible, else cpu)")
    g.addoption("--devices", default=None, metavar="I,J,...",
                help="CUDA device indices to spread the xdist workers over: worker k uses the (k mod n)-th "
                     "(default: every visible GPU)")
    g.addoption("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                help="a setting for every case, in the language of `db3kd run --set` (student.epochs=5, tau=0.5, "
                     "teacher_input.mean=[0.5] ...); a method without that parameter is skipped (repeatable)")
    g.addoption("--config", dest="config_file", default=None, metavar="FILE.yaml",
                help="settings for every case from a file (what `db3kd run --show-config` prints); --set wins")
    g.addoption("--variant", default=None, metavar="NAME",
                help="name of this configuration in records, tables and MLflow (default: the hash of what "
                     "--set/--config change)")
    g.addoption("--perf-sizes", default=None, metavar="N,N,...",
                help="test_perf.py: training-set sizes of the scaling sweep (default 1000,4000)")
    # cases as Ray tasks (issue 17; db3kd.distributed.RayCaseRunner)
    g.addoption("--workers", type=int, default=None, metavar="N",
                help="run the cases as Ray tasks on a local Ray cluster of N workers (one GPU per case where there "
                     "are GPUs); same records, MLflow runs, gates and tables as in-process")
    g.addoption("--ray-address", default=None, metavar="ADDR",
                help="run the cases as Ray tasks on the existing Ray cluster at ADDR (`ray start --head`; auto)")


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")


# ---------------------------------------------------------------------------------------------------
# profile and devices (pure functions, tested with a fake device count in tests/test_harness_devices.py)


PROFILE_REQUIRED = ("CUDA is visible: choose the profile explicitly with --profile smoke | cpu | paper "
                    "(paper = the paper's settings, hours per case; cpu = minutes; smoke = seconds)")


def choose_profile(option: str | None, cuda_available: bool) -> str | None:
    """The session's profile: ``--profile`` when given, else ``cpu`` without CUDA; None with CUDA
    visible (the user must choose: a GPU never silently switches a session to ``paper``)."""
    if option is not None:
        return option
    return None if cuda_available else "cpu"


def parse_devices(text: str | None, cuda_count: int) -> list[int] | None:
    """``--devices 0,1`` -> [0, 1] (None when not given); raises pytest.UsageError naming a bad entry."""
    if text is None:
        return None
    try:
        devices = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise pytest.UsageError(f"--devices expects comma-separated CUDA device indices, e.g. 0,1; got {text!r}") from None
    if not devices:
        raise pytest.UsageError(f"--devices expects at least one CUDA device index, got {text!r}")
    bad = [d for d in devices if d < 0 or d >= cuda_count]
    if bad:
        raise pytest.UsageError(f"--devices {text}: device index {bad[0]} does not exist ({cuda_count} CUDA device(s) "
                                f"visible: {', '.join(map(str, range(cuda_count))) or 'none'})")
    return devices


def worker_index(worker_id: str | None) -> int:
    """pytest-xdist worker id ``gw<k>`` -> k; 0 without xdist (``master`` or None)."""
    if worker_id and worker_id.startswith("gw") and worker_id[2:].isdigit():
        return int(worker_id[2:])
    return 0


def device_for_worker(worker_id: str | None, *, cuda_count: int, devices: list[int] | None = None,
                      explicit: str | None = None) -> str:
    """The torch device of one process: ``--device`` when given; ``cpu`` without CUDA; else the
    GPU ``devices[k mod len(devices)]`` (``--devices``) or ``cuda:<k mod cuda_count>`` for worker k."""
    if explicit:
        return explicit
    if cuda_count <= 0:
        return "cpu"
    k = worker_index(worker_id)
    return f"cuda:{devices[k % len(devices)]}" if devices else f"cuda:{k % cuda_count}"


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pytest_configure(config):
    for name, text in {**DATASET_MARKERS, **OTHER_MARKERS}.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    # MLflow's SQLAlchemy store warns about a deprecated loader on every session; not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore:The ``noload`` loader strategy is deprecated")
    seeds = config.getoption("seeds")
    if seeds is not None and seeds < 1:
        raise pytest.UsageError(f"--seeds must be >= 1, got {seeds}")
    if config.getoption("devices") is not None:
        parse_devices(config.getoption("devices"), _cuda_count())  # a bad index fails now, not in a worker
    teacher = config.getoption("teacher")
    if teacher is not None and not Path(teacher).is_file():
        raise pytest.UsageError(f"--teacher {teacher}: file not found (a TorchScript or torch.export model)")
    _check_ray_options(config)
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
    profile = state.profile or "cpu"  # None (CUDA, no --profile): refused in pytest_collection_modifyitems
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


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected
def pytest_collection_modifyitems(config, items):
    state = getattr(config, "_db3kd", None)
    if state is None:
        return
    cases = [item for item in items if "case" in getattr(item, "fixturenames", ())]
    if cases and state.profile is None:
        raise pytest.UsageError(PROFILE_REQUIRED)


def pytest_deselected(items):
    state = _STATE_HOLDER.get("state")
    if state is not None:
        state.deselected_cases += sum("case" in getattr(item, "fixturenames", ()) for item in items)


# ---------------------------------------------------------------------------------------------------
# per-process state
# ---------------------------------------------------------------------------------------------------


class _State:
    """Options, the shared data cache, the MLflow tracker, and what the session produced."""

    def __init__(self, config):
        from db3kd.records import command_line
        from db3kd.tracking import new_session_id

        from db3kd.teacher import cache_root, file_sha256
        from db3kd.tracking import default_tracking_uri

        self.config = config
        opt = config.getoption
        self._profile_option = opt("profile")
        self._profile: str | None | bool = False  # False: not decided yet (deciding imports torch)
        self.seeds = opt("seeds") or 1
        self.data_root = opt("data_root")
        root = Path(str(config.rootpath))
        self.tracking_uri = default_tracking_uri(opt("tracking_uri"), root=root)  # one store per project
        self.tracking = not opt("no_tracking")
        self.update_references = opt("update_references")
        self.teacher_file = str(Path(opt("teacher")).resolve()) if opt("teacher") else None
        self.teacher_sha256 = file_sha256(self.teacher_file) if self.teacher_file else None
        default_results = root / "results"
        if self.teacher_file:  # a table per teacher: a user's teacher never mixes into the suite's leaderboard
            default_results = default_results / "teachers" / f"{Path(self.teacher_file).stem}-{self.teacher_sha256[:12]}"
        self.results_dir = Path(opt("results_dir") or default_results).resolve()
        self.references_dir = Path(opt("references_dir") or HERE / "references").resolve()
        self.run_dir = Path(opt("run_dir") or cache_root() / "runs").resolve()
        self.rerun = opt("rerun")
        self._device = opt("device")
        self._devices = opt("devices")
        self.deselected_cases = 0
        self.settings, self.variant = _settings(opt("config_file"), opt("settings"), opt("variant"))
        if _is_worker(config):
            self.session_id = config.workerinput.get("db3kd_session_id") or new_session_id()
            self.command = config.workerinput.get("db3kd_command") or command_line(config.workerinput.get("mainargv"))
        else:
            self.session_id = new_session_id()
            self.command = ("uv run " if os.environ.get("UV_RUN_RECURSION_DEPTH") else "") + command_line(sys.argv)
        self._splits: dict = {}
        self._ray_cases = None  # db3kd.distributed.RayCaseRunner, with --workers / --ray-address
        self._tracker = None
        self.outcomes: list[dict] = []  # filled by pytest_runtest_logreport (controller sees workers' too)
        self.summary: list[str] = []

    @property
    def profile(self) -> str | None:
        """--profile, else cpu without CUDA; None with CUDA visible and no --profile (refused)."""
        if self._profile is False:
            self._profile = choose_profile(self._profile_option, self._profile_option is None and _cuda_count() > 0)
        return self._profile

    @property
    def device(self) -> str:
        """This process's torch device (:func:`device_for_worker`)."""
        if self._device is None:
            count = _cuda_count()
            self._device = device_for_worker(os.environ.get("PYTEST_XDIST_WORKER"), cuda_count=count,
                                             devices=parse_devices(self._devices, count))
        return self._device

    @property
    def teacher_label(self) -> str:
        """``T.pt (sha256 <64 hex>)`` for a user's teacher, else ``built-in``."""
        return f"{self.teacher_file} (sha256 {self.teacher_sha256})" if self.teacher_file else "built-in"

    def resolve(self, case: Case):
        """The case's RunConfig: --config and --set settings, the user's teacher file, the variant name.
        A method parameter that only other methods have skips the case (a variant of those methods);
        any other bad setting fails it with the one-line ConfigError."""
        from db3kd.config import resolve
        from db3kd.errors import ConfigError

        from db3kd.registry import get_method, method_names

        own = set(get_method(case.method).Params.model_fields)
        others = {name for m in method_names() for name in get_method(m).Params.model_fields}
        missing = sorted(k.removeprefix("params.") for k in self.settings
                         if ("." not in k or k.startswith("params.")) and k.removeprefix("params.") not in own
                         and k.removeprefix("params.") in others)
        if missing:  # a parameter of other methods: this configuration is a variant of those methods only
            pytest.skip(f"{case.method} has no parameter {', '.join(map(repr, missing))} (set by --set/--config)")
        try:
            return resolve(case.dataset, case.method, self.profile, case.seed, overrides=self.settings,
                           teacher_file=self.teacher_file, variant=self.variant)
        except ConfigError as exc:
            pytest.fail(f"--set/--config: {exc}", pytrace=False)

    def reusable(self, cfg, splits) -> dict | None:
        """The stored record of ``cfg`` when it was made under the same configuration hash, teacher
        checkpoint and code version (:func:`db3kd.runner.code_version`), else None."""
        from db3kd.records import read_record, record_path
        from db3kd.runner import code_version

        path = record_path(self.results_dir, cfg.dataset, cfg.profile, cfg.method, cfg.seed, cfg.variant)
        if not path.is_file():
            return None
        try:
            record = read_record(path)
        except (OSError, ValueError):
            return None
        if record.get("config_hash") != cfg.config_hash() or record.get("code_version") != code_version(cfg.method):
            return None
        if record.get("teacher_checkpoint") != self.teacher_checkpoint(cfg, splits):
            return None
        record["record_path"] = str(path)
        return record

    def teacher_checkpoint(self, cfg, splits) -> str:
        """What the run's teacher would be: the file's SHA-256 prefix, or the built-in teacher's
        weight digest (trained now if not cached, as the run itself would)."""
        if cfg.teacher_file:
            return self.teacher_sha256[:16]
        from db3kd.teacher import get_teacher

        return get_teacher(splits, cfg.teacher, seed=cfg.teacher_seed, device=self.device).checkpoint

    @property
    def tracker(self):
        if self._tracker is None:
            from db3kd.tracking import Tracker

            self._tracker = Tracker(
                self.tracking_uri, session_id=self.session_id, enabled=self.tracking,
                session_name=f"pytest {self.profile} {self.session_id}",
                session_tags={"profile": self.profile, "command": self.command, "seeds": str(self.seeds),
                              "teacher_file": self.teacher_file, "teacher_sha256": self.teacher_sha256},
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


    # -- cases as Ray tasks (--workers / --ray-address) ---------------------------------------------

    def remote_run(self, case: Case, session):
        """A ``run_fn`` for tracked_run that collects ``case`` from its Ray task, or None (in-process).
        The first call submits every selected case, so the cluster runs them side by side while
        the tests collect them one by one, in order."""
        opt = self.config.getoption
        if opt("workers") is None and opt("ray_address") is None:
            return None
        if self._ray_cases is None:
            import torch

            from db3kd.distributed import RayCaseRunner
            from db3kd.teacher import cache_root

            # each case with this process's thread count: the numerics (and gates) of a local session
            self._ray_cases = RayCaseRunner(workers=opt("workers"), address=opt("ray_address"),
                                            threads=torch.get_num_threads(), cache_dir=str(cache_root().resolve()))
            for item in session.items:
                other = getattr(getattr(item, "callspec", None), "params", {}).get("case")
                if not isinstance(other, Case):
                    continue
                try:
                    cfg = self.resolve(other)
                except pytest.skip.Exception:
                    continue  # the case skips itself when it runs
                key = (cfg.dataset, cfg.image_size, cfg.val_fraction)
                if key not in self._splits:
                    self._splits[key] = self._load(cfg)
                if not isinstance(self._splits[key], str):  # missing data: the case skips itself
                    self._ray_cases.submit(other.id, cfg, self._splits[key][2])
        cases = self._ray_cases
        return lambda config, log, **_: cases.result(case.id, log)


def _check_ray_options(config) -> None:
    workers, address = config.getoption("workers"), config.getoption("ray_address")
    if workers is None and address is None:
        return
    if workers is not None and address is not None:
        raise pytest.UsageError("--workers starts a local Ray cluster, --ray-address joins one: give one of them")
    if workers is not None and workers < 1:
        raise pytest.UsageError(f"--workers must be >= 1, got {workers}")
    if _is_worker(config) or config.getoption("numprocesses", default=None):
        raise pytest.UsageError("--workers / --ray-address run the cases on Ray; -n runs them in pytest-xdist "
                                "processes: use one of the two")


IDENTITY = ("dataset", "method", "seed", "num_classes")  # the harness enumerates these itself


def _settings(config_file: str | None, items: list[str], variant: str | None) -> tuple[dict, str | None]:
    """(settings, variant) from --config FILE (its dataset/method/seed keys dropped: every case gets the
    rest) and --set items (they win); a ``variant`` key of the file names the variant unless --variant does."""
    if not config_file and not items and variant is None:
        return {}, None
    from db3kd.config import load_config_file, parse_set
    from db3kd.errors import ConfigError

    settings: dict = {}
    try:
        if config_file:
            loaded = load_config_file(config_file)
            variant = variant or loaded.pop("variant", None)
            loaded.pop("profile", None)  # the session's --profile decides
            settings.update({k: v for k, v in loaded.items() if k not in IDENTITY})
        settings.update(parse_set(list(items)))
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    return settings, variant


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
def run_case(db3kd_bench, request):
    """``run_case(case) -> record``: reuse, or run, time, record, track and gate one benchmark case."""

    def _run(case: Case) -> dict:
        from db3kd.leaderboard import check_gate, load_references
        from db3kd.registry import get_method
        from db3kd.runner import user_teacher_conflict
        from db3kd.tracking import tracked_run

        state = db3kd_bench
        cfg = state.resolve(case)
        if cfg.teacher_file:
            method_cls = get_method(cfg.method)
            conflict = user_teacher_conflict(method_cls, method_cls.Params(**cfg.method_params))
            if conflict:
                pytest.skip(conflict)
        splits, source, root = state.splits_for(cfg)
        record = None if state.rerun else state.reusable(cfg, splits)
        reused = record is not None
        if not reused:
            benchmark = request.getfixturevalue("benchmark")  # a reused case is not timed
            record = tracked_run(
                cfg, state.tracker, results_dir=state.results_dir,
                timer=lambda fn: benchmark.pedantic(fn, rounds=1, iterations=1),
                enrich={"command": state.command, "data_source": source, "data_root": root,
                        "extra": {"session_id": state.session_id, "test_id": case.id}},
                tags={"test_id": case.id},
                data_root=root, device=state.device, splits=splits, run_dir=state.run_dir, fresh=state.rerun,
                run_fn=state.remote_run(case, request.session),
            )
        if cfg.teacher_file:  # the references hold the built-in teacher's numbers
            status, messages = "user_teacher", [f"{case.id}: not gated, a user's teacher"]
        elif source != "official":
            status, messages = "no_reference", [f"{case.id}: not gated, the data is not the official release"]
        elif state.update_references:
            status, messages = "update", ["reference will be refreshed from this run (--update-references)"]
        else:
            gate = check_gate(record, load_references(state.references_dir, cfg.dataset, cfg.profile))
            status, messages = gate.status, gate.messages
        if not reused:
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
            "data_source": source, "gate": status, "gate_messages": messages, "reused": reused,
            "teacher_warnings": record.get("teacher_warnings") or [],
            "tracking_failure": state.tracker.failure if not reused else None,
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
    if state is None or _is_worker(config):
        return
    if not state.outcomes:
        if state.deselected_cases and config.getoption("markexpr", "").replace(" ", "") in ("", "notslow"):
            state.summary.append(f"{state.deselected_cases} benchmark case(s) deselected by the default -m 'not slow'; "
                                 f"select a dataset's cases with -m DATASET (one of {', '.join(DATASET_MARKERS)})")
        return
    from db3kd.leaderboard import update_references, write_all
    from db3kd.records import read_record

    groups = sorted({(o["dataset"], o["profile"]) for o in state.outcomes if o.get("record_path")})
    lines = state.summary
    if state.update_references:
        for dataset, profile in groups:
            recs = [read_record(o["record_path"]) for o in state.outcomes
                    if (o["dataset"], o["profile"]) == (dataset, profile) and o.get("record_path")
                    and o["data_source"] == "official" and o["gate"] != "user_teacher"]  # never from synthetic
            if not recs:  # data or a user's teacher
                lines.append(f"references NOT updated for {dataset}/{profile}: no run of the built-in teacher "
                             "on the official data")
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
    reused = sorted(o["id"] for o in state.outcomes if o.get("reused"))
    if reused:
        lines.append(f"{len(reused)} reused (a record with the same config hash, teacher checkpoint and code version "
                     f"exists; --rerun runs them again): {', '.join(reused)}")
    warned: dict[str, list[str]] = {}
    for o in sorted(state.outcomes, key=lambda o: o["id"]):
        for text in o.get("teacher_warnings") or ():
            warned.setdefault(text, []).append(o["id"])
    for text, ids in warned.items():
        lines.append(f"TEACHER WARNING: {text} ({len(ids)} case(s))")
    # gates
    for o in sorted(state.outcomes, key=lambda o: o["id"]):
        if o["gate"] == "fail":
            lines.append(f"GATE FAILED   {o['id']}: " + "; ".join(o["gate_messages"]))
        elif o["gate"] == "user_teacher":
            lines.append(f"not gated     {o['id']}: a user's teacher (the references are the built-in teacher's)")
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
    terminalreporter.write_sep("-", f"db3kd benchmarks (profile {state.profile}, {state.seeds} seed(s), "
                                    f"teacher {state.teacher_label})")
    for line in state.summary:
        terminalreporter.write_line(line)
