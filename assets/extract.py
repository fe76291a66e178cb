"""Extract: partition (dataset x encoder) -> `latents__{dataset}__{encoder}`, incremental and resumable.

Runs in the Dagster concurrency pool `POOL`: with a limit of 1 on the instance (app.definitions
`POOL_LIMITS`), extractions run one at a time (they share the encoders' device); the lake's keyed
writes keep one latent per item when two do overlap (a higher limit, an instance without limits).
Each file is checked again (inside the dataset's folder, same content hash) right before it is encoded.
"""

import dagster as dg
from pydantic import Field

from pipelines.extract import extract_dataset, latents_metadata, resolve_engine
from pipelines.partitions import Partitions
from pipelines.resources import EncoderBank, LanceLake, PipelinePaths
from pipelines.storage import dagster_failure

POOL = "fusemix-extract"


class ExtractConfig(dg.Config):
    commit_every: int = Field(
        default=512, description="Rows per Lance commit: a kill loses at most this many"
    )
    progress: bool = Field(default=True, description="Show a progress bar")
    engine: str = Field(
        default="",
        description="in-process or ray; empty: $FUSEMIX_EXTRACT_ENGINE, else in-process (pipelines.ray_extract)",
    )
    ray_workers: int = Field(default=2, description="Encoder actors when the engine is ray")
    ray_address: str = Field(
        default="", description="Ray cluster address; empty: $RAY_ADDRESS, else a local Ray on this machine"
    )


def engine_of(config: ExtractConfig) -> str:
    """The extraction engine a run uses: its config, else $FUSEMIX_EXTRACT_ENGINE, else in-process."""
    try:
        return resolve_engine(config.engine)
    except ValueError as err:
        raise dg.Failure(str(err)) from err


def build(parts: Partitions) -> list:
    @dg.asset(
        name="latents",
        group_name="extract",
        partitions_def=parts.extract,
        deps=[dg.AssetDep("media", partition_mapping=dg.MultiToSingleDimensionPartitionMapping("dataset"))],
        kinds={"lance", "pytorch"},
        pool=POOL,
        description="Raw latents of each unique item from one frozen encoder, tagged with its fingerprint",
    )
    def latents(
        context: dg.AssetExecutionContext,
        config: ExtractConfig,
        lake: LanceLake,
        encoders: EncoderBank,
        paths: PipelinePaths,
    ):
        keys = context.partition_key.keys_by_dimension
        dataset, name = keys["dataset"], keys["encoder"]
        spec = encoders.spec(name)
        if why := parts.not_applicable(dataset, spec):
            raise dg.Failure(why)
        engine = engine_of(config)
        with dagster_failure():  # a full or read-only disk: one clear line, the committed rows kept
            stats = extract_dataset(
                lake.lake(),
                parts.dataset_spec(dataset),
                spec,
                lambda: encoders.get(name),
                paths.data_cache,
                engine=engine,
                ray=encoders.ray_options(spec, config.ray_workers, config.ray_address),
                commit_every=config.commit_every,
                progress=config.progress,
                log=context.log.info,
            )
        return dg.MaterializeResult(metadata=latents_metadata(stats, engine))

    return [latents]
