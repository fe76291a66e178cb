"""Admit or quarantine the rows a dataset reader finds: the shared core of every reader in fusion.data.

A reader turns its format into calls of `DatasetBuilder.add_pair(media, captions, row=...)`; the
builder checks the path stays inside the dataset root, reads and probes the media (fusion.media),
validates the captions (text, UTF-8, no control characters, at most `limits.max_caption_chars`)
and rejects duplicates, and puts every refused row into the dataset's quarantine with a reason from
`REASONS`. A bad row never takes a good one with it: each row is judged on its own, and each media
file is read and probed once however many rows use it.

Splits: a row may carry one; rows without one get a default assigned per group (all captions of one
item stay together) from a seeded hash (`default_splits`), recorded in `Dataset.split_seed`. The
default-corpus sources (pipelines.sources) use the same `default_splits` to hold out whole concepts.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from more_itertools import chunked

from fusion.data.canonical import Dataset, MediaItem, Pair, content_id
from fusion.media import (
    DEFAULT_LIMITS,
    MediaError,
    MediaLimits,
    probe,
    read_bytes,
    resolve_under,
    sniff_modality,
)
from fusion.media import REASONS as MEDIA_REASONS

# Quarantine reasons: the media ones (fusion.media.REASONS) plus the row-level ones below.
ROW_REASONS = {
    "malformed": "the row or file does not follow the format (bad JSON, missing field, unknown split ...)",
    "empty_caption": "the caption is empty or only whitespace",
    "non_text_caption": "the caption is not a string",
    "duplicate": "the same media content with the same caption was already read",
    "no_caption": "a media item has no caption at all",
    "encoding": "the row holds bytes that are not UTF-8 (or a lone surrogate escape)",
    "control_characters": "the caption holds NUL, other control characters or a terminal escape sequence",
    "caption_too_long": "the caption is longer than the character limit (MediaLimits.max_caption_chars)",
}
REASONS = {**MEDIA_REASONS, **ROW_REASONS}

# C0 controls but tab, newline and carriage return; DEL; C1 controls (U+0080-U+009F, CSI among them).
# ESC (U+001B) is C0: a terminal escape sequence is refused by its first character.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# What decoding with errors="surrogateescape" turns an undecodable byte into (U+DC80-U+DCFF), and
# what a JSON "\\ud800" escape gives: neither can be written as UTF-8.
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_CONTROL_NAMES = {0x00: "NUL", 0x07: "BEL", 0x08: "BS", 0x1B: "ESC", 0x7F: "DEL", 0x9B: "CSI"}

SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "restval": "train",  # Karpathy splits: the rest of COCO val, used for training
    "development": "train",  # Clotho
    "dev": "val",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
    "evaluation": "test",  # Clotho
}


class ReaderError(ValueError):
    """A dataset that cannot be read at all (missing manifest, unknown column, bad option)."""


def encoding_problem(text: str, what: str = "text") -> str | None:
    """Why `text` cannot be stored as UTF-8 (the first undecodable byte or lone surrogate, counting
    characters from 1), or None."""
    m = _SURROGATE.search(text)
    if m is None:
        return None
    code = ord(m.group())
    if 0xDC80 <= code <= 0xDCFF:
        return f"{what} holds byte 0x{code - 0xDC00:02x} at character {m.start() + 1}, which is not UTF-8"
    return f"{what} holds a lone surrogate U+{code:04X} at character {m.start() + 1}"


def caption_problem(text: str, max_chars: int) -> tuple[str, str] | None:
    """(reason, detail) for a caption string that must not be stored, else None."""
    why = encoding_problem(text, "caption")
    if why is not None:
        return "encoding", why
    text = text.strip()
    if not text:
        return "empty_caption", "caption is empty or only whitespace"
    m = _CONTROL.search(text)
    if m is not None:
        code = ord(m.group())
        name = _CONTROL_NAMES.get(code, "control character")
        return "control_characters", f"U+{code:04X} ({name}) at character {m.start() + 1}"
    if len(text) > max_chars:
        return "caption_too_long", f"{len(text)} characters > limit {max_chars}"
    return None


def printable(text: str) -> str:
    """`text` with lone surrogates and control characters (but tab and newline) written as escapes."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text.replace("\r", "\\r"))


def normalise_split(value: Any) -> str | None:
    """ "train"/"val"/"test" for a known split name (case-insensitive, aliases such as restval), else None."""
    if not isinstance(value, str):
        return None
    return SPLIT_ALIASES.get(value.strip().lower())


