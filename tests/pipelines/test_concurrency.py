"""Overlapping writers of one partition (issue 12), on real Lance tables and a real Dagster instance in
a temporary folder.

Two spawned processes, released together at a barrier, ingest one dataset, extract one (dataset,
encoder) partition, or materialise the Dagster jobs of both, round after round; each round must leave
one row per item in media, pairs and latents, exactly the rows one writer alone writes, and both
writers must succeed (also when both create a table). Also, in one process: the lake redoes a write
that lost a commit race and gives up with Lance's error after its retries, writes into a table that
another writer created meanwhile, keeps the quarantine rows extraction commits while ingest replaces
its own, removes duplicate rows an older version left (the next extraction does), and
`latents_ready`'s contract fails on them. Dagster: a limited pool holds a materialisation until its
slot is free, and the recommended instance config queues a second run of one partition.

    .venv/bin/pytest -q tests/pipelines/test_concurrency.py
    .venv/bin/pytest -q -m slow tests/pipelines/test_concurrency.py
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from pathlib import Path

import dagster as dg
import lance
import pyarrow as pa
import pytest

from fusion.data import QuarantineRow
from pipelines.curate import curate, latents_contract
from pipelines.extract import run_extraction
from pipelines.ingest import load_dataset, quarantine_table, write_dataset
from pipelines.lake import Lake, is_commit_conflict, sql_in
from pipelines.registries import load_datasets, load_experiments
from pipelines.resources import DuckDBCatalog, EncoderBank, LanceLake
from pipelines.schemas import table_name
from tests.pipeline_fixture import Project, make_project

DATASET = "shapes"
ENCODER = "tiny-image"
MEDIA, PAIRS, QUARANTINE = (table_name(k, DATASET) for k in ("media", "pairs", "quarantine"))
LATENTS = table_name("latents", DATASET, ENCODER)
ROUNDS = 5
QUIET_INGEST = {"ops": {"ingest": {"config": {"progress": False}}}}
QUIET_EXTRACT = {"ops": {"latents": {"config": {"progress": False, "commit_every": 4}}}}
QUIET_LOGS = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


# --- the two racing processes -------------------------------------------------------------------
# Each task is prepared (data read, encoder or Definitions built) before the barrier, so that what
# the two processes do at the same time is the write itself.


def _ingest(project: Project, root: str):
    spec = load_datasets(project.configs / "datasets.yaml")[DATASET]
    ds = load_dataset(spec, project.home / "cache", progress=False)
    return lambda: write_dataset(Lake(root), DATASET, ds)["new_media"]


def _extract(project: Project, root: str, encoder: str):
    enc = EncoderBank(registry_path=str(project.configs / "encoders.yaml")).get(encoder)
    return lambda: run_extraction(Lake(root), DATASET, enc, commit_every=4, progress=False)["encoded"]


_DEFS: dict[tuple[str, str], dg.Definitions] = {}


def _materialize(project: Project, root: str, instance_dir: str, job: str, partition, run_config: dict):
    key = (str(project.configs), root)
    if key not in _DEFS:
        from app.definitions import build_defs

        lake = LanceLake(root=root)
        resources = {**project.resources(), "lake": lake, "catalog": DuckDBCatalog(lake=lake)}
        _DEFS[key] = build_defs(project.configs, resources=resources)[0]
    job_def = _DEFS[key].resolve_job_def(job)
    partition_key = partition if isinstance(partition, str) else dg.MultiPartitionKey(partition)

    def run():
        with dg.DagsterInstance.from_config(instance_dir) as instance:
            result = job_def.execute_in_process(
                partition_key=partition_key,
                instance=instance,
                raise_on_error=False,
                run_config={**run_config, **QUIET_LOGS},
            )
            errors = [
                ev.event_specific_data.error.message
                for ev in result.all_events
                if ev.is_step_failure and ev.event_specific_data is not None
            ]
            return result.success, _step_window(instance, result.run_id, WRITER_STEP[job]), errors

    return run


# The step of each job that writes the lake (and runs in a pool); an ingest run also checks the
# quarantine rate afterwards, in a step outside the pool.
WRITER_STEP = {"ingest_job": "ingest", "extract_job": "latents"}


def _step_window(instance: dg.DagsterInstance, run_id: str, step: str) -> tuple[float, float]:
    """When the run's `step` started and ended."""
    logs = [
        e
        for e in instance.all_logs(
            run_id,
            of_type={
                dg.DagsterEventType.STEP_START,
                dg.DagsterEventType.STEP_SUCCESS,
                dg.DagsterEventType.STEP_FAILURE,
            },
        )
        if e.step_key == step
    ]
    start = [e.timestamp for e in logs if e.dagster_event.event_type == dg.DagsterEventType.STEP_START]
    end = [e.timestamp for e in logs if e.dagster_event.event_type != dg.DagsterEventType.STEP_START]
    return start[0], end[-1]


