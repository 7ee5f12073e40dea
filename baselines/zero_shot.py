"""Zero- and few-shot baselines: shared transfer-set machinery, and the ``noise-input`` floor.

A *transfer-set* method builds images the teacher has never been asked about, asks the oracle
once per image (answers cached), and trains a fresh student on (image, answer) pairs with the
soft-target cross-entropy ``-mean_b sum_l t[b, l] log softmax(z_s)[b, l]``
(:func:`db3kd.losses.soft_cross_entropy`); for a label oracle ``t`` is the one-hot top-1 label,
which makes the loss plain CE on the teacher's labels. Written once here and used by
``noise-input`` (this module) and ``fs-bbt`` / ``fs-bbt-labels`` (:mod:`baselines.fs_bbt`):

* :func:`quantize` -- float images in [0, 1] -> uint8, so the images the oracle is asked about are
  bit for bit the images the student is trained on (and cost one byte per pixel);
* :func:`label_transfer_set` -- one query per image; targets (N, L) and top-1 labels (N,);
* :class:`OnlineAugment` -- per-batch MixUp of inputs *and* targets plus small geometric jitter
  (FS-BBT's student recipe), plugged into ``ctx.train(inputs=...)``;
* :func:`distil_on_transfer_set` -- a fresh student trained with ``ctx.train`` on the set;
* :func:`target_metrics` -- how the teacher's answers are spread over the classes.

``noise-input`` (DB3KD paper, Tables 3-4, "Noise input"): the student is trained on random noise
images labelled by the teacher -- the floor of data-free distillation (13.53% on CIFAR-10 with
labels only, 14.79% with scores).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from db3kd.context import MethodContext, MethodOutput
from db3kd.losses import soft_cross_entropy
from db3kd.registry import Method, MethodParams, register_method

__all__ = [
    "quantize",
    "sample_noise",
    "label_transfer_set",
    "OnlineAugment",
    "beta_sample",
    "distil_on_transfer_set",
    "target_metrics",
    "recipe_changes",
    "NoiseInputParams",
    "NoiseInput",
]

DB3KD_PAPER = "Wang, Zero-Shot Knowledge Distillation from a Decision-Based Black-Box Model, ICML 2021"


# --- shared machinery ------------------------------------------------------------------------------


def quantize(x: torch.Tensor) -> torch.Tensor:
    """float images in [0, 1] (values outside are clamped) -> uint8 ``round(255 x)``, same shape."""
    return x.clamp(0.0, 1.0).mul(255.0).round_().to(torch.uint8)


def sample_noise(n: int, shape: tuple[int, int, int], kind: str, gen: torch.Generator, *, chunk: int = 4096) -> torch.Tensor:
    """``n`` random images uint8 (n, C, H, W), drawn ``chunk`` images at a time from ``gen``.

    kind ``uniform``: every pixel ~ U(0, 1). kind ``zsdb3kd``: the authors' ZSDB3KD initial noise
    (REFERENCE section 4, :func:`db3kd.zeroshot.initial_noise`) ``clamp((U + 0.2) * s1 + N * s2, 0, 1)``
    with per-pixel U ~ U(0, 1), N ~ N(0, 1) and per-image scales s1, s2 ~ U(0, 1).
    """
    from db3kd.zeroshot import initial_noise

    if kind not in ("uniform", "zsdb3kd"):
        raise ValueError(f"unknown noise kind {kind!r}; valid: uniform, zsdb3kd")
    out = torch.empty((n, *shape), dtype=torch.uint8)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        x = torch.rand((m, *shape), generator=gen) if kind == "uniform" else initial_noise(m, shape, gen)
        out[s : s + m] = quantize(x)
    return out


def label_transfer_set(oracle, x: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ask ``oracle`` about every image of ``x`` (uint8 (N, C, H, W)) exactly once.

    Returns (targets float32 (N, L), labels int64 (N,)): a ScoreOracle's probabilities at T = 1
    and their argmax, or a HardLabelOracle's labels one-hot encoded and the labels themselves.
    """
    from baselines.common import query_all

    if x.shape[0] == 0:
        return torch.empty(0, num_classes), torch.empty(0, dtype=torch.int64)
    answers = query_all(oracle, x)
    if answers.dtype == torch.int64:  # label oracle
        return F.one_hot(answers, num_classes).float(), answers
    return answers.float(), answers.argmax(1)


