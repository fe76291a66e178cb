"""Compare the experiments of one ablation family: a markdown table and a plot.

The paper's ablations vary one thing about the paired data at a time: its quantity (number of pairs),
its quality (e.g. raw vs cleaned captions) or its diversity (e.g. the selection strategy). Each
evaluated experiment gives one row::

    {"experiment": "q_10k", "family": "quantity", "variable": "n_pairs", "value": 10000,
     "t2i_recall_at_1": 0.21, "i2t_recall_at_1": 0.25, "t2i_recall_at_5": ..., "t2i_mean_rank": ...}

A family whose values are all numbers (quantity) is ordered by value and plotted as a line against a
log x axis; any other family keeps the order of its rows (the caller's order of variants) and is
plotted as grouped bars. Several rows with the same value (e.g. seeds) are all listed in the table and
averaged in the plot, with their min-max range as error bars. Recalls are fractions in [0, 1] in the
rows and percentages with one decimal in the output, as in `evaluation.report`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from evaluation.report import FIGSIZE, format_number, format_percent, markdown_table, save_figure

_KEYS = ("experiment", "family", "variable", "value")
_METRIC_RE = re.compile(
    r"^(?P<direction>[A-Za-z0-9]+?)_(?P<what>recall_at_(?P<k>\d+)|mean_rank|median_rank)$"
)
_DIRECTION_RE = re.compile(r"^(?P<a>[A-Za-z]+)2(?P<b>[A-Za-z]+)$")
_COLOURS = ("tab:blue", "tab:orange")


def _is_number(v: object) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)


def _family_rows(rows: object, family: str) -> tuple[list[Mapping], str, bool]:
    """The rows of `family` in display order, their variable name, and whether values are numeric."""
    if not isinstance(rows, Sequence) or isinstance(rows, str) or not rows:
        raise ValueError("ablation rows are empty: there is no experiment to compare")
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping):
            raise ValueError(f"rows[{i}] must be a dict, got {type(r).__name__}")
        missing = [k for k in _KEYS if k not in r]
        if missing:
            raise ValueError(f"rows[{i}] lacks {missing} (needs {list(_KEYS)})")
    picked = [r for r in rows if r["family"] == family]
    if not picked:
        present = sorted({str(r["family"]) for r in rows})
        raise ValueError(f"no rows of ablation family {family!r}; families present: {present}")
    variables = list(dict.fromkeys(str(r["variable"]) for r in picked))
    if len(variables) != 1:
        raise ValueError(f"family {family!r} mixes variables {variables}; one family varies one thing")
    numeric = all(_is_number(r["value"]) and math.isfinite(float(r["value"])) for r in picked)
    if numeric:
        # sorted() is stable: repeated values (seeds) keep the caller's order among themselves.
        picked = sorted(picked, key=lambda r: float(r["value"]))
    return picked, variables[0], numeric


def _metric_columns(rows: Sequence[Mapping]) -> list[str]:
    """Metric keys in a readable order: recalls (per direction, K ascending), then ranks, then the rest."""
    seen = list(dict.fromkeys(k for r in rows for k in r if k not in _KEYS))
    directions = list(dict.fromkeys(m["direction"] for k in seen if (m := _METRIC_RE.match(k))))

    def order(k: str) -> tuple:
        m = _METRIC_RE.match(k)
        if m is None:
            return (2, 0, seen.index(k))
        if m["k"]:
            return (0, directions.index(m["direction"]), int(m["k"]))
        return (1, directions.index(m["direction"]), 0 if m["what"] == "mean_rank" else 1)

    return sorted(seen, key=order)


def _header(col: str) -> str:
    m = _METRIC_RE.match(col)
    if m is None:
        return col
    if m["k"]:
        return f"{m['direction']} R@{m['k']} (%)"
    return f"{m['direction']} {m['what'].replace('_', ' ')}"


def ablation_table(rows: list[dict], family: str) -> str:
    """Markdown table of one family's experiments: experiment, the variable's value, every metric.

    Rows of other families are ignored. Numeric families (quantity) are ordered by value; others keep
    the rows' order. Recalls show as percentages with one decimal, ranks with one decimal; the best
    value of each recall (highest) and rank (lowest) column is bold when rows differ.
    Raises ValueError on no rows of `family`, rows without experiment/family/variable/value, a family
    that mixes variables, or a recall outside [0, 1].
    """
    picked, variable, _ = _family_rows(rows, family)
    columns = _metric_columns(picked)
    best: dict[str, float] = {}
    for c in columns:
        m = _METRIC_RE.match(c)
        vals = [float(r[c]) for r in picked if _is_number(r.get(c)) and math.isfinite(float(r[c]))]
        if m is not None and len(set(vals)) > 1:
            best[c] = max(vals) if m["k"] else min(vals)

    def fmt(c: str, v: object) -> str:
        m = _METRIC_RE.match(c)
        if v is None:
            return "–"
        if m is None or not _is_number(v):
            return format_number(v)
        text = format_percent(v) if m["k"] else ("NaN" if math.isnan(float(v)) else f"{float(v):.1f}")
        return f"**{text}**" if c in best and float(v) == best[c] else text

    header = ["experiment", variable] + [_header(c) for c in columns]
    body = [
        [str(r["experiment"]), format_number(r["value"])] + [fmt(c, r.get(c)) for c in columns]
        for r in picked
    ]
    numeric = [False, all(_is_number(r["value"]) for r in picked)] + [
        any(_is_number(r.get(c)) for r in picked) for c in columns
    ]
    return markdown_table(header, body, numeric)


def _counterpart(metric: str) -> str | None:
    """The same metric in the other direction: t2i_recall_at_1 -> i2t_recall_at_1 (None if no 'x2y')."""
    m = _METRIC_RE.match(metric)
    d = _DIRECTION_RE.match(m["direction"]) if m else None
    if d is None:
        return None
    return f"{d['b']}2{d['a']}" + metric[len(m["direction"]) :]


def _grouped(
    picked: Sequence[Mapping], metric: str
) -> tuple[list[object], np.ndarray, np.ndarray, np.ndarray]:
    """Values in display order (repeats merged) with mean, min and max of `metric`: each [n_values]."""
    groups: dict[object, list[float]] = {}
    for r in picked:
        groups.setdefault(r["value"], []).append(float(r[metric]))
    keys = list(groups)
    vals = [np.array(groups[k]) for k in keys]
    return (
        keys,
        np.array([v.mean() for v in vals]),
        np.array([v.min() for v in vals]),
        np.array([v.max() for v in vals]),
    )


def plot_ablation(rows: list[dict], family: str, path: Path, metric: str = "t2i_recall_at_1") -> Path:
    """Plot `metric` across one family's experiments, both retrieval directions when rows have both.

    Numeric families (quantity): metric against value, log x when all values are positive. Others
    (quality, diversity): grouped bars, one group per variant and one bar per direction. The other
    direction (``i2t_...`` for ``t2i_...``) is drawn when every row of the family has it. Recalls are
    drawn in percent. Returns `path`. Raises ValueError as `ablation_table`, and when a row of the
    family lacks `metric` or holds a non-number there.
    """
    picked, variable, numeric = _family_rows(rows, family)
    for r in picked:
        if not _is_number(r.get(metric)):
            raise ValueError(
                f"experiment {r['experiment']!r} has no numeric {metric!r}; got {r.get(metric)!r}"
            )
    other = _counterpart(metric)
    metrics = [metric] + ([other] if other and all(_is_number(r.get(other)) for r in picked) else [])
    m = _METRIC_RE.match(metric)
    is_recall = bool(m and m["k"])
    scale = 100.0 if is_recall else 1.0
    if is_recall:
        for r in picked:
            for name in metrics:
                format_percent(r[name])  # raises on a recall given in percent
    ylabel = f"Recall@{m['k']} (%)" if is_recall else (m["what"].replace("_", " ") if m else metric)

    fig = Figure(figsize=FIGSIZE)
    ax = fig.subplots()
    if numeric:
        for i, name in enumerate(metrics):
            keys, mean, lo, hi = _grouped(picked, name)
            x = np.array([float(k) for k in keys])
            label = _METRIC_RE.match(name)["direction"] if _METRIC_RE.match(name) else name
            ax.errorbar(
                x,
                scale * mean,
                yerr=[scale * (mean - lo), scale * (hi - mean)],
                fmt="o-",
                color=_COLOURS[i],
                capsize=3,
                label=label,
            )
        if all(float(r["value"]) > 0 for r in picked):
            ax.set_xscale("log")
        ax.set_xlabel(f"{variable} (log scale)" if ax.get_xscale() == "log" else variable)
    else:
        width = 0.8 / len(metrics)
        for i, name in enumerate(metrics):
            keys, mean, lo, hi = _grouped(picked, name)
            x = np.arange(len(keys)) + (i - (len(metrics) - 1) / 2) * width
            label = _METRIC_RE.match(name)["direction"] if _METRIC_RE.match(name) else name
            has_spread = bool((hi > lo).any())
            ax.bar(
                x,
                scale * mean,
                width,
                color=_COLOURS[i],
                label=label,
                yerr=[scale * (mean - lo), scale * (hi - mean)] if has_spread else None,
                capsize=3,
            )
        ax.set_xticks(np.arange(len(keys)), [str(k) for k in keys], rotation=20 if len(keys) > 4 else 0)
        ax.set_xlabel(variable)
    if is_recall:
        ax.set_ylim(bottom=0)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{family} ablation: {ylabel} by {variable}")
    ax.grid(alpha=0.3, axis="y" if not numeric else "both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
