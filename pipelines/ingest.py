"""Ingestion: a dataset spec -> the canonical Dataset -> Lance tables media, pairs and quarantine.

Media rows are keyed by content id and only ever inserted (never rewritten), so the latents of an
item stay valid across re-ingestion; items that left the dataset are deleted. Pairs are replaced
whole in one commit, and so are ingest's own quarantine rows (other stages' rows are kept).

Each write is one Lance commit, in an order that keeps every pair's media in `media` whenever the
process is killed: new media first, then the pairs, then the media no pair names any more, then the
quarantine. A rerun finishes whatever a killed run left undone.

A table whose new contents equal the stored ones is not written at all, so re-ingesting an unchanged
dataset commits nothing (and works on a read-only lake). A full or read-only disk raises
pipelines.storage.StorageError, one line naming the lake; the tables keep their last committed version.
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
from pipelines.remote import is_remote_root, mirror_dir, sync_mirror
from pipelines.schemas import table_name
from pipelines.storage import writing


def dataset_roots(spec: DatasetSpec, cache: Path) -> list[Path]:
    """The folders a dataset's media files lie in (resolved): a source's folder of the data cache, or a
    reader's root plus its `extract_to` folder. Extraction checks each stored path against them again."""
    if spec.source:
        return [(Path(cache) / spec.source).resolve()]
    if is_remote_root(spec.root):  # an object-store prefix: its local mirror (pipelines.remote)
        return [mirror_dir(cache, spec.root).resolve()]
    roots = [Path(spec.root).resolve()]
    if spec.options.get("extract_to"):
        roots.append(Path(spec.options["extract_to"]).resolve())
    return roots


def mirror(spec: DatasetSpec, cache: Path, log=None) -> Path:
    """Brings the local mirror of a dataset whose root is an object-store prefix up to date (ingest
    and extraction both do, so a fresh machine gets the files) and returns its folder."""
    folder = dataset_roots(spec, cache)[0]
    report = sync_mirror(spec.root, folder)
    if log is not None:
        line = (
            f"{spec.name}: mirrored {spec.root}: {report.fetched} fetched, {report.kept} unchanged, "
            f"{report.removed} removed"
        )
        if report.refused:
            key, why = next(iter(report.refused.items()))
            line += f"; {len(report.refused)} objects not mirrored (first: {key!r}, {why})"
        log(line)
    return folder


