"""Teachers: trained with cross-entropy and cached on disk, or a user's own exported model.

A built-in teacher is cached under a key hashing everything that determines it: its stage
configuration, the data fingerprint, the seed and the library version (:func:`teacher_key`). A
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

__all__ = ["TrainedTeacher", "teacher_key", "checkpoint_digest", "get_teacher", "load_teacher_file", "cache_root"]

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
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
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
