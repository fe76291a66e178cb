"""Devices by configuration: an encoder's own `device`, the pipeline's EncoderBank device, then
$FUSEMIX_DEVICE, then the CPU; `auto` picks a GPU where one is present. The `gpu` tests here run
wherever CUDA is present (tests/conftest.py skips them, with the reason, elsewhere)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fusion.config import AdapterConfig, FuseMixConfig, TrainConfig
from fusion.encoders import build_encoder, load_registry
from fusion.encoders.base import EncoderConfigError, EncoderSpec
from fusion.hardware import DEVICE_ENV, resolve_device
from fusion.trainer import train_adapters
from pipelines.resources import EncoderBank
from tests.fusion.test_trainer import _data
from tests.tiny_models import write_tiny_registry


@pytest.mark.parametrize(
    ("device", "env", "cuda", "want"),
    [
        (None, "", False, "cpu"),
        (None, "cuda:1", False, "cuda:1"),  # the environment, where nothing else is configured
        ("cpu", "cuda", True, "cpu"),  # a configured device wins over the environment
        ("auto", "", True, "cuda"),
        ("auto", "", False, "cpu"),
        ("auto", "cpu", True, "cpu"),  # auto leaves the choice to the machine's setting
        ("cuda:0", "", False, "cuda:0"),  # named as asked; building on it says CUDA is missing
    ],
)
def test_resolve_device(monkeypatch, device, env, cuda, want):
    monkeypatch.setenv(DEVICE_ENV, env)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device(device) == want


def test_bad_device_names_are_named(monkeypatch):
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("gpu")
    monkeypatch.setenv(DEVICE_ENV, "cuda:x")
    with pytest.raises(ValueError, match=DEVICE_ENV):
        resolve_device()
    with pytest.raises(EncoderConfigError, match="'device'"):
        EncoderSpec("e", "text", "hf", "m", device="tpu")
    with pytest.raises(ValueError, match="device must be"):
        TrainConfig(device="gpu0")


def test_an_encoders_own_device_wins_over_the_bank_and_the_environment(tmp_path, monkeypatch):
    registry = write_tiny_registry(tmp_path)
    text = yaml_with_device(registry, "tiny-text", "cpu")
    bank = EncoderBank(registry_path=str(text), device="cuda")
    monkeypatch.setenv(DEVICE_ENV, "cuda:1")
    assert bank.device_for(bank.spec("tiny-text")) == "cpu"
    assert bank.device_for(bank.spec("tiny-image")) == "cuda"
    assert EncoderBank(registry_path=str(text)).device_for(bank.spec("tiny-image")) == "cuda:1"
    monkeypatch.delenv(DEVICE_ENV)
    plain = EncoderBank(registry_path=str(text))
    assert plain.device_for(plain.spec("tiny-image")) == "cpu"
    enc = plain.get("tiny-text")
    assert enc.device == "cpu" and plain.ref("tiny-text").fingerprint == enc.fingerprint


def yaml_with_device(registry, name: str, device: str):
    import yaml

    data = yaml.safe_load(registry.read_text())
    data["encoders"][name]["device"] = device
    out = registry.with_name("with-device.yaml")
    out.write_text(yaml.safe_dump(data))
    assert load_registry(out)[name].device == device
    return out


def test_training_on_auto_runs_where_the_machine_says(monkeypatch):
    x, y = _data()
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    cfg = TrainConfig(batch_size=16, steps=3, warmup_steps=1, device="auto")
    result = train_adapters(x, y, AdapterConfig(depth=1, expansion=2, output_dim=8), FuseMixConfig(), cfg)
    assert next(result.model.parameters()).device.type == "cpu" and result.steps == 3


# ------------------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
def test_training_on_cuda_with_auto_precision_is_close_to_the_cpu():
    x, y = _data(n=256)
    adapter = AdapterConfig(depth=1, expansion=2, dropout=0.0, output_dim=8)
    losses = {}
    for device, precision in (("cpu", "fp32"), ("cuda", "auto")):
        cfg = TrainConfig(batch_size=64, steps=20, warmup_steps=2, device=device, precision=precision)
        result = train_adapters(x, y, adapter, FuseMixConfig("none"), cfg)
        losses[device] = [row["loss"] for row in result.history]
        assert next(result.model.parameters()).device.type == device
    assert result.precision in ("bf16", "fp16")
    np.testing.assert_allclose(losses["cuda"], losses["cpu"], rtol=0.05)


@pytest.mark.gpu
def test_encoders_on_cuda_run_reduced_precision_close_to_the_cpu(tmp_path):
    registry = load_registry(write_tiny_registry(tmp_path))
    for name in ("tiny-text", "tiny-image"):
        spec = registry[name]
        cpu = build_encoder(dataclasses.replace(spec, dtype="float32"))
        gpu = build_encoder(dataclasses.replace(spec, dtype="auto"), device="cuda")
        assert gpu.precision in ("bfloat16", "float16") and gpu.fingerprint != cpu.fingerprint
        payloads = (
            ["a red apple", "two dogs"] if spec.modality == "text" else [np.zeros((3, 32, 32), np.float32)]
        )
        np.testing.assert_allclose(gpu.encode(payloads), cpu.encode(payloads), atol=0.05, rtol=0.05)
