"""The Dagster webserver on workspace.yaml, pointed at the tiny project by environment only.

Starts `dagster-webserver -w workspace.yaml` on a free port of 127.0.0.1 in its own session, with
FUSEMIX_HOME, FUSEMIX_CONFIGS and DAGSTER_HOME in a temporary folder; lists the asset nodes over
GraphQL, brings the dynamic partitions in step with the YAML files (and lists a dataset added to
datasets.yaml without a reload), launches `ingest_job` for partition `shapes` (a DefaultRunCoordinator, so no daemon is
needed), waits for SUCCESS, checks that the run wrote into the temporary lake and nothing into the
checkout, then stops the server by its process group.

    .venv/bin/pytest -q -m slow tests/app/test_webserver.py
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import dagster as dg
import pytest
import yaml

from pipelines.lake import Lake
from pipelines.partitions import build_partitions, sync_partitions
from tests.app.test_definitions import ASSETS as GROUP_OF
from tests.pipeline_fixture import make_project

REPO = Path(__file__).resolve().parents[2]
WEBSERVER = Path(sys.executable).parent / "dagster-webserver"
ASSETS = set(GROUP_OF)  # the graph the Definitions promise (tests/app/test_definitions.py)
GROUPS = set(GROUP_OF.values())

REPOSITORIES = """
query {
  repositoriesOrError {
    __typename
    ... on RepositoryConnection { nodes { name location { name } } }
    ... on PythonError { message }
  }
}
"""
ASSET_NODES = "query { assetNodes { assetKey { path } groupName } }"
LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on InvalidSubsetError { message }
    ... on PipelineNotFoundError { message }
  }
}
"""
RUN_STATUS = """
query Status($runId: ID!) {
  runOrError(runId: $runId) { __typename ... on Run { status } ... on PythonError { message } }
}
"""
FINAL = {"SUCCESS", "FAILURE", "CANCELED"}


