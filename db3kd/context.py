"""What a method receives (:class:`MethodContext`) and returns (:class:`MethodOutput`).

The context carries the data a method may use, the student recipe, and ``teacher``: exactly what
the method's declared ``teacher_access`` allows (None, a HardLabelOracle, a ScoreOracle or the
module). It holds no other reference to the teacher, so a ``labels`` method cannot reach logits
or parameters through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from db3kd.config import RunConfig, StageConfig

__all__ = ["MethodContext", "MethodOutput"]


@dataclass
class MethodOutput:
    """A trained student plus what the method measured on the way.

    student: the trained nn.Module. metrics: scalars to record (e.g. target entropy).
    transfer_set_size: images the student was trained on (queries per sample divide by it).
    milestone_accuracy: {queries per pair: student test accuracy} when the method trains one
    student per query milestone (DB3KD-MBD, paper Fig. 4). artifacts: name -> file path.
    """

    student: nn.Module
    metrics: dict[str, float] = field(default_factory=dict)
    transfer_set_size: int | None = None
    milestone_accuracy: dict[int, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    tables: dict[str, Any] = field(default_factory=dict)
    resumed_queries: int = 0  # spent by an interrupted earlier run of this configuration whose work was reused
    soft_labels: torch.Tensor | None = None  # float32 (N, L) the student was trained on (digest in the record)


@dataclass
class MethodContext:
    """Everything a method may use. Images are uint8 (N, C, H, W); labels int64 (N,).

    train_x/train_y: the method's training data (the profile's subset of the training split);
    val_x/val_y: the validation split (model selection only); test_x/test_y are *not* here:
    methods never see the test set (``evaluate_milestone`` scores a student on it for curves).
    teacher: per the method's teacher_access. config: the resolved run configuration.
    log(metrics, step): records metrics (MLflow when tracked). workdir: a folder for artifacts.
    executor: how chunked label construction runs (:class:`db3kd.distributed.ChunkExecutor`:
    in this process; ``RayExecutor``: one Ray task per chunk), used as
    ``ctx.executor.search(fn, ctx.teacher, ..., num_chunks=..., checkpoint_dir=...)``.
    """

    config: RunConfig
    params: Any
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    num_classes: int
    teacher: Any
    device: torch.device
    workdir: Path
    log: Callable[[dict, int | None], None]
    progress: bool = False
    evaluate_milestone: Callable[[nn.Module], float] | None = None
    resumable: bool = False  # checkpoint long stages into workdir and resume from them
    teacher_checkpoint: str | None = None  # digest of the teacher's weights (cache key of label construction)
    executor: Any = None  # db3kd.distributed.ChunkExecutor (default: in-process) that label construction runs through

    def __post_init__(self):
        if self.executor is None:
            from db3kd.distributed import ChunkExecutor

            self.executor = ChunkExecutor()

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    def new_model(self, arch: str | None = None, *, seed_offset: int = 0) -> nn.Module:
        """A freshly initialised model (default: the student architecture), seeded from the run seed."""
        from db3kd.models import get_model
        from db3kd.training import seed_everything

        seed_everything(self.seed * 1000 + seed_offset)
        c, h, _ = self.image_shape
        name = arch or self.config.student.arch
        model = get_model(name, num_classes=self.num_classes, in_channels=c, image_size=h)
        if self.config.student.pretrained and name == self.config.student.arch:  # e.g. ImageNet ResNet-18 (Flowers102)
            from db3kd.pretrained import load_pretrained

            load_pretrained(model, name, self.config.student.pretrained)
        return model

    def train(
        self,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        x: torch.Tensor | None = None,
        stage: StageConfig | None = None,
        desc: str = "student",
        seed_offset: int = 0,
        inputs: Callable | None = None,
        **changes,
    ) -> list[dict]:
        """Train ``model`` with the student recipe (or ``stage``) on ``x`` (default: train_x).

        loss_fn(logits, batch_x, idx) -> scalar; idx indexes x. ``changes`` override recipe fields
        (e.g. epochs=...). Per-epoch metrics are logged with the prefix ``desc``.
        """
        from dataclasses import replace

        cfg = (stage or self.config.student).train_config()
        if changes:
            cfg = replace(cfg, **changes)
        from db3kd.training import fit

        def log(row, step):
            self.log({f"{desc}/{k}": v for k, v in row.items()}, step)

        return fit(
            model, self.train_x if x is None else x, loss_fn, cfg, seed=self.seed * 1000 + seed_offset + 1,
            device=self.device, val=(self.val_x, self.val_y), desc=desc, progress=self.progress, log=log,
            inputs=inputs, checkpoint=self.checkpoint(f"train-{desc}.pt"),
        )

    def checkpoint_dir(self, name: str) -> Path | None:
        """A folder for a stage's resumable chunks in the run directory, or None when not resumable
        (a distributed executor always gets one: its workers write the chunks there)."""
        if not self.resumable and not self.executor.distributed:
            return None
        path = self.workdir / "checkpoints" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def checkpoint(self, name: str) -> Path | None:
        """Path of a stage checkpoint in the run directory, or None when the run is not resumable."""
        if not self.resumable:
            return None
        path = self.workdir / "checkpoints" / name.replace("/", "_")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path
