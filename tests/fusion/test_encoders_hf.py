"""Every transformers loader path on tiny seeded models: pooling, preprocessing, Whisper windows, CLAP towers,
fingerprints."""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from fusion.adapters import EncoderRef
from fusion.encoders import (
    EncoderConfigError,
    EncoderSpec,
    EncoderUnavailable,
    build_encoder,
    describe_encoder,
)
from fusion.encoders.base import compute_fingerprint, hash_model_dir
from fusion.media import MediaError
from tests.tiny_models import make_tiny_bert, make_tiny_clap, make_tiny_vit, make_tiny_whisper

SENTENCES = ["a cat sits on the sofa", "two dogs", "the red car runs over the big blue street in the park"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        "bert": make_tiny_bert(root / "bert"),
        "bert_st_cls": make_tiny_bert(root / "bert_st_cls", st_pooling="cls"),
        "bert_st_mean": make_tiny_bert(root / "bert_st_mean", st_pooling="mean"),
        "bert_other_seed": make_tiny_bert(root / "bert_seed1", seed=1),
        "vit": make_tiny_vit(root / "vit"),
        "vit_noproc": make_tiny_vit(root / "vit_noproc", with_processor=False),
        "whisper": make_tiny_whisper(root / "whisper"),
        "clap": make_tiny_clap(root / "clap"),
    }


def spec(model, modality="text", **kw) -> EncoderSpec:
    return EncoderSpec(name=kw.pop("name", "t"), modality=modality, source="hf", model=str(model), **kw)


def picture(seed: int, size=(40, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 255, 3)))
    ImageDraw.Draw(im).ellipse((5, 5, 30, 35), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return im


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def wav(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + 0.05 * rng.standard_normal(n)).astype(
        np.float32
    )


# ---------------------------------------------------------------------------------------------- text


def _bert_reference(model_dir, texts):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc), enc["attention_mask"]


@pytest.mark.parametrize("pooling", ["mean", "cls", "pooler"])
def test_text_pooling_matches_the_model(dirs, pooling):
    enc = build_encoder(spec(dirs["bert"], pooling=pooling))
    got = enc.encode(SENTENCES)
    out, mask = _bert_reference(dirs["bert"], SENTENCES)
    if pooling == "mean":
        m = mask.unsqueeze(-1).float()
        want = (out.last_hidden_state * m).sum(1) / m.sum(1)
    elif pooling == "cls":
        want = out.last_hidden_state[:, 0]
    else:
        want = out.pooler_output
    assert got.dtype == np.float32 and got.shape == (3, 32) and enc.dim == 32
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)


def test_text_mean_pooling_ignores_padding(dirs):
    enc = build_encoder(spec(dirs["bert"], pooling="mean"))
    alone = enc.encode([SENTENCES[1]])[0]
    padded = enc.encode(SENTENCES)[1]  # padded to the long third sentence
    np.testing.assert_allclose(alone, padded, atol=1e-5)


def test_sentence_transformers_pooling_config_wins(dirs):
    enc = build_encoder(spec(dirs["bert_st_cls"], pooling="mean"))
    assert enc.pooling == "cls" and enc.max_length == 48
    out, _ = _bert_reference(dirs["bert_st_cls"], SENTENCES)
    np.testing.assert_allclose(enc.encode(SENTENCES), out.last_hidden_state[:, 0].numpy(), atol=1e-5)


def test_text_rejects_non_text_payload(dirs):
    enc = build_encoder(spec(dirs["bert"]))
    with pytest.raises(MediaError) as err:
        enc.prepare(b"bytes", "m1")
    assert err.value.media_id == "m1"


def test_text_cost_counts_tokens(dirs):
    enc = build_encoder(spec(dirs["bert"]))
    assert enc.cost("a cat") < enc.cost(SENTENCES[2])


def test_float16_spec_runs_float32_on_cpu_and_bfloat16_is_close_with_its_own_fingerprint(dirs):
    ref = build_encoder(spec(dirs["bert"], dtype="float32"))
    half = build_encoder(spec(dirs["bert"], dtype="float16"))  # fp16 autocast is CUDA-only
    bf16 = build_encoder(spec(dirs["bert"], dtype="bfloat16"))
    want = ref.encode(SENTENCES)
    np.testing.assert_array_equal(half.encode(SENTENCES), want)
    assert half.fingerprint == ref.fingerprint and half.precision == "float32"
    out = bf16.encode(SENTENCES)
    assert out.dtype == np.float32 and bf16.precision == "bfloat16"
    assert not np.array_equal(out, want)  # it really ran in bf16
    cos = (out * want).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() > 0.99, cos
    assert bf16.fingerprint != ref.fingerprint


