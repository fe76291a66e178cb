"""Evaluation report of one experiment: a markdown file with its plots beside it.

The evaluate asset calls these pure functions and attaches the result to the Dagster asset and to the
MLflow run; nothing here knows about either. ``write_report`` writes ``report.md`` and three PNGs
(``loss.png``, ``recall_at_k.png``, ``shared_space.png``) into one folder, linked relatively so that
the folder can be moved or uploaded as one artifact.

Conventions:

- Recalls are fractions in [0, 1] everywhere in the API and are SHOWN as percentages with one decimal
  (0.4567 -> ``45.7``); a recall outside [0, 1] is refused rather than guessed at. Ranks are shown
  with one decimal.
- Figures are made with ``matplotlib.figure.Figure`` directly (the Agg canvas, no pyplot): nothing is
  registered in pyplot's global figure list, so nothing leaks and no GUI backend is ever chosen, even
  when a caller has set one. Fixed sizes (6 x 4 in) and dpi (120); same inputs and seed, same bytes.
- Bad input (empty history, mismatched dimensions, NaN embeddings, ...) raises ``ValueError`` before
  any file is written.
- Markdown tables are printed by `markdown_table` (the package's one table printer, also used by
  `evaluation.ablation`): ``tabulate``'s pipe format, number columns right-aligned. The shared-space
  map is a PCA by scikit-learn (imported on first use, so importing this module stays cheap).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from tabulate import tabulate

FIGSIZE = (6.0, 4.0)
DPI = 120
_MAX_LINE_POINTS = 10_000
_DIRECTION_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")

# Metric names as RetrievalResult.as_dict writes them: [prefix_]direction_(recall_at_K|mean_rank|median_rank).
_METRIC_RE = re.compile(
    r"^(?:(?P<prefix>.+)_)?(?P<direction>[A-Za-z0-9]+)_(?P<what>recall_at_(?P<k>\d+)|mean_rank|median_rank)$"
)
_TABLE_FIXED = ("experiment", "direction")
_RANK_COLUMNS = ("mean rank", "median rank")


# ----------------------------------------------------------------------------------------------- formatting


def format_percent(value: float | None) -> str:
    """A recall fraction in [0, 1] as a percentage with one decimal: 0.4567 -> '45.7'."""
    if value is None:
        return "–"
    v = float(value)
    if math.isnan(v):
        return "NaN"
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"a recall must be a fraction in [0, 1], got {value!r} (was it given in percent?)")
    return f"{100.0 * v:.1f}"


def format_number(value: object) -> str:
    """Cells that are not recalls: integers as they are, floats with up to 4 significant digits."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        v = float(value)
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v == int(v) and abs(v) < 1e15:
            return str(int(v))
        return f"{v:.4g}"
    return str(value)


def format_chance(value: float) -> str:
    """A chance recall in percent: one decimal from 1 % up, two significant digits below (often far
    below 0.1 %, where one decimal would print 0.0)."""
    pct = 100.0 * float(value)
    return format_percent(value) if pct >= 1.0 or pct == 0.0 else f"{pct:.2g}"


def _format_rank(value: object) -> str:
    if value is None:
        return "–"
    v = float(value)
    return "NaN" if math.isnan(v) else f"{v:.1f}"


def _one_line(value: object) -> str:
    return " ".join(str(value).split())


def _cell(value: object) -> str:
    """Text safe inside a markdown table cell: one line, pipes escaped."""
    return _one_line(value).replace("|", "\\|")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool]) -> str:
    """A padded markdown table (pipe format, by tabulate); `numeric` columns are right-aligned.

    Cells are already formatted strings: they are kept as they are (no number parsing), put on one
    line, and their pipes escaped. Raises ValueError when a row or `numeric` does not match the header.
    """
    if len(numeric) != len(header) or any(len(r) != len(header) for r in rows):
        raise ValueError("every table row, and numeric, must have one entry per header column")
    return tabulate(
        [[_cell(c) for c in r] for r in rows],
        headers=[_cell(h) for h in header],
        tablefmt="pipe",
        colalign=["right" if num else "left" for num in numeric],
        disable_numparse=True,
    )


