"""Reference rows of Table 1 / Table 2: the teacher and the student architectures trained with CE.

Both train a fresh model on the method's training data (``ctx.train_x``, the profile's subset)
with ``L = CE(softmax(z), y)`` and never touch the real teacher (access ``none``). They lead the
leaderboard (``reference_row = True``).

``teacher-ce`` is the run's teacher itself (access ``white_box``: it is handed the module and
returns it unchanged): one teacher per (dataset, profile), trained once with its own
``teacher_seed`` on the whole training split with the teacher recipe (``config.teacher``) and
shared by every method and seed, so this row is exactly the teacher every other row distils
from (the paper's Teacher CE). ``teacher-arch-ce`` is the other reading: the teacher's
architecture trained here with the student's recipe and data, isolating what the larger
architecture buys.
"""

from __future__ import annotations

from torch import nn

from db3kd.context import MethodContext, MethodOutput
from db3kd.registry import Method, MethodParams, register_method

from baselines.common import ce_objective, final_val_accuracy, train_ce

PAPER = "Wang, Zero-Shot Knowledge Distillation from a Decision-Based Black-Box Model, ICML 2021 (Tables 1-2, CE rows)"


class TeacherCEParams(MethodParams):
    """No hyperparameters: the row is the shared teacher (its recipe is the run's ``config.teacher``)."""


class _Callable(nn.Module):
    """An nn.Module around a callable teacher (a user's exported program), so it can be evaluated."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@register_method
class TeacherCE(Method):
    """Teacher CE: the shared teacher, trained with cross-entropy on the full training split."""

    name = "teacher-ce"
    paper = PAPER
    teacher_access = "white_box"
    data = "full"
    reference_row = True
    needs_teacher_recipe = True  # the teacher's architecture (and recipe): unknown for a user's teacher file
    Params = TeacherCEParams
    paper_results = {"mnist": 99.33, "fmnist": 91.63, "cifar10": 79.30, "flowers102": 95.07, "cifar100": 78.63}
    objective = staticmethod(ce_objective)  # how the teacher was trained (db3kd.teacher.get_teacher)

    def run(self, ctx: MethodContext) -> MethodOutput:
        from db3kd.training import evaluate

        teacher = ctx.teacher if isinstance(ctx.teacher, nn.Module) else _Callable(ctx.teacher)
        return MethodOutput(student=teacher, metrics={"val_accuracy": evaluate(teacher, ctx.val_x, ctx.val_y,
                                                                                device=ctx.device)})


class TeacherArchCEParams(MethodParams):
    """No hyperparameters: the teacher architecture with the student recipe of the run configuration."""


@register_method
class TeacherArchCE(Method):
    """The teacher architecture trained from scratch with cross-entropy and the student's recipe and data."""

    name = "teacher-arch-ce"
    paper = "db3kd suite reference row (not in Wang, ICML 2021): the teacher architecture with the student recipe"
    teacher_access = "none"
    needs_teacher_recipe = True  # the teacher's architecture: unknown for a user's teacher file
    data = "full"
    reference_row = True
    Params = TeacherArchCEParams
    objective = staticmethod(ce_objective)

    def run(self, ctx: MethodContext) -> MethodOutput:
        model, history = train_ce(ctx, ctx.config.teacher.arch, desc="teacher-arch-ce")
        return MethodOutput(student=model, metrics={"val_accuracy": final_val_accuracy(history)})


class StudentCEParams(MethodParams):
    """No hyperparameters: the student recipe of the run configuration."""


@register_method
class StudentCE(Method):
    """Student CE: the student architecture trained from scratch with cross-entropy."""

    name = "student-ce"
    paper = PAPER
    teacher_access = "none"
    data = "full"
    reference_row = True
    Params = StudentCEParams
    paper_results = {"mnist": 99.11, "fmnist": 90.21, "cifar10": 77.28, "flowers102": 92.18, "cifar100": 75.91}
    objective = staticmethod(ce_objective)

    def run(self, ctx: MethodContext) -> MethodOutput:
        model, history = train_ce(ctx, desc="student")
        return MethodOutput(student=model, metrics={"val_accuracy": final_val_accuracy(history)})
