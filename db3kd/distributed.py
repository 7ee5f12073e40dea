"""Label construction and benchmark cases on many workers and machines, with Ray (issue 17).

The work is embarrassingly parallel: BD/MBD chunks of samples and ZSDB3KD chunks of pseudo
samples are independent and each is written to its own file in the run's checkpoint folder.
A method hands its search to a :class:`ChunkExecutor` (``ctx.executor``):

* :class:`ChunkExecutor` (the default) calls the search once, in this process.
* :class:`RayExecutor` (``db3kd run --workers N`` or ``--ray-address ADDR``) first computes the
  search's shared answers on the driver (``chunks=[]``), then runs one Ray task per chunk
  (``chunks=[k]``: the task rebuilds the teacher and its oracle from a :class:`TeacherSpec`,
  takes one GPU when the cluster has GPUs, and writes the chunk file), then calls the search
  once more on the driver, which loads every chunk from the folder and assembles the result.
  The folder must be storage every node sees (``--run-dir`` on NFS or similar on a
  multi-machine cluster); a task on a node that cannot see it stops with an error saying so.

Results do not depend on where a chunk ran: each chunk's randomness is seeded from the run
seed and the sample indices, and a chunk's answer depends only on its inputs (same device type
and torch build). Accounting: ``queries_total`` is the sum of the shared answers and the
finished chunks, as for a resumed run; ``queries_sent`` (:func:`queries_sent`) is every query any
oracle of the run sent to the teacher, lost work included: each oracle appends the size of
every call to its own file under ``<workdir>/queries_sent/`` (a :class:`QueryLedger`, one
file per process attempt) before the teacher runs, so a worker killed mid-chunk still left its
count on disk. Ray retries a task whose worker died (``max_retries``); the retry finds nothing
of the lost attempt but its ledger, and recomputes the chunk to the same bytes.

:class:`RayCaseRunner` runs whole benchmark cases (``pytest benchmarks --workers N`` or
``--ray-address``) as Ray tasks; the driver replays their metrics into MLflow and writes
records, tables and gates exactly as a local session does.

Ray is imported only when one of these is used (:func:`import_ray`), never by ``db3kd --help``.
"""

from __future__ import annotations

import hashlib
import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from db3kd.errors import DB3KDError

__all__ = [
    "ChunkExecutor", "RayExecutor", "RayCaseRunner", "TeacherSpec", "QueryLedger", "queries_sent",
    "soft_label_sha256", "import_ray", "connect", "LEDGER_DIR",
]

LEDGER_DIR = "queries_sent"  # under the run's workdir: one ledger file per oracle (process attempt)
ARTIFACT_LIMIT_BYTES = 20 * 2**20  # artifact files a case task sends back to the driver (as MLflow keeps them)


# ----------------------------------------------------------------------------------------------
# accounting


