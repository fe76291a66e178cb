"""The search page in a real browser, served by `fusemix serve` as a user starts it.

The server is the CLI in a subprocess on a free 127.0.0.1 port over the trained tiny project
(conftest: pictures, tones, `shapes-fusemix` and `tones-bound`); the browser is Debian's Chromium
(`chromium`, installed by .ci/system-deps.sh) driven by Playwright, which downloads no browser of its
own. The browser types a query and sees the search layer's first result; uploads a picture and a
sound and sees each found first; gets the server's message on the page for bad files. Without the
chromium package those tests are skipped with that reason; the server's own tests (an upload streamed
past the limit is cut short; Ctrl-C stops it) run anyway.

    .venv/bin/pytest -q tests/app/test_web_browser.py
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from fusion.data.canonical import content_id
from fusion.paths import PROJECT_ROOT
from tests.app.search_project import truncated_png

IMAGE_EXP, TRI_EXP = "shapes-fusemix", "tones-bound"
MAX_UPLOAD_MB = 1
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
NO_CHROMIUM = (
    "Chromium is not installed (Debian package `chromium`; `make install` adds it via .ci/system-deps.sh)"
)


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(search_project, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "FUSEMIX_LAKE"} | search_project.env()
    port = _free_port()
    argv = [
        sys.executable,
        "-m",
        "app.cli",
        "serve",
        "--port",
        str(port),
        "--max-upload-mb",
        str(MAX_UPLOAD_MB),
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    srv = Server(proc, port, log)
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{srv.url}/api/experiments", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"`fusemix serve` did not start (status {proc.poll()}):\n{srv.output()}")
        time.sleep(0.2)
    # The first search builds the text encoder (imports included): done here, not under a page's timeout.
    body = json.dumps({"experiment": IMAGE_EXP, "target": "image", "text": "a warm up", "k": 1}).encode()
    warm = urllib.request.Request(
        f"{srv.url}/api/search", data=body, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(warm, timeout=120) as r:
        assert r.status == 200
    yield srv
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        # CI (.ci/run) requires the browser: there a missing Chromium fails instead of hiding the tests.
        if os.environ.get("FUSEMIX_REQUIRE_BROWSER"):
            pytest.fail(NO_CHROMIUM)
        pytest.skip(NO_CHROMIUM)
    from playwright.sync_api import sync_playwright

    # Chromium's sandbox needs user namespaces that root in a container does not get.
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    """The search page, loaded; fails the test on a script error or a refused load (CSP) there."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(30_000)
    problems: list[str] = []
    page.on("pageerror", lambda err: problems.append(f"page error: {err}"))
    # A 4xx answer is logged as "Failed to load resource"; the page shows those itself.
    page.on(
        "console",
        lambda msg: (
            problems.append(msg.text)
            if msg.type == "error" and "Failed to load resource" not in msg.text
            else None
        ),
    )
    page.goto(server.url)
    page.wait_for_selector("#experiment option", state="attached")
    yield page
    context.close()
    assert not problems, problems


def choose(page, experiment: str, target: str) -> None:
    page.select_option("#experiment", experiment)
    page.select_option("#target", target)


def search_and_wait(page, what: str) -> None:
    """Clicks Search and waits until the status names the query (results shown) or an error shows."""
    page.click("#search")
    page.wait_for_function(
        "what => document.querySelector('#status').textContent.includes(what)"
        " || !document.querySelector('#error').hidden",
        arg=what,
    )


def result_ids(page) -> list[str]:
    return page.eval_on_selector_all("#results > li.result", "els => els.map(e => e.dataset.mediaId)")


def shown_error(page) -> str:
    page.wait_for_selector("#error", state="visible")
    return page.inner_text("#error")


def test_a_typed_query_shows_the_search_layers_results_with_pictures(page, search_project):
    want = search_project.searcher().query(IMAGE_EXP, "image", text="a red circle", k=5)
    choose(page, IMAGE_EXP, "image")
    page.fill("#k", "5")
    page.fill("#text", "a red circle")
    search_and_wait(page, "a red circle")
    assert page.locator("#error").is_hidden()
    assert result_ids(page) == [w["media_id"] for w in want]
    first = page.locator("#results > li.result").first
    assert first.locator(".rank").inner_text() == "#1"
    assert first.locator(".score").inner_text() == f"score {want[0]['score']:.3f}"
    assert first.locator("ul.captions li").all_inner_texts() == want[0]["captions"]
    # Every thumbnail loaded from the media endpoint.
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    assert page.locator("#results img").count() == 5


