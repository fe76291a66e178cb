"""MLflow tracking: the default store, a run per training, params in batches, step metrics buffered,
and runs that are closed however their process ends.

Every run records the process that owns it (host, pid, process start: `process_owner`). A process
that dies without closing its run (SIGKILL, the OOM killer, a power cut) leaves it RUNNING; the next
`mlflow_run` on this host closes every such run of the store as KILLED (`close_orphaned_runs`). While
a run is open in the main thread, SIGTERM raises `Terminated` so the run is closed as KILLED too.
The same owner tags mark the Dagster runs the command line starts (app.demo).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from fusion.paths import fusemix_home

OWNER_HOST = "fusemix.owner.host"
OWNER_PID = "fusemix.owner.pid"
OWNER_STARTED = "fusemix.owner.started"
END_REASON = "fusemix.end_reason"
_PROC = Path("/proc")


def default_tracking_uri(create: bool = False) -> str:
    """MLflow's SQLite store under the home folder. `create` makes its folder (SQLite creates the file
    but not the folder); without it nothing is written, as when the Definitions load."""
    store = fusemix_home() / "mlflow"
    if create:
        store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def default_artifact_root() -> str:
    return str(fusemix_home() / "mlflow" / "artifacts")


def process_started(pid: int) -> str | None:
    """When process `pid` started, as a token a later process reusing the pid does not share (boot
    id and start time in clock ticks, from Linux's /proc). None when no such process is alive (a
    zombie counts as dead: it was killed and only waits for its parent); "" where the platform does
    not tell start times (then only whether the pid is alive is known)."""
    if not (_PROC / "self" / "stat").exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:  # alive, another user's
            pass
        return ""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after its last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # state
        return None
    try:
        boot = (_PROC / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{boot}:{fields[19]}"  # field 22: starttime


def this_host() -> str:
    return socket.gethostname()


def process_owner() -> dict[str, str]:
    """Tags naming this process as the owner of a run (MLflow or Dagster)."""
    return {
        OWNER_HOST: this_host(),
        OWNER_PID: str(os.getpid()),
        OWNER_STARTED: process_started(os.getpid()) or "",
    }


def owner_gone(tags: Mapping[str, str]) -> bool:
    """Whether the process that owner `tags` (process_owner) name is known to be gone: it ran on this
    host and its pid is dead or now belongs to a process started later. False for a run of another
    host or without owner tags: nothing can be known of those here."""
    pid = tags.get(OWNER_PID, "")
    if tags.get(OWNER_HOST) != this_host() or not pid.isdigit():
        return False
    now = process_started(int(pid))
    if now is None:
        return True
    recorded = tags.get(OWNER_STARTED, "")
    return bool(now and recorded and now != recorded)


def run_status(client, run_id: str | None) -> str | None:
    """The status of MLflow run `run_id` (FINISHED, RUNNING, FAILED, KILLED, SCHEDULED), or None when
    the store has no such run."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        return client.get_run(run_id).info.status
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


class RunNotFinished(RuntimeError):
    """A model's MLflow run did not finish: its training was killed or failed after saving files."""


def require_finished(client, run_ids, what: str) -> None:
    """Raises RunNotFinished unless every run of `run_ids` is FINISHED; `what` names their owner."""
    bad = {r: run_status(client, r) for r in dict.fromkeys(run_ids)}
    bad = {r: s for r, s in bad.items() if s != "FINISHED"}
    if bad:
        listed = ", ".join(f"{r} ({s or 'not in the tracking store'})" for r, s in bad.items())
        raise RunNotFinished(
            f"{what}: MLflow run {listed} did not finish, so its training never completed; "
            "retrain it (materialise `adapters` again) before evaluating"
        )


def _pages(fetch) -> Iterator:
    token = None
    while True:
        page = fetch(token)
        yield from page
        token = page.token
        if not token:
            return


def close_orphaned_runs(client) -> list[str]:
    """Marks KILLED, with an end time and END_REASON, every RUNNING run of the store whose owner
    process ran on this host and is gone. Returns their ids."""
    from mlflow.entities import ViewType

    experiments = [
        e.experiment_id
        for e in _pages(lambda t: client.search_experiments(view_type=ViewType.ALL, page_token=t))
    ]
    if not experiments:
        return []
    host = this_host()
    query = f"attributes.status = 'RUNNING' and tags.`{OWNER_HOST}` = '{host}'"
    runs = _pages(lambda t: client.search_runs(experiments, query, run_view_type=ViewType.ALL, page_token=t))
    closed = []
    for run in list(runs):
        tags = run.data.tags
        if not owner_gone(tags):
            continue
        client.set_tag(
            run.info.run_id,
            END_REASON,
            f"owner process {tags[OWNER_PID]} on {host} is gone (killed); closed by process {os.getpid()}",
        )
        client.set_terminated(run.info.run_id, "KILLED", end_time=int(time.time() * 1000))
        closed.append(run.info.run_id)
    return closed


class RunLogger:
    """Buffers step metrics and flushes them with log_batch (one SQLite transaction per flush)."""

    def __init__(self, client, run_id: str, flush_every: int = 200) -> None:
        self.client, self.run_id, self.flush_every = client, run_id, flush_every
        self._buffer: list = []

    def params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def metrics(self, values: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), ts, step) for k, v in values.items())
        if len(self._buffer) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self._buffer), 1000):
            self.client.log_batch(self.run_id, metrics=self._buffer[i : i + 1000])
        self._buffer = []


class Terminated(SystemExit):
    """SIGTERM received while a run was open. Exits with status 143 (128 + SIGTERM) if uncaught."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)

    def __str__(self) -> str:
        return "SIGTERM"


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While open, SIGTERM raises Terminated instead of ending the process on the spot, so `finally`
    blocks run. Only in the main thread (where signal handlers live) and only where SIGTERM has its
    default action: a handler someone else installed (Dagster maps SIGTERM to its interrupt) is
    left alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def mlflow_run(client, experiment_id: str, run_name: str, tags: dict[str, str]) -> Iterator[RunLogger]:
    """Closes the store's runs whose process died (close_orphaned_runs), creates a run owned by this
    process, yields its logger, and marks it FINISHED; KILLED on an interrupt (SIGINT, SIGTERM,
    Dagster's) or FAILED on an error, with the reason in END_REASON."""
    close_orphaned_runs(client)
    run = client.create_run(experiment_id, run_name=run_name, tags={**tags, **process_owner()})
    run_id = run.info.run_id
    logger = RunLogger(client, run_id)
    with sigterm_raises():
        try:
            yield logger
            logger.flush()
            client.set_terminated(run_id, "FINISHED")
        except BaseException as err:
            # Errors are Exceptions; interrupts (KeyboardInterrupt, Terminated, Dagster's) are not.
            status = "FAILED" if isinstance(err, Exception) else "KILLED"
            with contextlib.suppress(Exception):  # the run must still be closed
                logger.flush()
                client.set_tag(run_id, END_REASON, f"{type(err).__name__}: {err}"[:5000])
            client.set_terminated(run_id, status)
            raise
