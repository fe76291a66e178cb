"""The `emoji` image-text source: every emoji drawn in several styles, captioned with its CLDR name.

Text comes from npm `emojibase-data` (English CLDR labels and keyword tags). Images come from
per-emoji files in npm packages (Google Noto and Twitter PNGs from emoji-datasource, OpenMoji
colour and outline SVGs, Microsoft Fluent 3D WebPs) and from Debian's Noto Color Emoji font,
drawn with PIL. One concept is one emoji (its hexcode): val and test hold out every style of an
emoji, so retrieval is measured on emojis never seen in training.

Run: `python -m pipelines.sources.emoji [LIMIT]` fetches into the data cache and prints a summary.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from fusion.data import Dataset
from pipelines.sources.common import SourceUnavailable, debian_package, npm_package
from pipelines.sources.image_common import ImageTextBuilder
from pipelines.sources.text_clean import article, join_terms

EMOJIBASE = "emojibase-data@17.0.0"
EMOJIBASE_LICENSE = "MIT"  # package.json "license" of emojibase-data 17.0.0
NOTO_DEB = "fonts-noto-color-emoji"
NOTO_FONT = "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
# Debian bookworm ships Noto Color Emoji 2.042, which covers Emoji 15.0; newer emoji would be drawn
# as several fallback glyphs, which is not the emoji.
NOTO_MAX_VERSION = 15.0
NOTO_SIZE = 109  # the one bitmap strike size of the CBDT font
NOTO_CANVAS = 160
# emojibase group 2 is "component" (skin-tone and hair swatches), not emoji people use.
COMPONENT_GROUP = 2


@dataclass(frozen=True)
class EmojiStyle:
    """One drawing style: where its per-emoji files are and under which license they are published."""

    name: str
    package: str  # npm spec, or "deb:<name>" for a Debian package
    folder: str  # inside the unpacked package
    suffix: str
    license: str


# Licenses as read from each package (not from its package.json "license" field where that only
# covers code): emoji-datasource README says Google/Noto images are Apache-2.0 and Twitter images
# CC-BY-4.0; openmoji LICENSE.txt is CC BY-SA 4.0; @lobehub/fluent-emoji-3d package.json and README
# say MIT; Debian's copyright file for fonts-noto-color-emoji puts the font (fonts/*) under OFL-1.1.
STYLES: tuple[EmojiStyle, ...] = (
    EmojiStyle("google", "emoji-datasource-google@16.0.0", "img/google/64", ".png", "Apache-2.0"),
    EmojiStyle("twitter", "emoji-datasource-twitter@16.0.0", "img/twitter/64", ".png", "CC-BY-4.0"),
    EmojiStyle("openmoji", "openmoji@17.0.0", "color/svg", ".svg", "CC-BY-SA-4.0"),
    EmojiStyle("openmoji_black", "openmoji@17.0.0", "black/svg", ".svg", "CC-BY-SA-4.0"),
    EmojiStyle("fluent3d", "@lobehub/fluent-emoji-3d@1.1.0", "assets", ".webp", "MIT"),
    EmojiStyle("noto", "deb:" + NOTO_DEB, "", ".png", "OFL-1.1"),
)
STYLE_NAMES = tuple(s.name for s in STYLES)


@dataclass(frozen=True)
class EmojiEntry:
    """One emoji from emojibase: hexcode like `1F600` or `0023-FE0F-20E3`, CLDR label, tags."""

    hexcode: str
    label: str
    emoji: str
    tags: tuple[str, ...]
    version: float


def emoji_key(hexcode: str) -> str:
    """Matching key across packages: upper-case code points without variation selector FE0F.

    Packages disagree on whether FE0F is part of a file name (`2764-fe0f.png` vs `2764.svg`).
    """
    parts = [p for p in hexcode.upper().replace("_", "-").split("-") if p and p != "FE0F"]
    return "-".join(parts)


def load_emojibase(package_dir: Path) -> list[EmojiEntry]:
    """Reads `en/data.json` of an unpacked emojibase-data package; skips components and loose letters."""
    path = package_dir / "en" / "data.json"
    if not path.exists():
        raise SourceUnavailable(f"{path} is missing: not an emojibase-data package")
    out = []
    for row in json.loads(path.read_text(encoding="utf-8")):
        # Regional indicator letters have no group; components are swatches, not emoji.
        if "group" not in row or row["group"] == COMPONENT_GROUP:
            continue
        label = str(row.get("label") or row.get("annotation") or "").strip()
        if not label:
            continue
        out.append(
            EmojiEntry(
                hexcode=row["hexcode"],
                label=label,
                emoji=row.get("emoji", ""),
                tags=tuple(str(t) for t in row.get("tags", ())),
                version=float(row.get("version", 0)),
            )
        )
    return out


def emoji_captions(entry: EmojiEntry) -> list[str]:
    """Captions of one emoji: its CLDR name and a sentence with its keywords.

    >>> emoji_captions(EmojiEntry("1F600", "grinning face", "", ("face", "grin", "smile"), 1.0))
    ['grinning face', 'a grinning face emoji: grin, smile']
    """
    name = entry.label
    terms = join_terms(entry.tags, exclude=name, max_terms=5)
    # "flag: Japan" reads better inside a sentence as "flag, Japan".
    phrase = name.replace(": ", ", ")
    sentence = f"{article(phrase)} {phrase} emoji"
    if terms:
        sentence += ": " + ", ".join(terms)
    return [name, sentence]


def index_style_folder(folder: Path, suffix: str) -> dict[str, Path]:
    """Maps emoji_key(file stem) -> file for every `*suffix` file in a folder (sorted, first wins)."""
    if not folder.is_dir():
        raise SourceUnavailable(f"{folder} is missing: the package layout changed")
    out: dict[str, Path] = {}
    for path in sorted(folder.glob("*" + suffix)):
        out.setdefault(emoji_key(path.stem), path)
    return out


def render_noto(font_path: Path, entries: Sequence[EmojiEntry], out_dir: Path, progress: bool = True) -> dict:
    """Draws each emoji the font supports into `out_dir/<hexcode>.png` (160x160 RGBA); cached per file.

    Returns emoji_key -> PNG path. Emoji newer than the font, or drawn as several glyphs (the shaper
    fell back to pieces), are left out rather than stored as a wrong picture.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    font = None
    out: dict[str, Path] = {}
    for entry in tqdm(entries, desc="noto: drawing", disable=not progress, leave=False):
        if entry.version > NOTO_MAX_VERSION or not entry.emoji:
            continue
        dest = out_dir / f"{entry.hexcode}.png"
        if not dest.exists():
            if font is None:
                font = ImageFont.truetype(str(font_path), NOTO_SIZE)
            left, top, right, bottom = font.getbbox(entry.emoji)
            w, h = right - left, bottom - top
            if w <= 0 or h <= 0 or w > 1.3 * h:
                continue
            im = Image.new("RGBA", (NOTO_CANVAS, NOTO_CANVAS), (0, 0, 0, 0))
            xy = ((NOTO_CANVAS - w) // 2 - left, (NOTO_CANVAS - h) // 2 - top)
            ImageDraw.Draw(im).text(xy, entry.emoji, font=font, embedded_color=True)
            if im.getbbox() is None:
                continue
            tmp = dest.with_suffix(".tmp.png")
            im.save(tmp)
            tmp.rename(dest)
        out[emoji_key(entry.hexcode)] = dest
    return out


def _style_files(style: EmojiStyle, cache: Path, entries: Sequence[EmojiEntry], progress: bool) -> dict:
    if style.package.startswith("deb:"):
        root = debian_package(style.package[4:], cache)
        font = root / NOTO_FONT
        if not font.exists():
            raise SourceUnavailable(f"{font} is missing from {style.package}")
        return render_noto(font, entries, cache / "emoji" / "noto", progress)
    return index_style_folder(npm_package(style.package, cache) / style.folder, style.suffix)


def select_concepts(entries: Sequence[EmojiEntry], limit: int | None) -> list[EmojiEntry]:
    """A stable, seed-independent subset spread over all groups: order by a hash of the hexcode."""
    ordered = sorted(entries, key=lambda e: hashlib.sha256(e.hexcode.encode()).hexdigest())
    return ordered if limit is None else ordered[:limit]


def fetch_emoji(
    cache: Path,
    *,
    limit: int | None = None,
    seed: int = 0,
    progress: bool = True,
    styles: Sequence[str] | None = None,
) -> Dataset:
    """Builds the emoji dataset: one image per (emoji, style), two captions per image.

    `limit` caps the number of emoji (concepts), chosen stably among those with at least one image;
    `styles` picks a subset of STYLE_NAMES (default all). A style whose package cannot be fetched
    is recorded in the quarantine (reason `source_unavailable`) and the others go on; if emojibase
    itself or every style is unavailable, SourceUnavailable is raised.
    """
    cache = Path(cache)
    wanted = STYLE_NAMES if styles is None else tuple(styles)
    unknown = sorted(set(wanted) - set(STYLE_NAMES))
    if unknown:
        raise ValueError(f"unknown emoji styles {unknown}; choose from {list(STYLE_NAMES)}")
    entries = load_emojibase(npm_package(EMOJIBASE, cache))
    builder = ImageTextBuilder("emoji")
    files: dict[str, dict[str, Path]] = {}
    for style in STYLES:
        if style.name not in wanted:
            continue
        todo: Sequence[EmojiEntry] = entries
        if limit is not None and style.package.startswith("deb:"):
            # Drawing is the slow part: draw only the emoji a `limit` run can choose.
            have = {k for f in files.values() for k in f}
            todo = select_concepts(
                [e for e in entries if emoji_key(e.hexcode) in have or e.version <= NOTO_MAX_VERSION], limit
            )
        try:
            files[style.name] = _style_files(style, cache, todo, progress)
        except SourceUnavailable as exc:
            builder.dataset.reject(f"emoji/{style.name}", style.package, "source_unavailable", str(exc))
    if not files:
        reasons = "; ".join(r.detail for r in builder.dataset.quarantine)
        raise SourceUnavailable(f"no emoji style could be fetched: {reasons}")
    available = [e for e in entries if any(emoji_key(e.hexcode) in f for f in files.values())]
    chosen = select_concepts(available, limit)
    by_style = {s.name: s for s in STYLES}
    for entry in tqdm(chosen, desc="emoji", disable=not progress):
        key = emoji_key(entry.hexcode)
        captions = emoji_captions(entry)
        for name, index in files.items():
            path = index.get(key)
            if path is None:
                continue
            style = by_style[name]
            source = f"emoji/{name}"
            mid = builder.add_image_file(path, source=source, license=style.license, item=entry.hexcode)
            if mid is None:
                continue
            for caption in captions:
                builder.add_caption(
                    mid,
                    caption,
                    group_id=f"emoji:{entry.hexcode}:{name}",
                    source=source,
                    license=style.license,
                    concept=entry.hexcode,
                    caption_license=EMOJIBASE_LICENSE,
                )
    return builder.finish(seed)


if __name__ == "__main__":
    from fusion.paths import cache_dir

    lim = int(sys.argv[1]) if len(sys.argv) > 1 else None
    ds = fetch_emoji(cache_dir("data"), limit=lim)
    print(ds.summary(), ds.quarantine_counts())
