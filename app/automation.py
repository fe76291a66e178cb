"""Jobs, the encoder sensor and the extraction schedule.

The sensor reads configs/encoders.yaml on every tick; an encoder not yet a partition becomes one, and
its extraction is requested for every ingested dataset it applies to (once per pair: stable run keys). The schedule re-runs extraction for
every (dataset, encoder): extraction is incremental, so only media ingested since are encoded.
"""

from __future__ import annotations

import dagster as dg

from pipelines.lake import Lake
from pipelines.partitions import ENCODER_PARTITIONS, Partitions
from pipelines.resources import LanceLake
from pipelines.schemas import table_name

ABLATION_FAMILIES = ("quantity", "quality", "diversity", "augmentation")


def build_jobs(parts: Partitions) -> dict[str, dg.UnresolvedAssetJobDefinition]:
    jobs = {
        "ingest_job": dg.define_asset_job(
            "ingest_job", selection=dg.AssetSelection.groups("ingest"), partitions_def=parts.dataset
        ),
        "extract_job": dg.define_asset_job(
            "extract_job", selection=dg.AssetSelection.groups("extract"), partitions_def=parts.extract
        ),
        "experiment_job": dg.define_asset_job(
            "experiment_job",
            selection=dg.AssetSelection.groups("curate", "train", "evaluate"),
            partitions_def=parts.experiment,
            description="Curate, train and evaluate one experiment (the demo and every ablation run this job)",
        ),
        "report_job": dg.define_asset_job(
            "report_job",
            selection=dg.AssetSelection.groups("report"),
            partitions_def=parts.family,
            description="A family's ablation report, after its experiments ran",
        ),
    }
    return jobs


def extract_requests(parts: Partitions, encoders: list[str], tag: str, lake: Lake) -> list[dg.RunRequest]:
    """One extraction run per (ingested dataset, encoder that applies to it)."""
    specs = parts.encoders()
    return [
        dg.RunRequest(
            run_key=f"{tag}:{dataset}:{name}",
            job_name="extract_job",
            partition_key=parts.extract_key(dataset, name),
        )
        for name in encoders
        for dataset in parts.datasets
        if name in specs and parts.applies(dataset, specs[name]) and lake.exists(table_name("media", dataset))
    ]


def build_sensor(parts: Partitions) -> dg.SensorDefinition:
    @dg.sensor(
        name="new_encoder_sensor",
        job_name="extract_job",
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Adds a partition for each encoder added to configs/encoders.yaml and extracts its latents",
    )
    def new_encoder_sensor(context: dg.SensorEvaluationContext, lake: LanceLake):
        known = set(context.instance.get_dynamic_partitions(ENCODER_PARTITIONS))
        registry = sorted(parts.encoders())
        new = [e for e in registry if e not in known]
        # Stable run keys: Dagster launches each (dataset, encoder) extraction once, whether the
        # encoder is new or the dataset was ingested after the encoder was added.
        requests = extract_requests(parts, registry, "extract", lake.lake())
        if not new and not requests:
            return dg.SkipReason("no new encoder in encoders.yaml and no newly ingested dataset")
        return dg.SensorResult(
            dynamic_partitions_requests=[parts.encoder.build_add_request(new)] if new else [],
            run_requests=requests,
        )

    return new_encoder_sensor


def build_schedule(parts: Partitions) -> dg.ScheduleDefinition:
    @dg.schedule(
        name="refresh_latents_schedule",
        job_name="extract_job",
        cron_schedule="0 3 * * *",
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Nightly: encode media ingested since the last run, for every encoder partition",
    )
    def refresh_latents(context: dg.ScheduleEvaluationContext, lake: LanceLake):
        encoders = context.instance.get_dynamic_partitions(ENCODER_PARTITIONS)
        return extract_requests(
            parts, list(encoders), f"refresh-{context.scheduled_execution_time:%Y%m%d%H%M}", lake.lake()
        )

    return refresh_latents
