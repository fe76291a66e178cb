"""fusion.selection: the quantity, quality and diversity selectors, the k-means under diversity and the
cross-fitted alignment quality score.

.venv/bin/pytest -q tests/fusion/test_selection.py
"""

from __future__ import annotations

import numpy as np
import pytest

from fusion.selection import (
    alignment_quality,
    fold_assignment,
    kmeans,
    seeded_order,
    select_diversity,
    select_quality,
    select_quality_fraction,
    select_quantity,
)

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


def test_quality_fraction_keeps_the_top_share_ties_by_index_and_never_unknown():
    scores = np.array([0.2, 0.9, 0.5, 0.9, np.nan, 0.1, 0.5, 0.7, 0.3, 0.5])
    assert select_quality_fraction(scores, 0.2).tolist() == [1, 3]
    assert select_quality_fraction(scores, 0.3).tolist() == [1, 3, 7]
    # 0.5 * 10 = 5: the two 0.9s, 0.7, then the first two of three tied 0.5s (lowest index first).
    assert select_quality_fraction(scores, 0.5).tolist() == [1, 2, 3, 6, 7]
    # round(keep * N), halves up: 2.5 -> 3, 2.4 -> 2; at least one.
    assert select_quality_fraction(scores, 0.25).tolist() == [1, 3, 7]
    assert select_quality_fraction(scores, 0.24).tolist() == [1, 3]
    assert select_quality_fraction(scores, 0.01).tolist() == [1]
    assert select_quality_fraction(scores, 1.0).tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9]  # NaN never
    assert select_quality_fraction(np.full(3, np.nan), 1.0).tolist() == []
    assert select_quality_fraction(np.zeros(0), 0.5).tolist() == []
    # Any scale: the scores need not lie in [0, 1].
    assert select_quality_fraction(np.array([-3.0, 40.0, -0.5, 7.0]), 0.5).tolist() == [1, 3]
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="keep must be in"):
            select_quality_fraction(scores, bad)
    with pytest.raises(ValueError, match="scores must be 1-D"):
        select_quality_fraction(scores.reshape(2, 5), 0.5)


# -- alignment quality -------------------------------------------------------------------------


