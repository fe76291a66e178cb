"""Full and read-only disks (issue 12): one clear line instead of a traceback, a lake that stays
readable, and re-ingestion that writes nothing when nothing changed, on the tiny project.

The faults are injected where the bytes would go: Lance's writes (lance.write_dataset, merge_insert,
delete, add_columns) raise OSError as Lance does on a full or read-only disk (no errno, the system's
words and "(os error N)" in the message) or as Python does (errno set). A read-only folder is made
with `chmod -R a-w` where that stops this process's writes; root writes through it, so there every
write into the folder fails with EROFS instead (Lance's and Python's file creation alike).

    .venv/bin/pytest -q tests/pipelines/test_disks.py
"""

from __future__ import annotations

import builtins
import errno
import io
import logging
import os
import pickle
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import lance
import pyarrow as pa
import pytest

from app import cli
from fusion.encoders import build_encoder, load_registry
from pipelines.catalog import Catalog
from pipelines.curate import write_curated
from pipelines.extract import run_extraction
from pipelines.ingest import load_dataset, write_dataset
from pipelines.lake import Lake
from pipelines.partitions import sync_partitions
from pipelines.registries import ExperimentSpec, load_datasets
from pipelines.storage import (
    FAILURE_KEY,
    StorageError,
    check_writable,
    dagster_failure,
    disk_errno,
    storage_error,
    storage_error_in_text,
    writing,
)
from tests.pipeline_fixture import Project, make_project

DATASET = "shapes"
MEDIA, PAIRS, QUARANTINE = (f"{k}__{DATASET}" for k in ("media", "pairs", "quarantine"))
LATENTS = f"latents__{DATASET}__tiny-image"


def _permissions_stop_writes() -> bool:
    """Whether `chmod a-w` keeps this process from writing (not for root, or CAP_DAC_OVERRIDE)."""
    probe = Path(tempfile.mkdtemp(prefix="fusemix-chmod-"))
    try:
        probe.chmod(stat.S_IRUSR | stat.S_IXUSR)
        try:
            (probe / "x").write_bytes(b"x")
        except PermissionError:
            return True
        return False
    finally:
        probe.chmod(stat.S_IRWXU)
        shutil.rmtree(probe)


CHMOD_WORKS = _permissions_stop_writes()

# What Lance (pylance 14) raises when the disk is full or read-only: an OSError without errno.
LANCE_SAYS = {
    errno.ENOSPC: "LanceError(IO): No space left on device (os error 28), rust/lance-file/src/writer.rs:190:9",
    errno.EROFS: 'LanceError(IO): Read-only file system (os error 30) at path "{path}/data/.tmp7KQ4K9", '
    "rust/lance-io/src/object_store.rs:1019:34",
    errno.EACCES: "LanceError(IO): Permission denied (os error 13), rust/lance-io/src/object_store.rs:1013:21",
}


def lance_says(code: int, table: str = "/the/lake/t.lance") -> str:
    return LANCE_SAYS[code].format(path=table)


# --- fault injection ------------------------------------------------------------------------------


class LanceWriteFault:
    """Every Lance write after the first `after` fails like a full or read-only disk: with Lance's
    message (`lance_style`) or as OSError(code) with errno set. `writes` lists the calls that ran."""

    def __init__(self, monkeypatch, code: int, after: int = 0, lance_style: bool = True) -> None:
        self.code, self.after, self.lance_style = code, after, lance_style
        self.writes: list[str] = []
        merge = sys.modules["lance.dataset"].MergeInsertBuilder
        for owner, name in (
            (lance, "write_dataset"),
            (lance.LanceDataset, "delete"),
            (lance.LanceDataset, "add_columns"),
            (merge, "execute"),
        ):
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name), name))

    def _wrap(self, real, name: str):
        def write(*args, **kwargs):
            if len(self.writes) >= self.after:
                if self.lance_style:
                    raise OSError(lance_says(self.code))
                raise OSError(self.code, os.strerror(self.code))
            self.writes.append(name)
            return real(*args, **kwargs)

        return write


