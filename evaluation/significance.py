"""Is one method's Recall@K really above another's? A paired bootstrap over the test concepts.

The seeds' standard deviation says how much a method moves with its random draws; it says nothing
about how much the number would move with another sample of test queries. With 382 caption queries,
one query is 0.26 points of Recall@1, and a lead of one point can be a handful of captions. The
paired bootstrap answers that: both methods ranked the very same queries, so resampling the queries
(with replacement, the same draw for both) and recomputing the difference of their recalls gives the
spread of that difference over test sets like this one (Efron & Tibshirani 1993, ch. 16; the usual
test for retrieval and MT system comparisons).

Inputs are hits per query: `a` [S_a, Q] and `b` [S_b, Q] (1 where the query's first correct answer is
within the top K, for each seed of each method; a training-free method has one seed), on the same Q
queries in the same order. Seeds are averaged per query first (the mean over seeds of a recall is the
recall of the per-query means), so the bootstrap resamples queries, not seeds. `groups` [Q] names each
query's gallery for the per-group scoring (one gallery per emoji style): the statistic is then the
mean over groups of each group's recall, as `evaluation.retrieval.mean_over_groups` reports it, and
the resampling is stratified, within each group.

`clusters` [Q] names each query's concept. Queries of one concept are not independent draws: the six
pictures of one emoji in six styles, or the two captions of one picture, mostly succeed or fail
together, and the test set is a draw of concepts (the splits hold out whole concepts). So where
clusters are given the bootstrap resamples concepts, each with all of its queries (a cluster
bootstrap; the statistic is the recall over the queries drawn), which gives wider and more honest
intervals than resampling queries one by one. Without clusters every query is its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from evaluation.report import save_figure

DEFAULT_RESAMPLES = 10_000


@dataclass(frozen=True)
class PairedDifference:
    """Recall of A minus recall of B (fractions), with its bootstrap interval over the queries.

    low, high: the central `level` percentile interval of the resampled differences;
    share_not_above: the share of resamples where A does not lead (difference <= 0), a one-sided
    bootstrap p-value for "A is better"; n_queries: Q; n_clusters: the concepts (or queries) resampled.
    """

    difference: float
    low: float
    high: float
    level: float
    share_not_above: float
    n_queries: int
    n_clusters: int

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly on one side of 0: the lead is larger than the test set's
        sampling noise at this level."""
        return self.low > 0.0 or self.high < 0.0


