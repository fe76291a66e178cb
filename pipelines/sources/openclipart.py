"""The `openclipart` image-text source: Open Clip Art Library drawings with their own noisy metadata.

Media are the SVG files of Debian's `openclipart-svg` (about 8,000 public-domain drawings). Each
SVG carries RDF metadata (dc:title, dc:description, dc:subject tags) written by its author: often
good ("Earth Globe: Simple globe centered on North America"), often not (Italian file titles,
collection names such as "Lemon SVG theme", the author's name as a tag). Every pair keeps the raw
text (Pair.raw_caption_id), a cleaned caption (Pair.caption_id) and a quality score in [0, 1]
(Pair.quality): the material of the data-quality ablation. The score uses the English word list
of Debian's `wamerican`.

Run: `python -m pipelines.sources.openclipart [LIMIT]` fetches into the data cache and prints a summary.
"""

from __future__ import annotations

import hashlib
import json
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from fusion.data import Dataset
from pipelines.sources.common import SourceUnavailable, debian_package
from pipelines.sources.image_common import ImageTextBuilder
from pipelines.sources.text_clean import (
    clean_caption,
    join_terms,
    load_vocabulary,
    name_to_words,
    quality_score,
)

SVG_DEB = "openclipart-svg"
SVG_DIR = "usr/share/openclipart/svg"
DICT_DEB = "wamerican"
DICT_FILE = "usr/share/dict/american-english"
# debian/copyright of openclipart-svg: "creative commons Public Domain Dedication" (SPDX CC-PDDC).
LICENSE = "CC-PDDC"
# A title shared by this many drawings names a collection ("Lemon SVG theme"), not the picture.
COLLECTION_TITLE_MIN = 4
# A tag on more than this fraction of drawings ("hash", "icons") tells nothing about one of them.
COMMON_TAG_FRACTION = 0.02
COMMON_TAG_MIN = 10  # ...and on at least this many, so a small package keeps its tags
# Falling back to a file name is a weaker caption than the author's own title.
FILENAME_PENALTY = 0.7
MAX_DESCRIPTION_WORDS = 25


@dataclass(frozen=True)
class ClipartMeta:
    """What one SVG says about itself, as found (unclean)."""

    path: Path
    rel: str  # path below the clip-art root, e.g. "recreation/games/two_red_dice_01.svg"
    title: str
    description: str
    subjects: tuple[str, ...]
    creator: str

    def raw_text(self) -> str:
        """The metadata as one text, for Pair.raw_caption_id; the file name when there is none."""
        parts = [self.title.strip(), self.description.strip(), ", ".join(s for s in self.subjects if s)]
        text = "\n".join(p for p in parts if p)
        return text or Path(self.rel).stem


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _text(elem: ET.Element | None) -> str:
    return " ".join("".join(elem.itertext()).split()) if elem is not None else ""


def parse_clipart_svg(data: bytes, path: Path, rel: str) -> ClipartMeta:
    """Reads the RDF metadata of one SVG. Raises ET.ParseError on malformed XML, ValueError if not SVG.

    Looks for the cc:Work element (any namespace version) and takes its direct dc:title,
    dc:description, dc:subject/rdf:Bag/rdf:li and dc:creator; the nested agent titles (publisher,
    rights holder) are not the picture's title.
    """
    root = ET.fromstring(data)
    if _local(root.tag) != "svg":
        raise ValueError(f"root element is <{_local(root.tag)}>, not <svg>")
    work = next((e for e in root.iter() if _local(e.tag) == "Work"), None)
    title = description = creator = ""
    subjects: list[str] = []
    if work is not None:
        for child in work:
            name = _local(child.tag)
            if name == "title":
                title = _text(child)
            elif name == "description":
                description = _text(child)
            elif name == "subject":
                subjects.extend(_text(li) for li in child.iter() if _local(li.tag) == "li")
            elif name == "creator":
                creator = _text(child)
    return ClipartMeta(path, rel, title, description, tuple(s for s in subjects if s), creator)


def clipart_caption(
    meta: ClipartMeta,
    collection_titles: set[str],
    common_tags: set[str],
    boilerplate_descriptions: frozenset[str] = frozenset(),
) -> tuple[str, bool]:
    """The cleaned caption of one drawing and whether it had to fall back to the file name.

    Title (or file name when the title is empty or names a collection), then the description
    when it adds something and is not boilerplate shared by many drawings ("EPS converted from
    ..."; at most 25 words), then up to five informative tags.

    >>> m = ClipartMeta(Path("x"), "games/two_red_dice_01.svg", "Two Red Dice", "", ("", "game", "dice"), "")
    >>> clipart_caption(m, set(), set())
    ('two red dice, game', False)
    """
    title = clean_caption(meta.title)
    fallback = not title or title in collection_titles
    if fallback:
        title = clean_caption(name_to_words(Path(meta.rel).stem))
    caption = title
    desc = clean_caption(meta.description)
    if desc and desc != title and desc not in title and desc not in boilerplate_descriptions:
        words = desc.split()
        caption += ": " + " ".join(words[:MAX_DESCRIPTION_WORDS])
    creator = clean_caption(meta.creator)
    tags = [t for t in meta.subjects if clean_caption(t) not in common_tags and clean_caption(t) != creator]
    terms = join_terms(tags, exclude=caption, max_terms=5)
    if terms:
        caption += ", " + ", ".join(terms)
    return caption, fallback


