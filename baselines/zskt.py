"""ZSKT: Zero-shot Knowledge Transfer via Adversarial Belief Matching (Micaelli & Storkey,
NeurIPS 2019; REFERENCE section 6).

Access ``white_box`` (``ctx.teacher`` is the module: gradients flow through it into the
generator, its parameters frozen; its activations feed attention transfer), no data.

* **Generator** (paper, generalised to the dataset's image size and channels):
  ``z ~ N(0, I_100) -> Linear(100 -> 128 s0 s0) -> BN -> [x2 nearest upsample -> Conv3x3 128->128
  -> BN -> LeakyReLU 0.2] -> [x2 upsample -> Conv3x3 128->64 -> BN -> LeakyReLU 0.2] -> Conv3x3
  64->C -> BatchNorm2d(C)`` with ``s0 = ceil(size / 4)`` (8 for CIFAR's 32, 7 for MNIST's 28, 4 for
  digits' 16; resized bilinearly if 4 s0 != size); always in train mode. The paper's output lives
  in the teacher's *normalised* input space; the teachers here take [0, 1] images, so the
  BatchNorm output ``h`` is mapped by ``sigmoid(h)`` (default, ``output="sigmoid"``; the final
  BatchNorm is affine so the generator can learn to saturate pixels) or by
  ``clamp(0.5 + 0.5 h, 0, 1)`` (``output="clamp"``, zero gradient outside).
* **Loop** (``iterations``, paper 80k on CIFAR-10; batch 128): per iteration one generator step
  on ``L_G = -KL(T(x_p) || S(x_p))``, then ``student_steps`` (10) student steps on the same
  pseudo batch (teacher outputs computed once) with ``L_S = KL(T || S) + beta * sum_l AT_l``.
  Adam: generator 1e-3, student 2e-3, cosine decay to 0 over ``iterations``; gradient-norm
  clipping 5 on both. Temperature 1.
* **KL averaged how**: ``kl_reduction="batchmean"`` (default: sum over classes, mean over the
  batch -- the true mean KL per sample) or ``"mean"`` (the released code: mean over batch x
  classes, i.e. batchmean / L). Recorded in the run's parameters and in ``tables["zskt"]``.
* **Attention transfer**: ``a = normalize(mean_c(A^2))`` at each attention point;
  ``attention="mean_squared"`` (default: ``mean((a_s - a_t)^2)`` over batch and positions, the
  released code, which beta = 250 was tuned with) or ``"l2"`` (``mean_b ||a_s - a_t||_2``, the
  paper's formula as printed). Attention points are found generically with forward hooks,
  without touching the model code: torchvision-style ResNets use their residual groups
  (``layer1..layer4``); other nets the activation (ReLU/LeakyReLU/...) that follows each Conv2d
  (the Conv2d itself if none does). Teacher and student are *comparable* when they have as many
  points with the same spatial sizes -- LeNet-5 / LeNet-5-half (2 stages: 24x24, 8x8 on MNIST)
  and AlexNet / AlexNet-half (5 stages) are. **When they are not (or the teacher cannot be
  hooked), beta = 0 is used** and said so: metric ``beta_effective`` = 0, ``attention_points``
  = 0 and ``tables["zskt"]["beta_reason"]``.
* **Belief matching**: at the end the mean transition error (:mod:`db3kd.belief_matching`) of the
  student against the teacher is measured on ``mte_images`` images of the *validation* split
  (never the test split) with ``mte_steps`` steps of size ``mte_xi``: metric ``mte``.

Queries: 0 (white box: nothing goes through an oracle). ``transfer_set_size`` = pseudo images
generated = ``iterations * batch_size``.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from db3kd.context import MethodContext, MethodOutput
from db3kd.registry import Method, MethodParams, register_method

__all__ = ["ZSKTParams", "Generator", "attention_points", "ActivationTap", "attention_map", "ZSKT"]

PAPER = "Micaelli, Storkey, Zero-shot Knowledge Transfer via Adversarial Belief Matching, NeurIPS 2019"
GENERATOR_SEED_OFFSET = 200
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.PReLU)


class ZSKTParams(MethodParams):
    """iterations (paper 80k CIFAR-10, 50k SVHN), batch_size (128), z_dim (100), gen_channels
    (generator width, 128), generator_steps (1) and student_steps (10) per iteration,
    lr_generator (1e-3), lr_student (2e-3), grad_clip (5, both), beta (AT weight 250; 0 is used
    when the nets have no comparable blocks), attention (``mean_squared`` released code / ``l2``
    paper formula), kl_reduction (``batchmean`` / ``mean`` released code), temperature (1),
    output (``sigmoid`` / ``clamp``: generator BN output -> [0, 1]), log_every (iterations between
    validation checks), mte_images / mte_steps / mte_xi (the final belief-matching evaluation on
    the validation split; mte_images = 0 skips it)."""

    iterations: int = Field(default=80000, ge=1)
    batch_size: int = Field(default=128, ge=2)
    z_dim: int = Field(default=100, ge=1)
    gen_channels: int = Field(default=128, ge=2)
    generator_steps: int = Field(default=1, ge=1)
    student_steps: int = Field(default=10, ge=1)
    lr_generator: float = Field(default=1e-3, gt=0)
    lr_student: float = Field(default=2e-3, gt=0)
    grad_clip: float = Field(default=5.0, gt=0)
    beta: float = Field(default=250.0, ge=0)
    attention: Literal["mean_squared", "l2"] = "mean_squared"
    kl_reduction: Literal["batchmean", "mean"] = "batchmean"
    temperature: float = Field(default=1.0, gt=0)
    output: Literal["sigmoid", "clamp"] = "sigmoid"
    log_every: int = Field(default=1000, ge=1)
    mte_images: int = Field(default=100, ge=0)
    mte_steps: int = Field(default=100, ge=1)
    mte_xi: float = Field(default=1.0, gt=0)

    #: tuned on validation (db3kd.tuning): the two learning rates, the attention weight and the
    #: student steps per iteration (at most the default 10, so a trial costs no more than the
    #: defaults); ``iterations`` stays at the profile's value, the compute cap. The student recipe
    #: (student.lr, student.epochs) is not searched: this loop never reads it.
    search_space: ClassVar[dict] = {"lr_student": ("float", 2e-4, 2e-2, "log"),
                                    "lr_generator": ("float", 1e-4, 1e-2, "log"),
                                    "beta": ("float", 0.0, 500.0), "student_steps": ("int", 1, 10)}
    tune_student_recipe: ClassVar[bool] = False

    profile_overrides: ClassVar[dict] = {
        "cpu": {"iterations": 400, "batch_size": 64, "gen_channels": 64, "log_every": 50, "mte_images": 50,
                "mte_steps": 30},
        "cpu/cifar10": {"iterations": 60, "batch_size": 32, "gen_channels": 64, "student_steps": 5,
                        "log_every": 20, "mte_images": 20, "mte_steps": 10},
        "cpu/cifar100": {"iterations": 30, "batch_size": 16, "gen_channels": 32, "student_steps": 5,
                         "log_every": 10, "mte_images": 10, "mte_steps": 5},
        "smoke": {"iterations": 4, "batch_size": 16, "gen_channels": 16, "student_steps": 2, "log_every": 2,
                  "mte_images": 4, "mte_steps": 3},
    }


class Generator(nn.Module):
    """ZSKT's generator for images (C, H, W) in [0, 1] (see the module docstring)."""

    def __init__(self, z_dim: int, shape: tuple[int, int, int], width: int = 128, output: str = "sigmoid"):
        super().__init__()
        c, h, w = shape
        self.shape, self.width, self.output = tuple(shape), width, output
        self.s0 = (math.ceil(h / 4), math.ceil(w / 4))
        self.fc = nn.Linear(z_dim, width * self.s0[0] * self.s0[1])
        self.bn0 = nn.BatchNorm2d(width)
        self.body = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(width, width // 2, 3, padding=1), nn.BatchNorm2d(width // 2), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width // 2, c, 3, padding=1), nn.BatchNorm2d(c, affine=True),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.body(self.bn0(self.fc(z).view(-1, self.width, *self.s0)))
        if tuple(h.shape[2:]) != self.shape[1:]:
            h = F.interpolate(h, size=self.shape[1:], mode="bilinear", align_corners=False)
        if self.output == "sigmoid":
            return torch.sigmoid(h)
        return (0.5 + 0.5 * h).clamp(0.0, 1.0)


def attention_points(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) whose outputs are the attention points of ``model`` (see module docstring)."""
    groups = [(f"layer{i}", getattr(model, f"layer{i}")) for i in range(1, 5) if isinstance(getattr(model, f"layer{i}", None), nn.Module)]
    if len(groups) >= 2:
        return groups
    points: list[tuple[str, nn.Module]] = []
    pending = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if pending is not None:
                points.append(pending)
            pending = (name, m)
        elif pending is not None and isinstance(m, _ACTIVATIONS):
            points.append((name, m))
            pending = None
    if pending is not None:
        points.append(pending)
    return points


class ActivationTap:
    """Forward hooks recording the output of each attention point (the last call wins if a module
    runs twice). ``tap.take()`` returns and clears them in point order; ``tap.close()`` removes the hooks."""

    def __init__(self, points: list[tuple[str, nn.Module]]):
        self.names = [n for n, _ in points]
        self._out: dict[int, torch.Tensor] = {}
        self._handles = [m.register_forward_hook(self._hook(i)) for i, (_, m) in enumerate(points)]

    def _hook(self, i: int):
        def hook(_module, _inputs, output):
            self._out[i] = output

        return hook

    def take(self) -> list[torch.Tensor]:
        out = [self._out[i] for i in sorted(self._out)]
        self._out = {}
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def attention_map(a: torch.Tensor) -> torch.Tensor:
    """``normalize(mean_c(A^2))`` flattened: float (B, H*W), unit L2 norm per image."""
    return F.normalize(a.float().pow(2).mean(1).flatten(1), dim=1)


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, reduction: str) -> torch.Tensor:
    """KL(softmax(t / T) || softmax(s / T)), reduction ``batchmean`` or ``mean`` (batch x classes)."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1), F.softmax(teacher_logits / temperature, dim=1),
                    reduction=reduction)


