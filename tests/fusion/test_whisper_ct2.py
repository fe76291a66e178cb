"""Tests for the CTranslate2 -> transformers Whisper converter.

Fast: a tiny random transformers Whisper is written to CT2 format by ctranslate2's own spec code
(float32, float16, int8, int16), read back with our reader and compared weight by weight and
against ctranslate2's encoder. Slow: the real PyPI Whisper packages, compared with ctranslate2 and
transcribing a sentence spoken by espeak-ng.
"""

from __future__ import annotations

import copy
import re
import shutil
import struct
import subprocess

import numpy as np
import pytest
import torch

from fusion.encoders.whisper_ct2 import (
    CT2FormatError,
    build_whisper_model,
    ct2_whisper_state_dict,
    read_ct2_model,
    weight_dtypes,
)

SENTENCE = "the quick brown fox jumps over the lazy dog"
# Measured on the PyPI models: tiny.en 1/9 words wrong ("jump"), base 2/9 ("round", "jump"); ctranslate2
# itself decodes exactly the same tokens, so these errors are the models' on robotic espeak speech.
MAX_WER = 0.25
# Max |ours - ct2| / max |ct2| over the encoder output; measured 1.9e-6 (tiny.en) and 2.6e-5 (base).
ENCODER_REL_TOL = 1e-4


def _tiny_whisper(seed: int = 0):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=96, num_mel_bins=80, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=50, max_target_positions=24,
        pad_token_id=0, bos_token_id=1, eos_token_id=1, decoder_start_token_id=2,
    )  # fmt: skip
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # random init leaves biases at zero; give them values so their mapping is tested
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.05)
    return model


def _save_ct2(model, directory, quantization: str):
    """Write `model` with ctranslate2's own WhisperSpec serialiser (the format under test)."""
    pytest.importorskip("ctranslate2")
    from ctranslate2.converters.transformers import WhisperLoader

    # ctranslate2's int8/int16 quantisation scales numpy views of the parameters in place: give it a copy.
    spec = WhisperLoader().get_model_spec(copy.deepcopy(model))
    spec.config.suppress_ids = [3]
    spec.config.suppress_ids_begin = [1]
    spec.config.lang_ids = []
    spec.config.alignment_heads = [[1, 0]]
    spec.register_vocabulary([f"tok{i}" for i in range(model.config.vocab_size)])
    spec.validate()
    spec.optimize(quantization=quantization)
    spec.save(str(directory))
    return directory


@pytest.fixture(scope="module")
def tiny():
    return _tiny_whisper()


@pytest.mark.parametrize(
    ("quantization", "stored", "atol"),
    [
        ("float32", "float32", 0.0),
        ("float16", "float16", 1e-3),
        ("int8", "int8", 0.01),
        ("int16", "int16", 2e-3),
    ],
)
def test_round_trip_matches_transformers_weights(tiny, tmp_path, quantization, stored, atol):
    _save_ct2(tiny, tmp_path, quantization)
    ct2 = read_ct2_model(tmp_path / "model.bin")
    assert ct2.spec_name == "WhisperSpec"
    assert stored in weight_dtypes(ct2)
    sd, dims = ct2_whisper_state_dict(ct2)
    assert dims["d_model"] == 32 and dims["encoder_layers"] == 2 and dims["vocab_size"] == 96
    assert dims["encoder_attention_heads"] == 4 and dims["max_source_positions"] == 50
    assert dims["tie_word_embeddings"] is True
    reference = tiny.state_dict()
    assert set(sd) == set(reference) - {"proj_out.weight"}
    for name, value in sd.items():
        assert value.dtype == torch.float32
        ref = reference[name]
        assert value.shape == ref.shape, name
        # int8 scales are per output row: the error is bounded by half a step of that row's max.
        tol = atol * max(1.0, ref.abs().max().item())
        assert torch.allclose(value, ref, atol=tol, rtol=0), f"{name}: max err {(value - ref).abs().max()}"


