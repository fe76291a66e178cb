"""Text-to-media search with a trained FuseMix model: `fusemix search "a red apple" --experiment NAME`.

The query is encoded by the experiment's frozen text encoder and mapped by its text adapter; every
media latent of `latents__{dataset}__{media_encoder}` is mapped by the media adapter; the k media
with the highest cosine similarity are returned with their captions. The checkpoint folder is
`<FUSEMIX_HOME>/models/<experiment>/` (fusion.checkpoint); its config's `extra` names the dataset,
the encoders and the two sides. Latents made by another encoder version (fingerprint) are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fusion.adapters import EncoderRef
from fusion.checkpoint import CheckpointMismatch, load_checkpoint, read_config
from fusion.encoders import EncoderSpec, FrozenEncoder, build_encoder, load_registry
from pipelines.lake import Lake, arrow_to_vectors, sql_in
from pipelines.schemas import table_name

_EXTRA_KEYS = ("dataset", "media_encoder", "text_encoder", "media_side", "text_side")


class SearchError(ValueError):
    """The experiment, its checkpoint or its latents cannot serve a search; the message says why."""


def experiment_info(models_dir: str | Path, experiment: str) -> dict:
    """The `extra` of an experiment's checkpoint config (dataset, media/text encoder and side)."""
    directory = Path(models_dir) / experiment
    try:
        config = read_config(directory)
    except FileNotFoundError as err:
        raise SearchError(
            f"experiment {experiment!r} has no trained model at {directory}; materialise its train asset first"
        ) from err
    extra = config.get("extra") or {}
    missing = [k for k in _EXTRA_KEYS if not extra.get(k)]
    if missing:
        raise SearchError(f"checkpoint {directory} does not record {missing} in its config 'extra'")
    return {**extra, "directory": directory, "encoders": config["encoders"]}


def search(
    lake: Lake,
    models_dir: str | Path,
    experiment: str,
    query: str,
    k: int = 5,
    registry: Mapping[str, EncoderSpec] | None = None,
    text_encoder: FrozenEncoder | None = None,
) -> list[dict]:
    """The k media nearest to `query`, best first.

    Each result: rank (1-based), media_id, score (cosine in the shared space), modality, path,
    captions (the caption texts paired with that item in the dataset). `registry` defaults to
    configs/encoders.yaml; `text_encoder` reuses an already built encoder (it must be the one the
    experiment names).
    """
    if not query.strip():
        raise SearchError("the query is empty")
    if k < 1:
        raise SearchError(f"k must be at least 1, got {k}")
    info = experiment_info(models_dir, experiment)
    dataset, media_name, text_name = info["dataset"], info["media_encoder"], info["text_encoder"]
    media_side, text_side = info["media_side"], info["text_side"]

    if text_encoder is None:
        registry = load_registry() if registry is None else registry
        if text_name not in registry:
            raise SearchError(
                f"experiment {experiment!r} uses text encoder {text_name!r}, which is not in the encoder registry"
            )
        text_encoder = build_encoder(registry[text_name])
    elif text_encoder.name != text_name:
        raise SearchError(
            f"experiment {experiment!r} uses text encoder {text_name!r}, not {text_encoder.name!r}"
        )
    try:
        model = load_checkpoint(
            info["directory"],
            expect={text_side: EncoderRef(text_name, text_encoder.fingerprint, text_encoder.dim)},
        )
    except CheckpointMismatch as err:
        raise SearchError(f"experiment {experiment!r}: {err}") from err

    table = table_name("latents", dataset, media_name)
    if not lake.exists(table):
        raise SearchError(
            f"no latents table {table!r} in the lake at {lake.root}; run the extract stage first"
        )
    latents = lake.read(table, columns=["media_id", "vector", "fingerprint"])
    want = model.encoders[media_side]
    found = sorted(set(latents.column("fingerprint").to_pylist()))
    if found != [want.fingerprint]:
        # An empty table also lands here: found == [].
        raise SearchError(
            f"experiment {experiment!r} was trained on {media_name} latents with fingerprint {want.fingerprint}, "
            f"but {table} holds fingerprint(s) {found or 'none (the table is empty)'}; "
            "re-extract the latents or retrain the experiment"
        )
    vectors = arrow_to_vectors(latents.column("vector"))  # [N, d_media]
    if not vectors.flags.writeable:  # zero-copy from Arrow; torch warns on read-only arrays
        vectors = vectors.copy()
    if vectors.shape[1] != want.dim:
        raise SearchError(f"{table} holds {vectors.shape[1]}-d latents; the checkpoint expects {want.dim}-d")

    q = text_encoder.encode([query])  # [1, d_text]
    q_emb = model.embed(text_side, q)  # [1, D], L2-normalised
    m_emb = model.embed(media_side, vectors)  # [N, D], L2-normalised
    scores = (m_emb @ q_emb.T).squeeze(1).numpy()  # [N] cosine similarities
    # Stable sort so that equal scores keep table order: results are reproducible.
    order = np.argsort(-scores, kind="stable")[:k]
    ids = latents.column("media_id").to_pylist()
    top = [ids[i] for i in order]
    return [
        {"rank": r + 1, "media_id": ids[i], "score": float(scores[i]), **details}
        for r, (i, details) in enumerate(zip(order, _details(lake, dataset, top), strict=True))
    ]


def _details(lake: Lake, dataset: str, media_ids: list[str]) -> list[dict]:
    """modality, path and paired caption texts of each media id (empty where the tables are missing)."""
    media_t, pairs_t = table_name("media", dataset), table_name("pairs", dataset)
    captions: dict[str, list[str]] = {m: [] for m in media_ids}
    meta: dict[str, dict] = {}
    if media_ids and lake.exists(media_t):
        for row in lake.read(
            media_t, ["media_id", "modality", "path"], sql_in("media_id", media_ids)
        ).to_pylist():
            meta[row["media_id"]] = {"modality": row["modality"], "path": row["path"]}
    if media_ids and lake.exists(pairs_t) and lake.exists(media_t):
        pairs = lake.read(pairs_t, ["media_id", "caption_id"], sql_in("media_id", media_ids)).to_pylist()
        cap_ids = sorted({p["caption_id"] for p in pairs})
        texts = {}
        if cap_ids:
            rows = lake.read(media_t, ["media_id", "text"], sql_in("media_id", cap_ids)).to_pylist()
            texts = {r["media_id"]: r["text"] for r in rows}
        for p in pairs:
            text = texts.get(p["caption_id"])
            if text is not None and text not in captions[p["media_id"]]:
                captions[p["media_id"]].append(text)
    return [
        {
            "modality": meta.get(m, {}).get("modality"),
            "path": meta.get(m, {}).get("path"),
            "captions": captions[m],
        }
        for m in media_ids
    ]


def format_results(results: list[dict], max_captions: int = 2, width: int = 90) -> str:
    """Printable lines: rank, score, media id, path, then up to `max_captions` captions."""
    if not results:
        return "no results"
    lines = []
    for r in results:
        where = r["path"] or "(inline)"
        lines.append(f"{r['rank']:>2}. {r['score']:+.4f}  {r['media_id']}  {where}")
        for cap in r["captions"][:max_captions]:
            lines.append(f"      - {cap if len(cap) <= width else cap[: width - 1] + '…'}")
        if len(r["captions"]) > max_captions:
            lines.append(f"      (+{len(r['captions']) - max_captions} more captions)")
    return "\n".join(lines)
