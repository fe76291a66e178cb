"""retrieval_metrics_from_pairs: several correct items per caption, against a naive full matrix."""

import numpy as np
import pytest

from evaluation.retrieval import retrieval_metrics, retrieval_metrics_from_pairs


def naive_pairs(items, texts, pi, pt, k):
    """Best-correct rank per query with ties against the query, from the full score matrix."""
    s = texts @ items.T
    rel = np.zeros(s.shape, dtype=bool)
    rel[pt, pi] = True

    def ranks(scores, relevant):
        out = []
        for q in range(len(scores)):
            if relevant[q].any():
                best = scores[q][relevant[q]].max()
                out.append(1 + int(((scores[q] >= best) & ~relevant[q]).sum()))
        return np.array(out)

    t2i, i2t = ranks(s, rel), ranks(s.T, rel.T)
    return float(np.mean(t2i <= k)), float(np.mean(i2t <= k)), float(t2i.mean()), float(i2t.mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_naive_with_shared_and_duplicate_pairs(seed):
    rng = np.random.default_rng(seed)
    items = rng.integers(-2, 3, (40, 6)).astype(np.float32)  # integers: exact ties happen
    texts = rng.integers(-2, 3, (70, 6)).astype(np.float32)
    pi, pt = rng.integers(0, 40, 150), rng.integers(0, 70, 150)
    r = retrieval_metrics_from_pairs(items, texts, pi, pt, chunk_size=7)
    for k in (1, 5, 10):
        t2i, i2t, t_mean, i_mean = naive_pairs(items, texts, pi, pt, k)
        assert r.t2i_recall[k] == pytest.approx(t2i)
        assert r.i2t_recall[k] == pytest.approx(i2t)
    assert r.t2i_mean_rank == pytest.approx(t_mean)
    assert r.i2t_mean_rank == pytest.approx(i_mean)


def test_one_item_per_text_equals_the_standard_protocol():
    rng = np.random.default_rng(3)
    items, texts = rng.standard_normal((30, 8)), rng.standard_normal((75, 8))
    owner = rng.integers(0, 30, 75)
    a = retrieval_metrics(items, texts, owner)
    b = retrieval_metrics_from_pairs(items, texts, owner, np.arange(75))
    assert a.t2i_recall == b.t2i_recall and a.i2t_recall == b.i2t_recall
    assert a.t2i_mean_rank == b.t2i_mean_rank and a.i2t_median_rank == b.i2t_median_rank


def test_a_shared_name_is_a_hit_on_any_of_its_items():
    # Three styles of one emoji share the caption; the caption is closest to the second style.
    items = np.array([[1.0, 0.1], [1.0, 0.0], [0.9, 0.2], [0.0, 1.0]])
    texts = np.array([[1.0, 0.0], [0.0, 1.0]])
    r = retrieval_metrics_from_pairs(items, texts, [0, 1, 2, 3], [0, 0, 0, 1])
    assert r.t2i_recall[1] == 1.0
    assert r.i2t_recall[1] == 1.0


def test_bad_pairs_are_refused():
    items, texts = np.ones((3, 2)), np.ones((2, 2))
    with pytest.raises(ValueError, match="out of range"):
        retrieval_metrics_from_pairs(items, texts, [0, 3], [0, 1])
    with pytest.raises(ValueError, match="equally long"):
        retrieval_metrics_from_pairs(items, texts, [0, 1], [0])
