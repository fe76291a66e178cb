"""Tests of evaluation.ablation: metrics-table rows grouped into family tables, plots and reports."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from evaluation.ablation import (
    _counterpart,
    _family,
    _grouped,
    ablation_report,
    ablation_table,
    plot_ablation,
    scored_datasets,
    selection_markdown,
    val_selection,
)
from evaluation.report import DPI, FIGSIZE


def _metric_rows(experiment: str, family: str, variable: str, metrics: dict) -> list[dict]:
    """One experiment's rows as the lake's metrics table holds them (extra columns included)."""
    return [
        {
            "experiment": experiment,
            "family": family,
            "variable": variable,
            "dataset": "emoji",
            "split": "test",
            "metric": name,
            "value": value,
            "mlflow_run_id": "run-" + experiment,
        }
        for name, value in metrics.items()
    ]


def _rows() -> list[dict]:
    rows = []
    # Deliberately out of order, with a repeated N (two seeds).
    for name, n, t2i, i2t in [
        ("q_100k", "100000", 0.5, 0.6667),
        ("q_1k_s0", "1000", 0.015, 0.007),
        ("q_10k", "10000", 0.07, 0.0667),
        ("q_1k_s1", "1000", 0.035, 0.009),
    ]:
        rows += _metric_rows(
            name,
            "quantity",
            n,
            {
                "t2i_recall_at_1": t2i,
                "chance_t2i_recall_at_1": 0.0002,
                "test_items": 5000.0,
                "i2t_recall_at_1": i2t,
                "t2i_mean_rank": 100_000 / int(n),
            },
        )
    for variant, r1 in [("raw", 0.23), ("clean", 0.27), ("clean, quality>=0.5", 0.29)]:
        rows += _metric_rows(
            f"c_{variant[:5]}{len(variant)}",
            "quality",
            variant,
            {"t2i_recall_at_1": r1, "i2t_recall_at_1": 0.25},
        )
    return rows


def _assert_png(path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        assert im.size == (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))
        assert len(im.convert("RGB").getcolors(maxcolors=1_000_000)) > 10


def _parse(md: str) -> tuple[list[str], list[list[str]]]:
    lines = md.splitlines()
    split = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return split[0], split[2:]


def test_quantity_rows_are_ordered_by_n():
    header, body = _parse(ablation_table(_rows(), "quantity"))
    assert header == [
        "experiment",
        "quantity",
        "t2i R@1 (%)",
        "i2t R@1 (%)",
        "t2i mean rank",
        "chance t2i R@1 (%)",
        "test_items",
    ]
    # Ascending N; the two 1k seeds keep the order they came in.
    assert [r[0] for r in body] == ["q_1k_s0", "q_1k_s1", "q_10k", "q_100k"]
    assert [r[1] for r in body] == ["1000", "1000", "10000", "100000"]


def test_values_are_percent_and_the_best_is_bold():
    _, body = _parse(ablation_table(_rows(), "quantity"))
    assert body[0][2:] == ["1.5", "0.7", "100.0", "0.02", "5000"]
    # Highest recall and lowest rank are the best; chance is not a result to single out.
    assert body[3][2:] == ["**50.0**", "**66.7**", "**1.0**", "0.02", "5000"]


def test_categorical_family_keeps_the_given_order_and_ignores_other_families():
    md = ablation_table(_rows(), "quality")
    header, body = _parse(md)
    assert header[:2] == ["experiment", "quality"]
    assert [r[1] for r in body] == ["raw", "clean", "clean, quality>=0.5"]
    assert [r[2] for r in body] == ["23.0", "27.0", "**29.0**"]
    # Equal values everywhere: nothing to single out.
    assert [r[3] for r in body] == ["25.0", "25.0", "25.0"]
    assert not any(r[0].startswith("q_") for r in body)
    # Text columns left-aligned, numbers right-aligned.
    assert re.fullmatch(r"\|(:-+\|){2}(-+:\|){2}", md.splitlines()[1])


def test_a_metric_an_experiment_lacks_is_a_dash():
    rows = _rows() + _metric_rows("q_50k", "quantity", "50000", {"t2i_recall_at_1": 0.3})
    _, body = _parse(ablation_table(rows, "quantity"))
    assert body[3][:4] == ["q_50k", "50000", "30.0", "–"]


def test_bad_rows_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="families present: \\['quality', 'quantity'\\]"):
        ablation_table(_rows(), "diversity")
    with pytest.raises(ValueError, match="empty"):
        ablation_table([], "quantity")
    with pytest.raises(ValueError, match="lacks \\['metric'\\]"):
        ablation_table([{"experiment": "a", "family": "quantity", "variable": "1", "value": 1.0}], "quantity")
    moved = _rows() + _metric_rows("q_10k", "quantity", "20000", {"t2i_median_rank": 2.0})
    with pytest.raises(ValueError, match="'q_10k' has rows with variable '10000' and '20000'"):
        ablation_table(moved, "quantity")
    twice = _rows() + _metric_rows("q_10k", "quantity", "10000", {"t2i_recall_at_1": 0.08})
    with pytest.raises(ValueError, match="metric 't2i_recall_at_1' twice"):
        ablation_table(twice, "quantity")
    in_percent = [r | {"value": 50.0} if r["metric"] == "t2i_recall_at_1" else r for r in _rows()]
    with pytest.raises(ValueError, match="percent"):
        ablation_table(in_percent, "quantity")
    with pytest.raises(ValueError, match="percent"):
        plot_ablation(in_percent, "quantity", tmp_path / "p.png")
    with pytest.raises(ValueError, match="no numeric 't2i_recall_at_5'"):
        plot_ablation(_rows(), "quantity", tmp_path / "p.png", metric="t2i_recall_at_5")
    with pytest.raises(ValueError, match="percent"):
        ablation_report(in_percent, "quantity", tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("family", "metric"),
    [("quality", "i2t_recall_at_1"), ("quantity", "t2i_mean_rank")],
)
def test_plots_are_valid_pngs(tmp_path, family, metric):
    _assert_png(plot_ablation(_rows(), family, tmp_path / f"{family}.png", metric=metric))


def test_plot_is_deterministic_and_depends_on_the_data(tmp_path):
    a = plot_ablation(_rows(), "quantity", tmp_path / "a.png").read_bytes()
    b = plot_ablation(_rows(), "quantity", tmp_path / "b.png").read_bytes()
    changed = [
        r | {"value": 0.9} if (r["experiment"], r["metric"]) == ("q_100k", "t2i_recall_at_1") else r
        for r in _rows()
    ]
    c = plot_ablation(changed, "quantity", tmp_path / "c.png").read_bytes()
    assert a == b
    assert a != c


def test_numeric_families_label_the_log_axis_with_their_values():
    from matplotlib.figure import Figure

    from evaluation.ablation import _log_x

    ax = Figure().subplots()
    _log_x(ax, [512.0, 64.0, 128.0, 2000.0, 0.5, 128.0])
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.5", "64", "128", "512", "2,000"]
    assert list(ax.get_xticks()) == [0.5, 64.0, 128.0, 512.0, 2000.0]
    many = Figure().subplots()
    _log_x(many, [2.0**i for i in range(20)])  # too many to label each: matplotlib's own ticks
    assert len(many.get_xticks()) < 20


def test_report_writes_the_table_and_the_plot(tmp_path):
    out = tmp_path / "ablations"
    md_path = ablation_report(_rows(), "quantity", out)
    assert md_path == out / "quantity.md"
    md = md_path.read_text(encoding="utf-8")
    assert md.startswith("# Ablation: quantity\n")
    assert ablation_table(_rows(), "quantity") in md
    assert "4 experiments" in md
    assert re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md) == ["quantity.png"]
    _assert_png(out / "quantity.png")  # Recall@1 of the quantity family, both directions
    assert sorted(p.name for p in out.iterdir()) == ["quantity.md", "quantity.png"]
    # A family name that is no file name is made into one.
    rows = [r | {"family": "audio window/2"} for r in _rows() if r["family"] == "quality"]
    assert ablation_report(rows, "audio window/2", out).name == "audio_window_2.md"
    assert (out / "audio_window_2.png").exists()


def test_plot_groups_repeated_values_and_keeps_experiments_without_a_variable_apart():
    fam = _family(_rows(), "quantity")
    assert not fam.seeded and not fam.per_dataset
    values, mean, lo, hi = _grouped(fam.exps, "t2i_recall_at_1", fam.numeric)
    assert values == [1000.0, 10000.0, 100000.0]  # the two 1k seeds are one point: mean and range
    np.testing.assert_allclose([mean[0], lo[0], hi[0]], [0.025, 0.015, 0.035])
    # The demo family varies nothing: its experiments (on different datasets) are never averaged.
    demo = _metric_rows("emoji-fusemix", "demo", "", {"t2i_recall_at_1": 0.4})
    demo += _metric_rows("notes-fusemix", "demo", "", {"t2i_recall_at_1": 0.2})
    fam = _family(demo, "demo")
    labels, mean, _, _ = _grouped(fam.exps, "t2i_recall_at_1", fam.numeric)
    assert not fam.numeric and labels == ["emoji-fusemix", "notes-fusemix"]
    np.testing.assert_allclose(mean, [0.4, 0.2])


def test_counterpart_direction():
    assert _counterpart("t2i_recall_at_1") == "i2t_recall_at_1"
    assert _counterpart("a2t_median_rank") == "t2a_median_rank"
    assert _counterpart("chance_t2i_recall_at_5") == "chance_i2t_recall_at_5"
    assert _counterpart("val_loss") is None


def test_numpy_values_count_as_numbers():
    rows = []
    for n, r in [(500, 0.25), (50, 0.125)]:
        rows += _metric_rows(f"n{n}", "quantity", np.int64(n), {"t2i_recall_at_1": np.float32(r)})
    _, body = _parse(ablation_table(rows, "quantity"))
    assert [r[:3] for r in body] == [["n50", "50", "12.5"], ["n500", "500", "**25.0**"]]


# ----------------------------------------------------------------------------------------------- seeds


def _seeded_rows() -> list[dict]:
    """Two experiments of the quantity family, with per-seed rows on two datasets and in two galleries,
    and the evaluation's aggregated rows (seed None) beside them, holding values that must not be used."""
    rows = []
    per_seed = {
        # experiment, N: [(t2i R@1, i2t R@1, t2i mean rank) per seed]
        ("n500", "500"): [(0.10, 0.20, 3.0), (0.14, 0.22, 5.0), (0.12, 0.24, 4.0)],
        ("n50", "50"): [(0.02, 0.05, 9.0), (0.04, 0.05, 7.0)],
    }
    for (name, n), seeds in per_seed.items():
        for dataset, factor in (("emoji", 1.0), ("noto", 0.5)):
            for gallery, shift in (("pooled", 0.0), ("per_source", 0.01)):
                for seed, (t2i, i2t, rank) in enumerate(seeds):
                    values = {
                        "t2i_recall_at_1": factor * t2i + shift,
                        "i2t_recall_at_1": factor * i2t + shift,
                        "t2i_mean_rank": rank,
                        "chance_t2i_recall_at_1": 0.001,
                    }
                    rows += [
                        r | {"dataset": dataset, "gallery": gallery, "seed": seed, "std": None, "n_seeds": 1}
                        for r in _metric_rows(name, "quantity", n, values)
                    ]
                rows += [
                    r
                    | {
                        "dataset": dataset,
                        "gallery": gallery,
                        "seed": None,
                        "std": 0.5,
                        "n_seeds": len(seeds),
                    }
                    for r in _metric_rows(name, "quantity", n, {"t2i_recall_at_1": 0.99})
                ]
    return rows


