"""The `icons` image-text source: SVG icon sets from npm, captioned with their names and search tags.

Libraries: `@tabler/icons` (outline and filled; tags and category in icons.json), `@mdi/svg`
(meta.json with aliases and category tags), `lucide-static` (tags.json) and
`@fortawesome/fontawesome-free` (solid, regular and brand SVGs; labels and search terms in
metadata/icons.yml). Media stay the packages' SVG files; decode_image rasterises them.
One concept is one icon name across libraries (style suffixes such as `-outline` removed), so
"home" from every library and style is held out together.

Run: `python -m pipelines.sources.icons [LIMIT]` fetches into the data cache and prints a summary.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from tqdm import tqdm

from fusion.data import Dataset
from pipelines.sources.common import SourceUnavailable, npm_package
from pipelines.sources.image_common import ImageTextBuilder
from pipelines.sources.text_clean import article, join_terms, name_to_words

# Words that name a drawing style rather than the thing drawn.
STYLE_WORDS = {"outline", "outlined", "filled", "fill", "solid", "regular"}


@dataclass(frozen=True)
class IconRecord:
    """One icon file: its library name, style, SVG path and search terms (aliases, tags, category)."""

    name: str
    style: str
    path: Path
    terms: tuple[str, ...]
    label: str = ""


def icon_concept(name: str) -> str:
    """The concept of an icon name: its words without style words and variant numbers.

    `account-outline` -> `account`, `home-2` -> `home`: variants of one thing are held out together.
    """
    words = [w for w in name_to_words(name).split() if w not in STYLE_WORDS]
    while len(words) > 1 and words[-1].isdigit():
        words.pop()
    return " ".join(words) or name_to_words(name)


def icon_captions(record: IconRecord) -> list[str]:
    """Captions of one icon: `<words> icon` and `an icon of a <words>, <tags>`.

    >>> icon_captions(IconRecord("home-2", "outline", Path("x.svg"), ("house", "dwelling")))
    ['home 2 icon', 'an icon of a home 2, house, dwelling']
    """
    words = name_to_words(record.label) if record.label else icon_concept(record.name)
    terms = join_terms(record.terms, exclude=words, max_terms=6)
    sentence = f"an icon of {article(words)} {words}"
    if terms:
        sentence += ", " + ", ".join(terms)
    return [f"{words} icon", sentence]


def read_tabler(pkg: Path) -> list[IconRecord]:
    """@tabler/icons: icons.json {name: {tags, category, styles}}, files icons/<style>/<name>.svg."""
    meta = json.loads((pkg / "icons.json").read_text(encoding="utf-8"))
    out = []
    for name, row in sorted(meta.items()):
        terms = [*row.get("tags", ())] + ([row["category"]] if row.get("category") else [])
        for style in sorted(row.get("styles") or {"outline": {}}):
            out.append(IconRecord(name, style, pkg / "icons" / style / f"{name}.svg", tuple(map(str, terms))))
    return out


def read_mdi(pkg: Path) -> list[IconRecord]:
    """@mdi/svg: meta.json [{name, aliases, tags: ["Arrow", "Files / Folders"], ...}], files svg/<name>.svg."""
    meta = json.loads((pkg / "meta.json").read_text(encoding="utf-8"))
    out = []
    for row in meta:
        tags = [part.strip() for tag in row.get("tags", ()) for part in str(tag).split("/")]
        aliases = [icon_concept(a) for a in row.get("aliases", ())]
        out.append(IconRecord(row["name"], "mdi", pkg / "svg" / f"{row['name']}.svg", tuple(aliases + tags)))
    return out


def read_lucide(pkg: Path) -> list[IconRecord]:
    """lucide-static: tags.json {name: [tags]}, files icons/<name>.svg."""
    meta = json.loads((pkg / "tags.json").read_text(encoding="utf-8"))
    return [
        IconRecord(name, "lucide", pkg / "icons" / f"{name}.svg", tuple(map(str, tags)))
        for name, tags in sorted(meta.items())
    ]


def read_fontawesome(pkg: Path) -> list[IconRecord]:
    """fontawesome-free: metadata/icons.yml {name: {label, search: {terms}, styles}}, svgs/<style>/<name>.svg."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    meta = yaml.load((pkg / "metadata" / "icons.yml").read_text(encoding="utf-8"), Loader=loader)
    out = []
    for name, row in sorted(meta.items(), key=lambda kv: str(kv[0])):
        name = str(name)
        terms = [str(t) for t in ((row.get("search") or {}).get("terms") or ())]
        label = str(row.get("label") or "")
        for style in row.get("styles") or ():
            path = pkg / "svgs" / style / f"{name}.svg"
            out.append(IconRecord(name, style, path, tuple(terms), label=label))
    return out


