"""Seeds and spread: evaluation.aggregate against numbers worked out by hand."""

import math

import numpy as np
import pytest

from evaluation.aggregate import aggregate_seeds, summary_rows


def test_mean_and_sample_std_by_hand():
    per_seed = [
        {"t2i_recall_at_1": 0.1, "t2i_mean_rank": 3.0},
        {"t2i_recall_at_1": 0.3, "t2i_mean_rank": 5.0},
        {"t2i_recall_at_1": 0.2, "t2i_mean_rank": 4.0},
    ]
    got = aggregate_seeds(per_seed)
    assert list(got) == ["t2i_recall_at_1", "t2i_mean_rank"]
    # Deviations from the mean 0.2 are -0.1, 0.1, 0: squares sum to 0.02, / (3 - 1) = 0.01, sqrt = 0.1.
    mean, std, n = got["t2i_recall_at_1"]
    assert (mean, std, n) == (pytest.approx(0.2), pytest.approx(0.1), 3)
    assert got["t2i_mean_rank"] == (pytest.approx(4.0), pytest.approx(1.0), 3)
    # ddof=1, not the population std (which would be sqrt(0.02 / 3) = 0.0816...).
    assert std != pytest.approx(math.sqrt(0.02 / 3))


def test_two_seeds_and_one_seed():
    # Two seeds 1 and 4: mean 2.5, deviations +-1.5, sample variance 4.5 / 1, std sqrt(4.5).
    assert aggregate_seeds([{"m": 1}, {"m": 4}]) == {"m": (2.5, pytest.approx(math.sqrt(4.5)), 2)}
    # One seed: its value, no spread (not NaN, which ddof=1 would give).
    assert aggregate_seeds([{"m": 0.25, "k": np.float32(2.0)}]) == {"m": (0.25, 0.0, 1), "k": (2.0, 0.0, 1)}


def test_identical_seeds_have_zero_spread_and_nan_propagates():
    assert aggregate_seeds([{"m": 0.5}] * 4) == {"m": (0.5, 0.0, 4)}
    mean, std, n = aggregate_seeds([{"m": 0.5}, {"m": float("nan")}])["m"]
    assert math.isnan(mean) and math.isnan(std) and n == 2


def test_a_metric_missing_in_some_seeds_is_named():
    with pytest.raises(
        ValueError, match=r"metric 'i2t_recall_at_1' is missing in seed\(s\) at position \[1\]"
    ):
        aggregate_seeds([{"t2i_recall_at_1": 0.1, "i2t_recall_at_1": 0.2}, {"t2i_recall_at_1": 0.3}])
    # Also when the first seed is the one without it.
    with pytest.raises(ValueError, match="'extra' is missing in seed\\(s\\) at position \\[0, 2\\]"):
        aggregate_seeds([{"a": 1.0}, {"a": 2.0, "extra": 1.0}, {"a": 3.0}])


@pytest.mark.parametrize(
    ("per_seed", "message"),
    [
        ([], "non-empty list"),
        ({"m": 1.0}, "non-empty list"),
        ([{"m": 1.0}, [("m", 2.0)]], r"per_seed\[1\] must be a dict"),
        ([{"m": True}], "must be a number"),
        ([{"m": "0.5"}], "must be a number"),
        ([{"m": None}], "must be a number"),
    ],
)
def test_bad_input_is_a_value_error(per_seed, message):
    with pytest.raises(ValueError, match=message):
        aggregate_seeds(per_seed)


def test_summary_rows():
    agg = aggregate_seeds([{"a": 1.0, "b": 0.5}, {"a": 3.0, "b": 0.5}])
    rows = summary_rows(agg, experiment="e1", dataset="emoji")
    assert rows == [
        {
            "experiment": "e1",
            "dataset": "emoji",
            "metric": "a",
            "mean": 2.0,
            "std": pytest.approx(math.sqrt(2)),
            "n": 2,
        },
        {"experiment": "e1", "dataset": "emoji", "metric": "b", "mean": 0.5, "std": 0.0, "n": 2},
    ]
    assert summary_rows({}) == []
    with pytest.raises(ValueError, match="\\['mean'\\]"):
        summary_rows(agg, mean=1)