def test_seeds_show_as_mean_and_sample_std():
    header, body = _parse(ablation_table(_seeded_rows(), "quantity", dataset="emoji"))
    assert header == [
        "experiment",
        "quantity",
        "seeds",
        "t2i R@1 (%)",
        "i2t R@1 (%)",
        "t2i mean rank",
        "chance t2i R@1 (%)",
    ]
    # n500: t2i 10, 14, 12 % -> 12.0 ± 2.0; i2t 20, 22, 24 -> 22.0 ± 2.0; ranks 3, 5, 4 -> 4.0 ± 1.0.
    # n50: t2i 2, 4 -> 3.0 ± 1.4 (sqrt(2)); i2t 5, 5 -> 5.0 ± 0.0; ranks 9, 7 -> 8.0 ± 1.4.
    # Best by the mean; chance shows its mean only; the aggregated rows (0.99) are not used.
    assert body == [
        ["n50", "50", "2", "3.0 ± 1.4", "5.0 ± 0.0", "8.0 ± 1.4", "0.1"],
        ["n500", "500", "3", "**12.0 ± 2.0**", "**22.0 ± 2.0**", "**4.0 ± 1.0**", "0.1"],
    ]


def test_seed_error_bars_are_the_std_not_the_range():
    fam = _family(_seeded_rows(), "quantity", dataset="emoji")
    assert fam.seeded and not fam.per_dataset
    values, mean, lo, hi = _grouped(fam.exps, "t2i_recall_at_1", fam.numeric)
    assert values == [50.0, 500.0]
    np.testing.assert_allclose(mean, [0.03, 0.12])
    # mean ± std (0.01 * sqrt(2) and 0.02), where the range would be 0.02-0.04 and 0.10-0.14.
    np.testing.assert_allclose(lo, [0.03 - 0.01 * np.sqrt(2), 0.10])
    np.testing.assert_allclose(hi, [0.03 + 0.01 * np.sqrt(2), 0.14])
    # Two experiments of the same value, each over seeds: the std of all their seeds together.
    both = [r for r in _seeded_rows() if r["dataset"] == "emoji"]
    both = [r | {"variable": "500"} if r["experiment"] == "n50" else r for r in both]
    fam = _family(both, "quantity")
    _, mean, lo, _ = _grouped(fam.exps, "t2i_recall_at_1", fam.numeric)
    pooled = np.array([0.10, 0.14, 0.12, 0.02, 0.04])
    np.testing.assert_allclose([mean[0], mean[0] - lo[0]], [pooled.mean(), pooled.std(ddof=1)])