TASKS = {"ingest": _ingest, "extract": _extract, "materialize": _materialize}


def _racer(index: int, barrier, tasks, results) -> None:
    while (task := tasks.get()) is not None:
        name, args, together = task
        try:
            go = TASKS[name](*args)
            if together:
                barrier.wait(timeout=120)
            results.put((index, "ok", go()))
        except BaseException:  # reported to the test, which fails on it
            results.put((index, "error", traceback.format_exc()))


class Racers:
    """Two processes that run the same task, started together."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")  # Lance's runtime does not survive a fork
        self.barrier = ctx.Barrier(2)
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue(), ctx.Queue()]
        self.procs = [
            ctx.Process(target=_racer, args=(i, self.barrier, q, self.results), daemon=True)
            for i, q in enumerate(self.tasks)
        ]
        for p in self.procs:
            p.start()

    def race(self, name: str, *args, timeout: float = 300) -> list:
        """Both processes run task `name`; returns their results, failing the test on an error."""
        for q in self.tasks:
            q.put((name, args, True))
        return self.collect(len(self.tasks), timeout)

    def start(self, name: str, *args) -> None:
        """The first process alone starts task `name`; `collect(1)` waits for its result."""
        self.tasks[0].put((name, args, False))

    def collect(self, n: int, timeout: float = 300) -> list:
        out = sorted(self.results.get(timeout=timeout) for _ in range(n))
        errors = [detail for _, status, detail in out if status != "ok"]
        assert not errors, "\n".join(errors)
        return [value for _, _, value in out]

    def close(self) -> None:
        for q in self.tasks:
            q.put(None)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    return make_project(tmp_path_factory.mktemp("concurrency"))


@pytest.fixture(scope="module")
def dataset(project):
    spec = load_datasets(project.configs / "datasets.yaml")[DATASET]
    return load_dataset(spec, project.home / "cache", progress=False)


@pytest.fixture(scope="module")
def encoders(project) -> EncoderBank:
    return EncoderBank(registry_path=str(project.configs / "encoders.yaml"))


@pytest.fixture(scope="module")
def reference(project, dataset, encoders) -> dict:
    """The rows one writer alone writes: ingestion, then extraction."""
    lake = Lake(project.root / "reference")
    write_dataset(lake, DATASET, dataset)
    run_extraction(lake, DATASET, encoders.get(ENCODER), progress=False)
    return _contents(lake)


@pytest.fixture(scope="module")
def racers(project):
    saved = {k: os.environ.get(k) for k in ("FUSEMIX_HOME", "FUSEMIX_TORCH_THREADS")}
    os.environ["FUSEMIX_HOME"] = str(project.home)  # inherited by the spawned processes
    os.environ["FUSEMIX_TORCH_THREADS"] = "1"  # the machine is shared; the tiny encoders need one
    r = Racers()
    try:
        yield r
    finally:
        r.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _contents(lake: Lake) -> dict:
    """Each table's key column in sorted order (repeats kept), and the quarantine rows."""
    quarantine = lake.read(QUARANTINE, ["stage", "item", "reason"]).to_pylist()
    return {
        "media": sorted(lake.read(MEDIA, ["media_id"])["media_id"].to_pylist()),
        "pairs": sorted(lake.read(PAIRS, ["pair_id"])["pair_id"].to_pylist()),
        "latents": sorted(lake.read(LATENTS, ["media_id"])["media_id"].to_pylist())
        if lake.exists(LATENTS)
        else [],
        "quarantine": sorted(tuple(r.values()) for r in quarantine),
    }


