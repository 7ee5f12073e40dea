"""Fast layouts (db3kd.layout) and whole-batch augmentation (db3kd.training): equivalence and determinism."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from db3kd import layout
from db3kd.models import get_model
from db3kd.training import TrainConfig, _augment, fit
from tests.conftest import fake_splits


def _augment_image_by_image(x, kind, gen):
    """The former per-image loop (reference for the vectorised crop and flip)."""
    n, _, h, w = x.shape
    pad = 4 if kind == "crop_flip" else 2
    padded = F.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    if kind == "crop_flip":
        flip = torch.rand(n, generator=gen) < 0.5
        out[flip] = out[flip].flip(3)
    return out


@pytest.mark.parametrize("kind, shape", [("crop", (9, 1, 8, 8)), ("crop_flip", (17, 3, 6, 5))])
def test_vectorised_augmentation_equals_the_per_image_loop(kind, shape):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    ours = _augment(x, kind, torch.Generator().manual_seed(3))
    reference = _augment_image_by_image(x, kind, torch.Generator().manual_seed(3))
    assert torch.equal(ours, reference)
    assert not torch.equal(ours, x)  # something moved
    assert torch.equal(_augment(x, "none", torch.Generator()), x)


def test_cpu_trains_in_channels_last_and_is_bit_identical_per_seed(monkeypatch):
    monkeypatch.delenv(layout.ENV, raising=False)
    splits = fake_splits()
    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-3, augment="crop")

    def train(seed, memory_format=None):
        torch.manual_seed(0)
        model = get_model("lenet5-half", num_classes=10, in_channels=1, image_size=16)
        history = fit(model, splits.train_x, lambda z, _xb, idx: F.cross_entropy(z, splits.train_y[idx]), cfg, seed=seed,
                      memory_format=memory_format)
        return model, history

    a, ha = train(1)
    b, hb = train(1)
    assert a.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert a.features[3].weight.is_contiguous(memory_format=torch.channels_last)
    assert ha == hb and all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    c, _ = train(1, memory_format="contiguous")
    assert c.features[3].weight.is_contiguous() and not c.features[3].weight.is_contiguous(memory_format=torch.channels_last)
    # the same computation in another layout: equal up to float rounding
    assert all(torch.allclose(p, q, atol=1e-4) for p, q in zip(a.state_dict().values(), c.state_dict().values()))


def test_memory_format_override_and_error(monkeypatch):
    monkeypatch.setenv(layout.ENV, "contiguous")
    assert layout.memory_format_name("cpu") == "contiguous"
    monkeypatch.setenv(layout.ENV, "nhwc")
    with pytest.raises(ValueError, match="DB3KD_MEMORY_FORMAT='nhwc'"):
        layout.memory_format_name("cpu")
    monkeypatch.delenv(layout.ENV)
    assert layout.memory_format_name("cpu") == layout.MEASURED["cpu"] == "channels_last"


def test_teacher_is_cached_in_its_layout_and_the_layout_is_in_the_key(monkeypatch, tmp_path):
    from db3kd.config import resolve
    from db3kd.teacher import get_teacher

    monkeypatch.delenv(layout.ENV, raising=False)
    splits = fake_splits()
    stage = resolve("digits", "db3kd-bd", "smoke").teacher.model_copy(update={"arch": "lenet5-half", "epochs": 1})
    trained = get_teacher(splits, stage, seed=0, cache_dir=tmp_path)
    loaded = get_teacher(splits, stage, seed=0, cache_dir=tmp_path)
    assert trained.trained and not loaded.trained and trained.checkpoint == loaded.checkpoint
    for t in (trained, loaded):
        assert t.model.features[3].weight.is_contiguous(memory_format=torch.channels_last)
    monkeypatch.setenv(layout.ENV, "contiguous")
    other = get_teacher(splits, stage, seed=0, cache_dir=tmp_path)
    assert other.key != trained.key and other.trained
    assert other.model.features[3].weight.is_contiguous()


def test_user_programs_are_used_as_given():
    model = get_model("lenet5-half", num_classes=10, in_channels=1, image_size=16).eval()
    scripted = torch.jit.script(model)
    assert layout.to_fast_layout(scripted) is scripted
    weight = dict(scripted.named_parameters())["features.3.weight"]
    assert weight.is_contiguous() and not weight.is_contiguous(memory_format=torch.channels_last)
    fast = layout.to_fast_layout(model)
    assert fast is model and model.features[3].weight.is_contiguous(memory_format=torch.channels_last)


def test_oracle_batch_auto_is_measured_once_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("DB3KD_CACHE", str(tmp_path))
    monkeypatch.setattr(layout, "_memo", {})
    calls = []

    def fake_rate(forward, x, seconds, repeats=2):
        calls.append(x.shape[0])
        return {64: 1.0, 128: 5.0, 256: 3.0}.get(x.shape[0], 0.0)

    monkeypatch.setattr(layout, "_images_per_second", fake_rate)
    model = get_model("lenet5-half", num_classes=10, in_channels=1, image_size=16)
    assert layout.resolve_oracle_batch("auto", model, (1, 16, 16)) == 128
    assert len(calls) == len(layout.BATCH_CANDIDATES)
    monkeypatch.setattr(layout, "_memo", {})  # a new process: read from the cache file, no new measurement
    assert layout.resolve_oracle_batch(None, model, (1, 16, 16)) == 128
    assert len(calls) == len(layout.BATCH_CANDIDATES) and (tmp_path / "layout.json").is_file()
    assert layout.resolve_oracle_batch(300, model, (1, 16, 16)) == 300
    with pytest.raises(ValueError, match="oracle_batch must be a positive int or 'auto', got 0"):
        layout.resolve_oracle_batch(0, model, (1, 16, 16))


def test_runner_resolves_auto_oracle_batch(monkeypatch):
    from dataclasses import replace

    from db3kd.config import resolve
    from db3kd.runner import teacher_access_for

    monkeypatch.setattr(layout, "oracle_batch_size", lambda model, shape, device="cpu", **kw: 96)
    cfg = resolve("digits", "db3kd-bd", "cpu")
    assert cfg.oracle_batch == "auto"
    model = get_model("lenet5-half", num_classes=10, in_channels=1, image_size=16)
    assert teacher_access_for("labels", model, cfg, (1, 16, 16), "cpu").batch_size == 96
    assert teacher_access_for("scores", model, replace(cfg, oracle_batch=64), (1, 16, 16), "cpu").batch_size == 64
