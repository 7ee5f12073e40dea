"""Soft labels from sample robustness (paper Sec. 3.2.2, Eq. 6-7).

For a sample of class m with robustness vector ``r`` (length L, ``r[m]`` ignored) and
``S = sum_{i != m} 1 / r_i``:

* Eq. 6: ``a_hat_n = 1 / r_n`` for n != m and ``a_hat_m = S``;
* Eq. 7: ``a_n = a_hat_n / S^2`` (so ``a_m = 1 / S``, ``a_n = (1 / r_n) / S^2``);
* target: ``p = softmax(a / tau)``, tau = 0.3 in the paper.

``variant="released"`` is the authors' released code instead (REFERENCE.md section 4): Eq. 6 only,
``p = softmax(a_hat / T)`` with T = 20. It exists for comparison only; the paper is the default.

Guards: ``r`` is clamped to ``r_min`` before inversion, so a distance of 0 (a sample the teacher
misclassifies, see :mod:`db3kd.robustness`) gives a finite, nearly uniform label rather than NaN;
``r = inf`` (no usable reference) contributes ``1/r = 0``; a row with no finite distance at all
(``S = 0``, infinitely robust) gets the one-hot label of its class. Note a quirk of Eq. 7 as
printed: with a single finite distance, ``a_m = a_n = r_n``, so m and n get equal mass.
"""

from __future__ import annotations

import torch

__all__ = ["soft_labels_from_robustness", "robustness_logits", "label_statistics", "VARIANTS"]

VARIANTS = ("paper", "released")
RELEASED_TEMPERATURE = 20.0


def robustness_logits(r: torch.Tensor, y: torch.Tensor, *, variant: str = "paper", r_min: float = 1e-6) -> torch.Tensor:
    """Pre-softmax activations ``a`` (Eq. 7, or Eq. 6 alone for ``variant="released"``).

    r: float (N, L) robustness in L2 units (entries at ``y`` ignored); y: int64 (N,) class m of
    each row. Returns float32 (N, L); rows with ``S = 0`` are +inf at m and 0 elsewhere.
    Raises ValueError for an unknown variant, mismatched shapes, NaN or negative distances.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown soft-label variant {variant!r}; valid: {', '.join(VARIANTS)}")
    if r.dim() != 2:
        raise ValueError(f"r must have shape (N, L), got {tuple(r.shape)}")
    y = torch.as_tensor(y, dtype=torch.int64, device=r.device)
    if y.shape != (r.shape[0],):
        raise ValueError(f"y must have shape ({r.shape[0]},), got {tuple(y.shape)}")
    if r_min <= 0:
        raise ValueError(f"r_min must be > 0, got {r_min}")
    r = r.float()
    if torch.isnan(r).any():
        raise ValueError("robustness contains NaN")
    own = torch.nn.functional.one_hot(y, r.shape[1]).bool()
    if (r.masked_fill(own, 0) < 0).any():
        raise ValueError("robustness distances must be >= 0")
    inv = torch.where(own, torch.zeros_like(r), 1.0 / r.clamp_min(r_min))  # 1/inf = 0
    s = inv.sum(dim=1, keepdim=True)  # S = sum_{i != m} 1 / r_i
    a_hat = torch.where(own, s.expand_as(r), inv)  # Eq. 6
    if variant == "released":
        return a_hat
    a = a_hat / s.square()  # Eq. 7
    no_info = (s == 0).squeeze(1)
    if no_info.any():
        a[no_info] = torch.where(own[no_info], torch.full_like(a[no_info], float("inf")), torch.zeros_like(a[no_info]))
    return a


def soft_labels_from_robustness(
    r: torch.Tensor,
    y: torch.Tensor,
    tau: float = 0.3,
    *,
    variant: str = "paper",
    r_min: float = 1e-6,
) -> torch.Tensor:
    """Teacher soft labels from robustness, paper Eq. 6-7: ``p = softmax(a / tau)``.

    r: float (N, L) distances (``r[i, y[i]]`` ignored, inf allowed); y: int64 (N,); tau: softmax
    temperature (> 0, paper 0.3; ignored by ``variant="released"``, which uses T = 20).
    Returns float32 (N, L), rows summing to 1, argmax = y. Raises ValueError for tau <= 0.
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    a = robustness_logits(r, y, variant=variant, r_min=r_min)
    temperature = RELEASED_TEMPERATURE if variant == "released" else tau
    p = torch.softmax(a / temperature, dim=1)
    own = torch.as_tensor(y, dtype=torch.int64, device=p.device)
    no_info = ~torch.isfinite(r.float()).scatter(1, own.view(-1, 1), False).any(dim=1)  # S = 0
    if no_info.any():
        p[no_info] = torch.nn.functional.one_hot(own[no_info], p.shape[1]).float()
    return p


def label_statistics(p: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Mean target entropy (nats) and mean mass on the true class of soft labels p (N, L).

    REFERENCE.md section 4 asks every run to report both, so users see how soft the targets are.
    """
    p = p.float()
    entropy = -(p * p.clamp_min(1e-12).log()).sum(dim=1)
    true_mass = p.gather(1, torch.as_tensor(y, device=p.device).view(-1, 1)).squeeze(1)
    return {"target_entropy": float(entropy.mean()), "true_class_mass": float(true_mass.mean())}
