"""Compare the experiments of one ablation family: a markdown table, a plot, and a report of both.

The paper's ablations vary one thing about the paired data at a time: its quantity (number of pairs),
its quality (e.g. raw vs cleaned captions) or its diversity (e.g. the selection strategy). The input is
the rows of the lake's ``metrics`` table as they are (``lake.read("metrics").to_pylist()``), one row
per (experiment, metric), and, where the rows carry them, per scored dataset, gallery and seed::

    {"experiment": "emoji-n250", "family": "quantity", "variable": "250", "dataset": "emoji",
     "gallery": "pooled", "seed": 0, "metric": "t2i_recall_at_1", "value": 0.21, ...}

``variable`` is the value the experiment takes within its family (experiments.yaml). Optional columns:

- ``seed``: an integer on one seed's rows, None (or absent) on rows that are no single seed's. An
  experiment with per-seed rows is shown as the mean ± sample standard deviation (ddof 1,
  `evaluation.aggregate`) over its seeds, and its rows without a seed (the evaluation's aggregates) are
  then not used; every seed must hold the same metrics. An experiment with only rows without a seed
  shows their values, with ± their ``std`` where they carry ``n_seeds`` > 1.
- ``gallery``: "pooled" (or absent) or another gallery (e.g. per group); one gallery is shown at a
  time, pooled by default.
- ``dataset``: the dataset scored. While every experiment is scored on one dataset (possibly each its
  own) it is ignored; when some experiment is scored on several, the family is shown per dataset.

Rows with ``split`` "val" are the validation scores model selection reads: they are left out of
the tables and plots (which show the test split) and ranked by `val_selection`, whose choice the report
names. Further columns (created_at, ...) are ignored, and so are rows of other families. Each
(experiment, dataset, gallery, seed, metric) must appear once per split.

A family whose variables are all numbers (quantity: "250", "500", ...) is ordered by value and plotted
as a line against a log x axis; one whose variables all start with a number ("500 FuseMix", "1,000 no
mixup") is ordered by that number and plotted as grouped bars, as is any other family, in the order
in which its experiments first appear. Error bars are ± one standard deviation over seeds when there are
several; several experiments with the same value and no seeds are all listed in the table and
averaged in the plot, with their min-max range as error bars. Recalls are fractions in [0, 1] in the
rows and percentages with one decimal in the output, as in `evaluation.report`, whose
`markdown_table` prints the table. Rows without seed, gallery and dataset columns (or with one dataset
per experiment) give the same tables and plots as before those columns existed.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from evaluation.aggregate import MeanStd, aggregate_seeds
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
POOLED = "pooled"
VAL = "val"
SELECTION_METRIC = "rsum"  # Recall@1+5+10 both ways on the val split (fractions; at most 6)


@dataclass(frozen=True)
class _Experiment:
    """One experiment of a family (on one scored dataset when the family is shown per dataset): its
    variable as given, as a number (numeric families), the value shown for each metric (the mean over
    seeds when it has several), and (mean, sample std, n seeds) of each metric."""

    name: str
    variable: object
    x: float | None
    metrics: dict[str, object]
    dataset: str | None = None
    spread: dict[str, MeanStd] = field(default_factory=dict)
    n_seeds: int | None = None  # None: the rows carry no seed


@dataclass(frozen=True)
class _Family:
    """The experiments of one family as shown: display order, all-numeric variables, whether each is
    shown per scored dataset (a dataset column), whether any rows carry seeds (a seeds column)."""

    exps: list[_Experiment]
    numeric: bool
    per_dataset: bool
    seeded: bool


def _is_number(v: object) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)


def _leading_number(v: object) -> float | None:
    """The number a variable starts with ("1,000 FuseMix" -> 1000.0), or None."""
    m = re.match(r"\s*(\d[\d,]*(?:\.\d+)?)(?:\s|$)", v) if isinstance(v, str) else None
    return float(m.group(1).replace(",", "")) if m else None


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


def _seed_of(i: int, r: Mapping) -> int | None:
    """A row's seed: an integer, or None for a row that is no single seed's (aggregated, or older)."""
    seed = r.get("seed")
    if seed is None or (isinstance(seed, float) and math.isnan(seed)):
        return None
    if _is_number(seed) and float(seed) == int(seed):
        return int(seed)
    raise ValueError(f"rows[{i}] has seed {seed!r}; a seed is an integer, or None on aggregated rows")


def _gallery_of(r: Mapping) -> str:
    return r.get("gallery") or POOLED


def _checked(rows: object, family: str) -> list[tuple[int, Mapping]]:
    """The rows of `family` with their positions, after checking every row's columns."""
    if not isinstance(rows, Sequence) or isinstance(rows, str) or not rows:
        raise ValueError("ablation rows are empty: there is no experiment to compare")
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping):
            raise ValueError(f"rows[{i}] must be a dict, got {type(r).__name__}")
        missing = [k for k in _KEYS if k not in r]
        if missing:
            raise ValueError(f"rows[{i}] lacks {missing} (rows of the metrics table have {list(_KEYS)})")
    picked = [(i, r) for i, r in enumerate(rows) if r["family"] == family and r.get("split") != VAL]
    if not picked:
        present = sorted({str(r["family"]) for r in rows})
        raise ValueError(f"no rows of ablation family {family!r}; families present: {present}")
    return picked