def _assert_one_row_per_item(lake: Lake, reference: dict, tables=("media", "pairs", "quarantine")):
    got = _contents(lake)
    for t in tables:
        assert len(got[t]) == len(set(got[t])), f"{t}: {len(got[t]) - len(set(got[t]))} duplicate rows"
        assert got[t] == reference[t], t


def _forget(lake: Lake, n: int = 6) -> list[str]:
    """Deletes `n` image rows and their latents, as if those items were new to the dataset."""
    ids = sorted(lake.ids(MEDIA, filter="modality = 'image'"))[:n]
    lake.delete(MEDIA, sql_in("media_id", ids))
    lake.delete(LATENTS, sql_in("media_id", ids))
    return ids


def _glue_round(racers: Racers, project: Project, root: Path, reference: dict, again: bool = True) -> None:
    """Two first ingests, two extractions, then (`again`) both again with six items new to the lake."""
    lake = Lake(root)
    assert racers.race("ingest", project, str(root)) == [len(reference["media"])] * 2
    _assert_one_row_per_item(lake, reference)
    racers.race("extract", project, str(root), ENCODER)
    _assert_one_row_per_item(lake, reference, ("latents",))
    if not again:
        return

    forgotten = _forget(lake)
    assert racers.race("ingest", project, str(root)) == [len(forgotten)] * 2
    _assert_one_row_per_item(lake, reference)
    racers.race("extract", project, str(root), ENCODER)
    _assert_one_row_per_item(lake, reference, ("media", "pairs", "quarantine", "latents"))


# --- the lake alone ------------------------------------------------------------------------------


def _stale_handles(lake: Lake, table: str, monkeypatch, times: int | None) -> None:
    """The next `times` Lake.open calls of `table` (all, with None) return the version the table had
    before another writer overwrote it: the write made on it loses the commit race."""
    old = lake.version(table)
    lance.write_dataset(lake.read(table), lake.uri(table), mode="overwrite")
    real = Lake.open
    left = [times]

    def open_(self, name):
        if name == table and (left[0] is None or left[0] > 0):
            if left[0] is not None:
                left[0] -= 1
            return lance.dataset(self.uri(name), version=old)
        return real(self, name)

    monkeypatch.setattr(Lake, "open", open_)


def test_lake_redoes_a_write_that_lost_a_commit_race(tmp_path, monkeypatch):
    lake = Lake(tmp_path, backoff_s=0.001)
    lake.append("t", pa.table({"k": ["a", "b"], "v": [1, 2]}))

    # What Lance raises for a commit that lost a race: an OSError, recognised as a conflict.
    stale = lake.open("t")
    lance.write_dataset(lake.read("t"), lake.uri("t"), mode="overwrite")
    with pytest.raises(OSError) as err:
        stale.delete("k = 'a'")
    assert is_commit_conflict(err.value)
    assert not is_commit_conflict(OSError("No such file or directory"))

    _stale_handles(lake, "t", monkeypatch, times=1)
    lake.upsert("t", pa.table({"k": ["b", "c"], "v": [20, 3]}), "k")
    assert lake.conflicts == 1
    assert sorted(lake.read("t").to_pylist(), key=lambda r: r["k"]) == [
        {"k": "a", "v": 1},
        {"k": "b", "v": 20},
        {"k": "c", "v": 3},
    ]
    _stale_handles(lake, "t", monkeypatch, times=2)
    lake.delete("t", "k = 'a'")
    assert lake.conflicts == 3
    assert lake.ids("t", "k") == {"b", "c"}


