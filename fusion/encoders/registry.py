"""The encoder registry (configs/encoders.yaml): load and validate it, add entries, check availability, build.

    encoders:
      minilm: {modality: text, source: offline, model: all-MiniLM-L6-v2, pooling: mean, batch_size: 64}

Fields: modality image|text|audio; source hf|offline|laion_clap; model (hub id, local folder,
offline-pack key or laion_clap model name such as HTSAT-tiny); pooling mean|cls|pooler; preprocessing
(image_size, max_length, mean, std); batch_size; dtype float32|float16|bfloat16 (autocast on CUDA
only); options (short_clip, tower, checkpoint). Unknown fields and bad values raise EncoderConfigError naming the entry.

`build_encoder(spec)` loads the model; `describe_encoder(spec)` gives the same (name, fingerprint,
dim) as an EncoderRef without loading it: each source's resolution of effective settings is the one
its encoder's constructor runs, applied to the config files only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from fusion.adapters import EncoderRef
from fusion.encoders.base import (
    EncoderConfigError,
    EncoderSpec,
    EncoderUnavailable,
    FrozenEncoder,
    ResolvedSettings,
)

SPEC_FIELDS = tuple(f.name for f in fields(EncoderSpec) if f.name != "name")


def default_registry_path() -> Path:
    from fusion.paths import configs_dir

    return configs_dir() / "encoders.yaml"


def spec_from_mapping(name: str, entry: Any) -> EncoderSpec:
    """One YAML entry -> EncoderSpec, with errors that name the entry and the field."""
    if not isinstance(entry, Mapping):
        raise EncoderConfigError(
            f"encoder {name!r}: entry must be a mapping of fields, got {type(entry).__name__}"
        )
    unknown = sorted(set(entry) - set(SPEC_FIELDS))
    if unknown:
        raise EncoderConfigError(
            f"encoder {name!r}: unknown field(s) {unknown}; allowed: {list(SPEC_FIELDS)}"
        )
    missing = [k for k in ("modality", "source", "model") if k not in entry]
    if missing:
        raise EncoderConfigError(f"encoder {name!r}: missing required field(s) {missing}")
    for key in ("preprocessing", "options"):
        if entry.get(key) is not None and not isinstance(entry[key], Mapping):
            raise EncoderConfigError(f"encoder {name!r}: field {key!r} must be a mapping, got {entry[key]!r}")
    values = {k: v for k, v in entry.items() if v is not None}
    return EncoderSpec(name=str(name), **values)


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise EncoderConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {"encoders": {}}
    if isinstance(data, dict) and data.get("encoders") is None:
        data["encoders"] = {}  # "encoders:" with nothing under it is an empty registry
    if not isinstance(data, dict) or not isinstance(data["encoders"], dict):
        raise EncoderConfigError(f"{path}: expected a top-level mapping 'encoders: {{name: {{...}}}}'")
    return data


def load_registry(path: str | Path | None = None) -> dict[str, EncoderSpec]:
    """Reads and validates an encoders.yaml (default: fusion.paths.configs_dir()/"encoders.yaml")."""
    path = Path(path) if path is not None else default_registry_path()
    if not path.is_file():
        raise EncoderConfigError(f"encoder registry {path} does not exist")
    data = _read_yaml(path)
    return {str(name): spec_from_mapping(str(name), entry) for name, entry in data["encoders"].items()}


def add_encoder(path: str | Path | None, name: str, **fields_: Any) -> EncoderSpec:
    """Adds or replaces entry `name` in the YAML (created if missing) after validating it; returns the spec.

    Other entries are kept as they are; comments in the file are not preserved (PyYAML drops them).
    """
    path = Path(path) if path is not None else default_registry_path()
    spec = spec_from_mapping(name, fields_)
    data = _read_yaml(path) if path.is_file() else {"encoders": {}}
    data["encoders"][name] = spec.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=None), encoding="utf-8")
    tmp.replace(path)
    return spec


def encoder_status(spec: EncoderSpec) -> tuple[bool, str]:
    """(available on this machine, why / where) without loading any model."""
    if spec.source == "hf":
        from fusion.encoders.hf import hf_status

        return hf_status(spec)
    if spec.source == "offline":
        try:
            from fusion.encoders import offline_pack
        except ImportError as exc:
            return False, f"the offline pack module cannot be imported: {exc}"
        return offline_pack.pack_available(spec.model)
    from fusion.encoders.laion import laion_status

    return laion_status(spec)


def describe_registry(registry: Mapping[str, EncoderSpec]) -> list[dict]:
    """Rows for `fusemix encoder list`: name, modality, source, model, available, detail."""
    rows = []
    for name, spec in registry.items():
        available, detail = encoder_status(spec)
        rows.append(
            {
                "name": name,
                "modality": spec.modality,
                "source": spec.source,
                "model": spec.model,
                "available": available,
                "detail": detail,
            }
        )
    return rows


def _offline_dir(spec: EncoderSpec, cache_dir: Path | None) -> tuple[Path, str]:
    """(materialised folder, pinned weights sha256) of an offline-pack entry. The folder is built once
    (verified, converted) and then reused from the cache."""
    from fusion.encoders import offline_pack

    ok, why = offline_pack.pack_available(spec.model)
    if not ok:
        raise EncoderUnavailable(
            f"encoder {spec.name!r}: offline pack {spec.model!r} is not available: {why}"
        )
    try:
        directory = offline_pack.materialise(spec.model, cache_dir)
        weights = offline_pack.weights_sha256(spec.model)
    except offline_pack.OfflinePackError as exc:
        raise EncoderUnavailable(f"encoder {spec.name!r}: offline pack {spec.model!r}: {exc}") from exc
    return Path(directory), weights


def _efficientnet_args(info: Mapping) -> dict[str, Any]:
    """TorchImageEncoder's dim/image_size/mean/std from a converted EfficientNet-Lite config; the module
    load_efficientnet_lite returns has its BatchNorms folded (fold_for_inference)."""
    return {
        "dim": int(info.get("dim", info.get("feature_dim", 1280))),
        "image_size": int(info["image_size"]),
        "mean": info["mean"],
        "std": info["std"],
        "folded": True,
    }


def _build_offline(spec: EncoderSpec, device: str, cache_dir: Path | None) -> FrozenEncoder:
    from fusion.encoders import offline_pack
    from fusion.encoders.hf import TorchImageEncoder, build_from_dir

    directory, weights = _offline_dir(spec, cache_dir)
    if spec.modality == "image":
        module, info = offline_pack.load_efficientnet_lite(directory)
        return TorchImageEncoder(
            spec, module, **_efficientnet_args(info), weights_sha256=weights, device=device
        )
    return build_from_dir(spec, directory, weights, device)


def build_encoder(spec: EncoderSpec, device: str = "cpu", cache_dir: Path | None = None) -> FrozenEncoder:
    """Loads the frozen encoder a spec describes. Raises EncoderUnavailable (with the reason) when it
    cannot be built here, EncoderConfigError when the spec does not fit the model."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise EncoderUnavailable(
                f"encoder {spec.name!r}: device {device!r} asked for but CUDA is not available"
            )
    if spec.source == "hf":
        from fusion.encoders.hf import build_hf_encoder

        return build_hf_encoder(spec, device=device, cache_dir=cache_dir)
    if spec.source == "offline":
        return _build_offline(spec, device, cache_dir)
    from fusion.encoders.laion import LaionClapEncoder

    return LaionClapEncoder(spec, device=device)


