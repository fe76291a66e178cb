"""Ingestion: a dataset spec -> the canonical Dataset -> Lance tables media, pairs and quarantine.

Media rows are keyed by content id and only ever inserted (never rewritten), so the latents of an
item stay valid across re-ingestion; items that left the dataset are deleted. Pairs are replaced
whole in one commit, and so are ingest's own quarantine rows (other stages' rows are kept).

Each write is one Lance commit, in an order that keeps every pair's media in `media` whenever the
process is killed: new media first, then the pairs, then the media no pair names any more, then the
quarantine. A rerun finishes whatever a killed run left undone.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa

from fusion.data import Dataset
from pipelines import schemas
from pipelines.catalog import Catalog
from pipelines.lake import Lake, sql_in
from pipelines.registries import DatasetSpec
from pipelines.schemas import table_name


def load_dataset(spec: DatasetSpec, cache: Path, progress: bool = True) -> Dataset:
    """Fetches a default-corpus source or reads a user's folder into the canonical form."""
    if spec.source:
        from pipelines.sources import SOURCES

        if spec.source not in SOURCES:
            raise KeyError(f"dataset {spec.name!r}: unknown source {spec.source!r}; known: {sorted(SOURCES)}")
        return SOURCES[spec.source](
            cache / spec.source, limit=spec.limit, seed=spec.seed, progress=progress, **spec.options
        )
    from fusion.data.readers import read_dataset

    return read_dataset(
        spec.reader, spec.root, name=spec.name, modality=spec.modality, progress=progress, **spec.options
    )


def media_table(ds: Dataset, ids: list[str] | None = None) -> pa.Table:
    now = datetime.now(UTC)
    rows = [ds.media[i] for i in (ids if ids is not None else ds.media)]

    def size(m) -> int:
        if m.data is not None:
            return len(m.data)
        if m.text is not None:
            return len(m.text.encode())
        return os.path.getsize(m.path) if os.path.exists(m.path) else -1

    return schemas.table_of(schemas.MEDIA, rows, size_bytes=[size(m) for m in rows], ingested_at=now)


def pairs_table(ds: Dataset) -> pa.Table:
    return schemas.table_of(schemas.PAIRS, ds.pairs)


def quarantine_table(dataset: str, stage: str, rows: list) -> pa.Table:
    """Quarantine rows (objects with source, item, reason, detail) of one dataset and stage."""
    return schemas.table_of(schemas.QUARANTINE, rows, dataset=dataset, stage=stage)


def write_dataset(lake: Lake, name: str, ds: Dataset) -> dict:
    """Writes the three tables; returns counts, quarantine reasons and the Lance versions written.
    The order of the commits is the module's promise: a kill between any two leaves no pair naming a
    missing media row."""
    media_t, pairs_t, quar_t = (table_name(kind, name) for kind in ("media", "pairs", "quarantine"))
    lake.dedupe(media_t, "media_id")  # what overlapping runs of an older version left
    existing = lake.ids(media_t)
    new_ids = [i for i in ds.media if i not in existing]
    if new_ids or not lake.exists(media_t):
        lake.append(media_t, media_table(ds, new_ids), key="media_id")  # once, even if runs overlap
    lake.overwrite(pairs_t, pairs_table(ds))  # every id it names is in media now
    gone = existing - set(ds.media)
    if gone:  # only once no pair names them
        lake.delete(media_t, sql_in("media_id", sorted(gone)))
    # Extraction adds its own quarantine rows (stage 'extract:...') at any time: replace only ingest's.
    lake.overwrite(quar_t, quarantine_table(name, "ingest", ds.quarantine), where="stage = 'ingest'")
    return {
        **ds.summary(),
        "new_media": len(new_ids),
        "removed_media": len(gone),
        "quarantine_reasons": ds.quarantine_counts(),
        "split_seed": ds.split_seed,
        "lance_versions": lake.versions([media_t, pairs_t, quar_t]),
    }


def asset_metadata(name: str, info: dict) -> dict[str, dict]:
    """What each of the three ingest assets reports, from write_dataset's `info`."""
    versions = info["lance_versions"]
    quarantined = info["quarantined"]
    return {
        "media": {
            "unique_media": info["unique_media"],
            "unique_captions": info["unique_captions"],
            "new_media": info["new_media"],
            "removed_media": info["removed_media"],
            "lance_version": versions.get(table_name("media", name)),
        },
        "pairs": {
            "pairs": info["pairs"],
            "concepts": info["concepts"],
            "split_seed": info["split_seed"],
            "lance_version": versions.get(table_name("pairs", name)),
        },
        "quarantine": {
            "quarantined": quarantined,
            "quarantine_rate": quarantined / max(1, quarantined + info["pairs"]),
            "reasons": info["quarantine_reasons"],
            "lance_version": versions.get(table_name("quarantine", name)),
        },
    }


def quarantine_counts(catalog: Catalog, dataset: str) -> tuple[int, int]:
    """(inputs ingest quarantined, pairs kept) of a dataset, in SQL over the lake's views."""
    row = catalog.sql(
        "SELECT (SELECT count(*) FROM quarantine WHERE dataset = $d AND stage = 'ingest') AS bad, "
        "(SELECT count(*) FROM pairs WHERE dataset = $d) AS good",
        {"d": dataset},
    ).to_pylist()[0]
    return int(row["bad"]), int(row["good"])
