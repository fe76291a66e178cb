"""Training pairs streamed from Lance in chunks, for latents larger than memory.

    write_pairs(lake, "pairs_1m", x_chunks)                      # (x, y[, groups]) chunks -> one table
    source = lance_chunks(lake, "pairs_1m", chunk_rows=16384)    # a fusion.trainer ChunkSource
    train_adapters(None, None, adapter, fusemix, train, chunks=source)

The table holds pre-joined pairs: `x` and `y` as fixed-size float32 vectors and, for the masked and
multi-positive losses, `groups` (the int64 keys of each pair's shared positives). Each epoch reads it
in slices of `chunk_rows` rows, the slices in a fresh seeded order; the trainer shuffles within a
slice (and carries a slice's remainder into the next), so one slice at a time is in memory. The
shuffle is therefore local to a slice: rows of one slice meet each other more often than across
slices, which matters only when the table is sorted by something the loss can exploit (write it in
random order, as `write_pairs` callers here do).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa

from fusion.trainer import ChunkSource
from pipelines.lake import Lake, arrow_to_vectors, vectors_to_arrow


def pairs_schema(dx: int, dy: int, k: int | None = None) -> pa.Schema:
    fields = [("x", pa.list_(pa.float32(), dx)), ("y", pa.list_(pa.float32(), dy))]
    if k is not None:
        fields.append(("groups", pa.list_(pa.int64(), k)))
    return pa.schema(fields)


def _arrow_chunk(chunk: tuple[np.ndarray, ...]) -> pa.Table:
    x, y = np.asarray(chunk[0], np.float32), np.asarray(chunk[1], np.float32)
    cols = [vectors_to_arrow(x), vectors_to_arrow(y)]
    groups = chunk[2] if len(chunk) > 2 else None
    if groups is not None:
        g = np.ascontiguousarray(groups, dtype=np.int64)
        cols.append(pa.FixedSizeListArray.from_arrays(pa.array(g.reshape(-1)), g.shape[1]))
    schema = pairs_schema(x.shape[1], y.shape[1], None if groups is None else groups.shape[1])
    return pa.Table.from_arrays(cols, schema=schema)


def write_pairs(lake: Lake, table: str, chunks: Iterable[tuple[np.ndarray, ...]]) -> int:
    """Writes (x, y) or (x, y, groups) chunks as one table, replacing it, one chunk in memory at a
    time, committed once at the end; returns the rows written."""

    def batches() -> Iterator[pa.RecordBatch]:
        for chunk in chunks:
            yield from _arrow_chunk(chunk).to_batches()

    stream = batches()
    first = next(stream, None)
    if first is None:
        raise ValueError(f"no pairs to write to {table}")
    reader = pa.RecordBatchReader.from_batches(first.schema, itertools.chain([first], stream))
    return lake.overwrite_stream(table, reader)


def lance_chunks(lake: Lake, table: str, chunk_rows: int = 16384, seed: int = 0) -> ChunkSource:
    """A ChunkSource over a pairs table (write_pairs): each call is one epoch, slices of `chunk_rows`
    rows in a seeded order that changes every epoch."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    ds = lake.open(table)
    names = ds.schema.names
    if not {"x", "y"} <= set(names):
        raise ValueError(f"{table} is not a pairs table (needs x and y vector columns, has {names})")
    columns = ["x", "y"] + (["groups"] if "groups" in names else [])
    starts = np.arange(0, ds.count_rows(), chunk_rows)
    epochs = itertools.count()

    def source() -> Iterator[tuple[np.ndarray, ...]]:
        order = np.random.default_rng((seed, next(epochs))).permutation(starts)
        for start in order:
            part = ds.to_table(columns=columns, offset=int(start), limit=chunk_rows)
            out = [arrow_to_vectors(part["x"]), arrow_to_vectors(part["y"])]
            if "groups" in columns:
                g = part["groups"].combine_chunks()
                out.append(g.flatten().to_numpy().reshape(len(g), g.type.list_size))
            yield tuple(out)

    return source