def target_metrics(targets: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """How the teacher's answers (N, L) spread: entropy (nats) of the top-1 label histogram,
    classes it ever names, share of the most frequent class, mean top-1 probability."""
    if targets.shape[0] == 0:
        return {}
    hist = torch.bincount(targets.argmax(1), minlength=targets.shape[1]).float()
    freq = hist / hist.sum()
    entropy = -(freq[freq > 0] * freq[freq > 0].log()).sum()
    return {
        f"{prefix}label_entropy": float(entropy),
        f"{prefix}classes_named": float((hist > 0).sum()),
        f"{prefix}top_class_share": float(freq.max()),
        f"{prefix}mean_top1_prob": float(targets.max(1).values.mean()),
    }


class OnlineAugment:
    """Per-batch augmentation for ``ctx.train(inputs=...)``: geometric jitter, then MixUp of the
    batch with a shuffled copy of itself (FS-BBT's ``combination`` recipe).

    geometry: ``none``, ``shift_rotate`` (rotation U(-10, 10) degrees and shifts U(-10%, 10%) of
    the side, zero fill: the authors' MNIST recipe) or ``shift_flip`` (shifts U(-10%, 10%) and a
    horizontal flip with probability 1/2: CIFAR). mixup_alpha: per-image ``lam ~ Beta(a, a)``
    (0 = no MixUp). The targets of the last batch are mixed with :meth:`mix` using the same
    permutation and lambdas, so a loss calls ``aug.mix(targets[idx])``.

    The random draws of a batch come from a generator seeded by ``seed`` and the batch's indices,
    so they do not depend on how many batches ran before (a resumed ``ctx.train`` sees the same
    augmentation as an uninterrupted one).
    """

    def __init__(self, geometry: str, mixup_alpha: float, seed: int):
        if geometry not in ("none", "shift_rotate", "shift_flip"):
            raise ValueError(f"unknown geometry {geometry!r}")
        self.geometry, self.alpha = geometry, float(mixup_alpha)
        self.seed = int(seed)
        self.gen = torch.Generator().manual_seed(self.seed)
        self._perm: torch.Tensor | None = None
        self._lam: torch.Tensor | None = None

    def _jitter(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        shift = (torch.rand(n, 2, generator=self.gen) * 2 - 1) * 0.2  # affine_grid units: 0.2 = 10% of the side
        angle = torch.zeros(n)
        scale_x = torch.ones(n)
        if self.geometry == "shift_rotate":
            angle = (torch.rand(n, generator=self.gen) * 2 - 1) * math.radians(10.0)
        else:
            scale_x = torch.where(torch.rand(n, generator=self.gen) < 0.5, -1.0, 1.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([torch.stack([cos * scale_x, -sin, shift[:, 0]], 1),
                             torch.stack([sin * scale_x, cos, shift[:, 1]], 1)], 1).to(x)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def __call__(self, xb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        key = int((idx.detach().cpu().long() * 2654435761 + 97).remainder(2**31 - 1).sum())
        self.gen.manual_seed(self.seed * 1_000_003 + key)
        if self.geometry != "none":
            xb = self._jitter(xb)
        if self.alpha > 0 and xb.shape[0] > 1:
            n = xb.shape[0]
            self._lam = beta_sample(self.alpha, n, self.gen).to(xb)
            self._perm = torch.randperm(n, generator=self.gen).to(xb.device)
            lx = self._lam.view(-1, *([1] * (xb.dim() - 1)))
            xb = lx * xb + (1 - lx) * xb[self._perm]
        else:
            self._perm = self._lam = None
        return xb

    def mix(self, t: torch.Tensor) -> torch.Tensor:
        """Targets (B, L) of the last batch mixed like its inputs (unchanged without MixUp)."""
        if self._perm is None:
            return t
        lam = self._lam.view(-1, 1).to(t)
        return lam * t + (1 - lam) * t[self._perm]


def beta_sample(alpha: float, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` draws of Beta(alpha, alpha) (float32 (n,)) reproducibly from ``gen``.

    alpha = 1 is U(0, 1) and is drawn directly; otherwise ``torch.distributions.Beta`` (which takes
    no generator) runs under a forked global RNG seeded from ``gen``, leaving the global RNG as it was.
    """
    if alpha == 1.0:
        return torch.rand(n, generator=gen)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.distributions.Beta(float(alpha), float(alpha)).sample((n,)).float()


def recipe_changes(epochs: int | None, batch_size: int | None = None, lr: float | None = None) -> dict:
    """Fields of the student recipe a method replaces (None keeps the profile's value)."""
    out = {}
    for key, value in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr)):
        if value is not None:
            out[key] = value
    return out


def distil_on_transfer_set(
    ctx: MethodContext,
    x: torch.Tensor,
    targets: torch.Tensor,
    *,
    augment: OnlineAugment | None = None,
    desc: str = "student",
    **changes,
) -> tuple[nn.Module, list[dict]]:
    """A fresh student (seed offset 0) trained with ``ctx.train`` on uint8 images ``x`` (N, C, H, W)
    against ``targets`` float (N, L) with :func:`db3kd.losses.soft_cross_entropy`.

    augment: optional :class:`OnlineAugment` (inputs and targets mixed alike). ``changes`` replace
    fields of the student recipe (epochs=, batch_size=, lr=). Returns (student, history).
    """
    t = targets.to(ctx.device)
    student = ctx.new_model()

    def loss(logits: torch.Tensor, _xb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        tb = t[idx]
        return soft_cross_entropy(logits, augment.mix(tb) if augment is not None else tb)

    history = ctx.train(student, loss, x=x, desc=desc, inputs=augment, **changes)
    return student, history


# --- noise-input -----------------------------------------------------------------------------------


class NoiseInputParams(MethodParams):
    """num_images: noise images, one query each (the paper does not give its count; 24k matches
    FS-BBT's MNIST transfer set); noise: ``uniform`` (every pixel U(0, 1)) or ``zsdb3kd`` (the
    authors' ZSDB3KD initialisation, ``clamp((U + 0.2) s1 + N s2)``, REFERENCE section 4);
    epochs / batch_size / lr: student recipe overrides (None = the profile's student recipe)."""

    num_images: int = Field(default=24000, ge=2)
    noise: Literal["uniform", "zsdb3kd"] = "uniform"
    epochs: int | None = Field(default=None, ge=1)
    batch_size: int | None = Field(default=None, ge=2)
    lr: float | None = Field(default=None, gt=0)

    profile_overrides: ClassVar[dict] = {
        "cpu": {"num_images": 10000},
        "cpu/digits": {"num_images": 5000},
        "smoke": {"num_images": 400, "epochs": 2},
    }


@register_method
class NoiseInput(Method):
    """Noise input: a student trained with CE on random noise images labelled by the teacher.

    Access ``labels`` (one query per noise image), no data. The data-free floor of the DB3KD
    paper (CIFAR-10: 13.53% with labels). The noise is drawn with a generator seeded by the run
    seed and quantised to uint8 before it is queried, so the student trains on exactly the images
    the teacher labelled. ``transfer_set_size`` = ``num_images`` = queries.
    """

    name = "noise-input"
    paper = DB3KD_PAPER + " (Tables 3-4, noise input)"
    teacher_access = "labels"
    data = "none"
    Params = NoiseInputParams
    paper_results = {"cifar10": 13.53}

    def run(self, ctx: MethodContext) -> MethodOutput:
        from baselines.common import final_val_accuracy

        p = self.params
        gen = torch.Generator().manual_seed(ctx.seed * 1000 + 17)
        x = sample_noise(p.num_images, ctx.image_shape, p.noise, gen)
        targets, _labels = label_transfer_set(ctx.teacher, x, ctx.num_classes)
        metrics = target_metrics(targets)
        ctx.log(metrics, None)
        student, history = distil_on_transfer_set(ctx, x, targets, **recipe_changes(p.epochs, p.batch_size, p.lr))
        metrics["val_accuracy"] = final_val_accuracy(history)
        return MethodOutput(student=student, metrics=metrics, transfer_set_size=int(x.shape[0]))
