"""Choosing the device: auto, explicit CPU, clear refusals, and the paths that must not depend on it.

This machine has no GPU: what CUDA itself computes is checked by ``make gpu-check``
(benchmarks/gpu_check.py) on a machine that has one. Here: the choice, the refusals (in the
library's words and the CLI's), the CPU paths equal to the default ones, and that where a model
runs is never saved with it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from behaviorlm.errors import ConfigurationError
from behaviorlm.inference.onnx_engine import execution_providers
from behaviorlm.nn import device
from behaviorlm.recommender import BehaviorLM
from tests.conftest import make_events

SMALL = {"max_len": 16, "dim": 16, "n_layers": 1, "n_heads": 1, "epochs": 2, "progress": False}


def test_auto_takes_a_gpu_when_one_is_present(monkeypatch):
    if not torch.cuda.is_available():
        assert device.resolve("auto") == torch.device("cpu") or device.resolve("auto").type == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device.resolve("auto") == torch.device("cuda")


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "cpu:0", "", "gpu"])
def test_unknown_names_are_refused_with_the_choices(name):
    with pytest.raises(ConfigurationError, match="device must be one of auto, cpu, cuda, mps"):
        device.check_name(name)
    with pytest.raises(ConfigurationError, match="device must be one of"):
        BehaviorLM(device=name)  # at construction, before any data is read


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_an_absent_gpu_is_refused_not_replaced_by_the_cpu():
    with pytest.raises(ConfigurationError, match="'cuda:3' asked for, but this machine has cpu") as err:
        device.resolve("cuda:3")
    assert "--device cuda:3" in (err.value.cli_hint or "")


def test_cpu_rules_are_no_ops():
    cpu = torch.device("cpu")
    batch = {"items": torch.arange(6).reshape(2, 3)}
    assert device.to_device(batch, cpu)["items"] is batch["items"]  # no copy, no pinning
    with device.autocast(cpu):
        assert torch.get_autocast_dtype("cpu") is not None and not torch.is_autocast_enabled("cpu")
    assert device.ddp_backend(cpu) == "gloo" and device.ddp_backend(torch.device("cuda", 0)) == "nccl"


def test_onnxruntime_takes_cuda_only_for_a_gpu_engine_with_the_provider():
    gpu, both = torch.device("cuda", 1), ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert execution_providers(gpu, both)[0] == ("CUDAExecutionProvider", {"device_id": 1})
    assert execution_providers(gpu, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert execution_providers(torch.device("cpu"), both) == ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def events():
    return make_events(n_users=30, n_items=25, length=10)


def test_explicit_cpu_trains_and_scores_as_auto_does_here(events, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("auto is the GPU on this machine")
    auto = BehaviorLM(**SMALL, seed=3).fit(events)
    cpu = BehaviorLM(**SMALL, seed=3, device="cpu").fit(events)
    assert auto.model_version == cpu.model_version  # the same weights, bit for bit
    assert auto.engine.device == cpu.engine.device == torch.device("cpu")
    assert auto.engine.on("cpu") is auto.engine  # already there: no copy
    users = events["user_id"].unique().sort().to_list()[:5]
    assert auto.recommend(users, k=4).equals(cpu.recommend(users, k=4))
    cpu.save(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "estimator.json").read_text())["params"]
    assert "device" not in saved  # where a model ran is the loader's choice, not the model's
    loaded = BehaviorLM.load(tmp_path / "m", device="cpu")
    assert loaded.recommend(users, k=4).equals(cpu.recommend(users, k=4))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cli_refuses_an_absent_gpu_in_its_own_flags(events, tmp_path):
    events.write_csv(tmp_path / "e.csv")
    cmd = [sys.executable, "-m", "behaviorlm.cli", "train", "--events", str(tmp_path / "e.csv")]
    res = subprocess.run([*cmd, "--out", str(tmp_path / "m"), "--device", "cuda"], capture_output=True, text=True)
    said = res.stdout + res.stderr
    assert res.returncode != 0 and "--device cuda: this machine has cpu" in said, said[-1500:]
    assert "Traceback" not in said and not (tmp_path / "m").exists()


def test_a_compiled_forward_ranks_as_the_eager_one(events):
    model = BehaviorLM(**SMALL, seed=5).fit(events)
    users = events["user_id"].unique().sort().to_list()
    want = model.recommend(users, k=5)
    model.use_compile(warm=False)  # compiled on the first call below: one graph, dynamic shapes
    assert model.engine.is_compiled and "forward" not in vars(model.model_)  # the module saved is untouched
    got = model.recommend(users, k=5)
    assert got["item_id"].to_list() == want["item_id"].to_list()
    assert (got["score"] - want["score"]).abs().max() < 1e-5
    with pytest.raises(ConfigurationError, match="choose the device before compiling"):
        model.engine.on(torch.device("meta"))


def test_serve_refuses_compile_on_onnxruntime(tmp_path):
    cmd = [sys.executable, "-m", "behaviorlm.cli", "serve", "--model", str(tmp_path), "--compile", "--engine", "onnx"]
    for name in ("estimator.json", "weights.pt"):  # looks like a model folder: the flags are checked before loading
        (tmp_path / name).write_text("{}")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    said = res.stdout + res.stderr
    assert res.returncode != 0 and "--compile applies to --engine torch" in said, said[-1500:]
