"""Extraction through Ray against in-process, side by side: the engine's overhead on one machine.

One dataset of emoji-like images (PNG and SVG files with a manifest, half and half) is ingested into
fresh Lance lakes, then encoded with the same encoder (EfficientNet-Lite0 from the offline pack,
else a small random image model): by the in-process engine (pipelines.extract), and by
pipelines.ray_extract on a local Ray with 1 and with 2 workers. Ray is started once before the timed
runs (its start is printed apart); each run builds its encoder inside the timing (the in-process run
too), so the ratios compare whole extractions. Every run's latents are checked against the
in-process ones (cosine).

    python -m benchmarks.bench_ray [--n 192] [--encoder effnet-lite0]
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LANCE_LOG", "error")


def write_images(folder: Path, n: int, seed: int = 0) -> None:
    """n images (PNG and SVG, alternating) and a manifest.csv naming each with a caption."""
    from benchmarks.bench_extract import make_inputs

    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (_, payload) in enumerate(make_inputs("image", n, seed)):
        name = f"images/{i:05d}.{'svg' if i % 2 else 'png'}"
        (folder / name).write_bytes(payload)
        rows.append({"image": name, "caption": f"picture number {i}", "split": "train"})
    with open(folder / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption", "split"])
        writer.writeheader()
        writer.writerows(rows)


def vectors(lake, table: str) -> dict[str, np.ndarray]:
    rows = lake.read(table, ["media_id", "vector"])
    return {m: np.asarray(v, dtype=np.float32) for m, v in zip(*rows.to_pydict().values(), strict=True)}


def min_cosine(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert set(a) == set(b), "the runs encoded different items"
    return min(float(a[k] @ b[k] / (np.linalg.norm(a[k]) * np.linalg.norm(b[k]))) for k in a)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=192, help="images")
    parser.add_argument("--encoder", default="effnet-lite0", help="an image encoder of configs/encoders.yaml")
    args = parser.parse_args(argv)

    import ray

    from fusion.data.readers import read_dataset
    from fusion.encoders import build_encoder, encoder_status, load_registry
    from pipelines.extract import run_extraction
    from pipelines.ingest import write_dataset
    from pipelines.lake import Lake
    from pipelines.ray_extract import run_extraction_ray

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        spec = load_registry().get(args.encoder)
        if spec is None or not encoder_status(spec)[0]:
            from benchmarks.bench_extract import build_small_models

            spec = build_small_models(tmp / "models")["image"]
            print(f"{args.encoder} is not available here: a small random image model instead")
        data = tmp / "data"
        write_images(data, args.n)
        dataset = read_dataset("manifest", str(data), name="bench", modality="image", progress=False)
        table = f"latents__bench__{spec.name}"
        runs: dict[str, tuple[float, dict]] = {}

        def lake_for(label: str) -> Lake:
            lake = Lake(tmp / f"lake-{label}")
            write_dataset(lake, "bench", dataset)
            return lake

        lake = lake_for("in-process")
        t0 = time.perf_counter()
        run_extraction(lake, "bench", build_encoder(spec), roots=[data], progress=False)
        runs["in-process"] = (time.perf_counter() - t0, vectors(lake, table))

        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        started = time.perf_counter() - t0
        try:
            for workers in (1, 2):
                lake = lake_for(f"ray-{workers}")
                t0 = time.perf_counter()
                run_extraction_ray(lake, "bench", spec, roots=[data], workers=workers, shard_size=32)
                runs[f"ray, {workers} worker{'s' if workers > 1 else ''}"] = (
                    time.perf_counter() - t0,
                    vectors(lake, table),
                )
        finally:
            ray.shutdown()

    base_s, base_v = runs["in-process"]
    print(
        f"encoder {spec.name}, {args.n} images (PNG + SVG), {os.cpu_count()} cores; local Ray started in {started:.1f} s"
    )
    print(f"{'engine':<18} {'seconds':>8} {'images/s':>9} {'vs in-process':>14} {'min cosine':>11}")
    for label, (seconds, vecs) in runs.items():
        print(
            f"{label:<18} {seconds:>8.1f} {args.n / seconds:>9.1f} {base_s / seconds:>13.2f}x "
            f"{min_cosine(base_v, vecs):>11.4f}"
        )


if __name__ == "__main__":
    main()
