"""The whole FuseMix graph materialised once, in-process, on the tiny project (tests.pipeline_fixture).

`graph` (module scope) builds the project in a temporary folder, points FUSEMIX_HOME there, and runs,
against real Lance, MLflow (SQLite) and DuckDB:
    ingest_job                  shapes
    extract_job                 shapes x tiny-image, shapes x tiny-text
    experiment_job              shapes-fusemix, shapes-n12
    experiment_job              shapes-unextracted (its text encoder never extracted): latents_ready fails
    experiment_job [curated]    shapes-diverse: a balanced diversity selection, curated only
    experiment_job (again)      shapes-fusemix, nothing changed: must not retrain
    experiment_job (broken)     shapes-fusemix after one image latent was deleted: latents_ready fails
    extract_job (repair)        shapes x tiny-image: encodes exactly the deleted one
    experiment_job (nan)        shapes-fusemix after one caption latent was set to NaN: latents_ready fails
    extract_job (repair)        shapes x tiny-text, after deleting the NaN row: encodes exactly that one
    experiment_job (repaired)   shapes-fusemix: up to date again, nothing retrained
The results of every run are kept in `Graph.runs` so tests can read events without rerunning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import yaml

from fusion.encoders import add_encoder, load_registry
from pipelines.lake import vectors_to_arrow
from pipelines.partitions import sync_partitions
from tests.pipeline_fixture import Project, make_project

ENCODERS = ("tiny-image", "tiny-text", "tiny-audio")
EXPERIMENTS = ("shapes-fusemix", "shapes-n12")


@dataclass
class Graph:
    project: Project
    defs: dg.Definitions
    parts: object
    instance: dg.DagsterInstance
    runs: dict[str, dg.ExecuteInProcessResult] = field(default_factory=dict)
    notes: dict = field(default_factory=dict)

    def job(self, name: str):
        return self.defs.resolve_job_def(name)

    def run(self, label: str, job: str, partition_key, **kwargs) -> dg.ExecuteInProcessResult:
        result = self.job(job).execute_in_process(
            partition_key=partition_key, instance=self.instance, raise_on_error=False, **kwargs
        )
        self.runs[label] = result
        return result

    def lake(self):
        return self.project.resources()["lake"].lake()


def materialization(result: dg.ExecuteInProcessResult, key: str) -> dg.AssetMaterialization | None:
    """The materialisation of asset `key` in one run, or None when the run did not materialise it."""
    found = [m for m in result.get_asset_materialization_events() if m.asset_key == dg.AssetKey(key)]
    return found[0].materialization if found else None


def metadata(result: dg.ExecuteInProcessResult, key: str) -> dict:
    """Plain values of an asset's materialisation metadata in one run."""
    mat = materialization(result, key)
    assert mat is not None, f"{key} was not materialised in run {result.run_id}"
    return {k: getattr(v, "value", v) for k, v in mat.metadata.items()}


def _fields(project: Project, name: str) -> dict:
    spec = load_registry(project.configs / "encoders.yaml")[name].to_dict()
    spec.pop("name", None)
    return spec


def mlflow_client(project: Project):
    return project.resources()["tracking"].client()


def mlflow_run_count(project: Project) -> int:
    client = mlflow_client(project)
    ids = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(ids)) if ids else 0


def check_evaluations(result: dg.ExecuteInProcessResult, name: str) -> list:
    return [
        e.asset_check_evaluation_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION" and e.asset_check_evaluation_data.check_name == name
    ]


