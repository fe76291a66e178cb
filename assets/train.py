"""Train: partition (experiment) -> adapter weights (safetensors + JSON) and an MLflow run with
params, per-step loss and temperature, the Lance versions read, and the adapter files as artifacts.
An unchanged rerun (same config, curated pairs and encoder fingerprints) does not retrain."""

import dagster as dg
from pydantic import Field

from pipelines.partitions import Partitions
from pipelines.resources import EncoderBank, LanceLake, MlflowTracking, PipelinePaths
from pipelines.schemas import table_name
from pipelines.train import checkpoint_dir, inputs_hash, train_and_save, up_to_date


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
        exp = parts.experiments[context.partition_key]
        lk = lake.lake()
        refs = encoders.ref(exp.media_encoder), encoders.ref(exp.text_encoder)
        curated = lk.read(table_name("curated", exp.name))
        digest = inputs_hash(exp, curated["pair_id"].to_pylist(), refs[0].fingerprint, refs[1].fingerprint)
        out = checkpoint_dir(paths.models_dir, exp.name)
        summary = None if config.force else up_to_date(out, digest)
        if summary is not None:
            context.log.info(f"{exp.name}: checkpoint is up to date (inputs {digest}); not retraining")
            return dg.MaterializeResult(
                metadata={**summary, "skipped": True, "inputs_hash": digest},
                data_version=dg.DataVersion(digest),
            )
        media_side = parts.datasets[exp.dataset].modality
        experiment_id = tracking.experiment_id(exp.family)
        summary, versions = train_and_save(
            lk, exp, curated, refs, media_side, tracking.client(), experiment_id, out, digest
        )
        metadata = {**summary, "inputs_hash": digest, "checkpoint": str(out)}
        return dg.MaterializeResult(
            metadata={**metadata, "read_versions": dg.MetadataValue.json(versions)},
            data_version=dg.DataVersion(digest),
        )

    return [adapters]