def _multi_dataset(picked: Sequence[tuple[int, Mapping]]) -> bool:
    """Whether some experiment has rows on more than one scored dataset."""
    seen: dict[str, set] = {}
    for _, r in picked:
        seen.setdefault(str(r["experiment"]), set()).add(r.get("dataset"))
    return any(len(ds) > 1 for ds in seen.values())


def scored_datasets(rows: list[dict], family: str, gallery: str = POOLED) -> list[str | None]:
    """The datasets a family is shown per, in first-seen order: [None] while every experiment is scored
    on one dataset only (the family is one table, as before datasets were a dimension), else every
    dataset its rows of `gallery` name."""
    picked = [(i, r) for i, r in _checked(rows, family) if _gallery_of(r) == gallery]
    if not picked or not _multi_dataset(picked):
        return [None]
    return list(dict.fromkeys(r.get("dataset") for _, r in picked))


def _family(rows: object, family: str, dataset: str | None = None, gallery: str = POOLED) -> _Family:
    """The experiments of `family` in display order (see `_Family`).

    Only rows of `gallery` count (rows without one are "pooled"). `dataset` None: every dataset; shown
    per dataset (one entry per experiment and dataset, datasets in first-seen order) when some
    experiment has rows on several. A dataset name: that dataset's rows only.
    """
    picked = _checked(rows, family)
    variables: dict[str, object] = {}
    for _, r in picked:
        name = str(r["experiment"])
        if variables.setdefault(name, r["variable"]) != r["variable"]:
            raise ValueError(
                f"experiment {name!r} has rows with variable {variables[name]!r} and {r['variable']!r}"
            )
    galleries = list(dict.fromkeys(_gallery_of(r) for _, r in picked))
    picked = [(i, r) for i, r in picked if _gallery_of(r) == gallery]
    if not picked:
        raise ValueError(
            f"family {family!r} has no rows of gallery {gallery!r}; galleries present: {galleries}"
        )
    if dataset is not None:
        present = list(dict.fromkeys(r.get("dataset") for _, r in picked))
        picked = [(i, r) for i, r in picked if r.get("dataset") == dataset]
        if not picked:
            raise ValueError(
                f"family {family!r} has no rows on dataset {dataset!r} (gallery {gallery!r}); "
                f"datasets present: {present}"
            )
    per_dataset = dataset is None and _multi_dataset(picked)

    # (experiment, dataset) -> metric -> {seed: value} and the value of a row without a seed.
    seeded: dict[tuple, dict[str, dict[int, object]]] = {}
    single: dict[tuple, dict[str, Mapping]] = {}
    order: dict[tuple, dict[str, None]] = {}  # metric names in order of first appearance
    for i, r in picked:
        name, metric, seed = str(r["experiment"]), str(r["metric"]), _seed_of(i, r)
        key = (name, r.get("dataset") if per_dataset else None)
        seeded.setdefault(key, {})
        single.setdefault(key, {})
        order.setdefault(key, {})[metric] = None
        where = f"experiment {name!r}" + (f" on dataset {key[1]!r}" if per_dataset else "")
        if seed is None:
            if metric in single[key]:
                raise ValueError(f"{where} has metric {metric!r} twice; give one evaluation per experiment")
            single[key][metric] = r
            continue
        values = seeded[key].setdefault(metric, {})
        if seed in values:
            raise ValueError(f"{where} has metric {metric!r} twice for seed {seed}")
        values[seed] = r["value"]

    any_seed = any(_seed_of(i, r) is not None or _n_seeds(r) > 1 for i, r in picked)
    exps = []
    for key in seeded:
        name, ds = key
        metrics: dict[str, object] = {}
        spread: dict[str, MeanStd] = {}
        # Every seed of an experiment must report the same metrics; the per-seed rows win over the
        # aggregated ones (which the evaluation stores beside them).
        seeds = sorted({s for v in seeded[key].values() for s in v})
        per_seed = [{m: v[s] for m, v in seeded[key].items() if s in v} for s in seeds]
        try:
            agg = aggregate_seeds(per_seed) if per_seed else {}
        except ValueError as err:
            raise ValueError(f"experiment {name!r}: {err}") from err
        for metric in order[key]:
            if metric in agg:
                mean, std, n = agg[metric]
                metrics[metric] = mean
                spread[metric] = (mean, std, n)
            elif metric in single[key]:
                r = single[key][metric]
                metrics[metric] = r["value"]
                n = _n_seeds(r)
                if n > 1 and _is_number(r["value"]) and _is_number(r.get("std")):
                    spread[metric] = (float(r["value"]), float(r["std"]), n)
        n_seeds = len(seeds) if seeds else max((_n_seeds(r) for r in single[key].values()), default=1)
        exps.append(
            _Experiment(name, variables[name], None, metrics, ds, spread, n_seeds if any_seed else None)
        )

    xs = {e.name: _as_float(e.variable) for e in exps}
    numeric = all(x is not None for x in xs.values())
    if numeric:
        exps = [replace(e, x=xs[e.name]) for e in exps]
        # sorted() is stable: repeated values (seeds) keep their order of first appearance.
        exps.sort(key=lambda e: e.x)
    elif all(_leading_number(e.variable) is not None for e in exps):
        # "500 FuseMix", "1,000 no mixup": bars in order of the number, then first appearance.
        exps.sort(key=lambda e: _leading_number(e.variable))
    if per_dataset:
        datasets = list(dict.fromkeys(e.dataset for e in exps))
        exps.sort(key=lambda e: datasets.index(e.dataset))
    return _Family(exps, numeric, per_dataset, any_seed)


