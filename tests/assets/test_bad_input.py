"""Ingest of a manifest full of bad rows, materialised in-process on the tiny project (issue 12):
each bad row lands in the quarantine table with its reason, every good row in the pairs table.

    .venv/bin/pytest -q tests/assets/test_bad_input.py
"""

from __future__ import annotations

import dagster as dg
import pytest
import yaml

from pipelines.partitions import sync_partitions
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


def ingest(project: Project, dataset: str, tmp) -> dg.ExecuteInProcessResult:
    """ingest_job for `dataset` of the project, in process, on a test instance under tmp/dagster."""
    from app.definitions import build_defs

    defs, parts = build_defs(project.configs, resources=project.resources())
    (tmp / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp / "dagster")) as instance:
        sync_partitions(parts, instance)
        return defs.resolve_job_def("ingest_job").execute_in_process(
            partition_key=dataset,
            instance=instance,
            run_config={"ops": {"ingest": {"config": {"progress": False}}}},
            raise_on_error=False,
        )


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> tuple[Project, dg.ExecuteInProcessResult]:
    tmp = tmp_path_factory.mktemp("bad_input")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUSEMIX_HOME", str(tmp / "home"))

        project = make_project(tmp)
        (project.data / "images" / "broken.png").write_bytes(image_bytes()[:40])
        (project.data / "images" / "zero.png").write_bytes(b"")
        manifest = project.data / "manifest.csv"
        manifest.write_bytes(manifest.read_bytes() + b"".join(row + b"\r\n" for row, _ in ROWS))
        yield project, ingest(project, "shapes", tmp)


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


# Through the ingest asset, once per manifest format: every single-row kind of bad input of the
# reader tests (tests/fusion/test_readers.py ROW_CASES) that applies to an image dataset with the
# default limits, each between good rows, plus the kinds only a format can carry.
FORMAT_ONLY = {
    "jsonl": [
        (b'{"media": "good1.png", "caption": 5}', "non_text_caption"),
        (b'{"media": "good1.png", "caption": null}', "non_text_caption"),
        (b'{"media": "good1.png", "caption": {"text": "a cat"}}', "non_text_caption"),
        (b'{"media": "good1.png"}', "malformed"),
        (b"[1, 2, 3]", "malformed"),
        (b"not json at all", "malformed"),
        (b'{"media": "good1.png", "caption": "caf\xe9"}', "encoding"),
    ],
    "csv": [
        (b"good1.png,caf\xe9 au lait,", "encoding"),
        (b"good1.png,too,many,fields", "malformed"),
        (b'good1.png,"an unclosed quote,', "malformed"),
    ],
    "parquet": [],
}


def asset_cases() -> list[tuple[str, str, str | None, str]]:
    from tests.fusion.test_readers import ROW_CASES

    audio = ("silent", "too_short", "too_long")
    # The dataset is declared `modality: image`, so a file that is no picture is not sniffed as
    # another format: it fails to decode as one.
    as_image = {"unsupported_format": "undecodable"}
    return [
        (kind, media, split, caption, as_image.get(reason, reason))
        for kind, media, caption, split, reason, limits in ROW_CASES
        if limits is None and reason not in audio
    ]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_every_kind_of_bad_row_through_the_ingest_asset(tmp_path, fmt):
    from tests.fusion.test_readers import good_rows, label, write_bad_media, write_rows

    project = make_project(tmp_path)
    root = write_bad_media(tmp_path / fmt)
    goods = iter(good_rows())
    entries: list[tuple[dict, str | None]] = []  # (row, reason it must be quarantined for, or None)
    for i, (_, media, split, caption, reason) in enumerate(asset_cases()):
        if i % 8 == 0:
            entries.append((next(goods), None))  # good rows spread among the bad ones
        entries.append(({"media": media, "caption": caption, "split": split}, reason))
    entries += [(row, None) for row in goods]
    if fmt == "parquet":  # nulls in typed columns, which only Parquet stores as such
        entries += [
            ({"media": "good2.png", "caption": None, "split": None}, "non_text_caption"),
            ({"media": None, "caption": "a picture without a file", "split": None}, "missing"),
        ]
    rows = [row for row, _ in entries]
    path = write_rows(root / f"manifest.{fmt}", rows)
    want = [(label(path, i), reason) for i, (_, reason) in enumerate(entries) if reason is not None]
    if FORMAT_ONLY[fmt]:  # raw lines appended after the others
        path.write_bytes(path.read_bytes() + b"".join(line + b"\n" for line, _ in FORMAT_ONLY[fmt]))
        want += [(label(path, len(rows) + j), reason) for j, (_, reason) in enumerate(FORMAT_ONLY[fmt])]
    datasets = yaml.safe_load((project.configs / "datasets.yaml").read_text())
    datasets["datasets"]["bad"] = {"modality": "image", "reader": "manifest", "root": str(root)}
    (project.configs / "datasets.yaml").write_text(yaml.safe_dump(datasets))
    result = ingest(project, "bad", tmp_path)
    assert result.success
    lake = project.resources()["lake"].lake()
    got = [
        (q["item"], q["reason"]) for q in lake.read("quarantine__bad", filter="stage = 'ingest'").to_pylist()
    ]
    assert sorted(reason for _, reason in got) == sorted(reason for _, reason in want)
    if fmt != "csv":  # a CSV caption with a newline takes two lines and shifts the line numbers after it
        assert sorted(got) == sorted(want)
    assert len(want) >= 40
    captions = set(lake.read("media__bad", ["text"], filter="modality = 'text'")["text"].to_pylist())
    assert captions == {f"good picture number {i}" for i in range(6)}
    assert len(lake.read("pairs__bad")) == 6
    assert metadata(result, "quarantine")["quarantined"] == len(want)
