"""Kill-and-resume of latent extraction (pipelines.extract.run_extraction) on the tiny project.

A subprocess extracts with small commits and is SIGKILLed after it reported two commits; the rerun
in-process must leave exactly the table an uninterrupted run writes. Also: a changed encoder
fingerprint replaces every stale row, and a media item damaged after ingestion becomes a quarantine
row (stage `extract:<encoder>`, reason `changed`: its bytes no longer hash to its id) that the next
run with the same encoder fingerprint does not retry (tests/pipelines/test_extract_checks.py: another
fingerprint does).

    .venv/bin/pytest -q tests/pipelines/test_resume.py
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from fusion.encoders import build_encoder, load_registry
from pipelines.extract import run_extraction
from pipelines.ingest import load_dataset, write_dataset
from pipelines.lake import Lake, arrow_to_vectors
from pipelines.registries import load_datasets
from tests.pipeline_fixture import Project, make_project

REPO = Path(__file__).resolve().parents[2]
DATASET = "shapes"
ENCODER = "tiny-image"
LATENTS = f"latents__{DATASET}__{ENCODER}"

# Runs in the child: the tiny image encoder from the registry, slowed per item so that the parent
# can kill it mid-run (between its second commit and its last), printing one line per commit.
CHILD = textwrap.dedent(
    """
    import sys, time
    from pipelines.extract import run_extraction
    from pipelines.lake import Lake
    from pipelines.resources import EncoderBank

    lake_root, registry, dataset, encoder_name = sys.argv[1:5]
    encoder = EncoderBank(registry_path=registry).get(encoder_name)
    prepare = encoder.prepare

    def slow_prepare(payload, media_id=""):
        time.sleep(0.1)
        return prepare(payload, media_id)

    encoder.prepare = slow_prepare
    print("READY", flush=True)
    stats = run_extraction(
        Lake(lake_root), dataset, encoder, commit_every=4, progress=False,
        on_commit=lambda s: print(f"COMMIT {s['commits']} {s['encoded']}", flush=True),
    )
    print("DONE", stats["encoded"], flush=True)
    """
)


def _registry(project: Project, out: Path, **changes) -> Path:
    """A copy of the tiny registry with fields of the tiny-image entry changed."""
    data = yaml.safe_load((project.configs / "encoders.yaml").read_text())
    data["encoders"][ENCODER].update(changes)
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    return make_project(tmp_path_factory.mktemp("resume"))


@pytest.fixture(scope="module")
def dataset(project):
    spec = load_datasets(project.configs / "datasets.yaml")[DATASET]
    return load_dataset(spec, project.home / "cache", progress=False)


@pytest.fixture(scope="module")
def registry_bs1(project) -> Path:
    """batch_size 1, so that commit_every=4 commits exactly every 4 items."""
    return _registry(project, project.root / "encoders-bs1.yaml", batch_size=1)


def _ingested(root: Path, dataset) -> Lake:
    lake = Lake(root)
    write_dataset(lake, DATASET, dataset)
    return lake


def _image_ids(lake: Lake) -> set[str]:
    return lake.ids(f"media__{DATASET}", filter="modality = 'image'")


def _latents(lake: Lake) -> tuple[list[str], dict[str, np.ndarray], set[str]]:
    """media ids in table order, id -> vector [dim], and the set of fingerprints."""
    t = lake.read(LATENTS)
    ids = t.column("media_id").to_pylist()
    vecs = arrow_to_vectors(t.column("vector"))
    return ids, dict(zip(ids, vecs, strict=True)), set(t.column("fingerprint").to_pylist())


def _kill_after_commits(lake_root: Path, registry: Path, commits: int, limit_s: float = 120) -> list[str]:
    """Starts the extraction child, SIGKILLs it once it printed `commits` commits; returns its lines."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["FUSEMIX_TORCH_THREADS"] = "1"  # the machine is shared; one thread is plenty for the tiny ViT
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(lake_root), str(registry), DATASET, ENCODER],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + limit_s
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"extraction child reported {seen[-5:]} and then nothing for {limit_s}s")
            if line is None:
                pytest.fail(f"extraction child ended before it was killed; output: {seen[-20:]}")
            seen.append(line)
            if line.startswith("COMMIT ") and int(line.split()[1]) >= commits:
                os.kill(proc.pid, signal.SIGKILL)
                break
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return seen