# ----------------------------------------------------------------------------------------------- tables


def split_retrieval_metrics(metrics: Mapping[str, float]) -> tuple[list[dict], dict[str, float]]:
    """Flat metric names -> table rows, plus the metrics that are not retrieval metrics.

    ``{"t2i_recall_at_1": .4, "test_i2t_mean_rank": 3.0, "val_loss": 1.2}`` gives one row per
    (prefix, direction) in first-seen order, e.g. ``{"experiment": "", "direction": "t2i", "R@1": .4}``
    (the prefix, without its trailing '_', goes in ``experiment``), and ``{"val_loss": 1.2}``.
    """
    rows: dict[tuple[str, str], dict] = {}
    other: dict[str, float] = {}
    for name, value in metrics.items():
        m = _METRIC_RE.match(str(name))
        if m is None:
            other[name] = value
            continue
        key = (m["prefix"] or "", m["direction"])
        row = rows.setdefault(key, {"experiment": key[0], "direction": key[1]})
        what = m["what"]
        col = f"R@{int(m['k'])}" if m["k"] else what.replace("_", " ")
        row[col] = value
    return list(rows.values()), other


def retrieval_table_markdown(rows: list[dict] | Mapping[str, float], label: str = "experiment") -> str:
    """Markdown table of retrieval metrics, recalls in percent with one decimal.

    `rows`: dicts with keys ``experiment`` (optional), ``direction``, ``R@K`` (fractions in [0, 1],
    any K), ``mean rank``, ``median rank`` (and any further keys, shown after these); or one flat dict
    of metric names -> value as ``RetrievalResult.as_dict`` gives (``t2i_recall_at_1``, ...), whose
    non-retrieval metrics are left out here (``write_report`` lists them separately). `label` heads
    the ``experiment`` column (e.g. "group").

    Raises ValueError on no rows, a recall outside [0, 1] or a non-dict row.
    """
    if isinstance(rows, Mapping):
        rows, _ = split_retrieval_metrics(rows)
        if not rows:
            raise ValueError("no retrieval metrics (names like 't2i_recall_at_1') among the metrics given")
    if not rows:
        raise ValueError("retrieval_table_markdown needs at least one row")
    if not all(isinstance(r, Mapping) for r in rows):
        raise ValueError("every row must be a dict of column name -> value")
    seen: list[str] = []
    for r in rows:
        seen.extend(c for c in r if c not in seen)
    ks = sorted(int(c[2:]) for c in seen if re.fullmatch(r"R@\d+", c))
    columns = [c for c in _TABLE_FIXED if any(r.get(c) not in (None, "") for r in rows)]
    columns += [f"R@{k}" for k in ks] + [c for c in _RANK_COLUMNS if c in seen]
    columns += [c for c in seen if c not in columns and c not in _TABLE_FIXED]

    def fmt(col: str, value: object) -> str:
        if col.startswith("R@") and col[2:].isdigit():
            return format_percent(value)
        if col in _RANK_COLUMNS:
            return _format_rank(value)
        return format_number(value)

    header = [f"{c} (%)" if c.startswith("R@") else (label if c == "experiment" else c) for c in columns]
    body = [[fmt(c, r.get(c)) for c in columns] for r in rows]
    numeric = [c not in _TABLE_FIXED and not all(isinstance(r.get(c), str) for r in rows) for c in columns]
    return markdown_table(header, body, numeric)