@pytest.fixture(scope="module")
def graph(tmp_path_factory) -> Graph:
    tmp = tmp_path_factory.mktemp("graph")
    old_home = os.environ.get("FUSEMIX_HOME")
    os.environ["FUSEMIX_HOME"] = str(Path(tmp) / "home")
    try:
        from app.definitions import build_defs

        project = make_project(tmp)
        # A third experiment whose text encoder is in the registry but never extracted.
        add_encoder(project.configs / "encoders.yaml", "tiny-text-2", **_fields(project, "tiny-text"))
        exps = yaml.safe_load((project.configs / "experiments.yaml").read_text())
        exps["experiments"]["shapes-unextracted"] = {
            **exps["experiments"]["shapes-fusemix"],
            "text_encoder": "tiny-text-2",
        }
        # And one that selects by diversity (k-means over the image latents), curated only.
        exps["experiments"]["shapes-diverse"] = {
            **exps["experiments"]["shapes-fusemix"],
            "family": "diversity",
            "select": {"strategy": "diversity", "mode": "balanced", "n": 8, "k": 4},
        }
        (project.configs / "experiments.yaml").write_text(yaml.safe_dump(exps))
        defs, parts = build_defs(project.configs, resources=project.resources())
        (Path(tmp) / "dagster").mkdir()
        with dg.instance_for_test(temp_dir=str(Path(tmp) / "dagster")) as instance:
            g = Graph(project, defs, parts, instance)
            sync_partitions(parts, instance)
            quiet = {"ops": {"ingest": {"config": {"progress": False}}}}
            g.run("ingest", "ingest_job", "shapes", run_config=quiet)
            quiet_extract = {"run_config": {"ops": {"latents": {"config": {"progress": False}}}}}
            for enc in ("tiny-image", "tiny-text"):
                g.run(f"extract:{enc}", "extract_job", parts.extract_key("shapes", enc), **quiet_extract)
            for exp in EXPERIMENTS:
                g.run(f"experiment:{exp}", "experiment_job", exp)
            g.run("experiment:unextracted", "experiment_job", "shapes-unextracted")
            g.run(
                "curate:shapes-diverse",
                "experiment_job",
                "shapes-diverse",
                asset_selection=[dg.AssetKey("curated")],
            )
            g.notes["mlflow_runs_before_rerun"] = mlflow_run_count(project)
            g.run("experiment:shapes-fusemix:again", "experiment_job", "shapes-fusemix")
            g.notes["mlflow_runs_after_rerun"] = mlflow_run_count(project)

            # The blocking contract: one image latent removed, then the experiment rerun; then the
            # incremental extraction repairs exactly that row and the experiment is up to date again.
            lk = g.lake()
            lat_t = "latents__shapes__tiny-image"
            victim = sorted(lk.ids(lat_t))[0]
            g.notes["removed_latent"] = victim
            g.notes["latents_before_removal"] = lk.count(lat_t)
            lk.delete(lat_t, f"media_id = '{victim}'")
            g.run("experiment:broken", "experiment_job", "shapes-fusemix")
            g.run(
                "extract:tiny-image:repair",
                "extract_job",
                parts.extract_key("shapes", "tiny-image"),
                **quiet_extract,
            )

            # One caption latent turned to NaN: the check reports it before any training; deleting
            # the row lets the incremental extraction write a finite one again.
            txt_t = "latents__shapes__tiny-text"
            nan_id = sorted(lk.ids(txt_t))[0]
            row = lk.read(txt_t, filter=f"media_id = '{nan_id}'")
            dim = row.schema.field("vector").type.list_size
            nan = vectors_to_arrow(np.full((1, dim), np.nan, dtype=np.float32))
            lk.upsert(txt_t, row.set_column(row.schema.get_field_index("vector"), "vector", nan), "media_id")
            g.notes["nan_latent"] = nan_id
            g.run("experiment:nan", "experiment_job", "shapes-fusemix")
            lk.delete(txt_t, f"media_id = '{nan_id}'")
            g.run(
                "extract:tiny-text:repair",
                "extract_job",
                parts.extract_key("shapes", "tiny-text"),
                **quiet_extract,
            )
            g.run("experiment:repaired", "experiment_job", "shapes-fusemix")
            g.notes["mlflow_runs_after_repair"] = mlflow_run_count(project)
            yield g
    finally:
        if old_home is None:
            os.environ.pop("FUSEMIX_HOME", None)
        else:
            os.environ["FUSEMIX_HOME"] = old_home
