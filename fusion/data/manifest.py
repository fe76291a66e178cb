"""Read a user's manifest (CSV, TSV, JSONL, JSON list or Parquet) of media paths and captions into a Dataset.

One row per pair: a media path relative to the dataset root, a caption (in JSONL/JSON/Parquet also a
list of captions), and optionally a split, a group and a concept. Default column names: media path in
the first of `media`, `image`, `audio`, `path`, `file`, `file_name`, `filename`; caption in `caption`;
`split`, `group`, `concept`. A column named `image` or `audio` also fixes the modality, which is
otherwise taken from the `modality` argument or sniffed from each file's magic bytes.

    from fusion.data.manifest import read_manifest
    ds = read_manifest("data/pets", name="pets", file="pairs.csv")
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fusion.data.builder import DatasetBuilder, ReaderError, normalise_split
from fusion.data.canonical import Dataset

MEDIA_COLUMNS = ("media", "image", "audio", "path", "file", "file_name", "filename")
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".json", ".parquet")

# (label, row or None, detail): a None row is malformed and carries the reason in detail.
Rows = Iterator[tuple[str, dict[str, Any] | None, str]]


def iter_csv(path: Path, delimiter: str = ",") -> Rows:
    """Rows of a CSV file as dicts; rows with too many or too few fields come back as malformed."""
    try:
        f = open(path, newline="", encoding="utf-8-sig")  # noqa: SIM115 (closed by the with below)
    except OSError as e:
        raise ReaderError(f"cannot open {path}: {e}") from None
    with f:
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            header = reader.fieldnames
        except (UnicodeDecodeError, csv.Error) as e:
            raise ReaderError(f"{path} has no readable header: {e}") from None
        if not header:
            raise ReaderError(f"{path} is empty (no header row)")
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except (UnicodeDecodeError, csv.Error) as e:
                # The csv module cannot resynchronise after a decoding error; the rest of the file is lost.
                yield f"{path.name}:{reader.line_num + 1}", None, f"unreadable from here on: {e}"
                return
            label = f"{path.name}:{reader.line_num}"
            if None in row:
                yield label, None, f"{len(header) + len(row[None])} fields, header has {len(header)}"
            elif any(v is None for v in row.values()):
                yield label, None, f"fewer fields than the {len(header)} in the header"
            else:
                yield label, row, ""


def csv_header(path: Path, delimiter: str = ",") -> list[str]:
    """The column names of a CSV file (its first row)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return next(csv.reader(f, delimiter=delimiter), [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ReaderError(f"{path} has no readable header: {e}") from None


def iter_jsonl(path: Path) -> Rows:
    """Objects of a JSON-lines file; a line that is not a JSON object comes back as malformed."""
    try:
        f = open(path, encoding="utf-8-sig", errors="strict")  # noqa: SIM115 (closed by the with below)
    except OSError as e:
        raise ReaderError(f"cannot open {path}: {e}") from None
    with f:
        line_no = 0
        while True:
            line_no += 1
            label = f"{path.name}:{line_no}"
            try:
                line = f.readline()
            except UnicodeDecodeError as e:
                yield label, None, f"not UTF-8 from here on: {e}"
                return
            if not line:
                return
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield label, None, f"bad JSON: {e}"
                continue
            if not isinstance(obj, dict):
                yield label, None, f"a JSON {type(obj).__name__}, not an object"
                continue
            yield label, obj, ""


def iter_json_list(path: Path) -> Rows:
    try:
        obj = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        yield path.name, None, f"not a readable JSON file: {e}"
        return
    if isinstance(obj, dict):  # {"rows": [...]} / {"data": [...]}
        lists = [v for v in obj.values() if isinstance(v, list)]
        obj = lists[0] if len(lists) == 1 else obj
    if not isinstance(obj, list):
        yield path.name, None, "expected a JSON list of row objects"
        return
    for i, row in enumerate(obj):
        label = f"{path.name}[{i}]"
        if isinstance(row, dict):
            yield label, row, ""
        else:
            yield label, None, f"a JSON {type(row).__name__}, not an object"


def iter_parquet(path: Path) -> Rows:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError ... for a broken footer
        raise ReaderError(f"{path} is not a readable Parquet file: {e}") from None
    i = 0
    for batch in pf.iter_batches(batch_size=8192):
        for row in batch.to_pylist():
            yield f"{path.name}[{i}]", row, ""
            i += 1


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
    for _, row, _ in islice(iter_manifest(path), sample):
        if row is not None:
            keys.update(dict.fromkeys(row))
    return list(keys)


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
    for label, row, detail in builder.prefetched(
        rows, lambda r: r[1][media_column] if wanted(r[1]) else None
    ):
        if row is None:
            builder.reject(label, "malformed", detail)
            continue
        if media_column not in row or caption_column not in row:
            builder.reject(label, "malformed", f"missing {media_column!r} or {caption_column!r}")
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
