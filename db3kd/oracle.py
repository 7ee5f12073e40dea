"""The oracle: the only door to a black-box teacher.

A decision-based black-box (DB3) teacher ``F_t^B(x) = l`` answers an image with its top-1 label and
nothing else (paper Sec. 3.2). :class:`HardLabelOracle` wraps any classifier so that exactly that is
reachable: it validates the input, counts every image it answers (one query = one image), enforces
a query budget *before* running a call that would exceed it, and runs the teacher in
``batch_size`` chunks under :func:`torch.inference_mode`.

:class:`ScoreOracle` is the same door for score-based black-box teachers (standard KD, FS-BBT): it
answers with the teacher's probability vector and counts queries the same way.

The wrapped model is kept in a closure, not in an attribute: nothing in the oracle's public API
returns the module, its parameters or its logits.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from db3kd.errors import DB3KDError, QueryBudgetExceeded

__all__ = ["HardLabelOracle", "ScoreOracle", "QueryBudgetExceeded", "TeacherOutputError", "as_callable_model",
           "check_teacher_output"]


class TeacherOutputError(DB3KDError, ValueError):
    """The teacher returned something that is not float logits (N, num_classes) with finite values."""


def check_teacher_output(out, n: int, num_classes: int, name: str = "teacher") -> None:
    """Raise :class:`TeacherOutputError` (one line naming ``name`` and what it returned) unless
    ``out`` is a floating-point tensor of shape (n, num_classes) with finite values."""
    if not isinstance(out, torch.Tensor):
        raise TeacherOutputError(f"{name} returned a {type(out).__name__}, not a tensor of logits of shape "
                                 f"({n}, {num_classes})")
    if out.dim() != 2 or out.shape[0] != n:
        raise TeacherOutputError(f"{name} returned shape {tuple(out.shape)} for {n} images; expected logits of shape "
                                 f"({n}, {num_classes})")
    if out.shape[1] != num_classes:
        raise TeacherOutputError(f"{name} returned {out.shape[1]} logits per image, but the dataset has {num_classes} "
                                 f"classes (output shape {tuple(out.shape)})")
    if not out.is_floating_point():
        raise TeacherOutputError(f"{name} returned {out.dtype} outputs; the oracle needs floating-point logits "
                                 f"(e.g. {out.flatten()[:3].tolist()} ...)")
    finite = torch.isfinite(out)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        kinds = ", ".join(k for k, m in (("NaN", torch.isnan(out)), ("inf", torch.isinf(out))) if bool(m.any()))
        raise TeacherOutputError(f"{name} returned non-finite logits ({kinds} in {bad} of {out.numel()} values for "
                                 f"{n} images)")


def as_callable_model(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return a callable ``f(x) -> logits`` for an ``nn.Module``, a TorchScript module or a
    ``torch.export.ExportedProgram``; raises TypeError for anything else that is not callable."""
    exported = getattr(torch, "export", None)
    if exported is not None and isinstance(model, getattr(exported, "ExportedProgram", ())):
        model = model.module()
    if isinstance(model, nn.Module):
        try:
            model.eval()
        except (NotImplementedError, RuntimeError):  # exported GraphModules refuse .eval()
            pass
        return model
    if callable(model):
        return model
    raise TypeError(f"teacher must be an nn.Module, TorchScript module, ExportedProgram or callable, got {type(model)!r}")


