"""Train glue: an experiment's adapters from its curated pairs, tracked in an MLflow run and saved as
safetensors + JSON with the training history beside them. No Dagster here.

An experiment with an `anchor` binds into the anchor's trained space: the anchor's text adapter (of
the same seed) is used frozen, only this experiment's media adapter is trained, and the checkpoint
holds all three adapters (this media side, text, the anchor's media side) with `sides` and
`datasets` in its config's extra, so images and sounds share one space (`load_anchor`, `bind`).

A checkpoint records the hash of its inputs (experiment config, curated pair ids, encoder
fingerprints) and its MLflow run; `up_to_date` finds a checkpoint trained on exactly these whose run
FINISHED, so an unchanged rerun skips training. The files are saved inside the run, before its
artifacts are logged and it is marked FINISHED: a checkpoint whose process was killed in between has a
run that is not FINISHED (pipelines.tracking closes it as KILLED), and is trained again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from evaluation.retrieval import PairedSplit
from fusion.adapters import EncoderRef, FusedModel
from fusion.checkpoint import CONFIG, load_checkpoint, read_config, save_checkpoint
from fusion.trainer import TrainResult, train_adapters
from pipelines.curate import pair_groups, paired_split, split_arrays, split_rows
from pipelines.lake import Lake
from pipelines.registries import DatasetSpec, ExperimentSpec
from pipelines.schemas import table_name
from pipelines.stream import lance_chunks, write_pairs
from pipelines.tracking import mlflow_run, run_status

HISTORY = "history.json"


def checkpoint_dir(models_dir: Path, experiment: str) -> Path:
    return Path(models_dir) / experiment


def inputs_hash(exp: ExperimentSpec, curated_ids: list[str], media_fp: str, text_fp: str) -> str:
    h = hashlib.sha256(repr(exp).encode())
    h.update(f"{media_fp}:{text_fp}".encode())
    for pid in sorted(curated_ids):
        h.update(pid.encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Anchor:
    """The trained space an anchored experiment binds to: the anchor's spec, its media side, its
    model for each seed of the bound experiment, and the inputs hashes of those checkpoints."""

    spec: ExperimentSpec
    media_side: str
    models: dict[int, FusedModel]
    hashes: tuple[str, ...]


def load_anchor(
    models_dir: Path, anchor: ExperimentSpec, media_side: str, text_ref: EncoderRef, seeds: list[int]
) -> Anchor:
    """The anchor's checkpoint for each seed (its first seed's where it has fewer), checked against
    the text encoder's current fingerprint; LookupError when the anchor is not trained yet."""
    dirs = seed_dirs(models_dir, anchor)
    first = next(iter(dirs.values()))
    models, hashes = {}, []
    for seed in seeds:
        out = dirs.get(seed, first)
        if not (out / CONFIG).exists():
            raise LookupError(
                f"anchor experiment {anchor.name} has no trained model at {out}; "
                f"run experiment_job for {anchor.name} first"
            )
        model = load_checkpoint(out, expect={"text": text_ref})
        if media_side not in model.sides:
            raise ValueError(
                f"anchor {anchor.name}'s checkpoint has sides {list(model.sides)}, not {media_side!r}"
            )
        models[seed] = model
        hashes.append(read_config(out)["extra"]["inputs_hash"])
    return Anchor(anchor, media_side, models, tuple(hashes))


def anchor_of(
    exp: ExperimentSpec,
    experiments: Mapping[str, ExperimentSpec],
    datasets: Mapping[str, DatasetSpec],
    models_dir: Path,
    text_ref: EncoderRef,
) -> Anchor | None:
    """The trained space `exp` binds to (load_anchor), or None when it has no anchor; an anchor of
    the same media modality adds nothing and is refused."""
    if not exp.anchor:
        return None
    spec = experiments[exp.anchor]
    side = datasets[spec.dataset].modality
    if side == datasets[exp.dataset].modality:
        raise ValueError(
            f"{exp.name} and its anchor {spec.name} both have {side} media; an anchor adds another modality"
        )
    return load_anchor(models_dir, spec, side, text_ref, exp.seed_list())


