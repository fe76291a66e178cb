"""Ingestion: a dataset spec -> the canonical Dataset -> Lance tables media, pairs and quarantine.

Media rows are keyed by content id and only ever inserted (never rewritten), so the latents of an
item stay valid across re-ingestion; items that left the dataset are deleted. Pairs and quarantine
are replaced whole in one commit each.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa

from fusion.data import Dataset
from pipelines.lake import Lake, sql_in, table_name
from pipelines.registries import DatasetSpec

MEDIA_SCHEMA = pa.schema(
    [
        ("media_id", pa.string()),
        ("modality", pa.string()),
        ("path", pa.string()),
        ("data", pa.large_binary()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("license", pa.string()),
        ("size_bytes", pa.int64()),
        ("ingested_at", pa.timestamp("us", tz="UTC")),
    ]
)
PAIRS_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("media_id", pa.string()),
        ("caption_id", pa.string()),
        ("raw_caption_id", pa.string()),
        ("split", pa.string()),
        ("group_id", pa.string()),
        ("concept", pa.string()),
        ("source", pa.string()),
        ("license", pa.string()),
        ("quality", pa.float64()),
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [
        ("dataset", pa.string()),
        ("stage", pa.string()),
        ("source", pa.string()),
        ("item", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)


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

    return pa.table(
        {
            "media_id": [m.media_id for m in rows],
            "modality": [m.modality for m in rows],
            "path": [m.path for m in rows],
            "data": [m.data for m in rows],
            "text": [m.text for m in rows],
            "source": [m.source for m in rows],
            "license": [m.license for m in rows],
            "size_bytes": [size(m) for m in rows],
            "ingested_at": [now] * len(rows),
        },
        schema=MEDIA_SCHEMA,
    )


def pairs_table(ds: Dataset) -> pa.Table:
    p = ds.pairs
    return pa.table(
        {
            "pair_id": [x.pair_id for x in p],
            "media_id": [x.media_id for x in p],
            "caption_id": [x.caption_id for x in p],
            "raw_caption_id": [x.raw_caption_id for x in p],
            "split": [x.split for x in p],
            "group_id": [x.group_id for x in p],
            "concept": [x.concept for x in p],
            "source": [x.source for x in p],
            "license": [x.license for x in p],
            "quality": [x.quality for x in p],
        },
        schema=PAIRS_SCHEMA,
    )


def quarantine_table(dataset: str, stage: str, rows: list) -> pa.Table:
    return pa.table(
        {
            "dataset": [dataset] * len(rows),
            "stage": [stage] * len(rows),
            "source": [r.source for r in rows],
            "item": [r.item for r in rows],
            "reason": [r.reason for r in rows],
            "detail": [r.detail for r in rows],
        },
        schema=QUARANTINE_SCHEMA,
    )


def write_dataset(lake: Lake, name: str, ds: Dataset) -> dict:
    """Writes the three tables; returns counts, quarantine reasons and the Lance versions written."""
    media_t, pairs_t, quar_t = (table_name(kind, name) for kind in ("media", "pairs", "quarantine"))
    existing = lake.ids(media_t)
    new_ids = [i for i in ds.media if i not in existing]
    if new_ids or not lake.exists(media_t):
        lake.append(media_t, media_table(ds, new_ids))
    gone = existing - set(ds.media)
    if gone:
        lake.delete(media_t, sql_in("media_id", sorted(gone)))
    lake.overwrite(pairs_t, pairs_table(ds))
    # Extraction appends its own quarantine rows (stage 'extract'); keep them, replace ingest's.
    kept = (
        lake.read(quar_t, filter="stage != 'ingest'")
        if lake.exists(quar_t)
        else QUARANTINE_SCHEMA.empty_table()
    )
    lake.overwrite(quar_t, pa.concat_tables([quarantine_table(name, "ingest", ds.quarantine), kept]))
    return {
        **ds.summary(),
        "new_media": len(new_ids),
        "removed_media": len(gone),
        "quarantine_reasons": ds.quarantine_counts(),
        "split_seed": ds.split_seed,
        "lance_versions": lake.versions([media_t, pairs_t, quar_t]),
    }