def _n_seeds(r: Mapping) -> int:
    """The number of seeds an aggregated row summarises (its n_seeds column), 1 when it has none."""
    n = r.get("n_seeds")
    return int(n) if _is_number(n) and math.isfinite(float(n)) and n >= 1 else 1


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


def _format_cell(c: str, v: object, spread: MeanStd | None, bold: bool) -> str:
    """One metric cell: recalls in percent, ranks with one decimal, '± std' after a mean over seeds."""
    m = _METRIC_RE.match(c)
    if v is None:
        return "–"
    if m is None or not _is_number(v):
        text = format_number(v)
        if spread is not None and _is_number(v) and spread[1] != 0:
            text += f" ± {format_number(spread[1])}"
        return text
    if m["chance"]:  # a property of the split, not of training: its spread over seeds is not shown
        return format_chance(v) if m["k"] else f"{float(v):.1f}"
    text = format_percent(v) if m["k"] else ("NaN" if math.isnan(float(v)) else f"{float(v):.1f}")
    if spread is not None:
        std = spread[1]
        text += " ± " + ("NaN" if math.isnan(std) else f"{(100.0 if m['k'] else 1.0) * std:.1f}")
    return f"**{text}**" if bold else text


def ablation_table(
    rows: list[dict], family: str, *, dataset: str | None = None, gallery: str = POOLED
) -> str:
    """Markdown table of one family's experiments: experiment, its variable, every metric.

    `rows`: rows of the metrics table (see the module docstring). The variable's column is headed by
    the family's name. Recalls show as percentages with one decimal, ranks with one decimal, chance
    recalls as `format_chance`; the best value of each recall (highest) and rank (lowest) column is
    bold when experiments differ; a metric an experiment lacks shows as '–'.

    Seeds: when rows carry seeds, a ``seeds`` column gives each experiment's number of seeds and a
    metric over several seeds shows as mean ± sample standard deviation (chance levels as the mean);
    the best is judged on the mean. Only rows of `gallery` are shown (default "pooled"; rows without a
    gallery are pooled). `dataset`: only the rows of that scored dataset; None: all, with a
    ``dataset`` column and one row per (experiment, dataset) when some experiment was scored on
    several datasets (best values are then marked per dataset).
    Raises ValueError on no rows of `family` (or of `gallery` or `dataset`), rows without the metrics
    table's columns, an experiment with two variables, a metric twice (for one seed), a metric missing
    in some of an experiment's seeds, or a recall outside [0, 1].
    """
    fam = _family(rows, family, dataset, gallery)
    exps = fam.exps
    columns = _metric_columns(exps)
    best: dict[tuple[str, str | None], float] = {}
    for ds in dict.fromkeys(e.dataset for e in exps):
        for c in columns:
            m = _METRIC_RE.match(c)
            vals = [
                float(v)
                for e in exps
                if e.dataset == ds and _is_number(v := e.metrics.get(c)) and math.isfinite(float(v))
            ]
            if m is not None and not m["chance"] and len(set(vals)) > 1:
                best[(c, ds)] = max(vals) if m["k"] else min(vals)

    def fmt(e: _Experiment, c: str) -> str:
        v = e.metrics.get(c)
        spread = e.spread.get(c)
        bold = (c, e.dataset) in best and _is_number(v) and float(v) == best[(c, e.dataset)]
        return _format_cell(c, v, spread if spread is not None and spread[2] > 1 else None, bold)

    header = ["experiment"] + (["dataset"] if fam.per_dataset else []) + [family]
    header += (["seeds"] if fam.seeded else []) + [_header(c) for c in columns]
    body = [
        [e.name]
        + ([format_number(e.dataset)] if fam.per_dataset else [])
        + [format_number(e.variable)]
        + ([format_number(e.n_seeds)] if fam.seeded else [])
        + [fmt(e, c) for c in columns]
        for e in exps
    ]
    aligned = [False] + ([False] if fam.per_dataset else []) + [fam.numeric] + ([True] if fam.seeded else [])
    aligned += [any(_is_number(e.metrics.get(c)) for e in exps) for c in columns]
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


