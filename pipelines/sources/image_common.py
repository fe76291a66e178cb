"""Shared parts of the image-text fetchers: checking image files and assembling a canonical Dataset.

Fetchers collect (media file, captions, concept) records; `ImageTextBuilder` checks each file
(a broken file becomes a quarantine row, never an exception), hashes its bytes into a content id
so that identical pictures from different styles or packages collapse to one item, and at the end
assigns whole concepts to train/val/test with `fusion.data.builder.default_splits`.
"""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from fusion.data import Dataset, MediaItem, Pair, content_id
from fusion.data.builder import default_splits

RASTER_SUFFIXES = {".png", ".webp", ".gif", ".jpg", ".jpeg"}


class BadImage(ValueError):
    """An image file that cannot be used; `reason` is the short quarantine reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def check_image_bytes(data: bytes, suffix: str) -> None:
    """Raises BadImage unless `data` is a readable image of the kind its suffix says.

    Raster files are opened and verified by PIL (header and chunk checksums, without decoding
    every pixel); SVG files must parse as XML with an <svg> root. Rasterising every SVG here would
    cost more than the whole fetch; decode_image reports the rare file that parses but won't draw.
    """
    suffix = suffix.lower()
    if not data:
        raise BadImage("empty_file", "the file has no bytes")
    if suffix == ".svg":
        try:
            root = ET.fromstring(data)
        except ET.ParseError as exc:
            raise BadImage("bad_svg", f"not well-formed XML: {exc}") from exc
        if not root.tag.rsplit("}", 1)[-1] == "svg":
            raise BadImage("bad_svg", f"root element is <{root.tag}>, not <svg>")
        return
    if suffix not in RASTER_SUFFIXES:
        raise BadImage("unsupported_format", f"suffix {suffix!r} is not an image format we read")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadImage("bad_image", f"{type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class _Pending:
    media_id: str
    caption: str
    group_id: str
    source: str
    license: str
    concept: str
    raw_caption: str | None
    quality: float | None
    caption_license: str


class ImageTextBuilder:
    """Accumulates image files and their captions, then emits a split Dataset.

    Pairs are deduplicated on (media id, caption id): two styles with byte-identical pictures
    give one media item and one pair per caption, not two.
    """

    def __init__(self, name: str) -> None:
        self.dataset = Dataset(name)
        self._pending: list[_Pending] = []
        self._seen: set[tuple[str, str]] = set()

    def add_image_file(
        self,
        path: Path,
        *,
        source: str,
        license: str,
        item: str,
        data: bytes | None = None,
        checked: bool = False,
    ) -> str | None:
        """Checks and registers one image file; returns its media id, or None if it was quarantined.

        `data` passes bytes already read; `checked=True` says the caller has already parsed them
        (openclipart reads each SVG's metadata, which is the same check).
        """
        path = Path(path).resolve()
        if data is None:
            try:
                data = path.read_bytes()
            except OSError as exc:
                self.dataset.reject(source, item, "unreadable_file", f"{path}: {exc}")
                return None
        if not checked:
            try:
                check_image_bytes(data, path.suffix)
            except BadImage as exc:
                self.dataset.reject(source, item, exc.reason, f"{path}: {exc.detail}")
                return None
        mid = content_id("image", data)
        self.dataset.add_media(MediaItem(mid, "image", path=str(path), source=source, license=license))
        return mid

    def add_caption(
        self,
        media_id: str,
        caption: str,
        *,
        group_id: str,
        source: str,
        license: str,
        concept: str,
        raw_caption: str | None = None,
        quality: float | None = None,
        caption_license: str | None = None,
    ) -> None:
        """Queues one (image, caption) pair; its split is decided by its concept in `finish`.

        `license` is the image's; `caption_license` that of the text when it comes from another
        package (emoji names come from emojibase-data, not from the image set). Default: `license`.
        """
        caption = caption.strip()
        if not caption:
            self.dataset.reject(source, group_id, "empty_caption", "the caption is empty after cleaning")
            return
        key = (media_id, content_id("text", caption))
        if key in self._seen:
            return
        self._seen.add(key)
        self._pending.append(
            _Pending(
                media_id,
                caption,
                group_id,
                source,
                license,
                concept,
                raw_caption,
                quality,
                caption_license if caption_license is not None else license,
            )
        )

    def _drop_ambiguous(self) -> list[_Pending]:
        """Quarantines pictures that stand for several concepts and returns the remaining pairs.

        The outline style draws every flag as the same black rectangle; such a picture has no
        single right caption, and keeping it would put one item in two splits.
        """
        concepts: dict[str, set[str]] = {}
        for p in self._pending:
            concepts.setdefault(p.media_id, set()).add(p.concept)
        ambiguous = {m for m, cs in concepts.items() if len(cs) > 1}
        for mid in sorted(ambiguous):
            item = self.dataset.media.pop(mid)
            names = sorted(concepts[mid])
            shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            self.dataset.reject(
                item.source, str(item.path), "ambiguous_media", f"the same picture stands for {shown}"
            )
        return [p for p in self._pending if p.media_id not in ambiguous]

    def finish(self, seed: int) -> Dataset:
        """Assigns whole concepts to splits, writes the text items and pairs, returns the Dataset."""
        ds = self.dataset
        pending = self._drop_ambiguous()
        splits = default_splits((p.concept for p in pending), seed)
        for p in pending:
            cap_id = ds.add_text(p.caption, source=p.source, license=p.caption_license)
            raw_id = None
            if p.raw_caption is not None and p.raw_caption.strip():
                raw_id = ds.add_text(p.raw_caption, source=p.source, license=p.caption_license)
            ds.pairs.append(
                Pair(
                    media_id=p.media_id,
                    caption_id=cap_id,
                    split=splits[p.concept],  # type: ignore[arg-type]
                    group_id=p.group_id,
                    source=p.source,
                    license=p.license,
                    concept=p.concept,
                    raw_caption_id=raw_id,
                    quality=p.quality,
                )
            )
        ds.split_seed = seed
        return ds