def hits(ranks: np.ndarray, k: int) -> np.ndarray:
    """1.0 where a 1-based rank is within the top k, else 0.0 (same shape as ranks)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    r = np.asarray(ranks)
    if r.size and r.min() < 1:
        raise ValueError("ranks are 1-based: got a rank below 1")
    return (r <= k).astype(np.float64)


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    groups: Sequence[str] | None = None,
    clusters: Sequence[str] | None = None,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """The difference mean(a) - mean(b) over the queries (per group, then over groups) and its
    paired bootstrap interval, resampling `clusters` (one name per query) where given, else queries.
    a: [S_a, Q] or [Q]; b: [S_b, Q] or [Q]; values in [0, 1]."""
    da, db = _per_query(a, "a"), _per_query(b, "b")
    if da.shape != db.shape:
        raise ValueError(f"a and b must score the same queries: {da.shape[0]} against {db.shape[0]} queries")
    if da.size == 0:
        raise ValueError("no queries to compare")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    d = da - db
    names = ["" for _ in range(d.size)] if groups is None else list(groups)
    if len(names) != d.size:
        raise ValueError(f"groups has {len(names)} entries for {d.size} queries (one per query)")
    rng = np.random.default_rng(seed)
    group_of = {g: j for j, g in enumerate(dict.fromkeys(names))}
    member_rows = [np.flatnonzero(np.asarray(names) == g) for g in group_of]
    point = float(np.mean([d[rows].mean() for rows in member_rows]))
    if clusters is None:
        # Queries are independent draws: resample each gallery's queries on their own.
        boot = np.zeros(resamples)
        n_units = d.size
        for rows in member_rows:
            sub = d[rows]
            boot += sub[rng.integers(0, sub.size, size=(resamples, sub.size))].mean(axis=1)
        boot /= len(group_of)
    else:
        units = list(clusters)
        if len(units) != d.size:
            raise ValueError(f"clusters has {len(units)} entries for {d.size} queries (one per query)")
        # A concept is drawn once for all galleries: its queries in every gallery come with it.
        unit_of = {u: j for j, u in enumerate(dict.fromkeys(units))}
        n_units = len(unit_of)
        sums = np.zeros((len(group_of), n_units))
        counts = np.zeros((len(group_of), n_units))
        for i, (g, u) in enumerate(zip(names, units, strict=True)):
            sums[group_of[g], unit_of[u]] += d[i]
            counts[group_of[g], unit_of[u]] += 1.0
        draw = rng.integers(0, n_units, size=(resamples, n_units))
        per_group = np.full((len(group_of), resamples), np.nan)
        for j in range(len(group_of)):
            den = counts[j][draw].sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                per_group[j] = np.where(den > 0, sums[j][draw].sum(axis=1) / den, np.nan)
        boot = np.nanmean(per_group, axis=0)  # a draw without any query of a gallery leaves it out
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(boot, [tail, 1.0 - tail])
    return PairedDifference(
        difference=point,
        low=float(low),
        high=float(high),
        level=level,
        share_not_above=float(np.mean(boot <= 0.0)),
        n_queries=int(d.size),
        n_clusters=n_units,
    )


def _per_query(x: np.ndarray, name: str) -> np.ndarray:
    """The mean over seeds of each query's hit, float64 [Q]."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"{name} must be [seeds, queries] or [queries], got shape {np.shape(x)}")
    if not np.isfinite(arr).all() or arr.min(initial=0.0) < 0.0 or arr.max(initial=0.0) > 1.0:
        raise ValueError(f"{name} must hold hits in [0, 1]")
    return arr.mean(axis=0)


def compare_experiments(
    ranks: Sequence[dict],
    reference: str,
    *,
    k: int = 1,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
) -> list[dict]:
    """`reference` against every other experiment in `ranks` (rows of the `ranks` table: experiment,
    dataset, gallery, group_name, seed, direction, query, rank and, where known, concept), on each
    dataset, gallery and direction that both scored on the very same queries: one dict each with
    experiment, dataset, gallery, direction and ``result`` (a PairedDifference of Recall@k, reference
    minus the other), resampling concepts. Where the two scored different query sets (another test
    split) there is nothing to pair: no row."""
    table: dict[str, dict[tuple[str, str, str], dict[int, dict[tuple[str, str], int]]]] = {}
    concept_of: dict[tuple[str, str], str] = {}  # (dataset, query) -> concept
    for r in ranks:
        where = (str(r["dataset"]), str(r["gallery"]), str(r["direction"]))
        by_seed = table.setdefault(str(r["experiment"]), {}).setdefault(where, {})
        by_seed.setdefault(int(r["seed"]), {})[(str(r["group_name"]), str(r["query"]))] = int(r["rank"])
        if r.get("concept") is not None:
            concept_of[(where[0], str(r["query"]))] = str(r["concept"])
    if reference not in table:
        raise ValueError(f"no ranks stored for the reference experiment {reference!r}")
    out = []
    for other in sorted(set(table) - {reference}):
        for where in sorted(set(table[reference]) & set(table[other])):
            ref_seeds, other_seeds = table[reference][where], table[other][where]
            keys = sorted(next(iter(ref_seeds.values())))
            if any(sorted(s) != keys for s in (*ref_seeds.values(), *other_seeds.values())):
                continue

            # A query without a concept is a cluster of its own.
            clusters = [concept_of.get((where[0], q), f"query:{q}") for _, q in keys]
            result = paired_bootstrap(
                _hit_matrix(ref_seeds, keys, k), _hit_matrix(other_seeds, keys, k), [g for g, _ in keys],
                clusters, resamples=resamples, level=level, seed=seed,
            )  # fmt: skip
            dataset, gallery, direction = where
            out.append(
                {"experiment": other, "dataset": dataset, "gallery": gallery, "direction": direction,
                 "result": result}
            )  # fmt: skip
    return out


