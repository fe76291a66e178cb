"""Embed glue: every item of an experiment's shared space, mapped once by its trained model and
stored for search, one Lance table per side. No Dagster here.

    result = embed_space(lake, load_space(models_dir, "emoji-fusemix"))

For each side of the space (pipelines.space) and each dataset with items on it, the latents of that
side's encoder (`latents__{dataset}__{encoder}`; a side "text" takes the captions of every dataset)
are embedded and written to `embeddings__{experiment}__{side}` (pipelines.schemas.embeddings) with
the path, text and paired captions a search shows, so a query reads that one table. Latents of
another encoder fingerprint than the checkpoint's are refused.

A table is rewritten whole (one Lance commit, streamed a batch at a time) when its inputs changed:
the data version (`inputs_digest`) hashes the checkpoint's files and the Lance versions of every
latents, media and pairs table read; an unchanged rerun writes nothing. A table of INDEX_MIN_ROWS
rows or more gets a vector index (IVF_HNSW_SQ, cosine); below that an exact scan takes a few
milliseconds. Queries on an indexed table re-rank the index's candidates on the stored vectors
(`search_params`), which keeps recall@10 at 0.95 or more of exact search
(benchmarks/bench_search.py; tests/pipelines/test_embed.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipelines.lake import Lake, arrow_to_vectors, sql_str
from pipelines.schemas import embeddings, table_name
from pipelines.space import TEXT, SearchError, Space
from pipelines.storage import writing

# Bump when what a row holds changes: every embeddings table is then rewritten.
EMBED_CODE_VERSION = "1"
INDEX_MIN_ROWS = 5_000
INDEX_TYPE = "IVF_HNSW_SQ"
METRIC = "cosine"
# Rows per IVF partition the index aims at (HNSW graph per partition), and the bounds.
ROWS_PER_PARTITION = 3_000
MAX_PARTITIONS = 256
# Candidates re-ranked on the stored vectors per result: the SQ codes' distances are approximate.
REFINE_FACTOR = 4
# Candidates the HNSW graph of each probed partition keeps while it searches (Lance: `ef`).
HNSW_EF = 100
BATCH = 8192


@dataclass(frozen=True)
class Source:
    """One table of latents embedded into side `side`: `dataset`'s latents of the side's encoder."""

    side: str
    dataset: str
    table: str
    fingerprint: str


@dataclass
class EmbedResult:
    """What `embed_space` did: the data version, the Lance versions read, and per side the table,
    its rows, whether it is indexed, its Lance version, the seconds spent and whether it was
    rewritten (`written`); `skipped` when no side was."""

    digest: str
    versions: dict[str, int]
    sides: dict[str, dict] = field(default_factory=dict)
    skipped: bool = False
    seconds: float = 0.0


def embeddings_table(experiment: str, side: str) -> str:
    return table_name("embeddings", experiment, side)


def sources(lake: Lake, space: Space) -> dict[str, list[Source]]:
    """side -> the latents tables it is made of, each checked: present, and every row of the
    fingerprint the checkpoint was trained on (an empty table passes: nothing to embed)."""
    out: dict[str, list[Source]] = {}
    for side, encoder in space.sides.items():
        fingerprint = space.encoders[side].fingerprint
        out[side] = []
        for dataset in space.datasets_of(side):
            table = table_name("latents", dataset, encoder)
            if not lake.exists(table):
                raise SearchError(
                    f"experiment {space.experiment!r} serves dataset {dataset!r}, which has no latents "
                    f"table {table!r} in the lake at {lake.root}; run extract_job for ({dataset}, {encoder})"
                )
            if lake.count(table, f"fingerprint != {sql_str(fingerprint)}"):
                found = sorted(set(lake.read(table, ["fingerprint"])["fingerprint"].to_pylist()))
                raise SearchError(
                    f"experiment {space.experiment!r} was trained on {encoder} latents with fingerprint "
                    f"{fingerprint}, but {table} holds fingerprint(s) {found}; "
                    "re-extract the latents or retrain the experiment"
                )
            out[side].append(Source(side, dataset, table, fingerprint))
    return out


def inputs_digest(lake: Lake, space: Space, srcs: dict[str, list[Source]]) -> tuple[str, dict[str, int]]:
    """(data version, Lance versions read): the checkpoint's files, the sides and datasets, and the
    version of every latents, media and pairs table the tables are made of."""
    tables = {s.table for side in srcs.values() for s in side}
    for dataset in space.datasets:
        tables |= {table_name("media", dataset), table_name("pairs", dataset)}
    versions = lake.versions(sorted(tables))
    record = {
        "code": EMBED_CODE_VERSION,
        "model": space.model_hash,
        "sides": space.sides,
        "datasets": space.datasets,
        "versions": versions,
    }
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    return digest, versions


def wants_index(rows: int, index_min_rows: int = INDEX_MIN_ROWS) -> bool:
    """Whether a table of `rows` rows is indexed (never an empty one)."""
    return rows > 0 and rows >= index_min_rows


def index_partitions(rows: int) -> int:
    """IVF partitions of the index of a table of `rows` rows."""
    return max(1, min(MAX_PARTITIONS, round(rows / ROWS_PER_PARTITION)))


def search_params(indexed: bool) -> dict:
    """The `nearest` options of a query. On an index: Lance's adaptive probing (it starts at about the
    geometric mean of one and all partitions and probes more until it has enough candidates; a fixed
    `nprobes` cut recall@10 to 0.55 for queries far from every cluster, benchmarks/bench_search.py)
    and REFINE_FACTOR x k candidates re-ranked on the stored vectors, so scores are exact; each
    partition's HNSW graph keeps HNSW_EF candidates while it searches (Lance's default kept recall@10
    at 0.958 on the benchmark's text queries, 100 gives 1.000 for 3 ms more). Without an index: an
    exact scan."""
    if not indexed:
        return {"use_index": False}
    return {"refine_factor": REFINE_FACTOR, "ef": HNSW_EF}


# What a search reads of a row (besides Lance's `_distance`).
RESULT_COLUMNS = ("media_id", "dataset", "path", "text", "captions")


def nearest(ds, q: np.ndarray, k: int, *, indexed: bool, rows: int, dataset: str | None = None) -> list[dict]:
    """The k rows of an embeddings table (a lance.LanceDataset) nearest to the unit vector q [D],
    best first, each with its RESULT_COLUMNS and `score` (cosine): through the index when `indexed`
    (search_params), else exact; only rows of `dataset` when given (filtered before the search, so
    k rows come back whenever the dataset has them)."""
    if rows == 0:
        return []
    where = f"dataset = {sql_str(dataset)}" if dataset is not None else None
    found = ds.to_table(
        columns=list(RESULT_COLUMNS),
        nearest={"column": "vector", "q": q, "k": k, "metric": METRIC, **search_params(indexed)},
        filter=where,
        prefilter=where is not None,
    ).to_pylist()
    found.sort(key=lambda r: r["_distance"])  # stable: Lance's order among equal distances
    return [{**{c: r[c] for c in RESULT_COLUMNS}, "score": 1.0 - float(r["_distance"])} for r in found[:k]]


def build_index(lake: Lake, table: str) -> None:
    """The vector index of an embeddings table (replacing any)."""
    ds = lake.open(table)
    ds.create_index(
        "vector",
        INDEX_TYPE,
        metric=METRIC,
        num_partitions=index_partitions(ds.count_rows()),
        replace=True,
    )


def is_current(lake: Lake, space: Space, side: str, digest: str, rows: int, index_min_rows: int) -> bool:
    """Whether `side`'s table holds exactly `rows` rows of data version `digest` in the schema of
    this space's width, indexed if and only if it is large enough."""
    table = embeddings_table(space.experiment, side)
    if not lake.exists(table):
        return False
    ds = lake.open(table)
    if not ds.schema.equals(embeddings(space.dim), check_metadata=False):
        return False
    if ds.count_rows() != rows or ds.count_rows(f"inputs_hash != {sql_str(digest)}"):
        return False
    return ds.has_index == wants_index(rows, index_min_rows)