def default_splits(
    groups: Iterable[str], seed: int, val_fraction: float = 0.1, test_fraction: float = 0.1
) -> dict[str, str]:
    """Assigns whole groups to train/val/test: deterministic for a seed, independent of input order.

    Groups (duplicates count once) are ordered by a seeded hash, so adding a group leaves the order
    of the others alone; the first round(n*test_fraction) go to test, the next round(n*val_fraction)
    to val (at least one each once there are 3 groups, none for a zero fraction), the rest to train.
    The readers use it for rows without a split and the default-corpus sources (pipelines.sources)
    for whole concepts, so that val and test hold concepts never seen in training.
    """
    keyed = sorted(set(groups), key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    n = len(keyed)
    n_test = max(1, round(n * test_fraction)) if n >= 3 and test_fraction > 0 else 0
    n_val = max(1, round(n * val_fraction)) if n >= 3 and val_fraction > 0 else 0
    out = dict.fromkeys(keyed, "train")
    for g in keyed[:n_test]:
        out[g] = "test"
    for g in keyed[n_test : n_test + n_val]:
        out[g] = "val"
    return out


@dataclass(frozen=True)
class _Checked:
    media_id: str
    modality: str
    path: str


@dataclass
class _Pending:
    media_id: str
    caption_id: str
    group_id: str
    split: str | None
    concept: str


class DatasetBuilder:
    """Collects the rows of one dataset, quarantining the bad ones; `finish()` returns the Dataset.

    root: the dataset folder; every media path is resolved under it and must stay inside it.
    source / license: written on every media item and pair. modality: "image" or "audio", or None to
    sniff each file. probe: decode each media file once (fusion.media.probe) so undecodable files are
    quarantined at ingest rather than failing an encoder later. extract_to: where inline payloads
    (e.g. tar members) are written so that items carry a path; None keeps them as inline bytes.
    workers: threads that read and probe files ahead of the rows (readers call `prefetch`).
    """

    def __init__(
        self,
        name: str,
        root: str | Path,
        *,
        source: str | None = None,
        license: str = "unknown",
        modality: str | None = None,
        limits: MediaLimits | None = None,
        probe: bool = True,
        seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        extract_to: str | Path | None = None,
        workers: int = 1,
    ) -> None:
        if modality not in (None, "image", "audio"):
            raise ReaderError(f"modality must be 'image', 'audio' or None (sniffed), not {modality!r}")
        self.dataset = Dataset(name=name)
        self.root = Path(root).resolve()
        self.source = source if source is not None else name
        self.license = license
        self.modality = modality
        self.limits = limits or DEFAULT_LIMITS
        self.probe = probe
        self.seed = seed
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.extract_to = Path(extract_to).resolve() if extract_to is not None else None
        self.workers = max(1, int(workers))
        self._pool: ThreadPoolExecutor | None = None
        self._media_cache: dict[str, _Checked | MediaError] = {}
        self._seen: dict[tuple[str, str], str] = {}
        self._pending: list[_Pending] = []

    # -------------------------------------------------------------------------------------- rejects

    def reject(self, row: str, reason: str, detail: str = "") -> None:
        """Quarantines `row`; label and detail are made printable (they may quote the bad input)."""
        if reason not in REASONS:
            raise ValueError(f"unknown quarantine reason {reason!r}")
        self.dataset.reject(self.source, printable(row), reason, printable(detail))

    # -------------------------------------------------------------------------------------- media

    def _check(self, key: str, data: bytes, modality: str | None) -> tuple[str, str]:
        """(media id, modality) of a payload that passes the probe; raises MediaError. Thread-safe."""
        mod = modality or self.modality or sniff_modality(data)
        if mod not in ("image", "audio"):
            raise MediaError(key, "unsupported_format", "neither an image nor audio by its magic bytes")
        if self.probe:
            probe(data, mod, key, self.limits)
        return content_id(mod, data), mod

    def _check_path(self, rel: str, modality: str | None) -> _Checked | MediaError:
        """Resolves, reads and probes one file; no shared state is touched, so workers may run it."""
        try:
            path = resolve_under(self.root, rel, rel)
            mid, mod = self._check(rel, read_bytes(path, rel, self.limits), modality)
            return _Checked(mid, mod, str(path))
        except MediaError as e:
            return e

    def prefetch(self, rels: Iterable[Any], modality: str | None = None) -> None:
        """Checks the not-yet-seen paths among `rels` on `workers` threads (Pillow, soundfile and
        hashlib release the GIL), so the add_pair calls that follow find them done."""
        if self.workers <= 1:
            return
        todo = list(
            dict.fromkeys(r for r in rels if isinstance(r, str) and r.strip() and r not in self._media_cache)
        )
        if len(todo) < 2:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="probe")
        for rel, result in zip(
            todo, self._pool.map(lambda r: self._check_path(r, modality), todo), strict=True
        ):
            self._media_cache[rel] = result

    def prefetched(
        self, items: Iterable[Any], rel_of: Callable[[Any], Any], size: int = 256
    ) -> Iterator[Any]:
        """Yields `items` unchanged, prefetching a chunk's media paths (`rel_of(item)`) before yielding it."""
        if self.workers <= 1:
            yield from items
            return
        for chunk in chunked(items, size):
            rels = []
            for item in chunk:
                try:
                    rels.append(rel_of(item))
                except (KeyError, TypeError, AttributeError, ValueError):
                    continue  # a malformed row: the reader rejects it when it gets there
            self.prefetch(rels)
            yield from chunk

    def media_from_path(self, rel: Any, modality: str | None = None) -> str:
        """Id of the media file at `rel` under the root, read and probed once (raises MediaError)."""
        if not isinstance(rel, str) or not rel.strip():
            raise MediaError(str(rel), "missing", f"no media path given ({rel!r})")
        cached = self._media_cache.get(rel)
        if cached is None:
            cached = self._media_cache[rel] = self._check_path(rel, modality)
        if isinstance(cached, MediaError):
            raise cached
        # Items are added here, in row order, not by the workers: the Dataset comes out the same either way.
        if cached.media_id not in self.dataset.media:
            self.dataset.add_media(
                MediaItem(
                    cached.media_id,
                    cached.modality,
                    path=cached.path,
                    source=self.source,
                    license=self.license,
                )  # type: ignore[arg-type]
            )
        return cached.media_id

    def media_from_bytes(self, key: str, data: bytes, modality: str | None = None, ext: str = "") -> str:
        """Id of an inline payload (e.g. a tar member), probed (raises MediaError).

        With `extract_to`, the payload is written there as `{media id}{ext}` and the item carries that path.
        """
        data = read_bytes(data, key, self.limits)
        mid, mod = self._check(key, data, modality)
        if mid not in self.dataset.media:
            path: Path | None = None
            if self.extract_to is not None:
                self.extract_to.mkdir(parents=True, exist_ok=True)
                path = self.extract_to / f"{mid}{ext}"
                if not path.exists():
                    tmp = path.with_suffix(path.suffix + ".part")
                    tmp.write_bytes(data)
                    tmp.replace(path)
            self.dataset.add_media(
                MediaItem(mid, mod, path=str(path), source=self.source, license=self.license)  # type: ignore[arg-type]
                if path is not None
                else MediaItem(mid, mod, data=data, source=self.source, license=self.license)  # type: ignore[arg-type]
            )
        return mid

    # -------------------------------------------------------------------------------------- rows

    def add_pair(
        self,
        media: Any,
        captions: Any,
        *,
        row: str,
        media_id: str | None = None,
        split: Any = None,
        group: Any = None,
        concept: Any = "",
        modality: str | None = None,
    ) -> int:
        """Adds the pairs of one row: `media` is a path under the root, or pass `media_id` from media_from_*.

        `captions` is a string or a list of strings (one pair each). Returns the number of pairs added;
        every refused part is quarantined under the label `row` (a refused caption of several as
        `row#captionN`, the others are kept).
        """
        if split is not None and not (isinstance(split, str) and split.strip() == ""):
            norm = normalise_split(split)
            if norm is None:
                self.reject(row, "malformed", f"unknown split {split!r}")
                return 0
            split = norm
        else:
            split = None
        for what, value in (("media path", media), ("group", group), ("concept", concept)):
            why = encoding_problem(value, what) if isinstance(value, str) else None
            if why is not None:
                self.reject(row, "encoding", why)
                return 0
        if media_id is not None:
            mid = media_id
        elif media is None or isinstance(media, str):
            try:
                mid = self.media_from_path(media, modality)
            except MediaError as e:
                self.reject(row, e.reason, str(e))
                return 0
        else:
            self.reject(row, "malformed", f"media path is a {type(media).__name__}, not a string")
            return 0
        caps = captions if isinstance(captions, list | tuple) else [captions]
        if not caps:
            self.reject(row, "no_caption", f"no caption for {media}")
            return 0
        if group is not None and not isinstance(group, str):
            group = str(group)
        group_id = group.strip() if isinstance(group, str) and group.strip() else mid
        concept = str(concept).strip() if concept is not None else ""
        added = 0
        for i, cap in enumerate(caps):
            label = row if len(caps) == 1 else f"{row}#caption{i}"
            if not isinstance(cap, str):
                self.reject(label, "non_text_caption", f"caption is {type(cap).__name__}: {cap!r:.80}")
                continue
            problem = caption_problem(cap, self.limits.max_caption_chars)
            if problem is not None:
                reason, detail = problem
                self.reject(label, reason, f"{detail}: {cap!r:.80}")
                continue
            text = cap.strip()
            cid = content_id("text", text)
            first = self._seen.get((mid, cid))
            if first is not None:
                self.reject(label, "duplicate", f"same media and caption as {first}")
                continue
            self._seen[(mid, cid)] = label
            self.dataset.add_text(text, source=self.source, license=self.license)
            self._pending.append(_Pending(mid, cid, group_id, split, concept))
            added += 1
        return added

    def finish(self) -> Dataset:
        """Assigns default splits by group to rows without one and returns the Dataset."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        ds = self.dataset
        explicit: dict[str, str] = {}
        for p in self._pending:
            if p.split is not None:
                explicit.setdefault(p.group_id, p.split)
        missing = {p.group_id for p in self._pending if p.split is None and p.group_id not in explicit}
        assigned = (
            default_splits(missing, self.seed, self.val_fraction, self.test_fraction) if missing else {}
        )
        if assigned:
            ds.split_seed = self.seed
        ds.pairs = [
            Pair(
                media_id=p.media_id,
                caption_id=p.caption_id,
                split=p.split or explicit.get(p.group_id) or assigned[p.group_id],  # type: ignore[arg-type]
                group_id=p.group_id,
                source=self.source,
                license=self.license,
                concept=p.concept,
            )
            for p in self._pending
        ]
        return ds
