"""Curate glue: an experiment's pairs and latents as the lake holds them.

`curate` selects the training pairs (quantity, quality, diversity; val and test stay whole),
`latents_contract` is the data contract checked before any training, and `split_arrays` /
`paired_split` read the curated splits' latents for training and evaluation. No Dagster here.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from evaluation.retrieval import PairedSplit, paired_ids
from fusion.adapters import EncoderRef
from fusion.selection import (
    alignment_quality,
    assign,
    diversity_sample,
    kmeans,
    select_by_clusters,
    select_quality,
    select_quality_fraction,
    select_quantity,
    uniform_indices,
)
from pipelines import schemas
from pipelines.extract import failed_items
from pipelines.lake import Lake, sql_str
from pipelines.registries import ExperimentSpec
from pipelines.schemas import table_name
from pipelines.storage import writing


def caption_column(exp: ExperimentSpec) -> str:
    """The pairs column of the experiment's training captions: cleaned or raw (quality ablation)."""
    return "caption_id" if exp.caption == "clean" else "raw_caption_id"


# The column with_captions_used adds to a pairs table.
CAPTION_USED = "caption_used"


def captions_used(pairs: pa.Table, exp: ExperimentSpec) -> pa.ChunkedArray:
    """The caption of each pair as the experiment sees it: the training split reads `caption_column`,
    val and test always the cleaned captions, so that raw and clean runs are chosen and scored on the
    very same queries."""
    train_col = caption_column(exp)
    if train_col == "caption_id":
        return pairs["caption_id"]
    return pc.if_else(pc.equal(pairs["split"], "train"), pairs[train_col], pairs["caption_id"])


def with_captions_used(pairs: pa.Table, exp: ExperimentSpec) -> pa.Table:
    """`pairs` with the CAPTION_USED column (`captions_used`)."""
    return pairs.append_column(CAPTION_USED, captions_used(pairs, exp))


def latents_for(
    lake: Lake, dataset: str, encoder: str, ids: list[str], fingerprint: str | None = None
) -> np.ndarray:
    """[len(ids), d] latents in the order of `ids`; raises if any is missing or of another fingerprint."""
    return lake.vectors(table_name("latents", dataset, encoder), ids, fingerprint)


def diversity_labels(
    lake: Lake,
    exp: ExperimentSpec,
    media_ids: list[str],
    media_fp: str,
    k: int,
    seed: int,
    chunk: int = 65536,
) -> np.ndarray:
    """The k-means cluster of each candidate's media latent, without holding all latents: k-means is
    fitted on all candidates up to fusion.selection.KMEANS_SAMPLE (else on a seeded sample), and the
    others are assigned to the nearest centre reading their latents `chunk` at a time."""
    fit = diversity_sample(len(media_ids), seed)
    sample = latents_for(lake, exp.dataset, exp.media_encoder, [media_ids[i] for i in fit], media_fp)
    labels, centres = kmeans(sample, min(k, len(fit)), seed=seed)
    if len(fit) == len(media_ids):
        return labels
    parts = []
    for start in range(0, len(media_ids), chunk):
        block = latents_for(lake, exp.dataset, exp.media_encoder, media_ids[start : start + chunk], media_fp)
        parts.append(assign(block, centres))
    return np.concatenate(parts)


