"""Penultimate features of any registry model, without touching :mod:`db3kd.models`.

Every classifier in the registry ends in an ``nn.Linear`` that maps the penultimate features to
the logits (LeNet-5: ``classifier[-1]``, AlexNet: ``classifier[-1]``, torchvision ResNet: ``fc``).
:class:`FeatureTap` registers a forward *pre*-hook on that layer and keeps its input, so one
ordinary ``model(x)`` call yields both the logits and the features. SSKD (Xu et al., ECCV 2020)
uses it to put a projection head on top of a network.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["classifier_layer", "FeatureTap", "penultimate_features"]


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The final ``nn.Linear`` of ``model`` (the last one registered, in ``model.modules()`` order).

    Raises TypeError when the model has no ``nn.Linear``.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TypeError(f"{type(model).__name__} has no nn.Linear layer to take penultimate features from")
    return linears[-1]


class FeatureTap:
    """Records the input of ``model``'s final Linear layer on every forward call.

    After ``logits = model(x)`` with x float (N, C, H, W), ``tap.features`` is float32 (N, D) with
    ``D = tap.dim`` (the layer's ``in_features``), attached to the autograd graph when the forward
    was. Call :meth:`remove` to detach the hook. The tap is a plain object (not a module), so it
    adds no parameters or state-dict entries.
    """

    def __init__(self, model: nn.Module):
        self.layer = classifier_layer(model)
        self.dim = int(self.layer.in_features)
        self.features: torch.Tensor | None = None
        self._handle = self.layer.register_forward_pre_hook(self._hook)

    def _hook(self, _module: nn.Module, args: tuple) -> None:
        self.features = args[0]

    def remove(self) -> None:
        """Remove the hook (idempotent) and drop the last features."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.features = None


def penultimate_features(model: nn.Module, x: torch.Tensor, *, batch_size: int = 1024, device="cpu") -> torch.Tensor:
    """Penultimate features float32 (N, D) of ``model`` on uint8 / float [0, 1] images (N, C, H, W), eval mode."""
    tap = FeatureTap(model)
    model.to(device).eval()
    outs = []
    try:
        with torch.inference_mode():
            for start in range(0, x.shape[0], batch_size):
                xb = x[start : start + batch_size].to(device)
                model(xb.float().div(255.0) if xb.dtype == torch.uint8 else xb.float())
                outs.append(tap.features.float().cpu())
    finally:
        tap.remove()
    return torch.cat(outs) if outs else torch.empty(0, tap.dim)
