"""Born-Again Networks (Furlanello et al., ICML 2018) as a teacher-free baseline (Table 2).

Generation 0: the student architecture trained with CE. Generation k = 1 .. ``generations``: a
fresh, identically shaped network trained from scratch with KD from generation k - 1:
``L = w_ce * CE(softmax(z_k), y) + w_kd * c * KL(softmax(z_{k-1} / tau) || softmax(z_k / tau))``
(batchmean; ``c = tau^2`` if ``tau_squared``). Defaults follow the BAN paper: the born-again
network only matches its predecessor's output distribution (w_ce = 0, w_kd = 1, tau = 1);
``w_ce = 1`` gives the "BAN + labels" variant. The last generation is the reported student; the
test accuracy of the ensemble of generations 1 .. k (mean of their softmax outputs, BAN's
"BANE") and each generation's accuracies are recorded too (``tables["generations"]``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import nn

from db3kd.context import MethodContext, MethodOutput
from db3kd.registry import register_method

from baselines.common import KDMethod, KDParams


class BANParams(KDParams):
    """generations: born-again generations after the CE generation 0 (default 2); tau, w_ce, w_kd,
    tau_squared: the KD loss (BAN defaults 1, 0, 1, False); aux_epochs: epochs of generations
    0 .. k-1 (None = the student recipe's; 10 at cpu, 3 at smoke); ensemble: also score the ensemble of generations 1 .. k."""

    tau: float = Field(default=1.0, gt=0)
    w_ce: float = Field(default=0.0, ge=0)
    w_kd: float = Field(default=1.0, ge=0)
    generations: int = Field(default=2, ge=1)
    aux_epochs: int | None = Field(default=None, ge=1)
    ensemble: bool = True

    profile_overrides: ClassVar[dict] = {"cpu": {"aux_epochs": 10}, "smoke": {"aux_epochs": 3}}
    search_space: ClassVar[dict] = {**KDParams.search_space, "generations": ("int", 1, 3)}


class ProbabilityEnsemble(nn.Module):
    """Mean of the members' softmax outputs; forward returns its log (float32 (N, L)) as logits."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([torch.softmax(m(x).float(), dim=1) for m in self.members]).mean(0)
        return probs.clamp_min(torch.finfo(torch.float32).tiny).log()


@register_method
class BornAgain(KDMethod):
    """Born-Again Networks: a chain of same-architecture students, each distilled from the previous."""

    name = "ban"
    paper = "Furlanello, Lipton, Tschannen, Itti, Anandkumar, Born-Again Neural Networks, ICML 2018"
    teacher_access = "none"
    Params = BANParams
    paper_results = {"cifar100": 76.84}  # Wang, ICML 2021, Table 2 (ResNet-18)

    def run(self, ctx: MethodContext) -> MethodOutput:
        p = self.params
        models, rows = self.self_distil_chain(ctx, p.generations, aux_epochs=p.aux_epochs, prefix="ban/gen")
        metrics = {f"gen{r['generation']}_val_accuracy": r["val_accuracy"] for r in rows}
        metrics["val_accuracy"] = rows[-1]["val_accuracy"]
        if ctx.evaluate_milestone is not None:
            for row, model in zip(rows, models):
                row["test_accuracy"] = ctx.evaluate_milestone(model)
            if p.ensemble and len(models) > 2:
                metrics["ensemble_test_accuracy"] = ctx.evaluate_milestone(ProbabilityEnsemble(models[1:]))
        ctx.log(dict(metrics), None)
        return MethodOutput(student=models[-1], metrics=metrics, tables={"generations": rows})
