"""The Dagster Definitions load: the real ones from configs/ (as `dagster dev` and `fusemix ui` load
them) and `build_defs` on the tiny project, with the asset keys, groups, partitions, jobs, sensor,
schedule and asset checks the pipeline promises.

    .venv/bin/pytest -q tests/app/test_definitions.py
"""

from __future__ import annotations

import importlib

import dagster as dg
import pytest
import yaml

from fusion.paths import PROJECT_ROOT
from tests.pipeline_fixture import make_project

ASSETS = {
    "media": "ingest",
    "pairs": "ingest",
    "quarantine": "ingest",
    "latents": "extract",
    "experiment_inputs": "curate",
    "curated": "curate",
    "adapters": "train",
    "retrieval_metrics": "evaluate",
    "embeddings": "serve",
    "ablation_report": "report",
}
CHECKS = {("curated", "latents_ready"): True, ("quarantine", "quarantine_rate"): False}
CHECKS[("retrieval_metrics", "recall_above_chance")] = False
JOBS = {
    "ingest_job": {"media", "pairs", "quarantine"},
    "extract_job": {"latents"},
    "experiment_job": {"experiment_inputs", "curated", "adapters", "retrieval_metrics", "embeddings"},
    "report_job": {"ablation_report"},
}


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """app.definitions imported with FUSEMIX_HOME in a temporary folder, so nothing is written
    into the checkout (its resources create the MLflow folder under the home)."""
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("home")
    mp.setenv("FUSEMIX_HOME", str(home))
    mp.delenv("FUSEMIX_CONFIGS", raising=False)
    try:
        # Reloaded: another test module may have imported it under another home first.
        module = importlib.reload(importlib.import_module("app.definitions"))
        module.test_home = home
        yield module
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def tiny(real, tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("defs"))
    defs, parts = real.build_defs(project.configs, resources=project.resources())
    return project, defs, parts


def _shape(defs: dg.Definitions) -> dict:
    graph = defs.resolve_asset_graph()
    return {key.to_user_string(): graph.get(key).group_name for key in graph.get_all_asset_keys()}


def _checks(defs: dg.Definitions) -> dict[tuple[str, str], bool]:
    out = {}
    for checks_def in defs.asset_checks:
        for spec in checks_def.check_specs:
            out[(spec.asset_key.to_user_string(), spec.name)] = spec.blocking
    return out


def test_real_definitions_load_with_the_promised_graph(real):
    defs = real.defs
    dg.Definitions.validate_loadable(defs)
    assert _shape(defs) == ASSETS
    assert _checks(defs) == CHECKS
    for job, assets in JOBS.items():
        job_def = defs.resolve_job_def(job)
        selected = {k.to_user_string() for k in job_def.asset_layer.selected_asset_keys}
        assert selected == assets, job
    assert defs.resolve_sensor_def("registry_sensor").job_name == "extract_job"
    assert defs.resolve_sensor_def("experiment_sensor").job_name == "experiment_job"
    schedule = defs.resolve_schedule_def("refresh_latents_schedule")
    assert schedule.job_name == "extract_job"
    assert schedule.cron_schedule == "0 3 * * *"
    assert set(defs.resources) >= {"lake", "encoders", "tracking", "catalog", "paths"}


def test_real_partitions_follow_the_registries(real):
    parts = real.PARTS
    configs = PROJECT_ROOT / "configs"
    datasets = yaml.safe_load((configs / "datasets.yaml").read_text())["datasets"]
    experiments = yaml.safe_load((configs / "experiments.yaml").read_text())["experiments"]
    wanted = parts.wanted()
    assert wanted["dataset"] == sorted(datasets)
    assert wanted["experiment"] == sorted(experiments)
    assert wanted["family"] == sorted({e.get("family", "demo") for e in experiments.values()})
    assert [parts.dataset.name, parts.encoder.name, parts.experiment.name, parts.family.name] == [
        "dataset",
        "encoder",
        "experiment",
        "family",
    ]
    graph = real.defs.resolve_asset_graph()
    for key, expected in (
        ("media", parts.dataset),
        ("latents", parts.extract),
        ("experiment_inputs", parts.experiment),
        ("curated", parts.experiment),
        ("adapters", parts.experiment),
        ("retrieval_metrics", parts.experiment),
        ("embeddings", parts.experiment),
        ("ablation_report", parts.family),
    ):
        assert graph.get(dg.AssetKey(key)).partitions_def == expected, key
    # Every experiment's encoders are in the registry, with the modality its side needs.
    registry = parts.encoders()
    for exp in parts.experiments.values():
        assert registry[exp.text_encoder].modality == "text"
        assert registry[exp.media_encoder].modality == parts.datasets[exp.dataset].modality


def test_real_default_resources_live_under_fusemix_home(real):
    home = real.test_home
    res = real.defs.resources
    assert res["lake"].root == str(home / "lance")
    assert res["tracking"].tracking_uri == f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    assert res["catalog"].lake.root == str(home / "lance")
    assert res["paths"].home == str(home)
    assert res["encoders"].registry_path == str(PROJECT_ROOT / "configs" / "encoders.yaml")


def test_real_resources_default_under_fusemix_home(real, tmp_path, monkeypatch):
    from pipelines.resources import LanceLake, PipelinePaths

    monkeypatch.setenv("FUSEMIX_HOME", str(tmp_path))
    assert LanceLake().root == str(tmp_path / "lance")
    assert PipelinePaths().models_dir == tmp_path / "models"


def test_build_defs_on_the_tiny_project(tiny):
    project, defs, parts = tiny
    dg.Definitions.validate_loadable(defs)
    assert _shape(defs) == ASSETS
    assert _checks(defs) == CHECKS
    assert parts.wanted()["dataset"] == ["shapes"]
    assert parts.wanted()["experiment"] == ["shapes-fusemix", "shapes-n12"]
    assert sorted(parts.encoders()) == ["tiny-audio", "tiny-image", "tiny-text"]
    # The resources given replace the defaults: every store is inside the project folder.
    assert defs.resources["lake"].root == str(project.home / "lance")
    assert defs.resources["paths"].configs == str(project.configs)
    assert defs.resources["encoders"].registry_path == str(project.configs / "encoders.yaml")
    assert str(project.home) in defs.resources["tracking"].tracking_uri


def test_applies_matches_modalities(tiny):
    _, _, parts = tiny
    specs = parts.encoders()
    assert parts.applies("shapes", specs["tiny-image"])
    assert parts.applies("shapes", specs["tiny-text"])
    assert not parts.applies("shapes", specs["tiny-audio"])
    key = parts.extract_key("shapes", "tiny-text")
    assert key.keys_by_dimension == {"dataset": "shapes", "encoder": "tiny-text"}


def test_experiment_with_unknown_dataset_is_refused_by_name(real, tmp_path):
    build_defs = real.build_defs

    project = make_project(tmp_path)
    path = project.configs / "experiments.yaml"
    data = yaml.safe_load(path.read_text())
    data["experiments"]["ghost"] = {
        "dataset": "nowhere",
        "media_encoder": "tiny-image",
        "text_encoder": "tiny-text",
    }
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=r"experiment 'ghost' names dataset 'nowhere'.*datasets.yaml"):
        build_defs(project.configs, resources=project.resources())
