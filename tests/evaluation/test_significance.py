"""The paired bootstrap of evaluation.significance against differences worked out by hand, its
intervals against their known spread, and the pairing of stored ranks."""

import numpy as np
import pytest

from evaluation.significance import (
    compare_experiments,
    differences_markdown,
    hits,
    paired_bootstrap,
)


def test_hits_are_ranks_within_the_top_k():
    assert hits(np.array([1, 2, 5, 11]), 1).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert hits(np.array([1, 2, 5, 11]), 5).tolist() == [1.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="1-based"):
        hits(np.array([0, 1]), 1)
    with pytest.raises(ValueError, match="k must be"):
        hits(np.array([1]), 0)


def test_the_difference_is_the_difference_of_recalls_with_seeds_averaged_per_query():
    # A: two seeds; per query hits (1,1), (1,0), (0,0), (1,1) -> recall (3/4 + 2/4) / 2 = 0.625.
    a = np.array([[1, 1, 0, 1], [1, 0, 0, 1]])
    b = np.array([1, 0, 0, 0])  # one seed (training-free): recall 0.25
    r = paired_bootstrap(a, b, resamples=2000)
    assert r.difference == pytest.approx(0.375)
    assert r.n_queries == 4 and r.level == 0.95
    assert r.low <= r.difference <= r.high


def test_per_group_difference_is_the_mean_of_the_groups_differences():
    # Group x (3 queries): A 3/3, B 1/3 -> +2/3. Group y (1 query): A 0, B 1 -> -1. Mean: -1/6, not
    # the pooled mean over the four queries ((3 - 2) / 4 = +0.25).
    a = np.array([1, 1, 1, 0])
    b = np.array([1, 0, 0, 1])
    grouped = paired_bootstrap(a, b, ["x", "x", "x", "y"], resamples=500)
    assert grouped.difference == pytest.approx(2 / 3 / 2 - 1 / 2)
    assert paired_bootstrap(a, b, resamples=500).difference == pytest.approx(0.25)
    # Stratified: group y's one query (-1) is in every resample, group x's mean is one of 0, 1/3, 2/3,
    # 1; so every resampled statistic is (x - 1) / 2, between -1/2 and 0.
    assert grouped.low >= -0.5 and grouped.high <= 0.0
    assert grouped.share_not_above == 1.0


def test_identical_methods_differ_by_nothing_and_a_constant_lead_has_no_spread():
    rng = np.random.default_rng(0)
    x = (rng.random((3, 200)) < 0.4).astype(float)
    same = paired_bootstrap(x, x)
    assert (same.difference, same.low, same.high) == (0.0, 0.0, 0.0)
    assert same.share_not_above == 1.0 and not same.excludes_zero
    # A hits every query, B none: every resample gives exactly +1.
    lead = paired_bootstrap(np.ones(50), np.zeros(50))
    assert (lead.difference, lead.low, lead.high, lead.share_not_above) == (1.0, 1.0, 1.0, 0.0)
    assert lead.excludes_zero


def test_the_interval_matches_the_known_spread_of_a_paired_difference():
    # Per-query differences d in {-1, 0, +1} with P(+1) = 0.3, P(-1) = 0.1: mean 0.2, variance
    # 0.4 - 0.04 = 0.36; over 400 queries the difference's std is 0.6 / 20 = 0.03, so a 95%
    # interval is about +-1.96 * 0.03 = +-0.0588 wide around the observed difference.
    rng = np.random.default_rng(1)
    u = rng.random(400)
    a = (u < 0.3).astype(float) + ((u >= 0.3) & (u < 0.6)).astype(float)
    b = (u >= 0.9).astype(float) + ((u >= 0.3) & (u < 0.6)).astype(float)
    r = paired_bootstrap(a, b, resamples=4000, seed=3)
    observed = float(np.mean(a - b))
    assert r.difference == pytest.approx(observed)
    half = (r.high - r.low) / 2
    sd = np.std(a - b) / np.sqrt(400)
    assert half == pytest.approx(1.96 * sd, rel=0.12)
    assert r.excludes_zero and r.share_not_above < 0.001
    # Unpaired resampling would be wider: the pairing is what the test is for.
    assert half < 1.96 * np.sqrt((np.var(a) + np.var(b)) / 400)


