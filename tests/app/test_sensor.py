"""The encoder sensor and the latent refresh schedule, evaluated on a real Dagster instance and a real
Lance lake of the tiny project (tests.pipeline_fixture).

    .venv/bin/pytest -q tests/app/test_sensor.py

The project gets a second dataset, `sounds` (audio), beside the ingested image dataset `shapes`:
`sounds` is declared but not ingested until a test creates its media table.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pytest
import yaml
from PIL import Image

from fusion.data.canonical import content_id
from fusion.encoders import add_encoder, load_registry
from pipelines import schemas
from pipelines.partitions import ENCODER_PARTITIONS, apply_partition_requests, sync_partitions
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
        sync_partitions(parts, instance)
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


def tick(defs, project, instance, cursor: str | None = None):
    sensor = defs.resolve_sensor_def("registry_sensor")
    res = project.resources()
    ctx = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"lake": res["lake"], "encoders": res["encoders"]}
    )
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


def added(result, dim: str = ENCODER_PARTITIONS) -> list[str]:
    """The partition keys the tick adds to one dimension."""
    return sorted(
        k
        for req in result.dynamic_partitions_requests
        if isinstance(req, dg.AddDynamicPartitionsRequest) and req.partitions_def_name == dim
        for k in req.partition_keys
    )


def removed(result, dim: str) -> list[str]:
    return sorted(
        k
        for req in result.dynamic_partitions_requests
        if isinstance(req, dg.DeleteDynamicPartitionsRequest) and req.partitions_def_name == dim
        for k in req.partition_keys
    )


def ingest_and_extract(defs, parts, instance, between=lambda: True) -> None:
    """Ingests `shapes` and extracts it with tiny-image and tiny-text; `between()` must hold after
    the ingest."""
    sync_partitions(parts, instance)
    quiet = {"ops": {"ingest": {"config": {"progress": False}}}}
    job = defs.resolve_job_def("ingest_job")
    assert job.execute_in_process(partition_key="shapes", instance=instance, run_config=quiet).success
    assert between()
    for enc in ("tiny-image", "tiny-text"):
        key = parts.extract_key("shapes", enc)
        assert (
            defs.resolve_job_def("extract_job")
            .execute_in_process(partition_key=key, instance=instance)
            .success
        )


def fingerprint(project, name: str) -> str:
    return project.resources()["encoders"].ref(name).fingerprint


def keys(project, *pairs: tuple[str, str]) -> list[tuple[str, str, str]]:
    return sorted((d, e, f"extract:{d}:{e}:{fingerprint(project, e)}") for d, e in pairs)


def test_first_tick_adds_every_encoder_but_extracts_only_what_experiments_use(ingested, instance):
    project, defs, _ = ingested
    result = tick(defs, project, instance)
    assert isinstance(result, dg.SensorResult)
    assert added(result) == REGISTRY
    assert added(result, "dataset") == ["shapes", "sounds"]
    assert added(result, "experiment") == ["shapes-fusemix", "shapes-n12"]
    assert added(result, "family") == ["demo", "quantity"]
    # The experiments use tiny-image x tiny-text on shapes; tiny-audio is in the registry but no
    # experiment uses it and it was there from the start: not extracted by itself.
    assert requested(result) == keys(project, ("shapes", "tiny-image"), ("shapes", "tiny-text"))


def test_known_encoders_are_not_added_again_and_run_keys_are_stable(ingested, instance):
    project, defs, _ = ingested
    first = tick(defs, project, instance)
    apply_partition_requests(instance, first.dynamic_partitions_requests)
    second = tick(defs, project, instance, first.cursor)
    assert added(second) == []
    # The same run keys every tick: Dagster launches each (dataset, encoder, fingerprint) once.
    assert requested(second) == requested(first)


def test_an_added_encoder_is_extracted_for_the_datasets_it_applies_to(ingested, instance, registry_copy):
    project, defs, _ = ingested
    first = tick(defs, project, instance)
    apply_partition_requests(instance, first.dynamic_partitions_requests)
    text = load_registry(registry_copy)["tiny-text"].to_dict()
    add_encoder(registry_copy, "tiny-text-2", **text)
    result = tick(defs, project, instance, first.cursor)
    assert added(result) == ["tiny-text-2"]
    new = [r for r in requested(result) if r not in requested(first)]
    # sounds is declared but not ingested: only shapes.
    assert new == keys(project, ("shapes", "tiny-text-2"))


def test_editing_an_encoder_extracts_it_again_under_a_new_run_key(ingested, instance, registry_copy):
    project, defs, _ = ingested
    first = tick(defs, project, instance)
    apply_partition_requests(instance, first.dynamic_partitions_requests)
    before = fingerprint(project, "tiny-text")
    data = yaml.safe_load(registry_copy.read_text())
    data["encoders"]["tiny-text"]["pooling"] = "cls"
    registry_copy.write_text(yaml.safe_dump(data))
    assert fingerprint(project, "tiny-text") != before
    result = tick(defs, project, instance, first.cursor)
    new = [r for r in requested(result) if r not in requested(first)]
    assert new == keys(project, ("shapes", "tiny-text"))  # only the edited encoder, same datasets


def test_eager_false_never_extracts_and_eager_true_extracts_an_unused_encoder(
    ingested, instance, registry_copy
):
    project, defs, _ = ingested
    lake = project.resources()["lake"].lake()
    data = yaml.safe_load(registry_copy.read_text())
    data["encoders"]["tiny-image"]["eager"] = False
    data["encoders"]["tiny-audio"]["eager"] = True
    registry_copy.write_text(yaml.safe_dump(data))
    # The sensor only asks whether the media table exists; an empty one stands for an ingestion.
    lake.append("media__sounds", schemas.MEDIA.empty_table())
    try:
        result = tick(defs, project, instance)
    finally:
        import shutil

        shutil.rmtree(lake.uri("media__sounds"))
    assert requested(result) == keys(project, ("shapes", "tiny-text"), ("sounds", "tiny-audio"))


def test_sensor_requests_nothing_before_anything_is_ingested(tmp_path, instance):
    from app.definitions import build_defs

    project = make_project(tmp_path)
    defs, _ = build_defs(project.configs, resources=project.resources())
    instance.add_dynamic_partitions(ENCODER_PARTITIONS, REGISTRY)
    result = tick(defs, project, instance)
    assert isinstance(result, dg.SensorResult) and result.run_requests == []


def test_schedule_is_on_and_launches_only_for_new_media(tmp_path, instance):
    """A tick with nothing new launches no run; one with a new image requests exactly that
    partition, whose run encodes exactly the new item."""
    from app.definitions import build_defs

    project = make_project(tmp_path)
    defs, parts = build_defs(project.configs, resources=project.resources())
    schedule = defs.resolve_schedule_def("refresh_latents_schedule")
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    ingest_and_extract(defs, parts, instance)
    res = project.resources()

    def schedule_tick(minute: int):
        when = datetime(2026, 1, 2, 3, minute, tzinfo=UTC)
        ctx = dg.build_schedule_context(
            instance=instance,
            scheduled_execution_time=when,
            resources={"lake": res["lake"], "encoders": res["encoders"]},
        )
        result = schedule(ctx)
        return [] if isinstance(result, dg.SkipReason) else list(result)

    assert schedule_tick(0) == []  # nothing new: no run
    lake = res["lake"].lake()
    media = lake.read("media__shapes", filter="modality = 'image'")
    # A new picture, as an ingest of a new file would add it (content-hash id, path like the others).
    copy = media.slice(0, 1).to_pylist()[0]
    old = Path(copy["path"])
    new_file = (old if old.is_absolute() else project.data / old).with_name("new-picture.png")
    Image.new("RGB", (24, 24), (10, 200, 120)).save(new_file)
    copy["media_id"] = content_id("image", new_file.read_bytes())
    copy["path"] = str(new_file if old.is_absolute() else old.with_name("new-picture.png"))
    copy["size_bytes"] = new_file.stat().st_size
    lake.append("media__shapes", pa.Table.from_pylist([copy], schema=media.schema))
    requests = schedule_tick(1)
    assert requested(dg.SensorResult(run_requests=requests)) == [
        ("shapes", "tiny-image", "refresh-202601020301:shapes:tiny-image")
    ]
    run = defs.resolve_job_def("extract_job").execute_in_process(
        partition_key=requests[0].partition_key, instance=instance
    )
    (mat,) = run.asset_materializations_for_node("latents")
    assert mat.metadata["items_encoded"].value == 1
    assert schedule_tick(2) == []


def test_experiment_sensor_reruns_only_opted_in_experiments_when_their_inputs_change(tmp_path, instance):
    from app.definitions import build_defs

    project = make_project(tmp_path)
    exps = yaml.safe_load((project.configs / "experiments.yaml").read_text())
    exps["experiments"]["shapes-fusemix"]["auto_run"] = True
    (project.configs / "experiments.yaml").write_text(yaml.safe_dump(exps))
    defs, parts = build_defs(project.configs, resources=project.resources())
    sensor = defs.resolve_sensor_def("experiment_sensor")
    res = project.resources()
    lake = res["lake"]
    sync_partitions(parts, instance)

    def keys_now() -> list[tuple[str, str]]:
        ctx = dg.build_sensor_context(
            instance=instance, resources={"lake": lake, "encoders": res["encoders"], "paths": res["paths"]}
        )
        return sorted((r.partition_key, r.run_key) for r in sensor(ctx).run_requests)

    assert keys_now() == []  # nothing ingested or extracted yet
    ingest_and_extract(defs, parts, instance, between=lambda: keys_now() == [])  # no latents yet
    first = keys_now()
    assert [k for k, _ in first] == ["shapes-fusemix"]  # shapes-n12 did not opt in
    assert keys_now() == first  # nothing changed: the same run key, launched once
    # New latents (a re-extraction, a new item): a new version of a table it reads, a new run.
    table = lake.lake().read("latents__shapes__tiny-image")
    lake.lake().overwrite("latents__shapes__tiny-image", table)
    second = keys_now()
    assert [k for k, _ in second] == ["shapes-fusemix"] and second != first