def python_writes_fail(monkeypatch, folder: Path, code: int = errno.EROFS) -> None:
    """Creating or writing a file or folder under `folder` from Python raises OSError(code)."""
    folder = Path(folder).resolve()
    real_mkdir, real_open, real_io_open = os.mkdir, os.open, io.open

    def under(path) -> bool:
        if isinstance(path, int):
            return False
        return Path(os.fsdecode(path)).resolve().is_relative_to(folder)

    def refuse(path):
        return OSError(code, os.strerror(code), os.fsdecode(path))

    def mkdir(path, mode=0o777, *, dir_fd=None):
        if under(path):
            raise refuse(path)
        return real_mkdir(path, mode, dir_fd=dir_fd)

    def os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and under(path):
            raise refuse(path)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    def io_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and under(file):
            raise refuse(file)
        return real_io_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(io, "open", io_open)
    monkeypatch.setattr(builtins, "open", io_open)


@contextmanager
def read_only(folder: Path, monkeypatch) -> Iterator[None]:
    """`folder` read-only while inside: chmod -R a-w where permissions bind; for root, whom they do
    not stop, every Lance and Python write into it fails with EROFS."""
    if CHMOD_WORKS:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
        for p, mode in modes.items():
            p.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    with monkeypatch.context() as mp:
        LanceWriteFault(mp, errno.EROFS)
        python_writes_fail(mp, folder)
        yield


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    return make_project(tmp_path_factory.mktemp("disks"))


@pytest.fixture(scope="module")
def dataset(project):
    spec = load_datasets(project.configs / "datasets.yaml")[DATASET]
    return load_dataset(spec, project.home / "cache", progress=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset) -> dict[str, list]:
    """The three tables an ingest on a healthy disk writes."""
    lake = Lake(tmp_path_factory.mktemp("reference"))
    write_dataset(lake, DATASET, dataset)
    return _tables(lake)


def _tables(lake: Lake) -> dict[str, list]:
    def rows(table: str) -> list:
        out = [{k: v for k, v in r.items() if k != "ingested_at"} for r in lake.read(table).to_pylist()]
        return sorted(out, key=repr)

    return {t: rows(t) for t in (MEDIA, PAIRS, QUARANTINE)}


@pytest.fixture
def env(tmp_path, project, monkeypatch) -> dict[str, Path]:
    """FUSEMIX_HOME, FUSEMIX_CONFIGS and a DAGSTER_HOME of its own (the lake alone is made read-only)."""
    home = tmp_path / "home"
    paths = {"home": home, "lake": home / "lance", "dagster": tmp_path / "dagster"}
    monkeypatch.setenv("FUSEMIX_HOME", str(home))
    monkeypatch.setenv("FUSEMIX_CONFIGS", str(project.configs))
    monkeypatch.setenv("DAGSTER_HOME", str(paths["dagster"]))
    monkeypatch.setenv("FUSEMIX_TORCH_THREADS", "1")
    return paths


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _one_clear_line(err: str, *words: str) -> str:
    """The error line the command printed last; it names what happened and what to do."""
    assert "Traceback" not in err and "Stack Trace" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("fusemix: error: cannot write to "), line
    for word in words:
        assert word in line, line
    return line


# --- recognising disk errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/x/f"), errno.ENOSPC),
        (OSError(lance_says(errno.ENOSPC)), errno.ENOSPC),
        (OSError(lance_says(errno.EROFS)), errno.EROFS),
        (OSError(lance_says(errno.EACCES)), errno.EACCES),
        (PermissionError(errno.EACCES, "Permission denied", "/x"), errno.EACCES),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), errno.EDQUOT),
        (RuntimeError("(sqlite3.OperationalError) database or disk is full"), errno.ENOSPC),
        (RuntimeError("(sqlite3.OperationalError) attempt to write a readonly database"), errno.EROFS),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x"), None),
        (OSError("LanceError(IO): Commit conflict for version 3"), None),
        (ValueError("boom"), None),
    ],
)
def test_disk_errors_are_recognised_in_every_form(error, code):
    assert disk_errno(error) == code
    try:  # along the chain of causes too
        try:
            raise error
        except Exception as inner:
            raise RuntimeError("while writing the lake") from inner
    except RuntimeError as outer:
        assert disk_errno(outer) == code