def load_dataset(spec: DatasetSpec, cache: Path, progress: bool = True, log=None) -> Dataset:
    """Fetches a default-corpus source or reads a user's folder (or object-store prefix, through its
    local mirror) into the canonical form. `log`: a callable for one line about the mirror."""
    if spec.source:
        from pipelines.sources import SOURCES

        if spec.source not in SOURCES:
            raise KeyError(f"dataset {spec.name!r}: unknown source {spec.source!r}; known: {sorted(SOURCES)}")
        return SOURCES[spec.source](
            dataset_roots(spec, cache)[0], limit=spec.limit, seed=spec.seed, progress=progress, **spec.options
        )
    from fusion.data.readers import read_dataset

    root = mirror(spec, cache, log) if is_remote_root(spec.root) else spec.root
    return read_dataset(
        spec.reader, root, name=spec.name, modality=spec.modality, progress=progress, **spec.options
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


def quarantine_table(dataset: str, stage: str, rows: list, fingerprint: str | None = None) -> pa.Table:
    """Quarantine rows (objects with source, item, reason, detail) of one dataset and stage; extraction
    gives the `fingerprint` of the encoder that refused them."""
    return schemas.table_of(schemas.QUARANTINE, rows, dataset=dataset, stage=stage, fingerprint=fingerprint)


def upgrade_quarantine(lake: Lake, table: str) -> None:
    """Adds the columns of schemas.QUARANTINE that a quarantine table written by an older version lacks
    (all null), so that rows of the current schema can be merged into it. One commit, once."""
    if not lake.exists(table):
        return
    have = set(lake.open(table).schema.names)
    missing = [f for f in schemas.QUARANTINE if f.name not in have]
    if not missing:
        return
    try:
        lake.open(table).add_columns(missing)
    except OSError:
        if {f.name for f in missing} - set(lake.open(table).schema.names):
            raise  # not another writer's upgrade that got there first


def _row_set(table: pa.Table, columns: list[str]) -> set[tuple]:
    """The distinct rows of `table` over `columns` (a column it lacks reads as null)."""
    values = [table[c].to_pylist() if c in table.column_names else [None] * len(table) for c in columns]
    return set(zip(*values, strict=True))


def same_pairs(lake: Lake, table: str, pairs: pa.Table) -> bool:
    """Whether the stored pairs table holds exactly `pairs` (same rows in the same order)."""
    if not lake.exists(table):
        return False
    stored = lake.read(table)
    return stored.schema.equals(pairs.schema) and stored.equals(pairs)


def same_quarantine(lake: Lake, table: str, rows: pa.Table, where: str) -> bool:
    """Whether the stored rows that `where` selects are exactly the distinct rows of `rows` (the
    replacing write stores identical rows once)."""
    if not lake.exists(table):
        return False
    columns = rows.column_names
    return _row_set(lake.read(table, filter=where), columns) == _row_set(rows, columns)


def write_dataset(lake: Lake, name: str, ds: Dataset) -> dict:
    """Writes the three tables; returns counts, quarantine reasons, the tables left as they were and
    the Lance versions. The order of the commits is the module's promise: a kill between any two
    leaves no pair naming a missing media row. A table whose contents would not change is not written.
    Raises pipelines.storage.StorageError on a full or read-only disk."""
    with writing(lake.root):
        return _write_dataset(lake, name, ds)


def _write_dataset(lake: Lake, name: str, ds: Dataset) -> dict:
    media_t, pairs_t, quar_t = (table_name(kind, name) for kind in ("media", "pairs", "quarantine"))
    lake.dedupe(media_t, "media_id")  # what overlapping runs of an older version left
    existing = lake.ids(media_t)
    new_ids = [i for i in ds.media if i not in existing]
    unchanged = []
    if new_ids or not lake.exists(media_t):
        lake.append(media_t, media_table(ds, new_ids), key="media_id")  # once, even if runs overlap
    pairs = pairs_table(ds)
    if same_pairs(lake, pairs_t, pairs):
        unchanged.append(pairs_t)
    else:
        lake.overwrite(pairs_t, pairs)  # every id it names is in media now
    gone = existing - set(ds.media)
    if gone:  # only once no pair names them
        lake.delete(media_t, sql_in("media_id", sorted(gone)))
    # Extraction adds its own quarantine rows (stage 'extract:...') at any time: replace only ingest's.
    quarantine, ours = quarantine_table(name, "ingest", ds.quarantine), "stage = 'ingest'"
    if same_quarantine(lake, quar_t, quarantine, ours):
        unchanged.append(quar_t)
    else:
        upgrade_quarantine(lake, quar_t)
        lake.overwrite(quar_t, quarantine, where=ours)
    if not new_ids and not gone and lake.exists(media_t):
        unchanged.append(media_t)
    return {
        **ds.summary(),
        "new_media": len(new_ids),
        "removed_media": len(gone),
        "quarantine_reasons": ds.quarantine_counts(),
        "split_seed": ds.split_seed,
        "unchanged": unchanged,
        "lance_versions": lake.versions([media_t, pairs_t, quar_t]),
    }


def asset_metadata(name: str, info: dict) -> dict[str, dict]:
    """What each of the three ingest assets reports, from write_dataset's `info`."""
    versions = info["lance_versions"]
    quarantined = info["quarantined"]
    unchanged = set(info.get("unchanged", ()))
    return {
        "media": {
            "unique_media": info["unique_media"],
            "unique_captions": info["unique_captions"],
            "new_media": info["new_media"],
            "removed_media": info["removed_media"],
            "unchanged": table_name("media", name) in unchanged,
            "lance_version": versions.get(table_name("media", name)),
        },
        "pairs": {
            "pairs": info["pairs"],
            "concepts": info["concepts"],
            "split_seed": info["split_seed"],
            "unchanged": table_name("pairs", name) in unchanged,
            "lance_version": versions.get(table_name("pairs", name)),
        },
        "quarantine": {
            "quarantined": quarantined,
            "quarantine_rate": quarantined / max(1, quarantined + info["pairs"]),
            "reasons": info["quarantine_reasons"],
            "unchanged": table_name("quarantine", name) in unchanged,
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
