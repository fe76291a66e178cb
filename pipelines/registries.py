"""The user-editable registries in configs/: datasets.yaml and experiments.yaml (encoders.yaml is
read by fusion.encoders). Validated on load with messages that name the entry and the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from evaluation.baselines import BASELINES
from evaluation.retrieval import HUBNESS_METHODS
from fusion.config import AdapterConfig, FuseMixConfig, TrainConfig, from_dict, preset
from fusion.paths import configs_dir

# "adapters" trains the FuseMix adapters (fusemix.mode picks FuseMix or an ablation); the others are
# the baselines of evaluation.baselines, scored by the same code.
METHODS = ("adapters", *BASELINES)
# Pairs columns an experiment may score one gallery at a time by.
GROUP_COLUMNS = (None, "source", "group_id", "concept")


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
    # adapters (FuseMix or its ablations, by fusemix.mode) or a baseline of evaluation.baselines
    method: str = "adapters"
    method_params: dict = field(default_factory=dict)  # fixes a baseline's hyperparameters
    seeds: int = 1  # train.seed, train.seed + 1, ...: metrics are reported per seed and as mean and std
    eval_datasets: tuple[str, ...] = ()  # other datasets scored zero-shot (their test split)
    group_by: str | None = None  # also score one gallery per value of this pairs column (e.g. source)
    hubness: str | None = None  # csls or inverted_softmax: rank with hubness correction (evaluation only)
    # Bind into another experiment's shared space: its trained text adapter is reused frozen and only
    # this experiment's media adapter is trained, so both media sides share one space (three
    # modalities bound through text); evaluation adds the emergent media<->media retrieval. Not in
    # repr, so the inputs hash of every other experiment stays as it was; an anchored one's hash adds
    # its anchor's checkpoints (pipelines.train.anchored_hash).
    anchor: str | None = field(default=None, repr=False)
    # Re-run by itself (app.automation's experiment sensor) when its configuration or the tables it
    # reads (pairs, latents, those of eval_datasets) change. Not in repr: it does not change what is
    # trained, so it stays out of the checkpoints' inputs hash (pipelines.train.inputs_hash).
    auto_run: bool = field(default=False, repr=False)

    def seed_list(self) -> list[int]:
        return [self.train.seed + i for i in range(self.seeds)]


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


def _check_anchor(path: Path, spec: ExperimentSpec, specs: dict[str, ExperimentSpec]) -> None:
    """An anchored experiment binds to a trained adapters experiment with the same text encoder and
    adapter shape, whose own media side is another dataset (and is not anchored itself)."""
    if spec.anchor is None:
        return
    where = f"{path}: experiment {spec.name!r}: anchor"
    anchor = specs.get(spec.anchor)
    if anchor is None:
        raise RegistryError(f"{where} {spec.anchor!r} is not an experiment of this file")
    problems = [
        (anchor.anchor is not None, f"{anchor.name!r} is anchored itself; bind to the experiment it binds to"),
        (spec.method != "adapters" or anchor.method != "adapters", "both experiments must train adapters"),
        (anchor.text_encoder != spec.text_encoder, f"{anchor.name!r} uses text encoder {anchor.text_encoder!r}, not {spec.text_encoder!r}"),
        (anchor.adapter != spec.adapter, f"{anchor.name!r} has another adapter shape ({anchor.adapter}); use the same"),
        (anchor.dataset == spec.dataset, f"{anchor.name!r} is trained on the same dataset {spec.dataset!r}"),
    ]  # fmt: skip
    for bad, why in problems:
        if bad:
            raise RegistryError(f"{where}: {why}")


def load_experiments(path: str | Path | None = None) -> dict[str, ExperimentSpec]:
    path = Path(path) if path else configs_dir() / "experiments.yaml"
    data = _load_yaml(path, "experiments")
    defaults = data.get("defaults", {}) or {}
    out = {}
    for name, entry in data["experiments"].items():
        entry = {**defaults, **(entry or {})}
        for part in ("adapter", "fusemix", "train"):  # an entry's overrides add to the defaults' ones
            entry[part] = {**(defaults.get(part) or {}), **(entry.get(part) or {})}
        try:
            base = preset(entry.pop("preset", "cpu"))
            adapter = replace(base.adapter, **entry.pop("adapter", {}) or {})
            fusemix = from_dict(FuseMixConfig, {**vars(base.fusemix), **(entry.pop("fusemix", {}) or {})})
            train = from_dict(TrainConfig, {**vars(base.train), **(entry.pop("train", {}) or {})})
            entry["eval_datasets"] = tuple(entry.get("eval_datasets") or ())
            spec = ExperimentSpec(name=name, adapter=adapter, fusemix=fusemix, train=train, **entry)
        except (TypeError, ValueError, KeyError) as err:
            raise RegistryError(f"{path}: experiment {name!r}: {err}") from err
        if spec.caption not in ("clean", "raw"):
            raise RegistryError(f"{path}: experiment {name!r}: caption must be clean or raw")
        if spec.method not in METHODS:
            raise RegistryError(
                f"{path}: experiment {name!r}: method must be one of {', '.join(METHODS)}, got {spec.method!r}"
            )
        if not isinstance(spec.auto_run, bool):
            raise RegistryError(f"{path}: experiment {name!r}: auto_run must be true or false")
        if not isinstance(spec.seeds, int) or spec.seeds < 1:
            raise RegistryError(f"{path}: experiment {name!r}: seeds must be a whole number >= 1")
        if spec.group_by not in GROUP_COLUMNS:
            raise RegistryError(
                f"{path}: experiment {name!r}: group_by must be one of {GROUP_COLUMNS[1:]}, got {spec.group_by!r}"
            )
        if spec.hubness not in (None, *HUBNESS_METHODS):
            raise RegistryError(
                f"{path}: experiment {name!r}: hubness must be one of {HUBNESS_METHODS}, got {spec.hubness!r}"
            )
        out[name] = spec
    for spec in out.values():
        _check_anchor(path, spec, out)
    return out
