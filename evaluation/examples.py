"""Example queries for a report: a few seeded text queries with their top-ranked items.

They show people what the numbers mean; the metrics themselves are in `evaluation.retrieval`.
"""

from __future__ import annotations

import numpy as np

from evaluation.retrieval import PairedSplit


def query_examples(
    split: PairedSplit,
    item_emb: np.ndarray,
    text_emb: np.ndarray,
    texts: dict[str, str],
    n: int,
    k: int = 5,
    seed: int = 0,
) -> list[dict]:
    """`n` seeded text queries with their top-k items, as ``write_report(examples=...)`` takes them.

    item_emb [n_items, d] and text_emb [n_texts, d] are the split's embeddings (rows as split.item_ids
    and split.text_ids), scored by dot product; texts maps text ids to their text. The queries are
    `n` distinct texts that are in some pair, drawn with `seed` (fewer when there are fewer), each
    shown by its text (its id when `texts` lacks it). An image or a sound has no text of its own, so
    an item is shown by the text of its first pair in split's order ('' when `texts` lacks that one;
    its id when it is in no pair). Items are ranked by descending score; `hit` marks every item paired
    with the query. Returns
    ``[{"query": str, "results": [{"item": str, "score": float, "hit": bool}, ...k]}, ...]``.
    Raises ValueError when the embeddings do not match the split, n < 0 or k < 1.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    for name, emb, ids in (("item_emb", item_emb, split.item_ids), ("text_emb", text_emb, split.text_ids)):
        if np.ndim(emb) != 2 or len(emb) != len(ids):
            raise ValueError(
                f"{name} must be [{len(ids)}, d] (one row per id of the split), got {np.shape(emb)}"
            )
    if np.shape(item_emb)[1] != np.shape(text_emb)[1]:
        raise ValueError(f"embedding dimensions differ: {np.shape(item_emb)} and {np.shape(text_emb)}")

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