def test_a_storage_error_is_one_line_that_names_the_folder_and_what_to_do(tmp_path):
    full = storage_error(OSError(lance_says(errno.ENOSPC)), tmp_path)
    assert full.errno == errno.ENOSPC and full.path == str(tmp_path)
    assert str(full).startswith(
        f"cannot write to {tmp_path}: no space left on the device (ENOSPC); free space"
    )
    assert "\n" not in str(full)
    ro = storage_error(OSError(lance_says(errno.EROFS)))
    assert ro.path == "/the/lake/t.lance/data/.tmp7KQ4K9"  # the file Lance names, without a path given
    assert "read-only (EROFS); make it writable" in str(ro) and "FUSEMIX_HOME" in str(ro)
    named = storage_error(PermissionError(errno.EACCES, "Permission denied", "/srv/lake/x"))
    assert named.path == "/srv/lake/x" and "(EACCES)" in str(named)
    assert storage_error(ValueError("x")) is None
    copy = pickle.loads(pickle.dumps(full))
    assert (str(copy), copy.errno, copy.path) == (str(full), full.errno, full.path)
    text = "OSError: [Errno 28] No space left on device: '/x/models/e/model.safetensors'"
    assert storage_error_in_text(text).path == "/x/models/e/model.safetensors"
    assert storage_error_in_text("PermissionError: Permission denied", codes=[errno.ENOSPC]) is None

    with pytest.raises(StorageError) as err, writing(tmp_path):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert err.value.path == str(tmp_path)
    with pytest.raises(KeyError), writing(tmp_path):  # anything else passes through untouched
        raise KeyError("x")


def test_check_writable_creates_the_folder_or_says_it_cannot(tmp_path, monkeypatch):
    assert check_writable(tmp_path / "new" / "dagster").is_dir()
    assert list((tmp_path / "new" / "dagster").iterdir()) == []  # its probe file is gone
    with read_only(tmp_path / "new", monkeypatch), pytest.raises(StorageError) as err:
        check_writable(tmp_path / "new" / "dagster")
    assert err.value.errno in (errno.EROFS, errno.EACCES)
    assert str(tmp_path / "new" / "dagster") in str(err.value)


def test_a_storage_error_in_an_asset_is_a_dagster_failure_with_the_line():
    with pytest.raises(dg.Failure) as failure, dagster_failure():
        raise StorageError(errno.ENOSPC, "/the/lake")
    assert failure.value.description.startswith("cannot write to /the/lake: no space left")
    assert failure.value.metadata[FAILURE_KEY].value == "ENOSPC"
    with pytest.raises(ValueError), dagster_failure():
        raise ValueError("not a disk")


# --- a full disk ----------------------------------------------------------------------------------


