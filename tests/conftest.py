"""Shared test fixtures: analytic classifiers whose boundaries are known in closed form."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Teacher checkpoints and extracted data go to one per-session temporary cache."""
    monkeypatch.setenv("DB3KD_CACHE", str(tmp_path_factory.getbasetemp() / "db3kd-cache"))
    monkeypatch.chdir(tmp_path_factory.getbasetemp())


class Linear(nn.Module):
    """logits = x.flatten(1) @ W.T + b: every decision boundary is a hyperplane."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        return x.flatten(1) @ self.weight.T + self.bias


@pytest.fixture
def binary_linear():
    """A 2-class linear teacher on 1x4x4 images whose boundary passes through the cube's centre.

    Returns (model, unit normal w (16,), offset c) with class 1 where w.x > c.
    """
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, generator=g)
    w /= w.norm()
    c = float((w * 0.5).sum())
    model = Linear(torch.stack([torch.zeros(16), w]), torch.tensor([0.0, -c]))
    return model, w, c


def centred_points(n: int, seed: int = 1, spread: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.5 + spread * (torch.rand(n, 1, 4, 4, generator=g) - 0.5)).float()


def shared_data_or_skip() -> Path:
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"real MNIST files not found at {SHARED_DATA}/MNIST/raw")
    return SHARED_DATA


def fake_splits(n_train: int = 40, n_val: int = 12, n_test: int = 20):
    """A learnable toy DataSplits: random 1x16x16 uint8 images, 10 classes, class c brighter in row block c."""
    from db3kd.data import DataSplits

    g = torch.Generator().manual_seed(0)

    def make(n):
        y = torch.arange(n) % 10
        x = torch.randint(0, 100, (n, 1, 16, 16), generator=g)
        for i in range(n):
            x[i, 0, y[i] : y[i] + 6, :] += 150
        return x.clamp(0, 255).to(torch.uint8), y.to(torch.int64)

    (tx, ty), (vx, vy), (sx, sy) = make(n_train), make(n_val), make(n_test)
    return DataSplits(name="digits", num_classes=10, train_x=tx, train_y=ty, val_x=vx, val_y=vy, test_x=sx,
                      test_y=sy, root="fake")
