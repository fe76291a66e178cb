"""pipelines.embed on real Lance tables: what each side's table holds, when it is rewritten, what it
refuses, and the vector index against exact search."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from fusion.adapters import Adapter, EncoderRef, FusedModel
from fusion.checkpoint import save_checkpoint
from fusion.config import AdapterConfig
from pipelines.embed import embed_space, embeddings_table, nearest
from pipelines.lake import Lake, vectors_to_arrow
from pipelines.schemas import embeddings, schema_of
from pipelines.space import SearchError, load_space

REFS = {"image": EncoderRef("img-enc", "fp-img", 6), "text": EncoderRef("txt-enc", "fp-txt", 4)}
EXTRA = {
    "dataset": "pics",
    "media_encoder": "img-enc",
    "text_encoder": "txt-enc",
    "media_side": "image",
    "text_side": "text",
}


def save_model(models, dim: int = 8, eval_datasets=(), seed: int = 0) -> None:
    torch.manual_seed(seed)
    cfg = AdapterConfig(depth=1, expansion=2, dropout=0.0, output_dim=dim)
    model = FusedModel({s: Adapter(r.dim, cfg) for s, r in REFS.items()}, REFS)
    save_checkpoint(models / "exp", model, cfg, extra={**EXTRA, "eval_datasets": list(eval_datasets)})


def latents(ids, dim, fingerprint, rng, centres=None) -> pa.Table:
    if centres is None:
        x = rng.standard_normal((len(ids), dim))
    else:  # clustered, as real latents are
        x = centres[rng.integers(0, len(centres), len(ids))] + 0.6 * rng.standard_normal((len(ids), dim))
    return pa.table(
        {
            "media_id": ids,
            "vector": vectors_to_arrow(x.astype(np.float32)),
            "fingerprint": [fingerprint] * len(ids),
            "encoder": ["enc"] * len(ids),
        }
    )


def write_dataset(lake: Lake, name: str, n: int, seed: int = 0) -> None:
    """`n` images with one caption each (image 0 has a second one) and the latents of both."""
    rng = np.random.default_rng(seed)
    imgs = [f"{name}-img{i}" for i in range(n)]
    caps = [f"{name}-cap{i}" for i in range(n)]
    lake.overwrite(
        f"media__{name}",
        pa.table(
            {
                "media_id": imgs + caps,
                "modality": ["image"] * n + ["text"] * n,
                "path": [f"pics/{i}.png" for i in range(n)] + [None] * n,
                "text": [None] * n + [f"caption {i} of {name}" for i in range(n)],
            }
        ),
    )
    lake.overwrite(
        f"pairs__{name}",
        pa.table(
            {"media_id": imgs + [imgs[0]], "caption_id": caps + [caps[1]], "split": ["train"] * (n + 1)}
        ),
    )
    lake.overwrite(f"latents__{name}__img-enc", latents(imgs, 6, "fp-img", rng))
    lake.overwrite(f"latents__{name}__txt-enc", latents(caps, 4, "fp-txt", rng))


@pytest.fixture
def world(tmp_path):
    lake = Lake(tmp_path / "lance")
    write_dataset(lake, "pics", 12)
    write_dataset(lake, "more", 5, seed=1)
    save_model(tmp_path / "models", eval_datasets=["more"])
    return lake, load_space(tmp_path / "models", "exp"), tmp_path


def test_each_side_holds_every_item_of_every_dataset(world):
    lake, space, _ = world
    result = embed_space(lake, space)
    assert not result.skipped and set(result.sides) == {"image", "text"}
    assert result.versions["latents__pics__img-enc"] == lake.version("latents__pics__img-enc")
    for side, enc, prefix in (("image", "img-enc", "img"), ("text", "txt-enc", "cap")):
        table = lake.read(embeddings_table("exp", side))
        assert table.schema.equals(embeddings(8), check_metadata=False)
        assert table.schema.equals(schema_of(embeddings_table("exp", side), 8), check_metadata=False)
        assert len(table) == 17 == result.sides[side]["rows"] and not result.sides[side]["indexed"]
        rows = {r["media_id"]: r for r in table.to_pylist()}
        for name in ("pics", "more"):
            lat = lake.read(f"latents__{name}__{enc}")
            want = space.embed(side, np.stack(lat["vector"].to_numpy(zero_copy_only=False)))
            got = np.stack([rows[m]["vector"] for m in lat["media_id"].to_pylist()])
            np.testing.assert_allclose(got, want, atol=1e-6)
            assert {rows[m]["dataset"] for m in lat["media_id"].to_pylist()} == {name}
        assert {r["fingerprint"] for r in rows.values()} == {REFS[side].fingerprint}
        assert {r["model_hash"] for r in rows.values()} == {space.model_hash}
        assert {r["inputs_hash"] for r in rows.values()} == {result.digest}
        assert all(m.split("-")[1].startswith(prefix) for m in rows)
    image = {r["media_id"]: r for r in lake.read(embeddings_table("exp", "image")).to_pylist()}
    assert image["pics-img0"]["captions"] == ["caption 0 of pics", "caption 1 of pics"]
    assert image["more-img3"]["captions"] == ["caption 3 of more"]
    assert image["pics-img4"]["path"] == "pics/4.png" and image["pics-img4"]["text"] is None
    text = {r["media_id"]: r for r in lake.read(embeddings_table("exp", "text")).to_pylist()}
    assert text["more-cap2"]["text"] == "caption 2 of more" and text["more-cap2"]["captions"] == []


def test_unchanged_inputs_are_not_rewritten(world):
    lake, space, tmp = world
    first = embed_space(lake, space)
    versions = {s: lake.version(i["table"]) for s, i in first.sides.items()}
    again = embed_space(lake, space)
    assert again.skipped and again.digest == first.digest
    assert {s: lake.version(i["table"]) for s, i in again.sides.items()} == versions
    assert not any(i["written"] for i in again.sides.values()) and again.sides["text"]["rows"] == 17
    # New latents of one side: only that side's table is rewritten, with the new row.
    rng = np.random.default_rng(5)
    lake.append("latents__more__img-enc", latents(["more-img9"], 6, "fp-img", rng))
    third = embed_space(lake, space)
    assert third.digest != first.digest and third.sides["image"]["written"] and third.sides["text"]["written"]
    assert lake.count(embeddings_table("exp", "image")) == 18
    # The digest covers both sides, so the text side, whose rows did not change, is rewritten too.
    forced = embed_space(lake, space, force=True)
    assert not forced.skipped and forced.digest == third.digest
    # A retrained checkpoint (other weights): every side again, rows of the new model.
    save_model(tmp / "models", eval_datasets=["more"], seed=1)
    retrained = load_space(tmp / "models", "exp")
    assert retrained.model_hash != space.model_hash
    fourth = embed_space(lake, retrained)
    assert all(i["written"] for i in fourth.sides.values())
    assert set(lake.read(embeddings_table("exp", "text"))["model_hash"].to_pylist()) == {retrained.model_hash}


def test_refuses_latents_of_another_encoder_and_missing_tables(world):
    lake, space, tmp = world
    embed_space(lake, space)
    before = {s: lake.version(embeddings_table("exp", s)) for s in ("image", "text")}
    rng = np.random.default_rng(0)
    lake.append("latents__more__img-enc", latents(["more-imgX"], 6, "fp-img-v2", rng))
    with pytest.raises(
        SearchError, match=r"fingerprint fp-img, but latents__more__img-enc holds .*fp-img-v2"
    ):
        embed_space(lake, space)
    lake.delete("latents__more__img-enc", "fingerprint = 'fp-img-v2'")
    lake.overwrite(
        "latents__more__txt-enc",
        latents(["more-capN"], 4, "fp-txt", rng).set_column(
            1, "vector", vectors_to_arrow(np.full((1, 4), np.nan, dtype=np.float32))
        ),
    )
    with pytest.raises(SearchError, match="NaN"):
        embed_space(lake, space)
    # The refused side commits nothing: a search reads the table made before.
    assert lake.version(embeddings_table("exp", "text")) == before["text"]
    save_model(tmp / "models", eval_datasets=["more", "absent"])
    with pytest.raises(SearchError, match=r"run extract_job for \(absent, img-enc\)"):
        embed_space(lake, load_space(tmp / "models", "exp"))


def test_empty_latents_make_an_empty_side(tmp_path):
    lake = Lake(tmp_path / "lance")
    write_dataset(lake, "pics", 3)
    lake.delete("latents__pics__txt-enc", "true")
    save_model(tmp_path / "models")
    result = embed_space(lake, load_space(tmp_path / "models", "exp"))
    assert result.sides["text"]["rows"] == 0 and lake.count(embeddings_table("exp", "text")) == 0
    assert embed_space(lake, load_space(tmp_path / "models", "exp")).skipped


def test_index_agrees_with_exact_search(tmp_path):
    """6,000 clustered items, indexed: recall@10 of the index against exact search >= 0.95, the
    scores of what it returns exact, and a dataset filter that still returns k rows."""
    lake = Lake(tmp_path / "lance")
    rng = np.random.default_rng(0)
    n, dim = 6000, 64
    centres = 2.0 * rng.standard_normal((60, 6))
    imgs = [f"img{i}" for i in range(n)]
    lake.overwrite(
        "media__pics",
        pa.table({"media_id": imgs, "modality": ["image"] * n, "path": [f"{i}.png" for i in range(n)]}),
    )
    lake.overwrite("latents__pics__img-enc", latents(imgs, 6, "fp-img", rng, centres))
    lake.overwrite("latents__pics__txt-enc", latents(["cap0"], 4, "fp-txt", rng))
    save_model(tmp_path / "models", dim=dim)
    space = load_space(tmp_path / "models", "exp")
    result = embed_space(lake, space, index_min_rows=5000)
    assert result.sides["image"]["indexed"] and not result.sides["text"]["indexed"]
    ds = lake.open(embeddings_table("exp", "image"))
    assert ds.has_index and not lake.open(embeddings_table("exp", "text")).has_index
    vectors = np.stack(ds.to_table(columns=["vector"])["vector"].to_numpy(zero_copy_only=False))
    ids = ds.to_table(columns=["media_id"])["media_id"].to_pylist()
    queries = space.embed("image", latents([f"q{i}" for i in range(40)], 6, "x", rng, centres)["vector"])
    recalls = []
    for q in queries:
        exact = np.argsort(-(vectors @ q), kind="stable")[:10]
        got = nearest(ds, q, 10, indexed=True, rows=n)
        flat = nearest(ds, q, 10, indexed=False, rows=n)
        assert [r["media_id"] for r in flat][:3] == [ids[i] for i in exact[:3]]
        recalls.append(len({r["media_id"] for r in got} & {ids[i] for i in exact}) / 10)
        scores = {ids[i]: float(vectors[i] @ q) for i in range(n)}
        for r in got:  # re-ranked on the stored vectors: exact cosines, best first
            assert r["score"] == pytest.approx(scores[r["media_id"]], abs=1e-4)
        assert [r["score"] for r in got] == sorted((r["score"] for r in got), reverse=True)
    assert np.mean(recalls) >= 0.95, recalls
    half = nearest(ds, queries[0], 10, indexed=True, rows=n, dataset="pics")
    assert len(half) == 10 and nearest(ds, queries[0], 10, indexed=True, rows=n, dataset="other") == []
    # Rewritten unchanged: skipped, the index kept; rewritten whole (force): indexed again.
    assert embed_space(lake, space, index_min_rows=5000).skipped
    embed_space(lake, space, index_min_rows=5000, force=True)
    assert lake.open(embeddings_table("exp", "image")).has_index
