"""Every Lance table of the lake, its name and its Arrow schema: the one definition the glue writes
with, the DuckDB catalog's views are derived from, and the tests check the written tables against.

    media__{dataset}                one row per unique item (image, audio or text), key media_id
    pairs__{dataset}                media_id <-> caption_id, split, group, concept, source, license
    quarantine__{dataset}           every rejected input with its stage and reason (and, from
                                    extraction, the encoder fingerprint that failed)
    latents__{dataset}__{encoder}   media_id, vector (fixed-size list<float32>[dim]), fingerprint
    curated__{experiment}           the selected pairs of an experiment (val and test whole)
    metrics                         one row per (experiment, scored dataset, gallery, seed, metric);
                                    seed null: the mean and std over the experiment's seeds
    embeddings__{experiment}__{side}  every item of one side of an experiment's shared space:
                                    media_id, dataset, vector (list<float32>[d_shared], unit length),
                                    the source latents' fingerprint, the model and inputs hashes, and
                                    what a search shows (path, text, captions); pipelines.embed
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pyarrow as pa

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_UTC = pa.timestamp("us", tz="UTC")

MEDIA = pa.schema(
    [
        ("media_id", pa.string()),
        ("modality", pa.string()),
        ("path", pa.string()),
        ("data", pa.large_binary()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("license", pa.string()),
        ("size_bytes", pa.int64()),
        ("ingested_at", _UTC),
    ]
)
PAIRS = pa.schema(
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
QUARANTINE = pa.schema(
    [
        ("dataset", pa.string()),
        ("stage", pa.string()),  # 'ingest' or 'extract:{encoder}'
        ("source", pa.string()),
        ("item", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        # Extraction's rows: the fingerprint of the encoder that failed on the item (null at ingest). A
        # run with another fingerprint retries the item. Tables written before it existed lack it.
        ("fingerprint", pa.string()),
    ]
)
CURATED = pa.schema(
    [
        ("pair_id", pa.string()),
        ("media_id", pa.string()),
        ("caption_id", pa.string()),
        ("split", pa.string()),
        ("group_id", pa.string()),
        ("concept", pa.string()),
        ("quality", pa.float64()),
    ]
)
METRICS = pa.schema(
    [
        ("experiment", pa.string()),
        ("family", pa.string()),
        ("variable", pa.string()),
        ("method", pa.string()),  # adapters or a baseline (evaluation.baselines)
        ("dataset", pa.string()),  # the dataset scored: the experiment's own, or another zero-shot
        ("split", pa.string()),
        ("gallery", pa.string()),  # pooled, or per_<column>: one gallery per source/group, averaged
        ("seed", pa.int64()),  # null on the rows that aggregate every seed
        ("metric", pa.string()),
        ("value", pa.float64()),  # a seed's value, or the mean over seeds
        ("std", pa.float64()),  # standard deviation over seeds (aggregate rows; 0 for one seed)
        ("n_seeds", pa.int64()),
        ("mlflow_run_id", pa.string()),
        ("inputs_hash", pa.string()),
        ("created_at", _UTC),
        ("fingerprint_media", pa.string()),
        ("fingerprint_text", pa.string()),
    ]
)


# ranks: the rank of each test query's first correct answer, per experiment, scored dataset, gallery,
# group_name (the gallery's group for per-group scoring, "" for the pooled gallery), seed and direction;
# what a paired comparison of two experiments on the same queries reads (evaluation.significance).
RANKS = pa.schema(
    [
        ("experiment", pa.string()),
        ("dataset", pa.string()),
        ("split", pa.string()),
        ("gallery", pa.string()),
        ("group_name", pa.string()),
        ("seed", pa.int64()),
        ("direction", pa.string()),  # t2i (a text query) or i2t (an item query)
        ("query", pa.string()),  # the query's caption_id (t2i) or media_id (i2t)
        ("concept", pa.string()),  # the query's concept (null where the dataset has none): what is resampled
        ("rank", pa.int64()),  # 1-based
        ("inputs_hash", pa.string()),  # the evaluation key of the metrics rows written with it
        ("created_at", _UTC),
    ]
)


def latents(dim: int) -> pa.Schema:
    """latents__{dataset}__{encoder}: one row per encoded item."""
    return pa.schema(
        [
            ("media_id", pa.string()),
            ("vector", pa.list_(pa.float32(), dim)),
            ("fingerprint", pa.string()),
            ("encoder", pa.string()),
        ]
    )


def embeddings(dim: int) -> pa.Schema:
    """embeddings__{experiment}__{side}: one row per item of that side, in the shared space.

    fingerprint: the encoder fingerprint of the latents the row was made from; model_hash: the
    checkpoint that mapped it (a search refuses rows of another); inputs_hash: the data version of
    the whole table (pipelines.embed). path (media items) and text (text items) and captions (the
    texts paired with a media item) are copied from media/pairs so a search reads one table."""
    return pa.schema(
        [
            ("media_id", pa.string()),
            ("dataset", pa.string()),
            ("vector", pa.list_(pa.float32(), dim)),
            ("fingerprint", pa.string()),
            ("model_hash", pa.string()),
            ("inputs_hash", pa.string()),
            ("path", pa.string()),
            ("text", pa.string()),
            ("captions", pa.list_(pa.string())),
        ]
    )


# Kind -> (number of name parts after the kind, schema or None where the vector width varies).
KINDS: dict[str, tuple[int, pa.Schema | None]] = {
    "media": (1, MEDIA),
    "pairs": (1, PAIRS),
    "quarantine": (1, QUARANTINE),
    "latents": (2, None),
    "curated": (1, CURATED),
    "metrics": (0, METRICS),
    "ranks": (0, RANKS),
    # An experiment's train pairs joined with their latents (x, y[, groups]), written when its train
    # split is large enough to stream (pipelines.train, pipelines.stream); rewritten on every training.
    "trainpairs": (1, None),
    # One side of an experiment's shared space (pipelines.embed), searched by pipelines.search.
    "embeddings": (2, None),
}


def table_name(kind: str, *parts: str) -> str:
    """`kind__part1__part2` after checking the kind and that each part is a safe identifier."""
    if kind not in KINDS:
        raise ValueError(f"unknown table kind {kind!r}; known: {sorted(KINDS)}")
    if len(parts) != KINDS[kind][0]:
        raise ValueError(f"a {kind} table is named by {KINDS[kind][0]} part(s), got {parts!r}")
    for p in parts:
        if not _NAME.match(p) or "__" in p:
            raise ValueError(f"invalid table name part {p!r}: letters, digits, '_', '-', '.' only, no '__'")
    return "__".join((kind, *parts))


def parse_table_name(name: str) -> tuple[str, tuple[str, ...]] | None:
    """(kind, parts) of a pipeline table name, or None for a table the pipeline does not write."""
    kind, *parts = name.split("__")
    if kind not in KINDS or len(parts) != KINDS[kind][0]:
        return None
    return kind, tuple(parts)


def schema_of(name: str, dim: int | None = None) -> pa.Schema:
    """The schema a pipeline table must have; latents and embeddings tables need their vector `dim`."""
    parsed = parse_table_name(name)
    if parsed is None:
        raise ValueError(f"{name!r} is not a table the pipeline writes")
    schema = KINDS[parsed[0]][1]
    if schema is not None:
        return schema
    if dim is None:
        raise ValueError(f"the schema of {name!r} depends on the vector dimension: pass dim")
    return embeddings(dim) if parsed[0] == "embeddings" else latents(dim)


def table_of(schema: pa.Schema, rows: Sequence, **columns) -> pa.Table:
    """A table of `schema` with one row per object of `rows`, each field read from the attribute of the
    same name; `columns` gives the fields the objects lack (a list, one value per row, or one value for
    every row)."""
    data = {}
    for name in schema.names:
        if name in columns:
            value = columns[name]
            data[name] = value if isinstance(value, list) else [value] * len(rows)
        else:
            data[name] = [getattr(r, name) for r in rows]
    return pa.table(data, schema=schema)
