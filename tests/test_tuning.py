"""db3kd.tuning: declared search spaces, the validation view, tuned values applied by resolve, and a
2-trial study on digits (smoke) that never reads the test split."""

from __future__ import annotations

import json

import pytest
import torch

from db3kd import tuning
from db3kd.config import resolve
from db3kd.errors import ConfigError, DB3KDError


def test_search_space_is_the_student_recipe_plus_the_methods_own_knobs():
    import optuna.distributions as d

    kd = tuning.search_space("standard-kd", "cpu", "mnist")
    assert set(kd) == {"student.lr", "student.epochs", "tau", "tau_squared", "w_ce", "w_kd"}
    assert kd["student.epochs"] == d.IntDistribution(5, 20)  # the cpu cap is 20 student epochs
    assert kd["tau_squared"] == d.CategoricalDistribution((False, True)) and kd["student.lr"].log
    assert set(tuning.search_space("noise-logits", "cpu", "mnist")) >= {"r_low", "r_high"}
    assert "generations" in tuning.search_space("ban", "cpu", "mnist")
    assert {"tau", "tau_squared", "w_kd"} <= set(tuning.search_space("db3kd-mbd", "cpu", "mnist"))
    # FS-BBT trains with its own recipe fields: those are tuned, not the unused student recipe
    fs = tuning.search_space("fs-bbt", "cpu", "mnist")
    assert "student.lr" not in fs and fs["epochs"] == d.IntDistribution(2, 10) and "lr" in fs
    assert set(tuning.search_space("student-ce", "cpu", "mnist")) == {"student.lr", "student.epochs"}
    with pytest.raises(ConfigError, match="invalid search-space spec"):
        tuning.to_distribution(("uniform", 0, 1))


def test_validation_view_replaces_the_test_split_and_keeps_the_teacher(tmp_path):
    from db3kd.data import load_dataset

    splits = load_dataset("digits")
    view = tuning.validation_view(splits)
    assert view.fingerprint() == splits.fingerprint()  # the cached teacher is found, not retrained
    assert torch.equal(view.test_x, splits.val_x) and torch.equal(view.test_y, splits.val_y)
    assert torch.equal(view.train_x, splits.train_x)
    from dataclasses import replace

    empty = replace(splits, val_x=splits.val_x[:0], val_y=splits.val_y[:0])
    with pytest.raises(DB3KDError, match="validation split"):
        tuning.validation_view(empty)


def test_resolve_applies_tuned_values_unless_paper(tmp_path, monkeypatch):
    monkeypatch.setenv("DB3KD_TUNED_DIR", str(tmp_path))
    base = resolve("mnist", "standard-kd", "cpu", params="paper")
    assert resolve("mnist", "standard-kd", "cpu") == base  # no tuned file: the papers' settings
    (tmp_path / "mnist-cpu.json").write_text(json.dumps({"standard-kd": {
        "params": {"tau": 4.0, "tau_squared": True}, "student": {"lr": 1e-3, "epochs": 12}, "trials": 40}}))
    tuned = resolve("mnist", "standard-kd", "cpu")
    assert tuned.method_params["tau"] == 4.0 and tuned.method_params["tau_squared"] is True
    assert tuned.student.lr == 1e-3 and tuned.student.epochs == 12
    assert tuned.extra == {"params": "tuned on val (40 trials)"} and tuned.config_hash() != base.config_hash()
    (tmp_path / "mnist-cpu.json").write_text(json.dumps({"standard-kd": {
        "params": {"tau": 4.0, "tau_squared": True}, "student": {"lr": 1e-3, "epochs": 12}, "trials": 41}}))
    resumed = resolve("mnist", "standard-kd", "cpu")  # one more trial, same choice: same computation
    assert resumed.extra == {"params": "tuned on val (41 trials)"} and resumed.config_hash() == tuned.config_hash()
    assert resolve("mnist", "standard-kd", "cpu", params="paper") == base
    assert resolve("mnist", "standard-kd", "cpu", method_overrides={"tau": 2.0}).method_params["tau"] == 2.0
    assert resolve("mnist", "student-ce", "cpu").extra == {}  # no entry for this method
    (tmp_path / "mnist-cpu.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read tuned values"):
        resolve("mnist", "standard-kd", "cpu")
    with pytest.raises(ConfigError, match="params"):
        resolve("mnist", "standard-kd", "cpu", params="best")


