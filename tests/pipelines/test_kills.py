"""Runs that clean up after any kill (issue 12), on real stores in a temporary folder.

MLflow: a run whose process was SIGKILLed stays RUNNING until the next run start on this host marks
it KILLED; SIGTERM closes it as KILLED on the spot; runs of live processes and of other hosts are left
alone. Checkpoints: one counts only with a FINISHED run, evaluation never logs into another, and a
kill while files are written leaves the old ones. Ingest: a kill between any two Lance commits leaves
no pair naming a missing media row, and a rerun writes the tables an uninterrupted run writes.
The last two SIGKILL `fusemix materialize` (mid-ingest; mid-training, marked slow) and run it again:
the Dagster run the killed process left STARTED is marked failed, and the lake and MLflow heal.

    .venv/bin/pytest -q tests/pipelines/test_kills.py
    .venv/bin/pytest -q -m slow tests/pipelines/test_kills.py
"""

from __future__ import annotations

import csv
import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import dagster as dg
import pytest
import torch
import yaml

from fusion.adapters import Adapter, EncoderRef, FusedModel
from fusion.checkpoint import CONFIG, atomic_write, atomic_write_text, save_checkpoint
from fusion.config import AdapterConfig
from pipelines.evaluate import POOLED, check_trained, evaluation_logged, log_evaluation
from pipelines.ingest import load_dataset, write_dataset
from pipelines.lake import Lake
from pipelines.registries import ExperimentSpec, load_datasets
from pipelines.resources import MlflowTracking
from pipelines.tracking import (
    END_REASON,
    OWNER_HOST,
    OWNER_PID,
    OWNER_STARTED,
    RunNotFinished,
    Terminated,
    close_orphaned_runs,
    mlflow_run,
    process_owner,
    this_host,
)
from pipelines.train import HISTORY, all_up_to_date, read_history, up_to_date
from tests.pipeline_fixture import Project, make_project

REPO = Path(__file__).resolve().parents[2]
DATASET = "shapes"
EXPERIMENT = "shapes-fusemix"
MEDIA, PAIRS, QUARANTINE = (f"{k}__{DATASET}" for k in ("media", "pairs", "quarantine"))

# Opens a run through mlflow_run, says so, and waits to be killed.
OPEN_RUN = textwrap.dedent(
    """
    import sys, time
    import mlflow
    from pipelines.tracking import mlflow_run

    client = mlflow.MlflowClient(tracking_uri=sys.argv[1])
    with mlflow_run(client, sys.argv[2], "child", {"who": "child"}) as log:
        log.metrics({"loss": 1.0})
        log.flush()
        print("OPEN", log.run_id, flush=True)
        time.sleep(300)
    """
)


def _default_signals() -> None:
    """In the child before exec: SIGTERM and SIGINT at their default action and not blocked, whatever
    the test process inherited or was left with."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM, signal.SIGINT])


class Child:
    """A Python subprocess of the repository whose output lines are read as they come."""

    def __init__(self, script: str, *args: str, env: dict[str, str] | None = None) -> None:
        full = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        full |= {"FUSEMIX_TORCH_THREADS": "1", "LANCE_LOG": "error", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            cwd=REPO,
            env=full,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            preexec_fn=_default_signals,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, prefix: str, limit_s: float = 180) -> str:
        """The first output line starting with `prefix`; fails if the child ends or is silent."""
        deadline = time.monotonic() + limit_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"child printed no {prefix!r} within {limit_s}s; last lines: {self.seen[-20:]}")
            if line is None:
                pytest.fail(f"child ended before printing {prefix!r}; last lines: {self.seen[-30:]}")
            self.seen.append(line)
            if line.startswith(prefix):
                return line

    def wait(self, limit_s: float = 300) -> int:
        return self.proc.wait(timeout=limit_s)

    def output(self) -> list[str]:
        """Every line printed (call after the child ended)."""
        while (line := self.lines.get(timeout=10)) is not None:
            self.seen.append(line)
        self.lines.put(None)
        return self.seen

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


# --- MLflow runs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real MLflow SQLite store: (tracking resource, client, an experiment id)."""
    tmp = tmp_path_factory.mktemp("mlflow")
    tracking = MlflowTracking(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}", artifact_root=str(tmp / "art"))
    client = tracking.client()
    return tracking, client, tracking.experiment_id("kills")


