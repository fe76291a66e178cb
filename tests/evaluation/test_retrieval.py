"""Retrieval metrics over positive pairs: the chunked computation against the full-matrix reference,
multi-match pairs, ties, hubness corrections, per-group galleries, chance levels, splits, model
evaluation and bad input.

Most data is quantised to a dyadic grid with small integer numerators, so every dot product is exact in
float32 and float64 alike: the chunked and the naive paths see identical scores, ties included.
"""

import itertools
import math

import numpy as np
import pytest
import torch

from evaluation import retrieval
from evaluation.report import groups_table_markdown
from evaluation.retrieval import (
    PairedSplit,
    RetrievalResult,
    chance_levels,
    chance_levels_by_group,
    chance_recall,
    evaluate_model,
    evaluate_model_by_group,
    mean_chance_over_groups,
    mean_over_groups,
    naive_retrieval,
    paired_ids,
    retrieval_by_group,
    retrieval_metrics,
)
from fusion.adapters import Adapter, EncoderRef, FusedModel
from fusion.config import AdapterConfig


def quantised(rng: np.random.Generator, shape: tuple[int, int], levels: int) -> np.ndarray:
    """Values k / levels with |k| <= 2 * levels: exact products and sums at the sizes used here."""
    return (np.clip(np.round(rng.normal(size=shape) * levels), -2 * levels, 2 * levels) / levels).astype(
        np.float32
    )


