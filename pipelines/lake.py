"""The Lance lake: one folder (or object-store prefix) of Lance tables, one per dataset and stage
(names and schemas: pipelines.schemas).

Writes are atomic per call (a Lance commit); appends in batches make long jobs resumable: a kill
loses at most the batch in flight, and a rerun skips what is already committed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fusion.paths import fusemix_home


def default_lake_root() -> str:
    """Where the Lance tables live unless configured: <FUSEMIX_HOME>/lance."""
    return str(fusemix_home() / "lance")


def sql_str(value: str) -> str:
    """A string literal for a Lance filter, quotes doubled."""
    return "'" + value.replace("'", "''") + "'"


def sql_in(column: str, values) -> str:
    """`column IN ('a', 'b')` for a Lance filter."""
    return f"{column} IN ({', '.join(map(sql_str, values))})"


def vectors_to_arrow(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """[n, d] float array -> fixed_size_list<float32>[d]."""
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    if v.ndim != 2:
        raise ValueError(f"vectors must be 2-D, got shape {v.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1), type=pa.float32()), v.shape[1])


def arrow_to_vectors(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """fixed_size_list<float32>[d] column -> [n, d] float32."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], type=column.type)
    d = column.type.list_size
    if column.null_count:
        raise ValueError(f"{column.null_count} null vectors: every latent row must hold a vector")
    if len(column) == 0:
        return np.zeros((0, d), dtype=np.float32)
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, d).astype(np.float32, copy=False)


class Lake:
    """Reads and writes Lance tables under one root URI (a local path, s3:// or gs://)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = str(root)
        if "://" not in self.root:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def uri(self, table: str) -> str:
        return f"{self.root.rstrip('/')}/{table}.lance"

    def exists(self, table: str) -> bool:
        try:
            lance.dataset(self.uri(table))
        except (ValueError, FileNotFoundError, OSError):
            return False
        return True

    def open(self, table: str) -> lance.LanceDataset:
        try:
            return lance.dataset(self.uri(table))
        except (ValueError, FileNotFoundError, OSError) as err:
            raise LookupError(
                f"lake table {table!r} does not exist at {self.uri(table)}; materialise it first"
            ) from err

    def version(self, table: str) -> int | None:
        return self.open(table).version if self.exists(table) else None

    def count(self, table: str, filter: str | None = None) -> int:
        return self.open(table).count_rows(filter) if self.exists(table) else 0

    def read(self, table: str, columns: list[str] | None = None, filter: str | None = None) -> pa.Table:
        return self.open(table).to_table(columns=columns, filter=filter)

    def overwrite(self, table: str, data: pa.Table) -> int:
        """Replaces the table's contents in one commit (older versions stay readable)."""
        mode = "overwrite" if self.exists(table) else "create"
        return lance.write_dataset(data, self.uri(table), mode=mode).version

    def append(self, table: str, data: pa.Table) -> int:
        """Appends rows in one commit, creating the table if needed."""
        mode = "append" if self.exists(table) else "create"
        return lance.write_dataset(data, self.uri(table), mode=mode).version

    def upsert(self, table: str, data: pa.Table, key: str) -> int:
        """Inserts rows whose key is new and updates the others, in one commit."""
        if not self.exists(table):
            return self.append(table, data)
        ds = self.open(table)
        ds.merge_insert(key).when_matched_update_all().when_not_matched_insert_all().execute(data)
        return lance.dataset(self.uri(table)).version

    def delete(self, table: str, predicate: str) -> int | None:
        if not self.exists(table):
            return None
        ds = self.open(table)
        ds.delete(predicate)
        return lance.dataset(self.uri(table)).version

    def ids(self, table: str, column: str = "media_id", filter: str | None = None) -> set[str]:
        if not self.exists(table):
            return set()
        return set(self.read(table, [column], filter).column(column).to_pylist())

    def vectors(self, table: str, ids: list[str], fingerprint: str | None = None) -> np.ndarray:
        """[len(ids), d] float32 of the `vector` column for these `media_id`s, in their order; raises
        LookupError if any is missing (or, with `fingerprint`, has another fingerprint)."""
        rows = self.read(table, ["media_id", "vector", "fingerprint"])
        if fingerprint is not None:
            rows = rows.filter(pc.equal(rows["fingerprint"], fingerprint))
        index = {m: i for i, m in enumerate(rows["media_id"].to_pylist())}
        missing = [m for m in ids if m not in index]
        if missing:
            raise LookupError(
                f"{len(missing)} of {len(ids)} items have no latent in {table}"
                f"{' with fingerprint ' + fingerprint if fingerprint else ''} (first: {missing[0]}); run extraction"
            )
        vectors = arrow_to_vectors(rows["vector"])
        return vectors[np.fromiter((index[m] for m in ids), dtype=np.int64, count=len(ids))]

    def tables(self) -> list[str]:
        """The tables of a local lake: `*.lance` folders with at least one committed version. A folder
        that a failed first write left without a manifest (a full disk, a kill) is not a table and is
        skipped, so SQL over the rest keeps working."""
        if "://" in self.root:
            raise NotImplementedError("listing tables is supported for local lakes only")
        return sorted(
            p.name[: -len(".lance")]
            for p in Path(self.root).glob("*.lance")
            if p.is_dir() and any((p / "_versions").glob("*.manifest"))
        )

    def versions(self, tables: Iterable[str]) -> dict[str, int]:
        """The current Lance version of each existing table: recorded wherever a table is read."""
        return {t: v for t in tables if (v := self.version(t)) is not None}