def _resolve(spec: EncoderSpec, cache_dir: Path | None) -> tuple[str, ResolvedSettings]:
    """(weights sha256, resolved settings) exactly as build_encoder's loader gets them, from config
    files only."""
    if spec.source == "hf":
        from fusion.encoders.hf import hf_model_dir, resolve_from_dir

        model_dir, weights = hf_model_dir(spec, cache_dir)
        return weights, resolve_from_dir(spec, model_dir)
    if spec.source == "offline":
        from fusion.encoders.efficientnet_lite import read_config
        from fusion.encoders.hf import TorchImageEncoder, resolve_from_dir

        directory, weights = _offline_dir(spec, cache_dir)
        if spec.modality == "image":
            return weights, TorchImageEncoder.resolve(spec, **_efficientnet_args(read_config(directory)))
        return weights, resolve_from_dir(spec, directory)
    from fusion.encoders.laion import LaionClapEncoder

    settings = LaionClapEncoder.resolve(spec)
    return settings.weights_sha256(), settings


def describe_encoder(spec: EncoderSpec, cache_dir: Path | None = None, device: str = "cpu") -> EncoderRef:
    """EncoderRef(name, fingerprint, dim) of the encoder `build_encoder(spec, device, cache_dir)`
    would build, without building it: no model, tokenizer or processor is constructed and no weight
    tensor is loaded. It reads config files and hashes weight files (cached, like build_encoder).

    Source `offline` materialises the pack entry into the model cache if it is not there yet (the same
    one-time, cached conversion build_encoder does); `laion_clap` needs only the checkpoint file, not
    the package. Raises EncoderUnavailable / EncoderConfigError as build_encoder does for a missing
    model or a spec that does not fit it; weights that exist but would not load (e.g. a folder with
    only pickled weights) are only found by build_encoder.
    """
    weights, settings = _resolve(spec, cache_dir)
    return EncoderRef(spec.name, settings.fingerprint(weights, spec, device), settings.dim)
