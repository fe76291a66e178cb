"""Benchmark: what reduced-precision latents cost in retrieval, on an experiment trained in the lake.

Re-encodes the test split of an experiment (its items and captions, read from the lake's media
table) with the experiment's two encoders twice, side by side: in float32 and in the precision that
dtype auto picks on this machine (bf16 with AMX or AVX-512 BF16; or --dtype). Every seed's trained
adapters (trained on the lake's float32 latents) then score both, and it prints Recall@1 per seed
and as mean, the difference, the cosines between the two latents, and items/s of both encodings.

The demo's own test split is too small for this (one emoji query is 1.7-5 points); the default is
the baselines family's FuseMix experiment on the full emoji set (1,096 test images, 382 captions),
so run `fusemix demo --family baselines` first (an hour on 2 cores), or name another experiment.
Without such a lake it says so and exits.

Run: python -m benchmarks.bench_precision [--experiment base-fusemix] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from benchmarks.bench_extract import engine_vectors
from fusion.adapters import EncoderRef
from fusion.encoders import build_encoder, load_registry
from fusion.paths import fusemix_home


def encode(enc, payloads: list[tuple[str, object]]) -> tuple[np.ndarray, float]:
    """Latents in the order of `payloads` and the items/s of the encoding."""
    start = time.perf_counter()
    vectors = engine_vectors(enc, payloads)
    return vectors, len(payloads) / (time.perf_counter() - start)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="base-fusemix")
    parser.add_argument("--dtype", default="auto", help="the reduced precision to compare (default auto)")
    args = parser.parse_args(argv)

    from evaluation.retrieval import PairedSplit, paired_ids
    from pipelines.curate import split_rows
    from pipelines.evaluate import POOLED, load_trained, score
    from pipelines.extract import media_payloads
    from pipelines.lake import Lake
    from pipelines.registries import load_experiments
    from pipelines.schemas import table_name
    from pipelines.train import seed_dirs

    home = fusemix_home()
    lake = Lake(home / "lance")
    exp = load_experiments().get(args.experiment)
    curated = table_name("curated", args.experiment)
    dirs = seed_dirs(home / "models", exp) if exp else {}
    if (
        exp is None
        or not lake.exists(curated)
        or not all((d / "config.json").exists() for d in dirs.values())
    ):
        print(
            f"no trained experiment {args.experiment!r} in {home}: run `fusemix demo --family baselines` first"
        )
        return None
    test = split_rows(lake.read(curated), "test")
    item_ids, text_ids, pi, pt = paired_ids(test["media_id"].to_pylist(), test["caption_id"].to_pylist())
    media_t = table_name("media", exp.dataset)
    items, texts = (
        list(media_payloads(lake, media_t, item_ids)),
        list(media_payloads(lake, media_t, text_ids)),
    )

    registry = load_registry()
    latents, rates, refs, precision = {}, {}, {}, {}
    for label, dtype in (("float32", "float32"), ("reduced", args.dtype)):
        for side, name, payloads in (("items", exp.media_encoder, items), ("texts", exp.text_encoder, texts)):
            enc = build_encoder(dataclasses.replace(registry[name], dtype=dtype))
            latents[label, side], rates[label, side] = encode(enc, payloads)
            precision[label, side] = enc.precision
            if label == "float32":
                refs[side] = EncoderRef(name, enc.fingerprint, enc.dim)

    print(f"experiment {exp.name}: {exp.media_encoder} x {exp.text_encoder} on {exp.dataset}, test split "
          f"{len(item_ids)} items, {len(text_ids)} captions; seeds {sorted(dirs)}")  # fmt: skip
    print(f"{'side':<7}{'encoder':<14}{'reduced is':>11}{'fp32 it/s':>11}{'reduced it/s':>14}{'ratio':>7}"
          f"{'cos min':>9}{'cos mean':>10}")  # fmt: skip
    for side, name in (("items", exp.media_encoder), ("texts", exp.text_encoder)):
        c = cosines(latents["reduced", side], latents["float32", side])
        f, r = rates["float32", side], rates["reduced", side]
        print(f"{side:<7}{name:<14}{precision['reduced', side]:>11}{f:>11.1f}{r:>14.1f}{r / f:>7.2f}"
              f"{c.min():>9.4f}{c.mean():>10.5f}")  # fmt: skip

    print()
    print(f"{'seed':<6}{'metric':<18}{'fp32 latents':>14}{'reduced':>10}{'difference':>12}")
    deltas: dict[str, list[float]] = {"t2i_recall_at_1": [], "i2t_recall_at_1": []}
    for seed, folder in sorted(dirs.items()):
        model, _ = load_trained(folder, refs["items"], refs["texts"])
        scored = {}
        for label in ("float32", "reduced"):
            split = PairedSplit(item_ids, text_ids, latents[label, "items"], latents[label, "texts"], pi, pt)
            scored[label] = score(model, split, None)[0][POOLED]
        for metric, values in deltas.items():
            a, b = 100 * scored["float32"][metric], 100 * scored["reduced"][metric]
            values.append(b - a)
            print(f"{seed:<6}{metric:<18}{a:>14.2f}{b:>10.2f}{b - a:>+12.2f}")
    for metric, values in deltas.items():
        print(
            f"{'mean':<6}{metric:<18}{'':>14}{'':>10}{np.mean(values):>+12.2f}  (max |diff| {np.abs(values).max():.2f})"
        )
    return {metric: float(np.mean(values)) for metric, values in deltas.items()}


if __name__ == "__main__":
    main()
