"""The encoder registry: the shipped YAML, validation errors, add_encoder, availability and describe rows."""

from __future__ import annotations

import pytest
import torch
import yaml

from fusion.encoders import (
    EncoderConfigError,
    EncoderSpec,
    EncoderUnavailable,
    add_encoder,
    build_encoder,
    describe_registry,
    encoder_status,
    load_registry,
)
from fusion.paths import PROJECT_ROOT
from tests.tiny_models import write_tiny_registry


def write(tmp_path, text: str):
    path = tmp_path / "encoders.yaml"
    path.write_text(text)
    return path


def test_shipped_registry_has_the_demo_encoders():
    reg = load_registry(PROJECT_ROOT / "configs" / "encoders.yaml")
    assert {"minilm", "mpnet", "effnet-lite0", "effnet-lite2", "whisper-tiny", "whisper-base"} <= set(reg)
    assert reg["minilm"] == EncoderSpec(
        "minilm", "text", "offline", "all-MiniLM-L6-v2", "mean", batch_size=64
    )
    assert reg["whisper-tiny"].options["short_clip"] is True
    assert reg["effnet-lite0"].modality == "image"


def test_default_path_follows_configs_dir(tmp_path, monkeypatch):
    write(tmp_path, "encoders:\n  t: {modality: text, source: hf, model: x}\n")
    monkeypatch.setenv("FUSEMIX_CONFIGS", str(tmp_path))
    assert list(load_registry()) == ["t"]


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ("{modality: video, source: hf, model: x}", "modality"),
        ("{modality: text, source: torchhub, model: x}", "source"),
        ("{modality: text, source: hf}", "missing required"),
        ("{modality: text, source: hf, model: x, pooling: max}", "pooling"),
        ("{modality: text, source: hf, model: x, batch_size: 0}", "batch_size"),
        ("{modality: text, source: hf, model: x, batch_size: true}", "batch_size"),
        ("{modality: text, source: hf, model: x, dtype: int8}", "dtype"),
        ("{modality: text, source: hf, model: x, colour: red}", "unknown field"),
        ("{modality: audio, source: hf, model: x, options: {tower: text}}", "tower"),
        ("{modality: image, source: hf, model: x, preprocessing: {image_size: -3}}", "image_size"),
        ("{modality: image, source: hf, model: x, preprocessing: {mean: [0.5]}}", "mean"),
        ("{modality: image, source: hf, model: x, options: [1, 2]}", "options"),
        ("[1, 2]", "mapping"),
    ],
)
def test_validation_names_entry_and_field(tmp_path, entry, match):
    path = write(tmp_path, f"encoders:\n  broken: {entry}\n")
    with pytest.raises(EncoderConfigError, match=match) as err:
        load_registry(path)
    assert "broken" in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(EncoderConfigError, match="does not exist"):
        load_registry(tmp_path / "nope.yaml")
    with pytest.raises(EncoderConfigError, match="YAML"):
        load_registry(write(tmp_path, "encoders: {a: [unclosed\n"))
    with pytest.raises(EncoderConfigError, match="top-level"):
        load_registry(write(tmp_path, "- just a list\n"))
    assert load_registry(write(tmp_path, "encoders:\n")) == {}


def test_spec_is_immutable():
    s = EncoderSpec("a", "image", "hf", "m", preprocessing={"image_size": 32})
    with pytest.raises(TypeError):
        s.preprocessing["image_size"] = 64  # type: ignore[index]
    with pytest.raises(AttributeError):
        s.model = "other"  # type: ignore[misc]
    same = EncoderSpec("a", "image", "hf", "m", preprocessing={"image_size": 32})
    assert s == same and hash(s) == hash(same) and len({s, same}) == 1
    assert s != EncoderSpec("a", "image", "hf", "m", preprocessing={"image_size": 64})


def test_add_encoder_creates_updates_and_keeps_others(tmp_path):
    path = tmp_path / "sub" / "encoders.yaml"
    first = add_encoder(path, "a", modality="text", source="hf", model="m1", pooling="cls")
    add_encoder(path, "b", modality="image", source="hf", model="m2", preprocessing={"image_size": 64})
    updated = add_encoder(path, "a", modality="text", source="hf", model="m3")
    reg = load_registry(path)
    assert list(reg) == ["a", "b"]
    assert reg["a"] == updated and reg["a"].model == "m3" and reg["a"].pooling == "mean" != first.pooling
    assert reg["b"].preprocessing["image_size"] == 64
    before = path.read_text()
    with pytest.raises(EncoderConfigError, match="modality"):
        add_encoder(path, "c", modality="smell", source="hf", model="x")
    assert path.read_text() == before
    assert yaml.safe_load(before)["encoders"]["a"] == {"modality": "text", "source": "hf", "model": "m3"}


def test_status_and_describe(tmp_path):
    reg = load_registry(write_tiny_registry(tmp_path / "tiny"))
    reg["missing"] = EncoderSpec("missing", "text", "hf", str(tmp_path / "does-not-exist-here"))
    reg["laion"] = EncoderSpec(
        "laion", "audio", "laion_clap", "HTSAT-tiny", options={"checkpoint": "/no/such.pt"}
    )
    rows = {r["name"]: r for r in describe_registry(reg)}
    assert set(rows) == set(reg)
    assert set(rows["tiny-text"]) == {"name", "modality", "source", "model", "available", "detail"}
    assert (
        rows["tiny-text"]["available"] and rows["tiny-image"]["available"] and rows["tiny-audio"]["available"]
    )
    assert rows["missing"]["available"] is False and rows["missing"]["detail"]
    assert rows["laion"]["available"] is False
    assert encoder_status(reg["tiny-audio"])[0] is True


def test_tiny_registry_builds_every_entry(tmp_path):
    reg = load_registry(write_tiny_registry(tmp_path))
    assert set(reg) == {"tiny-text", "tiny-image", "tiny-audio"}
    dims = {name: build_encoder(spec).dim for name, spec in reg.items()}
    assert dims == {"tiny-text": 32, "tiny-image": 32, "tiny-audio": 32}


def test_laion_clap_unavailable_is_explained():
    s = EncoderSpec("l", "audio", "laion_clap", "HTSAT-tiny", options={"checkpoint": "/no/such.pt"})
    with pytest.raises(EncoderUnavailable, match="laion_clap|checkpoint"):
        build_encoder(s)


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="this machine has CUDA; the error path cannot be reached"
)
def test_cuda_request_without_cuda_is_unavailable(tmp_path):
    reg = load_registry(write_tiny_registry(tmp_path))
    with pytest.raises(EncoderUnavailable, match="CUDA"):
        build_encoder(reg["tiny-text"], device="cuda")
