"""The encoder sensor and the latent refresh schedule, evaluated on a real Dagster instance and a real
Lance lake of the tiny project (tests.pipeline_fixture).

    .venv/bin/pytest -q tests/app/test_sensor.py

The project gets a second dataset, `sounds` (audio), beside the ingested image dataset `shapes`:
`sounds` is declared but not ingested until a test creates its media table.
"""

from __future__ import annotations

from datetime import UTC, datetime

import dagster as dg
import pytest
import yaml

from fusion.encoders import add_encoder, load_registry
from pipelines import schemas
from pipelines.partitions import ENCODER_PARTITIONS
from tests.pipeline_fixture import make_project

REGISTRY = ["tiny-audio", "tiny-image", "tiny-text"]


@pytest.fixture(scope="module", autouse=True)
def home(tmp_path_factory):
    """FUSEMIX_HOME in a temporary folder before app.definitions is first imported: building
    its default Definitions creates the MLflow folder under the home."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FUSEMIX_HOME", str(tmp_path_factory.mktemp("home")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    """The tiny project with `shapes` ingested (by ingest_job) and `sounds` declared only."""
    from app.definitions import build_defs

    tmp = tmp_path_factory.mktemp("sensor")
    project = make_project(tmp)
    datasets = yaml.safe_load((project.configs / "datasets.yaml").read_text())
    (tmp / "sounds").mkdir()
    datasets["datasets"]["sounds"] = {"modality": "audio", "reader": "manifest", "root": str(tmp / "sounds")}
    (project.configs / "datasets.yaml").write_text(yaml.safe_dump(datasets))
    (tmp / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp / "dagster")) as instance:
        defs, parts = build_defs(project.configs, resources=project.resources())
        result = defs.resolve_job_def("ingest_job").execute_in_process(
            partition_key="shapes",
            instance=instance,
            run_config={"ops": {"ingest": {"config": {"progress": False}}}},
        )
        assert result.success
    return project, defs, parts


@pytest.fixture
def instance(tmp_path):
    """A fresh instance per test: no encoder partition known yet."""
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as inst:
        yield inst


@pytest.fixture
def registry_copy(ingested):
    """Restores encoders.yaml after a test that edits it."""
    project = ingested[0]
    path = project.configs / "encoders.yaml"
    before = path.read_text()
    yield path
    path.write_text(before)


def tick(defs, project, instance):
    sensor = defs.resolve_sensor_def("new_encoder_sensor")
    ctx = dg.build_sensor_context(instance=instance, resources={"lake": project.resources()["lake"]})
    return sensor(ctx)


def requested(result) -> list[tuple[str, str, str]]:
    """(dataset, encoder, run key) of each run request, sorted."""
    out = []
    for r in result.run_requests:
        assert r.job_name == "extract_job"
        assert isinstance(r.partition_key, dg.MultiPartitionKey)
        keys = r.partition_key.keys_by_dimension
        out.append((keys["dataset"], keys["encoder"], r.run_key))
    return sorted(out)


def added(result) -> list[str]:
    return sorted(k for req in result.dynamic_partitions_requests for k in req.partition_keys)


def test_fresh_instance_adds_every_encoder_and_extracts_only_what_applies(ingested, instance):
    project, defs, _ = ingested
    result = tick(defs, project, instance)
    assert isinstance(result, dg.SensorResult)
    assert added(result) == REGISTRY
    assert all(req.partitions_def_name == ENCODER_PARTITIONS for req in result.dynamic_partitions_requests)
    # shapes is an image dataset: the image and text encoders apply, the audio one does not;
    # sounds is declared but not ingested, so nothing is requested for it.
    assert requested(result) == [
        ("shapes", "tiny-image", "extract:shapes:tiny-image"),
        ("shapes", "tiny-text", "extract:shapes:tiny-text"),
    ]


def test_known_encoders_are_not_added_again_and_run_keys_are_stable(ingested, instance):
    project, defs, _ = ingested
    first = tick(defs, project, instance)
    instance.add_dynamic_partitions(ENCODER_PARTITIONS, added(first))
    second = tick(defs, project, instance)
    assert added(second) == []
    # The same run keys every tick: Dagster launches each (dataset, encoder) extraction once.
    assert requested(second) == requested(first)


def test_added_encoder_becomes_exactly_one_partition_with_its_run(ingested, instance, registry_copy):
    project, defs, _ = ingested
    instance.add_dynamic_partitions(ENCODER_PARTITIONS, REGISTRY)
    before = requested(tick(defs, project, instance))
    text = load_registry(registry_copy)["tiny-text"].to_dict()
    text.pop("name", None)
    add_encoder(registry_copy, "tiny-text-2", **text)
    result = tick(defs, project, instance)
    assert added(result) == ["tiny-text-2"]
    new = [r for r in requested(result) if r not in before]
    assert new == [("shapes", "tiny-text-2", "extract:shapes:tiny-text-2")]


def test_dataset_ingested_later_gets_its_extractions(ingested, instance):
    project, defs, _ = ingested
    instance.add_dynamic_partitions(ENCODER_PARTITIONS, REGISTRY)
    lake = project.resources()["lake"].lake()
    before = requested(tick(defs, project, instance))
    assert not [r for r in before if r[0] == "sounds"]
    # The sensor only asks whether the media table exists; an empty one stands for an ingestion.
    lake.append("media__sounds", schemas.MEDIA.empty_table())
    try:
        result = tick(defs, project, instance)
    finally:
        import shutil

        shutil.rmtree(lake.uri("media__sounds"))
    assert added(result) == []
    new = [r for r in requested(result) if r not in before]
    assert new == [
        ("sounds", "tiny-audio", "extract:sounds:tiny-audio"),
        ("sounds", "tiny-text", "extract:sounds:tiny-text"),
    ]


def test_sensor_skips_when_nothing_is_new_or_ingested(tmp_path, instance):
    from app.definitions import build_defs

    project = make_project(tmp_path)
    defs, _ = build_defs(project.configs, resources=project.resources())
    instance.add_dynamic_partitions(ENCODER_PARTITIONS, REGISTRY)
    result = tick(defs, project, instance)
    assert isinstance(result, dg.SkipReason)


def test_schedule_requests_one_run_per_applicable_partition(ingested, instance):
    project, defs, parts = ingested
    instance.add_dynamic_partitions(ENCODER_PARTITIONS, REGISTRY)
    schedule = defs.resolve_schedule_def("refresh_latents_schedule")
    when = datetime(2026, 1, 2, 3, 0, tzinfo=UTC)
    ctx = dg.build_schedule_context(
        instance=instance, scheduled_execution_time=when, resources={"lake": project.resources()["lake"]}
    )
    result = schedule(ctx)
    requests = requested(dg.SensorResult(run_requests=list(result)))
    specs = parts.encoders()
    expected = sorted(
        (d, e, f"refresh-202601020300:{d}:{e}")
        for d in ("shapes",)  # the only ingested dataset
        for e in REGISTRY
        if parts.applies(d, specs[e])
    )
    assert requests == expected
    assert len(requests) == 2
