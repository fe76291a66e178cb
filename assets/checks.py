"""Non-blocking data-quality checks on ingestion, answered in SQL over the lake (DuckDB catalog)."""

import dagster as dg

from pipelines.ingest import quarantine_counts
from pipelines.partitions import Partitions
from pipelines.resources import DuckDBCatalog

MAX_QUARANTINE_RATE = 0.2


def build(parts: Partitions) -> list:
    @dg.asset_check(
        asset="quarantine",
        blocking=False,
        description=f"Under {MAX_QUARANTINE_RATE:.0%} of the inputs are quarantined",
    )
    def quarantine_rate(context: dg.AssetCheckExecutionContext, catalog: DuckDBCatalog):
        bad, good = quarantine_counts(catalog.catalog(), context.partition_key)
        rate = bad / max(1, bad + good)
        return dg.AssetCheckResult(
            passed=rate <= MAX_QUARANTINE_RATE,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"quarantined": bad, "pairs": good, "rate": rate},
        )

    return [quarantine_rate]
