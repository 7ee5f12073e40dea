"""Label-smoothing control (issue 18 item 4): cross-entropy against uniformly smoothed labels.

Every Eq. 6-7 soft label puts most of its mass on the true class and spreads the rest over the
others; this row tells whether DB3KD's soft labels carry more than that smoothing. The target
of a sample of class y is ``q = (1 - epsilon) * onehot(y) + epsilon / L`` (Szegedy et al. 2016,
Sec. 7) and the loss ``-mean_b sum_l q[b, l] log softmax(z_b)[l]``, computed by
``torch.nn.functional.cross_entropy(..., label_smoothing=epsilon)``. Never touches the teacher.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from db3kd.context import MethodContext, MethodOutput
from db3kd.registry import Method, MethodParams, register_method

from baselines.common import final_val_accuracy

SZEGEDY = ("Szegedy, Vanhoucke, Ioffe, Shlens, Wojna, Rethinking the Inception Architecture for Computer Vision, "
           "CVPR 2016 (Sec. 7, label-smoothing regularization)")


class LabelSmoothingParams(MethodParams):
    """epsilon: mass spread uniformly over all L classes (the true class keeps ``1 - epsilon + epsilon / L``);
    default 0.1 (Szegedy et al. 2016). Search space for tuning on the validation split:
    ``epsilon`` uniform in [0.0, 0.5] (``search_space``, in :mod:`db3kd.tuning`'s spec format)."""

    epsilon: float = Field(default=0.1, ge=0.0, lt=1.0)

    search_space: ClassVar[dict[str, tuple]] = {"epsilon": ("float", 0.0, 0.5)}


def smoothed_ce(logits: torch.Tensor, y: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``-mean_b sum_l q[b, l] log softmax(z_b)[l]`` with ``q = (1 - epsilon) onehot(y) + epsilon / L``.

    logits: float (B, L); y: int64 (B,); epsilon in [0, 1). Returns a scalar (``epsilon = 0`` is plain CE).
    """
    return F.cross_entropy(logits, y, label_smoothing=epsilon)


@register_method
class LabelSmoothing(Method):
    """Label smoothing: the student trained with cross-entropy against uniformly smoothed labels."""

    name = "label-smoothing"
    paper = SZEGEDY
    teacher_access = "none"
    data = "full"
    Params = LabelSmoothingParams
    paper_results: ClassVar[dict[str, float]] = {}

    def objective(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The student loss: :func:`smoothed_ce` at ``params.epsilon``."""
        return smoothed_ce(logits, y, self.params.epsilon)

    def run(self, ctx: MethodContext) -> MethodOutput:
        y = ctx.train_y.to(ctx.device)
        student = ctx.new_model()
        history = ctx.train(student, lambda logits, _xb, idx: self.objective(logits, y[idx]), desc="student")
        return MethodOutput(student=student, metrics={"val_accuracy": final_val_accuracy(history)})