def anchor_state(
    models_dir: Path, exp: ExperimentSpec, experiments: Mapping[str, ExperimentSpec]
) -> str | None:
    """What a bound experiment reads of its anchor, as one digest: the inputs hash of each of the
    anchor's seed checkpoints ("untrained" while it has none), so that a retrained anchor makes the
    bound experiment's inputs change; None for an experiment without an anchor."""
    if not exp.anchor:
        return None
    hashes = []
    for out in seed_dirs(models_dir, experiments[exp.anchor]).values():
        hashes.append(read_config(out)["extra"].get("inputs_hash", "") if (out / CONFIG).exists() else "-")
    if all(h == "-" for h in hashes):
        return "untrained"
    return hashlib.sha256(":".join(hashes).encode()).hexdigest()[:16]


def anchored_hash(digest: str, anchor: Anchor | None) -> str:
    """The inputs hash of an anchored experiment: its own, and its anchor's checkpoints'."""
    if anchor is None:
        return digest
    return hashlib.sha256(":".join((digest, *anchor.hashes)).encode()).hexdigest()[:16]


def bind(model: FusedModel, anchor_model: FusedModel, anchor_side: str) -> FusedModel:
    """The three-sided model: this experiment's sides (media, text) and the anchor's media side."""
    if anchor_side in model.sides:
        raise ValueError(f"the anchor's media side {anchor_side!r} is already a side of this experiment")
    adapters = {
        **{s: model.adapters[s] for s in model.sides},
        anchor_side: anchor_model.adapters[anchor_side],
    }
    encoders = {**model.encoders, anchor_side: anchor_model.encoders[anchor_side]}
    return FusedModel(adapters, encoders, temperature=float(model.temperature.detach())).eval()


def up_to_date(out: Path, digest: str, client) -> dict | None:
    """The summary of the checkpoint in `out` if it was trained on inputs `digest` and its MLflow run
    (in `client`'s store) FINISHED, its artifacts logged; else None."""
    if not (out / CONFIG).exists():
        return None
    extra = read_config(out)["extra"]
    if extra.get("inputs_hash") != digest:
        return None
    summary = extra["summary"]
    return summary if run_status(client, summary.get("mlflow_run_id")) == "FINISHED" else None


