"""The cluster deployment checked in under deploy/: the Dagster instance validates against Dagster's own
schema, and the Kubernetes files agree with each other and with what the code reads."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def test_the_instance_validates_and_a_misspelt_key_does_not(tmp_path):
    from dagster._core.errors import DagsterInvalidConfigError
    from dagster._core.instance.config import dagster_instance_config

    config, _ = dagster_instance_config(str(DEPLOY))
    assert config["run_launcher"]["class"] == "K8sRunLauncher"
    assert config["telemetry"] == {"enabled": False}
    limits = config["concurrency"]["runs"]["tag_concurrency_limits"]
    assert {"key": "dagster/partition", "value": {"applyLimitPerUniqueValue": True}, "limit": 1} in limits
    broken = tmp_path / "dagster.yaml"
    shutil.copy(DEPLOY / "dagster.yaml", broken)
    broken.write_text(broken.read_text().replace("run_launcher:", "run_lancher:"))
    with pytest.raises(DagsterInvalidConfigError):
        dagster_instance_config(str(tmp_path))


def test_the_run_pods_and_ray_workers_get_the_same_settings():
    env_map = _load("fusemix-env.yaml")
    launcher = _load("dagster.yaml")["run_launcher"]["config"]
    assert launcher["env_config_maps"] == [env_map["metadata"]["name"]]
    cluster = _load("ray-cluster.yaml")
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            sources = container["envFrom"]
            assert {"configMapRef": {"name": env_map["metadata"]["name"]}} in sources
            assert {"secretRef": {"name": launcher["env_secrets"][0]}} in sources
    # The run pods reach the head service KubeRay makes for this cluster, on the Ray client port.
    name, namespace = cluster["metadata"]["name"], cluster["metadata"]["namespace"]
    assert env_map["data"]["RAY_ADDRESS"] == f"ray://{name}-head-svc.{namespace}.svc:10001"
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert any(
        "nvidia.com/gpu" in c["resources"]["limits"]
        for g in groups
        for c in g["template"]["spec"]["containers"]
    )


def test_the_cluster_runs_the_ray_this_project_pins():
    ray = pytest.importorskip("ray")
    assert _load("ray-cluster.yaml")["spec"]["rayVersion"] == ray.__version__


def test_the_config_map_means_what_the_code_reads(monkeypatch):
    from assets.extract import ExtractConfig, engine_of
    from pipelines.lake import default_lake_root, object_store_options
    from pipelines.resources import LanceLake

    data = _load("fusemix-env.yaml")["data"]
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(data)  # secrets stay in the secret
    for key, value in data.items():
        monkeypatch.setenv(key, str(value))
    assert default_lake_root() == LanceLake().root == data["FUSEMIX_LAKE"]
    assert engine_of(ExtractConfig()) == "ray"
    options = object_store_options(data["FUSEMIX_LAKE"])
    assert options["aws_endpoint"] == data["AWS_ENDPOINT_URL"] and options["aws_region"] == data["AWS_REGION"]
