"""Curation, training and evaluation of one experiment, reading latents from the lake.

Pure glue between the lake and the library: no Dagster here. The assets in assets/ call these and
attach the returned metadata; MLflow logging is passed in as callbacks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fusion.adapters import EncoderRef, FusedModel
from fusion.curate import select_diversity, select_quality, select_quantity
from fusion.trainer import TrainResult, train_adapters
from pipelines.lake import Lake, arrow_to_vectors, sql_str, table_name
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
        table_name("latents", exp.dataset, exp.media_encoder), filter=f"fingerprint = {sql_str(media_fp)}"
    )
    text_ok = lake.ids(
        table_name("latents", exp.dataset, exp.text_encoder), filter=f"fingerprint = {sql_str(text_fp)}"
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


def retrieval_inputs(rows: pa.Table) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Unique media ids, unique caption ids, and each distinct pair as (item index, caption index).

    A caption shared by several items (the name of an emoji drawn in six styles) is one query with
    several correct items, not six identical queries that tie with each other."""
    media, captions = rows["media_id"].to_pylist(), rows["caption_id"].to_pylist()
    items, texts = list(dict.fromkeys(media)), list(dict.fromkeys(captions))
    ipos, tpos = {m: i for i, m in enumerate(items)}, {c: i for i, c in enumerate(texts)}
    pairs = sorted({(ipos[m], tpos[c]) for m, c in zip(media, captions, strict=True)})
    return (
        items,
        texts,
        np.array([p[0] for p in pairs], dtype=np.int64),
        np.array([p[1] for p in pairs], dtype=np.int64),
    )


@dataclass(frozen=True)
class SplitLatents:
    """Raw latents of one split for retrieval: items [n_items, d_m], texts [n_texts, d_t], and the
    positive pairs as index arrays into them."""

    item_ids: list[str]
    text_ids: list[str]
    items: np.ndarray
    texts: np.ndarray
    pair_items: np.ndarray
    pair_texts: np.ndarray


def split_latents(lake: Lake, exp: ExperimentSpec, rows: pa.Table) -> SplitLatents:
    item_ids, text_ids, pi, pt = retrieval_inputs(rows)
    return SplitLatents(
        item_ids,
        text_ids,
        latents_for(lake, exp.dataset, exp.media_encoder, item_ids),
        latents_for(lake, exp.dataset, exp.text_encoder, text_ids),
        pi,
        pt,
    )


def chance_levels(split: SplitLatents, ks: tuple[int, ...]) -> dict[str, dict[int, float]]:
    """Expected Recall@K of a random ranking, per direction, averaged over the queries (a query with
    m correct candidates among n has chance 1 - C(n-m, K)/C(n, K))."""
    from evaluation.retrieval import chance_recall

    n_items, n_texts = len(split.item_ids), len(split.text_ids)
    per_text = np.bincount(split.pair_texts, minlength=n_texts)
    per_item = np.bincount(split.pair_items, minlength=n_items)
    out = {}
    for name, counts, n in (("t2i", per_text, n_items), ("i2t", per_item, n_texts)):
        m = counts[counts > 0]
        out[name] = {k: float(np.mean([chance_recall(n, min(k, n), int(c)) for c in m])) for k in ks}
    return out


def evaluate_split(model: FusedModel, split: SplitLatents, progress: bool = False):
    """(RetrievalResult, item embeddings [n_items, d], text embeddings [n_texts, d])."""
    from evaluation.retrieval import retrieval_metrics_from_pairs

    media_side, text_side = model.sides
    item_emb = model.embed(media_side, split.items).numpy()
    text_emb = model.embed(text_side, split.texts).numpy()
    result = retrieval_metrics_from_pairs(
        item_emb, text_emb, split.pair_items, split.pair_texts, progress=progress
    )
    return result, item_emb, text_emb


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
    x, y, _ = split_arrays(lake, exp, curated, "train")
    if len(x) < 2:
        raise ValueError(f"experiment {exp.name}: {len(x)} training pairs; need at least 2")
    val_rows = curated.filter(pc.equal(curated["split"], "val"))
    val = split_latents(lake, exp, val_rows) if len(val_rows) >= 2 else None

    def rsum(model: FusedModel) -> float:
        r, _, _ = evaluate_split(model, val)
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