# --------------------------------------------------------------------------------------------- image


def test_image_cls_and_pooler_match_the_model(dirs):
    from transformers import AutoImageProcessor, ViTModel

    pics = [picture(0), picture(1)]
    proc = AutoImageProcessor.from_pretrained(str(dirs["vit"]), backend="pil")
    model = ViTModel.from_pretrained(str(dirs["vit"])).eval()
    with torch.no_grad():
        out = model(pixel_values=proc(images=pics, return_tensors="pt")["pixel_values"])
    cls = build_encoder(spec(dirs["vit"], "image", pooling="cls")).encode(pics)
    pooled = build_encoder(spec(dirs["vit"], "image", pooling="pooler")).encode(pics)
    np.testing.assert_allclose(cls, out.last_hidden_state[:, 0].numpy(), atol=1e-5)
    np.testing.assert_allclose(pooled, out.pooler_output.numpy(), atol=1e-5)
    assert not np.allclose(cls, pooled)


def test_image_decodes_bytes_and_paths_through_media(dirs, tmp_path):
    enc = build_encoder(spec(dirs["vit"], "image", pooling="cls"))
    im = picture(3)
    path = tmp_path / "p.png"
    im.save(path)
    from_bytes, from_path, from_pil = enc.encode([png_bytes(im), str(path), im])
    np.testing.assert_allclose(from_bytes, from_pil, atol=1e-6)
    np.testing.assert_allclose(from_path, from_pil, atol=1e-6)
    with pytest.raises(MediaError):
        enc.prepare(b"not an image", "bad")


