"""The frozen-encoder contract: EncoderSpec (one registry entry), FrozenEncoder (base class) and fingerprints.

A FrozenEncoder turns a list of payloads (text, or image/audio bytes or paths) into raw float32 latents
[B, dim]. Encoding is split in two so that the extraction engine can isolate bad inputs: `prepare`
decodes one payload (raising fusion.media.MediaError on bad media) and `forward` runs the model on a
list of prepared items. `encode` is the two together.

The fingerprint identifies what produced a latent: sha256 over the weights (the hash of the weight
files, or the offline pack's pinned sha256) plus the preprocessing, pooling and options. It never
needs a forward pass, and hashes of weight folders are cached (in memory and in a JSON file keyed on
file size and mtime) so a multi-GB model is hashed once. What a loader adds to the fingerprint (and
the output dimension) is a ResolvedSettings, worked out from config files before any weight is read,
so fusion.encoders.describe_encoder can give the fingerprint without loading the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from fusion.hardware import resolve_train_precision, valid_device

MODALITIES = ("image", "text", "audio")
SOURCES = ("hf", "offline", "laion_clap")
POOLINGS = ("mean", "cls", "pooler")
DTYPES = ("auto", "float32", "float16", "bfloat16")
# Overrides what dtype "auto" means on this machine (any of DTYPES), e.g. to extract in float32 on a
# CPU with bf16 units. The precision an encoder ran in is in its fingerprint, so latents never mix.
PRECISION_ENV = "FUSEMIX_ENCODER_DTYPE"


class EncoderUnavailable(RuntimeError):
    """The encoder cannot be built on this machine; the message says why (package, network, files)."""


class EncoderConfigError(ValueError):
    """A registry entry is malformed (unknown field, bad value); the message names the entry and field."""


def _frozen(mapping: Mapping | None) -> Mapping:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class EncoderSpec:
    """One entry of configs/encoders.yaml. `preprocessing` and `options` are read-only mappings."""

    name: str
    modality: str
    source: str
    model: str
    pooling: str = "mean"
    preprocessing: Mapping = field(default_factory=dict)
    batch_size: int = 32
    dtype: str = "auto"  # see resolve_precision
    options: Mapping = field(default_factory=dict)
    # Whether the pipeline's sensor extracts this encoder for the datasets by itself (None: when an
    # experiment uses it, or when it was added after the sensor first ran). Not in the fingerprint.
    eager: bool | None = None
    # Where this encoder runs (cpu, cuda, cuda:N, mps, auto); None: the pipeline's EncoderBank device
    # ($FUSEMIX_DEVICE, else cpu). Not in the fingerprint: the precision it runs in there is.
    device: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "preprocessing", _frozen(self.preprocessing))
        object.__setattr__(self, "options", _frozen(self.options))
        validate_spec(self)

    def __hash__(self) -> int:
        # The mapping fields are read-only proxies, which do not hash; hash their canonical JSON instead.
        return hash((self.name, json.dumps(self.to_dict(), sort_keys=True, default=_json_default)))

    def to_dict(self) -> dict[str, Any]:
        """The YAML form of the entry (without the name), defaults left out."""
        out: dict[str, Any] = {"modality": self.modality, "source": self.source, "model": self.model}
        if self.pooling != "mean":
            out["pooling"] = self.pooling
        if self.preprocessing:
            out["preprocessing"] = dict(self.preprocessing)
        if self.batch_size != 32:
            out["batch_size"] = self.batch_size
        if self.dtype != "auto":
            out["dtype"] = self.dtype
        if self.options:
            out["options"] = dict(self.options)
        if self.eager is not None:
            out["eager"] = self.eager
        if self.device is not None:
            out["device"] = self.device
        return out


def validate_spec(spec: EncoderSpec) -> None:
    """Raises EncoderConfigError naming the entry and field when a value is out of range."""

    def bad(field_name: str, msg: str) -> EncoderConfigError:
        return EncoderConfigError(f"encoder {spec.name!r}: field {field_name!r} {msg}")

    if not isinstance(spec.name, str) or not spec.name.strip():
        raise EncoderConfigError(f"encoder name must be a non-empty string, got {spec.name!r}")
    if spec.modality not in MODALITIES:
        raise bad("modality", f"must be one of {MODALITIES}, got {spec.modality!r}")
    if spec.source not in SOURCES:
        raise bad("source", f"must be one of {SOURCES}, got {spec.source!r}")
    if not isinstance(spec.model, str) or not spec.model.strip():
        raise bad("model", f"must be a model id, an offline-pack key or a local folder, got {spec.model!r}")
    if spec.pooling not in POOLINGS:
        raise bad("pooling", f"must be one of {POOLINGS}, got {spec.pooling!r}")
    if isinstance(spec.batch_size, bool) or not isinstance(spec.batch_size, int) or spec.batch_size < 1:
        raise bad("batch_size", f"must be a positive integer, got {spec.batch_size!r}")
    if spec.dtype not in DTYPES:
        raise bad("dtype", f"must be one of {DTYPES}, got {spec.dtype!r}")
    if spec.eager is not None and not isinstance(spec.eager, bool):
        raise bad("eager", f"must be true or false, got {spec.eager!r}")
    if spec.device is not None and not (isinstance(spec.device, str) and valid_device(spec.device)):
        raise bad("device", f"must be cpu, cuda, cuda:N, mps or auto, got {spec.device!r}")
    tower = spec.options.get("tower")
    if tower is not None and tower not in ("audio", "text"):
        raise bad("options.tower", f"must be 'audio' or 'text', got {tower!r}")
    if tower is not None and tower != spec.modality:
        raise bad("options.tower", f"is {tower!r} but the modality is {spec.modality!r}; they must agree")
    for key in ("image_size", "max_length"):
        value = spec.preprocessing.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise bad(f"preprocessing.{key}", f"must be a positive integer, got {value!r}")
    for key in ("mean", "std"):
        value = spec.preprocessing.get(key)
        if value is not None and (
            not isinstance(value, (list, tuple))
            or len(value) != 3
            or not all(isinstance(v, (int, float)) for v in value)
        ):
            raise bad(f"preprocessing.{key}", f"must be a list of 3 numbers, got {value!r}")


class FrozenEncoder:
    """Base class of every frozen encoder. Subclasses set `dim`, `fingerprint` and implement
    `prepare` (decode one payload) and `forward` (run the model on prepared items)."""

    spec: EncoderSpec
    dim: int
    fingerprint: str
    sample_rate: int | None = None
    device: str = "cpu"

    @property
    def modality(self) -> str:
        return self.spec.modality

    @property
    def name(self) -> str:
        return self.spec.name

    def prepare(self, payload: Any, media_id: str = "") -> Any:
        """Decodes one payload into what `forward` takes; raises fusion.media.MediaError on bad media."""
        raise NotImplementedError

    def forward(self, prepared: list[Any]) -> np.ndarray:
        """Runs the model on prepared items -> float32 [B, dim], raw (not normalised)."""
        raise NotImplementedError

    def cost(self, payload: Any) -> int:
        """Relative size of a payload or prepared item, for length-sorted batching (1 by default)."""
        return 1

    def encode(self, payloads: list[Any]) -> np.ndarray:
        """Payloads -> float32 [B, dim]. A bad payload raises; use fusion.encoders.extract to isolate them."""
        if not payloads:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.forward([self.prepare(p) for p in payloads])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.spec.name!r}, dim={self.dim}, fingerprint={self.fingerprint!r})"


def _json_default(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot fingerprint a value of type {type(value).__name__}: {value!r}")


def resolve_precision(dtype: str, device: str = "cpu") -> str:
    """The precision an encoder with registry `dtype` runs in on `device`: "float32", "bfloat16" or
    "float16" (autocast of the forward pass; weights stay float32).

    "auto" (the default; $FUSEMIX_ENCODER_DTYPE overrides it): on a CPU, bfloat16 where the CPU has
    bf16 matrix instructions (AMX or AVX-512 BF16: 2.3-4x the images/s of float32 for EfficientNet-Lite
    there, cosine to float32 >= 0.999), float32 elsewhere (emulated bf16 is slower); on CUDA, bfloat16
    where the GPU supports it, else float16; float32 on other devices. float16 is CUDA-only: a CPU runs
    it in float32. Explicit bfloat16 is honoured on any device.
    """
    if dtype == "auto":
        dtype = os.environ.get(PRECISION_ENV, "").strip() or "auto"
        if dtype not in DTYPES:
            raise EncoderConfigError(f"${PRECISION_ENV} must be one of {DTYPES}, got {dtype!r}")
    if dtype == "auto":  # the same choice as adapter training's precision "auto"
        return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[
            resolve_train_precision("auto", device)
        ]
    return "float32" if dtype == "float16" and device.startswith("cpu") else dtype


def compute_fingerprint(
    weights_sha256: str, spec: EncoderSpec, precision: str | None = None, **effective: Any
) -> str:
    """Short hex (16 chars) sha256 over the weights hash, modality, preprocessing, pooling, precision
    and options. `precision` is what the forward pass runs in (resolve_precision; default: the spec's
    dtype on the CPU), so float32 and bfloat16 latents of one model never share a fingerprint.

    `effective` adds settings the loader resolved (e.g. the pooling a sentence-transformers config
    imposes, the image size the processor uses), so two specs that behave the same hash the same.
    The model name is left out on purpose: the weights hash already identifies the weights, so a
    moved folder keeps its fingerprint.
    """
    payload = {
        "weights": weights_sha256,
        "modality": spec.modality,
        "pooling": spec.pooling,
        "preprocessing": dict(spec.preprocessing),
        "dtype": precision or resolve_precision(spec.dtype),
        "options": dict(spec.options),
        "effective": effective,
    }
    text = json.dumps(payload, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class ResolvedSettings:
    """What a loader resolves from a spec and the model's config files alone, before any weight is
    read: the output dimension and the effective settings that enter the fingerprint.

    Each encoder class has one `resolve` returning a subclass of this; its constructor uses it, and
    fusion.encoders.describe_encoder calls it without building the model, so the two cannot disagree.
    """

    dim: int
    # Whether the encoder's forward pass runs under autocast (resolve_precision); one that never
    # does (laion_clap's module) computes in float32 whatever the spec says.
    autocasts = True

    def effective(self) -> dict[str, Any]:
        """The settings passed to compute_fingerprint as `**effective`."""
        return {}

    def precision(self, spec: EncoderSpec, device: str = "cpu") -> str:
        return resolve_precision(spec.dtype, device) if self.autocasts else "float32"

    def fingerprint(self, weights_sha256: str, spec: EncoderSpec, device: str = "cpu") -> str:
        return compute_fingerprint(weights_sha256, spec, self.precision(spec, device), **self.effective())


# File names that never change what a model computes.
_SKIP_SUFFIXES = (".md", ".lock", ".gitattributes", ".txt.bak")
_hash_lock = threading.Lock()
_memory_cache: dict[tuple, str] = {}


def _weight_files(directory: Path) -> list[Path]:
    files = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.is_file() and not path.name.endswith(_SKIP_SUFFIXES):
            files.append(path)
    return files


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_model_dir(directory: str | Path, cache_file: Path | None = None) -> str:
    """sha256 over every file of a model folder (relative path + content hash), hidden files and docs
    left out. Cached in memory and, when `cache_file` is given, in that JSON file, keyed on each
    file's size and mtime so an edited file is hashed again."""
    root = Path(directory).resolve()
    if not root.is_dir():
        raise EncoderUnavailable(f"model folder {root} does not exist")
    files = _weight_files(root)
    stats = tuple((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    key = (str(root), stats)
    with _hash_lock:
        if key in _memory_cache:
            return _memory_cache[key]
    disk: dict[str, str] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            disk = json.loads(cache_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            disk = {}  # a corrupt cache is only a cache: hash again
    total = hashlib.sha256()
    changed = False
    for path, (rel, size, mtime) in zip(files, stats, strict=True):
        file_key = f"{path}|{size}|{mtime}"
        digest = disk.get(file_key)
        if digest is None:
            digest = _file_sha256(path)
            disk[file_key] = digest
            changed = True
        total.update(f"{rel}\0{digest}\n".encode())
    result = total.hexdigest()
    if cache_file is not None and changed:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(disk, indent=0, sort_keys=True), encoding="utf-8")
            tmp.replace(cache_file)
        except OSError:
            pass  # read-only cache location: the in-memory cache still avoids re-hashing in this process
    with _hash_lock:
        _memory_cache[key] = result
    return result