def test_tune_cli_parses():
    from db3kd.cli import build_parser

    args = build_parser().parse_args(["tune", "--dataset", "digits", "--method", "db3kd-bd", "--trials", "3"])
    assert (args.dataset, args.method, args.trials, args.profile, args.sampler_seed) == ("digits", "db3kd-bd", 3, "cpu", 0)
    run = build_parser().parse_args(["run", "--params", "paper", "--student", "lenet5-1/5"])
    assert run.params == "paper" and run.student == "lenet5-1/5"


@pytest.mark.slow
def test_two_trial_study_on_validation_is_resumable(tmp_path, monkeypatch):
    """About 60-100 s on 2 loaded cores: 2 (then 1 more) student-ce trials on digits, smoke profile."""
    from dataclasses import replace

    from db3kd.data import load_dataset

    monkeypatch.setenv("DB3KD_CACHE", str(tmp_path / "cache"))
    splits = load_dataset("digits")
    # poison the test labels: a trial that scored on the test split would get 0 accuracy
    poisoned = replace(splits, test_y=torch.full_like(splits.test_y, splits.num_classes + 5))
    seen = []
    kwargs = dict(profile="smoke", tracking=False, out_dir=tmp_path / "tuned", storage=f"sqlite:///{tmp_path}/s.db",
                  splits=poisoned, on_trial=seen.append)
    entry = tuning.tune("digits", "student-ce", 2, **kwargs)
    # two sampled trials, and first the profile's defaults as an enqueued trial
    assert entry["trials"] == 3 and len(seen) == 3
    assert seen[0]["values"] == {"student.lr": 0.005, "student.epochs": 10} == tuning.default_values(
        tuning.search_space("student-ce", "smoke", "digits"), resolve("digits", "student-ce", "smoke", 0, params="paper"))[0]
    assert entry["defaults_trial"]["number"] == seen[0]["number"] == 0
    assert entry["defaults_trial"]["val_accuracy"] == seen[0]["val_accuracy"]  # no pruning in the first 5 trials
    assert entry["best_val_accuracy"] == max(t["val_accuracy"] for t in seen) > 0.15  # chance 0.1; on the test split: 0
    stored = json.loads((tmp_path / "tuned" / "digits-smoke.json").read_text())["student-ce"]
    assert set(stored["student"]) == {"lr", "epochs"} and stored["sampler"] == "TPESampler(seed=0)"
    # resumed: only the missing trial runs
    again = tuning.tune("digits", "student-ce", 3, **kwargs)
    assert again["trials"] == 4 and len(seen) == 4 and again["defaults_trial"] == entry["defaults_trial"]


@pytest.mark.slow
def test_a_defaults_trial_left_running_by_a_killed_process_is_scored_again(tmp_path, monkeypatch):
    import optuna

    monkeypatch.setenv("DB3KD_CACHE", str(tmp_path / "cache"))
    storage = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(study_name="digits-smoke-student-ce-seed0", storage=storage, direction="maximize")
    stale = study.ask()  # RUNNING forever, as after a kill
    stale.set_user_attr("defaults", True)
    entry = tuning.tune("digits", "student-ce", 1, profile="smoke", tracking=False, out_dir=tmp_path / "tuned",
                        storage=storage)
    assert entry["defaults_trial"]["state"] == "COMPLETE" and entry["defaults_trial"]["number"] == 1
    assert entry["trials"] == 2  # the defaults and one sampled trial; the stale one is not counted


