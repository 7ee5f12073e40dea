"""A user's teacher, checked at the door: malformed teachers give one clear error or warning before
any query counts; teacher_input normalisation; a class with no usable reference gets inf.

Every teacher here is a small TorchScript file written by :func:`write_teacher` (a linear model
trained for 100 full-batch Adam steps on the embedded digits, about 96% test accuracy, then
wrapped to misbehave in one way).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from db3kd.cli import main
from db3kd.teacher import TeacherWarning

KINDS = ("good", "five-logits", "nan", "integer", "dropout", "shifted-classes", "normalised")


class _Wrapped(nn.Module):
    """The trained linear teacher, misbehaving as ``kind`` says (TorchScript-able)."""

    def __init__(self, linear: nn.Linear, kind: str):
        super().__init__()
        self.linear = linear
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "normalised":  # expects (x - 0.5) / 0.25: undo it
            x = x * 0.25 + 0.5
        if self.kind == "dropout":  # dropout left on: the same image gets different answers
            x = nn.functional.dropout(x, 0.5, True)
        z = self.linear(x.flatten(1))
        if self.kind == "five-logits":
            return z[:, :5]
        if self.kind == "nan":
            return z * float("nan")
        if self.kind == "integer":
            return z.round().to(torch.int64)
        if self.kind == "shifted-classes":  # answers class c + 1 for c: near-chance accuracy
            return torch.roll(z, 1, dims=1)
        return z


_LINEAR: dict = {}


def trained_linear() -> nn.Linear:
    """A linear digits teacher (1x16x16 -> 10), trained once per process."""
    if "model" not in _LINEAR:
        from db3kd.data import load_dataset

        splits = load_dataset("digits", None)
        x, y = splits.train_x.float().div(255.0).flatten(1), splits.train_y
        torch.manual_seed(0)
        model = nn.Linear(x.shape[1], 10)
        opt = torch.optim.Adam(model.parameters(), 0.05)
        for _ in range(100):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        _LINEAR["model"] = model.requires_grad_(False).eval()
    return _LINEAR["model"]


def write_teacher(path: str | Path, kind: str = "good") -> Path:
    """Write a TorchScript digits teacher of the given ``kind`` (see KINDS) to ``path``."""
    assert kind in KINDS, kind
    module = torch.jit.script(_Wrapped(trained_linear(), kind))
    torch.jit.save(module, str(path))
    return Path(path)


SMOKE = ["run", "--profile", "smoke", "--method", "hard-label-kd", "--no-progress", "--json"]

ERRORS = [
    ("five-logits", "returned 5 logits per image, but the dataset has 10 classes (output shape (64, 5))"),
    ("nan", "returned non-finite logits (NaN in 640 of 640 values for 64 images)"),
    ("integer", "returned torch.int64 outputs; the oracle needs floating-point logits"),
]
WARNINGS = [
    ("dropout", "is non-deterministic: asked the same 64 images 3 times"),
    ("shifted-classes", "(chance 10.0%): it may expect other preprocessing"),
]


@pytest.mark.parametrize("kind, message", ERRORS + WARNINGS, ids=[k for k, _ in ERRORS + WARNINGS])
def test_malformed_teacher(tmp_path, capsys, kind, message):
    """Each malformed teacher gives its one line: an error (exit 2, no traceback, the file named)
    before the method's oracle answers anything, or a TeacherWarning kept in the record."""
    import json

    path = write_teacher(tmp_path / f"{kind}.pt", kind)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main([*SMOKE, "--teacher", str(path)])
    out, err = capsys.readouterr()
    ours = [str(w.message) for w in caught if issubclass(w.category, TeacherWarning)]
    if (kind, message) in ERRORS:
        assert code == 2 and "Traceback" not in err and out == ""
        lines = [ln for ln in err.splitlines() if ln.startswith("db3kd: error:")]
        assert len(lines) == 1 and message in lines[0] and f"teacher {path}" in lines[0], err
        assert ours == []
    else:
        assert code == 0, err
        assert len(ours) == 1 and message in ours[0] and f"teacher {path}" in ours[0], ours
        assert 0.0 <= json.loads(out)["student_accuracy"] <= 1.0