def test_lake_gives_up_after_its_retries_and_does_not_retry_other_errors(tmp_path, monkeypatch):
    lake = Lake(tmp_path, retries=2, backoff_s=0.001)
    lake.append("t", pa.table({"k": ["a"], "v": [1]}))
    with pytest.raises(OSError, match="[Ss]chema"):  # not a conflict: raised at once
        lake.upsert("t", pa.table({"k": [1], "v": ["x"]}), "k")
    assert lake.conflicts == 0

    _stale_handles(lake, "t", monkeypatch, times=None)
    with pytest.raises(OSError) as err:
        lake.upsert("t", pa.table({"k": ["b"], "v": [2]}), "k")
    assert is_commit_conflict(err.value)
    assert lake.conflicts == 2
    monkeypatch.undo()
    assert lake.ids("t", "k") == {"a"}


def test_a_table_another_writer_created_meanwhile_is_written_not_created_again(tmp_path, monkeypatch):
    lake = Lake(tmp_path)
    lake.append("plain", pa.table({"k": ["a"]}))
    lake.overwrite("whole", pa.table({"k": ["a"]}))
    lake.append("keyed", pa.table({"k": ["a"]}), key="k")
    # Every writer now believes it is the first: each finds the table made when it tries to create it.
    monkeypatch.setattr(Lake, "exists", lambda self, table: False)
    lake.append("plain", pa.table({"k": ["b"]}))
    lake.overwrite("whole", pa.table({"k": ["z"]}))
    lake.append("keyed", pa.table({"k": ["a", "c"]}), key="k")
    assert lake.create("keyed", pa.schema([("k", pa.string())])) is False
    monkeypatch.undo()
    assert sorted(lake.read("plain")["k"].to_pylist()) == ["a", "b"]
    assert lake.read("whole")["k"].to_pylist() == ["z"]
    assert sorted(lake.read("keyed")["k"].to_pylist()) == ["a", "c"]


def test_keyed_writes_and_dedupe_keep_one_row_per_key(tmp_path):
    lake = Lake(tmp_path)
    lake.append("t", pa.table({"k": ["a", "b", "a", "c", "a"], "v": [1, 2, 3, 4, 5]}))  # as old runs left it
    assert lake.dedupe("t", "k", filter="k != 'c'") == 2
    assert lake.dedupe("t", "k") == 0
    # The first row of each key is kept (the lowest row id), whichever writer dedupes.
    assert sorted(lake.read("t").to_pylist(), key=lambda r: r["k"]) == [
        {"k": "a", "v": 1},
        {"k": "b", "v": 2},
        {"k": "c", "v": 4},
    ]
    lake.append("t", pa.table({"k": ["a", "d", "d"], "v": [9, 6, 7]}), key="k")  # only new keys, once
    rows = lake.read("t").to_pylist()
    assert len(rows) == 4 and {r["k"]: r["v"] for r in rows} == {"a": 1, "b": 2, "c": 4, "d": 6}
    lake.overwrite("q", pa.table({"stage": ["ingest", "extract:x"], "item": ["i1", "m1"]}))
    lake.overwrite(
        "q", pa.table({"stage": ["ingest", "ingest"], "item": ["i2", "i2"]}), where="stage = 'ingest'"
    )
    assert sorted(lake.read("q")["item"].to_pylist()) == ["i2", "m1"]


