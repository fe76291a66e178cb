"""Running a server (`fusemix ui`, `fusemix mlflow-ui`) so that Ctrl-C and SIGTERM stop it, and
everything it started, within seconds.

`dagster dev` starts a webserver, a daemon and code servers, and the runs it launches are more
processes below those; a signal that reaches only some of them, or a run still in flight, used to keep
it alive for good. Here the server runs in its own session (process group): on SIGINT, SIGTERM or
SIGHUP the whole group gets SIGINT (the server's own orderly shutdown), then, after `grace_s`
seconds, SIGKILL for whatever is left. `after()` runs last (the UI marks the runs it left in flight as
canceled).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Callable

import dagster as dg

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Runs that were launched but never reached an end.
IN_FLIGHT = [
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def group_members(pgid: int) -> list[int]:
    """Pids of the live processes in process group `pgid` (Linux /proc; empty elsewhere)."""
    out = []
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else []:
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields after the command: state, ppid, pgrp, ...; a zombie has already exited.
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(entry.name))
    return out


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def serve(
    argv: list[str],
    env: dict[str, str],
    grace_s: float = 5.0,
    after: Callable[[], None] | None = None,
) -> int:
    """Runs `argv` in its own session until it exits or this process gets a stop signal; returns its
    exit status, or 128 + the signal's number when stopped by one."""
    proc = subprocess.Popen(argv, env=env, start_new_session=True)
    stopped: list[int] = []
    wake = threading.Event()

    def on_signal(signum, _frame) -> None:
        stopped.append(signum)
        wake.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    try:
        while proc.poll() is None and not wake.is_set():
            wake.wait(0.2)
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace_s)
        # The leader may be gone while a daemon or a run worker of its group still runs.
        if group_members(proc.pid) or proc.poll() is None:
            _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if after is not None:
            after()
    return 128 + stopped[0] if stopped else proc.returncode


def cancel_runs_in_flight(instance: dg.DagsterInstance, owner_alive: Callable[[dict], bool]) -> list[str]:
    """Marks canceled every run of `instance` still in flight whose owner is not a live process
    (`owner_alive(tags)`; runs launched from the UI have no owner): after the UI stopped, nothing
    runs them any more. Returns their ids."""
    canceled = []
    for run in instance.get_runs(dg.RunsFilter(statuses=IN_FLIGHT)):
        if owner_alive(run.tags):
            continue  # e.g. a `fusemix materialize` in another terminal
        instance.report_run_canceled(run, message="the Dagster UI that ran it was stopped")
        canceled.append(run.run_id)
    return canceled
