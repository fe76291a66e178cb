"""Curation, training and evaluation of one experiment, reading latents from the lake.

Pure glue between the lake and the library: no Dagster here. The assets in assets/ call these and
attach the returned metadata; MLflow logging is passed in as callbacks.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fusion.adapters import EncoderRef, FusedModel
from fusion.curate import select_diversity, select_quality, select_quantity
from fusion.trainer import TrainResult, train_adapters
from pipelines.lake import Lake, arrow_to_vectors, table_name
from pipelines.registries import ExperimentSpec

CURATED_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("media_id", pa.string()),
        ("caption_id", pa.string()),
        ("split", pa.string()),
        ("group_id", pa.string()),
        ("concept", pa.string()),
        ("quality", pa.float64()),
    ]
)


def latents_for(
    lake: Lake, dataset: str, encoder: str, ids: list[str], fingerprint: str | None = None
) -> np.ndarray:
    """[len(ids), d] latents in the order of `ids`; raises if any is missing or of another fingerprint."""
    table = lake.read(table_name("latents", dataset, encoder), ["media_id", "vector", "fingerprint"])
    if fingerprint is not None:
        table = table.filter(pc.equal(table["fingerprint"], fingerprint))
    index = {m: i for i, m in enumerate(table["media_id"].to_pylist())}
    missing = [m for m in ids if m not in index]
    if missing:
        raise LookupError(
            f"{len(missing)} of {len(ids)} items have no latent from {encoder} in dataset {dataset}"
            f"{' with fingerprint ' + fingerprint if fingerprint else ''} (first: {missing[0]}); run extraction"
        )
    vectors = arrow_to_vectors(table["vector"])
    return vectors[np.fromiter((index[m] for m in ids), dtype=np.int64, count=len(ids))]


def curate(lake: Lake, exp: ExperimentSpec, media_fp: str, text_fp: str) -> tuple[pa.Table, dict]:
    """Selects the experiment's training pairs (val and test stay whole). Pairs whose media or caption
    has no current latent are left out and counted."""
    pairs = lake.read(table_name("pairs", exp.dataset))
    cap_col = "caption_id" if exp.caption == "clean" else "raw_caption_id"
    pairs = pairs.filter(pc.is_valid(pairs[cap_col]))
    media_ok = lake.ids(
        table_name("latents", exp.dataset, exp.media_encoder), filter=f"fingerprint = '{media_fp}'"
    )
    text_ok = lake.ids(
        table_name("latents", exp.dataset, exp.text_encoder), filter=f"fingerprint = '{text_fp}'"
    )
    has = np.array(
        [
            m in media_ok and c in text_ok
            for m, c in zip(pairs["media_id"].to_pylist(), pairs[cap_col].to_pylist(), strict=True)
        ],
        dtype=bool,
    )
    without_latents = int((~has).sum())
    pairs = pairs.filter(pa.array(has))
    train = pairs.filter(pc.equal(pairs["split"], "train"))
    rest = pairs.filter(pc.not_equal(pairs["split"], "train"))
    sel = dict(exp.select)
    strategy = sel.pop("strategy", "all")
    seed = int(sel.pop("seed", exp.train.seed))
    keys = train["pair_id"].to_pylist()
    if strategy == "all":
        idx = np.arange(len(keys))
    elif strategy == "quantity":
        idx = select_quantity(keys, min(int(sel["n"]), len(keys)), seed)
    elif strategy == "quality":
        idx = select_quality(train["quality"].to_numpy(zero_copy_only=False), float(sel["min_quality"]))
    elif strategy == "diversity":
        lat = latents_for(lake, exp.dataset, exp.media_encoder, train["media_id"].to_pylist(), media_fp)
        idx = select_diversity(
            lat, min(int(sel["n"]), len(keys)), int(sel.get("k", 16)), sel.get("mode", "balanced"), seed
        )
    else:
        raise ValueError(f"experiment {exp.name}: unknown select strategy {strategy!r}")
    chosen = pa.concat_tables([train.take(pa.array(idx, type=pa.int64())), rest])
    out = pa.table(
        {
            "pair_id": chosen["pair_id"],
            "media_id": chosen["media_id"],
            "caption_id": chosen[cap_col],
            "split": chosen["split"],
            "group_id": chosen["group_id"],
            "concept": chosen["concept"],
            "quality": chosen["quality"],
        },
        schema=CURATED_SCHEMA,
    )
    counts = {s: int(pc.sum(pc.equal(out["split"], s)).as_py() or 0) for s in ("train", "val", "test")}
    return out, {
        "strategy": strategy,
        "candidates": len(keys),
        "selected_train_pairs": counts["train"],
        "val_pairs": counts["val"],
        "test_pairs": counts["test"],
        "pairs_without_latents": without_latents,
    }


def split_arrays(
    lake: Lake, exp: ExperimentSpec, curated: pa.Table, split: str
) -> tuple[np.ndarray, np.ndarray, pa.Table]:
    rows = curated.filter(pc.equal(curated["split"], split))
    x = latents_for(lake, exp.dataset, exp.media_encoder, rows["media_id"].to_pylist())
    y = latents_for(lake, exp.dataset, exp.text_encoder, rows["caption_id"].to_pylist())
    return x, y, rows


def retrieval_inputs(rows: pa.Table) -> tuple[list[str], list[str], np.ndarray]:
    """Unique media ids, caption ids (one per pair, a caption shared by two items kept per pair) and
    the index of each caption's item: the multi-caption retrieval protocol's inputs."""
    media = rows["media_id"].to_pylist()
    items = list(dict.fromkeys(media))
    pos = {m: i for i, m in enumerate(items)}
    return items, rows["caption_id"].to_pylist(), np.array([pos[m] for m in media], dtype=np.int64)


def split_latents(
    lake: Lake, exp: ExperimentSpec, rows: pa.Table
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw latents of a split for retrieval: (items [n_items, d_m], captions [n_captions, d_t], caption -> item)."""
    items, captions, owner = retrieval_inputs(rows)
    item_lat = latents_for(lake, exp.dataset, exp.media_encoder, items)
    text_lat = latents_for(lake, exp.dataset, exp.text_encoder, captions)
    return item_lat, text_lat, owner