def test_an_uploaded_picture_and_sound_are_found_first(page, search_project, server):
    picture = search_project.project.data / "images" / "green_triangle_1.png"
    choose(page, IMAGE_EXP, "image")
    page.set_input_files("#file", str(picture))
    search_and_wait(page, picture.name)
    assert page.locator("#error").is_hidden()
    assert result_ids(page)[0] == content_id("image", picture.read_bytes())
    assert page.locator("#query-preview img").count() == 1

    sound = search_project.project.data / "sounds" / "yellow-circle_0.wav"
    choose(page, TRI_EXP, "audio")
    page.set_input_files("#file", str(sound))
    search_and_wait(page, sound.name)
    assert page.locator("#error").is_hidden()
    assert result_ids(page)[0] == content_id("audio", sound.read_bytes())
    player = page.locator("#results > li.result").first.locator("audio[controls]")
    assert player.count() == 1
    media = page.request.get(server.url + player.get_attribute("src"))
    assert media.status == 200 and media.headers["content-type"] == "audio/wav"
    assert media.body() == sound.read_bytes()


def test_bad_files_and_queries_show_the_reason_on_the_page(page, search_project, tmp_path):
    choose(page, IMAGE_EXP, "image")
    page.click("#search")  # nothing typed, nothing chosen
    assert "Type a text query or choose" in shown_error(page)

    fake = tmp_path / "holiday.png"
    fake.write_text("these are notes, not a picture\n")
    page.set_input_files("#file", str(fake))
    search_and_wait(page, fake.name)
    assert "holiday.png was refused: the format is not supported" in shown_error(page)
    assert result_ids(page) == []

    cut = tmp_path / "cut.png"
    cut.write_bytes(truncated_png())
    page.set_input_files("#file", str(cut))
    search_and_wait(page, cut.name)
    assert "cut.png was refused" in shown_error(page)

    page.set_input_files("#file", str(search_project.project.data / "sounds" / "red-circle_0.wav"))
    search_and_wait(page, "red-circle_0.wav")
    assert "cannot search by audio" in shown_error(page)

    big = tmp_path / "big.wav"
    big.write_bytes(b"RIFF" + b"\0" * (MAX_UPLOAD_MB * 1024 * 1024))
    page.set_input_files("#file", str(big))
    page.click("#search")
    assert "the upload limit is 1.0 MiB" in shown_error(page)  # checked before anything is sent

    # A good query afterwards clears the message.
    page.click("#clear-file")
    page.fill("#text", "a blue square")
    search_and_wait(page, "a blue square")
    assert page.locator("#error").is_hidden() and len(result_ids(page)) == 10


def test_an_upload_streamed_past_the_limit_is_refused_before_it_is_all_sent(server):
    """No Content-Length (chunked): the server answers 413 once the body passes the limit, and
    does not wait for the 64 MiB the client means to send."""
    part = b"\x89PNG" + b"\0" * (32 * 1024)
    chunk = b"%x\r\n" % len(part) + part + b"\r\n"
    head = (
        b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: multipart/form-data; boundary=B\r\n\r\n"
    )
    form = b'--B\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'

    def answer_of(s) -> bytes:
        """What the server sent until it closed the connection (or reset it)."""
        got = b""
        try:
            while data := s.recv(65536):
                got += data
        except OSError:
            pass
        return got

    sent, answer = 0, b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
        s.sendall(head + b"%x\r\n" % len(form) + form + b"\r\n")
        try:
            while sent < 64 * 1024 * 1024 and not answer:
                s.sendall(chunk)
                sent += len(part)
                if select.select([s], [], [], 0.005)[0]:
                    answer = answer_of(s)
        except OSError:  # the server closed the connection on the rest of the upload
            answer = answer or answer_of(s)
    assert answer.startswith(b"HTTP/1.1 413"), (sent, answer[:200])
    assert b'"reason":"too_large"' in answer
    assert sent < 8 * 1024 * 1024


def test_ctrl_c_stops_the_server(server):
    started = time.monotonic()
    server.proc.send_signal(signal.SIGINT)
    rc = server.proc.wait(20)
    assert rc == 130, server.output()
    assert time.monotonic() - started < 10
    out = server.output()
    assert f"FuseMix search: http://127.0.0.1:{server.port}" in out
    assert "Traceback" not in out and "fusemix: interrupted" in out
