"""Read the audio-captioning datasets AudioCaps and Clotho (their CSVs plus local audio files) into a Dataset.

AudioCaps: `{split}.csv` (train/val/test) in root or root/dataset, columns
`audiocap_id,youtube_id,start_time,caption`, one caption per row (val/test clips have five rows).
Audio layout (configurable): `root/{audio_dir}/{filename}` with defaults `audio_dir="audio/{split}"`
and `filename="{youtube_id}_{start_time}.wav"`; the templates may use {split}, {youtube_id},
{start_time} (an integer when whole, as in `30`) and {audiocap_id}. For a flat folder of
`{youtube_id}.wav`, pass audio_dir="audio", filename="{youtube_id}.wav".

Clotho: `clotho_captions_{development,validation,evaluation}.csv` in root, columns
`file_name,caption_1..caption_5`; audio at `root/{audio_dir}/{file_name}` with `audio_dir="{part}"`
(development/validation/evaluation, as in the Zenodo archives). development -> train,
validation -> val, evaluation -> test.

    from fusion.data.audio_captions import read_audiocaps, read_clotho
    ds = read_clotho("data/clotho", name="clotho", split="test")
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fusion.data.builder import DatasetBuilder, ReaderError, normalise_split
from fusion.data.canonical import Dataset
from fusion.data.manifest import Bad, csv_header, iter_csv
from fusion.media import is_url

AUDIOCAPS_COLUMNS = ("youtube_id", "start_time", "caption")
CLOTHO_PARTS = {"development": "train", "validation": "val", "evaluation": "test"}


def _check_root(root: str | Path, modality: str | None) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise ReaderError(f"dataset root {root} is not a folder")
    if modality not in (None, "audio"):
        raise ReaderError(f"this dataset holds audio, not {modality!r}")
    return root


def _template(template: str, **fields: Any) -> str:
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        raise ReaderError(f"bad path template {template!r} ({e}); fields are {sorted(fields)}") from None


def _start_time(value: str) -> str | None:
    """ "30" for 30, 30.0 or "30.0"; "12.5" stays; None when not a finite non-negative number."""
    try:
        t = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(t) or t < 0:
        return None
    return str(int(t)) if t == int(t) else repr(t)


def read_audiocaps(
    root: str | Path,
    *,
    name: str,
    split: str | None = None,
    csv_files: dict[str, str | Path] | None = None,
    audio_dir: str = "audio/{split}",
    filename: str = "{youtube_id}_{start_time}.wav",
    modality: str | None = "audio",
    progress: bool = True,
    **common: Any,
) -> Dataset:
    """Reads AudioCaps CSV(s) and their local clips into a Dataset; one group per clip.

    csv_files: split -> CSV path (relative to root); default {train,val,test}.csv found in root or
    root/dataset. split: read only that split. `common` goes to DatasetBuilder.
    """
    root = _check_root(root, modality)
    want = normalise_split(split) if split is not None else None
    if split is not None and want is None:
        raise ReaderError(f"unknown split {split!r}")
    if csv_files is None:
        csv_files = {}
        for s in ("train", "val", "test"):
            for folder in (root, root / "dataset"):
                if (folder / f"{s}.csv").is_file():
                    csv_files[s] = folder / f"{s}.csv"
                    break
    files: dict[str, Path] = {}
    for s, p in csv_files.items():
        norm = normalise_split(s)
        if norm is None:
            raise ReaderError(f"unknown split {s!r} in csv_files")
        if want is None or norm == want:
            files[norm] = Path(p) if Path(p).is_absolute() else root / p
    if not files:
        raise ReaderError(f"no AudioCaps CSV for split {want or 'any'} under {root}; pass csv_files=...")
    _template(f"{audio_dir}/{filename}", split="train", youtube_id="x", start_time="0", audiocap_id="0")
    builder = DatasetBuilder(name, root, modality="audio", **common)
    for s, path in files.items():
        if not path.is_file():
            raise ReaderError(f"AudioCaps CSV {path} does not exist")
        missing = [c for c in AUDIOCAPS_COLUMNS if c not in csv_header(path)]
        if missing:
            raise ReaderError(f"{path.name} lacks AudioCaps columns {missing}")

        def rel_of(row: dict[str, str] | Bad, s: str = s) -> str | None:
            """The clip's path under root, or None for a row without a usable id and start time."""
            if isinstance(row, Bad):
                return None
            yid, start = (row.get("youtube_id") or "").strip(), _start_time(row.get("start_time", ""))
            if not yid or start is None or "/" in yid or "\\" in yid:
                return None
            fields = {
                "youtube_id": yid,
                "start_time": start,
                "audiocap_id": (row.get("audiocap_id") or "").strip(),
            }
            return _template(f"{audio_dir}/{filename}", split=s, **fields)

        rows = tqdm(iter_csv(path), desc=f"read {name} {s}", unit="row", leave=False, disable=not progress)
        for label, row in builder.prefetched(rows, lambda t: rel_of(t[1])):
            if isinstance(row, Bad):
                builder.reject(label, row.reason, row.detail)
                continue
            rel = rel_of(row)
            if rel is None:
                what = f"youtube_id {row.get('youtube_id')!r} / start_time {row.get('start_time')!r}"
                builder.reject(label, "malformed", what)
                continue
            builder.add_pair(rel, row.get("caption"), row=label, split=s)
    return builder.finish()