def _details(lake: Lake, dataset: str, side: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """For a text side: ({caption id: text}, {}); for a media side: ({media id: path}, {media id:
    its paired caption texts, in pairs order, without repeats}). Empty where the tables are missing."""
    media_t, pairs_t = table_name("media", dataset), table_name("pairs", dataset)
    if not lake.exists(media_t):
        return {}, {}
    columns = set(lake.open(media_t).schema.names)
    if side == TEXT:
        if "text" not in columns:
            return {}, {}
        rows = lake.read(media_t, ["media_id", "text"], "text IS NOT NULL")
        return dict(zip(rows["media_id"].to_pylist(), rows["text"].to_pylist(), strict=True)), {}
    paths: dict[str, str] = {}
    if "path" in columns:
        rows = lake.read(media_t, ["media_id", "path"], "path IS NOT NULL")
        paths = dict(zip(rows["media_id"].to_pylist(), rows["path"].to_pylist(), strict=True))
    captions: dict[str, list[str]] = {}
    if lake.exists(pairs_t) and "text" in columns:
        texts = _details(lake, dataset, TEXT)[0]
        pairs = lake.read(pairs_t, ["media_id", "caption_id"])
        for mid, cid in zip(pairs["media_id"].to_pylist(), pairs["caption_id"].to_pylist(), strict=True):
            text = texts.get(cid)
            got = captions.setdefault(mid, [])
            if text is not None and text not in got:
                got.append(text)
    return paths, captions


def _batches(
    lake: Lake, space: Space, side: str, srcs: list[Source], digest: str, counter: list[int]
) -> Iterator[pa.RecordBatch]:
    """The rows of `side`'s table, one batch of latents at a time; counts rows into counter[0]."""
    schema = embeddings(space.dim)
    for src in srcs:
        named, captions = _details(lake, src.dataset, side)
        for batch in lake.open(src.table).to_batches(columns=["media_id", "vector"], batch_size=BATCH):
            if batch.num_rows == 0:
                continue
            ids = batch.column("media_id").to_pylist()
            x = arrow_to_vectors(batch.column("vector"))  # [n, d_side]
            if not np.isfinite(x).all():
                raise SearchError(
                    f"{src.table} holds NaN or infinite latents; delete those rows and run extraction again"
                )
            v = space.embed(side, x.copy() if not x.flags.writeable else x)  # [n, D], unit rows
            n = len(ids)
            text = [named.get(m) for m in ids] if side == TEXT else [None] * n
            path = [None] * n if side == TEXT else [named.get(m) for m in ids]
            caps = [[] for _ in ids] if side == TEXT else [captions.get(m, []) for m in ids]
            counter[0] += n
            yield pa.record_batch(
                [
                    pa.array(ids, pa.string()),
                    pa.array([src.dataset] * n, pa.string()),
                    pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1), pa.float32()), space.dim),
                    pa.array([src.fingerprint] * n, pa.string()),
                    pa.array([space.model_hash] * n, pa.string()),
                    pa.array([digest] * n, pa.string()),
                    pa.array(path, pa.string()),
                    pa.array(text, pa.string()),
                    pa.array(caps, pa.list_(pa.string())),
                ],
                schema=schema,
            )


