"""Evaluate glue: an experiment's trained models (adapters or a baseline, one per seed) scored with
the metric code of `evaluation/` on its held-out test split and, zero-shot, on the test splits of the
other datasets it names; pooled and, with `group_by`, one gallery per group. Every score is stored as
rows of the Lance `metrics` table, per seed and as mean and std over seeds, logged on the seeds'
MLflow runs, and written up as a report with plots. No Dagster here.

An anchored experiment (three modalities bound through text) is also scored on the emergent
retrieval between its media and its anchor's media (`emergent_scores`, evaluation.crossmodal): every
item of the two datasets whose concepts match, direct in the shared space, via the nearest caption,
and chance, as rows with dataset "<dataset>/<anchor dataset>" and gallery "emergent".

Stored metrics are keyed on the checkpoints' inputs hash and the evaluation's code version, so
unchanged checkpoints are not scored twice (`cached_metrics`). Only checkpoints whose MLflow run
FINISHED are scored and logged to (`check_trained`): a run left by a killed training is never
written into.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa

from evaluation.aggregate import aggregate_seeds
from evaluation.baselines import rsum
from evaluation.crossmodal import (
    concept_name,
    emergent_metrics,
    emergent_table_markdown,
    match_concepts,
    plot_emergent,
)
from evaluation.examples import query_examples
from evaluation.report import seeds_table_markdown, write_report
from evaluation.retrieval import (
    PairedSplit,
    RetrievalResult,
    chance_levels,
    chance_levels_by_group,
    evaluate_model,
    mean_chance_over_groups,
    mean_over_groups,
    retrieval_by_group,
)
from evaluation.significance import compare_experiments, differences_markdown, plot_differences
from fusion.adapters import EncoderRef
from fusion.checkpoint import atomic_write_text, load_checkpoint, read_config
from pipelines import schemas
from pipelines.curate import (
    CAPTION_USED,
    holdout_pairs,
    latents_for,
    paired_split,
    split_rows,
    with_captions_used,
)
from pipelines.lake import Lake, sql_in, sql_str
from pipelines.registries import DatasetSpec, ExperimentSpec
from pipelines.schemas import table_name
from pipelines.tracking import RunLogger, mlflow_run, require_finished, run_status
from pipelines.train import read_history

POOLED = "pooled"
EMERGENT = "emergent"  # the gallery of emergent media<->media rows
TEST, VAL = "test", "val"  # the metrics rows' split: test scores; val scores are what selection reads


def load_trained(out: Path, media: EncoderRef, text: EncoderRef) -> tuple[object, dict]:
    """The model saved in `out` (adapters or a baseline), checked against the encoders' current
    fingerprints, and its record."""
    config = read_config(out)
    extra = config["extra"]
    expect = {extra["media_side"]: media, "text": text}
    if config.get("kind") == "baseline":
        from evaluation.baselines import load_baseline

        return load_baseline(out, expect=expect), extra
    model = load_checkpoint(out, expect=expect)
    if len(model.sides) > 2:  # a space bound through text: scored here on its own pair of sides
        model = model.restrict((extra["media_side"], "text"))
    return model, extra


def load_seeds(dirs: dict[int, Path], media: EncoderRef, text: EncoderRef) -> dict[int, tuple]:
    """seed -> (model, record, folder) of every seed's saved model (train.seed_dirs)."""
    return {seed: (*load_trained(out, media, text), out) for seed, out in dirs.items()}


def check_trained(client, exp: ExperimentSpec, models: dict[int, tuple]) -> None:
    """Raises tracking.RunNotFinished unless the MLflow run of every seed's model (load_seeds)
    FINISHED: a checkpoint saved by a training that was killed before it finished is not scored."""
    runs = [record["summary"]["mlflow_run_id"] for _, record, _ in models.values()]
    require_finished(client, runs, f"experiment {exp.name}")


def eval_key(inputs_hash: str, code_version: str) -> str:
    return f"{inputs_hash}-p{code_version}"


