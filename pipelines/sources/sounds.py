"""The `sounds` source: short sound files from Debian packages, captioned from their file names.

Fetches `sound-theme-freedesktop`, `lmms-common` (its samples folder), `sonic-pi-samples` and
`wesnoth-1.16-data` (its sound effects only) with `apt-get download` (no root), keeps every
WAV/OGG/OGA/FLAC file as it is (the encoder decodes it at encode time), and turns its file and
folder names into a caption ("bass_hit_c.flac" -> "a bass hit in c"). The raw name is kept as a
raw caption for the quality ablation. Licences come per file from each package's Debian
copyright file. Files that do not decode or are too short or too long go to quarantine.

Run: `python -m pipelines.sources.sounds CACHE_DIR [LIMIT]` prints the dataset summary.
"""

from __future__ import annotations

import fnmatch
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from debian.copyright import Copyright, NotMachineReadableError
from tqdm import tqdm

from fusion.data import Dataset, MediaItem, Pair, content_id
from fusion.data.builder import default_splits
from fusion.media import MediaError, MediaLimits, probe
from pipelines.sources.common import debian_package

SOURCE = "sounds"
AUDIO_SUFFIXES = (".wav", ".ogg", ".oga", ".flac")
# Clips under 50 ms are single-cycle wavetables (lmms shapes/), not sounds to caption; long loops and drones are
# cut by the encoder's window anyway, so beyond 30 s they only cost decoding time.
LIMITS = MediaLimits(min_audio_seconds=0.05, max_audio_seconds=30.0)


@dataclass(frozen=True)
class SoundPackage:
    """A Debian package and the folders (relative to its unpacked root) that hold its sounds."""

    name: str
    folders: tuple[str, ...]
    # Folder names that say nothing about the sound (dropped from captions and concepts).
    generic_folders: tuple[str, ...] = ()


PACKAGES: tuple[SoundPackage, ...] = (
    SoundPackage("sound-theme-freedesktop", ("usr/share/sounds/freedesktop",), ("stereo",)),
    SoundPackage("lmms-common", ("usr/share/lmms/samples",), ("misc", "instruments")),
    SoundPackage("sonic-pi-samples", ("usr/share/sonic-pi/samples",), ("samples",)),
    SoundPackage(
        "wesnoth-1.16-data",
        ("usr/share/games/wesnoth/1.16/data/core/sounds", "usr/share/games/wesnoth/1.16/sounds"),
        ("sounds", "core"),
    ),
)


# ---------------------------------------------------------------------------------------------
# Licences from Debian copyright files


# Free-text copyright files (not machine-readable): the earliest phrase found names the licence.
_FREE_TEXT_LICENSES: tuple[tuple[str, str], ...] = (
    (r"GNU General Public License,? version 2,? or (at your option )?any later", "GPL-2+"),
    (r"GNU General Public License version 2\s+or at your option any later", "GPL-2+"),
    (r"GNU General Public License", "GPL"),
    (r"\bMIT license\b", "MIT"),
    (r"Creative Commons Attribution[- ]Share[- ]?Alike", "CC-BY-SA"),
    (r"Creative Commons Attribution", "CC-BY"),
    (r"\bpublic domain\b", "public-domain"),
)


@dataclass(frozen=True)
class CopyrightInfo:
    """Licences of one package: DEP-5 `Files:` paragraphs in order, or one licence for all files."""

    package: str
    rules: tuple[tuple[tuple[str, ...], str], ...]
    fallback: str

    def license_for(self, rel_path: str) -> str:
        """Licence of an installed file (path relative to the package root).

        DEP-5 patterns name paths in the *source* tree ("etc/samples/x.flac"), which differ from
        installed paths ("usr/share/sonic-pi/samples/x.flac"). A pattern matches when its file
        part matches the file name and its nearest folder (if any) is one of the file's folders;
        as in DEP-5, the last matching paragraph wins.
        """
        parts = rel_path.strip("/").split("/")
        name, dirs = parts[-1], parts[:-1]
        found = self.fallback
        for patterns, lic in self.rules:
            for pat in patterns:
                pparts = pat.strip("/").split("/")
                if not fnmatch.fnmatchcase(name, pparts[-1]):
                    continue
                if len(pparts) > 1 and not any(fnmatch.fnmatchcase(d, pparts[-2]) for d in dirs):
                    continue
                found = lic
                break
        return found


