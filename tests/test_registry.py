"""The registry contract (db3kd.registry) and teacher-access enforcement (db3kd.runner.teacher_access_for)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from db3kd.cli import main
from db3kd.config import resolve
from db3kd.errors import ConfigError
from db3kd.models import get_model
from db3kd.registry import ACCESS_LEVELS, DATA_LEVELS, Method, MethodParams, get_method, method_names, register_method
from db3kd.runner import teacher_access_for

BASELINES = ("teacher-ce", "student-ce", "standard-kd", "surrogate-kd", "noise-logits", "hard-label-kd", "ban",
             "tf-kd-self", "tf-kd-reg", "sskd")
DB3KD = ("db3kd-sd", "db3kd-bd", "db3kd-mbd")
SHAPE = (1, 16, 16)


def test_every_required_method_is_registered():
    names = method_names()
    assert set(BASELINES) | set(DB3KD) <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("name", method_names())
def test_metadata_and_params_of_every_method(name):
    cls = get_method(name)
    assert cls.name == name
    assert cls.teacher_access in ACCESS_LEVELS and cls.data in DATA_LEVELS
    assert isinstance(cls.paper, str) and cls.paper
    assert issubclass(cls.Params, MethodParams)
    assert set(cls.paper_results) <= {"mnist", "fmnist", "cifar10", "flowers102", "cifar100"}
    assert all(0 < v <= 100 for v in cls.paper_results.values())
    for profile in ("paper", "cpu", "smoke"):  # every profile resolves with the method's overrides
        resolve("digits", name, profile)


def test_duplicate_name_raises_at_registration():
    before = method_names()

    class Impostor(Method):
        name = "standard-kd"
        paper = "nobody"
        teacher_access = "none"

    with pytest.raises(ValueError, match="duplicate method name 'standard-kd'"):
        register_method(Impostor)
    assert get_method("standard-kd") is not Impostor
    assert method_names() == before


@pytest.mark.parametrize("attr, value, message", [
    ("teacher_access", "logits", "teacher_access must be one of"),
    ("data", "some", "data must be one of"),
    ("paper", "", "non-empty string 'paper'"),
])
def test_invalid_metadata_raises_at_registration(attr, value, message):
    body = {"name": "registry-test-bad", "paper": "p", "teacher_access": "none", "data": "full", attr: value}
    cls = type("Bad", (Method,), body)
    with pytest.raises(ValueError, match=message):
        register_method(cls)
    assert "registry-test-bad" not in method_names()


def test_unknown_name_raises_config_error_listing_valid_names():
    with pytest.raises(ConfigError) as info:
        get_method("no-such-method")
    message = str(info.value)
    assert "no-such-method" in message
    assert all(name in message for name in method_names())
    with pytest.raises(ConfigError):
        resolve("digits", "no-such-method", "smoke")


def test_unknown_method_parameter_is_a_config_error():
    with pytest.raises(ConfigError, match="allowed keys"):
        resolve("digits", "standard-kd", "smoke", method_overrides={"temperature": 4})


def test_methods_json(capsys):
    assert main(["methods", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert isinstance(table, list)
    assert [row["name"] for row in table] == method_names()
    assert all(set(row) == {"name", "access", "data", "paper"} for row in table)
    access = {row["name"]: row["access"] for row in table}
    assert access["standard-kd"] == "scores" and access["hard-label-kd"] == "labels"
    assert access["teacher-ce"] == "white_box"  # the row is the shared teacher itself
    assert all(access[n] == "none" for n in BASELINES if n not in ("standard-kd", "hard-label-kd", "teacher-ce"))


# ------------------------------------------------------------------------------------------- access enforcement


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return get_model("lenet5-half", num_classes=10, in_channels=1, image_size=16).eval()


def _images(n=5):
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(1))


def _forbidden(value) -> bool:
    """True for anything that exposes the model: a module, a parameter, a state dict, or a bound model method."""
    if isinstance(value, (nn.Module, nn.Parameter)):
        return True
    if isinstance(value, dict) and any(isinstance(v, (nn.Module, nn.Parameter)) for v in value.values()):
        return True
    return isinstance(getattr(value, "__self__", None), nn.Module)


def test_labels_access_exposes_no_module_parameters_or_logits(teacher):
    cfg = resolve("digits", "hard-label-kd", "smoke")
    oracle = teacher_access_for("labels", teacher, cfg, SHAPE, "cpu")
    assert not isinstance(oracle, nn.Module)
    assert not hasattr(oracle, "parameters") and not hasattr(oracle, "state_dict")
    # every attribute, public or private, and one level into each (vars() of its value)
    names = set(dir(oracle)) | set(vars(oracle))
    for attr in names:
        if attr.startswith("__"):
            continue
        value = getattr(oracle, attr)
        assert not _forbidden(value), f"oracle.{attr} exposes the teacher"
        inner = vars(value) if hasattr(value, "__dict__") and not isinstance(value, type) else {}
        for sub, sub_value in inner.items():
            assert not _forbidden(sub_value), f"oracle.{attr}.{sub} exposes the teacher"
    x = _images()
    answer = oracle(x)
    assert answer.dtype == torch.int64 and answer.shape == (5,)  # labels, not logits
    assert torch.equal(answer, teacher(x).argmax(1))
    assert oracle.queries == 5


def test_none_access_gets_nothing(teacher):
    cfg = resolve("digits", "student-ce", "smoke")
    assert teacher_access_for("none", teacher, cfg, SHAPE, "cpu") is None


def test_scores_access_gets_probabilities(teacher):
    cfg = resolve("digits", "standard-kd", "smoke")
    oracle = teacher_access_for("scores", teacher, cfg, SHAPE, "cpu")
    assert not isinstance(oracle, nn.Module)
    p = oracle(_images())
    assert p.dtype == torch.float32 and p.shape == (5, 10)
    assert (p >= 0).all() and torch.allclose(p.sum(1), torch.ones(5), atol=1e-5)
    assert oracle.queries == 5


def test_unknown_access_level_is_rejected(teacher):
    cfg = resolve("digits", "student-ce", "smoke")
    with pytest.raises(ValueError, match="unknown teacher access"):
        teacher_access_for("logits", teacher, cfg, SHAPE, "cpu")
