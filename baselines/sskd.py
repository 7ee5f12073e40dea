"""SSKD: Knowledge Distillation Meets Self-Supervision (Xu, Liu, Li, Loy, ECCV 2020), Table 2.

Every image is used in 4 rotations (0, 90, 180, 270 degrees); a batch of B images becomes 4B
views laid out image-major (rows 4i .. 4i+3 are image i at 0/90/180/270), the first of each four
being the "normal" view and the other three the "rotated" views.

Stage 0 (this suite): the teacher is *self-trained*: a same-architecture network (the student's,
or ``teacher_arch="teacher"`` for the teacher architecture) trained with CE on the method's data.
The real teacher is never touched (access ``none``): SSKD needs the teacher's features, which a
black-box teacher does not give, so the row is a self-distillation baseline.

Stage 1: a 2-layer projection head ``Linear(D, D) -> ReLU -> Linear(D, D)`` on the frozen
teacher's penultimate features (:class:`baselines.features.FeatureTap`) is trained with the
contrastive task: ``S[j, i] = cos(h(rotated view j), h(normal view of image i))`` (3B x B), target of
row j = its own source image ``j // 3``, loss ``CE(S, target)`` (no temperature, as the released
code). SGD lr 0.05, momentum 0.9, weight decay 5e-4, 60 epochs, lr x0.1 at 30 and 45.

Stage 2: a fresh student with its own projection head, trained on all 4B views with
``L = w_ce CE(z_s^nor, y) + w_kd tau^2 KL(p_t^nor || p_s^nor) + w_tf tau^2 KL(p_t^rot || p_s^rot)
+ w_ss tau_ss^2 KL(softmax(S_t / tau_ss) || softmax(S_s / tau_ss))`` with 0.1, 0.9, 2.7, 10, tau = 4,
tau_ss = 0.5, KL batchmean over the kept rows. Filtering ("error-level ranking"): rows are sorted
by the rank the teacher gives to the correct answer (the class label for the rotated-view KD
term, the source image for the similarity term); all correctly ranked rows are kept plus the
best-ranked ``keep_wrong`` fraction of the wrong ones (1.0 for the KD term, 0.75 for the
similarity term).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from db3kd.context import MethodContext, MethodOutput
from db3kd.errors import ConfigError
from db3kd.losses import kl_to_targets
from db3kd.registry import Method, MethodParams, register_method

from baselines.common import AUX_SEED_OFFSET, final_val_accuracy, train_ce
from baselines.features import FeatureTap

__all__ = ["VIEWS", "rotations", "view_similarity", "keep_ranked", "head_loss", "sskd_loss", "ProjectedModel", "SSKD"]

VIEWS = 4


def rotations(x: torch.Tensor) -> torch.Tensor:
    """float (B, C, H, W) with H == W -> (4B, C, H, W): image i at 0/90/180/270 degrees in rows 4i .. 4i+3."""
    return torch.stack([torch.rot90(x, k, dims=(2, 3)) for k in range(VIEWS)], dim=1).flatten(0, 1)


def _split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(4B, ...) image-major views -> (normal (B, ...), rotated (3B, ...) image-major)."""
    v = t.reshape(-1, VIEWS, *t.shape[1:])
    return v[:, 0], v[:, 1:].flatten(0, 1)


def view_similarity(proj: torch.Tensor) -> torch.Tensor:
    """Cosine similarities float (3B, B) of each rotated view's projection (rows, image-major)
    against every normal view's projection (columns). proj: float (4B, D) image-major."""
    normal, rotated = _split(proj)
    return F.cosine_similarity(rotated.unsqueeze(1), normal.unsqueeze(0), dim=2)


def _source_image(b: int, device=None) -> torch.Tensor:
    """int64 (3B,): the source image of each rotated view, ``j // 3``."""
    return torch.arange(b, device=device).repeat_interleave(VIEWS - 1)


def keep_ranked(scores: torch.Tensor, target: torch.Tensor, keep_wrong: float) -> torch.Tensor:
    """SSKD's error-level filter: sorted int64 indices of the rows to keep.

    scores: float (R, K), higher = more likely; target: int64 (R,) the correct column of each row.
    A row is correct when its target has rank 0; all correct rows are kept plus the first
    ``int(wrong * keep_wrong)`` wrong rows in order of the target's rank (best first, ties by row).
    """
    order = scores.argsort(dim=1, descending=True)
    rank = (order == target.unsqueeze(1)).long().argmax(dim=1)
    wrong = int((rank != 0).sum())
    keep = rank.argsort(stable=True)[: rank.numel() - wrong + int(wrong * keep_wrong)]
    return keep.sort().values


