"""Tests of evaluation.report: PNGs written and readable, markdown values, PCA, bad input."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from evaluation.report import (
    DPI,
    FIGSIZE,
    chance_curves,
    format_percent,
    pca_project,
    plot_loss,
    plot_recall_at_k,
    plot_shared_space,
    result_curves,
    retrieval_examples,
    retrieval_table_markdown,
    split_retrieval_metrics,
    write_report,
)

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
        plot_loss(hist[:3], None, tmp_path / "sub" / "loss_short.png"),
        plot_recall_at_k(
            {"t2i": {1: 0.3, 5: 0.6, 10: 0.7}, "i2t": {1: 0.35, 5: 0.65, 10: 0.8}},
            tmp_path / "recall.png",
            chance={1: 0.01, 5: 0.05, 10: 0.1},
        ),
        plot_shared_space(items, texts, tmp_path / "space.png", labels=[f"item {i}" for i in range(60)]),
    ]
    for p in paths:
        _assert_png(p)
    assert not list(tmp_path.rglob("*.tmp"))
    # Figures are made without pyplot, so none is left open in its registry.
    assert plt.get_fignums() == figs_before


def test_loss_without_temperature_and_with_per_direction_chance(tmp_path):
    hist = [{"step": i, "loss": 1.0 / (i + 1)} for i in range(10)]
    _assert_png(plot_loss(hist, [], tmp_path / "l.png"))
    curves = {"t2a": {1: 0.2, 10: 0.5}, "a2t": {1: 0.25, 10: 0.6}}
    chance = {"t2a": {1: 0.01, 10: 0.1}, "a2t": {1: 0.05, 10: 0.4}}
    _assert_png(plot_recall_at_k(curves, tmp_path / "r.png", chance))


def test_shared_space_is_deterministic_for_a_seed(tmp_path):
    items, texts = _embeddings(n=300)
    a = plot_shared_space(items, texts, tmp_path / "a.png", max_points=100, seed=3).read_bytes()
    b = plot_shared_space(items, texts, tmp_path / "b.png", max_points=100, seed=3).read_bytes()
    c = plot_shared_space(items, texts, tmp_path / "c.png", max_points=100, seed=4).read_bytes()
    assert a == b
    assert a != c


def test_shared_space_with_explicit_pairs_and_uneven_sets(tmp_path):
    items, _ = _embeddings(n=20)
    rng = np.random.default_rng(1)
    owner = rng.integers(0, 20, size=50)
    texts = items[owner] + 0.1 * rng.normal(size=(50, items.shape[1]))
    _assert_png(plot_shared_space(items, texts, tmp_path / "s.png", max_points=10, text_to_item=owner))
    with pytest.raises(ValueError, match="text_to_item"):
        plot_shared_space(items, texts, tmp_path / "x.png", text_to_item=owner[:10])


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
    assert re.fullmatch(r"\|[ -]+\|[ -]+\|( -+: \|){5}", lines[1])
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
                    {"caption": "red square", "score": 0.91234, "hit": True},
                    {"caption": "blue circle", "score": 0.5, "hit": False},
                ],
            }
        ],
    }


def test_write_report_writes_markdown_and_linked_pngs(tmp_path):
    out = tmp_path / "report"
    md_path = write_report(out, **_report_kwargs())
    assert md_path == out / "report.md"
    md = md_path.read_text(encoding="utf-8")
    assert md.startswith("# Experiment base | synthetic\n")
    assert "45.7" in md and "80.0" in md and "50.0" in md
    assert "0.4567" not in md
    assert "| val_loss |" in md and "1.25" in md
    assert "Chance level: R@1 2.5, R@5 12.5, R@10 0.001." in md
    assert "best validation score 0.35 at step 60" in md
    assert "| encoder   | minilm |" in md
    assert "red square" in md and "0.912" in md and "**Query:** a red | square" in md
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(links) == ["loss.png", "recall_at_k.png", "shared_space.png"]
    for link in links:
        _assert_png(out / link)
    assert sorted(p.name for p in out.iterdir()) == [
        "loss.png",
        "recall_at_k.png",
        "report.md",
        "shared_space.png",
    ]


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


def test_chance_curves_match_counting():
    # Two items with two captions each: a random ranking of 4 captions puts one of 2 first half the time.
    chance = chance_curves(np.array([0, 0, 1, 1]), n_items=2, ks=(1, 2))
    assert chance["t2i"] == {1: 0.5, 2: 1.0}
    assert chance["i2t"][1] == pytest.approx(0.5)
    assert chance["i2t"][2] == pytest.approx(1 - 1 / 6)  # miss only when both of 2 slots hold the other two
    # Uneven captions: (1/4 + 3/4) / 2, and an uncaptioned item only counts as a t2i distractor.
    uneven = chance_curves(np.array([0, 1, 1, 1]), n_items=3, ks=(1,), directions=("t2a", "a2t"))
    assert uneven["t2a"][1] == pytest.approx(1 / 3)
    assert uneven["a2t"][1] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="outside"):
        chance_curves(np.array([0, 5]), n_items=2)


def test_retrieval_examples_rank_items_and_mark_hits():
    rng = np.random.default_rng(0)
    items = np.linalg.qr(rng.normal(size=(16, 16)))[0][:10]  # 10 orthonormal rows [10, 16]
    owner = np.array([3, 3, 7, 1, 0, 9])
    texts = items[owner] + 0.01 * rng.normal(size=(6, 16))
    ex = retrieval_examples(
        items,
        texts,
        owner,
        [f"item {i}" for i in range(10)],
        [f"cap {t}" for t in range(6)],
        n_queries=4,
        k=3,
    )
    assert len(ex) == 4
    for e in ex:
        t = int(e["query"].split()[1])
        res = e["results"]
        assert len(res) == 3
        assert res[0]["index"] == owner[t] and res[0]["hit"] and res[0]["caption"] == f"item {owner[t]}"
        assert not any(r["hit"] for r in res[1:])
        assert [r["score"] for r in res] == sorted((r["score"] for r in res), reverse=True)
    again = retrieval_examples(
        items,
        texts,
        owner,
        [f"item {i}" for i in range(10)],
        [f"cap {t}" for t in range(6)],
        n_queries=4,
        k=3,
    )
    assert again == ex
    with pytest.raises(ValueError, match="one label per item"):
        retrieval_examples(items, texts, owner, ["x"], [f"cap {t}" for t in range(6)])


def test_report_from_a_real_retrieval_result(tmp_path):
    from evaluation.retrieval import retrieval_metrics

    rng = np.random.default_rng(2)
    items = rng.normal(size=(30, 8)).astype(np.float32)
    owner = np.repeat(np.arange(30), 2)
    texts = items[owner] + 0.8 * rng.normal(size=(60, 8)).astype(np.float32)
    result = retrieval_metrics(items, texts, owner, normalize=True, progress=False)
    labels = [f"item {i}" for i in range(30)]
    md = write_report(
        tmp_path,
        title="end to end",
        metrics=result.as_dict(),
        history=_history(5),
        val_history=None,
        curves=result_curves(result),
        chance=chance_curves(owner, 30),
        item_emb=items,
        text_emb=texts,
        labels=labels,
        text_to_item=owner,
        examples=retrieval_examples(
            items, texts, owner, labels, [f"caption {t}" for t in range(60)], n_queries=2
        ),
    ).read_text(encoding="utf-8")
    t2i_row = next(line for line in md.splitlines() if line.startswith("| t2i"))
    cells = [c.strip() for c in t2i_row.strip("|").split("|")]
    assert cells[1:4] == [format_percent(result.t2i_recall[k]) for k in (1, 5, 10)]
    assert cells[4] == f"{result.t2i_mean_rank:.1f}"
    assert "Chance level (t2i): R@1 3.3, R@5 16.7, R@10 33.3." in md
    assert md.count("**Query:**") == 2


def test_report_without_history_and_with_item_named_examples(tmp_path):
    out = tmp_path / "r"
    write_report(out, **_report_kwargs())
    assert (out / "loss.png").exists()
    kwargs = _report_kwargs() | {
        "history": [],
        "val_history": [],
        "examples": [{"query": "q", "results": [{"item": "a sound of rain", "score": 0.5, "hit": True}]}],
    }
    md = write_report(out, **kwargs).read_text(encoding="utf-8")
    assert "No training history was recorded" in md
    assert "loss.png" not in md
    # The earlier run's loss curve is gone with it.
    assert not (out / "loss.png").exists()
    assert re.search(r"\|\s+1 \| a sound of rain\s* \| 0\.500 \| yes \|", md)
    with pytest.raises(ValueError, match="caption"):
        write_report(out, **(kwargs | {"examples": [{"query": "q", "results": [{"item": 3, "score": 0.5}]}]}))
