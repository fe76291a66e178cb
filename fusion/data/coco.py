"""Read COCO-style caption annotations and Karpathy split files (COCO and Flickr30K) into a Dataset.

COCO captions JSON: `{"images": [{"id", "file_name"}], "annotations": [{"id", "image_id", "caption"}]}`.
Images are looked up under `root/images_dir/file_name`; by default `images_dir` is the part of the
annotation file name after `captions_` (captions_val2017.json -> val2017/) when that folder exists,
else the root. The split comes from the file name (train/val/test in it), else the `split` argument,
else a default by group. Without `annotations`, every captions_*.json in root and root/annotations
is read.

Karpathy JSON (dataset_coco.json, dataset_flickr30k.json): `{"images": [{"filename", "filepath"?,
"split", "sentences": [{"raw"}]}]}`; images under `root/images_dir/filepath/filename`. `restval` is
training data. With `split`, only that split's images are read.

    from fusion.data.coco import read_coco, read_karpathy
    ds = read_coco("data/coco", name="coco-val", annotations="annotations/captions_val2017.json")
    ds = read_karpathy("data/flickr30k", name="f30k", file="dataset_flickr30k.json",
                       images_dir="flickr30k-images", split="test")
"""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fusion.data.builder import DatasetBuilder, ReaderError, normalise_split
from fusion.data.canonical import Dataset
from fusion.media import is_url


def _load_json(builder: DatasetBuilder, path: Path) -> Any:
    """The parsed file, or None after quarantining it as malformed.

    Bytes that are not UTF-8 inside strings survive as lone surrogates, so that only the captions or
    file names holding them are refused (`encoding`, by the builder), not the whole file.
    """
    try:
        text = path.read_bytes().removeprefix(codecs.BOM_UTF8).decode("utf-8", "surrogateescape")
        return json.loads(text)
    except (OSError, ValueError, RecursionError) as e:  # JSONDecodeError, a 5,000-digit int, deep nesting
        builder.reject(path.name, "malformed", f"not a readable JSON file: {type(e).__name__}: {e}")
        return None


def _is_karpathy(obj: Any) -> bool:
    images = obj.get("images") if isinstance(obj, dict) else None
    return (
        isinstance(images, list)
        and "annotations" not in obj
        and any(isinstance(im, dict) and "sentences" in im for im in images[:50])
    )


def _split_from_name(stem: str) -> str | None:
    for word in re.split(r"[^a-z]+", stem.lower()):
        if normalise_split(word) is not None:
            return normalise_split(word)
    return None


def _find_annotations(root: Path) -> list[Path]:
    found = sorted({*root.glob("captions_*.json"), *root.glob("annotations/captions_*.json")})
    if not found:
        raise ReaderError(f"no captions_*.json in {root} or {root / 'annotations'}; pass annotations=...")
    return found


def _read_coco_file(
    builder: DatasetBuilder, path: Path, images_dir: str | None, split: str | None, progress: bool
) -> None:
    obj = _load_json(builder, path)
    if obj is None:
        return
    if _is_karpathy(obj):
        raise ReaderError(f"{path.name} is a Karpathy split file; read it with kind 'karpathy'")
    if not isinstance(obj, dict) or not isinstance(obj.get("images"), list):
        builder.reject(path.name, "malformed", "no 'images' list")
        return
    if not isinstance(obj.get("annotations"), list):
        builder.reject(path.name, "malformed", "no 'annotations' list")
        return
    if images_dir is None:
        guess = path.stem.removeprefix("captions_")
        images_dir = guess if (builder.root / guess).is_dir() else ""
    file_split = _split_from_name(path.stem)
    row_split = split or file_split
    files: dict[Any, str] = {}
    for i, im in enumerate(obj["images"]):
        label = f"{path.name}:images[{i}]"
        if not isinstance(im, dict) or not isinstance(im.get("file_name"), str) or "id" not in im:
            builder.reject(label, "malformed", "an image needs an 'id' and a string 'file_name'")
            continue
        if not isinstance(im["id"], int | str) or im["id"] in files:
            builder.reject(label, "malformed", f"image id {im['id']!r} is repeated or not an int/str")
            continue
        name = im["file_name"]
        # A URL is kept whole, not joined to the folder, so the builder refuses it as one.
        files[im["id"]] = str(Path(images_dir) / name) if images_dir and not is_url(name) else name
    captioned: set[Any] = set()
    anns = obj["annotations"]
    bar = tqdm(
        enumerate(anns),
        desc=f"read {path.name}",
        total=len(anns),
        unit="row",
        leave=False,
        disable=not progress,
    )
    for i, ann in builder.prefetched(bar, lambda t: files[t[1]["image_id"]]):
        label = f"{path.name}:annotations[{i}]"
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            builder.reject(label, "malformed", "an annotation needs 'image_id' and 'caption'")
            continue
        if isinstance(ann.get("id"), int | str):
            label = f"{path.name}:annotation {ann['id']}"
        image_id = ann["image_id"]
        if not isinstance(image_id, int | str) or image_id not in files:
            builder.reject(label, "malformed", f"image_id {image_id!r} is not among the images")
            continue
        captioned.add(image_id)
        builder.add_pair(files[image_id], ann["caption"], row=label, split=row_split)
    for image_id, rel in files.items():
        if image_id not in captioned:
            builder.reject(f"{path.name}:image {image_id}", "no_caption", f"{rel} has no annotation")


