"""Report: partition (family) -> the family's ablation table and plot (evaluation.ablation: mean ± std
over seeds, per scored dataset), attached to the Dagster asset and to an MLflow parent run whose
children are the family's runs."""

import dagster as dg

from pipelines.evaluate import family_rows, log_family_report, write_family_report
from pipelines.partitions import Partitions
from pipelines.resources import LanceLake, MlflowTracking, PipelinePaths


def build(parts: Partitions) -> list:
    @dg.asset(
        name="ablation_report",
        group_name="report",
        partitions_def=parts.family,
        deps=[dg.AssetDep("retrieval_metrics", partition_mapping=dg.AllPartitionMapping())],
        kinds={"mlflow"},
        description="A family's experiments side by side: table and plot with error bars over seeds",
    )
    def ablation_report(
        context: dg.AssetExecutionContext, lake: LanceLake, tracking: MlflowTracking, paths: PipelinePaths
    ):
        family = context.partition_key
        exps = sorted(name for name, spec in parts.experiments.items() if spec.family == family)
        lk = lake.lake()
        report = write_family_report(lk, family, exps, paths.reports_dir / "families")
        if report is None:
            raise dg.Failure(f"no experiment of family {family} has been evaluated: run experiment_job first")
        run_ids = [r["mlflow_run_id"] for r in family_rows(lk, exps)]
        parent = log_family_report(tracking.client(), tracking.experiment_id(family), family, report, run_ids)
        return dg.MaterializeResult(
            metadata={
                "experiments": len(exps),
                "mlflow_parent_run_id": parent,
                "report_path": str(report),
                "report": dg.MetadataValue.md(report.read_text()),
            }
        )

    return [ablation_report]
