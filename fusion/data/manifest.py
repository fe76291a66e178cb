"""Read a user's manifest (CSV, TSV, JSONL, JSON list or Parquet) of media paths and captions into a Dataset.

One row per pair: a media path relative to the dataset root, a caption (in JSONL/JSON/Parquet also a
list of captions), and optionally a split, a group and a concept. Default column names: media path in
the first of `media`, `image`, `audio`, `path`, `file`, `file_name`, `filename`; caption in `caption`;
`split`, `group`, `concept`. A column named `image` or `audio` also fixes the modality, which is
otherwise taken from the `modality` argument or sniffed from each file's magic bytes.

A bad row costs only itself. CSV/TSV is decoded keeping bytes that are not UTF-8 as lone surrogates,
so the csv module reads on and only the record holding them is refused (`encoding`, with its line);
a quote never closed costs its own line only. JSONL is decoded line by line, Parquet read by row
group. A file that cannot be read at all (no header, broken Parquet footer) is a ReaderError.

    from fusion.data.manifest import read_manifest
    ds = read_manifest("data/pets", name="pets", file="pairs.csv")
"""

from __future__ import annotations

import codecs
import csv
import json
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import IO, Any, NamedTuple

from tqdm.auto import tqdm

from fusion.data.builder import DatasetBuilder, ReaderError, encoding_problem, normalise_split
from fusion.data.canonical import Dataset

MEDIA_COLUMNS = ("media", "image", "audio", "path", "file", "file_name", "filename")
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".json", ".parquet")


class Bad(NamedTuple):
    """A row a reader refuses before it reaches the builder: a REASONS key and a detail naming the line."""

    reason: str
    detail: str


# (label, row): the label names the file and line (or index); a refused row comes as Bad.
Rows = Iterator[tuple[str, dict[str, Any] | Bad]]

# The csv module refuses a field over 128 KiB with an error it cannot read past. A field is never
# larger than its file, so the limit protects nothing; an oversized caption is one refused row instead.
_CSV_FIELD_LIMIT = 2**31 - 1


# ----------------------------------------------------------------------------------------------- CSV


class _LineFeed:
    """The lines of a text file for csv.reader, numbered from 1; lines given back are read again first."""

    def __init__(self, f: IO[str]) -> None:
        self._f = f
        self._back: deque[str] = deque()
        self.number = 0  # of the last line handed out
        self.taken: list[str] = []  # lines handed out since mark()

    def __iter__(self) -> _LineFeed:
        return self

    def __next__(self) -> str:
        line = self._back.popleft() if self._back else next(self._f)
        self.number += 1
        self.taken.append(line)
        return line

    def mark(self) -> None:
        self.taken = []

    def give_back(self, lines: list[str]) -> None:
        self._back.extendleft(reversed(lines))
        self.number -= len(lines)


@dataclass
class _Record:
    first: int  # line number of its first line
    fields: list[str] | None  # None after a CSV syntax error, told in `error`
    lines: list[str]
    error: str = ""


def _records(feed: _LineFeed, delimiter: str) -> Iterator[_Record]:
    """The non-blank CSV records of `feed`, with the lines each took; a syntax error ends one record."""
    if csv.field_size_limit() < _CSV_FIELD_LIMIT:
        csv.field_size_limit(_CSV_FIELD_LIMIT)  # process-wide; only ever raised
    reader = csv.reader(feed, delimiter=delimiter, strict=True)
    while True:
        feed.mark()
        first = feed.number + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield _Record(first, None, feed.taken, str(e))
            reader = csv.reader(feed, delimiter=delimiter, strict=True)
            continue
        if fields:
            yield _Record(first, fields, feed.taken)


def _open_text(path: Path) -> IO[str]:
    """`path` as text: UTF-8 (a BOM is dropped), bytes that are not UTF-8 kept as lone surrogates."""
    try:
        return open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")
    except OSError as e:
        raise ReaderError(f"cannot open {path}: {e}") from None