def read_copyright(root: Path, package: str) -> CopyrightInfo:
    """Parses usr/share/doc/<package>/copyright under an unpacked package root.

    A machine-readable (DEP-5) file is read with python-debian (debian.copyright): one rule per
    `Files:` paragraph, the first one's licence as the fallback. Any other file is free text: the
    earliest licence phrase found names the licence of every file, else "unknown (see copyright file)".

    Raises FileNotFoundError when the package ships no copyright file (every Debian package must).
    """
    path = root / "usr" / "share" / "doc" / package / "copyright"
    text = path.read_text(encoding="utf-8", errors="replace")
    rules: list[tuple[tuple[str, ...], str]] = []
    try:
        # strict=False: a machine-readable file with a missing field (Copyright, say) still reads.
        dep5 = Copyright(text.splitlines(keepends=True), strict=False)
    except (NotMachineReadableError, ValueError):
        dep5 = None  # free text, which is allowed (and common): the phrase search below names the licence
    if dep5 is not None:
        for para in dep5.all_files_paragraphs():
            synopsis = para.license.synopsis.strip() if para.license is not None else ""
            if synopsis:
                rules.append((tuple(para.files), synopsis))
    fallback = "unknown (see copyright file)"
    if rules:
        fallback = rules[0][1]
    else:
        # Free text: look after the first "License:" heading first (credits above it may mention
        # "public domain" samples), then in the whole text.
        head = re.search(r"^\s*Licen[cs]e:?\s*$", text, flags=re.IGNORECASE | re.MULTILINE)
        for body in ([text[head.end() :]] if head else []) + [text]:
            hits = []
            for rank, (pattern, lic) in enumerate(_FREE_TEXT_LICENSES):
                m = re.search(pattern, body, flags=re.IGNORECASE)
                if m:  # earliest phrase wins; at one position the more specific pattern (listed first)
                    hits.append((m.start(), rank, lic))
            if hits:
                fallback = min(hits)[2]
                break
    return CopyrightInfo(package, tuple(rules), fallback)


# ---------------------------------------------------------------------------------------------
# Captions from file names

# Abbreviations seen in sample packs, expanded to words a caption model knows.
ABBREVIATIONS: dict[str, str] = {
    "ambi": "ambient",
    "amb": "ambient",
    "bd": "bass drum",
    "sn": "snare",
    "sd": "snare drum",
    "hh": "hi-hat",
    "hihat": "hi-hat",
    "perc": "percussion",
    "sfx": "sound effect",
    "fx": "effect",
    "elec": "electronic",
    "guit": "guitar",
    "gtr": "guitar",
    "misc": "",
    "kick": "kick drum",
    "bassdrum": "bass drum",
    "lo": "low",
    "hi": "high",
    "mid": "middle",
    "sqr": "square",
    "tri": "triangle",
    "saw": "sawtooth",
    "inv": "inverted",
    "dist": "distorted",
    "filt": "filtered",
    "die": "death cry",
    "sml": "small",
    "vox": "voice",
    "voxy": "voice-like",
    "dnb": "drum and bass",
    "lfo": "LFO",
    "fm": "FM",
    "tb303": "TB-303",
    "stringsnpads": "strings and pads",
    "bassloops": "bass loops",
    "em9": "E minor ninth",
}

# Note names that end a name ("bass_hit_c") read as a key, not a word.
_NOTE_NAMES = {"c", "d", "e", "f", "g", "a", "b"}
_ELECTRIC_BEFORE = {"organ", "piano", "guitar", "bass", "drum", "drums"}
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")

# How a folder qualifies the names inside it; skipped when the name already has one of its words.
FOLDER_CONTEXT: dict[str, str] = {
    "basses": "{} bass",
    "bassloops": "{} bass loop",
    "beats": "{} beat",
    "drums": "{} drum sound",
    "effects": "{} sound effect",
    "latin": "latin {}",
    "shapes": "{} waveform",
    "waveforms": "{} waveform",
    "stringsnpads": "{} pad",
    "ambient": "{} ambience",
    "horn-signals": "{} horn signal",
}


def split_words(stem: str) -> list[str]:
    """Splits a file or folder name into lower-case words: snake, kebab, camel case, counts dropped.

    "bass_hit_c" -> ["bass", "hit", "c"]; "HiHatOpen02" -> ["hihat", "open"];
    "909beat01" -> ["909", "beat"]; "tb303_01" -> ["tb303"] (machine numbers stay, take numbers go).
    """
    stem = _CAMEL.sub(" ", stem)
    words: list[str] = []
    for token in re.split(r"[\s_\-.+!,()\[\]]+", stem):
        m = re.fullmatch(r"(\d*)([a-zA-Z]*)(\d*)", token)
        if m is None:  # digits inside letters ("w2a"): keep as it is
            words.append(token.lower())
            continue
        lead, letters, trail = m.groups()
        if lead and len(letters) == 1 and not trail:  # "3d", "2x": one word, not a number and a letter
            words.append(token.lower())
            continue
        if len(lead) >= 3:
            words.append(lead)
        if letters and len(trail) >= 3:
            words.append((letters + trail).lower())
        elif letters:
            words.append(letters.lower())
        elif len(trail) >= 3 and not lead:
            words.append(trail)
    # Camel case splits "HiHat" in two; sample names mean the cymbal.
    joined: list[str] = []
    for w in words:
        if joined and joined[-1] == "hi" and w == "hat":
            joined[-1] = "hihat"
        else:
            joined.append(w)
    return joined


