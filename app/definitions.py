"""The Dagster Definitions of the FuseMix pipeline (loaded by workspace.yaml and `fusemix ui`).

dagster dev -w workspace.yaml      # or: fusemix ui
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from app.automation import build_jobs, build_schedule, build_sensor
from assets import checks, curate, evaluate, extract, ingest, report, train
from fusion.paths import configs_dir
from pipelines.partitions import Partitions, build_partitions
from pipelines.resources import DuckDBCatalog, EncoderBank, LanceLake, MlflowTracking, PipelinePaths


def build_defs(
    configs: Path | None = None, resources: dict | None = None
) -> tuple[dg.Definitions, Partitions]:
    """The whole graph for the registries in `configs` (default: configs/ or $FUSEMIX_CONFIGS)."""
    parts = build_partitions(Path(configs) if configs else configs_dir())
    modules = (ingest, extract, curate, train, evaluate, report, checks)
    built = [x for m in modules for x in m.build(parts)]
    assets = [x for x in built if not isinstance(x, dg.AssetChecksDefinition)]
    asset_checks = [x for x in built if isinstance(x, dg.AssetChecksDefinition)]
    resources = dict(resources or {})
    lake = resources.setdefault("lake", LanceLake())
    defaults = {
        "encoders": EncoderBank(registry_path=str(parts.configs / "encoders.yaml")),
        "tracking": MlflowTracking(),
        "catalog": DuckDBCatalog(lake=lake),  # SQL over the same lake the assets write
        "paths": PipelinePaths(configs=str(parts.configs)),
    }
    defs = dg.Definitions(
        assets=assets,
        asset_checks=asset_checks,
        jobs=list(build_jobs(parts).values()),
        sensors=[build_sensor(parts)],
        schedules=[build_schedule(parts)],
        resources={**defaults, **resources},
    )
    return defs, parts


defs, PARTS = build_defs()
