"""The settings language (db3kd.config): --set / --config keys, YAML round trip, errors, variants, datasets."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from db3kd.config import (
    DATASETS,
    config_diff,
    describe_diff,
    dump_config,
    load_config_file,
    parse_set,
    parse_value,
    resolve,
    variant_of,
)
from db3kd.errors import ConfigError


@pytest.mark.parametrize("text, value", [
    ("5", 5), ("0.5", 0.5), ("5e-4", 5e-4), ("1e-5", 1e-5), ("-3", -3), ("null", None), ("None", None), ("", None),
    ("true", True), ("[30, 60]", [30, 60]), ("crop_flip", "crop_flip"), ("none", "none"), ("model.pt2", "model.pt2"),
])
def test_values_are_yaml_scalars(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_parse_set_types_values_and_rejects_bad_syntax():
    assert parse_set(["student.epochs=5", "tau=0.5", "teacher.lr_milestones=[3, 6]", "tau=0.25"]) == {
        "student.epochs": 5, "tau": 0.25, "teacher.lr_milestones": [3, 6]}
    for bad in ("student.epochs", "=5", "student epochs=5"):
        with pytest.raises(ConfigError, match="--set expects KEY=VALUE"):
            parse_set([bad])


def test_every_kind_of_key_reaches_the_resolved_config():
    cfg = resolve("digits", "db3kd-mbd", "smoke", 0, overrides={
        "student.epochs": 3, "teacher.epochs": 2, "teacher.arch": "lenet5-half", "student.train_subset": None,
        "student.lr": 1e-3, "val_fraction": 0.2, "oracle_batch": 512, "query_budget": 1000, "image_size": 12,
        "tau": 0.5, "params.budget": 60, "method_params.num_directions": 10, "extra.note": "ablation"})
    assert (cfg.student.epochs, cfg.teacher.epochs, cfg.teacher.arch) == (3, 2, "lenet5-half")
    assert cfg.student.train_subset is None and cfg.student.lr == 1e-3
    assert (cfg.val_fraction, cfg.oracle_batch, cfg.query_budget, cfg.image_size) == (0.2, 512, 1000, 12)
    assert (cfg.method_params["tau"], cfg.method_params["budget"], cfg.method_params["num_directions"]) == (0.5, 60, 10)
    assert cfg.extra == {"note": "ablation"}
    # explicit keyword arguments win over the same key in overrides; method_overrides keeps working
    cfg = resolve("digits", "db3kd-bd", "smoke", overrides={"query_budget": 5, "tau": 0.4}, query_budget=7,
                  method_overrides={"tau": 0.6})
    assert cfg.query_budget == 7 and cfg.method_params["tau"] == 0.6


@pytest.mark.parametrize("overrides, message", [
    ({"student.epochs": 0}, "invalid setting student.epochs=0: Input should be greater than or equal to 1"),
    ({"teacher.optimizer": "lbfgs"}, "invalid setting teacher.optimizer='lbfgs': Input should be 'adam' or 'sgd'"),
    ({"student.epoch": 5}, "unknown setting 'student.epoch' (value 5); allowed keys: student.arch"),
    ({"val_fraction": 1.5}, "invalid setting val_fraction=1.5: Input should be less than 1"),
    ({"oracle_batch": "big"}, "invalid setting oracle_batch='big'"),
    ({"query_budget": -1}, "invalid setting query_budget=-1: Input should be greater than or equal to 0"),
    ({"params.tau": 0}, "invalid method parameter tau=0: Input should be greater than 0"),
    ({"params.temperature": 4}, "unknown method parameter 'temperature' (value 4); allowed keys:"),
    ({"bogus": 1}, "unknown setting 'bogus' (value 1); allowed keys: image_size, oracle_batch"),
    ({"teacher": 3}, "invalid setting teacher=3: teacher is a section; set its keys as teacher.<name>"),
    ({"num_classes": 12}, "invalid setting num_classes=12: the dataset digits has 10 classes"),
    ({"dataset": "mnist"}, "invalid setting dataset='mnist': pass it as the dataset argument"),
])
def test_bad_settings_give_one_line_naming_key_value_and_rule(overrides, message):
    with pytest.raises(ConfigError) as info:
        resolve("digits", "db3kd-bd", "smoke", overrides=overrides)
    text = str(info.value)
    assert message in text and "\n" not in text
    if "unknown setting 'bogus'" in message:  # the allowed keys of every kind are listed
        assert all(k in text for k in ("val_fraction", "teacher.<arch|", "student.<", "tau", "refs_per_class"))


DATASET_METHODS = [("digits", "db3kd-bd", "cpu"), ("mnist", "db3kd-mbd", "smoke"), ("cifar100", "standard-kd", "paper"),
                   ("flowers102", "zsdb3kd", "cpu")]


@pytest.mark.parametrize("dataset, method, profile", DATASET_METHODS)
def test_show_config_loads_back_to_the_same_hash(tmp_path, dataset, method, profile):
    for overrides in ({}, {"student.epochs": 5, "teacher.lr_milestones": [2, 4], "val_fraction": 0.25}):
        cfg = resolve(dataset, method, profile, 3, overrides=overrides, teacher_file=None)
        path = tmp_path / "c.yaml"
        path.write_text(dump_config(cfg))
        loaded = load_config_file(path)
        ident = [loaded.pop(k) for k in ("dataset", "method", "profile", "seed")]
        back = resolve(*ident, overrides=loaded)
        assert back == cfg and back.config_hash() == cfg.config_hash()
        assert f"# config hash: {cfg.config_hash()}" in path.read_text()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.fixed_dictionaries({}, optional={
    "student.epochs": st.integers(1, 500), "teacher.lr": st.floats(1e-6, 1.0), "student.train_subset": st.none() | st.integers(1, 10**6),
    "teacher.augment": st.sampled_from(["none", "crop", "crop_flip"]), "val_fraction": st.floats(0, 0.99),
    "tau": st.floats(1e-3, 10), "tol": st.floats(1e-9, 1e-2), "teacher_file": st.none() | st.text("ab/._-1", min_size=1),
    "query_budget": st.none() | st.integers(0, 10**9), "extra.tag": st.text(max_size=8)}))
def test_any_setting_round_trips_through_yaml(tmp_path, overrides):
    cfg = resolve("digits", "db3kd-bd", "smoke", 0, overrides=overrides)
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    loaded = load_config_file(path)
    back = resolve(*(loaded.pop(k) for k in ("dataset", "method", "profile", "seed")), overrides=loaded)
    assert back.config_hash() == cfg.config_hash()
    assert config_diff(back) == config_diff(cfg)


def test_flat_dotted_config_files_and_file_errors(tmp_path):
    path = tmp_path / "ablation.yaml"
    path.write_text("method: db3kd-mbd\nstudent.epochs: 4\ntau: 0.5\nmethod_params:\n  budget: 100\nvariant: tau05\n")
    assert load_config_file(path) == {"method": "db3kd-mbd", "student.epochs": 4, "tau": 0.5, "params.budget": 100,
                                      "variant": "tau05"}
    with pytest.raises(ConfigError, match="cannot read configuration file .*missing.yaml"):
        load_config_file(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("student: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config_file(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config_file(tmp_path / "list.yaml")


# ------------------------------------------------------------------------------------------- variants


def test_config_diff_and_variant_names():
    default = resolve("digits", "db3kd-mbd", "smoke", 2)
    assert config_diff(default) == {} and default.variant == "default"
    cfg = resolve("digits", "db3kd-mbd", "smoke", 2, overrides={"tau": 0.5, "student.epochs": 5})
    assert config_diff(cfg) == {"student.epochs": 5, "tau": 0.5}
    assert describe_diff(config_diff(cfg)) == "student.epochs=5, tau=0.5"
    assert len(cfg.variant) == 8 and cfg.variant != "default"
    # the variant depends on the settings only: same diff, another seed or order -> same name
    again = resolve("digits", "db3kd-mbd", "smoke", 7, overrides={"student.epochs": 5, "tau": 0.5})
    assert again.variant == cfg.variant
    assert variant_of(cfg.to_dict()) == cfg.variant  # from a stored config dict too
    # a setting equal to the default is no difference
    assert resolve("digits", "db3kd-mbd", "smoke", overrides={"tau": 0.3}).variant == "default"
    # the diff fed back as overrides reproduces the configuration
    assert resolve("digits", "db3kd-mbd", "smoke", 2, overrides=config_diff(cfg)).config_hash() == cfg.config_hash()


def test_user_variant_names_label_without_changing_the_hash():
    cfg = resolve("digits", "db3kd-bd", "smoke", overrides={"tau": 0.5}, variant="tau05")
    plain = resolve("digits", "db3kd-bd", "smoke", overrides={"tau": 0.5})
    assert cfg.variant == "tau05" and cfg.config_hash() == plain.config_hash() and "variant_name" not in cfg.to_dict()
    assert "variant: tau05" in dump_config(cfg)
    with pytest.raises(ConfigError, match="reserved for the default configuration.*tau=0.5"):
        resolve("digits", "db3kd-bd", "smoke", overrides={"tau": 0.5}, variant="default")
    assert resolve("digits", "db3kd-bd", "smoke", variant="default").variant == "default"
    with pytest.raises(ConfigError, match="invalid variant='a/b'"):
        resolve("digits", "db3kd-bd", "smoke", variant="a/b")


# ------------------------------------------------------------------------------------------- dataset registry


def test_everything_derives_from_the_dataset_registry():
    from db3kd import data
    from db3kd.cli import build_parser, dataset_choices
    from db3kd.datasets import DATASETS as REGISTRY

    assert DATASETS is REGISTRY and data.DATASETS is REGISTRY
    assert dataset_choices() == list(REGISTRY)
    assert "flowers102" in build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    # FashionMNIST is MNIST with other files, as in torchvision
    mnist, fmnist = REGISTRY["mnist"], REGISTRY["fmnist"]
    assert (fmnist.input_shape, fmnist.loader, fmnist.teacher) == (mnist.input_shape, mnist.loader, mnist.teacher)
    assert fmnist.folder == "FashionMNIST" and set(fmnist.checksums) == set(mnist.checksums)
    assert fmnist.checksums != mnist.checksums
    for name, spec in REGISTRY.items():
        cfg = resolve(name, "student-ce", "smoke")
        assert cfg.num_classes == spec.num_classes and cfg.student.arch in (spec.student, "resnet18")


def test_a_new_dataset_is_one_registry_entry(monkeypatch, tmp_path):
    import torch

    from db3kd import datasets
    from db3kd.cli import dataset_choices
    from db3kd.data import DataSplits, load_dataset

    def load_tiny(spec, root, *, val_fraction, image_size, download, cache_dir):
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (40, *spec.input_shape), dtype=torch.uint8, generator=g)
        y = torch.arange(40) % spec.num_classes
        return DataSplits(spec.name, spec.num_classes, x[:30], y[:30], x[30:34], y[30:34], x[34:], y[34:], str(root))

    monkeypatch.setattr(datasets.DATASETS, "_specs", dict(datasets.DATASETS._specs))  # restored after the test
    spec = datasets.register_dataset(datasets.DatasetSpec(
        name="tiny", num_classes=4, input_shape=(1, 8, 8), teacher="lenet5", student="lenet5-half", loader=load_tiny,
        description="four-class noise", profiles={"smoke": {"student": {"epochs": 2}}}))
    assert "tiny" in dataset_choices()
    cfg = resolve("tiny", "student-ce", "smoke")
    assert cfg.num_classes == 4 and cfg.student.epochs == 2 and cfg.teacher.arch == "lenet5"
    splits = load_dataset("tiny", tmp_path)
    assert splits.num_classes == 4 and splits.train_x.shape == (30, 1, 8, 8)
    with pytest.raises(ValueError, match="duplicate dataset name 'tiny'"):
        datasets.register_dataset(datasets.DatasetSpec("tiny", 3, (1, 8, 8), "lenet5", "lenet5-half", load_tiny))


def test_dataset_entry_points_are_read(monkeypatch):
    import importlib.metadata
    import sys
    import types

    from db3kd import datasets

    module = types.ModuleType("tiny_plugin")
    module.SPEC = datasets.DatasetSpec("plugged", 3, (1, 8, 8), "lenet5", "lenet5-half", "tiny_plugin:load")
    monkeypatch.setitem(sys.modules, "tiny_plugin", module)
    ep = importlib.metadata.EntryPoint("plugged", "tiny_plugin:SPEC", datasets.ENTRY_POINT_GROUP)
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: [ep] if kw.get("group") == datasets.ENTRY_POINT_GROUP else real(**kw))
    monkeypatch.setattr(datasets.DATASETS, "_specs", dict(datasets.DATASETS._specs))
    monkeypatch.setattr(datasets.DATASETS, "_plugins_loaded", False)
    assert "plugged" in DATASETS and DATASETS["plugged"].num_classes == 3

