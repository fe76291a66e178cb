"""Curate: partition (experiment) -> `curated__{experiment}`, the selected pairs (quantity, quality,
diversity ablations), plus the blocking data contract checked before any training."""

import dagster as dg

from pipelines.curate import curate, latents_contract, read_tables, write_curated
from pipelines.partitions import Partitions
from pipelines.resources import EncoderBank, LanceLake
from pipelines.storage import dagster_failure


def build(parts: Partitions) -> list:
    @dg.asset(
        name="curated",
        group_name="curate",
        partitions_def=parts.experiment,
        deps=[
            dg.AssetDep("pairs", partition_mapping=dg.AllPartitionMapping()),
            dg.AssetDep("latents", partition_mapping=dg.AllPartitionMapping()),
        ],
        kinds={"lance"},
        description="The experiment's training pairs (val and test whole)",
    )
    def curated(context: dg.AssetExecutionContext, lake: LanceLake, encoders: EncoderBank):
        exp = parts.experiments[context.partition_key]
        lk = lake.lake()
        media, text = encoders.ref(exp.media_encoder), encoders.ref(exp.text_encoder)
        table, info = curate(lk, exp, media.fingerprint, text.fingerprint)
        with dagster_failure():  # a full or read-only disk: one clear line
            version, unchanged = write_curated(lk, exp, table)
        read = dg.MetadataValue.json(lk.versions(read_tables(exp)))
        metadata = {**info, "unchanged": unchanged, "lance_version": version, "read_versions": read}
        return dg.MaterializeResult(metadata=metadata)

    @dg.asset_check(
        asset=curated,
        blocking=True,
        description=(
            "Every item of the experiment's pairs that extraction did not quarantine has one latent (no "
            "duplicate rows) with the current fingerprint and the registry's dimension, and no NaN or inf"
        ),
    )
    def latents_ready(context: dg.AssetCheckExecutionContext, lake: LanceLake, encoders: EncoderBank):
        exp = parts.experiments[context.partition_key]
        media, text = encoders.ref(exp.media_encoder), encoders.ref(exp.text_encoder)
        problems, checked = latents_contract(lake.lake(), exp, media, text)
        quarantined = {name: c["quarantined"] for name, c in checked.items() if c["quarantined"]}
        note = f" ({quarantined} quarantined by extraction, left out)" if quarantined else ""
        return dg.AssetCheckResult(
            passed=not problems,
            description=("; ".join(problems) or "all curated items encoded") + note,
            metadata={"checked": dg.MetadataValue.json(checked)},
        )

    return [curated, latents_ready]
