"""Ingest: a dataset of configs/datasets.yaml -> Lance tables media, pairs and quarantine."""

import dagster as dg
from pydantic import Field

from pipelines.ingest import load_dataset, write_dataset
from pipelines.partitions import Partitions
from pipelines.resources import LanceLake, PipelinePaths


class IngestConfig(dg.Config):
    progress: bool = Field(default=True, description="Show progress bars in the run's logs")


def build(parts: Partitions) -> list:
    @dg.multi_asset(
        specs=[
            dg.AssetSpec(
                "media",
                group_name="ingest",
                kinds={"lance"},
                description="One row per unique item (content-hash id)",
            ),
            dg.AssetSpec(
                "pairs",
                group_name="ingest",
                kinds={"lance"},
                description="media <-> caption pairs with split and group",
            ),
            dg.AssetSpec(
                "quarantine",
                group_name="ingest",
                kinds={"lance"},
                description="Every rejected input with its reason",
            ),
        ],
        partitions_def=parts.dataset,
    )
    def ingest(
        context: dg.AssetExecutionContext, config: IngestConfig, lake: LanceLake, paths: PipelinePaths
    ):
        spec = parts.datasets[context.partition_key]
        ds = load_dataset(spec, paths.data_cache, progress=config.progress)
        info = write_dataset(lake.lake(), spec.name, ds)
        versions = info["lance_versions"]
        context.log.info(
            f"{spec.name}: {info['pairs']} pairs, {info['quarantined']} quarantined {info['quarantine_reasons']}"
        )
        yield dg.MaterializeResult(
            asset_key="media",
            metadata={
                "unique_media": info["unique_media"],
                "unique_captions": info["unique_captions"],
                "new_media": info["new_media"],
                "removed_media": info["removed_media"],
                "lance_version": versions.get(f"media__{spec.name}"),
            },
        )
        yield dg.MaterializeResult(
            asset_key="pairs",
            metadata={
                "pairs": info["pairs"],
                "concepts": info["concepts"],
                "split_seed": info["split_seed"],
                "lance_version": versions.get(f"pairs__{spec.name}"),
            },
        )
        yield dg.MaterializeResult(
            asset_key="quarantine",
            metadata={
                "quarantined": info["quarantined"],
                "quarantine_rate": info["quarantined"] / max(1, info["quarantined"] + info["pairs"]),
                "reasons": dg.MetadataValue.json(info["quarantine_reasons"]),
                "lance_version": versions.get(f"quarantine__{spec.name}"),
            },
        )

    return [ingest]
