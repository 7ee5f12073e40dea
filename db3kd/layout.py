"""Fast layouts: the memory format and the oracle batch size each device runs fastest with (issue 14 item 4).

* :func:`fast_memory_format` -- the memory format built-in teachers and students train and answer
  queries in. Measured here (torch 2.15 CPU, 2 threads): LeNet-5 forward at batch 512 runs at
  7.9k images/s in the default (contiguous) layout and 14.7k in ``channels_last``; LeNet-5-half
  training at 3.7k versus 6.7k images/s. So the CPU uses ``channels_last`` (:data:`MEASURED`).
  A device type without a measured entry (a GPU) measures both layouts on the model's forward
  pass once and caches the winner per (device name, model) on disk, so every later run on that
  machine uses the same layout. ``DB3KD_MEMORY_FORMAT=contiguous|channels_last`` overrides both.
  The layout changes float sums in the last bits, so it is part of a teacher's cache key.
* :func:`to_fast_layout` -- a built-in module moved to that layout (parameters of rank 4 get
  ``channels_last`` strides; everything else is untouched). A user's TorchScript or
  ``torch.export`` teacher is never passed through it: it is used as given.
* :func:`oracle_batch_size` -- ``oracle_batch: "auto"``: the batch size at which the teacher's bare
  forward pass answers the most images per second on this device, measured once per (device,
  model, image shape, torch version, threads) and cached on disk; an explicit integer is used as is.

Cache: ``<cache_root>/layout.json`` (:func:`db3kd.teacher.cache_root`), written atomically under a file lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

__all__ = ["MEASURED", "FORMATS", "fast_memory_format", "memory_format_name", "to_fast_layout", "model_key",
           "oracle_batch_size", "resolve_oracle_batch", "BATCH_CANDIDATES"]

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
#: device type -> fastest layout measured there (see the module docstring for the rates)
MEASURED: dict[str, str] = {"cpu": "channels_last"}
BATCH_CANDIDATES = (64, 128, 256, 512, 1024, 2048, 4096)
ENV = "DB3KD_MEMORY_FORMAT"
_memo: dict[str, object] = {}


def _cache_file() -> Path:
    from db3kd.teacher import cache_root

    return cache_root() / "layout.json"


def _cached(key: str, measure):
    """Value of ``key`` from the in-process memo, the on-disk cache, or ``measure()`` (then stored)."""
    if key in _memo:
        return _memo[key]
    from filelock import FileLock

    path = _cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        table = json.loads(path.read_text()) if path.exists() else {}
        if key not in table:
            table[key] = measure()
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
            os.replace(tmp, path)
    _memo[key] = table[key]
    return table[key]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def model_key(model) -> str:
    """A short id of a model's architecture: class name and a digest of its parameter names and shapes."""
    try:
        state = model.state_dict() if callable(getattr(model, "state_dict", None)) else dict(model.state_dict)
    except Exception:  # a plain callable
        state = {}
    blob = "|".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(state.items()) if hasattr(v, "shape"))
    return f"{type(model).__name__}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def _probe(n: int, image_shape, device) -> torch.Tensor:
    """A constant batch (0.5 everywhere): timing needs no random numbers, so measuring never moves
    the global RNG a seeded run depends on."""
    return torch.full((n, *image_shape), 0.5, device=device)


def _images_per_second(forward, x: torch.Tensor, seconds: float, repeats: int = 2) -> float:
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    best = 0.0
    with torch.inference_mode():
        forward(x)
        sync()
        for _ in range(repeats):
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                forward(x)
                n += x.shape[0]
            sync()
            best = max(best, n / (time.perf_counter() - start))
    return best


def memory_format_name(device, model: nn.Module | None = None, image_shape=None) -> str:
    """``contiguous`` or ``channels_last``: :data:`MEASURED` for this device type, else measured on
    ``model`` (forward at batch 256 of ``image_shape``) and cached; ``DB3KD_MEMORY_FORMAT`` overrides.
    Raises ValueError for an unknown override value."""
    forced = os.environ.get(ENV)
    if forced:
        if forced not in FORMATS:
            raise ValueError(f"{ENV}={forced!r} is not a memory format; valid: {', '.join(FORMATS)}")
        return forced
    device = torch.device(device)
    if device.type in MEASURED:
        return MEASURED[device.type]
    if model is None or image_shape is None:
        return "contiguous"

    def measure() -> str:
        import copy

        rates = {}
        for name, fmt in FORMATS.items():
            m = copy.deepcopy(model).to(device, memory_format=fmt).eval()
            rates[name] = _images_per_second(m, _probe(256, image_shape, device), 0.2)
        return max(rates, key=rates.get)

    key = f"format|{_device_name(device)}|{model_key(model)}|{tuple(image_shape)}|torch {torch.__version__}"
    return _cached(key, measure)


def fast_memory_format(device, model: nn.Module | None = None, image_shape=None) -> torch.memory_format:
    """The ``torch.memory_format`` of :func:`memory_format_name`."""
    return FORMATS[memory_format_name(device, model, image_shape)]


def _is_user_program(model) -> bool:
    return isinstance(model, (torch.jit.ScriptModule, torch.fx.GraphModule)) or not isinstance(model, nn.Module)


def to_fast_layout(model: nn.Module, device="cpu", image_shape=None) -> nn.Module:
    """Move a built-in ``model`` to ``device`` in its fast memory format (in place; returns it).

    TorchScript modules, ``torch.export`` programs and other callables are returned unchanged.
    """
    if _is_user_program(model):
        return model
    return model.to(torch.device(device), memory_format=fast_memory_format(device, model, image_shape))


def oracle_batch_size(model, image_shape, device="cpu", *, candidates=BATCH_CANDIDATES, seconds: float = 0.15) -> int:
    """The batch size (from ``candidates``) at which ``model``'s bare forward pass answers the most
    images per second on ``device``; measured once per (device, :func:`model_key`, image shape, torch
    version, threads) and cached on disk. model: nn.Module, TorchScript, ExportedProgram or callable."""
    from db3kd.oracle import as_callable_model

    device = torch.device(device)
    key = (f"oracle_batch|{_device_name(device)}|{model_key(model)}|{tuple(image_shape)}|torch {torch.__version__}|"
           f"{torch.get_num_threads()} threads")

    def measure() -> int:
        forward = as_callable_model(model)
        if isinstance(forward, nn.Module):
            forward.to(device)
        rates = {bs: _images_per_second(forward, _probe(bs, image_shape, device), seconds)
                 for bs in candidates}
        return int(max(rates, key=rates.get))

    return int(_cached(key, measure))


def resolve_oracle_batch(value, model, image_shape, device="cpu") -> int:
    """An explicit positive int as is; ``"auto"`` (or None) -> :func:`oracle_batch_size`.
    Raises ValueError naming the value otherwise."""
    if value is None or value == "auto":
        return oracle_batch_size(model, image_shape, device)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"oracle_batch must be a positive int or 'auto', got {value!r}")
    return value
