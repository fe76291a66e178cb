"""Curate: partition (experiment) -> `curated__{experiment}`, the selected pairs (quantity, quality,
diversity ablations), plus the blocking data contract checked before any training.

`experiment_inputs` (one partition per experiment, the first step of experiment_job) records what the
experiment reads as its data version: `pipelines.curate.experiment_state`, a digest of its
configuration, its encoders' fingerprints and the Lance versions of its pairs and latents (and, for an
experiment bound to an anchor, the anchor's checkpoints, so a retrained anchor makes it stale). The
experiment sensor records a new one (a runless materialisation) when that state changes, so Dagster
marks exactly the experiments whose inputs changed as stale, and `curated` downstream of it. (With
`curated` depending on every latents partition directly, any new latents would mark every experiment
stale; `experiment_inputs` itself still shows stale after any new latents, as its lineage says.)
"""

import dagster as dg

from pipelines.curate import (
    contract_verdict,
    curate,
    inputs_record,
    latents_contract,
    read_tables,
    write_curated,
)
from pipelines.partitions import Partitions
from pipelines.resources import EncoderBank, LanceLake, PipelinePaths
from pipelines.storage import dagster_failure
from pipelines.train import anchor_state

INPUTS = "experiment_inputs"
DATA_VERSION_TAG = "dagster/data_version"  # how a reported materialisation carries its data version


def inputs_event(name: str, state: str) -> dg.AssetMaterialization:
    """One experiment's inputs at `state` (a pipelines.curate.experiment_state), as the experiment
    sensor reports it outside a run."""
    return dg.AssetMaterialization(
        INPUTS, partition=name, tags={DATA_VERSION_TAG: state}, metadata={"state": state}
    )


def build(parts: Partitions) -> list:
    @dg.asset(
        name=INPUTS,
        group_name="curate",
        partitions_def=parts.experiment,
        deps=[
            dg.AssetDep("pairs", partition_mapping=dg.AllPartitionMapping()),
            dg.AssetDep("latents", partition_mapping=dg.AllPartitionMapping()),
        ],
        description=(
            "What the experiment reads, as its data version: its configuration, its encoders' "
            "fingerprints and the Lance versions of its pairs and latents"
        ),
    )
    def experiment_inputs(
        context: dg.AssetExecutionContext, lake: LanceLake, encoders: EncoderBank, paths: PipelinePaths
    ):
        exp = parts.experiment_spec(context.partition_key)
        media, text = encoders.ref(exp.media_encoder), encoders.ref(exp.text_encoder)
        anchor = anchor_state(paths.models_dir, exp, parts.experiments)
        state, versions = inputs_record(lake.lake(), exp, (media.fingerprint, text.fingerprint), anchor)
        metadata = {"state": state, "read_versions": dg.MetadataValue.json(versions)}
        if anchor is not None:
            metadata["anchor"] = anchor
        return dg.MaterializeResult(data_version=dg.DataVersion(state), metadata=metadata)

    @dg.asset(
        name="curated",
        group_name="curate",
        partitions_def=parts.experiment,
        deps=[INPUTS],
        kinds={"lance"},
        description="The experiment's training pairs (val and test whole)",
    )
    def curated(context: dg.AssetExecutionContext, lake: LanceLake, encoders: EncoderBank):
        exp = parts.experiment_spec(context.partition_key)
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
        exp = parts.experiment_spec(context.partition_key)
        media, text = encoders.ref(exp.media_encoder), encoders.ref(exp.text_encoder)
        problems, checked = latents_contract(lake.lake(), exp, media, text)
        return dg.AssetCheckResult(
            passed=not problems,
            description=contract_verdict(problems, checked),
            metadata={"checked": dg.MetadataValue.json(checked)},
        )

    return [experiment_inputs, curated, latents_ready]