def _pooled(parts: Sequence[MeanStd]) -> MeanStd:
    """(mean, sample std, n) of the union of samples given as (mean, sample std, n) each."""
    n = sum(p[2] for p in parts)
    mean = sum(p[0] * p[2] for p in parts) / n
    if n < 2:
        return mean, 0.0, n
    ss = sum((p[2] - 1) * p[1] ** 2 + p[2] * (p[0] - mean) ** 2 for p in parts)
    return mean, math.sqrt(ss / (n - 1)), n


def _grouped(
    exps: Sequence[_Experiment], metric: str, numeric: bool
) -> tuple[list[object], np.ndarray, np.ndarray, np.ndarray]:
    """Values in display order (repeats merged) with the mean of `metric` and the ends of its error bar:
    each [n_values].

    Numeric families give the numbers; others the variants' labels, where an experiment without a
    variable (the demo family's) is a group of its own, labelled by its name. The error bar is the
    mean ± the sample standard deviation over every seed of the group's experiments when any of them
    has several seeds, else the min-max range of the experiments' values (a single value: none).
    """
    groups: dict[tuple, list[MeanStd]] = {}
    for e in exps:
        if numeric:
            key = (e.x, e.x)
        elif e.variable is None or str(e.variable).strip() == "":
            key = ("experiment", e.name)
        else:
            key = ("variable", str(e.variable))
        groups.setdefault(key, []).append(e.spread.get(metric) or (float(e.metrics[metric]), 0.0, 1))
    means, lo, hi = [], [], []
    for parts in groups.values():
        if any(p[2] > 1 for p in parts):
            mean, std, _ = _pooled(parts)
            means.append(mean), lo.append(mean - std), hi.append(mean + std)
        else:
            v = np.array([p[0] for p in parts])
            means.append(v.mean()), lo.append(v.min()), hi.append(v.max())
    return [key[1] for key in groups], np.array(means), np.array(lo), np.array(hi)


