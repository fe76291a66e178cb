"""Search on a real tiny setup: a tiny offline text encoder, Lance latents, a saved FusedModel checkpoint,
its embeddings tables (pipelines.embed) and the Searcher, checked against cosine written out by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml

from fusion.adapters import Adapter, EncoderRef, FusedModel
from fusion.checkpoint import save_checkpoint
from fusion.config import AdapterConfig
from fusion.encoders import build_encoder, load_registry
from pipelines.embed import embed_space
from pipelines.lake import Lake, vectors_to_arrow
from pipelines.search import Searcher, SearchError, format_results
from pipelines.space import load_space
from tests.tiny_models import make_tiny_bert

MEDIA_DIM = 8
N_MEDIA = 12
MEDIA_FP = "fp-media-1"


def write_text_registry(root) -> Path:
    """encoders.yaml with `tiny-text` and `tiny-text-b` (same architecture, other weights)."""
    a, b = make_tiny_bert(root / "bert-a", seed=0), make_tiny_bert(root / "bert-b", seed=1)
    entries = {
        name: {"modality": "text", "source": "hf", "model": str(d), "pooling": "mean", "batch_size": 8}
        for name, d in (("tiny-text", a), ("tiny-text-b", b))
    }
    path = root / "encoders.yaml"
    path.write_text(yaml.safe_dump({"encoders": entries}), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_registry(tmp_path_factory):
    return write_text_registry(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def text_encoder(tiny_registry):
    return build_encoder(load_registry(tiny_registry)["tiny-text"])


def build_setup(root, text_encoder, media_fp: str = MEDIA_FP, seed: int = 0):
    """A lake with media/pairs/latents of dataset `toy` and a checkpoint of experiment `toy-exp`."""
    lake = Lake(root / "lance")
    rng = np.random.default_rng(seed)
    media_ids = [f"img{i:02d}" for i in range(N_MEDIA)]
    caption_ids = [f"cap{i:02d}" for i in range(N_MEDIA)]
    lake.overwrite(
        "media__toy",
        pa.table(
            {
                "media_id": media_ids + caption_ids,
                "modality": ["image"] * N_MEDIA + ["text"] * N_MEDIA,
                "path": [f"/pics/{m}.png" for m in media_ids] + [None] * N_MEDIA,
                "text": [None] * N_MEDIA + [f"a picture of thing {i}" for i in range(N_MEDIA)],
            }
        ),
    )
    # Item 0 has two captions (two pairs); the others one each.
    lake.overwrite(
        "pairs__toy",
        pa.table(
            {
                "media_id": media_ids + [media_ids[0]],
                "caption_id": caption_ids + [caption_ids[1]],
                "split": ["train"] * (N_MEDIA + 1),
            }
        ),
    )
    vectors = rng.standard_normal((N_MEDIA, MEDIA_DIM)).astype(np.float32)
    lake.overwrite(
        "latents__toy__toy-image",
        pa.table(
            {
                "media_id": media_ids,
                "vector": vectors_to_arrow(vectors),
                "fingerprint": [media_fp] * N_MEDIA,
                "encoder": ["toy-image"] * N_MEDIA,
            }
        ),
    )
    torch.manual_seed(seed)
    cfg = AdapterConfig(depth=1, expansion=2, dropout=0.0, output_dim=16)
    encoders = {
        "image": EncoderRef("toy-image", MEDIA_FP, MEDIA_DIM),
        "text": EncoderRef("tiny-text", text_encoder.fingerprint, text_encoder.dim),
    }
    model = FusedModel({"image": Adapter(MEDIA_DIM, cfg), "text": Adapter(text_encoder.dim, cfg)}, encoders)
    extra = {
        "dataset": "toy",
        "media_encoder": "toy-image",
        "text_encoder": "tiny-text",
        "media_side": "image",
        "text_side": "text",
    }
    save_checkpoint(root / "models" / "toy-exp", model, cfg, extra=extra)
    return lake, model, vectors


def brute_force(model, text_encoder, vectors, query):
    """Cosine of every media row against the query, written out without FusedModel.embed."""
    with torch.no_grad():
        q = model.adapters["text"].eval()(torch.from_numpy(text_encoder.encode([query])))
        m = model.adapters["image"].eval()(torch.from_numpy(vectors))
    q = q / q.norm(dim=-1, keepdim=True)
    m = m / m.norm(dim=-1, keepdim=True)
    return (m @ q[0]).numpy()


def embedded(tmp_path, lake, text_encoder) -> None:
    """The toy experiment's embeddings (the captions' latents written first, by the tiny text encoder)."""
    captions = lake.read("media__toy", filter="modality = 'text'")
    vectors = text_encoder.encode(captions["text"].to_pylist())
    n = len(captions)
    table = {"media_id": captions["media_id"], "vector": vectors_to_arrow(vectors)}
    table |= {"fingerprint": [text_encoder.fingerprint] * n, "encoder": ["tiny-text"] * n}
    lake.overwrite("latents__toy__tiny-text", pa.table(table))
    embed_space(lake, load_space(tmp_path / "models", "toy-exp"))


def test_search_matches_brute_force_cosine_order(tmp_path, tiny_registry, text_encoder):
    lake, model, vectors = build_setup(tmp_path, text_encoder)
    embedded(tmp_path, lake, text_encoder)
    searcher = Searcher(lake, tmp_path / "models", load_registry(tiny_registry))
    for query in ("a red car on the street", "two dogs play with a ball"):
        results = searcher.query("toy-exp", "image", text=query, k=5)
        scores = brute_force(model, text_encoder, vectors, query)
        want = [f"img{i:02d}" for i in np.argsort(-scores)[:5]]
        assert [r["media_id"] for r in results] == want
        assert [r["rank"] for r in results] == [1, 2, 3, 4, 5]
        for r in results:
            assert r["score"] == pytest.approx(float(scores[int(r["media_id"][3:])]), abs=1e-5)
            assert r["path"] == f"/pics/{r['media_id']}.png" and r["modality"] == "image"
    everything = searcher.query("toy-exp", "image", text="cat", k=100)
    assert len(everything) == N_MEDIA
    by_id = {r["media_id"]: r for r in everything}
    assert by_id["img00"]["captions"] == ["a picture of thing 0", "a picture of thing 1"]
    assert by_id["img05"]["captions"] == ["a picture of thing 5"]
    text = format_results(everything[:3], max_captions=1)
    assert text.splitlines()[0].startswith(" 1. ") and everything[0]["media_id"] in text


def test_latents_of_another_fingerprint_are_not_embedded(tmp_path, text_encoder):
    lake, _, _ = build_setup(tmp_path, text_encoder, media_fp="fp-media-2")
    with pytest.raises(SearchError, match=r"fingerprint fp-media-1.*fp-media-2"):
        embedded(tmp_path, lake, text_encoder)


def test_text_encoder_change_is_refused(tmp_path, tiny_registry, text_encoder):
    lake, _, _ = build_setup(tmp_path, text_encoder)
    embedded(tmp_path, lake, text_encoder)
    registry = load_registry(tiny_registry)
    # Same name, other weights: the checkpoint was trained on tiny-text's latents, not these.
    other = dict(registry)
    other["tiny-text"] = registry["tiny-text-b"]
    with pytest.raises(SearchError, match="fingerprint"):
        Searcher(lake, tmp_path / "models", other).query("toy-exp", "image", text="a cat")


def test_missing_pieces_are_clear_errors(tmp_path, tiny_registry, text_encoder):
    lake, _, _ = build_setup(tmp_path, text_encoder)
    searcher = Searcher(lake, tmp_path / "models", load_registry(tiny_registry))
    with pytest.raises(SearchError, match="no image embeddings yet"):
        searcher.query("toy-exp", "image", text="a cat")
    embedded(tmp_path, lake, text_encoder)
    with pytest.raises(SearchError, match="no trained model"):
        searcher.query("nope", "image", text="a cat")
    with pytest.raises(SearchError, match="empty"):
        searcher.query("toy-exp", "image", text="  ")
    with pytest.raises(SearchError, match="not in the encoder registry"):
        Searcher(lake, tmp_path / "models", {}).query("toy-exp", "image", text="a cat")