def test_converted_model_reproduces_logits_and_ct2_encoder(tiny, tmp_path):
    ctranslate2 = pytest.importorskip("ctranslate2")
    _save_ct2(tiny, tmp_path, "float32")
    sd, dims = ct2_whisper_state_dict(read_ct2_model(tmp_path / "model.bin"))
    model = build_whisper_model(sd, dims, {"pad_token_id": 0, "decoder_start_token_id": 2})
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    features = torch.from_numpy(np.random.RandomState(0).randn(2, 80, 100).astype(np.float32))
    tokens = torch.tensor([[2, 5, 7, 9], [2, 11, 13, 4]])
    with torch.no_grad():
        ours = model(input_features=features, decoder_input_ids=tokens).logits
        ref = tiny(input_features=features, decoder_input_ids=tokens).logits
        hidden = model.model.encoder(features).last_hidden_state.numpy()
    assert torch.allclose(ours, ref, atol=1e-5)
    whisper = ctranslate2.models.Whisper(str(tmp_path), compute_type="float32")
    theirs = np.array(whisper.encode(ctranslate2.StorageView.from_array(features.numpy())))
    assert theirs.shape == hidden.shape == (2, 50, 32)
    assert np.abs(theirs - hidden).max() <= ENCODER_REL_TOL * np.abs(theirs).max()


def test_split_parts_read_like_one_file(tiny, tmp_path):
    _save_ct2(tiny, tmp_path, "float16")
    blob = (tmp_path / "model.bin").read_bytes()
    cut = len(blob) // 3
    (tmp_path / "p1").write_bytes(blob[:cut])
    (tmp_path / "p2").write_bytes(blob[cut:])
    whole = read_ct2_model(tmp_path / "model.bin")
    parts = read_ct2_model([tmp_path / "p1", tmp_path / "p2"])
    assert whole.variables.keys() == parts.variables.keys()
    assert all(np.array_equal(whole.variables[k], parts.variables[k]) for k in whole.variables)
    with pytest.raises(CT2FormatError, match="truncated"):
        read_ct2_model([tmp_path / "p1"])  # the second part is missing


def test_reader_rejects_bad_files(tmp_path):
    bad_version = tmp_path / "v.bin"
    bad_version.write_bytes(struct.pack("<I", 99) + b"\x00" * 16)
    with pytest.raises(CT2FormatError, match="version 99"):
        read_ct2_model(bad_version)
    name = b"WhisperSpec"
    header = (
        struct.pack("<I", 6) + struct.pack("<H", len(name) + 1) + name + b"\x00" + struct.pack("<II", 3, 1)
    )
    bad_dtype = tmp_path / "d.bin"
    var = b"a/b"
    bad_dtype.write_bytes(
        header + struct.pack("<H", 4) + var + b"\x00" + struct.pack("<BIBI", 1, 2, 9, 8) + b"\0" * 8
    )
    with pytest.raises(CT2FormatError, match="unknown dtype id 9"):
        read_ct2_model(bad_dtype)
    trailing = tmp_path / "t.bin"
    trailing.write_bytes(header + struct.pack("<H", 4) + var + b"\x00" + struct.pack("<BIBI", 1, 2, 0, 8)
                         + b"\0" * 8 + struct.pack("<I", 0) + b"junk")  # fmt: skip
    with pytest.raises(CT2FormatError, match="trailing"):
        read_ct2_model(trailing)
    not_whisper = tmp_path / "n.bin"
    other = b"TransformerSpec"
    not_whisper.write_bytes(struct.pack("<I", 6) + struct.pack("<H", len(other) + 1) + other + b"\x00"
                            + struct.pack("<III", 1, 0, 0))  # fmt: skip
    with pytest.raises(CT2FormatError, match="expected a WhisperSpec"):
        ct2_whisper_state_dict(read_ct2_model(not_whisper))


def test_bfloat16_is_widened_exactly(tmp_path):
    values = np.array([1.5, -2.25, 3.0e-3, 65504.0], dtype=np.float32)
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)  # truncation: these values are exact in bf16
    name = b"WhisperSpec"
    var = b"x/w"
    blob = (struct.pack("<I", 6) + struct.pack("<H", len(name) + 1) + name + b"\x00" + struct.pack("<II", 3, 1)
            + struct.pack("<H", 4) + var + b"\x00" + struct.pack("<BIBI", 1, 4, 5, 8) + bits.tobytes()
            + struct.pack("<I", 0))  # fmt: skip
    (tmp_path / "b.bin").write_bytes(blob)
    ct2 = read_ct2_model(tmp_path / "b.bin")
    widened = ct2.float32("x/w")
    expected = (bits.astype(np.uint32) << 16).view(np.float32)
    assert widened.dtype == np.float32 and np.array_equal(widened, expected)
    assert np.allclose(widened, values, rtol=1e-2)


