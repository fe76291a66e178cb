"""Incremental latent extraction into `latents__{dataset}__{encoder}`.

Only media of the encoder's modality without a latent of the encoder's current fingerprint are
encoded; rows of an older fingerprint are deleted first, so a table never mixes encoders. Results
are appended in commits of `commit_every` rows: a kill loses at most the rows not yet committed,
and a rerun encodes exactly the missing ones (no duplicates, no losses).

Two runs of one partition may overlap (a manual materialisation beside the sensor's): each commit
inserts only ids the table does not hold yet (keyed on media_id, quarantine rows on stage and
item), so the table keeps one row per item whichever commits first; a run also removes duplicate
rows that an older version's overlapping runs left before it looks for missing ids.

Files are checked again right before they are encoded, since they may have changed since ingestion:
the stored path must still resolve inside one of the dataset's folders (`roots`; symlinks followed)
and its bytes must still hash to the item's media id (fusion.data.content_id). A file that fails is
quarantined (`outside_root`, `changed`, `missing` ...) and not encoded; the bytes that were hashed are
the bytes that are decoded, so a swap between check and use cannot slip through.

Items that failed (quarantine rows of stage `extract:{encoder}`) are not retried while the encoder's
fingerprint stays the same; the rows record that fingerprint, and a run with another fingerprint
deletes the rows of the old one and tries those items again. A full or read-only disk raises
pipelines.storage.StorageError.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from fusion.data import QuarantineRow, content_id
from fusion.encoders import EncoderSpec, FrozenEncoder, extract
from fusion.media import MediaError, read_bytes, resolve_under
from pipelines import schemas
from pipelines.ingest import dataset_roots, mirror, quarantine_table, upgrade_quarantine
from pipelines.lake import Lake, sql_in, sql_str, vectors_to_arrow
from pipelines.registries import DatasetSpec
from pipelines.remote import is_remote_root
from pipelines.schemas import table_name
from pipelines.storage import writing

# Files whose decoder needs their name, not only their bytes (gzip-compressed SVG): after the check they
# are decoded from the path they were checked at.
_DECODED_BY_NAME = (".svgz",)


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


def extract_stage(encoder_name: str) -> str:
    """The quarantine stage of an encoder's extraction failures."""
    return f"extract:{encoder_name}"


def failed_items(lake: Lake, dataset: str, encoder_name: str, fingerprint: str) -> set[str]:
    """Media ids that extraction with this encoder fingerprint quarantined (not retried by it)."""
    quar_t = table_name("quarantine", dataset)
    if not lake.exists(quar_t) or "fingerprint" not in lake.open(quar_t).schema.names:
        return set()  # a table of an older version: its failures carry no fingerprint and are retried
    stage = sql_str(extract_stage(encoder_name))
    return lake.ids(quar_t, "item", f"stage = {stage} AND fingerprint = {sql_str(fingerprint)}")


def drop_stale_failures(lake: Lake, dataset: str, encoder: FrozenEncoder, want: set[str]) -> tuple[int, int]:
    """Deletes the encoder's quarantine rows that no longer hold: of another fingerprint (or none: an
    older version's), or of items no longer in the dataset. Returns (items to retry, rows deleted)."""
    quar_t = table_name("quarantine", dataset)
    if not lake.exists(quar_t):
        return 0, 0
    stage = f"stage = {sql_str(extract_stage(encoder.spec.name))}"
    has_fp = "fingerprint" in lake.open(quar_t).schema.names
    rows = lake.read(quar_t, ["item", "fingerprint"] if has_fp else ["item"], stage).to_pylist()
    stale = sorted(
        {r["item"] for r in rows if r.get("fingerprint") != encoder.fingerprint or r["item"] not in want}
    )
    if not stale:
        return 0, 0
    upgrade_quarantine(lake, quar_t)
    for i in range(0, len(stale), 4096):
        lake.delete(quar_t, f"{stage} AND {sql_in('item', stale[i : i + 4096])}")
    return len(set(stale) & want), len(stale)


