"""Training streamed from Lance against the same pairs held in RAM: peak memory and pairs/s.

Synthetic pairs (x 1280-d, y 384-d by default; y a fixed random projection of x plus noise, so the
adapters have something to learn) are written to a Lance table chunk by chunk. Then, each in its own
process so that peak memory is its own: `ram` reads the whole table into two float32 arrays and trains
on them; `stream` trains from pipelines.stream.lance_chunks (slices of --chunk rows). Both run the same
FuseMix step (batch 1024, 2 blocks of width d, fp32) for --steps steps. The peak resident memory (ru_maxrss) and
the training pairs/s are printed side by side, with the ratios.

    python -m benchmarks.bench_stream                      # 1,000,000 pairs (6.7 GB as float32), 150 steps
    python -m benchmarks.bench_stream --pairs 200000 --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("LANCE_LOG", "error")


def synthetic_chunks(n: int, dx: int, dy: int, chunk: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    proj = rng.standard_normal((dx, dy)).astype(np.float32) / np.sqrt(dx)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = rng.standard_normal((m, dx), dtype=np.float32)
        y = x @ proj + 0.5 * rng.standard_normal((m, dy), dtype=np.float32)
        yield x, y


def _train(mode: str, root: str, table: str, steps: int, chunk: int) -> dict:
    from fusion.config import AdapterConfig, FuseMixConfig, TrainConfig
    from fusion.trainer import train_adapters
    from pipelines.lake import Lake, arrow_to_vectors
    from pipelines.stream import lance_chunks

    lake = Lake(root)
    adapter = AdapterConfig(depth=2, expansion=1, output_dim=512)
    train = TrainConfig(batch_size=1024, epochs=None, steps=steps, warmup_steps=10, precision="fp32")
    t0 = time.perf_counter()
    if mode == "ram":
        ds = lake.open(table)
        n = ds.count_rows()
        dx, dy = ds.schema.field("x").type.list_size, ds.schema.field("y").type.list_size
        x, y = np.empty((n, dx), np.float32), np.empty((n, dy), np.float32)
        at = 0
        for batch in ds.to_batches(columns=["x", "y"], batch_size=chunk):
            m = batch.num_rows
            x[at : at + m] = arrow_to_vectors(batch.column("x"))
            y[at : at + m] = arrow_to_vectors(batch.column("y"))
            at += m
        loaded = time.perf_counter() - t0
        result = train_adapters(x, y, adapter, FuseMixConfig(), train)
    else:
        loaded = 0.0
        result = train_adapters(
            None, None, adapter, FuseMixConfig(), train, chunks=lance_chunks(lake, table, chunk)
        )
    return {
        "mode": mode,
        "load_s": round(loaded, 1),
        "train_s": round(result.seconds, 1),
        "pairs_per_s": result.pairs_seen / result.seconds,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--dx", type=int, default=1280)
    parser.add_argument("--dy", type=int, default=384)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--chunk", type=int, default=16384, help="rows per streamed slice")
    parser.add_argument("--run", choices=("ram", "stream"), help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:  # one side, in a process of its own
        print(json.dumps(_train(args.run, args.root, "pairs", args.steps, args.chunk)))
        return

    from pipelines.lake import Lake
    from pipelines.stream import write_pairs

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        rows = write_pairs(Lake(tmp), "pairs", synthetic_chunks(args.pairs, args.dx, args.dy, args.chunk))
        gb = rows * (args.dx + args.dy) * 4 / 1e9
        print(
            f"{rows:,} pairs ({args.dx}-d x {args.dy}-d, {gb:.1f} GB as float32) written in {time.perf_counter() - t0:.0f} s"
        )
        out = {}
        for mode in ("ram", "stream"):
            cmd = [sys.executable, "-m", "benchmarks.bench_stream", "--run", mode, "--root", tmp]
            cmd += ["--steps", str(args.steps), "--chunk", str(args.chunk)]
            done = subprocess.run(
                cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1]
            )
            out[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    ram, stream = out["ram"], out["stream"]
    print(f"{'':<8} {'peak MB':>9} {'pairs/s':>9} {'load s':>7} {'train s':>8}")
    for r in (ram, stream):
        print(
            f"{r['mode']:<8} {r['peak_mb']:>9.0f} {r['pairs_per_s']:>9.0f} {r['load_s']:>7} {r['train_s']:>8}"
        )
    print(
        f"stream / ram: peak memory {stream['peak_mb'] / ram['peak_mb']:.2f}x, "
        f"pairs/s {stream['pairs_per_s'] / ram['pairs_per_s']:.2f}x"
    )


if __name__ == "__main__":
    main()
