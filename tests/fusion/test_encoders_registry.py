"""The encoder registry: the shipped YAML, validation errors, add_encoder, availability and describe rows."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
import yaml

from fusion.adapters import EncoderRef
from fusion.encoders import (
    EncoderConfigError,
    EncoderSpec,
    EncoderUnavailable,
    add_encoder,
    build_encoder,
    describe_encoder,
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


# ------------------------------------------------------------------------------ describe_encoder


def ref_of(encoder) -> EncoderRef:
    return EncoderRef(encoder.name, encoder.fingerprint, encoder.dim)


def test_describe_equals_build_for_the_tiny_registry(tmp_path):
    reg = load_registry(write_tiny_registry(tmp_path))
    for spec in reg.values():
        assert describe_encoder(spec) == ref_of(build_encoder(spec)), spec.name


def test_laion_clap_describe_needs_only_the_checkpoint_file(tmp_path):
    checkpoint = tmp_path / "ckpt" / "630k-audioset-best.pt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"laion weights")
    spec = EncoderSpec(
        "laion-audio", "audio", "laion_clap", "HTSAT-tiny", options={"checkpoint": str(checkpoint)}
    )
    # describe hashes the file and reads no weights, so these bytes (no checkpoint at all) describe fine.
    ref = describe_encoder(spec)
    assert ref.dim == 512 and describe_encoder(spec) == ref
    (tmp_path / "ckpt" / "other.pt").write_bytes(b"another checkpoint in the same folder")
    assert describe_encoder(spec) == ref  # the file is hashed, not its folder
    checkpoint.write_bytes(b"other laion weights")
    assert describe_encoder(spec).fingerprint != ref.fingerprint
    with pytest.raises(EncoderUnavailable, match="checkpoint"):
        describe_encoder(dataclasses.replace(spec, options={"checkpoint": str(tmp_path / "no.pt")}))
    # Only the audio tower is built offline; a text entry says where CLAP's text tower loads from.
    with pytest.raises(EncoderConfigError, match="audio tower only"):
        describe_encoder(dataclasses.replace(spec, modality="text"))
    # build_encoder reads the file, weights only: these bytes are refused (or the package is missing).
    # Real builds, on a random LAION-style checkpoint: tests/fusion/test_laion_clap.py.
    with pytest.raises(EncoderUnavailable, match="weights only|not installed"):
        build_encoder(spec)


def test_offline_unknown_key_is_unavailable_for_describe_too():
    s = EncoderSpec("nope", "text", "offline", "no-such-pack-entry")
    for fn in (build_encoder, describe_encoder):
        with pytest.raises(EncoderUnavailable, match="no-such-pack-entry"):
            fn(s)


# Fingerprints and dims of the shipped offline entries as build_encoder computed them before
# describe_encoder existed: latents already in a lake carry these, so a change must be deliberate.
SHIPPED_REFS = {
    "minilm": ("5b5b829fa64662fb", 384),
    "mpnet": ("e0984240c5bf17a8", 768),
    "effnet-lite0": ("001228b15f4de866", 1280),
    "effnet-lite2": ("d69781c566d304c7", 1280),
    "whisper-tiny": ("e4a51a67d04e9191", 384),
    "whisper-base": ("fef31b5f264969df", 512),
    "whisper-tiny-30s": ("b6ff7700f49a8b17", 384),
}


@pytest.fixture(scope="module")
def pack_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


def _shipped(name: str) -> EncoderSpec:
    spec = load_registry(PROJECT_ROOT / "configs" / "encoders.yaml")[name]
    ok, why = encoder_status(spec)
    if not ok:
        pytest.fail(f"offline pack missing (make install): {name}: {why}")
    return spec


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SHIPPED_REFS))
def test_offline_pack_describe_equals_build(name, pack_cache):
    spec = _shipped(name)
    described = describe_encoder(spec, cache_dir=pack_cache)  # the first call may materialise the entry
    built = build_encoder(spec, cache_dir=pack_cache)
    assert described == ref_of(built) == EncoderRef(name, *SHIPPED_REFS[name])
    if spec.modality == "image":  # a spec option moves both the same way
        other = dataclasses.replace(spec, preprocessing={"image_size": 256})
        moved = describe_encoder(other, cache_dir=pack_cache)
        assert moved == ref_of(build_encoder(other, cache_dir=pack_cache))
        assert moved.fingerprint != described.fingerprint
        assert built.size == {"effnet-lite0": 224, "effnet-lite2": 260}[name]


@pytest.mark.slow
def test_offline_describe_on_a_warm_cache_loads_and_verifies_nothing(pack_cache, monkeypatch):
    import safetensors.torch
    import transformers

    from fusion.encoders import offline_pack

    specs = [_shipped(name) for name in SHIPPED_REFS]
    for spec in specs:
        offline_pack.materialise(spec.model, pack_cache)

    def refuse(*args, **kwargs):
        raise AssertionError("describe_encoder must not load a model, read weights or re-verify the pack")

    monkeypatch.setattr(torch.nn.Module, "__init__", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(offline_pack, "verify_sources", refuse)
    for name in ("AutoModel", "AutoTokenizer", "WhisperModel", "WhisperFeatureExtractor"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", refuse)
    start = time.perf_counter()
    refs = {spec.name: describe_encoder(spec, cache_dir=pack_cache) for spec in specs}
    elapsed = time.perf_counter() - start
    assert refs == {name: EncoderRef(name, *ref) for name, ref in SHIPPED_REFS.items()}
    assert elapsed < 5.0, f"describing {len(specs)} warm encoders took {elapsed:.1f} s"
    with pytest.raises(AssertionError, match="must not load"):  # the patches do bite
        build_encoder(specs[0], cache_dir=pack_cache)


def test_eager_is_a_setting_outside_the_fingerprint(tmp_path):
    from fusion.encoders.base import EncoderConfigError, EncoderSpec, compute_fingerprint

    plain = EncoderSpec(name="t", modality="text", source="hf", model="m")
    eager = EncoderSpec(name="t", modality="text", source="hf", model="m", eager=True)
    assert eager.to_dict()["eager"] is True and "eager" not in plain.to_dict()
    assert compute_fingerprint("w", plain) == compute_fingerprint("w", eager)
    with pytest.raises(EncoderConfigError, match="'eager' must be true or false"):
        EncoderSpec(name="t", modality="text", source="hf", model="m", eager="yes")
