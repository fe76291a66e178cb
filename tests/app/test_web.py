"""The search service's API (app.web) over the real Searcher and a trained tiny project (conftest).

Text and upload searches give the search layer's results; every bad request or upload is a 4xx JSON
error with a reason and a message; the media endpoint serves stored items only. `fusemix serve` binds
to 127.0.0.1 by default and says so when its port is taken.

    .venv/bin/pytest -q tests/app/test_web.py
"""

from __future__ import annotations

import io
import re
import socket

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app import cli
from app.web import create_app
from fusion.data.canonical import content_id
from tests.app.search_project import SVG, png_header_bomb, truncated_png, wav

IMAGE_EXP, TRI_EXP = "shapes-fusemix", "tones-bound"


@pytest.fixture(scope="module")
def searcher(search_project):
    return search_project.searcher()


@pytest.fixture(scope="module")
def client(searcher):
    with TestClient(create_app(searcher, max_upload_bytes=1024 * 1024)) as c:
        yield c


@pytest.fixture(scope="module")
def picture(search_project) -> bytes:
    return (search_project.project.data / "images" / "red_circle_0.png").read_bytes()


@pytest.fixture(scope="module")
def sound(search_project) -> bytes:
    return (search_project.project.data / "sounds" / "blue-square_0.wav").read_bytes()


def upload(client, data: bytes, name: str = "query.png", experiment=IMAGE_EXP, target="image", **fields):
    form = {"experiment": experiment, "target": target, **fields}
    return client.post("/api/search", data=form, files={"file": (name, data, "application/octet-stream")})


