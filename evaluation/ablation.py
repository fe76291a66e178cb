"""Compare the experiments of one ablation family: a markdown table, a plot, and a report of both.

The paper's ablations vary one thing about the paired data at a time: its quantity (number of pairs),
its quality (e.g. raw vs cleaned captions) or its diversity (e.g. the selection strategy). The input is
the rows of the lake's ``metrics`` table as they are (``lake.read("metrics").to_pylist()``), one row
per (experiment, metric)::

    {"experiment": "emoji-n250", "family": "quantity", "variable": "250",
     "metric": "t2i_recall_at_1", "value": 0.21, ...}

``variable`` is the value the experiment takes within its family (experiments.yaml); further columns
(dataset, split, created_at, ...) are ignored. Rows of other families are ignored too, and each
(experiment, metric) must appear once.

A family whose variables are all numbers (quantity: "250", "500", ...) is ordered by value and plotted
as a line against a log x axis; any other family keeps the order in which its experiments first appear
and is plotted as grouped bars. Several experiments with the same value (e.g. seeds) are all listed in
the table and averaged in the plot, with their min-max range as error bars. Recalls are fractions in
[0, 1] in the rows and percentages with one decimal in the output, as in `evaluation.report`, whose
`markdown_table` prints the table.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from evaluation.report import (
    FIGSIZE,
    format_chance,
    format_number,
    format_percent,
    markdown_table,
    save_figure,
)

_KEYS = ("experiment", "family", "variable", "metric", "value")
# [chance_]direction_(recall_at_K|mean_rank|median_rank), as the evaluation stores them.
_METRIC_RE = re.compile(
    r"^(?:(?P<chance>chance)_)?(?P<direction>[A-Za-z0-9]+?)_(?P<what>recall_at_(?P<k>\d+)|mean_rank|median_rank)$"
)
_DIRECTION_RE = re.compile(r"^(?P<a>[A-Za-z]+)2(?P<b>[A-Za-z]+)$")
_COLOURS = ("tab:blue", "tab:orange")
DEFAULT_METRIC = "t2i_recall_at_1"


@dataclass(frozen=True)
class _Experiment:
    """One experiment of a family: its variable as given, as a number (numeric families), its metrics."""

    name: str
    variable: object
    x: float | None
    metrics: dict[str, object]


def _is_number(v: object) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)


def _as_float(v: object) -> float | None:
    """The variable as a finite number ("250" -> 250.0), or None when it is not one."""
    if _is_number(v):
        x = float(v)
    elif isinstance(v, str):
        try:
            x = float(v.strip())
        except ValueError:
            return None
    else:
        return None
    return x if math.isfinite(x) else None


def _family(rows: object, family: str) -> tuple[list[_Experiment], bool]:
    """The experiments of `family` in display order, and whether their variables are all numbers."""
    if not isinstance(rows, Sequence) or isinstance(rows, str) or not rows:
        raise ValueError("ablation rows are empty: there is no experiment to compare")
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping):
            raise ValueError(f"rows[{i}] must be a dict, got {type(r).__name__}")
        missing = [k for k in _KEYS if k not in r]
        if missing:
            raise ValueError(f"rows[{i}] lacks {missing} (rows of the metrics table have {list(_KEYS)})")
    picked = [r for r in rows if r["family"] == family]
    if not picked:
        present = sorted({str(r["family"]) for r in rows})
        raise ValueError(f"no rows of ablation family {family!r}; families present: {present}")

    variables: dict[str, object] = {}
    metrics: dict[str, dict[str, object]] = {}
    for r in picked:
        name, metric = str(r["experiment"]), str(r["metric"])
        if variables.setdefault(name, r["variable"]) != r["variable"]:
            raise ValueError(
                f"experiment {name!r} has rows with variable {variables[name]!r} and {r['variable']!r}"
            )
        values = metrics.setdefault(name, {})
        if metric in values:
            raise ValueError(
                f"experiment {name!r} has metric {metric!r} twice; give one evaluation per experiment"
            )
        values[metric] = r["value"]
    xs = {name: _as_float(v) for name, v in variables.items()}
    numeric = all(x is not None for x in xs.values())
    exps = [_Experiment(n, variables[n], xs[n] if numeric else None, metrics[n]) for n in variables]
    if numeric:
        # sorted() is stable: repeated values (seeds) keep their order of first appearance.
        exps.sort(key=lambda e: e.x)
    return exps, numeric


def _metric_columns(exps: Sequence[_Experiment]) -> list[str]:
    """Metric names in a readable order: recalls (per direction, K ascending), ranks, chance recalls,
    then the rest in order of first appearance."""
    seen = list(dict.fromkeys(k for e in exps for k in e.metrics))
    directions = list(dict.fromkeys(m["direction"] for k in seen if (m := _METRIC_RE.match(k))))

    def order(k: str) -> tuple:
        m = _METRIC_RE.match(k)
        if m is None:
            return (3, 0, seen.index(k))
        group = 2 if m["chance"] else (0 if m["k"] else 1)
        within = int(m["k"]) if m["k"] else (0 if m["what"] == "mean_rank" else 1)
        return (group, directions.index(m["direction"]), within)

    return sorted(seen, key=order)


def _header(col: str) -> str:
    m = _METRIC_RE.match(col)
    if m is None:
        return col
    who = f"chance {m['direction']}" if m["chance"] else m["direction"]
    return f"{who} R@{m['k']} (%)" if m["k"] else f"{who} {m['what'].replace('_', ' ')}"


def ablation_table(rows: list[dict], family: str) -> str:
    """Markdown table of one family's experiments: experiment, its variable, every metric.

    `rows`: rows of the metrics table (see the module docstring). The variable's column is headed by
    the family's name. Recalls show as percentages with one decimal, ranks with one decimal, chance
    recalls as `format_chance`; the best value of each recall (highest) and rank (lowest) column is
    bold when experiments differ; a metric an experiment lacks shows as '–'.
    Raises ValueError on no rows of `family`, rows without the metrics table's columns, an experiment
    with two variables or a metric twice, or a recall outside [0, 1].
    """
    exps, numeric = _family(rows, family)
    columns = _metric_columns(exps)
    best: dict[str, float] = {}
    for c in columns:
        m = _METRIC_RE.match(c)
        vals = [float(v) for e in exps if _is_number(v := e.metrics.get(c)) and math.isfinite(float(v))]
        if m is not None and not m["chance"] and len(set(vals)) > 1:
            best[c] = max(vals) if m["k"] else min(vals)

    def fmt(c: str, v: object) -> str:
        m = _METRIC_RE.match(c)
        if v is None:
            return "–"
        if m is None or not _is_number(v):
            return format_number(v)
        if m["chance"]:
            return format_chance(v) if m["k"] else f"{float(v):.1f}"
        text = format_percent(v) if m["k"] else ("NaN" if math.isnan(float(v)) else f"{float(v):.1f}")
        return f"**{text}**" if c in best and float(v) == best[c] else text

    header = ["experiment", family] + [_header(c) for c in columns]
    body = [[e.name, format_number(e.variable)] + [fmt(c, e.metrics.get(c)) for c in columns] for e in exps]
    aligned = [False, numeric] + [any(_is_number(e.metrics.get(c)) for e in exps) for c in columns]
    return markdown_table(header, body, aligned)


def _counterpart(metric: str) -> str | None:
    """The same metric in the other direction: t2i_recall_at_1 -> i2t_recall_at_1 (None if no 'x2y')."""
    m = _METRIC_RE.match(metric)
    d = _DIRECTION_RE.match(m["direction"]) if m else None
    if d is None:
        return None
    return f"{'chance_' if m['chance'] else ''}{d['b']}2{d['a']}_{m['what']}"


def _direction(metric: str) -> str:
    """The legend entry of a metric: its direction ('t2i', 'chance i2t'), or its name."""
    m = _METRIC_RE.match(metric)
    return metric if m is None else ("chance " if m["chance"] else "") + m["direction"]


def _grouped(
    exps: Sequence[_Experiment], metric: str, numeric: bool
) -> tuple[list[object], np.ndarray, np.ndarray, np.ndarray]:
    """Values in display order (repeats merged) with mean, min and max of `metric`: each [n_values].

    Numeric families give the numbers; others the variants' labels, where an experiment without a
    variable (the demo family's) is a group of its own, labelled by its name.
    """
    groups: dict[tuple, list[float]] = {}
    for e in exps:
        if numeric:
            key = (e.x, e.x)
        elif e.variable is None or str(e.variable).strip() == "":
            key = ("experiment", e.name)
        else:
            key = ("variable", str(e.variable))
        groups.setdefault(key, []).append(float(e.metrics[metric]))
    vals = [np.array(v) for v in groups.values()]
    return (
        [key[1] for key in groups],
        np.array([v.mean() for v in vals]),
        np.array([v.min() for v in vals]),
        np.array([v.max() for v in vals]),
    )


def plot_ablation(rows: list[dict], family: str, path: Path, metric: str = DEFAULT_METRIC) -> Path:
    """Plot `metric` across one family's experiments, both retrieval directions when they have both.

    Numeric families (quantity): metric against the variable, log x when all values are positive.
    Others (quality, diversity): grouped bars, one group per variant and one bar per direction. The
    other direction (``i2t_...`` for ``t2i_...``) is drawn when every experiment has it. Recalls are
    drawn in percent. Returns `path`. Raises ValueError as `ablation_table`, and when an experiment of
    the family lacks `metric` or holds a non-number there; nothing is written then.
    """
    exps, numeric = _family(rows, family)
    for e in exps:
        if not _is_number(e.metrics.get(metric)):
            raise ValueError(
                f"experiment {e.name!r} has no numeric {metric!r}; got {e.metrics.get(metric)!r}"
            )
    other = _counterpart(metric)
    metrics = [metric] + ([other] if other and all(_is_number(e.metrics.get(other)) for e in exps) else [])
    m = _METRIC_RE.match(metric)
    is_recall = bool(m and m["k"])
    scale = 100.0 if is_recall else 1.0
    if is_recall:
        for e in exps:
            for name in metrics:
                format_percent(e.metrics[name])  # raises on a recall given in percent
    ylabel = f"Recall@{m['k']} (%)" if is_recall else (m["what"].replace("_", " ") if m else metric)

    fig = Figure(figsize=FIGSIZE)
    ax = fig.subplots()
    if numeric:
        for i, name in enumerate(metrics):
            keys, mean, lo, hi = _grouped(exps, name, numeric)
            ax.errorbar(
                np.array(keys, dtype=float),
                scale * mean,
                yerr=[scale * (mean - lo), scale * (hi - mean)],
                fmt="o-",
                color=_COLOURS[i],
                capsize=3,
                label=_direction(name),
            )
        if all(e.x > 0 for e in exps):
            ax.set_xscale("log")
        ax.set_xlabel(f"{family} (log scale)" if ax.get_xscale() == "log" else family)
    else:
        width = 0.8 / len(metrics)
        for i, name in enumerate(metrics):
            keys, mean, lo, hi = _grouped(exps, name, numeric)
            x = np.arange(len(keys)) + (i - (len(metrics) - 1) / 2) * width
            ax.bar(
                x,
                scale * mean,
                width,
                color=_COLOURS[i],
                label=_direction(name),
                yerr=[scale * (mean - lo), scale * (hi - mean)] if bool((hi > lo).any()) else None,
                capsize=3,
            )
        ax.set_xticks(np.arange(len(keys)), keys, rotation=20 if len(keys) > 4 else 0)
        ax.set_xlabel(family)
    if is_recall:
        ax.set_ylim(bottom=0)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{family} ablation: {ylabel}")
    ax.grid(alpha=0.3, axis="y" if not numeric else "both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def ablation_report(rows: list[dict], family: str, out_dir: Path) -> Path:
    """Write ``out_dir/{family}.md``: the family's table and its Recall@1 plot (``{family}.png``) beside it.

    `rows`: rows of the metrics table (see the module docstring). Characters other than letters,
    digits, '.', '_' and '-' in the family's name become '_' in the file names. Everything is checked
    (as `ablation_table` and `plot_ablation` with t2i_recall_at_1) before anything is written.
    Returns the path of the markdown file.
    """
    table = ablation_table(rows, family)
    exps, _ = _family(rows, family)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(family)).strip(".") or "family"
    out_dir = Path(out_dir)
    plot_ablation(rows, family, out_dir / f"{stem}.png", DEFAULT_METRIC)
    md = [
        f"# Ablation: {' '.join(str(family).split())}",
        "",
        f"{len(exps)} experiments, compared on their test splits.",
        "",
        table,
        "",
        "Recall@K in percent, best in bold; ranks are 1-based (lower is better); chance is the Recall@K "
        "of a random ranking.",
        "",
        f"![{_header(DEFAULT_METRIC)} by {family}]({stem}.png)",
        "",
    ]
    path = out_dir / f"{stem}.md"
    tmp = out_dir / f".{stem}.md.tmp"
    tmp.write_text("\n".join(md), encoding="utf-8")
    os.replace(tmp, path)
    return path
