"""What counts as a hit: the class test of Eq. 3 (BD/MBD) and Eq. 8 (ZSDB3KD), as criterion objects.

Like foolbox's ``criteria.py``, a criterion holds the classes of the rows it judges and answers
whether the teacher's labels are a hit. It replaces a bare ``targeted=True`` flag:

* :class:`TargetedMisclassification` (target classes n): a hit when the teacher answers n
  (label construction, paper Eq. 3 and Eq. 5).
* :class:`Misclassification` (original classes m): a hit when the teacher answers anything but m
  (ZSDB3KD generation, paper Eq. 8).

``criterion(labels)`` with labels int64 (A,) (or (A, Q), broadcast against the classes as
(A, 1)) returns bool of the labels' shape; ``criterion[rows]`` is the criterion of a subset of
rows (rows: int64 or bool index).
"""

from __future__ import annotations

import torch

__all__ = ["Criterion", "TargetedMisclassification", "Misclassification"]


class Criterion:
    """Base class: ``classes`` int64 (A,), one class per row; subclasses define :meth:`is_hit`."""

    def __init__(self, classes: torch.Tensor):
        classes = torch.as_tensor(classes, dtype=torch.int64)
        if classes.dim() != 1:
            raise ValueError(f"{type(self).__name__} needs one class per row (shape (A,)), got {tuple(classes.shape)}")
        self.classes = classes

    def is_hit(self, labels: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, labels: torch.Tensor) -> torch.Tensor:
        classes = self.classes if labels.dim() == 1 else self.classes.view(-1, *([1] * (labels.dim() - 1)))
        return self.is_hit(labels, classes)

    def __getitem__(self, rows) -> "Criterion":
        return type(self)(self.classes[rows])

    def __len__(self) -> int:
        return self.classes.shape[0]

    def to(self, device) -> "Criterion":
        return type(self)(self.classes.to(device))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} rows)"


class TargetedMisclassification(Criterion):
    """A hit when the teacher answers the row's target class n (paper Eq. 3, Eq. 5: ``F(x) = n``)."""

    def is_hit(self, labels, classes):
        return labels == classes


class Misclassification(Criterion):
    """A hit when the teacher answers anything but the row's class m (paper Eq. 8: ``F(o) != m``)."""

    def is_hit(self, labels, classes):
        return labels != classes