@dataclass(frozen=True)
class IconLibrary:
    """One npm icon package, its reader and its icons' license (read from the package's LICENSE)."""

    name: str
    package: str
    reader: Callable[[Path], list[IconRecord]]
    license: str


LIBRARIES: tuple[IconLibrary, ...] = (
    IconLibrary("tabler", "@tabler/icons@3.52.0", read_tabler, "MIT"),
    # LICENSE: "Icons: Apache 2.0"; the MIT line there covers code only.
    IconLibrary("mdi", "@mdi/svg@7.4.47", read_mdi, "Apache-2.0"),
    IconLibrary("lucide", "lucide-static@1.62.0", read_lucide, "ISC"),
    # LICENSE.txt: "Icons: CC BY 4.0 ... applies to all icons packaged as SVG".
    IconLibrary("fontawesome", "@fortawesome/fontawesome-free@7.3.1", read_fontawesome, "CC-BY-4.0"),
)
LIBRARY_NAMES = tuple(lib.name for lib in LIBRARIES)


def fetch_icons(
    cache: Path,
    *,
    limit: int | None = None,
    seed: int = 0,
    progress: bool = True,
    libraries: Sequence[str] | None = None,
) -> Dataset:
    """Builds the icons dataset: one SVG per (library, style, icon), two captions each.

    `limit` caps the number of concepts (icon names), chosen stably by a hash of the name;
    `libraries` picks a subset of LIBRARY_NAMES. A library that cannot be fetched is recorded in
    the quarantine (`source_unavailable`); if none can, SourceUnavailable is raised.
    """
    wanted = LIBRARY_NAMES if libraries is None else tuple(libraries)
    unknown = sorted(set(wanted) - set(LIBRARY_NAMES))
    if unknown:
        raise ValueError(f"unknown icon libraries {unknown}; choose from {list(LIBRARY_NAMES)}")
    builder = ImageTextBuilder("icons")
    records: list[tuple[IconLibrary, IconRecord]] = []
    for lib in LIBRARIES:
        if lib.name not in wanted:
            continue
        try:
            pkg = npm_package(lib.package, Path(cache))
            found = lib.reader(pkg)
        except SourceUnavailable as exc:
            builder.dataset.reject(f"icons/{lib.name}", lib.package, "source_unavailable", str(exc))
            continue
        except (OSError, ValueError, KeyError, yaml.YAMLError) as exc:
            detail = f"{type(exc).__name__}: {exc}"
            builder.dataset.reject(f"icons/{lib.name}", lib.package, "bad_metadata", detail)
            continue
        records.extend((lib, r) for r in found)
    if not records:
        reasons = "; ".join(r.detail for r in builder.dataset.quarantine)
        raise SourceUnavailable(f"no icon library could be read: {reasons}")
    concepts = sorted({icon_concept(r.name) for _, r in records})
    concepts.sort(key=lambda c: hashlib.sha256(c.encode()).hexdigest())
    keep = set(concepts if limit is None else concepts[:limit])
    chosen = [(lib, r) for lib, r in records if icon_concept(r.name) in keep]
    for lib, rec in tqdm(chosen, desc="icons", disable=not progress):
        source = f"icons/{lib.name}"
        item = f"{lib.name}/{rec.style}/{rec.name}"
        if not rec.path.exists():
            builder.dataset.reject(
                source, item, "missing_file", f"metadata names {rec.path}, which is absent"
            )
            continue
        mid = builder.add_image_file(rec.path, source=source, license=lib.license, item=item)
        if mid is None:
            continue
        concept = icon_concept(rec.name)
        for caption in icon_captions(rec):
            builder.add_caption(
                mid,
                caption,
                group_id=f"icons:{item}",
                source=source,
                license=lib.license,
                concept=concept,
            )
    return builder.finish(seed)


if __name__ == "__main__":
    from fusion.paths import cache_dir

    lim = int(sys.argv[1]) if len(sys.argv) > 1 else None
    ds = fetch_icons(cache_dir("data"), limit=lim)
    print(ds.summary(), ds.quarantine_counts())
