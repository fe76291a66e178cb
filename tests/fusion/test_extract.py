"""The extraction engine: batches equal one-by-one encoding, length sorting keeps ids aligned, bad media are
isolated as failures, every id comes back exactly once."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from fusion.encoders import ExtractBatch, FrozenEncoder, build_encoder, extract, load_registry
from fusion.encoders.base import EncoderSpec
from fusion.media import MediaError
from tests.tiny_models import write_tiny_registry

WORDS = [
    "a",
    "the",
    "cat",
    "dog",
    "sits",
    "runs",
    "on",
    "over",
    "red",
    "blue",
    "big",
    "small",
    "sofa",
    "street",
    "park",
    "table",
]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    reg = load_registry(write_tiny_registry(tmp_path_factory.mktemp("reg")))
    return {name: build_encoder(spec) for name, spec in reg.items()}


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    # Lengths vary a lot so that sorting reorders them and padding would matter if it leaked.
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 30)))) for _ in range(n)]


def wav_bytes(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    sf.write(buf, (0.2 * rng.standard_normal(n)).astype(np.float32), 16000, format="WAV")
    return buf.getvalue()


def png_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 30, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def collect(batches) -> tuple[dict[str, np.ndarray], list[MediaError], list[ExtractBatch]]:
    batches = list(batches)
    vectors: dict[str, np.ndarray] = {}
    failures: list[MediaError] = []
    for b in batches:
        assert b.vectors.dtype == np.float32 and b.vectors.shape[0] == len(b.media_ids)
        for mid, vec in zip(b.media_ids, b.vectors, strict=True):
            assert mid not in vectors
            vectors[mid] = vec
        failures.extend(b.failures)
    return vectors, failures, batches


def test_text_batches_equal_one_by_one_and_stay_aligned(encoders):
    enc = encoders["tiny-text"]
    texts = sentences(23)
    items = [(f"t{i}", t) for i, t in enumerate(texts)]
    got, failures, batches = collect(extract(enc, items, batch_size=4, progress=False, window_batches=3))
    assert not failures and set(got) == {mid for mid, _ in items}
    assert max(len(b.media_ids) for b in batches) == 4
    # Sorting happened: some batch is not in input order.
    order = [mid for b in batches for mid in b.media_ids]
    assert order != [mid for mid, _ in items]
    for mid, text in items:
        np.testing.assert_allclose(got[mid], enc.encode([text])[0], atol=1e-5)


def test_sorted_batches_pad_less(encoders):
    enc = encoders["tiny-text"]
    items = [(f"t{i}", t) for i, t in enumerate(sentences(32, seed=3))]

    def padded_tokens(window_batches: int) -> int:
        total = 0
        for b in extract(enc, items, batch_size=4, progress=False, window_batches=window_batches):
            costs = [enc.cost(dict(items)[mid]) for mid in b.media_ids]
            total += max(costs) * len(costs)
        return total

    assert padded_tokens(8) < padded_tokens(1) * 0.9


def test_audio_batches_equal_one_by_one_and_failures_are_isolated(encoders):
    enc = encoders["tiny-audio"]
    items = [(f"a{i}", wav_bytes(int(n), i)) for i, n in enumerate([16000, 4000, 40000, 800, 24000, 9000])]
    items.insert(2, ("broken", b"RIFF this is not a wave file"))
    items.append(("empty", b""))
    got, failures, _ = collect(extract(enc, items, batch_size=3, progress=False))
    assert sorted(f.media_id for f in failures) == ["broken", "empty"]
    assert all(isinstance(f, MediaError) and f.reason for f in failures)
    assert set(got) == {f"a{i}" for i in range(6)}
    for mid, payload in items:
        if mid in got:
            np.testing.assert_allclose(got[mid], enc.encode([payload])[0], atol=1e-5)


def test_image_batches_and_bad_bytes(encoders, tmp_path):
    enc = encoders["tiny-image"]
    path = tmp_path / "x.png"
    path.write_bytes(png_bytes(99))
    items = [(f"i{i}", png_bytes(i)) for i in range(5)] + [("path", str(path)), ("bad", b"\x89PNG broken")]
    items.append(("missing", str(tmp_path / "nope.png")))
    got, failures, batches = collect(extract(enc, items, batch_size=2, progress=False))
    assert {f.media_id: f.reason for f in failures} == {"bad": "undecodable", "missing": "missing"}
    assert set(got) == {f"i{i}" for i in range(5)} | {"path"}
    # Images are not reordered.
    assert [mid for b in batches for mid in b.media_ids] == [f"i{i}" for i in range(5)] + ["path"]
    np.testing.assert_allclose(got["path"], enc.encode([str(path)])[0], atol=1e-5)


def test_all_failures_still_yield_a_batch(encoders):
    out = list(extract(encoders["tiny-text"], [("x", b"bytes"), ("y", 3)], progress=False))
    assert len(out) == 1 and out[0].vectors.shape == (0, 32)
    assert [f.media_id for f in out[0].failures] == ["x", "y"]


def test_empty_input_yields_nothing(encoders):
    assert list(extract(encoders["tiny-text"], [], progress=False)) == []


class _NaNOnWord(FrozenEncoder):
    """A real FrozenEncoder whose output is NaN for texts containing 'nan' (no model behind it)."""

    dim = 2
    fingerprint = "test"

    def __init__(self):
        self.spec = EncoderSpec("nan", "text", "hf", "none", batch_size=2)

    def prepare(self, payload, media_id=""):
        return payload

    def forward(self, prepared):
        return np.array([[np.nan, 0.0] if "nan" in t else [len(t), 1.0] for t in prepared], dtype=np.float32)


def test_non_finite_outputs_become_failures():
    items = [("a", "ok"), ("b", "nan here"), ("c", "fine too")]
    got, failures, _ = collect(extract(_NaNOnWord(), items, progress=False))
    assert set(got) == {"a", "c"} and [f.media_id for f in failures] == ["b"]
    assert got["c"][0] == len("fine too")


def test_progress_bar_and_spec_batch_size(encoders, capsys):
    enc = encoders["tiny-text"]
    items = [(f"t{i}", t) for i, t in enumerate(sentences(10))]
    batches = list(extract(enc, items, progress=True, total=len(items)))
    assert max(len(b.media_ids) for b in batches) == enc.spec.batch_size == 8
    assert "10/10" in capsys.readouterr().err


def test_thread_setting(monkeypatch):
    import torch

    from fusion.encoders.engine import configure_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("FUSEMIX_TORCH_THREADS", "1")
        assert configure_threads("cpu") == 1
        monkeypatch.setenv("FUSEMIX_TORCH_THREADS", "lots")
        with pytest.raises(ValueError, match="FUSEMIX_TORCH_THREADS"):
            configure_threads("cpu")
        monkeypatch.delenv("FUSEMIX_TORCH_THREADS")
        torch.set_num_threads(64)
        threads = configure_threads("cpu")  # capped from 64 at the cores this process may use
        assert threads >= 1
        assert threads <= (os.cpu_count() or 1)
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ decoding beside the forward pass


def _mixed_items(tmp_path) -> list[tuple[str, object]]:
    path = tmp_path / "x.png"
    path.write_bytes(png_bytes(99))
    items: list[tuple[str, object]] = [(f"i{i}", png_bytes(i)) for i in range(13)]
    items[4:4] = [("bad", b"\x89PNG broken"), ("path", str(path)), ("refused", png_bytes(50))]
    items.append(("missing", str(tmp_path / "nope.png")))
    return items


def _refuse(media_id, payload):
    if media_id == "refused":
        raise MediaError("", "changed", "the file changed since ingest")
    return payload


@pytest.mark.parametrize("workers", [1, 3])
def test_decoding_threads_give_the_sequential_batches_failures_and_order(encoders, tmp_path, workers):
    enc = encoders["tiny-image"]
    items = _mixed_items(tmp_path)

    def run(n: int):
        batches = list(extract(enc, items, batch_size=3, progress=False, load=_refuse, workers=n))
        return [(b.media_ids, b.vectors, [(f.media_id, f.reason) for f in b.failures]) for b in batches]

    want, got = run(0), run(workers)
    assert [(ids, fails) for ids, _, fails in got] == [(ids, fails) for ids, _, fails in want]
    for (_, a, _), (_, b, _) in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    failed = {mid: reason for _, _, fails in got for mid, reason in fails}
    assert failed == {"bad": "undecodable", "refused": "changed", "missing": "missing"}


def test_decoding_threads_keep_sorted_text_windows(encoders):
    enc = encoders["tiny-text"]
    items = [(f"t{i}", t) for i, t in enumerate(sentences(40, seed=5))] + [("x", b"not text")]
    seq = list(extract(enc, items, batch_size=4, window_batches=3, progress=False, workers=0))
    par = list(extract(enc, items, batch_size=4, window_batches=3, progress=False, workers=2))
    assert [b.media_ids for b in par] == [b.media_ids for b in seq]
    assert [[f.media_id for f in b.failures] for b in par] == [[f.media_id for f in b.failures] for b in seq]
    for a, b in zip(par, seq, strict=True):
        np.testing.assert_array_equal(a.vectors, b.vectors)


class _Counting(FrozenEncoder):
    """Counts the items prepared; raises a programming error (not a MediaError) on 'boom'."""

    dim = 1
    fingerprint = "test"

    def __init__(self):
        self.spec = EncoderSpec("count", "image", "hf", "none", batch_size=2)
        self.prepared = 0

    def prepare(self, payload, media_id=""):
        if payload == "boom":
            raise KeyError("a bug, not bad media")
        self.prepared += 1
        return payload

    def forward(self, prepared):
        return np.ones((len(prepared), 1), dtype=np.float32)


def test_decoding_threads_stop_with_the_consumer_and_raise_real_errors():
    enc = _Counting()
    batches = extract(enc, ((f"m{i}", i) for i in range(10_000)), progress=False, workers=2)
    assert next(batches).media_ids == ["m0", "m1"]
    batches.close()  # the consumer stops: queued decoding is cancelled, not run to the end
    assert enc.prepared < 100
    with pytest.raises(KeyError, match="a bug"):
        list(extract(_Counting(), [("a", 1), ("b", "boom"), ("c", 2)], progress=False, workers=2))


def test_decode_worker_setting(monkeypatch):
    from fusion.encoders.engine import decode_workers

    monkeypatch.setenv("FUSEMIX_DECODE_WORKERS", "0")
    assert decode_workers() == 0
    assert decode_workers(3) == 3
    monkeypatch.setenv("FUSEMIX_DECODE_WORKERS", "some")
    with pytest.raises(ValueError, match="FUSEMIX_DECODE_WORKERS"):
        decode_workers()
    monkeypatch.delenv("FUSEMIX_DECODE_WORKERS")
    assert decode_workers() == min(4, len(os.sched_getaffinity(0)))
    assert decode_workers(modality="text") == 0  # a caption has nothing to decode
    assert decode_workers(2, modality="text") == 2
