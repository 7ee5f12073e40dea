"""The registry contract (db3kd.registry) and teacher-access enforcement (db3kd.runner.teacher_access_for)."""

from __future__ import annotations

import importlib.metadata
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
    keys = {"name", "access", "data", "paper", "params", "profile_overrides"}
    assert all(set(row) == keys for row in table)
    mbd = next(row for row in table if row["name"] == "db3kd-mbd")
    budget = next(p for p in mbd["params"] if p["name"] == "budget")
    assert budget["default"] == 20000 and budget["rule"] == ">=1" and budget["type"] == "int"
    assert mbd["profile_overrides"]["smoke"]["budget"] == 120
    access = {row["name"]: row["access"] for row in table}
    assert access["standard-kd"] == "scores" and access["hard-label-kd"] == "labels"
    assert all(access[n] == "none" for n in BASELINES if n not in ("standard-kd", "hard-label-kd"))


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


# ------------------------------------------------------------------------------------------- listing, entry points


def test_methods_listing_prints_a_header_and_every_parameter_default(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["method", "access", "data", "paper"]
    bd = next(i for i, line in enumerate(lines) if line.startswith("db3kd-bd "))
    assert "tau=0.3" in lines[bd + 1] and "refs_per_class=100" in lines[bd + 1]
    assert main(["methods", "db3kd-mbd"]) == 0
    one = capsys.readouterr().out
    assert "budget" in one and "20000" in one and "profile smoke: budget=120" in one
    assert main(["methods", "no-such"]) == 2
    assert "valid methods" in capsys.readouterr().err


def test_methods_listing_cache_is_keyed_by_the_sources(tmp_path, monkeypatch):
    """A fresh process lists the methods from a cache whose key changes with any method source file."""
    from db3kd import registry

    monkeypatch.setenv("DB3KD_CACHE", str(tmp_path))
    key = registry._source_key()
    monkeypatch.setattr(registry, "_loaded", False)  # as in a process that has not imported the methods
    monkeypatch.setattr(registry, "get_method", lambda name: pytest.fail("the cache was not used"))
    cached = [{"name": "from-cache", "access": "none", "data": "full", "paper": "p", "params": [],
               "profile_overrides": {}}]
    (tmp_path / f"method-listing-{key}.json").write_text(json.dumps(cached))
    assert registry.method_listing() == cached
    plugin = tmp_path / "pkg"
    plugin.mkdir()
    (plugin / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    fake = importlib.metadata.EntryPoint("fake", "pkg", registry.ENTRY_POINT_GROUP)
    real = registry._entry_points()
    monkeypatch.setattr(registry, "_entry_points", lambda: [*real, fake])
    assert registry._source_key() != key  # a new entry point (and its package's files) changes the key


def test_an_outside_package_registers_a_method_through_the_entry_point_group(tmp_path, monkeypatch):
    from db3kd import registry

    pkg = tmp_path / "outside_kd"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from pydantic import Field\n"
        "from db3kd.registry import Method, MethodParams, register_method\n"
        "class OutsideParams(MethodParams):\n"
        "    alpha: float = Field(default=0.5, gt=0)\n"
        "@register_method\n"
        "class Outside(Method):\n"
        "    name = 'outside-kd'\n"
        "    paper = 'an outside package'\n"
        "    teacher_access = 'labels'\n"
        "    Params = OutsideParams\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    real = importlib.metadata.entry_points

    def entry_points(**kw):
        found = list(real(**kw))
        if kw.get("group") == registry.ENTRY_POINT_GROUP:
            found.append(importlib.metadata.EntryPoint("outside", "outside_kd", registry.ENTRY_POINT_GROUP))
        return found

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # restored after the test
    assert "outside-kd" in method_names()
    assert set(BASELINES) | set(DB3KD) <= set(method_names())
    cfg = resolve("digits", "outside-kd", "smoke", overrides={"alpha": 2.0})
    assert cfg.method_params == {"alpha": 2.0}
    with pytest.raises(ConfigError, match="invalid method parameter alpha=0"):
        resolve("digits", "outside-kd", "smoke", overrides={"params.alpha": 0})


def test_a_plugin_that_fails_to_import_is_named(monkeypatch):
    from db3kd import registry

    broken = importlib.metadata.EntryPoint("broken", "no_such_module_xyz", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "_entry_points", lambda: [broken])
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "_REGISTRY", {})
    with pytest.raises(ConfigError, match="method plugin 'broken' .*no_such_module_xyz.* failed to import"):
        method_names()


def test_no_entry_points_is_a_clear_error(monkeypatch):
    from db3kd import registry

    monkeypatch.setattr(registry, "_entry_points", lambda: [])
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "_REGISTRY", {})
    with pytest.raises(ConfigError, match="uv sync"):
        method_names()


def test_the_readme_method_recipe_registers_and_runs(monkeypatch):
    """README's "Extending" method recipe, executed as written: registered, configurable, one query per image."""
    from pathlib import Path

    from db3kd import registry
    from db3kd.runner import run

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("<!-- recipe:method -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # restored after the test
    exec(compile(block, "README.md", "exec"), {"__name__": "readme_recipe"})  # noqa: S102 - our own README
    assert "label-smoothing-kd" in method_names()
    cfg = resolve("digits", "label-smoothing-kd", "smoke", overrides={"student.epochs": 1})
    assert cfg.method_params == {"smoothing": 0.2}  # the recipe's smoke override
    with pytest.raises(ConfigError, match="invalid method parameter smoothing=1"):
        resolve("digits", "label-smoothing-kd", "smoke", overrides={"smoothing": 1})
    record = run(cfg)
    assert record["queries_total"] == cfg.student.train_subset == 200
    assert 0.0 <= record["student_accuracy"] <= 1.0 and 0.0 <= record["metrics"]["agreement"] <= 1.0
