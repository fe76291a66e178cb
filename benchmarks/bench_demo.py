"""Benchmark: `fusemix demo` from an empty lake, before and after reduced precision and decoding threads.

Runs the demo twice, side by side in one run, each in a fresh home (lake, MLflow store, Dagster
instance) that shares one data and model cache (so neither pays downloads or weight conversion):

  before:  FUSEMIX_ENCODER_DTYPE=float32, FUSEMIX_DECODE_WORKERS=0 (float32 encoders, decoding in line)
  now:     the defaults (dtype auto: bf16 on CPUs with AMX or AVX-512 BF16; decoding threads)

and prints the wall time of each stage (from the demo's "-> job [partition] ... ok in Xs" lines),
the whole command's wall time and the ratio, then Recall@1 on the test split of every experiment:

  same adapters:  the adapters trained in `before` (on float32 latents), scored on the test latents of
                  both runs: the cost of the reduced-precision latents alone (to stay within 0.5);
  retrained:      each run's own adapters on its own latents: that plus training noise (the demo's
                  splits are small: one emoji query is 5 points), for information.

The shared cache is $FUSEMIX_HOME/cache (the lake `make demo` filled) when it holds the corpus, else a
temporary one that a first, untimed ingest fills.

With --before-ref REF (a git commit of this repository) the `before` demo runs that commit's code
(checked out in a temporary worktree) instead, so the comparison is against the project as it was.

Run: python -m benchmarks.bench_demo                 (two demos: ~10 minutes on 2 cores)
     python -m benchmarks.bench_demo --family demo --cache ~/lake/cache
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from fusion.hardware import cpu_bf16_units
from fusion.paths import PROJECT_ROOT, fusemix_home

CONFIGS = {
    "before": {"FUSEMIX_ENCODER_DTYPE": "float32", "FUSEMIX_DECODE_WORKERS": "0"},
    "now": {"FUSEMIX_ENCODER_DTYPE": "", "FUSEMIX_DECODE_WORKERS": ""},
}
_STEP = re.compile(r"^-> (\S+) \[(.*)\] \.\.\.$")
_DONE = re.compile(r"^\s+(\w+) in ([0-9.]+)s$")


_COMMITTED = re.compile(r"committed (\d+)/\d+ latents")


def step_times(output: str) -> dict[str, tuple[float, int]]:
    """ "job [partition]" -> (seconds, latents committed in it) for every step the demo printed."""
    out: dict[str, tuple[float, int]] = {}
    step, items = None, 0
    for line in output.splitlines():
        if m := _STEP.match(line):
            step, items = f"{m.group(1)} [{m.group(2)}]", 0
        elif (m := _COMMITTED.search(line)) and step is not None:
            items = max(items, int(m.group(1)))
        elif (m := _DONE.match(line)) and step is not None:
            seconds, n = out.get(step, (0.0, 0))
            out[step] = (seconds + float(m.group(2)), n + items)
            step = None
    return out


def stage_times(output: str) -> dict[str, float]:
    """Seconds per job (ingest_job, extract_job, experiment_job ...) summed over its partitions."""
    out: dict[str, float] = defaultdict(float)
    for step, (seconds, _) in step_times(output).items():
        out[step.split(" ", 1)[0]] += seconds
    return dict(out)


def recalls(home: Path) -> dict[tuple, float]:
    """(experiment, dataset, gallery, metric) -> value of the test split's Recall@1 rows (seed means
    where an experiment has several seeds)."""
    from pipelines.lake import Lake

    lake = Lake(home / "lance")
    if not lake.exists("metrics"):
        return {}
    rows = lake.read("metrics").to_pylist()
    multi = {r["experiment"] for r in rows if r.get("seed") is not None and (r.get("n_seeds") or 1) > 1}
    out = {}
    for r in rows:
        if r.get("split") != "test" or not str(r["metric"]).endswith("recall_at_1"):
            continue
        if (r["experiment"] in multi) != (r.get("seed") is None):
            continue  # one row per experiment: the mean where there are seeds, else the run's own
        out[(r["experiment"], r["dataset"], r.get("gallery") or "pooled", r["metric"])] = float(r["value"])
    return out


def same_adapters(before: Path, now: Path, family: str) -> dict[tuple, tuple[float, float]]:
    """(experiment, metric) -> (Recall@1 on before's test latents, on now's), both with the adapters
    (first seed) trained in `before`."""
    from fusion.adapters import EncoderRef
    from pipelines.curate import paired_split, split_rows
    from pipelines.evaluate import POOLED, load_trained, score
    from pipelines.lake import Lake
    from pipelines.registries import load_experiments
    from pipelines.schemas import table_name
    from pipelines.train import seed_dirs

    def fingerprint(lake: Lake, dataset: str, encoder: str) -> str:
        column = lake.read(table_name("latents", dataset, encoder), ["fingerprint"])["fingerprint"]
        fps = set(column.to_pylist())
        if len(fps) != 1:
            raise RuntimeError(f"latents of {dataset}/{encoder}: fingerprints {fps}, expected one")
        return fps.pop()

    out = {}
    for name, exp in load_experiments().items():
        if exp.family != family or exp.method != "adapters":
            continue
        splits, refs = [], []
        for home in (before, now):
            lake = Lake(home / "lance")
            fps = (
                fingerprint(lake, exp.dataset, exp.media_encoder),
                fingerprint(lake, exp.dataset, exp.text_encoder),
            )
            test = split_rows(lake.read(table_name("curated", exp.name)), "test")
            splits.append(paired_split(lake, exp, test, fingerprints=fps))
            refs.append(fps)
        media = EncoderRef(exp.media_encoder, refs[0][0], splits[0].items.shape[1])
        text = EncoderRef(exp.text_encoder, refs[0][1], splits[0].texts.shape[1])
        folder = next(iter(seed_dirs(before / "models", exp).values()))
        model, _ = load_trained(folder, media, text)
        scored = [score(model, split, None)[0][POOLED] for split in splits]
        for metric in ("t2i_recall_at_1", "i2t_recall_at_1"):
            out[(name, metric)] = (scored[0][metric], scored[1][metric])
    return out


def prepare_cache(cache: Path | None, tmp: Path) -> Path:
    """A cache holding the corpus: the given one, the current home's, or one filled by an untimed ingest."""
    for candidate in (cache, fusemix_home() / "cache"):
        if candidate is not None and (candidate / "data").is_dir() and any((candidate / "data").iterdir()):
            return candidate
    home = tmp / "fill"
    (home / "cache").mkdir(parents=True)
    print("filling a data cache (untimed ingest) ...", flush=True)
    subprocess.run(
        [sys.executable, "-m", "app.cli", "materialize", "ingest"],
        env=_env(home),
        cwd=PROJECT_ROOT,
        check=True,
    )
    return home / "cache"


