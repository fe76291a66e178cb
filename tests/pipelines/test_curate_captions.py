"""Raw-caption experiments (the quality ablation) train on the raw captions but are chosen and scored
on the cleaned ones, so that raw and clean runs answer the very same val and test queries: curate()
and the zero-shot holdout pairs, on a real Lance lake."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipelines import schemas
from pipelines.curate import captions_used, curate, holdout_pairs
from pipelines.lake import Lake
from pipelines.registries import ExperimentSpec
from pipelines.schemas import table_name

DATASET = "noisy"
SPLITS = ["train", "train", "train", "val", "val", "test", "test", "test"]


def _pairs() -> pa.Table:
    n = len(SPLITS)
    # The last test pair has a raw caption only: without a cleaned one it has no query to score.
    clean = [f"c{i}" for i in range(n - 1)] + [None]
    return pa.table(
        {
            "pair_id": [f"p{i}" for i in range(n)],
            "media_id": [f"m{i}" for i in range(n)],
            "caption_id": clean,
            "raw_caption_id": [f"r{i}" for i in range(n)],
            "split": SPLITS,
            "group_id": [None] * n,
            "concept": [f"k{i}" for i in range(n)],
            "source": ["s"] * n,
            "license": ["cc0"] * n,
            "quality": [0.5] * n,
        },
        schema=schemas.PAIRS,
    )


def _exp(caption: str) -> ExperimentSpec:
    return ExperimentSpec(
        name=f"e-{caption}", dataset=DATASET, media_encoder="img", text_encoder="txt", caption=caption
    )


@pytest.fixture
def lake(tmp_path) -> Lake:
    lk = Lake(tmp_path / "lake")
    pairs = _pairs()
    lk.overwrite(table_name("pairs", DATASET), pairs)
    rng = np.random.default_rng(0)

    def latents(ids: list[str], encoder: str) -> pa.Table:
        vec = rng.standard_normal((len(ids), 4)).astype(np.float32)
        return pa.table(
            {
                "media_id": ids,
                "vector": list(vec),
                "fingerprint": ["fp"] * len(ids),
                "encoder": [encoder] * len(ids),
            },
            schema=schemas.latents(4),
        )

    lk.overwrite(table_name("latents", DATASET, "img"), latents(pairs["media_id"].to_pylist(), "img"))
    texts = [t for t in pairs["caption_id"].to_pylist() if t] + pairs["raw_caption_id"].to_pylist()
    lk.overwrite(table_name("latents", DATASET, "txt"), latents(texts, "txt"))
    return lk


def test_raw_experiments_train_on_raw_captions_and_are_scored_on_the_clean_ones():
    pairs = _pairs()
    raw = captions_used(pairs, _exp("raw")).to_pylist()
    assert raw == ["r0", "r1", "r2", "c3", "c4", "c5", "c6", None]
    assert captions_used(pairs, _exp("clean")).to_pylist() == pairs["caption_id"].to_pylist()


def test_curate_gives_raw_and_clean_runs_the_same_val_and_test_pairs(lake):
    raw, raw_info = curate(lake, _exp("raw"), "fp", "fp")
    clean, clean_info = curate(lake, _exp("clean"), "fp", "fp")
    assert raw.schema == schemas.CURATED

    def by_split(table: pa.Table, split: str) -> list[tuple[str, str]]:
        rows = table.to_pylist()
        return sorted((r["media_id"], r["caption_id"]) for r in rows if r["split"] == split)

    assert by_split(raw, "train") == [("m0", "r0"), ("m1", "r1"), ("m2", "r2")]
    assert by_split(clean, "train") == [("m0", "c0"), ("m1", "c1"), ("m2", "c2")]
    for split in ("val", "test"):
        assert by_split(raw, split) == by_split(clean, split)
    assert by_split(raw, "test") == [("m5", "c5"), ("m6", "c6")]  # m7 has no cleaned caption
    assert raw_info["test_pairs"] == clean_info["test_pairs"] == 2


def test_zero_shot_holdout_pairs_are_the_clean_test_captions_whatever_the_training_captions(lake):
    for caption in ("raw", "clean"):
        held = holdout_pairs(lake, _exp(caption), DATASET)
        assert held.to_pylist() == [
            {"media_id": "m5", "caption_id": "c5"},
            {"media_id": "m6", "caption_id": "c6"},
        ]
