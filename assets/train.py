"""Train: partition (experiment) -> adapter weights (safetensors + JSON) and an MLflow run with
params, per-step loss and temperature, the Lance versions read, and the adapter files as artifacts.
An unchanged rerun (same config, curated pairs and encoder fingerprints) does not retrain, unless the
checkpoint's MLflow run did not finish (its process was killed after saving it)."""

import dagster as dg
from pydantic import Field

from pipelines.partitions import Partitions
from pipelines.resources import EncoderBank, LanceLake, MlflowTracking, PipelinePaths
from pipelines.schemas import table_name
from pipelines.train import (
    all_up_to_date,
    anchor_of,
    anchored_hash,
    inputs_hash,
    seed_dirs,
    train_and_save,
)


class TrainAssetConfig(dg.Config):
    force: bool = Field(default=False, description="Retrain even if the checkpoint's inputs are unchanged")


def build(parts: Partitions) -> list:
    @dg.asset(
        name="adapters",
        group_name="train",
        partitions_def=parts.experiment,
        deps=["curated"],
        kinds={"pytorch", "mlflow", "safetensors"},
        description="FuseMix adapters trained on the curated pairs",
    )
    def adapters(
        context: dg.AssetExecutionContext,
        config: TrainAssetConfig,
        lake: LanceLake,
        encoders: EncoderBank,
        tracking: MlflowTracking,
        paths: PipelinePaths,
    ):
        exp = parts.experiment_spec(context.partition_key)
        lk = lake.lake()
        refs = encoders.ref(exp.media_encoder), encoders.ref(exp.text_encoder)
        curated = lk.read(table_name("curated", exp.name))
        digest = inputs_hash(exp, curated["pair_id"].to_pylist(), refs[0].fingerprint, refs[1].fingerprint)
        media_side = parts.dataset_spec(exp.dataset).modality
        # Bound into an anchor's space (its text adapter, frozen): the anchor's checkpoints count too.
        anchor = anchor_of(exp, parts.experiments, parts.datasets, paths.models_dir, refs[1])
        digest = anchored_hash(digest, anchor)
        dirs = seed_dirs(paths.models_dir, exp)
        client = tracking.client()
        summaries = None if config.force else all_up_to_date(dirs, digest, client)
        if summaries is not None:
            context.log.info(f"{exp.name}: checkpoints are up to date (inputs {digest}); not retraining")
            metadata = {**summaries[0], "skipped": True, "inputs_hash": digest, "seeds": len(summaries)}
            return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(digest))
        experiment_id = tracking.experiment_id(exp.family)
        summaries, versions = train_and_save(
            lk, exp, curated, refs, media_side, client, experiment_id, dirs, digest, anchor
        )
        metadata = {**summaries[0], "inputs_hash": digest, "checkpoint": str(dirs[exp.train.seed])}
        metadata |= {"seeds": len(summaries), "read_versions": dg.MetadataValue.json(versions)}
        return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(digest))

    return [adapters]
