"""The Dagster Definitions of the FuseMix pipeline (loaded by workspace.yaml and `fusemix ui`).

dagster dev -w workspace.yaml      # or: fusemix ui

Concurrency. The lake is what keeps overlapping writers right: keyed writes, commit retries and
de-duplication (pipelines.lake) leave one row per item whichever runs overlap, a manual
materialisation beside the sensor's run included. On top of that, two settings keep writers of one
partition from running at once at all:

- Runs launched through the run queue (the UI, the sensor, the schedule; `fusemix ui`): the
  instance's dagster.yaml (`app.cli.INSTANCE_YAML`, written by `fusemix`) queues a run while another run of the same partition
  is in progress (`dagster/partition` tag, one per value). A run killed without cleanup holds its
  partition until it is marked failed.
- Dagster concurrency pools: the ingest and extract assets run in the pools assets.ingest.POOL and
  assets.extract.POOL, which limit nothing until the instance has a limit for them
  (`configure_pools(instance)`, the UI's Deployment > Concurrency, or
  `dagster instance concurrency set fusemix-extract 1`). Pools apply to `execute_in_process` too,
  but they are per pool, not per partition, and with Dagster 1.13's SQLite storage (the default
  local instance) a step can miss the release of a slot and wait forever, and two claims in the
  same instant can both succeed; we saw the first in tests/pipelines/test_concurrency.py. Set
  limits on an instance with Postgres storage; the default instance has none.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from app.automation import build_experiment_sensor, build_jobs, build_schedule, build_sensor
from assets import checks, curate, embed, evaluate, extract, ingest, report, train
from fusion.paths import configs_dir
from pipelines.partitions import Partitions, build_partitions
from pipelines.resources import DuckDBCatalog, EncoderBank, LanceLake, MlflowTracking, PipelinePaths

# Opt-in pool limits (see the module docstring): one writer at a time per pool.
POOL_LIMITS: dict[str, int] = {ingest.POOL: 1, extract.POOL: 1}
_ENDED = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]


def configure_pools(instance: dg.DagsterInstance, limits: dict[str, int] | None = None) -> dict[str, int]:
    """Sets the limit of each pool in `limits` (default POOL_LIMITS) that has none on the instance yet,
    leaving limits set by hand alone, and frees slots still held by runs that ended (a run killed
    without cleanup keeps its slot until then: mark it failed, and the next call frees it). Returns
    the limits set. An instance whose storage has no concurrency tables is left as it is."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return {}
    configured = storage.get_concurrency_keys()
    added = {pool: n for pool, n in (limits or POOL_LIMITS).items() if pool not in configured}
    for pool, n in added.items():
        storage.set_concurrency_slots(pool, n)
    held = storage.get_concurrency_run_ids()
    if held:
        ended = instance.get_run_records(dg.RunsFilter(run_ids=list(held), statuses=_ENDED))
        for record in ended:
            storage.free_concurrency_slots_for_run(record.dagster_run.run_id)
    return added


def build_defs(
    configs: Path | None = None, resources: dict | None = None
) -> tuple[dg.Definitions, Partitions]:
    """The whole graph for the registries in `configs` (default: configs/ or $FUSEMIX_CONFIGS)."""
    parts = build_partitions(Path(configs) if configs else configs_dir())
    modules = (ingest, extract, curate, train, evaluate, embed, report, checks)
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
        sensors=[build_sensor(parts), build_experiment_sensor(parts)],
        schedules=[build_schedule(parts)],
        resources={**defaults, **resources},
    )
    return defs, parts


defs, PARTS = build_defs()
