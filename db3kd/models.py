"""Teacher and student networks of the benchmark, and a registry to build them by name.

Every model takes a float32 batch ``(N, C, H, W)`` with values in [0, 1] (no mean/std
normalisation, REFERENCE section 3) and returns float32 logits ``(N, num_classes)``.

Layers and parameter counts follow REFERENCE section 3 ("Models"), which follows the paper
(Wang, "Zero-shot knowledge distillation from a decision-based black-box model", ICML 2021) and
the authors' code. Counts below are at the paper's settings (10 classes; LeNet at 1x28x28,
AlexNet at 3x32x32) and are checked exactly by ``tests/test_models.py``:

=================  ===========  =========================================
name               parameters   aliases
=================  ===========  =========================================
lenet5                 187,780  lenet-5
lenet5-half             47,645  lenet-5-half
lenet5-fifth             7,964  lenet5-1/5, lenet-5-1/5, lenet-5-fifth
alexnet             23,290,954
alexnet-half         5,840,426
alexnet-quarter      1,468,954
resnet18            11,220,132  resnet-18   (CIFAR stem, 3x32x32, 100 classes)
resnet34            21,328,292  resnet-34   (CIFAR stem, 3x32x32, 100 classes)
resnet50            23,705,252  resnet-50   (CIFAR stem, 3x32x32, 100 classes)
=================  ===========  =========================================

Usage::

    model = get_model("LeNet5-1/5", num_classes=10, in_channels=1, image_size=28)

Builders follow torchvision's ``models/`` conventions: plain functions
``fn(num_classes, in_channels, image_size) -> nn.Module`` registered with :func:`register_model`
in a module-level dict. No builder ever loads pretrained weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.models import resnet

from db3kd.errors import ConfigError

__all__ = [
    "LeNet5",
    "AlexNetCifar",
    "register_model",
    "get_model",
    "model_names",
    "count_parameters",
]

Builder = Callable[[int, int, int], nn.Module]

_MODELS: dict[str, Builder] = {}  # canonical (lowercase) name -> builder
_ALIASES: dict[str, str] = {}  # lowercase name or alias -> canonical name


def register_model(name: str, *aliases: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``fn(num_classes, in_channels, image_size) -> nn.Module`` as ``name``.

    Names and aliases are case-insensitive (stored lowercase). Raises :class:`ConfigError` (a
    ``ValueError``) if the name or any alias is already taken; nothing is registered in that case.
    """
    keys = [name.lower(), *(a.lower() for a in aliases)]

    def decorator(fn: Builder) -> Builder:
        taken = [k for k in keys if k in _ALIASES]
        if taken or len(set(keys)) != len(keys):
            raise ConfigError(f"model name(s) already registered or repeated: {taken or keys}")
        _MODELS[keys[0]] = fn
        for key in keys:
            _ALIASES[key] = keys[0]
        return fn

    return decorator


def model_names() -> list[str]:
    """Canonical model names, sorted (aliases are not listed)."""
    return sorted(_MODELS)