def test_door_is_recorded_and_a_good_teacher_passes_silently(tmp_path):
    from db3kd.config import resolve
    from db3kd.runner import run
    from db3kd.teacher import file_sha256

    good = write_teacher(tmp_path / "good.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", TeacherWarning)
        record = run(resolve("digits", "hard-label-kd", "smoke", 0, teacher_file=str(good)))
    assert record["teacher_accuracy"] > 0.9
    assert record["teacher_deterministic"] is True and record["teacher_warnings"] == []
    assert record["teacher_door"] == {"deterministic": True, "label_changes": 0, "max_score_change": 0.0,
                                      "probe": 64, "repeats": 3}
    assert record["teacher_sha256"] == file_sha256(good) and record["teacher_checkpoint"] == file_sha256(good)[:16]
    assert record["queries_total"] == 200  # one query per training image of the subset; the door's are not counted

    noisy = write_teacher(tmp_path / "dropout.pt", "dropout")
    with pytest.warns(TeacherWarning, match="non-deterministic"):
        record = run(resolve("digits", "hard-label-kd", "smoke", 0, teacher_file=str(noisy)))
    assert record["teacher_deterministic"] is False and record["teacher_door"]["label_changes"] > 0
    assert any("non-deterministic" in w for w in record["teacher_warnings"])


def test_teacher_input_normalisation_is_applied_inside_the_oracle(tmp_path):
    """A teacher that expects (x - 0.5) / 0.25 is near chance on raw pixels and right with teacher_input."""
    from db3kd.config import resolve
    from db3kd.runner import run

    path = write_teacher(tmp_path / "normalised.pt", "normalised")
    norm = {"mean": [0.5], "std": [0.25]}
    with warnings.catch_warnings():
        warnings.simplefilter("error", TeacherWarning)
        record = run(resolve("digits", "hard-label-kd", "smoke", 0, teacher_file=str(path), teacher_input=norm))
    assert record["teacher_accuracy"] > 0.9 and record["config"]["teacher_input"] == {"mean": [0.5], "std": [0.25]}


def test_oracle_input_norm_keeps_queries_in_pixel_units():
    from db3kd.oracle import HardLabelOracle

    linear = trained_linear()
    seen = []

    class Probe(nn.Module):
        def forward(self, z):
            seen.append(z.clone())
            return linear(z.flatten(1))

    x = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    oracle = HardLabelOracle(Probe(), input_norm=((0.5,), (0.25,)), num_classes=10)
    labels = oracle(x)
    assert torch.allclose(seen[0], (x - 0.5) / 0.25) and torch.equal(labels, linear((x - 0.5).div(0.25).flatten(1)).argmax(1))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):  # the door still takes pixels, not normalised values
        oracle((x - 0.5) / 0.25)


@pytest.mark.parametrize("kwargs, message", [
    (dict(teacher_input={"mean": [0.5], "std": [0.0]}), "invalid setting teacher_input.std=[0.0]"),
    (dict(teacher_input={"mean": [0.5], "sd": [1.0]}), "unknown setting 'teacher_input.sd'"),
    (dict(teacher_input={"mean": [0.5, 0.5], "std": [1.0]}, teacher_file="T"), "invalid teacher_input.mean=[0.5, 0.5]"),
    (dict(teacher_input={"mean": [0.5], "std": [1.0]}), "teacher_input (the input normalisation of a user's teacher) needs"),
    (dict(method="zskt", teacher_file="T"), "zskt needs white-box access"),
    (dict(method="teacher-ce", teacher_file="T"), "teacher-ce needs white-box access"),
    (dict(method="teacher-arch-ce", teacher_file="T"), "teacher-arch-ce trains the teacher's architecture"),
])
def test_teacher_settings_refused_with_one_line(tmp_path, kwargs, message):
    from db3kd.config import resolve
    from db3kd.errors import ConfigError
    from db3kd.runner import run

    if kwargs.get("teacher_file") == "T":
        kwargs["teacher_file"] = str(write_teacher(tmp_path / "good.pt"))
    args = {"dataset": "digits", "method": "hard-label-kd", "profile": "smoke", "seed": 0, **kwargs}
    with pytest.raises(ConfigError) as info:
        run(resolve(**args))
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("search", ["boundary_search", "minimal_boundary_search"])
def test_teacher_that_labels_everything_one_class_gives_inf_not_a_crash(search):
    """No usable reference for any other class (each is labelled 0): those distances are inf as documented;
    a sample the teacher labels 0 against its class 1 or 2 sits at distance 0 from class 0."""
    from db3kd import robustness
    from db3kd.oracle import HardLabelOracle

    class One(nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.zeros(x.shape[0], dtype=torch.int64), 3).float()

    g = torch.Generator().manual_seed(0)
    x, refs = torch.rand(6, 1, 4, 4, generator=g), torch.rand(6, 1, 4, 4, generator=g)
    y, ref_labels = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 0, 1, 1, 2, 2])
    kw = {"budget": 50} if search == "minimal_boundary_search" else {}
    result = getattr(robustness, search)(HardLabelOracle(One()), x, y, refs, ref_labels, 3, **kw)
    expected = torch.full((6, 3), math.inf)
    expected[[1, 2, 4, 5], 0] = 0.0
    assert torch.equal(result.distances, expected)