def head_loss(proj: torch.Tensor) -> torch.Tensor:
    """Stage-1 contrastive loss ``CE(S, j // 3)`` with S = :func:`view_similarity` (3B, B). proj: (4B, D)."""
    sim = view_similarity(proj)
    return F.cross_entropy(sim, _source_image(sim.shape[1], sim.device))


def _kl_rows(s: torch.Tensor, t: torch.Tensor, tau: float, rows: torch.Tensor) -> torch.Tensor:
    """tau^2 * KL(softmax(t / tau) || softmax(s / tau)) over the kept ``rows`` (batchmean); 0 if none."""
    if rows.numel() == 0:
        return s.sum() * 0.0
    return kl_to_targets(s[rows], torch.softmax(t[rows] / tau, dim=1), tau) * tau * tau


def sskd_loss(
    s_logits: torch.Tensor,
    s_proj: torch.Tensor,
    t_logits: torch.Tensor,
    t_proj: torch.Tensor,
    y: torch.Tensor,
    *,
    w_ce: float = 0.1,
    w_kd: float = 0.9,
    w_tf: float = 2.7,
    w_ss: float = 10.0,
    kd_tau: float = 4.0,
    ss_tau: float = 0.5,
    keep_wrong_tf: float = 1.0,
    keep_wrong_ss: float = 0.75,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SSKD stage-2 student loss (see the module docstring).

    s_logits, t_logits: float (4B, L); s_proj, t_proj: float (4B, D) (image-major views); y: int64
    (B,) labels of the source images. Teacher tensors are treated as constants. Returns (scalar
    loss, {"ce", "kd", "tf", "ss": term values, "kept_tf", "kept_ss": fractions of rotated rows kept}).
    """
    t_logits, t_proj = t_logits.detach(), t_proj.detach()
    s_nor, s_rot = _split(s_logits)
    t_nor, t_rot = _split(t_logits)
    b = y.shape[0]
    ce = F.cross_entropy(s_nor, y)
    kd = _kl_rows(s_nor, t_nor, kd_tau, torch.arange(b, device=y.device))
    keep_tf = keep_ranked(t_rot, y.repeat_interleave(VIEWS - 1), keep_wrong_tf)
    tf = _kl_rows(s_rot, t_rot, kd_tau, keep_tf)
    s_sim, t_sim = view_similarity(s_proj), view_similarity(t_proj)
    keep_ss = keep_ranked(t_sim, _source_image(b, y.device), keep_wrong_ss)
    ss = _kl_rows(s_sim, t_sim, ss_tau, keep_ss)
    total = w_ce * ce + w_kd * kd + w_tf * tf + w_ss * ss
    rows = (VIEWS - 1) * b
    parts = {key: float(value.detach()) for key, value in (("ce", ce), ("kd", kd), ("tf", tf), ("ss", ss))}
    parts.update(kept_tf=keep_tf.numel() / rows, kept_ss=keep_ss.numel() / rows)
    return total, parts


class ProjectedModel(nn.Module):
    """A classifier plus a projection head on its penultimate features.

    ``forward(x)`` returns the backbone's logits float (N, L) (so evaluation code sees a plain
    classifier) and stores ``self.projection`` = head(features) float (N, D). With
    ``freeze_backbone`` the backbone's parameters do not train, it stays in eval mode and its
    features are detached (SSKD stage 1). :meth:`release` removes the feature hook and returns
    the backbone.
    """

    def __init__(self, backbone: nn.Module, *, freeze_backbone: bool = False):
        super().__init__()
        self.backbone = backbone
        self.tap = FeatureTap(backbone)
        d = self.tap.dim
        self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, d))
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            for param in backbone.parameters():
                param.requires_grad_(False)
        self.projection: torch.Tensor | None = None

    def train(self, mode: bool = True) -> "ProjectedModel":
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.backbone(x)
        feat = self.tap.features
        self.projection = self.head(feat.detach() if self.freeze_backbone else feat)
        return logits

    def release(self) -> nn.Module:
        self.tap.remove()
        self.projection = None
        return self.backbone


class SSKDParams(MethodParams):
    """Loss weights w_ce 0.1, w_kd 0.9, w_tf 2.7 (rotated-view KD), w_ss 10 (similarity KL);
    kd_tau 4, ss_tau 0.5; keep_wrong_tf 1.0 / keep_wrong_ss 0.75 (fraction of wrongly ranked
    rotated rows kept); stage 1: head_epochs 60, head_lr 0.05 (SGD, momentum 0.9),
    head_weight_decay 5e-4, head_milestones (30, 45) (lr x0.1); teacher_arch: ``student`` (self-
    trained copy of the student architecture) or ``teacher`` (the teacher architecture trained with
    CE here -- still never the real teacher); aux_epochs: epochs of that CE teacher (None = the
    student recipe's; 3 at smoke). Reduced profiles: cpu 5 head epochs (lr x0.1 at 3, 4), smoke 1."""

    w_ce: float = Field(default=0.1, ge=0)
    w_kd: float = Field(default=0.9, ge=0)
    w_tf: float = Field(default=2.7, ge=0)
    w_ss: float = Field(default=10.0, ge=0)
    kd_tau: float = Field(default=4.0, gt=0)
    ss_tau: float = Field(default=0.5, gt=0)
    keep_wrong_tf: float = Field(default=1.0, ge=0, le=1)
    keep_wrong_ss: float = Field(default=0.75, ge=0, le=1)
    head_epochs: int = Field(default=60, ge=1)
    head_lr: float = Field(default=0.05, gt=0)
    head_weight_decay: float = Field(default=5e-4, ge=0)
    head_milestones: tuple[int, ...] = (30, 45)
    teacher_arch: Literal["student", "teacher"] = "student"
    aux_epochs: int | None = Field(default=None, ge=1)

    profile_overrides: ClassVar[dict] = {
        "cpu": {"head_epochs": 5, "head_milestones": (3, 4)},
        "smoke": {"head_epochs": 1, "head_milestones": (), "aux_epochs": 3},
    }


@register_method
class SSKD(Method):
    """SSKD with a self-trained same-architecture teacher (self-distillation baseline)."""

    name = "sskd"
    paper = "Xu, Liu, Li, Loy, Knowledge Distillation Meets Self-Supervision, ECCV 2020 (self-trained teacher)"
    teacher_access = "none"
    data = "full"
    Params = SSKDParams
    paper_results = {"cifar100": 76.20}  # Wang, ICML 2021, Table 2 (ResNet-18)
    # teacher_arch="teacher" trains the teacher's architecture: unknown for a user's teacher file
    needs_teacher_recipe = staticmethod(lambda params: params is not None and params.teacher_arch == "teacher")

    def objective(self, s_logits, s_proj, t_logits, t_proj, y):
        """:func:`sskd_loss` with this method's parameters."""
        p = self.params
        return sskd_loss(s_logits, s_proj, t_logits, t_proj, y, w_ce=p.w_ce, w_kd=p.w_kd, w_tf=p.w_tf, w_ss=p.w_ss,
                         kd_tau=p.kd_tau, ss_tau=p.ss_tau, keep_wrong_tf=p.keep_wrong_tf, keep_wrong_ss=p.keep_wrong_ss)

    def run(self, ctx: MethodContext) -> MethodOutput:
        p = self.params
        _, h, w = ctx.image_shape
        if h != w:
            raise ConfigError(f"sskd rotates images by 90 degrees and needs square images, got {h}x{w}")
        arch = ctx.config.student.arch if p.teacher_arch == "student" else ctx.config.teacher.arch
        backbone, t_hist = train_ce(ctx, arch, desc="sskd/teacher", seed_offset=AUX_SEED_OFFSET, epochs=p.aux_epochs)

        # stage 1: projection head on the frozen self-trained teacher
        teacher = ProjectedModel(backbone, freeze_backbone=True)
        head_hist = ctx.train(
            teacher, lambda _logits, _xb, _idx: head_loss(teacher.projection), desc="sskd/head",
            seed_offset=2 * AUX_SEED_OFFSET, inputs=lambda xb, _idx: rotations(xb), epochs=p.head_epochs,
            optimizer="sgd", lr=p.head_lr, momentum=0.9, weight_decay=p.head_weight_decay,
            lr_milestones=tuple(p.head_milestones), lr_gamma=0.1,
        )
        teacher.eval()

        # stage 2: student + its own head, on all four views
        y = ctx.train_y.to(ctx.device)
        student = ProjectedModel(ctx.new_model())
        sums: dict[str, float] = {}

        def loss(logits: torch.Tensor, xb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                t_logits = teacher(xb)
            total, parts = self.objective(logits, student.projection, t_logits, teacher.projection, y[idx])
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            sums["steps"] = sums.get("steps", 0.0) + 1
            return total

        history = ctx.train(student, loss, desc="student", inputs=lambda xb, _idx: rotations(xb))
        steps = max(sums.pop("steps", 1.0), 1.0)
        metrics = {
            "teacher_val_accuracy": final_val_accuracy(t_hist),
            "head_final_loss": float(head_hist[-1]["train_loss"]) if head_hist else float("nan"),
            "val_accuracy": final_val_accuracy(history),
            **{f"mean_{k}": v / steps for k, v in sums.items()},
        }
        ctx.log(metrics, None)
        teacher.release()
        return MethodOutput(student=student.release(), metrics=metrics)