def test_image_without_processor_uses_spec_preprocessing(dirs):
    enc = build_encoder(
        spec(
            dirs["vit_noproc"],
            "image",
            pooling="cls",
            preprocessing={"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
        )
    )
    x = enc.prepare(picture(0, size=(64, 40)))
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    assert x.min() >= -1.0 - 1e-6 and x.max() <= 1.0 + 1e-6
    assert np.isfinite(enc.encode([picture(0)])).all()


# --------------------------------------------------------------------------------------------- audio


def test_whisper_full_window_means_over_real_frames(dirs):
    from transformers import WhisperFeatureExtractor, WhisperModel

    enc = build_encoder(spec(dirs["whisper"], "audio"))
    assert not enc.short_clip and enc.sample_rate == 16000
    clips = [wav(16000 * 2), wav(7000, seed=1)]
    got = enc.encode(clips)
    fe = WhisperFeatureExtractor.from_pretrained(str(dirs["whisper"]))
    model = WhisperModel.from_pretrained(str(dirs["whisper"])).eval()
    with torch.no_grad():
        hidden = model.encoder(
            fe(clips, sampling_rate=16000, return_tensors="pt")["input_features"]
        ).last_hidden_state
    for i, clip in enumerate(clips):
        n = math.ceil(len(clip) / 320)
        np.testing.assert_allclose(got[i], hidden[i, :n].mean(0).numpy(), atol=1e-5)
    assert np.isfinite(got).all() and got.shape == (2, 32)


def test_whisper_short_clip_is_finite_batch_invariant_and_exact_on_a_full_window(dirs):
    short = build_encoder(spec(dirs["whisper"], "audio", options={"short_clip": True}))
    full = build_encoder(spec(dirs["whisper"], "audio"))
    clips = [wav(16000 * 3), wav(5000, seed=1), wav(100, seed=2)]
    batched = short.encode(clips)
    one_by_one = np.stack([short.encode([c])[0] for c in clips])
    assert np.isfinite(batched).all() and batched.shape == (3, 32)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    # A 30-s clip fills the window: the hand-run layers must then equal transformers' own forward.
    long_clip = wav(16000 * 30, seed=3)
    np.testing.assert_allclose(short.encode([long_clip]), full.encode([long_clip]), atol=1e-4)
    assert short.fingerprint != full.fingerprint


def test_whisper_window_s_is_the_30_s_window_cut_short(dirs):
    """options.window_s: the first frames of the 30-s window's features, the clip padded with
    silence to the window and every frame attended to. At 30 s it is the full window exactly; shorter,
    it matches transformers' layers run by hand on the cut features."""
    from transformers import WhisperFeatureExtractor, WhisperModel

    full = build_encoder(spec(dirs["whisper"], "audio"))
    same = build_encoder(spec(dirs["whisper"], "audio", options={"window_s": 29.9}))
    clips = [wav(16000 * 2), wav(7000, seed=1), wav(100, seed=2)]
    assert same.window_frames == 1495  # 29.9 s of 20-ms frames
    thirty = build_encoder(spec(dirs["whisper"], "audio", options={"window_s": 30}))
    by_hand = thirty._run(thirty._short_window, [thirty.prepare(c) for c in clips])
    np.testing.assert_allclose(by_hand, full.encode(clips), atol=1e-4)  # the hand-run path at 30 s
    ten = build_encoder(spec(dirs["whisper"], "audio", options={"window_s": 10}))
    assert ten.window_frames == 500 and ten.max_seconds == 10.0
    got = ten.encode(clips)
    np.testing.assert_allclose(got, np.stack([ten.encode([c])[0] for c in clips]), atol=1e-5)
    fe = WhisperFeatureExtractor.from_pretrained(str(dirs["whisper"]))
    enc = WhisperModel.from_pretrained(str(dirs["whisper"])).eval().encoder
    with torch.no_grad():
        x = fe(clips, sampling_rate=16000, return_tensors="pt")["input_features"][:, :, :1000]
        h = torch.nn.functional.gelu(enc.conv2(torch.nn.functional.gelu(enc.conv1(x)))).permute(0, 2, 1)
        h = h + enc.embed_positions.weight[:500]
        for layer in enc.layers:
            h = layer(h, None)
        h = enc.layer_norm(h)
    for i, clip in enumerate(clips):
        n = max(1, math.ceil(len(clip) / 320))
        np.testing.assert_allclose(got[i], h[i, :n].mean(0).numpy(), atol=1e-5)
    assert not np.allclose(got, full.encode(clips), atol=1e-3)  # a shorter window sees less silence
    # A clip longer than the window is cut to it; fingerprints differ only where window_s is set.
    long_clip = wav(16000 * 12, seed=3)
    np.testing.assert_allclose(ten.encode([long_clip]), ten.encode([long_clip[: 16000 * 10]]), atol=1e-5)
    assert len({full.fingerprint, same.fingerprint, ten.fingerprint}) == 3
    assert "window_s" not in full.settings.effective()


@pytest.mark.parametrize(
    "options", [{"window_s": 0}, {"window_s": 31}, {"window_s": "10"}, {"window_s": 10, "short_clip": True}]
)
def test_whisper_window_s_refuses_what_it_cannot_do(dirs, options):
    from fusion.encoders import EncoderConfigError

    with pytest.raises(EncoderConfigError, match="window_s"):
        build_encoder(spec(dirs["whisper"], "audio", options=options))


def test_whisper_rejects_cls_pooling(dirs):
    from fusion.encoders import EncoderConfigError

    with pytest.raises(EncoderConfigError, match="pooling"):
        build_encoder(spec(dirs["whisper"], "audio", pooling="cls"))


# ---------------------------------------------------------------------------------------------- clap


def test_clap_audio_and_text_towers_give_raw_projections(dirs):
    from transformers import ClapModel, ClapProcessor

    audio = build_encoder(spec(dirs["clap"], "audio", options={"tower": "audio"}))
    text = build_encoder(spec(dirs["clap"], "text", options={"tower": "text"}))
    assert audio.sample_rate == 48000 and audio.dim == text.dim == 32
    clips = [wav(48000, seed=0), wav(30000, seed=1)]
    a = audio.encode(clips)
    t = text.encode(["a dog barks", "piano music"])
    model = ClapModel.from_pretrained(str(dirs["clap"])).eval()
    proc = ClapProcessor.from_pretrained(str(dirs["clap"]))
    with torch.no_grad():
        a_ref = model.get_audio_features(
            **proc.feature_extractor(clips, sampling_rate=48000, truncation="rand_trunc", return_tensors="pt")
        )
        t_ref = model.get_text_features(
            **proc.tokenizer(["a dog barks", "piano music"], padding=True, return_tensors="pt")
        )
    # transformers normalises; the encoder keeps the raw projection, equal up to the norm.
    np.testing.assert_allclose(
        a / np.linalg.norm(a, axis=1, keepdims=True), a_ref.pooler_output.numpy(), atol=1e-5
    )
    np.testing.assert_allclose(
        t / np.linalg.norm(t, axis=1, keepdims=True), t_ref.pooler_output.numpy(), atol=1e-5
    )
    np.testing.assert_allclose(a[1], audio.encode([clips[1]])[0], atol=1e-5)


# -------------------------------------------------------------------------------------- fingerprints


def test_fingerprint_stable_and_sensitive(dirs):
    base = build_encoder(spec(dirs["bert"], pooling="mean"))
    again = build_encoder(spec(dirs["bert"], pooling="mean", name="other-name", batch_size=5))
    cls = build_encoder(spec(dirs["bert"], pooling="cls"))
    longer = build_encoder(spec(dirs["bert"], pooling="mean", preprocessing={"max_length": 16}))
    other_weights = build_encoder(spec(dirs["bert_other_seed"], pooling="mean"))
    assert base.fingerprint == again.fingerprint
    assert len({base.fingerprint, cls.fingerprint, longer.fingerprint, other_weights.fingerprint}) == 4
    assert all(c in "0123456789abcdef" for c in base.fingerprint) and len(base.fingerprint) == 16


def test_fingerprint_needs_no_model():
    s = EncoderSpec(name="x", modality="text", source="hf", model="m")
    assert compute_fingerprint("ab" * 32, s) == compute_fingerprint("ab" * 32, s)
    assert compute_fingerprint("ab" * 32, s) != compute_fingerprint("cd" * 32, s)


# ------------------------------------------------------------------------------ describe_encoder

# (folder, modality, spec fields): every loader path, each with a setting that changes its fingerprint.
DESCRIBE_CASES = {
    "bert-mean": ("bert", "text", {}),
    "bert-cls": ("bert", "text", {"pooling": "cls"}),
    "bert-pooler": ("bert", "text", {"pooling": "pooler"}),
    "bert-max16": ("bert", "text", {"preprocessing": {"max_length": 16}}),
    "bert-st-cls": ("bert_st_cls", "text", {}),
    "bert-st-cls-max16": ("bert_st_cls", "text", {"preprocessing": {"max_length": 16}}),
    "bert-st-mean": ("bert_st_mean", "text", {"pooling": "cls"}),
    "vit-processor": ("vit", "image", {"pooling": "cls"}),
    "vit-own-size": ("vit", "image", {"pooling": "cls", "preprocessing": {"image_size": 48}}),
    "vit-noproc": ("vit_noproc", "image", {}),
    "vit-noproc-std": ("vit_noproc", "image", {"preprocessing": {"std": [0.5, 0.5, 0.5]}}),
    "whisper-30s": ("whisper", "audio", {}),
    "whisper-short": ("whisper", "audio", {"options": {"short_clip": True}}),
    "clap-audio": ("clap", "audio", {"options": {"tower": "audio"}}),
    "clap-text": ("clap", "text", {"options": {"tower": "text"}}),
    "clap-text-default-tower": ("clap", "text", {}),
}


def _case(dirs, name) -> EncoderSpec:
    folder, modality, fields = DESCRIBE_CASES[name]
    return spec(dirs[folder], modality, name=name, **fields)


@pytest.mark.parametrize("case", sorted(DESCRIBE_CASES))
def test_describe_equals_build(dirs, case, tmp_path):
    s = _case(dirs, case)
    enc = build_encoder(s, cache_dir=tmp_path)
    ref = describe_encoder(s, cache_dir=tmp_path)
    assert isinstance(ref, EncoderRef)
    assert ref == EncoderRef(case, enc.fingerprint, enc.dim)
    assert describe_encoder(s) == ref  # the hash cache file changes nothing


def test_describe_follows_option_changes_like_build(dirs):
    refs = {case: describe_encoder(_case(dirs, case)) for case in DESCRIBE_CASES}
    # Every case differs from every other: the same weights with another setting, or other weights.
    # (Naming the CLAP tower that is also the default still counts: options enter the fingerprint.)
    assert len({r.fingerprint for r in refs.values()}) == len(DESCRIBE_CASES)
    for a, b in [
        ("whisper-30s", "whisper-short"),
        ("bert-mean", "bert-cls"),
        ("vit-noproc", "vit-noproc-std"),
    ]:
        built = {c: build_encoder(_case(dirs, c)).fingerprint for c in (a, b)}
        assert built == {a: refs[a].fingerprint, b: refs[b].fingerprint} and built[a] != built[b]


def test_describe_resolves_what_the_encoder_uses(dirs):
    from transformers import AutoTokenizer

    from fusion.encoders.hf import resolve_from_dir, tokenizer_model_max_length

    st = resolve_from_dir(_case(dirs, "bert-st-mean"), dirs["bert_st_mean"])
    assert (st.pooling, st.max_length, st.dim) == ("mean", 48, 32)  # the ST config wins over the spec
    enc = build_encoder(_case(dirs, "bert-mean"))
    assert resolve_from_dir(enc.spec, dirs["bert"]) == enc.settings
    assert (enc.settings.pooling, enc.settings.max_length) == (enc.pooling, enc.max_length) == ("mean", 64)
    # max_length comes from tokenizer_config.json: what the loaded tokenizer holds.
    for folder in ("bert", "clap"):
        assert (
            tokenizer_model_max_length(dirs[folder])
            == AutoTokenizer.from_pretrained(dirs[folder]).model_max_length
        )
    image = build_encoder(_case(dirs, "vit-noproc-std"))
    assert image.settings.std == image.std == (0.5, 0.5, 0.5) and image.size == 32


def test_describe_constructs_no_model(dirs, monkeypatch):
    import safetensors.torch
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("describe_encoder must not construct a model or read weights")

    monkeypatch.setattr(torch.nn.Module, "__init__", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    for name in ("AutoModel", "AutoTokenizer", "AutoImageProcessor", "WhisperModel", "ClapModel",
                 "WhisperFeatureExtractor", "ClapFeatureExtractor"):  # fmt: skip
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", refuse)
    refs = {case: describe_encoder(_case(dirs, case)) for case in DESCRIBE_CASES}
    assert {r.dim for r in refs.values()} == {32}
    with pytest.raises(AssertionError, match="must not construct"):  # the patches do bite
        build_encoder(_case(dirs, "bert-mean"))


def test_describe_raises_what_build_raises(dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = [
        (spec(dirs["whisper"], "audio", pooling="cls"), EncoderConfigError, "pooling"),
        (spec(tmp_path), EncoderUnavailable, "config.json"),
        (spec("no-such-org/no-such-model-xyz"), EncoderUnavailable, "HF_HUB_OFFLINE"),
    ]
    for s, error, match in cases:
        with pytest.raises(error, match=match):
            build_encoder(s, cache_dir=tmp_path / "cache")
        with pytest.raises(error, match=match):
            describe_encoder(s, cache_dir=tmp_path / "cache")


def test_weights_hash_is_cached_and_follows_file_changes(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"\x00" * 100)
    cache = tmp_path / "cache" / "weights-sha256.json"
    first = hash_model_dir(d, cache)
    assert cache.is_file() and str(d / "model.safetensors") in cache.read_text()
    assert hash_model_dir(d, cache) == first
    (d / "README.md").write_text("docs do not change the weights")
    assert hash_model_dir(d, cache) == first
    (d / "model.safetensors").write_bytes(b"\x01" * 100)
    assert hash_model_dir(d, cache) != first


def test_unknown_hub_id_offline_is_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    s = EncoderSpec(name="x", modality="text", source="hf", model="no-such-org/no-such-model-xyz")
    with pytest.raises(EncoderUnavailable, match="HF_HUB_OFFLINE"):
        build_encoder(s, cache_dir=tmp_path)


def test_folder_without_config_is_unavailable(tmp_path):
    with pytest.raises(EncoderUnavailable, match="config.json"):
        build_encoder(EncoderSpec(name="x", modality="text", source="hf", model=str(tmp_path)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_autocast_is_close_to_cpu(dirs, dtype):
    if not torch.cuda.is_available():
        pytest.fail("the gpu marker needs a CUDA device: run it where one exists")
    clips = [wav(16000 * 3), wav(5000, seed=1)]
    for model, modality, payloads, options in [
        (dirs["bert"], "text", SENTENCES, {}),
        (dirs["vit"], "image", [picture(0), picture(1)], {}),
        (dirs["whisper"], "audio", clips, {"short_clip": True}),
    ]:
        s = spec(model, modality, pooling="cls" if modality == "image" else "mean", options=options)
        cpu = build_encoder(s).encode(payloads)
        gpu_enc = build_encoder(dataclasses.replace(s, dtype=dtype), device="cuda")
        gpu = gpu_enc.encode(payloads)
        assert gpu.dtype == np.float32 and np.isfinite(gpu).all()
        np.testing.assert_allclose(gpu, cpu, atol=0.05, rtol=0.05)
        np.testing.assert_allclose(gpu[1], gpu_enc.encode([payloads[1]])[0], atol=0.02)


def test_pickled_only_weights_are_refused(tmp_path):
    from safetensors.torch import load_file

    d = make_tiny_bert(tmp_path / "bin-only")
    torch.save(load_file(str(d / "model.safetensors")), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    with pytest.raises(EncoderUnavailable, match="safetensors"):
        build_encoder(spec(d))
