"""Benchmark of dataset ingestion: rows/s of the default sources, cold (download) and warm (cached).

For each source and limit, fetches into a fresh cache (cold: registry download, unpack, drawing,
checks and hashing) and then again into the same cache (warm: no download), and prints the pairs,
concepts, unique media, quarantined rows, both wall times, pairs/s and the cold/warm ratio
measured side by side in the same run. Needs the npm and Debian registries for the cold pass.

`bench_sources(names, limits)` works over any registry of fetchers with the common signature
`fetch(cache, *, limit, seed, progress) -> Dataset` (default: pipelines.sources.SOURCES when the
project defines it, else the image-text sources), so other sources can reuse it.

Run: python -m benchmarks.bench_ingest [--sources emoji,icons,openclipart] [--limits 300,full]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from pipelines.sources.common import SourceUnavailable


def default_sources() -> Mapping[str, Callable]:
    """pipelines.sources.SOURCES where the project has merged it, else the image-text registry."""
    import pipelines.sources as sources

    registry = getattr(sources, "SOURCES", None)
    if registry:
        return registry
    from pipelines.sources.image import SOURCES_IMAGE

    return SOURCES_IMAGE


def bench_sources(
    names: Iterable[str],
    limits: Iterable[int | None] = (300, None),
    registry: Mapping[str, Callable] | None = None,
    workdir: Path | None = None,
) -> list[dict]:
    """One row per (source, limit): counts, cold and warm seconds, pairs/s, cold/warm ratio.

    A source that cannot be fetched here gives a row with `error` set instead of numbers.
    """
    registry = default_sources() if registry is None else registry
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-", dir=workdir) as tmp:
        for name in names:
            fetch = registry[name]
            for limit in limits:
                cache = Path(tmp) / f"{name}-{limit or 'full'}"
                row: dict = {"source": name, "limit": limit or "full"}
                try:
                    t0 = time.perf_counter()
                    ds = fetch(cache, limit=limit, seed=0, progress=False)
                    cold = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    again = fetch(cache, limit=limit, seed=0, progress=False)
                    warm = time.perf_counter() - t0
                except SourceUnavailable as exc:
                    rows.append(row | {"error": str(exc)})
                    continue
                if len(again.pairs) != len(ds.pairs):
                    raise RuntimeError(
                        f"{name}: the warm fetch gave {len(again.pairs)} pairs, cold {len(ds.pairs)}"
                    )
                summary = ds.summary()
                rows.append(
                    row
                    | summary
                    | {
                        "cold_s": round(cold, 3),
                        "warm_s": round(warm, 3),
                        "pairs_per_s_cold": round(summary["pairs"] / cold, 1),
                        "pairs_per_s_warm": round(summary["pairs"] / warm, 1),
                        "cold_over_warm": round(cold / warm, 1),
                    }
                )
    return rows


def _limit(text: str) -> int | None:
    return None if text == "full" else int(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", default="emoji,icons,openclipart", help="comma-separated source names")
    ap.add_argument("--limits", default="300,full", help="comma-separated concept limits; 'full' = no limit")
    args = ap.parse_args()
    rows = bench_sources(args.sources.split(","), [_limit(x) for x in args.limits.split(",")])
    cols = ["source", "limit", "pairs", "concepts", "unique_media", "quarantined", "cold_s", "warm_s"]
    cols += ["pairs_per_s_cold", "pairs_per_s_warm", "cold_over_warm"]
    print(" | ".join(cols))
    for row in rows:
        if "error" in row:
            print(f"{row['source']} | {row['limit']} | unavailable: {row['error']}")
        else:
            print(" | ".join(str(row[c]) for c in cols))


if __name__ == "__main__":
    main()
