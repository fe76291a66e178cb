"""Extraction on Ray (pipelines.ray_extract) against the in-process engine, on a real local Ray with
2 workers, real Lance tables and the tiny project's encoders: the same ids and latents, a worker
killed mid-job and retried by Ray, and a job that fails leaving the table as it was.
"""

from __future__ import annotations

import contextlib
import os
import signal

import numpy as np
import pytest

from fusion.data.readers import read_dataset
from fusion.encoders import build_encoder, load_registry
from pipelines.extract import run_extraction
from pipelines.ingest import write_dataset
from pipelines.lake import Lake
from tests.pipeline_fixture import make_project

ray = pytest.importorskip("ray")

from pipelines.ray_extract import run_extraction_ray  # noqa: E402

LAT = "latents__shapes__tiny-image"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray")
    project = make_project(tmp)
    dataset = read_dataset(
        "manifest", str(project.data), name="shapes", modality="image", progress=False, license="CC0-1.0"
    )
    specs = load_registry(project.configs / "encoders.yaml")
    reference = Lake(tmp / "reference")
    write_dataset(reference, "shapes", dataset)
    run_extraction(
        reference, "shapes", build_encoder(specs["tiny-image"]), roots=[project.data], progress=False
    )
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        yield project, dataset, specs, reference, tmp
    finally:
        ray.shutdown()


def _fresh_lake(setup, name: str) -> Lake:
    _, dataset, _, _, tmp = setup
    lake = Lake(tmp / name)
    write_dataset(lake, "shapes", dataset)
    return lake


def _on_ray(setup, lake: Lake, **job) -> dict:
    """The tiny image encoder's extraction of `shapes` on the module's local Ray, 2 workers unless said."""
    project, _, specs, _, _ = setup
    return run_extraction_ray(
        lake, "shapes", specs["tiny-image"], roots=[project.data], **{"workers": 2, **job}
    )


def _latents(lake: Lake) -> dict[str, np.ndarray]:
    rows = lake.read(LAT, ["media_id", "vector"])
    ids = rows["media_id"].to_pylist()
    assert len(ids) == len(set(ids)), "a media id has two latent rows"
    vectors = np.stack([np.asarray(v, dtype=np.float32) for v in rows["vector"].to_pylist()])
    return dict(zip(ids, vectors, strict=True))


def _assert_same_latents(lake: Lake, reference: Lake) -> None:
    got, want = _latents(lake), _latents(reference)
    assert set(got) == set(want)
    for mid, v in want.items():
        w = got[mid]
        cosine = float(v @ w / (np.linalg.norm(v) * np.linalg.norm(w)))
        assert cosine >= 0.9999, (mid, cosine)


def test_two_ray_workers_give_the_ids_and_latents_of_the_in_process_engine(setup):
    project, _, specs, reference, _ = setup
    lake = _fresh_lake(setup, "two-workers")
    shards = []
    stats = _on_ray(setup, lake, shard_size=8, on_shard=shards.append)
    assert stats["encoded"] == project.n_media == lake.count(LAT)
    assert stats["commits"] == 1 and stats["shards"] == len(shards) == -(-project.n_media // 8)
    assert len(set(shards[-1]["worker_pids"])) == 2  # two actors in two processes
    assert os.getpid() not in shards[-1]["worker_pids"]
    _assert_same_latents(lake, reference)
    # The fingerprint is the in-process encoder's, and a rerun has nothing left to do.
    assert set(lake.read(LAT, ["fingerprint"])["fingerprint"].to_pylist()) == set(
        reference.read(LAT, ["fingerprint"])["fingerprint"].to_pylist()
    )
    again = _on_ray(setup, lake)
    assert (again["encoded"], again["pending"], again["shards"]) == (0, 0, 0)


def test_a_worker_killed_mid_job_is_retried_without_duplicates_or_gaps(setup):
    project, _, specs, reference, _ = setup
    lake = _fresh_lake(setup, "killed")
    killed = []

    def kill_one(progress: dict) -> None:
        if not killed:
            pid = progress["worker_pids"][0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    stats = _on_ray(setup, lake, shard_size=4, on_shard=kill_one)
    assert killed, "the callback never ran"
    assert stats["encoded"] == project.n_media
    _assert_same_latents(lake, reference)  # every id once, none missing


def test_a_job_that_fails_leaves_the_table_as_it_was_and_a_rerun_finishes(setup):
    project, _, specs, reference, _ = setup
    lake = _fresh_lake(setup, "failed")
    run_extraction(lake, "shapes", build_encoder(specs["tiny-image"]), roots=[project.data], progress=False)
    victims = sorted(lake.ids(LAT))[:10]
    lake.delete(LAT, "media_id IN (" + ", ".join(f"'{v}'" for v in victims) + ")")
    before = (lake.version(LAT), lake.count(LAT))

    def kill_every_worker(progress: dict) -> None:
        for pid in progress["worker_pids"]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    with pytest.raises(ray.exceptions.RayError):
        _on_ray(
            setup,
            lake,
            shard_size=2,
            max_retries=0,  # no restarts: the job fails
            on_shard=kill_every_worker,
        )
    assert (lake.version(LAT), lake.count(LAT)) == before  # nothing committed
    stats = _on_ray(setup, lake)
    assert stats["encoded"] == len(victims)
    _assert_same_latents(lake, reference)


def test_the_extract_asset_runs_on_ray_when_configured(setup, tmp_path, monkeypatch):
    import dagster as dg

    from app.definitions import build_defs
    from pipelines.partitions import sync_partitions

    project, _, _, reference, _ = setup
    monkeypatch.setenv("FUSEMIX_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(project, "lake_root", str(tmp_path / "lake"))
    defs, parts = build_defs(project.configs, resources=project.resources())
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        sync_partitions(parts, instance)
        quiet = {"ops": {"ingest": {"config": {"progress": False}}}}
        assert (
            defs.resolve_job_def("ingest_job")
            .execute_in_process(partition_key="shapes", instance=instance, run_config=quiet)
            .success
        )
        on_ray = {"ops": {"latents": {"config": {"engine": "ray", "ray_workers": 2}}}}
        result = defs.resolve_job_def("extract_job").execute_in_process(
            partition_key=parts.extract_key("shapes", "tiny-image"), instance=instance, run_config=on_ray
        )
    assert result.success
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    assert meta["engine"].value == "ray" and meta["items_encoded"].value == project.n_media
    _assert_same_latents(Lake(tmp_path / "lake"), reference)
