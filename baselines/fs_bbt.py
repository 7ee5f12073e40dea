"""FS-BBT: black-box few-shot knowledge distillation (Nguyen et al., ECCV 2022; REFERENCE section 7).

Pipeline (one class, two registered access levels):

1. **Real images**: ``shots_per_class * L`` images drawn at random from ``ctx.train_x`` (the
   profile's training subset) *without looking at their labels*: a uniformly random subset of
   that size stands in for "200 unlabelled images per class" (a per-class draw would need the
   ground truth). ``ctx.train_y`` is never read. Each real image is queried once.
2. **MixUp pool**: the real images replicated to ``m_mix``, paired by two random permutations,
   ``x = lam x1 + (1 - lam) x2`` with ``lam ~ Beta(1, 1)`` rounded to 2 decimals; pairs with
   ``lam <= 0.05`` or ``lam >= 0.95`` (about 11%, near-copies of a real image) are dropped and
   replaced by as many CVAE images.
3. **Conditional VAE** on the real images, conditioned on the teacher's top-1 label of each
   (the argmax of the score oracle's answer, or the label oracle's answer); latent 2; loss =
   per-image summed binary cross-entropy + KL(q(z|x,c) || N(0, I)), averaged over the batch;
   Adam 1e-3. MLP (input + one-hot -> 256 -> 128 -> 64 -> (mu, logvar), mirrored decoder with a
   sigmoid) for single-channel images, a small conv net (stride-2 convolutions 32..512, label as
   an extra input channel, transposed-conv decoder) for colour images. Sampling: half the latents
   N(0, I), half U(-3, 3); labels balanced over the classes and shuffled independently of the
   latent type (the authors' code couples them to the class order, a defect).
4. **Student**: trained with ``ctx.train`` on real + MixUp + CVAE images (each queried once,
   answers cached) with the soft-target cross-entropy against the teacher's probabilities at
   T = 1 (:func:`db3kd.losses.soft_cross_entropy`), Adam 1e-3, batch 64, 50 epochs (MNIST,
   FMNIST; CIFAR-10 batch 128, 100 epochs), with on-the-fly MixUp of inputs and targets
   (Beta(1, 1)) plus rotations/shifts (single channel) or shifts/flips (colour) -- the authors'
   ``combination`` augmentation.

Queries: ``n_real + m_mix`` (26k on MNIST at paper scale) = ``transfer_set_size``.

``fs-bbt`` (access ``scores``) is the paper's method. ``fs-bbt-labels`` (access ``labels``, ours)
is the decision-based variant: the same transfer set, targets = one-hot top-1 labels. DB3KD soft
labels as targets (REFERENCE's "option") are *not* offered: they would need a boundary search per
(image, class) pair -- about 9 classes x refs x ~20 bisection queries per transfer image, over a
million queries for 26k images -- and a temperature-0.3 target where FS-BBT uses T = 1.
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

from baselines.zero_shot import (
    OnlineAugment,
    beta_sample,
    distil_on_transfer_set,
    label_transfer_set,
    quantize,
    recipe_changes,
    target_metrics,
)

__all__ = ["FSBBTParams", "CVAE", "train_cvae", "mixup_pool", "FSBBT", "FSBBTLabels"]

PAPER = "Nguyen, Gupta, Do, Venkatesh, Black-box Few-shot Knowledge Distillation, ECCV 2022"
CVAE_SEED_OFFSET = 300
_PAPER_CIFAR = {"m_mix": 40000, "cvae_epochs": 600, "cvae_batch_size": 64, "epochs": 100, "batch_size": 128}


class FSBBTParams(MethodParams):
    """FS-BBT hyperparameters; defaults are the paper's MNIST values (README / authors' scripts).

    shots_per_class: real images per class (paper 200; 50 on CIFAR-100) -- drawn as one random
    subset of ``shots_per_class * L`` images; m_mix: MixUp pool size (24k MNIST, 48k FMNIST, 40k
    CIFAR); mix_alpha: Beta(a, a) of the pool (1); mix_round: decimals lambda is rounded to (2);
    mix_threshold: pairs with lambda <= t or >= 1 - t are replaced by CVAE images (0.05);
    cvae_latent (2), cvae_epochs (100 MNIST, 200 FMNIST, 600 CIFAR), cvae_batch_size (256; 64
    CIFAR), cvae_lr (1e-3), cvae_arch: ``auto`` (MLP for 1 channel, conv for more), ``mlp``,
    ``conv``; epochs / batch_size / lr: the student recipe (50 / 64 / 1e-3 MNIST and FMNIST,
    100 / 128 CIFAR; None = the profile's); online_mixup_alpha: MixUp while training the student
    (1; 0 = off); augment: geometric jitter while training (``auto``: shift_rotate for 1 channel,
    shift_flip for colour; or ``none``, ``shift_rotate``, ``shift_flip``)."""

    shots_per_class: int = Field(default=200, ge=1)
    m_mix: int = Field(default=24000, ge=0)
    mix_alpha: float = Field(default=1.0, gt=0)
    mix_round: int = Field(default=2, ge=0)
    mix_threshold: float = Field(default=0.05, ge=0, lt=0.5)
    cvae_latent: int = Field(default=2, ge=1)
    cvae_epochs: int = Field(default=100, ge=0)
    cvae_batch_size: int = Field(default=256, ge=2)
    cvae_lr: float = Field(default=1e-3, gt=0)
    cvae_arch: Literal["auto", "mlp", "conv"] = "auto"
    epochs: int | None = Field(default=50, ge=1)
    batch_size: int | None = Field(default=64, ge=2)
    lr: float | None = Field(default=1e-3, gt=0)
    online_mixup_alpha: float = Field(default=1.0, ge=0)
    augment: Literal["auto", "none", "shift_rotate", "shift_flip"] = "auto"

    profile_overrides: ClassVar[dict] = {
        "paper/fmnist": {"m_mix": 48000, "cvae_epochs": 200},
        "paper/cifar10": _PAPER_CIFAR,
        "paper/cifar100": {**_PAPER_CIFAR, "shots_per_class": 50},
        "cpu": {"m_mix": 16000, "cvae_epochs": 50, "epochs": 10},
        "cpu/digits": {"m_mix": 4000, "cvae_epochs": 60, "epochs": 10},
        "cpu/cifar10": {"m_mix": 4000, "cvae_epochs": 10, "cvae_batch_size": 64, "epochs": 5, "batch_size": 128},
        "cpu/cifar100": {"shots_per_class": 10, "m_mix": 4000, "cvae_epochs": 10, "cvae_batch_size": 64,
                         "epochs": 5, "batch_size": 128},
        "smoke": {"shots_per_class": 20, "m_mix": 400, "cvae_epochs": 5, "epochs": 5},
    }


# --- conditional VAE -------------------------------------------------------------------------------


class CVAE(nn.Module):
    """Conditional VAE over images in [0, 1] (N, C, H, W), condition = class index.

    ``arch="mlp"``: encoder [x, onehot(c)] -> 256 -> 128 -> 64 -> (mu, logvar), decoder
    [z, onehot(c)] -> 64 -> 128 -> 256 -> C*H*W sigmoid (the authors' MNIST/FMNIST network).
    ``arch="conv"``: encoder of ``depth = min(5, floor(log2(min(H, W))))`` stride-2 3x3
    convolutions (32, 64, 128, 256, 512 filters, ReLU) on [x, label plane] (the label scaled to
    [0, 1] as one extra input channel), linear heads to (mu, logvar); decoder [z, onehot(c)] ->
    linear -> transposed convolutions back up -> sigmoid, resized to (H, W) if needed.
    """

    def __init__(self, shape: tuple[int, int, int], num_classes: int, latent: int = 2, arch: str = "mlp"):
        super().__init__()
        c, h, w = shape
        self.shape, self.num_classes, self.latent, self.arch = tuple(shape), num_classes, latent, arch
        if arch == "mlp":
            d = c * h * w
            self.enc = nn.Sequential(nn.Linear(d + num_classes, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                                     nn.Linear(128, 64), nn.ReLU())
            self.mu, self.logvar = nn.Linear(64, latent), nn.Linear(64, latent)
            self.dec = nn.Sequential(nn.Linear(latent + num_classes, 64), nn.ReLU(), nn.Linear(64, 128), nn.ReLU(),
                                     nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, d))
        elif arch == "conv":
            depth = max(1, min(5, int(math.log2(min(h, w)))))
            widths = (32, 64, 128, 256, 512)[:depth]
            layers, cin = [], c + 1
            for cout in widths:
                layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.ReLU()]
                cin = cout
            self.enc = nn.Sequential(*layers, nn.Flatten())
            with torch.no_grad():
                feat = self.enc(torch.zeros(1, c + 1, h, w))
            self._side = (math.ceil(h / 2**depth), math.ceil(w / 2**depth))
            self.mu, self.logvar = nn.Linear(feat.shape[1], latent), nn.Linear(feat.shape[1], latent)
            up, cin = [], widths[-1]
            for cout in list(reversed(widths))[1:] + [c]:
                up += [nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1), nn.ReLU()]
                cin = cout
            up.pop()  # no ReLU on the last layer (logits)
            self.dec_fc = nn.Linear(latent + num_classes, widths[-1] * self._side[0] * self._side[1])
            self.dec = nn.Sequential(*up)
        else:
            raise ValueError(f"unknown CVAE arch {arch!r}; valid: mlp, conv")

    def _onehot(self, c: torch.Tensor) -> torch.Tensor:
        return F.one_hot(c, self.num_classes).float()

    def encode(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.arch == "mlp":
            h = self.enc(torch.cat([x.flatten(1), self._onehot(c)], 1))
        else:
            plane = (c.float() / max(self.num_classes - 1, 1)).view(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
            h = self.enc(torch.cat([x, plane], 1))
        return self.mu(h), self.logvar(h)

    def decode_logits(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid reconstruction (N, C, H, W)."""
        zc = torch.cat([z, self._onehot(c)], 1)
        if self.arch == "mlp":
            return self.dec(zc).view(-1, *self.shape)
        h = self.dec_fc(zc).view(zc.shape[0], -1, *self._side)
        out = self.dec(h)
        if tuple(out.shape[2:]) != self.shape[1:]:
            out = F.interpolate(out, size=self.shape[1:], mode="bilinear", align_corners=False)
        return out

    def loss(self, x: torch.Tensor, c: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Per-image summed BCE + KL(q(z|x,c) || N(0, I)), averaged over the batch. eps ~ N(0, I) (B, latent)."""
        mu, logvar = self.encode(x, c)
        z = mu + torch.exp(0.5 * logvar) * eps
        bce = F.binary_cross_entropy_with_logits(self.decode_logits(z, c), x, reduction="none").flatten(1).sum(1)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
        return (bce + kl).mean()

    @torch.no_grad()
    def sample(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decode_logits(z, c))


def train_cvae(ctx: MethodContext, x: torch.Tensor, cond: torch.Tensor, p: FSBBTParams) -> tuple[CVAE, list[float]]:
    """A :class:`CVAE` trained on uint8 images x (N, C, H, W) with conditions cond int64 (N,).

    Adam(cvae_lr), ``cvae_epochs`` epochs of shuffled ``cvae_batch_size`` batches; batch order and
    reparameterisation noise from a generator seeded by the run seed. Returns (model in eval
    mode, mean loss per epoch).
    """
    from db3kd.training import seed_everything

    arch = p.cvae_arch if p.cvae_arch != "auto" else ("mlp" if ctx.image_shape[0] == 1 else "conv")
    seed_everything(ctx.seed * 1000 + CVAE_SEED_OFFSET)
    model = CVAE(ctx.image_shape, ctx.num_classes, p.cvae_latent, arch).to(ctx.device)
    opt = torch.optim.Adam(model.parameters(), lr=p.cvae_lr)
    gen = torch.Generator().manual_seed(ctx.seed * 1000 + CVAE_SEED_OFFSET + 1)
    xf = x.float().div(255.0)
    n, losses = x.shape[0], []
    model.train()
    for _epoch in range(p.cvae_epochs):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for s in range(0, n, p.cvae_batch_size):
            idx = perm[s : s + p.cvae_batch_size]
            eps = torch.randn(idx.numel(), p.cvae_latent, generator=gen)
            loss = model.loss(xf[idx].to(ctx.device), cond[idx].to(ctx.device), eps.to(ctx.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
        losses.append(total / max(n, 1))
        ctx.log({"cvae/train_loss": losses[-1]}, _epoch)
    model.eval()
    return model, losses


def sample_cvae(model: CVAE, n: int, num_classes: int, gen: torch.Generator, *, device="cpu", chunk: int = 4096):
    """``n`` CVAE images uint8 (n, C, H, W) and their requested labels int64 (n,).

    Latents: the first half N(0, I), the rest U(-3, 3); labels ``arange(n) % L`` shuffled, so the
    classes are balanced and independent of the latent type.
    """
    half = n // 2
    z = torch.cat([torch.randn(half, model.latent, generator=gen),
                   torch.rand(n - half, model.latent, generator=gen) * 6 - 3])
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
    out = torch.empty((n, *model.shape), dtype=torch.uint8)
    for s in range(0, n, chunk):
        out[s : s + chunk] = quantize(model.sample(z[s : s + chunk].to(device), labels[s : s + chunk].to(device)).cpu())
    return out, labels


def mixup_pool(x: torch.Tensor, m_mix: int, alpha: float, decimals: int, threshold: float, gen: torch.Generator,
               *, chunk: int = 4096) -> tuple[torch.Tensor, int]:
    """FS-BBT's MixUp pool from uint8 real images x (N, C, H, W).

    The N images are replicated to ``m_mix`` (index ``k mod N``), two random permutations of the
    replicated set are paired, ``lam ~ Beta(alpha, alpha)`` rounded to ``decimals``; pairs with
    ``lam <= threshold`` or ``lam >= 1 - threshold`` are dropped. Returns (kept mixed images uint8
    (K, C, H, W), number dropped = m_mix - K).
    """
    n = x.shape[0]
    if m_mix == 0 or n == 0:
        return torch.empty((0, *x.shape[1:]), dtype=torch.uint8), 0
    base = torch.arange(m_mix) % n
    i1 = base[torch.randperm(m_mix, generator=gen)]
    i2 = base[torch.randperm(m_mix, generator=gen)]
    lam = torch.round(beta_sample(alpha, m_mix, gen) * 10**decimals) / 10**decimals
    keep = (lam > threshold) & (lam < 1 - threshold)
    i1, i2, lam = i1[keep], i2[keep], lam[keep]
    out = torch.empty((int(keep.sum()), *x.shape[1:]), dtype=torch.uint8)
    for s in range(0, out.shape[0], chunk):
        sl = slice(s, s + chunk)
        lx = lam[sl].view(-1, 1, 1, 1)
        out[sl] = quantize(lx * x[i1[sl]].float().div(255.0) + (1 - lx) * x[i2[sl]].float().div(255.0))
    return out, m_mix - out.shape[0]


# --- the method ------------------------------------------------------------------------------------


class _FSBBT(Method):
    """Shared FS-BBT pipeline; subclasses fix the teacher access (scores or labels)."""

    paper = PAPER
    data = "few_shot"
    Params = FSBBTParams

    def few_shot_images(self, ctx: MethodContext) -> torch.Tensor:
        """``shots_per_class * L`` random training images (uint8), chosen without their labels.

        The count is FS-BBT's own (paper: 2,000 on MNIST / FMNIST), independent of the profile's
        training subset (cpu: 10,000 images for every method). When the subset holds no more images
        than that, FS-BBT sees as many images as every other method, i.e. it is not few-shot relative
        to them: a warning says so and ``metrics["few_shot_fraction"]`` (n_real / subset size) records it.
        """
        import warnings

        wanted = self.params.shots_per_class * ctx.num_classes
        n = min(wanted, ctx.train_x.shape[0])
        if n >= ctx.train_x.shape[0]:
            warnings.warn(f"{self.name}: {wanted} few-shot images requested but the training subset has "
                          f"{ctx.train_x.shape[0]}: the row uses the same data as the full-data methods, not fewer",
                          stacklevel=2)
        gen = torch.Generator().manual_seed(ctx.seed * 1000 + 23)
        return ctx.train_x[torch.randperm(ctx.train_x.shape[0], generator=gen)[:n].sort().values]

    def run(self, ctx: MethodContext) -> MethodOutput:
        from baselines.common import final_val_accuracy

        p = self.params
        gen = torch.Generator().manual_seed(ctx.seed * 1000 + 29)
        x_real = self.few_shot_images(ctx)
        t_real, cond = label_transfer_set(ctx.teacher, x_real, ctx.num_classes)  # n_real queries
        x_mix, n_drop = mixup_pool(x_real, p.m_mix, p.mix_alpha, p.mix_round, p.mix_threshold, gen)
        cvae, cvae_losses = train_cvae(ctx, x_real, cond, p)
        x_gen, asked = sample_cvae(cvae, n_drop, ctx.num_classes, gen, device=ctx.device)
        t_mix, _ = label_transfer_set(ctx.teacher, x_mix, ctx.num_classes)
        t_gen, said = label_transfer_set(ctx.teacher, x_gen, ctx.num_classes)
        x = torch.cat([x_real, x_mix, x_gen])
        targets = torch.cat([t_real, t_mix, t_gen])

        metrics = {
            "n_real": float(x_real.shape[0]),
            "few_shot_fraction": float(x_real.shape[0]) / max(1, ctx.train_x.shape[0]),
            "n_mixup": float(x_mix.shape[0]),
            "n_cvae": float(x_gen.shape[0]),
            "cvae_final_loss": cvae_losses[-1] if cvae_losses else float("nan"),
            "cvae_label_agreement": float((said == asked).float().mean()) if n_drop else float("nan"),
            **target_metrics(targets),
        }
        ctx.log(metrics, None)
        geometry = p.augment if p.augment != "auto" else ("shift_rotate" if ctx.image_shape[0] == 1 else "shift_flip")
        augment = None
        if geometry != "none" or p.online_mixup_alpha > 0:
            augment = OnlineAugment(geometry, p.online_mixup_alpha, seed=ctx.seed * 1000 + 31)
        student, history = distil_on_transfer_set(ctx, x, targets, augment=augment,
                                                  **recipe_changes(p.epochs, p.batch_size, p.lr))
        metrics["val_accuracy"] = final_val_accuracy(history)
        path = ctx.workdir / "fs_bbt_transfer_set.pt"
        torch.save({"sizes": (x_real.shape[0], x_mix.shape[0], x_gen.shape[0]), "cvae_requested": asked,
                    "targets": targets, "cvae_samples": x_gen[:100]}, path)
        return MethodOutput(student=student, metrics=metrics, transfer_set_size=int(x.shape[0]),
                            artifacts={"transfer_set": str(path)})


@register_method
class FSBBT(_FSBBT):
    """FS-BBT (paper): score-based black-box teacher; targets = the teacher's probabilities at T = 1;
    the CVAE is conditioned on their argmax. See the module docstring for the pipeline."""

    name = "fs-bbt"
    teacher_access = "scores"
    paper_results = {"mnist": 98.42, "fmnist": 84.73, "cifar10": 74.10, "cifar100": 56.28}


@register_method
class FSBBTLabels(_FSBBT):
    """FS-BBT, label-only variant (ours, decision-based setting): the same transfer set, the
    teacher's one-hot top-1 labels as targets (soft CE = CE), CVAE conditioned on those labels."""

    name = "fs-bbt-labels"
    paper = PAPER + " (label-only variant, this suite)"
    teacher_access = "labels"