def _plot_metrics(fam: _Family, family: str, metric: str) -> list[str]:
    """The metrics to draw: `metric` and its other direction where every experiment has it; checked."""
    if fam.per_dataset:
        datasets = list(dict.fromkeys(e.dataset for e in fam.exps))
        raise ValueError(
            f"family {family!r} is scored on several datasets {datasets}: plot one at a time with dataset="
        )
    for e in fam.exps:
        if not _is_number(e.metrics.get(metric)):
            raise ValueError(
                f"experiment {e.name!r} has no numeric {metric!r}; got {e.metrics.get(metric)!r}"
            )
    other = _counterpart(metric)
    metrics = [metric]
    if other and all(_is_number(e.metrics.get(other)) for e in fam.exps):
        metrics.append(other)
    m = _METRIC_RE.match(metric)
    if m and m["k"]:
        for e in fam.exps:
            for name in metrics:
                format_percent(e.metrics[name])  # raises on a recall given in percent
    return metrics


def plot_ablation(
    rows: list[dict],
    family: str,
    path: Path,
    metric: str = DEFAULT_METRIC,
    *,
    dataset: str | None = None,
    gallery: str = POOLED,
) -> Path:
    """Plot `metric` across one family's experiments, both retrieval directions when they have both.

    Numeric families (quantity): metric against the variable, log x when all values are positive.
    Others (quality, diversity): grouped bars, one group per variant and one bar per direction. The
    other direction (``i2t_...`` for ``t2i_...``) is drawn when every experiment has it. Recalls are
    drawn in percent. Error bars: ± one standard deviation over seeds when there are several, else the
    range of experiments that share a value (see `_grouped`). `dataset` and `gallery` pick rows as in
    `ablation_table`; a family scored on several datasets is plotted one dataset at a time. Returns
    `path`. Raises ValueError as `ablation_table`, when an experiment of the family lacks `metric` or
    holds a non-number there, and on several datasets without `dataset`; nothing is written then.
    """
    fam = _family(rows, family, dataset, gallery)
    metrics = _plot_metrics(fam, family, metric)
    return _draw(fam, family, metrics, path, "" if dataset is None else f" on {dataset}")


