"""Ingest: a dataset of configs/datasets.yaml -> Lance tables media, pairs and quarantine.

Runs in the Dagster concurrency pool `POOL`: with a limit of 1 on the instance (app.definitions
`POOL_LIMITS`), two ingests never write at once; the lake's keyed writes keep the tables right when
they do (a higher limit, an instance without limits). An unchanged dataset writes nothing; a full or
read-only disk fails the run with one line naming the folder (pipelines.storage).
"""

import dagster as dg
from pydantic import Field

from pipelines.ingest import asset_metadata, load_dataset, write_dataset
from pipelines.partitions import Partitions
from pipelines.resources import LanceLake, PipelinePaths
from pipelines.storage import dagster_failure

POOL = "fusemix-ingest"
DESCRIPTIONS = {
    "media": "One row per unique item (content-hash id)",
    "pairs": "media <-> caption pairs with split and group",
    "quarantine": "Every rejected input with its reason",
}


class IngestConfig(dg.Config):
    progress: bool = Field(default=True, description="Show progress bars in the run's logs")


def build(parts: Partitions) -> list:
    @dg.multi_asset(
        specs=[
            dg.AssetSpec(k, group_name="ingest", kinds={"lance"}, description=d)
            for k, d in DESCRIPTIONS.items()
        ],
        partitions_def=parts.dataset,
        pool=POOL,
    )
    def ingest(
        context: dg.AssetExecutionContext, config: IngestConfig, lake: LanceLake, paths: PipelinePaths
    ):
        spec = parts.dataset_spec(context.partition_key)
        with dagster_failure():  # a full or read-only disk: one clear line, the lake as it was
            ds = load_dataset(spec, paths.data_cache, progress=config.progress, log=context.log.info)
            info = write_dataset(lake.lake(), spec.name, ds)
        context.log.info(
            f"{spec.name}: {info['pairs']} pairs, {info['quarantined']} quarantined {info['quarantine_reasons']}"
        )
        for key, metadata in asset_metadata(spec.name, info).items():
            yield dg.MaterializeResult(asset_key=key, metadata=metadata)

    return [ingest]