def test_same_seed_same_interval_and_bad_inputs_are_refused():
    a, b = np.array([1, 0, 1, 1, 0]), np.array([0, 0, 1, 0, 1])
    assert paired_bootstrap(a, b, seed=5) == paired_bootstrap(a, b, seed=5)
    with pytest.raises(ValueError, match="same queries"):
        paired_bootstrap(a, b[:4])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        paired_bootstrap(a * 2, b)
    with pytest.raises(ValueError, match="one per query"):
        paired_bootstrap(a, b, ["g"] * 4)
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap(a, b, level=1.0)
    with pytest.raises(ValueError, match="no queries"):
        paired_bootstrap(np.zeros(0), np.zeros(0))


def _rank_rows(experiment, ranks_by_seed, queries, direction="t2i", dataset="d", gallery="pooled"):
    return [
        {"experiment": experiment, "dataset": dataset, "gallery": gallery, "group_name": g,
         "seed": seed, "direction": direction, "query": q, "rank": rank}
        for seed, ranks in ranks_by_seed.items()
        for (g, q), rank in zip(queries, ranks, strict=True)
    ]  # fmt: skip


def test_compare_experiments_pairs_queries_by_id_whatever_their_order():
    queries = [("", "q1"), ("", "q2"), ("", "q3"), ("", "q4")]
    ref = _rank_rows("ref", {0: [1, 1, 3, 1], 1: [1, 2, 3, 1]}, queries)
    # The other's rows in another order: q4 first. Its hits at 1: q1 and q4 only.
    other = _rank_rows("other", {0: [1, 9, 9, 1]}, queries)[::-1]
    # A third experiment scored other queries (another test split): nothing to pair.
    stranger = _rank_rows("stranger", {0: [1, 1, 1, 1]}, [("", "x1"), ("", "x2"), ("", "x3"), ("", "x4")])
    out = compare_experiments(ref + other + stranger, "ref", resamples=500)
    assert [(c["experiment"], c["dataset"], c["gallery"], c["direction"]) for c in out] == [
        ("other", "d", "pooled", "t2i")
    ]
    # ref recall@1: seed 0 3/4, seed 1 2/4 -> 0.625; other 2/4 -> difference 0.125.
    assert out[0]["result"].difference == pytest.approx(0.125)
    at5 = compare_experiments(ref + other, "ref", k=5, resamples=500)
    assert at5[0]["result"].difference == pytest.approx(1.0 - 0.5)
    with pytest.raises(ValueError, match="no ranks stored"):
        compare_experiments(other, "ref")


def test_differences_markdown_bolds_only_the_differences_beyond_the_noise():
    queries = [("", f"q{i}") for i in range(40)]
    ref = _rank_rows("ref", {0: [1] * 40}, queries)
    far = _rank_rows("far", {0: [2] * 40}, queries)  # never at rank 1: a lead of 100 points
    near = _rank_rows("near", {0: [1] * 39 + [2]}, queries)  # one query behind: 2.5 points
    text = differences_markdown("ref", compare_experiments(ref + far + near, "ref", resamples=500))
    assert "## Paired differences on the test concepts" in text and "**ref**" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "**+100.0**" in rows["far"] and "[+100.0, +100.0]" in rows["far"]
    assert "+2.5" in rows["near"] and "**+2.5**" not in rows["near"]
    assert differences_markdown("ref", []) == ""


