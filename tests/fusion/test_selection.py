"""fusion.selection: the quantity, quality and diversity selectors and the k-means under diversity.

.venv/bin/pytest -q tests/fusion/test_curate.py
"""

from __future__ import annotations

import numpy as np
import pytest

from fusion.selection import kmeans, seeded_order, select_diversity, select_quality, select_quantity

KEYS = [f"pair-{i:03d}" for i in range(100)]


def blobs(sizes: tuple[int, ...], d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated clusters: x [sum(sizes), d] float32 and the true cluster of each row [N]."""
    rng = np.random.default_rng(seed)
    centres = np.eye(len(sizes), d) * 20.0
    x = np.concatenate([c + rng.normal(0, 0.5, size=(n, d)) for c, n in zip(centres, sizes, strict=True)])
    truth = np.repeat(np.arange(len(sizes)), sizes)
    order = rng.permutation(len(x))  # interleave, so no selector can lean on the row order
    return x[order].astype(np.float32), truth[order]


def per_cluster(idx: np.ndarray, truth: np.ndarray, k: int) -> list[int]:
    return np.bincount(truth[idx], minlength=k).tolist()


# -- quantity ----------------------------------------------------------------------------------


def test_seeded_order_is_a_permutation_independent_of_key_order():
    order = seeded_order(KEYS, seed=3)
    assert sorted(order.tolist()) == list(range(len(KEYS)))
    shuffled = list(np.random.default_rng(1).permutation(KEYS))
    assert [shuffled[i] for i in seeded_order(shuffled, 3)] == [KEYS[i] for i in order]
    assert not np.array_equal(seeded_order(KEYS, 4), order)


def test_quantity_subsets_are_nested_sorted_and_seeded():
    chosen = {n: select_quantity(KEYS, n, seed=7) for n in (5, 10, 40, 100)}
    for n, idx in chosen.items():
        assert len(idx) == len(set(idx.tolist())) == n
        assert np.all(np.diff(idx) > 0)
    assert set(chosen[5]) < set(chosen[10]) < set(chosen[40]) < set(chosen[100])
    assert np.array_equal(select_quantity(KEYS, 10, seed=7), chosen[10])
    assert not np.array_equal(select_quantity(KEYS, 10, seed=8), chosen[10])
    # The same keys in another order select the same pairs (by key, not by position).
    rev = KEYS[::-1]
    assert {rev[i] for i in select_quantity(rev, 10, seed=7)} == {KEYS[i] for i in chosen[10]}


def test_quantity_larger_than_the_candidates_takes_them_all_and_zero_is_refused():
    assert select_quantity(KEYS[:6], 50).tolist() == list(range(6))
    with pytest.raises(ValueError, match="quantity n must be >= 1, got 0"):
        select_quantity(KEYS, 0)


# -- quality -----------------------------------------------------------------------------------


def test_quality_threshold_is_inclusive_and_unknown_scores_never_pass():
    scores = np.array([0.1, 0.5, np.nan, 0.9, 0.49999, 1.0])
    assert select_quality(scores, 0.5).tolist() == [1, 3, 5]
    assert select_quality(scores, 0.0).tolist() == [0, 1, 3, 4, 5]
    assert select_quality(scores, 1.01).tolist() == []
    assert select_quality(np.full(4, np.nan), -1.0).tolist() == []


# -- k-means -----------------------------------------------------------------------------------


def test_kmeans_recovers_separated_clusters():
    x, truth = blobs((30, 20, 12, 8))
    labels, centres = kmeans(x, 4, seed=0)
    assert centres.shape == (4, x.shape[1])
    # Same partition up to renaming: each found cluster is exactly one true cluster.
    pairs = set(zip(labels.tolist(), truth.tolist(), strict=True))
    assert len(pairs) == 4
    for j in range(4):
        true = truth[labels == j][0]
        assert np.allclose(centres[j], x[truth == true].mean(0), atol=1e-6)
    again, _ = kmeans(x, 4, seed=0)
    assert np.array_equal(again, labels)


def test_kmeans_edge_cases():
    x, _ = blobs((5, 5))
    with pytest.raises(ValueError, match=r"k must be in \[1, 10\], got 0"):
        kmeans(x, 0)
    with pytest.raises(ValueError, match=r"k must be in \[1, 10\], got 11"):
        kmeans(x, 11)
    labels, centres = kmeans(x, 1)
    assert labels.tolist() == [0] * 10 and np.allclose(centres[0], x.mean(0), atol=1e-5)
    # All points identical: k-means++ has no distance to weight by and must still return.
    same, _ = kmeans(np.ones((6, 3)), 2)
    assert same.shape == (6,)


# -- diversity ---------------------------------------------------------------------------------


SIZES = (40, 20, 10, 6)


def test_balanced_takes_an_equal_share_of_every_cluster():
    x, truth = blobs(SIZES)
    idx = select_diversity(x, 16, k=4, mode="balanced", seed=0)
    assert per_cluster(idx, truth, 4) == [4, 4, 4, 4]
    # When a cluster runs out, the others keep taking turns.
    idx = select_diversity(x, 30, k=4, mode="balanced", seed=0)
    assert sorted(per_cluster(idx, truth, 4)) == [6, 8, 8, 8]
    assert per_cluster(idx, truth, 4)[3] == 6


def test_concentrated_fills_the_largest_clusters_first():
    x, truth = blobs(SIZES)
    idx = select_diversity(x, 50, k=4, mode="concentrated", seed=0)
    assert per_cluster(idx, truth, 4) == [40, 10, 0, 0]
    idx = select_diversity(x, 12, k=4, mode="concentrated", seed=0)
    assert per_cluster(idx, truth, 4) == [12, 0, 0, 0]


def test_uniform_ignores_clusters_and_every_mode_returns_sorted_distinct_seeded_indices():
    x, _ = blobs(SIZES)
    for mode in ("uniform", "balanced", "concentrated"):
        idx = select_diversity(x, 20, k=4, mode=mode, seed=5)
        assert len(idx) == len(set(idx.tolist())) == 20
        assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < len(x)
        assert np.array_equal(select_diversity(x, 20, k=4, mode=mode, seed=5), idx)
    assert not np.array_equal(
        select_diversity(x, 20, mode="uniform", seed=5), select_diversity(x, 20, mode="uniform", seed=6)
    )


def test_balanced_covers_more_clusters_than_uniform_on_skewed_data():
    # One huge cluster and many small ones: a uniform draw mostly lands in the big one.
    x, truth = blobs((200, 5, 5, 5, 5, 5), d=8, seed=2)
    balanced = per_cluster(select_diversity(x, 12, k=6, mode="balanced", seed=0), truth, 6)
    uniform = per_cluster(select_diversity(x, 12, k=6, mode="uniform", seed=0), truth, 6)
    assert balanced == [2, 2, 2, 2, 2, 2]
    assert sum(c > 0 for c in uniform) < 6


def test_diversity_errors():
    x, _ = blobs((5, 5))
    with pytest.raises(ValueError, match=r"diversity n must be in \[1, 10\], got 11"):
        select_diversity(x, 11)
    with pytest.raises(ValueError, match=r"diversity n must be in \[1, 10\], got 0"):
        select_diversity(x, 0)
    with pytest.raises(ValueError, match="unknown diversity mode 'spread'"):
        select_diversity(x, 3, mode="spread")
    # k larger than the candidates is capped, not an error.
    assert len(select_diversity(x, 4, k=64, mode="balanced")) == 4