def _env(home: Path, extra: dict[str, str] | None = None, root: Path = PROJECT_ROOT) -> dict[str, str]:
    env = {**os.environ, "FUSEMIX_HOME": str(home), "DAGSTER_HOME": str(home / "dagster")}
    env |= {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "LANCE_LOG": "error",
        "PYTHONPATH": str(root),
    }
    env.pop("FUSEMIX_CONFIGS", None)  # each tree reads its own configs
    for key, value in (extra or {}).items():
        if value:
            env[key] = value
        else:
            env.pop(key, None)
    return env


def worktree(ref: str, where: Path) -> Path:
    """A checkout of `ref` of this repository in `where` (a detached git worktree)."""
    cmd = ["git", "worktree", "add", "--detach", str(where), ref]
    subprocess.run(cmd, cwd=PROJECT_ROOT, check=True, capture_output=True)
    return where


def run_demo(name: str, home: Path, cache: Path, family: str, root: Path = PROJECT_ROOT) -> dict:
    home.mkdir(parents=True)
    (home / "cache").symlink_to(cache.resolve(), target_is_directory=True)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "demo", "--family", family],
        env=_env(home, CONFIGS[name], root),
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # one stream: the log lines (latents committed) inside their step
        text=True,
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"the {name} demo failed ({proc.returncode}):\n{proc.stdout[-6000:]}")
    return {
        "seconds": seconds,
        "stages": stage_times(proc.stdout),
        "steps": step_times(proc.stdout),
        "recall": recalls(home),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="demo", help="the experiment family the demo runs (default demo)")
    parser.add_argument("--cache", type=Path, default=None, help="a cache folder holding the corpus")
    parser.add_argument("--before-ref", default=None, help="run `before` on this git commit's code")
    args = parser.parse_args(argv)
    print(f"CPU bf16 units: {cpu_bf16_units() or 'none'}; cores: {len(os.sched_getaffinity(0))}")
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp_name:
        tmp = Path(tmp_name)
        cache = prepare_cache(args.cache, tmp)
        roots = {name: PROJECT_ROOT for name in CONFIGS}
        if args.before_ref:
            roots["before"] = worktree(args.before_ref, tmp / "before-tree")
        try:
            runs = {name: run_demo(name, tmp / name, cache, args.family, roots[name]) for name in CONFIGS}
        finally:
            if args.before_ref:
                subprocess.run(
                    ["git", "worktree", "remove", "--force", str(roots["before"])], cwd=PROJECT_ROOT
                )
        same = same_adapters(tmp / "before", tmp / "now", args.family)

    before, now = runs["before"], runs["now"]
    print()
    print(f"{'stage':<24}{'before s':>10}{'now s':>10}{'before/now':>12}")
    for stage in sorted(set(before["stages"]) | set(now["stages"])):
        b, n = before["stages"].get(stage, 0.0), now["stages"].get(stage, 0.0)
        print(f"{stage:<24}{b:>10.1f}{n:>10.1f}{(b / n if n else float('nan')):>12.2f}")
    print(
        f"{'whole demo (wall)':<24}{before['seconds']:>10.1f}{now['seconds']:>10.1f}{before['seconds'] / now['seconds']:>12.2f}"
    )
    print()
    print(f"{'step':<44}{'before s':>10}{'now s':>10}{'before/now':>12}{'items':>7}{'now items/s':>13}")
    for step in sorted(set(before["steps"]) | set(now["steps"])):
        (b, _), (n, items) = before["steps"].get(step, (0.0, 0)), now["steps"].get(step, (0.0, 0))
        rate = f"{items / n:>13.1f}" if items and n else f"{'':>13}"
        print(f"{step:<44}{b:>10.1f}{n:>10.1f}{(b / n if n else float('nan')):>12.2f}{items or '':>7}{rate}")
    print()
    print("Recall@1, test split: the same adapters (trained in `before`) on before's and now's latents")
    print(f"{'experiment':<18}{'metric':<18}{'before':>8}{'now':>8}{'now-before':>12}")
    worst = 0.0
    for (name, metric), (b, n) in sorted(same.items()):
        worst = max(worst, abs(n - b))
        print(f"{name:<18}{metric:<18}{100 * b:>8.1f}{100 * n:>8.1f}{100 * (n - b):>+12.1f}")
    print(f"largest difference from the latents' precision alone: {100 * worst:.1f} points")
    print()
    print("Recall@1, test split: each run's own adapters (training noise included)")
    print(f"{'experiment':<18}{'dataset':<12}{'metric':<18}{'before':>8}{'now':>8}{'now-before':>12}")
    for key in sorted(set(before["recall"]) | set(now["recall"])):
        b, n = before["recall"].get(key), now["recall"].get(key)
        if b is None or n is None or key[2] != "pooled" or key[3].startswith("chance"):
            continue
        print(f"{key[0]:<18}{key[1]:<12}{key[3]:<18}{100 * b:>8.1f}{100 * n:>8.1f}{100 * (n - b):>+12.1f}")
    return {"before_s": before["seconds"], "now_s": now["seconds"], "worst_recall_delta": worst}


if __name__ == "__main__":
    main()
