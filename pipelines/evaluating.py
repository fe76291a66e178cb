"""Evaluation glue: metric rows for the Lance `metrics` table and example queries for the report.

No Dagster here; assets/evaluate.py reads through resources and calls these.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from pipelines.lake import Lake, sql_in, table_name
from pipelines.registries import ExperimentSpec
from pipelines.training import SplitLatents

METRICS_SCHEMA = pa.schema(
    [
        ("experiment", pa.string()),
        ("family", pa.string()),
        ("variable", pa.string()),
        ("dataset", pa.string()),
        ("split", pa.string()),
        ("metric", pa.string()),
        ("value", pa.float64()),
        ("mlflow_run_id", pa.string()),
        ("inputs_hash", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("fingerprint_media", pa.string()),
        ("fingerprint_text", pa.string()),
    ]
)


def metric_rows(
    exp: ExperimentSpec, metrics: dict[str, float], run_id: str, key: str, fingerprints: tuple[str, str]
) -> pa.Table:
    """One row per metric of an evaluation on the test split."""
    n = len(metrics)
    now = datetime.now(UTC)
    return pa.table(
        {
            "experiment": [exp.name] * n,
            "family": [exp.family] * n,
            "variable": [exp.variable] * n,
            "dataset": [exp.dataset] * n,
            "split": ["test"] * n,
            "metric": list(metrics),
            "value": [float(v) for v in metrics.values()],
            "mlflow_run_id": [run_id] * n,
            "inputs_hash": [key] * n,
            "created_at": [now] * n,
            "fingerprint_media": [fingerprints[0]] * n,
            "fingerprint_text": [fingerprints[1]] * n,
        },
        schema=METRICS_SCHEMA,
    )


def texts_of(lake: Lake, dataset: str, ids: list[str]) -> dict[str, str]:
    """The text of each text item id."""
    if not ids:
        return {}
    rows = lake.read(table_name("media", dataset), ["media_id", "text"], sql_in("media_id", ids))
    return dict(zip(rows["media_id"].to_pylist(), rows["text"].to_pylist(), strict=True))


def query_examples(
    split: SplitLatents,
    item_emb: np.ndarray,
    text_emb: np.ndarray,
    texts: dict[str, str],
    n: int,
    k: int = 5,
    seed: int = 0,
) -> list[dict]:
    """`n` seeded text queries with their top-k items, for people to see what the numbers mean.

    item_emb [n_items, d], text_emb [n_texts, d]. Items are shown by their first caption (an image or a
    sound has no text of its own); `hit` marks every item paired with the query.
    """
    item_caption: dict[int, str] = {}
    for i, t in zip(split.pair_items, split.pair_texts, strict=True):
        item_caption.setdefault(int(i), texts.get(split.text_ids[t], ""))
    relevant = {(int(i), int(t)) for i, t in zip(split.pair_items, split.pair_texts, strict=True)}
    queries = sorted({int(t) for t in split.pair_texts})
    rng = np.random.default_rng(seed)
    out = []
    for q in rng.choice(queries, size=min(n, len(queries)), replace=False):
        scores = item_emb @ text_emb[q]
        top = np.argsort(-scores)[:k]
        out.append(
            {
                "query": texts.get(split.text_ids[q], split.text_ids[q]),
                "results": [
                    {
                        "item": item_caption.get(int(j), split.item_ids[j]),
                        "score": float(scores[j]),
                        "hit": (int(j), int(q)) in relevant,
                    }
                    for j in top
                ],
            }
        )
    return out