def test_a_sigkilled_run_stays_running_until_the_next_run_start_marks_it_killed(store):
    tracking, client, exp_id = store
    with Child(OPEN_RUN, tracking.tracking_uri, exp_id) as child:
        run_id = child.wait_for("OPEN").split()[1]
        # The owner is alive: a run start elsewhere leaves its run alone.
        with mlflow_run(client, exp_id, "meanwhile", {}):
            pass
        assert client.get_run(run_id).info.status == "RUNNING"
        os.kill(child.proc.pid, signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.info.end_time is None
    assert run.data.tags[OWNER_PID] == str(child.proc.pid)
    assert run.data.tags[OWNER_HOST] == this_host()

    # The next run of the store, of any experiment, closes it first.
    other = tracking.experiment_id("kills-other")
    before = int(time.time() * 1000)
    with mlflow_run(client, other, "next", {}) as log:
        pass
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.info.end_time >= before
    assert f"owner process {child.proc.pid}" in run.data.tags[END_REASON]
    assert run.data.metrics == {"loss": 1.0}  # what it logged before the kill stays
    assert client.get_run(log.run_id).info.status == "FINISHED"
    assert client.get_run(log.run_id).data.tags[OWNER_PID] == str(os.getpid())


def test_sigterm_closes_the_run_as_killed(store):
    tracking, client, exp_id = store
    with Child(OPEN_RUN, tracking.tracking_uri, exp_id) as child:
        run_id = child.wait_for("OPEN").split()[1]
        os.kill(child.proc.pid, signal.SIGTERM)
        assert child.wait() == 128 + signal.SIGTERM, child.output()[-20:]
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.info.end_time is not None
    assert run.data.tags[END_REASON] == "Terminated: SIGTERM"


@pytest.fixture
def default_sigterm():
    """SIGTERM with its default action (an in-process Dagster run earlier in the session leaves it
    mapped to KeyboardInterrupt), restored afterwards."""
    old = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, old)


def test_sigterm_in_process_raises_closes_and_restores_the_handler(store, default_sigterm):
    _, client, exp_id = store
    with pytest.raises(Terminated) as err, mlflow_run(client, exp_id, "term", {}) as log:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    assert err.value.code == 128 + signal.SIGTERM
    assert client.get_run(log.run_id).info.status == "KILLED"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with pytest.raises(ValueError), mlflow_run(client, exp_id, "error", {}) as log:
        raise ValueError("boom")
    run = client.get_run(log.run_id)
    assert (run.info.status, run.data.tags[END_REASON]) == ("FAILED", "ValueError: boom")


def test_a_sigterm_handler_already_there_is_kept_and_its_interrupt_closes_the_run(store):
    # What an in-process Dagster run leaves behind (as in `fusemix materialize`): SIGTERM -> SIGINT.
    _, client, exp_id = store
    old = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), mlflow_run(client, exp_id, "int", {}) as log:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        assert signal.getsignal(signal.SIGTERM) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, old)
    run = client.get_run(log.run_id)
    assert (run.info.status, run.data.tags[END_REASON]) == ("KILLED", "KeyboardInterrupt: ")


def test_only_runs_of_gone_processes_on_this_host_are_closed(store):
    _, client, exp_id = store
    me = process_owner()

    def running(tags: dict[str, str]) -> str:
        return client.create_run(exp_id, tags=tags).info.run_id

    reused = running({**me, OWNER_STARTED: "another-boot:1"})  # our pid, another process's start
    alive = running(me)
    elsewhere = running({**me, OWNER_HOST: f"not-{this_host()}", OWNER_PID: "999999999"})
    untagged = running({})
    closed = close_orphaned_runs(client)
    assert reused in closed
    assert not {alive, elsewhere, untagged} & set(closed)
    status = {r: client.get_run(r).info.status for r in (reused, alive, elsewhere, untagged)}
    assert status == {reused: "KILLED", alive: "RUNNING", elsewhere: "RUNNING", untagged: "RUNNING"}
    for r in (alive, elsewhere, untagged):
        client.set_terminated(r, "FINISHED")