def test_extraction_quarantine_committed_while_ingest_writes_survives(tmp_path, dataset, monkeypatch):
    lake = Lake(tmp_path)
    write_dataset(lake, DATASET, dataset)
    failed = quarantine_table(
        DATASET, f"extract:{ENCODER}", [QuarantineRow(ENCODER, "m-bad", "undecodable", "truncated")]
    )
    real_open = Lake.open
    interleaved = []

    def open_then_race(self, table):
        ds = real_open(self, table)
        if table == QUARANTINE and not interleaved:
            # Ingest holds this version of the quarantine table; extraction commits its row now.
            interleaved.append(ds.version)
            Lake(lake.root).append(QUARANTINE, failed, key=["stage", "item"])
        return ds

    monkeypatch.setattr(Lake, "open", open_then_race)
    write_dataset(lake, DATASET, dataset)
    monkeypatch.undo()

    assert interleaved, "ingest never read the quarantine table"
    rows = lake.read(QUARANTINE).to_pylist()
    assert [r["item"] for r in rows if r["stage"] == f"extract:{ENCODER}"] == ["m-bad"]
    ingest_rows = sorted((r["item"], r["reason"]) for r in rows if r["stage"] == "ingest")
    assert ingest_rows == sorted((q.item, q.reason) for q in dataset.quarantine)


def test_duplicate_latents_fail_the_contract_and_the_next_extraction_removes_them(
    tmp_path, project, dataset, encoders
):
    lake = Lake(tmp_path)
    write_dataset(lake, DATASET, dataset)
    exp = load_experiments(project.configs / "experiments.yaml")["shapes-fusemix"]
    for name in (exp.media_encoder, exp.text_encoder):
        run_extraction(lake, DATASET, encoders.get(name), progress=False)
    media, text = encoders.ref(exp.media_encoder), encoders.ref(exp.text_encoder)
    table, _ = curate(lake, exp, media.fingerprint, text.fingerprint)
    lake.overwrite(table_name("curated", exp.name), table)
    problems, checked = latents_contract(lake, exp, media, text)
    assert problems == [] and checked[ENCODER]["duplicates"] == 0

    # What two overlapping extractions of an older version left: a second row for some items.
    lat = table_name("latents", DATASET, exp.media_encoder)
    lance.write_dataset(lake.read(lat).slice(0, 3), lake.uri(lat), mode="append")
    problems, checked = latents_contract(lake, exp, media, text)
    assert checked[ENCODER]["duplicates"] == 3 and checked[ENCODER]["missing"] == 0
    assert problems == [
        f"3 duplicate rows in {lat} (one item, several latents): "
        f"run extract_job for ({DATASET}, {exp.media_encoder}) to remove them"
    ]

    stats = run_extraction(lake, DATASET, encoders.get(exp.media_encoder), progress=False)
    assert (stats["duplicates_deleted"], stats["encoded"], stats["total"]) == (3, 0, project.n_media)
    assert latents_contract(lake, exp, media, text)[0] == []


def test_configure_pools_sets_missing_limits_and_frees_the_slots_of_ended_runs(tmp_path):
    from app.definitions import POOL_LIMITS, configure_pools

    (tmp_path / "dagster.yaml").touch()
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        storage = instance.event_log_storage
        assert configure_pools(instance) == POOL_LIMITS
        pool = next(iter(POOL_LIMITS))
        storage.set_concurrency_slots(pool, 3)  # a limit set by hand stays
        assert configure_pools(instance) == {}
        assert storage.get_concurrency_info(pool).slot_count == 3

        # A run that was killed while it held a slot, then marked failed.
        dead = dg.DagsterRun(job_name="ingest_job", status=dg.DagsterRunStatus.FAILURE)
        live = dg.DagsterRun(job_name="ingest_job", status=dg.DagsterRunStatus.STARTED)
        for run in (dead, live):
            instance.add_run(run)
            assert storage.claim_concurrency_slot(pool, run.run_id, "ingest").is_claimed
        configure_pools(instance)
        assert storage.get_concurrency_run_ids() == {live.run_id}


# --- two processes --------------------------------------------------------------------------------


def test_overlapping_ingests_and_extractions_keep_one_row_per_item(tmp_path, project, reference, racers):
    _glue_round(racers, project, tmp_path / "lake", reference, again=False)


@pytest.mark.slow
def test_overlapping_ingests_and_extractions_keep_one_row_per_item_round_after_round(
    tmp_path, project, reference, racers
):
    for r in range(ROUNDS):
        _glue_round(racers, project, tmp_path / f"lake{r}", reference)


