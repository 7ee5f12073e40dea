"""Checkpoint I/O of the engine: every finished unit of work is one file, written atomically.

A unit is written with :func:`db3kd.training.atomic_save` (a per-process temporary file in the
same folder, then ``os.replace``), so a reader never sees half a file and two processes that
compute the same unit (e.g. two Ray workers writing ``shared.pt``) each replace the file with
identical bytes: every unit is a deterministic function of the run's inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

__all__ = ["chunk_name", "load_unit", "resumable"]


def chunk_name(start: int, end: int) -> str:
    """File name of the label-construction chunk of samples ``start:end``."""
    return f"chunk{start:08d}-{end:08d}.pt"


def load_unit(path: Path):
    """The saved unit at ``path`` (tensors on the CPU), or None when it does not exist."""
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def resumable(checkpoint_dir, name: str, compute: Callable[[], dict]) -> dict:
    """``compute()`` once: its result (a dict of CPU tensors and numbers) is saved atomically under
    ``checkpoint_dir/name`` and reloaded on reruns; ``checkpoint_dir=None`` just computes."""
    if checkpoint_dir is None:
        return compute()
    from db3kd.training import atomic_save

    path = Path(checkpoint_dir) / name
    value = load_unit(path)
    if value is not None:
        return value
    value = compute()
    atomic_save(value, path)
    return value