def run_and_key(models: dict[int, tuple], code_version: str) -> tuple[str, str]:
    """The first seed's MLflow run and the key stored metrics of these checkpoints carry."""
    record = next(iter(models.values()))[1]
    return record["summary"]["mlflow_run_id"], eval_key(record["inputs_hash"], code_version)


def headline(rows: list[dict], dataset: str) -> dict[str, float]:
    """{metric: value} of the rows that summarise an experiment: its own dataset, the pooled gallery,
    aggregated over seeds."""
    return {
        r["metric"]: r["value"]
        for r in rows
        if r["dataset"] == dataset
        and r.get("gallery", POOLED) == POOLED
        and r.get("seed") is None
        and r.get("split", TEST) == TEST
    }


def cached_metrics(lake: Lake, exp: ExperimentSpec, key: str) -> dict[str, float] | None:
    """The stored headline metrics of `exp` evaluated under `key`, or None; None too where its test
    ranks under `key` are missing (an evaluation killed between replacing the ranks and the metrics)."""
    if not lake.exists("metrics") or lake.open("metrics").schema != schemas.METRICS:
        return None
    where = f"experiment = {sql_str(exp.name)} AND inputs_hash = {sql_str(key)}"
    if lake.count("ranks", where) == 0:
        return None
    return headline(lake.read("metrics", filter=where).to_pylist(), exp.dataset) or None


def evaluation_logged(client, run_ids: list[str]) -> bool:
    """Whether every seed's MLflow run holds its Recall@1 and the first one the report: an evaluation
    killed after writing its metrics rows and before logging them is not complete."""
    for run_id in run_ids:
        if "t2i_recall_at_1" not in client.get_run(run_id).data.metrics:
            return False
    return any(a.path == "report" for a in client.list_artifacts(run_ids[0]))


def texts_of(lake: Lake, dataset: str, ids: list[str]) -> dict[str, str]:
    """The text of each text item id."""
    if not ids:
        return {}
    rows = lake.read(table_name("media", dataset), ["media_id", "text"], sql_in("media_id", ids))
    return dict(zip(rows["media_id"].to_pylist(), rows["text"].to_pylist(), strict=True))


def query_concepts(lake: Lake, dataset: str) -> dict[str, str]:
    """The concept of every media item and caption of the dataset (cleaned and raw caption ids), from
    its pairs; items without a concept are left out."""
    names = set(lake.open(table_name("pairs", dataset)).schema.names)
    columns = [c for c in ("media_id", "caption_id", "raw_caption_id") if c in names]
    pairs = lake.read(table_name("pairs", dataset), [*columns, "concept"]).to_pylist()
    return {p[c]: p["concept"] for p in pairs if p["concept"] for c in columns if p[c]}


def item_groups(lake: Lake, dataset: str, column: str, item_ids: list[str]) -> list[str]:
    """The `column` value (source, group_id, concept) of each item, from the dataset's pairs."""
    pairs = lake.read(table_name("pairs", dataset), ["media_id", column])
    of = dict(zip(pairs["media_id"].to_pylist(), pairs[column].to_pylist(), strict=True))
    return [str(of.get(m)) for m in item_ids]