# ---------------------------------------------------------------- slow: the real PyPI models


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z' ]+", " ", text.lower()).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Levenshtein distance over normalised words / number of reference words."""
    ref, hyp = _words(reference), _words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, start=1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(1, len(ref))


def test_word_error_rate_helper():
    assert word_error_rate("the quick brown fox", "The quick brown fox.") == 0.0
    assert word_error_rate("the quick brown fox", "the quick round fox") == 0.25
    assert word_error_rate("a b", "") == 1.0


@pytest.fixture(scope="module")
def spoken_sentence(tmp_path_factory):
    """16 kHz mono float32 waveform of SENTENCE spoken by espeak-ng (resampled with sox)."""
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        pytest.fail("espeak-ng and sox are needed to synthesise the test sentence (make system-deps)")
    import soundfile as sf

    folder = tmp_path_factory.mktemp("speech")
    raw, wav = folder / "raw.wav", folder / "16k.wav"
    subprocess.run(["espeak-ng", "-w", str(raw), SENTENCE], check=True, capture_output=True)
    subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", str(wav)], check=True, capture_output=True)
    audio, rate = sf.read(wav, dtype="float32")
    assert rate == 16000 and audio.ndim == 1
    return audio


@pytest.mark.slow
@pytest.mark.parametrize("key", ["whisper-tiny.en", "whisper-base"])
def test_real_whisper_matches_ct2_and_transcribes(key, tmp_path, spoken_sentence):
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizer

    from fusion.encoders import offline_pack

    ok, why = offline_pack.pack_available(key)
    if not ok:
        pytest.fail(f"offline pack missing (make install): {why}")
    directory = offline_pack.materialise(key, tmp_path / "cache")
    extractor = WhisperFeatureExtractor.from_pretrained(directory)
    tokenizer = WhisperTokenizer.from_pretrained(directory)
    model = WhisperForConditionalGeneration.from_pretrained(directory).eval()
    assert len(tokenizer) == model.config.vocab_size  # timestamp tokens were appended
    features = extractor(spoken_sentence, sampling_rate=16000, return_tensors="pt").input_features
    kwargs = {"language": "en", "task": "transcribe"} if model.generation_config.is_multilingual else {}
    with torch.no_grad():
        ids = model.generate(features, max_new_tokens=40, **kwargs)
        hidden = model.model.encoder(features).last_hidden_state.numpy()
    text = tokenizer.batch_decode(ids, skip_special_tokens=True)[0]
    wer = word_error_rate(SENTENCE, text)
    print(f"{key}: {text!r} WER {wer:.3f}")
    assert wer <= MAX_WER, text

    ctranslate2 = pytest.importorskip("ctranslate2")
    entry = offline_pack.PACK[key]
    sources = {f.path.rsplit("/", 1)[-1]: offline_pack.source_path(entry, f) for f in entry.files}
    ct2_dir = tmp_path / "ct2"
    ct2_dir.mkdir()
    with open(ct2_dir / "model.bin", "wb") as sink:  # ctranslate2 wants one model.bin
        for part in entry.options["model_parts"]:
            sink.write(sources[part].read_bytes())
    for name in ("config.json", "vocabulary.txt", "tokenizer.json"):
        shutil.copyfile(sources[name], ct2_dir / name)
    whisper = ctranslate2.models.Whisper(str(ct2_dir), compute_type="float32")
    theirs = np.array(whisper.encode(ctranslate2.StorageView.from_array(features.numpy())))
    rel = np.abs(theirs - hidden).max() / np.abs(theirs).max()
    print(f"{key}: encoder max rel diff vs ctranslate2 {rel:.2e}")
    assert theirs.shape == hidden.shape and rel <= ENCODER_REL_TOL
    # The decoder (self- and cross-attention, tied projection) is checked by greedy decoding: the same
    # tokens as ctranslate2's own decoder on the same features. The WER above is the model's, not ours.
    prompt = ["<|startoftranscript|>", *(["<|en|>", "<|transcribe|>"] if kwargs else []), "<|notimestamps|>"]
    result = whisper.generate(ctranslate2.StorageView.from_array(features.numpy()), [prompt], beam_size=1)
    assert result[0].sequences_ids[0] == ids[0].tolist()
