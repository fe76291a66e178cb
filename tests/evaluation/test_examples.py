"""Tests of evaluation.examples.query_examples: fixed sampling, ranking, hits and labels."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.examples import query_examples
from evaluation.retrieval import PairedSplit, paired_ids


def _circle(angles: list[float]) -> np.ndarray:
    a = np.asarray(angles)
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


def _small_split() -> tuple[PairedSplit, np.ndarray, np.ndarray, dict[str, str]]:
    # "smile" names three items (m0, m1, m2); m1 also has "happy face"; "sun" has no text.
    media = ["m0", "m1", "m2", "m3", "m4", "m5", "m1", "m6"]
    captions = ["smile", "smile", "smile", "cat", "dog", "rain", "happy face", "sun"]
    item_ids, text_ids, pi, pt = paired_ids(media, captions)
    split = PairedSplit(item_ids, text_ids, np.zeros((7, 3)), np.zeros((6, 3)), pi, pt)
    item_emb = _circle([0.0, 0.11, 0.2, 1.2, 2.0, 2.8, 4.0])
    text_emb = _circle([0.12, 1.1, 2.1, 2.6, 0.05, 4.2])
    texts = {t: f"the text {t}" for t in text_ids if t != "sun"}
    return split, item_emb, text_emb, texts


def _short(examples: list[dict]) -> list:
    return [
        [e["query"], [(r["item"], round(r["score"], 4), r["hit"]) for r in e["results"]]] for e in examples
    ]


def test_same_queries_and_results_as_the_pipeline_gave():
    # Recorded from the pipeline's own query_examples (pipelines/evaluating.py) before it moved here:
    # the demo's reports must show the same examples.
    split, item_emb, text_emb, texts = _small_split()
    assert _short(query_examples(split, item_emb, text_emb, texts, 3, k=3, seed=0)) == [
        [
            "the text happy face",
            [
                ("the text smile", 0.9988, False),
                ("the text smile", 0.9982, True),
                ("the text smile", 0.9888, False),
            ],
        ],
        ["sun", [("", 0.9801, True), ("the text rain", 0.17, False), ("the text smile", -0.4903, False)]],
        [
            "the text rain",
            [("the text rain", 0.9801, True), ("the text dog", 0.8253, False), ("the text cat", 0.17, False)],
        ],
    ]


def test_examples_are_seeded_ranked_and_mark_every_paired_item():
    rng = np.random.default_rng(0)
    media = [f"m{i}" for i in rng.integers(0, 40, 120)]
    captions = [f"c{i}" for i in rng.integers(0, 50, 120)]
    item_ids, text_ids, pi, pt = paired_ids(media, captions)
    item_emb = rng.normal(size=(len(item_ids), 6)).astype(np.float32)
    text_emb = rng.normal(size=(len(text_ids), 6)).astype(np.float32)
    split = PairedSplit(item_ids, text_ids, item_emb, text_emb, pi, pt)
    texts = {t: f"caption {t}" for t in text_ids}
    pairs = set(zip(pi.tolist(), pt.tolist(), strict=True))

    a = query_examples(split, item_emb, text_emb, texts, 6, k=4, seed=3)
    assert a == query_examples(split, item_emb, text_emb, texts, 6, k=4, seed=3)
    assert [e["query"] for e in a] != [
        e["query"] for e in query_examples(split, item_emb, text_emb, texts, 6, seed=4)
    ]
    assert len({e["query"] for e in a}) == 6
    for e in a:
        q = text_ids.index(e["query"].removeprefix("caption "))
        scores = item_emb @ text_emb[q]
        top = np.argsort(-scores)[:4]
        assert [r["score"] for r in e["results"]] == pytest.approx(scores[top].tolist())
        assert [r["hit"] for r in e["results"]] == [(int(j), q) in pairs for j in top]
    # More than there are queries: every text in a pair once, each with all items when k is large.
    every = query_examples(split, item_emb, text_emb, texts, 10_000, k=1000)
    assert len(every) == len(set(pt.tolist()))
    assert all(len(e["results"]) == len(item_ids) for e in every)
    assert all(sum(r["hit"] for r in e["results"]) >= 1 for e in every)
    assert query_examples(split, item_emb, text_emb, texts, 0) == []


def test_bad_arguments_are_clear_errors():
    split, item_emb, text_emb, texts = _small_split()
    with pytest.raises(ValueError, match="item_emb must be \\[7, d\\]"):
        query_examples(split, item_emb[:3], text_emb, texts, 2)
    with pytest.raises(ValueError, match="dimensions differ"):
        query_examples(split, item_emb, np.zeros((6, 5)), texts, 2)
    with pytest.raises(ValueError, match="k must be"):
        query_examples(split, item_emb, text_emb, texts, 2, k=0)
    with pytest.raises(ValueError, match="n must be"):
        query_examples(split, item_emb, text_emb, texts, -1)