def write_side(
    lake: Lake,
    space: Space,
    side: str,
    srcs: list[Source],
    digest: str,
    index_min_rows: int = INDEX_MIN_ROWS,
) -> dict:
    """Rewrites `side`'s table in one commit, then indexes it if large enough. Returns its table,
    rows, whether indexed, Lance version, seconds and written (True)."""
    t0 = time.perf_counter()
    table = embeddings_table(space.experiment, side)
    counter = [0]
    failed: list[BaseException] = []

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            yield from _batches(lake, space, side, srcs, digest, counter)
        except Exception as err:  # Lance reports it as its own OSError: keep ours to raise
            failed.append(err)
            raise

    reader = pa.RecordBatchReader.from_batches(embeddings(space.dim), batches())
    try:
        lake.overwrite_stream(table, reader)  # one commit: nothing is written when a batch fails
    except OSError:
        if failed:
            raise failed[0] from None
        raise
    indexed = wants_index(counter[0], index_min_rows)
    if indexed:
        build_index(lake, table)
    return {
        "table": table,
        "rows": counter[0],
        "indexed": indexed,
        "lance_version": lake.version(table),
        "seconds": round(time.perf_counter() - t0, 2),
        "written": True,
    }


def embed_space(
    lake: Lake,
    space: Space,
    *,
    force: bool = False,
    index_min_rows: int = INDEX_MIN_ROWS,
    log: Callable[[str], None] | None = None,
) -> EmbedResult:
    """Brings every side's embeddings table of `space` up to date (see the module docstring): sides
    whose table is current are left alone, unless `force`. Raises SearchError for missing latents
    or latents of another encoder, pipelines.storage.StorageError for a full or read-only disk."""
    say = log or (lambda _line: None)
    t0 = time.perf_counter()
    srcs = sources(lake, space)
    digest, versions = inputs_digest(lake, space, srcs)
    result = EmbedResult(digest, versions)
    with writing(lake.root):
        for side, side_srcs in srcs.items():
            rows = sum(lake.count(s.table) for s in side_srcs)
            if not force and is_current(lake, space, side, digest, rows, index_min_rows):
                table = embeddings_table(space.experiment, side)
                result.sides[side] = {
                    "table": table,
                    "rows": rows,
                    "indexed": wants_index(rows, index_min_rows),
                    "lance_version": lake.version(table),
                    "seconds": 0.0,
                    "written": False,
                }
                say(f"{space.experiment}: {side} embeddings are up to date ({rows} rows, inputs {digest})")
                continue
            info = result.sides[side] = write_side(lake, space, side, side_srcs, digest, index_min_rows)
            say(
                f"{space.experiment}: {info['rows']} {side} embeddings written to {info['table']}"
                f"{' and indexed' if info['indexed'] else ''} in {info['seconds']} s"
            )
    result.skipped = not any(info["written"] for info in result.sides.values())
    result.seconds = round(time.perf_counter() - t0, 2)
    return result


def side_counts(lake: Lake, experiment: str, sides) -> dict[str, int]:
    """Rows of each side's embeddings table (0 where there is none)."""
    return {s: lake.count(embeddings_table(experiment, s)) for s in sides}
