"""The command-line runner behind `fusemix demo` / `fusemix materialize` (app.demo) on the tiny project.

run_plan ingests, extracts and runs one experiment through an ephemeral Dagster instance;
retrieval_table then shows the experiment's row from the Lance metrics table; materialize rejects
unknown stages and experiments with exit code 2; opening the instance marks failed the runs that a
killed process left open (a real kill: tests/pipelines/test_kills.py).

    .venv/bin/pytest -q tests/app/test_demo.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import dagster as dg
import pytest

from pipelines.lake import Lake
from tests.pipeline_fixture import make_project

EXPERIMENT = "shapes-fusemix"


@pytest.fixture
def project(tmp_path, monkeypatch):
    project = make_project(tmp_path)
    # The defaults (default_lake_root, the Definitions built by materialize) read these.
    monkeypatch.setenv("FUSEMIX_HOME", str(project.home))
    monkeypatch.setenv("FUSEMIX_CONFIGS", str(project.configs))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    monkeypatch.setenv("FUSEMIX_TORCH_THREADS", "1")
    return project


def test_run_plan_ingests_and_extracts_the_datasets_an_experiment_is_also_scored_on(project, capsys):
    import yaml

    from app.definitions import build_defs
    from app.demo import run_plan

    ds = yaml.safe_load((project.configs / "datasets.yaml").read_text())
    ds["datasets"]["shapes-copy"] = dict(ds["datasets"]["shapes"])
    (project.configs / "datasets.yaml").write_text(yaml.safe_dump(ds))
    exps = yaml.safe_load((project.configs / "experiments.yaml").read_text())
    exps["experiments"][EXPERIMENT]["eval_datasets"] = ["shapes-copy"]
    (project.configs / "experiments.yaml").write_text(yaml.safe_dump(exps))
    defs, parts = build_defs(project.configs, resources=project.resources())
    assert run_plan(defs, parts, dg.DagsterInstance.ephemeral(), [EXPERIMENT]) is True
    out = capsys.readouterr().out
    for dataset in ("shapes", "shapes-copy"):
        assert out.count(f"-> ingest_job [{dataset}]") == 1
        assert out.count(f"-> extract_job [{dataset}|tiny-image]") == 1
        assert out.count(f"-> extract_job [{dataset}|tiny-text]") == 1
    assert "FAILED" not in out
    scored = {r["dataset"] for r in Lake(project.home / "lance").read("metrics").to_pylist()}
    assert scored == {"shapes", "shapes-copy"}


def test_run_plan_runs_an_experiment_and_the_table_shows_it(project, capsys):
    from app.definitions import build_defs
    from app.demo import retrieval_table, run_plan

    defs, parts = build_defs(project.configs, resources=project.resources())
    inst = dg.DagsterInstance.ephemeral()
    assert run_plan(defs, parts, inst, [EXPERIMENT]) is True
    out = capsys.readouterr().out
    # One ingest, the two extractions the experiment needs, then the experiment; all ok.
    assert out.count("-> ingest_job [shapes]") == 1
    assert out.count("-> extract_job [shapes|tiny-image]") == 1
    assert out.count("-> extract_job [shapes|tiny-text]") == 1
    assert "-> experiment_job [shapes-fusemix]" in out
    assert "FAILED" not in out
    # Only the encoders of the registry became partitions; tiny-audio was not extracted.
    assert set(inst.get_dynamic_partitions("encoder")) == {"tiny-text", "tiny-image", "tiny-audio"}
    assert "tiny-audio" not in out
    # Every run names the process that ran it, so a later start can tell whether it was killed.
    from pipelines.tracking import OWNER_PID

    assert {r.tags[OWNER_PID] for r in inst.get_runs()} == {str(os.getpid())}

    metrics = {
        r["metric"]: r["value"]
        for r in Lake(project.home / "lance").read("metrics").to_pylist()
        if r["experiment"] == EXPERIMENT and r["split"] == "test"
    }
    assert "t2i_recall_at_1" in metrics

    table = retrieval_table([EXPERIMENT, "shapes-n12"])
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["experiment", "items"]
    row = next(line for line in lines if line.startswith(EXPERIMENT))
    cells = row.split()
    assert cells[0] == EXPERIMENT
    assert int(cells[1]) == int(metrics["test_items"]) > 0
    assert cells[2] == f"{100 * metrics['t2i_recall_at_1']:.1f}"
    assert cells[5] == f"{100 * metrics['i2t_recall_at_1']:.1f}"
    assert all(0.0 <= float(c) <= 100.0 for c in cells[2:])
    # An experiment of the registry that was not run is listed as such, not with made-up numbers.
    assert next(line for line in lines if line.startswith("shapes-n12")).endswith("(not evaluated)")

    # The family's ablation report asset: the table holds the stored Recall@1, and an MLflow parent
    # run holds the report with the experiment's run as its child.
    from app.demo import _run

    assert _run(defs, "report_job", "demo", inst) is True
    report = project.home / "reports" / "families" / "demo.md"
    text = report.read_text()
    assert EXPERIMENT in text and f"{100 * metrics['t2i_recall_at_1']:.1f}" in text
    assert report.with_suffix(".png").stat().st_size > 0
    client = project.resources()["tracking"].client()
    run_id = next(
        r["mlflow_run_id"]
        for r in Lake(project.home / "lance").read("metrics").to_pylist()
        if r["experiment"] == EXPERIMENT
    )
    parent = client.get_run(run_id).data.tags["mlflow.parentRunId"]
    assert client.get_run(parent).info.run_name == "family:demo"
    assert "report/demo.md" in [a.path for a in client.list_artifacts(parent, "report")]


def test_retrieval_table_without_metrics(project):
    from app.demo import retrieval_table

    assert retrieval_table([EXPERIMENT]) == "(no metrics yet)"


def test_materialize_rejects_unknown_stage_and_experiment(project, capsys):
    from app.demo import STAGES, materialize

    assert materialize("bogus") == 2
    out = capsys.readouterr().out
    assert "unknown stage 'bogus'" in out
    assert all(stage in out for stage in STAGES)

    assert materialize("experiment", "no-such-experiment") == 2
    out = capsys.readouterr().out
    assert "unknown experiment 'no-such-experiment'" in out
    assert EXPERIMENT in out
    # Nothing was ingested on the way to the error.
    assert not Lake(project.home / "lance").exists("media__shapes")


def test_opening_the_instance_fails_the_runs_of_killed_processes(project, capsys):
    from app.demo import instance
    from pipelines.tracking import OWNER_HOST, OWNER_PID, OWNER_STARTED, process_owner, this_host

    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    gone = {**process_owner(), OWNER_PID: child.stdout.strip()}  # a process that has ended
    me = process_owner()
    inst = instance()
    status = dg.DagsterRunStatus

    def add(run_status, tags) -> str:
        run_id = str(uuid.uuid4())
        inst.add_run(dg.DagsterRun(job_name="ingest_job", run_id=run_id, status=run_status, tags=tags))
        return run_id

    killed = add(status.STARTED, gone)
    killed_early = add(status.NOT_STARTED, gone)
    reused = add(status.STARTED, {**me, OWNER_STARTED: "another-boot:1"})  # our pid, reused
    alive = add(status.STARTED, me)
    elsewhere = add(status.STARTED, {**gone, OWNER_HOST: f"not-{this_host()}"})
    from_ui = add(status.STARTED, {})
    done = add(status.SUCCESS, gone)
    capsys.readouterr()

    inst = instance()
    out = capsys.readouterr().out
    now = {
        r: inst.get_run_by_id(r).status
        for r in (killed, killed_early, reused, alive, elsewhere, from_ui, done)
    }
    assert now == {
        killed: status.FAILURE,
        killed_early: status.FAILURE,
        reused: status.FAILURE,
        alive: status.STARTED,
        elsewhere: status.STARTED,
        from_ui: status.STARTED,
        done: status.SUCCESS,
    }
    assert all(f"marked run {r} failed" in out for r in (killed, killed_early, reused))
    assert out.count("marked run") == 3
    instance()
    assert capsys.readouterr().out == ""  # nothing left to mark