def scoring_targets(
    lake: Lake, exp: ExperimentSpec, refs: tuple[EncoderRef, EncoderRef], curated: pa.Table
) -> dict[str, PairedSplit]:
    """The test split of every dataset the experiment is scored on, its own first (from its `curated`
    table), with latents of exactly the experiment's encoders (a clear error when another dataset
    lacks them)."""
    fps = (refs[0].fingerprint, refs[1].fingerprint)
    test = split_rows(curated, TEST)
    if len(test) == 0:
        raise ValueError(f"experiment {exp.name}: the test split is empty; nothing to evaluate")
    targets = {exp.dataset: paired_split(lake, exp, test, fingerprints=fps)}
    for other in exp.eval_datasets:
        if not lake.exists(table_name("pairs", other)):
            raise LookupError(
                f"experiment {exp.name} is also scored on {other}, which is not ingested yet: "
                f"run ingest_job for {other}, then extract_job for ({other}, {exp.media_encoder}) "
                f"and ({other}, {exp.text_encoder})"
            )
        rows = holdout_pairs(lake, exp, other)
        if len(rows) == 0:
            raise ValueError(f"experiment {exp.name}: dataset {other} has no test pairs to score")
        try:
            targets[other] = paired_split(lake, exp, rows, dataset=other, fingerprints=fps)
        except LookupError as err:
            raise LookupError(
                f"experiment {exp.name} is also scored on {other}, which needs latents of "
                f"{exp.media_encoder} ({fps[0]}) and {exp.text_encoder} ({fps[1]}): {err}; "
                f"run extract_job for ({other}, {exp.media_encoder}) and ({other}, {exp.text_encoder})"
            ) from err
    return targets


def validation_target(
    lake: Lake, exp: ExperimentSpec, refs: tuple[EncoderRef, EncoderRef], curated: pa.Table
) -> PairedSplit | None:
    """The experiment's own val split (the one model selection reads) from its `curated` table, or
    None when it has none."""
    val = split_rows(curated, VAL)
    if len(val) == 0:
        return None
    return paired_split(lake, exp, val, fingerprints=(refs[0].fingerprint, refs[1].fingerprint))


def validation_scores(model, split: PairedSplit, hubness: str | None = None) -> dict[str, float]:
    """Recall@K, ranks and ``rsum`` (Recall@1+5+10 both ways, fractions: what selection compares) of one
    model on the val split, ranked as its test split is (`hubness`)."""
    result, _, _ = evaluate_model(model, split, hubness=hubness)
    return {**result.as_dict(), "rsum": rsum(result)}


@dataclass(frozen=True)
class ConceptItems:
    """Every media item of a dataset (all splits) with its concept, its latents, and the dataset's
    caption bank (caption latents) and the names of its concepts (evaluation.crossmodal)."""

    item_ids: list[str]
    concepts: list[str]
    items: np.ndarray
    bank: np.ndarray
    names: dict[str, str]


def concept_items(
    lake: Lake, dataset: str, exp: ExperimentSpec, fingerprints: tuple[str, str]
) -> ConceptItems:
    """The items of `dataset` with the latents of `exp`'s encoders (exactly these fingerprints)."""
    column = CAPTION_USED
    columns = ["media_id", "caption_id", "raw_caption_id", "split", "concept"]
    pairs = with_captions_used(lake.read(table_name("pairs", dataset), columns), exp).to_pylist()
    concept_of = {p["media_id"]: p["concept"] for p in pairs if p["concept"]}
    captions = sorted({p[column] for p in pairs if p[column]})
    texts = texts_of(lake, dataset, captions)
    by_concept: dict[str, list[str]] = defaultdict(list)
    for p in pairs:
        if p["concept"] and p[column] in texts:
            by_concept[p["concept"]].append(texts[p[column]])
    item_ids = sorted(concept_of)
    return ConceptItems(
        item_ids,
        [concept_of[m] for m in item_ids],
        latents_for(lake, dataset, exp.media_encoder, item_ids, fingerprints[0]),
        latents_for(lake, dataset, exp.text_encoder, captions, fingerprints[1]),
        {c: concept_name(c, t) for c, t in by_concept.items()},
    )


@dataclass(frozen=True)
class Emergent:
    """What the emergent scoring of an anchored experiment needs: the anchor's spec, its media side
    and its media encoder."""

    anchor: ExperimentSpec
    anchor_side: str
    anchor_media: EncoderRef


def emergent_of(
    exp: ExperimentSpec,
    experiments: Mapping[str, ExperimentSpec],
    datasets: Mapping[str, DatasetSpec],
    ref_of: Callable[[str], EncoderRef],
) -> Emergent | None:
    """What an anchored experiment's emergent scoring needs (`ref_of`: encoder name -> its current
    EncoderRef), or None for an experiment without an anchor."""
    if not exp.anchor:
        return None
    spec = experiments[exp.anchor]
    return Emergent(spec, datasets[spec.dataset].modality, ref_of(spec.media_encoder))


