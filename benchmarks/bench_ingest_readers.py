"""Benchmark: rows/s of reading a manifest with the dataset readers, probing off, on, and on worker threads.

Writes a manifest of --rows rows (two captions per image, --size px JPEGs with some texture) into a
temporary folder, then reads it side by side in one run: without probing (resolve, read, hash), with
probing on one thread (every image fully decoded, as ingest does by default), and with probing on
--workers threads. Prints rows/s for each and the ratios, and checks the three give the same pairs.

Run: python -m benchmarks.bench_ingest_readers [--rows 2000] [--size 256] [--workers 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fusion.data.readers import read_dataset


def write_corpus(root: Path, rows: int, size: int) -> None:
    rng = np.random.default_rng(0)
    n_images = max(1, rows // 2)
    yy, xx = np.mgrid[0:size, 0:size]
    lines = ["image,caption"]
    for i in range(n_images):
        base = (np.sin(xx / (3 + i % 17)) + np.cos(yy / (5 + i % 11))) * 60 + 128
        noise = rng.normal(0, 12, (size, size, 3))
        arr = np.clip(base[..., None] + noise + rng.integers(0, 60, 3), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / f"{i:05d}.jpg", quality=90)
        lines.append(f"{i:05d}.jpg,picture number {i}")
        lines.append(f"{i:05d}.jpg,another caption for picture {i}")
    (root / "manifest.csv").write_text("\n".join(lines[: rows + 1]) + "\n")


def timed(root: Path, repeat: int, **kw) -> tuple[float, int, list]:
    best = float("inf")
    pairs: list = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        ds = read_dataset("manifest", root, name="bench", progress=False, **kw)
        best = min(best, time.perf_counter() - t0)
        pairs = ds.pairs
    return best, len(pairs), pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3, help="best of this many reads per variant")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_readers_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        write_corpus(root, args.rows, args.size)
        print(
            f"corpus: {args.rows} rows, {args.rows // 2} JPEGs of {args.size}px ({time.perf_counter() - t0:.1f} s)"
        )
        variants = {
            "no probe": {"probe": False},
            "probe, 1 thread": {"probe": True},
            f"probe, {args.workers} threads": {"probe": True, "workers": args.workers},
        }
        results = {name: timed(root, args.repeat, **kw) for name, kw in variants.items()}
    ref_pairs = next(iter(results.values()))[2]
    for name, (secs, n, pairs) in results.items():
        same = "same pairs" if pairs == ref_pairs else "DIFFERENT PAIRS"
        print(f"{name:>20}: {secs:7.3f} s  {n / secs:9.0f} rows/s  ({n} pairs, {same})")
    names = list(results)
    base = results[names[1]][0]
    print(f"probing costs x{base / results[names[0]][0]:.2f} over no probe (1 thread)")
    print(f"{args.workers} threads vs 1 thread (probing): x{base / results[names[2]][0]:.2f} faster")


if __name__ == "__main__":
    main()
