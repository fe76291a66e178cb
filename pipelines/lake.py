"""The Lance lake: one folder (or object-store prefix) of Lance tables, one per dataset and stage
(names and schemas: pipelines.schemas).

Writes are atomic per call (a Lance commit); appends in batches make long jobs resumable: a kill
loses at most the batch in flight, and a rerun skips what is already committed.

Writers may overlap (two runs of one partition, a manual run beside the sensor's). Every write is
retried with backoff when Lance reports a conflicting commit, and a table that another writer
created meanwhile is written to, not created again. Keyed writes (`append(key=...)`, `upsert`)
keep one row per key whatever the interleaving: Lance checks keys only against the version a
writer read, so two writers can insert the same new key; a writer whose commit was not the next
version after its read removes the surplus rows of its keys (`dedupe`) before it returns.
`overwrite(where=...)` replaces only the rows a filter selects, so rows other writers own or add
meanwhile are kept.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lance.commit import CommitConflictError

from fusion.paths import fusemix_home


def default_lake_root() -> str:
    """Where the Lance tables live unless configured: $FUSEMIX_LAKE (a folder or an object-store
    prefix such as s3://bucket/lake), else <FUSEMIX_HOME>/lance."""
    return os.environ.get("FUSEMIX_LAKE") or str(fusemix_home() / "lance")


def is_object_store(root: str) -> bool:
    """True for a URI with a scheme (s3://, gs://, az://, memory://); False for a local folder."""
    return "://" in str(root) and not str(root).startswith("file://")


# Where the S3 endpoint of an S3-compatible store (MinIO, moto, Ceph, R2) is named, first found wins:
# the AWS SDKs' variables, then object_store's own.
_ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT")


def object_store_options(root: str, given: dict[str, str] | None = None) -> dict[str, str] | None:
    """The Lance (object_store) options for a lake at `root`: for s3:// the endpoint, region and
    credentials from the environment (the standard AWS variables; `allow_http` when the endpoint is
    plain http, as a local MinIO or moto is), with `given` (the LanceLake resource's
    `storage_options`) taking precedence. None for a local lake. Credentials are read at run time and
    never written to the lake, the configs or the logs."""
    if not is_object_store(root):
        return None
    options: dict[str, str] = {}
    if str(root).startswith(("s3://", "s3a://")):
        endpoint = next((os.environ[v] for v in _ENDPOINT_VARS if os.environ.get(v)), None)
        if endpoint:
            options["aws_endpoint"] = endpoint
        env = {
            "aws_region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
            "aws_access_key_id": os.environ.get("AWS_ACCESS_KEY_ID"),
            "aws_secret_access_key": os.environ.get("AWS_SECRET_ACCESS_KEY"),
            "aws_session_token": os.environ.get("AWS_SESSION_TOKEN"),
        }
        options.update({k: v for k, v in env.items() if v})
    options.update({str(k): str(v) for k, v in (given or {}).items()})
    if options.get("aws_endpoint", "").startswith("http://"):
        options.setdefault("allow_http", "true")
    return options


def sql_str(value: str) -> str:
    """A string literal for a Lance filter, quotes doubled."""
    return "'" + value.replace("'", "''") + "'"


def sql_in(column: str, values) -> str:
    """`column IN ('a', 'b')` for a Lance filter."""
    return f"{column} IN ({', '.join(map(sql_str, values))})"


T = TypeVar("T")

# What Lance (pylance 14) says when a commit lost a race: a retryable preemption, a transaction
# incompatible with one committed meanwhile (e.g. an overwrite), or its own retries used up. They
# arrive as OSError (lance.commit.CommitConflictError where Lance raises its own type); redoing the
# whole operation against the new version resolves each of them.
_CONFLICT_MESSAGES = ("commit conflict", "incompatible transaction", "too many concurrent writers")
_ALREADY_EXISTS = "dataset already exists"
# Row ids per delete commit when removing duplicates.
_DELETE_CHUNK = 4096


def is_commit_conflict(err: BaseException) -> bool:
    """True for Lance's errors that mean another writer committed first (worth redoing the write)."""
    if isinstance(err, CommitConflictError):
        return True  # even a non-retryable one: the retry redoes the whole write from a fresh read
    return isinstance(err, OSError) and any(m in str(err).lower() for m in _CONFLICT_MESSAGES)


def _already_exists(err: BaseException) -> bool:
    return isinstance(err, OSError) and _ALREADY_EXISTS in str(err).lower()


def _keys(key: str | Sequence[str]) -> list[str]:
    return [key] if isinstance(key, str) else list(key)


def _first_per_key(data: pa.Table, keys: list[str]) -> pa.Table:
    """`data` without the later rows of a repeated key (Lance's merge rejects a repeated source key)."""
    if len(data) < 2:
        return data
    seen: set[tuple] = set()
    keep = []
    for i, k in enumerate(zip(*(data[c].to_pylist() for c in keys), strict=True)):
        if k not in seen:
            seen.add(k)
            keep.append(i)
    return data if len(keep) == len(data) else data.take(pa.array(keep, type=pa.int64()))


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
    """Reads and writes Lance tables under one root URI (a local path, s3:// or gs://).

    `retries` and `backoff_s`: how often and how patiently a write that lost a commit race is redone
    (the wait doubles from `backoff_s`, with jitter, up to 2 s). `conflicts` counts the redone writes.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        retries: int = 8,
        backoff_s: float = 0.05,
        storage_options: dict[str, str] | None = None,
    ) -> None:
        self.root = str(root)
        self.retries = retries
        self.backoff_s = backoff_s
        self.conflicts = 0
        self.options = object_store_options(self.root, storage_options)
        if not is_object_store(self.root):
            Path(self.root.removeprefix("file://")).mkdir(parents=True, exist_ok=True)

    def _dataset(self, table: str) -> lance.LanceDataset:
        return lance.dataset(self.uri(table), storage_options=self.options)

    def _write(self, data: pa.Table | pa.RecordBatchReader, table: str, mode: str) -> lance.LanceDataset:
        return lance.write_dataset(data, self.uri(table), mode=mode, storage_options=self.options)

    def uri(self, table: str) -> str:
        return f"{self.root.rstrip('/')}/{table}.lance"

    def exists(self, table: str) -> bool:
        try:
            self._dataset(table)
        except (ValueError, FileNotFoundError, OSError):
            return False
        return True

    def open(self, table: str) -> lance.LanceDataset:
        try:
            return self._dataset(table)
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

    # -- writes --------------------------------------------------------------------------------

    def _retry(self, write: Callable[[], T]) -> T:
        """Runs `write` (which must read what it needs itself) until no concurrent commit beats it."""
        for attempt in range(self.retries + 1):
            try:
                return write()
            except OSError as err:
                if attempt == self.retries or not is_commit_conflict(err):
                    raise
                self.conflicts += 1
                wait = min(2.0, self.backoff_s * 2**attempt)
                time.sleep(wait * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def create(self, table: str, schema: pa.Schema) -> bool:
        """Creates an empty table unless it exists; False when it existed (or another writer made it
        meanwhile: two first writes both go on to write into the one table)."""
        if self.exists(table):
            return False
        try:
            self._write(schema.empty_table(), table, "create")
        except OSError as err:
            if _already_exists(err) or is_commit_conflict(err):
                return False
            raise
        return True

    def overwrite(self, table: str, data: pa.Table, where: str | None = None) -> int:
        """Replaces the table's contents in one commit (older versions stay readable). With `where`,
        replaces only the rows that filter selects (every row of `data` should match it) in one merge
        commit, keeping the rows outside `where`, those committed meanwhile included; rows of `data`
        that are identical are stored once."""
        if where is not None:
            return self._replace_where(table, data, where)

        return self._write_whole(table, data, "overwrite")

    def append(self, table: str, data: pa.Table, key: str | Sequence[str] | None = None) -> int:
        """Appends rows in one commit, creating the table if needed. With `key` (a column or several),
        only rows whose key is not in the table yet are inserted (never a second row per key, even
        when another writer inserts the same keys at the same time; see the module docstring)."""
        if key is not None:
            return self._merge(table, data, _keys(key), update=False)

        return self._write_whole(table, data, "append")

    def _write_whole(self, table: str, data: pa.Table, mode: str) -> int:
        """One `mode` write ("overwrite" or "append"), creating the table if needed; a table another
        writer created meanwhile is written into rather than created again. Retried on conflicts."""

        def write() -> int:
            try:
                first = "create" if not self.exists(table) else mode
                return self._write(data, table, first).version
            except OSError as err:
                if not _already_exists(err):
                    raise
                return self._write(data, table, mode).version

        return self._retry(write)

    def overwrite_stream(self, table: str, reader: pa.RecordBatchReader) -> int:
        """Replaces the table's contents with a stream of record batches in one commit, holding one
        batch at a time (for tables larger than memory); returns the rows written. Not retried on a
        commit conflict: the stream is read once."""
        mode = "overwrite" if self.exists(table) else "create"
        return self._write(reader, table, mode).count_rows()

    def commit_fragments(self, table: str, fragments: Sequence[str]) -> int:
        """Commits fragments that other processes wrote into the existing `table`
        (lance.fragment.write_fragments, their metadata as JSON) in one Append; returns the rows added.
        Until this commit no reader sees them, so a job that dies before it leaves the table as it was."""
        from lance.fragment import FragmentMetadata

        metadata = [FragmentMetadata.from_json(f) for f in fragments]

        def write() -> int:
            current = self.open(table).version
            lance.LanceDataset.commit(
                self.uri(table),
                lance.LanceOperation.Append(metadata),
                read_version=current,
                storage_options=self.options,
            )
            return sum(m.num_rows for m in metadata)

        return self._retry(write)

    def upsert(self, table: str, data: pa.Table, key: str | Sequence[str]) -> int:
        """Inserts rows whose key is new and updates the others, in one commit; one row per key."""
        return self._merge(table, data, _keys(key), update=True)

    def _merge(self, table: str, data: pa.Table, keys: list[str], update: bool) -> int:
        data = _first_per_key(data, keys)
        self.create(table, data.schema)

        def write() -> tuple[int, bool]:
            ds = self.open(table)
            read = ds.version
            if len(data):
                merge = ds.merge_insert(keys[0] if len(keys) == 1 else keys)
                if update:
                    merge = merge.when_matched_update_all()
                merge.when_not_matched_insert_all().execute(data)
            # Lance matched the keys against version `read`: only a commit between that and ours
            # (its retries included) can have inserted one of them too.
            return ds.version, len(data) > 0 and ds.version != read + 1

        version, raced = self._retry(write)
        if raced:
            few = len(keys) == 1 and len(data) <= _DELETE_CHUNK  # else one scan of the whole table
            filter = sql_in(keys[0], data[keys[0]].to_pylist()) if few else None
            if self.dedupe(table, keys, filter):
                version = self.open(table).version
        return version

    def _replace_where(self, table: str, data: pa.Table, where: str) -> int:
        columns = data.column_names
        data = _first_per_key(data, columns)
        self.create(table, data.schema)

        def write() -> tuple[int, bool]:
            ds = self.open(table)
            read = ds.version
            (
                ds.merge_insert(columns)
                .when_not_matched_insert_all()
                .when_not_matched_by_source_delete(where)
                .execute(data)
            )
            return ds.version, ds.version != read + 1

        version, raced = self._retry(write)
        if raced and self.dedupe(table, columns, where):
            version = self.open(table).version
        return version

    def delete(self, table: str, predicate: str) -> int | None:
        if not self.exists(table):
            return None

        def write() -> int:
            ds = self.open(table)
            ds.delete(predicate)
            return ds.version

        return self._retry(write)

    def dedupe(self, table: str, key: str | Sequence[str], filter: str | None = None) -> int:
        """Deletes all but one row of every key that has several (among the rows `filter` selects);
        returns how many were deleted. The row kept is the one with the lowest row id, so writers
        that dedupe at the same time keep the same row. Heals tables that concurrent writers of
        older versions left with duplicates."""
        keys = _keys(key)
        if not self.exists(table):
            return 0

        def write() -> int:
            ds = self.open(table)
            rows = ds.to_table(columns=keys, filter=filter, with_row_id=True)
            if len(rows) < 2:
                return 0
            distinct = rows.group_by(keys, use_threads=False).aggregate([]).num_rows
            if distinct == len(rows):
                return 0
            kept: dict[tuple, int] = {}
            surplus: list[int] = []
            columns = [rows[c].to_pylist() for c in keys]
            for k, rid in zip(zip(*columns, strict=True), rows["_rowid"].to_pylist(), strict=True):
                first = kept.setdefault(k, rid)
                if rid != first:
                    surplus.append(max(rid, first))
                    kept[k] = min(rid, first)
            for i in range(0, len(surplus), _DELETE_CHUNK):
                ds.delete(f"_rowid IN ({', '.join(map(str, surplus[i : i + _DELETE_CHUNK]))})")
            return len(surplus)

        return self._retry(write)

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
        """The tables of the lake: `*.lance` folders (or prefixes, on an object store) with at least
        one committed version. A folder that a failed first write left without a manifest (a full
        disk, a kill) is not a table and is skipped, so SQL over the rest keeps working."""
        if is_object_store(self.root):
            return self._object_store_tables()
        root = Path(self.root.removeprefix("file://"))
        return sorted(
            p.name[: -len(".lance")]
            for p in root.glob("*.lance")
            if p.is_dir() and any((p / "_versions").glob("*.manifest"))
        )

    def _object_store_tables(self) -> list[str]:
        import pyarrow.fs as pafs

        fs, base = arrow_filesystem(self.root, self.options or {})
        found = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
        names = []
        for info in found:
            name = info.base_name
            if not name.endswith(".lance"):
                continue
            versions = fs.get_file_info(pafs.FileSelector(f"{info.path}/_versions", allow_not_found=True))
            if any(v.base_name.endswith(".manifest") for v in versions):
                names.append(name[: -len(".lance")])
        return sorted(names)

    def versions(self, tables: Iterable[str]) -> dict[str, int]:
        """The current Lance version of each existing table: recorded wherever a table is read."""
        return {t: v for t in tables if (v := self.version(t)) is not None}


def arrow_filesystem(root: str, options: dict[str, str]):
    """(pyarrow filesystem, path inside it) for an object-store lake root, configured from the same
    options Lance gets, so listing the tables sees the store that Lance writes to."""
    import pyarrow.fs as pafs

    scheme, _, rest = root.partition("://")
    if scheme in ("s3", "s3a"):
        endpoint = options.get("aws_endpoint") or options.get("endpoint") or None
        http = None
        if endpoint and "://" in endpoint:
            http, _, endpoint = endpoint.partition("://")
        fs = pafs.S3FileSystem(
            access_key=options.get("aws_access_key_id"),
            secret_key=options.get("aws_secret_access_key"),
            session_token=options.get("aws_session_token"),
            region=options.get("aws_region"),
            endpoint_override=endpoint,
            scheme=http or "https",
        )
        return fs, rest.rstrip("/")
    fs, path = pafs.FileSystem.from_uri(root)
    return fs, path.rstrip("/")