def test_other_galleries_and_aggregated_only_rows():
    _, body = _parse(ablation_table(_seeded_rows(), "quantity", dataset="noto", gallery="per_source"))
    # noto halves the recalls, per_source adds 1 point: n500 t2i 5, 7, 6 % + 1 -> 7.0 ± 1.0.
    assert body[1][:4] == ["n500", "500", "3", "**7.0 ± 1.0**"]
    with pytest.raises(
        ValueError, match="no rows of gallery 'per_concept'; galleries present: \\['pooled', 'per_source'\\]"
    ):
        ablation_table(_seeded_rows(), "quantity", gallery="per_concept")
    with pytest.raises(ValueError, match="no rows on dataset 'clips'"):
        ablation_table(_seeded_rows(), "quantity", dataset="clips")
    # Only the aggregated rows (as a summary table might hold them): their value ± their std.
    agg = [
        r
        for r in _seeded_rows()
        if r["seed"] is None and r["dataset"] == "emoji" and r["gallery"] == "pooled"
    ]
    header, body = _parse(ablation_table(agg, "quantity"))
    assert header[2] == "seeds"
    assert [r[2:] for r in body] == [["2", "99.0 ± 50.0"], ["3", "99.0 ± 50.0"]]


def test_several_scored_datasets_are_shown_per_dataset(tmp_path):
    rows = [r for r in _seeded_rows() if r["gallery"] == "pooled"]
    assert scored_datasets(rows, "quantity") == ["emoji", "noto"]
    header, body = _parse(ablation_table(rows, "quantity"))
    assert header[:4] == ["experiment", "dataset", "quantity", "seeds"]
    assert [r[:2] for r in body] == [["n50", "emoji"], ["n500", "emoji"], ["n50", "noto"], ["n500", "noto"]]
    # Best per dataset: n500 on both, with noto's halved recalls 5, 7, 6 % -> 6.0 ± 1.0.
    assert [r[4] for r in body] == ["3.0 ± 1.4", "**12.0 ± 2.0**", "1.5 ± 0.7", "**6.0 ± 1.0**"]
    with pytest.raises(ValueError, match="several datasets \\['emoji', 'noto'\\]: plot one at a time"):
        plot_ablation(rows, "quantity", tmp_path / "p.png")
    _assert_png(plot_ablation(rows, "quantity", tmp_path / "noto.png", dataset="noto"))

    md_path = ablation_report(rows, "quantity", tmp_path / "out")
    md = md_path.read_text(encoding="utf-8")
    assert md_path.name == "quantity.md"
    assert "2 experiments" in md and "2 scored datasets" in md and "standard deviation" in md
    assert re.findall(r"^## (.+)$", md, flags=re.M) == ["emoji", "noto"]
    assert ablation_table(rows, "quantity", dataset="noto") in md
    assert re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md) == ["quantity_emoji.png", "quantity_noto.png"]
    for png in ("quantity_emoji.png", "quantity_noto.png"):
        _assert_png(tmp_path / "out" / png)
    # Another gallery gets its own report beside it.
    other = ablation_report(_seeded_rows(), "quantity", tmp_path / "out", gallery="per_source")
    assert other.name == "quantity_per_source.md"
    assert "Gallery: per_source" in other.read_text(encoding="utf-8")
    assert (tmp_path / "out" / "quantity_per_source_noto.png").exists()


