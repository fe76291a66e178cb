"""Stopping servers: app.serve runs a server in its own session and stops it, with every process it
started, on SIGINT or SIGTERM; `fusemix ui` on the tiny project exits within 10 s of either signal
with no process left behind; runs the UI left in flight are marked canceled.

    .venv/bin/pytest -q tests/app/test_serve.py              (the `fusemix ui` ones are slow)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.utils import make_new_run_id

from app.serve import cancel_runs_in_flight, group_members
from tests.pipeline_fixture import make_project

REPO = Path(__file__).resolve().parents[2]

# A "server" whose child ignores SIGINT and SIGTERM (like a run worker that does not stop): only the
# final SIGKILL of the group ends it. It prints its child's pid and blocks.
STUBBORN = textwrap.dedent(
    """
    import signal, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    child.stdout.readline()
    print(child.pid, flush=True)
    time.sleep(600)
    """
)

SUPERVISOR = textwrap.dedent(
    """
    import sys
    from app.serve import serve
    sys.exit(serve([sys.executable, "-c", sys.argv[1]], {}, grace_s=1.0))
    """
)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_the_whole_group_even_a_child_that_ignores_signals(sig):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, STUBBORN], env=env, stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    child = int(proc.stdout.readline())
    assert alive(child)
    t0 = time.monotonic()
    proc.send_signal(sig)
    assert proc.wait(10) == 128 + sig
    assert time.monotonic() - t0 < 5
    deadline = time.monotonic() + 2
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child)


def test_in_flight_runs_without_a_live_owner_are_canceled(tmp_path):
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:

        def add(name: str, status: dg.DagsterRunStatus, tags=None) -> str:
            run = dg.DagsterRun(job_name=name, run_id=make_new_run_id(), status=status, tags=tags or {})
            instance.add_run(run)
            return run.run_id

        from_ui = add("ui", dg.DagsterRunStatus.STARTED)
        queued = add("ui", dg.DagsterRunStatus.STARTING)
        cli_run = add("cli", dg.DagsterRunStatus.STARTED, {"owner": "me"})
        done = add("done", dg.DagsterRunStatus.SUCCESS)
        canceled = cancel_runs_in_flight(instance, lambda tags: tags.get("owner") == "me")
        assert sorted(canceled) == sorted([from_ui, queued])
        status = {r: instance.get_run_by_id(r).status for r in (from_ui, queued, cli_run, done)}
        assert status == {
            from_ui: dg.DagsterRunStatus.CANCELED,
            queued: dg.DagsterRunStatus.CANCELED,
            cli_run: dg.DagsterRunStatus.STARTED,  # its owner lives: another terminal's run
            done: dg.DagsterRunStatus.SUCCESS,
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_fusemix_ui_exits_within_10_s_with_nothing_left(tmp_path, sig):
    project = make_project(tmp_path)
    port = free_port()
    env = {
        **os.environ,
        "FUSEMIX_HOME": str(tmp_path / "home"),
        "FUSEMIX_CONFIGS": str(project.configs),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "LANCE_LOG": "error",
    }
    env.pop("DAGSTER_HOME", None)
    fusemix = Path(sys.executable).parent / "fusemix"
    proc = subprocess.Popen(
        [str(fusemix), "ui", "--port", str(port)],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own group, so the test can find everything it started
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("the Dagster UI did not come up within 180 s")
        assert len(group_members(proc.pid)) >= 1
        t0 = time.monotonic()
        proc.send_signal(sig)
        proc.wait(10)
        took = time.monotonic() - t0
        assert took < 10
        deadline = time.monotonic() + 2
        left = []
        while time.monotonic() < deadline:
            left = [p for p in _session_members(proc.pid) if p != proc.pid]
            if not left:
                break
            time.sleep(0.1)
        assert left == [], f"processes left behind: {left}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _session_members(sid: int) -> list[int]:
    """Live processes in session `sid`, or in a session started by one of them (dagster dev's server
    runs in its own session under it): every descendant of the session's leader."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [sid]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return [p for p in out if alive(p)]
