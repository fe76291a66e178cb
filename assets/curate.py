"""Curate: partition (experiment) -> `curated__{experiment}`, the selected pairs (quantity, quality,
diversity ablations), plus the blocking data contract checked before any training."""

import dagster as dg

from pipelines.curate import curate, latents_contract, read_tables
from pipelines.partitions import Partitions
from pipelines.resources import EncoderBank, LanceLake
from pipelines.schemas import table_name


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
        version = lk.overwrite(table_name("curated", exp.name), table)
        read = dg.MetadataValue.json(lk.versions(read_tables(exp)))
        return dg.MaterializeResult(metadata={**info, "lance_version": version, "read_versions": read})

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
        return dg.AssetCheckResult(
            passed=not problems,
            description="; ".join(problems) or "all curated items encoded",
            metadata={"checked": dg.MetadataValue.json(checked)},
        )

    return [curated, latents_ready]
