"""Embeddings: partition (experiment) -> one Lance table per side of its shared space
(`embeddings__{experiment}__{side}`), every item of its datasets mapped once by the trained model and
indexed when large, for `fusemix search` and the search service. An unchanged rerun (same checkpoint,
same latents, media and pairs versions) writes nothing. A checkpoint whose MLflow training run did not
finish (a training killed after saving files) is refused, as evaluation refuses it."""

import dagster as dg
from pydantic import Field

from pipelines.embed import EMBED_CODE_VERSION, INDEX_MIN_ROWS, embed_space
from pipelines.partitions import Partitions
from pipelines.resources import LanceLake, MlflowTracking, PipelinePaths
from pipelines.space import load_space
from pipelines.storage import dagster_failure
from pipelines.tracking import require_finished


class EmbedConfig(dg.Config):
    force: bool = Field(default=False, description="Rewrite the tables even if their inputs are unchanged")
    index_min_rows: int = Field(
        default=INDEX_MIN_ROWS, description="Build a vector index on tables of at least this many rows"
    )


def build(parts: Partitions) -> list:
    @dg.asset(
        name="embeddings",
        group_name="serve",
        partitions_def=parts.experiment,
        deps=["adapters"],
        kinds={"lance"},
        code_version=EMBED_CODE_VERSION,
        description="Every item of the experiment's datasets in its shared space, per side, for search",
    )
    def embeddings(
        context: dg.AssetExecutionContext,
        config: EmbedConfig,
        lake: LanceLake,
        paths: PipelinePaths,
        tracking: MlflowTracking,
    ):
        space = load_space(paths.models_dir, context.partition_key)
        run_id = (space.record.get("summary") or {}).get("mlflow_run_id")
        if run_id:
            require_finished(tracking.client(), [run_id], f"experiment {space.experiment}")
        with dagster_failure():
            result = embed_space(
                lake.lake(),
                space,
                force=config.force,
                index_min_rows=config.index_min_rows,
                log=context.log.info,
            )
        metadata = {
            "inputs_hash": result.digest,
            "skipped": result.skipped,
            "seconds": result.seconds,
            "model_hash": space.model_hash,
            "read_versions": dg.MetadataValue.json(result.versions),
        }
        for side, info in result.sides.items():
            metadata |= {f"rows_{side}": info["rows"], f"indexed_{side}": info["indexed"]}
            metadata |= {f"seconds_{side}": info["seconds"], f"lance_version_{side}": info["lance_version"]}
            metadata[f"written_{side}"] = info["written"]
        return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(result.digest))

    return [embeddings]
