"""Retrieval metrics: the chunked computation against the full-matrix reference, ties, and bad input.

Most data is quantised to a dyadic grid with small integer numerators, so every dot product is exact in
float32 and float64 alike: the chunked and the naive paths see identical scores, ties included.
"""

import math

import numpy as np
import pytest
import torch

from evaluation import retrieval
from evaluation.retrieval import (
    RetrievalResult,
    chance_recall,
    naive_retrieval,
    retrieval_metrics,
)


def quantised(rng: np.random.Generator, shape: tuple[int, int], levels: int) -> np.ndarray:
    """Values k / levels with |k| <= 2 * levels: exact products and sums at the sizes used here."""
    return (np.clip(np.round(rng.normal(size=shape) * levels), -2 * levels, 2 * levels) / levels).astype(
        np.float32
    )


def multi_caption_data(
    seed: int, n_items: int, d: int, levels: int, max_captions: int = 5, with_uncaptioned: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Items with 1..max_captions captions each (some with none), captions near their item, shuffled."""
    rng = np.random.default_rng(seed)
    items = quantised(rng, (n_items, d), levels)
    counts = rng.integers(1, max_captions + 1, size=n_items)
    if with_uncaptioned:
        counts[rng.choice(n_items, size=max(1, n_items // 10), replace=False)] = 0
    owner = np.repeat(np.arange(n_items), counts)
    owner = owner[rng.permutation(owner.size)]
    texts = items[owner] + quantised(rng, (owner.size, d), levels)
    return items, texts, owner


def assert_same(a: RetrievalResult, b: RetrievalResult) -> None:
    np.testing.assert_array_equal(a.t2i_ranks, b.t2i_ranks)
    np.testing.assert_array_equal(a.i2t_ranks, b.i2t_ranks)
    np.testing.assert_array_equal(a.i2t_query_items, b.i2t_query_items)
    assert a == b


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
    owner = np.array([0, 0, 1, 2])
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
        retrieval_metrics(items, texts, owner, ks=(1, 2, 3), chunk_size=1),
        retrieval_metrics(items, texts, owner, ks=(3, 1, 2), chunk_size=3, candidate_chunk_size=2),
        naive_retrieval(items, texts, owner, ks=(1, 2, 3)),
    ):
        np.testing.assert_array_equal(result.t2i_ranks, [1, 3, 3, 2])
        np.testing.assert_array_equal(result.i2t_ranks, [2, 3, 1])
        got = result.as_dict()
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            assert got[name] == pytest.approx(value), name


@pytest.mark.parametrize(
    ("n_items", "d", "chunk_size", "candidate_chunk_size", "seed"),
    [
        (40, 8, 7, None, 0),
        (97, 16, 32, None, 1),
        (97, 16, 1000, 13, 2),
        (150, 32, 256, None, 3),
        (61, 4, 5, 9, 4),
        (1, 8, 3, None, 5),
    ],
)
def test_chunked_matches_naive_multi_caption(n_items, d, chunk_size, candidate_chunk_size, seed):
    items, texts, owner = multi_caption_data(seed, n_items, d, levels=64, with_uncaptioned=n_items > 1)
    chunked = retrieval_metrics(
        items, texts, owner, chunk_size=chunk_size, candidate_chunk_size=candidate_chunk_size
    )
    naive = naive_retrieval(items, texts, owner)
    assert_same(chunked, naive)
    assert chunked.n_texts == owner.size
    assert chunked.n_i2t_queries == np.unique(owner).size


def test_candidate_chunking_does_not_change_ranks():
    items, texts, owner = multi_caption_data(11, 120, 16, levels=8)
    whole = retrieval_metrics(items, texts, owner, chunk_size=50)
    for step in (1, 7, 64, 119, 120, 500):
        assert_same(retrieval_metrics(items, texts, owner, chunk_size=33, candidate_chunk_size=step), whole)


@pytest.mark.parametrize("count_slice", [1, 5, 64, 1000])
def test_counting_in_column_slices_matches_naive(monkeypatch, count_slice):
    # The real slice (1M elements) never splits a block at test sizes; a tiny one splits every block,
    # including into single columns when a chunk has more rows than the slice has elements.
    monkeypatch.setattr(retrieval, "_COUNT_SLICE", count_slice)
    items, texts, owner = multi_caption_data(13, 45, 8, levels=4)
    naive = naive_retrieval(items, texts, owner)
    assert_same(retrieval_metrics(items, texts, owner, chunk_size=9), naive)
    assert_same(retrieval_metrics(items, texts, owner, chunk_size=16, candidate_chunk_size=10), naive)


def test_exact_ties_are_pessimistic_and_match_naive():
    # Three levels per coordinate in d=3: many items and captions score exactly alike.
    items, texts, owner = multi_caption_data(7, 80, 3, levels=1)
    chunked = retrieval_metrics(items, texts, owner, chunk_size=9, candidate_chunk_size=31)
    naive = naive_retrieval(items, texts, owner)
    assert_same(chunked, naive)

    scores = texts.astype(np.float64) @ items.T.astype(np.float64)
    correct = scores[np.arange(owner.size), owner]
    optimistic = 1 + (scores > correct[:, None]).sum(axis=1)
    pessimistic = (scores >= correct[:, None]).sum(axis=1)
    np.testing.assert_array_equal(chunked.t2i_ranks, pessimistic)
    # The data must actually contain ties for this test to mean anything.
    assert (pessimistic > optimistic).sum() > 10


def test_collapsed_embeddings_get_the_worst_rank():
    # A model that maps everything to one point must not score: every candidate ties with the correct one.
    items = np.ones((20, 4), dtype=np.float32)
    texts = np.ones((30, 4), dtype=np.float32)
    owner = np.arange(30) % 20
    result = retrieval_metrics(items, texts, owner, normalize=True)
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
    result = retrieval_metrics(items, texts, owner, ks=(1, 5), chunk_size=16)
    assert result.t2i_recall == {1: 1.0, 5: 1.0}
    assert result.i2t_recall == {1: 1.0, 5: 1.0}
    assert (result.t2i_mean_rank, result.t2i_median_rank) == (1.0, 1.0)
    assert (result.i2t_mean_rank, result.i2t_median_rank) == (1.0, 1.0)


def test_continuous_normalised_data_matches_naive():
    rng = np.random.default_rng(5)
    items = rng.normal(size=(60, 24))
    owner = rng.integers(0, 60, size=150)
    texts = items[owner] + 1.5 * rng.normal(size=(150, 24))
    chunked = retrieval_metrics(items, texts, owner, normalize=True, chunk_size=17)
    assert_same(chunked, naive_retrieval(items, texts, owner, normalize=True))
    # Noisy but informative captions: clearly above chance, clearly below perfect.
    assert chance_recall(60, 5) * 2 < chunked.t2i_recall[5] < 1.0


def test_uncaptioned_items_are_distractors_not_queries():
    items = np.array([[1, 0], [0, 1], [1, 0]], dtype=np.float32)  # item 2 duplicates item 0, no caption
    texts = np.array([[1, 0], [0, 1]], dtype=np.float32)
    result = retrieval_metrics(items, texts, [0, 1])
    np.testing.assert_array_equal(result.i2t_query_items, [0, 1])
    assert result.n_i2t_queries == 2 and result.n_items == 3
    np.testing.assert_array_equal(result.t2i_ranks, [2, 1])  # the uncaptioned twin ties with item 0
    np.testing.assert_array_equal(result.i2t_ranks, [1, 1])


def test_torch_and_numpy_inputs_agree():
    items, texts, owner = multi_caption_data(9, 70, 8, levels=16)
    from_numpy = retrieval_metrics(items, texts, owner, chunk_size=20)
    items_t = torch.from_numpy(items).double().requires_grad_(True)
    from_torch = retrieval_metrics(items_t, torch.from_numpy(texts), torch.from_numpy(owner), chunk_size=20)
    assert_same(from_numpy, from_torch)
    assert_same(from_numpy, retrieval_metrics(items, texts, owner.tolist(), chunk_size=64))


def test_normalize_flag_equals_prenormalised_input():
    rng = np.random.default_rng(2)
    items = rng.normal(size=(30, 6)).astype(np.float32)
    owner = rng.integers(0, 30, size=45)
    texts = (items[owner] + rng.normal(size=(45, 6))).astype(np.float32)
    scaled = retrieval_metrics(items * 3.0, texts * 0.25, owner, normalize=True)
    unit_items = torch.nn.functional.normalize(torch.from_numpy(items), dim=1)
    unit_texts = torch.nn.functional.normalize(torch.from_numpy(texts), dim=1)
    # Same ranking up to float rounding; the seeded data has no near-ties at that scale.
    assert_same(scaled, retrieval_metrics(unit_items, unit_texts, owner))


def test_as_dict_names():
    items, texts, owner = multi_caption_data(4, 20, 4, levels=8)
    result = retrieval_metrics(items, texts, owner, ks=(10, 1, 5, 5))
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


def test_chance_recall_closed_form():
    assert chance_recall(100, 1) == pytest.approx(0.01)
    assert chance_recall(100, 10) == pytest.approx(0.1)
    assert chance_recall(5, 10) == 1.0
    assert chance_recall(20, 4, n_correct=3) == pytest.approx(1 - math.comb(17, 4) / math.comb(20, 4))
    assert (
        chance_recall(10, 8, n_correct=3) == 1.0
    )  # only 7 incorrect ones: a correct one must be in the top 8
    assert 0.0 < chance_recall(100_000, 10) < 1.1e-4


@pytest.mark.parametrize(("n", "k", "m"), [(50, 5, 1), (30, 3, 4), (12, 1, 1)])
def test_chance_recall_matches_monte_carlo(n, k, m):
    rng = np.random.default_rng(n * 100 + k * 10 + m)
    trials = 20_000
    # A random ranking: the positions of the m correct candidates are a random m-subset of n.
    keys = rng.random((trials, n))
    positions = np.argsort(np.argsort(keys, axis=1), axis=1)[:, :m]  # 0-based positions of candidates 0..m-1
    hits = (positions.min(axis=1) < k).mean()
    p = chance_recall(n, k, n_correct=m)
    assert abs(hits - p) < 4 * math.sqrt(p * (1 - p) / trials) + 1e-9


def test_random_embeddings_recall_is_near_chance():
    rng = np.random.default_rng(8)
    items = rng.normal(size=(100, 32))
    texts = rng.normal(size=(3000, 32))
    owner = rng.integers(0, 100, size=3000)
    result = retrieval_metrics(items, texts, owner, normalize=True, chunk_size=512)
    p = chance_recall(100, 10)
    # Rank is uniform on 1..100 for unrelated embeddings: recall@10 ~ 0.1 and mean rank ~ 50.5.
    assert abs(result.t2i_recall[10] - p) < 4 * math.sqrt(p * (1 - p) / 3000)
    assert abs(result.t2i_mean_rank - 50.5) < 3.0


@pytest.mark.parametrize(
    ("items", "texts", "owner", "message"),
    [
        (np.zeros((3, 4)), np.zeros((2, 5)), [0, 1], "dimensions differ"),
        (np.zeros((3, 4)), np.zeros((2, 4)), [0, 1, 2], "entries but text_emb has 2 rows"),
        (np.zeros((3, 4)), np.zeros((2, 4)), [0, 3], r"text_to_item\[1\] = 3 is out of range for 3 items"),
        (np.zeros((3, 4)), np.zeros((2, 4)), [-1, 0], r"text_to_item\[0\] = -1 is out of range"),
        (np.zeros((3, 4)), np.zeros((2, 4)), [0.0, 1.0], "must hold integers"),
        (np.zeros((3, 4)), np.zeros((2, 4)), [True, False], "must hold integers"),
        (np.zeros((3, 4)), np.zeros((2, 4)), [[0, 1]], "text_to_item must be 1-D"),
        (np.zeros(4), np.zeros((2, 4)), [0, 1], r"item_emb must be a non-empty 2-D"),
        (np.zeros((0, 4)), np.zeros((2, 4)), [0, 1], r"item_emb must be a non-empty 2-D"),
        (np.zeros((3, 4)), np.zeros((0, 4)), [], r"text_emb must be a non-empty 2-D"),
        (np.zeros((3, 4)), np.full((2, 4), np.nan), [0, 1], "text_emb contains NaN"),
        ([[0.0, 1.0]], np.zeros((2, 2)), [0, 0], "numpy array or a torch tensor"),
        (np.array([["a", "b"]]), np.zeros((2, 2)), [0, 0], "numeric array"),
    ],
)
def test_invalid_input_is_a_clear_value_error(items, texts, owner, message):
    for fn in (retrieval_metrics, naive_retrieval):
        with pytest.raises(ValueError, match=message):
            fn(items, texts, owner)


def test_invalid_options_are_value_errors():
    items, texts, owner = np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32), [0, 1, 2]
    for bad_ks in ((), (0,), (1, -5), (1.5,), (True,)):
        with pytest.raises(ValueError, match="ks"):
            retrieval_metrics(items, texts, owner, ks=bad_ks)
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics(items, texts, owner, chunk_size=0)
    with pytest.raises(ValueError, match="candidate_chunk_size"):
        retrieval_metrics(items, texts, owner, candidate_chunk_size=-1)
    zero_row = np.vstack([items[:2], np.zeros((1, 3), dtype=np.float32)])
    with pytest.raises(ValueError, match="item_emb row 2 has zero norm"):
        retrieval_metrics(zero_row, texts, owner, normalize=True)
    for args in ((0, 1), (5, 0), (5, 1, 0), (5, 1, 6)):
        with pytest.raises(ValueError):
            chance_recall(*args)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.fail("the gpu marker needs a CUDA device: run it where one exists")
    items, texts, owner = multi_caption_data(12, 300, 32, levels=64)
    on_gpu = retrieval_metrics(
        torch.from_numpy(items).cuda(), torch.from_numpy(texts).cuda(), owner, chunk_size=64
    )
    assert_same(on_gpu, retrieval_metrics(items, texts, owner, chunk_size=64))