def emergent_scores(
    lake: Lake,
    exp: ExperimentSpec,
    models: dict[int, tuple],
    refs: tuple[EncoderRef, EncoderRef],
    emergent: Emergent,
) -> tuple[str, dict[int, dict[str, float]], list[str]]:
    """Per-seed emergent retrieval between this experiment's media (one side) and its anchor's (the
    other) over the concepts whose names match: (the rows' dataset "<dataset>/<anchor dataset>",
    {seed: metrics}, the matched concepts). Both sides must be image and audio: the match is between
    pictures and sounds."""
    own_side = next(iter(models.values()))[1]["media_side"]
    if {own_side, emergent.anchor_side} != {"audio", "image"}:
        raise ValueError(
            f"{exp.name}: emergent retrieval matches pictures with sounds; its sides are {own_side} and {emergent.anchor_side}"
        )
    a = emergent.anchor
    own = concept_items(lake, exp.dataset, exp, (refs[0].fingerprint, refs[1].fingerprint))
    other = concept_items(lake, a.dataset, a, (emergent.anchor_media.fingerprint, refs[1].fingerprint))
    sets = {own_side: own, emergent.anchor_side: other}
    pictures, sounds = sets["image"], sets["audio"]
    picture_label, sound_label = match_concepts(pictures.names, sounds.names)
    if not sound_label:
        raise ValueError(f"{exp.name}: no concept of {exp.dataset} matches one of {a.dataset} by name")
    keep = {
        "image": [i for i, c in enumerate(pictures.concepts) if c in picture_label],
        "audio": [i for i, c in enumerate(sounds.concepts) if c in sound_label],
    }
    labels = {
        "image": [picture_label[pictures.concepts[i]] for i in keep["image"]],
        "audio": [sound_label[sounds.concepts[i]] for i in keep["audio"]],
    }
    dataset = f"{exp.dataset}/{a.dataset}"  # MLflow metric names allow "/", not "+"
    per_seed = {}
    for seed, (_, _, folder) in models.items():
        full = load_checkpoint(folder)  # all three sides (load_trained scores two)
        emb = {s: full.embed(s, sets[s].items[keep[s]]).numpy() for s in ("audio", "image")}
        banks = {s: full.embed("text", sets[s].bank).numpy() for s in ("audio", "image")}
        per_seed[seed], _ = emergent_metrics(
            emb["audio"], labels["audio"], emb["image"], labels["image"], banks["audio"], banks["image"]
        )
    return dataset, per_seed, sorted(set(labels["audio"]))


def emergent_section(rows: list[dict], report_dir: Path, concepts: list[str]) -> str:
    """The report's section on the emergent rows: table (mean ± std over seeds) and a bar plot."""
    values = {
        r["metric"]: (r["value"], r["std"]) for r in rows if r["gallery"] == EMERGENT and r["seed"] is None
    }
    names = ("audio", "image")
    plot_emergent(values, names, report_dir / "emergent.png")
    n_seeds = max((r["n_seeds"] for r in rows if r["gallery"] == EMERGENT), default=1)
    items = f"{int(values['audio_items'][0])} sounds and {int(values['image_items'][0])} pictures"
    return (
        "\n## Emergent audio <-> image retrieval (no audio-image pair was ever trained on)\n\n"
        f"{items} of {len(concepts)} concepts that exist as both ({', '.join(concepts)}); a hit is any item "
        f"of the same concept in the top K. Recall in %, mean ± std over {n_seeds} seed(s).\n\n"
        + emergent_table_markdown(values, names)
        + "\n\n![emergent retrieval](emergent.png)\n"
    )