def test_one_dataset_per_experiment_is_one_table():
    # The demo family: each experiment on its own dataset, as before datasets were a dimension.
    demo = _metric_rows("emoji-fusemix", "demo", "", {"t2i_recall_at_1": 0.4})
    demo += [
        r | {"dataset": "notes"} for r in _metric_rows("notes-fusemix", "demo", "", {"t2i_recall_at_1": 0.2})
    ]
    assert scored_datasets(demo, "demo") == [None]
    header, body = _parse(ablation_table(demo, "demo"))
    assert header == ["experiment", "demo", "t2i R@1 (%)"]
    assert [r[0] for r in body] == ["emoji-fusemix", "notes-fusemix"]


def test_seed_rows_are_checked(tmp_path):
    rows = _seeded_rows()
    twice = rows + [rows[0] | {"value": 0.5}]
    with pytest.raises(
        ValueError, match="'n500' on dataset 'emoji' has metric 't2i_recall_at_1' twice for seed 0"
    ):
        ablation_table(twice, "quantity")
    missing = [r for r in rows if not (r["seed"] == 1 and r["metric"] == "i2t_recall_at_1")]
    with pytest.raises(ValueError, match="experiment 'n500': metric 'i2t_recall_at_1' is missing in seed"):
        ablation_table(missing, "quantity", dataset="emoji")
    with pytest.raises(ValueError, match="rows\\[0\\] has seed 'a'"):
        ablation_table([rows[0] | {"seed": "a"}] + rows[1:], "quantity")
    # A seed read back as a float (pandas upcasts nullable ints) still counts.
    as_float = [r | {"seed": float(r["seed"])} if r["seed"] is not None else r for r in rows]
    assert ablation_table(as_float, "quantity") == ablation_table(rows, "quantity")