def _hit_matrix(seeds: dict[int, dict[tuple[str, str], int]], keys: list, k: int) -> np.ndarray:
    """Hits at k [seeds, queries] of one experiment, its queries in the order of `keys`."""
    return hits(np.array([[ranks[q] for q in keys] for ranks in seeds.values()]), k)


def plot_differences(reference: str, comparisons: Sequence[dict], path: Path, k: int = 1) -> Path:
    """A forest plot of `compare_experiments`' rows: each difference (points of Recall@k) as a dot
    with its interval as a bar, one row per experiment, dataset, gallery and direction, against a line
    at 0; a row whose interval excludes 0 is filled, one across it hollow."""
    if not comparisons:
        raise ValueError("nothing to plot: no comparisons")
    colours = {"t2i": "tab:blue", "i2t": "tab:orange"}
    fig = Figure(figsize=(7.5, 1.2 + 0.28 * len(comparisons)))
    ax = fig.subplots()
    labels = []
    for y, c in enumerate(comparisons):
        r: PairedDifference = c["result"]
        colour = colours.get(c["direction"], "tab:green")
        ax.plot([100 * r.low, 100 * r.high], [y, y], color=colour, linewidth=2)
        ax.plot(
            [100 * r.difference],
            [y],
            "o",
            color=colour,
            markerfacecolor=colour if r.excludes_zero else "white",
        )
        gallery = "" if c["gallery"] == "pooled" else f", {c['gallery']}"
        labels.append(f"{c['experiment']} ({c['dataset']}{gallery}, {c['direction']})")
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylim(len(labels) - 0.5, -0.5)  # first row on top, no empty margin
    ax.set_xlabel(f"Recall@{k} of {reference} minus the other's (points)")
    ax.set_title(
        f"{reference} against each, {100 * comparisons[0]['result'].level:.0f}% paired-bootstrap intervals",
        fontsize=9,
    )
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return save_figure(fig, Path(path))


def differences_markdown(reference: str, comparisons: Sequence[dict], k: int = 1) -> str:
    """A report section: `compare_experiments`' rows as a table in points of Recall@k, and what
    they mean. Empty when there is nothing to compare."""
    if not comparisons:
        return ""
    level = comparisons[0]["result"].level
    lines = [
        "## Paired differences on the test concepts",
        "",
        f"Recall@{k} of **{reference}** minus each other experiment's, in points, on the same test "
        f"queries (seeds averaged per query), with the {100 * level:.0f}% interval of a paired "
        "bootstrap over the test concepts, each drawn with all its queries: how far the difference "
        "would move with another draw of as many test concepts. Where the interval excludes 0 the lead "
        "is larger than that noise; the last column is the share of resamples where the reference does "
        "not lead.",
        "",
        "| experiment | dataset | gallery | direction | queries | concepts | difference | interval | share <= 0 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        r: PairedDifference = c["result"]
        diff = f"{100 * r.difference:+.1f}"
        lines.append(
            f"| {c['experiment']} | {c['dataset']} | {c['gallery']} | {c['direction']} | {r.n_queries} "
            f"| {r.n_clusters} "
            f"| {'**' + diff + '**' if r.excludes_zero else diff} "
            f"| [{100 * r.low:+.1f}, {100 * r.high:+.1f}] | {r.share_not_above:.3f} |"
        )
    return "\n".join(lines) + "\n"