def _undecodable(rec: _Record, header: list[str] | None = None) -> str | None:
    """Where the first byte that is not UTF-8 sits in a record (line, character, field), or None."""
    for i, line in enumerate(rec.lines):
        why = encoding_problem(line, f"line {rec.first + i}")
        if why is not None:
            fields = zip(header or [], rec.fields or [], strict=False)
            column = next((name for name, v in fields if encoding_problem(v) is not None), None)
            return why if column is None else f"{why} (field {column!r})"
    return None


def _header(path: Path, rec: _Record | None) -> list[str]:
    if rec is None:
        raise ReaderError(f"{path} is empty (no header row)")
    if rec.fields is None:
        raise ReaderError(f"{path} has no readable header: {rec.error}")
    bad = _undecodable(rec)
    if bad is not None:
        raise ReaderError(f"{path} has no readable header: {bad}")
    return rec.fields


def iter_csv(path: Path, delimiter: str = ",") -> Rows:
    """Rows of a CSV file as dicts keyed by the header; each bad record is refused alone.

    A record with bytes that are not UTF-8 is refused as `encoding`; one with too many or too few
    fields, or a CSV syntax error, as `malformed`. When such a record spans several lines (an
    opening quote never closed swallows the lines after it), only its first line is refused and
    reading resumes at the next. Only a header that cannot be read fails the whole file.
    """
    with _open_text(path) as f:
        feed = _LineFeed(f)
        records = _records(feed, delimiter)
        header = _header(path, next(records, None))
        width = len(header)
        for rec in records:
            label = f"{path.name}:{rec.first}"
            if rec.fields is None or len(rec.fields) != width:
                if rec.fields is None:
                    problem = f"CSV syntax error: {rec.error}"
                elif len(rec.fields) > width:
                    problem = f"{len(rec.fields)} fields, header has {width}"
                else:
                    problem = f"{len(rec.fields)} fields, fewer than the {width} in the header"
                if len(rec.lines) > 1:
                    # Its first line opened a quote that never closed: refuse that line, read the rest again.
                    feed.give_back(rec.lines[1:])
                    problem += f"; an unclosed quote? line {rec.first + 1} on is read again"
                yield label, Bad("malformed", f"line {rec.first}: {problem}")
                continue
            bad = _undecodable(rec, header)
            if bad is not None:
                yield label, Bad("encoding", bad)
                continue
            yield label, dict(zip(header, rec.fields, strict=True))


def csv_header(path: Path, delimiter: str = ",") -> list[str]:
    """The column names of a CSV file (its first record); ReaderError when it cannot be read."""
    with _open_text(path) as f:
        return _header(path, next(_records(_LineFeed(f), delimiter), None))


# ----------------------------------------------------------------------------------------------- JSON


def _json_object(text: str) -> dict[str, Any] | Bad:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, an int of 5,000 digits, deep nesting
        return Bad("malformed", f"bad JSON: {type(e).__name__}: {e}")
    if not isinstance(obj, dict):
        return Bad("malformed", f"a JSON {type(obj).__name__}, not an object")
    return obj


def iter_jsonl(path: Path) -> Rows:
    """Objects of a JSON-lines file, decoded line by line: a line that is not UTF-8 or not a JSON
    object is refused alone (`encoding` / `malformed`); blank lines are skipped."""
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed by the with below)
    except OSError as e:
        raise ReaderError(f"cannot open {path}: {e}") from None
    with f:
        for n, raw in enumerate(f, start=1):
            label = f"{path.name}:{n}"
            if n == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                detail = f"line {n}: byte 0x{raw[e.start]:02x} at byte {e.start + 1} is not UTF-8"
                yield label, Bad("encoding", detail)
                continue
            if not line.strip():
                continue
            obj = _json_object(line)
            yield label, Bad(obj.reason, f"line {n}: {obj.detail}") if isinstance(obj, Bad) else obj