def score(
    model, split: PairedSplit, groups: list[str] | None, hubness: str | None = None
) -> tuple[dict[str, dict[str, float]], tuple]:
    """{gallery: metrics} of one model on one split (pooled, and per group when `groups` is given),
    plus (result, item embeddings, text embeddings, chance, {gallery: {group: result}}) of the
    scoring (the pooled gallery's one group is ""); `hubness` ranks with a hubness correction
    (evaluation.retrieval)."""
    result, item_emb, text_emb = evaluate_model(model, split, hubness=hubness)
    chance = chance_levels(
        split.pair_items, split.pair_texts, len(split.item_ids), len(split.text_ids), result.ks
    )
    pooled = result.as_dict()
    pooled["chance_t2i_recall_at_1"] = chance["t2i"][1]
    pooled["chance_i2t_recall_at_1"] = chance["i2t"][1]
    pooled["test_items"], pooled["test_captions"] = float(len(item_emb)), float(len(text_emb))
    out = {POOLED: pooled}
    results: dict[str, dict[str, RetrievalResult]] = {POOLED: {"": result}}
    if groups is not None:
        by_group = retrieval_by_group(
            item_emb, text_emb, split.pair_items, split.pair_texts, groups, hubness=hubness
        )
        per_group = mean_over_groups(by_group)
        group_chance = mean_chance_over_groups(
            chance_levels_by_group(split.pair_items, split.pair_texts, groups)
        )
        per_group["chance_t2i_recall_at_1"] = group_chance["t2i"][1]
        per_group["chance_i2t_recall_at_1"] = group_chance["i2t"][1]
        per_group["groups"] = float(len(by_group))
        out["groups"] = per_group
        results["groups"] = by_group
    return out, (result, item_emb, text_emb, chance, results)


def rank_columns(
    dataset: str,
    gallery: str,
    seed: int,
    results: Mapping[str, RetrievalResult],
    split: PairedSplit,
    concepts: Mapping[str, str],
) -> dict[str, list]:
    """The `ranks` table's columns (less experiment, key and time) for one seed's scoring of one
    gallery: every query of each group's result, both directions, with the query's id and concept
    (`concepts`: id -> concept, `query_concepts`)."""
    cols: dict[str, list] = defaultdict(list)
    for group, result in results.items():
        for direction, ranks, rows, ids in (
            ("t2i", result.t2i_ranks, result.t2i_query_texts, split.text_ids),
            ("i2t", result.i2t_ranks, result.i2t_query_items, split.item_ids),
        ):
            n = len(ranks)
            queries = [ids[i] for i in rows.tolist()]
            cols["query"] += queries
            cols["concept"] += [concepts.get(q) for q in queries]
            cols["rank"] += np.asarray(ranks, dtype=np.int64).tolist()
            for name, value in (("dataset", dataset), ("split", TEST), ("gallery", gallery),
                                ("group_name", group), ("seed", seed), ("direction", direction)):  # fmt: skip
                cols[name] += [value] * n
    return cols


def rank_table(exp: ExperimentSpec, columns: Mapping[str, list], key: str) -> pa.Table:
    """The `ranks` rows of an evaluation from `rank_columns`' (merged) columns."""
    n = len(columns["rank"])
    data = {
        **columns,
        "experiment": [exp.name] * n,
        "inputs_hash": [key] * n,
        "created_at": [datetime.now(UTC)] * n,
    }
    return pa.table({f.name: pa.array(data[f.name], f.type) for f in schemas.RANKS}, schema=schemas.RANKS)


def stored_ranks(lake: Lake, experiments: list[str]) -> list[dict]:
    """The `ranks` rows of these experiments (none before the first evaluation)."""
    if not lake.exists("ranks"):
        return []
    return lake.read("ranks", filter=sql_in("experiment", experiments)).to_pylist()


def metric_table(exp: ExperimentSpec, rows: list[dict], key: str, fingerprints: tuple[str, str]) -> pa.Table:
    """The `metrics` table rows of an evaluation: `rows` hold dataset, gallery, seed, metric, value,
    std, n_seeds and mlflow_run_id."""
    return schemas.table_of(
        schemas.METRICS,
        [SimpleNamespace(**r) for r in rows],
        experiment=exp.name,
        family=exp.family,
        variable=exp.variable,
        method=exp.method,
        inputs_hash=key,
        created_at=datetime.now(UTC),
        fingerprint_media=fingerprints[0],
        fingerprint_text=fingerprints[1],
    )


