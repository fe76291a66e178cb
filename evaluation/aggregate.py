"""Seeds and spread: one experiment trained (or scored) with several seeds, summarised per metric.

``aggregate_seeds`` takes one flat dict of metrics per seed (``RetrievalResult.as_dict`` or the
evaluation's metrics) and gives, per metric, the mean, the SAMPLE standard deviation (ddof = 1: the
seeds are a sample of the seeds one could have drawn; 0.0 for a single seed) and the number of seeds.
``summary_rows`` turns that into rows for a table or the lake. Pure numbers: no formatting here (see
`evaluation.report` and `evaluation.ablation` for mean ± std in tables and error bars in plots).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

MeanStd = tuple[float, float, int]


def aggregate_seeds(per_seed: Sequence[Mapping[str, float]]) -> dict[str, MeanStd]:
    """{metric: (mean, sample std with ddof=1, n seeds)} over one dict of metrics per seed.

    Every seed must hold the same metric names: a metric missing in some seeds is an error naming it
    (averaging it over the seeds that have it would mix different sets of seeds in one table). Metrics
    come in the first seed's order. Values must be real numbers (bools are refused); NaN and inf
    propagate into the mean and std. Raises ValueError on no seeds, a missing metric or a non-number.
    """
    if isinstance(per_seed, Mapping) or not isinstance(per_seed, Sequence) or not per_seed:
        raise ValueError("per_seed must be a non-empty list with one dict of metrics per seed")
    for i, metrics in enumerate(per_seed):
        if not isinstance(metrics, Mapping):
            raise ValueError(
                f"per_seed[{i}] must be a dict of metric name -> value, got {type(metrics).__name__}"
            )
    names = list(dict.fromkeys(m for metrics in per_seed for m in metrics))
    for name in names:
        missing = [i for i, metrics in enumerate(per_seed) if name not in metrics]
        if missing:
            raise ValueError(
                f"metric {name!r} is missing in seed(s) at position {missing} of {len(per_seed)}; "
                "every seed must report the same metrics"
            )
    out: dict[str, MeanStd] = {}
    n = len(per_seed)
    for name in names:
        values = np.array([_number(name, i, metrics[name]) for i, metrics in enumerate(per_seed)])
        std = float(np.std(values, ddof=1)) if n > 1 else 0.0
        out[name] = (float(np.mean(values)), std, n)
    return out


def summary_rows(aggregated: Mapping[str, MeanStd], **columns: object) -> list[dict]:
    """One row per metric of `aggregate_seeds`' result: ``{**columns, "metric", "mean", "std", "n"}``,
    in its order. `columns` (e.g. experiment=..., dataset=...) are repeated in every row."""
    clash = {"metric", "mean", "std", "n"} & set(columns)
    if clash:
        raise ValueError(f"columns may not be named {sorted(clash)}: summary_rows writes those itself")
    return [
        {**columns, "metric": name, "mean": mean, "std": std, "n": n}
        for name, (mean, std, n) in aggregated.items()
    ]


def _number(name: str, seed: int, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"metric {name!r} of seed at position {seed} must be a number, got {value!r}")
    return float(value)
