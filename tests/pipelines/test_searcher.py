"""pipelines.search.Searcher on a real small world (tests.pipelines.search_world): tiny encoders,
ingested pictures and tones, their latents, random adapters, the embeddings tables; queries by
text, image and audio bytes, the errors a service maps to 4xx, and the stored media it serves."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from fusion.media import MediaError, MediaLimits
from pipelines.embed import embed_space
from pipelines.lake import Lake
from pipelines.schemas import table_name
from pipelines.search import Searcher, SearchError, servable
from pipelines.space import load_space
from tests.fixtures.media_factory import audio_bytes, image_bytes, png_header_only
from tests.pipelines.search_world import build_world, save_random


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = build_world(tmp_path_factory.mktemp("world"))
    for exp in ("shapes-pair", "shapes-tri"):
        embed_space(w.lake, load_space(w.models, exp))
    return w


@pytest.fixture(scope="module")
def searcher(world):
    return Searcher(world.lake, world.models, world.registry, datasets=world.datasets, data_cache=world.cache)


def media_rows(world, dataset: str, modality: str) -> list[dict]:
    rows = world.lake.read(table_name("media", dataset), ["media_id", "modality", "path", "text"]).to_pylist()
    return [r for r in rows if r["modality"] == modality]


def captions_of(world, dataset: str, media_id: str) -> set[str]:
    pairs = world.lake.read(table_name("pairs", dataset), ["media_id", "caption_id"]).to_pylist()
    texts = {r["media_id"]: r["text"] for r in media_rows(world, dataset, "text")}
    return {texts[p["caption_id"]] for p in pairs if p["media_id"] == media_id}


def test_image_query_finds_the_picture_itself(world, searcher):
    pictures = [r for r in media_rows(world, "shapes", "image") if r["path"].endswith(".png")]
    for row in pictures[:4]:
        data = (world.project.data / row["path"]).read_bytes()
        results = searcher.query("shapes-pair", "image", image=data, k=3)
        top = results[0]
        assert top["media_id"] == row["media_id"] and top["score"] == pytest.approx(1.0, abs=1e-4)
        assert results[1]["score"] < top["score"] - 1e-4
        assert (top["rank"], top["dataset"], top["modality"], top["path"]) == (
            1,
            "shapes",
            "image",
            row["path"],
        )
        assert set(top["captions"]) == captions_of(world, "shapes", row["media_id"]) and top["text"] is None


def test_text_query_finds_the_caption_itself(world, searcher):
    for row in media_rows(world, "shapes", "text")[:4]:
        results = searcher.query("shapes-pair", "text", text=f"  {row['text']} ", k=5)
        top = results[0]
        assert (top["media_id"], top["text"], top["modality"], top["captions"]) == (
            row["media_id"],
            row["text"],
            "text",
            [],
        )
        assert top["score"] == pytest.approx(1.0, abs=1e-4) and results[1]["score"] < 1.0 - 1e-4


def test_text_to_image_ranks_by_cosine_in_the_space(world, searcher):
    space = load_space(world.models, "shapes-pair")
    lat = world.lake.read("latents__shapes__tiny-image")
    ids = lat["media_id"].to_pylist()
    items = space.embed("image", np.stack(lat["vector"].to_numpy(zero_copy_only=False)))
    query = "a green circle"
    q = space.embed("text", world.encoders["tiny-text"].encode([query]))[0]
    scores = items @ q
    want = [ids[i] for i in np.argsort(-scores, kind="stable")[:6]]
    results = searcher.query("shapes-pair", "image", text=query, k=6)
    assert [r["media_id"] for r in results] == want
    for r in results:
        assert r["score"] == pytest.approx(float(scores[ids.index(r["media_id"])]), abs=1e-5)


def test_three_sided_space_searches_every_side_by_sound(world, searcher):
    tone = media_rows(world, "tones", "audio")[0]
    data = (world.project.data / "sounds" / tone["path"]).read_bytes()
    same = searcher.query("shapes-tri", "audio", audio=data, k=2)
    assert same[0]["media_id"] == tone["media_id"] and same[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert same[0]["dataset"] == "tones" and set(same[0]["captions"]) == captions_of(
        world, "tones", tone["media_id"]
    )
    pictures = searcher.query("shapes-tri", "image", audio=data, k=4)
    assert len(pictures) == 4 and {r["dataset"] for r in pictures} == {"shapes"}
    texts = searcher.query("shapes-tri", "text", audio=data, k=60)
    assert {r["dataset"] for r in texts} == {"shapes", "tones"} and all(r["text"] for r in texts)
    only = searcher.query("shapes-tri", "text", audio=data, k=60, dataset="tones")
    assert len(only) == 24 and {r["dataset"] for r in only} == {"tones"}


def test_experiments_lists_what_can_be_searched(world, searcher):
    found = {e["name"]: e for e in searcher.experiments()}
    assert set(found) == {"shapes-pair", "shapes-tri"}
    tri = found["shapes-tri"]
    assert tri["sides"] == {"image": "tiny-image", "audio": "tiny-audio", "text": "tiny-text"}
    assert tri["datasets"] == {"shapes": "image", "tones": "audio"} and tri["ready"] and tri["dim"] == 16
    assert tri["counts"] == {"image": 25, "audio": 12, "text": 49}
    assert found["shapes-pair"]["counts"] == {"image": 25, "text": 25}
    assert searcher.default_target("shapes-pair", "text") == "image"
    assert searcher.default_target("shapes-tri", "audio") == "text"


def test_bad_uploads_are_media_errors(world, searcher):
    wav = audio_bytes()
    cases = [
        ({"image": b"not an image at all"}, "unsupported_format"),
        ({"image": wav}, "unsupported_format"),  # a sound sent as an image
        ({"audio": image_bytes()}, "unsupported_format"),
        ({"image": b""}, "empty"),
        ({"image": png_header_only(100_000, 100_000)}, "decompression_bomb"),
        ({"image": b"\x89PNG\r\n\x1a\n" + b"\0" * 64}, "undecodable"),
        ({"audio": audio_bytes(amp=0.0)}, "silent"),
    ]
    for query, reason in cases:
        target = "text"
        with pytest.raises(MediaError) as err:
            searcher.query("shapes-tri", target, k=3, **query)
        assert err.value.reason == reason, query
    small = Searcher(world.lake, world.models, world.registry, limits=MediaLimits(max_bytes=100))
    with pytest.raises(MediaError) as err:
        small.query("shapes-pair", "image", image=image_bytes(size=(64, 64)))
    assert err.value.reason == "too_large"
    assert not issubclass(MediaError, SearchError) and not issubclass(SearchError, MediaError)


def test_bad_requests_are_search_errors(world, searcher):
    png = image_bytes()
    cases = [
        ({"experiment": "nope", "target": "image", "text": "a cat"}, "no trained model"),
        ({"experiment": "../shapes-pair", "target": "image", "text": "a cat"}, "invalid experiment name"),
        ({"experiment": "shapes-pair", "target": "audio", "text": "a cat"}, "no side 'audio'"),
        ({"experiment": "shapes-pair", "target": "smell", "text": "a cat"}, "no side 'smell'"),
        (
            {"experiment": "shapes-pair", "target": "image", "audio": audio_bytes()},
            "cannot be queried by audio",
        ),
        ({"experiment": "shapes-pair", "target": "image", "text": "   "}, "empty"),
        ({"experiment": "shapes-pair", "target": "image", "text": "x" * 3000}, "characters"),
        ({"experiment": "shapes-pair", "target": "image"}, "exactly one query"),
        ({"experiment": "shapes-pair", "target": "image", "text": "a", "image": png}, "exactly one query"),
        ({"experiment": "shapes-pair", "target": "image", "text": "a", "k": 0}, "k must be"),
        ({"experiment": "shapes-pair", "target": "image", "text": "a", "k": True}, "k must be"),
        ({"experiment": "shapes-pair", "target": "image", "text": "a", "k": 10**6}, "k must be"),
        ({"experiment": "shapes-pair", "target": "image", "text": "a", "dataset": "tones"}, "no image items"),
        # A str is never read as a path.
        ({"experiment": "shapes-pair", "target": "text", "image": "/etc/passwd"}, "file's bytes"),
        ({"experiment": "shapes-pair", "target": "image", "text": b"bytes"}, "is a string"),
    ]
    for kwargs, message in cases:
        kwargs = dict(kwargs)
        experiment, target = kwargs.pop("experiment"), kwargs.pop("target")
        with pytest.raises(SearchError, match=message):
            searcher.query(experiment, target, **kwargs)
    unregistered = Searcher(world.lake, world.models, {})
    with pytest.raises(SearchError, match="not in the encoder registry"):
        unregistered.query("shapes-pair", "image", text="a cat")
    other = dict(world.registry)
    other["tiny-text"] = world.registry["tiny-image"]  # the name of one encoder, another's weights
    with pytest.raises(SearchError, match="fingerprint"):
        Searcher(world.lake, world.models, other).query("shapes-pair", "image", text="a cat")


def test_embeddings_of_another_checkpoint_are_refused_until_made_again(world, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(world.models / "shapes-pair", models / "copy")
    lake = Lake(tmp_path / "lance")
    for name in world.lake.tables():
        if not name.startswith("embeddings"):
            shutil.copytree(f"{world.lake.root}/{name}.lance", f"{lake.root}/{name}.lance")
    searcher = Searcher(lake, models, world.registry, refresh_s=0.0)
    with pytest.raises(SearchError, match="no image embeddings yet"):
        searcher.query("copy", "image", text="a red square")
    assert searcher.experiments() == []
    embed_space(lake, load_space(models, "copy"))
    first = searcher.query("copy", "image", text="a red square")
    # Retrained in place (other weights): the cached space is reloaded, its old rows refused.
    world_copy = type(world)(**{**world.__dict__, "models": models})
    save_random(
        world_copy,
        "copy",
        {"image": "tiny-image", "text": "tiny-text"},
        load_space(models, "copy").record,
        seed=7,
    )
    with pytest.raises(SearchError, match="another checkpoint"):
        searcher.query("copy", "image", text="a red square")
    assert [e["ready"] for e in searcher.experiments()] == [False]
    embed_space(lake, load_space(models, "copy"))
    again = searcher.query("copy", "image", text="a red square")
    assert [r["score"] for r in again] != [r["score"] for r in first]


def test_media_bytes_serves_only_stored_items_from_their_folder(world, searcher):
    rows = media_rows(world, "shapes", "image")
    png = next(r for r in rows if r["path"].endswith(".png"))
    data, kind = searcher.media_bytes("shapes", png["media_id"])
    assert kind == "image/png" and data == (world.project.data / png["path"]).read_bytes()
    # The SVG carries a script: it is served rasterised, never as markup.
    svg = next(r for r in rows if r["path"].endswith("dot.svg"))
    data, kind = searcher.media_bytes("shapes", svg["media_id"])
    assert kind == "image/png" and data.startswith(b"\x89PNG") and b"script" not in data
    tone = media_rows(world, "tones", "audio")[0]
    data, kind = searcher.media_bytes("tones", tone["media_id"])
    assert kind == "audio/wav" and data == (world.project.data / "sounds" / tone["path"]).read_bytes()
    caption = media_rows(world, "shapes", "text")[0]
    for dataset, media_id, message in (
        ("shapes", "0" * 32, "no media item"),
        ("tones", png["media_id"], "no media item"),  # an id of another dataset
        ("shapes", caption["media_id"], "text item"),
        ("shapes", "../../etc/passwd", "invalid media id"),
        ("shapes", "x' OR '1'='1", "invalid media id"),
        ("nowhere", png["media_id"], "unknown dataset"),
        ("../x", png["media_id"], "invalid dataset"),
    ):
        with pytest.raises(SearchError, match=message):
            searcher.media_bytes(dataset, media_id)


def test_media_bytes_refuses_files_that_left_or_changed(world, searcher, tmp_path):
    """A stored file swapped for a link out of the dataset's folder, or edited after ingestion
    (put back afterwards: the world is shared)."""
    pictures = [r for r in media_rows(world, "shapes", "image") if r["path"].endswith(".png")]
    linked, edited = (world.project.data / pictures[i]["path"] for i in (0, 1))
    saved = {p: p.read_bytes() for p in (linked, edited)}
    outside = tmp_path / "secret.png"
    outside.write_bytes(saved[linked])  # the very same bytes, so only the folder check can refuse it
    try:
        linked.unlink()
        os.symlink(outside, linked)
        with pytest.raises(MediaError) as err:
            searcher.media_bytes("shapes", pictures[0]["media_id"])
        assert err.value.reason == "outside_root"
        edited.write_bytes(image_bytes(color=(1, 2, 3)))
        with pytest.raises(MediaError) as err:
            searcher.media_bytes("shapes", pictures[1]["media_id"])
        assert err.value.reason == "changed"
    finally:
        for path, data in saved.items():
            path.unlink(missing_ok=True)
            path.write_bytes(data)


def test_servable_types():
    assert servable(image_bytes(fmt="JPEG"), "image")[1] == "image/jpeg"
    assert servable(image_bytes(fmt="GIF"), "image")[1] == "image/gif"
    bmp, kind = servable(image_bytes(fmt="BMP"), "image")
    assert kind == "image/png" and bmp.startswith(b"\x89PNG")
    assert servable(audio_bytes(fmt="FLAC"), "audio")[1] == "audio/flac"
    with pytest.raises(MediaError):
        servable(b"plain text", "audio")
    with pytest.raises(MediaError):
        servable(b"plain text", "image")
