"""Evaluate glue: an experiment's trained adapters scored on its held-out test split with the metric
code of `evaluation/`, stored as rows of the Lance `metrics` table, logged on the training's MLflow
run, and written up as a report with plots. No Dagster here.

Stored metrics are keyed on the checkpoint's inputs hash and the evaluation's code version, so an
unchanged checkpoint is not scored twice (`cached_metrics`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa

from evaluation.examples import query_examples
from evaluation.report import write_report
from evaluation.retrieval import chance_levels, evaluate_model
from fusion.adapters import EncoderRef, FusedModel
from fusion.checkpoint import load_checkpoint, read_config
from pipelines import schemas
from pipelines.curate import paired_split, split_rows
from pipelines.lake import Lake, sql_in, sql_str
from pipelines.registries import ExperimentSpec
from pipelines.schemas import table_name
from pipelines.tracking import RunLogger
from pipelines.train import read_history


def load_trained(out: Path, media: EncoderRef, text: EncoderRef) -> tuple[FusedModel, dict]:
    """The checkpoint in `out`, checked against the encoders' current fingerprints, and its record."""
    extra = read_config(out)["extra"]
    return load_checkpoint(out, expect={extra["media_side"]: media, "text": text}), extra


def eval_key(inputs_hash: str, code_version: str) -> str:
    return f"{inputs_hash}-p{code_version}"


def cached_metrics(lake: Lake, experiment: str, key: str) -> dict[str, float] | None:
    """The stored metrics of `experiment` evaluated under `key`, or None."""
    if not lake.exists("metrics"):
        return None
    old = lake.read("metrics", filter=f"experiment = {sql_str(experiment)} AND inputs_hash = {sql_str(key)}")
    return dict(zip(old["metric"].to_pylist(), old["value"].to_pylist(), strict=True)) if len(old) else None


def metric_rows(
    exp: ExperimentSpec, metrics: dict[str, float], run_id: str, key: str, fingerprints: tuple[str, str]
) -> pa.Table:
    """One row per metric of an evaluation on the test split."""
    return schemas.table_of(
        schemas.METRICS,
        [SimpleNamespace(metric=k, value=float(v)) for k, v in metrics.items()],
        experiment=exp.name,
        family=exp.family,
        variable=exp.variable,
        dataset=exp.dataset,
        split="test",
        mlflow_run_id=run_id,
        inputs_hash=key,
        created_at=datetime.now(UTC),
        fingerprint_media=fingerprints[0],
        fingerprint_text=fingerprints[1],
    )


def texts_of(lake: Lake, dataset: str, ids: list[str]) -> dict[str, str]:
    """The text of each text item id."""
    if not ids:
        return {}
    rows = lake.read(table_name("media", dataset), ["media_id", "text"], sql_in("media_id", ids))
    return dict(zip(rows["media_id"].to_pylist(), rows["text"].to_pylist(), strict=True))


def evaluate_experiment(
    lake: Lake,
    exp: ExperimentSpec,
    model: FusedModel,
    refs: tuple[EncoderRef, EncoderRef],
    run_id: str,
    key: str,
    checkpoint: Path,
    report_dir: Path,
    examples: int = 3,
) -> tuple[dict[str, float], int, Path]:
    """Scores the test split, replaces the experiment's rows of the `metrics` table, writes the report.
    Returns (metrics, the metrics table's Lance version, report.md)."""
    test = split_rows(lake.read(table_name("curated", exp.name)), "test")
    if len(test) == 0:
        raise ValueError(f"experiment {exp.name}: the test split is empty; nothing to evaluate")
    split = paired_split(lake, exp, test)
    result, item_emb, text_emb = evaluate_model(model, split)
    metrics = result.as_dict()
    chance = chance_levels(
        split.pair_items, split.pair_texts, len(split.item_ids), len(split.text_ids), result.ks
    )
    metrics["chance_t2i_recall_at_1"] = chance["t2i"][1]
    metrics["chance_i2t_recall_at_1"] = chance["i2t"][1]
    metrics["test_items"], metrics["test_captions"] = float(len(item_emb)), float(len(text_emb))

    rows = metric_rows(exp, metrics, run_id, key, (refs[0].fingerprint, refs[1].fingerprint))
    lake.delete("metrics", f"experiment = {sql_str(exp.name)}")
    version = lake.append("metrics", rows)

    texts = texts_of(lake, exp.dataset, split.text_ids)
    hist = read_history(checkpoint)
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
        params={"family": exp.family, "fusemix": exp.fusemix.mode, "select": exp.select},
        examples=query_examples(split, item_emb, text_emb, texts, examples),
        pairs=(split.pair_items, split.pair_texts),
    )
    return metrics, version, report


def log_evaluation(client, run_id: str, metrics: dict[str, float], report: Path) -> None:
    """The metrics on the training's MLflow run, the report folder as its artifacts."""
    log = RunLogger(client, run_id)
    log.metrics(metrics)
    log.flush()
    client.log_artifacts(run_id, str(report.parent), "report")


def recall_vs_chance(lake: Lake, experiment: str) -> tuple[bool, dict[str, float]]:
    """Whether Recall@1 beats chance both ways on the stored metrics, and the four numbers."""
    rows = lake.read("metrics", filter=f"experiment = {sql_str(experiment)}")
    values = dict(zip(rows["metric"].to_pylist(), rows["value"].to_pylist(), strict=True))
    out = {
        "t2i_recall_at_1": values.get("t2i_recall_at_1", 0.0),
        "chance_t2i": values.get("chance_t2i_recall_at_1", 1.0),
        "i2t_recall_at_1": values.get("i2t_recall_at_1", 0.0),
        "chance_i2t": values.get("chance_i2t_recall_at_1", 1.0),
    }
    return out["t2i_recall_at_1"] > out["chance_t2i"] and out["i2t_recall_at_1"] > out["chance_i2t"], out