def test_variables_that_start_with_a_number_are_ordered_by_it():
    rows = []
    for name, variable in [("q1000-f", "1,000 FuseMix"), ("q2000-n", "2,000 no mixup"), ("q500-f", "500 FuseMix"),
                           ("q1000-n", "1,000 no mixup"), ("q500-n", "500 no mixup")]:  # fmt: skip
        rows += _metric_rows(name, "mixed", variable, {"t2i_recall_at_1": 0.2})
    _, body = _parse(ablation_table(rows, "mixed"))
    assert [r[1] for r in body] == [
        "500 FuseMix", "500 no mixup", "1,000 FuseMix", "1,000 no mixup", "2,000 no mixup",
    ]  # fmt: skip


# ------------------------------------------------------------------------------ selection on validation


def _sweep_rows() -> list[dict]:
    """A sweep where the test split and the val split disagree: `b` is best on test, `c` on val, and
    `a` lies within one std of `c` on val. Per-seed val rows (3 seeds) plus aggregated rows holding
    values that must not be used."""
    rows = []
    val = {"a": [3.05, 3.15, 3.25], "b": [2.5, 2.6, 2.7], "c": [3.1, 3.3, 3.2]}
    test = {"a": 0.40, "b": 0.55, "c": 0.45}
    for name in ("a", "b", "c"):
        rows += [
            r | {"seed": None, "std": 0.0, "n_seeds": 3}
            for r in _metric_rows(
                name, "sweep", f"knob {name}", {"t2i_recall_at_1": test[name], "i2t_recall_at_1": 0.3}
            )
        ]
        for seed, v in enumerate(val[name]):
            rows += [
                r | {"split": "val", "seed": seed, "std": None, "n_seeds": 1}
                for r in _metric_rows(
                    name,
                    "sweep",
                    f"knob {name}",
                    {"rsum": v, "t2i_recall_at_1": v / 6, "i2t_recall_at_1": 0.1},
                )
            ]
        rows += [
            r | {"split": "val", "seed": None, "std": 9.0, "n_seeds": 3}
            for r in _metric_rows(name, "sweep", f"knob {name}", {"rsum": 0.0})
        ]
    return rows