def groups_table_markdown(groups: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table of per-group retrieval metrics: one row per (group, direction).

    `groups`: {group: {metric: value}} with flat names as ``RetrievalResult.as_dict`` writes them
    (e.g. ``{g: r.as_dict() for g, r in retrieval_by_group(...).items()}``); other metrics are left
    out. Groups in the given order. Raises ValueError on no groups, a group that is not a dict or has
    no retrieval metric, and as `retrieval_table_markdown`.
    """
    if not isinstance(groups, Mapping) or not groups:
        raise ValueError("groups must be a non-empty dict of group -> {metric: value}")
    rows: list[dict] = []
    for group, metrics in groups.items():
        if not isinstance(metrics, Mapping):
            raise ValueError(f"groups[{group!r}] must be a dict of metric name -> value")
        found, _ = split_retrieval_metrics(metrics)
        if not found:
            raise ValueError(f"groups[{group!r}] has no retrieval metrics (names like 't2i_recall_at_1')")
        for row in found:
            name = str(group) if not row["experiment"] else f"{group} ({row['experiment']})"
            rows.append(row | {"experiment": name})
    return retrieval_table_markdown(rows, label="group")


# ----------------------------------------------------------------------------------------------- checks


def _check_history(history: object, val_history: object) -> None:
    if not isinstance(history, Sequence) or isinstance(history, str) or len(history) == 0:
        raise ValueError("history is empty: there is no training step to plot")
    for i, row in enumerate(history):
        if not isinstance(row, Mapping) or "step" not in row or "loss" not in row:
            raise ValueError(f"history[{i}] must be a dict with at least 'step' and 'loss', got {row!r}")
    for i, row in enumerate(val_history or []):
        if not isinstance(row, Mapping) or "step" not in row or "score" not in row:
            raise ValueError(f"val_history[{i}] must be a dict with 'step' and 'score', got {row!r}")
    for key in ("step", "loss", "temperature"):
        _column(history, key)
    for key in ("step", "score"):
        _column(val_history or [], key, "val_history")


def _check_curves(curves: object, chance: object) -> None:
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError("curves must be a non-empty dict of direction -> {K: recall}")
    for name, curve in curves.items():
        _check_curve(f"curves[{name!r}]", curve)
    if chance is None:
        return
    if not isinstance(chance, Mapping) or not chance:
        raise ValueError("chance must be a non-empty dict {K: recall} or {direction: {K: recall}}")
    if all(isinstance(v, Mapping) for v in chance.values()):
        for name, curve in chance.items():
            _check_curve(f"chance[{name!r}]", curve)
    else:
        _check_curve("chance", chance)


def _check_curve(name: str, curve: object) -> None:
    if not isinstance(curve, Mapping) or not curve:
        raise ValueError(f"{name} must be a non-empty dict {{K: recall}}, got {curve!r}")
    for k, v in curve.items():
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"{name} has K = {k!r}; K must be an integer >= 1")
        if isinstance(v, bool) or not isinstance(v, int | float | np.number) or not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"{name}[{k}] = {v!r}; a recall must be a fraction in [0, 1]")


def _as_embeddings(name: str, x: object) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D [N, d] array, got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name} must be numeric, got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _check_space(
    item_emb: object, text_emb: object, labels: object, pairs: object
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    items = _as_embeddings("item_emb", item_emb)
    texts = _as_embeddings("text_emb", text_emb)
    if items.shape[1] != texts.shape[1]:
        raise ValueError(f"embedding dimensions differ: item_emb is {items.shape}, text_emb is {texts.shape}")
    if items.shape[1] < 2:
        raise ValueError(f"a 2-D map needs embeddings with d >= 2, got d = {items.shape[1]}")
    if labels is not None and len(labels) != items.shape[0]:
        raise ValueError(
            f"labels has {len(labels)} entries but item_emb has {items.shape[0]} rows (one per item)"
        )
    if pairs is None:
        return items, texts, None
    if not isinstance(pairs, Sequence | np.ndarray) or len(pairs) != 2:
        raise ValueError("pairs must be (pair_items, pair_texts), two int arrays of equal length")
    pi, pt = np.asarray(pairs[0]), np.asarray(pairs[1])
    for name, idx, n in (("pair_items", pi, items.shape[0]), ("pair_texts", pt, texts.shape[0])):
        if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
            raise ValueError(f"pairs: {name} must be a 1-D int array, got {idx.dtype} {idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"pairs: {name} has indices outside [0, {n})")
    if pi.shape != pt.shape:
        raise ValueError(f"pairs: pair_items and pair_texts differ in length ({pi.size} and {pt.size})")
    return items, texts, (pi.astype(np.int64), pt.astype(np.int64))


def _check_examples(examples: object) -> None:
    if examples is None:
        return
    if not isinstance(examples, Sequence):
        raise ValueError("examples must be a list of {'query': str, 'results': [...]} dicts")
    for i, ex in enumerate(examples):
        if not isinstance(ex, Mapping) or "query" not in ex or not isinstance(ex.get("results"), Sequence):
            raise ValueError(f"examples[{i}] must be a dict with 'query' and a list 'results', got {ex!r}")
        for j, hit in enumerate(ex["results"]):
            if not isinstance(hit, Mapping) or not isinstance(hit.get("item"), str) or "score" not in hit:
                raise ValueError(
                    f"examples[{i}]['results'][{j}] needs a text 'item' and a 'score', got {hit!r}"
                )


def save_figure(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written next to the target and renamed, so a reader never sees half a PNG.
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------- plots


def _running_mean(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean of y [N] over `window` steps (shorter at the start), NaN-aware; [N]."""
    ok = np.isfinite(y)
    c = np.concatenate([[0.0], np.cumsum(np.where(ok, y, 0.0))])
    n = np.concatenate([[0], np.cumsum(ok)])
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(0, idx - window)
    count = n[idx] - n[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (c[idx] - c[lo]) / np.maximum(count, 1), np.nan)


def _column(rows: Sequence[Mapping], key: str, name: str = "history") -> np.ndarray:
    """Float [N] column `key` of `rows`; a missing or None entry is NaN (a gap in the line)."""
    out = np.full(len(rows), np.nan)
    for i, r in enumerate(rows):
        v = r.get(key)
        if v is None:
            continue
        try:
            out[i] = float(v)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name}[{i}][{key!r}] must be a number, got {v!r}") from e
    return out