# Modifiers that sample names put last ("kick_hard", "hihat_closed") move before the noun.
_MODIFIERS = {
    "hard",
    "soft",
    "closed",
    "open",
    "opened",
    "short",
    "long",
    "heavy",
    "slight",
    "medium",
    "distorted",
    "muffled",
    "harsh",
    "big",
    "small",
    "sml",
    "low",
    "high",
    "middle",
    "fat",
    "thick",
    "old",
}


def clean_name(stem: str, folder: str = "") -> str:
    """A caption phrase (no article) from a file name and its folder.

    ("bass_hit_c", "") -> "bass hit in C"; ("snare01", "drums") -> "snare drum sound";
    ("ambi_glass_hum", "") -> "ambient glass hum". Returns "" when nothing readable is left.
    """
    words = split_words(stem)
    out: list[str] = []
    for i, w in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else ""
        if w == "e" and nxt in _ELECTRIC_BEFORE:
            out.append("electric")
        elif w in _NOTE_NAMES and i > 0:
            out.append(f"in {w.upper()}" if i == len(words) - 1 else w.upper())
        elif len(w) == 1 and w not in ABBREVIATIONS:
            continue  # a stray letter ("w2_sharp") says nothing
        elif rep := ABBREVIATIONS.get(w, w):
            out.append(rep)
    # Sonic Pi names lead with a category: "loop_amen" is an amen loop, "drum_bass_hard" a bass drum.
    if len(out) > 1 and out[0] == "loop":
        out = out[1:] + ["loop"]
    elif len(out) > 1 and out[0] == "drum" and "roll" not in out:
        rest = out[1:]
        # "drum_tom_lo" -> "low tom drum"; "drum_cymbal_open" -> "open cymbal"; "kick" is "kick drum" already
        out = rest + ["drum"] if {"bass", "tom", "snare"} & set(rest) else rest
    mods = [w for w in out if w in _MODIFIERS]
    text = " ".join(mods + [w for w in out if w not in _MODIFIERS])
    template = FOLDER_CONTEXT.get(folder.lower())
    if text and template:
        fixed = set(template.replace("{}", " ").split())
        if not fixed & set(text.split()):
            text = template.format(text)
    return re.sub(r"\s+", " ", text).strip()


def with_article(phrase: str) -> str:
    """Prefixes "a"/"an" to a noun phrase ("electronic beep" -> "an electronic beep")."""
    if not phrase:
        return phrase
    first = phrase.split()[0]
    low = first.lower()
    vowel_sound = low[0] in "aeiou" and not low.startswith(("uni", "use", "one", "eu"))
    if first.isupper() and first[0] in "AEFHILMNORSX":  # initialisms: "an LFO", "an FM ..."
        vowel_sound = True
    if first[0].isdigit():
        vowel_sound = first.startswith(("8", "11", "18"))
    return ("an " if vowel_sound else "a ") + phrase


def sound_caption(stem: str, folder: str = "") -> str:
    """The caption of a sound file: ("bass_hit_c", "") -> "a bass hit in C"; "" if nothing is readable."""
    return with_article(clean_name(stem, folder))


# ---------------------------------------------------------------------------------------------
# Fetching


def _prune_to_sounds(root: Path, pkg: SoundPackage) -> None:
    """Deletes everything but the sound folders and the docs from an unpacked package.

    wesnoth-1.16-data unpacks to about 190 MB of which the sounds are a few; the `.done`
    marker of debian_package stays, so the prune happens once and the cache stays small.
    """
    marker = root.parent / ".pruned"
    if marker.exists():
        return
    keep = tuple(f"{f.strip('/')}/" for f in pkg.folders) + (f"usr/share/doc/{pkg.name}/",)
    for dirpath, _dirnames, filenames in os.walk(root):
        for fn in filenames:
            path = Path(dirpath) / fn
            if not path.relative_to(root).as_posix().startswith(keep):
                path.unlink()
    for dirpath, _dirnames, _filenames in sorted(os.walk(root), key=lambda t: -len(t[0])):
        if dirpath != str(root) and not os.listdir(dirpath):
            os.rmdir(dirpath)
    marker.touch()


