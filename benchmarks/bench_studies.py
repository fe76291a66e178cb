"""Benchmark: how long each study family takes on this machine, predicted from timed training and
baseline fits, beside what the lake's MLflow runs recorded.

For every experiment of a family (configs/experiments.yaml) the training steps are derived as the
trainer derives them (the training pairs counted in the lake, twice as many raw pairs per step for the
FuseMix halves, epochs, seeds). One step of each distinct shape (encoder dimensions, adapter, batch,
mixing, loss) is timed on random latents of the encoders' dimensions, and each baseline is fitted
once on random latents of the real size, its hyperparameter grid included; the sums are the
predicted minutes of training. The measured minutes are the durations of the family's MLflow runs
(training and evaluation, one run per seed), when the lake has them.

Run: python -m benchmarks.bench_studies       the study families (FAMILIES below)
     python -m benchmarks.bench_studies --families quantity     (FUSEMIX_HOME selects the lake)
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace

import numpy as np
import torch

from evaluation.baselines import fit_baseline
from evaluation.retrieval import PairedSplit, paired_ids
from fusion.adapters import EncoderRef
from fusion.trainer import train_adapters
from pipelines.lake import Lake, default_lake_root
from pipelines.registries import ExperimentSpec, load_experiments
from pipelines.resources import EncoderBank
from pipelines.schemas import table_name

# The paper's studies and the baselines, each one command (`fusemix demo --family NAME`).
FAMILIES = [
    "baselines", "quantity", "quality", "diversity", "batch", "batch-2k", "depth", "alpha", "audio",
    "sweep", "recipe",
]  # fmt: skip


def train_pairs(lake: Lake, exp: ExperimentSpec) -> int | None:
    """The experiment's training pairs: its curated table, else the dataset's train split capped by a
    quantity selection; None when the lake has neither."""
    curated = table_name("curated", exp.name)
    if lake.exists(curated):
        return lake.open(curated).count_rows(filter="split = 'train'")
    pairs = table_name("pairs", exp.dataset)
    if not lake.exists(pairs):
        return None
    n = lake.open(pairs).count_rows(filter="split = 'train'")
    return min(n, int(exp.select["n"])) if exp.select.get("strategy") == "quantity" else n


def steps_of(exp: ExperimentSpec, n: int) -> int:
    halves = exp.fusemix.mode in ("fusemix", "independent")
    batch = min(exp.train.batch_for(n) * (2 if halves else 1), n)
    return exp.train.steps or math.ceil(n / batch) * (exp.train.epochs or 1)


def shape_key(exp: ExperimentSpec, dims: tuple[int, int], batch: int) -> tuple:
    return (dims, exp.adapter, exp.fusemix.mode, batch, exp.train.loss, exp.train.precision)


def time_step(exp: ExperimentSpec, dims: tuple[int, int], batch: int, steps: int = 20) -> float:
    """Seconds per training step of this shape at this contrastive batch: the median gap between
    steps after 3 warm-up ones."""
    rng = np.random.default_rng(0)
    n = batch * 2 * (steps + 3)
    x = rng.standard_normal((n, dims[0]), dtype=np.float32)
    y = rng.standard_normal((n, dims[1]), dtype=np.float32)
    groups = np.stack([np.arange(n), np.arange(n) // 2, np.arange(n) // 12], 1)
    stamps: list[float] = []
    cfg = replace(exp.train, batch_size=batch, steps=steps + 3, epochs=None, warmup_steps=0)
    train_adapters(
        x, y, exp.adapter, exp.fusemix, cfg,
        groups=groups if cfg.loss != "infonce" else None,
        on_step=lambda _: stamps.append(time.perf_counter()),
    )  # fmt: skip
    return float(np.median(np.diff(stamps[2:])))


def time_fit(exp: ExperimentSpec, dims: tuple[int, int], n: int) -> float:
    """Seconds to fit the experiment's baseline on n random pairs, val-chosen hyperparameters included."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dims[0]), dtype=np.float32)
    y = rng.standard_normal((n, dims[1]), dtype=np.float32)
    n_val = max(2, n // 8)
    items, texts, pi, pt = paired_ids([f"m{i // 2}" for i in range(n_val)], [f"t{i}" for i in range(n_val)])
    val = PairedSplit(
        items, texts, rng.standard_normal((len(items), dims[0]), dtype=np.float32),
        rng.standard_normal((len(texts), dims[1]), dtype=np.float32), pi, pt,
    )  # fmt: skip
    t0 = time.perf_counter()
    refs = {"image": EncoderRef("image", "", dims[0]), "text": EncoderRef("text", "", dims[1])}
    fit_baseline(exp.method, x, y, val=val, sides=("image", "text"), encoders=refs, adapter_cfg=exp.adapter)
    return time.perf_counter() - t0


def measured_minutes(family: str) -> tuple[float, int] | None:
    """(minutes, runs) of the family's finished MLflow runs in the lake's tracking store."""
    import mlflow

    from pipelines.tracking import default_tracking_uri

    client = mlflow.MlflowClient(default_tracking_uri())
    exp = client.get_experiment_by_name(f"fusemix/{family}")
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=5000)
    runs = [r for r in runs if r.info.end_time and r.data.params.get("family") == family]
    if not runs:
        return None
    return sum(r.info.end_time - r.info.start_time for r in runs) / 60000, len(runs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=FAMILIES)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per shape")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    lake, bank = Lake(default_lake_root()), EncoderBank()
    specs = load_experiments()
    step_s: dict[tuple, float] = {}
    fit_s: dict[tuple, float] = {}
    print(f"torch threads {torch.get_num_threads()}; lake {lake.root}")
    print(
        f"{'family':<16}{'experiments':>12}{'runs':>6}{'steps':>9}{'predicted min':>15}{'measured min':>14}{'ratio':>7}"
    )
    for family in args.families:
        exps = [e for e in specs.values() if e.family == family]
        steps_total, seconds, runs, missing = 0, 0.0, 0, []
        for exp in exps:
            n = train_pairs(lake, exp)
            if n is None:
                missing.append(exp.name)
                continue
            dims = (bank.ref(exp.media_encoder).dim, bank.ref(exp.text_encoder).dim)
            runs += exp.seeds
            if exp.method == "adapters":
                steps = steps_of(exp, n)
                batch = exp.train.batch_for(n)
                key = shape_key(exp, dims, batch)
                if key not in step_s:
                    step_s[key] = time_step(exp, dims, batch, args.steps)
                steps_total += steps * exp.seeds
                seconds += step_s[key] * steps * exp.seeds
            elif exp.method != "random":
                key = (exp.method, dims, n)
                if key not in fit_s:
                    fit_s[key] = time_fit(exp, dims, n)
                seconds += fit_s[key] * exp.seeds
        measured = measured_minutes(family)
        pred = seconds / 60
        meas = f"{measured[0]:.1f}" if measured else "-"
        ratio = f"{measured[0] / pred:.2f}" if measured and pred > 0 else "-"
        print(f"{family:<16}{len(exps):>12}{runs:>6}{steps_total:>9}{pred:>15.1f}{meas:>14}{ratio:>7}")
        if missing:
            print(
                f"  (not in the lake yet, so not counted: {', '.join(missing)}; ingest their datasets first)"
            )
    print("predicted: training steps and baseline fits only; measured: MLflow run durations (training and")
    print("evaluation of every seed); ratio = measured / predicted.")


if __name__ == "__main__":
    main()