def embed_split(
    lake: Lake, exp: ExperimentSpec, model: FusedModel, rows: pa.Table
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(item embeddings [n_items, d], caption embeddings [n_captions, d], caption -> item index)."""
    item_lat, text_lat, owner = split_latents(lake, exp, rows)
    media_side, text_side = model.sides
    return model.embed(media_side, item_lat).numpy(), model.embed(text_side, text_lat).numpy(), owner


def train_experiment(
    lake: Lake,
    exp: ExperimentSpec,
    curated: pa.Table,
    media_ref: EncoderRef,
    text_ref: EncoderRef,
    media_side: str,
    on_step=None,
    on_validate=None,
) -> TrainResult:
    """Trains on the curated train split; picks the best step on the val split by the retrieval
    R-sum (R@1+R@5+R@10 both ways), never looking at test."""
    from evaluation.retrieval import retrieval_metrics

    x, y, _ = split_arrays(lake, exp, curated, "train")
    if len(x) < 2:
        raise ValueError(f"experiment {exp.name}: {len(x)} training pairs; need at least 2")
    val_rows = curated.filter(pc.equal(curated["split"], "val"))
    val = split_latents(lake, exp, val_rows) if len(val_rows) >= 2 else None

    def rsum(model: FusedModel) -> float:
        media_side, text_side = model.sides
        r = retrieval_metrics(
            model.embed(media_side, val[0]), model.embed(text_side, val[1]), val[2], progress=False
        )
        return float(sum(r.t2i_recall.values()) + sum(r.i2t_recall.values()))

    return train_adapters(
        x,
        y,
        exp.adapter,
        exp.fusemix,
        exp.train,
        validator=rsum if val is not None else None,
        sides=(media_side, "text"),
        encoders={media_side: media_ref, "text": text_ref},
        on_step=on_step,
        on_validate=on_validate,
        progress=True,
    )


def experiment_params(
    exp: ExperimentSpec, media_ref: EncoderRef, text_ref: EncoderRef, selection: dict
) -> dict:
    """Flat parameters for MLflow: encoders and fingerprints, subset, FuseMix, every hyperparameter."""
    flat = {
        "dataset": exp.dataset,
        "family": exp.family,
        "variable": exp.variable,
        "caption": exp.caption,
        "media_encoder": media_ref.name,
        "media_fingerprint": media_ref.fingerprint,
        "text_encoder": text_ref.name,
        "text_fingerprint": text_ref.fingerprint,
        **{f"select.{k}": v for k, v in exp.select.items()},
        **{f"curate.{k}": v for k, v in selection.items()},
        **{f"adapter.{k}": v for k, v in asdict(exp.adapter).items()},
        **{f"fusemix.{k}": v for k, v in asdict(exp.fusemix).items()},
        **{f"train.{k}": v for k, v in asdict(exp.train).items()},
    }
    return {k: str(v) for k, v in flat.items()}


def checkpoint_dir(models_dir: Path, experiment: str) -> Path:
    return Path(models_dir) / experiment