def verified_file(
    media_id: str, path: str, modality: str, roots: Sequence[str | os.PathLike] | None = None
) -> bytes | Path:
    """The content of the media file stored at `path`, checked again: resolved inside one of `roots`
    (when given; symlinks followed) and hashing to `media_id`. Raises MediaError (`outside_root`,
    `missing`, `unreadable`, `changed` ...). Returns the bytes that were hashed, or for a format decoded
    by its name the checked path."""
    target = Path(path)
    if roots:
        resolved = [Path(r).resolve() for r in roots]
        if not target.is_absolute():  # stored relative to the dataset's folder
            target = resolved[0] / target
        root = next((r for r in resolved if target.is_relative_to(r)), None)
        if root is None:
            where = ", ".join(map(str, resolved))
            raise MediaError(media_id, "outside_root", f"{path} is not inside the dataset's folder ({where})")
        target = resolve_under(root, target.relative_to(root), media_id)
    data = read_bytes(target, media_id)
    now = content_id(modality, data)
    if now != media_id:
        raise MediaError(media_id, "changed", f"{target} now holds other content (content id {now})")
    return target if target.suffix.lower() in _DECODED_BY_NAME else data


def media_payloads(
    lake: Lake, media_t: str, ids: list[str], chunk: int = 512
) -> Iterator[tuple[str, object]]:
    """(media_id, payload) with payload the text, the inline bytes, or the file path (a Path)."""
    for i in range(0, len(ids), chunk):
        part = ids[i : i + chunk]
        rows = lake.read(media_t, ["media_id", "path", "data", "text"], sql_in("media_id", part))
        by_id = {r["media_id"]: r for r in rows.to_pylist()}
        for mid in part:
            r = by_id[mid]
            if r["text"] is not None:
                yield mid, r["text"]
            else:
                yield mid, r["data"] if r["data"] is not None else Path(r["path"])


def run_extraction(
    lake: Lake,
    dataset: str,
    encoder: FrozenEncoder,
    *,
    roots: Sequence[str | os.PathLike] | None = None,
    commit_every: int = 512,
    progress: bool = True,
    on_commit: Callable[[dict], None] | None = None,
) -> dict:
    """Encodes what is missing and commits in batches. Returns counts, items/s and the Lance version.

    roots: the folders the dataset's files must lie in (pipelines.ingest.dataset_roots); None skips
    that check (the content hash is always checked). Raises pipelines.storage.StorageError when the
    disk is full or read-only."""
    with writing(lake.root):
        return _run_extraction(lake, dataset, encoder, roots, commit_every, progress, on_commit)


ENGINES = ("in-process", "ray")


def resolve_engine(engine: str = "") -> str:
    """The extraction engine a run uses: `engine`, else $FUSEMIX_EXTRACT_ENGINE, else in-process.
    Raises ValueError for a name that is not in ENGINES."""
    name = (engine or os.environ.get("FUSEMIX_EXTRACT_ENGINE", "") or "in-process").strip().lower()
    if name not in ENGINES:
        raise ValueError(f"unknown extraction engine {name!r}; use one of {', '.join(ENGINES)}")
    return name


# The latents asset's metadata names -> the keys of extract_dataset's summary.
LATENTS_METADATA = {
    "items_encoded": "encoded",
    "items_failed": "failed",
    "items_retried": "retried",
    "items_total": "total",
    "items_per_s": "items_per_s",
    "stale_deleted": "stale_deleted",
    "duplicates_deleted": "duplicates_deleted",
    "dimension": "dim",
    "fingerprint": "fingerprint",
    "lance_version": "lance_version",
}


def latents_metadata(stats: dict, engine: str) -> dict:
    """The latents asset's metadata from extract_dataset's summary, and the engine that ran."""
    return {name: stats[key] for name, key in LATENTS_METADATA.items()} | {"engine": engine}


