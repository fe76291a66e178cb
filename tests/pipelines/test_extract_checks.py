"""Extraction checks each file again before it encodes it, and retries failures when the encoder
changes (issue 12), on the tiny project's real pictures, Lance tables and tiny encoders.

A file swapped after ingestion (other bytes, or a symlink out of the dataset's folder) is quarantined
at stage `extract:<encoder>` as `changed` / `outside_root` and never encoded under the old id; what
is decoded is the bytes that were hashed. Quarantine rows record the encoder's fingerprint: the same
fingerprint does not retry them, another one does (rows of an older table without the column too).

    .venv/bin/pytest -q tests/pipelines/test_extract_checks.py
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from fusion.data import content_id
from fusion.encoders import build_encoder, load_registry
from fusion.media import REASONS, MediaError
from pipelines import schemas
from pipelines.extract import failed_items, run_extraction, verified_file
from pipelines.ingest import dataset_roots, load_dataset, write_dataset
from pipelines.lake import Lake
from pipelines.registries import DatasetSpec, load_datasets
from tests.pipeline_fixture import Project, make_project

DATASET = "shapes"
ENCODER = "tiny-image"
STAGE = f"extract:{ENCODER}"
LATENTS = f"latents__{DATASET}__{ENCODER}"
QUARANTINE = f"quarantine__{DATASET}"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    return make_project(tmp_path_factory.mktemp("checks"))


@pytest.fixture(scope="module")
def encoders(project) -> dict:
    """The tiny image encoder as registered, and with another fingerprint (mean pooling)."""
    registry = yaml.safe_load((project.configs / "encoders.yaml").read_text())
    registry["encoders"][ENCODER]["pooling"] = "mean"
    changed = project.root / "encoders-mean.yaml"
    changed.write_text(yaml.safe_dump(registry, sort_keys=False))
    old = build_encoder(load_registry(project.configs / "encoders.yaml")[ENCODER])
    new = build_encoder(load_registry(changed)[ENCODER])
    assert old.fingerprint != new.fingerprint
    return {"old": old, "new": new}


@pytest.fixture
def ingested(tmp_path, project) -> tuple[Lake, DatasetSpec, list[dict]]:
    """A private copy of the pictures, ingested: (lake, its dataset spec, image rows by media id)."""
    data = tmp_path / "data"
    shutil.copytree(project.data, data)
    spec = replace(load_datasets(project.configs / "datasets.yaml")[DATASET], root=str(data))
    lake = Lake(tmp_path / "lake")
    write_dataset(lake, DATASET, load_dataset(spec, tmp_path / "cache", progress=False))
    rows = lake.read(f"media__{DATASET}", ["media_id", "path"], "modality = 'image'").to_pylist()
    return lake, spec, sorted(rows, key=lambda r: r["media_id"])


def _extract(lake: Lake, spec: DatasetSpec, encoder, tmp_path: Path) -> dict:
    roots = dataset_roots(spec, tmp_path / "cache")
    return run_extraction(lake, DATASET, encoder, roots=roots, commit_every=8, progress=False)


def _failures(lake: Lake) -> dict[str, dict]:
    return {r["item"]: r for r in lake.read(QUARANTINE, filter=f"stage = '{STAGE}'").to_pylist()}


def test_changed_is_a_documented_reason():
    assert "changed" in REASONS and "ingest" in REASONS["changed"]
    assert MediaError("m", "changed").reason == "changed"


def test_dataset_roots_are_the_folders_ingest_read(tmp_path):
    reader = DatasetSpec("d", "image", reader="manifest", root=str(tmp_path / "r"))
    assert dataset_roots(reader, tmp_path / "cache") == [(tmp_path / "r").resolve()]
    unpacked = replace(reader, options={"extract_to": str(tmp_path / "x")})
    assert dataset_roots(unpacked, tmp_path / "cache") == [
        (tmp_path / "r").resolve(),
        (tmp_path / "x").resolve(),
    ]
    source = DatasetSpec("e", "image", source="emoji")
    assert dataset_roots(source, tmp_path / "cache") == [(tmp_path / "cache" / "emoji").resolve()]


def test_a_file_swapped_after_ingest_is_quarantined_as_changed_not_encoded(
    tmp_path, project, ingested, encoders
):
    lake, spec, images = ingested
    victim, other = images[0], images[1]
    # Another valid picture now lies at the victim's path: it decodes fine, but it is not the item.
    shutil.copyfile(other["path"], victim["path"])

    stats = _extract(lake, spec, encoders["old"], tmp_path)
    assert (stats["encoded"], stats["failed"]) == (project.n_media - 1, 1)
    assert victim["media_id"] not in lake.ids(LATENTS)
    assert other["media_id"] in lake.ids(LATENTS)
    row = _failures(lake)[victim["media_id"]]
    assert row["reason"] == "changed"
    assert (
        victim["path"] in row["detail"]
        and content_id("image", Path(other["path"]).read_bytes()) in row["detail"]
    )
    assert row["fingerprint"] == encoders["old"].fingerprint
    assert row["source"] == ENCODER and row["dataset"] == DATASET


def test_a_symlink_out_of_the_dataset_folder_is_refused_even_with_the_same_bytes(
    tmp_path, project, ingested, encoders
):
    lake, spec, images = ingested
    victim = images[0]
    outside = tmp_path / "elsewhere.png"
    shutil.copyfile(victim["path"], outside)  # the right content, but not under the dataset's root
    Path(victim["path"]).unlink()
    Path(victim["path"]).symlink_to(outside)

    stats = _extract(lake, spec, encoders["old"], tmp_path)
    assert stats["failed"] == 1
    assert _failures(lake)[victim["media_id"]]["reason"] == "outside_root"
    assert victim["media_id"] not in lake.ids(LATENTS)

    # Without roots (a caller that knows no dataset folder) only the content is checked: it matches.
    lake.delete(QUARANTINE, f"stage = '{STAGE}'")
    again = run_extraction(lake, DATASET, encoders["new"], progress=False)
    assert again["failed"] == 0 and victim["media_id"] in lake.ids(LATENTS)


def test_a_deleted_file_is_quarantined_as_missing(tmp_path, project, ingested, encoders):
    lake, spec, images = ingested
    Path(images[2]["path"]).unlink()
    stats = _extract(lake, spec, encoders["old"], tmp_path)
    assert stats["failed"] == 1
    assert _failures(lake)[images[2]["media_id"]]["reason"] == "missing"


def test_the_bytes_that_were_hashed_are_the_bytes_decoded(tmp_path, project, ingested, encoders, monkeypatch):
    lake, spec, images = ingested
    encoder = encoders["old"]
    seen: dict[str, object] = {}
    prepare = type(encoder).prepare

    def record(self, payload, media_id=""):
        seen[media_id] = payload
        return prepare(self, payload, media_id)

    monkeypatch.setattr(type(encoder), "prepare", record)
    _extract(lake, spec, encoder, tmp_path)
    assert set(seen) == {r["media_id"] for r in images}
    for r in images:  # not the path, which could be swapped between the check and the decoding
        assert isinstance(seen[r["media_id"]], bytes)
        assert content_id("image", seen[r["media_id"]]) == r["media_id"]


def test_verified_file_checks_root_then_content(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.png").write_bytes(b"picture a")
    mid = content_id("image", b"picture a")
    assert verified_file(mid, str(root / "a.png"), "image", [root]) == b"picture a"
    assert verified_file(mid, "a.png", "image", [root]) == b"picture a"  # relative to the root
    with pytest.raises(MediaError) as err:
        verified_file(mid, str(tmp_path / "a.png"), "image", [root])
    assert err.value.reason == "outside_root"
    with pytest.raises(MediaError) as err:
        verified_file(mid, str(root / "sub" / ".." / ".." / "a.png"), "image", [root])
    assert err.value.reason in ("outside_root", "missing")
    (root / "a.png").write_bytes(b"picture b")
    with pytest.raises(MediaError) as err:
        verified_file(mid, str(root / "a.png"), "image", [root])
    assert err.value.reason == "changed" and err.value.media_id == mid
    # The modality is part of the id: the same bytes as audio are another item.
    with pytest.raises(MediaError, match="changed"):
        verified_file(content_id("image", b"picture b"), str(root / "a.png"), "audio", [root])


def test_failures_are_retried_when_the_fingerprint_changes(tmp_path, project, ingested, encoders):
    lake, spec, images = ingested
    victim = images[3]
    good = Path(victim["path"]).read_bytes()
    Path(victim["path"]).write_bytes(b"not a picture any more")
    old, new = encoders["old"], encoders["new"]

    first = _extract(lake, spec, old, tmp_path)
    assert first["failed"] == 1 and first["retried"] == 0
    assert failed_items(lake, DATASET, ENCODER, old.fingerprint) == {victim["media_id"]}
    assert failed_items(lake, DATASET, ENCODER, new.fingerprint) == set()

    Path(victim["path"]).write_bytes(good)  # the file is repaired ...
    same = _extract(lake, spec, old, tmp_path)
    # ... but nothing tells the same encoder to look again: the failure stands.
    assert (same["pending"], same["encoded"], same["failed"], same["retried"]) == (0, 0, 0, 0)
    assert victim["media_id"] not in lake.ids(LATENTS)

    retried = _extract(lake, spec, new, tmp_path)  # a new fingerprint tries it again
    assert retried["retried"] == 1
    assert retried["encoded"] == project.n_media and retried["failed"] == 0
    assert _failures(lake) == {}
    assert lake.ids(LATENTS) == {r["media_id"] for r in images}
    assert lake.count(QUARANTINE, "stage = 'ingest'") == 1  # ingest's own row is left alone


def test_a_failure_that_persists_is_recorded_again_under_the_new_fingerprint(
    tmp_path, project, ingested, encoders
):
    lake, spec, images = ingested
    victim = images[4]
    Path(victim["path"]).write_bytes(b"still broken")
    _extract(lake, spec, encoders["old"], tmp_path)
    stats = _extract(lake, spec, encoders["new"], tmp_path)
    assert (stats["retried"], stats["failed"]) == (1, 1)
    rows = _failures(lake)
    assert list(rows) == [victim["media_id"]]
    assert rows[victim["media_id"]]["fingerprint"] == encoders["new"].fingerprint


def test_failures_of_an_older_table_without_fingerprints_are_retried_and_the_table_upgraded(
    tmp_path, project, ingested, encoders
):
    lake, spec, images = ingested
    old_schema = pa.schema([f for f in schemas.QUARANTINE if f.name != "fingerprint"])
    ingest_rows = lake.read(QUARANTINE, old_schema.names)
    failed = pa.table(
        {
            "dataset": [DATASET],
            "stage": [STAGE],
            "source": [ENCODER],
            "item": [images[5]["media_id"]],
            "reason": ["undecodable"],
            "detail": ["an older version's row"],
        },
        schema=old_schema,
    )
    lake.overwrite(QUARANTINE, pa.concat_tables([ingest_rows, failed]))  # as an older version wrote it
    assert "fingerprint" not in lake.open(QUARANTINE).schema.names
    assert failed_items(lake, DATASET, ENCODER, encoders["old"].fingerprint) == set()

    stats = _extract(lake, spec, encoders["old"], tmp_path)
    assert stats["retried"] == 1 and stats["encoded"] == project.n_media
    assert lake.open(QUARANTINE).schema.equals(schemas.QUARANTINE, check_metadata=False)
    assert _failures(lake) == {}
    assert lake.read(QUARANTINE, filter="stage = 'ingest'")["fingerprint"].to_pylist() == [None]


def test_failures_of_items_that_left_the_dataset_are_dropped(tmp_path, project, ingested, encoders):
    lake, spec, images = ingested
    victim = images[6]
    Path(victim["path"]).write_bytes(b"garbage")
    _extract(lake, spec, encoders["old"], tmp_path)
    assert victim["media_id"] in _failures(lake)
    # Re-ingest: the file's new bytes are refused at ingest, so the old id leaves the dataset.
    write_dataset(lake, DATASET, load_dataset(spec, tmp_path / "cache", progress=False))
    assert victim["media_id"] not in lake.ids(f"media__{DATASET}")
    _extract(lake, spec, encoders["old"], tmp_path)
    assert _failures(lake) == {}
