"""Tests of evaluation.ablation: family tables ordered and formatted, plots written, bad rows refused."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from evaluation.ablation import _counterpart, ablation_table, plot_ablation
from evaluation.report import DPI, FIGSIZE


def _rows() -> list[dict]:
    rows = []
    # Deliberately out of order, with a repeated N (two seeds).
    for name, n, t2i, i2t in [
        ("q_100k", 100_000, 0.5, 0.6667),
        ("q_1k_s0", 1_000, 0.015, 0.007),
        ("q_10k", 10_000, 0.07, 0.0667),
        ("q_1k_s1", 1_000, 0.035, 0.009),
    ]:
        rows.append(
            {
                "experiment": name,
                "family": "quantity",
                "variable": "n_pairs",
                "value": n,
                "t2i_recall_at_1": t2i,
                "i2t_recall_at_1": i2t,
                "t2i_mean_rank": 100_000 / n,
            }
        )
    for variant, r1 in [("raw", 0.23), ("cleaned", 0.27), ("synthetic", 0.29)]:
        rows.append(
            {
                "experiment": f"c_{variant}",
                "family": "quality",
                "variable": "caption quality",
                "value": variant,
                "t2i_recall_at_1": r1,
                "i2t_recall_at_1": 0.25,
            }
        )
    return rows


def _parse(md: str) -> tuple[list[str], list[list[str]]]:
    lines = md.splitlines()
    split = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return split[0], split[2:]


def test_quantity_rows_are_ordered_by_n():
    header, body = _parse(ablation_table(_rows(), "quantity"))
    assert header == ["experiment", "n_pairs", "t2i R@1 (%)", "i2t R@1 (%)", "t2i mean rank"]
    # Ascending N; the two 1k seeds keep the order they were given in.
    assert [r[0] for r in body] == ["q_1k_s0", "q_1k_s1", "q_10k", "q_100k"]
    assert [r[1] for r in body] == ["1000", "1000", "10000", "100000"]


def test_values_are_percent_and_the_best_is_bold():
    _, body = _parse(ablation_table(_rows(), "quantity"))
    assert body[0][2:] == ["1.5", "0.7", "100.0"]
    # Highest recall and lowest rank are the best.
    assert body[3][2:] == ["**50.0**", "**66.7**", "**1.0**"]


def test_categorical_family_keeps_the_given_order_and_ignores_other_families():
    header, body = _parse(ablation_table(_rows(), "quality"))
    assert header[:2] == ["experiment", "caption quality"]
    assert [r[1] for r in body] == ["raw", "cleaned", "synthetic"]
    assert [r[2] for r in body] == ["23.0", "27.0", "**29.0**"]
    # Equal values everywhere: nothing to single out.
    assert [r[3] for r in body] == ["25.0", "25.0", "25.0"]
    assert not any(r[0].startswith("q_") for r in body)


def test_bad_rows_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="families present: \\['quality', 'quantity'\\]"):
        ablation_table(_rows(), "diversity")
    with pytest.raises(ValueError, match="empty"):
        ablation_table([], "quantity")
    with pytest.raises(ValueError, match="lacks \\['variable'\\]"):
        ablation_table([{"experiment": "a", "family": "quantity", "value": 1}], "quantity")
    mixed = _rows()
    mixed[0] = mixed[0] | {"variable": "n_items"}
    with pytest.raises(ValueError, match="mixes variables"):
        ablation_table(mixed, "quantity")
    in_percent = _rows()
    in_percent[0] = in_percent[0] | {"t2i_recall_at_1": 50.0}
    with pytest.raises(ValueError, match="percent"):
        ablation_table(in_percent, "quantity")
    with pytest.raises(ValueError, match="percent"):
        plot_ablation(in_percent, "quantity", tmp_path / "p.png")
    with pytest.raises(ValueError, match="no numeric 't2i_recall_at_5'"):
        plot_ablation(_rows(), "quantity", tmp_path / "p.png", metric="t2i_recall_at_5")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("family", "metric"),
    [("quantity", "t2i_recall_at_1"), ("quality", "i2t_recall_at_1"), ("quantity", "t2i_mean_rank")],
)
def test_plots_are_valid_pngs(tmp_path, family, metric):
    path = plot_ablation(_rows(), family, tmp_path / f"{family}.png", metric=metric)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        assert im.size == (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))
        assert len(im.convert("RGB").getcolors(maxcolors=1_000_000)) > 10


def test_plot_is_deterministic_and_depends_on_the_data(tmp_path):
    a = plot_ablation(_rows(), "quantity", tmp_path / "a.png").read_bytes()
    b = plot_ablation(_rows(), "quantity", tmp_path / "b.png").read_bytes()
    changed = _rows()
    changed[0] = changed[0] | {"t2i_recall_at_1": 0.9}
    c = plot_ablation(changed, "quantity", tmp_path / "c.png").read_bytes()
    assert a == b
    assert a != c


def test_counterpart_direction():
    assert _counterpart("t2i_recall_at_1") == "i2t_recall_at_1"
    assert _counterpart("a2t_median_rank") == "t2a_median_rank"
    assert _counterpart("val_loss") is None


def test_numpy_values_count_as_numbers():
    rows = [
        {
            "experiment": f"n{n}",
            "family": "quantity",
            "variable": "n_pairs",
            "value": np.int64(n),
            "t2i_recall_at_1": np.float32(r),
        }
        for n, r in [(500, 0.25), (50, 0.125)]
    ]
    _, body = _parse(ablation_table(rows, "quantity"))
    assert [r[:3] for r in body] == [["n50", "50", "12.5"], ["n500", "500", "**25.0**"]]
