"""The canonical form every dataset reader and fetcher produces.

A dataset is a set of media items (image, audio, and text: captions are text items too, so
that every encoder encodes rows of one table) plus pairs linking a media item to a caption.
Ids are content hashes, so the same picture or sentence gets the same id wherever it comes
from, and each unique item is encoded once however many pairs use it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

Modality = Literal["image", "audio", "text"]
Split = Literal["train", "val", "test"]


def content_id(modality: str, content: bytes | str) -> str:
    """Stable id of an item: sha256 over its modality and bytes (text as UTF-8), 32 hex chars."""
    raw = content.encode("utf-8") if isinstance(content, str) else content
    h = hashlib.sha256()
    h.update(modality.encode("ascii") + b"\0")
    h.update(raw)
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class MediaItem:
    """One unique item. Exactly one of `path` (a file), `data` (inline bytes) or `text` is set."""

    media_id: str
    modality: Modality
    path: str | None = None
    data: bytes | None = None
    text: str | None = None
    source: str = ""
    license: str = ""

    def __post_init__(self) -> None:
        given = sum(x is not None for x in (self.path, self.data, self.text))
        if given != 1:
            raise ValueError(f"MediaItem {self.media_id}: exactly one of path, data, text must be set")
        if (self.text is not None) != (self.modality == "text"):
            raise ValueError(f"MediaItem {self.media_id}: text items carry text, media items a path or bytes")


@dataclass(frozen=True)
class Pair:
    """A positive pair: media item <-> caption (a text item).

    `group_id` ties together the captions of one item (several captions per image or clip);
    `concept` is what splits hold out whole (every style of one emoji, every note of one
    instrument). `raw_caption_id` points at the uncleaned text where a source has noisy captions
    (the quality ablation); `quality` is an optional score in [0, 1].
    """

    media_id: str
    caption_id: str
    split: Split
    group_id: str
    source: str = ""
    license: str = ""
    concept: str = ""
    raw_caption_id: str | None = None
    quality: float | None = None

    @property
    def pair_id(self) -> str:
        return f"{self.media_id}:{self.caption_id}"


@dataclass(frozen=True)
class QuarantineRow:
    """An input that was rejected, with a short machine-readable reason and a human detail."""

    source: str
    item: str
    reason: str
    detail: str = ""


@dataclass
class Dataset:
    """Media, pairs and quarantine of one dataset, deduplicated by content id."""

    name: str
    media: dict[str, MediaItem] = field(default_factory=dict)
    pairs: list[Pair] = field(default_factory=list)
    quarantine: list[QuarantineRow] = field(default_factory=list)
    split_seed: int | None = None

    def add_media(self, item: MediaItem) -> str:
        """Adds an item unless one with the same content id exists; returns its id."""
        self.media.setdefault(item.media_id, item)
        return item.media_id

    def add_text(self, text: str, source: str = "", license: str = "") -> str:
        mid = content_id("text", text)
        return self.add_media(MediaItem(mid, "text", text=text, source=source, license=license))

    def reject(self, source: str, item: str, reason: str, detail: str = "") -> None:
        self.quarantine.append(QuarantineRow(source, item, reason, detail))

    def quarantine_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.quarantine:
            counts[row.reason] = counts.get(row.reason, 0) + 1
        return dict(sorted(counts.items()))

    def summary(self) -> dict[str, int]:
        return {
            "pairs": len(self.pairs),
            "concepts": len({p.concept for p in self.pairs}),
            "unique_media": sum(1 for m in self.media.values() if m.modality != "text"),
            "unique_captions": sum(1 for m in self.media.values() if m.modality == "text"),
            "quarantined": len(self.quarantine),
        }
