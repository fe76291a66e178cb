"""Tests for the dataset readers (fusion.data.readers and the per-format modules) and their quarantine.

The caption/annotation files are committed in their real formats under tests/fixtures/readers/; the
media they point at is generated here in tmp_path (distinct colours or tones so content ids differ).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fusion.data import Dataset, content_id
from fusion.data.builder import REASONS, DatasetBuilder, default_splits, normalise_split
from fusion.data.readers import READERS, ReaderError, read_dataset
from fusion.data.webdataset import split_key
from fusion.media import MediaLimits
from tests.fixtures.media_factory import image_bytes, write_audio, write_image

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "readers"


def colour(i: int) -> tuple[int, int, int]:
    return ((37 * i) % 256, (91 * i + 40) % 256, (53 * i + 80) % 256)


def pairs_by_split(ds: Dataset) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in ds.pairs:
        out[p.split] = out.get(p.split, 0) + 1
    return dict(sorted(out.items()))


def captions_of(ds: Dataset) -> set[str]:
    return {ds.media[p.caption_id].text for p in ds.pairs}  # type: ignore[misc]


def media_count(ds: Dataset, modality: str) -> int:
    return sum(1 for m in ds.media.values() if m.modality == modality)


def assert_consistent(ds: Dataset) -> None:
    """Every pair points at a stored media item and a stored caption; every quarantine reason is known."""
    for p in ds.pairs:
        assert ds.media[p.media_id].modality in ("image", "audio")
        assert ds.media[p.caption_id].modality == "text"
        assert p.split in ("train", "val", "test")
    assert all(q.reason in REASONS for q in ds.quarantine)
    assert len({p.pair_id for p in ds.pairs}) == len(ds.pairs)


# ------------------------------------------------------------------------------------------------ manifest


@pytest.fixture
def manifest_root(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    (root / "img").mkdir(parents=True)
    shutil.copy(FIXTURES / "manifest.csv", root / "manifest.csv")
    write_image(root / "img" / "red.png", (220, 20, 20))
    write_image(root / "img" / "green.png", (20, 220, 20))
    write_image(root / "img" / "blue.png", (20, 20, 220))
    shutil.copy(root / "img" / "red.png", root / "img" / "red_copy.png")
    write_image(tmp_path / "outside.png", (1, 2, 3))
    os.symlink(tmp_path / "outside.png", root / "img" / "escape_link.png")
    (root / "img" / "broken.png").write_bytes(b"\x89PNG but not really a png at all")
    (root / "img" / "empty.png").write_bytes(b"")
    noise = np.random.default_rng(0).integers(0, 256, (120, 120, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "img" / "big.png")
    return root


def test_manifest_csv_counts_and_quarantine(manifest_root: Path):
    limits = MediaLimits(max_bytes=20_000)  # the noise PNG is ~43 KB, the flat ones well under 1 KB
    ds = read_dataset("manifest", manifest_root, name="colours", limits=limits, progress=False)
    assert_consistent(ds)
    assert media_count(ds, "image") == 3
    assert len(ds.pairs) == 4
    assert captions_of(ds) == {"A red square.", "A small red tile.", "A green square.", "A blue square."}
    assert len({p.group_id for p in ds.pairs}) == 3
    assert ds.quarantine_counts() == {
        "duplicate": 1,
        "empty": 1,
        "empty_caption": 1,
        "malformed": 2,
        "missing": 1,
        "outside_root": 3,
        "too_large": 1,
        "undecodable": 1,
    }
    by_row = {q.item: q.reason for q in ds.quarantine}
    assert by_row["manifest.csv:6"] == "duplicate"  # red_copy.png: same bytes, same caption as line 2
    assert by_row["manifest.csv:10"] == "outside_root"  # the symlink
    assert by_row["manifest.csv:15"] == "malformed"  # unknown split "holdout"
    red = content_id("image", (manifest_root / "img" / "red.png").read_bytes())
    blue = content_id("image", (manifest_root / "img" / "blue.png").read_bytes())
    assert {p.split for p in ds.pairs if p.media_id == red} == {"train"}
    assert {p.split for p in ds.pairs if p.media_id == blue} == {"test"}
    item = ds.media[red]
    assert item.path == str((manifest_root / "img" / "red.png").resolve()) and Path(item.path).is_absolute()
    assert item.license == "unknown" and item.source == "colours"
    assert all(p.license == "unknown" and p.source == "colours" for p in ds.pairs)
    assert ds.split_seed == 0  # green.png got a default split


def test_manifest_without_limits_keeps_big_image(manifest_root: Path):
    ds = read_dataset("csv", manifest_root, name="colours", license="CC0-1.0", source="mine", progress=False)
    assert media_count(ds, "image") == 4 and "too_large" not in ds.quarantine_counts()
    assert all(p.license == "CC0-1.0" and p.source == "mine" for p in ds.pairs)


def test_manifest_split_filter(manifest_root: Path):
    ds = read_dataset("manifest", manifest_root, name="c", split="test", progress=False)
    # Only blue is labelled test; rows without a split (green, red_copy) are given the requested split,
    # and red_copy is no duplicate now that the train rows of the same bytes are not read.
    assert pairs_by_split(ds) == {"test": 3}
    assert captions_of(ds) == {"A blue square.", "A green square.", "A red square."}
    assert ds.split_seed is None
    assert "duplicate" not in ds.quarantine_counts()
    ds = read_dataset("manifest", manifest_root, name="c", split="train", progress=False)
    assert "A blue square." not in captions_of(ds) and ds.quarantine_counts()["duplicate"] == 1


def test_manifest_jsonl_sniffs_modality_and_handles_bad_lines(tmp_path: Path):
    root = tmp_path / "mixed"
    write_image(root / "a.png", (255, 0, 0))
    write_audio(root / "b.wav", freq=440.0)
    write_audio(root / "c.flac", freq=880.0, fmt="FLAC")
    (root / "notes.txt").write_text("plain text is neither an image nor audio")
    lines = [
        json.dumps({"media": "a.png", "note": "the first row has no caption; later ones do"}),
        json.dumps({"media": "a.png", "caption": "red", "split": "train"}),
        json.dumps({"media": "b.wav", "caption": ["a beep", "a tone"], "group": "tones"}),
        json.dumps({"media": "c.flac", "caption": "a higher tone", "group": "tones"}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"media": "a.png", "caption": 42}),
        json.dumps({"media": "a.png"}),
        json.dumps({"media": 7, "caption": "numeric path"}),
        json.dumps({"media": "notes.txt", "caption": "a text file"}),
        "",
    ]
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    ds = read_dataset("jsonl", root, name="mixed", file="pairs.jsonl", progress=False)
    assert_consistent(ds)
    assert media_count(ds, "image") == 1 and media_count(ds, "audio") == 2
    assert len(ds.pairs) == 4
    assert {p.group_id for p in ds.pairs if ds.media[p.media_id].modality == "audio"} == {"tones"}
    # the audio rows share a group, so they share a default split
    assert len({p.split for p in ds.pairs if p.group_id == "tones"}) == 1
    assert ds.quarantine_counts() == {"malformed": 5, "non_text_caption": 1, "unsupported_format": 1}


def test_manifest_parquet_and_file_as_root(tmp_path: Path):
    root = tmp_path / "pq"
    for i in range(6):
        write_image(root / "audio_named_images" / f"{i}.png", colour(i))
    table = pa.table(
        {
            "path": [f"audio_named_images/{i}.png" for i in range(6)],
            "text": [f"caption {i}" for i in range(6)],
            "fold": ["train", "train", "train", "val", "test", None],
            "concept": ["even", "odd"] * 3,
        }
    )
    pq.write_table(table, root / "pairs.parquet")
    ds = read_dataset(
        "parquet",
        root / "pairs.parquet",
        name="pq",
        caption_column="text",
        split_column="fold",
        progress=False,
    )
    assert_consistent(ds)
    assert len(ds.pairs) == 6 and media_count(ds, "image") == 6
    assert pairs_by_split(ds)["val"] >= 1 and pairs_by_split(ds)["test"] >= 1
    assert {p.concept for p in ds.pairs} == {"even", "odd"}


def test_manifest_configuration_errors(tmp_path: Path):
    root = tmp_path / "r"
    root.mkdir()
    with pytest.raises(ReaderError, match="no manifest"):
        read_dataset("manifest", root, name="x", progress=False)
    (root / "manifest.csv").write_text("picture,caption\na.png,hello\n")
    with pytest.raises(ReaderError, match="no media column"):
        read_dataset("manifest", root, name="x", progress=False)
    with pytest.raises(ReaderError, match="caption column"):
        read_dataset(
            "manifest", root, name="x", media_column="picture", caption_column="text", progress=False
        )
    with pytest.raises(ReaderError, match="unknown dataset kind"):
        read_dataset("tfrecord", root, name="x")
    with pytest.raises(ReaderError, match="modality"):
        read_dataset("manifest", root, name="x", media_column="picture", modality="video", progress=False)
    with pytest.raises(TypeError):
        read_dataset("manifest", root, name="x", media_column="picture", no_such_option=1, progress=False)
    with pytest.raises(ReaderError, match="unknown split"):
        read_dataset("manifest", root, name="x", media_column="picture", split="dev-2", progress=False)


def test_manifest_progress_bar_runs(manifest_root: Path, capsys):
    ds = read_dataset("manifest", manifest_root, name="colours", progress=True)
    assert len(ds.pairs) == 5  # no byte limit: big.png is in
    assert "read colours" in capsys.readouterr().err


def test_a_bad_row_never_costs_a_good_one(tmp_path: Path):
    """Interleave good and bad rows: every good row survives, every bad row is quarantined once."""
    root = tmp_path / "mix"
    rows = ["image,caption"]
    for i in range(40):
        write_image(root / f"{i}.png", colour(i))
        rows.append(f"{i}.png,caption number {i}")
        rows.append(f"gone{i}.png,caption number {i}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    ds = read_dataset("manifest", root, name="mix", progress=False)
    assert len(ds.pairs) == 40 and ds.quarantine_counts() == {"missing": 40}
    assert sum(pairs_by_split(ds).values()) == 40 and set(pairs_by_split(ds)) == {"train", "val", "test"}


# ------------------------------------------------------------------------------------------------ splits


def test_default_splits_are_deterministic_and_seeded():
    groups = [f"g{i}" for i in range(100)]
    a = default_splits(groups, seed=1)
    assert a == default_splits(list(reversed(groups)), seed=1)
    assert sum(v == "test" for v in a.values()) == 10 and sum(v == "val" for v in a.values()) == 10
    assert a != default_splits(groups, seed=2)
    assert set(default_splits(["x", "y"], seed=0).values()) == {"train"}
    assert normalise_split("restval") == "train" and normalise_split("Validation") == "val"
    assert normalise_split("evaluation") == "test" and normalise_split("holdout") is None


def test_default_splits_of_concepts_as_the_sources_use_them():
    # The default-corpus sources (pipelines.sources) split whole concepts with default_splits; these
    # assignments are the ones the sources made before it was shared, so the demo's splits stay put.
    concepts = ["cello", "flute", "trumpet", "drum: bass drum", "a bell", "koto"]
    concepts += ["tuba", "oboe", "harpsichord", "banjo", "sitar", "viola"]
    held_out = {
        0: {"trumpet": "test", "koto": "val"},
        3: {"banjo": "test", "drum: bass drum": "val"},
    }
    for seed, want in held_out.items():
        got = default_splits(concepts + concepts[:5], seed)  # a concept named twice counts once
        assert set(got) == set(concepts)
        assert {c: s for c, s in got.items() if s != "train"} == want
    assert default_splits(iter(["x", "y", "z"]), seed=0) == {"y": "test", "z": "val", "x": "train"}
    assert "val" not in default_splits([f"g{i}" for i in range(30)], seed=0, val_fraction=0.0).values()
    assert default_splits([], seed=0) == {}


def test_default_split_keeps_a_group_together(tmp_path: Path):
    root = tmp_path / "g"
    lines = ["image,caption,group"]
    for i in range(20):
        write_image(root / f"{i}.png", colour(i))
        for j in range(3):
            lines.append(f"{i}.png,item {i} caption {j},")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    ds = read_dataset("manifest", root, name="g", seed=7, progress=False)
    assert len(ds.pairs) == 60 and len({p.group_id for p in ds.pairs}) == 20
    for gid in {p.group_id for p in ds.pairs}:
        assert len({p.split for p in ds.pairs if p.group_id == gid}) == 1
    assert ds.split_seed == 7
    again = read_dataset("manifest", root, name="g", seed=7, progress=False)
    assert [p.split for p in again.pairs] == [p.split for p in ds.pairs]


def test_explicit_split_of_a_group_wins_over_the_default(tmp_path: Path):
    root = tmp_path / "g"
    for i in range(4):
        write_image(root / f"{i}.png", colour(i))
    rows = [
        "image,caption,split,group",
        "0.png,zero,test,g0",
        "1.png,one,,g0",
        "2.png,two,,g1",
        "3.png,three,,g2",
    ]
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    ds = read_dataset("manifest", root, name="g", progress=False)
    assert {p.split for p in ds.pairs if p.group_id == "g0"} == {"test"}
    assert len({p.group_id for p in ds.pairs}) == 3


def test_probe_off_only_reads_and_hashes(manifest_root: Path):
    ds = read_dataset("manifest", manifest_root, name="c", probe=False, progress=False)
    # broken.png is admitted unprobed (sniffed as an image by its PNG signature); the rest is unchanged.
    assert "undecodable" not in ds.quarantine_counts() and media_count(ds, "image") == 5  # +broken, +big
    assert ds.quarantine_counts()["outside_root"] == 3


def test_builder_rejects_unknown_reason(tmp_path: Path):
    b = DatasetBuilder("x", tmp_path)
    with pytest.raises(ValueError):
        b.reject("row", "it felt wrong")


# ------------------------------------------------------------------------------------------------ COCO


def test_coco_captions(tmp_path: Path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    shutil.copy(FIXTURES / "captions_val2017.json", root / "annotations" / "captions_val2017.json")
    for i in (1, 2, 3, 5):
        write_image(root / "val2017" / f"{i:012d}.jpg", colour(i), fmt="JPEG")
    ds = read_dataset("coco", root, name="coco", progress=False)
    assert_consistent(ds)
    assert media_count(ds, "image") == 3
    assert len(ds.pairs) == 4 and len({p.group_id for p in ds.pairs}) == 3
    assert pairs_by_split(ds) == {"val": 4}  # from the file name
    assert ds.quarantine_counts() == {
        "duplicate": 1,
        "empty_caption": 1,
        "malformed": 3,
        "missing": 1,
        "no_caption": 1,
    }
    items = {q.item for q in ds.quarantine}
    assert "captions_val2017.json:annotation 104" in items and "captions_val2017.json:image 3" in items
    # The split argument overrides the file name.
    assert pairs_by_split(read_dataset("coco", root, name="c", split="test", progress=False)) == {"test": 4}


def test_coco_broken_json_is_quarantined_not_raised(tmp_path: Path):
    root = tmp_path / "coco"
    root.mkdir()
    (root / "captions_train2014.json").write_text('{"images": [')
    ds = read_dataset("coco", root, name="c", progress=False)
    assert ds.pairs == [] and ds.quarantine_counts() == {"malformed": 1}
    with pytest.raises(ReaderError):
        read_dataset("coco", tmp_path / "nowhere", name="c", progress=False)


def test_karpathy_flickr30k(tmp_path: Path):
    root = tmp_path / "f30k"
    root.mkdir()
    shutil.copy(FIXTURES / "dataset_flickr30k.json", root / "dataset_flickr30k.json")
    for i in range(5):
        write_image(root / "flickr30k-images" / f"100{i}.jpg", colour(i), fmt="JPEG")
    ds = read_dataset("karpathy", root, name="f30k", images_dir="flickr30k-images", progress=False)
    assert_consistent(ds)
    assert pairs_by_split(ds) == {"test": 2, "train": 3, "val": 1}  # restval counts as train
    assert media_count(ds, "image") == 4 and len({p.group_id for p in ds.pairs}) == 4
    assert ds.quarantine_counts() == {"empty_caption": 1, "malformed": 2}
    test_only = read_dataset(
        "karpathy", root, name="f30k", images_dir="flickr30k-images", split="test", progress=False
    )
    assert pairs_by_split(test_only) == {"test": 2}
    assert captions_of(test_only) == {"A woman reads a book.", "Someone reading."}


def test_karpathy_coco_flavour_uses_filepath(tmp_path: Path):
    root = tmp_path / "coco"
    root.mkdir()
    shutil.copy(FIXTURES / "dataset_coco.json", root / "dataset_coco.json")
    write_image(root / "val2014" / "COCO_val2014_000000000042.jpg", colour(42), fmt="JPEG")
    write_image(root / "val2014" / "COCO_val2014_000000000073.jpg", colour(73), fmt="JPEG")
    write_image(root / "train2014" / "COCO_train2014_000000000009.jpg", colour(9), fmt="JPEG")
    ds = read_dataset("karpathy", root, name="coco-k", progress=False)
    assert pairs_by_split(ds) == {"test": 2, "train": 2}
    assert ds.quarantine == []
    with pytest.raises(ReaderError, match="Karpathy"):
        read_dataset("coco", root, name="x", annotations="dataset_coco.json", progress=False)


# ------------------------------------------------------------------------------------------------ webdataset


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


@pytest.fixture
def wds_root(tmp_path: Path) -> Path:
    root = tmp_path / "wds"
    (root / "test").mkdir(parents=True)
    with tarfile.open(root / "test" / "0.tar", "w") as tf:
        add_member(tf, "s000.jpg", image_bytes(colour(0), fmt="JPEG"))
        add_member(tf, "s000.txt", b"a first caption\na second caption\n")
        add_member(tf, "s000.cls", b"3")
        add_member(tf, "s001.png", image_bytes(colour(1), fmt="PNG"))
        add_member(tf, "s001.txt", "caf\u00e9 au lait".encode())
        add_member(tf, "s002.webp", image_bytes(colour(2), fmt="WEBP"))
        add_member(tf, "s002.txt", b"a webp picture")
        add_member(tf, "s003.jpg", image_bytes(colour(3), fmt="JPEG"))  # no caption
        add_member(tf, "s004.txt", b"a caption without an image")
        add_member(tf, "s005.jpg", b"\xff\xd8\xff not really a jpeg")
        add_member(tf, "s005.txt", b"broken image")
        link = tarfile.TarInfo("s006.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        add_member(tf, "s006.txt", b"a link")
        add_member(tf, "s007.png", image_bytes(colour(7)))
        add_member(tf, "s007.txt", b"\n\n  \n")
    with tarfile.open(root / "test" / "1.tar", "w") as tf:
        add_member(tf, "s100.png", image_bytes(colour(1), fmt="PNG"))  # same bytes as s001
        add_member(tf, "s100.txt", "caf\u00e9 au lait".encode())
        add_member(tf, "s101.jpg", image_bytes(colour(101), fmt="JPEG"))
        add_member(tf, "s101.txt", b"from the second shard")
    return root


def test_webdataset_shards(wds_root: Path, tmp_path: Path):
    ds = read_dataset("webdataset", wds_root, name="wds", progress=False)
    assert_consistent(ds)
    assert media_count(ds, "image") == 4
    assert len(ds.pairs) == 5 and len({p.group_id for p in ds.pairs}) == 4
    assert pairs_by_split(ds) == {"test": 5}  # from the shard's folder name
    assert ds.quarantine_counts() == {
        "duplicate": 1,
        "empty_caption": 1,
        "malformed": 1,
        "missing": 1,
        "no_caption": 1,
        "undecodable": 1,
    }
    assert all(m.data is not None for m in ds.media.values() if m.modality == "image")
    assert "café au lait" in captions_of(ds)
    out = tmp_path / "extracted"
    ds2 = read_dataset("wds", wds_root, name="wds", extract_to=out, progress=False)
    paths = [Path(m.path) for m in ds2.media.values() if m.modality == "image"]  # type: ignore[arg-type]
    assert len(paths) == 4 and all(p.parent == out.resolve() and p.is_file() for p in paths)
    assert {content_id("image", p.read_bytes()) for p in paths} == {
        m for m in ds2.media if ds2.media[m].modality == "image"
    }


def test_webdataset_truncated_shard_keeps_the_rest(wds_root: Path):
    data = (wds_root / "test" / "1.tar").read_bytes()
    (wds_root / "test" / "1.tar").write_bytes(data[:1500])  # cut inside the second member
    ds = read_dataset("webdataset", wds_root, name="wds", progress=False)
    assert media_count(ds, "image") == 4 - 1  # s101 (second shard) is lost, shard 0 is intact
    assert any(q.item == "test/1.tar" and q.reason == "undecodable" for q in ds.quarantine)
    # The sample cut in half is part of the shard's quarantine row, not a separate "no_caption".
    assert ds.quarantine_counts() == {
        "empty_caption": 1,
        "malformed": 1,
        "missing": 1,
        "no_caption": 1,
        "undecodable": 2,
    }


def test_webdataset_split_filter_and_key_rule(wds_root: Path):
    assert split_key("dir/abc.seg.jpg") == ("dir/abc", "seg.jpg")
    assert split_key("abc.TXT") == ("abc", "txt")
    assert split_key("README") == ("README", "")
    with pytest.raises(ReaderError, match="no tar shards"):
        read_dataset("webdataset", wds_root, name="wds", split="train", shards="train/*.tar", progress=False)
    ds = read_dataset("webdataset", wds_root, name="wds", split="train", progress=False)
    assert ds.pairs == []  # every shard lives under test/


# ------------------------------------------------------------------------------------------------ audio


@pytest.fixture
def audiocaps_root(tmp_path: Path) -> Path:
    root = tmp_path / "audiocaps"
    (root / "dataset").mkdir(parents=True)
    shutil.copy(FIXTURES / "audiocaps_train.csv", root / "dataset" / "train.csv")
    shutil.copy(FIXTURES / "audiocaps_test.csv", root / "dataset" / "test.csv")
    write_audio(root / "audio" / "train" / "r1nicOVtvkQ_130.wav", 300.0)
    write_audio(root / "audio" / "train" / "UDGBjjwyaqE_20.wav", 400.0, sr=22050)
    write_audio(root / "audio" / "train" / "14ekd4nkpwc_28.wav", 500.0, fmt="FLAC")
    write_audio(root / "audio" / "train" / "shortclip_10.wav", 600.0, seconds=0.01)
    write_audio(root / "audio" / "test" / "--0w1YA1Hm4_30.wav", 700.0)
    return root


def test_audiocaps(audiocaps_root: Path):
    ds = read_dataset("audiocaps", audiocaps_root, name="ac", progress=False)
    assert_consistent(ds)
    assert media_count(ds, "audio") == 4
    assert pairs_by_split(ds) == {"test": 3, "train": 3}
    assert len({p.group_id for p in ds.pairs if p.split == "test"}) == 1  # five-caption style clip
    assert ds.quarantine_counts() == {"duplicate": 1, "malformed": 1, "missing": 1, "too_short": 1}
    test_only = read_dataset("audiocaps", audiocaps_root, name="ac", split="test", progress=False)
    assert pairs_by_split(test_only) == {"test": 3} and test_only.quarantine == []


def test_audiocaps_flat_layout(audiocaps_root: Path):
    flat = audiocaps_root / "flat"
    write_audio(flat / "--0w1YA1Hm4.wav", 700.0)
    ds = read_dataset(
        "audiocaps",
        audiocaps_root,
        name="ac",
        split="test",
        audio_dir="flat",
        filename="{youtube_id}.wav",
        progress=False,
    )
    assert len(ds.pairs) == 3
    with pytest.raises(ReaderError, match="template"):
        read_dataset("audiocaps", audiocaps_root, name="ac", filename="{video}.wav", progress=False)
    with pytest.raises(ReaderError, match="audio"):
        read_dataset("audiocaps", audiocaps_root, name="ac", modality="image", progress=False)


def test_clotho(tmp_path: Path):
    root = tmp_path / "clotho"
    root.mkdir()
    for part in ("development", "evaluation"):
        shutil.copy(FIXTURES / f"clotho_captions_{part}.csv", root / f"clotho_captions_{part}.csv")
    write_audio(root / "development" / "Distorted AM Radio noise.wav", 200.0, sr=44100, fmt="FLAC")
    write_audio(root / "development" / "Footsteps, gravel.wav", 250.0)
    write_audio(root / "evaluation" / "birds.wav", 3000.0, fmt="OGG")
    ds = read_dataset("clotho", root, name="clotho", progress=False)
    assert_consistent(ds)
    assert media_count(ds, "audio") == 3
    assert pairs_by_split(ds) == {"test": 5, "train": 9}
    assert len({p.group_id for p in ds.pairs}) == 3
    assert ds.quarantine_counts() == {"empty_caption": 1, "malformed": 1, "missing": 1}
    assert pairs_by_split(read_dataset("clotho", root, name="c", split="evaluation", progress=False)) == {
        "test": 5
    }


def test_readers_registry():
    assert set(READERS) >= {"manifest", "coco", "karpathy", "webdataset", "audiocaps", "clotho"}


# ------------------------------------------------------------------------------------------------ workers


def test_workers_give_the_same_dataset(manifest_root: Path, audiocaps_root: Path, tmp_path: Path):
    """Probing on threads changes nothing in the result: same media (same order), pairs and quarantine."""
    coco = tmp_path / "coco"
    coco.mkdir()
    shutil.copy(FIXTURES / "captions_val2017.json", coco / "captions_val2017.json")
    for i in (1, 2, 3, 5):
        write_image(coco / "val2017" / f"{i:012d}.jpg", colour(i), fmt="JPEG")
    cases = [
        ("manifest", manifest_root, {"limits": MediaLimits(max_bytes=20_000)}),
        ("audiocaps", audiocaps_root, {}),
        ("coco", coco, {}),
    ]
    for kind, root, kw in cases:
        one = read_dataset(kind, root, name="w", progress=False, **kw)
        many = read_dataset(kind, root, name="w", progress=False, workers=4, **kw)
        assert list(many.media) == list(one.media), kind
        assert many == one, kind
        assert len(one.pairs) > 0 and len(one.quarantine) > 0


def test_prefetch_chunks_many_rows(tmp_path: Path):
    root = tmp_path / "many"
    lines = ["image,caption"]
    for i in range(300):  # more than one prefetch chunk
        if i % 3 == 0:
            write_image(root / f"{i}.png", colour(i))
        lines.append(f"{i // 3 * 3}.png,caption {i}")
    lines.append("../escape.png,out")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    ds = read_dataset("manifest", root, name="m", workers=3, progress=False)
    assert media_count(ds, "image") == 100 and len(ds.pairs) == 300
    assert ds.quarantine_counts() == {"outside_root": 1}
