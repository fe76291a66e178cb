"""Non-blocking data-quality checks on ingestion."""

import dagster as dg

from pipelines.lake import table_name
from pipelines.partitions import Partitions
from pipelines.resources import LanceLake

MAX_QUARANTINE_RATE = 0.2


def build(parts: Partitions) -> list:
    @dg.asset_check(
        asset="quarantine",
        blocking=False,
        description=f"Under {MAX_QUARANTINE_RATE:.0%} of the inputs are quarantined",
    )
    def quarantine_rate(context: dg.AssetCheckExecutionContext, lake: LanceLake):
        dataset = context.partition_key
        lk = lake.lake()
        bad = lk.count(table_name("quarantine", dataset), "stage = 'ingest'")
        good = lk.count(table_name("pairs", dataset))
        rate = bad / max(1, bad + good)
        return dg.AssetCheckResult(
            passed=rate <= MAX_QUARANTINE_RATE,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"quarantined": bad, "pairs": good, "rate": rate},
        )

    return [quarantine_rate]