def upgrade_metrics_table(lake: Lake) -> None:
    """A metrics table written before seeds, galleries and methods existed gets those columns (its
    rows were one seed, pooled, adapters)."""
    if not lake.exists("metrics") or lake.open("metrics").schema == schemas.METRICS:
        return
    old = lake.read("metrics")
    fill = {"method": "adapters", "gallery": POOLED, "seed": None, "std": 0.0, "n_seeds": 1}
    columns = {
        name: old[name] if name in old.column_names else pa.array([fill[name]] * len(old), field.type)
        for name, field in zip(schemas.METRICS.names, schemas.METRICS, strict=True)
    }
    lake.overwrite("metrics", pa.table(columns, schema=schemas.METRICS))


def seed_rows(
    dataset: str, gallery: str, seed: int, values: dict[str, float], run_id: str, split: str = TEST
) -> list[dict]:
    """The `metrics` rows of one seed's scores on one dataset, gallery and split."""
    return [
        {"dataset": dataset, "gallery": gallery, "split": split, "seed": seed, "metric": m,
         "value": float(v), "std": None, "n_seeds": 1, "mlflow_run_id": run_id}
        for m, v in values.items()
    ]  # fmt: skip


def evaluate_experiment(
    lake: Lake,
    exp: ExperimentSpec,
    models: dict[int, tuple],
    refs: tuple[EncoderRef, EncoderRef],
    key: str,
    report_dir: Path,
    examples: int = 3,
    emergent: Emergent | None = None,
) -> tuple[dict[str, float], list[dict], int, Path]:
    """Scores every seed's model (`models`: seed -> (model, record, folder)) on every target, and on
    the experiment's own val split (rows with split "val", pooled, with ``rsum``: what a family's
    selection compares), replaces the experiment's rows of the `metrics` table, writes the report of
    the first seed on the experiment's own test split. Returns (headline metrics, every row, the
    table's Lance version, report.md)."""
    curated = lake.read(table_name("curated", exp.name))
    targets = scoring_targets(lake, exp, refs, curated)
    val = validation_target(lake, exp, refs, curated)
    groups = {
        name: item_groups(lake, name, exp.group_by, split.item_ids) if exp.group_by else None
        for name, split in targets.items()
    }
    concepts = {name: query_concepts(lake, name) for name in targets}
    rows: list[dict] = []
    ranks: dict[str, list] = defaultdict(list)
    per_seed: dict[tuple[str, str, str], list[dict[str, float]]] = defaultdict(list)
    first = None
    for seed, (model, extra, _) in models.items():
        run_id = extra["summary"]["mlflow_run_id"]
        for name, split in targets.items():
            scored, detail = score(model, split, groups[name], exp.hubness)
            if first is None:
                first = (split, detail)
            by_gallery = detail[-1]  # each gallery's results, whose ranks the `ranks` table keeps
            for gallery, values in scored.items():
                results = by_gallery[gallery]
                gallery = POOLED if gallery == POOLED else f"per_{exp.group_by}"
                per_seed[(name, gallery, TEST)].append(values)
                rows += seed_rows(name, gallery, seed, values, run_id)
                for column, values_ in rank_columns(
                    name, gallery, seed, results, split, concepts[name]
                ).items():
                    ranks[column] += values_
        if val is not None:
            values = validation_scores(model, val, exp.hubness)
            per_seed[(exp.dataset, POOLED, VAL)].append(values)
            rows += seed_rows(exp.dataset, POOLED, seed, values, run_id, VAL)
    concepts: list[str] = []
    if emergent is not None:
        name, scores, concepts = emergent_scores(lake, exp, models, refs, emergent)
        for seed, values in scores.items():
            per_seed[(name, EMERGENT, TEST)].append(values)
            rows += seed_rows(name, EMERGENT, seed, values, models[seed][1]["summary"]["mlflow_run_id"])
    first_run = next(iter(models.values()))[1]["summary"]["mlflow_run_id"]
    for (name, gallery, split), values in per_seed.items():
        for metric, (mean, std, n) in aggregate_seeds(values).items():
            rows.append(
                {"dataset": name, "gallery": gallery, "split": split, "seed": None, "metric": metric,
                 "value": mean, "std": std, "n_seeds": n, "mlflow_run_id": first_run}
            )  # fmt: skip
    # The ranks first: the metrics rows are what marks these checkpoints as scored (cached_metrics),
    # so a run killed in between scores them again rather than leaving metrics without their ranks.
    lake.delete("ranks", f"experiment = {sql_str(exp.name)}")
    lake.append("ranks", rank_table(exp, ranks, key))
    upgrade_metrics_table(lake)
    lake.delete("metrics", f"experiment = {sql_str(exp.name)}")
    version = lake.append("metrics", metric_table(exp, rows, key, (refs[0].fingerprint, refs[1].fingerprint)))

    split, (result, item_emb, text_emb, chance, _) = first
    metrics = headline(rows, exp.dataset)
    hist = read_history(next(iter(models.values()))[2])
    report = write_report(
        report_dir,
        title=f"{exp.name}: {exp.media_encoder} x {exp.text_encoder} on {exp.dataset}",
        metrics=metrics,
        history=hist["history"],
        val_history=hist["val_history"],
        curves={"t2i": dict(result.t2i_recall), "i2t": dict(result.i2t_recall)},
        chance=chance,
        item_emb=item_emb,
        text_emb=text_emb,
        params={
            "family": exp.family,
            "method": exp.method,
            "fusemix": exp.fusemix.mode,
            "select": exp.select,
        },
        examples=query_examples(
            split, item_emb, text_emb, texts_of(lake, exp.dataset, split.text_ids), examples
        ),
        pairs=(split.pair_items, split.pair_texts),
    )
    if emergent is not None:
        atomic_write_text(
            report, report.read_text(encoding="utf-8") + emergent_section(rows, report_dir, concepts)
        )
    tested = [r for r in rows if r["gallery"] != EMERGENT and r["split"] == TEST]
    if len({(r["dataset"], r["gallery"]) for r in tested}) > 1 or len(models) > 1:
        atomic_write_text(
            report,
            report.read_text(encoding="utf-8")
            + "\n## Every scored dataset and gallery (mean ± std over seeds)\n\n"
            + seeds_table_markdown(tested)
            + "\n",
        )
    return metrics, rows, version, report