def pair_data(
    seed: int, n_items: int, n_texts: int, d: int, levels: int, max_items: int = 3
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Multi-match pairs: each text describes 1..max_items items (some texts and items are in no pair),
    lies near its first item, and a few pairs are listed twice; pairs in shuffled order."""
    rng = np.random.default_rng(seed)
    items = quantised(rng, (n_items, d), levels)
    per_text = rng.integers(1, max_items + 1, size=n_texts)
    if n_texts > 2:
        per_text[rng.choice(n_texts, size=max(1, n_texts // 10), replace=False)] = 0
    pt = np.repeat(np.arange(n_texts), per_text)
    pi = rng.integers(0, max(1, n_items - n_items // 10), size=pt.size)  # the last tenth: distractors
    first = np.zeros(n_texts, dtype=np.int64)
    first[pt[::-1]] = pi[::-1]
    texts = items[first] + quantised(rng, (n_texts, d), levels)
    twice = rng.choice(pt.size, size=pt.size // 8, replace=False)
    pi, pt = np.concatenate([pi, pi[twice]]), np.concatenate([pt, pt[twice]])
    order = rng.permutation(pi.size)
    return items, texts, pi[order], pt[order]


def assert_same(a: RetrievalResult, b: RetrievalResult) -> None:
    np.testing.assert_array_equal(a.t2i_ranks, b.t2i_ranks)
    np.testing.assert_array_equal(a.i2t_ranks, b.i2t_ranks)
    np.testing.assert_array_equal(a.t2i_query_texts, b.t2i_query_texts)
    np.testing.assert_array_equal(a.i2t_query_items, b.i2t_query_items)
    assert a == b


def brute_force_ranks(items, texts, pi, pt) -> tuple[np.ndarray, np.ndarray]:
    """Best-correct rank per query with ties against the query, straight from the definition."""
    s = texts.astype(np.float64) @ items.T.astype(np.float64)
    rel = np.zeros(s.shape, dtype=bool)
    rel[pt, pi] = True

    def ranks(scores, relevant):
        return np.array(
            [
                1 + int(((scores[q] >= scores[q][relevant[q]].max()) & ~relevant[q]).sum())
                for q in range(len(scores))
                if relevant[q].any()
            ]
        )

    return ranks(s, rel), ranks(s.T, rel.T)


def test_hand_computed_example():
    # Scores (text rows x item columns):       i0    i1    i2
    #   t0 (1, 0)   caption of i0               1     0     0.5    -> i0 rank 1
    #   t1 (0, 1)   caption of i0               0     1     0.5    -> i0 rank 3
    #   t2 (.5,.5)  caption of i1               .5    .5    .5     -> three-way tie: rank 3 (pessimistic)
    #   t3 (1, .5)  caption of i2               1     .5    .75    -> i2 rank 2
    # item->text, best correct caption vs incorrect captions scoring >= it:
    #   i0: best t0 = 1, t3 ties at 1 -> rank 2;  i1: t2 = .5, t1 (1) and t3 (.5) -> rank 3;
    #   i2: t3 = .75, nothing else as high -> rank 1
    items = np.array([[1, 0], [0, 1], [0.5, 0.5]], dtype=np.float32)
    texts = np.array([[1, 0], [0, 1], [0.5, 0.5], [1, 0.5]], dtype=np.float32)
    owner, arange = np.array([0, 0, 1, 2]), np.arange(4)
    expected = {
        "t2i_recall_at_1": 0.25,
        "t2i_recall_at_2": 0.5,
        "t2i_recall_at_3": 1.0,
        "i2t_recall_at_1": 1 / 3,
        "i2t_recall_at_2": 2 / 3,
        "i2t_recall_at_3": 1.0,
        "t2i_mean_rank": 2.25,
        "t2i_median_rank": 2.5,
        "i2t_mean_rank": 2.0,
        "i2t_median_rank": 2.0,
    }
    for result in (
        retrieval_metrics(items, texts, owner, arange, ks=(1, 2, 3), chunk_size=1),
        retrieval_metrics(items, texts, owner, arange, ks=(3, 1, 2), chunk_size=3, candidate_chunk_size=2),
        naive_retrieval(items, texts, owner, arange, ks=(1, 2, 3)),
    ):
        np.testing.assert_array_equal(result.t2i_ranks, [1, 3, 3, 2])
        np.testing.assert_array_equal(result.i2t_ranks, [2, 3, 1])
        got = result.as_dict()
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            assert got[name] == pytest.approx(value), name


def test_a_shared_name_is_a_hit_on_any_of_its_items():
    # Three styles of one emoji share the caption t0; it is closest to the second style, i1.
    items = np.array([[1.0, 0.1], [1.0, 0.0], [0.9, 0.2], [0.0, 1.0]])
    texts = np.array([[1.0, 0.0], [0.0, 1.0]])
    r = retrieval_metrics(items, texts, [0, 1, 2, 3], [0, 0, 0, 1])
    assert r.t2i_recall[1] == 1.0 and r.i2t_recall[1] == 1.0
    # As one caption per item (t0 owned by i0 alone) the same caption misses at 1: i1 ties with i0.
    single = retrieval_metrics(items, texts, [0, 3], [0, 1])
    np.testing.assert_array_equal(single.t2i_ranks, [2, 1])


@pytest.mark.parametrize(
    ("n_items", "n_texts", "d", "chunk_size", "candidate_chunk_size", "seed"),
    [
        (40, 70, 8, 7, None, 0),
        (97, 60, 16, 32, 13, 1),
        (61, 150, 4, 5, 9, 2),
        (150, 90, 32, 256, None, 3),
        (1, 5, 8, 3, None, 4),
        (30, 1, 4, 2, 4, 5),
    ],
)
def test_chunked_matches_naive_with_multi_match_pairs(
    n_items, n_texts, d, chunk_size, candidate_chunk_size, seed
):
    items, texts, pi, pt = pair_data(seed, n_items, n_texts, d, levels=4)
    chunked = retrieval_metrics(
        items, texts, pi, pt, chunk_size=chunk_size, candidate_chunk_size=candidate_chunk_size
    )
    naive = naive_retrieval(items, texts, pi, pt)
    assert_same(chunked, naive)
    t2i, i2t = brute_force_ranks(items, texts, pi, pt)
    np.testing.assert_array_equal(chunked.t2i_ranks, t2i)
    np.testing.assert_array_equal(chunked.i2t_ranks, i2t)
    assert (chunked.n_items, chunked.n_texts) == (n_items, n_texts)
    np.testing.assert_array_equal(chunked.t2i_query_texts, np.unique(pt))
    np.testing.assert_array_equal(chunked.i2t_query_items, np.unique(pi))
    assert (chunked.n_t2i_queries, chunked.n_i2t_queries) == (np.unique(pt).size, np.unique(pi).size)


def test_candidate_chunking_does_not_change_ranks():
    items, texts, pi, pt = pair_data(11, 120, 100, 16, levels=8)
    whole = retrieval_metrics(items, texts, pi, pt, chunk_size=50)
    for step in (1, 7, 99, 120, 500):
        assert_same(retrieval_metrics(items, texts, pi, pt, chunk_size=33, candidate_chunk_size=step), whole)


@pytest.mark.parametrize("count_slice", [1, 5, 1000])
def test_counting_in_column_slices_matches_naive(monkeypatch, count_slice):
    # The real slice (1M elements) never splits a block at test sizes; a tiny one splits every block,
    # including into single columns when a chunk has more rows than the slice has elements.
    monkeypatch.setattr(retrieval, "_COUNT_SLICE", count_slice)
    items, texts, pi, pt = pair_data(13, 45, 60, 8, levels=2)
    naive = naive_retrieval(items, texts, pi, pt)
    assert_same(retrieval_metrics(items, texts, pi, pt, chunk_size=9), naive)
    assert_same(retrieval_metrics(items, texts, pi, pt, chunk_size=16, candidate_chunk_size=10), naive)


def test_exact_ties_are_pessimistic_and_match_naive():
    # Three levels per coordinate in d=3: many items and captions score exactly alike.
    items, texts, pi, pt = pair_data(7, 80, 150, 3, levels=1, max_items=1)
    chunked = retrieval_metrics(items, texts, pi, pt, chunk_size=9, candidate_chunk_size=31)
    assert_same(chunked, naive_retrieval(items, texts, pi, pt))

    owner = np.full(len(texts), -1)
    owner[pt] = pi
    queries = np.flatnonzero(owner >= 0)
    scores = texts[queries].astype(np.float64) @ items.T.astype(np.float64)
    correct = scores[np.arange(queries.size), owner[queries]]
    optimistic = 1 + (scores > correct[:, None]).sum(axis=1)
    pessimistic = (scores >= correct[:, None]).sum(axis=1)
    np.testing.assert_array_equal(chunked.t2i_ranks, pessimistic)
    # The data must actually contain ties for this test to mean anything.
    assert (pessimistic > optimistic).sum() > 10


def test_collapsed_embeddings_get_the_worst_rank():
    # A model that maps everything to one point must not score: every candidate ties with the correct one.
    items = np.ones((20, 4), dtype=np.float32)
    texts = np.ones((30, 4), dtype=np.float32)
    result = retrieval_metrics(items, texts, np.arange(30) % 20, np.arange(30), normalize=True)
    assert result.t2i_recall[1] == 0.0
    assert result.t2i_mean_rank == 20.0
    # Item i has 2 captions (i < 10) or 1; all 30 captions tie, so the best rank is 30 - n_captions + 1.
    np.testing.assert_array_equal(result.i2t_ranks, np.where(np.arange(20) < 10, 29, 30))


def test_perfect_embeddings_give_recall_one_and_rank_one():
    rng = np.random.default_rng(3)
    basis, _ = np.linalg.qr(rng.normal(size=(64, 64)))
    items = basis[:50].astype(np.float32)  # orthonormal rows
    owner = np.concatenate([np.arange(50), rng.integers(0, 50, size=70)])
    texts = items[owner]
    result = retrieval_metrics(items, texts, owner, np.arange(120), ks=(1, 5), chunk_size=16)
    assert result.t2i_recall == {1: 1.0, 5: 1.0}
    assert result.i2t_recall == {1: 1.0, 5: 1.0}
    assert (result.t2i_mean_rank, result.t2i_median_rank) == (1.0, 1.0)
    assert (result.i2t_mean_rank, result.i2t_median_rank) == (1.0, 1.0)


def test_continuous_normalised_data_matches_naive():
    rng = np.random.default_rng(5)
    items = rng.normal(size=(60, 24))
    owner = rng.integers(0, 60, size=150)
    texts = items[owner] + 1.5 * rng.normal(size=(150, 24))
    chunked = retrieval_metrics(items, texts, owner, np.arange(150), normalize=True, chunk_size=17)
    assert_same(chunked, naive_retrieval(items, texts, owner, np.arange(150), normalize=True))
    # Noisy but informative captions: clearly above chance, clearly below perfect.
    assert chance_recall(60, 5) * 2 < chunked.t2i_recall[5] < 1.0


def test_unpaired_items_and_texts_are_distractors_not_queries():
    items = np.array([[1, 0], [0, 1], [1, 0]], dtype=np.float32)  # item 2 duplicates item 0, no pair
    texts = np.array([[1, 0], [0, 1], [0, 1]], dtype=np.float32)  # text 2 duplicates text 1, no pair
    result = retrieval_metrics(items, texts, [0, 1], [0, 1])
    np.testing.assert_array_equal(result.t2i_query_texts, [0, 1])
    np.testing.assert_array_equal(result.i2t_query_items, [0, 1])
    assert (result.n_t2i_queries, result.n_i2t_queries, result.n_items, result.n_texts) == (2, 2, 3, 3)
    np.testing.assert_array_equal(result.t2i_ranks, [2, 1])  # the unpaired twin ties with item 0
    np.testing.assert_array_equal(result.i2t_ranks, [1, 2])  # and the unpaired text with text 1


def test_torch_numpy_and_list_inputs_agree():
    items, texts, pi, pt = pair_data(9, 70, 50, 8, levels=16)
    from_numpy = retrieval_metrics(items, texts, pi, pt, chunk_size=20)
    items_t = torch.from_numpy(items).double().requires_grad_(True)
    from_torch = retrieval_metrics(
        items_t, torch.from_numpy(texts), torch.from_numpy(pi), torch.from_numpy(pt), chunk_size=20
    )
    assert_same(from_numpy, from_torch)
    assert_same(from_numpy, retrieval_metrics(items, texts, pi.tolist(), pt.tolist(), chunk_size=64))


def test_normalize_flag_equals_prenormalised_input():
    rng = np.random.default_rng(2)
    items = rng.normal(size=(30, 6)).astype(np.float32)
    owner = rng.integers(0, 30, size=45)
    texts = (items[owner] + rng.normal(size=(45, 6))).astype(np.float32)
    scaled = retrieval_metrics(items * 3.0, texts * 0.25, owner, np.arange(45), normalize=True)
    unit_items = torch.nn.functional.normalize(torch.from_numpy(items), dim=1)
    unit_texts = torch.nn.functional.normalize(torch.from_numpy(texts), dim=1)
    # Same ranking up to float rounding; the seeded data has no near-ties at that scale.
    assert_same(scaled, retrieval_metrics(unit_items, unit_texts, owner, np.arange(45)))


def test_as_dict_names():
    items, texts, pi, pt = pair_data(4, 20, 20, 4, levels=8)
    result = retrieval_metrics(items, texts, pi, pt, ks=(10, 1, 5, 5))
    assert result.ks == (1, 5, 10)
    names = result.as_dict()
    assert list(names) == [
        "t2i_recall_at_1",
        "t2i_recall_at_5",
        "t2i_recall_at_10",
        "i2t_recall_at_1",
        "i2t_recall_at_5",
        "i2t_recall_at_10",
        "t2i_mean_rank",
        "t2i_median_rank",
        "i2t_mean_rank",
        "i2t_median_rank",
    ]
    renamed = result.as_dict("test_", directions=("t2a", "a2t"))
    assert renamed["test_a2t_recall_at_5"] == names["i2t_recall_at_5"]
    assert renamed["test_t2a_median_rank"] == names["t2i_median_rank"]
    assert not any("@" in name for name in renamed)
    with pytest.raises(ValueError, match="directions"):
        result.as_dict(directions=("t2a",))


# ----------------------------------------------------------------------------------------------- chance


def test_chance_recall_closed_form():
    assert chance_recall(100, 1) == pytest.approx(0.01)
    assert chance_recall(100, 10) == pytest.approx(0.1)
    assert chance_recall(5, 10) == 1.0
    assert chance_recall(20, 4, n_correct=3) == pytest.approx(1 - math.comb(17, 4) / math.comb(20, 4))
    # Only 7 incorrect ones: a correct one must be in the top 8.
    assert chance_recall(10, 8, n_correct=3) == 1.0
    assert 0.0 < chance_recall(100_000, 10) < 1.1e-4


@pytest.mark.parametrize(("n", "k", "m"), [(50, 5, 1), (30, 3, 4)])
def test_chance_recall_matches_monte_carlo(n, k, m):
    rng = np.random.default_rng(n * 100 + k * 10 + m)
    trials = 20_000
    # A random ranking: the positions of the m correct candidates are a random m-subset of n.
    positions = np.argsort(rng.random((trials, n)), axis=1)[:, :m]
    hits = (positions.min(axis=1) < k).mean()
    p = chance_recall(n, k, n_correct=m)
    assert abs(hits - p) < 4 * math.sqrt(p * (1 - p) / trials) + 1e-9


def test_chance_levels_match_enumerating_every_ranking():
    # 4 items, 5 texts: text 0 names items 0-2, text 1 item 0 (listed twice), text 3 items 1 and 3,
    # text 4 item 3; text 2 is in no pair (a t2i non-query, an i2t distractor).
    pi = np.array([0, 1, 2, 0, 0, 1, 3, 3])
    pt = np.array([0, 0, 0, 1, 1, 3, 3, 4])
    n_items, n_texts, ks = 4, 5, (1, 2, 3, 6)
    relevant = {(int(i), int(t)) for i, t in zip(pi, pt, strict=True)}

    def enumerated(n_candidates: int, correct: set[int], k: int) -> float:
        orders = list(itertools.permutations(range(n_candidates)))
        return sum(bool(correct & set(o[:k])) for o in orders) / len(orders)

    expected = {"t2i": {}, "i2t": {}}
    for k in ks:
        t2i = [enumerated(n_items, {i for i, t in relevant if t == q}, k) for q in sorted(set(pt.tolist()))]
        i2t = [enumerated(n_texts, {t for i, t in relevant if i == q}, k) for q in sorted(set(pi.tolist()))]
        expected["t2i"][k], expected["i2t"][k] = float(np.mean(t2i)), float(np.mean(i2t))
    got = chance_levels(pi, pt, n_items, n_texts, ks)
    assert list(got) == ["t2i", "i2t"]
    for direction in ("t2i", "i2t"):
        assert list(got[direction]) == list(ks)
        for k in ks:
            assert got[direction][k] == pytest.approx(expected[direction][k], rel=1e-12, abs=1e-15)
    # One correct item per text: min(K, n) / n exactly.
    assert chance_levels(np.arange(4), np.arange(4), 10, 4, (1, 5))["t2i"] == pytest.approx({1: 0.1, 5: 0.5})


def test_random_embeddings_recall_is_near_chance_levels():
    rng = np.random.default_rng(8)
    items = rng.normal(size=(100, 32))
    texts = rng.normal(size=(3000, 32))
    owner = rng.integers(0, 100, size=3000)
    result = retrieval_metrics(items, texts, owner, np.arange(3000), normalize=True, chunk_size=512)
    p = chance_levels(owner, np.arange(3000), 100, 3000, result.ks)["t2i"][10]
    assert p == pytest.approx(0.1)
    # Rank is uniform on 1..100 for unrelated embeddings: recall@10 ~ 0.1 and mean rank ~ 50.5.
    assert abs(result.t2i_recall[10] - p) < 4 * math.sqrt(p * (1 - p) / 3000)
    assert abs(result.t2i_mean_rank - 50.5) < 3.0


def test_chance_inputs_are_checked():
    for args in ((0, 1), (5, 0), (5, 1, 0), (5, 1, 6)):
        with pytest.raises(ValueError):
            chance_recall(*args)
    with pytest.raises(ValueError, match="pair_items\\[1\\] = 4 is out of range for 4 items"):
        chance_levels([0, 4], [0, 1], 4, 2, (1,))
    with pytest.raises(ValueError, match="n_texts must be an integer >= 1"):
        chance_levels([0], [0], 4, 0, (1,))
    with pytest.raises(ValueError, match="ks"):
        chance_levels([0], [0], 4, 1, ())
    with pytest.raises(ValueError, match="no pairs"):
        chance_levels([], [], 4, 1)


# ----------------------------------------------------------------------------------------------- splits


def test_paired_ids_merge_repeats_in_first_seen_order():
    media = ["m2", "m1", "m2", "m3", "m1", "m2"]
    captions = ["dog", "cat", "dog", "cat", "dog", "fish"]
    item_ids, text_ids, pi, pt = paired_ids(media, captions)
    assert item_ids == ["m2", "m1", "m3"]
    assert text_ids == ["dog", "cat", "fish"]
    # Distinct (item, text) pairs, sorted: (m2, dog) once although listed twice, and "cat" with two items.
    assert list(zip(pi.tolist(), pt.tolist(), strict=True)) == [(0, 0), (0, 2), (1, 0), (1, 1), (2, 1)]
    assert pi.dtype == np.int64 and pt.dtype == np.int64
    empty = paired_ids([], [])
    assert empty[:2] == ([], []) and empty[2].shape == (0,) and empty[2].dtype == np.int64
    with pytest.raises(ValueError, match="row-aligned"):
        paired_ids(["m1"], [])


def test_paired_split_checks_its_shapes():
    item_ids, text_ids, pi, pt = paired_ids(["a", "b"], ["x", "x"])
    ok = PairedSplit(item_ids, text_ids, np.zeros((2, 3)), np.zeros((1, 5)), pi, pt)
    assert ok.items.shape == (2, 3) and ok.texts.shape == (1, 5)
    with pytest.raises(ValueError, match="items must be \\[2, d\\]"):
        PairedSplit(item_ids, text_ids, np.zeros((3, 3)), np.zeros((1, 5)), pi, pt)
    with pytest.raises(ValueError, match="texts must be \\[1, d\\]"):
        PairedSplit(item_ids, text_ids, np.zeros((2, 3)), np.zeros(5), pi, pt)
    with pytest.raises(ValueError, match="pair_texts\\[0\\] = 1 is out of range for 1 texts"):
        PairedSplit(item_ids, text_ids, np.zeros((2, 3)), np.zeros((1, 5)), pi, pt + 1)


def _tiny_model(d_image: int, d_text: int) -> FusedModel:
    torch.manual_seed(0)
    cfg = AdapterConfig(depth=1, expansion=2, dropout=0.0, output_dim=8)
    return FusedModel(
        {"image": Adapter(d_image, cfg), "text": Adapter(d_text, cfg)},
        {"image": EncoderRef("img", "fp-i", d_image), "text": EncoderRef("txt", "fp-t", d_text)},
    )


def test_evaluate_model_embeds_both_sides_and_scores_the_pairs():
    rng = np.random.default_rng(0)
    media = [f"m{i}" for i in rng.integers(0, 25, 60)]
    captions = [f"c{i}" for i in rng.integers(0, 30, 60)]
    item_ids, text_ids, pi, pt = paired_ids(media, captions)
    split = PairedSplit(
        item_ids,
        text_ids,
        rng.normal(size=(len(item_ids), 12)).astype(np.float32),
        rng.normal(size=(len(text_ids), 7)).astype(np.float32),
        pi,
        pt,
    )
    model = _tiny_model(12, 7)
    result, item_emb, text_emb = evaluate_model(model, split)
    assert isinstance(item_emb, np.ndarray) and item_emb.shape == (len(item_ids), 8)
    assert isinstance(text_emb, np.ndarray) and text_emb.shape == (len(text_ids), 8)
    np.testing.assert_allclose(np.linalg.norm(item_emb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(item_emb, model.embed("image", split.items).numpy())
    assert_same(result, retrieval_metrics(item_emb, text_emb, pi, pt))
    assert result.n_items == len(item_ids) and result.n_texts == len(text_ids)

    class Identity:
        """A baseline without adapters: both sides already share a space; returns numpy."""

        sides = ("audio", "text")

        def embed(self, side: str, x: np.ndarray) -> np.ndarray:
            return np.asarray(x)[:, :5]

    base, item_raw, _ = evaluate_model(Identity(), split)
    np.testing.assert_array_equal(item_raw, split.items[:, :5])
    assert_same(base, retrieval_metrics(split.items[:, :5], split.texts[:, :5], pi, pt))

    # Options reach retrieval_metrics; the per-group sibling scores the same embeddings both ways.
    csls, _, _ = evaluate_model(model, split, hubness="csls", chunk_size=7)
    assert_same(csls, retrieval_metrics(item_emb, text_emb, pi, pt, hubness="csls"))
    groups = ["odd" if i % 2 else "even" for i in range(len(item_ids))]
    pooled, by_group, item_emb2, text_emb2 = evaluate_model_by_group(model, split, groups, hubness="csls")
    np.testing.assert_array_equal(item_emb2, item_emb)
    np.testing.assert_array_equal(text_emb2, text_emb)
    assert_same(pooled, csls)
    expected = retrieval_by_group(item_emb, text_emb, pi, pt, groups, hubness="csls")
    assert list(by_group) == ["even", "odd"]
    for name in by_group:
        assert_same(by_group[name], expected[name])


# ----------------------------------------------------------------------------------------------- hubness


def unit_sign_data(seed: int, n_items: int, n_texts: int):
    """pair_data's pairs with exact unit vectors of 16 entries +-1/4 (dot products: multiples of 1/8);
    each text is its first item with 4 signs flipped."""
    _, _, pi, pt = pair_data(seed, n_items, n_texts, 2, levels=1)
    rng = np.random.default_rng(seed)
    items = rng.choice(np.array([-0.25, 0.25], dtype=np.float32), size=(n_items, 16))
    first = np.zeros(n_texts, dtype=np.int64)
    first[pt[::-1]] = pi[::-1]
    texts = items[first].copy()
    for row in texts:
        row[rng.choice(16, size=4, replace=False)] *= -1
    return items, texts, pi, pt


def with_twins(items, texts, pi, pt, n_twins: int, seed: int):
    """Append unpaired exact copies of some paired items and texts: each copy ties with its original in
    every score, corrected or not, so the queries of those originals lose a rank to the tie rule."""
    rng = np.random.default_rng(seed)
    item_twins = rng.choice(np.unique(pi), size=n_twins, replace=False)
    text_twins = rng.choice(np.unique(pt), size=n_twins, replace=False)
    return np.concatenate([items, items[item_twins]]), np.concatenate([texts, texts[text_twins]])


@pytest.mark.parametrize(
    ("hubness", "options", "chunk_size", "candidate_chunk_size", "seed"),
    [
        ("csls", {"hubness_k": 4}, 7, None, 0),
        ("csls", {"hubness_k": 2}, 16, 9, 1),
        ("csls", {"hubness_k": 1}, 5, 3, 2),
        ("csls", {"hubness_k": 8}, 256, 4, 3),
        ("inverted_softmax", {}, 7, None, 0),
        ("inverted_softmax", {"hubness_beta": 5.0}, 11, 6, 1),
        ("inverted_softmax", {"hubness_beta": 12.0}, 4, 17, 2),
        ("inverted_softmax", {"hubness_beta": 30}, 9, 20, 3),
    ],
)
def test_hubness_chunked_matches_naive_with_ties(hubness, options, chunk_size, candidate_chunk_size, seed):
    # Dyadic data: the CSLS terms (means of 1, 2, 4 or 8 dyadic products) are exact in both paths. The
    # inverted softmax's logsumexp is not, so it gets exact unit vectors (its scale: b * cosine), and only
    # the copies tie exactly, in both paths alike.
    if hubness == "csls":
        items, texts, pi, pt = pair_data(seed, 60, 70, 6, levels=2)
    else:
        items, texts, pi, pt = unit_sign_data(seed, 60, 70)
    items, texts = with_twins(items, texts, pi, pt, 8, seed)
    chunked = retrieval_metrics(
        items,
        texts,
        pi,
        pt,
        chunk_size=chunk_size,
        candidate_chunk_size=candidate_chunk_size,
        hubness=hubness,
        **options,
    )
    naive = naive_retrieval(items, texts, pi, pt, hubness=hubness, **options)
    assert_same(chunked, naive)
    # The correction changes the ranking (else this would test nothing new) ...
    plain = retrieval_metrics(items, texts, pi, pt)
    assert not np.array_equal(chunked.t2i_ranks, plain.t2i_ranks)
    # ... and the twins still tie: without them every twinned query ranks strictly better.
    n_i, n_t = len(items) - 8, len(texts) - 8
    alone = retrieval_metrics(items[:n_i], texts[:n_t], pi, pt, hubness=hubness, **options)
    assert (chunked.t2i_ranks > alone.t2i_ranks).sum() >= 8
    assert (chunked.i2t_ranks > alone.i2t_ranks).sum() >= 8


@pytest.mark.parametrize("hubness", ["csls", "inverted_softmax"])
def test_hubness_defaults_on_continuous_data_match_naive(hubness):
    # k = 10 and beta = 30, k larger than a small set (5 items: the mean of all 5), torch input.
    rng = np.random.default_rng(21)
    items = rng.normal(size=(90, 16))
    owner = rng.integers(0, 90, size=120)
    texts = items[owner] + 1.2 * rng.normal(size=(120, 16))
    args = (owner, np.arange(120))
    chunked = retrieval_metrics(
        torch.from_numpy(items), texts, *args, normalize=True, chunk_size=13, hubness=hubness
    )
    assert_same(chunked, naive_retrieval(items, texts, *args, normalize=True, hubness=hubness))
    split = retrieval_metrics(
        items, texts, *args, normalize=True, chunk_size=31, candidate_chunk_size=8, hubness=hubness
    )
    assert_same(split, chunked)
    small = retrieval_metrics(items[:5], texts[:7], [0, 1, 2, 3, 4, 0, 1], np.arange(7), hubness=hubness)
    assert_same(
        small, naive_retrieval(items[:5], texts[:7], [0, 1, 2, 3, 4, 0, 1], np.arange(7), hubness=hubness)
    )


def test_no_hubness_is_the_plain_ranking():
    items, texts, pi, pt = pair_data(6, 50, 40, 8, levels=4)
    assert_same(
        retrieval_metrics(items, texts, pi, pt, hubness=None), retrieval_metrics(items, texts, pi, pt)
    )
    assert_same(naive_retrieval(items, texts, pi, pt, hubness=None), retrieval_metrics(items, texts, pi, pt))


def hub_example() -> tuple[np.ndarray, np.ndarray]:
    """Four captions t_j = e_j; their items i_j = 0.45 e_j + 0.893 e_(4+j) (cosine 0.45 with t_j, 0 with
    the others); one unpaired hub h = (e_0 + e_1 + e_2 + e_3) / 2, at cosine 0.5 to EVERY caption."""
    texts = np.eye(8)[:4]
    items = np.zeros((5, 8))
    for j in range(4):
        items[j, j], items[j, 4 + j] = 0.45, math.sqrt(1 - 0.45**2)
    items[4, :4] = 0.5
    return items, texts


def test_csls_and_inverted_softmax_demote_a_hub():
    items, texts = hub_example()
    pairs = (np.arange(4), np.arange(4))
    plain = retrieval_metrics(items, texts, *pairs)
    # Plain cosine: the hub (0.5) outranks every caption's own item (0.45).
    np.testing.assert_array_equal(plain.t2i_ranks, [2, 2, 2, 2])
    assert plain.t2i_recall[1] == 0.0
    # CSLS with k = 2: r_hub = 0.5, r_item = (0.45 + 0) / 2, r_text = (0.5 + 0.45) / 2, so the own item
    # scores 0.9 - 0.225 - 0.475 = 0.2 and the hub 1.0 - 0.5 - 0.475 = 0.025.
    for options in (
        {"hubness": "csls", "hubness_k": 2},
        {"hubness": "csls"},
        {"hubness": "inverted_softmax"},
    ):
        fixed = retrieval_metrics(items, texts, *pairs, **options)
        np.testing.assert_array_equal(fixed.t2i_ranks, [1, 1, 1, 1])
        np.testing.assert_array_equal(fixed.i2t_ranks, [1, 1, 1, 1])
        assert_same(fixed, naive_retrieval(items, texts, *pairs, **options))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"hubness": "CSLS"}, "hubness must be None or one of"),
        ({"hubness": "knn"}, "hubness must be None or one of"),
        ({"hubness": "csls", "hubness_k": 0}, "hubness_k must be an integer >= 1"),
        ({"hubness": "csls", "hubness_k": 2.0}, "hubness_k must be an integer >= 1"),
        ({"hubness": "inverted_softmax", "hubness_beta": 0.0}, "hubness_beta must be a finite number > 0"),
        ({"hubness": "inverted_softmax", "hubness_beta": math.inf}, "hubness_beta must be a finite"),
    ],
)
def test_bad_hubness_options_are_value_errors(options, message):
    items, pairs = np.eye(3, dtype=np.float32), [0, 1, 2]
    for fn in (retrieval_metrics, naive_retrieval):
        with pytest.raises(ValueError, match=message):
            fn(items, items, pairs, pairs, **options)


# ----------------------------------------------------------------------------------------------- groups


def grouped_example():
    """Five items in groups a, a, b, b, c (c: one item, skipped); text t2 names an item of a and two of
    b. Item 2 (group b) is a copy of item 0 (group a): pooled, caption t0 ties with it; per group not."""
    items = np.array([[1, 0], [0, 1], [1, 0], [0.6, 0.8], [0, 1]])
    texts = np.array([[1, 0], [0, 1], [0.8, 0.6], [0, 1]])
    pi = np.array([0, 1, 1, 2, 3, 3, 4])
    pt = np.array([0, 1, 2, 2, 2, 3, 3])
    return items, texts, pi, pt, ["a", "a", "b", "b", "c"]


def test_group_galleries_by_hand():
    items, texts, pi, pt, groups = grouped_example()
    by_group = retrieval_by_group(items, texts, pi, pt, groups, ks=(1, 2))
    assert list(by_group) == ["a", "b"]
    a, b = by_group["a"], by_group["b"]
    # Group a: items 0, 1 against the texts paired with them, t0, t1, t2. t2 = (.8, .6) is paired with
    # item 1 (.6) but item 0 scores .8: rank 2. Item 2, the copy of item 0, is not in a's gallery.
    assert (a.n_items, a.n_texts) == (2, 3)
    np.testing.assert_array_equal(a.t2i_query_texts, [0, 1, 2])
    np.testing.assert_array_equal(a.t2i_ranks, [1, 1, 2])
    np.testing.assert_array_equal(a.i2t_query_items, [0, 1])
    np.testing.assert_array_equal(a.i2t_ranks, [1, 1])
    # Group b: items 2, 3 (global rows) and texts t2, t3; t2 names both and is nearest item 3 (.96).
    assert (b.n_items, b.n_texts) == (2, 2)
    np.testing.assert_array_equal(b.t2i_query_texts, [2, 3])
    np.testing.assert_array_equal(b.i2t_query_items, [2, 3])
    np.testing.assert_array_equal(b.t2i_ranks, [1, 1])
    np.testing.assert_array_equal(b.i2t_ranks, [1, 1])
    # Pooled, t0 ties with item 2 (a copy of its item from another group) and loses a rank.
    assert retrieval_metrics(items, texts, pi, pt).t2i_ranks[0] == 2

    # Each group weighs the same: t2i R@1 is (2/3 + 1) / 2, not 4/5 as over the five queries.
    mean = mean_over_groups(by_group)
    assert list(mean) == list(a.as_dict())
    assert mean["t2i_recall_at_1"] == pytest.approx(5 / 6)
    assert mean["t2i_mean_rank"] == pytest.approx((4 / 3 + 1) / 2)
    assert mean["i2t_recall_at_1"] == 1.0
    prefixed = mean_over_groups(by_group, prefix="group_", directions=("t2a", "a2t"))
    assert prefixed["group_t2a_recall_at_1"] == mean["t2i_recall_at_1"]


def test_group_chance_levels_by_hand():
    _, _, pi, pt, groups = grouped_example()
    chance = chance_levels_by_group(pi, pt, groups, ks=(1,))
    assert list(chance) == ["a", "b"]
    # a: 2 items; t0, t1, t2 each name one of them -> 1/2. Over its 3 texts: item 0 has 1 (1/3),
    # item 1 has 2 (1 - C(1, 1) / C(3, 1) = 2/3) -> 1/2.
    assert chance["a"] == {"t2i": {1: pytest.approx(0.5)}, "i2t": {1: pytest.approx(0.5)}}
    # b: t2 names both items (1), t3 one of 2 (1/2) -> 3/4; item 2 has 1 of 2 texts, item 3 both -> 3/4.
    assert chance["b"] == {"t2i": {1: pytest.approx(0.75)}, "i2t": {1: pytest.approx(0.75)}}
    assert mean_chance_over_groups(chance) == {
        "t2i": {1: pytest.approx(0.625)},
        "i2t": {1: pytest.approx(0.625)},
    }
    with pytest.raises(ValueError, match="no group chance levels"):
        mean_chance_over_groups({})
    with pytest.raises(ValueError, match="different directions or ks"):
        mean_chance_over_groups({"a": {"t2i": {1: 0.5}}, "b": {"t2i": {5: 0.5}}})


@pytest.mark.parametrize(
    ("options", "seed"),
    [
        ({}, 0),
        ({"chunk_size": 3, "candidate_chunk_size": 5}, 1),
        ({"hubness": "csls", "hubness_k": 2}, 2),
        ({"hubness": "inverted_softmax"}, 3),
    ],
)
def test_group_results_equal_retrieval_on_each_groups_sub_arrays(options, seed):
    items, texts, pi, pt = pair_data(seed, 80, 90, 6, levels=4)
    rng = np.random.default_rng(seed)
    groups = [str(g) for g in rng.choice(["noto", "twemoji", "openmoji"], size=80)]
    groups[7] = "lonely"  # one item: skipped
    groups[-4:] = ["unpaired"] * 4  # the last tenth of pair_data's items are in no pair: skipped
    by_group = retrieval_by_group(items, texts, pi, pt, groups, ks=(1, 3), **options)
    assert list(by_group) == ["noto", "openmoji", "twemoji"]
    names = np.array(groups)
    for name, result in by_group.items():
        members = np.flatnonzero(names == name)
        keep = np.isin(pi, members)
        own_texts = np.unique(pt[keep])
        local_pi = np.searchsorted(members, pi[keep])
        local_pt = np.searchsorted(own_texts, pt[keep])
        by_hand = retrieval_metrics(
            items[members], texts[own_texts], local_pi, local_pt, ks=(1, 3), **options
        )
        assert result == by_hand
        np.testing.assert_array_equal(result.t2i_ranks, by_hand.t2i_ranks)
        np.testing.assert_array_equal(result.i2t_ranks, by_hand.i2t_ranks)
        np.testing.assert_array_equal(result.t2i_query_texts, own_texts[by_hand.t2i_query_texts])
        np.testing.assert_array_equal(result.i2t_query_items, members[by_hand.i2t_query_items])
    expected = {m: np.mean([r.as_dict()[m] for r in by_group.values()]) for m in by_group["noto"].as_dict()}
    assert mean_over_groups(by_group) == pytest.approx(expected)
    # Chance per group: the same galleries.
    chance = chance_levels_by_group(pi, pt, groups, ks=(1, 3))
    assert list(chance) == list(by_group)
    for name, result in by_group.items():
        members = np.flatnonzero(names == name)
        keep = np.isin(pi, members)
        own_texts = np.unique(pt[keep])
        assert chance[name] == chance_levels(
            np.searchsorted(members, pi[keep]),
            np.searchsorted(own_texts, pt[keep]),
            result.n_items,
            result.n_texts,
            (1, 3),
        )


def test_group_input_is_checked():
    items, texts, pi, pt, groups = grouped_example()
    with pytest.raises(ValueError, match="item_groups has 4 entries for 5 items"):
        retrieval_by_group(items, texts, pi, pt, groups[:4])
    with pytest.raises(ValueError, match=r"item_groups\[2\] must be a group name"):
        retrieval_by_group(items, texts, pi, pt, ["a", "a", None, "b", "c"])
    with pytest.raises(ValueError, match="sequence of group names"):
        retrieval_by_group(items, texts, pi, pt, "aabbc")
    with pytest.raises(ValueError, match=r"pair_items\[6\] = 4 is out of range for 4 items"):
        chance_levels_by_group(pi, pt, groups[:4])
    # Every group too small: nothing to score, and nothing to average.
    assert retrieval_by_group(items, texts, pi, pt, ["a", "b", "c", "d", "e"]) == {}
    with pytest.raises(ValueError, match="no group results"):
        mean_over_groups({})
    one = retrieval_by_group(items, texts, pi, pt, groups)
    other_ks = retrieval_by_group(items, texts, pi, pt, groups, ks=(1,))
    with pytest.raises(ValueError, match="different ks"):
        mean_over_groups({"a": one["a"], "b": other_ks["b"]})


def test_group_results_render_as_a_report_table():
    items, texts, pi, pt, groups = grouped_example()
    by_group = retrieval_by_group(items, texts, pi, pt, groups, ks=(1, 2))
    md = groups_table_markdown({name: r.as_dict() for name, r in by_group.items()})
    lines = md.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["group", "direction", "R@1 (%)", "R@2 (%)", "mean rank", "median rank"]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert body == [
        ["a", "t2i", "66.7", "100.0", "1.3", "1.0"],
        ["a", "i2t", "100.0", "100.0", "1.0", "1.0"],
        ["b", "t2i", "100.0", "100.0", "1.0", "1.0"],
        ["b", "i2t", "100.0", "100.0", "1.0", "1.0"],
    ]
    with pytest.raises(ValueError, match="no retrieval metrics"):
        groups_table_markdown({"a": {"val_loss": 1.0}})
    with pytest.raises(ValueError, match="non-empty dict"):
        groups_table_markdown({})


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("items", "texts", "pi", "pt", "message"),
    [
        (np.zeros((3, 4)), np.zeros((2, 5)), [0, 1], [0, 1], "dimensions differ"),
        (np.zeros((3, 4)), np.zeros((2, 4)), [0, 1, 2], [0, 1], "equally long, got 3 and 2"),
        (
            np.zeros((3, 4)),
            np.zeros((2, 4)),
            [0, 3],
            [0, 1],
            r"pair_items\[1\] = 3 is out of range for 3 items",
        ),
        (np.zeros((3, 4)), np.zeros((2, 4)), [-1, 0], [0, 1], r"pair_items\[0\] = -1 is out of range"),
        (
            np.zeros((3, 4)),
            np.zeros((2, 4)),
            [0, 1],
            [0, 2],
            r"pair_texts\[1\] = 2 is out of range for 2 texts",
        ),
        (np.zeros((3, 4)), np.zeros((2, 4)), [], [], "no pairs"),
        (np.zeros((3, 4)), np.zeros((2, 4)), [0.0, 1.0], [0, 1], "pair_items must hold integers"),
        (np.zeros((3, 4)), np.zeros((2, 4)), [0, 1], [True, False], "pair_texts must hold integers"),
        (np.zeros((3, 4)), np.zeros((2, 4)), [[0, 1]], [[0, 1]], "pair_items must be 1-D"),
        (np.zeros(4), np.zeros((2, 4)), [0], [0], r"item_emb must be a non-empty 2-D"),
        (np.zeros((0, 4)), np.zeros((2, 4)), [0], [0], r"item_emb must be a non-empty 2-D"),
        (np.zeros((3, 4)), np.zeros((0, 4)), [0], [0], r"text_emb must be a non-empty 2-D"),
        (np.zeros((3, 4)), np.full((2, 4), np.nan), [0], [0], "text_emb contains NaN"),
        ([[0.0, 1.0]], np.zeros((2, 2)), [0], [0], "numpy array or a torch tensor"),
        (np.array([["a", "b"]]), np.zeros((2, 2)), [0], [0], "numeric array"),
    ],
)
def test_invalid_input_is_a_clear_value_error(items, texts, pi, pt, message):
    for fn in (retrieval_metrics, naive_retrieval):
        with pytest.raises(ValueError, match=message):
            fn(items, texts, pi, pt)


def test_invalid_options_are_value_errors():
    items, texts, pairs = np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32), [0, 1, 2]
    for bad_ks in ((), (0,), (1, -5), (1.5,), (True,)):
        with pytest.raises(ValueError, match="ks"):
            retrieval_metrics(items, texts, pairs, pairs, ks=bad_ks)
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics(items, texts, pairs, pairs, chunk_size=0)
    with pytest.raises(ValueError, match="candidate_chunk_size"):
        retrieval_metrics(items, texts, pairs, pairs, candidate_chunk_size=-1)
    zero_row = np.vstack([items[:2], np.zeros((1, 3), dtype=np.float32)])
    with pytest.raises(ValueError, match="item_emb row 2 has zero norm"):
        retrieval_metrics(zero_row, texts, pairs, pairs, normalize=True)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.fail("the gpu marker needs a CUDA device: run it where one exists")
    items, texts, pi, pt = pair_data(12, 300, 400, 32, levels=64)
    on_gpu = retrieval_metrics(
        torch.from_numpy(items).cuda(), torch.from_numpy(texts).cuda(), pi, pt, chunk_size=64
    )
    assert_same(on_gpu, retrieval_metrics(items, texts, pi, pt, chunk_size=64))
    chunked = retrieval_metrics(
        torch.from_numpy(items).cuda(),
        torch.from_numpy(texts).cuda(),
        pi,
        pt,
        chunk_size=50,
        candidate_chunk_size=70,
    )
    assert_same(chunked, on_gpu)
    # CSLS with k = 8: means of 8 exact products, exact on both devices; per group likewise.
    csls = {"hubness": "csls", "hubness_k": 8, "chunk_size": 64, "candidate_chunk_size": 90}
    items_gpu, texts_gpu = torch.from_numpy(items).cuda(), torch.from_numpy(texts).cuda()
    assert_same(
        retrieval_metrics(items_gpu, texts_gpu, pi, pt, **csls),
        retrieval_metrics(items, texts, pi, pt, **csls),
    )
    groups = [("a", "b", "c")[i % 3] for i in range(len(items))]
    on_gpu = retrieval_by_group(items_gpu, texts_gpu, pi, pt, groups, **csls)
    on_cpu = retrieval_by_group(items, texts, pi, pt, groups, **csls)
    assert list(on_gpu) == list(on_cpu) == ["a", "b", "c"]
    for name in on_cpu:
        assert_same(on_gpu[name], on_cpu[name])