def _sound_files(root: Path, pkg: SoundPackage) -> list[tuple[Path, str]]:
    """(file, folder name used for the caption) of every sound in the package, sorted."""
    found: list[tuple[Path, str]] = []
    for folder in pkg.folders:
        base = root / folder
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            if path.suffix.lower() in AUDIO_SUFFIXES and path.is_file():
                parent = path.parent.name if path.parent != base else ""
                if parent in pkg.generic_folders:
                    parent = ""
                found.append((path, parent))
    return found


def fetch_sounds(
    cache: Path,
    *,
    limit: int | None = None,
    seed: int = 0,
    progress: bool = True,
    packages: Sequence[str] | None = None,
    fetch: Callable[[str, Path], Path] = debian_package,
) -> Dataset:
    """Builds the `sounds` dataset from Debian sound packages.

    `limit` caps the number of sound files taken (packages in PACKAGES order, small ones first;
    packages not reached are not downloaded). `packages` picks a subset by name. Symlinks that
    point at a file already taken and identical bytes under two names dedupe by content id;
    the second name still gets its caption paired with the same media item.
    """
    cache = Path(cache).resolve()
    chosen = [p for p in PACKAGES if packages is None or p.name in packages]
    if packages is not None:
        unknown = set(packages) - {p.name for p in PACKAGES}
        if unknown:
            raise ValueError(f"unknown sound packages {sorted(unknown)}; known: {[p.name for p in PACKAGES]}")
    ds = Dataset(SOURCE, split_seed=seed)
    rows: list[tuple[str, str, str, str, str, str]] = []  # media_id, caption, raw, concept, license, src
    taken = 0
    for pkg in chosen:
        if limit is not None and taken >= limit:
            break
        root = fetch(pkg.name, cache)
        _prune_to_sounds(root, pkg)
        rights = read_copyright(root, pkg.name)
        files = _sound_files(root, pkg)
        if limit is not None:
            files = files[: limit - taken]
        for path, folder in tqdm(files, desc=f"sounds:{pkg.name}", disable=not progress, unit="file"):
            rel = path.relative_to(root).as_posix()
            item = f"{pkg.name}:{rel}"
            taken += 1
            try:  # decodes the whole file: a header that reads is no proof the audio does
                probe(path, "audio", item, LIMITS)
            except MediaError as exc:
                ds.reject(SOURCE, item, exc.reason, exc.detail)
                continue
            caption = sound_caption(path.stem, folder)
            if not caption:
                ds.reject(SOURCE, item, "no_caption", f"nothing readable in {path.name!r}")
                continue
            real = path.resolve()
            if not real.is_relative_to(root.resolve()):
                ds.reject(SOURCE, item, "outside_package", f"links to {real}")
                continue
            mid = content_id("audio", real.read_bytes())
            lic = rights.license_for(real.relative_to(root.resolve()).as_posix())
            ds.add_media(MediaItem(mid, "audio", path=str(real), source=f"debian:{pkg.name}", license=lic))
            raw = f"{folder}/{path.name}" if folder else path.name
            concept = clean_name(path.stem, folder)
            rows.append((mid, caption, raw, concept, lic, f"debian:{pkg.name}"))
    # A media item stored under two names (a symlink, a copy) keeps the concept of its first name,
    # so that all its pairs land in one split.
    media_concept: dict[str, str] = {}
    for mid, _cap, _raw, concept, _lic, _src in rows:
        media_concept.setdefault(mid, concept)
    splits = default_splits(media_concept.values(), seed)
    seen: set[tuple[str, str]] = set()
    for mid, caption, raw, _concept, lic, src in rows:
        concept = media_concept[mid]
        cap_id = ds.add_text(caption, source=src, license=lic)
        raw_id = ds.add_text(raw, source=src, license=lic)
        if (mid, cap_id) in seen:
            continue
        seen.add((mid, cap_id))
        ds.pairs.append(
            Pair(
                mid,
                cap_id,
                splits[concept],
                mid,
                source=src,
                license=lic,
                concept=concept,
                raw_caption_id=raw_id,
            )
        )
    return ds


# Merged by the owner into pipelines.sources.SOURCES.
SOURCES_SOUNDS = {"sounds": fetch_sounds}


if __name__ == "__main__":
    _ds = fetch_sounds(Path(sys.argv[1]), limit=int(sys.argv[2]) if len(sys.argv) > 2 else None)
    print(_ds.summary(), _ds.quarantine_counts())
