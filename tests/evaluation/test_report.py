"""Tests of evaluation.report: PNGs written and readable, markdown values, PCA, bad input."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from evaluation.examples import query_examples
from evaluation.report import (
    DPI,
    FIGSIZE,
    _chance_lines,
    format_chance,
    format_percent,
    markdown_table,
    pca_project,
    plot_loss,
    plot_recall_at_k,
    plot_shared_space,
    retrieval_table_markdown,
    split_retrieval_metrics,
    write_report,
)
from evaluation.retrieval import PairedSplit, chance_levels, paired_ids, retrieval_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXPECTED_SIZE = (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))


def _history(n: int = 120) -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {
            "step": i,
            "epoch": i // 40,
            "loss": 4.0 / (1 + i / 30) + 0.05 * rng.normal(),
            "temperature": 0.07 - 1e-5 * i,
            "lr": 1e-3,
        }
        for i in range(n)
    ]


def _embeddings(n: int = 60, d: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    items = rng.normal(size=(n, d)).astype(np.float32)
    return items, (items + 0.3 * rng.normal(size=(n, d))).astype(np.float32)


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.load()
        assert im.size == EXPECTED_SIZE
        # A blank canvas would be one colour; a drawn plot has many.
        assert len(im.convert("RGB").getcolors(maxcolors=1_000_000)) > 10


def test_plots_are_valid_pngs_of_the_expected_size(tmp_path):
    hist = _history()
    val = [{"step": s, "score": 0.1 + s / 1000} for s in (40, 80, 120)]
    items, texts = _embeddings()
    figs_before = plt.get_fignums()
    paths = [
        plot_loss(hist, val, tmp_path / "loss.png"),
        plot_recall_at_k(
            {"t2i": {1: 0.3, 5: 0.6, 10: 0.7}, "i2t": {1: 0.35, 5: 0.65, 10: 0.8}},
            tmp_path / "sub" / "recall.png",
            chance={1: 0.01, 5: 0.05, 10: 0.1},
        ),
        plot_shared_space(items, texts, tmp_path / "space.png", labels=[f"item {i}" for i in range(60)]),
    ]
    for p in paths:
        _assert_png(p)
    assert not list(tmp_path.rglob("*.tmp"))
    # Figures are made without pyplot, so none is left open in its registry.
    assert plt.get_fignums() == figs_before


def _multi_match() -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """20 items, 50 captions; every caption paired with its own item and some with a second one;
    item 19 and caption 49 in no pair."""
    items, _ = _embeddings(n=20)
    rng = np.random.default_rng(1)
    owner = rng.integers(0, 20, size=50)
    texts = items[owner] + 0.1 * rng.normal(size=(50, items.shape[1]))
    pi = np.concatenate([owner[:49], rng.integers(0, 19, size=10)])
    pt = np.concatenate([np.arange(49), rng.integers(0, 49, size=10)])
    return items, texts, (pi, pt)


def test_shared_space_with_multi_match_pairs_is_deterministic_for_a_seed(tmp_path):
    # Fewer points drawn than there are: the captions' items are drawn with them.
    items, texts, pairs = _multi_match()
    a = plot_shared_space(items, texts, tmp_path / "a.png", max_points=10, seed=3, pairs=pairs)
    _assert_png(a)
    b = plot_shared_space(items, texts, tmp_path / "b.png", max_points=10, seed=3, pairs=pairs)
    c = plot_shared_space(items, texts, tmp_path / "c.png", max_points=10, seed=4, pairs=pairs)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_shared_space_refuses_bad_pairs(tmp_path):
    items, texts, (pi, pt) = _multi_match()
    with pytest.raises(ValueError, match="differ in length"):
        plot_shared_space(items, texts, tmp_path / "x.png", pairs=(pi, pt[:10]))
    with pytest.raises(ValueError, match="pair_texts has indices outside \\[0, 50\\)"):
        plot_shared_space(items, texts, tmp_path / "x.png", pairs=(pi, pt + 50))
    with pytest.raises(ValueError, match="pair_items must be a 1-D int array"):
        plot_shared_space(items, texts, tmp_path / "x.png", pairs=(pi.astype(float), pt))
    with pytest.raises(ValueError, match="pairs must be"):
        plot_shared_space(items, texts, tmp_path / "x.png", pairs=pi)
    assert not (tmp_path / "x.png").exists()


def test_collapsed_embeddings_still_give_a_map(tmp_path):
    # A collapsed model puts every point in one place: no variance to explain, and no error either.
    proj, ratio = pca_project(np.ones((12, 4)), 2)
    assert not proj.any() and not ratio.any()
    one = np.ones((6, 4), dtype=np.float32)
    _assert_png(plot_shared_space(one, one, tmp_path / "c.png", pairs=(np.arange(6), np.arange(6))))


def test_pca_of_points_on_a_line_is_a_line():
    rng = np.random.default_rng(0)
    direction = rng.normal(size=10)
    direction /= np.linalg.norm(direction)
    t = rng.uniform(-5, 5, size=40)
    x = 3.0 + t[:, None] * direction[None, :]  # [40, 10], all on one line
    proj, ratio = pca_project(x, 2)
    assert proj.shape == (40, 2)
    np.testing.assert_allclose(proj[:, 1], 0.0, atol=1e-9)
    # The first component is the position along the line (up to the fixed sign), centred.
    np.testing.assert_allclose(np.abs(proj[:, 0]), np.abs(t - t.mean()), atol=1e-9)
    np.testing.assert_allclose(ratio, [1.0, 0.0], atol=1e-12)


def test_pca_of_a_rotated_plane_keeps_distances_and_a_fixed_sign():
    rng = np.random.default_rng(1)
    plane = rng.normal(size=(30, 2)) * [3.0, 1.0]
    basis, _ = np.linalg.qr(rng.normal(size=(8, 2)))  # orthonormal [8, 2]
    x = plane @ basis.T
    proj, _ = pca_project(x, 2)
    d_in = np.linalg.norm(x[:, None] - x[None], axis=-1)
    d_out = np.linalg.norm(proj[:, None] - proj[None], axis=-1)
    np.testing.assert_allclose(d_out, d_in, atol=1e-9)
    flipped, _ = pca_project(-x, 2)
    # Flipping the data must not flip the picture: components are sign-normalised by their loadings.
    np.testing.assert_allclose(flipped, -proj, atol=1e-9)
    with pytest.raises(ValueError, match="n_components"):
        pca_project(x, 9)


def test_percent_format_and_table_values():
    assert format_percent(0.4567) == "45.7"
    assert format_percent(1.0) == "100.0"
    rows = [
        {
            "experiment": "base",
            "direction": "t2i",
            "R@1": 0.4567,
            "R@5": 0.8,
            "R@10": 0.9,
            "mean rank": 3.24,
            "median rank": 2,
        },
        {
            "experiment": "base",
            "direction": "i2t",
            "R@1": 0.5,
            "R@5": 0.75,
            "R@10": 0.875,
            "mean rank": 2.0,
            "median rank": 1,
        },
    ]
    md = retrieval_table_markdown(rows)
    lines = md.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["experiment", "direction", "R@1 (%)", "R@5 (%)", "R@10 (%)", "mean rank", "median rank"]
    # Text columns left-aligned, numbers right-aligned (pipe format alignment markers).
    assert re.fullmatch(r"\|(:-+\|){2}(-+:\|){5}", lines[1])
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells == ["base", "t2i", "45.7", "80.0", "90.0", "3.2", "2.0"]
    assert [c.strip() for c in lines[3].strip("|").split("|")][2:5] == ["50.0", "75.0", "87.5"]
    # All lines of a padded table have the same width.
    assert len({len(line) for line in lines}) == 1


def test_table_from_flat_metric_names():
    metrics = {
        "t2i_recall_at_1": 0.25,
        "t2i_recall_at_10": 0.5,
        "i2t_recall_at_1": 0.125,
        "test_t2a_median_rank": 4.0,
        "val_loss": 1.5,
    }
    rows, other = split_retrieval_metrics(metrics)
    assert other == {"val_loss": 1.5}
    assert {"experiment": "test", "direction": "t2a", "median rank": 4.0} in rows
    md = retrieval_table_markdown(metrics)
    assert "25.0" in md and "50.0" in md and "12.5" in md
    assert "val_loss" not in md
    with pytest.raises(ValueError, match="no retrieval metrics"):
        retrieval_table_markdown({"val_loss": 1.0})


def test_table_refuses_percentages_and_empty_rows():
    with pytest.raises(ValueError, match="percent"):
        retrieval_table_markdown([{"direction": "t2i", "R@1": 45.7}])
    with pytest.raises(ValueError, match="at least one row"):
        retrieval_table_markdown([])


def test_markdown_table_keeps_cells_as_given():
    md = markdown_table(["name", "value"], [["a", "100.0"], ["b", "1e3"], ["c", "–"]], [False, True])
    assert md.splitlines() == [
        "| name   |   value |",
        "|:-------|--------:|",
        "| a      |   100.0 |",
        "| b      |     1e3 |",
        "| c      |       – |",
    ]
    with pytest.raises(ValueError, match="one entry per header column"):
        markdown_table(["a", "b"], [["1"]], [False, True])
    with pytest.raises(ValueError, match="one entry per header column"):
        markdown_table(["a", "b"], [["1", "2"]], [False])


def test_chance_format():
    assert format_chance(0.25) == "25.0"
    assert format_chance(0.000123) == "0.012"
    assert format_chance(0.0) == "0.0"
    # One chance curve for every direction, or one per direction (as chance_levels gives).
    assert _chance_lines({1: 1 / 40, 5: 5 / 40, 10: 0.00001}) == [
        "Chance level: R@1 2.5, R@5 12.5, R@10 0.001."
    ]
    assert _chance_lines({"t2a": {1: 0.5}, "a2t": {1: 0.25}}) == [
        "Chance level (t2a): R@1 50.0.",
        "Chance level (a2t): R@1 25.0.",
    ]
    assert _chance_lines(None) == []


def test_table_escapes_pipes_in_names():
    md = retrieval_table_markdown([{"experiment": "a|b", "direction": "t2i", "R@1": 0.5}])
    assert "a\\|b" in md
    assert all(line.count("|") - line.count("\\|") == 4 for line in md.splitlines())


@pytest.mark.parametrize(
    ("history", "message"),
    [([], "history is empty"), ([{"step": 0}], "'loss'"), ([{"loss": 1.0}], "'step'")],
)
def test_bad_history_is_a_clear_error(tmp_path, history, message):
    with pytest.raises(ValueError, match=message):
        plot_loss(history, None, tmp_path / "l.png")
    assert not (tmp_path / "l.png").exists()


def test_bad_embeddings_are_clear_errors(tmp_path):
    items, texts = _embeddings()
    with pytest.raises(ValueError, match="dimensions differ"):
        plot_shared_space(items, texts[:, :5], tmp_path / "s.png")
    bad = texts.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        plot_shared_space(items, bad, tmp_path / "s.png")
    with pytest.raises(ValueError, match="labels"):
        plot_shared_space(items, texts, tmp_path / "s.png", labels=["only one"])
    with pytest.raises(ValueError, match="d >= 2"):
        plot_shared_space(items[:, :1], texts[:, :1], tmp_path / "s.png")
    with pytest.raises(ValueError, match="2-D"):
        plot_shared_space(items[0], texts, tmp_path / "s.png")
    with pytest.raises(ValueError, match="fraction"):
        plot_recall_at_k({"t2i": {1: 1.5}}, tmp_path / "r.png")
    with pytest.raises(ValueError, match="K must be"):
        plot_recall_at_k({"t2i": {0: 0.5}}, tmp_path / "r.png")
    assert not list(tmp_path.iterdir())


def _report_kwargs() -> dict:
    items, texts = _embeddings(n=40)
    return {
        "title": "Experiment base | synthetic",
        "metrics": {
            "t2i_recall_at_1": 0.4567,
            "t2i_recall_at_5": 0.8,
            "i2t_recall_at_1": 0.5,
            "t2i_mean_rank": 3.2,
            "val_loss": 1.25,
        },
        "history": _history(60),
        "val_history": [{"step": 30, "score": 0.2}, {"step": 60, "score": 0.35}],
        "curves": {"t2i": {1: 0.4567, 5: 0.8}, "i2t": {1: 0.5}},
        "chance": {1: 1 / 40, 5: 5 / 40, 10: 0.00001},
        "item_emb": items,
        "text_emb": texts,
        "labels": [f"caption {i}" for i in range(40)],
        "params": {"lr": 0.001, "alpha": 1.0, "encoder": "minilm"},
        "examples": [
            {
                "query": "a red | square",
                "results": [
                    {"item": "red square", "score": 0.91234, "hit": True},
                    {"item": "blue circle", "score": 0.5, "hit": False},
                ],
            }
        ],
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"history": [{"step": 0}]}, "'loss'"),
        ({"text_emb": np.zeros((40, 3), dtype=np.float32)}, "dimensions differ"),
        ({"curves": {}}, "curves"),
        ({"examples": [{"query": "q"}]}, "examples"),
        ({"title": "  "}, "title"),
    ],
)
def test_write_report_checks_everything_before_writing(tmp_path, change, message):
    kwargs = _report_kwargs() | change
    with pytest.raises(ValueError, match=message):
        write_report(tmp_path / "r", **kwargs)
    assert not (tmp_path / "r").exists()


def test_write_report_from_a_real_evaluation(tmp_path):
    # What the pipeline does: pairs from ids, metrics, chance levels, examples, one report.
    rng = np.random.default_rng(2)
    media = [f"m{i}" for i in np.repeat(np.arange(30), 2)]
    captions = [f"c{i}" for i in range(60)]
    captions[1] = captions[3] = "shared"  # one caption of two items
    item_ids, text_ids, pi, pt = paired_ids(media, captions)
    items = rng.normal(size=(30, 8)).astype(np.float32)
    first_item = np.zeros(len(text_ids), dtype=np.int64)
    first_item[pt[::-1]] = pi[::-1]
    texts = items[first_item] + 0.8 * rng.normal(size=(len(text_ids), 8)).astype(np.float32)
    split = PairedSplit(item_ids, text_ids, items, texts, pi, pt)
    result = retrieval_metrics(items, texts, pi, pt, normalize=True, progress=False)
    chance = chance_levels(pi, pt, len(item_ids), len(text_ids), result.ks)
    examples = query_examples(split, items, texts, {t: f"caption {t}" for t in text_ids}, 2)
    examples.append(_report_kwargs()["examples"][0])  # a query with a pipe in it
    out = tmp_path / "report"
    md_path = write_report(
        out,
        title="Experiment base | synthetic",
        metrics=result.as_dict()
        | {"chance_t2i_recall_at_1": chance["t2i"][1], "test_items": 30.0, "val_loss": 1.25},
        history=[{"step": i, "loss": 1.0 / (i + 1)} for i in range(5)],  # short, no temperature
        val_history=[{"step": 2, "score": 0.2}, {"step": 4, "score": 0.35}],
        curves={"t2i": dict(result.t2i_recall), "i2t": dict(result.i2t_recall)},
        chance=chance,
        item_emb=items,
        text_emb=texts,
        params={"lr": 0.001, "alpha": 1.0, "encoder": "minilm"},
        pairs=(pi, pt),
        examples=examples,
    )
    assert md_path == out / "report.md"
    md = md_path.read_text(encoding="utf-8")
    assert md.startswith("# Experiment base | synthetic\n")

    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if "| t2i " in line]
    # The chance metric is a row of its own, named by its prefix; recalls in percent, one decimal.
    assert [r[:3] for r in rows] == [
        ["", "t2i", format_percent(result.t2i_recall[1])],
        ["chance", "t2i", "3.4"],
    ]
    assert rows[0][3:5] == [format_percent(result.t2i_recall[k]) for k in (5, 10)]
    assert rows[0][5] == f"{result.t2i_mean_rank:.1f}"
    assert str(result.t2i_recall[1]) not in md
    # One caption names two items: (58 * 1/30 + 2/30) / 59 at K = 1.
    assert chance["t2i"][1] == pytest.approx(60 / 30 / 59)
    for name in ("t2i", "i2t"):
        expected = ", ".join(f"R@{k} {format_chance(chance[name][k])}" for k in (1, 5, 10))
        assert f"Chance level ({name}): {expected}." in md
    assert re.search(r"^\| test_items +\| +30 \|$", md, re.M)
    assert re.search(r"^\| val_loss +\| +1\.25 \|$", md, re.M)
    assert "5 logged steps, last step 4; final loss 0.2; best validation score 0.35 at step 4." in md
    assert re.search(r"^\| encoder +\| minilm +\|$", md, re.M)
    assert "59 captions" in md
    assert md.count("**Query:**") == 3
    assert "red square" in md and "0.912" in md and "**Query:** a red | square" in md
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(links) == ["loss.png", "recall_at_k.png", "shared_space.png"]
    for link in links:
        _assert_png(out / link)
    assert sorted(p.name for p in out.iterdir()) == sorted(links + ["report.md"])


def test_report_without_history_or_chance(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "loss.png").write_bytes(b"left by an earlier run")
    kwargs = _report_kwargs() | {
        "history": [],
        "val_history": [],
        "chance": None,
        "examples": [{"query": "q", "results": [{"item": "a sound of rain", "score": 0.5, "hit": True}]}],
    }
    md = write_report(out, **kwargs).read_text(encoding="utf-8")
    assert "No training history was recorded" in md
    assert "Chance level" not in md
    _assert_png(out / "recall_at_k.png")
    assert "loss.png" not in md
    # The earlier run's loss curve is gone with it.
    assert not (out / "loss.png").exists()
    assert re.search(r"\|\s+1 \| a sound of rain\s* \|\s+0\.500 \| yes\s+\|", md)
    with pytest.raises(ValueError, match="text 'item'"):
        write_report(out, **(kwargs | {"examples": [{"query": "q", "results": [{"item": 3, "score": 0.5}]}]}))


def test_seeds_table_shows_mean_and_std_of_the_aggregate_rows_per_dataset_and_gallery():
    from evaluation.report import seeds_table_markdown

    def row(dataset, gallery, seed, metric, value, std=None, n=1):
        return {"dataset": dataset, "gallery": gallery, "seed": seed, "metric": metric, "value": value,
                "std": std, "n_seeds": n}  # fmt: skip

    rows = [
        row("emoji", "pooled", 0, "t2i_recall_at_1", 0.30),  # a seed's own row: not shown
        row("emoji", "pooled", None, "t2i_recall_at_1", 0.325, 0.025, 3),
        row("icons", "per_source", None, "i2t_recall_at_1", 0.11, 0.0, 3),
    ]
    lines = seeds_table_markdown(rows).splitlines()
    assert len(lines) == 4  # header, rule, one line per (dataset, gallery)
    emoji = next(line for line in lines if "emoji" in line)
    assert "32.5 ± 2.5" in emoji and "30.0" not in emoji and " 3 " in emoji
    icons = next(line for line in lines if "icons" in line)
    assert "per_source" in icons and "11.0 ± 0.0" in icons and "–" in icons