@pytest.mark.slow
def test_a_pruned_defaults_trial_is_scored_again_and_never_pruned(tmp_path, monkeypatch):
    import optuna

    monkeypatch.setenv("DB3KD_CACHE", str(tmp_path / "cache"))
    storage = f"sqlite:///{tmp_path}/s.db"
    space = tuning.search_space("student-ce", "smoke", "digits")
    defaults, outside = tuning.default_values(space, resolve("digits", "student-ce", "smoke", 0, params="paper"))
    study = optuna.create_study(study_name="digits-smoke-student-ce-seed0", storage=storage, direction="maximize")
    study.add_trial(optuna.trial.create_trial(  # as the pruner of an older version left it
        state=optuna.trial.TrialState.PRUNED, params=defaults, distributions=space, intermediate_values={1: 0.1},
        user_attrs={"defaults": True, "defaults_outside_space": outside}))
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: True)  # a pruner that stops everything
    entry = tuning.tune("digits", "student-ce", 1, profile="smoke", tracking=False, out_dir=tmp_path / "tuned",
                        storage=storage)
    assert entry["defaults_trial"]["state"] == "COMPLETE" and entry["defaults_trial"]["number"] == 1
    assert entry["trials"] == 3  # the pruned defaults, the scored defaults and one sampled trial
    assert entry["pruned_trials"] == 2 and entry["best_trial"] == 1  # the sampled one was stopped, the defaults not


def test_defaults_of_a_methods_own_lr_and_epochs_fall_back_to_the_student_recipe():
    base = resolve("digits", "noise-input", "smoke", 0, params="paper")
    space = tuning.search_space("noise-input", "smoke", "digits")
    assert base.method_params["lr"] is None and base.method_params["epochs"] == 2 and set(space) == {"lr", "epochs"}
    values, outside = tuning.default_values(space, base)
    assert values == {"lr": base.student.lr, "epochs": 2} and outside == []  # None -> the student's lr


def test_zskt_searches_its_own_loop_and_a_changed_space_starts_a_new_study(tmp_path):
    import optuna

    space = tuning.search_space("zskt", "cpu", "mnist")
    assert sorted(space) == ["beta", "lr_generator", "lr_student", "student_steps"]  # no inert student.lr
    assert "student.lr" in tuning.search_space("student-ce", "cpu", "mnist")
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    assert tuning.study_name("mnist", "cpu", "zskt", 0, space, storage) == "mnist-cpu-zskt-seed0"  # none yet
    old = {"student.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    study = optuna.create_study(study_name="mnist-cpu-zskt-seed0", storage=storage)
    study.optimize(lambda t: t.suggest_float("student.lr", 1e-4, 1e-2, log=True), n_trials=1)
    assert tuning.study_name("mnist", "cpu", "zskt", 0, old, storage) == "mnist-cpu-zskt-seed0"  # same space
    renamed = tuning.study_name("mnist", "cpu", "zskt", 0, space, storage)
    assert renamed.startswith("mnist-cpu-zskt-seed0-space") and len(renamed) == len("mnist-cpu-zskt-seed0-space") + 8


@pytest.mark.slow
def test_a_study_under_fixed_settings_is_its_own_entry_that_no_run_applies(tmp_path, monkeypatch):
    monkeypatch.setenv("DB3KD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DB3KD_TUNED_DIR", str(tmp_path / "tuned"))
    seen = []
    entry = tuning.tune("digits", "student-ce", 1, profile="smoke", tracking=False, storage=f"sqlite:///{tmp_path}/s.db",
                        settings={"student.batch_size": 64}, on_trial=seen.append, defaults_trial=False)
    assert tuning.entry_key("student-ce", {"student.batch_size": 64}) == "student-ce@student.batch_size=64"
    table = json.loads((tmp_path / "tuned" / "digits-smoke.json").read_text())
    assert list(table) == ["student-ce@student.batch_size=64"] and entry["settings"] == {"student.batch_size": 64}
    assert entry["study"].startswith("digits-smoke-student-ce@student.batch_size=64-seed0")
    assert resolve("digits", "student-ce", "smoke").extra == {}  # a plain run does not pick it up
    with pytest.raises(ConfigError):
        tuning.tune("digits", "student-ce", 1, profile="smoke", tracking=False, settings={"no_such_knob": 1})