def curate(lake: Lake, exp: ExperimentSpec, media_fp: str, text_fp: str) -> tuple[pa.Table, dict]:
    """Selects the experiment's training pairs (val and test stay whole). Pairs whose media or caption
    has no current latent are left out and counted."""
    pairs = with_captions_used(lake.read(table_name("pairs", exp.dataset)), exp)
    cap_col = CAPTION_USED
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
        if sel.get("score", "source") == "alignment":
            # Agreement under a cross-fitted reference alignment of the latents: works on any dataset.
            x = latents_for(lake, exp.dataset, exp.media_encoder, train["media_id"].to_pylist(), media_fp)
            y = latents_for(lake, exp.dataset, exp.text_encoder, train[cap_col].to_pylist(), text_fp)
            scores = alignment_quality(x, y, seed=seed)
        else:  # the score the dataset's source or manifest gives
            scores = train["quality"].to_numpy(zero_copy_only=False)
        if "keep" in sel:
            idx = select_quality_fraction(scores, float(sel["keep"]))
        else:
            idx = select_quality(scores, float(sel["min_quality"]))
    elif strategy == "diversity":
        n, mode = min(int(sel["n"]), len(keys)), sel.get("mode", "balanced")
        if mode == "uniform":
            idx = uniform_indices(len(keys), n, seed)
        else:
            labels = diversity_labels(
                lake, exp, train["media_id"].to_pylist(), media_fp, int(sel.get("k", 16)), seed
            )
            idx = select_by_clusters(labels, n, mode, seed)
    else:
        raise ValueError(f"experiment {exp.name}: unknown select strategy {strategy!r}")
    chosen = pa.concat_tables([train.take(pa.array(idx, type=pa.int64())), rest])
    out = pa.table(
        {name: chosen[cap_col if name == "caption_id" else name] for name in schemas.CURATED.names},
        schema=schemas.CURATED,
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


def write_curated(lake: Lake, exp: ExperimentSpec, table: pa.Table) -> tuple[int, bool]:
    """Stores the experiment's curated pairs unless the stored table holds exactly them already:
    (Lance version, whether it was left as it was). Raises pipelines.storage.StorageError on a full or
    read-only disk."""
    name = table_name("curated", exp.name)
    if lake.exists(name):
        stored = lake.read(name)
        if stored.schema.equals(table.schema) and stored.equals(table):
            return lake.version(name), True
    with writing(lake.root):
        return lake.overwrite(name, table), False


def read_tables(exp: ExperimentSpec) -> list[str]:
    """The lake tables an experiment's curation reads (their versions are recorded)."""
    return [
        table_name("pairs", exp.dataset),
        table_name("latents", exp.dataset, exp.media_encoder),
        table_name("latents", exp.dataset, exp.text_encoder),
    ]


def input_tables(exp: ExperimentSpec) -> list[str]:
    """Every lake table an experiment's run reads: curation's, and the pairs and latents of the
    datasets it is also scored on."""
    return read_tables(exp) + [
        table_name(kind, d, *enc)
        for d in exp.eval_datasets
        for kind, enc in (("pairs", ()), ("latents", (exp.media_encoder,)), ("latents", (exp.text_encoder,)))
    ]


def _state(
    exp: ExperimentSpec, fingerprints: tuple[str, str], versions: dict[str, int], anchor: str | None
) -> str:
    inputs: dict = {"fingerprints": list(fingerprints), "versions": versions}
    if anchor is not None:  # a bound experiment also reads its anchor's checkpoints
        inputs["anchor"] = anchor
    text = repr(exp) + json.dumps(inputs, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def experiment_state(
    lake: Lake, exp: ExperimentSpec, fingerprints: tuple[str, str], anchor: str | None = None
) -> str | None:
    """A digest of what the experiment's run depends on: its configuration, its encoders' current
    fingerprints (media, text), the Lance versions of `input_tables` and, for a bound experiment, its
    anchor's checkpoints (`anchor`: pipelines.train.anchor_state); None while one of those tables does
    not exist yet. Two states are equal exactly when a rerun would read the same inputs."""
    tables = input_tables(exp)
    versions = lake.versions(tables)
    return _state(exp, fingerprints, versions, anchor) if len(versions) == len(tables) else None


def inputs_record(
    lake: Lake, exp: ExperimentSpec, fingerprints: tuple[str, str], anchor: str | None = None
) -> tuple[str, dict[str, int]]:
    """(data version, Lance versions read) of the experiment_inputs asset: experiment_state, or
    "missing:<tables>" while some input tables are absent (so that their arrival is a change)."""
    tables = input_tables(exp)
    versions = lake.versions(tables)
    if len(versions) == len(tables):
        return _state(exp, fingerprints, versions, anchor), versions
    return "missing:" + ",".join(t for t in tables if t not in versions), versions


def contract_verdict(problems: list[str], checked: dict) -> str:
    """The one-line description of a latents_contract result: its problems or that all is encoded,
    and how many items extraction quarantined (left out, not a problem)."""
    quarantined = {name: c["quarantined"] for name, c in checked.items() if c["quarantined"]}
    note = f" ({quarantined} quarantined by extraction, left out)" if quarantined else ""
    return ("; ".join(problems) or "all curated items encoded") + note


def latents_contract(
    lake: Lake, exp: ExperimentSpec, media: EncoderRef, text: EncoderRef
) -> tuple[list[str], dict]:
    """(problems, what was checked per encoder): every paired item that extraction did not quarantine
    has a latent of the encoder's current fingerprint and dimension, no item has two latent rows
    (overlapping extractions of an older version; the next extraction removes them), and no latent
    holds NaN or inf.

    curate() leaves out pairs without a current latent, so the curated table alone would always pass:
    the contract is on every paired item, less those that extraction with the encoder's current
    fingerprint quarantined (known bad; counted in `quarantined`). A failure recorded under another
    fingerprint does not excuse an item: the next extraction retries it.
    """
    problems, checked = [], {}
    cur = lake.read(table_name("curated", exp.name))
    pairs = with_captions_used(lake.read(table_name("pairs", exp.dataset)), exp)
    for col, pair_col, ref in (("media_id", "media_id", media), ("caption_id", CAPTION_USED, text)):
        paired = {i for i in pairs[pair_col].to_pylist() if i is not None}
        failed = failed_items(lake, exp.dataset, ref.name, ref.fingerprint) & paired
        paired -= failed
        want = set(cur[col].to_pylist()) | paired
        lat_t = table_name("latents", exp.dataset, ref.name)
        if not lake.exists(lat_t):
            checked[ref.name] = {
                "items": len(want),
                "missing": len(want),
                "quarantined": len(failed),
                "duplicates": 0,
                "dim": None,
                "nonfinite": 0,
            }
            problems.append(f"no {lat_t} table: run extract_job for ({exp.dataset}, {ref.name})")
            continue
        lat = lake.read(lat_t, ["media_id", "vector", "fingerprint"])
        fps = lat["fingerprint"].to_pylist()
        lat_ids = lat["media_id"].to_pylist()
        current = {m for m, f in zip(lat_ids, fps, strict=True) if f == ref.fingerprint}
        missing = len(want - current)
        duplicates = len(lat_ids) - len(set(lat_ids))
        dim = lat.schema.field("vector").type.list_size
        flat = lat["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False) if len(lat) else []
        nonfinite = int((~np.isfinite(flat)).sum())
        checked[ref.name] = {
            "items": len(want),
            "missing": missing,
            "quarantined": len(failed),
            "duplicates": duplicates,
            "dim": dim,
            "nonfinite": nonfinite,
        }
        if missing:
            problems.append(f"{missing} of {len(want)} {col} without a current {ref.name} latent")
        if duplicates:
            problems.append(
                f"{duplicates} duplicate rows in {lat_t} (one item, several latents): "
                f"run extract_job for ({exp.dataset}, {ref.name}) to remove them"
            )
        if dim != ref.dim:
            problems.append(f"{ref.name} latents are {dim}-d, the encoder gives {ref.dim}-d")
        if nonfinite:
            problems.append(f"{nonfinite} NaN/inf values in {ref.name} latents")
    return problems, checked


def split_rows(curated: pa.Table, split: str) -> pa.Table:
    return curated.filter(pc.equal(curated["split"], split))


def split_arrays(lake: Lake, exp: ExperimentSpec, rows: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Row-aligned latents of curated pairs: media [n, d_m] and captions [n, d_t]."""
    x = latents_for(lake, exp.dataset, exp.media_encoder, rows["media_id"].to_pylist())
    y = latents_for(lake, exp.dataset, exp.text_encoder, rows["caption_id"].to_pylist())
    return x, y


def paired_split(
    lake: Lake,
    exp: ExperimentSpec,
    rows: pa.Table,
    dataset: str | None = None,
    fingerprints: tuple[str, str] | None = None,
) -> PairedSplit:
    """Unique items and captions of pairs (media_id, caption_id) with their latents, for retrieval:
    of the experiment's dataset, or of `dataset` when scoring another one; with `fingerprints`, only
    latents of exactly these encoders are used (LookupError otherwise)."""
    dataset = dataset or exp.dataset
    fp_media, fp_text = fingerprints or (None, None)
    item_ids, text_ids, pi, pt = paired_ids(rows["media_id"].to_pylist(), rows["caption_id"].to_pylist())
    return PairedSplit(
        item_ids,
        text_ids,
        latents_for(lake, dataset, exp.media_encoder, item_ids, fp_media),
        latents_for(lake, dataset, exp.text_encoder, text_ids, fp_text),
        pi,
        pt,
    )


def holdout_pairs(lake: Lake, exp: ExperimentSpec, dataset: str) -> pa.Table:
    """The test split of another dataset's pairs with their captions as the experiment scores them
    (`captions_used`: the cleaned ones), for zero-shot scoring."""
    pairs = lake.read(table_name("pairs", dataset))
    pairs = with_captions_used(pairs.filter(pc.equal(pairs["split"], "test")), exp)
    pairs = pairs.filter(pc.is_valid(pairs[CAPTION_USED]))
    return pa.table({"media_id": pairs["media_id"], "caption_id": pairs[CAPTION_USED]})


def pair_groups(rows: pa.Table) -> np.ndarray:
    """int64 [n, 3] keys of curated pairs for a loss that knows its positives: the codes of each
    pair's media item, caption and concept (two pairs sharing any of them are not negatives)."""
    cols = []
    for name in ("media_id", "caption_id", "concept"):
        values = rows[name].to_pylist()
        codes = {v: i for i, v in enumerate(dict.fromkeys(v for v in values if v))}
        cols.append([codes.get(v, -1) if v else -1 for v in values])
    return np.array(cols, dtype=np.int64).T.reshape(len(rows), 3)
