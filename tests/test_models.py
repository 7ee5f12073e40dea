"""Tests for db3kd.models: exact parameter counts (REFERENCE section 3), shapes, registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from db3kd import models
from db3kd.errors import ConfigError, DB3KDError
from db3kd.models import count_parameters, get_model, model_names, register_model

CANONICAL = [
    "alexnet",
    "alexnet-half",
    "alexnet-quarter",
    "lenet5",
    "lenet5-fifth",
    "lenet5-half",
    "resnet18",
    "resnet34",
    "resnet50",
]

# name -> (num_classes, in_channels, image_size, exact parameter count)
PARAM_COUNTS = {
    "lenet5": (10, 1, 28, 187_780),
    "lenet5-half": (10, 1, 28, 47_645),
    "lenet5-fifth": (10, 1, 28, 7_964),
    "alexnet": (10, 3, 32, 23_290_954),
    "alexnet-half": (10, 3, 32, 5_840_426),
    "alexnet-quarter": (10, 3, 32, 1_468_954),
    # torchvision ResNets with the CIFAR stem (3x3 conv1, no max-pool), CIFAR-100.
    "resnet18": (100, 3, 32, 11_220_132),
    "resnet34": (100, 3, 32, 21_328_292),
    "resnet50": (100, 3, 32, 23_705_252),
}

# (name, num_classes, in_channels, image_size, batch)
FORWARD_CASES = [
    *[(n, 10, 1, s, 4) for n in ("lenet5", "lenet5-half", "lenet5-fifth") for s in (28, 16)],
    *[(n, 10, 3, 32, 4) for n in ("alexnet", "alexnet-half", "alexnet-quarter")],
    ("resnet18", 100, 3, 32, 2),
    ("resnet34", 100, 3, 32, 2),
    ("resnet50", 100, 3, 32, 2),
    ("resnet18", 100, 3, 64, 2),
]


def test_model_names_are_canonical_and_sorted():
    assert model_names() == CANONICAL


def test_every_registered_name_has_a_count_and_a_forward_case():
    assert set(PARAM_COUNTS) == set(model_names())
    assert {case[0] for case in FORWARD_CASES} == set(model_names())


@pytest.mark.parametrize("name", list(PARAM_COUNTS))
def test_exact_parameter_counts(name):
    num_classes, in_channels, image_size, expected = PARAM_COUNTS[name]
    model = get_model(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    assert count_parameters(model) == expected


@pytest.mark.parametrize(("name", "num_classes", "in_channels", "image_size", "batch"), FORWARD_CASES)
def test_forward_shape_and_dtype(name, num_classes, in_channels, image_size, batch):
    torch.manual_seed(0)
    model = get_model(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    x = torch.rand(batch, in_channels, image_size, image_size)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (batch, num_classes)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["lenet5-fifth", "alexnet-quarter"])
def test_train_mode_backward(name):
    in_channels, image_size = (1, 28) if name.startswith("lenet") else (3, 32)
    model = get_model(name, num_classes=10, in_channels=in_channels, image_size=image_size).train()
    out = model(torch.rand(4, in_channels, image_size, image_size))
    out.logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_lenet_layers_match_reference():
    model = get_model("lenet5")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 20, (5, 5), (0, 0)),
        (20, 50, (5, 5), (0, 0)),
    ]
    assert [(fc.in_features, fc.out_features) for fc in linears] == [(800, 200), (200, 10)]
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, nn.Dropout)) for m in model.modules())


def test_lenet_flatten_follows_image_size_and_channels():
    model = get_model("lenet5", num_classes=7, in_channels=3, image_size=16)
    first_fc = next(m for m in model.modules() if isinstance(m, nn.Linear))
    assert first_fc.in_features == 50  # 1x1 spatial at 16x16
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 7)


def test_alexnet_layers_match_reference():
    model = get_model("alexnet", in_channels=3, image_size=32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 192, 384, 256, 256]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert [c.stride for c in convs] == [(2, 2)] + [(1, 1)] * 4
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 5
    fc_types = [type(m) for m in model.classifier]
    assert fc_types == [nn.Linear, nn.ReLU, nn.Dropout, nn.BatchNorm1d] * 2 + [nn.Linear]
    assert model.classifier[0].in_features == 1024
    assert all(m.p == 0.5 for m in model.modules() if isinstance(m, nn.Dropout))


def test_resnet_cifar_stem_and_imagenet_stem():
    cifar = get_model("resnet18", num_classes=100, in_channels=1, image_size=32)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert cifar.conv1.in_channels == 1
    assert isinstance(cifar.maxpool, nn.Identity)

    imagenet = get_model("resnet18", num_classes=102, in_channels=1, image_size=96)
    assert imagenet.conv1.kernel_size == (7, 7) and imagenet.conv1.stride == (2, 2)
    assert imagenet.conv1.in_channels == 1
    assert isinstance(imagenet.maxpool, nn.MaxPool2d)
    with torch.no_grad():
        assert imagenet.eval()(torch.rand(2, 1, 96, 96)).shape == (2, 102)


def test_resnet_never_loads_pretrained_weights(monkeypatch):
    seen = []
    original = models.resnet.resnet18

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights", "missing"))
        return original(*args, **kwargs)

    monkeypatch.setattr(models.resnet, "resnet18", spy)
    models.resnet18(10, 3, 32)
    assert seen == [None]


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("LeNet5", "lenet5"),
        ("LeNet-5", "lenet5"),
        ("LeNet5-half", "lenet5-half"),
        ("LeNet5-1/5", "lenet5-fifth"),
        ("lenet5-1/5", "lenet5-fifth"),
        ("LENET5-FIFTH", "lenet5-fifth"),
        ("AlexNet-Half", "alexnet-half"),
        ("ResNet-18", "resnet18"),
        ("ResNet34", "resnet34"),
        ("resnet-50", "resnet50"),
    ],
)
def test_aliases_and_case_insensitivity(alias, canonical):
    assert models._ALIASES[alias.lower()] == canonical
    if canonical.startswith("lenet"):  # cheap enough to build both and compare
        assert count_parameters(get_model(alias)) == count_parameters(get_model(canonical))


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'vgg16'") as info:
        get_model("vgg16")
    assert isinstance(info.value, DB3KDError)
    for name in model_names():
        assert name in str(info.value)


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"in_channels": 0}, {"image_size": 8}])
def test_bad_sizes_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        get_model("lenet5", **kwargs)


def test_duplicate_registration_raises_and_registers_nothing():
    def builder(num_classes, in_channels, image_size):
        return nn.Linear(1, num_classes)

    before = (dict(models._MODELS), dict(models._ALIASES))
    with pytest.raises(ValueError, match="already registered"):
        register_model("lenet5")(builder)
    with pytest.raises(ValueError, match="already registered"):
        register_model("LeNet5")(builder)
    with pytest.raises(ValueError, match="already registered"):
        register_model("brand-new-net", "ResNet-18")(builder)  # alias clash
    assert (models._MODELS, models._ALIASES) == before
    assert "brand-new-net" not in model_names()


def test_register_new_model_roundtrip(monkeypatch):
    monkeypatch.setattr(models, "_MODELS", dict(models._MODELS))
    monkeypatch.setattr(models, "_ALIASES", dict(models._ALIASES))

    @register_model("Tiny-Net", "tiny")
    def tiny(num_classes, in_channels, image_size):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, num_classes))

    assert "tiny-net" in model_names()
    out = get_model("TINY", num_classes=3, in_channels=1, image_size=4)(torch.rand(2, 1, 4, 4))
    assert out.shape == (2, 3)
