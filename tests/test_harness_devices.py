"""Harness devices and profile: a GPU per xdist worker, an explicit profile with CUDA visible,
dataset markers that select their cases. CUDA is faked (no GPU here): the pure mapping functions of
benchmarks/conftest.py with fake device counts, and the harness itself under a ``-p`` plugin that
makes torch report two GPUs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _harness_module():
    spec = importlib.util.spec_from_file_location("db3kd_benchmarks_conftest", REPO / "benchmarks" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


H = _harness_module()


@pytest.mark.parametrize("count, devices, expected", [
    (0, None, ["cpu", "cpu", "cpu", "cpu"]),
    (1, None, ["cuda:0", "cuda:0", "cuda:0", "cuda:0"]),
    (2, None, ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]),
    (3, None, ["cuda:0", "cuda:1", "cuda:2", "cuda:0"]),
    (4, [1, 3], ["cuda:1", "cuda:3", "cuda:1", "cuda:3"]),
])
def test_xdist_worker_k_uses_gpu_k_mod_count(count, devices, expected):
    got = [H.device_for_worker(f"gw{k}", cuda_count=count, devices=devices) for k in range(4)]
    assert got == expected
    assert H.device_for_worker(None, cuda_count=count, devices=devices) == expected[0]  # no xdist: worker 0
    assert H.device_for_worker("gw3", cuda_count=count, explicit="cuda:7") == "cuda:7"  # --device wins


def test_devices_option_is_checked_against_the_visible_gpus():
    assert H.parse_devices(None, 2) is None and H.parse_devices("0,1", 2) == [0, 1] and H.parse_devices("1", 2) == [1]
    with pytest.raises(pytest.UsageError, match=r"device index 5 does not exist \(2 CUDA device\(s\) visible: 0, 1\)"):
        H.parse_devices("0,5", 2)
    with pytest.raises(pytest.UsageError, match="comma-separated CUDA device indices"):
        H.parse_devices("gpu0", 2)
    with pytest.raises(pytest.UsageError, match="none"):
        H.parse_devices("0", 0)


def test_profile_is_never_silently_paper():
    assert H.choose_profile(None, cuda_available=False) == "cpu"
    assert H.choose_profile(None, cuda_available=True) is None  # must be chosen
    assert H.choose_profile("smoke", cuda_available=True) == "smoke"
    assert H.choose_profile("paper", cuda_available=False) == "paper"


FAKE_CUDA = """
import torch
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 2
"""


def _collect(tmp_path, *args, fake_cuda=False):
    env = {**os.environ, "DB3KD_CACHE": str(tmp_path / "cache")}
    extra = []
    if fake_cuda:
        (tmp_path / "fakecuda.py").write_text(FAKE_CUDA)
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
        extra = ["-p", "fakecuda"]
    return subprocess.run([sys.executable, "-m", "pytest", *extra, "benchmarks", "--collect-only", "-q",
                           "-p", "no:cacheprovider", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def test_dataset_marker_selects_its_cases_and_cuda_requires_a_profile(tmp_path):
    from db3kd.registry import method_names

    n = len(method_names())
    out = _collect(tmp_path, "-m", "mnist", "--profile", "cpu")  # cpu cases are all `slow`
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    ids = [ln for ln in out.stdout.splitlines() if "test_distill[mnist-" in ln]
    assert len(ids) == n and f"{n}/" in out.stdout
    refused = _collect(tmp_path, "-m", "mnist", fake_cuda=True)
    assert refused.returncode == 4, refused.stdout[-3000:] + refused.stderr[-2000:]
    assert "CUDA is visible: choose the profile explicitly with --profile smoke | cpu | paper" in refused.stderr
    bad = _collect(tmp_path, "-m", "mnist", "--profile", "cpu", "--devices", "0,5", fake_cuda=True)
    assert bad.returncode == 4 and "device index 5 does not exist" in bad.stderr


@pytest.mark.slow  # three more harness collections (about 15 s each on 2 busy cores)
def test_profile_chosen_with_cuda_perf_without_and_the_deselection_hint(tmp_path):
    from db3kd.registry import method_names

    n = len(method_names())
    chosen = _collect(tmp_path, "-m", "mnist", "--profile", "cpu", fake_cuda=True)
    assert chosen.returncode == 0 and f"{n}/" in chosen.stdout, chosen.stderr[-2000:]
    perf_only = _collect(tmp_path, "-m", "perf", fake_cuda=True)  # no distillation case: no profile needed
    assert perf_only.returncode == 0, perf_only.stderr[-2000:]
    plain = _collect(tmp_path, "--profile", "cpu")  # the default -m 'not slow' leaves no case: say how to select
    assert "benchmark case(s) deselected by the default -m 'not slow'; select a dataset's cases with -m DATASET" \
        in plain.stdout
