"""The lake on an S3-compatible object store: a real moto server on 127.0.0.1 (tests.s3_server), real
Lance tables written to it over HTTP, the whole tiny graph materialised there, and `fusemix sql` over it.
"""

from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pytest
import yaml

from fusion.data.readers import read_dataset
from pipelines.lake import Lake, object_store_options, vectors_to_arrow
from tests.s3_server import list_keys, make_bucket, s3_env, s3_server

BUCKET = "lake"


@pytest.fixture(scope="module")
def s3():
    """The endpoint of a moto server with one bucket, and the AWS variables pointing at it for the
    module's tests (restored afterwards)."""
    with s3_server() as endpoint:
        make_bucket(endpoint, BUCKET)
        env = s3_env(endpoint)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield endpoint
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def test_options_come_from_the_environment_and_the_resource(monkeypatch):
    for var in (
        "AWS_ENDPOINT_URL_S3",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT",
        "AWS_SESSION_TOKEN",
        "AWS_DEFAULT_REGION",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT", "https://object-store.example:9000")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert object_store_options("/a/local/lake") is None
    assert object_store_options("file:///a/local/lake") is None
    options = object_store_options("s3://bucket/lake")
    # The AWS SDKs' variable wins over object_store's; a plain-http endpoint is allowed explicitly.
    assert options == {
        "aws_endpoint": "http://127.0.0.1:9000",
        "allow_http": "true",
        "aws_region": "eu-west-1",
        "aws_access_key_id": "id",
        "aws_secret_access_key": "secret",
    }
    given = object_store_options("s3://bucket/lake", {"aws_region": "us-east-2", "aws_endpoint": "https://x"})
    assert given["aws_region"] == "us-east-2" and "allow_http" not in given
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert object_store_options("s3://bucket/lake")["aws_endpoint"] == "https://object-store.example:9000"
    # Another store's URI gets only what the resource gives (its SDK reads its own variables).
    assert object_store_options("gs://bucket/lake", {"google_service_account": "x"}) == {
        "google_service_account": "x"
    }


def test_fusemix_lake_points_every_default_at_the_store(monkeypatch, tmp_path):
    from pipelines.lake import default_lake_root
    from pipelines.resources import LanceLake

    monkeypatch.setenv("FUSEMIX_HOME", str(tmp_path))
    monkeypatch.delenv("FUSEMIX_LAKE", raising=False)
    assert default_lake_root() == str(tmp_path / "lance")
    monkeypatch.setenv("FUSEMIX_LAKE", "s3://bucket/lake")
    assert default_lake_root() == "s3://bucket/lake" == LanceLake().root


def test_lake_reads_and_writes_on_the_object_store(s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lake = Lake(f"s3://{BUCKET}/unit")
    assert lake.tables() == []  # an empty prefix is an empty lake, not an error
    schema = pa.schema([("media_id", pa.string()), ("caption", pa.string())])
    assert lake.create("pairs", schema) is True
    assert lake.create("pairs", schema) is False
    lake.append("pairs", pa.table({"media_id": ["a", "b"], "caption": ["x", "y"]}), key="media_id")
    lake.append("pairs", pa.table({"media_id": ["b", "c"], "caption": ["y", "z"]}), key="media_id")
    assert sorted(lake.ids("pairs")) == ["a", "b", "c"]
    lake.upsert("pairs", pa.table({"media_id": ["c"], "caption": ["zz"]}), "media_id")
    assert lake.read("pairs", filter="media_id = 'c'")["caption"].to_pylist() == ["zz"]
    lake.overwrite("pairs", pa.table({"media_id": ["a"], "caption": ["new"]}), where="media_id = 'a'")
    assert dict(zip(*lake.read("pairs").to_pydict().values(), strict=True)) == {
        "a": "new",
        "b": "y",
        "c": "zz",
    }
    lake.delete("pairs", "media_id = 'b'")
    assert lake.count("pairs") == 2

    vectors = np.arange(6, dtype=np.float32).reshape(3, 2)
    lake.append(
        "latents",
        pa.table(
            {"media_id": ["p", "q", "r"], "fingerprint": ["f"] * 3, "vector": vectors_to_arrow(vectors)}
        ),
    )
    np.testing.assert_array_equal(lake.vectors("latents", ["r", "p"], "f"), vectors[[2, 0]])

    # A prefix that a failed first write left without a manifest is not a table.
    import boto3

    boto3.client("s3", endpoint_url=s3).put_object(
        Bucket=BUCKET, Key="unit/half.lance/data/x.lance", Body=b"0"
    )
    assert lake.tables() == ["latents", "pairs"]
    assert lake.versions(["pairs", "latents", "half"]) == {"pairs": lake.version("pairs"), "latents": 1}
    assert not lake.exists("half")
    # Everything went to the server: no local folder named like the lake was made.
    assert not any(tmp_path.iterdir())
    assert any(k.startswith("unit/pairs.lance/_versions/") for k in list_keys(s3, BUCKET, "unit/"))


def test_a_missing_bucket_is_an_error_not_an_empty_lake(s3):
    missing = Lake("s3://no-such-bucket/lake")
    with pytest.raises(OSError, match="(?i)bucket"):
        missing.append("t", pa.table({"a": [1]}))
    assert not missing.exists("t")


def _client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


def upload_folder(endpoint: str, folder: Path, prefix: str) -> int:
    """Puts every file under `folder` at s3://BUCKET/prefix/<relative path>; returns the count."""
    client, n = _client(endpoint), 0
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.put_object(
                Bucket=BUCKET, Key=f"{prefix}/{path.relative_to(folder).as_posix()}", Body=path.read_bytes()
            )
            n += 1
    return n


def test_only_safe_relative_keys_become_files():
    from pipelines.remote import _relative_key

    assert _relative_key("p/images/a.png", "p") == "images/a.png"
    for bad in ("p/../a.png", "p/images/./a.png", "p/images//a.png", "p/a\x01b.png", "p/a\\b.png", "p/"):
        assert _relative_key(bad, "p") is None, bad


def test_the_mirror_fetches_what_changed_and_drops_what_is_gone(s3, tmp_path):
    from pipelines.remote import mirror_dir, sync_mirror

    client = _client(s3)
    for key, body in {"m/a.txt": b"a", "m/sub/b.txt": b"bb", "m/big.bin": b"x" * 64}.items():
        client.put_object(Bucket=BUCKET, Key=key, Body=body)
    dest = mirror_dir(tmp_path, f"s3://{BUCKET}/m")
    assert dest == mirror_dir(tmp_path, f"s3://{BUCKET}/m/")  # one mirror per root, trailing slash or not
    first = sync_mirror(f"s3://{BUCKET}/m", dest, max_bytes=32)
    assert (first.fetched, first.kept, first.removed) == (2, 0, 0)
    assert list(first.refused) == [f"{BUCKET}/m/big.bin"]
    assert (dest / "sub" / "b.txt").read_bytes() == b"bb" and not (dest / "big.bin").exists()
    (dest / ".b.txt.part-1").write_bytes(b"left by a kill")
    again = sync_mirror(f"s3://{BUCKET}/m", dest, max_bytes=32)
    assert (again.fetched, again.kept, again.removed) == (0, 2, 1)  # the stray part file is gone
    time.sleep(1.1)  # S3 times have one-second resolution
    client.put_object(Bucket=BUCKET, Key="m/a.txt", Body=b"A")  # same size, newer object
    client.delete_object(Bucket=BUCKET, Key="m/sub/b.txt")
    changed = sync_mirror(f"s3://{BUCKET}/m", dest, max_bytes=32)
    assert (changed.fetched, changed.kept, changed.removed) == (1, 0, 1)
    assert (dest / "a.txt").read_bytes() == b"A" and not (dest / "sub" / "b.txt").exists()


def _materialise(project, instance, defs, parts) -> dict[str, dg.ExecuteInProcessResult]:
    from pipelines.partitions import sync_partitions

    sync_partitions(parts, instance)
    runs = {}

    def run(label, job, key, **kw):
        runs[label] = defs.resolve_job_def(job).execute_in_process(
            partition_key=key, instance=instance, raise_on_error=False, **kw
        )

    run("ingest", "ingest_job", "shapes", run_config={"ops": {"ingest": {"config": {"progress": False}}}})
    for enc in ("tiny-image", "tiny-text"):
        quiet = {"ops": {"latents": {"config": {"progress": False}}}}
        run(f"extract:{enc}", "extract_job", parts.extract_key("shapes", enc), run_config=quiet)
    run("experiment", "experiment_job", "shapes-fusemix")
    return runs


def test_the_whole_graph_runs_with_the_lake_on_s3_and_sql_reads_it(s3, tmp_path, monkeypatch, capsys):
    from app.cli import main
    from app.definitions import build_defs
    from tests.pipeline_fixture import make_project

    monkeypatch.setenv("FUSEMIX_HOME", str(tmp_path / "home"))
    project = make_project(tmp_path)
    root = f"s3://{BUCKET}/graph"
    project.lake_root = root
    # The dataset's manifest and pictures live in the store too; nothing reads the local folder.
    assert upload_folder(s3, project.data, "media/shapes") == project.n_media + 1  # and manifest.csv
    local = project.data.rename(tmp_path / "data-uploaded")
    datasets = yaml.safe_load((project.configs / "datasets.yaml").read_text())
    datasets["datasets"]["shapes"]["root"] = f"s3://{BUCKET}/media/shapes"
    (project.configs / "datasets.yaml").write_text(yaml.safe_dump(datasets))
    defs, parts = build_defs(project.configs, resources=project.resources())
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        runs = _materialise(project, instance, defs, parts)
        ingest_log = [e.user_message for e in instance.all_logs(runs["ingest"].run_id)]
    assert {label: r.success for label, r in runs.items()} == dict.fromkeys(runs, True)

    lake = Lake(root)
    tables = lake.tables()
    assert {
        "media__shapes",
        "pairs__shapes",
        "quarantine__shapes",
        "latents__shapes__tiny-image",
        "latents__shapes__tiny-text",
        "curated__shapes-fusemix",
        "metrics",
    } <= set(tables)
    # The tables are on the server (listed with boto3, not through the lake), none in the home folder.
    on_server = {
        k.split("/")[1][: -len(".lance")] for k in list_keys(s3, BUCKET, "graph/") if "/_versions/" in k
    }
    assert on_server == set(tables)
    assert not (project.home / "lance").exists()
    assert lake.count("pairs__shapes") == project.n_pairs
    assert lake.count("latents__shapes__tiny-image") == project.n_media
    # The same media ids (content hashes) as the local folder gives, and its one quarantine row.
    direct = read_dataset(
        "manifest", str(local), name="shapes", modality="image", progress=False, license="CC0-1.0"
    )
    image_ids = {m for m in lake.ids("media__shapes", filter="modality = 'image'")}
    assert image_ids == {m.media_id for m in direct.media.values() if m.modality == "image"}
    assert lake.read("quarantine__shapes")["reason"].to_pylist() == ["missing"]
    assert any(
        f"shapes: mirrored s3://{BUCKET}/media/shapes: {project.n_media + 1} fetched" in m for m in ingest_log
    )

    # `fusemix sql` over the same lake, its options from the environment only.
    capsys.readouterr()
    assert (
        main(["--lake", root, "sql", "--csv", "SELECT dataset, count(*) AS n FROM pairs GROUP BY ALL"]) == 0
    )
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert rows == [{"dataset": "shapes", "n": str(project.n_pairs)}]
    assert (
        main(
            [
                "--lake",
                root,
                "sql",
                "--csv",
                "SELECT count(*) AS n FROM metrics WHERE experiment = 'shapes-fusemix'",
            ]
        )
        == 0
    )
    assert int(next(csv.DictReader(io.StringIO(capsys.readouterr().out)))["n"]) > 0
    assert Path(tmp_path / "home").is_dir()