def iter_json_list(path: Path) -> Rows:
    """Objects of a JSON file holding a list (or {"rows": [...]}); a broken file is one refused row.

    Bytes that are not UTF-8 inside strings survive decoding as lone surrogates, so only the rows
    holding them are refused (`encoding`, by read_manifest).
    """
    try:
        text = path.read_bytes().removeprefix(codecs.BOM_UTF8).decode("utf-8", "surrogateescape")
    except OSError as e:
        raise ReaderError(f"cannot open {path}: {e}") from None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, a 5,000-digit int, deep nesting
        yield path.name, Bad("malformed", f"not a readable JSON file: {type(e).__name__}: {e}")
        return
    if isinstance(obj, dict):  # {"rows": [...]} / {"data": [...]}
        lists = [v for v in obj.values() if isinstance(v, list)]
        obj = lists[0] if len(lists) == 1 else obj
    if not isinstance(obj, list):
        yield path.name, Bad("malformed", "expected a JSON list of row objects")
        return
    for i, row in enumerate(obj):
        label = f"{path.name}[{i}]"
        if isinstance(row, dict):
            yield label, row
        else:
            yield label, Bad("malformed", f"item {i}: a JSON {type(row).__name__}, not an object")


# ----------------------------------------------------------------------------------------------- Parquet


def _parquet_rows(batch: Any, start: int, name: str) -> Rows:
    """Rows of one record batch; a row whose strings are not UTF-8 is refused alone."""
    try:
        rows = batch.to_pylist()
    except UnicodeDecodeError:
        rows = None
    for k in range(batch.num_rows):
        label = f"{name}[{start + k}]"
        if rows is not None:
            yield label, rows[k]
            continue
        try:
            yield label, batch.slice(k, 1).to_pylist()[0]
        except UnicodeDecodeError as e:
            column = next((c for c in batch.schema.names if not _as_py_ok(batch.column(c), k)), "?")
            detail = f"row {start + k}: field {column!r}: byte 0x{e.object[e.start]:02x} is not UTF-8"
            yield label, Bad("encoding", detail)


def _as_py_ok(column: Any, k: int) -> bool:
    try:
        column[k].as_py()
    except UnicodeDecodeError:
        return False
    return True


def iter_parquet(path: Path) -> Rows:
    """Rows of a Parquet file, by row group: a group that cannot be read is refused as one range."""
    import pyarrow.parquet as pq

    try:
        # Page checksums, where the writer stored them, turn a flipped byte into an error, not a wrong value.
        pf = pq.ParquetFile(path, page_checksum_verification=True)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError ... for a broken footer
        raise ReaderError(f"{path} is not a readable Parquet file: {e}") from None
    start = 0
    for g in range(pf.num_row_groups):
        end = start + pf.metadata.row_group(g).num_rows
        i = start
        batches = pf.iter_batches(batch_size=8192, row_groups=[g])
        while True:
            try:
                batch = next(batches, None)
            except Exception as e:  # a corrupt page: ArrowInvalid, OSError ...
                detail = f"rows {i}-{end - 1} (row group {g}) cannot be read: {type(e).__name__}: {e}"
                yield f"{path.name}[{i}:{end}]", Bad("malformed", detail)
                break
            if batch is None:
                break
            yield from _parquet_rows(batch, i, path.name)
            i += batch.num_rows
        start = end


def iter_manifest(path: Path) -> Rows:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return iter_csv(path)
    if suffix == ".tsv":
        return iter_csv(path, delimiter="\t")
    if suffix in (".jsonl", ".ndjson"):
        return iter_jsonl(path)
    if suffix == ".json":
        return iter_json_list(path)
    if suffix == ".parquet":
        return iter_parquet(path)
    raise ReaderError(f"unknown manifest type {suffix!r} for {path}; expected one of {MANIFEST_SUFFIXES}")


def find_manifest(root: Path, file: str | Path | None) -> Path:
    """The manifest file: `file` (relative to root or absolute), else the single manifest.* in root."""
    if file is not None:
        path = Path(file) if Path(file).is_absolute() else root / file
        if not path.is_file():
            raise ReaderError(f"manifest {path} does not exist")
        return path
    found = [root / f"manifest{s}" for s in MANIFEST_SUFFIXES if (root / f"manifest{s}").is_file()]
    if len(found) != 1:
        what = "no manifest.{csv,tsv,jsonl,json,parquet}" if not found else f"several manifests {found}"
        raise ReaderError(f"{root} has {what}; pass file=...")
    return found[0]