@pytest.mark.parametrize("after", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("lance_style", [True, False], ids=["lance", "errno"])
def test_a_full_disk_at_any_ingest_write_leaves_a_readable_lake_and_a_rerun_heals(
    tmp_path, dataset, reference, monkeypatch, capsys, after, lance_style
):
    lake = Lake(tmp_path / "lake")
    with monkeypatch.context() as mp:
        fault = LanceWriteFault(mp, errno.ENOSPC, after=after, lance_style=lance_style)
        with pytest.raises(StorageError) as err:
            write_dataset(lake, DATASET, dataset)
    assert len(fault.writes) == after
    assert err.value.errno == errno.ENOSPC and err.value.path == lake.root
    assert "\n" not in str(err.value)

    # Whatever was committed reads; the views of tables not written yet are empty, not errors.
    counts = Catalog(lake.root).sql(
        "SELECT (SELECT count(*) FROM media) AS media, (SELECT count(*) FROM pairs) AS pairs, "
        "(SELECT count(*) FROM quarantine) AS quarantine"
    )
    assert counts.num_rows == 1
    rc, out, _ = run_cli(capsys, "--lake", lake.root, "sql", "SELECT count(*) AS n FROM pairs")
    assert rc == 0 and "(1 row)" in out

    write_dataset(lake, DATASET, dataset)  # space again: the rerun finishes the job
    assert _tables(lake) == reference


def test_a_full_disk_during_extraction_keeps_the_committed_latents(tmp_path, project, dataset, monkeypatch):
    lake = Lake(tmp_path / "lake")
    write_dataset(lake, DATASET, dataset)
    encoder = build_encoder(load_registry(project.configs / "encoders.yaml")["tiny-image"])
    with monkeypatch.context() as mp:
        LanceWriteFault(mp, errno.ENOSPC, after=2)  # the first commit creates the table and merges
        with pytest.raises(StorageError, match="no space left"):
            run_extraction(lake, DATASET, encoder, commit_every=8, progress=False)
    assert lake.count(LATENTS) == 8
    rest = run_extraction(lake, DATASET, encoder, commit_every=8, progress=False)
    assert rest["encoded"] == project.n_media - 8 and rest["total"] == project.n_media


def test_materialize_on_a_full_disk_prints_one_line_and_exits_2(env, monkeypatch, capsys):
    with monkeypatch.context() as mp:
        LanceWriteFault(mp, errno.ENOSPC, after=2)  # the media table is written, then the disk is full
        rc, out, err = run_cli(capsys, "materialize", "ingest")
    assert rc == 2
    _one_clear_line(err, str(env["lake"]), "no space left", "free space")
    assert "FAILED" in out
    rc, out, _ = run_cli(capsys, "sql", "SELECT count(*) AS n FROM media")
    assert rc == 0 and "(1 row)" in out
    assert run_cli(capsys, "materialize", "ingest")[0] == 0  # with room again


def test_the_ingest_asset_fails_with_the_line_in_dagster(env, project, monkeypatch):
    from app.definitions import build_defs

    defs, parts = build_defs(project.configs)
    LanceWriteFault(monkeypatch, errno.ENOSPC, lance_style=False)
    instance = dg.DagsterInstance.ephemeral()
    sync_partitions(parts, instance)
    result = defs.resolve_job_def("ingest_job").execute_in_process(
        partition_key=DATASET, instance=instance, raise_on_error=False
    )
    assert not result.success
    failures = [ev.event_specific_data.user_failure_data for ev in result.all_events if ev.is_step_failure]
    assert len(failures) == 1
    assert failures[0].description.startswith(f"cannot write to {env['lake']}: no space left on the device")
    assert failures[0].metadata[FAILURE_KEY].value == "ENOSPC"

    from app.demo import disk_failure

    assert disk_failure(result) == failures[0].description


def test_a_disk_error_a_step_did_not_convert_is_still_recognised(tmp_path):
    from app.demo import _ShortDiskFailures, disk_failure

    @dg.asset
    def weights():
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "model.safetensors"))

    @dg.asset
    def broken():
        raise PermissionError(errno.EACCES, "Permission denied", "/etc/shadow")

    result = dg.materialize([weights], raise_on_error=False)
    assert disk_failure(result) == str(StorageError(errno.ENOSPC, tmp_path / "model.safetensors"))
    # A permission error is a disk error only where an asset said it was a write (dagster_failure).
    assert disk_failure(dg.materialize([broken], raise_on_error=False)) is None

    record = logging.LogRecord(
        "dagster",
        logging.ERROR,
        __file__,
        1,
        "STEP_FAILURE\n\nOSError: [Errno 28] No space\n\nStack Trace:\n  x",
        (),
        None,
    )
    _ShortDiskFailures().filter(record)
    assert record.getMessage() == "STEP_FAILURE\n\nOSError: [Errno 28] No space"


# --- a read-only lake -----------------------------------------------------------------------------