def _checkout_tables() -> dict[str, float]:
    """Lance tables of the checkout's default lake (<repo>/lake/lance) with their modification times."""
    root = REPO / "lake" / "lance"
    return {p.name: p.stat().st_mtime for p in root.glob("*.lance")} if root.is_dir() else {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(base: str, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    req = urllib.request.Request(
        f"{base}/graphql", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            out = json.loads(resp.read())
    except urllib.error.HTTPError as err:  # GraphQL validation errors come back as 400 with a body
        pytest.fail(f"GraphQL {err.code}: {err.read().decode(errors='replace')[:2000]}")
    assert "errors" not in out, out["errors"]
    return out["data"]


def _wait_until_up(base: str, proc: subprocess.Popen, log: Path, limit_s: float = 90) -> dict:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"dagster-webserver exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/server_info", timeout=5) as resp:
                return json.loads(resp.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    pytest.fail(f"dagster-webserver did not answer within {limit_s}s:\n{log.read_text()[-3000:]}")


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie waiting for a parent to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def _group(pgid: int) -> list[int]:
    """Live processes of process group `pgid` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def _stop(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM to the server's process group, SIGKILL to whatever is left after `grace_s`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    deadline = time.monotonic() + grace_s
    while _group(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _group(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=grace_s)


PARTITION_KEYS = """
query Keys($path: [String!]!) {
  assetNodeOrError(assetKey: {path: $path}) {
    __typename
    ... on AssetNode { partitionKeysByDimension { name partitionKeys } }
  }
}
"""


def _partition_keys(base: str, asset: str) -> list[str]:
    node = _graphql(base, PARTITION_KEYS, {"path": [asset]})["assetNodeOrError"]
    assert node["__typename"] == "AssetNode", node
    (dim,) = node["partitionKeysByDimension"]
    return dim["partitionKeys"]


def _sync(project, dagster_home: Path) -> None:
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        sync_partitions(build_partitions(project.configs), instance)


@pytest.mark.slow
def test_webserver_lists_assets_and_runs_ingest(tmp_path):
    assert WEBSERVER.exists(), f"{WEBSERVER} is missing: is dagster-webserver installed in the venv?"
    project = make_project(tmp_path / "project")
    dagster_home = tmp_path / "dagster"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text(
        "run_coordinator:\n"
        "  module: dagster._core.run_coordinator\n"
        "  class: DefaultRunCoordinator\n"
        "telemetry:\n"
        "  enabled: false\n"
    )
    checkout_tables = _checkout_tables()
    env = {
        **os.environ,
        "FUSEMIX_HOME": str(project.home),
        "FUSEMIX_CONFIGS": str(project.configs),
        "DAGSTER_HOME": str(dagster_home),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
        "FUSEMIX_TORCH_THREADS": "1",
    }
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "webserver.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(WEBSERVER), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        info = _wait_until_up(base, proc, log)
        assert "dagster_webserver_version" in info or "dagit_version" in info, info

        repos = _graphql(base, REPOSITORIES)["repositoriesOrError"]
        assert repos["__typename"] == "RepositoryConnection", f"{repos}\n{log.read_text()[-3000:]}"
        assert len(repos["nodes"]) == 1, repos
        repo = repos["nodes"][0]

        nodes = _graphql(base, ASSET_NODES)["assetNodes"]
        keys = {"/".join(n["assetKey"]["path"]) for n in nodes}
        assert keys == ASSETS
        assert {n["groupName"] for n in nodes} == GROUPS

        # Partitions are dynamic: brought in step with the YAML files (as `fusemix ui` does before it
        # starts and the registry sensor does on each tick), and the running server lists an entry
        # added to datasets.yaml without a reload.
        _sync(project, dagster_home)
        assert _partition_keys(base, "media") == ["shapes"]
        datasets = project.configs / "datasets.yaml"
        before = datasets.read_text()
        entries = yaml.safe_load(before)
        entries["datasets"]["shapes-copy"] = dict(entries["datasets"]["shapes"])
        datasets.write_text(yaml.safe_dump(entries))
        _sync(project, dagster_home)
        assert sorted(_partition_keys(base, "media")) == ["shapes", "shapes-copy"]
        datasets.write_text(before)
        _sync(project, dagster_home)
        assert _partition_keys(base, "media") == ["shapes"]

        params = {
            "selector": {
                "repositoryLocationName": repo["location"]["name"],
                "repositoryName": repo["name"],
                "jobName": "ingest_job",
            },
            "executionMetadata": {"tags": [{"key": "dagster/partition", "value": "shapes"}]},
        }
        launched = _graphql(base, LAUNCH, {"params": params})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]

        status, deadline = None, time.monotonic() + 120
        while time.monotonic() < deadline:
            run = _graphql(base, RUN_STATUS, {"runId": run_id})["runOrError"]
            assert run["__typename"] == "Run", run
            status = run["status"]
            if status in FINAL:
                break
            time.sleep(1)
        assert status == "SUCCESS", f"run {run_id} ended {status}\n{log.read_text()[-3000:]}"

        # Environment alone pointed the run at the temporary project: its lake holds the dataset.
        lake = Lake(project.home / "lance")
        assert lake.count("media__shapes", "modality = 'image'") == project.n_media
        assert lake.count("quarantine__shapes") == 1
        # ... and the run's records are in the temporary DAGSTER_HOME's SQLite storage.
        assert (dagster_home / "history" / "runs.db").is_file(), sorted(
            p.name for p in dagster_home.iterdir()
        )
        assert (dagster_home / "history" / "runs" / f"{run_id}.db").is_file()
        assert _checkout_tables() == checkout_tables, "the run wrote into the checkout's default lake"
    finally:
        _stop(proc)
    assert proc.returncode is not None
    assert not _alive(proc.pid)
    assert _group(proc.pid) == []