def _peek_columns(path: Path, sample: int = 100) -> list[str]:
    """Column names: the header of a CSV/Parquet file, the keys of the first `sample` JSON rows."""
    if path.suffix.lower() in (".csv", ".tsv"):
        return csv_header(path, "\t" if path.suffix.lower() == ".tsv" else ",")
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except Exception as e:  # ArrowInvalid, OSError ...
            raise ReaderError(f"{path} is not a readable Parquet file: {e}") from None
    keys: dict[str, None] = {}
    for _, row in islice(iter_manifest(path), sample):
        if isinstance(row, dict):
            keys.update(dict.fromkeys(row))
    return list(keys)


def _encoding_problem_in(row: dict[str, Any]) -> str | None:
    """The first string value (or string in a list value) that cannot be stored as UTF-8, told."""
    for key, value in row.items():
        for v in value if isinstance(value, list) else [value]:
            why = encoding_problem(v, f"field {key!r}") if isinstance(v, str) else None
            if why is not None:
                return why
    return None


def read_manifest(
    root: str | Path,
    *,
    name: str,
    file: str | Path | None = None,
    split: str | None = None,
    media_column: str | None = None,
    caption_column: str = "caption",
    split_column: str = "split",
    group_column: str = "group",
    concept_column: str = "concept",
    modality: str | None = None,
    progress: bool = True,
    **common: Any,
) -> Dataset:
    """Reads a manifest into a Dataset; bad rows are quarantined (see fusion.data.builder.REASONS).

    root: the dataset folder (media paths are relative to it); a manifest file path also works, its
    folder is then the root. split: keep only rows of this split; rows with no split get it.
    `common` goes to DatasetBuilder (source, license, limits, probe, seed, val_fraction, test_fraction).
    """
    root = Path(root)
    if root.is_file() and file is None:
        root, file = root.parent, root.name
    if not root.is_dir():
        raise ReaderError(f"dataset root {root} is not a folder")
    path = find_manifest(root, file)
    want = normalise_split(split) if split is not None else None
    if split is not None and want is None:
        raise ReaderError(f"unknown split {split!r}")
    columns = _peek_columns(path)
    if media_column is None:
        media_column = next((c for c in MEDIA_COLUMNS if c in columns), None)
        if media_column is None and columns:
            raise ReaderError(f"{path.name}: no media column among {columns}; pass media_column=...")
    elif columns and media_column not in columns:
        raise ReaderError(f"{path.name}: media column {media_column!r} not among {columns}")
    if columns and caption_column not in columns:
        raise ReaderError(f"{path.name}: caption column {caption_column!r} not among {columns}")
    if modality is None and media_column in ("image", "audio"):
        modality = media_column
    builder = DatasetBuilder(name, root, modality=modality, **common)

    def wanted(row: dict[str, Any]) -> bool:
        """False for a row of another split than the one asked for (unknown names are rejected later)."""
        norm = normalise_split(row.get(split_column))
        return want is None or norm is None or norm == want

    rows = tqdm(iter_manifest(path), desc=f"read {name}", unit="row", leave=False, disable=not progress)
    for label, row in builder.prefetched(
        rows, lambda r: r[1][media_column] if isinstance(r[1], dict) and wanted(r[1]) else None
    ):
        if isinstance(row, Bad):
            builder.reject(label, row.reason, row.detail)
            continue
        if media_column not in row or caption_column not in row:
            builder.reject(label, "malformed", f"missing {media_column!r} or {caption_column!r}")
            continue
        why = _encoding_problem_in(row)
        if why is not None:
            builder.reject(label, "encoding", why)
            continue
        if not wanted(row):
            continue  # not bad, just not asked for
        row_split = row.get(split_column)
        builder.add_pair(
            row[media_column],
            row[caption_column],
            row=label,
            split=row_split if row_split not in (None, "") else want,
            group=row.get(group_column),
            concept=row.get(concept_column) or "",
        )
    return builder.finish()
