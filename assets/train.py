"""Train: partition (experiment) -> adapter weights (safetensors + JSON) and an MLflow run with
params, per-step loss and temperature, the Lance versions read, and the adapter files as artifacts.

Skips retraining when the checkpoint on disk was trained on exactly the same inputs (config,
curated pairs, encoder fingerprints), so a rerun of the demo with nothing changed is quick.
"""

import hashlib
import json

import dagster as dg
from pydantic import Field

from fusion.checkpoint import read_config, save_checkpoint
from pipelines.lake import table_name
from pipelines.partitions import Partitions
from pipelines.resources import EncoderBank, LanceLake, MlflowTracking, PipelinePaths
from pipelines.tracking import mlflow_run
from pipelines.training import checkpoint_dir, experiment_params, train_experiment


class TrainAssetConfig(dg.Config):
    force: bool = Field(default=False, description="Retrain even if the checkpoint's inputs are unchanged")


def inputs_hash(exp, curated_ids: list[str], media_fp: str, text_fp: str) -> str:
    h = hashlib.sha256(repr(exp).encode())
    h.update(f"{media_fp}:{text_fp}".encode())
    for pid in sorted(curated_ids):
        h.update(pid.encode())
    return h.hexdigest()[:16]


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
        media_side = parts.datasets[exp.dataset].modality
        media_ref, text_ref = encoders.ref(exp.media_encoder), encoders.ref(exp.text_encoder)
        curated_t = table_name("curated", exp.name)
        curated = lk.read(curated_t)
        digest = inputs_hash(exp, curated["pair_id"].to_pylist(), media_ref.fingerprint, text_ref.fingerprint)
        out = checkpoint_dir(paths.models_dir, exp.name)
        if not config.force and (out / "config.json").exists():
            extra = read_config(out)["extra"]
            if extra.get("inputs_hash") == digest:
                context.log.info(f"{exp.name}: checkpoint is up to date (inputs {digest}); not retraining")
                return dg.MaterializeResult(
                    metadata={**extra["summary"], "skipped": True, "inputs_hash": digest}
                )

        versions = lk.versions(
            [
                curated_t,
                table_name("latents", exp.dataset, exp.media_encoder),
                table_name("latents", exp.dataset, exp.text_encoder),
            ]
        )
        client = tracking.client()
        with mlflow_run(
            client,
            tracking.experiment_id(exp.family),
            exp.name,
            {"experiment": exp.name, "dataset": exp.dataset},
        ) as log:
            log.params(
                {
                    **experiment_params(exp, media_ref, text_ref, {}),
                    **{f"lance.{t}": str(v) for t, v in versions.items()},
                }
            )
            result = train_experiment(
                lk,
                exp,
                curated,
                media_ref,
                text_ref,
                media_side,
                on_step=lambda r: log.metrics(
                    {"train_loss": r["loss"], "temperature": r["temperature"], "lr": r["lr"]}, r["step"]
                ),
                on_validate=lambda r: log.metrics({"val_rsum": r["score"]}, r["step"]),
            )
            summary = {
                "mlflow_run_id": log.run_id,
                "steps": result.steps,
                "best_step": result.best_step,
                "best_val_rsum": result.best_score,
                "final_loss": result.history[-1]["loss"],
                "final_temperature": result.history[-1]["temperature"],
                "train_pairs": int((curated["split"].to_numpy(zero_copy_only=False) == "train").sum()),
                "seconds": round(result.seconds, 2),
                "pairs_per_s": round(result.pairs_seen / max(result.seconds, 1e-9), 1),
            }
            log.metrics({"train_seconds": result.seconds, "best_step": result.best_step or 0})
            save_checkpoint(
                out,
                result.model,
                exp.adapter,
                extra={
                    "experiment": exp.name,
                    "dataset": exp.dataset,
                    "media_encoder": exp.media_encoder,
                    "text_encoder": exp.text_encoder,
                    "media_side": media_side,
                    "text_side": "text",
                    "inputs_hash": digest,
                    "lance_versions": versions,
                    "summary": summary,
                },
            )
            (out / "history.json").write_text(
                json.dumps({"history": result.history, "val_history": result.val_history})
            )
            client.log_artifacts(log.run_id, str(out), "adapters")
        return dg.MaterializeResult(
            metadata={
                **summary,
                "inputs_hash": digest,
                "checkpoint": str(out),
                "read_versions": dg.MetadataValue.json(versions),
            }
        )

    return [adapters]