def _thin(n: int, limit: int = _MAX_LINE_POINTS) -> slice:
    """Stride that keeps at most about `limit` of n points: a 1M-step line draws no better than 10k."""
    return slice(None, None, max(1, -(-n // limit)))


def plot_loss(history: list[dict], val_history: list[dict] | None, path: Path) -> Path:
    """Training curves: loss (top) and temperature (bottom) against step, validation scores as markers.

    history: rows {step, loss, temperature?, ...} as ``TrainResult.history``; val_history: rows
    {step, score} (drawn on a right-hand axis of the loss panel) or None. Long runs also get a running
    mean of the loss, since per-step contrastive losses are noisy. Returns `path`.
    Raises ValueError on an empty history or rows without step/loss.
    """
    _check_history(history, val_history)
    steps = _column(history, "step")
    loss = _column(history, "loss")
    temp = _column(history, "temperature")
    has_temp = bool(np.isfinite(temp).any())

    fig = Figure(figsize=FIGSIZE)
    if has_temp:
        ax, ax_t = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    else:
        ax, ax_t = fig.subplots(1, 1), None
    smooth = len(loss) >= 50
    th = _thin(len(steps))
    ax.plot(steps[th], loss[th], color="tab:blue", lw=0.8, alpha=0.35 if smooth else 1.0, label="loss")
    if smooth:
        window = max(2, len(loss) // 50)
        mean = _running_mean(loss, window)
        ax.plot(steps[th], mean[th], color="tab:blue", lw=1.6, label=f"loss (mean of {window})")
    ax.set_ylabel("InfoNCE loss")
    ax.set_title("Training loss and temperature" if has_temp else "Training loss")
    ax.grid(alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    if val_history:
        ax_v = ax.twinx()
        ax_v.plot(
            _column(val_history, "step", "val_history"),
            _column(val_history, "score", "val_history"),
            "o--",
            color="tab:red",
            ms=4,
            lw=0.8,
            label="validation score",
        )
        ax_v.set_ylabel("validation score", color="tab:red")
        h, n = ax_v.get_legend_handles_labels()
        handles, names = handles + h, names + n
    ax.legend(handles, names, loc="center right", fontsize=8, framealpha=0.7)
    if ax_t is not None:
        ax_t.plot(steps[th], temp[th], color="tab:green", lw=1.2)
        ax_t.set_ylabel("temperature")
        ax_t.grid(alpha=0.3)
        ax_t.set_xlabel("step")
    else:
        ax.set_xlabel("step")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_recall_at_k(
    curves: dict[str, dict[int, float]],
    path: Path,
    chance: dict[int, float] | dict[str, dict[int, float]] | None = None,
) -> Path:
    """Recall (%) against K, one line per direction, chance level dashed.

    curves: {"t2i": {1: 0.31, 5: 0.62, 10: 0.74}, "i2t": {...}} with fractions in [0, 1]; chance: one
    {K: recall} for all directions, or one per direction ({"t2i": {...}, ...}, drawn in its colour).
    Returns `path`. Raises ValueError on empty curves, K < 1 or a recall outside [0, 1].
    """
    _check_curves(curves, chance)
    fig = Figure(figsize=FIGSIZE)
    ax = fig.subplots()
    colour = {name: _DIRECTION_COLOURS[i % len(_DIRECTION_COLOURS)] for i, name in enumerate(curves)}
    all_k: set[int] = set()
    for name, curve in curves.items():
        ks = sorted(int(k) for k in curve)
        all_k.update(ks)
        ax.plot(ks, [100 * float(curve[k]) for k in ks], "o-", color=colour[name], label=name)
    if chance is not None:
        per_direction = all(isinstance(v, Mapping) for v in chance.values())
        for name, curve in chance.items() if per_direction else [("", chance)]:
            ks = sorted(int(k) for k in curve)
            all_k.update(ks)
            ax.plot(
                ks,
                [100 * float(curve[k]) for k in ks],
                "--",
                color=colour.get(name, "grey"),
                alpha=0.8,
                label=f"chance ({name})" if name else "chance",
            )
    ax.set_xticks(sorted(all_k))
    ax.set_ylim(0, 100)
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (%)")
    ax.set_title("Cross-modal retrieval: Recall@K")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def pca_project(x: np.ndarray, n_components: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Principal-component projection (scikit-learn's PCA, exact SVD: ``svd_solver="full"``).

    x: [N, d] -> (projection [N, n_components], explained variance ratio [n_components]). Each
    component's sign is fixed by scikit-learn (its largest-magnitude loading is positive), so the map
    does not flip between runs or platforms. Components beyond the data's rank are zero up to
    rounding; for data without variance (a collapsed model) the projection and the ratios are exactly
    zero. Raises ValueError when n_components > d or N < 1.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"pca_project needs a non-empty [N, d] array, got shape {x.shape}")
    if not 1 <= n_components <= x.shape[1]:
        raise ValueError(f"n_components must be in [1, d = {x.shape[1]}], got {n_components}")
    proj = np.zeros((x.shape[0], n_components))
    ratio = np.zeros(n_components)
    if x.shape[0] < 2 or not np.any(x - x[0]):
        return proj, ratio  # every point at the mean: nothing to explain (sklearn would divide by 0)
    from sklearn.decomposition import PCA  # scipy comes with it: only callers of this pay the import

    k = min(n_components, x.shape[0])
    pca = PCA(n_components=k, svd_solver="full")
    proj[:, :k] = pca.fit_transform(x)
    ratio[:k] = pca.explained_variance_ratio_
    return proj, ratio


def plot_shared_space(
    item_emb: np.ndarray,
    text_emb: np.ndarray,
    path: Path,
    labels: list[str] | None = None,
    max_points: int = 2000,
    seed: int = 0,
    *,
    pairs: tuple[np.ndarray, np.ndarray] | None = None,
    n_annotate: int = 6,
    n_lines: int = 12,
) -> Path:
    """2-D PCA map of the shared space: items and captions as two marker sets, a few pairs joined.

    item_emb: [N_items, d]; text_emb: [N_texts, d] (the adapters' outputs); labels: one string per item
    (e.g. its first caption), a few of which are written next to their points. pairs: (pair_items,
    pair_texts), int [P] each, the matched pairs as in `evaluation.retrieval` (a PairedSplit's); a few
    of them are joined by lines (none without pairs). At most `max_points` items and `max_points`
    captions are drawn, drawn with `seed` (captions first, then the items paired with them, so that
    joined pairs survive the sampling); the PCA is fitted on the points drawn. Returns `path`. Raises
    ValueError on mismatched dimensions, non-finite values, d < 2, labels of the wrong length or bad
    pairs.
    """
    items, texts, checked = _check_space(item_emb, text_emb, labels, pairs)
    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 1:
        raise ValueError(f"max_points must be an integer >= 1, got {max_points!r}")
    rng = np.random.default_rng(seed)
    n_i, n_t = items.shape[0], texts.shape[0]
    t_idx = np.sort(rng.choice(n_t, max_points, replace=False)) if n_t > max_points else np.arange(n_t)
    if checked is not None:
        p_items, p_texts = checked
        drawn_text = np.zeros(n_t, dtype=bool)
        drawn_text[t_idx] = True
        wanted = np.unique(p_items[drawn_text[p_texts]])
        if len(wanted) > max_points:
            wanted = np.sort(rng.choice(wanted, max_points, replace=False))
        rest = np.setdiff1d(np.arange(n_i), wanted)
        extra = max(0, min(max_points - len(wanted), len(rest)))
        i_idx = np.sort(np.concatenate([wanted, rng.choice(rest, extra, replace=False)]).astype(np.int64))
    else:
        i_idx = np.sort(rng.choice(n_i, max_points, replace=False)) if n_i > max_points else np.arange(n_i)

    proj, ratio = pca_project(np.concatenate([items[i_idx], texts[t_idx]]), 2)
    pi, pt = proj[: len(i_idx)], proj[len(i_idx) :]

    fig = Figure(figsize=FIGSIZE)
    ax = fig.subplots()
    size = 14 if len(proj) < 500 else 5
    ax.scatter(pi[:, 0], pi[:, 1], s=size, marker="o", c="tab:blue", alpha=0.6, label=f"items ({len(i_idx)})")
    ax.scatter(
        pt[:, 0], pt[:, 1], s=size, marker="^", c="tab:orange", alpha=0.6, label=f"captions ({len(t_idx)})"
    )

    if checked is not None:
        pos_item = np.full(n_i, -1)
        pos_item[i_idx] = np.arange(len(i_idx))
        pos_text = np.full(n_t, -1)
        pos_text[t_idx] = np.arange(len(t_idx))
        # Drawn pairs as (text position, item position), each once, in a fixed order.
        shown = np.unique(np.stack([pos_text[p_texts], pos_item[p_items]], axis=1), axis=0)
        shown = shown[(shown >= 0).all(axis=1)]
        if len(shown):
            for tp, ip in shown[np.sort(rng.choice(len(shown), min(n_lines, len(shown)), replace=False))]:
                ax.plot([pt[tp, 0], pi[ip, 0]], [pt[tp, 1], pi[ip, 1]], color="grey", lw=0.7, alpha=0.8)
            ax.plot([], [], color="grey", lw=0.7, label="matched pairs")
    if labels is not None and n_annotate > 0:
        for p in np.sort(rng.choice(len(i_idx), min(n_annotate, len(i_idx)), replace=False)):
            text = str(labels[int(i_idx[p])])
            text = text if len(text) <= 28 else text[:27] + "…"
            ax.annotate(text, (pi[p, 0], pi[p, 1]), xytext=(3, 3), textcoords="offset points", fontsize=6)
    ax.set_xlabel(f"PC 1 ({100 * ratio[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC 2 ({100 * ratio[1]:.1f}% of variance)")
    ax.set_title("Shared embedding space (PCA of items and captions)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------- report


def _examples_markdown(examples: Sequence[Mapping]) -> str:
    parts = []
    for ex in examples:
        parts.append(f"**Query:** {_one_line(ex['query'])}\n")
        rows = []
        for rank, hit in enumerate(ex["results"], start=1):
            mark = "–" if hit.get("hit") is None else ("yes" if hit["hit"] else "no")
            rows.append([str(rank), hit["item"], f"{float(hit['score']):.3f}", mark])
        if rows:
            parts.append(
                markdown_table(["rank", "retrieved item", "score", "hit"], rows, [True, False, True, False])
            )
        else:
            parts.append("_(nothing retrieved)_")
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def _chance_lines(chance: Mapping | None) -> list[str]:
    """'Chance level: R@1 0.5, ...' once for a flat {K: recall}, or once per direction."""
    if chance is None:
        return []
    per_direction = chance if all(isinstance(v, Mapping) for v in chance.values()) else {"": chance}
    return [
        f"Chance level{f' ({name})' if name else ''}: "
        + ", ".join(f"R@{k} {format_chance(curve[k])}" for k in sorted(curve))
        + "."
        for name, curve in per_direction.items()
    ]


def _training_summary(history: Sequence[Mapping], val_history: Sequence[Mapping] | None) -> list[str]:
    """Markdown lines on training: steps, final loss and temperature, best validation score, the plot."""
    if not history:
        return ["_No training history was recorded for this run._", ""]
    last = history[-1]
    summary = [
        f"{len(history)} logged steps, last step {format_number(last['step'])}",
        f"final loss {format_number(float(last['loss']))}",
    ]
    if last.get("temperature") is not None:
        summary.append(f"final temperature {format_number(float(last['temperature']))}")
    if val_history:
        best = max(
            val_history, key=lambda r: float(r["score"]) if math.isfinite(float(r["score"])) else -math.inf
        )
        summary.append(
            f"best validation score {format_number(float(best['score']))} at step {format_number(best['step'])}"
        )
    return ["; ".join(summary) + ".", "", "![Loss and temperature](loss.png)", ""]


def write_report(
    out_dir: Path,
    *,
    title: str,
    metrics: dict[str, float],
    history: list[dict],
    val_history: list[dict] | None,
    curves: dict[str, dict[int, float]],
    chance: dict[str, dict[int, float]] | dict[int, float] | None,
    item_emb: np.ndarray,
    text_emb: np.ndarray,
    labels: list[str] | None = None,
    params: dict | None = None,
    examples: list[dict] | None = None,
    pairs: tuple[np.ndarray, np.ndarray] | None = None,
    seed: int = 0,
    groups: Mapping[str, Mapping[str, float]] | None = None,
) -> Path:
    """Write ``out_dir/report.md`` with loss.png, recall_at_k.png and shared_space.png beside it.

    metrics: flat names -> value (``t2i_recall_at_1`` ... as ``RetrievalResult.as_dict``; others, such
    as ``chance_t2i_recall_at_1`` or ``test_items``, are listed as they are); history / val_history:
    ``TrainResult.history`` / ``.val_history``; curves: ``{"t2i": {K: recall}, "i2t": ...}`` (e.g.
    ``{"t2i": result.t2i_recall, "i2t": result.i2t_recall}``); chance: what
    ``evaluation.retrieval.chance_levels`` returns (one {K: recall} for all directions is taken too;
    None: no chance line); item_emb [N_items, d], text_emb [N_texts, d], labels, pairs (pair_items,
    pair_texts): as `plot_shared_space`; params: run parameters shown as a table; examples: what
    ``evaluation.examples.query_examples`` returns, ``[{"query": str, "results": [{"item": str,
    "score": float, "hit": bool}, ...]}]``; groups: per-group galleries as `groups_table_markdown`
    takes them, {group: {metric: value}} (e.g. from ``evaluation.retrieval.retrieval_by_group``),
    shown as their own table (None: no such section; their mean belongs in `metrics`, with a prefix).
    An empty history (an untrained baseline, a lost history file) gives a report without loss.png that
    says so; malformed rows are still an error. All inputs are checked before anything is written.
    Returns the path of report.md.
    """
    if not isinstance(title, str) or not title.strip():
        raise ValueError("title must be a non-empty string")
    if not isinstance(metrics, Mapping):
        raise ValueError("metrics must be a dict of metric name -> value")
    if history:
        _check_history(history, val_history)
    elif not isinstance(history, Sequence):
        raise ValueError(f"history must be a list of step rows, got {type(history).__name__}")
    _check_curves(curves, chance)
    _check_space(item_emb, text_emb, labels, pairs)
    _check_examples(examples)
    retrieval_rows, other = split_retrieval_metrics(metrics)
    retrieval_md = retrieval_table_markdown(retrieval_rows) if retrieval_rows else None
    groups_md = groups_table_markdown(groups) if groups is not None else None

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if history:
        plot_loss(history, val_history, out_dir / "loss.png")
    else:
        # A loss.png left by an earlier run would describe a different model.
        (out_dir / "loss.png").unlink(missing_ok=True)
    plot_recall_at_k(curves, out_dir / "recall_at_k.png", chance)
    plot_shared_space(item_emb, text_emb, out_dir / "shared_space.png", labels, seed=seed, pairs=pairs)

    md = [f"# {' '.join(title.split())}", ""]
    md += ["## Retrieval", ""]
    md += (
        [retrieval_md, "", "Recall@K in percent; ranks are 1-based (lower is better)."]
        if retrieval_md
        else ["_No retrieval metrics were given._"]
    )
    md += _chance_lines(chance)
    md += ["", "![Recall@K](recall_at_k.png)", ""]
    if groups_md:
        md += [
            "### Per-group galleries",
            "",
            "One gallery per group: its items are the candidates, the texts paired with them the queries "
            "(groups of fewer than 2 items are left out).",
            "",
            groups_md,
            "",
        ]
    if other:
        md += [
            "### Other metrics",
            "",
            markdown_table(
                ["metric", "value"], [[k, format_number(v)] for k, v in other.items()], [False, True]
            ),
            "",
        ]

    md += ["## Training", ""]
    md += _training_summary(history, val_history)

    n_i, n_t = np.asarray(item_emb).shape[0], np.asarray(text_emb).shape[0]
    md += [
        "## Shared space",
        "",
        f"{n_i} items and {n_t} captions, projected on their first two principal components.",
        "",
    ]
    md += ["![Shared space](shared_space.png)", ""]
    if examples:
        md += ["## Example queries", "", _examples_markdown(examples)]
    if params:
        md += [
            "## Parameters",
            "",
            markdown_table(
                ["parameter", "value"],
                [[str(k), format_number(v)] for k, v in params.items()],
                [False, False],
            ),
            "",
        ]

    path = out_dir / "report.md"
    tmp = out_dir / ".report.md.tmp"
    tmp.write_text("\n".join(md).rstrip() + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def seeds_table_markdown(rows: Sequence[Mapping]) -> str:
    """Markdown: one line per (scored dataset, gallery) of metric rows shaped like the lake's `metrics`
    table (dataset, gallery, seed, metric, value, std, n_seeds): Recall@1/5/10 both ways as mean ± std
    in percent, from the rows that aggregate the seeds (seed None)."""
    agg = [r for r in rows if r["seed"] is None]
    cols = [f"{d}_recall_at_{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)]
    body = []
    for name, gallery in dict.fromkeys((r["dataset"], r["gallery"]) for r in agg):
        cell = {r["metric"]: r for r in agg if r["dataset"] == name and r["gallery"] == gallery}
        n = next(iter(cell.values()))["n_seeds"]
        body.append(
            [name, gallery, str(n)]
            + [
                f"{100 * cell[c]['value']:.1f} ± {100 * cell[c]['std']:.1f}" if c in cell else "–"
                for c in cols
            ]
        )
    header = ["dataset", "gallery", "seeds", "t2i R@1", "R@5", "R@10", "i2t R@1", "R@5", "R@10"]
    return markdown_table(header, body, [False, False, True] + [True] * 6)