def _validate(x, input_shape: tuple[int, ...] | None) -> None:
    """Raise ValueError naming what is wrong with a query batch ``x`` (shape, dtype, NaN/inf, range)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"oracle input must be a torch.Tensor of shape (N, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"oracle input must have rank 4 (N, C, H, W), got rank {x.dim()} with shape {tuple(x.shape)}")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(
            f"oracle input has image shape {tuple(x.shape[1:])}, the teacher expects {tuple(input_shape)} (C, H, W)"
        )
    if not x.is_floating_point():
        raise ValueError(f"oracle input must be a floating-point tensor with values in [0, 1], got dtype {x.dtype}")
    if x.numel() == 0:
        return
    lo, hi = torch.aminmax(x)
    lo, hi = float(lo), float(hi)
    if lo >= 0.0 and hi <= 1.0:  # NaN fails both comparisons, so it falls through
        return
    if torch.isnan(x).any():
        raise ValueError(f"oracle input contains NaN ({int(torch.isnan(x).sum())} values)")
    if torch.isinf(x).any():
        raise ValueError(f"oracle input contains inf ({int(torch.isinf(x).sum())} values)")
    raise ValueError(f"oracle input values must lie in [0, 1], got min {lo:.6g} and max {hi:.6g}")


class _Oracle:
    """Shared machinery: validation, budget, counting, batching. Subclasses say what an answer is."""

    def __init__(
        self,
        model,
        budget: int | None = None,
        batch_size: int = 4096,
        device: str | torch.device = "cpu",
        input_shape: Sequence[int] | None = None,
        *,
        num_classes: int | None = None,
        input_norm: tuple[Sequence[float], Sequence[float]] | None = None,
        name: str = "teacher",
        on_answer: Callable[[int], None] | None = None,
    ):
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            raise ValueError(f"budget must be None or a non-negative int, got {budget!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self._budget = budget
        self._batch_size = batch_size
        self._device = torch.device(device)
        self._input_shape = tuple(input_shape) if input_shape is not None else None
        self._queries = 0
        self._on_answer = on_answer  # told the size of every call sent (db3kd.distributed's query ledger)
        forward = as_callable_model(model)
        if isinstance(forward, nn.Module):
            forward.to(self._device)
        answer = self._answer_fn
        if input_norm is not None:  # the teacher sees (x - mean) / std; queries stay in [0, 1] pixel units
            mean, std = (torch.as_tensor(v, dtype=torch.float32, device=self._device).view(1, -1, 1, 1)
                         for v in input_norm)
            raw = forward

            def forward(chunk, raw=raw, mean=mean, std=std):
                return raw((chunk - mean) / std)

        def run_chunk(chunk: torch.Tensor) -> torch.Tensor:
            out = forward(chunk)
            if num_classes is not None:  # an untrusted (user's) teacher: check every answer before using it
                check_teacher_output(out, chunk.shape[0], num_classes, name)
            return answer(out)

        self._run_chunk = run_chunk  # the model lives only in this closure

    # subclasses map logits -> answer
    @staticmethod
    def _answer_fn(logits: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _empty(self, n: int, ref: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def queries(self) -> int:
        """int: images answered so far (one query = one image)."""
        return self._queries

    @property
    def budget(self) -> int | None:
        """int or None: the most queries this oracle will ever answer (None = unlimited)."""
        return self._budget

    @property
    def remaining(self) -> int | None:
        """int or None: queries left before the budget is spent."""
        return None if self._budget is None else self._budget - self._queries

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Answer every image of ``x``.

        x: float tensor (N, C, H, W) with values in [0, 1]. Raises ValueError for bad input and
        QueryBudgetExceeded (before anything runs or is counted) when N queries would exceed the budget.
        """
        _validate(x, self._input_shape)
        return self._answer_trusted(x)

    def _answer_trusted(self, x: torch.Tensor) -> torch.Tensor:
        """The query engine's own door (:func:`db3kd.search.query`): x float32 (N, C, H, W) that the
        engine built inside [0, 1] with the teacher's image shape, already on the oracle's device.
        Skips validation (its device-to-host sync) and nothing else: every image is counted and
        the budget is enforced before anything runs, as in ``__call__``."""
        n = int(x.shape[0])
        if self._budget is not None and self._queries + n > self._budget:
            raise QueryBudgetExceeded(self._budget, self._queries, n)
        if self._on_answer is not None and n:
            self._on_answer(n)  # before the teacher runs: a call cut short was still sent (and billed)
        out = None
        with torch.inference_mode():
            if 0 < n <= self._batch_size:  # one forward call: no output buffer to fill
                out = self._run_chunk(x.to(self._device, non_blocking=True)).to(x.device)
            for start in range(0, n if out is None else 0, self._batch_size):
                chunk = x[start : start + self._batch_size].to(self._device, non_blocking=True)
                ans = self._run_chunk(chunk)
                if out is None:
                    out = self._empty(n, ans).to(x.device)
                out[start : start + len(ans)] = ans.to(x.device)
        if out is None:
            out = self._empty(0, torch.empty(0, device=x.device))
        self._queries += n
        return out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(queries={self._queries}, budget={self._budget}, "
            f"batch_size={self._batch_size}, device={str(self._device)!r})"
        )


class HardLabelOracle(_Oracle):
    """Decision-based black-box teacher: answers top-1 labels only (paper Sec. 3.2, ``F_t^B(x) = l``).

    model: ``nn.Module``, TorchScript module, ``torch.export.ExportedProgram`` or callable mapping
    float32 (N, C, H, W) in [0, 1] to logits (N, L). budget: None (unlimited) or the most images it
    will answer. batch_size: images per forward call. device: where the teacher runs.
    input_shape: optional (C, H, W) that every query must have. num_classes: when given (a user's
    teacher), every forward's output must be finite float logits (N, num_classes), else
    :class:`TeacherOutputError` naming ``name``, raised before the batch is counted. input_norm:
    optional (mean, std), one value or one per channel: the teacher is fed ``(x - mean) / std``
    while queries, distances and budgets stay in [0, 1] pixel units. on_answer: optional callable
    told the number of images of every call sent to the teacher, after validation and the budget
    check and before the forward pass (e.g. a query ledger on disk).

    ``oracle(x)`` with x float (N, C, H, W) in [0, 1] returns int64 (N,) on x's device; raises
    ValueError for bad input and QueryBudgetExceeded before a call that would exceed the budget.
    ``oracle.queries`` counts the images answered.
    """

    access = "labels"

    @staticmethod
    def _answer_fn(logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=1)

    def _empty(self, n: int, ref: torch.Tensor) -> torch.Tensor:
        return torch.empty(n, dtype=torch.int64, device=ref.device)


class ScoreOracle(_Oracle):
    """Score-based black-box teacher: answers the probability vector ``softmax(logits)``.

    Same arguments, validation, counting and budget as :class:`HardLabelOracle`; ``oracle(x)``
    returns float32 (N, L) probabilities whose rows sum to 1.
    """

    access = "scores"

    @staticmethod
    def _answer_fn(logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=1)

    def _empty(self, n: int, ref: torch.Tensor) -> torch.Tensor:
        return torch.empty((n,) + tuple(ref.shape[1:]), dtype=torch.float32, device=ref.device)
