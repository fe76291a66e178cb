"""Ingest of a manifest full of bad rows, materialised in-process on the tiny project (issue 12):
each bad row lands in the quarantine table with its reason, every good row in the pairs table.

    .venv/bin/pytest -q tests/assets/test_bad_input.py
"""

from __future__ import annotations

import dagster as dg
import pytest

from tests.assets.conftest import metadata
from tests.fixtures.media_factory import image_bytes
from tests.pipeline_fixture import Project, make_project

RED = "images/red_square_0.png"
# Rows appended to the project's manifest (header + 72 good rows + one missing file = 74 lines),
# with the reason each must be quarantined for; None marks a good row that must be kept.
ROWS: list[tuple[bytes, str | None]] = [
    (f"{RED},caf\xe9 au lait,train,red-square".encode("latin-1"), "encoding"),
    (f'{RED},"an unclosed quote,train,red-square'.encode(), "malformed"),
    (f"{RED},a red square kept after the unclosed quote,train,red-square".encode(), None),
    (f"{RED},\x1b[31mred\x1b[0m,train,red-square".encode(), "control_characters"),
    (f"{RED},a red\x00square,train,red-square".encode(), "control_characters"),
    (f"{RED},a \x9b31m C1 escape,train,red-square".encode(), "control_characters"),
    (f"{RED},{'x' * 200_000},train,red-square".encode(), "caption_too_long"),
    (f"{RED},   ,train,red-square".encode(), "empty_caption"),
    (f"{RED},a red square,train,red-square".encode(), "duplicate"),
    (f"{RED},a red square,holdout,red-square".encode(), "malformed"),
    (f"{RED},too,many,fields,here".encode(), "malformed"),
    (b"images/r\xffd.png,a bad byte in the path,train,red-square", "encoding"),
    (b"https://example.com/red.png,a picture on the web,train,web", "url"),
    (b"s3://bucket/red.png,a picture in a bucket,train,web", "url"),
    (b"../manifest.csv,above the root,train,x", "outside_root"),
    (b"images/broken.png,bytes that are no picture,train,x", "undecodable"),
    (b"images/zero.png,a zero-byte file,train,x", "empty"),
    (b"images/nothere.png,a file that is not there,train,x", "missing"),
    (f"{RED},a red square at the very end,train,red-square".encode(), None),
]


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> tuple[Project, dg.ExecuteInProcessResult]:
    tmp = tmp_path_factory.mktemp("bad_input")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUSEMIX_HOME", str(tmp / "home"))
        from app.definitions import build_defs

        project = make_project(tmp)
        (project.data / "images" / "broken.png").write_bytes(image_bytes()[:40])
        (project.data / "images" / "zero.png").write_bytes(b"")
        manifest = project.data / "manifest.csv"
        manifest.write_bytes(manifest.read_bytes() + b"".join(row + b"\r\n" for row, _ in ROWS))
        defs, _ = build_defs(project.configs, resources=project.resources())
        (tmp / "dagster").mkdir()
        with dg.instance_for_test(temp_dir=str(tmp / "dagster")) as instance:
            result = defs.resolve_job_def("ingest_job").execute_in_process(
                partition_key="shapes",
                instance=instance,
                run_config={"ops": {"ingest": {"config": {"progress": False}}}},
                raise_on_error=False,
            )
        yield project, result


def test_ingest_quarantines_each_bad_row_and_keeps_every_good_one(ingested):
    project, result = ingested
    assert result.success
    lake = project.resources()["lake"].lake()
    quarantine = lake.read("quarantine__shapes", filter="stage = 'ingest'").to_pylist()
    want = [("manifest.csv:74", "missing")] + [
        (f"manifest.csv:{75 + i}", reason) for i, (_, reason) in enumerate(ROWS) if reason is not None
    ]
    assert [(q["item"], q["reason"]) for q in quarantine] == want
    for q in quarantine:
        assert q["detail"] and q["dataset"] == "shapes" and q["source"] == "shapes"
        assert not any(c in q["detail"] + q["item"] for c in "\x00\x1b\x9b"), q  # printable in the lake
    by_item = {q["item"]: q["detail"] for q in quarantine}
    assert by_item["manifest.csv:75"] == (
        "line 75 holds byte 0xe9 at character 28, which is not UTF-8 (field 'caption')"
    )
    assert "200000 characters > limit 2000" in by_item["manifest.csv:81"]

    kept = sum(reason is None for _, reason in ROWS)
    pairs = lake.read("pairs__shapes")
    assert len(pairs) == project.n_pairs + kept == 74
    captions = set(lake.read("media__shapes", ["text"], filter="modality = 'text'")["text"].to_pylist())
    assert {"a red square kept after the unclosed quote", "a red square at the very end"} <= captions

    meta = metadata(result, "quarantine")
    assert meta["quarantined"] == len(want)
    assert meta["reasons"]["control_characters"] == 3 and meta["reasons"]["url"] == 2
    assert metadata(result, "pairs")["pairs"] == project.n_pairs + kept


def test_the_manifest_on_disk_really_holds_the_bad_bytes(ingested):
    data = (ingested[0].data / "manifest.csv").read_bytes()
    assert b"caf\xe9" in data and b"\x1b[31m" in data and b"\x00" in data
    with pytest.raises(UnicodeDecodeError):
        data.decode("utf-8")
    assert (ingested[0].data / "images" / "zero.png").stat().st_size == 0
