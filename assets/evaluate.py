"""Evaluate: partition (experiment) -> Recall@1/5/10 both ways on the held-out test split, rows in
the Lance `metrics` table, MLflow metrics on the training run, and a markdown report with plots."""

import json

import dagster as dg
import pyarrow.compute as pc
from pydantic import Field

from evaluation.report import write_report
from fusion.checkpoint import load_checkpoint, read_config
from pipelines.evaluating import metric_rows, query_examples, texts_of
from pipelines.lake import sql_str, table_name
from pipelines.partitions import Partitions
from pipelines.resources import EncoderBank, LanceLake, MlflowTracking, PipelinePaths
from pipelines.tracking import RunLogger
from pipelines.training import chance_levels, checkpoint_dir, evaluate_split, split_latents

# Bump when the evaluation protocol changes, so stored metrics of an unchanged checkpoint are recomputed.
EVAL_PROTOCOL = 2


class EvaluateConfig(dg.Config):
    force: bool = Field(default=False, description="Recompute even if metrics for this checkpoint exist")
    examples: int = Field(default=3, description="Text queries shown with their top-5 items in the report")


def build(parts: Partitions) -> list:
    @dg.asset(
        name="retrieval_metrics",
        group_name="evaluate",
        partitions_def=parts.experiment,
        deps=["adapters"],
        kinds={"lance", "mlflow"},
        description="Cross-modal retrieval on the test split (unseen concepts)",
    )
    def retrieval_metrics_asset(
        context: dg.AssetExecutionContext,
        config: EvaluateConfig,
        lake: LanceLake,
        encoders: EncoderBank,
        tracking: MlflowTracking,
        paths: PipelinePaths,
    ):
        exp = parts.experiments[context.partition_key]
        lk = lake.lake()
        ckpt = checkpoint_dir(paths.models_dir, exp.name)
        extra = read_config(ckpt)["extra"]
        media_ref, text_ref = encoders.ref(exp.media_encoder), encoders.ref(exp.text_encoder)
        model = load_checkpoint(ckpt, expect={extra["media_side"]: media_ref, "text": text_ref})
        run_id = extra["summary"]["mlflow_run_id"]
        eval_key = f"{extra['inputs_hash']}-p{EVAL_PROTOCOL}"
        if not config.force and lk.exists("metrics"):
            old = lk.read(
                "metrics", filter=f"experiment = {sql_str(exp.name)} AND inputs_hash = {sql_str(eval_key)}"
            )
            if len(old):
                values = dict(zip(old["metric"].to_pylist(), old["value"].to_pylist(), strict=True))
                context.log.info(f"{exp.name}: metrics for this checkpoint exist; not recomputing")
                return dg.MaterializeResult(metadata={**values, "skipped": True, "mlflow_run_id": run_id})

        curated = lk.read(table_name("curated", exp.name))
        test = curated.filter(pc.equal(curated["split"], "test"))
        if len(test) == 0:
            raise dg.Failure(f"experiment {exp.name}: the test split is empty; nothing to evaluate")
        split = split_latents(lk, exp, test)
        result, item_emb, text_emb = evaluate_split(model, split)
        metrics = result.as_dict()
        chance = chance_levels(split, result.ks)
        metrics["chance_t2i_recall_at_1"] = chance["t2i"][1]
        metrics["chance_i2t_recall_at_1"] = chance["i2t"][1]
        metrics["test_items"], metrics["test_captions"] = float(len(item_emb)), float(len(text_emb))

        rows = metric_rows(exp, metrics, run_id, eval_key, (media_ref.fingerprint, text_ref.fingerprint))
        lk.delete("metrics", f"experiment = {sql_str(exp.name)}")
        version = lk.append("metrics", rows)

        texts = texts_of(lk, exp.dataset, split.text_ids)
        examples = query_examples(split, item_emb, text_emb, texts, config.examples)
        history_file = ckpt / "history.json"
        hist = (
            json.loads(history_file.read_text())
            if history_file.exists()
            else {"history": [], "val_history": []}
        )
        report = write_report(
            paths.reports_dir / exp.name,
            title=f"{exp.name}: {exp.media_encoder} x {exp.text_encoder} on {exp.dataset}",
            metrics=metrics,
            history=hist["history"],
            val_history=hist["val_history"],
            curves={"t2i": dict(result.t2i_recall), "i2t": dict(result.i2t_recall)},
            chance=chance,
            item_emb=item_emb,
            text_emb=text_emb,
            labels=None,
            params={"family": exp.family, "fusemix": exp.fusemix.mode, "select": exp.select},
            examples=examples,
        )
        client = tracking.client()
        log = RunLogger(client, run_id)
        log.metrics(metrics)
        log.flush()
        client.log_artifacts(run_id, str(report.parent), "report")
        return dg.MaterializeResult(
            metadata={
                **{k: float(v) for k, v in metrics.items()},
                "mlflow_run_id": run_id,
                "lance_version": version,
                "report": dg.MetadataValue.md(report.read_text()),
                "report_path": str(report),
            }
        )

    @dg.asset_check(
        asset=retrieval_metrics_asset,
        blocking=False,
        description="Recall@1 in both directions is above chance",
    )
    def recall_above_chance(context: dg.AssetCheckExecutionContext, lake: LanceLake):
        exp_name = context.partition_key if context.has_partition_key else None
        rows = lake.lake().read("metrics", filter=f"experiment = {sql_str(exp_name)}")
        values = dict(zip(rows["metric"].to_pylist(), rows["value"].to_pylist(), strict=True))
        t2i, i2t = values.get("t2i_recall_at_1", 0.0), values.get("i2t_recall_at_1", 0.0)
        c_t2i, c_i2t = values.get("chance_t2i_recall_at_1", 1.0), values.get("chance_i2t_recall_at_1", 1.0)
        return dg.AssetCheckResult(
            passed=t2i > c_t2i and i2t > c_i2t,
            metadata={
                "t2i_recall_at_1": t2i,
                "chance_t2i": c_t2i,
                "i2t_recall_at_1": i2t,
                "chance_i2t": c_i2t,
            },
        )

    return [retrieval_metrics_asset, recall_above_chance]
