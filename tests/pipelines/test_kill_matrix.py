"""The kill matrix (issue 12): 20 seeded SIGKILLs at random points of real `fusemix materialize` runs of
the tiny project (tests.pipeline_fixture), spread over the five stages (ingest, extract, curate, train,
evaluate); after each, `fusemix materialize all` runs to completion and must leave exactly the tables an
uninterrupted run leaves, with no MLflow run left RUNNING.

How a kill is placed. A reference run goes stage by stage (materialize ingest, extract, the other
experiment, then the killed one's) and keeps a copy of the home folder (lake, MLflow store, models,
Dagster instance) before each command a kill runs, so a kill run starts from the state its stage
starts from instead of redoing the stages before it. Each glue function a stage's asset starts with prints a marker (`STAGE ingest`, `STAGE
train` ...) as it is entered; a kill aimed at a stage waits for its marker, then sleeps a seeded random
part of the time that stage took in the reference run, then SIGKILLs the process. The stage a kill
landed in is the last marker the process printed before it died (all its output up to the kill is in
its log), so the record is exact even when a delay ran past the stage's end.

How runs start. Every run is `app.cli.main(["materialize", ...])` in a process forked from one helper
process that imported the project once (Dagster, torch, Lance, MLflow, transformers' model code, by
building the encoders once and dropping them) and runs nothing itself: each run is a fresh process
with its own pid, environment, output, encoders and Dagster/MLflow state, killed for real, without
paying the several seconds of imports forty times. Runs go one at a time, with one torch thread each
(the results must match the reference's to the bit).

Compared after each rerun, as content (not Lance versions or times): media, pairs and quarantine rows;
latents ids and fingerprints; curated rows; metrics values per experiment, dataset, gallery, metric and
seed. And every MLflow run of the store has ended (none RUNNING).

    .venv/bin/pytest -q -m slow tests/pipelines/test_kill_matrix.py
"""

from __future__ import annotations

import json
import math
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipelines.lake import Lake
from tests.pipeline_fixture import Project, make_project

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STAGES = ("ingest", "extract", "curate", "train", "evaluate")
KILLS = 20
SEED = 12
EXPERIMENT = "shapes-fusemix"  # the experiment whose curate/train/evaluate are killed
OTHER = "shapes-n12"  # the tiny project's other experiment
# The command each stage's kill runs, and the snapshot (state before that command) it starts from.
COMMANDS = {
    "ingest": ("before-ingest", ["materialize", "ingest"]),
    "extract": ("before-extract", ["materialize", "extract"]),
    "curate": ("before-experiment", ["materialize", "experiment", "--partition", EXPERIMENT]),
    "train": ("before-experiment", ["materialize", "experiment", "--partition", EXPERIMENT]),
    "evaluate": ("before-experiment", ["materialize", "experiment", "--partition", EXPERIMENT]),
}

# The helper process: marks where each stage's work starts, imports everything, then forks one
# `fusemix materialize` per request (a JSON line on stdin) and reports its pid and exit status.
ZYGOTE = textwrap.dedent(
    """
    import json, os, sys, time, traceback, warnings
    warnings.simplefilter("ignore")
    import pipelines.curate, pipelines.evaluate, pipelines.extract, pipelines.ingest, pipelines.train

    def marked(module, name, stage):
        real = getattr(module, name)

        def enter(*args, **kwargs):
            print(f"STAGE {stage} {time.monotonic():.4f}", flush=True)
            return real(*args, **kwargs)

        setattr(module, name, enter)

    # Before the assets import them by name: the first glue call of each stage's asset.
    marked(pipelines.ingest, "load_dataset", "ingest")
    marked(pipelines.extract, "run_extraction", "extract")
    marked(pipelines.curate, "curate", "curate")
    marked(pipelines.train, "train_and_save", "train")
    marked(pipelines.evaluate, "load_seeds", "evaluate")

    import dagster, duckdb, lance, mlflow, torch
    import app.cli, app.definitions, app.demo, pipelines.catalog, pipelines.resources

    # Warm up what every run would import first (transformers' model code, Dagster's and MLflow's
    # SQLite stores), on one torch thread so that no OpenMP pool exists when the runs are forked.
    torch.set_num_threads(1)
    registry, scratch = sys.argv[1:3]
    bank = pipelines.resources.EncoderBank(registry_path=registry)
    for name in bank.specs():
        bank.get(name)
    pipelines.resources._ENCODERS.clear()  # each run builds its own encoders
    os.makedirs(os.path.join(scratch, "dagster"))
    with dagster.DagsterInstance.from_config(os.path.join(scratch, "dagster")):
        pass
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{scratch}/mlflow.db").search_experiments()

    print("READY", flush=True)
    for request in sys.stdin:
        job = json.loads(request)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                os.setsid()
                os.environ.update(job["env"])
                log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(log, 1)
                os.dup2(log, 2)
                torch.set_num_threads(1)
                code = app.cli.main(job["argv"])
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(f"PID {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"EXIT {pid} {os.waitstatus_to_exitcode(status)} {time.monotonic():.4f}", flush=True)
    """
)