def experiment_params(
    exp: ExperimentSpec, media_ref: EncoderRef, text_ref: EncoderRef, selection: dict
) -> dict:
    """Flat parameters for MLflow: encoders and fingerprints, subset, FuseMix, every hyperparameter."""
    flat = {
        "dataset": exp.dataset,
        "family": exp.family,
        "variable": exp.variable,
        "caption": exp.caption,
        "method": exp.method,
        "seeds": exp.seeds,
        "eval_datasets": ",".join(exp.eval_datasets),
        "group_by": exp.group_by,
        "hubness": exp.hubness,
        "anchor": exp.anchor,
        **{f"method.{k}": v for k, v in exp.method_params.items()},
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


# Train splits of at least this many pairs are streamed from Lance instead of held in memory
# ($FUSEMIX_STREAM_PAIRS overrides; 0 streams every adapter training).
STREAM_PAIRS = 2_000_000
# Pairs joined per chunk when the streamed table is written, and rows per slice when it is read.
JOIN_CHUNK = 65536


def stream_threshold() -> int:
    value = os.environ.get("FUSEMIX_STREAM_PAIRS", "").strip()
    if not value:
        return STREAM_PAIRS
    if not value.isdigit():
        raise ValueError(f"FUSEMIX_STREAM_PAIRS must be a whole number of pairs, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class TrainingData:
    """What every seed of an experiment trains on, read from the lake once: the train pairs' latents
    x [n, d_m] and y [n, d_t], their group keys for a loss that knows its positives (None for plain
    InfoNCE), and the val split for model selection (None with fewer than 2 val pairs). A large train
    split is streamed instead: x, y and groups are None and `stream_table` names the Lance table of
    the joined pairs (pipelines.stream), read in slices by every seed."""

    x: np.ndarray | None
    y: np.ndarray | None
    groups: np.ndarray | None
    val: PairedSplit | None
    n: int = 0
    stream_table: str | None = None
    lake: Lake | None = None

    def chunks(self, seed: int):
        """The streamed pairs as a fusion.trainer ChunkSource (None when held in memory)."""
        if self.stream_table is None or self.lake is None:
            return None
        return lance_chunks(self.lake, self.stream_table, seed=seed)


def _joined(lake: Lake, exp: ExperimentSpec, rows: pa.Table, groups: np.ndarray | None):
    for start in range(0, len(rows), JOIN_CHUNK):
        x, y = split_arrays(lake, exp, rows.slice(start, JOIN_CHUNK))
        yield (x, y) if groups is None else (x, y, groups[start : start + JOIN_CHUNK])


def training_data(lake: Lake, exp: ExperimentSpec, curated: pa.Table) -> TrainingData:
    train_rows = split_rows(curated, "train")
    groups = pair_groups(train_rows) if exp.train.loss != "infonce" else None
    val_rows = split_rows(curated, "val")
    val = paired_split(lake, exp, val_rows) if len(val_rows) >= 2 else None
    if exp.method == "adapters" and len(train_rows) >= max(2, stream_threshold()):
        # Joined one chunk at a time and kept in the curated order (shuffled per slice when read).
        table = table_name("trainpairs", exp.name)
        write_pairs(lake, table, _joined(lake, exp, train_rows, groups))
        return TrainingData(None, None, None, val, n=len(train_rows), stream_table=table, lake=lake)
    x, y = split_arrays(lake, exp, train_rows)
    return TrainingData(x, y, groups, val, n=len(x))


def train_experiment(
    data: TrainingData,
    exp: ExperimentSpec,
    media_ref: EncoderRef,
    text_ref: EncoderRef,
    media_side: str,
    on_step=None,
    on_validate=None,
    fixed: dict | None = None,
) -> TrainResult:
    """Trains on the curated train split; picks the best step on the val split by the retrieval
    R-sum (R@1+R@5+R@10 both ways), never looking at test. `fixed` (side -> Adapter) is used frozen."""
    from evaluation.retrieval import evaluate_model

    if data.n < 2:
        raise ValueError(f"experiment {exp.name}: {data.n} training pairs; need at least 2")

    def rsum(model: FusedModel) -> float:
        r, _, _ = evaluate_model(model, data.val)
        return float(sum(r.t2i_recall.values()) + sum(r.i2t_recall.values()))

    chunks = data.chunks(exp.train.seed)
    return train_adapters(
        data.x,
        data.y,
        exp.adapter,
        exp.fusemix,
        exp.train,
        chunks=chunks,
        validator=rsum if data.val is not None else None,
        sides=(media_side, "text"),
        encoders={media_side: media_ref, "text": text_ref},
        on_step=on_step,
        on_validate=on_validate,
        progress=True,
        groups=data.groups,
        fixed=fixed,
    )


def seed_dirs(models_dir: Path, exp: ExperimentSpec) -> dict[int, Path]:
    """The checkpoint folder of each seed: the first in models/<experiment> (where `fusemix search`
    looks), the others in models/<experiment>/seeds/<seed>."""
    base = checkpoint_dir(models_dir, exp.name)
    return {s: base if i == 0 else base / "seeds" / str(s) for i, s in enumerate(exp.seed_list())}


def all_up_to_date(dirs: dict[int, Path], digest: str, client) -> list[dict] | None:
    """The summaries of every seed's checkpoint if all are up_to_date, else None."""
    summaries = [up_to_date(out, digest, client) for out in dirs.values()]
    return None if any(s is None for s in summaries) else summaries


def fit_method(
    data: TrainingData,
    exp: ExperimentSpec,
    refs: tuple[EncoderRef, EncoderRef],
    media_side: str,
    log,
    fixed: dict | None = None,
) -> tuple[object, dict, dict | None]:
    """(model, summary, history or None): trained adapters (`fixed` sides frozen), or a baseline
    fitted on the same train pairs with its hyperparameters chosen on the val split."""
    media_ref, text_ref = refs
    train_pairs = data.n
    if exp.method == "adapters":
        result = train_experiment(
            data,
            exp,
            media_ref,
            text_ref,
            media_side,
            on_step=lambda r: log.metrics(
                {"train_loss": r["loss"], "temperature": r["temperature"], "lr": r["lr"]}, r["step"]
            ),
            on_validate=lambda r: log.metrics({"val_rsum": r["score"]}, r["step"]),
            fixed=fixed,
        )
        summary = {
            "steps": result.steps,
            "batch_size": result.batch_size,
            "best_step": result.best_step,
            "best_val_rsum": result.best_score,
            "final_loss": result.history[-1]["loss"],
            "final_temperature": result.history[-1]["temperature"],
            "train_pairs": train_pairs,
            "streamed": data.stream_table is not None,
            "seconds": round(result.seconds, 2),
            "pairs_per_s": round(result.pairs_seen / max(result.seconds, 1e-9), 1),
        }
        log.metrics(
            {
                "train_seconds": result.seconds,
                "best_step": result.best_step or 0,
                "batch_size": result.batch_size,
            }
        )
        return result.model, summary, {"history": result.history, "val_history": result.val_history}
    from evaluation.baselines import fit_baseline

    t0 = time.perf_counter()
    model, chosen = fit_baseline(
        exp.method,
        data.x,
        data.y,
        val=data.val,
        sides=(media_side, "text"),
        encoders={media_side: media_ref, "text": text_ref},
        seed=exp.train.seed,
        params=dict(exp.method_params) or None,
        adapter_cfg=exp.adapter,
    )
    seconds = time.perf_counter() - t0
    log.params({f"chosen.{k}": v for k, v in chosen.items() if k != "grid"})
    log.metrics({"train_seconds": seconds})
    summary = {"steps": 0, "train_pairs": train_pairs, "seconds": round(seconds, 2), "chosen": chosen}
    return model, summary, None


def save_model(out: Path, model, exp: ExperimentSpec, extra: dict, history: dict | None) -> None:
    """Adapters as a checkpoint with their history beside it (written before its config, atomically:
    fusion.checkpoint.write_files); a baseline in its own format."""
    if history is None:
        from evaluation.baselines import save_baseline

        (out / HISTORY).unlink(missing_ok=True)  # an adapters run's history would mislead
        save_baseline(out, model, extra=extra)
        return
    save_checkpoint(out, model, exp.adapter, extra=extra, side_files={HISTORY: json.dumps(history)})


def train_and_save(
    lake: Lake,
    exp: ExperimentSpec,
    curated: pa.Table,
    refs: tuple[EncoderRef, EncoderRef],
    media_side: str,
    client,
    experiment_id: str,
    dirs: dict[int, Path],
    digest: str,
    anchor: Anchor | None = None,
) -> tuple[list[dict], dict[str, int]]:
    """Trains (or fits) the experiment once per seed, each in its own MLflow run (params, per-step
    loss, temperature and lr, the Lance versions read, the saved files as artifacts), saved to that
    seed's folder of `dirs`. With an `anchor`, each seed binds to the anchor's model of that seed.
    Returns (one summary per seed, the Lance versions read)."""
    media_ref, text_ref = refs
    versions = lake.versions(
        [
            table_name("curated", exp.name),
            table_name("latents", exp.dataset, exp.media_encoder),
            table_name("latents", exp.dataset, exp.text_encoder),
        ]
    )
    data = training_data(lake, exp, curated)  # the same pairs and latents for every seed
    summaries = []
    for seed, out in dirs.items():
        exp_seed = replace(exp, train=replace(exp.train, seed=seed))
        tags = {"experiment": exp.name, "dataset": exp.dataset, "seed": str(seed), "method": exp.method}
        with mlflow_run(client, experiment_id, exp.name, tags) as log:
            log.params(
                {
                    **experiment_params(exp_seed, media_ref, text_ref, {}),
                    **{f"lance.{t}": str(v) for t, v in versions.items()},
                }
            )
            fixed = {"text": anchor.models[seed].adapters["text"]} if anchor else None
            if anchor:
                log.params({"anchor": anchor.spec.name, "anchor_inputs_hash": anchor.hashes[0]})
            model, summary, history = fit_method(data, exp_seed, refs, media_side, log, fixed)
            summary = {"mlflow_run_id": log.run_id, "seed": seed, **summary}
            extra = {
                "experiment": exp.name,
                "dataset": exp.dataset,
                "method": exp.method,
                "seed": seed,
                "media_encoder": exp.media_encoder,
                "text_encoder": exp.text_encoder,
                "media_side": media_side,
                "text_side": "text",
                "inputs_hash": digest,
                "lance_versions": versions,
                "summary": summary,
                "eval_datasets": list(exp.eval_datasets),
            }
            if anchor:
                model = bind(model, anchor.models[seed], anchor.media_side)
                a = anchor.spec
                extra |= {
                    "anchor": a.name,
                    "sides": {media_side: exp.media_encoder, "text": exp.text_encoder, anchor.media_side: a.media_encoder},
                    "datasets": {exp.dataset: media_side, a.dataset: anchor.media_side},
                }  # fmt: skip
            save_model(out, model, exp, extra, history)
            for path in sorted(p for p in out.iterdir() if p.is_file() and not p.name.startswith(".")):
                client.log_artifact(log.run_id, str(path), "adapters")
        summaries.append(summary)
    return summaries, versions


def read_history(out: Path) -> dict:
    """{history, val_history} of the checkpoint in `out` (empty lists when there is none)."""
    path = out / HISTORY
    return json.loads(path.read_text()) if path.exists() else {"history": [], "val_history": []}