# --- checkpoints, evaluation, atomic files ----------------------------------------------------

CFG = AdapterConfig(depth=1, expansion=2, dropout=0.0, output_dim=4)


def _model() -> FusedModel:
    torch.manual_seed(0)
    refs = {"image": EncoderRef("img", "fp-i", 6), "text": EncoderRef("txt", "fp-t", 5)}
    return FusedModel({"image": Adapter(6, CFG), "text": Adapter(5, CFG)}, refs)


def _checkpoint(out: Path, run_id: str, digest: str = "h") -> Path:
    extra = {"inputs_hash": digest, "summary": {"mlflow_run_id": run_id, "steps": 3}}
    return save_checkpoint(out, _model(), CFG, extra=extra, side_files={HISTORY: "{}"})


def test_a_checkpoint_counts_only_with_a_finished_run(tmp_path, store):
    _, client, exp_id = store
    dirs, runs = {}, {}
    for status in ("FINISHED", "KILLED", "FAILED", "RUNNING"):
        runs[status] = client.create_run(exp_id).info.run_id
        if status != "RUNNING":
            client.set_terminated(runs[status], status)
        dirs[status] = _checkpoint(tmp_path / status, runs[status])
    assert up_to_date(dirs["FINISHED"], "h", client) == {"mlflow_run_id": runs["FINISHED"], "steps": 3}
    for status in ("KILLED", "FAILED", "RUNNING"):
        assert up_to_date(dirs[status], "h", client) is None, status
    assert up_to_date(dirs["FINISHED"], "other inputs", client) is None
    assert up_to_date(_checkpoint(tmp_path / "gone", uuid.uuid4().hex), "h", client) is None
    assert all_up_to_date({0: dirs["FINISHED"], 1: dirs["KILLED"]}, "h", client) is None
    assert len(all_up_to_date({0: dirs["FINISHED"]}, "h", client)) == 1


def test_evaluation_never_logs_into_a_run_that_did_not_finish(tmp_path, store):
    _, client, exp_id = store
    finished = client.create_run(exp_id).info.run_id
    client.set_terminated(finished, "FINISHED")
    killed = client.create_run(exp_id).info.run_id
    client.set_terminated(killed, "KILLED")
    report = tmp_path / "report" / "report.md"
    report.parent.mkdir()
    report.write_text("# report\n")

    def rows(run_id: str) -> list[dict]:
        base = {"dataset": DATASET, "gallery": POOLED, "metric": "t2i_recall_at_1", "value": 0.5}
        return [
            {**base, "seed": 0, "std": None, "n_seeds": 1, "mlflow_run_id": run_id},
            {**base, "seed": None, "std": 0.0, "n_seeds": 1, "mlflow_run_id": run_id},
        ]

    with pytest.raises(RunNotFinished, match=killed):
        log_evaluation(client, rows(killed), report, DATASET)
    assert client.get_run(killed).data.metrics == {}
    assert client.list_artifacts(killed) == []
    assert not evaluation_logged(client, [finished])  # metrics rows written, never logged: redo
    log_evaluation(client, rows(finished), report, DATASET)
    assert client.get_run(finished).data.metrics == {"t2i_recall_at_1": 0.5}
    assert evaluation_logged(client, [finished])

    exp = ExperimentSpec(name="e", dataset=DATASET, media_encoder="img", text_encoder="txt")
    models = {0: (None, {"summary": {"mlflow_run_id": finished}}, None)}
    check_trained(client, exp, models)
    models[1] = (None, {"summary": {"mlflow_run_id": killed}}, None)
    with pytest.raises(RunNotFinished, match=f"experiment e: MLflow run {killed} \\(KILLED\\)"):
        check_trained(client, exp, models)