def _draw(fam: _Family, family: str, metrics: list[str], path: Path, where: str) -> Path:
    exps, numeric = fam.exps, fam.numeric
    m = _METRIC_RE.match(metrics[0])
    is_recall = bool(m and m["k"])
    scale = 100.0 if is_recall else 1.0
    ylabel = f"Recall@{m['k']} (%)" if is_recall else (m["what"].replace("_", " ") if m else metrics[0])

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
            _log_x(ax, [float(e.x) for e in exps])
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
        # Long labels slanted and right-aligned under their bars, so neighbours do not overlap.
        tilt = len(keys) > 4
        ax.set_xticks(
            np.arange(len(keys)), keys, rotation=30 if tilt else 0, ha="right" if tilt else "center"
        )
        ax.set_xlabel(family)
    if is_recall:
        ax.set_ylim(bottom=0)
    ax.set_ylabel(ylabel)
    ax.set_title(
        f"{family} ablation{where}: {ylabel}" + (" (mean ± std over seeds)" if _has_spread(fam) else ""),
        fontsize=10,
    )
    ax.grid(alpha=0.3, axis="y" if not numeric else "both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def _log_x(ax, values: Sequence[float]) -> None:
    """A log x axis whose ticks are the measured values written plainly (128, 1,000, 0.5; not
    1.28x10^2), where there are few enough of them to label each."""
    ax.set_xscale("log")
    xs = sorted(set(values))
    if len(xs) <= 12:
        ax.set_xticks(xs, [f"{v:,.0f}" if v.is_integer() else f"{v:g}" for v in xs])
        ax.xaxis.set_minor_locator(NullLocator())


def _has_spread(fam: _Family) -> bool:
    return any(s[2] > 1 for e in fam.exps for s in e.spread.values())


def _stem(name: object) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip(".") or "family"


def _mean_std(rows: Sequence[Mapping]) -> MeanStd | None:
    """(mean, sample std, n) of one metric's rows of one experiment: over its seeds' rows when it has
    any, else its row without a seed (with its std and n_seeds); None without rows."""
    seeded = [float(r["value"]) for r in rows if r.get("seed") is not None]
    if seeded:
        mean, std, n = aggregate_seeds([{"v": v} for v in seeded])["v"]
        return mean, (0.0 if n < 2 else std), n
    for r in rows:
        n = int(r.get("n_seeds") or 1)
        return float(r["value"]), float(r.get("std") or 0.0) if n > 1 else 0.0, n
    return None


def _mean_of(rows: Sequence[Mapping], metric: str) -> float | None:
    found = _mean_std([r for r in rows if r["metric"] == metric])
    return None if found is None else found[0]


def val_selection(rows: list[dict], family: str) -> list[dict]:
    """The family's experiments ranked by their validation R-sum, best first: one dict each with
    experiment, variable, method, ``val`` ((mean, sample std, n seeds) of the R-sum), ``val_t2i`` /
    ``val_i2t`` (Recall@1 on val) and ``test_t2i`` / ``test_i2t`` (Recall@1 on the test split of
    the same dataset, pooled; None where absent). Only experiments with val rows of ``rsum`` (pooled)
    are ranked; none: an empty list. Ties keep the order in which the experiments first appear. The
    test values are carried for the report and never used to rank."""
    mine = [r for r in rows if isinstance(r, Mapping) and r.get("family") == family]
    val = [r for r in mine if r.get("split") == VAL and _gallery_of(r) == POOLED]
    out = []
    for name in dict.fromkeys(str(r["experiment"]) for r in val):
        own = [r for r in val if str(r["experiment"]) == name]
        score = _mean_std([r for r in own if r["metric"] == SELECTION_METRIC])
        if score is None:
            continue
        dataset = own[0].get("dataset")
        test = [
            r for r in mine
            if str(r["experiment"]) == name and r.get("split") != VAL and _gallery_of(r) == POOLED
            and r.get("dataset") == dataset
        ]  # fmt: skip
        out.append({
            "experiment": name, "variable": own[0]["variable"], "method": own[0].get("method"),
            "dataset": dataset, "val": score,
            "val_t2i": _mean_of(own, "t2i_recall_at_1"), "val_i2t": _mean_of(own, "i2t_recall_at_1"),
            "test_t2i": _mean_of(test, "t2i_recall_at_1"), "test_i2t": _mean_of(test, "i2t_recall_at_1"),
        })  # fmt: skip
    return sorted(out, key=lambda e: -e["val"][0])


def selection_markdown(ranked: list[dict]) -> str:
    """The report's section on a family's choice on validation (`val_selection`'s ranking): a table
    and a sentence naming the choice and the variables whose R-sum lies within one std of it."""
    if not ranked:
        return ""
    best = ranked[0]
    mean, std, n = best["val"]

    def pm(v: MeanStd) -> str:
        return f"{100 * v[0]:.1f}" + (f" ± {100 * v[1]:.1f}" if v[2] > 1 else "")

    table = markdown_table(
        ["rank", "experiment", "variable", "seeds", "val R-sum", "val t2i R@1", "val i2t R@1",
         "test t2i R@1", "test i2t R@1"],
        [
            [str(i + 1), e["experiment"], str(e["variable"]), str(e["val"][2]), pm(e["val"]),
             format_percent(e["val_t2i"]), format_percent(e["val_i2t"]),
             format_percent(e["test_t2i"]), format_percent(e["test_i2t"])]
            for i, e in enumerate(ranked)
        ],
        [True, False, False, True, True, True, True, True, True],
    )  # fmt: skip
    # The spread a difference must exceed: the chosen one's std over seeds, else the largest std seen.
    spread = std if n > 1 else max((e["val"][1] for e in ranked if e["val"][2] > 1), default=0.0)
    close = [e for e in ranked[1:] if mean - e["val"][0] <= spread]
    text = (
        f"Chosen on validation: **{best['variable']}** ({best['experiment']}), val R-sum {pm(best['val'])}"
        f" (Recall@1+5+10 both ways, in points; at most 600)."
    )
    if spread == 0.0:
        text += " No experiment has several seeds, so the spread of the choice is unknown."
    elif close:
        text += (
            f" Within one std ({100 * spread:.1f}) of it, so not distinguishable on validation: "
            + ", ".join(str(e["variable"]) for e in close)
            + "."
        )
    else:
        text += f" Every other variable is more than one std ({100 * spread:.1f}) behind."
    return "\n".join([
        "## Chosen on validation", "",
        "Ranked by the R-sum on the val split only (concepts held out of training and of the test "
        "split); the test columns are shown, never used to choose.", "",
        table, "", text, "",
    ])  # fmt: skip


def ablation_report(rows: list[dict], family: str, out_dir: Path, *, gallery: str = POOLED) -> Path:
    """Write ``out_dir/{family}.md``: the family's table and its Recall@1 plot (``{family}.png``) beside it.

    `rows`: rows of the metrics table (see the module docstring), of every dataset, gallery and seed.
    Characters other than letters, digits, '.', '_' and '-' in the family's name become '_' in the file
    names. A family scored on several datasets gets one section per dataset, each with its table and
    plot (``{family}_{dataset}.png``). With seeds, tables show mean ± std and plots ± std error bars.
    Only rows of `gallery` are shown; another gallery than "pooled" writes ``{family}_{gallery}.md``
    (and its plots) so that it does not replace the pooled report. Everything is checked (as
    `ablation_table` and `plot_ablation` with t2i_recall_at_1) before anything is written. Returns the
    path of the markdown file.
    """
    datasets = scored_datasets(rows, family, gallery)
    stem = _stem(family) + ("" if gallery == POOLED else f"_{_stem(gallery)}")
    out_dir = Path(out_dir)
    sections = []  # (dataset, table, family, metrics, png name)
    for ds in datasets:
        fam = _family(rows, family, ds, gallery)
        table = ablation_table(rows, family, dataset=ds, gallery=gallery)
        png = f"{stem}.png" if ds is None else f"{stem}_{_stem(ds)}.png"
        sections.append((ds, table, fam, _plot_metrics(fam, family, DEFAULT_METRIC), png))
    note = (
        "Recall@K in percent, best in bold; ranks are 1-based (lower is better); chance is the Recall@K "
        "of a random ranking."
    )
    if any(_has_spread(fam) for _, _, fam, _, _ in sections):
        note += (
            " With several seeds, values are the mean ± the sample standard deviation over the seeds "
            "(the seeds column), the best is judged on the mean, and error bars show ± one standard "
            "deviation."
        )
    names = {e.name for _, _, fam, _, _ in sections for e in fam.exps}
    intro = f"{len(names)} experiments, compared on their test splits"
    md = [f"# Ablation: {' '.join(str(family).split())}", ""]
    if datasets == [None]:
        md += [intro + ".", ""]
    else:
        md += [intro + f" and on {len(datasets)} scored datasets, one section each.", ""]
    if gallery != POOLED:
        md += [f"Gallery: {gallery} (one gallery per group, averaged over groups with equal weights).", ""]
    if datasets != [None]:
        md += [note, ""]
    for ds, table, fam, metrics, png in sections:
        where = "" if ds is None else f" on {ds}"
        if ds is not None:
            md += [f"## {' '.join(str(ds).split())}", ""]
        md += [table, ""]
        if ds is None:
            md += [note, ""]
        _draw(fam, family, metrics, out_dir / png, where)
        md += [f"![{_header(DEFAULT_METRIC)} by {family}{where}]({png})", ""]
    if gallery == POOLED:
        md += [selection_markdown(val_selection(rows, family))]
    path = out_dir / f"{stem}.md"
    tmp = out_dir / f".{stem}.md.tmp"
    tmp.write_text("\n".join(md), encoding="utf-8")
    os.replace(tmp, path)
    return path