def read_coco(
    root: str | Path,
    *,
    name: str,
    annotations: str | Path | list[str | Path] | None = None,
    images_dir: str | None = None,
    split: str | None = None,
    modality: str | None = "image",
    progress: bool = True,
    **common: Any,
) -> Dataset:
    """Reads COCO caption annotation file(s) into a Dataset (one group per image, all its captions).

    split: the split of every pair (overrides the one in the file name); `common` goes to
    DatasetBuilder (source, license, limits, probe, seed, ...).
    """
    root = Path(root)
    if not root.is_dir():
        raise ReaderError(f"dataset root {root} is not a folder")
    if modality not in (None, "image"):
        raise ReaderError(f"COCO captions describe images, not {modality!r}")
    if split is not None and normalise_split(split) is None:
        raise ReaderError(f"unknown split {split!r}")
    if annotations is None:
        paths = _find_annotations(root)
    else:
        items = annotations if isinstance(annotations, list) else [annotations]
        paths = [Path(a) if Path(a).is_absolute() else root / a for a in items]
    for p in paths:
        if not p.is_file():
            raise ReaderError(f"annotation file {p} does not exist")
    builder = DatasetBuilder(name, root, modality="image", **common)
    for p in paths:
        _read_coco_file(builder, p, images_dir, normalise_split(split) if split else None, progress)
    return builder.finish()


def _karpathy_path(images_dir: str, im: dict[str, Any]) -> str:
    if is_url(im["filename"]):
        return im["filename"]  # refused by the builder as a URL, not looked up as a file
    return str(Path(images_dir or ".") / (im.get("filepath") or "") / im["filename"])


def read_karpathy(
    root: str | Path,
    *,
    name: str,
    file: str | Path | None = None,
    images_dir: str = "",
    split: str | None = None,
    modality: str | None = "image",
    progress: bool = True,
    **common: Any,
) -> Dataset:
    """Reads a Karpathy split JSON (COCO or Flickr30K flavour) into a Dataset; restval counts as train.

    file: the JSON (relative to root); default the single dataset_*.json in root.
    split: read only this split. `common` goes to DatasetBuilder.
    """
    root = Path(root)
    if not root.is_dir():
        raise ReaderError(f"dataset root {root} is not a folder")
    if modality not in (None, "image"):
        raise ReaderError(f"Karpathy splits describe images, not {modality!r}")
    want = normalise_split(split) if split is not None else None
    if split is not None and want is None:
        raise ReaderError(f"unknown split {split!r}")
    if file is None:
        found = sorted(root.glob("dataset_*.json"))
        if len(found) != 1:
            raise ReaderError(f"expected one dataset_*.json in {root}, found {len(found)}; pass file=...")
        path = found[0]
    else:
        path = Path(file) if Path(file).is_absolute() else root / file
        if not path.is_file():
            raise ReaderError(f"Karpathy file {path} does not exist")
    builder = DatasetBuilder(name, root, modality="image", **common)
    obj = _load_json(builder, path)
    if obj is None:
        return builder.finish()
    if not isinstance(obj, dict) or not isinstance(obj.get("images"), list):
        builder.reject(path.name, "malformed", "no 'images' list")
        return builder.finish()
    images = obj["images"]
    bar = tqdm(
        enumerate(images),
        desc=f"read {name}",
        total=len(images),
        unit="row",
        leave=False,
        disable=not progress,
    )
    for i, im in builder.prefetched(bar, lambda t: _karpathy_path(images_dir, t[1])):
        label = f"{path.name}:images[{i}]"
        if not isinstance(im, dict) or not isinstance(im.get("filename"), str):
            builder.reject(label, "malformed", "an image needs a string 'filename'")
            continue
        folder = im.get("filepath") or ""
        label = f"{path.name}:{folder}/{im['filename']}" if folder else f"{path.name}:{im['filename']}"
        im_split = im.get("split")
        norm = normalise_split(im_split)
        if want is not None and norm is not None and norm != want:
            continue
        sentences = im.get("sentences")
        if not isinstance(sentences, list):
            builder.reject(label, "malformed", "'sentences' is not a list")
            continue
        captions = [s.get("raw") if isinstance(s, dict) else s for s in sentences]
        filepath = im.get("filepath") or ""
        if not isinstance(filepath, str):
            builder.reject(label, "malformed", f"'filepath' is a {type(filepath).__name__}")
            continue
        rel = _karpathy_path(images_dir, im)
        builder.add_pair(rel, captions, row=label, split=im_split if im_split is not None else want)
    return builder.finish()