def _read_all_metadata(
    root: Path, index: Path, builder: ImageTextBuilder, progress: bool
) -> list[ClipartMeta]:
    """Parses every SVG's metadata once and keeps it in a JSON index, so a warm fetch parses nothing.

    Malformed files are quarantined (`bad_svg`) on every call, from the index as well.
    """
    if index.exists():
        rows = json.loads(index.read_text(encoding="utf-8"))
    else:
        rows = []
        for path in tqdm(sorted(root.rglob("*.svg")), desc="openclipart: metadata", disable=not progress):
            rel = path.relative_to(root).as_posix()
            try:
                m = parse_clipart_svg(path.read_bytes(), path, rel)
            except (ET.ParseError, ValueError, OSError) as exc:
                rows.append({"rel": rel, "error": f"{type(exc).__name__}: {exc}"})
                continue
            row = {"rel": rel, "title": m.title, "description": m.description, "creator": m.creator}
            rows.append(row | {"subjects": list(m.subjects)})
        index.parent.mkdir(parents=True, exist_ok=True)
        tmp = index.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows), encoding="utf-8")
        tmp.rename(index)
    metas = []
    for row in rows:
        if "error" in row:
            builder.dataset.reject("openclipart", row["rel"], "bad_svg", row["error"])
            continue
        metas.append(
            ClipartMeta(
                root / row["rel"],
                row["rel"],
                row["title"],
                row["description"],
                tuple(row["subjects"]),
                row["creator"],
            )
        )
    return metas


def fetch_openclipart(
    cache: Path, *, limit: int | None = None, seed: int = 0, progress: bool = True
) -> Dataset:
    """Builds the openclipart dataset: one SVG per drawing, its cleaned caption, raw text and quality.

    `limit` caps the number of drawings, chosen stably by a hash of their path. Collection titles
    and common tags are found over the whole package, so a subset is cleaned exactly like the full
    set. Malformed SVGs go to the quarantine (`bad_svg`). Concept = the cleaned caption's title
    part, so drawings of the same title share a split.
    """
    cache = Path(cache)
    root = debian_package(SVG_DEB, cache) / SVG_DIR
    if not root.is_dir():
        raise SourceUnavailable(f"{root} is missing: the {SVG_DEB} package layout changed")
    vocabulary = load_vocabulary(debian_package(DICT_DEB, cache) / DICT_FILE)
    builder = ImageTextBuilder("openclipart")
    source = "openclipart"
    metas = _read_all_metadata(root, cache / "openclipart" / "metadata.json", builder, progress)
    titles = Counter(clean_caption(m.title) for m in metas)
    collection_titles = {t for t, n in titles.items() if t and n >= COLLECTION_TITLE_MIN}
    tag_counts = Counter(t for m in metas for t in {clean_caption(s) for s in m.subjects})
    common_tags = {
        t for t, n in tag_counts.items() if n > max(COMMON_TAG_MIN, COMMON_TAG_FRACTION * len(metas))
    }
    common_tags.add("")
    descriptions = Counter(clean_caption(m.description) for m in metas)
    boilerplate = frozenset(d for d, n in descriptions.items() if d and n >= COLLECTION_TITLE_MIN)
    metas.sort(key=lambda m: hashlib.sha256(m.rel.encode()).hexdigest())
    chosen = metas if limit is None else metas[:limit]
    for meta in tqdm(chosen, desc="openclipart", disable=not progress):
        # parse_clipart_svg already parsed these bytes as SVG; no second parse.
        mid = builder.add_image_file(
            meta.path,
            source=source,
            license=LICENSE,
            item=meta.rel,
            data=meta.path.read_bytes(),
            checked=True,
        )
        if mid is None:
            continue
        caption, fallback = clipart_caption(meta, collection_titles, common_tags, boilerplate)
        quality = quality_score(caption, vocabulary) * (FILENAME_PENALTY if fallback else 1.0)
        builder.add_caption(
            mid,
            caption,
            group_id=f"openclipart:{meta.rel}",
            source=source,
            license=LICENSE,
            concept=caption.split(":")[0].split(",")[0].strip(),
            raw_caption=meta.raw_text(),
            quality=round(quality, 4),
        )
    return builder.finish(seed)


if __name__ == "__main__":
    from fusion.paths import cache_dir

    lim = int(sys.argv[1]) if len(sys.argv) > 1 else None
    ds = fetch_openclipart(cache_dir("data"), limit=lim)
    print(ds.summary(), ds.quarantine_counts())