def test_atomic_write_keeps_the_old_file_when_the_writer_dies(tmp_path, monkeypatch):
    path = tmp_path / "history.json"
    atomic_write_text(path, '{"old": true}')

    def half_then_die(tmp: str) -> None:
        Path(tmp).write_text('{"new": tr')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_die)
    assert json.loads(path.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json"]  # no temporary left

    # The new file is on disk (fsync) before it replaces the old one, and the rename is flushed too.
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def rename(src, dst) -> None:
        calls.append(("replace", Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", rename)
    atomic_write_text(path, '{"new": true}')
    monkeypatch.undo()
    # The file renamed into place (same inode) and then its folder.
    assert calls == [("fsync", path.stat().st_ino), ("replace", path), ("fsync", tmp_path.stat().st_ino)]
    assert json.loads(path.read_text()) == {"new": True}


# Saves a checkpoint with its history, then saves another and SIGKILLs itself halfway through writing
# the new history.json.
KILL_MID_HISTORY = textwrap.dedent(
    """
    import os, signal, sys, pathlib
    from fusion.adapters import Adapter, EncoderRef, FusedModel
    from fusion.config import AdapterConfig
    from pipelines.registries import ExperimentSpec
    from pipelines.train import save_model

    cfg = AdapterConfig(depth=1, expansion=2, dropout=0.0, output_dim=4)
    refs = {"image": EncoderRef("img", "fp-i", 6), "text": EncoderRef("txt", "fp-t", 5)}
    model = FusedModel({"image": Adapter(6, cfg), "text": Adapter(5, cfg)}, refs)
    exp = ExperimentSpec(name="x", dataset="d", media_encoder="img", text_encoder="txt", adapter=cfg)
    out = pathlib.Path(sys.argv[1])
    save_model(out, model, exp, {"n": 1}, {"history": [{"loss": 1.0}], "val_history": []})
    write_text = pathlib.Path.write_text

    def die_halfway(self, text, *args, **kwargs):
        if self.name.startswith(".history.json"):
            with open(self, "w") as fh:
                fh.write(text[: len(text) // 2])
            print("HALF", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return write_text(self, text, *args, **kwargs)

    pathlib.Path.write_text = die_halfway
    save_model(out, model, exp, {"n": 2}, {"history": [{"loss": 0.5}] * 50, "val_history": []})
    print("NOT KILLED", flush=True)
    """
)


def test_a_kill_while_history_json_is_written_leaves_the_old_file(tmp_path):
    out = tmp_path / "ckpt"
    with Child(KILL_MID_HISTORY, str(out)) as child:
        child.wait_for("HALF")
        assert child.wait() == -signal.SIGKILL
    assert read_history(out) == {"history": [{"loss": 1.0}], "val_history": []}
    # The new weights were written, so the old config is gone: the folder is no checkpoint (and will
    # be retrained) rather than new weights with an old config and history.
    assert not (out / CONFIG).exists()
    assert [p.name for p in out.glob(".history.json.*.tmp")]  # the half-written temporary file


# --- ingest -------------------------------------------------------------------------------------


def _manifests(project: Project) -> None:
    """v1.csv without the red squares and v2.csv without the blue circles: going from v1 to v2 adds
    items, removes others, and keeps most."""
    with open(project.data / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for name, drop in (("v1.csv", "red-square"), ("v2.csv", "blue-circle")):
        with open(project.data / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(r for r in rows if r["concept"] != drop)


def _use_manifest(project: Project, name: str) -> None:
    path = project.configs / "datasets.yaml"
    data = yaml.safe_load(path.read_text())
    data["datasets"][DATASET]["options"]["file"] = name
    path.write_text(yaml.safe_dump(data))


def _rows(lake: Lake, table: str) -> list[dict]:
    """The table's rows, without the ingestion time, in a fixed order."""
    rows = [{k: v for k, v in r.items() if k != "ingested_at"} for r in lake.read(table).to_pylist()]
    return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True, default=str))


def _tables(lake: Lake) -> dict[str, list[dict]]:
    return {t: _rows(lake, t) for t in (MEDIA, PAIRS, QUARANTINE)}


def _dangling(lake: Lake) -> set[str]:
    """Ids that pairs name and media lacks."""
    pairs = lake.read(PAIRS, ["media_id", "caption_id"])
    return set(pairs["media_id"].to_pylist() + pairs["caption_id"].to_pylist()) - lake.ids(MEDIA)


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> dict:
    """The tiny project with its two manifests, both datasets, and the tables an uninterrupted
    ingestion of v1 and then v2 writes."""
    project = make_project(tmp_path_factory.mktemp("ingest"))
    _manifests(project)
    spec = load_datasets(project.configs / "datasets.yaml")[DATASET]
    ds = {
        v: load_dataset(replace(spec, options={**spec.options, "file": f"{v}.csv"}), project.home, False)
        for v in ("v1", "v2")
    }
    lake = Lake(project.root / "reference")
    write_dataset(lake, DATASET, ds["v1"])
    write_dataset(lake, DATASET, ds["v2"])
    want = _tables(lake)
    gone = set(ds["v1"].media) - set(ds["v2"].media)
    new = set(ds["v2"].media) - set(ds["v1"].media)
    assert gone and new  # the change really adds and removes items
    return {"project": project, "ds": ds, "want": want, "gone": gone}


class Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs."""


@pytest.mark.parametrize("point", [0, 1, 2, 3, 4])
def test_ingest_killed_between_any_two_writes_heals_on_rerun(tmp_path, versions, monkeypatch, point):
    ds = versions["ds"]
    lake = Lake(tmp_path / "lake")
    write_dataset(lake, DATASET, ds["v1"])

    writes: list[tuple[str, str]] = []
    for method in ("append", "overwrite", "delete"):
        real = getattr(Lake, method)

        def write(self, table, *args, _real=real, _method=method, **kwargs):
            if len(writes) == point:
                raise Killed(f"killed before write {point} ({_method} {table})")
            writes.append((_method, table))
            return _real(self, table, *args, **kwargs)

        monkeypatch.setattr(Lake, method, write)
    if point < 4:
        with pytest.raises(Killed):
            write_dataset(lake, DATASET, ds["v2"])
    else:  # no kill: the order of the commits
        write_dataset(lake, DATASET, ds["v2"])
        assert writes == [
            ("append", MEDIA),
            ("overwrite", PAIRS),
            ("delete", MEDIA),
            ("overwrite", QUARANTINE),
        ]
    monkeypatch.undo()

    assert _dangling(lake) == set(), f"pairs name missing media after {writes}"
    write_dataset(lake, DATASET, ds["v2"])
    assert _tables(lake) == versions["want"]
    assert not versions["gone"] & lake.ids(MEDIA)


# --- the command line killed for real ---------------------------------------------------------


@pytest.fixture
def cli(tmp_path, monkeypatch) -> tuple[Project, dict[str, str]]:
    """The tiny project with the environment `fusemix materialize` reads, for this process and a child."""
    project = make_project(tmp_path)
    env = {
        "FUSEMIX_HOME": str(project.home),
        "FUSEMIX_CONFIGS": str(project.configs),
        "DAGSTER_HOME": str(tmp_path / "dagster"),
        "FUSEMIX_TORCH_THREADS": "1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return project, env


def _dagster_runs(env: dict[str, str]) -> list:
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as inst:
        return list(inst.get_runs())


# Runs `fusemix materialize ingest shapes`, stopping dead (waiting to be killed) right after the
# ingestion's first media delete was committed.
KILL_INGEST = textwrap.dedent(
    """
    import time
    from pipelines.lake import Lake

    delete = Lake.delete

    def delete_then_hang(self, table, predicate):
        version = delete(self, table, predicate)
        if table.startswith("media__"):
            print("DELETED", flush=True)
            time.sleep(300)
        return version

    Lake.delete = delete_then_hang
    from app.demo import materialize

    materialize("ingest", "shapes")
    """
)


def test_sigkilled_materialize_ingest_heals_and_its_dagster_run_is_failed(cli, capsys):
    from app.demo import materialize

    project, env = cli
    _manifests(project)
    spec = load_datasets(project.configs / "datasets.yaml")[DATASET]

    def dataset(v: str):
        return load_dataset(replace(spec, options={**spec.options, "file": f"{v}.csv"}), project.home, False)

    reference = Lake(project.root / "reference")
    write_dataset(reference, DATASET, dataset("v1"))
    write_dataset(reference, DATASET, dataset("v2"))
    lake = Lake(project.home / "lance")
    write_dataset(lake, DATASET, dataset("v1"))

    _use_manifest(project, "v2.csv")
    with Child(KILL_INGEST, env=env) as child:
        child.wait_for("DELETED")
        os.kill(child.proc.pid, signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
    assert _dangling(lake) == set()
    stale = [r for r in _dagster_runs(env) if r.status == dg.DagsterRunStatus.STARTED]
    assert [r.tags[OWNER_PID] for r in stale] == [str(child.proc.pid)]

    assert materialize("ingest", DATASET) == 0
    assert f"marked run {stale[0].run_id} failed" in capsys.readouterr().out
    runs = {r.run_id: r for r in _dagster_runs(env)}
    assert runs[stale[0].run_id].status == dg.DagsterRunStatus.FAILURE
    assert [r.status for i, r in runs.items() if i != stale[0].run_id] == [dg.DagsterRunStatus.SUCCESS]
    assert _tables(lake) == _tables(reference)


# Runs `fusemix materialize experiment shapes-fusemix` and SIGKILLs itself when the first artifact is
# logged: after the checkpoint was saved, before its run finished.
KILL_TRAINING = textwrap.dedent(
    """
    import os, signal, sys
    import mlflow

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    mlflow.MlflowClient.log_artifact = die
    from app.demo import materialize

    materialize("experiment", sys.argv[1])
    """
)


@pytest.mark.slow
def test_training_killed_before_its_run_finished_is_retrained_and_evaluated_in_the_new_run(cli, capsys):
    from app.demo import materialize

    project, env = cli
    with Child(KILL_TRAINING, EXPERIMENT, env=env) as child:
        assert child.wait(600) == -signal.SIGKILL, child.output()[-30:]
    ckpt = project.home / "models" / EXPERIMENT
    orphan = json.loads((ckpt / CONFIG).read_text())["extra"]["summary"]["mlflow_run_id"]
    tracking = MlflowTracking()  # the defaults under FUSEMIX_HOME, as materialize uses them
    client = tracking.client()
    assert client.get_run(orphan).info.status == "RUNNING"
    stale = [r.run_id for r in _dagster_runs(env) if r.status == dg.DagsterRunStatus.STARTED]
    assert len(stale) == 1

    assert materialize("experiment", EXPERIMENT) == 0
    assert f"marked run {stale[0]} failed" in capsys.readouterr().out
    assert {r.run_id for r in _dagster_runs(env) if r.status == dg.DagsterRunStatus.FAILURE} == set(stale)

    run = client.get_run(orphan)
    assert run.info.status == "KILLED" and run.info.end_time is not None
    assert END_REASON in run.data.tags
    fresh = json.loads((ckpt / CONFIG).read_text())["extra"]["summary"]["mlflow_run_id"]
    assert fresh != orphan
    assert client.get_run(fresh).info.status == "FINISHED"
    metrics = Lake(project.home / "lance").read("metrics").to_pylist()
    assert {r["mlflow_run_id"] for r in metrics} == {fresh}
    assert "t2i_recall_at_1" in client.get_run(fresh).data.metrics
    assert "t2i_recall_at_1" not in client.get_run(orphan).data.metrics