def extract_dataset(
    lake: Lake,
    dataset: DatasetSpec,
    spec: EncoderSpec,
    build: Callable[[], FrozenEncoder],
    cache: Path,
    *,
    engine: str = "in-process",
    ray: dict | None = None,
    commit_every: int = 512,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """One (dataset, encoder) partition's extraction on `engine`: the media of a dataset in an object
    store mirrored to this machine first, the files checked against the dataset's folders. `build()`
    gives the frozen encoder of the in-process engine; `ray`: the Ray engine's job settings
    (pipelines.ray_extract.RayJob fields). Returns run_extraction's counts."""
    say = log or (lambda _line: None)
    if spec.modality != "text" and is_remote_root(dataset.root):
        mirror(dataset, cache, say)  # the files, on this machine too
    roots = dataset_roots(dataset, cache)
    if engine == "ray":
        from pipelines.ray_extract import run_extraction_ray

        def shard_done(p: dict) -> None:
            say(f"ray: {p['shards_done']}/{p['shards']} shards, {p['encoded']} latents written")

        return run_extraction_ray(lake, dataset.name, spec, roots=roots, on_shard=shard_done, **(ray or {}))
    return run_extraction(
        lake,
        dataset.name,
        build(),
        roots=roots,
        commit_every=commit_every,
        progress=progress,
        on_commit=lambda s: say(f"committed {s['encoded']}/{s['pending']} latents"),
    )


def plan(lake: Lake, dataset: str, encoder: FrozenEncoder) -> tuple[list[str], dict]:
    """What a run of either engine encodes, after the clean-up every run starts with (duplicates of
    overlapping runs, latents of another fingerprint or of media gone, failures of another
    fingerprint), and its starting counts. `encoder` needs only spec, modality and fingerprint."""
    media_t = table_name("media", dataset)
    lat_t = table_name("latents", dataset, encoder.spec.name)
    if not lake.exists(media_t):
        raise LookupError(f"dataset {dataset!r} has not been ingested (no {media_t} table)")
    duplicates = lake.dedupe(lat_t, "media_id")  # left by overlapping runs of an older version
    todo, stale = pending(lake, dataset, encoder)
    want = lake.ids(media_t, filter=f"modality = {sql_str(encoder.modality)}")
    retried, _ = drop_stale_failures(lake, dataset, encoder, want)
    already_failed = failed_items(lake, dataset, encoder.spec.name, encoder.fingerprint)
    todo = [i for i in todo if i not in already_failed]
    stats = {
        "encoded": 0,
        "failed": 0,
        "commits": 0,
        "stale_deleted": stale,
        "duplicates_deleted": duplicates,
        "retried": retried,
        "pending": len(todo),
    }
    return todo, stats


def quarantine_failures(
    lake: Lake, dataset: str, encoder: FrozenEncoder, failures: Sequence[MediaError]
) -> int:
    """Records items the encoder could not encode as quarantine rows of its stage and fingerprint."""
    if not failures:
        return 0
    quar_t = table_name("quarantine", dataset)
    rows = [QuarantineRow(encoder.spec.name, f.media_id, f.reason, f.detail) for f in failures]
    upgrade_quarantine(lake, quar_t)
    table = quarantine_table(dataset, extract_stage(encoder.spec.name), rows, fingerprint=encoder.fingerprint)
    lake.append(quar_t, table, key=["stage", "item"])
    return len(failures)


def summary(lake: Lake, dataset: str, encoder: FrozenEncoder, stats: dict, t0: float) -> dict:
    """A run's counts with its speed, the table's rows and version, the encoder's dim and fingerprint."""
    lat_t = table_name("latents", dataset, encoder.spec.name)
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


def _run_extraction(
    lake: Lake,
    dataset: str,
    encoder: FrozenEncoder,
    roots: Sequence[str | os.PathLike] | None,
    commit_every: int,
    progress: bool,
    on_commit: Callable[[dict], None] | None,
) -> dict:
    media_t = table_name("media", dataset)
    lat_t = table_name("latents", dataset, encoder.spec.name)
    todo, stats = plan(lake, dataset, encoder)

    def load(media_id: str, payload: Any) -> Any:
        if isinstance(payload, Path):
            return verified_file(media_id, str(payload), encoder.modality, roots)
        return payload

    schema = schemas.latents(encoder.dim)
    ids: list[str] = []
    vecs: list[np.ndarray] = []
    failures: list = []
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
        stats["failed"] += quarantine_failures(lake, dataset, encoder, failures)
        if on_commit and (ids or failures):
            on_commit({**stats, "seconds": time.perf_counter() - t0})
        ids, vecs, failures = [], [], []

    batches = extract(
        encoder, media_payloads(lake, media_t, todo), progress=progress, total=len(todo), load=load
    )
    for batch in batches:
        if len(batch.media_ids):
            ids.extend(batch.media_ids)
            vecs.append(batch.vectors)
        failures.extend(batch.failures)
        if len(ids) + len(failures) >= commit_every:
            commit()
    commit()
    lake.create(lat_t, schema)  # nothing to encode at all: an empty table still documents the partition
    return summary(lake, dataset, encoder, stats, t0)
