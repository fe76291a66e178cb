"""Incremental latent extraction into `latents__{dataset}__{encoder}`.

Only media of the encoder's modality without a latent of the encoder's current fingerprint are
encoded; rows of an older fingerprint are deleted first, so a table never mixes encoders. Results
are appended in commits of `commit_every` rows: a kill loses at most the rows not yet committed,
and a rerun encodes exactly the missing ones (no duplicates, no losses).

Two runs of one partition may overlap (a manual materialisation beside the sensor's): each commit
inserts only ids the table does not hold yet (keyed on media_id, quarantine rows on stage and
item), so the table keeps one row per item whichever commits first; a run also removes duplicate
rows that an older version's overlapping runs left before it looks for missing ids.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa

from fusion.data import QuarantineRow
from fusion.encoders import FrozenEncoder, extract
from pipelines import schemas
from pipelines.ingest import quarantine_table
from pipelines.lake import Lake, sql_in, sql_str, vectors_to_arrow
from pipelines.schemas import table_name


def pending(lake: Lake, dataset: str, encoder: FrozenEncoder) -> tuple[list[str], int]:
    """Ids of the dataset's media of the encoder's modality that still need a latent, and how many
    stale rows (another fingerprint, or media no longer in the dataset) were deleted."""
    media_t = table_name("media", dataset)
    lat_t = table_name("latents", dataset, encoder.spec.name)
    want = lake.ids(media_t, filter=f"modality = {sql_str(encoder.modality)}")
    stale = 0
    if lake.exists(lat_t):
        stale = lake.count(lat_t, f"fingerprint != {sql_str(encoder.fingerprint)}")
        if stale:
            lake.delete(lat_t, f"fingerprint != {sql_str(encoder.fingerprint)}")
    have = lake.ids(lat_t)
    gone = have - want  # media that left the dataset since they were encoded
    if gone:
        lake.delete(lat_t, sql_in("media_id", sorted(gone)))
        stale += len(gone)
    return sorted(want - have), stale


def _payloads(lake: Lake, media_t: str, ids: list[str], chunk: int = 512) -> Iterator[tuple[str, object]]:
    """(media_id, payload) with payload the text, the inline bytes, or the file path."""
    for i in range(0, len(ids), chunk):
        part = ids[i : i + chunk]
        rows = lake.read(media_t, ["media_id", "path", "data", "text"], sql_in("media_id", part))
        by_id = {r["media_id"]: r for r in rows.to_pylist()}
        for mid in part:
            r = by_id[mid]
            yield (
                mid,
                r["text"] if r["text"] is not None else (r["data"] if r["data"] is not None else r["path"]),
            )


def run_extraction(
    lake: Lake,
    dataset: str,
    encoder: FrozenEncoder,
    *,
    commit_every: int = 512,
    progress: bool = True,
    on_commit: Callable[[dict], None] | None = None,
) -> dict:
    """Encodes what is missing and commits in batches. Returns counts, items/s and the Lance version."""
    media_t = table_name("media", dataset)
    lat_t = table_name("latents", dataset, encoder.spec.name)
    quar_t = table_name("quarantine", dataset)
    if not lake.exists(media_t):
        raise LookupError(f"dataset {dataset!r} has not been ingested (no {media_t} table)")
    duplicates = lake.dedupe(lat_t, "media_id")  # left by overlapping runs of an older version
    todo, stale = pending(lake, dataset, encoder)
    already_failed = lake.ids(quar_t, "item", f"stage = {sql_str('extract:' + encoder.spec.name)}")
    todo = [i for i in todo if i not in already_failed]
    schema = schemas.latents(encoder.dim)
    ids: list[str] = []
    vecs: list[np.ndarray] = []
    failures: list = []
    stats = {
        "encoded": 0,
        "failed": 0,
        "commits": 0,
        "stale_deleted": stale,
        "duplicates_deleted": duplicates,
        "pending": len(todo),
    }
    t0 = time.perf_counter()

    def commit() -> None:
        nonlocal ids, vecs, failures
        if ids:
            v = np.concatenate(vecs)
            lake.append(
                lat_t,
                pa.table(
                    [
                        pa.array(ids),
                        vectors_to_arrow(v),
                        pa.array([encoder.fingerprint] * len(ids)),
                        pa.array([encoder.spec.name] * len(ids)),
                    ],
                    schema=schema,
                ),
                key="media_id",
            )
            stats["encoded"] += len(ids)
            stats["commits"] += 1
        if failures:
            rows = [QuarantineRow(encoder.spec.name, f.media_id, f.reason, f.detail) for f in failures]
            lake.append(
                quar_t, quarantine_table(dataset, f"extract:{encoder.spec.name}", rows), key=["stage", "item"]
            )
            stats["failed"] += len(failures)
        if on_commit and (ids or failures):
            on_commit({**stats, "seconds": time.perf_counter() - t0})
        ids, vecs, failures = [], [], []

    for batch in extract(encoder, _payloads(lake, media_t, todo), progress=progress, total=len(todo)):
        if len(batch.media_ids):
            ids.extend(batch.media_ids)
            vecs.append(batch.vectors)
        failures.extend(batch.failures)
        if len(ids) + len(failures) >= commit_every:
            commit()
    commit()
    lake.create(lat_t, schema)  # nothing to encode at all: an empty table still documents the partition
    seconds = time.perf_counter() - t0
    return {
        **stats,
        "seconds": round(seconds, 2),
        "items_per_s": round(stats["encoded"] / seconds, 2) if stats["encoded"] and seconds > 0 else 0.0,
        "total": lake.count(lat_t),
        "dim": encoder.dim,
        "fingerprint": encoder.fingerprint,
        "lance_version": lake.version(lat_t),
    }
