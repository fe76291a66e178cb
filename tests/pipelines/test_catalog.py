"""The DuckDB catalog on real Lance tables in tmp_path: per-table views, union views, saved queries."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest

from pipelines.catalog import Catalog, CatalogError, load_saved_query, saved_queries
from pipelines.lake import Lake, vectors_to_arrow


def media_table(dataset: str, n: int, modality: str) -> pa.Table:
    ids = [f"{dataset}-m{i}" for i in range(n)] + [f"{dataset}-t{i}" for i in range(n)]
    return pa.table(
        {
            "media_id": ids,
            "modality": [modality] * n + ["text"] * n,
            "path": [f"/data/{dataset}/{i}.bin" for i in range(n)] + [None] * n,
            "data": pa.array([None] * (2 * n), type=pa.binary()),
            "text": [None] * n + [f"caption {i} of {dataset}" for i in range(n)],
            "source": [dataset] * (2 * n),
            "license": ["CC0"] * (2 * n),
            "size_bytes": pa.array([100 + i for i in range(n)] + [10] * n, type=pa.int64()),
        }
    )


def pairs_table(dataset: str, n: int) -> pa.Table:
    return pa.table(
        {
            "pair_id": [f"{dataset}-m{i}:{dataset}-t{i}" for i in range(n)],
            "media_id": [f"{dataset}-m{i}" for i in range(n)],
            "caption_id": [f"{dataset}-t{i}" for i in range(n)],
            "raw_caption_id": pa.array([None] * n, type=pa.string()),
            "split": ["train" if i % 3 else "test" for i in range(n)],
            "group_id": [f"{dataset}-m{i}" for i in range(n)],
            "concept": [f"c{i // 2}" for i in range(n)],
            "source": [dataset] * n,
            "license": ["CC0"] * n,
            "quality": pa.array([None] * n, type=pa.float64()),
        }
    )


def quarantine_table(dataset: str, reasons: list[str]) -> pa.Table:
    return pa.table(
        {
            "dataset": [dataset] * len(reasons),
            "source": [dataset] * len(reasons),
            "item": [f"item{i}" for i in range(len(reasons))],
            "reason": reasons,
            "detail": ["" for _ in reasons],
        }
    )


def latents_table(ids: list[str], dim: int, fingerprint: str, encoder: str, seed: int = 0) -> pa.Table:
    vec = np.random.default_rng(seed).standard_normal((len(ids), dim)).astype(np.float32)
    return pa.table(
        {
            "media_id": ids,
            "vector": vectors_to_arrow(vec),
            "fingerprint": [fingerprint] * len(ids),
            "encoder": [encoder] * len(ids),
        }
    )


def metrics_table(rows: list[tuple]) -> pa.Table:
    """rows: (experiment, split, metric, value, run_id, minute[, seed]); rows without a seed are the
    aggregates over seeds (what best_runs ranks), pooled gallery."""
    from types import SimpleNamespace

    from pipelines import schemas

    base = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
    objs = [
        SimpleNamespace(
            experiment=r[0], split=r[1], metric=r[2], value=r[3], mlflow_run_id=r[4],
            created_at=base + dt.timedelta(minutes=r[5]), seed=r[6] if len(r) > 6 else None,
        )
        for r in rows
    ]  # fmt: skip
    return schemas.table_of(
        schemas.METRICS, objs, family="demo", variable="", method="adapters", dataset="emoji",
        gallery="pooled", std=0.0, n_seeds=1, inputs_hash="h", fingerprint_media="fpm",
        fingerprint_text="fpt",
    )  # fmt: skip


def make_lake(root) -> Lake:
    """Two datasets (emoji: 6 images, notes: 4 audio clips), three latents tables, quarantine, metrics."""
    lake = Lake(root)
    lake.overwrite("media__emoji", media_table("emoji", 6, "image"))
    lake.overwrite("pairs__emoji", pairs_table("emoji", 6))
    lake.overwrite(
        "quarantine__emoji", quarantine_table("emoji", ["bad_image", "bad_image", "empty_caption"])
    )
    lake.overwrite("media__notes", media_table("notes", 4, "audio"))
    lake.overwrite("pairs__notes", pairs_table("notes", 4))
    lake.overwrite("quarantine__notes", quarantine_table("notes", ["silent"]))
    lake.overwrite(
        "latents__emoji__effnet-lite0",
        latents_table([f"emoji-m{i}" for i in range(6)], 8, "fpA", "effnet-lite0"),
    )
    # Two fingerprints in one table: an encoder that changed under an incremental extraction.
    lake.append(
        "latents__emoji__minilm", latents_table([f"emoji-t{i}" for i in range(4)], 6, "fpT1", "minilm")
    )
    lake.append("latents__emoji__minilm", latents_table(["emoji-t4", "emoji-t5"], 6, "fpT2", "minilm"))
    lake.overwrite(
        "latents__notes__whisper-tiny",
        latents_table([f"notes-m{i}" for i in range(4)], 4, "fpW", "whisper-tiny"),
    )
    lake.overwrite(
        "metrics",
        metrics_table(
            [
                ("emoji-fusemix", "test", "t2i_recall_at_1", 0.30, "run1", 0),
                ("emoji-fusemix", "test", "t2i_recall_at_1", 0.45, "run2", 5),
                ("emoji-fusemix", "test", "i2t_recall_at_1", 0.90, "run1", 0),
                ("emoji-none", "test", "t2i_recall_at_1", 0.20, "run3", 1),
                ("emoji-none", "val", "t2i_recall_at_1", 0.25, "run3", 1),
                # One seed's own row is not an experiment's result: best_runs ranks the aggregates.
                ("emoji-none", "test", "t2i_recall_at_1", 0.99, "run3", 1, 7),
            ]
        ),
    )
    return lake


@pytest.fixture
def lake(tmp_path) -> Lake:
    return make_lake(tmp_path / "lance")


def test_every_lance_table_is_a_view(lake):
    cat = Catalog(lake.root)
    with cat.connect() as con:
        for table in lake.tables():
            (n,) = con.execute(f'SELECT count(*) FROM "{table}"').fetchone()
            assert n == lake.count(table), table


def test_union_views_add_dataset_and_encoder(lake):
    cat = Catalog(lake.root)
    media = cat.sql(
        "SELECT dataset, modality, count(*) AS n FROM media GROUP BY ALL ORDER BY ALL"
    ).to_pylist()
    assert media == [
        {"dataset": "emoji", "modality": "image", "n": 6},
        {"dataset": "emoji", "modality": "text", "n": 6},
        {"dataset": "notes", "modality": "audio", "n": 4},
        {"dataset": "notes", "modality": "text", "n": 4},
    ]
    pairs = cat.sql("SELECT dataset, count(*) AS n FROM pairs GROUP BY ALL ORDER BY ALL").to_pylist()
    assert pairs == [{"dataset": "emoji", "n": 6}, {"dataset": "notes", "n": 4}]
    meta = cat.sql("SELECT * FROM latents_meta")
    assert "vector" not in meta.column_names
    assert {"dataset", "encoder", "dim", "media_id", "fingerprint"} <= set(meta.column_names)
    assert meta.num_rows == 6 + 6 + 4


def test_latents_view_keeps_vectors_of_every_dimension(lake):
    cat = Catalog(lake.root)
    rows = cat.sql(
        "SELECT encoder, dim, len(vector) AS n, vector FROM latents WHERE media_id = 'notes-m2'"
    ).to_pylist()
    assert len(rows) == 1 and rows[0]["dim"] == rows[0]["n"] == 4
    want = lake.read("latents__notes__whisper-tiny", filter="media_id = 'notes-m2'").column("vector")
    np.testing.assert_allclose(rows[0]["vector"], want.to_pylist()[0], rtol=0, atol=0)


def test_latents_meta_never_reads_the_vector_column(lake, monkeypatch):
    seen: list = []
    original = lance.LanceDataset.scanner

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("columns"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(lance.LanceDataset, "scanner", spy)
    n = Catalog(lake.root).sql("SELECT dataset, encoder, fingerprint FROM latents_meta").num_rows
    assert n == 16
    assert seen, "DuckDB did not scan through LanceDataset.scanner"
    assert all(cols is not None and "vector" not in cols for cols in seen), seen


def test_filters_reach_lance(lake, monkeypatch):
    seen: list = []
    original = lance.LanceDataset.scanner

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("filter"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(lance.LanceDataset, "scanner", spy)
    got = Catalog(lake.root).sql(
        "SELECT media_id FROM \"latents__emoji__effnet-lite0\" WHERE media_id = 'emoji-m3'"
    )
    assert got.column("media_id").to_pylist() == ["emoji-m3"]
    assert any(f is not None and "emoji-m3" in str(f) for f in seen), seen


def test_bare_table_named_like_a_union_view_joins_it(lake):
    lake.overwrite("pairs", pairs_table("extra", 3).append_column("dataset", pa.array(["extra"] * 3)))
    cat = Catalog(lake.root)
    rows = cat.sql("SELECT dataset, count(*) AS n FROM pairs GROUP BY ALL ORDER BY ALL").to_pylist()
    assert rows == [{"dataset": "emoji", "n": 6}, {"dataset": "extra", "n": 3}, {"dataset": "notes", "n": 4}]
    assert cat.sql("SELECT count(*) AS n FROM pairs__table").column("n").to_pylist() == [3]


def test_connection_sees_the_versions_current_when_opened(lake):
    cat = Catalog(lake.root)
    con = cat.connect()
    lake.append("pairs__notes", pairs_table("notes", 4).slice(0, 1))
    assert con.execute("SELECT count(*) FROM pairs__notes").fetchone() == (4,)
    con.close()
    assert cat.sql("SELECT count(*) AS n FROM pairs__notes").column("n").to_pylist() == [5]


def test_empty_lake_has_empty_union_views(tmp_path):
    cat = Catalog(tmp_path / "empty")
    for view in ("media", "pairs", "quarantine", "latents", "latents_meta", "curated", "metrics"):
        assert cat.sql(f"SELECT * FROM {view}").num_rows == 0
    assert cat.saved("best_runs").num_rows == 0
    assert cat.saved("latents_per_encoder").num_rows == 0


def test_empty_views_have_the_columns_of_the_schemas(tmp_path):
    # A query on any column the pipeline writes works on a fresh lake, not only after the first run.
    from pipelines import schemas

    cat = Catalog(tmp_path / "empty")
    expected = {
        "media": ["dataset", *schemas.MEDIA.names],
        "pairs": ["dataset", *schemas.PAIRS.names],
        "quarantine": schemas.QUARANTINE.names,
        "curated": ["experiment", *schemas.CURATED.names],
        "latents_meta": ["dataset", "encoder", "dim", "media_id", "fingerprint", "encoder"],
        "metrics": schemas.METRICS.names,
    }
    for view, columns in expected.items():
        got = cat.sql(f"SELECT * FROM {view}").column_names
        assert set(got) == set(columns), view
    assert cat.sql("SELECT stage, ingested_at FROM quarantine, media").num_rows == 0
    assert cat.sql("SELECT family, variable, inputs_hash FROM metrics").num_rows == 0


def test_saved_latents_per_encoder(lake):
    rows = Catalog(lake.root).saved("latents_per_encoder").to_pylist()
    by_key = {(r["dataset"], r["encoder"]): r for r in rows}
    assert set(by_key) == {("emoji", "effnet-lite0"), ("emoji", "minilm"), ("notes", "whisper-tiny")}
    assert by_key["emoji", "minilm"]["latents"] == 6
    assert by_key["emoji", "minilm"]["dim"] == 6
    assert by_key["emoji", "minilm"]["n_fingerprints"] == 2
    assert by_key["emoji", "minilm"]["fingerprints"] == "fpT1,fpT2"
    assert by_key["notes", "whisper-tiny"]["dim"] == 4


def test_saved_quarantine_reasons(lake):
    rows = Catalog(lake.root).saved("quarantine_reasons").to_pylist()
    got = [(r["dataset"], r["reason"], r["n"]) for r in rows]
    assert got == [("emoji", "bad_image", 2), ("emoji", "empty_caption", 1), ("notes", "silent", 1)]


def test_saved_best_runs_picks_the_best_value_per_experiment_and_split(lake):
    cat = Catalog(lake.root)
    rows = cat.saved("best_runs").to_pylist()
    got = [(r["experiment"], r["split"], r["value"], r["run_id"]) for r in rows]
    assert got == [
        ("emoji-fusemix", "test", 0.45, "run2"),
        ("emoji-none", "test", 0.20, "run3"),
        ("emoji-none", "val", 0.25, "run3"),
    ]
    assert {"experiment", "metric", "value", "run_id", "created_at"} <= set(
        cat.saved("best_runs").column_names
    )
    val = cat.saved("best_runs", split="val").to_pylist()
    assert [(r["experiment"], r["value"]) for r in val] == [("emoji-none", 0.25)]
    i2t = cat.saved("best_runs", metric="i2t_recall_at_1").to_pylist()
    assert [(r["experiment"], r["value"]) for r in i2t] == [("emoji-fusemix", 0.90)]


def test_saved_query_errors_are_clear(lake, tmp_path, monkeypatch):
    cat = Catalog(lake.root)
    with pytest.raises(CatalogError, match="no saved query 'nope'"):
        cat.saved("nope")
    with pytest.raises(CatalogError, match="invalid saved query name"):
        cat.saved("../etc/passwd")
    with pytest.raises(CatalogError, match=r"no parameter\(s\) \['colour'\]"):
        cat.saved("best_runs", colour="red")
    configs = tmp_path / "configs"
    (configs / "queries").mkdir(parents=True)
    (configs / "queries" / "typo.sql").write_text("SELECT * FROM metrics WHERE metric = $metrc\n")
    (configs / "queries" / "needs.sql").write_text(
        "-- @param experiment\nSELECT * FROM metrics WHERE experiment = $experiment\n"
    )
    monkeypatch.setenv("FUSEMIX_CONFIGS", str(configs))
    assert saved_queries() == ["needs", "typo"]
    with pytest.raises(CatalogError, match="not declared"):
        load_saved_query("typo")
    with pytest.raises(CatalogError, match=r"needs parameter\(s\) \['experiment'\]"):
        cat.saved("needs")
    assert cat.saved("needs", experiment="emoji-none").num_rows == 3  # two aggregates and one seed


def test_bad_sql_is_a_catalog_error(lake):
    with pytest.raises(CatalogError, match="query failed"):
        Catalog(lake.root).sql("SELECT * FROM no_such_table")


def test_shipped_queries_declare_their_parameters():
    names = saved_queries()
    assert {"latents_per_encoder", "quarantine_reasons", "best_runs"} <= set(names)
    for name in names:
        load_saved_query(name)


def test_database_file_keeps_user_tables_but_not_lake_views(lake, tmp_path):
    db = str(tmp_path / "cat.duckdb")
    cat = Catalog(lake.root, database=db)
    with cat.connect() as con:
        con.execute("CREATE TABLE notes_kept AS SELECT * FROM pairs WHERE dataset = 'notes'")
    import duckdb

    with duckdb.connect(db) as con:
        names = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert names == {"notes_kept"}
    assert cat.sql("SELECT count(*) AS n FROM notes_kept").column("n").to_pylist() == [4]


def _lake_state(lake: Lake) -> dict[str, tuple[int, int]]:
    return {name: (lake.open(name).version, lake.open(name).count_rows()) for name in lake.tables()}


@pytest.mark.parametrize(
    "query, message",
    [
        ("COPY (SELECT 1) TO '{tmp}/out.csv'", "COPY statements are refused"),
        ("COPY pairs TO '{lake}/pairs__emoji.lance/_versions/1.manifest'", "COPY statements are refused"),
        ("ATTACH '{tmp}/other.duckdb' AS other", "ATTACH statements are refused"),
        ("INSTALL httpfs", "statements are refused"),
        ("LOAD httpfs", "statements are refused"),
        ("CREATE TABLE t AS SELECT 1", "CREATE statements are refused"),
        ("DROP VIEW pairs", "DROP statements are refused"),
        ("SET enable_external_access = true", "SET statements are refused"),
        ("EXPORT DATABASE '{tmp}/dump'", "EXPORT statements are refused"),
        ("SELECT 1; SELECT 2", "exactly one SQL statement; this query has 2"),
        ("", "exactly one SQL statement; this query has 0"),
        # One SELECT, but reaching outside the lake: stopped by DuckDB's disabled external access.
        ("SELECT * FROM read_csv('/etc/passwd')", "file system operations are disabled"),
        ("SELECT * FROM glob('{tmp}/*')", "file system operations are disabled"),
        # A path as a table name: replacement scans off, so not found (rather than read).
        ("SELECT * FROM '{lake}/pairs__emoji.lance/_versions/*.manifest'", "does not exist"),
    ],
)
def test_sql_is_read_only(lake, tmp_path, query, message):
    before = _lake_state(lake)
    cat = Catalog(lake.root)
    with pytest.raises(CatalogError, match=message):
        cat.sql(query.format(tmp=tmp_path, lake=lake.root))
    assert _lake_state(lake) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lance"]  # nothing written beside it
    assert cat.sql("SELECT count(*) AS n FROM pairs").column("n").to_pylist() == [10]


def test_read_queries_still_work(lake):
    cat = Catalog(lake.root)
    assert cat.sql("DESCRIBE pairs").num_rows > 0
    assert cat.sql("EXPLAIN SELECT * FROM pairs").num_rows > 0
    assert (
        cat.sql("WITH d AS (SELECT dataset FROM pairs) FROM d SELECT count(*) AS n").column("n")[0].as_py()
        == 10
    )
    assert "pairs" in cat.sql("SHOW TABLES").column("name").to_pylist()


def test_saved_queries_are_read_only_too(lake, tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    (configs / "queries").mkdir(parents=True)
    (configs / "queries" / "wipe.sql").write_text("DELETE FROM pairs\n")
    (configs / "queries" / "leak.sql").write_text("SELECT * FROM read_text('/etc/hostname')\n")
    monkeypatch.setenv("FUSEMIX_CONFIGS", str(configs))
    cat = Catalog(lake.root)
    with pytest.raises(CatalogError, match="DELETE statements are refused"):
        cat.saved("wipe")
    with pytest.raises(CatalogError, match="file system operations are disabled"):
        cat.saved("leak")
    assert cat.sql("SELECT count(*) AS n FROM pairs").column("n").to_pylist() == [10]


def test_a_table_folder_without_a_manifest_is_skipped(lake):
    """A first write that died (a full disk, a kill) leaves a folder with data but no committed
    version: it is not a table, and SQL over the others keeps working."""
    broken = Path(lake.root) / "pairs__half.lance"
    (broken / "data").mkdir(parents=True)
    (broken / "data" / "0.lance").write_bytes(b"partial")
    (broken / "_versions").mkdir()
    assert "pairs__half" not in lake.tables()
    assert "pairs__emoji" in lake.tables()
    assert Catalog(lake.root).sql("SELECT 1 AS one").column("one").to_pylist() == [1]
    assert Catalog(lake.root).sql("SELECT count(*) AS n FROM pairs").column("n").to_pylist() == [10]
