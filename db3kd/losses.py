"""Distillation losses, written as formulas and checked by golden-value tests.

All KL terms use ``reduction="batchmean"`` (the mathematically correct mean KL per sample);
PyTorch's default ``"mean"`` divides by batch x classes and silently shrinks a KD weight by the
class count (REFERENCE.md section 5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kd_loss", "soft_cross_entropy", "kl_to_targets"]


def kl_to_targets(student_logits: torch.Tensor, target_probs: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """``KL(p_t || softmax(z_s / tau))`` averaged over the batch (``batchmean``).

    student_logits: float (B, L); target_probs: float (B, L), rows summing to 1 (already at the
    target's own temperature). Returns a scalar.
    """
    return F.kl_div(F.log_softmax(student_logits / tau, dim=1), target_probs, reduction="batchmean")


def kd_loss(
    student_logits: torch.Tensor,
    y: torch.Tensor,
    target_probs: torch.Tensor,
    tau: float,
    *,
    w_ce: float = 1.0,
    w_kd: float = 1.0,
    tau_squared: bool = False,
) -> torch.Tensor:
    """Knowledge-distillation loss, paper Eq. 1 (Hinton et al. 2015 with ``tau_squared=True``).

    ``L = w_ce * CE(softmax(z_s), y) + w_kd * c * KL(p_t^tau || softmax(z_s / tau))`` with
    ``c = tau^2`` when ``tau_squared`` (Hinton's gradient-scale correction) else 1 (Eq. 1 as printed:
    DB3KD uses lambda = w_kd = 1, tau = 0.3). student_logits: float (B, L); y: int64 (B,);
    target_probs: float (B, L), the teacher's (or DB3KD's) soft labels at temperature tau.
    Returns a scalar.
    """
    ce = F.cross_entropy(student_logits, y)
    scale = tau * tau if tau_squared else 1.0
    return w_ce * ce + w_kd * scale * kl_to_targets(student_logits, target_probs, tau)


def soft_cross_entropy(student_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """``-mean_b sum_l p_t[b, l] log softmax(z_s)[b, l]``: cross-entropy against soft targets (FS-BBT)."""
    return -(target_probs * F.log_softmax(student_logits, dim=1)).sum(dim=1).mean()
