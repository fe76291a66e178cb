"""Three modalities bound through text, through the real graph on the tiny project: `tones` (sounds)
bound to `shapes-fusemix` (pictures) by the anchor's frozen text adapter. Real Lance, MLflow (SQLite)
and Dagster runs.

    .venv/bin/pytest -q tests/assets/test_tri.py
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import torch
import yaml

from fusion.checkpoint import load_checkpoint, read_config
from pipelines.partitions import sync_partitions
from pipelines.registries import RegistryError, load_experiments
from tests.assets.conftest import metadata
from tests.pipeline_fixture import add_sounds, make_project


@pytest.fixture(scope="module")
def tri(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tri")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUSEMIX_HOME", str(Path(tmp) / "home"))
        from app.definitions import build_defs

        project = add_sounds(make_project(tmp))
        defs, parts = build_defs(project.configs, resources=project.resources())
        (Path(tmp) / "dagster").mkdir()
        runs = {}
        with dg.instance_for_test(temp_dir=str(Path(tmp) / "dagster")) as instance:
            sync_partitions(parts, instance)

            def run(label, job, key, **kw):
                runs[label] = defs.resolve_job_def(job).execute_in_process(
                    partition_key=key, instance=instance, raise_on_error=False, **kw
                )
                return runs[label]

            for ds in ("shapes", "tones"):
                assert run(f"ingest:{ds}", "ingest_job", ds).success
            for ds, enc in (
                ("shapes", "tiny-image"),
                ("shapes", "tiny-text"),
                ("tones", "tiny-audio"),
                ("tones", "tiny-text"),
            ):
                assert run(f"extract:{ds}:{enc}", "extract_job", parts.extract_key(ds, enc)).success
            run("bound:early", "experiment_job", "tones-bound")  # before its anchor is trained
            assert run("anchor", "experiment_job", "shapes-fusemix").success
            run("bound", "experiment_job", "tones-bound")
            yield project, runs


def test_a_bound_experiment_before_its_anchor_fails_clearly(tri):
    _, runs = tri
    result = runs["bound:early"]
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.event_specific_data.error.to_string()
    assert "anchor experiment shapes-fusemix has no trained model" in message


def test_the_bound_checkpoint_holds_three_sides_with_the_anchors_adapters_frozen(tri):
    project, runs = tri
    assert runs["bound"].success, [
        e.message for e in runs["bound"].all_events if e.event_type_value == "STEP_FAILURE"
    ]
    models = project.home / "models"
    bound = load_checkpoint(models / "tones-bound")
    anchor = load_checkpoint(models / "shapes-fusemix")
    assert set(bound.sides) == {"audio", "text", "image"}
    for side in ("text", "image"):  # the anchor's own adapters, bit for bit
        for key, value in bound.adapters[side].state_dict().items():
            assert torch.equal(value, anchor.adapters[side].state_dict()[key])
    extra = read_config(models / "tones-bound")["extra"]
    assert extra["anchor"] == "shapes-fusemix"
    assert extra["sides"] == {"audio": "tiny-audio", "text": "tiny-text", "image": "tiny-image"}
    assert extra["datasets"] == {"tones": "audio", "shapes": "image"}
    # Its inputs hash includes the anchor's: it is not the plain hash of its own inputs.
    assert extra["inputs_hash"] != read_config(models / "shapes-fusemix")["extra"]["inputs_hash"]


def test_a_bound_experiments_inputs_change_when_its_anchor_is_trained(tri):
    project, runs = tri
    early, late = (metadata(runs[k], "experiment_inputs") for k in ("bound:early", "bound"))
    # Nothing of its own changed between the two runs: only its anchor was trained in between.
    assert early["read_versions"] == late["read_versions"]
    assert early["anchor"] == "untrained" and late["anchor"] not in ("untrained", early["anchor"])
    assert early["state"] != late["state"]  # so Dagster marks it stale when its anchor changes
    assert "anchor" not in metadata(runs["anchor"], "experiment_inputs")  # unbound: as before


def test_emergent_rows_and_report(tri):
    project, runs = tri
    lake = project.resources()["lake"].lake()
    rows = lake.read("metrics", filter="experiment = 'tones-bound'").to_pylist()
    emergent = {r["metric"]: r["value"] for r in rows if r["gallery"] == "emergent" and r["seed"] is None}
    assert {r["dataset"] for r in rows if r["gallery"] == "emergent"} == {"tones/shapes"}
    # Every colour x shape concept is both a picture and a sound: 12 concepts, 24 clips, 36 pictures.
    assert emergent["concepts"] == 12 and emergent["audio_items"] == 24 and emergent["image_items"] == 36
    # Each sound has 3 pictures of its concept among 36; each picture 2 sounds among 24.
    assert emergent["chance_a2i_recall_at_1"] == pytest.approx(3 / 36)
    assert emergent["chance_i2a_recall_at_1"] == pytest.approx(2 / 24)
    for name in ("a2i", "i2a", "twostep_a2i", "twostep_i2a"):
        for k in (1, 5, 10):
            assert 0.0 <= emergent[f"{name}_recall_at_{k}"] <= 1.0
    # The audio-text scores of its own test split are there too, as for any experiment.
    own = {r["metric"] for r in rows if r["dataset"] == "tones" and r["gallery"] == "pooled"}
    assert "t2i_recall_at_1" in own
    report = Path(metadata(runs["bound"], "retrieval_metrics")["report_path"])
    text = report.read_text()
    assert "Emergent audio <-> image retrieval" in text and "two-step" in text
    assert (report.parent / "emergent.png").stat().st_size > 1000


def test_anchor_validation(tmp_path):
    project = add_sounds(make_project(tmp_path))
    path = project.configs / "experiments.yaml"
    good = yaml.safe_load(path.read_text())
    assert load_experiments(path)["tones-bound"].anchor == "shapes-fusemix"
    cases = {
        "nowhere": "is not an experiment of this file",
        "shapes-n12": None,  # another image experiment: fine for the registry
    }
    for anchor, message in cases.items():
        data = yaml.safe_load(path.read_text())
        data["experiments"]["tones-bound"]["anchor"] = anchor
        path.write_text(yaml.safe_dump(data))
        if message is None:
            assert load_experiments(path)["tones-bound"].anchor == anchor
        else:
            with pytest.raises(RegistryError, match=message):
                load_experiments(path)
    data = yaml.safe_load(yaml.safe_dump(good))
    data["experiments"]["tones-bound"]["text_encoder"] = "tiny-audio"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RegistryError, match="uses text encoder 'tiny-text'"):
        load_experiments(path)
    data = yaml.safe_load(yaml.safe_dump(good))
    data["experiments"]["tones-bound"]["adapter"] = {"depth": 2}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RegistryError, match="another adapter shape"):
        load_experiments(path)
    data = yaml.safe_load(yaml.safe_dump(good))
    data["experiments"]["chain"] = {**data["experiments"]["tones-bound"], "anchor": "tones-bound"}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RegistryError, match="is anchored itself"):
        load_experiments(path)
