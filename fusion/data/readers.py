"""One entry point for every user-brought dataset format: `read_dataset(kind, root, name=...)` -> Dataset.

Kinds (READERS): manifest (csv/tsv/jsonl/json/parquet), coco, karpathy, webdataset, audiocaps, clotho.
Each reader resolves media under `root` (refusing paths that leave it), probes every file with
fusion.media, and quarantines bad rows with a reason (fusion.data.builder.REASONS) while keeping
the good ones. Options beyond the common ones go to the format's reader (see its module).

    from fusion.data.readers import read_dataset
    ds = read_dataset("manifest", "data/pets", name="pets", file="pairs.csv", license="CC-BY-4.0")
    print(ds.summary(), ds.quarantine_counts())
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fusion.data.audio_captions import read_audiocaps, read_clotho
from fusion.data.builder import REASONS, DatasetBuilder, ReaderError, default_splits
from fusion.data.canonical import Dataset
from fusion.data.coco import read_coco, read_karpathy
from fusion.data.manifest import read_manifest
from fusion.data.webdataset import read_webdataset
from fusion.media import MediaLimits

READERS: dict[str, Callable[..., Dataset]] = {
    "manifest": read_manifest,
    "coco": read_coco,
    "karpathy": read_karpathy,
    "webdataset": read_webdataset,
    "audiocaps": read_audiocaps,
    "clotho": read_clotho,
}
ALIASES = {
    "csv": "manifest",
    "tsv": "manifest",
    "jsonl": "manifest",
    "parquet": "manifest",
    "wds": "webdataset",
}


def read_dataset(
    kind: str,
    root: str | Path,
    *,
    name: str,
    split: str | None = None,
    modality: str | None = None,
    limits: MediaLimits | None = None,
    progress: bool = True,
    **options: Any,
) -> Dataset:
    """Reads the dataset at `root` in format `kind` into the canonical Dataset.

    split: for formats that carry splits, read only that one; otherwise every pair gets it (without
    it, pairs with no split get a default by group, seeded by `seed`). modality: "image"/"audio" or
    None (from the format, else sniffed per file). options: license (default "unknown"), source,
    seed, probe, workers (threads that read and probe files ahead), val_fraction, test_fraction,
    extract_to, plus the format's own (file, annotations,
    images_dir, shards, csv_files, audio_dir, filename, column names ...).
    """
    key = ALIASES.get(kind, kind)
    reader = READERS.get(key)
    if reader is None:
        raise ReaderError(f"unknown dataset kind {kind!r}; known: {sorted({*READERS, *ALIASES})}")
    if modality is not None:
        options["modality"] = modality
    return reader(root, name=name, split=split, limits=limits, progress=progress, **options)


__all__ = [
    "READERS",
    "REASONS",
    "DatasetBuilder",
    "ReaderError",
    "default_splits",
    "read_audiocaps",
    "read_clotho",
    "read_coco",
    "read_dataset",
    "read_karpathy",
    "read_manifest",
    "read_webdataset",
]