def log_evaluation(client, rows: list[dict], report: Path, own: str) -> None:
    """Each seed's scores on its MLflow run (other datasets and galleries prefixed with their names),
    the mean and std over seeds on the first seed's run, the report folder as its artifacts. Raises
    tracking.RunNotFinished, logging nothing, if any of these runs did not finish."""
    require_finished(client, [r["mlflow_run_id"] for r in rows], "evaluation")
    by_run: dict[str, dict[str, float]] = defaultdict(dict)
    for r in rows:
        if r.get("split", TEST) == VAL:
            prefix = "val."
        elif (r["dataset"], r["gallery"]) == (own, POOLED):
            prefix = ""
        else:
            prefix = f"{r['dataset']}.{r['gallery']}."
        if r["seed"] is not None:
            by_run[r["mlflow_run_id"]][prefix + r["metric"]] = r["value"]
        elif r["n_seeds"] > 1:
            by_run[r["mlflow_run_id"]][f"mean.{prefix}{r['metric']}"] = r["value"]
            by_run[r["mlflow_run_id"]][f"std.{prefix}{r['metric']}"] = r["std"]
    for run_id, values in by_run.items():
        log = RunLogger(client, run_id)
        log.metrics(values)
        log.flush()
    first = next(r["mlflow_run_id"] for r in rows if r["seed"] is None)
    client.log_artifacts(first, str(report.parent), "report")


