"""Training pairs streamed from Lance (pipelines.stream) on real Lance tables: every epoch yields every
pair once in a new slice order, groups travel with their pairs, and training from one slice equals
training from the same arrays in memory, step for step.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from fusion.config import AdapterConfig, FuseMixConfig, TrainConfig
from fusion.trainer import train_adapters
from pipelines.lake import Lake
from pipelines.stream import lance_chunks, write_pairs


def _pairs(n: int, dx: int = 6, dy: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dx)).astype(np.float32)
    x[:, 0] = np.arange(n)  # a row's identity, to check what came back
    y = rng.standard_normal((n, dy)).astype(np.float32)
    g = np.stack([np.arange(n) // 3, np.full(n, -1)], axis=1).astype(np.int64)
    return x, y, g


def test_every_epoch_yields_every_pair_once_in_a_new_slice_order(tmp_path):
    x, y, g = _pairs(100)
    lake = Lake(tmp_path)
    assert (
        write_pairs(lake, "pairs", ((x[i : i + 30], y[i : i + 30], g[i : i + 30]) for i in range(0, 100, 30)))
        == 100
    )
    source = lance_chunks(lake, "pairs", chunk_rows=16, seed=1)
    orders = []
    for _ in range(3):
        chunks = list(source())
        assert [len(c[0]) for c in chunks if len(c[0]) != 16] == [4]  # 6 full slices and the rest
        cx, cy, cg = (np.concatenate(part) for part in zip(*chunks, strict=True))
        order = cx[:, 0].astype(int)
        assert sorted(order) == list(range(100))
        np.testing.assert_array_equal(cx, x[order])
        np.testing.assert_array_equal(cy, y[order])
        np.testing.assert_array_equal(cg, g[order])
        orders.append(tuple(order))
    assert len(set(orders)) == 3


def test_a_table_that_is_not_pairs_is_refused(tmp_path):
    lake = Lake(tmp_path)
    lake.append("other", pa.table({"a": [1, 2]}))
    with pytest.raises(ValueError, match="not a pairs table"):
        lance_chunks(lake, "other")
    with pytest.raises(ValueError, match="no pairs"):
        write_pairs(lake, "empty", iter(()))


def test_training_from_one_slice_equals_training_from_the_arrays(tmp_path):
    x, y, g = _pairs(96, dx=12, dy=8)
    x[:, 0] = 0.0  # back to a plain feature
    lake = Lake(tmp_path)
    write_pairs(lake, "pairs", [(x, y, g)])
    cfgs = (
        AdapterConfig(depth=1, expansion=2, dropout=0.0, output_dim=8),
        FuseMixConfig(),
        TrainConfig(batch_size=32, epochs=3, warmup_steps=2, loss="masked", seed=3),
    )
    in_memory = train_adapters(x, y, *cfgs, groups=g)
    streamed = train_adapters(None, None, *cfgs, chunks=lance_chunks(lake, "pairs", chunk_rows=1000))
    assert in_memory.steps == streamed.steps > 0
    np.testing.assert_allclose(
        [h["loss"] for h in streamed.history], [h["loss"] for h in in_memory.history], rtol=1e-6
    )


def _experiment_metrics(tmp_path, monkeypatch, stream: bool) -> tuple[dict, object]:
    import dagster as dg

    from app.definitions import build_defs
    from pipelines.partitions import sync_partitions
    from tests.pipeline_fixture import make_project

    monkeypatch.setenv("FUSEMIX_HOME", str(tmp_path / "home"))
    if stream:
        monkeypatch.setenv("FUSEMIX_STREAM_PAIRS", "0")
    else:
        monkeypatch.delenv("FUSEMIX_STREAM_PAIRS", raising=False)
    project = make_project(tmp_path)
    defs, parts = build_defs(project.configs, resources=project.resources())
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        sync_partitions(parts, instance)

        def run(job, key, config=None):
            result = defs.resolve_job_def(job).execute_in_process(
                partition_key=key, instance=instance, run_config=config or {}
            )
            assert result.success, job

        run("ingest_job", "shapes", {"ops": {"ingest": {"config": {"progress": False}}}})
        for enc in ("tiny-image", "tiny-text"):
            run(
                "extract_job",
                parts.extract_key("shapes", enc),
                {"ops": {"latents": {"config": {"progress": False}}}},
            )
        run("experiment_job", "shapes-fusemix")
    lake = project.resources()["lake"].lake()
    rows = lake.read("metrics").to_pylist()
    return {
        (r["gallery"], r["metric"]): r["value"]
        for r in rows
        if r["experiment"] == "shapes-fusemix" and r["split"] == "test"
    }, lake


def test_the_pipeline_trains_from_lance_when_the_split_is_large_and_gets_the_same_model(
    tmp_path, monkeypatch
):
    in_memory, lake_a = _experiment_metrics(tmp_path / "a", monkeypatch, stream=False)
    streamed, lake_b = _experiment_metrics(tmp_path / "b", monkeypatch, stream=True)
    assert "trainpairs__shapes-fusemix" not in lake_a.tables()
    pairs = lake_b.read("trainpairs__shapes-fusemix")
    curated = lake_b.read("curated__shapes-fusemix").to_pylist()
    assert len(pairs) == sum(r["split"] == "train" for r in curated) > 0
    # One slice holds the tiny split, so the streamed run sees the same batches: the same metrics.
    assert streamed.keys() == in_memory.keys() and ("pooled", "t2i_recall_at_1") in streamed
    for key, value in in_memory.items():
        assert streamed[key] == pytest.approx(value, abs=1e-6), key
