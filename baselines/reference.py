"""Reference rows of Table 1 / Table 2: the teacher and the student architectures trained with CE.

Both train a fresh model on the method's training data (``ctx.train_x``, the profile's subset)
with ``L = CE(softmax(z), y)`` and never touch the real teacher (access ``none``). They lead the
leaderboard (``reference_row = True``).

``teacher-ce`` recipe: ``recipe="teacher"`` (paper profile default) trains with the teacher stage
recipe (epochs, batch, optimiser, lr schedule of ``config.teacher``), as the paper's Teacher CE
row is the teacher trained its own way. The reduced ``cpu`` / ``smoke`` profiles shrink the teacher
stage to a few passes over the *full* split; on the method's small subset that would be a few
dozen steps, so there ``recipe="student"``: the same data, steps and optimiser as ``student-ce``,
the row then isolating what the larger architecture buys.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from db3kd.context import MethodContext, MethodOutput
from db3kd.registry import Method, MethodParams, register_method

from baselines.common import ce_objective, final_val_accuracy, train_ce

PAPER = "Wang, Zero-Shot Knowledge Distillation from a Decision-Based Black-Box Model, ICML 2021 (Tables 1-2, CE rows)"


class TeacherCEParams(MethodParams):
    """recipe: ``teacher`` (the teacher stage's optimisation recipe) or ``student`` (the student's)."""

    recipe: Literal["teacher", "student"] = "teacher"

    profile_overrides: ClassVar[dict] = {"cpu": {"recipe": "student"}, "smoke": {"recipe": "student"}}


@register_method
class TeacherCE(Method):
    """Teacher CE: the teacher architecture trained from scratch with cross-entropy."""

    name = "teacher-ce"
    paper = PAPER
    teacher_access = "none"
    data = "full"
    reference_row = True
    needs_teacher_recipe = True  # the teacher's architecture (and recipe): unknown for a user's teacher file
    Params = TeacherCEParams
    paper_results = {"mnist": 99.33, "fmnist": 91.63, "cifar10": 79.30, "flowers102": 95.07, "cifar100": 78.63}
    objective = staticmethod(ce_objective)

    def run(self, ctx: MethodContext) -> MethodOutput:
        stage = ctx.config.teacher if self.params.recipe == "teacher" else None
        model, history = train_ce(ctx, ctx.config.teacher.arch, stage=stage, desc="teacher-ce")
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
