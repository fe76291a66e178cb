"""Datasets whose files live in an object store: `root: s3://bucket/prefix` in configs/datasets.yaml.

Ingest first brings the prefix into a local mirror under the data cache (`<cache>/remote/<id>/`, one per
root URI), then reads it with the dataset's reader exactly as a local folder, and extraction checks
and hashes the mirrored bytes with the same root and safety rules as any local dataset (a path must
resolve inside the mirror; a file that changed since ingest is quarantined `changed`).

The mirror is incremental and crash-safe: an object is fetched only when the mirror lacks it or its
size or modification time differs (S3 keeps times to the second: an object rewritten with the same
size within the second it was mirrored is not seen until it changes again), each file lands under a temporary name and is renamed into place, and files whose object
is gone are removed. An object key that could not be a relative path inside the mirror (a `..` or `.`
segment, an empty segment, a NUL or control character) is never written; it is reported, and the
manifest row naming it is then quarantined by the reader like any missing file. Objects larger than
`max_bytes` are not fetched either (the reader quarantines them as missing, with the reason logged).

Credentials and the endpoint come from the same place as the lake's (pipelines.lake.object_store_options:
the standard AWS variables, or `options`).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.lake import arrow_filesystem, is_object_store, object_store_options

# A key segment that is safe as a file name under the mirror.
_BAD_SEGMENT = re.compile(r"[\x00-\x1f\x7f]")
# The reader's own size limit is per media file; objects beyond this are not copied.
DEFAULT_MAX_BYTES = 512 * 1024 * 1024


@dataclass
class MirrorReport:
    fetched: int = 0  # objects copied (new or changed)
    kept: int = 0  # objects already mirrored, unchanged
    removed: int = 0  # mirrored files whose object is gone
    refused: dict[str, str] = field(default_factory=dict)  # object key -> why it was not mirrored


def is_remote_root(root: str | os.PathLike | None) -> bool:
    return root is not None and is_object_store(str(root))


def mirror_dir(cache: str | os.PathLike, root: str) -> Path:
    """The local folder that mirrors `root` (one per normalised URI)."""
    uri = str(root).rstrip("/")
    return Path(cache) / "remote" / hashlib.sha256(uri.encode()).hexdigest()[:16]


def _relative_key(key: str, prefix: str) -> str | None:
    """`key` relative to `prefix`, or None when it is not a safe relative path."""
    rel = key[len(prefix) :].lstrip("/") if prefix else key
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") or _BAD_SEGMENT.search(p) or "\\" in p for p in parts):
        return None
    return rel


def _same(st: os.stat_result, size: int | None, mtime: float | None) -> bool:
    """A mirrored file is current when its size and modification time are the object's."""
    return st.st_size == size and (mtime is None or abs(st.st_mtime - mtime) < 1e-3)


def sync_mirror(
    root: str,
    dest: str | os.PathLike,
    options: dict[str, str] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    chunk: int = 1 << 20,
) -> MirrorReport:
    """Brings `dest` in step with every object under the prefix `root`; returns what it did."""
    import pyarrow.fs as pafs

    fs, prefix = arrow_filesystem(root, object_store_options(root, options) or {})
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    report = MirrorReport()
    seen: set[Path] = set()
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = _relative_key(info.path, prefix)
        if rel is None:
            report.refused[info.path] = "not a safe relative path"
            continue
        if info.size is not None and info.size > max_bytes:
            report.refused[info.path] = f"{info.size} bytes > {max_bytes}"
            continue
        target = dest / rel
        if not target.resolve().is_relative_to(dest.resolve()):  # a symlink planted in the mirror
            report.refused[info.path] = "resolves outside the mirror"
            continue
        seen.add(target)
        mtime = info.mtime.timestamp() if info.mtime is not None else None
        if target.is_file() and _same(target.stat(), info.size, mtime):
            report.kept += 1
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part-{os.getpid()}")
        with fs.open_input_stream(info.path) as src, open(tmp, "wb") as out:
            while block := src.read(chunk):
                out.write(block)
        if mtime is not None:
            os.utime(tmp, (mtime, mtime))  # the object's time: a later change of it shows
        os.replace(tmp, target)
        report.fetched += 1
    for path in dest.rglob("*"):
        if path.is_file() and path not in seen:
            path.unlink()
            report.removed += 1
    return report