class Zygote:
    """The helper process; `run` forks one `fusemix` command from it and can SIGKILL it mid-way."""

    def __init__(self, log_dir: Path, registry: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env |= {"LANCE_LOG": "error", "FUSEMIX_TORCH_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.log_dir = log_dir
        scratch = log_dir / "warm-up"
        scratch.mkdir()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE, str(registry), str(scratch)],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(log_dir / "zygote.err", "w"),  # noqa: SIM115 (closed with the process)
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self._expect("READY", 120)
        self.count = 0

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _expect(self, prefix: str, limit_s: float) -> list[str]:
        try:
            line = self.lines.get(timeout=limit_s)
        except queue.Empty:
            pytest.fail(f"the helper process said no {prefix!r} within {limit_s}s")
        if line is None or not line.startswith(prefix):
            err = (self.log_dir / "zygote.err").read_text()[-3000:]
            pytest.fail(f"the helper process said {line!r}, not {prefix!r}; its errors: {err}")
        return line.split()

    def run(self, argv: list[str], env: dict[str, str], kill: tuple[str, float] | None = None) -> Run:
        """Runs `fusemix ARGV`; with kill=(stage, delay_s), SIGKILLs it `delay_s` after it entered
        `stage` (if it gets there)."""
        self.count += 1
        log = self.log_dir / f"run-{self.count:02d}.log"
        self.proc.stdin.write(json.dumps({"argv": argv, "env": env, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        pid = int(self._expect("PID", 30)[1])
        started = time.monotonic()
        killed_at = None
        if kill is not None:
            stage, delay = kill
            seen = 0
            while killed_at is None and self.lines.empty():  # EXIT not yet reported: still running
                text = log.read_text(errors="replace") if log.exists() else ""
                marker = text.find(f"STAGE {stage} ", seen)
                if marker >= 0:
                    time.sleep(delay)
                    if self.lines.empty():  # not reaped yet: the pid is still the run's
                        try:
                            os.kill(pid, signal.SIGKILL)
                            killed_at = time.monotonic()
                        except ProcessLookupError:
                            pass  # it ended just now, before the delay did
                    break
                seen = max(0, len(text) - 64)
                time.sleep(0.005)
        _, _, code, ended = self._expect("EXIT", 600)
        text = log.read_text(errors="replace")
        # Killed is what the exit status says: a run that ended just before the signal was not.
        return Run(argv, int(code), float(ended) - started, float(ended), text, int(code) == -signal.SIGKILL)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


@dataclass
class Run:
    argv: list[str]
    code: int
    seconds: float
    exit_at: float  # monotonic, the clock of the stage markers
    log: str
    killed: bool

    def markers(self) -> list[tuple[str, float]]:
        """(stage, monotonic time) of every stage marker the run printed, in order."""
        out = []
        for line in self.log.splitlines():
            at = line.find("STAGE ")
            if at >= 0:
                parts = line[at:].split()
                if len(parts) >= 3:
                    out.append((parts[1], float(parts[2])))
        return out

    def landed(self) -> str | None:
        """The stage the process was in when it died: the last one it entered."""
        marks = self.markers()
        return marks[-1][0] if marks else None


@dataclass
class Kill:
    number: int
    aimed: str
    delay_s: float
    landed: str | None
    seconds: float = 0.0
    checks: list[str] = field(default_factory=list)
    mlflow_without_recall: list[str] = field(default_factory=list)


# --- the tables compared -----------------------------------------------------------------------------


def _sorted(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True, default=str))


def lake_content(home: Path) -> dict[str, object]:
    """What the pipeline wrote, as comparable content."""
    lake = Lake(home / "lance")
    out: dict[str, object] = {"tables": sorted(lake.tables())}
    for table in lake.tables():
        kind = table.split("__")[0]
        if kind in ("media", "pairs", "quarantine", "curated"):
            rows = [{k: v for k, v in r.items() if k != "ingested_at"} for r in lake.read(table).to_pylist()]
            out[table] = _sorted(rows)
        elif kind == "latents":
            out[table] = sorted(map(tuple, lake.read(table, ["media_id", "fingerprint"]).to_pylist()))
        elif kind == "metrics":
            keep = ("experiment", "dataset", "split", "gallery", "seed", "metric", "value", "std", "n_seeds")
            out[table] = _sorted([{k: r[k] for k in keep} for r in lake.read(table).to_pylist()])
    return out


def differences(got: dict, want: dict) -> list[str]:
    """Tables whose content differs (floats compared to 1e-9)."""

    def same(a, b) -> bool:
        if isinstance(a, float) and isinstance(b, float):
            return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b))
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, list | tuple) and isinstance(b, list | tuple):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
        return a == b

    return [k for k in sorted(set(got) | set(want)) if not same(got.get(k), want.get(k))]


