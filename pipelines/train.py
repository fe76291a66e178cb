"""Train glue: an experiment's adapters from its curated pairs, tracked in an MLflow run and saved as
safetensors + JSON with the training history beside them. No Dagster here.

A checkpoint records the hash of its inputs (experiment config, curated pair ids, encoder
fingerprints); `up_to_date` finds a checkpoint trained on exactly these, so an unchanged rerun skips
training.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa

from fusion.adapters import EncoderRef, FusedModel
from fusion.checkpoint import read_config, save_checkpoint
from fusion.trainer import TrainResult, train_adapters
from pipelines.curate import paired_split, split_arrays, split_rows
from pipelines.lake import Lake
from pipelines.registries import ExperimentSpec
from pipelines.schemas import table_name
from pipelines.tracking import mlflow_run


def checkpoint_dir(models_dir: Path, experiment: str) -> Path:
    return Path(models_dir) / experiment


def inputs_hash(exp: ExperimentSpec, curated_ids: list[str], media_fp: str, text_fp: str) -> str:
    h = hashlib.sha256(repr(exp).encode())
    h.update(f"{media_fp}:{text_fp}".encode())
    for pid in sorted(curated_ids):
        h.update(pid.encode())
    return h.hexdigest()[:16]


def up_to_date(out: Path, digest: str) -> dict | None:
    """The summary of the checkpoint in `out` if it was trained on inputs `digest`, else None."""
    if not (out / "config.json").exists():
        return None
    extra = read_config(out)["extra"]
    return extra["summary"] if extra.get("inputs_hash") == digest else None


def experiment_params(
    exp: ExperimentSpec, media_ref: EncoderRef, text_ref: EncoderRef, selection: dict
) -> dict:
    """Flat parameters for MLflow: encoders and fingerprints, subset, FuseMix, every hyperparameter."""
    flat = {
        "dataset": exp.dataset,
        "family": exp.family,
        "variable": exp.variable,
        "caption": exp.caption,
        "media_encoder": media_ref.name,
        "media_fingerprint": media_ref.fingerprint,
        "text_encoder": text_ref.name,
        "text_fingerprint": text_ref.fingerprint,
        **{f"select.{k}": v for k, v in exp.select.items()},
        **{f"curate.{k}": v for k, v in selection.items()},
        **{f"adapter.{k}": v for k, v in asdict(exp.adapter).items()},
        **{f"fusemix.{k}": v for k, v in asdict(exp.fusemix).items()},
        **{f"train.{k}": v for k, v in asdict(exp.train).items()},
    }
    return {k: str(v) for k, v in flat.items()}


def train_experiment(
    lake: Lake,
    exp: ExperimentSpec,
    curated: pa.Table,
    media_ref: EncoderRef,
    text_ref: EncoderRef,
    media_side: str,
    on_step=None,
    on_validate=None,
) -> TrainResult:
    """Trains on the curated train split; picks the best step on the val split by the retrieval
    R-sum (R@1+R@5+R@10 both ways), never looking at test."""
    from evaluation.retrieval import evaluate_model

    x, y = split_arrays(lake, exp, split_rows(curated, "train"))
    if len(x) < 2:
        raise ValueError(f"experiment {exp.name}: {len(x)} training pairs; need at least 2")
    val_rows = split_rows(curated, "val")
    val = paired_split(lake, exp, val_rows) if len(val_rows) >= 2 else None

    def rsum(model: FusedModel) -> float:
        r, _, _ = evaluate_model(model, val)
        return float(sum(r.t2i_recall.values()) + sum(r.i2t_recall.values()))

    return train_adapters(
        x,
        y,
        exp.adapter,
        exp.fusemix,
        exp.train,
        validator=rsum if val is not None else None,
        sides=(media_side, "text"),
        encoders={media_side: media_ref, "text": text_ref},
        on_step=on_step,
        on_validate=on_validate,
        progress=True,
    )


def train_and_save(
    lake: Lake,
    exp: ExperimentSpec,
    curated: pa.Table,
    refs: tuple[EncoderRef, EncoderRef],
    media_side: str,
    client,
    experiment_id: str,
    out: Path,
    digest: str,
) -> tuple[dict, dict[str, int]]:
    """Trains in a new MLflow run (params, per-step loss, temperature and lr, the Lance versions read,
    the checkpoint as artifacts) and saves the checkpoint to `out`. Returns (summary, versions read)."""
    media_ref, text_ref = refs
    versions = lake.versions(
        [
            table_name("curated", exp.name),
            table_name("latents", exp.dataset, exp.media_encoder),
            table_name("latents", exp.dataset, exp.text_encoder),
        ]
    )
    tags = {"experiment": exp.name, "dataset": exp.dataset}
    with mlflow_run(client, experiment_id, exp.name, tags) as log:
        log.params(
            {
                **experiment_params(exp, media_ref, text_ref, {}),
                **{f"lance.{t}": str(v) for t, v in versions.items()},
            }
        )
        result = train_experiment(
            lake,
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
        extra = {
            "experiment": exp.name,
            "dataset": exp.dataset,
            "media_encoder": exp.media_encoder,
            "text_encoder": exp.text_encoder,
            "media_side": media_side,
            "text_side": "text",
            "inputs_hash": digest,
            "lance_versions": versions,
            "summary": summary,
        }
        save_checkpoint(out, result.model, exp.adapter, extra=extra)
        history = {"history": result.history, "val_history": result.val_history}
        tmp = out / ".history.json.tmp"
        tmp.write_text(json.dumps(history))
        os.replace(tmp, out / "history.json")
        client.log_artifacts(log.run_id, str(out), "adapters")
    return summary, versions


def read_history(out: Path) -> dict:
    """{history, val_history} of the checkpoint in `out` (empty lists when there is none)."""
    path = out / "history.json"
    return json.loads(path.read_text()) if path.exists() else {"history": [], "val_history": []}
