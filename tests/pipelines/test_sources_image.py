"""Tests of the image-text sources: `emoji`, `icons`, `openclipart` and their caption cleaning.

Fast tests build package-shaped folders in tmp_path (the real file layout and metadata format of
each npm/Debian package, with a few small generated PNG/WebP/SVG files) and a stand-in `npm`
executable on PATH, so the real download-and-cache code runs without a network. Slow tests fetch
the real packages from the npm registry and Debian mirrors.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from fusion.data import Dataset, content_id
from pipelines.sources.common import SourceUnavailable
from pipelines.sources.emoji import (
    EMOJIBASE,
    STYLES,
    EmojiEntry,
    emoji_captions,
    emoji_key,
    fetch_emoji,
    load_emojibase,
)
from pipelines.sources.icons import LIBRARIES, IconRecord, fetch_icons, icon_captions, icon_concept
from pipelines.sources.image import SOURCES_IMAGE
from pipelines.sources.image_common import BadImage, check_image_bytes
from pipelines.sources.openclipart import (
    DICT_DEB,
    DICT_FILE,
    SVG_DEB,
    SVG_DIR,
    fetch_openclipart,
    parse_clipart_svg,
)
from pipelines.sources.text_clean import clean_caption, name_to_words, quality_score

STYLE = {s.name: s for s in STYLES}
LIB = {lib.name: lib for lib in LIBRARIES}

# ---------------------------------------------------------------------------------------------
# Small real files


def png(color: tuple[int, int, int], size: int = 16, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (size, size), (*color, 255)).save(buf, format=fmt)
    return buf.getvalue()


def svg(shape: str) -> bytes:
    return f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24">{shape}</svg>'.encode()


def circle(r: int) -> bytes:
    return svg(f'<circle cx="12" cy="12" r="{r}" fill="currentColor"/>')


def _safe(spec: str) -> str:
    # The folder name common.npm_package derives from a spec.
    return spec.replace("/", "__").replace("@", "_")


def write_tree(root: Path, files: dict[str, bytes | str]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)


def unpacked_npm(cache: Path, spec: str, files: dict[str, bytes | str]) -> Path:
    """A package as npm_package leaves it after a finished download (with its `.done` marker)."""
    dest = cache / "npm" / _safe(spec)
    write_tree(dest / "package", files)
    (dest / ".done").touch()
    return dest / "package"


def unpacked_deb(cache: Path, name: str, files: dict[str, bytes | str]) -> Path:
    dest = cache / "deb" / name
    write_tree(dest / "root", files)
    (dest / ".done").touch()
    return dest / "root"


def fake_npm(tmp_path: Path, packages: dict[str, dict[str, bytes | str]]) -> tuple[Path, Path]:
    """A stand-in `npm` on PATH: `npm pack SPEC` writes a real tarball of the given files and logs SPEC.

    Returns (bin folder, log file). Real npm writes `package/...` archives named after the package.
    """
    store = tmp_path / "npm-store"
    for spec, files in packages.items():
        tgz = store / (_safe(spec) + ".tgz")
        tgz.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tgz, "w:gz") as tar:
            for rel, data in files.items():
                raw = data.encode() if isinstance(data, str) else data
                info = tarfile.TarInfo("package/" + rel)
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
    log = tmp_path / "npm-calls.log"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "npm"
    script.write_text(
        f"#!{sys.executable}\n"
        "import shutil, sys\n"
        "spec = sys.argv[2]\n"
        f"open({str(log)!r}, 'a').write(spec + '\\n')\n"
        "name = spec.replace('/', '__').replace('@', '_') + '.tgz'\n"
        f"shutil.copy({str(store)!r} + '/' + name, name)\n"
        "print(name)\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bindir, log


# ---------------------------------------------------------------------------------------------
# Emoji fixtures in the real formats


def emojibase_entry(hexcode: str, label: str, tags: list[str], group: int = 0, version: float = 1.0) -> dict:
    emoji = "".join(chr(int(cp, 16)) for cp in hexcode.split("-"))
    row = {"label": label, "hexcode": hexcode, "tags": tags, "emoji": emoji, "text": "", "type": 1}
    row.update(order=1, group=group, subgroup=0, version=version)
    return row


# A handful of colours, one per emoji, so that every picture is distinct unless a test wants otherwise.
EMOJI = [
    ("1F600", "grinning face", ["face", "grin", "smile"], (250, 200, 0)),
    ("2764-FE0F", "red heart", ["heart", "love"], (220, 0, 0)),
    ("1F44B", "waving hand", ["hello", "wave", "hand"], (240, 190, 120)),
    ("1F1EF-1F1F5", "flag: Japan", ["flag"], (255, 255, 255)),
    ("1F1FA-1F1F8", "flag: United States", ["flag"], (0, 0, 150)),
]
EXTRA = [(f"1F3{i:02X}", f"thing number {i}", ["thing"], (i * 9 % 256, 80, 160)) for i in range(40, 70)]


def emoji_packages(entries=EMOJI, broken: str | None = None, same_google_twitter: str | None = None) -> dict:
    data = [emojibase_entry(h, label, tags) for h, label, tags, _ in entries]
    data.append(emojibase_entry("1F3FB", "light skin tone", [], group=2))  # component: skipped
    data.append({"label": "regional indicator A", "hexcode": "1F1E6", "emoji": "x", "type": 1, "version": 0})
    google, twitter, openmoji, fluent = {}, {}, {}, {}
    for i, (h, _, _, rgb) in enumerate(entries):
        low = h.lower()
        google[f"img/google/64/{low}.png"] = png(rgb)
        twitter[f"img/twitter/64/{low}.png"] = png(rgb) if h == same_google_twitter else png(rgb, size=20)
        openmoji[f"color/svg/{h}.svg"] = circle(2 + i % 9)
        # The outline style draws every flag alike: the same black rectangle.
        flag = h.startswith("1F1")
        openmoji[f"black/svg/{h}.svg"] = (
            svg('<rect width="20" height="14"/>') if flag else svg(f'<rect width="{i + 2}" height="3"/>')
        )
        fluent[f"assets/{low}.webp"] = png(rgb, size=24, fmt="WEBP")
    if broken:
        google[f"img/google/64/{broken.lower()}.png"] = b"\x89PNG\r\n\x1a\n this is not a png"
    return {
        EMOJIBASE: {"en/data.json": json.dumps(data), "package.json": "{}"},
        STYLE["google"].package: google | {"emoji.json": "[]"},
        STYLE["twitter"].package: twitter | {"emoji.json": "[]"},
        STYLE["openmoji"].package: openmoji,
        STYLE["fluent3d"].package: fluent,
    }


NPM_STYLES = ("google", "twitter", "openmoji", "openmoji_black", "fluent3d")


def install_emoji(cache: Path, **kw) -> None:
    for spec, files in emoji_packages(**kw).items():
        unpacked_npm(cache, spec, files)


def assert_well_formed(ds: Dataset) -> None:
    """Invariants every fetched dataset must hold."""
    assert ds.pairs and ds.split_seed is not None
    concept_split: dict[str, str] = {}
    for p in ds.pairs:
        assert p.license and p.source, p
        assert ds.media[p.media_id].modality == "image"
        assert ds.media[p.caption_id].modality == "text"
        assert concept_split.setdefault(p.concept, p.split) == p.split, f"concept {p.concept} in two splits"
    for m in ds.media.values():
        if m.modality == "image":
            assert m.path and Path(m.path).is_absolute() and Path(m.path).exists()
            assert m.media_id == content_id("image", Path(m.path).read_bytes())
            assert m.license
    assert len({p.pair_id for p in ds.pairs}) == len(ds.pairs), "duplicate pairs"


# ---------------------------------------------------------------------------------------------
# Emoji


def test_emoji_key_ignores_variation_selector_and_case():
    assert emoji_key("2764-fe0f") == emoji_key("2764") == "2764"
    assert emoji_key("0023-FE0F-20E3") == "0023-20E3"


def test_load_emojibase_skips_components_and_loose_letters(tmp_path):
    pkg = unpacked_npm(tmp_path, EMOJIBASE, emoji_packages()[EMOJIBASE])
    entries = load_emojibase(pkg)
    assert [e.hexcode for e in entries] == [h for h, *_ in EMOJI]
    assert entries[0].label == "grinning face" and entries[0].tags == ("face", "grin", "smile")


def test_emoji_captions_name_and_keywords():
    caps = emoji_captions(EmojiEntry("1F34E", "red apple", "", ("apple", "fruit", "red"), 0.6))
    assert caps == ["red apple", "a red apple emoji: fruit"]
    caps = emoji_captions(EmojiEntry("1F35E", "egg", "", (), 1.0))
    assert caps == ["egg", "an egg emoji"]
    assert (
        emoji_captions(EmojiEntry("1F1EF-1F1F5", "flag: Japan", "", ("flag",), 2.0))[1]
        == "a flag, Japan emoji"
    )


def test_emoji_fixture_builds_styles_captions_licenses(tmp_path):
    install_emoji(tmp_path)
    ds = fetch_emoji(tmp_path, styles=NPM_STYLES, progress=False)
    assert_well_formed(ds)
    by_source = {}
    for p in ds.pairs:
        by_source.setdefault(p.source, set()).add(p.license)
    assert by_source == {
        "emoji/google": {"Apache-2.0"},
        "emoji/twitter": {"CC-BY-4.0"},
        "emoji/openmoji": {"CC-BY-SA-4.0"},
        "emoji/openmoji_black": {"CC-BY-SA-4.0"},
        "emoji/fluent3d": {"MIT"},
    }
    grin = [p for p in ds.pairs if p.concept == "1F600"]
    assert {ds.media[p.caption_id].text for p in grin} == {
        "grinning face",
        "a grinning face emoji: grin, smile",
    }
    assert len({p.media_id for p in grin}) == 5  # one picture per style
    # Captions are shared text items: one per distinct sentence, not per pair.
    assert ds.summary()["unique_captions"] == 2 * len(EMOJI)
    # The FE0F in `2764-FE0F` does not stop the files named `2764-fe0f.webp` / `2764-fe0f.png` matching.
    assert {p.source for p in ds.pairs if p.concept == "2764-FE0F"} >= {"emoji/fluent3d", "emoji/google"}


def test_emoji_identical_pictures_across_styles_are_one_item(tmp_path):
    install_emoji(tmp_path, same_google_twitter="1F600")
    ds = fetch_emoji(tmp_path, styles=("google", "twitter"), progress=False)
    assert_well_formed(ds)
    grin = [p for p in ds.pairs if p.concept == "1F600"]
    assert len({p.media_id for p in grin}) == 1
    assert len(grin) == 2  # two captions, not four
    other = [p for p in ds.pairs if p.concept == "1F44B"]
    assert len({p.media_id for p in other}) == 2


def test_emoji_broken_file_is_quarantined_and_other_styles_kept(tmp_path):
    install_emoji(tmp_path, broken="1F44B")
    ds = fetch_emoji(tmp_path, styles=("google", "twitter"), progress=False)
    rows = [q for q in ds.quarantine if q.reason == "bad_image"]
    assert len(rows) == 1 and rows[0].item == "1F44B" and rows[0].source == "emoji/google"
    assert {p.source for p in ds.pairs if p.concept == "1F44B"} == {"emoji/twitter"}


def test_emoji_picture_of_several_concepts_is_quarantined(tmp_path):
    install_emoji(tmp_path)
    ds = fetch_emoji(tmp_path, styles=("openmoji_black", "google"), progress=False)
    rows = [q for q in ds.quarantine if q.reason == "ambiguous_media"]
    assert len(rows) == 1 and "1F1EF-1F1F5" in rows[0].detail and "1F1FA-1F1F8" in rows[0].detail
    flags = [p for p in ds.pairs if p.concept.startswith("1F1")]
    assert {p.source for p in flags} == {"emoji/google"}
    assert_well_formed(ds)


def test_emoji_splits_hold_out_whole_concepts_and_follow_the_seed(tmp_path):
    install_emoji(tmp_path, entries=EMOJI + EXTRA)
    a = fetch_emoji(tmp_path, styles=NPM_STYLES, seed=0, progress=False)
    b = fetch_emoji(tmp_path, styles=NPM_STYLES, seed=0, progress=False)
    c = fetch_emoji(tmp_path, styles=NPM_STYLES, seed=1, progress=False)
    for ds in (a, b, c):
        assert_well_formed(ds)
        assert {p.split for p in ds.pairs} == {"train", "val", "test"}
    split_of = lambda ds: {p.concept: p.split for p in ds.pairs}  # noqa: E731
    assert split_of(a) == split_of(b)
    assert split_of(a) != split_of(c)
    assert (a.split_seed, c.split_seed) == (0, 1)


def test_emoji_limit_caps_concepts_stably(tmp_path):
    install_emoji(tmp_path, entries=EMOJI + EXTRA)
    small = fetch_emoji(tmp_path, styles=("google",), limit=7, progress=False)
    again = fetch_emoji(tmp_path, styles=("google",), limit=7, progress=False)
    assert small.summary()["concepts"] == 7
    assert {p.concept for p in small.pairs} == {p.concept for p in again.pairs}
    bigger = fetch_emoji(tmp_path, styles=("google",), limit=12, progress=False)
    assert {p.concept for p in small.pairs} < {p.concept for p in bigger.pairs}


def test_emoji_downloads_once_then_uses_the_cache(tmp_path, monkeypatch):
    packages = {k: v for k, v in emoji_packages().items() if k in (EMOJIBASE, STYLE["google"].package)}
    bindir, log = fake_npm(tmp_path, packages)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    cache = tmp_path / "cache"
    first = fetch_emoji(cache, styles=("google",), progress=False)
    assert sorted(log.read_text().split()) == sorted(packages)
    assert (cache / "npm" / _safe(EMOJIBASE) / ".done").exists()

    def no_subprocess(*a, **k):
        raise AssertionError("a warm fetch must not run any command")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    second = fetch_emoji(cache, styles=("google",), progress=False)
    assert len(log.read_text().split()) == len(packages)
    assert second.pairs == first.pairs and second.media == first.media


def test_emoji_without_npm_raises_source_unavailable(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(SourceUnavailable, match="npm"):
        fetch_emoji(tmp_path / "cache", progress=False)


def test_emoji_style_without_its_client_is_recorded_and_others_work(tmp_path, monkeypatch):
    install_emoji(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no apt-get for the Noto font
    ds = fetch_emoji(tmp_path, styles=("google", "noto"), progress=False)
    rows = [q for q in ds.quarantine if q.reason == "source_unavailable"]
    assert len(rows) == 1 and rows[0].source == "emoji/noto" and "apt-get" in rows[0].detail
    assert {p.source for p in ds.pairs} == {"emoji/google"}


def test_emoji_rejects_unknown_style(tmp_path):
    with pytest.raises(ValueError, match="unknown emoji styles"):
        fetch_emoji(tmp_path, styles=("clay",), progress=False)


# ---------------------------------------------------------------------------------------------
# Icons


def icon_packages() -> dict[str, dict[str, bytes | str]]:
    tabler_meta = {
        "home": {"name": "home", "category": "Buildings", "tags": ["house", "dashboard", "living"]}
        | {"styles": {"outline": {"version": "1.0"}, "filled": {"version": "2.0"}}},
        "home-2": {"name": "home-2", "category": "Buildings", "tags": ["house"], "styles": {"outline": {}}},
        "ghost": {"name": "ghost", "category": "", "tags": ["spooky"], "styles": {"outline": {}}},
    }
    mdi_meta = [
        {"id": "A", "name": "home-outline", "codepoint": "F02DC", "aliases": ["house-outline"]}
        | {"tags": ["Home Automation", "Places / Buildings"], "styles": ["outline"], "deprecated": False},
        {"id": "B", "name": "rocket", "aliases": [], "tags": [], "deprecated": False},
    ]
    fa_yml = (
        "house:\n  label: House\n  search:\n    terms:\n      - abode\n      - building\n"
        "  styles:\n    - solid\n    - regular\n  unicode: f015\n"
        "'0':\n  label: '0'\n  search:\n    terms:\n      - digit zero\n  styles:\n    - solid\n"
    )
    return {
        LIB["tabler"].package: {
            "icons.json": json.dumps(tabler_meta),
            "icons/outline/home.svg": circle(5),
            "icons/filled/home.svg": circle(6),
            "icons/outline/home-2.svg": circle(7),
            "icons/outline/ghost.svg": svg("<path d='M2 2 L 20 20'"),  # truncated: broken XML
        },
        LIB["mdi"].package: {
            "meta.json": json.dumps(mdi_meta),
            "svg/home-outline.svg": circle(8),
            "svg/rocket.svg": circle(9),
        },
        LIB["lucide"].package: {
            "tags.json": json.dumps({"house": ["home", "living"]}),
            "icons/house.svg": circle(10),
        },
        LIB["fontawesome"].package: {
            "metadata/icons.yml": fa_yml,
            "svgs/solid/house.svg": circle(11),
            "svgs/regular/house.svg": circle(4),
            "svgs/solid/0.svg": svg('<text x="2" y="20">0</text>'),
        },
    }


def test_icon_names_to_concepts_and_captions():
    assert icon_concept("home-outline") == icon_concept("home-2") == icon_concept("home") == "home"
    assert icon_concept("arrow-big-down-line") == "arrow big down line"
    assert icon_concept("2") == "2"
    rec = IconRecord("alarm-clock", "outline", Path("x.svg"), ("alarm", "Time", "wake up", "clock"))
    assert icon_captions(rec) == ["alarm clock icon", "an icon of an alarm clock, time, wake up"]
    assert icon_captions(IconRecord("house", "solid", Path("x"), (), label="House"))[0] == "house icon"


def test_icons_fixture_libraries_licenses_and_quarantine(tmp_path):
    for spec, files in icon_packages().items():
        unpacked_npm(tmp_path, spec, files)
    ds = fetch_icons(tmp_path, progress=False)
    assert_well_formed(ds)
    licenses = {p.source: p.license for p in ds.pairs}
    assert licenses == {
        "icons/tabler": "MIT",
        "icons/mdi": "Apache-2.0",
        "icons/lucide": "ISC",
        "icons/fontawesome": "CC-BY-4.0",
    }
    home = {p.source for p in ds.pairs if p.concept == "home"}
    assert home == {"icons/tabler", "icons/mdi"}
    house = [p for p in ds.pairs if p.concept == "house"]
    assert len({p.media_id for p in house}) == 3  # lucide + fontawesome solid and regular
    caps = {ds.media[p.caption_id].text for p in ds.pairs if p.source == "icons/mdi" and p.concept == "home"}
    assert caps == {"home icon", "an icon of a home, house, home automation, places, buildings"}
    assert {(q.reason, q.item) for q in ds.quarantine} == {("bad_svg", "tabler/outline/ghost")}
    assert ds.media[house[0].media_id].path.endswith(".svg")


def test_icons_metadata_naming_a_missing_file_is_quarantined(tmp_path):
    files = icon_packages()[LIB["lucide"].package]
    files["tags.json"] = json.dumps({"house": ["home"], "tent": ["camping"]})
    unpacked_npm(tmp_path, LIB["lucide"].package, files)
    ds = fetch_icons(tmp_path, libraries=("lucide",), progress=False)
    assert [(q.reason, q.item) for q in ds.quarantine] == [("missing_file", "lucide/lucide/tent")]
    assert {p.concept for p in ds.pairs} == {"house"}


def test_icons_library_without_client_is_recorded(tmp_path, monkeypatch):
    unpacked_npm(tmp_path, LIB["lucide"].package, icon_packages()[LIB["lucide"].package])
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    ds = fetch_icons(tmp_path, libraries=("lucide", "mdi"), progress=False)
    assert [(q.source, q.reason) for q in ds.quarantine] == [("icons/mdi", "source_unavailable")]
    with pytest.raises(SourceUnavailable, match="no icon library"):
        fetch_icons(tmp_path, libraries=("mdi",), progress=False)


# ---------------------------------------------------------------------------------------------
# Openclipart


def clipart_svg(
    title: str, description: str = "", subjects: tuple[str, ...] = (), creator: str = ""
) -> bytes:
    """An SVG with the RDF metadata block Open Clip Art Library files carry (cc namespace of 2004)."""
    lis = "".join(f"<rdf:li>{s}</rdf:li>" for s in subjects)
    return (
        '<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n'
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:cc="http://web.resource.org/cc/" '
        'xmlns:dc="http://purl.org/dc/elements/1.1/" '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" width="100" height="100">'
        '<metadata><rdf:RDF><cc:Work rdf:about="">'
        f"<dc:title>{title}</dc:title><dc:description>{description}</dc:description>"
        f"<dc:subject><rdf:Bag>{lis}</rdf:Bag></dc:subject>"
        '<dc:publisher><cc:Agent rdf:about="http://www.openclipart.org/"><dc:title>Open Clip Art Library'
        "</dc:title></cc:Agent></dc:publisher>"
        f"<dc:creator><cc:Agent><dc:title>{creator}</dc:title></cc:Agent></dc:creator>"
        '<cc:license rdf:resource="http://web.resource.org/cc/PublicDomain"/>'
        "</cc:Work></rdf:RDF></metadata>"
        f'<rect width="{len(title) + 10}" height="40" fill="#{zlib.crc32(title.encode()) % 0xFFFFFF:06x}"/></svg>'
    ).encode()


def install_openclipart(cache: Path) -> None:
    files: dict[str, bytes | str] = {
        "recreation/games/two_red_dice_01.svg": clipart_svg(
            "Two Red Dice", "two red dice", ("", "game", "dice")
        ),
        "geography/earth_globe_01.svg": clipart_svg(
            "Earth Globe", "Simple globe centered on North America", ("earth globe northamerica",)
        ),
        "science/medicine/siringa_architetto_franc_01.svg": clipart_svg(
            "siringa", "", ("architetto francesco rollandin",), creator="Architetto Francesco Rollandin"
        ),
        "unsorted/broken.svg": b"<svg xmlns='http://www.w3.org/2000/svg'><g></svg>",
    }
    for i, name in enumerate(["acroread", "kmail", "konsole", "gimp"]):
        files[f"computer/icons/lemon-theme/apps/{name}.svg"] = clipart_svg(
            "Lemon SVG theme", "", ("icon", "hash", "application")
        ).replace(b'width="25"', f'width="{30 + i}"'.encode())
    for i in range(30):
        files[f"shapes/star_{i:02d}.svg"] = clipart_svg(f"Star number {i}", "", ("shape", "star"))
    unpacked_deb(cache, SVG_DEB, {f"{SVG_DIR}/{k}": v for k, v in files.items()})
    words = (
        "two\nred\ndie\ndice\nearth\nglobe\nsimple\ncentered\non\nnorth\namerica\ngame\nstar\nnumber\nshape\n"
    )
    unpacked_deb(cache, DICT_DEB, {DICT_FILE: words + "icon\napplication\nhash\nkmail\n"})


def test_parse_clipart_metadata_takes_the_works_own_fields():
    meta = parse_clipart_svg(clipart_svg("Two Red Dice", "desc", ("a", "b"), "Ann"), Path("x"), "x.svg")
    assert (meta.title, meta.description, meta.subjects, meta.creator) == (
        "Two Red Dice",
        "desc",
        ("a", "b"),
        "Ann",
    )
    with pytest.raises(ValueError, match="not <svg>"):
        parse_clipart_svg(b"<html/>", Path("x"), "x.svg")


def test_openclipart_raw_and_clean_captions_quality(tmp_path):
    install_openclipart(tmp_path)
    ds = fetch_openclipart(tmp_path, progress=False)
    assert_well_formed(ds)
    assert {p.license for p in ds.pairs} == {"CC-PDDC"}
    by_item = {p.group_id.split(":", 1)[1]: p for p in ds.pairs}
    dice = by_item["recreation/games/two_red_dice_01.svg"]
    assert ds.media[dice.caption_id].text == "two red dice, game"
    assert ds.media[dice.raw_caption_id].text == "Two Red Dice\ntwo red dice\ngame, dice"
    globe = by_item["geography/earth_globe_01.svg"]
    assert ds.media[globe.caption_id].text == (
        "earth globe: simple globe centered on north america, earth globe northamerica"
    )
    # A title shared by a whole collection falls back to the file name; the author is no tag.
    lemon = by_item["computer/icons/lemon-theme/apps/kmail.svg"]
    assert ds.media[lemon.caption_id].text.startswith("kmail")
    siringa = by_item["science/medicine/siringa_architetto_franc_01.svg"]
    assert ds.media[siringa.caption_id].text == "siringa"
    for p in ds.pairs:
        assert p.quality is not None and 0.0 <= p.quality <= 1.0
    assert dice.quality > siringa.quality and globe.quality > siringa.quality
    assert [(q.reason, q.item) for q in ds.quarantine] == [("bad_svg", "unsorted/broken.svg")]


def test_openclipart_limit_and_warm_index(tmp_path, monkeypatch):
    install_openclipart(tmp_path)
    first = fetch_openclipart(tmp_path, limit=10, progress=False)
    assert len({p.media_id for p in first.pairs}) == 10
    assert (tmp_path / "openclipart" / "metadata.json").exists()
    # The warm path reads the index instead of parsing every SVG again.
    import pipelines.sources.openclipart as oc

    monkeypatch.setattr(oc, "parse_clipart_svg", lambda *a: pytest.fail("parsed again"))
    second = fetch_openclipart(tmp_path, limit=10, progress=False)
    assert second.pairs == first.pairs
    assert [q.reason for q in second.quarantine] == ["bad_svg"]


# ---------------------------------------------------------------------------------------------
# Cleaning, checks, registry


def test_clean_caption_and_names():
    assert name_to_words("arrow-big-down_line") == "arrow big down line"
    assert name_to_words("HomeOutline") == "home outline"
    assert clean_caption("Clipart by <b>Nicu</b> - baloon_04.svg") == "clipart by nicu baloon"
    assert clean_caption("EPS converted from http://aiga.org") == "eps converted from"
    assert clean_caption("star 3a9f0c7e") == "star"
    assert clean_caption("decade") == "decade"  # hex-looking words without a digit are words
    assert clean_caption("  ___ ") == ""


def test_quality_score_prefers_plain_english():
    vocab = frozenset({"red", "apple", "on", "table", "a", "die"})
    good = quality_score("a red apple on a table", vocab)
    noisy = quality_score("siringa architetto rollandin", vocab)
    assert good == 1.0 and noisy == 0.0
    assert quality_score("apple", vocab) == 0.5  # one word is a weak caption
    assert 0.0 < quality_score("red apple xyzzy", vocab) < good
    assert quality_score("", vocab) == 0.0
    assert quality_score("dies", vocab) == 0.5  # inflection of a known word
    assert quality_score(" ".join(["apple"] * 50), vocab) == 0.5  # rambling text decays


def test_check_image_bytes_types():
    check_image_bytes(png((1, 2, 3)), ".png")
    check_image_bytes(png((1, 2, 3), fmt="WEBP"), ".webp")
    check_image_bytes(circle(3), ".svg")
    for data, suffix, reason in [
        (b"", ".png", "empty_file"),
        (b"not an image", ".png", "bad_image"),
        (b"<svg", ".svg", "bad_svg"),
        (b"<html></html>", ".svg", "bad_svg"),
        (png((1, 2, 3)), ".bmpx", "unsupported_format"),
    ]:
        with pytest.raises(BadImage) as err:
            check_image_bytes(data, suffix)
        assert err.value.reason == reason


def test_registry_lists_the_three_sources():
    assert set(SOURCES_IMAGE) == {"emoji", "icons", "openclipart"}
    assert SOURCES_IMAGE["emoji"] is fetch_emoji


# ---------------------------------------------------------------------------------------------
# Real packages (network: npm registry and Debian mirrors)


def _no_commands(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("a warm fetch must not run any command")

    monkeypatch.setattr(subprocess, "run", fail)


@pytest.mark.slow
def test_real_emoji_all_styles(tmp_path, monkeypatch):
    ds = fetch_emoji(tmp_path, limit=25, progress=False)
    assert_well_formed(ds)
    assert ds.summary()["concepts"] == 25
    assert {p.source for p in ds.pairs} == {f"emoji/{s.name}" for s in STYLES}
    assert not [q for q in ds.quarantine if q.reason != "ambiguous_media"]
    noto = [ds.media[p.media_id] for p in ds.pairs if p.source == "emoji/noto"]
    with Image.open(noto[0].path) as im:
        assert im.size == (160, 160) and im.getbbox() is not None
    _no_commands(monkeypatch)
    again = fetch_emoji(tmp_path, limit=25, progress=False)
    assert again.pairs == ds.pairs


@pytest.mark.slow
def test_real_icons(tmp_path, monkeypatch):
    ds = fetch_icons(tmp_path, limit=200, progress=False)
    assert_well_formed(ds)
    assert {p.source for p in ds.pairs} == {f"icons/{lib.name}" for lib in LIBRARIES}
    assert not [q for q in ds.quarantine if q.reason != "ambiguous_media"]
    _no_commands(monkeypatch)
    assert fetch_icons(tmp_path, limit=200, progress=False).pairs == ds.pairs


@pytest.mark.slow
def test_real_openclipart(tmp_path, monkeypatch):
    ds = fetch_openclipart(tmp_path, limit=200, progress=False)
    assert_well_formed(ds)
    assert len({p.media_id for p in ds.pairs}) >= 190
    assert all(p.raw_caption_id and p.quality is not None for p in ds.pairs)
    quality = sorted(p.quality for p in ds.pairs)
    assert quality[0] < 0.5 < quality[-1]  # the noise the quality ablation needs is there
    _no_commands(monkeypatch)
    assert fetch_openclipart(tmp_path, limit=200, progress=False).pairs == ds.pairs


def test_bench_sources_reports_cold_and_warm_rows(tmp_path):
    from benchmarks.bench_ingest import bench_sources

    def fetch_fixture_icons(cache, *, limit=None, seed=0, progress=True):
        # A fresh cache per (source, limit) as the benchmark makes it; the packages are laid out there.
        if not (cache / "npm").exists():
            for spec, files in icon_packages().items():
                unpacked_npm(cache, spec, files)
        return fetch_icons(cache, limit=limit, seed=seed, progress=progress)

    def unavailable(cache, **kw):
        raise SourceUnavailable("no registry here")

    rows = bench_sources(
        ["icons", "gone"], limits=[2, None], registry={"icons": fetch_fixture_icons, "gone": unavailable}
    )
    assert [(r["source"], r["limit"]) for r in rows] == [
        ("icons", 2),
        ("icons", "full"),
        ("gone", 2),
        ("gone", "full"),
    ]
    assert rows[0]["concepts"] == 2 and rows[1]["concepts"] == 4
    assert {"cold_s", "warm_s", "pairs_per_s_cold", "cold_over_warm"} <= set(rows[1])
    assert rows[2]["error"] == "no registry here"