def running_mlflow_runs(home: Path) -> list[str]:
    import mlflow

    db = home / "mlflow" / "mlflow.db"
    if not db.exists():
        return []
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, filter_string="attributes.status = 'RUNNING'") if ids else []
    return [r.info.run_id for r in runs]


def runs_without_recall(home: Path) -> list[str]:
    """Experiments whose training run (named in the metrics table) has no Recall@1 in MLflow."""
    import mlflow

    lake = Lake(home / "lance")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")
    runs = {
        (r["experiment"], r["mlflow_run_id"])
        for r in lake.read("metrics").to_pylist()
        if r["seed"] is not None
    }
    return sorted(e for e, run in runs if "t2i_recall_at_1" not in client.get_run(run).data.metrics)


# --- the matrix --------------------------------------------------------------------------------------


def _env(project: Project, home: Path) -> dict[str, str]:
    return {
        "FUSEMIX_HOME": str(home),
        "FUSEMIX_CONFIGS": str(project.configs),
        "DAGSTER_HOME": str(home / "dagster"),
    }


def test_twenty_kills_across_the_five_stages_each_heal_to_the_uninterrupted_tables(tmp_path):
    t0 = time.monotonic()
    project = make_project(tmp_path / "project", epochs=2)
    logs = tmp_path / "logs"
    logs.mkdir()
    snapshots = tmp_path / "snapshots"
    zygote = Zygote(logs, project.configs / "encoders.yaml")
    try:
        # The reference: stage by stage, a snapshot of the home before each kill run's command. The
        # other experiment runs before the killed one's snapshot, so that reruns after a kill in
        # curate, train or evaluate find it done (and the shared metrics table holds its rows).
        home = tmp_path / "reference"
        home.mkdir()
        env = _env(project, home)
        shutil.copytree(home, snapshots / "before-ingest")
        ingest = zygote.run(["materialize", "ingest"], env)
        shutil.copytree(home, snapshots / "before-extract")
        extract = zygote.run(["materialize", "extract"], env)
        other = zygote.run(["materialize", "experiment", "--partition", OTHER], env)
        shutil.copytree(home, snapshots / "before-experiment")
        experiment = zygote.run(["materialize", "experiment", "--partition", EXPERIMENT], env)
        rest = zygote.run(["materialize", "all"], env)
        for run in (ingest, extract, other, experiment, rest):
            assert run.code == 0, run.log[-4000:]
        want = lake_content(home)
        assert {t.split("__")[0] for t in want["tables"]} >= {"media", "pairs", "quarantine", "latents"}
        assert {"curated__shapes-fusemix", "curated__shapes-n12", "metrics"} <= set(want["tables"])
        assert running_mlflow_runs(home) == []
        assert runs_without_recall(home) == []

        # How long each stage's part of its command took, from its marker to the next (or the end).
        spans: dict[str, float] = {}
        for run in (ingest, extract, experiment):
            marks = run.markers()
            for i, (stage, at) in enumerate(marks):
                nxt = next((t for s, t in marks[i + 1 :] if s != stage), None)
                spans.setdefault(stage, (nxt if nxt is not None else run.exit_at) - at)
        assert set(spans) == set(STAGES), spans
        reference_s = time.monotonic() - t0

        rng = random.Random(SEED)
        kills: list[Kill] = []
        for number in range(KILLS):
            aimed = STAGES[number % len(STAGES)]
            fraction = rng.uniform(0.0, 0.95)
            delay = fraction * spans[aimed]
            snapshot, argv = COMMANDS[aimed]
            # A folder of its own per kill: MLflow keeps one store per tracking URI in this process.
            home = tmp_path / f"killed-{number:02d}"
            env = _env(project, home)
            started = time.monotonic()
            # A stage's span in the reference can hold a first run's warm-up (the reference ingest
            # took 10 s where a warm one takes 0.5 s), so a command can end before a late delay does:
            # that attempt ran uninterrupted (it must have succeeded), and the kill is tried again from
            # the snapshot at the same fraction of the span this attempt measured, halved each time.
            for _attempt in range(5):
                if home.exists():
                    shutil.rmtree(home)
                shutil.copytree(snapshots / snapshot, home, symlinks=True)
                run = zygote.run(argv, env, kill=(aimed, delay))
                if run.killed:
                    break
                assert run.code == 0, run.log[-3000:]  # the command ended before the delay did
                entered = next((t for s, t in run.markers() if s == aimed), None)
                measured = run.exit_at - entered if entered is not None else spans[aimed]
                delay = min(delay, fraction * measured) / 2
            kill = Kill(number, aimed, round(delay, 3), run.landed() if run.killed else None)
            healed = zygote.run(["materialize", "all"], env)
            assert healed.code == 0, f"kill {number} ({kill}): the rerun failed\n{healed.log[-4000:]}"
            kill.checks = differences(lake_content(home), want)
            assert kill.checks == [], f"kill {number} ({kill}) left other tables: {kill.checks}"
            assert running_mlflow_runs(home) == [], f"kill {number} ({kill}) left a RUNNING MLflow run"
            # A kill after evaluation committed its metrics rows and before it logged them to MLflow:
            # the rerun must log them (pipelines.evaluate.evaluation_logged), not skip.
            kill.mlflow_without_recall = runs_without_recall(home)
            assert kill.mlflow_without_recall == [], f"kill {number} ({kill}): runs without Recall@1"
            kill.seconds = round(time.monotonic() - started, 1)
            kills.append(kill)
            if number < KILLS - 1:
                shutil.rmtree(home)  # the last one stays for a look
    finally:
        zygote.close()

    landed = Counter(k.landed for k in kills)
    summary = {
        "reference_s": round(reference_s, 1),
        "total_s": round(time.monotonic() - t0, 1),
        "spans_s": {s: round(v, 2) for s, v in spans.items()},
        "landed": dict(landed),
        "mlflow_without_recall": sum(bool(k.mlflow_without_recall) for k in kills),
        "kills": [vars(k) for k in kills],
    }
    (logs / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "kills"}))
    assert all(landed[s] >= 1 for s in STAGES), f"stages without a kill: {summary}"
    assert sum(landed[s] for s in STAGES) == KILLS, f"kills that landed in no stage: {summary}"
