"""Belief matching near decision boundaries: transition curves and the mean transition error.

Micaelli & Storkey, "Zero-shot Knowledge Transfer via Adversarial Belief Matching", NeurIPS 2019,
Sec. 4.4 (REFERENCE section 6). A reusable evaluation for any student:

* take up to ``n`` images on which student and teacher predict the same class ``i``;
* for every other class ``j``, take K plain gradient steps on the input
  ``x <- x - xi * d CE(student(x), j) / dx`` (xi = 1, no clipping, no sign, no normalisation);
* record ``p_j`` of the student and of the teacher at every step (step 0 = the clean image);
* mean transition error ``MTE = mean over images, classes j and steps k < K of |p_j^s - p_j^t|``
  (the K points at which a gradient is taken, as in the authors' code; the curves also hold
  step K).

The teacher may be a module (white box), a :class:`~db3kd.oracle.ScoreOracle` (its answers are
``p``) or a :class:`~db3kd.oracle.HardLabelOracle`. A label-only teacher has no ``p_j``: the
result then holds the student-side curve, the fraction of walks the teacher labels ``j`` at each
step and the step at which the teacher's label first leaves the source class ("flips"), with
``teacher_kind = "labels"`` and ``mte = nan``. An oracle counts every image it answers: the
evaluation costs ``n * (L - 1) * (K + 1)`` queries, and an oracle only accepts [0, 1] images, so
it is asked about ``clamp(x, 0, 1)`` while the walk itself stays unclipped (``clip=False``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["transition_curves", "agreeing_indices"]


def _teacher_kind(teacher) -> str:
    from db3kd.oracle import HardLabelOracle, ScoreOracle

    if isinstance(teacher, HardLabelOracle):
        return "labels"
    if isinstance(teacher, ScoreOracle):
        return "scores"
    if callable(teacher):
        return "module"
    raise TypeError(f"teacher must be a module, a callable, a ScoreOracle or a HardLabelOracle, got {type(teacher)!r}")


def _as_float(x: torch.Tensor, device) -> torch.Tensor:
    x = x.to(device)
    return x.float().div(255.0) if x.dtype == torch.uint8 else x.float()


class _Teacher:
    """Uniform view of the three teacher kinds: ``probs(x)`` (module / scores) or ``labels(x)``."""

    def __init__(self, teacher, kind: str, num_classes: int):
        self.teacher, self.kind, self.num_classes = teacher, kind, num_classes

    def _oracle_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach().clamp(0.0, 1.0)

    def answer(self, x: torch.Tensor) -> torch.Tensor:
        """float (B, L) probabilities for module / scores, int64 (B,) labels for a label oracle."""
        with torch.no_grad():
            if self.kind == "module":
                return torch.softmax(self.teacher(x.detach()).float(), dim=1)
            out = self.teacher(self._oracle_input(x))
            return out.to(x.device) if self.kind == "labels" else out.float().to(x.device)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        ans = self.answer(x)
        return ans if self.kind == "labels" else ans.argmax(1)


def agreeing_indices(student: nn.Module, teacher, x: torch.Tensor, y: torch.Tensor | None = None, *,
                     n: int | None = None, device="cpu", batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (int64, in the order of ``x``) of the first ``n`` images on which student and teacher
    predict the same class (and that class is ``y`` when ``y`` is given), and that class.

    An oracle teacher is asked once per image scanned (counted).
    """
    kind = _teacher_kind(teacher)
    view = _Teacher(teacher, kind, 0)
    keep_idx, keep_cls = [], []
    found = 0
    was_training = student.training
    student.eval()
    try:
        for start in range(0, x.shape[0], batch_size):
            if n is not None and found >= n:
                break
            xb = _as_float(x[start : start + batch_size], device)
            with torch.no_grad():
                s = student(xb).argmax(1)
            t = view.predict(xb)
            ok = s == t
            if y is not None:
                ok &= s == y[start : start + batch_size].to(s.device)
            idx = ok.nonzero().squeeze(1)
            keep_idx.append(idx.cpu() + start)
            keep_cls.append(s[idx].cpu())
            found += idx.numel()
    finally:
        student.train(was_training)
    idx = torch.cat(keep_idx) if keep_idx else torch.empty(0, dtype=torch.int64)
    cls = torch.cat(keep_cls) if keep_cls else torch.empty(0, dtype=torch.int64)
    if n is not None:
        idx, cls = idx[:n], cls[:n]
    return idx, cls