def test_selection_ranks_by_validation_r_sum_never_by_the_test_split():
    ranked = val_selection(_sweep_rows(), "sweep")
    assert [e["experiment"] for e in ranked] == ["c", "a", "b"]
    mean, std, n = ranked[0]["val"]
    assert (mean, n) == (pytest.approx(3.2), 3) and std == pytest.approx(np.std([3.1, 3.3, 3.2], ddof=1))
    assert ranked[0]["test_t2i"] == pytest.approx(0.45) and ranked[2]["test_t2i"] == pytest.approx(0.55)
    assert ranked[0]["val_t2i"] == pytest.approx(3.2 / 6)
    assert val_selection(_sweep_rows(), "quantity") == []  # no val rows for that family


def test_val_rows_stay_out_of_the_tables_and_the_report_names_the_choice(tmp_path):
    rows = _sweep_rows()
    header, body = _parse(ablation_table(rows, "sweep"))
    assert header == ["experiment", "sweep", "seeds", "t2i R@1 (%)", "i2t R@1 (%)"]  # no val metric
    assert [r[3] for r in body] == ["40.0 ± 0.0", "**55.0 ± 0.0**", "45.0 ± 0.0"]  # test values only
    text = ablation_report(rows, "sweep", tmp_path).read_text()
    section = text.split("## Chosen on validation", 1)[1]
    assert "Chosen on validation: **knob c** (c), val R-sum 320.0 ± 10.0" in section
    # a (315.0) is within one std (10.0) of c; b (260.0) is not.
    assert "not distinguishable on validation: knob a." in section
    lines = [line for line in section.splitlines() if line.startswith("|")]
    assert [line.split("|")[2].strip() for line in lines[2:]] == ["c", "a", "b"]


def test_selection_without_seeds_says_its_spread_is_unknown():
    rows = [
        r for r in _sweep_rows() if r["seed"] in (0, None) and not (r["split"] == "val" and r["seed"] is None)
    ]
    ranked = val_selection(rows, "sweep")
    assert [e["val"][2] for e in ranked] == [1, 1, 1] and ranked[0]["experiment"] == "c"
    assert "spread of the choice is unknown" in selection_markdown(ranked)
    assert selection_markdown([]) == ""