def test_the_forest_plot_is_a_png_with_a_row_per_comparison(tmp_path):
    from evaluation.significance import plot_differences

    queries = [("", f"q{i}") for i in range(20)]
    rows = _rank_rows("ref", {0: [1] * 20}, queries) + _rank_rows("a", {0: [2] * 20}, queries)
    rows += _rank_rows("a", {0: [1] * 10 + [2] * 10}, queries, direction="i2t")
    found = compare_experiments(rows, "ref", resamples=200)
    path = plot_differences("ref", found, tmp_path / "d.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bigger = plot_differences("ref", found * 3, tmp_path / "e.png")
    from PIL import Image

    assert Image.open(bigger).height > Image.open(path).height  # one row each
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_differences("ref", [], tmp_path / "f.png")


def test_resampling_concepts_equals_resampling_queries_when_each_concept_is_one_query_repeated():
    rng = np.random.default_rng(4)
    a, b = (rng.random(60) < 0.5).astype(float), (rng.random(60) < 0.4).astype(float)
    once = paired_bootstrap(a, b, resamples=3000, seed=2)
    # Every query three times over, the three copies one concept: the same draws of 60 concepts, so
    # the very same interval; resampled as 180 independent queries it would be narrower by about sqrt(3).
    tripled = np.repeat(a, 3), np.repeat(b, 3)
    concepts = np.repeat([f"c{i}" for i in range(60)], 3)
    by_concept = paired_bootstrap(*tripled, clusters=list(concepts), resamples=3000, seed=2)
    assert (by_concept.difference, by_concept.low, by_concept.high) == pytest.approx(
        (once.difference, once.low, once.high)
    )
    by_query = paired_bootstrap(*tripled, resamples=3000, seed=2)
    ratio = (once.high - once.low) / (by_query.high - by_query.low)
    assert ratio == pytest.approx(np.sqrt(3), rel=0.15)
    with pytest.raises(ValueError, match="clusters has 3 entries"):
        paired_bootstrap(a, b, clusters=["c"] * 3)


def test_compare_experiments_resamples_the_queries_concepts():
    queries = [("", f"q{i}") for i in range(30)]
    ref = _rank_rows("ref", {0: [1, 1, 2] * 10}, queries)
    other = _rank_rows("other", {0: [1, 2, 2] * 10}, queries)
    for r in ref + other:  # three captions per concept
        r["concept"] = f"c{int(r['query'][1:]) // 3}"
    found = compare_experiments(ref + other, "ref", resamples=1000)[0]["result"]
    a, b = np.array([1, 1, 0] * 10), np.array([1, 0, 0] * 10)
    concepts = [f"c{i // 3}" for i in range(30)]
    expected = paired_bootstrap(a, b, [""] * 30, concepts, resamples=1000)
    assert found == expected and (found.n_queries, found.n_clusters) == (30, 10)
    # Every concept holds exactly one more hit for ref: the difference is 1/3 in every resample.
    assert (found.low, found.high) == pytest.approx((1 / 3, 1 / 3))


def test_a_concept_is_drawn_once_for_every_gallery_it_appears_in():
    rng = np.random.default_rng(6)
    a, b = (rng.random(60) < 0.5).astype(float), (rng.random(60) < 0.4).astype(float)
    concepts = [f"c{i}" for i in range(60)]
    one = paired_bootstrap(a, b, clusters=concepts, resamples=3000, seed=1)
    # The same 60 concepts in two galleries (two styles), succeeding and failing alike in both: drawn
    # together, the two galleries' recalls move together, so the interval is the one gallery's.
    both = paired_bootstrap(
        np.tile(a, 2), np.tile(b, 2), ["x"] * 60 + ["y"] * 60, concepts * 2, resamples=3000, seed=1
    )
    assert (both.difference, both.low, both.high) == pytest.approx((one.difference, one.low, one.high))
    assert both.n_clusters == 60
    # Resampling each gallery on its own (queries, no concepts) would treat them as independent
    # evidence and narrow the interval by about sqrt(2).
    apart = paired_bootstrap(np.tile(a, 2), np.tile(b, 2), ["x"] * 60 + ["y"] * 60, resamples=3000, seed=1)
    assert (one.high - one.low) / (apart.high - apart.low) == pytest.approx(np.sqrt(2), rel=0.15)