def read_clotho(
    root: str | Path,
    *,
    name: str,
    split: str | None = None,
    csv_files: dict[str, str | Path] | None = None,
    audio_dir: str = "{part}",
    modality: str | None = "audio",
    progress: bool = True,
    **common: Any,
) -> Dataset:
    """Reads Clotho caption CSV(s) and their audio into a Dataset; one group per clip, five captions each.

    csv_files: part (development/validation/evaluation, or train/val/test) -> CSV path; default
    clotho_captions_{part}.csv in root. split: read only that split. `common` goes to DatasetBuilder.
    """
    root = _check_root(root, modality)
    want = normalise_split(split) if split is not None else None
    if split is not None and want is None:
        raise ReaderError(f"unknown split {split!r}")
    if csv_files is None:
        csv_files = {
            part: root / f"clotho_captions_{part}.csv"
            for part in CLOTHO_PARTS
            if (root / f"clotho_captions_{part}.csv").is_file()
        }
    parts: list[tuple[str, str, Path]] = []
    for part, p in csv_files.items():
        norm = normalise_split(part)
        if norm is None:
            raise ReaderError(f"unknown Clotho part {part!r} in csv_files")
        if want is None or norm == want:
            parts.append((part, norm, Path(p) if Path(p).is_absolute() else root / p))
    if not parts:
        raise ReaderError(
            f"no Clotho captions CSV for split {want or 'any'} under {root}; pass csv_files=..."
        )
    builder = DatasetBuilder(name, root, modality="audio", **common)
    for part, s, path in parts:
        if not path.is_file():
            raise ReaderError(f"Clotho CSV {path} does not exist")
        header = csv_header(path)
        cap_cols = sorted((c for c in header if c.startswith("caption")), key=lambda c: (len(c), c))
        if "file_name" not in header or not cap_cols:
            raise ReaderError(f"{path.name} lacks Clotho columns file_name, caption_1..caption_5")
        folder = _template(audio_dir, part=part, split=s)
        rows = tqdm(iter_csv(path), desc=f"read {name} {part}", unit="row", leave=False, disable=not progress)

        def clip(fname: str, folder: str = folder) -> str:
            # A URL is kept whole, not joined to the folder, so the builder refuses it as one.
            return f"{folder}/{fname}" if folder and not is_url(fname) else fname

        for label, row in builder.prefetched(rows, lambda t: clip(t[1]["file_name"])):
            if isinstance(row, Bad):
                builder.reject(label, row.reason, row.detail)
                continue
            fname = row.get("file_name") or ""
            if not fname.strip():
                builder.reject(label, "malformed", "empty file_name")
                continue
            builder.add_pair(clip(fname), [row.get(c) for c in cap_cols], row=label, split=s)
    return builder.finish()
