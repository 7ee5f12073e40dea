"""Teachers: trained with cross-entropy and cached on disk, or a user's own exported model.

A built-in teacher is cached under a key hashing everything that determines it: its stage
configuration, the data fingerprint, its own seed (``RunConfig.teacher_seed``, default 0, not the
run seed: one teacher per (dataset, profile) is shared by every method and student seed) and the
library version (:func:`teacher_key`). A
second run with the same key loads the checkpoint instead of training; parallel workers share the
cache under a file lock, so a teacher is never trained twice. Checkpoints are state dicts written
atomically (temporary file, then rename) and loaded with ``weights_only=True``.

Built-in teachers train and answer queries in their device's fast memory format
(:func:`db3kd.layout.to_fast_layout`, e.g. ``channels_last`` on CPU); the format is part of the
cache key, since it changes the trained weights in the last bits.

``load_teacher_file`` reads a user's teacher of any architecture: TorchScript (``torch.jit.save``)
or a ``torch.export`` program (``torch.export.save``, ``.pt2``). It is used only through the oracle.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from db3kd.errors import DB3KDError

__all__ = ["TrainedTeacher", "teacher_key", "checkpoint_digest", "get_teacher", "load_teacher_file", "cache_root",
           "file_sha256", "TeacherWarning", "DoorReport", "check_teacher", "near_chance_warning"]

_TEACHER_FORMAT = 2  # 2: the memory format joined the key


def cache_root() -> Path:
    """``$DB3KD_CACHE`` or ``./.cache/db3kd`` (git-ignored)."""
    return Path(os.environ.get("DB3KD_CACHE", ".cache/db3kd"))


@dataclass
class TrainedTeacher:
    """A teacher ready to be wrapped by an oracle. model: nn.Module (or exported program);
    key: cache key (hash of what determines the teacher); checkpoint: :func:`checkpoint_digest`
    of its weights; test_accuracy: fraction on the test split; trained: True when this call
    trained it (False: loaded from cache); history: per-epoch rows."""

    model: object
    key: str
    checkpoint: str
    test_accuracy: float
    trained: bool
    history: list


def checkpoint_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 prefix (16 hex digits) of a state dict: every entry's name, dtype, shape and bytes.

    Two teachers with the same digest compute with bit-identical weights; the same cache key can
    give a different digest on another machine when float kernels differ (training is not
    bit-reproducible across CPU instruction sets).
    """
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-dim entries too (BatchNorm's counters)
    return h.hexdigest()[:16]


def teacher_key(stage, data_fingerprint: str, seed: int, num_classes: int, image_shape,
                memory_format: str = "contiguous") -> str:
    """16 hex digits of sha256 over everything that determines a built-in teacher (memory_format:
    ``contiguous`` or ``channels_last``, the layout it trains in)."""
    blob = json.dumps(
        {"stage": stage.model_dump(), "data": data_fingerprint, "seed": seed, "classes": num_classes,
         "shape": list(image_shape), "format": _TEACHER_FORMAT, "memory_format": memory_format},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def get_teacher(splits, stage, *, seed: int, device="cpu", cache_dir: Path | None = None, progress: bool = False,
                log=None) -> TrainedTeacher:
    """Train (or load from cache) the teacher ``stage.arch`` on ``splits`` with cross-entropy.

    seed: the teacher's own seed (``RunConfig.teacher_seed``), never the student's run seed.
    splits: :class:`db3kd.data.DataSplits`; stage: :class:`db3kd.config.StageConfig`. The teacher
    is trained on ``stage.train_subset`` training images (all when None), selected with the
    validation split held out. Returns :class:`TrainedTeacher` whose model is on the CPU in
    ``device``'s fast memory format (:mod:`db3kd.layout`).
    """
    from filelock import FileLock

    from db3kd.layout import FORMATS, memory_format_name
    from db3kd.models import get_model
    from db3kd.training import atomic_save, evaluate, fit, seed_everything

    c, h = splits.train_x.shape[1], splits.train_x.shape[2]
    shape = tuple(splits.train_x.shape[1:])
    seed_everything(seed)
    model = get_model(stage.arch, num_classes=splits.num_classes, in_channels=c, image_size=h)
    fmt = memory_format_name(device, model, shape)  # draws no random numbers
    key = teacher_key(stage, splits.fingerprint(), seed, splits.num_classes, shape, fmt)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    path = root / "teachers" / f"{stage.arch}-{key}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if getattr(stage, "pretrained", None) and not path.exists():
            from db3kd.pretrained import load_pretrained

            load_pretrained(model, stage.arch, stage.pretrained)
        if path.exists():
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            model.to(memory_format=FORMATS[fmt]).load_state_dict(ckpt["state_dict"])
            digest = checkpoint_digest(ckpt["state_dict"])
            return TrainedTeacher(model.eval(), key, digest, ckpt["test_accuracy"], False, ckpt["history"])
        x, y = splits.train_x, splits.train_y
        if stage.train_subset is not None and stage.train_subset < x.shape[0]:
            x, y = x[: stage.train_subset], y[: stage.train_subset]
        history = fit(
            model, x, lambda logits, _xb, idx: nn.functional.cross_entropy(logits, y[idx.cpu()].to(logits.device)),
            stage.train_config(), seed=seed, device=device, val=(splits.val_x, splits.val_y), desc="teacher",
            progress=progress, log=(lambda row, step: log({f"teacher/{k}": v for k, v in row.items()}, step)) if log else None,
            memory_format=fmt,
        )
        acc = evaluate(model, splits.test_x, splits.test_y, device=device)
        model.cpu()
        state = model.state_dict()
        atomic_save({"state_dict": state, "test_accuracy": acc, "history": history, "stage": stage.model_dump()}, path)
        return TrainedTeacher(model.eval(), key, checkpoint_digest(state), acc, True, history)


def load_teacher_file(path: str | Path):
    """Load a user's teacher: a ``torch.export`` program (``.pt2``) or a TorchScript module.

    Returns ``(model, sha256-prefix of the file)``. Raises DB3KDError naming the file when it is
    missing or is neither format.
    """
    path = Path(path)
    if not path.is_file():
        raise DB3KDError(f"teacher file not found: {path}")
    digest = file_sha256(path)[:16]
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        names = []
    # TorchScript archives hold compiled code under <name>/code/; torch.export archives do not
    scripted = any("/code/" in n or n.startswith("code/") for n in names)
    try:
        if not names:
            raise ValueError("not a zip archive")
        if scripted:
            return torch.jit.load(str(path), map_location="cpu"), digest
        return torch.export.load(str(path)), digest
    except Exception as exc:
        raise DB3KDError(
            f"cannot load teacher {path}: it is neither a torch.export program (torch.export.save) nor a "
            f"TorchScript module (torch.jit.save): {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        ) from None


def file_sha256(path: str | Path) -> str:
    """SHA-256 (64 hex digits) of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# the door: a user's teacher is checked before any query is counted toward a run


class TeacherWarning(UserWarning):
    """A user's teacher answers, but something about it makes the run's numbers doubtful."""


#: images of the probe batch and how many times it is asked (the door's own queries are never counted)
DOOR_PROBE, DOOR_REPEATS = 64, 3


@dataclass
class DoorReport:
    """What :func:`check_teacher` found. deterministic: the probe's answers were identical on every
    repeat; label_changes: probe images whose top-1 label changed between repeats; max_score_change:
    largest change of a softmax probability between repeats; probe: images asked; repeats: times asked."""

    deterministic: bool
    label_changes: int
    max_score_change: float
    probe: int
    repeats: int

    def as_record(self) -> dict:
        return {"deterministic": self.deterministic, "label_changes": self.label_changes,
                "max_score_change": self.max_score_change, "probe": self.probe, "repeats": self.repeats}


def check_teacher(model, probe: torch.Tensor, num_classes: int, *, name: str = "teacher", device="cpu",
                  batch_size: int = 4096, input_norm=None, repeats: int = DOOR_REPEATS) -> DoorReport:
    """Check a user's teacher at the door, before any query counts.

    probe: float32 (N, C, H, W) in [0, 1] (the runner uses the first 64 test images); the teacher,
    fed through an uncounted :class:`~db3kd.oracle.ScoreOracle` (with ``input_norm``), must return
    finite float logits of shape (N, num_classes). It is asked ``repeats`` times: differing answers
    give one :class:`TeacherWarning` (a non-deterministic teacher: dropout or batch norm left in
    training mode, sampling) and ``deterministic=False`` in the report.

    Raises :class:`~db3kd.oracle.TeacherOutputError` (wrong width, integer or non-finite outputs,
    not a tensor) or DB3KDError (the teacher fails on such images), each one line naming ``name``.
    """
    from db3kd.oracle import ScoreOracle, TeacherOutputError

    door = ScoreOracle(model, batch_size=batch_size, device=device, input_shape=tuple(probe.shape[1:]),
                       num_classes=num_classes, input_norm=input_norm, name=name)
    answers = []
    for _ in range(max(1, repeats)):
        try:
            answers.append(door(probe))
        except TeacherOutputError:
            raise
        except (RuntimeError, TypeError, IndexError, ValueError) as exc:
            raise DB3KDError(
                f"{name} failed on a batch of images of shape {tuple(probe.shape[1:])} (C, H, W), float32 in [0, 1]"
                + (" (normalised by teacher_input)" if input_norm is not None else "")
                + f": {str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}"
            ) from None
    first = answers[0]
    labels = [a.argmax(1) for a in answers]
    changed = torch.zeros(first.shape[0], dtype=torch.bool)
    score_change = 0.0
    for a, lab in zip(answers[1:], labels[1:]):
        changed |= (lab != labels[0]).cpu()
        score_change = max(score_change, float((a - first).abs().max()) if a.numel() else 0.0)
    report = DoorReport(deterministic=not bool(changed.any()) and score_change <= 1e-4,
                        label_changes=int(changed.sum()), max_score_change=score_change,
                        probe=int(first.shape[0]), repeats=len(answers))
    if not report.deterministic:
        import warnings

        warnings.warn(
            f"{name} is non-deterministic: asked the same {report.probe} images {report.repeats} times, "
            f"{report.label_changes} label(s) changed and probabilities moved by up to {score_change:.3g} "
            "(dropout or batch norm left in training mode?); its labels and query counts are not reproducible",
            TeacherWarning, stacklevel=2)
    return report


def near_chance_warning(accuracy: float, num_classes: int, *, name: str = "teacher", dataset: str = "") -> str | None:
    """The warning text when a teacher's test accuracy is at most twice chance (``2 / num_classes``), else None."""
    chance = 1.0 / num_classes
    if accuracy > 2 * chance:
        return None
    return (f"{name} has test accuracy {100 * accuracy:.1f}% on {dataset or 'this dataset'} (chance {100 * chance:.1f}%): "
            "it may expect other preprocessing (e.g. --set teacher_input.mean=... --set teacher_input.std=...), "
            "another image size or channel order, or other class indices")