def linear_pairs(
    n: int, dx: int, dy: int, noise: float, bad_rate: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """y = x W + noise, with an offset on both sides as real latents have; a random `bad_rate` of the
    pairs get another bad pair's caption (a derangement among them). Returns x, y float32, bad [N]."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dx)) + 2.0
    y = x @ rng.standard_normal((dx, dy)) / np.sqrt(dx) + noise * rng.standard_normal((n, dy)) - 1.0
    bad_idx = rng.choice(n, int(round(bad_rate * n)), replace=False)
    y[bad_idx] = y[np.roll(bad_idx, 1)]
    bad = np.zeros(n, dtype=bool)
    bad[bad_idx] = True
    return x.astype(np.float32), y.astype(np.float32), bad


def auc(scores: np.ndarray, bad: np.ndarray) -> float:
    """P(a good pair outscores a bad one), ties half."""
    good, worse = scores[~bad][:, None], scores[bad][None, :]
    return float((good > worse).mean() + 0.5 * (good == worse).mean())


def unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def reference_predictions(x, y, fold_of, alpha, in_sample=False):
    """The cross-fitted ridge written out plainly (primal form, one fold at a time): for each row its
    predicted y and its actual y, both centred by the training folds' means and L2-normalised. With
    in_sample=True every fold also trains on itself: the leak that the score must not have."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    pred, actual = np.zeros_like(y), np.zeros_like(y)
    for f in np.unique(fold_of):
        te = fold_of == f
        tr = np.ones_like(te) if in_sample else ~te
        mx, my = x[tr].mean(0), y[tr].mean(0)
        xt, yt = unit(x[tr] - mx), unit(y[tr] - my)
        lam = alpha * np.trace(xt.T @ xt) / x.shape[1]
        w = np.linalg.solve(xt.T @ xt + lam * np.eye(x.shape[1]), xt.T @ yt)
        pred[te], actual[te] = unit(unit(x[te] - mx) @ w), unit(y[te] - my)
    return pred, actual


def test_alignment_quality_puts_mismatched_captions_at_the_bottom():
    x, y, bad = linear_pairs(400, 32, 24, noise=1.0, bad_rate=0.1)
    for kind in ("rank", "cosine"):
        scores = alignment_quality(x, y, kind=kind)
        assert auc(scores, bad) > 0.95, kind
        # The bottom 10% are (nearly) all the mismatched pairs; keeping the top 90% drops them.
        kept = select_quality_fraction(scores, 0.9)
        assert bad[kept].mean() < 0.02 and bad.mean() == 0.1
    # Rank scores read as "own caption beats this share of the others": a threshold works on them.
    rank = alignment_quality(x, y)
    assert rank.min() >= 0.0 and rank.max() <= 1.0
    assert np.median(rank[~bad]) > 0.95 and np.median(rank[bad]) < 0.75
    assert bad[select_quality(rank, 0.8)].mean() < 0.02
    # The same captions with no relation to the media: nothing to rank by (the AUC is not free).
    shuffled = alignment_quality(np.random.default_rng(1).permutation(x), y)
    assert abs(auc(shuffled, bad) - 0.5) < 0.15


def test_alignment_quality_matches_a_plain_cross_fitted_ridge_primal_and_dual():
    rng = np.random.default_rng(3)
    # dx < training rows (primal) and dx > training rows (dual): the same map either way.
    for n, dx, dy, folds, alpha in ((60, 5, 4, 5, 1.0), (20, 30, 7, 4, 0.3)):
        x, y = (
            rng.standard_normal((n, dx)) * 7 + 3,
            rng.standard_normal((n, dy)) + 0.3 * rng.standard_normal(),
        )
        y[:, :2] += x[:, :2]
        fold_of = fold_assignment(n, folds, seed=11)
        pred, actual = reference_predictions(x, y, fold_of, alpha)
        cos = (pred * actual).sum(1)
        got = alignment_quality(x, y, folds=folds, alpha=alpha, seed=11, kind="cosine")
        assert got.dtype == np.float64 and got.shape == (n,)
        assert np.allclose(got, cos, atol=1e-10)
        # Rank: the share of the other captions (centred by the same fold) that lose to the own one.
        expected = np.empty(n)
        for i in range(n):
            my = y[fold_of != fold_of[i]].mean(0)
            others = unit(np.delete(y, i, axis=0) - my) @ pred[i]
            expected[i] = (others < cos[i]).mean() + 0.5 * (others == cos[i]).mean()
        got = alignment_quality(x, y, folds=folds, alpha=alpha, seed=11, kind="rank")
        assert np.allclose(got, expected, atol=1e-12)


def test_alignment_quality_is_invariant_to_the_scale_and_offset_of_the_latents():
    x, y, _ = linear_pairs(50, 6, 5, noise=0.5, bad_rate=0.2)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    base = alignment_quality(x64, y64, kind="cosine")
    assert np.allclose(alignment_quality(1e3 * x64, 1e-3 * y64, kind="cosine"), base, atol=1e-9)
    assert np.allclose(alignment_quality(x64 - 5.0, y64 + 9.0, kind="cosine"), base, atol=1e-9)
    assert np.allclose(alignment_quality(x, y, kind="cosine"), base, atol=1e-5)  # float32 in, float64 math


def test_no_pair_is_scored_by_a_map_that_saw_it():
    # Every pair is a unique outlier: its media latent is its own axis and its caption is random. A
    # map trained on the pair itself would reproduce its caption (cosine near 1); held out, it has
    # nothing to go on (cosine near 0).
    n, dy = 30, 64
    x = 5.0 * np.eye(n)
    y = np.random.default_rng(0).standard_normal((n, dy))
    alpha = 1e-3
    fold_of = fold_assignment(n, 5, seed=0)
    leak_pred, leak_actual = reference_predictions(x, y, fold_of, alpha, in_sample=True)
    assert (leak_pred * leak_actual).sum(1).min() > 0.9  # the construction catches a leak
    scores = alignment_quality(x, y, alpha=alpha, kind="cosine")
    assert np.abs(scores).max() < 0.5
    # Rank: a leaked fit would make each caption the best for its own media (score 1 for all).
    rank = alignment_quality(x, y, alpha=alpha)
    assert rank.mean() < 0.75 and rank.max() < 1.0


def test_alignment_quality_depends_on_the_seed_only_through_the_fold_partition():
    x, y, _ = linear_pairs(8, 3, 2, noise=0.3, bad_rate=0.25)
    by_partition: dict[frozenset, list[np.ndarray]] = {}
    for seed in range(80):  # 35 ways to split 8 pairs into two folds of 4: some seeds must share one
        fold_of = fold_assignment(8, 2, seed)
        assert np.bincount(fold_of).tolist() == [4, 4]
        part = frozenset(frozenset(np.flatnonzero(fold_of == f).tolist()) for f in range(2))
        for kind in ("cosine", "rank"):
            by_partition.setdefault((part, kind), []).append(
                alignment_quality(x, y, folds=2, seed=seed, kind=kind)
            )
    assert any(len(v) > 1 for v in by_partition.values())
    for runs in by_partition.values():
        assert all(np.array_equal(r, runs[0]) for r in runs)
    cosines = [runs[0] for (_, kind), runs in by_partition.items() if kind == "cosine"]
    assert len(cosines) > 10 and not np.allclose(cosines[0], cosines[1])
    # The same seed, the same scores; another seed, other folds and other scores (but much the same).
    x, y, _ = linear_pairs(200, 16, 8, noise=1.0, bad_rate=0.1)
    a = alignment_quality(x, y, seed=4)
    assert np.array_equal(alignment_quality(x, y, seed=4), a)
    b = alignment_quality(x, y, seed=5)
    assert not np.array_equal(a, b) and np.corrcoef(a, b)[0, 1] > 0.9


def test_alignment_quality_shapes_small_batches_sampled_candidates_and_errors():
    x, y, bad = linear_pairs(60, 8, 6, noise=0.5, bad_rate=0.2)
    # Fewer pairs than two per fold: the folds shrink to N // 2 (here 2 folds of 2).
    assert fold_assignment(4, 2, 0).tolist().count(0) == 2
    four = alignment_quality(x[:4], y[:4], folds=5, kind="cosine")
    assert four.shape == (4,) and np.all(np.abs(four) <= 1 + 1e-12)
    assert np.array_equal(four, alignment_quality(x[:4], y[:4], folds=2, kind="cosine"))
    assert alignment_quality(x[:5], y[:5]).shape == (5,)
    # More captions than `candidates`: each pair is ranked against a seeded sample of them.
    sampled = alignment_quality(x, y, candidates=20)
    assert sampled.shape == (60,) and np.all((sampled >= 0) & (sampled <= 1))
    on_grid = [np.isclose(sampled * m, np.round(sampled * m)) for m in (19, 20)]
    assert np.all(on_grid[0] | on_grid[1]) and not np.all(on_grid[0])  # out of 19 or 20 others
    assert np.array_equal(alignment_quality(x, y, candidates=20), sampled)
    assert auc(sampled, bad) > 0.9
    with pytest.raises(ValueError, match="at least 4 pairs, got 3"):
        alignment_quality(x[:3], y[:3])
    with pytest.raises(ValueError, match="one row per pair, got 60 and 59 rows"):
        alignment_quality(x, y[:59])
    with pytest.raises(ValueError, match="must be 2-D"):
        alignment_quality(x[:, 0], y)
    with pytest.raises(ValueError, match="unknown alignment quality kind 'clip'"):
        alignment_quality(x, y, kind="clip")
    with pytest.raises(ValueError, match="folds must be >= 2, got 1"):
        alignment_quality(x, y, folds=1)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        alignment_quality(x, y, alpha=0.0)
    with pytest.raises(ValueError, match="candidates must be >= 2"):
        alignment_quality(x, y, candidates=1)
    y_nan = y.copy()
    y_nan[3, 2] = np.nan
    with pytest.raises(ValueError, match="must be finite"):
        alignment_quality(x, y_nan)


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


def test_assign_picks_the_nearest_centre():
    from fusion.selection import assign

    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = np.array([[1.0, 1.0], [9.0, -1.0], [-1.0, 8.0], [6.0, 0.0]])
    assert assign(x, centres).tolist() == [0, 1, 2, 1]


def test_diversity_fitted_on_a_sample_still_balances_well_separated_clusters():
    from fusion.selection import diversity_sample

    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(4), [400, 300, 200, 100])
    x = np.eye(4)[truth] * 20 + rng.standard_normal((1000, 4))
    fit = diversity_sample(1000, seed=3, cap=80)
    assert len(fit) == 80 and len(set(fit.tolist())) == 80 and np.array_equal(fit, np.sort(fit))
    np.testing.assert_array_equal(diversity_sample(50, seed=3, cap=80), np.arange(50))
    idx = select_diversity(x, 40, k=4, mode="balanced", seed=3, sample=80)
    assert np.bincount(truth[idx], minlength=4).tolist() == [10, 10, 10, 10]
    # On all candidates (the default cap is far above 1,000) the same clusters give the same shares.
    assert np.bincount(truth[select_diversity(x, 40, k=4, seed=3)], minlength=4).tolist() == [10, 10, 10, 10]
