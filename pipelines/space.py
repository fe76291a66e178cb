"""The shared space of a trained experiment: which sides it maps (a side is a modality: image, audio,
text), the frozen encoder of each, and which datasets' items live in it.

    space = load_space(models_dir, "emoji-fusemix")
    space.sides        # {"image": "effnet-lite0", "text": "minilm"}
    space.datasets     # {"emoji": "image"}: each dataset's media side; its captions are "text" items
    space.embed("image", latents)   # [B, d_media] -> float32 [B, D], unit rows

The checkpoint is the first seed's, in <models>/<experiment>/ (pipelines.train.seed_dirs): FuseMix
adapters (fusion.checkpoint) or a baseline (evaluation.baselines). Its config's `extra` names the
sides: a three-modality experiment records `sides` (side -> encoder) and `datasets` (dataset ->
media side) itself; a two-sided one records `dataset`, `media_side`, `media_encoder`,
`text_encoder` and `eval_datasets` (older checkpoints lack the last: only their own dataset), from
which the two are derived. Loading needs no encoder: `check_encoder` compares one with the
checkpoint's fingerprint where latents or queries are fed.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError

from fusion.adapters import EncoderRef, FusedModel
from fusion.checkpoint import CONFIG, CheckpointMismatch, load_checkpoint, read_config

TEXT = "text"
SIDES = ("image", "audio", TEXT)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class SearchError(ValueError):
    """The experiment, its checkpoint, its latents or embeddings, or the query cannot serve a search;
    the message says why (a client's mistake or a step to run, never a bug)."""


@dataclass
class Space:
    """An experiment's trained shared space. `model.embed(side, latents)` maps latents of that side's
    encoder to unit vectors [B, dim]; `encoders` are the EncoderRefs (name, fingerprint, dim) the
    checkpoint was trained on; `model_hash` identifies the checkpoint's files (embeddings made by
    another checkpoint are refused); `record` is the config's `extra`."""

    experiment: str
    directory: Path
    model: Any
    sides: dict[str, str]
    datasets: dict[str, str]
    encoders: dict[str, EncoderRef] = field(default_factory=dict)
    model_hash: str = ""
    dim: int = 0
    record: dict = field(default_factory=dict)

    def datasets_of(self, side: str) -> list[str]:
        """The datasets whose items are on `side`: every dataset for text (its captions), else those
        whose media side it is."""
        self.require_side(side)
        return [d for d, media in self.datasets.items() if side == TEXT or media == side]

    def require_side(self, side: str) -> None:
        if side not in self.sides:
            raise SearchError(
                f"experiment {self.experiment!r} has no side {side!r}; its sides are {sorted(self.sides)}"
            )

    def check_encoder(self, side: str, ref: EncoderRef, what: str = "encoder") -> None:
        """Refuses an encoder (or latents made by one) other than the one `side` was trained on."""
        self.require_side(side)
        want = self.encoders[side]
        if (ref.name, ref.fingerprint, ref.dim) != (want.name, want.fingerprint, want.dim):
            raise SearchError(
                f"experiment {self.experiment!r} was trained on {side} latents of {want.name} "
                f"(fingerprint {want.fingerprint}, {want.dim}-d), but the {what} is {ref.name} "
                f"(fingerprint {ref.fingerprint}, {ref.dim}-d); re-extract the latents or retrain the experiment"
            )

    def embed(self, side: str, latents: np.ndarray) -> np.ndarray:
        """latents [B, d_side] -> float32 [B, dim], unit rows (FusedModel gives a tensor, a baseline
        an array)."""
        self.require_side(side)
        out = self.model.embed(side, latents)
        out = out.numpy() if hasattr(out, "numpy") else np.asarray(out)
        return np.ascontiguousarray(out, dtype=np.float32)


def check_name(experiment: str) -> None:
    """An experiment name is a folder under models/ and part of a table name: a plain name only."""
    if not isinstance(experiment, str) or not _NAME.match(experiment) or "__" in experiment:
        raise SearchError(f"invalid experiment name {experiment!r}: letters, digits, '_', '-', '.' only")


def model_hash(directory: Path) -> str:
    """sha256 (16 hex) of a checkpoint folder's config and weight files: which files mapped a table."""
    h = hashlib.sha256()
    for path in sorted([directory / CONFIG, *directory.glob("*.safetensors")]):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _derived(extra: dict, directory: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(sides, datasets) of a two-sided checkpoint from the keys pipelines.train writes."""
    missing = [k for k in ("dataset", "media_side", "media_encoder", "text_encoder") if not extra.get(k)]
    if missing:
        raise SearchError(f"checkpoint {directory} does not record {missing} in its config 'extra'")
    media = extra["media_side"]
    sides = {media: extra["media_encoder"], extra.get("text_side") or TEXT: extra["text_encoder"]}
    others = extra.get("eval_datasets") or []
    return sides, {extra["dataset"]: media, **{d: media for d in others if d != extra["dataset"]}}


def _recorded(extra: dict, directory: Path) -> tuple[dict[str, str], dict[str, str]]:
    sides, datasets = extra["sides"], extra["datasets"]
    if not (isinstance(sides, dict) and isinstance(datasets, dict) and sides and datasets):
        raise SearchError(f"checkpoint {directory}: 'sides' and 'datasets' must be non-empty mappings")
    bad = [d for d, s in datasets.items() if s not in sides or s == TEXT]
    if bad:
        raise SearchError(
            f"checkpoint {directory}: datasets {bad} name a media side that is not one of {sorted(sides)}"
        )
    return {str(k): str(v) for k, v in sides.items()}, {str(k): str(v) for k, v in datasets.items()}


def _load_model(directory: Path, config: dict) -> Any:
    if config.get("kind") == "baseline":
        from evaluation.baselines import load_baseline

        return load_baseline(directory)
    return load_checkpoint(directory)


def _dim(model: Any) -> int:
    if isinstance(model, FusedModel):
        return int(next(iter(model.adapters.values())).cfg.output_dim)
    return int(model.dim)


def load_space(models_dir: str | Path, experiment: str) -> Space:
    """The shared space of `experiment`'s checkpoint in <models_dir>/<experiment>; SearchError when
    there is none or its record does not say which sides and datasets it serves."""
    check_name(experiment)
    directory = Path(models_dir) / experiment
    try:
        config = read_config(directory)
    except FileNotFoundError as err:
        raise SearchError(
            f"experiment {experiment!r} has no trained model at {directory}; materialise its train asset first"
        ) from err
    except (CheckpointMismatch, ValueError) as err:  # another format version, a broken config.json
        raise SearchError(f"experiment {experiment!r}: cannot read {directory / CONFIG}: {err}") from err
    extra = config.get("extra") or {}
    if "sides" in extra or "datasets" in extra:
        sides, datasets = _recorded(extra, directory)
    else:
        sides, datasets = _derived(extra, directory)
    encoders = {s: EncoderRef(**config["encoders"][s]) for s in config.get("sides", [])}
    if set(encoders) != set(sides):
        raise SearchError(
            f"checkpoint {directory} has adapters for {sorted(encoders)} but records sides {sorted(sides)}"
        )
    wrong = {s: (sides[s], encoders[s].name) for s in sides if sides[s] != encoders[s].name}
    if wrong:
        raise SearchError(f"checkpoint {directory}: recorded encoders disagree with its adapters: {wrong}")
    try:
        model = _load_model(directory, config)
        digest = model_hash(directory)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:  # corrupt weights
        raise SearchError(f"experiment {experiment!r}: cannot load the model in {directory}: {err}") from err
    return Space(
        experiment=experiment,
        directory=directory,
        model=model,
        sides=sides,
        datasets=datasets,
        encoders=encoders,
        model_hash=digest,
        dim=_dim(model),
        record=extra,
    )
