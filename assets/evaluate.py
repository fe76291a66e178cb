"""Evaluate: partition (experiment) -> Recall@1/5/10 both ways on the held-out test split, rows in
the Lance `metrics` table, MLflow metrics on the training run (only a FINISHED one), and a markdown
report with plots.
Bump EVAL_CODE_VERSION when the protocol changes: stored metrics of an unchanged checkpoint are then
recomputed, and Dagster shows the asset as stale."""

import dagster as dg
from pydantic import Field

from pipelines import evaluate as glue
from pipelines.partitions import Partitions
from pipelines.resources import EncoderBank, LanceLake, MlflowTracking, PipelinePaths
from pipelines.train import seed_dirs

EVAL_CODE_VERSION = "6"  # 3: seeds, other datasets, per-group galleries; 4: val rows; 5: raw-caption
# experiments scored on the cleaned test captions; 6: each test query's rank in the `ranks` table


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
        code_version=EVAL_CODE_VERSION,
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
        exp = parts.experiment_spec(context.partition_key)
        lk = lake.lake()
        refs = encoders.ref(exp.media_encoder), encoders.ref(exp.text_encoder)
        models = glue.load_seeds(seed_dirs(paths.models_dir, exp), *refs)
        client = tracking.client()
        glue.check_trained(client, exp, models)
        run_id, key = glue.run_and_key(models, EVAL_CODE_VERSION)
        cached = None if config.force else glue.cached_metrics(lk, exp, key)
        run_ids = [extra["summary"]["mlflow_run_id"] for _, extra, _ in models.values()]
        if cached is not None and not glue.evaluation_logged(client, run_ids):
            context.log.info(f"{exp.name}: stored metrics were never logged to MLflow; evaluating again")
            cached = None
        if cached is not None:
            context.log.info(f"{exp.name}: metrics for these checkpoints exist; not recomputing")
            return dg.MaterializeResult(metadata={**cached, "skipped": True, "mlflow_run_id": run_id})
        # Three modalities: an anchored experiment is also scored media <-> anchor media.
        emergent = glue.emergent_of(exp, parts.experiments, parts.datasets, encoders.ref)
        metrics, rows, version, report = glue.evaluate_experiment(
            lk, exp, models, refs, key, paths.reports_dir / exp.name, config.examples, emergent
        )
        glue.log_evaluation(client, rows, report, exp.dataset)
        metadata = {"mlflow_run_id": run_id, "lance_version": version, "report_path": str(report)}
        return dg.MaterializeResult(
            metadata={**metrics, **metadata, "report": dg.MetadataValue.md(report.read_text())}
        )

    @dg.asset_check(asset=retrieval_metrics_asset, description="Recall@1 both ways is above chance")
    def recall_above_chance(context: dg.AssetCheckExecutionContext, lake: LanceLake):
        passed, values = glue.recall_vs_chance(lake.lake(), parts.experiment_spec(context.partition_key))
        return dg.AssetCheckResult(passed=passed, metadata=values)

    return [retrieval_metrics_asset, recall_above_chance]
