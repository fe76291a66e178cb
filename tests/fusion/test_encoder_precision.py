"""Reduced-precision extraction: which precision dtype "auto" picks, that the precision is in the
fingerprint (float32 and bfloat16 latents never mix), and that bf16 latents of the real offline
encoders stay within a stated cosine of float32 (EfficientNet-Lite0, MiniLM, Whisper-tiny)."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

import fusion.hardware
from fusion.encoders import build_encoder, describe_encoder, encoder_status, load_registry
from fusion.encoders.base import PRECISION_ENV, EncoderConfigError, EncoderSpec, resolve_precision
from fusion.paths import PROJECT_ROOT
from tests.tiny_models import make_tiny_bert

# The cosine to float32 every bf16 latent of the real encoders keeps (measured here: MiniLM 0.99999,
# Whisper-tiny 0.9999; Lite0, whose BatchNorms are folded into its convolutions, min 0.9945 on these
# flat-coloured drawings and 0.9964 on 96 real emoji, against 0.9974 and 0.9978 unfolded). What it
# costs in retrieval is measured by benchmarks/bench_precision.py (Recall@1 of the same adapters).
MIN_COSINE = {"effnet-lite0": 0.99, "minilm": 0.995, "whisper-tiny": 0.995}


@pytest.fixture
def bf16_units(monkeypatch):
    """Sets what the CPU is said to offer: call with "amx", "avx512_bf16" or None."""

    def set_units(units):
        monkeypatch.setattr(fusion.hardware, "cpu_bf16_units", lambda: units)

    return set_units


@pytest.mark.parametrize(
    ("units", "dtype", "env", "want"),
    [
        ("amx", "auto", "", "bfloat16"),
        ("avx512_bf16", "auto", "", "bfloat16"),
        (None, "auto", "", "float32"),  # emulated bf16 is slower than fp32: never picked by itself
        ("amx", "auto", "float32", "float32"),  # the environment overrides auto ...
        (None, "auto", "bfloat16", "bfloat16"),
        ("amx", "float32", "bfloat16", "float32"),  # ... but not an explicit dtype
        (None, "bfloat16", "", "bfloat16"),  # explicit bf16 is honoured even where it is emulated
        ("amx", "float16", "", "float32"),  # fp16 autocast is CUDA-only
    ],
)
def test_auto_precision_on_the_cpu_follows_its_bf16_units(monkeypatch, bf16_units, units, dtype, env, want):
    bf16_units(units)
    monkeypatch.setenv(PRECISION_ENV, env)
    assert resolve_precision(dtype, "cpu") == want


def test_a_bad_precision_in_the_environment_is_named(monkeypatch):
    monkeypatch.setenv(PRECISION_ENV, "int8")
    with pytest.raises(EncoderConfigError, match=PRECISION_ENV):
        resolve_precision("auto", "cpu")


def test_cpu_flags_are_read_from_cpuinfo():
    flags = fusion.hardware.cpu_flags()
    assert isinstance(flags, frozenset)
    units = fusion.hardware.cpu_bf16_units()
    assert units in (None, "amx", "avx512_bf16")
    assert (units is None) == (not {"amx_bf16", "avx512_bf16"} & flags)


def test_auto_fingerprint_names_the_precision_the_machine_runs(tmp_path, monkeypatch, bf16_units):
    model = make_tiny_bert(tmp_path / "bert")
    spec = EncoderSpec(name="t", modality="text", source="hf", model=str(model))  # dtype auto
    assert spec.dtype == "auto" and "dtype" not in spec.to_dict()
    monkeypatch.setenv(PRECISION_ENV, "")
    fingerprints = {}
    for units in ("amx", None):
        bf16_units(units)
        enc = build_encoder(spec)
        assert describe_encoder(spec).fingerprint == enc.fingerprint  # without loading the model
        fingerprints[units] = (enc.precision, enc.fingerprint)
    assert fingerprints["amx"][0] == "bfloat16" and fingerprints[None][0] == "float32"
    assert fingerprints["amx"][1] != fingerprints[None][1]
    # auto that resolves to float32 keeps the fingerprint of an explicit float32 (no re-extraction)
    explicit = dataclasses.replace(spec, dtype="float32")
    assert describe_encoder(explicit).fingerprint == fingerprints[None][1]


def test_folded_batchnorm_enters_the_fingerprint_only_in_reduced_precision():
    from fusion.encoders.hf import TorchImageEncoder

    spec = EncoderSpec(name="lite", modality="image", source="offline", model="efficientnet-lite0")
    args = {"dim": 1280, "image_size": 224, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    for dtype, changes in (("float32", False), ("bfloat16", True)):
        s = dataclasses.replace(spec, dtype=dtype)
        plain = TorchImageEncoder.resolve(s, **args).fingerprint("w" * 64, s)
        folded = TorchImageEncoder.resolve(s, **args, folded=True).fingerprint("w" * 64, s)
        assert (plain != folded) is changes, dtype
    real = load_registry(PROJECT_ROOT / "configs" / "encoders.yaml")["effnet-lite0"]
    if encoder_status(real)[0]:  # the registry's Lite0 is the folded one
        from fusion.encoders import offline_pack

        bf16 = dataclasses.replace(real, dtype="bfloat16")
        assert describe_encoder(bf16).fingerprint == TorchImageEncoder.resolve(
            bf16, dim=1280, image_size=224, mean=(127 / 255,) * 3, std=(128 / 255,) * 3, folded=True
        ).fingerprint(offline_pack.weights_sha256(real.model), bf16)


# ------------------------------------------------------------------- the real offline encoders


def _real(name: str, dtype: str):
    spec = load_registry(PROJECT_ROOT / "configs" / "encoders.yaml")[name]
    ok, why = encoder_status(spec)
    if not ok:
        pytest.fail(f"offline pack missing (make install): {name}: {why}")
    return build_encoder(dataclasses.replace(spec, dtype=dtype))


def _pictures() -> list[bytes]:
    out = []
    rng = np.random.default_rng(3)
    for i in range(6):
        im = Image.new("RGB", (200, 160), tuple(int(c) for c in rng.integers(0, 255, 3)))
        d = ImageDraw.Draw(im)
        for _ in range(4 + i):
            x, y = (int(v) for v in rng.integers(0, 150, 2))
            d.ellipse((x, y, x + 40, y + 30), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _tones() -> list[np.ndarray]:
    t = np.arange(16000 * 3) / 16000
    return [
        (0.3 * np.sin(2 * np.pi * f * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
        for f in (220, 440, 880)
    ]


@pytest.mark.parametrize(
    ("name", "inputs"),
    [
        ("effnet-lite0", _pictures),
        ("minilm", lambda: ["a red apple", "two dogs run on the beach", "a smiling face with sunglasses"]),
        ("whisper-tiny", _tones),
    ],
)
def test_bf16_latents_of_the_real_encoders_stay_close_to_float32(name, inputs):
    items = inputs()
    want = _real(name, "float32").encode(items)
    enc = _real(name, "bfloat16")
    got = enc.encode(items)
    assert enc.precision == "bfloat16" and got.dtype == np.float32
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() >= MIN_COSINE[name], (name, cos)
    assert not np.array_equal(got, want)