def test_killed_extraction_resumes_to_the_uninterrupted_result(tmp_path, project, dataset, registry_bs1):
    killed = _ingested(tmp_path / "killed", dataset)
    want = _image_ids(killed)
    assert len(want) == project.n_media

    lines = _kill_after_commits(killed.root, registry_bs1, commits=2)
    assert not any(line.startswith("DONE") for line in lines)
    after_kill = killed.count(LATENTS)
    # Every reported commit survived the kill, and the kill came before the end.
    assert 8 <= after_kill < len(want), lines
    assert after_kill % 4 == 0

    encoder = build_encoder(load_registry(registry_bs1)[ENCODER])
    resumed = run_extraction(killed, DATASET, encoder, commit_every=4, progress=False)
    assert resumed["pending"] == len(want) - after_kill
    assert resumed["encoded"] == len(want) - after_kill
    assert resumed["stale_deleted"] == 0
    assert resumed["total"] == len(want)

    clean = _ingested(tmp_path / "clean", dataset)
    full = run_extraction(clean, DATASET, encoder, commit_every=4, progress=False)
    assert full["encoded"] == len(want)

    ids_k, vec_k, fp_k = _latents(killed)
    ids_c, vec_c, fp_c = _latents(clean)
    assert len(ids_k) == len(set(ids_k)), "duplicate media ids after resume"
    assert set(ids_k) == set(ids_c) == want
    for mid in want:
        np.testing.assert_allclose(vec_k[mid], vec_c[mid], atol=1e-6, rtol=0)
    assert fp_k == fp_c == {encoder.fingerprint}
    assert resumed["fingerprint"] == full["fingerprint"] == encoder.fingerprint

    again = run_extraction(killed, DATASET, encoder, commit_every=4, progress=False)
    assert (again["pending"], again["encoded"], again["total"]) == (0, 0, len(want))


def test_changed_fingerprint_deletes_stale_rows_and_reencodes(tmp_path, project, dataset):
    lake = _ingested(tmp_path / "lake", dataset)
    old = build_encoder(load_registry(project.configs / "encoders.yaml")[ENCODER])
    assert old.spec.pooling == "cls"
    first = run_extraction(lake, DATASET, old, commit_every=16, progress=False)
    assert first["encoded"] == project.n_media
    _, old_vecs, _ = _latents(lake)

    changed = _registry(project, tmp_path / "encoders.yaml", pooling="mean")
    new = build_encoder(load_registry(changed)[ENCODER])
    assert new.fingerprint != old.fingerprint

    second = run_extraction(lake, DATASET, new, commit_every=16, progress=False)
    assert second["stale_deleted"] == project.n_media
    assert second["encoded"] == project.n_media
    assert second["total"] == project.n_media
    ids, new_vecs, fps = _latents(lake)
    assert fps == {new.fingerprint}
    assert len(ids) == len(set(ids)) == project.n_media
    assert set(ids) == _image_ids(lake)
    # Mean pooling gives other vectors than CLS: the rows really were re-encoded.
    assert not np.allclose(np.stack([new_vecs[i] for i in ids]), np.stack([old_vecs[i] for i in ids]))

    third = run_extraction(lake, DATASET, new, commit_every=16, progress=False)
    assert (third["stale_deleted"], third["encoded"], third["total"]) == (0, 0, project.n_media)


def test_a_damaged_file_is_quarantined_and_not_retried_by_the_same_encoder(tmp_path, project):
    # A private copy of the pictures, so the shared project's files stay intact.
    data = tmp_path / "data"
    shutil.copytree(project.data, data)
    spec = replace(load_datasets(project.configs / "datasets.yaml")[DATASET], root=str(data))
    lake = Lake(tmp_path / "lake")
    write_dataset(lake, DATASET, load_dataset(spec, tmp_path / "cache", progress=False))

    # The file is damaged after ingestion (a truncated copy, a disk error): extraction hashes it again
    # before decoding, finds other content under the item's path, and quarantines the item.
    media = lake.read(f"media__{DATASET}", ["media_id", "path"], "modality = 'image'").to_pylist()
    bad = sorted(media, key=lambda r: r["media_id"])[0]
    Path(bad["path"]).write_bytes(b"this is not a PNG file at all")

    encoder = build_encoder(load_registry(project.configs / "encoders.yaml")[ENCODER])
    stage = f"extract:{ENCODER}"
    first = run_extraction(lake, DATASET, encoder, commit_every=8, progress=False)
    assert first["failed"] == 1
    assert first["encoded"] == project.n_media - 1
    assert bad["media_id"] not in lake.ids(LATENTS)
    rows = lake.read(f"quarantine__{DATASET}", filter=f"stage = '{stage}'").to_pylist()
    assert len(rows) == 1
    assert rows[0]["item"] == bad["media_id"]
    assert rows[0]["dataset"] == DATASET
    assert rows[0]["reason"] == "changed"
    assert rows[0]["fingerprint"] == encoder.fingerprint
    # The ingest-stage row (the manifest's missing picture) is still there beside it.
    assert lake.count(f"quarantine__{DATASET}", "stage = 'ingest'") == 1

    second = run_extraction(lake, DATASET, encoder, commit_every=8, progress=False)
    assert (second["pending"], second["encoded"], second["failed"]) == (0, 0, 0)
    assert lake.count(f"quarantine__{DATASET}", f"stage = '{stage}'") == 1
    assert lake.count(LATENTS) == project.n_media - 1