def test_reingesting_an_unchanged_dataset_writes_nothing_and_works_on_a_read_only_lake(
    tmp_path, project, dataset, reference, monkeypatch
):
    lake = Lake(tmp_path / "lake")
    first = write_dataset(lake, DATASET, dataset)
    assert first["unchanged"] == []
    encoder = build_encoder(load_registry(project.configs / "encoders.yaml")["tiny-image"])
    run_extraction(lake, DATASET, encoder, progress=False)
    versions = lake.versions([MEDIA, PAIRS, QUARANTINE, LATENTS])

    with read_only(Path(lake.root), monkeypatch):
        again = write_dataset(lake, DATASET, dataset)
        assert sorted(again["unchanged"]) == sorted([MEDIA, PAIRS, QUARANTINE])
        assert again["new_media"] == again["removed_media"] == 0
        stats = run_extraction(lake, DATASET, encoder, progress=False)  # nothing to encode: no write
        assert (stats["encoded"], stats["total"]) == (0, project.n_media)
        assert Catalog(lake.root).sql("SELECT count(*) AS n FROM pairs").to_pylist() == [
            {"n": project.n_pairs}
        ]

        changed = load_dataset(
            load_datasets(project.configs / "datasets.yaml")[DATASET], project.home / "cache", progress=False
        )
        changed.pairs = changed.pairs[:-2]  # now something would be written
        with pytest.raises(StorageError) as err:
            write_dataset(lake, DATASET, changed)
        assert err.value.errno in (errno.EROFS, errno.EACCES) and err.value.path == lake.root
    assert lake.versions([MEDIA, PAIRS, QUARANTINE, LATENTS]) == versions
    assert _tables(lake) == reference


def test_materialize_ingest_of_an_unchanged_dataset_succeeds_on_a_read_only_lake(env, monkeypatch, capsys):
    assert run_cli(capsys, "materialize", "ingest")[0] == 0
    with read_only(env["lake"], monkeypatch):
        rc, out, err = run_cli(capsys, "materialize", "ingest")
        assert rc == 0, err[-2000:]
        assert "ok in" in out

        # A dataset that did change cannot be written: one line, exit status 2.
        monkeypatch.setattr("pipelines.ingest.same_pairs", lambda *args: False)
        rc, _, err = run_cli(capsys, "materialize", "ingest")
        assert rc == 2
        _one_clear_line(err, str(env["lake"]), "make it writable")


def test_write_curated_leaves_an_identical_table_alone(tmp_path, monkeypatch):
    lake = Lake(tmp_path / "lake")
    exp = ExperimentSpec(name="e", dataset=DATASET, media_encoder="a", text_encoder="b")
    table = pa.table({"pair_id": ["p1", "p2"], "media_id": ["m1", "m2"]})
    version, unchanged = write_curated(lake, exp, table)
    assert not unchanged
    with read_only(Path(lake.root), monkeypatch):
        assert write_curated(lake, exp, table) == (version, True)
        with pytest.raises(StorageError):
            write_curated(lake, exp, table.slice(0, 1))


# --- a read-only home -----------------------------------------------------------------------------


@pytest.mark.parametrize("command", [("materialize", "ingest"), ("demo",)])
@pytest.mark.parametrize("dagster_there", [False, True], ids=["fresh", "dagster-home-there"])
def test_a_read_only_fusemix_home_is_one_line(tmp_path, project, monkeypatch, capsys, command, dagster_there):
    home = tmp_path / "home"
    home.mkdir()
    if dagster_there:  # nothing left for dagster_home() to write: the write check must catch it
        (home / "dagster").mkdir()
        (home / "dagster" / "dagster.yaml").write_text(cli.INSTANCE_YAML)
    monkeypatch.setenv("FUSEMIX_HOME", str(home))
    monkeypatch.setenv("FUSEMIX_CONFIGS", str(project.configs))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    with read_only(home, monkeypatch):
        rc, _, err = run_cli(capsys, *command)
    assert rc == 2
    _one_clear_line(err, str(home / "dagster"), "FUSEMIX_HOME")


def test_sql_reads_a_lake_in_a_read_only_home(env, dataset, monkeypatch, capsys):
    write_dataset(Lake(env["lake"]), DATASET, dataset)
    with read_only(env["home"], monkeypatch):
        rc, out, err = run_cli(capsys, "sql", "SELECT count(*) AS n FROM quarantine")
        assert rc == 0, err
        assert "(1 row)" in out
    empty = env["home"].parent / "empty-home"
    empty.mkdir()
    monkeypatch.setenv("FUSEMIX_HOME", str(empty))
    with read_only(empty, monkeypatch):  # no lake there, and none can be made: says so
        rc, _, err = run_cli(capsys, "sql", "SELECT 1 AS one")
    assert rc == 2
    assert "there is no lake at" in err and "Traceback" not in err