def recall_vs_chance(lake: Lake, exp: ExperimentSpec) -> tuple[bool, dict[str, float]]:
    """Whether Recall@1 beats chance both ways on the stored headline metrics, and the four numbers."""
    rows = lake.read("metrics", filter=f"experiment = {sql_str(exp.name)}").to_pylist()
    values = headline(rows, exp.dataset)
    out = {
        "t2i_recall_at_1": values.get("t2i_recall_at_1", 0.0),
        "chance_t2i": values.get("chance_t2i_recall_at_1", 1.0),
        "i2t_recall_at_1": values.get("i2t_recall_at_1", 0.0),
        "chance_i2t": values.get("chance_i2t_recall_at_1", 1.0),
    }
    return out["t2i_recall_at_1"] > out["chance_t2i"] and out["i2t_recall_at_1"] > out["chance_i2t"], out


def family_rows(lake: Lake, experiments: list[str]) -> list[dict]:
    """The `metrics` rows of these experiments (none before the first evaluation)."""
    if not lake.exists("metrics") or not experiments:
        return []
    return lake.read("metrics", filter=sql_in("experiment", experiments)).to_pylist()


def write_family_report(lake: Lake, family: str, experiments: list[str], out_dir: Path) -> Path | None:
    """A family's ablation table and plot (evaluation.ablation) as <out_dir>/<family>.md, or None
    while none of its experiments has been evaluated."""
    from evaluation.ablation import ablation_report

    rows = family_rows(lake, experiments)
    if not rows:
        return None
    # Emergent rows are in their experiment's report: their metrics are not a family's retrieval.
    rows = [r for r in rows if r["gallery"] != EMERGENT]
    if not rows:
        return None
    for gallery in sorted({r["gallery"] for r in rows} - {POOLED}):
        ablation_report(rows, family, out_dir, gallery=gallery)  # <family>_<gallery>.md beside it
    report = ablation_report(rows, family, out_dir)
    section = paired_differences(lake, family, experiments, rows, report)
    if section:
        atomic_write_text(report, report.read_text(encoding="utf-8") + "\n" + section)
    return report


def paired_differences(
    lake: Lake, family: str, experiments: list[str], rows: list[dict], report: Path
) -> str:
    """The family report's section on paired differences (evaluation.significance): the experiment
    chosen on validation (else the first) against every other, on the test queries both ranked, as a
    table and a forest plot beside `report` (<stem>_differences.png); empty where fewer than two
    experiments have stored ranks or they share no queries."""
    from evaluation.ablation import val_selection

    ranks = stored_ranks(lake, experiments)
    ranked = {r["experiment"] for r in ranks}
    if len(ranked) < 2:
        return ""
    chosen = [e["experiment"] for e in val_selection(rows, family) if e["experiment"] in ranked]
    reference = chosen[0] if chosen else next(e for e in experiments if e in ranked)
    found = compare_experiments(ranks, reference)
    if not found:
        return ""
    png = report.with_name(f"{report.stem}_differences.png")
    plot_differences(reference, found, png)
    return (
        differences_markdown(reference, found) + f"\n![Paired differences against {reference}]({png.name})\n"
    )


def log_family_report(client, experiment_id: str, family: str, report: Path, run_ids: list[str]) -> str:
    """An MLflow parent run for the family holding its report; the experiments' runs that FINISHED
    become its children (a run left by a killed training is not written into). Returns the parent
    run's id."""
    with mlflow_run(client, experiment_id, f"family:{family}", {"family": family}) as log:
        client.log_artifact(log.run_id, str(report), "report")
        for png in report.parent.glob(f"{report.stem}*.png"):
            client.log_artifact(log.run_id, str(png), "report")
        for run_id in dict.fromkeys(run_ids):
            if run_status(client, run_id) == "FINISHED":
                client.set_tag(run_id, "mlflow.parentRunId", log.run_id)
    return log.run_id
