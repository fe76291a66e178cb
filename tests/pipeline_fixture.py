"""A complete, tiny FuseMix project in a temporary folder, for the pipeline tests.

`make_project(tmp)` writes configs/ (tiny random encoders, one manifest dataset of generated
pictures, two short experiments), the media, and returns the paths plus Dagster resources that point
every store (Lance lake, MLflow SQLite, models, reports) into the folder.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import yaml
from PIL import Image, ImageDraw

from pipelines.resources import DuckDBCatalog, EncoderBank, LanceLake, MlflowTracking, PipelinePaths
from tests.tiny_models import write_tiny_registry

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("square", "circle", "triangle")


@dataclass
class Project:
    root: Path
    configs: Path
    data: Path
    home: Path
    n_media: int
    n_pairs: int
    # Where the Lance tables go: the home's lance/ folder unless a test puts them elsewhere (s3://...).
    lake_root: str | None = None

    def resources(self) -> dict:
        lake = LanceLake(root=self.lake_root or str(self.home / "lance"))
        return {
            "lake": lake,
            "encoders": EncoderBank(registry_path=str(self.configs / "encoders.yaml")),
            "tracking": MlflowTracking(
                tracking_uri=f"sqlite:///{self.home / 'mlflow.db'}",
                artifact_root=str(self.home / "artifacts"),
            ),
            "catalog": DuckDBCatalog(lake=lake),
            "paths": PipelinePaths(home=str(self.home), configs=str(self.configs)),
        }


def _draw(shape: str, colour: tuple[int, int, int], size: int, shift: int) -> Image.Image:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    a, b = 4 + shift, size - 4 - shift
    if shape == "square":
        d.rectangle([a, a, b, b], fill=colour)
    elif shape == "circle":
        d.ellipse([a, a, b, b], fill=colour)
    else:
        d.polygon([(size // 2, a), (a, b), (b, b)], fill=colour)
    return img


def make_project(tmp: Path, variants: int = 3, epochs: int = 3) -> Project:
    """12 concepts (colour x shape) x `variants` pictures, 2 captions each; concepts split 8/2/2.

    One manifest row points at a missing file, so ingestion has one quarantine row.
    """
    root = Path(tmp)
    configs, data, home = root / "configs", root / "data", root / "home"
    for p in (configs, data / "images", home):
        p.mkdir(parents=True, exist_ok=True)
    shutil.copy(write_tiny_registry(root / "models"), configs / "encoders.yaml")
    concepts = [(c, s) for c in COLOURS for s in SHAPES]
    order = np.random.default_rng(0).permutation(len(concepts))
    split_of = {concepts[i]: ("train" if r < 8 else "val" if r < 10 else "test") for r, i in enumerate(order)}
    rows = []
    for (colour, shape), split in split_of.items():
        for v in range(variants):
            name = f"images/{colour}_{shape}_{v}.png"
            _draw(shape, COLOURS[colour], 32 + 4 * v, v).save(data / name)
            for caption in (f"a {colour} {shape}", f"a picture of a {shape} in {colour}"):
                rows.append(
                    {"image": name, "caption": caption, "split": split, "concept": f"{colour}-{shape}"}
                )
    rows.append(
        {"image": "images/missing.png", "caption": "a lost picture", "split": "train", "concept": "lost"}
    )
    with open(data / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption", "split", "concept"])
        w.writeheader()
        w.writerows(rows)
    (configs / "datasets.yaml").write_text(
        yaml.safe_dump(
            {
                "datasets": {
                    "shapes": {
                        "modality": "image",
                        "reader": "manifest",
                        "root": str(data),
                        "options": {"license": "CC0-1.0"},
                    }
                }
            }
        )
    )
    small = {
        "adapter": {"depth": 1, "expansion": 2, "dropout": 0.1, "output_dim": 16},
        "train": {"epochs": epochs, "batch_size": 16, "warmup_steps": 2},
    }
    (configs / "experiments.yaml").write_text(
        yaml.safe_dump(
            {
                "defaults": {"preset": "cpu-small", **small},
                "experiments": {
                    "shapes-fusemix": {
                        "family": "demo",
                        "dataset": "shapes",
                        "media_encoder": "tiny-image",
                        "text_encoder": "tiny-text",
                    },
                    "shapes-n12": {
                        "family": "quantity",
                        "variable": "12",
                        "dataset": "shapes",
                        "media_encoder": "tiny-image",
                        "text_encoder": "tiny-text",
                        "select": {"strategy": "quantity", "n": 12},
                    },
                },
            }
        )
    )
    n_media = len(concepts) * variants
    return Project(root, configs, data, home, n_media=n_media, n_pairs=2 * n_media)


# A pitch and a timbre per colour and shape, so that each concept of `tones` sounds different.
PITCH = {"red": 220.0, "green": 330.0, "blue": 440.0, "yellow": 660.0}
HARMONICS = {"square": (1.0, 0.0, 0.33), "circle": (1.0, 0.0, 0.0), "triangle": (1.0, 0.5, 0.0)}


def add_sounds(project: Project, variants: int = 2, anchored: bool = True) -> Project:
    """Adds the audio dataset `tones` (one short tone per colour x shape concept, named like the
    pictures' concepts, `variants` clips each, 2 captions, the same splits as `shapes`) and, with
    `anchored`, the experiment `tones-bound` (tiny-audio x tiny-text) bound to `shapes-fusemix`: three
    modalities through one text side."""
    data = project.data / "sounds"
    data.mkdir(parents=True, exist_ok=True)
    with open(project.data / "manifest.csv", newline="") as f:
        pictures = list(csv.DictReader(f))
    split_of = {r["concept"]: r["split"] for r in pictures if r["concept"] != "lost"}
    sr = 16_000
    t = np.arange(int(0.5 * sr)) / sr
    rows = []
    for concept, split in sorted(split_of.items()):
        colour, shape = concept.split("-")
        for v in range(variants):
            f0 = PITCH[colour] * (1 + 0.02 * v)
            wave = sum(a * np.sin(2 * np.pi * f0 * (h + 1) * t) for h, a in enumerate(HARMONICS[shape]))
            name = f"{concept}_{v}.wav"
            soundfile.write(data / name, (0.3 * wave / np.max(np.abs(wave))).astype(np.float32), sr)
            for caption in (f"a {colour} {shape} sound", f"the tone of a {shape} in {colour}"):
                rows.append({"audio": name, "caption": caption, "split": split, "concept": concept})
    with open(data / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["audio", "caption", "split", "concept"])
        w.writeheader()
        w.writerows(rows)
    datasets = yaml.safe_load((project.configs / "datasets.yaml").read_text())
    datasets["datasets"]["tones"] = {
        "modality": "audio",
        "reader": "manifest",
        "root": str(data),
        "options": {"license": "CC0-1.0"},
    }
    (project.configs / "datasets.yaml").write_text(yaml.safe_dump(datasets))
    if anchored:
        exps = yaml.safe_load((project.configs / "experiments.yaml").read_text())
        exps["experiments"]["tones-bound"] = {
            "family": "tri",
            "dataset": "tones",
            "media_encoder": "tiny-audio",
            "text_encoder": "tiny-text",
            "anchor": "shapes-fusemix",
        }
        (project.configs / "experiments.yaml").write_text(yaml.safe_dump(exps))
    return project
