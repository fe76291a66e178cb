"""Experiment methods, seeds, zero-shot scoring on another dataset and per-group galleries, through
real Dagster materialisations on the tiny project (tests.pipeline_fixture).

`methods` (module scope) adds a second dataset (`shapes-copy`, the same pictures ingested under
another name) and two experiments scored on both: `shapes-seeds` (FuseMix adapters, 2 seeds, one
gallery per concept) and `shapes-asif` (the training-free ASIF baseline, 2 seeds, ranked with CSLS); then it runs the
family's ablation report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pytest
import yaml

from pipelines.partitions import sync_partitions
from tests.assets.conftest import mlflow_client
from tests.pipeline_fixture import make_project

ENCODERS = ("tiny-image", "tiny-text")


@pytest.fixture(scope="module")
def methods(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("methods")
    old_home = os.environ.get("FUSEMIX_HOME")
    os.environ["FUSEMIX_HOME"] = str(Path(tmp) / "home")
    try:
        from app.definitions import build_defs

        project = make_project(tmp, epochs=2)
        ds = yaml.safe_load((project.configs / "datasets.yaml").read_text())
        ds["datasets"]["shapes-copy"] = dict(ds["datasets"]["shapes"])
        (project.configs / "datasets.yaml").write_text(yaml.safe_dump(ds))
        exps = yaml.safe_load((project.configs / "experiments.yaml").read_text())
        base = {**exps["experiments"]["shapes-fusemix"], "family": "methods", "seeds": 2}
        base["eval_datasets"] = ["shapes-copy"]
        exps["experiments"] = {
            "shapes-seeds": {**base, "variable": "fusemix", "group_by": "concept"},
            "shapes-asif": {**base, "variable": "asif", "method": "asif", "hubness": "csls"},
            # Quality without hand-made scores: the best-agreeing half under a cross-fitted alignment.
            "shapes-align": {**base, "select": {"strategy": "quality", "score": "alignment", "keep": 0.5}},
        }
        (project.configs / "experiments.yaml").write_text(yaml.safe_dump(exps))
        defs, parts = build_defs(project.configs, resources=project.resources())
        (Path(tmp) / "dagster").mkdir()
        with dg.instance_for_test(temp_dir=str(Path(tmp) / "dagster")) as instance:
            sync_partitions(parts, instance)
            runs = {}

            def run(label, job, key, **kw):
                runs[label] = defs.resolve_job_def(job).execute_in_process(
                    partition_key=key, instance=instance, raise_on_error=False, **kw
                )
                return runs[label]

            for name in ("shapes", "shapes-copy"):
                run(f"ingest:{name}", "ingest_job", name)
                for enc in ENCODERS:
                    run(f"extract:{name}:{enc}", "extract_job", parts.extract_key(name, enc))
            for exp in ("shapes-seeds", "shapes-asif"):
                run(exp, "experiment_job", exp)
            run("report", "report_job", "methods")
            run("align", "experiment_job", "shapes-align", asset_selection=[dg.AssetKey("curated")])
            yield project, defs, parts, instance, runs, run
    finally:
        if old_home is None:
            os.environ.pop("FUSEMIX_HOME", None)
        else:
            os.environ["FUSEMIX_HOME"] = old_home


def _rows(project, experiment: str, split: str = "test") -> list[dict]:
    lake = project.resources()["lake"].lake()
    return [
        r for r in lake.read("metrics").to_pylist() if r["experiment"] == experiment and r["split"] == split
    ]


def test_every_run_succeeds(methods):
    _, _, _, _, runs, _ = methods
    assert {label: r.success for label, r in runs.items()} == dict.fromkeys(runs, True)


def test_each_seed_is_a_checkpoint_and_an_mlflow_run(methods):
    project = methods[0]
    base = project.home / "models" / "shapes-seeds"
    seeds = {0: base, 1: base / "seeds" / "1"}
    client = mlflow_client(project)
    run_ids = set()
    for seed, folder in seeds.items():
        config = json.loads((folder / "config.json").read_text())
        assert config["extra"]["seed"] == seed
        run_ids.add(config["extra"]["summary"]["mlflow_run_id"])
        assert client.get_run(config["extra"]["summary"]["mlflow_run_id"]).data.tags["seed"] == str(seed)
    assert len(run_ids) == 2
    w0, w1 = ((f / "adapters.safetensors").read_bytes() for f in seeds.values())
    assert w0 != w1  # another seed, another model


def test_aggregate_rows_are_the_mean_and_std_of_the_seed_rows(methods):
    rows = _rows(methods[0], "shapes-seeds")
    per_seed = [r for r in rows if r["seed"] is not None]
    agg = {(r["dataset"], r["gallery"], r["metric"]): r for r in rows if r["seed"] is None}
    assert {r["seed"] for r in per_seed} == {0, 1}
    assert {(d, g) for d, g, _ in agg} == {
        ("shapes", "pooled"),
        ("shapes", "per_concept"),
        ("shapes-copy", "pooled"),
        ("shapes-copy", "per_concept"),
    }
    for (dataset, gallery, metric), a in agg.items():
        values = [
            r["value"]
            for r in per_seed
            if (r["dataset"], r["gallery"], r["metric"]) == (dataset, gallery, metric)
        ]
        assert len(values) == 2 and a["n_seeds"] == 2
        assert a["value"] == pytest.approx(np.mean(values))
        assert a["std"] == pytest.approx(np.std(values, ddof=1))


@pytest.mark.parametrize("experiment", ["shapes-seeds", "shapes-asif"])
def test_each_seed_is_scored_on_its_val_split_with_the_r_sum_selection_reads(methods, experiment):
    rows = _rows(methods[0], experiment, "val")
    assert {(r["dataset"], r["gallery"]) for r in rows} == {("shapes", "pooled")}  # own dataset only
    by_seed: dict = {}
    for r in rows:
        by_seed.setdefault(r["seed"], {})[r["metric"]] = r["value"]
    assert set(by_seed) == {0, 1, None}
    for seed in (0, 1):
        recalls = [by_seed[seed][f"{d}_recall_at_{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)]
        assert by_seed[seed]["rsum"] == pytest.approx(sum(recalls))
    assert by_seed[None]["rsum"] == pytest.approx((by_seed[0]["rsum"] + by_seed[1]["rsum"]) / 2)
    # The test rows (the headline) hold no val metric.
    assert all(r["metric"] != "rsum" for r in _rows(methods[0], experiment))


def test_the_family_report_names_the_variable_with_the_best_validation_r_sum(methods):
    project = methods[0]
    val = {e: _rows(project, e, "val") for e in ("shapes-seeds", "shapes-asif")}
    mean = {
        e: next(r["value"] for r in rows if r["seed"] is None and r["metric"] == "rsum")
        for e, rows in val.items()
    }
    text = (project.home / "reports" / "families" / "methods.md").read_text()
    section = text.split("## Chosen on validation", 1)[1]
    variable = {"shapes-seeds": "fusemix", "shapes-asif": "asif"}
    chosen = [e for e in mean if f"Chosen on validation: **{variable[e]}** ({e})" in section]
    assert len(chosen) == 1 and mean[chosen[0]] == max(mean.values())
    assert f"{100 * mean[chosen[0]]:.1f}" in section


def test_embeddings_refuse_a_checkpoint_whose_training_run_did_not_finish(methods):
    project, _, _, _, _, run = methods
    client = mlflow_client(project)
    config = json.loads((project.home / "models" / "shapes-seeds" / "config.json").read_text())
    run_id = config["extra"]["summary"]["mlflow_run_id"]
    embed = {"asset_selection": [dg.AssetKey("embeddings")]}
    force = {"ops": {"embeddings": {"config": {"force": True}}}}
    client.set_terminated(run_id, "KILLED")  # as a training killed after it saved its files
    try:
        result = run("embed:killed", "experiment_job", "shapes-seeds", run_config=force, **embed)
    finally:
        client.set_terminated(run_id, "FINISHED")
    assert not result.success
    errors = [e.event_specific_data.error.to_string() for e in result.all_events if e.is_step_failure]
    assert any(
        f"experiment shapes-seeds: MLflow run {run_id} (KILLED) did not finish" in m for m in errors
    ), errors
    assert run("embed:finished", "experiment_job", "shapes-seeds", run_config=force, **embed).success


def test_the_copy_scores_like_the_original_and_groups_are_smaller_galleries(methods):
    # shapes-copy holds the very same pictures and captions: zero-shot on it must give the same numbers.
    rows = _rows(methods[0], "shapes-seeds")
    value = {(r["dataset"], r["gallery"], r["seed"], r["metric"]): r["value"] for r in rows}
    for (dataset, gallery, seed, metric), v in value.items():
        if dataset == "shapes":
            assert value[("shapes-copy", gallery, seed, metric)] == pytest.approx(v)
    # One gallery per concept: fewer candidates, so chance is higher than in the pooled gallery.
    pooled, grouped = (
        value[("shapes", g, None, "chance_t2i_recall_at_1")] for g in ("pooled", "per_concept")
    )
    assert grouped > pooled
    assert value[("shapes", "per_concept", None, "groups")] == 2.0


def test_asif_is_a_baseline_checkpoint_scored_like_the_adapters(methods):
    project = methods[0]
    config = json.loads((project.home / "models" / "shapes-asif" / "config.json").read_text())
    assert config["kind"] == "baseline" and config["method"] == "asif"
    chosen = config["extra"]["summary"]["chosen"]
    assert chosen["selected_by"] == "val"
    params = mlflow_client(project).get_run(config["extra"]["summary"]["mlflow_run_id"]).data.params
    assert params["method"] == "asif" and params["chosen.k"] == str(chosen["k"])
    rows = _rows(project, "shapes-asif")
    assert {r["method"] for r in rows} == {"asif"}
    metrics = {r["metric"] for r in rows if r["seed"] is None and r["dataset"] == "shapes"}
    assert {"t2i_recall_at_1", "i2t_recall_at_10", "chance_t2i_recall_at_1"} <= metrics


def test_alignment_quality_keeps_the_asked_share_of_train_pairs_and_all_of_val_and_test(methods):
    project = methods[0]
    lake = project.resources()["lake"].lake()
    curated = lake.read("curated__shapes-align").to_pylist()
    pairs = [p for p in lake.read("pairs__shapes").to_pylist() if p["caption_id"] is not None]
    n_train = sum(p["split"] == "train" for p in pairs)
    kept = [r for r in curated if r["split"] == "train"]
    assert len(kept) == round(0.5 * n_train)
    assert len({r["pair_id"] for r in kept}) == len(kept)
    for split in ("val", "test"):
        assert sum(r["split"] == split for r in curated) == sum(p["split"] == split for p in pairs)


def test_the_family_report_shows_both_methods_with_their_spread(methods):
    project, _, _, _, runs, _ = methods
    report = project.home / "reports" / "families" / "methods.md"
    text = report.read_text()
    assert "shapes-seeds" in text and "shapes-asif" in text and "±" in text
    meta = runs["report"].asset_materializations_for_node("ablation_report")[0].metadata
    parent = meta["mlflow_parent_run_id"].value
    assert mlflow_client(project).get_run(parent).info.run_name == "family:methods"


def test_scoring_another_dataset_refuses_latents_of_another_fingerprint(methods):
    project, _, _, _, _, run = methods
    lake = project.resources()["lake"].lake()
    table = "latents__shapes-copy__tiny-text"
    rows = lake.read(table)
    stale = pa.array([f"{f}-old" for f in rows["fingerprint"].to_pylist()])
    lake.overwrite(table, rows.set_column(rows.schema.get_field_index("fingerprint"), "fingerprint", stale))
    force = {"ops": {"retrieval_metrics": {"config": {"force": True}}}}
    result = run("stale", "experiment_job", "shapes-seeds", run_config=force)
    assert not result.success
    errors = [e.event_specific_data.error.to_string() for e in result.all_events if e.is_step_failure]
    assert any("shapes-copy" in m and "run extract_job for (shapes-copy" in m for m in errors), errors
    lake.overwrite(table, rows)  # the other tests of this module keep a consistent lake


def test_scoring_a_dataset_that_was_never_ingested_says_which_jobs_to_run(methods):
    project, _, _, _, _, run = methods
    lake = project.resources()["lake"].lake()
    folder = Path(lake.uri("pairs__shapes-copy"))
    aside = folder.with_name("aside.lance.tmp")
    folder.rename(aside)  # as on a lake where shapes-copy was never ingested
    try:
        force = {"ops": {"retrieval_metrics": {"config": {"force": True}}}}
        result = run("not-ingested", "experiment_job", "shapes-seeds", run_config=force)
    finally:
        aside.rename(folder)
    assert not result.success
    errors = [e.event_specific_data.error.to_string() for e in result.all_events if e.is_step_failure]
    assert any(
        "shapes-copy, which is not ingested yet: run ingest_job for shapes-copy" in m for m in errors
    ), errors


@pytest.mark.parametrize("experiment", ["shapes-seeds", "shapes-asif"])
def test_stored_ranks_give_back_every_recall_and_mean_rank_of_the_metrics_table(methods, experiment):
    project = methods[0]
    lake = project.resources()["lake"].lake()
    ranks = [r for r in lake.read("ranks").to_pylist() if r["experiment"] == experiment]
    metrics = {
        (r["dataset"], r["gallery"], r["seed"], r["metric"]): r["value"]
        for r in _rows(project, experiment)
        if r["seed"] is not None
    }
    scored = {(d, g, s) for d, g, s, _ in metrics}
    assert {(r["dataset"], r["gallery"], r["seed"]) for r in ranks} == scored
    assert {r["split"] for r in ranks} == {"test"}
    key = next(r["inputs_hash"] for r in _rows(project, experiment))
    assert {r["inputs_hash"] for r in ranks} == {key}
    # Each query carries its concept (what the paired bootstrap resamples), as the pairs name it.
    for dataset in {r["dataset"] for r in ranks}:
        pairs = lake.read(f"pairs__{dataset}").to_pylist()
        concept = {p[c]: p["concept"] for p in pairs for c in ("media_id", "caption_id") if p[c]}
        mine = [r for r in ranks if r["dataset"] == dataset]
        assert all(r["concept"] is not None for r in mine)
        assert all(r["concept"] == concept[r["query"]] for r in mine)
    for dataset, gallery, seed in scored:
        for direction in ("t2i", "i2t"):
            mine = [
                r for r in ranks
                if (r["dataset"], r["gallery"], r["seed"], r["direction"]) == (dataset, gallery, seed, direction)
            ]  # fmt: skip
            groups: dict[str, list[int]] = {}
            for r in mine:
                groups.setdefault(r["group_name"], []).append(r["rank"])
            assert len({(r["group_name"], r["query"]) for r in mine}) == len(mine)  # one rank a query
            if gallery == "pooled":
                assert list(groups) == [""]
            else:
                assert len(groups) == metrics[(dataset, gallery, seed, "groups")]
            for k in (1, 5, 10):
                recall = np.mean([np.mean(np.array(v) <= k) for v in groups.values()])
                assert recall == pytest.approx(
                    metrics[(dataset, gallery, seed, f"{direction}_recall_at_{k}")]
                )
            mean_rank = np.mean([np.mean(v) for v in groups.values()])
            assert mean_rank == pytest.approx(metrics[(dataset, gallery, seed, f"{direction}_mean_rank")])


def test_the_family_report_pairs_the_choice_on_validation_with_the_other_method(methods):
    project = methods[0]
    text = (project.home / "reports" / "families" / "methods.md").read_text()
    chosen = text.split("Chosen on validation: **", 1)[1].split("(", 1)[1].split(")", 1)[0]
    other = ({"shapes-seeds", "shapes-asif"} - {chosen}).pop()
    section = text.split("## Paired differences on the test concepts", 1)[1]
    assert f"Recall@1 of **{chosen}** minus" in section
    lines = [line for line in section.splitlines() if line.startswith(f"| {other} |")]
    # Both datasets, both directions; the grouped gallery only where both scored it (the adapters).
    assert {tuple(c.strip() for c in line.split("|")[2:5]) for line in lines} == {
        (d, "pooled", direction) for d in ("shapes", "shapes-copy") for direction in ("t2i", "i2t")
    }
    assert "![Paired differences against" in section
    assert (project.home / "reports" / "families" / "methods_differences.png").stat().st_size > 0


def test_metrics_whose_ranks_were_lost_are_scored_again(methods):
    project, _, _, _, _, run = methods
    lake = project.resources()["lake"].lake()
    key = next(r["inputs_hash"] for r in _rows(project, "shapes-asif"))
    again = {"asset_selection": [dg.AssetKey("retrieval_metrics")]}
    kept = run("asif:cached", "experiment_job", "shapes-asif", **again)
    meta = kept.asset_materializations_for_node("retrieval_metrics")[0].metadata
    assert meta["skipped"].value is True  # metrics and ranks stored under this key: nothing to do
    # As an evaluation killed after it deleted the old ranks and before it wrote the new ones.
    lake.delete("ranks", "experiment = 'shapes-asif'")
    result = run("asif:no-ranks", "experiment_job", "shapes-asif", **again)
    meta = result.asset_materializations_for_node("retrieval_metrics")[0].metadata
    assert result.success and "skipped" not in meta
    ranks = lake.read("ranks", filter="experiment = 'shapes-asif'").to_pylist()
    assert ranks and {r["inputs_hash"] for r in ranks} == {key}
