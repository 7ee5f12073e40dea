"""The one training loop (teachers, students and every baseline use it) and evaluation.

Data stay uint8 tensors (N, C, H, W), moved once to the training device; each mini-batch is
indexed there, converted to float32 in [0, 1] and augmented as a whole batch (vectorised crop and
flip), so a whole training set costs one byte per pixel and no image crosses the host per step.
No DataLoader: batches are slices of a permutation drawn from a CPU generator seeded by the run
seed, and the augmentation draws come from the same generator, which makes a run bit-for-bit
repeatable. Models train in their device's fast memory format (:mod:`db3kd.layout`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TrainConfig", "fit", "evaluate", "predict_logits", "seed_everything", "atomic_save"]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one training stage.

    epochs: passes over the data; batch_size: images per step; lr: learning rate; optimizer:
    ``adam`` or ``sgd``; weight_decay, momentum (sgd); lr_milestones: epochs at which the lr is
    multiplied by lr_gamma; augment: ``none``, ``crop`` (random shift by up to 2 pixels, for
    digits) or ``crop_flip`` (random crop with 4-pixel padding and horizontal flip, the CIFAR recipe);
    schedule: ``none`` or ``onecycle`` (``torch.optim.lr_scheduler.OneCycleLR`` with peak ``lr``,
    stepped after every optimiser step over ``epochs * ceil(N / batch_size)`` steps).
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9
    lr_milestones: tuple[int, ...] = field(default_factory=tuple)
    lr_gamma: float = 0.1
    augment: Literal["none", "crop", "crop_flip"] = "none"
    schedule: Literal["none", "onecycle"] = "none"


def seed_everything(seed: int) -> None:
    """Seed torch's CPU and CUDA generators (numpy is not used for anything random)."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _to_float(x: torch.Tensor, device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def _augment(x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """Augment a whole batch x float (N, C, H, W) on its own device: ``crop`` shifts every image by up to
    2 pixels (zero padding), ``crop_flip`` takes a random crop of the 4-pixel-padded image and flips
    half of them horizontally. The offsets (then the flips) are drawn from the CPU generator ``gen``
    in that order; the crop is one gather, no loop over images."""
    if kind == "none":
        return x
    n, c, h, w = x.shape
    pad = 4 if kind == "crop_flip" else 2
    padded = F.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (N, 1, 1, W)
    out = padded[torch.arange(n, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[None, :, None, None],
                 rows, cols]
    if kind == "crop_flip":
        flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def fit(
    model: nn.Module,
    x: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    cfg: TrainConfig,
    *,
    seed: int,
    device: str | torch.device = "cpu",
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    desc: str = "train",
    progress: bool = False,
    log: Callable[[dict, int], None] | None = None,
    inputs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    checkpoint: str | Path | None = None,
    memory_format: str | None = None,
) -> list[dict]:
    """Train ``model`` in place for ``cfg.epochs`` epochs and return the per-epoch history.

    x: uint8 (N, C, H, W) or float in [0, 1]; loss_fn(logits, batch_x, idx) -> scalar, where idx is
    int64 (B,) indices of the batch into x (methods look their targets up with it). val: optional
    (x, y) evaluated after each epoch (``val_accuracy``, a fraction). log(metrics, epoch) is
    called once per epoch. inputs(batch_x, idx) may replace the float batch (e.g. MixUp).
    checkpoint: file written atomically after every epoch (model, optimizer, scheduler, RNG states,
    history); when it exists, training resumes after its last epoch and ends bit-identical to an
    uninterrupted run. memory_format: ``contiguous`` or ``channels_last``; None = the device's fast
    layout (:func:`db3kd.layout.fast_memory_format`); the model is moved to it in place.
    History rows: ``{"epoch", "train_loss", "val_accuracy"?}``.
    """
    from tqdm.auto import tqdm

    from db3kd.layout import FORMATS, fast_memory_format

    device = torch.device(device)
    shape = tuple(x.shape[1:])
    fmt = fast_memory_format(device, model, shape) if memory_format is None else FORMATS[memory_format]
    model.to(device, memory_format=fmt)
    data = x.to(device)  # the training set lives on the device; batches are indexed there
    gen = torch.Generator().manual_seed(seed)
    opt = _optimizer(model, cfg)
    n = x.shape[0]
    per_batch = cfg.schedule == "onecycle"
    if per_batch:
        steps = cfg.epochs * max(1, -(-n // cfg.batch_size))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    else:
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(cfg.lr_milestones), cfg.lr_gamma) if cfg.lr_milestones else None
    history: list[dict] = []
    first = 0
    if checkpoint is not None and Path(checkpoint).exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history, first = state["history"], len(state["history"])
    bar = tqdm(range(first, cfg.epochs), desc=desc, unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        perm = torch.randperm(n, generator=gen)
        total, count = 0.0, 0
        for start in range(0, n, cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            if len(idx) < 2 and n >= 2:  # BatchNorm cannot train on one image
                continue
            idx_dev = idx.to(device)
            xb = _augment(_to_float(data[idx_dev], device), cfg.augment, gen)
            if xb.dim() == 4:
                xb = xb.contiguous(memory_format=fmt)
            if inputs is not None:
                xb = inputs(xb, idx)
            loss = loss_fn(model(xb), xb, idx_dev)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if per_batch:
                sched.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        if sched is not None and not per_batch:
            sched.step()
        row = {"epoch": epoch, "train_loss": total / max(count, 1)}
        if val is not None:
            row["val_accuracy"] = evaluate(model, val[0], val[1], device=device)
        history.append(row)
        bar.set_postfix({k: round(v, 4) for k, v in row.items() if k != "epoch"})
        if log is not None:
            log({k: v for k, v in row.items() if k != "epoch"}, epoch)
        if checkpoint is not None:
            atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict() if sched is not None else None,
                         "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "history": history},
                        checkpoint)
    return history


def atomic_save(obj, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: a reader never sees half a file."""
    from db3kd.errors import DB3KDError

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # disk full, read-only folder, ...
        raise DB3KDError(f"cannot write {path}: {exc}. Nothing partial was left under that name; free space or "
                         f"choose a writable folder and rerun.") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def predict_logits(model: nn.Module, x: torch.Tensor, *, batch_size: int = 1024, device="cpu") -> torch.Tensor:
    """Logits float32 (N, L) of ``model`` on uint8/float images x (N, C, H, W), in eval mode."""
    model.to(device).eval()
    outs = []
    with torch.inference_mode():
        for start in range(0, x.shape[0], batch_size):
            outs.append(model(_to_float(x[start : start + batch_size], device)).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024, device="cpu") -> float:
    """Top-1 accuracy of ``model`` on (x, y) as a fraction in [0, 1]; x uint8 or float (N, C, H, W)."""
    if x.shape[0] == 0:
        return float("nan")
    pred = predict_logits(model, x, batch_size=batch_size, device=device).argmax(1)
    return float((pred == y.cpu()).float().mean())