def _first_step(hit: torch.Tensor) -> torch.Tensor:
    """hit bool (P, K+1) -> float (P,) first step index where hit is True, NaN where never."""
    steps = hit.shape[1]
    first = torch.where(hit, torch.arange(steps, device=hit.device).expand_as(hit), steps).min(1).values.float()
    first[first == steps] = float("nan")
    return first


def _nanmean(t: torch.Tensor) -> float:
    t = t[~torch.isnan(t)]
    return float(t.mean()) if t.numel() else float("nan")


def transition_curves(
    student: nn.Module,
    teacher,
    x: torch.Tensor,
    y: torch.Tensor | None,
    num_classes: int,
    *,
    steps: int = 100,
    xi: float = 1.0,
    n: int | None = 1000,
    clip: bool = False,
    device: str | torch.device = "cpu",
    batch_size: int = 1024,
) -> dict[str, Any]:
    """Transition curves of ``student`` against ``teacher`` (module, ScoreOracle or HardLabelOracle).

    x: images uint8 or float in [0, 1] (N, C, H, W) -- use a validation or test split, never the
    training data of the student; the first ``n`` images (in the order given) on which student and
    teacher agree are used. y: int64 (N,) labels or None; when given, an image is kept only if both
    networks predict ``y`` (its source class is then ``y``). steps: K; xi: step size of
    ``x <- x - xi * grad_x CE(student(x), j)``; clip: clamp the walk to [0, 1] after every step
    (off in the paper). batch_size: (image, j) walks processed at once (the CE is summed, so every
    walk gets its own gradient).

    Returns a dict:

    * ``curves``: float (K+1,) the student's mean ``p_j`` at steps 0..K (over images and j);
    * ``mte``: the mean transition error over steps 0..K-1 (NaN for a label-only teacher);
    * ``teacher_kind``: ``"module"``, ``"scores"`` or ``"labels"``;
    * ``teacher_curve``: float (K+1,) the teacher's mean ``p_j`` (module / scores) or, for a label
      teacher, the fraction of walks it labels ``j`` at each step;
    * ``error_curve``: float (K+1,) mean ``|p_j^s - p_j^t|`` per step (NaN for labels);
    * ``student_pj``, ``teacher_pj``: float (P, K+1) per walk (P = images x (L-1)); for labels
      ``teacher_pj`` holds 1.0 where the teacher says j, else 0.0;
    * ``teacher_flip_step``, ``student_flip_step``: mean first step at which the network's label
      leaves the source class (over walks that flip), ``teacher_flip_rate``, ``student_flip_rate``:
      fraction of walks that flip within K steps; ``teacher_to_j_step``, ``student_to_j_step``:
      mean first step at which the label is j;
    * ``n_images``, ``n_walks``, ``steps``, ``xi``, ``queries`` (images the oracle answered, 0 for
      a module), ``note`` (a sentence saying what the numbers are).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    device = torch.device(device)
    kind = _teacher_kind(teacher)
    view = _Teacher(teacher, kind, num_classes)
    q0 = int(getattr(teacher, "queries", 0) or 0)
    restore = []
    for m in (student, teacher):
        if isinstance(m, nn.Module):
            restore.append((m, m.training))
            m.eval()
    try:
        idx, src = agreeing_indices(student, teacher, x, y, n=n, device=device)
        images = _as_float(x[idx], "cpu") if idx.numel() else torch.empty((0,) + tuple(x.shape[1:]))
        # every (image, j != source) pair is one walk
        others = torch.arange(num_classes).expand(idx.numel(), num_classes)
        mask = others != src.unsqueeze(1)
        walk_img = torch.arange(idx.numel()).unsqueeze(1).expand(-1, num_classes)[mask]
        walk_j = others[mask]
        walk_src = src.unsqueeze(1).expand(-1, num_classes)[mask]
        p_count = walk_j.numel()
        student_pj = torch.zeros(p_count, steps + 1)
        teacher_pj = torch.zeros(p_count, steps + 1)
        s_label = torch.zeros(p_count, steps + 1, dtype=torch.int64)
        t_label = torch.zeros(p_count, steps + 1, dtype=torch.int64)
        for start in range(0, p_count, batch_size):
            sl = slice(start, start + batch_size)
            j = walk_j[sl].to(device)
            xa = images[walk_img[sl]].to(device)
            rows = torch.arange(j.numel(), device=device)
            for k in range(steps + 1):
                xa = xa.detach().requires_grad_(k < steps)
                with torch.set_grad_enabled(k < steps):
                    logits = student(xa).float()
                p_s = torch.softmax(logits.detach(), dim=1)
                student_pj[sl, k] = p_s[rows, j].cpu()
                s_label[sl, k] = p_s.argmax(1).cpu()
                ans = view.answer(xa)
                if kind == "labels":
                    t_label[sl, k] = ans.cpu()
                    teacher_pj[sl, k] = (ans == j).float().cpu()
                else:
                    teacher_pj[sl, k] = ans[rows, j].cpu()
                    t_label[sl, k] = ans.argmax(1).cpu()
                if k < steps:
                    loss = F.cross_entropy(logits, j, reduction="sum")
                    (grad,) = torch.autograd.grad(loss, xa)
                    xa = xa.detach() - xi * grad
                    if clip:
                        xa = xa.clamp(0.0, 1.0)
    finally:
        for m, flag in restore:
            m.train(flag)

    src_col = walk_src.unsqueeze(1)
    j_col = walk_j.unsqueeze(1)
    labels_only = kind == "labels"
    diff = (student_pj - teacher_pj).abs()
    nan_curve = torch.full((steps + 1,), float("nan"))
    empty = p_count == 0
    result: dict[str, Any] = {
        "curves": nan_curve.clone() if empty else student_pj.mean(0),
        "teacher_curve": nan_curve.clone() if empty else teacher_pj.mean(0),
        "error_curve": nan_curve.clone() if (empty or labels_only) else diff.mean(0),
        "mte": float("nan") if (empty or labels_only) else float(diff[:, :steps].mean()),
        "teacher_kind": kind,
        "student_pj": student_pj,
        "teacher_pj": teacher_pj,
        "teacher_flip_step": _nanmean(_first_step(t_label != src_col)),
        "student_flip_step": _nanmean(_first_step(s_label != src_col)),
        "teacher_flip_rate": float("nan") if empty else float((t_label != src_col).any(1).float().mean()),
        "student_flip_rate": float("nan") if empty else float((s_label != src_col).any(1).float().mean()),
        "teacher_to_j_step": _nanmean(_first_step(t_label == j_col)),
        "student_to_j_step": _nanmean(_first_step(s_label == j_col)),
        "n_images": int(idx.numel()),
        "n_walks": int(p_count),
        "steps": int(steps),
        "xi": float(xi),
        "queries": int(getattr(teacher, "queries", 0) or 0) - q0,
    }
    if labels_only:
        result["note"] = (
            "label-only teacher: no teacher probabilities, so no MTE; 'curves' is the student's mean p_j, "
            "'teacher_curve' the fraction of walks the teacher labels j, and 'teacher_flip_step' the mean step "
            "at which the teacher's label leaves the source class (the oracle saw clamp(x, 0, 1))"
        )
    else:
        result["note"] = f"MTE = mean |p_j^student - p_j^teacher| over {p_count} walks and steps 0..{steps - 1}"
    return result