def error(response, status: int, reason: str) -> str:
    """The message of a JSON error, after checking its status and reason."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["reason"] == reason, body
    assert body["error"]
    return body["error"]


# ---------------------------------------------------------------------------------------------
# Searches


def test_experiments_lists_the_trained_spaces(client):
    body = client.get("/api/experiments").json()
    found = {e["name"]: e for e in body["experiments"]}
    assert set(found) == {IMAGE_EXP, TRI_EXP}
    assert set(found[IMAGE_EXP]["sides"]) == {"image", "text"}
    assert set(found[TRI_EXP]["sides"]) == {"image", "audio", "text"}
    assert found[TRI_EXP]["datasets"] == {"shapes": "image", "tones": "audio"}
    assert all(e["ready"] for e in found.values())
    assert body["max_upload_bytes"] == 1024 * 1024 and body["max_k"] == 100


def test_text_search_returns_the_search_layers_results(client, searcher):
    r = client.post(
        "/api/search", json={"experiment": IMAGE_EXP, "target": "image", "text": "a red circle", "k": 5}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] == {"modality": "text", "text": "a red circle"}
    want = searcher.query(IMAGE_EXP, "image", text="a red circle", k=5)
    got = body["results"]
    assert [(g["media_id"], g["rank"]) for g in got] == [(w["media_id"], w["rank"]) for w in want]
    assert [g["score"] for g in got] == pytest.approx([w["score"] for w in want])
    assert [g["captions"] for g in got] == [w["captions"] for w in want]
    for g in got:
        assert g["modality"] == "image" and g["dataset"] == "shapes"
        assert g["media_url"] == f"/api/media/shapes/{g['media_id']}"
        assert "path" not in g  # the server's file layout is not the page's business
        assert any(c.startswith("a ") for c in g["captions"])


def test_text_search_of_captions_and_of_sounds(client):
    r = client.post(
        "/api/search", json={"experiment": TRI_EXP, "target": "text", "text": "a blue square", "k": 3}
    )
    assert r.status_code == 200, r.text
    texts = r.json()["results"]
    assert len(texts) == 3 and all(t["text"] and "media_url" not in t for t in texts)
    r = client.post(
        "/api/search", json={"experiment": TRI_EXP, "target": "audio", "text": "a blue square", "k": 4}
    )
    assert r.status_code == 200, r.text
    sounds = r.json()["results"]
    assert len(sounds) == 4 and {s["dataset"] for s in sounds} == {"tones"}
    media = client.get(sounds[0]["media_url"])
    assert media.status_code == 200 and media.headers["content-type"] == "audio/wav"
    r = client.post(
        "/api/search",
        json={"experiment": TRI_EXP, "target": "text", "text": "a tone", "k": 50, "dataset": "tones"},
    )
    assert r.status_code == 200 and {t["dataset"] for t in r.json()["results"]} == {"tones"}


def test_an_uploaded_picture_finds_itself_first(client, picture):
    r = upload(client, picture, "red_circle_0.png", modality="image", k="3")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] == {"modality": "image", "filename": "red_circle_0.png", "bytes": len(picture)}
    first = body["results"][0]
    assert first["media_id"] == content_id("image", picture)
    assert first["score"] == pytest.approx(1.0, abs=1e-4)
    assert len(body["results"]) == 3
    # Across modalities: the picture as the query, sounds as the results.
    r = upload(client, picture, experiment=TRI_EXP, target="audio")
    assert r.status_code == 200 and {x["modality"] for x in r.json()["results"]} == {"audio"}


def test_an_uploaded_sound_finds_itself_first(client, sound):
    r = upload(client, sound, "blue-square_0.wav", experiment=TRI_EXP, target="audio")
    assert r.status_code == 200, r.text
    first = r.json()["results"][0]
    assert first["media_id"] == content_id("audio", sound)
    assert first["score"] == pytest.approx(1.0, abs=1e-4)
    assert first["captions"] and first["media_url"].startswith("/api/media/tones/")


# ---------------------------------------------------------------------------------------------
# Bad uploads and bad requests: a 4xx JSON error each, never a 500


@pytest.mark.parametrize(
    "case, status, reason, says",
    [
        ("not_an_image", 415, "unsupported_format", "neither an image nor a sound"),
        ("text_named_png", 415, "unsupported_format", "format is not supported"),
        ("truncated", 422, "undecodable", "cannot be decoded"),
        ("empty", 422, "empty", "empty"),
        ("bomb", 422, "decompression_bomb", "decompression bomb"),
        ("silent", 422, "silent", "silent"),
        ("sound_sent_as_image", 415, "wrong_modality", "sent as image but its content is audio"),
        ("sound_to_an_image_space", 400, "wrong_modality", "cannot search by audio"),
    ],
)
def test_bad_uploads_get_a_clear_4xx(client, sound, case, status, reason, says):
    if case == "not_an_image":
        r = upload(client, b"just some notes, not a picture\n", "notes.txt")
    elif case == "text_named_png":
        r = upload(client, b"just some notes, not a picture\n", "photo.png", modality="image")
    elif case == "truncated":
        r = upload(client, truncated_png(), "cut.png")
    elif case == "empty":
        r = upload(client, b"", "nothing.png")
    elif case == "bomb":
        r = upload(client, png_header_bomb(), "bomb.png")
    elif case == "silent":
        r = upload(client, wav(np.zeros(16000)), "hush.wav", experiment=TRI_EXP, target="audio")
    elif case == "sound_sent_as_image":
        r = upload(client, sound, "tone.png", modality="image")
    else:
        r = upload(client, sound, "tone.wav", experiment=IMAGE_EXP, target="image")
    assert says in error(r, status, reason)


def test_uploads_over_the_limit_are_refused_with_413(searcher, picture):
    with TestClient(create_app(searcher, max_upload_bytes=len(picture) - 1)) as small:
        # Within the form's allowance, but the file is over the limit.
        message = error(upload(small, picture, "big.png"), 413, "too_large")
        assert "big.png is larger than the upload limit" in message
        # Far over: refused from its Content-Length before the body is read.
        message = error(upload(small, picture + b"\0" * 200_000, "huge.png"), 413, "too_large")
        assert message.startswith("The upload is too large (") and "including the form" in message


@pytest.mark.parametrize(
    "body, status, reason, says",
    [
        (
            {"experiment": "nope", "target": "image", "text": "a cat"},
            404,
            "unknown_experiment",
            "no experiment 'nope'",
        ),
        (
            {"experiment": IMAGE_EXP, "target": "audio", "text": "a cat"},
            400,
            "unknown_side",
            "no 'audio' side",
        ),
        ({"experiment": IMAGE_EXP, "target": "image", "text": "   "}, 400, "empty_query", "empty"),
        (
            {"experiment": IMAGE_EXP, "target": "image", "text": "a cat", "k": 0},
            400,
            "bad_request",
            "k must be",
        ),
        (
            {"experiment": IMAGE_EXP, "target": "image", "text": "a cat", "k": 101},
            400,
            "bad_request",
            "k must be",
        ),
        ({"experiment": IMAGE_EXP, "target": "image"}, 400, "bad_request", "text: Field required"),
        ({"experiment": IMAGE_EXP, "target": "image", "text": "x" * 3000}, 400, "search_error", "characters"),
        (
            {"experiment": IMAGE_EXP, "target": "image", "text": "a cat", "dataset": "tones"},
            404,
            "unknown_dataset",
            "no dataset 'tones'",
        ),
    ],
)
def test_bad_text_searches(client, body, status, reason, says):
    assert says in error(client.post("/api/search", json=body), status, reason)


def test_malformed_requests(client, picture):
    r = client.post("/api/search", content=b"{not json", headers={"content-type": "application/json"})
    assert "Invalid JSON" in error(r, 400, "bad_request")
    r = client.post(
        "/api/search", content=b"text=a+cat", headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert "multipart/form-data" in error(r, 415, "unsupported_media_type")
    r = client.post(
        "/api/search", data={"experiment": IMAGE_EXP, "target": "image"}, files={"other": ("a", b"a")}
    )
    assert "Choose a file" in error(r, 400, "bad_request")
    r = upload(client, picture, target="", k="3")
    assert "'target' is required" in error(r, 400, "bad_request")
    r = upload(client, picture, k="many")
    assert "whole number" in error(r, 400, "bad_request")
    r = upload(client, picture, modality="smell")
    assert "modality must be image or audio" in error(r, 400, "bad_request")
    assert error(client.get("/api/search"), 405, "method_not_allowed")
    assert error(client.get("/api/nothing/here"), 404, "not_found")


# ---------------------------------------------------------------------------------------------
# Media


def test_media_serves_stored_items_with_their_type(client, search_project, picture, sound):
    r = client.get(f"/api/media/shapes/{content_id('image', picture)}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == picture
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in r.headers["content-security-policy"]
    r = client.get(f"/api/media/tones/{content_id('audio', sound)}")
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav" and r.content == sound


def test_an_svg_is_served_as_a_picture_without_its_script(client, search_project):
    r = client.get(f"/api/media/shapes/{content_id('image', SVG.encode())}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content.startswith(b"\x89PNG") and b"script" not in r.content
    assert Image.open(io.BytesIO(r.content)).size[0] > 0


@pytest.mark.parametrize(
    "path",
    [
        "/api/media/shapes/" + "0" * 32,  # well-formed, not stored
        "/api/media/nowhere/" + "0" * 32,  # no such dataset
        "/api/media/shapes/..%2F..%2Fconfigs%2Fencoders.yaml",
        "/api/media/shapes/%2e%2e",
        "/api/media/shapes/..",
        "/api/media/..%2Fhome/x",
        "/api/media/shapes/%2Fetc%2Fpasswd",
        "/api/media/shapes/images%2Fred_circle_0.png",
        "/api/media/shapes/red_circle_0.png",
        "/api/media/shapes/x%00y",
        "/api/media/shapes",
    ],
)
def test_media_refuses_unknown_items_and_path_tricks(client, path):
    r = client.get(path)
    assert r.status_code == 404, (path, r.status_code, r.text)
    assert r.json()["reason"] == "not_found"
    assert r.headers["content-type"] == "application/json"


def test_media_refuses_text_items(client):
    caption = content_id("text", "a red circle")
    assert client.get(f"/api/media/shapes/{caption}").status_code == 404


# ---------------------------------------------------------------------------------------------
# The page


def test_the_page_and_its_files_load_nothing_from_elsewhere(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    refs = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert refs and all(ref.startswith("/static/") for ref in refs), refs
    for ref in refs:
        asset = client.get(ref)
        assert asset.status_code == 200, ref
        text = re.sub(r'xmlns="http://www\.w3\.org/[^"]*"', "", asset.text)  # a name, not a load
        assert not re.search(r"https?://", text), f"{ref} names another server"
    assert "://" not in r.text


def test_the_api_answers_only_for_loopback_names_when_told(searcher):
    with TestClient(create_app(searcher, allowed_hosts=["127.0.0.1", "localhost"])) as c:
        assert c.get("/api/experiments", headers={"host": "127.0.0.1:8000"}).status_code == 200
        assert c.get("/api/experiments", headers={"host": "evil.example:8000"}).status_code == 400


# ---------------------------------------------------------------------------------------------
# `fusemix serve`


def test_serve_binds_to_localhost_and_refuses_a_taken_port(search_project, monkeypatch, capsys):
    import uvicorn

    for key, value in search_project.env().items():
        monkeypatch.setenv(key, value)
    bound = []

    def fake_run(self, sockets=None):
        bound.append((sockets[0].getsockname(), self.config))
        sockets[0].close()

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    assert cli.build_parser().parse_args(["serve"]).port == 8000
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert cli.main(["serve", "--port", str(port)]) == 0
    (host, got_port), config = bound[-1]
    assert (host, got_port) == ("127.0.0.1", port)
    assert config.timeout_graceful_shutdown == 5
    out = capsys.readouterr().out
    assert f"http://127.0.0.1:{port}" in out and str(search_project.lake_root) in out

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        rc = cli.main(["serve", "--port", str(taken.getsockname()[1])])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot listen on 127.0.0.1" in err and "--port" in err
    assert cli.main(["serve", "--max-upload-mb", "0"]) == 2