@register_method
class ZSKT(Method):
    """ZSKT: a generator searches for images where the student disagrees with the white-box
    teacher (L_G = -KL(T||S)), the student matches the teacher there (L_S = KL(T||S) + beta AT).

    beta = 250 by default; **beta = 0 is used when teacher and student have no comparable
    attention points** (different number of conv stages/groups or different spatial sizes), and
    the run says so (metric ``beta_effective``, ``tables["zskt"]["beta_reason"]``). See the module
    docstring for the generator, the [0, 1] output mapping (sigmoid) and the KL averaging
    (batchmean).
    """

    name = "zskt"
    paper = PAPER
    teacher_access = "white_box"
    data = "none"
    Params = ZSKTParams
    paper_results = {}  # CIFAR-10 WRN-40-2 -> WRN-16-1: 83.69 (other architectures than this suite's)

    def _comparable(self, teacher, student, probe: torch.Tensor) -> tuple[list, list, str]:
        """Attention points of teacher and student if comparable, else ([], [], reason)."""
        if not isinstance(teacher, nn.Module):
            return [], [], "the teacher is not an nn.Module, so it cannot be hooked"
        try:
            pt, ps = attention_points(teacher), attention_points(student)
            if not pt or not ps:
                return [], [], "no convolutional stages found"
            tt, ts = ActivationTap(pt), ActivationTap(ps)
            try:
                with torch.no_grad():
                    teacher(probe)
                    was = student.training
                    student.eval()
                    student(probe)
                    student.train(was)
                at, as_ = tt.take(), ts.take()
            finally:
                tt.close(), ts.close()
        except Exception as exc:  # e.g. TorchScript modules refuse forward hooks
            return [], [], f"the networks cannot be hooked ({type(exc).__name__}: {exc})"
        if len(at) != len(pt) or len(as_) != len(ps):
            return [], [], "an attention point did not run in the forward pass"
        if len(at) != len(as_):
            return [], [], f"teacher has {len(at)} attention points, student {len(as_)}"
        shapes_t, shapes_s = [tuple(a.shape[2:]) for a in at], [tuple(a.shape[2:]) for a in as_]
        if any(a.dim() != 4 for a in at + as_) or shapes_t != shapes_s:
            return [], [], f"spatial sizes differ: teacher {shapes_t}, student {shapes_s}"
        return pt, ps, ""

    def _attention_loss(self, s_acts: list[torch.Tensor], t_maps: list[torch.Tensor]) -> torch.Tensor:
        total = s_acts[0].new_zeros(())
        for a_s, m_t in zip(s_acts, t_maps):
            d = attention_map(a_s) - m_t
            total = total + (d.pow(2).mean() if self.params.attention == "mean_squared" else d.norm(dim=1).mean())
        return total

    def run(self, ctx: MethodContext) -> MethodOutput:
        from db3kd.training import evaluate, seed_everything

        p = self.params
        dev = ctx.device
        teacher = ctx.teacher
        if isinstance(teacher, nn.Module):
            teacher.to(dev).eval()
            frozen = [(q, q.requires_grad) for q in teacher.parameters()]
            for q, _ in frozen:
                q.requires_grad_(False)
        else:
            frozen = []
        student = ctx.new_model().to(dev)
        seed_everything(ctx.seed * 1000 + GENERATOR_SEED_OFFSET)
        generator = Generator(p.z_dim, ctx.image_shape, p.gen_channels, p.output).to(dev)
        zgen = torch.Generator().manual_seed(ctx.seed * 1000 + GENERATOR_SEED_OFFSET + 1)
        with torch.no_grad():
            probe = generator(torch.randn(2, p.z_dim, generator=zgen).to(dev))
        pt, ps, reason = self._comparable(teacher, student, probe)
        beta = p.beta if pt else 0.0
        taps = (ActivationTap(pt), ActivationTap(ps)) if beta > 0 else None
        if p.beta > 0 and not pt:
            ctx.log({"zskt/beta_effective": 0.0}, None)

        opt_g = torch.optim.Adam(generator.parameters(), lr=p.lr_generator)
        opt_s = torch.optim.Adam(student.parameters(), lr=p.lr_student)
        sched_g = torch.optim.lr_scheduler.CosineAnnealingLR(opt_g, p.iterations)
        sched_s = torch.optim.lr_scheduler.CosineAnnealingLR(opt_s, p.iterations)
        gen_params = list(generator.parameters())
        history: list[dict] = []
        generator.train()
        student.train()
        try:
            running = {"generator_loss": 0.0, "kl": 0.0, "attention": 0.0, "teacher_max_prob": 0.0}
            count = 0
            for it in range(p.iterations):
                z = torch.randn(p.batch_size, p.z_dim, generator=zgen).to(dev)
                for _ in range(p.generator_steps):
                    x = generator(z)
                    loss_g = -_kl(student(x), teacher(x), p.temperature, p.kl_reduction)
                    opt_g.zero_grad(set_to_none=True)
                    loss_g.backward(inputs=gen_params)
                    nn.utils.clip_grad_norm_(gen_params, p.grad_clip)
                    opt_g.step()
                if taps is not None:
                    taps[0].take(), taps[1].take()  # drop the generator step's activations
                with torch.no_grad():
                    x = generator(z)
                    t_logits = teacher(x)
                    t_maps = [attention_map(a) for a in taps[0].take()] if taps is not None else []
                for _ in range(p.student_steps):
                    s_logits = student(x)
                    kl = _kl(s_logits, t_logits, p.temperature, p.kl_reduction)
                    at = self._attention_loss(taps[1].take(), t_maps) if taps is not None else kl.new_zeros(())
                    loss_s = kl + beta * at
                    opt_s.zero_grad(set_to_none=True)
                    loss_s.backward()
                    nn.utils.clip_grad_norm_(student.parameters(), p.grad_clip)
                    opt_s.step()
                sched_g.step()
                sched_s.step()
                running["generator_loss"] += float(loss_g.detach())
                running["kl"] += float(kl.detach())
                running["attention"] += float(at.detach())
                running["teacher_max_prob"] += float(torch.softmax(t_logits, 1).max(1).values.mean())
                count += 1
                if (it + 1) % p.log_every == 0 or it + 1 == p.iterations:
                    row = {k: v / count for k, v in running.items()}
                    row["val_accuracy"] = evaluate(student, ctx.val_x, ctx.val_y, device=dev)
                    student.train()
                    history.append({"iteration": it + 1, **row})
                    ctx.log({f"iteration/zskt/{k}": v for k, v in row.items()}, it + 1)  # step = generator iteration
                    running = dict.fromkeys(running, 0.0)
                    count = 0
        finally:
            if taps is not None:
                taps[0].close(), taps[1].close()
            for q, flag in frozen:
                q.requires_grad_(flag)

        student.eval()
        with torch.no_grad():
            sample = generator(torch.randn(min(512, 4 * p.batch_size), p.z_dim, generator=zgen).to(dev))
            labels = teacher(sample).argmax(1).cpu()
        freq = torch.bincount(labels, minlength=ctx.num_classes).float() / labels.numel()
        metrics = {
            "val_accuracy": history[-1]["val_accuracy"] if history else float("nan"),
            "beta_effective": float(beta),
            "attention_points": float(len(pt)),
            "final_kl": history[-1]["kl"] if history else float("nan"),
            "pseudo_label_entropy": float(-(freq[freq > 0] * freq[freq > 0].log()).sum()),
        }
        tables: dict = {"zskt": {
            "kl_reduction": p.kl_reduction, "attention": p.attention, "output": p.output,
            "beta": p.beta, "beta_effective": beta, "beta_reason": reason or "comparable attention points",
            "attention_points_teacher": [n for n, _ in pt], "attention_points_student": [n for n, _ in ps],
            "history": history,
        }}
        artifacts = {}
        if p.mte_images > 0 and ctx.val_x.shape[0] > 0:
            metrics.update(self._belief_matching(ctx, student, teacher, tables, artifacts))
        ctx.log(metrics, None)
        return MethodOutput(student=student, metrics=metrics, transfer_set_size=p.iterations * p.batch_size,
                            tables=tables, artifacts=artifacts)

    def _belief_matching(self, ctx, student, teacher, tables, artifacts) -> dict[str, float]:
        """MTE on up to ``mte_images`` validation images where student and teacher agree."""
        from db3kd.belief_matching import transition_curves

        p = self.params
        gen = torch.Generator().manual_seed(ctx.seed * 1000 + 7)
        pool = torch.randperm(ctx.val_x.shape[0], generator=gen)[: 4 * p.mte_images]
        res = transition_curves(student, teacher, ctx.val_x[pool], None, ctx.num_classes, steps=p.mte_steps,
                                xi=p.mte_xi, n=p.mte_images, device=ctx.device)
        tables["zskt"]["transition_curves"] = {
            k: res[k].tolist() for k in ("curves", "teacher_curve", "error_curve")
        } | {"split": "validation", "note": res["note"]}
        path = ctx.workdir / "transition_curves.pt"
        torch.save({k: v for k, v in res.items()}, path)
        artifacts["transition_curves"] = str(path)
        return {"mte": res["mte"], "mte_images": float(res["n_images"]), "mte_steps": float(res["steps"])}
