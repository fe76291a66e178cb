"""Datasets, experiments and families as dynamic partitions that follow the YAML files without a
reload, and staleness that names exactly the experiments whose inputs changed; on a real Dagster
instance and Lance lake of the tiny project (tests.pipeline_fixture), with the sensors evaluated in
process and their events recorded as the daemon records them.

    .venv/bin/pytest -q tests/app/test_dynamic_partitions.py
"""

from __future__ import annotations

import dagster as dg
import pytest
import yaml
from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._time import get_current_datetime

from fusion.encoders import add_encoder, load_registry
from pipelines.partitions import apply_partition_requests, sync_partitions
from tests.pipeline_fixture import make_project

QUIET_INGEST = {"ops": {"ingest": {"config": {"progress": False}}}}
QUIET_EXTRACT = {"ops": {"latents": {"config": {"progress": False}}}}


@pytest.fixture(scope="module", autouse=True)
def home(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("FUSEMIX_HOME", str(tmp_path_factory.mktemp("home")))
    yield
    mp.undo()


@pytest.fixture
def instance(tmp_path):
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as inst:
        yield inst


def edit_yaml(path, edit) -> None:
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data))


def registry_tick(defs, project, instance, cursor=None) -> dg.SensorResult:
    res = project.resources()
    ctx = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"lake": res["lake"], "encoders": res["encoders"]}
    )
    return defs.resolve_sensor_def("registry_sensor")(ctx)


def changes(result) -> set[tuple[str, str, str]]:
    """(add|delete, dimension, key) of each partition change a tick asks for."""
    return {
        ("add" if isinstance(req, dg.AddDynamicPartitionsRequest) else "delete", req.partitions_def_name, k)
        for req in result.dynamic_partitions_requests
        for k in req.partition_keys
    }


def run(defs, instance, job: str, key, **kw) -> dg.ExecuteInProcessResult:
    result = defs.resolve_job_def(job).execute_in_process(partition_key=key, instance=instance, **kw)
    assert result.success, job
    return result


def test_datasets_and_experiments_added_to_the_yaml_become_partitions_without_a_reload(tmp_path, instance):
    from app.definitions import build_defs

    project = make_project(tmp_path)
    defs, parts = build_defs(project.configs, resources=project.resources())
    first = registry_tick(defs, project, instance)
    apply_partition_requests(instance, first.dynamic_partitions_requests)
    assert instance.get_dynamic_partitions("dataset") == ["shapes"]
    assert registry_tick(defs, project, instance, first.cursor).dynamic_partitions_requests == []

    # A new dataset (the same pictures under another name) and an experiment of a new family on it.
    edit_yaml(
        project.configs / "datasets.yaml",
        lambda d: d["datasets"].__setitem__("shapes-copy", dict(d["datasets"]["shapes"])),
    )

    def add_experiment(d):
        new = {**d["experiments"]["shapes-fusemix"], "dataset": "shapes-copy", "family": "copies"}
        d["experiments"]["copy-fusemix"] = new
        del d["experiments"]["shapes-n12"]  # and one removed

    edit_yaml(project.configs / "experiments.yaml", add_experiment)
    tick = registry_tick(defs, project, instance, first.cursor)
    assert changes(tick) == {
        ("add", "dataset", "shapes-copy"),
        ("add", "experiment", "copy-fusemix"),
        ("add", "family", "copies"),
        ("delete", "experiment", "shapes-n12"),
        ("delete", "family", "quantity"),
    }
    apply_partition_requests(instance, tick.dynamic_partitions_requests)
    assert sorted(instance.get_dynamic_partitions("experiment")) == ["copy-fusemix", "shapes-fusemix"]

    # The same Definitions (no reload) ingest, extract and run the new partitions.
    run(defs, instance, "ingest_job", "shapes-copy", run_config=QUIET_INGEST)
    for enc in ("tiny-image", "tiny-text"):
        run(defs, instance, "extract_job", parts.extract_key("shapes-copy", enc), run_config=QUIET_EXTRACT)
    result = run(defs, instance, "experiment_job", "copy-fusemix")
    (metrics,) = result.asset_materializations_for_node("retrieval_metrics")
    assert metrics.partition == "copy-fusemix"
    assert 0.0 <= metrics.metadata["t2i_recall_at_1"].value <= 1.0
    # A removed experiment's partition is gone, and a run of it would fail with a clear message.
    with pytest.raises(dg.DagsterUnknownPartitionError, match="shapes-n12"):
        run(defs, instance, "experiment_job", "shapes-n12")


def test_experiment_runs_of_an_entry_removed_meanwhile_fail_with_its_name(tmp_path, instance):
    from app.definitions import build_defs

    project = make_project(tmp_path)
    defs, parts = build_defs(project.configs, resources=project.resources())
    sync_partitions(parts, instance)
    edit_yaml(project.configs / "experiments.yaml", lambda d: d["experiments"].pop("shapes-n12"))
    result = defs.resolve_job_def("experiment_job").execute_in_process(
        partition_key="shapes-n12", instance=instance, raise_on_error=False
    )
    assert not result.success
    failure = next(ev for ev in result.all_events if ev.is_step_failure)
    assert "'shapes-n12' is no longer in" in failure.event_specific_data.user_failure_data.description