def _dagster_round(racers: Racers, project: Project, root: Path, instance_dir: Path, reference: dict):
    """Two materialisations of the ingest partition at once, then two of the extraction partition;
    returns the writing step's (start, end) in each pair of runs, the earlier start first."""
    windows = []
    for job, partition, config, tables in (
        ("ingest_job", DATASET, QUIET_INGEST, ("media", "pairs", "quarantine")),
        ("extract_job", {"dataset": DATASET, "encoder": ENCODER}, QUIET_EXTRACT, ("latents",)),
    ):
        results = racers.race("materialize", project, str(root), str(instance_dir), job, partition, config)
        for success, _, errors in results:
            assert success, errors
        _assert_one_row_per_item(Lake(root), reference, tables)
        windows.append(sorted(w for _, w, _ in results))
    return windows


@pytest.fixture
def instance_dir(tmp_path) -> Path:
    path = tmp_path / "dagster"
    path.mkdir()
    (path / "dagster.yaml").touch()
    with dg.DagsterInstance.from_config(str(path)) as instance:
        instance.add_dynamic_partitions("dataset", [DATASET])
        instance.add_dynamic_partitions("encoder", [ENCODER])
    return path


@pytest.mark.slow
def test_overlapping_materialisations_of_one_partition_keep_one_row_per_item(
    tmp_path, project, reference, racers, instance_dir
):
    # The default instance: no pool limits, so the runs really overlap and the lake alone keeps the
    # tables right.
    overlapped = 0
    for r in range(ROUNDS):
        for (_, first_end), (second_start, _) in _dagster_round(
            racers, project, tmp_path / f"lake{r}", instance_dir, reference
        ):
            overlapped += second_start < first_end
    assert overlapped, "the runs never overlapped: the test did not race them"


def _blocked_runs(instance: dg.DagsterInstance, pool: str) -> list[str]:
    return [
        run.run_id
        for run in instance.get_runs()
        if any(
            f"blocked by limit for pool {pool}" in (e.user_message or "")
            for e in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
        )
    ]


@pytest.mark.slow
def test_a_limited_pool_holds_a_materialisation_until_its_slot_is_free(
    tmp_path, project, racers, instance_dir
):
    from app.definitions import configure_pools

    root = tmp_path / "lake"
    with dg.DagsterInstance.from_config(str(instance_dir)) as instance:
        assert configure_pools(instance)["fusemix-ingest"] == 1
        storage = instance.event_log_storage
        holder = dg.DagsterRun(job_name="ingest_job", status=dg.DagsterRunStatus.STARTED)
        instance.add_run(holder)
        assert storage.claim_concurrency_slot("fusemix-ingest", holder.run_id, "ingest").is_claimed

        racers.start(
            "materialize", project, str(root), str(instance_dir), "ingest_job", DATASET, QUIET_INGEST
        )
        deadline = time.monotonic() + 120
        while not (blocked := _blocked_runs(instance, "fusemix-ingest")):
            assert time.monotonic() < deadline, "the run never waited for the pool"
            time.sleep(0.5)
        assert not Lake(root).exists(MEDIA)  # waiting, not writing
        (run_id,) = blocked
        assert instance.get_run_by_id(run_id).tags["dagster/partition"] == DATASET
        released = time.time()
        storage.free_concurrency_slots_for_run(holder.run_id)
        ((success, (started, _), errors),) = racers.collect(1)
    assert success, errors
    assert started >= released
    assert Lake(root).count(MEDIA) > 0


def test_the_instance_config_queues_a_second_run_of_one_partition(tmp_path):
    from app.cli import INSTANCE_YAML

    (tmp_path / "dagster.yaml").write_text(INSTANCE_YAML)
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        limits = instance.get_concurrency_config().run_queue_config.tag_concurrency_limits
    assert limits == [{"key": "dagster/partition", "value": {"applyLimitPerUniqueValue": True}, "limit": 1}]
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert instance.telemetry_enabled is False and instance.nux_enabled is False
