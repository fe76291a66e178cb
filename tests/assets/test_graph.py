"""The whole asset graph materialised in-process on the tiny project (see conftest.py), checked
against what each stage wrote: Lance tables, the MLflow run, the checkpoint, the report, DuckDB views.

    .venv/bin/pytest -q tests/assets/test_graph.py
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow.compute as pc
import pytest

from fusion.data.readers import read_dataset
from fusion.encoders import load_registry
from pipelines.catalog import Catalog
from pipelines.lake import arrow_to_vectors
from tests.assets.conftest import (
    check_evaluations,
    materialization,
    metadata,
    mlflow_client,
)

RECALLS = [f"{d}_recall_at_{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)]


def _encoders(graph):
    return graph.project.resources()["encoders"]


def test_every_run_but_the_broken_ones_succeeds(graph):
    failed = {label: r.run_id for label, r in graph.runs.items() if not r.success}
    assert set(failed) == {"experiment:broken", "experiment:unextracted", "experiment:nan"}


def test_ingest_writes_media_pairs_and_one_quarantine_row(graph):
    lk, p = graph.lake(), graph.project
    media = lk.read("media__shapes", ["media_id", "modality", "text"])
    modality = media["modality"].to_pylist()
    assert modality.count("image") == p.n_media == 36
    pairs = lk.read("pairs__shapes")
    assert len(pairs) == p.n_pairs
    # Captions are shared by the 3 pictures of a concept: one text item per distinct caption.
    captions = set(pairs["caption_id"].to_pylist())
    texts = set(pc.filter(media["media_id"], pc.equal(media["modality"], "text")).to_pylist())
    assert texts == captions
    assert len(texts) == 24
    assert set(pairs["media_id"].to_pylist()) == set(
        pc.filter(media["media_id"], pc.equal(media["modality"], "image")).to_pylist()
    )
    assert len(set(media["media_id"].to_pylist())) == len(media)

    quarantine = lk.read("quarantine__shapes")
    assert len(quarantine) == 1
    row = quarantine.to_pylist()[0]
    direct = read_dataset(
        "manifest", str(p.data), name="shapes", modality="image", progress=False, license="CC0-1.0"
    )
    assert [(q.item, q.reason) for q in direct.quarantine] == [(row["item"], row["reason"])]
    # The manifest's last line (header + 72 rows + 1) names a file that does not exist.
    assert row["item"] == "manifest.csv:74"
    assert row["reason"] == "missing"
    assert "missing.png" in row["detail"]
    assert row["stage"] == "ingest"

    meta = metadata(graph.runs["ingest"], "quarantine")
    assert meta["quarantined"] == 1
    assert meta["reasons"] == {row["reason"]: 1}
    assert metadata(graph.runs["ingest"], "pairs")["pairs"] == p.n_pairs


def test_extract_encodes_each_unique_item_once_with_the_encoder_dims(graph):
    lk, enc = graph.lake(), _encoders(graph)
    media = lk.read("media__shapes", ["media_id", "modality"])
    for name, modality in (("tiny-image", "image"), ("tiny-text", "text")):
        want = set(pc.filter(media["media_id"], pc.equal(media["modality"], modality)).to_pylist())
        lat = lk.read(f"latents__shapes__{name}")
        ids = lat["media_id"].to_pylist()
        assert len(ids) == len(set(ids)) == len(want)
        assert set(ids) == want
        encoder = enc.get(name)
        assert lat.schema.field("vector").type.list_size == encoder.dim
        assert set(lat["fingerprint"].to_pylist()) == {encoder.fingerprint}
        meta = metadata(graph.runs[f"extract:{name}"], "latents")
        assert meta["items_encoded"] == meta["items_total"] == len(want)
        assert meta["dimension"] == encoder.dim
        assert meta["fingerprint"] == encoder.fingerprint
        assert meta["items_failed"] == 0
    # The text encoder saw 24 distinct captions, not the 72 pairs that use them.
    assert metadata(graph.runs["extract:tiny-text"], "latents")["items_encoded"] == 24
    # The audio encoder does not apply to an image dataset: nothing was extracted for it.
    assert not lk.exists("latents__shapes__tiny-audio")


def test_curate_quantity_selects_n_train_pairs_and_keeps_val_and_test(graph):
    lk = graph.lake()
    pairs = lk.read("pairs__shapes")
    split = pairs["split"].to_pylist()
    n12 = lk.read("curated__shapes-n12")
    n12_split = n12["split"].to_pylist()
    assert n12_split.count("train") == 12
    assert n12_split.count("val") == split.count("val") > 0
    assert n12_split.count("test") == split.count("test") > 0
    train_ids = set(pc.filter(pairs["pair_id"], pc.equal(pairs["split"], "train")).to_pylist())
    chosen = set(pc.filter(n12["pair_id"], pc.equal(n12["split"], "train")).to_pylist())
    assert chosen < train_ids
    meta = metadata(graph.runs["experiment:shapes-n12"], "curated")
    assert meta["selected_train_pairs"] == 12
    assert meta["candidates"] == len(train_ids)
    assert meta["pairs_without_latents"] == 0
    # 'all' keeps every pair.
    full = lk.read("curated__shapes-fusemix")
    assert sorted(full["pair_id"].to_pylist()) == sorted(pairs["pair_id"].to_pylist())


def test_curate_diversity_reads_the_image_latents(graph):
    run = graph.runs["curate:shapes-diverse"]
    assert run.success
    assert materialization(run, "adapters") is None  # only curated was selected
    meta = metadata(run, "curated")
    assert meta["strategy"] == "diversity" and meta["selected_train_pairs"] == 8
    cur = graph.lake().read("curated__shapes-diverse")
    train = pc.filter(cur["pair_id"], pc.equal(cur["split"], "train")).to_pylist()
    assert len(train) == len(set(train)) == 8
    assert set(train) < set(graph.lake().read("pairs__shapes")["pair_id"].to_pylist())
    (ev,) = check_evaluations(run, "latents_ready")
    assert ev.passed


def test_latents_ready_passes_on_a_complete_extraction(graph):
    for label in ("experiment:shapes-fusemix", "experiment:shapes-n12", "experiment:repaired"):
        (ev,) = check_evaluations(graph.runs[label], "latents_ready")
        assert ev.passed, (label, ev.description)
        checked = ev.metadata["checked"].value
        assert checked["tiny-image"]["missing"] == checked["tiny-text"]["missing"] == 0
        assert checked["tiny-image"]["items"] == 36


def test_latents_ready_blocks_training_when_a_latent_is_missing(graph):
    broken = graph.runs["experiment:broken"]
    (ev,) = check_evaluations(broken, "latents_ready")
    assert not ev.passed
    assert ev.metadata["checked"].value["tiny-image"]["missing"] == 1
    assert "1 of 36 media_id without a current tiny-image latent" in ev.description
    # Blocking: neither the adapters nor the metrics downstream of them were materialised.
    assert materialization(broken, "curated") is not None
    assert materialization(broken, "adapters") is None
    assert materialization(broken, "retrieval_metrics") is None


def test_latents_ready_fails_clearly_when_an_encoder_was_never_extracted(graph):
    run = graph.runs["experiment:unextracted"]
    (ev,) = check_evaluations(run, "latents_ready")
    assert not ev.passed
    assert (
        "no latents__shapes__tiny-text-2 table: run extract_job for (shapes, tiny-text-2)" in ev.description
    )
    checked = ev.metadata["checked"].value
    assert checked["tiny-text-2"]["missing"] == checked["tiny-text-2"]["items"] == 24
    assert checked["tiny-image"]["missing"] == 0
    # curate() had no caption latents, so it kept no pair; the check stops training on nothing.
    assert metadata(run, "curated")["pairs_without_latents"] == graph.project.n_pairs
    assert materialization(run, "adapters") is None
    assert not (graph.project.home / "models" / "shapes-unextracted").exists()


def test_latents_ready_blocks_training_on_a_nan_latent(graph):
    run = graph.runs["experiment:nan"]
    (ev,) = check_evaluations(run, "latents_ready")
    assert not ev.passed
    dim = _encoders(graph).get("tiny-text").dim
    assert f"{dim} NaN/inf values in tiny-text latents" in ev.description
    checked = ev.metadata["checked"].value
    assert checked["tiny-text"]["nonfinite"] == dim and checked["tiny-text"]["missing"] == 0
    assert checked["tiny-image"]["nonfinite"] == 0
    assert materialization(run, "adapters") is None


def test_incremental_extraction_repairs_exactly_the_missing_latent(graph):
    meta = metadata(graph.runs["extract:tiny-image:repair"], "latents")
    assert meta["items_encoded"] == 1
    lk = graph.lake()
    assert lk.count("latents__shapes__tiny-image") == graph.notes["latents_before_removal"]
    assert graph.notes["removed_latent"] in lk.ids("latents__shapes__tiny-image")
    assert metadata(graph.runs["extract:tiny-text:repair"], "latents")["items_encoded"] == 1
    text = lk.read("latents__shapes__tiny-text", filter=f"media_id = '{graph.notes['nan_latent']}'")
    assert len(text) == 1 and np.isfinite(arrow_to_vectors(text["vector"])).all()
    # Same inputs as the first training: the repaired run does not retrain.
    assert metadata(graph.runs["experiment:repaired"], "adapters")["skipped"] is True
    assert graph.notes["mlflow_runs_after_repair"] == graph.notes["mlflow_runs_before_rerun"]


def test_train_writes_checkpoint_and_mlflow_run(graph):
    meta = metadata(graph.runs["experiment:shapes-fusemix"], "adapters")
    ckpt = graph.project.home / "models" / "shapes-fusemix"
    assert (ckpt / "adapters.safetensors").stat().st_size > 0
    assert (ckpt / "config.json").is_file()
    assert meta["checkpoint"] == str(ckpt)
    assert meta.get("skipped") is None

    client = mlflow_client(graph.project)
    run = client.get_run(meta["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    enc = _encoders(graph)
    assert params["media_encoder"] == "tiny-image"
    assert params["text_encoder"] == "tiny-text"
    assert params["media_fingerprint"] == enc.get("tiny-image").fingerprint
    assert params["text_fingerprint"] == enc.get("tiny-text").fingerprint
    exp = graph.parts.experiments["shapes-fusemix"]
    assert params["fusemix.mode"] == str(exp.fusemix.mode)
    assert params["train.epochs"] == "3"
    versions = meta["read_versions"]
    assert set(versions) == {
        "curated__shapes-fusemix",
        "latents__shapes__tiny-image",
        "latents__shapes__tiny-text",
    }
    assert {k: params[f"lance.{k}"] for k in versions} == {k: str(v) for k, v in versions.items()}

    steps = meta["steps"]
    assert steps > 0
    for name in ("train_loss", "temperature"):
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == sorted({m.step for m in history})
        assert len(history) == steps, name
        assert all(math.isfinite(m.value) for m in history)
    temps = [m.value for m in client.get_metric_history(run.info.run_id, "temperature")]
    assert all(0.001 <= t <= 0.5 for t in temps)
    assert run.data.metrics["batch_size"] == exp.train.batch_size == 16  # the batch the loss saw

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapters")}
    assert {"adapters/adapters.safetensors", "adapters/config.json"} <= artifacts


def test_evaluate_writes_metrics_rows_mlflow_metrics_and_report(graph):
    lk = graph.lake()
    meta = metadata(graph.runs["experiment:shapes-fusemix"], "retrieval_metrics")
    every = lk.read("metrics", filter="experiment = 'shapes-fusemix'")
    assert set(every["split"].to_pylist()) == {"test", "val"}  # val rows: what selection reads
    rows = lk.read("metrics", filter="experiment = 'shapes-fusemix' AND split = 'test'")
    values = dict(zip(rows["metric"].to_pylist(), rows["value"].to_pylist(), strict=True))
    assert set(RECALLS) <= set(values)
    for m in RECALLS:
        assert 0.0 <= values[m] <= 1.0, m
        assert values[m] == pytest.approx(meta[m])
    # Recall@10 over 6 test items finds everything.
    assert values["test_items"] == 6
    assert values["t2i_recall_at_10"] == values["i2t_recall_at_10"] == 1.0
    assert set(every["mlflow_run_id"].to_pylist()) == {meta["mlflow_run_id"]}

    train_meta = metadata(graph.runs["experiment:shapes-fusemix"], "adapters")
    assert meta["mlflow_run_id"] == train_meta["mlflow_run_id"]
    client = mlflow_client(graph.project)
    logged = client.get_run(meta["mlflow_run_id"]).data.metrics
    for m in RECALLS:
        assert logged[m] == pytest.approx(values[m])

    report = graph.project.home / "reports" / "shapes-fusemix" / "report.md"
    assert meta["report_path"] == str(report)
    text = report.read_text()
    pngs = sorted(p.name for p in report.parent.glob("*.png"))
    assert pngs
    for png in pngs:
        assert png in text
        assert (report.parent / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report_artifacts = {a.path for a in client.list_artifacts(meta["mlflow_run_id"], "report")}
    assert "report/report.md" in report_artifacts


def test_non_blocking_checks_report(graph):
    (rate,) = check_evaluations(graph.runs["ingest"], "quarantine_rate")
    assert rate.passed
    assert rate.metadata["quarantined"].value == 1
    assert rate.metadata["pairs"].value == graph.project.n_pairs
    (chance,) = check_evaluations(graph.runs["experiment:shapes-fusemix"], "recall_above_chance")
    rows = graph.lake().read("metrics", filter="experiment = 'shapes-fusemix' AND split = 'test'")
    values = dict(zip(rows["metric"].to_pylist(), rows["value"].to_pylist(), strict=True))
    # Test split: 2 concepts x 3 pictures, 2 captions per concept. A caption is correct for 3 of the
    # 6 pictures and a picture for 2 of the 4 captions: a random ranking's Recall@1 is 1/2 both ways.
    assert values["chance_t2i_recall_at_1"] == pytest.approx(0.5)
    assert values["chance_i2t_recall_at_1"] == pytest.approx(0.5)
    meta = {k: v.value for k, v in chance.metadata.items()}
    assert meta["chance_t2i"] == pytest.approx(0.5) and meta["chance_i2t"] == pytest.approx(0.5)
    t2i, i2t = values["t2i_recall_at_1"], values["i2t_recall_at_1"]
    assert meta["t2i_recall_at_1"] == pytest.approx(t2i) and meta["i2t_recall_at_1"] == pytest.approx(i2t)
    # Random tiny encoders: pass or not, the verdict must follow the numbers it reports.
    assert chance.passed == (t2i > 0.5 and i2t > 0.5)


def test_rerun_with_nothing_changed_does_not_retrain(graph):
    again = graph.runs["experiment:shapes-fusemix:again"]
    first = metadata(graph.runs["experiment:shapes-fusemix"], "adapters")
    meta = metadata(again, "adapters")
    assert meta["skipped"] is True
    assert meta["inputs_hash"] == first["inputs_hash"]
    assert meta["mlflow_run_id"] == first["mlflow_run_id"]
    assert metadata(again, "retrieval_metrics")["skipped"] is True
    assert graph.notes["mlflow_runs_after_rerun"] == graph.notes["mlflow_runs_before_rerun"] == 2


def test_every_table_the_graph_wrote_has_its_schema(graph):
    from pipelines.schemas import parse_table_name, schema_of

    lk = graph.lake()
    kinds = set()
    for name in lk.tables():
        parsed = parse_table_name(name)
        assert parsed is not None, f"{name} is not a table of pipelines.schemas"
        kinds.add(parsed[0])
        schema = lk.open(name).schema
        dim = schema.field("vector").type.list_size if parsed[0] in ("latents", "embeddings") else None
        assert schema.equals(schema_of(name, dim), check_metadata=False), name
    assert kinds == {"media", "pairs", "quarantine", "latents", "curated", "metrics", "ranks", "embeddings"}


def test_embeddings_serve_the_trained_space(graph):
    """The experiment job embeds every item for search; unchanged inputs are not rewritten, new
    latents are; the search finds a stored picture by its own bytes and a caption by its text."""
    from pipelines.registries import load_datasets
    from pipelines.search import Searcher

    first = metadata(graph.runs["experiment:shapes-fusemix"], "embeddings")
    assert (first["rows_image"], first["rows_text"]) == (36, 24)
    assert first["written_image"] and first["written_text"] and not first["indexed_image"]
    again = metadata(graph.runs["experiment:shapes-fusemix:again"], "embeddings")
    assert again["skipped"] is True and again["inputs_hash"] == first["inputs_hash"]
    assert again["lance_version_image"] == first["lance_version_image"]
    assert materialization(graph.runs["experiment:broken"], "embeddings") is None
    # One latent deleted and extracted again: the same checkpoint, new Lance versions, new rows.
    repaired = metadata(graph.runs["experiment:repaired"], "embeddings")
    assert repaired["written_image"] and repaired["inputs_hash"] != first["inputs_hash"]
    lk, p = graph.lake(), graph.project
    assert lk.count("embeddings__shapes-fusemix__image") == 36
    searcher = Searcher(
        lk,
        p.home / "models",
        load_registry(p.configs / "encoders.yaml"),
        datasets=load_datasets(p.configs / "datasets.yaml"),
        data_cache=p.home / "cache" / "data",
    )
    assert {e["name"] for e in searcher.experiments()} == {"shapes-fusemix", "shapes-n12"}
    picture = lk.read("media__shapes", ["media_id", "path"], "modality = 'image'").to_pylist()[0]
    data, kind = searcher.media_bytes("shapes", picture["media_id"])
    assert kind == "image/png"
    top = searcher.query("shapes-fusemix", "image", image=data, k=3)[0]
    assert top["media_id"] == picture["media_id"] and top["score"] == pytest.approx(1.0, abs=1e-4)
    top = searcher.query("shapes-fusemix", "text", text="a red square", k=3)[0]
    assert top["text"] == "a red square" and top["score"] == pytest.approx(1.0, abs=1e-4)
    found = searcher.query("shapes-fusemix", "image", text="a red square", k=5)
    assert len(found) == 5 and all(r["captions"] for r in found)


def test_duckdb_catalog_over_the_lake(graph):
    lk = graph.lake()
    cat = Catalog(graph.project.home / "lance")
    best = cat.saved("best_runs").to_pylist()  # a row per experiment and split
    assert sorted((r["experiment"], r["split"]) for r in best) == [
        (e, s) for e in ("shapes-fusemix", "shapes-n12") for s in ("test", "val")
    ]
    for r in best:
        assert r["metric"] == "t2i_recall_at_1"
        where = f"experiment = '{r['experiment']}' AND split = '{r['split']}' AND metric = 't2i_recall_at_1'"
        assert r["value"] == pytest.approx(max(lk.read("metrics", filter=where)["value"].to_pylist()))
    test = cat.saved("best_runs", split="test").to_pylist()
    assert sorted((r["experiment"], r["split"]) for r in test) == [
        ("shapes-fusemix", "test"),
        ("shapes-n12", "test"),
    ]

    per = {(r["dataset"], r["encoder"]): r for r in cat.saved("latents_per_encoder").to_pylist()}
    registry = load_registry(graph.project.configs / "encoders.yaml")
    assert set(per) == {("shapes", "tiny-image"), ("shapes", "tiny-text")}
    for (_, name), r in per.items():
        assert r["latents"] == lk.count(f"latents__shapes__{name}")
        assert r["n_fingerprints"] == 1
        assert r["dim"] == _encoders(graph).get(name).dim
        assert registry[name].modality in ("image", "text")


def test_quarantine_reasons_query(graph):
    rows = Catalog(graph.project.home / "lance").saved("quarantine_reasons").to_pylist()
    assert [(r["dataset"], r["reason"], r["n"], r["example_item"]) for r in rows] == [
        ("shapes", "missing", 1, "manifest.csv:74")
    ]


def test_extracting_with_an_encoder_of_another_modality_fails_clearly(graph):
    result = graph.job("extract_job").execute_in_process(
        partition_key=graph.parts.extract_key("shapes", "tiny-audio"),
        instance=graph.instance,
        raise_on_error=False,
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.event_specific_data.error.message
    assert "encoder tiny-audio (audio) does not apply to dataset shapes (image + text)" in message
    assert not graph.lake().exists("latents__shapes__tiny-audio")


def test_reingesting_unchanged_data_keeps_media_and_latents(graph):
    lk = graph.lake()
    before = lk.versions(["media__shapes", "latents__shapes__tiny-image", "latents__shapes__tiny-text"])
    pairs_before = sorted(lk.read("pairs__shapes")["pair_id"].to_pylist())
    result = graph.job("ingest_job").execute_in_process(
        partition_key="shapes",
        instance=graph.instance,
        run_config={"ops": {"ingest": {"config": {"progress": False}}}},
    )
    assert result.success
    media = metadata(result, "media")
    assert media["new_media"] == media["removed_media"] == 0
    # Media rows are insert-only: an unchanged dataset writes no media commit, so latents stay valid.
    assert lk.versions(list(before)) == before
    assert sorted(lk.read("pairs__shapes")["pair_id"].to_pylist()) == pairs_before
    assert lk.count("quarantine__shapes") == 1


def test_diversity_labels_on_a_sample_assign_the_rest_chunk_by_chunk(graph, monkeypatch):
    import fusion.selection as selection
    from pipelines.curate import diversity_labels, latents_for

    lake, exp = graph.lake(), graph.parts.experiments["shapes-diverse"]
    fp = graph.project.resources()["encoders"].ref("tiny-image").fingerprint
    ids = sorted(lake.ids("latents__shapes__tiny-image"))
    monkeypatch.setattr(selection, "KMEANS_SAMPLE", 10)
    labels = diversity_labels(lake, exp, ids, fp, k=3, seed=1, chunk=7)
    whole = latents_for(lake, "shapes", "tiny-image", ids, fp)
    fit = selection.diversity_sample(len(ids), 1)
    _, centres = selection.kmeans(whole[fit], 3, seed=1)
    assert len(fit) == 10 < len(ids)
    np.testing.assert_array_equal(labels, selection.assign(whole, centres))