def stale_status(defs, instance, asset: str, partition: str) -> StaleStatus:
    """What the UI shows for one partition (the resolver the webserver uses)."""
    graph = defs.resolve_asset_graph()
    view = AssetGraphView(
        temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
        instance=instance,
        asset_graph=graph,
    )
    resolver = CachingStaleStatusResolver(instance=instance, asset_graph=graph, loading_context=view)
    return resolver.get_status(dg.AssetKey(asset), partition)


def test_editing_an_encoder_marks_exactly_the_experiments_that_use_it_stale(tmp_path, instance):
    from app.definitions import build_defs

    project = make_project(tmp_path)
    registry = project.configs / "encoders.yaml"
    add_encoder(registry, "tiny-text-2", **load_registry(registry)["tiny-text"].to_dict())
    edit_yaml(
        project.configs / "experiments.yaml",
        lambda d: d["experiments"].__setitem__(
            "shapes-t2", {**d["experiments"]["shapes-fusemix"], "text_encoder": "tiny-text-2"}
        ),
    )
    defs, parts = build_defs(project.configs, resources=project.resources())
    sync_partitions(parts, instance)
    res = project.resources()
    sensor = defs.resolve_sensor_def("experiment_sensor")
    cursor = None

    def sensor_tick():
        """One tick of the experiment sensor, its observations recorded as the daemon records them."""
        nonlocal cursor
        ctx = dg.build_sensor_context(
            instance=instance,
            cursor=cursor,
            resources={"lake": res["lake"], "encoders": res["encoders"], "paths": res["paths"]},
        )
        result = sensor(ctx)
        for event in result.asset_events:
            instance.report_runless_asset_event(event)
        cursor = result.cursor
        return sorted(ev.partition for ev in result.asset_events)

    run(defs, instance, "ingest_job", "shapes", run_config=QUIET_INGEST)
    for enc in ("tiny-image", "tiny-text", "tiny-text-2"):
        run(defs, instance, "extract_job", parts.extract_key("shapes", enc), run_config=QUIET_EXTRACT)
    experiments = ("shapes-fusemix", "shapes-t2")
    for exp in experiments:
        run(defs, instance, "experiment_job", exp)
    # The runs recorded their inputs' state: the tick records only the experiment that never ran.
    assert sensor_tick() == ["shapes-n12"]
    assert sensor_tick() == []  # unchanged: nothing recorded again
    for exp in experiments:
        for asset in ("curated", "adapters", "retrieval_metrics"):
            assert stale_status(defs, instance, asset, exp) == StaleStatus.FRESH, (asset, exp)

    # Edit tiny-text-2's settings: its fingerprint changes, so exactly shapes-t2's inputs do.
    edit_yaml(registry, lambda d: d["encoders"]["tiny-text-2"].__setitem__("pooling", "cls"))
    assert sensor_tick() == ["shapes-t2"]
    assert stale_status(defs, instance, "curated", "shapes-t2") == StaleStatus.STALE
    assert stale_status(defs, instance, "curated", "shapes-fusemix") == StaleStatus.FRESH
    # The re-extraction the registry sensor asks for, then the experiment: fresh again.
    run(defs, instance, "extract_job", parts.extract_key("shapes", "tiny-text-2"), run_config=QUIET_EXTRACT)
    assert sensor_tick() == ["shapes-t2"]  # new latents: a new state again
    assert stale_status(defs, instance, "curated", "shapes-t2") == StaleStatus.STALE
    run(defs, instance, "experiment_job", "shapes-t2")
    assert stale_status(defs, instance, "curated", "shapes-t2") == StaleStatus.FRESH
    assert sensor_tick() == []  # the run recorded the state the sensor sees
    assert stale_status(defs, instance, "curated", "shapes-fusemix") == StaleStatus.FRESH


def test_fusemix_ui_brings_the_partitions_in_step_before_it_starts(tmp_path, monkeypatch, capsys):
    from app.cli import _sync_partitions

    project = make_project(tmp_path)
    monkeypatch.setenv("FUSEMIX_CONFIGS", str(project.configs))
    home = tmp_path / "dagster-home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    _sync_partitions(home)
    out = capsys.readouterr().out
    assert "dataset partitions added: shapes" in out
    assert "experiment partitions added: shapes-fusemix, shapes-n12" in out
    with dg.DagsterInstance.from_config(str(home)) as inst:
        assert inst.get_dynamic_partitions("family") == ["demo", "quantity"]
    # A registry that does not load: one line on stderr, the partitions as they were, no traceback.
    (project.configs / "experiments.yaml").write_text("experiments: {broken: {dataset: nowhere}}\n")
    _sync_partitions(home)
    captured = capsys.readouterr()
    assert "partitions not brought in step with configs/" in captured.err
    assert "Traceback" not in captured.err
    with dg.DagsterInstance.from_config(str(home)) as inst:
        assert inst.get_dynamic_partitions("dataset") == ["shapes"]
