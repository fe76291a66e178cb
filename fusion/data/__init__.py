"""Paired data in one canonical form: media items, captions (text items), pairs and quarantine rows."""

from fusion.data.canonical import Dataset, MediaItem, Pair, QuarantineRow, content_id

__all__ = ["Dataset", "MediaItem", "Pair", "QuarantineRow", "content_id"]
