"""The trained tiny project the search service tests (test_web.py, test_web_browser.py) search in,
built through the real pipeline, once per session (the `search_project` fixture, conftest.py):
`tests.pipeline_fixture` pictures (plus one SVG that carries script) and tones, ingested, extracted
with the tiny encoders, `shapes-fusemix` (image, text) trained, `tones-bound` (audio bound to it
through text: image, audio, text) trained, and both experiments' embeddings materialised
(app.demo.run_plan runs experiment_job, which includes them).

Also the bad files the tests upload: a truncated PNG, a decompression bomb, a WAV of any samples.
"""

from __future__ import annotations

import csv
import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from tests.pipeline_fixture import Project, add_sounds, make_project

# A drawing whose script must never run where the service shows it (it is served rasterised).
SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="40" height="40" onload="alert(1)">'
    '<script>alert(2)</script><circle cx="20" cy="20" r="15" fill="#d22"/></svg>'
)


@dataclass
class SearchProject:
    project: Project

    @property
    def lake_root(self) -> Path:
        return self.project.home / "lance"

    @property
    def models(self) -> Path:
        return self.project.home / "models"

    def env(self) -> dict[str, str]:
        """What a `fusemix` process needs to find this project's lake, models and registries."""
        return {
            "FUSEMIX_HOME": str(self.project.home),
            "FUSEMIX_CONFIGS": str(self.project.configs),
            "FUSEMIX_TORCH_THREADS": "1",
        }

    def searcher(self, **kwargs):
        from fusion.encoders import load_registry
        from pipelines.lake import Lake
        from pipelines.registries import load_datasets
        from pipelines.search import Searcher

        return Searcher(
            Lake(self.lake_root),
            self.models,
            load_registry(self.project.configs / "encoders.yaml"),
            datasets=load_datasets(self.project.configs / "datasets.yaml"),
            data_cache=self.project.home / "cache" / "data",
            **kwargs,
        )


def build_search_project(tmp: Path) -> SearchProject:
    """The project in `tmp`, ingested, extracted, trained and embedded; fails when the pipeline does."""
    import dagster as dg

    project = add_sounds(make_project(tmp, variants=2, epochs=2), variants=1)
    (project.data / "images" / "dot.svg").write_text(SVG)
    with open(project.data / "manifest.csv", "a", newline="") as f:
        csv.writer(f).writerow(["images/dot.svg", "a red dot drawn as a vector", "train", "red-dot"])
    setup = SearchProject(project)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in setup.env().items():
            mp.setenv(key, value)
        mp.delenv("FUSEMIX_LAKE", raising=False)
        from app.definitions import build_defs
        from app.demo import run_plan

        defs, parts = build_defs(project.configs, resources=project.resources())
        assert run_plan(defs, parts, dg.DagsterInstance.ephemeral(), ["tones-bound"]), "the pipeline failed"
    return setup


def wav(samples: np.ndarray, sr: int = 16000) -> bytes:
    out = io.BytesIO()
    sf.write(out, samples.astype(np.float32), sr, format="WAV")
    return out.getvalue()


def png_header_bomb(side: int = 8000) -> bytes:
    """A valid 1-bit PNG of side x side pixels (64 million by default) in a few kilobytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = (b"\0" + b"\0" * ((side + 7) // 8)) * side
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows, 9))
        + chunk(b"IEND", b"")
    )


def truncated_png() -> bytes:
    """The first half of a noisy picture's PNG: the header is fine, the pixel data ends early."""
    rng = np.random.default_rng(0)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(out, format="PNG")
    data = out.getvalue()
    return data[: len(data) // 2]
