"""The user-editable registries in configs/: datasets.yaml and experiments.yaml (encoders.yaml is
read by fusion.encoders). Validated on load with messages that name the entry and the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from fusion.config import AdapterConfig, FuseMixConfig, TrainConfig, from_dict, preset
from fusion.paths import configs_dir


class RegistryError(ValueError):
    """A registry file or entry is malformed."""


def _load_yaml(path: Path, top: str) -> dict[str, Any]:
    if not path.exists():
        raise RegistryError(f"{path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    entries = data.get(top)
    if not isinstance(entries, dict) or not entries:
        raise RegistryError(f"{path}: expected a non-empty mapping under '{top}:'")
    return data


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: a default-corpus `source` (pipelines.sources) or a `reader` over a folder."""

    name: str
    modality: str  # the media side: image or audio
    source: str | None = None
    reader: str | None = None
    root: str | None = None
    limit: int | None = None
    seed: int = 0
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ExperimentSpec:
    name: str
    dataset: str
    media_encoder: str
    text_encoder: str
    family: str = "demo"
    variable: str = ""  # the value this experiment varies within its family, for ablation plots
    select: dict = field(default_factory=lambda: {"strategy": "all"})
    caption: str = "clean"  # clean or raw (the quality ablation's text side)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    fusemix: FuseMixConfig = field(default_factory=FuseMixConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_datasets(path: str | Path | None = None) -> dict[str, DatasetSpec]:
    path = Path(path) if path else configs_dir() / "datasets.yaml"
    out = {}
    for name, entry in _load_yaml(path, "datasets")["datasets"].items():
        if not isinstance(entry, dict):
            raise RegistryError(f"{path}: dataset {name!r} must be a mapping")
        try:
            spec = DatasetSpec(name=name, **entry)
        except TypeError as err:
            raise RegistryError(f"{path}: dataset {name!r}: {err}") from err
        if spec.modality not in ("image", "audio"):
            raise RegistryError(
                f"{path}: dataset {name!r}: modality must be image or audio, got {spec.modality!r}"
            )
        if (spec.source is None) == (spec.reader is None):
            raise RegistryError(f"{path}: dataset {name!r}: give exactly one of source or reader")
        if spec.reader and not spec.root:
            raise RegistryError(f"{path}: dataset {name!r}: a reader needs a root folder")
        out[name] = spec
    return out


def load_experiments(path: str | Path | None = None) -> dict[str, ExperimentSpec]:
    path = Path(path) if path else configs_dir() / "experiments.yaml"
    data = _load_yaml(path, "experiments")
    defaults = data.get("defaults", {}) or {}
    out = {}
    for name, entry in data["experiments"].items():
        entry = {**defaults, **(entry or {})}
        try:
            base = preset(entry.pop("preset", "cpu-small"))
            adapter = replace(base.adapter, **entry.pop("adapter", {}) or {})
            fusemix = from_dict(FuseMixConfig, {**vars(base.fusemix), **(entry.pop("fusemix", {}) or {})})
            train = from_dict(TrainConfig, {**vars(base.train), **(entry.pop("train", {}) or {})})
            spec = ExperimentSpec(name=name, adapter=adapter, fusemix=fusemix, train=train, **entry)
        except (TypeError, ValueError, KeyError) as err:
            raise RegistryError(f"{path}: experiment {name!r}: {err}") from err
        if spec.caption not in ("clean", "raw"):
            raise RegistryError(f"{path}: experiment {name!r}: caption must be clean or raw")
        out[name] = spec
    return out
