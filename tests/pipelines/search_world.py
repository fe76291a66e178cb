"""A small real world to search in: the tiny project (tests.pipeline_fixture) ingested and extracted
with the tiny random encoders, and checkpoints of random (untrained) adapters saved as training would.

`build_world(tmp)` returns a World with
    lake            shapes (pictures, one of them an SVG) and, with sounds, tones (short tones)
                    ingested; latents of tiny-image / tiny-audio and tiny-text on each
    two-sided       checkpoint `shapes-pair` (image, text), its extra in the two-sided form
    three-sided     with sounds: `shapes-tri` (image, audio, text), its extra with `sides` and
                    `datasets` as a bound three-modality experiment writes them

Random adapters are enough to test search: a query equal to a stored item is encoded to the stored
latent and mapped to the stored embedding, so it is found first with score 1.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch

from fusion.adapters import Adapter, EncoderRef, FusedModel
from fusion.checkpoint import save_checkpoint
from fusion.config import AdapterConfig
from fusion.encoders import build_encoder, load_registry
from pipelines.extract import run_extraction
from pipelines.ingest import dataset_roots, load_dataset, write_dataset
from pipelines.lake import Lake
from pipelines.registries import load_datasets
from tests.pipeline_fixture import Project, add_sounds, make_project

SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="40" height="40" onload="alert(1)">'
    '<script>alert(2)</script><circle cx="20" cy="20" r="15" fill="#d22"/></svg>'
)
CFG = AdapterConfig(depth=1, expansion=2, dropout=0.0, output_dim=16)


@dataclass
class World:
    project: Project
    lake: Lake
    models: Path
    registry: dict
    datasets: dict
    cache: Path
    encoders: dict


def save_random(world: World, experiment: str, sides: dict[str, str], extra: dict, seed: int = 0) -> Path:
    """A checkpoint of random adapters for `sides` (side -> encoder) with config `extra`."""
    torch.manual_seed(seed)
    refs = {s: EncoderRef(n, world.encoders[n].fingerprint, world.encoders[n].dim) for s, n in sides.items()}
    model = FusedModel({s: Adapter(r.dim, CFG) for s, r in refs.items()}, refs)
    return save_checkpoint(world.models / experiment, model, CFG, extra=extra)


def pair_extra(dataset: str = "shapes", eval_datasets=None) -> dict:
    extra = {
        "experiment": "shapes-pair",
        "dataset": dataset,
        "method": "adapters",
        "media_encoder": "tiny-image",
        "text_encoder": "tiny-text",
        "media_side": "image",
        "text_side": "text",
        "inputs_hash": "0123456789abcdef",
    }
    if eval_datasets is not None:
        extra["eval_datasets"] = list(eval_datasets)
    return extra


def build_world(tmp: Path, sounds: bool = True, variants: int = 2) -> World:
    project = make_project(Path(tmp), variants=variants)
    if sounds:  # before the SVG row: add_sounds makes one tone per concept of the pictures
        add_sounds(project, variants=1, anchored=False)
    (project.data / "images" / "dot.svg").write_text(SVG)
    with open(project.data / "manifest.csv", "a", newline="") as f:
        csv.writer(f).writerow(["images/dot.svg", "a red dot drawn as a vector", "train", "red-dot"])
    lake = Lake(project.home / "lance")
    cache = project.home / "cache" / "data"
    datasets = load_datasets(project.configs / "datasets.yaml")
    registry = load_registry(project.configs / "encoders.yaml")
    names = ("tiny-image", "tiny-text", "tiny-audio") if sounds else ("tiny-image", "tiny-text")
    encoders = {n: build_encoder(registry[n]) for n in names}
    plan = {"shapes": ("tiny-image", "tiny-text")}
    if sounds:
        plan["tones"] = ("tiny-audio", "tiny-text")
    for name, encs in plan.items():
        write_dataset(lake, name, load_dataset(datasets[name], cache, progress=False))
        for enc in encs:
            run_extraction(
                lake, name, encoders[enc], roots=dataset_roots(datasets[name], cache), progress=False
            )
    world = World(project, lake, project.home / "models", registry, datasets, cache, encoders)
    save_random(world, "shapes-pair", {"image": "tiny-image", "text": "tiny-text"}, pair_extra())
    if sounds:
        sides = {"image": "tiny-image", "audio": "tiny-audio", "text": "tiny-text"}
        extra = {
            **pair_extra(),
            "experiment": "shapes-tri",
            "sides": sides,
            "datasets": {"shapes": "image", "tones": "audio"},
        }
        save_random(world, "shapes-tri", sides, extra, seed=1)
    return world
