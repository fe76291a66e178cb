"""Read CLIP_benchmark-style webdataset tar shards (`key.jpg|png|webp` + `key.txt`) into a Dataset.

A sample is the set of tar members sharing a key: the member path up to the first dot of its base
name (`shard/000123.jpg` and `shard/000123.txt` -> key `shard/000123`). The text member holds the
captions, one per line, each judged alone. As in webdataset, a sample's members must be stored next
to each other; the shard is streamed, never extracted, so links and devices inside it are refused
without touching the file system. Payloads stay inline in the MediaItems (`data`) unless
`extract_to` names a folder to write them to (then items carry a `path`, named by content id).

Shards: every *.tar / *.tar.gz under root (or the `shards` glob patterns, relative to root). A shard
under a folder named like a split (`test/0.tar`, CLIP_benchmark's layout) gives its samples that
split unless `split` is passed.

    from fusion.data.webdataset import read_webdataset
    ds = read_webdataset("data/wds_flickr30k", name="f30k-wds", split="test")
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fusion.data.builder import DatasetBuilder, ReaderError, normalise_split
from fusion.data.canonical import Dataset
from fusion.media import MediaError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
AUDIO_EXTS = ("flac", "wav", "mp3", "ogg")


def split_key(member_name: str) -> tuple[str, str]:
    """(key, extension) of a tar member name, webdataset style: the extension starts at the first dot."""
    folder, _, base = member_name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, ext.lower() if dot else ""


def _find_shards(root: Path, shards: str | list[str] | None) -> list[Path]:
    patterns = [shards] if isinstance(shards, str) else (shards or ["**/*.tar", "**/*.tar.gz", "**/*.tgz"])
    found: set[Path] = set()
    for pat in patterns:
        if Path(pat).is_absolute():
            raise ReaderError(f"shard pattern {pat!r} must be relative to the root {root}")
        found.update(p for p in root.glob(pat) if p.is_file())
    if not found:
        raise ReaderError(f"no tar shards matching {patterns} under {root}")
    return sorted(found)


class _ShardReader:
    def __init__(
        self,
        builder: DatasetBuilder,
        media_exts: tuple[str, ...],
        caption_ext: str,
        split: str | None,
        modality: str | None,
    ) -> None:
        self.b = builder
        self.media_exts = media_exts
        self.caption_ext = caption_ext
        self.split = split
        self.modality = modality

    def flush(self, shard: str, key: str, members: dict[str, bytes | str]) -> None:
        """Turns one sample (extension -> payload, or a reason string for a refused member) into pairs."""
        label = f"{shard}:{key}"
        refused = {ext: why for ext, why in members.items() if isinstance(why, str)}
        media_ext = next((e for e in self.media_exts if e in members), None)
        if media_ext is None:
            if self.caption_ext in members:
                self.b.reject(label, "missing", f"no {'/'.join(self.media_exts)} member for this key")
            return  # a sample of other files only (.cls, .json ...) is not ours to judge
        if media_ext in refused:
            reason, _, detail = refused[media_ext].partition("|")
            self.b.reject(f"{label}.{media_ext}", reason, detail)
            return
        if self.caption_ext not in members or self.caption_ext in refused:
            self.b.reject(label, "no_caption", f"no readable .{self.caption_ext} member for this key")
            return
        # Bytes that are not UTF-8 stay as lone surrogates: the builder refuses that line (`encoding`)
        # and keeps the sample's other captions. Lines end at \n or \r only, not at the other
        # characters str.splitlines() breaks on, so a stray control character is refused, not split on.
        text = members[self.caption_ext].decode("utf-8-sig", "surrogateescape")  # type: ignore[union-attr]
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        captions = [line for line in lines if line.strip()]
        if not captions:
            self.b.reject(f"{label}.{self.caption_ext}", "empty_caption", "no non-blank line")
            return
        try:
            mid = self.b.media_from_bytes(
                f"{label}.{media_ext}",
                members[media_ext],  # type: ignore[arg-type]
                self.modality,
                ext=f".{media_ext}",
            )
        except MediaError as e:
            self.b.reject(f"{label}.{media_ext}", e.reason, str(e))
            return
        self.b.add_pair(None, captions, row=label, media_id=mid, split=self.split)

    def read(self, path: Path, rel: str) -> None:
        wanted = {*self.media_exts, self.caption_ext}
        key: str | None = None
        members: dict[str, bytes | str] = {}
        try:
            with tarfile.open(path, "r:*") as tf:
                for m in tf:
                    k, ext = split_key(m.name.removeprefix("./"))
                    if m.isdir() or k.rpartition("/")[2].startswith("__"):
                        continue
                    if k != key:
                        if key is not None:
                            self.flush(rel, key, members)
                        key, members = k, {}
                    if ext not in wanted:
                        continue
                    if not m.isfile():
                        members[ext] = "malformed|the tar member is a link or device, not a file"
                    elif m.size > self.b.limits.max_bytes:
                        members[ext] = f"too_large|{m.size} bytes > limit {self.b.limits.max_bytes}"
                    else:
                        f = tf.extractfile(m)
                        members[ext] = f.read() if f is not None else "unreadable|no data"
                # tarfile takes a truncated header for the end of the archive; only zero padding may follow.
                tf.fileobj.seek(tf.offset)
                if tf.fileobj.read(1 << 20).strip(b"\0"):
                    raise tarfile.ReadError(f"truncated header or trailing garbage at byte {tf.offset}")
                if key is not None:
                    self.flush(rel, key, members)
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            # Samples before the damage are kept; the partial sample and everything after are lost.
            self.b.reject(rel, "undecodable", f"tar shard is corrupt or truncated: {type(e).__name__}: {e}")


def read_webdataset(
    root: str | Path,
    *,
    name: str,
    shards: str | list[str] | None = None,
    split: str | None = None,
    modality: str | None = "image",
    media_exts: tuple[str, ...] | None = None,
    caption_ext: str = "txt",
    progress: bool = True,
    **common: Any,
) -> Dataset:
    """Reads webdataset tar shards into a Dataset (one group per media item, one pair per caption line).

    modality: "image" (members .jpg/.jpeg/.png/.webp) or "audio" (.flac/.wav/.mp3/.ogg); media_exts
    overrides the extensions, in order of preference. `common` goes to DatasetBuilder (source,
    license, limits, probe, seed, extract_to, ...).
    """
    root = Path(root)
    if not root.is_dir():
        raise ReaderError(f"dataset root {root} is not a folder")
    if modality not in ("image", "audio"):
        raise ReaderError(f"webdataset modality must be 'image' or 'audio', not {modality!r}")
    want = normalise_split(split) if split is not None else None
    if split is not None and want is None:
        raise ReaderError(f"unknown split {split!r}")
    exts = tuple(
        e.lower().lstrip(".") for e in (media_exts or (IMAGE_EXTS if modality == "image" else AUDIO_EXTS))
    )
    paths = _find_shards(root, shards)
    builder = DatasetBuilder(name, root, modality=modality, **common)
    for path in tqdm(paths, desc=f"read {name}", unit="shard", leave=False, disable=not progress):
        rel = path.relative_to(root).as_posix()
        folder_split = next((normalise_split(p) for p in Path(rel).parts[:-1] if normalise_split(p)), None)
        if want is not None and folder_split is not None and folder_split != want:
            continue
        _ShardReader(builder, exts, caption_ext.lower().lstrip("."), want or folder_split, modality).read(
            path, rel
        )
    return builder.finish()