def get_model(name: str, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """Build a freshly initialised model by (case-insensitive) name or alias.

    Raises :class:`ConfigError` (a ``ValueError``) for an unknown name, listing the valid names,
    or for non-positive sizes.
    """
    canonical = _ALIASES.get(name.lower())
    if canonical is None:
        raise ConfigError(f"unknown model {name!r}; valid names: {', '.join(model_names())}")
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{arg} must be a positive int, got {value!r}")
    return _MODELS[canonical](num_classes, in_channels, image_size)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model`` (trainable or not; BatchNorm buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def _check_spatial(size: int, image_size: int, model: str) -> int:
    if size < 1:
        raise ConfigError(f"image_size={image_size} is too small for {model}")
    return size


# --- LeNet-5 family (REFERENCE section 3) --------------------------------------------------------


class LeNet5(nn.Module):
    """LeNet-5 as used by the paper: two 5x5 convolutions (no padding), each followed by ReLU and
    2x2 max-pooling, then Linear -> ReLU -> Linear. No BatchNorm, no dropout.

    Source: paper Sec. 4 ("LeNet-5 with two convolutional layers"; half and 1/5 of the filters)
    and REFERENCE section 3. Widths ``(c1, c2, fc)``: LeNet-5 (20, 50, 200), half (10, 25, 100),
    fifth (4, 10, 40), i.e. 187,780 / 47,645 / 7,964 parameters at 1x28x28, 10 classes.

    Input float32 ``(N, in_channels, image_size, image_size)`` in [0, 1]; output float32 logits
    ``(N, num_classes)``. The flatten size is computed from ``image_size``: 28 -> 4x4, 16 -> 1x1.
    """

    def __init__(
        self,
        c1: int = 20,
        c2: int = 50,
        fc: int = 200,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
    ):
        super().__init__()
        spatial = _check_spatial(((image_size - 4) // 2 - 4) // 2, image_size, "LeNet-5")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(c2 * spatial * spatial, fc),
            nn.ReLU(inplace=True),
            nn.Linear(fc, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model("lenet5", "lenet-5")
def lenet5(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> LeNet5:
    """LeNet-5 teacher, widths (20, 50, 200): 187,780 parameters at 1x28x28, 10 classes."""
    return LeNet5(20, 50, 200, num_classes, in_channels, image_size)


@register_model("lenet5-half", "lenet-5-half")
def lenet5_half(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> LeNet5:
    """LeNet-5-half student, widths (10, 25, 100): 47,645 parameters at 1x28x28, 10 classes."""
    return LeNet5(10, 25, 100, num_classes, in_channels, image_size)


@register_model("lenet5-fifth", "lenet5-1/5", "lenet-5-1/5", "lenet-5-fifth")
def lenet5_fifth(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> LeNet5:
    """LeNet-5-1/5 student, widths (4, 10, 40): 7,964 parameters at 1x28x28, 10 classes."""
    return LeNet5(4, 10, 40, num_classes, in_channels, image_size)


# --- AlexNet for CIFAR (REFERENCE section 3) -----------------------------------------------------


class AlexNetCifar(nn.Module):
    """AlexNet for 32x32 images as used by the paper and the authors' code.

    All kernels 3x3 with padding 1; the first convolution has stride 2; BatchNorm after every
    convolution; three 2x2 max-pools; two FC blocks Linear -> ReLU -> Dropout(0.5) -> BatchNorm1d;
    final Linear. Widths (64, 192, 384, 256, 256; FC 4096) are scaled by ``width`` (1, 1/2, 1/4):
    23,290,954 / 5,840,426 / 1,468,954 parameters at 3x32x32, 10 classes.

    Source: paper Sec. 4 (AlexNet teacher, AlexNet-half / -quarter students) and REFERENCE
    section 3. Input float32 ``(N, in_channels, image_size, image_size)`` in [0, 1]; output
    float32 logits ``(N, num_classes)``. The flatten size is computed from ``image_size``
    (32 -> 2x2x256 = 1024 at full width).
    """

    def __init__(self, width: float = 1.0, num_classes: int = 10, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        c1, c2, c3, c4, c5, fc = (int(c * width) for c in (64, 192, 384, 256, 256, 4096))
        spatial = _check_spatial(((image_size - 1) // 2 + 1) // 8, image_size, "AlexNet")

        def conv(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        def fc_block(fin: int, fout: int) -> list[nn.Module]:
            return [nn.Linear(fin, fout), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.BatchNorm1d(fout)]

        self.features = nn.Sequential(
            *conv(in_channels, c1, stride=2),
            nn.MaxPool2d(2),
            *conv(c1, c2),
            nn.MaxPool2d(2),
            *conv(c2, c3),
            *conv(c3, c4),
            *conv(c4, c5),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            *fc_block(c5 * spatial * spatial, fc),
            *fc_block(fc, fc),
            nn.Linear(fc, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model("alexnet")
def alexnet(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> AlexNetCifar:
    """AlexNet teacher for CIFAR: 23,290,954 parameters at 3x32x32, 10 classes."""
    return AlexNetCifar(1.0, num_classes, in_channels, image_size)


@register_model("alexnet-half")
def alexnet_half(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> AlexNetCifar:
    """AlexNet-half student: 5,840,426 parameters at 3x32x32, 10 classes."""
    return AlexNetCifar(0.5, num_classes, in_channels, image_size)


@register_model("alexnet-quarter")
def alexnet_quarter(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> AlexNetCifar:
    """AlexNet-quarter student: 1,468,954 parameters at 3x32x32, 10 classes."""
    return AlexNetCifar(0.25, num_classes, in_channels, image_size)


# --- ResNets (torchvision; REFERENCE section 3) --------------------------------------------------


def _resnet(arch: Callable[..., resnet.ResNet], num_classes: int, in_channels: int, image_size: int) -> resnet.ResNet:
    """torchvision ResNet, randomly initialised (``weights=None``, never downloads anything).

    For ``image_size <= 64`` uses the CIFAR stem of the KD literature (conv1 3x3, stride 1,
    padding 1; no max-pool); otherwise keeps the ImageNet stem (7x7 stride 2 + max-pool), with
    conv1 rebuilt when ``in_channels != 3``. A replaced conv1 gets torchvision's initialisation.
    """
    model = arch(weights=None, num_classes=num_classes)
    if image_size <= 64:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    else:
        return model
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


@register_model("resnet18", "resnet-18")
def resnet18(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> resnet.ResNet:
    """torchvision ResNet-18 (He et al. 2016): 11,220,132 parameters with the CIFAR stem, 100
    classes (11,689,512 with the ImageNet stem, 1000 classes)."""
    return _resnet(resnet.resnet18, num_classes, in_channels, image_size)


@register_model("resnet34", "resnet-34")
def resnet34(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> resnet.ResNet:
    """torchvision ResNet-34 (He et al. 2016): 21,328,292 parameters with the CIFAR stem, 100
    classes (21,797,672 with the ImageNet stem, 1000 classes)."""
    return _resnet(resnet.resnet34, num_classes, in_channels, image_size)


@register_model("resnet50", "resnet-50")
def resnet50(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> resnet.ResNet:
    """torchvision ResNet-50 (He et al. 2016): 23,705,252 parameters with the CIFAR stem, 100
    classes (25,557,032 with the ImageNet stem, 1000 classes)."""
    return _resnet(resnet.resnet50, num_classes, in_channels, image_size)