class QueryLedger:
    """The queries one oracle sent, appended to its own file as they are sent.

    folder: where the ledger files of a run live; role: a name for the file (``driver``,
    ``chunk00003``). The file ``<role>-<host>-<pid>-<random>.log`` is created at the first call
    and gets one line per oracle call (its image count), written with one ``write`` each, so
    the count survives a SIGKILL of the process. Pass :meth:`add` as an oracle's ``on_answer``.
    """

    def __init__(self, folder: str | os.PathLike, role: str):
        self.folder = Path(folder)
        self.path = self.folder / f"{role}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.log"
        self._file = None

    def add(self, n: int) -> None:
        if self._file is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", buffering=1, encoding="ascii")  # line-buffered: one write per call
        self._file.write(f"{int(n)}\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def queries_sent(folder: str | os.PathLike) -> int:
    """Sum of every :class:`QueryLedger` file under ``folder`` (0 when there is none): every query
    the run's oracles sent to the teacher, in every process and attempt, lost work included."""
    total = 0
    for path in sorted(Path(folder).glob("*.log")):
        for line in path.read_text(encoding="ascii", errors="replace").splitlines(keepends=True):
            if line.endswith("\n") and line.strip().isdigit():  # a line cut by a crash is not counted
                total += int(line)
    return total


def soft_label_sha256(targets) -> str | None:
    """SHA-256 (64 hex digits) of a soft-label tensor's bytes (float32 (N, L), C order, on CPU);
    None when there is none. Two runs with the same digest built bit-identical soft labels."""
    if targets is None:
        return None
    t = targets.detach().cpu().contiguous()
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


# ----------------------------------------------------------------------------------------------
# the teacher, as a worker rebuilds it


@dataclass(frozen=True)
class TeacherSpec:
    """Everything a worker needs to rebuild the teacher's oracle, shipped by value.

    Built-in teacher: ``arch`` and its ``state_dict`` (CPU tensors); a user's teacher: the
    exported file's bytes (``file_bytes``, TorchScript or torch.export). ``digest`` is the
    checkpoint digest (:func:`db3kd.teacher.checkpoint_digest`) or the file's SHA-256 prefix; a
    worker checks it before answering a query. access: ``labels`` (HardLabelOracle) or
    ``scores`` (ScoreOracle); input_shape: (C, H, W); batch_size: images per forward pass.
    Shipping the weights (not a path) means workers need no access to the driver's cache.
    """

    access: str
    input_shape: tuple[int, ...]
    batch_size: int
    num_classes: int
    digest: str
    arch: str | None = None
    state_dict: dict | None = None
    file_bytes: bytes | None = None
    oracle_kwargs: dict = field(default_factory=dict)  # a user's teacher: door checks, input normalisation
    memory_format: str = "contiguous"  # a built-in teacher's layout on the driver (db3kd.layout.FORMATS)

    @classmethod
    def builtin(cls, model, *, arch: str, digest: str, access: str, input_shape, batch_size: int,
                num_classes: int) -> "TeacherSpec":
        import torch

        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        # the driver's memory layout (db3kd.layout): another layout answers a boundary probe in other last bits
        channels_last = any(v.dim() == 4 and not v.is_contiguous() and v.is_contiguous(memory_format=torch.channels_last)
                            for v in state.values())
        return cls(access, tuple(input_shape), batch_size, num_classes, digest, arch=arch, state_dict=state,
                   memory_format="channels_last" if channels_last else "contiguous")

    @classmethod
    def from_file(cls, path, *, digest: str, access: str, input_shape, batch_size: int,
                  num_classes: int) -> "TeacherSpec":
        return cls(access, tuple(input_shape), batch_size, num_classes, digest, file_bytes=Path(path).read_bytes())

    def model(self):
        """The teacher, rebuilt and verified. Raises DB3KDError when its digest differs."""
        if self.file_bytes is not None:
            import tempfile

            from db3kd.teacher import load_teacher_file

            with tempfile.TemporaryDirectory(prefix="db3kd-teacher-") as tmp:
                path = Path(tmp) / "teacher.pt"
                path.write_bytes(self.file_bytes)
                model, digest = load_teacher_file(path)
        else:
            from db3kd.models import get_model
            from db3kd.teacher import checkpoint_digest

            c, h = self.input_shape[0], self.input_shape[1]
            from db3kd.layout import FORMATS

            model = get_model(self.arch, num_classes=self.num_classes, in_channels=c, image_size=h)
            model.to(memory_format=FORMATS[self.memory_format]).load_state_dict(self.state_dict)
            model.eval()
            digest = checkpoint_digest(self.state_dict)
        if digest != self.digest:
            raise DB3KDError(f"teacher rebuilt on {socket.gethostname()} has digest {digest}, the driver's is {self.digest}")
        return model

    def oracle(self, device="cpu", on_answer: Callable[[int], None] | None = None):
        """A fresh oracle (HardLabelOracle or ScoreOracle) on ``device``, telling ``on_answer``."""
        from db3kd.oracle import HardLabelOracle, ScoreOracle

        kind = {"labels": HardLabelOracle, "scores": ScoreOracle}.get(self.access)
        if kind is None:
            raise DB3KDError(f"teacher access {self.access!r} cannot be distributed (only labels and scores)")
        return kind(self.model(), batch_size=self.batch_size, device=device, input_shape=self.input_shape,
                    on_answer=on_answer, **self.oracle_kwargs)


# ----------------------------------------------------------------------------------------------
# executors


class ChunkExecutor:
    """Runs a chunked search in this process: ``search(fn, oracle, ...)`` is ``fn(oracle, ...)``."""

    distributed = False

    def bind(self, teacher: Callable[[], TeacherSpec], ledger_dir: str | os.PathLike) -> "ChunkExecutor":
        """This executor for one run: ``teacher()`` builds the spec workers rebuild the oracle from
        (called only when needed); ledger_dir: the run's :data:`LEDGER_DIR` folder."""
        return self

    def search(self, fn: Callable, oracle, *args, num_chunks: int, dir_arg: str = "checkpoint_dir", **kwargs):
        """Run ``fn(oracle, *args, **kwargs)``, a search that accepts ``chunks=`` (indices into its
        plan of ``num_chunks`` chunks) and writes its chunks to the folder ``kwargs[dir_arg]``.
        Returns what fn returns with every chunk assembled."""
        return fn(oracle, *args, **kwargs)

    def describe(self) -> str:
        return "in-process"


def import_ray():
    """The ``ray`` module; DB3KDError naming the fix when it is not installed."""
    # Workers run in this very environment: without this, a driver started by `uv run` makes Ray
    # package the working directory and build a fresh virtual environment for its workers (a minute
    # per cluster start, and a copy of the checkout rather than the installed package).
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    try:
        import ray
    except ImportError:
        raise DB3KDError("--workers / --ray-address need Ray, which is not installed here: it is a dependency of "
                         "db3kd's default install, so run `uv sync` (or `pip install 'ray[default]>=2.9'`)") from None
    return ray


def connect(*, workers: int | None = None, address: str | None = None):
    """Join the Ray cluster at ``address`` or start a local one with ``workers`` CPU slots
    (reusing a Ray already initialised in this process). Returns the ray module."""
    ray = import_ray()
    if workers is not None and workers < 1:
        raise DB3KDError(f"--workers must be >= 1, got {workers}")
    if ray.is_initialized():
        return ray
    try:
        if address:
            ray.init(address=address, logging_level="warning", configure_logging=True)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, logging_level="warning", configure_logging=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else f"a local Ray cluster of {workers} worker(s)"
        raise DB3KDError(f"cannot start or join {where}: {str(exc).splitlines()[0][:300]}") from None
    return ray


def _gpus_per_task(ray) -> int:
    return 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0


def _gather(ray, refs: Sequence, desc: str, progress: bool) -> list:
    """ray.get of every task, with a progress bar; a task's own exception is re-raised as itself."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(refs), desc=desc, unit="chunk", disable=not progress, leave=False)
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            bar.update(len(done))
        return ray.get(list(refs))
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as exc:
        raise DB3KDError(f"a Ray task failed after its retries: {str(exc).splitlines()[0][:300]}") from None
    finally:
        bar.close()


_WORKER_CACHE: dict[str, Any] = {}  # per worker process: the teacher and the current search inputs


def _fetch(ray, ref):
    key = ref.hex()
    if key not in _WORKER_CACHE:
        if len(_WORKER_CACHE) >= 2:
            _WORKER_CACHE.clear()
        _WORKER_CACHE[key] = ray.get(ref)
    return _WORKER_CACHE[key]


def _chunk_task(fn, teacher_ref: list, payload_ref: list, chunk: int, ledger_dir: str, marker: str,
                threads: int | None) -> dict:
    """One Ray task: rebuild the oracle, compute chunk ``chunk`` of ``fn`` into the run's folder."""
    import ray
    import torch

    if threads:
        torch.set_num_threads(threads)
    folder = Path(ledger_dir)
    if not (folder / marker).exists():
        raise DB3KDError(f"the run folder {folder.parent} written by the driver is not visible on node "
                         f"{socket.gethostname()}: on a multi-machine cluster --run-dir must be storage every node "
                         "mounts at the same path (NFS or similar)")
    spec = _fetch(ray, teacher_ref[0])
    args, kwargs = _fetch(ray, payload_ref[0])
    ledger = QueryLedger(folder, f"chunk{chunk:05d}")
    oracle = spec.oracle("cuda" if ray.get_gpu_ids() else "cpu", on_answer=ledger.add)
    try:
        spent = fn(oracle, *args, chunks=[chunk], **kwargs)
    finally:
        ledger.close()
    return {"chunk": chunk, "queries": int(spent), "node": socket.gethostname(), "pid": os.getpid()}


class RayExecutor(ChunkExecutor):
    """Runs each chunk of a search as a Ray task (see the module docstring).

    workers: start a local cluster with this many CPU slots; address: join an existing cluster
    (``ray start --head`` prints it; ``auto`` finds a local one); a Ray already initialised in
    this process is reused. threads: torch threads per task (default 1 = the task's CPU slot);
    max_retries: how often Ray reruns a task whose worker died. Raises DB3KDError when Ray is
    missing or the cluster cannot be reached.
    """

    distributed = True

    def __init__(self, *, workers: int | None = None, address: str | None = None, threads: int = 1,
                 max_retries: int = 3, progress: bool = False):
        self._ray = connect(workers=workers, address=address)
        self.workers, self.address, self.threads, self.max_retries = workers, address, threads, max_retries
        self.progress = progress
        self._teacher: Callable[[], TeacherSpec] | None = None
        self._teacher_ref = None
        self._ledger_dir: Path | None = None

    def bind(self, teacher, ledger_dir) -> "RayExecutor":
        import copy

        bound = copy.copy(self)
        bound._teacher, bound._teacher_ref, bound._ledger_dir = teacher, None, Path(ledger_dir).resolve()
        return bound

    def describe(self) -> str:
        res = self._ray.cluster_resources()
        where = f"Ray cluster at {self.address}" if self.address else "local Ray cluster"
        return f"{where} ({int(res.get('CPU', 0))} CPU slot(s), {int(res.get('GPU', 0))} GPU(s))"

    def search(self, fn, oracle, *args, num_chunks: int, dir_arg: str = "checkpoint_dir", **kwargs):
        if self._teacher is None or self._ledger_dir is None:
            raise DB3KDError("RayExecutor.search needs bind(teacher, ledger_dir) first (db3kd.runner.run does it)")
        ray = self._ray
        if kwargs.get(dir_arg) is None:
            raise DB3KDError(f"a distributed search writes its chunks to files: {dir_arg} must be a folder")
        kwargs = {**kwargs, dir_arg: Path(kwargs[dir_arg]).resolve()}
        # 1. shared answers (BD/MBD: the teacher's labels of references and samples) on the driver, once
        fn(oracle, *args, chunks=[], **kwargs)
        # 2. one task per chunk; a chunk already on disk is found there and costs nothing
        self._ledger_dir.mkdir(parents=True, exist_ok=True)
        marker = f"driver-{uuid.uuid4().hex[:12]}.marker"
        (self._ledger_dir / marker).touch()
        if self._teacher_ref is None:
            self._teacher_ref = ray.put(self._teacher())
        payload = ray.put((args, {**kwargs, "progress": False}))
        task = ray.remote(_chunk_task).options(num_cpus=self.threads, num_gpus=_gpus_per_task(ray),
                                               max_retries=self.max_retries)
        refs = [task.remote(fn, [self._teacher_ref], [payload], k, str(self._ledger_dir), marker, self.threads)
                for k in range(num_chunks)]
        _gather(ray, refs, f"{getattr(fn, '__name__', 'search')} on Ray", self.progress)
        # 3. assemble on the driver: every chunk is loaded from the folder, nothing is recomputed
        return fn(oracle, *args, **kwargs)


# ----------------------------------------------------------------------------------------------
# whole benchmark cases as Ray tasks


def _case_task(config, data_root: str | None, threads: int, cache_dir: str | None) -> dict:
    """One benchmark case on a worker: :func:`db3kd.runner.run`, its metrics, its artifact files."""
    import shutil

    import ray
    import torch

    torch.set_num_threads(threads)  # the local session's thread count: the same numerics as a local run
    if cache_dir:
        os.environ["DB3KD_CACHE"] = cache_dir  # teachers trained once and shared with the driver's machine
    from db3kd.records import machine_info
    from db3kd.runner import run

    device = "cuda" if ray.get_gpu_ids() else "cpu"
    logs: list = []
    record = run(config, data_root=data_root, device=device, log=lambda metrics, step=None: logs.append((metrics, step)))
    record["host"] = machine_info(device)  # where it ran (db3kd.records.enrich keeps it)
    files = {}
    for name, path in (record.get("artifacts") or {}).items():
        p = Path(path)
        if p.is_file() and p.stat().st_size <= ARTIFACT_LIMIT_BYTES:
            files[name] = (p.name, p.read_bytes())
    if record.get("workdir"):
        shutil.rmtree(record["workdir"], ignore_errors=True)  # a temporary folder on the worker
    return {"record": record, "logs": logs, "files": files}


class RayCaseRunner:
    """Benchmark cases as Ray tasks: :meth:`submit` every case first, then :meth:`result` one by one.

    threads: torch threads per case (the local session's count, so numerics and gates match a
    local run); cache_dir: the teacher cache (absolute) the workers use. Each case takes one CPU
    slot and, when the cluster has GPUs, one GPU.
    """

    def __init__(self, *, workers: int | None = None, address: str | None = None, threads: int = 1,
                 cache_dir: str | None = None):
        self._ray = connect(workers=workers, address=address)
        self.threads, self.cache_dir = threads, cache_dir
        self._refs: dict[str, Any] = {}

    def submitted(self, key: str) -> bool:
        return key in self._refs

    def submit(self, key: str, config, data_root: str | None) -> None:
        ray = self._ray
        task = ray.remote(_case_task).options(num_cpus=1, num_gpus=_gpus_per_task(ray), max_retries=1)
        self._refs[key] = task.remote(config, data_root, self.threads, self.cache_dir)

    def result(self, key: str, log: Callable[[dict, int | None], None]) -> dict:
        """The case's record, its metrics replayed into ``log`` and its artifacts copied to a
        local temporary folder (the record's ``workdir`` and ``artifacts`` point there)."""
        import tempfile

        (out,) = _gather(self._ray, [self._refs.pop(key)], key, False)
        for metrics, step in out["logs"]:
            log(metrics, step)
        record = out["record"]
        local = Path(tempfile.mkdtemp(prefix=f"db3kd-{record['config_hash']}-ray-"))
        artifacts = dict(record.get("artifacts") or {})  # a file too large to ship keeps its worker path
        for name, (filename, data) in out["files"].items():
            (local / filename).write_bytes(data)
            artifacts[name] = str(local / filename)
        record["artifacts"], record["workdir"] = artifacts, str(local)
        return record
