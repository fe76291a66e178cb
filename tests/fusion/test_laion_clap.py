"""The `laion_clap` source: LAION-CLAP's audio tower built offline and loaded from a LAION-style .pt file.

No LAION checkpoint can be fetched here, so a module fixture builds the HTSAT-tiny tower from
laion_clap's own model code with seeded random weights (batch-norm statistics too) and saves it the
way LAION ships theirs: {"epoch", "state_dict": {"module.audio_branch...": ...}} beside text-branch
tensors that the audio tower ignores. Every encoder here is built from such a file through
build_encoder, the path a user's real checkpoint takes; the in-memory model is the reference the
loaded one must reproduce exactly. The last test runs the pipeline glue on it: ingest of a small audio
dataset, extraction into a real Lance table, curation and a short training run.

    .venv/bin/pytest -q tests/fusion/test_laion_clap.py
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from fusion import media
from fusion.encoders import (
    EncoderConfigError,
    EncoderRef,
    EncoderSpec,
    EncoderUnavailable,
    add_encoder,
    build_encoder,
    describe_encoder,
    encoder_status,
    extract,
    laion,
)
from tests.tiny_models import write_tiny_registry

SR = laion.SAMPLE_RATE


def save_laion_checkpoint(tower: torch.nn.Module, path: Path, *, prefix: str = "module.") -> Path:
    """Saves an audio tower as LAION ships CLAP checkpoints: the whole CLAP state dict (here the audio
    tower's tensors plus a text-branch tensor) under "state_dict", every key with `prefix`."""
    state = {prefix + k: v.clone() for k, v in tower.state_dict().items()}
    state[prefix + "text_branch.embeddings.word_embeddings.weight"] = torch.zeros(4, 8)
    state[prefix + "logit_scale_a"] = torch.tensor(2.66)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 45, "name": "random-htsat-tiny", "state_dict": state}, path)
    return path


def spec_for(checkpoint: Path | str, name: str = "clap", **options) -> EncoderSpec:
    return EncoderSpec(
        name,
        "audio",
        "laion_clap",
        "HTSAT-tiny",
        batch_size=4,
        options={"checkpoint": str(checkpoint), **options},
    )


def tone(seconds: float, sr: int, f0: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * f0 * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def wav_bytes(wave: np.ndarray, sr: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format="WAV", subtype="FLOAT")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tower():
    """The random HTSAT-tiny tower (seed 0, eval mode) whose weights the checkpoints hold."""
    torch.manual_seed(0)
    model = laion.build_audio_tower("HTSAT-tiny")
    with torch.no_grad():  # non-default batch-norm statistics, so that the buffers are checked too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tower) -> Path:
    return save_laion_checkpoint(tower, tmp_path_factory.mktemp("clap") / "630k-random.pt")


@pytest.fixture(scope="module")
def encoder(checkpoint):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: see tests/fusion/conftest.py
    yield build_encoder(spec_for(checkpoint))
    torch.set_num_threads(before)


def reference(tower, waves: list[np.ndarray]) -> np.ndarray:
    """What the in-memory random model computes on the encoder's preparation of `waves` (48 kHz)."""
    batch = torch.from_numpy(np.stack([laion.prepare_waveform(w) for w in waves]))
    with torch.inference_mode():
        return tower(batch).numpy()


def test_the_clap_extra_is_installed():
    # `make install` installs it; without it every test below would fail on the encoder's build.
    for package in ("laion_clap", "torchlibrosa", "librosa"):
        assert importlib.util.find_spec(package) is not None, f"{package} is missing: run `make install`"


def test_latents_are_512_d_float32_finite_and_batch_invariant(encoder):
    waves = [tone(s, SR, f0, i) for i, (s, f0) in enumerate([(0.4, 220), (1.5, 440), (3.0, 330)])]
    out = encoder.encode(waves)
    assert out.shape == (3, 512) and out.dtype == np.float32 and np.isfinite(out).all()
    assert encoder.dim == 512 and encoder.sample_rate == 48_000 and encoder.modality == "audio"
    one_by_one = np.concatenate([encoder.encode([w]) for w in waves])
    np.testing.assert_allclose(out, one_by_one, atol=1e-5)
    # Different clips, different latents (raw: not L2-normalised).
    assert np.linalg.norm(out[0] - out[1]) > 1e-3 and not np.allclose(np.linalg.norm(out, axis=1), 1.0)


def test_the_checkpoint_loads_the_models_weights_exactly(tmp_path, tower, checkpoint, encoder):
    waves = [tone(0.7, SR, 500, 1), tone(2.0, SR, 250, 2)]
    want = reference(tower, waves)
    np.testing.assert_array_equal(encoder.encode(waves), want)
    # The same weights as a bare state dict without the "module." prefix, and as safetensors.
    bare = tmp_path / "bare.pt"
    torch.save({k: v.clone() for k, v in tower.state_dict().items()}, bare)
    from safetensors.torch import save_file

    st = tmp_path / "tower.safetensors"
    save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, str(st))
    for path in (bare, st):
        other = build_encoder(spec_for(path))
        np.testing.assert_array_equal(other.encode(waves), want)
        assert other.fingerprint != encoder.fingerprint  # other bytes, so another weights hash


def test_fingerprint_is_the_checkpoints_and_describe_agrees(tmp_path, checkpoint, encoder):
    spec = spec_for(checkpoint)
    assert describe_encoder(spec) == EncoderRef("clap", encoder.fingerprint, 512)  # as built, no model
    # Another file with the same bytes (and another name): the same weights, the same fingerprint.
    copy = tmp_path / "elsewhere" / "renamed.pt"
    copy.parent.mkdir()
    shutil.copy(checkpoint, copy)
    assert describe_encoder(spec_for(copy)).fingerprint == encoder.fingerprint
    # A checkpoint beside it in the same folder does not change it (the file is hashed, not the folder).
    (checkpoint.parent / "other.pt").write_bytes(b"another checkpoint")
    assert describe_encoder(spec).fingerprint == encoder.fingerprint
    # Other weights: another fingerprint and other latents.
    state = torch.load(checkpoint, weights_only=True)
    state["state_dict"]["module.audio_projection.2.bias"] += 1.0
    changed = tmp_path / "changed.pt"
    torch.save(state, changed)
    other = build_encoder(spec_for(changed))
    assert other.fingerprint != encoder.fingerprint
    assert describe_encoder(spec_for(changed)).fingerprint == other.fingerprint
    wave = [tone(1.0, SR, 300)]
    np.testing.assert_allclose(other.encode(wave) - encoder.encode(wave), 1.0, atol=1e-4)


def test_audio_is_decoded_at_48_khz_through_the_media_code(tmp_path, tower, encoder):
    clip16 = tone(0.5, 16_000, 440, 3)
    payload = wav_bytes(clip16, 16_000)
    decoded = media.decode_audio(payload, 48_000, "clip", max_seconds=10.0)
    assert decoded.size == 24_000  # 0.5 s at 48 kHz
    np.testing.assert_array_equal(encoder.prepare(payload, "clip"), laion.prepare_waveform(decoded))
    path = tmp_path / "clip.wav"
    path.write_bytes(payload)
    np.testing.assert_allclose(encoder.encode([path]), reference(tower, [decoded]), atol=1e-5)
    # Only the first 10 s of a longer clip is decoded and encoded (laion_clap would crop at random).
    long = np.concatenate([tone(10.0, 22_050, 300, 4), tone(3.0, 22_050, 900, 5)])
    prepared = encoder.prepare(wav_bytes(long, 22_050), "long")
    first = media.decode_audio(wav_bytes(long[: 10 * 22_050], 22_050), 48_000, "first")
    assert prepared.shape == (480_000,)
    np.testing.assert_allclose(prepared, laion.prepare_waveform(first), atol=2e-4)
    # Bad media are isolated by the extraction engine, as for every encoder.
    batches = list(
        extract(encoder, [("ok", payload), ("broken", b"RIFF not audio"), ("empty", b"")], progress=False)
    )
    assert [m for b in batches for m in b.media_ids] == ["ok"]
    assert sorted(f.media_id for b in batches for f in b.failures) == ["broken", "empty"]


def test_preparation_quantises_and_repeat_pads_like_laion_clap():
    x = np.array([0.5, -2.0, 0.25], np.float32)
    out = laion.prepare_waveform(x)
    q = np.array([16383, -32767, 8191], np.float32) / 32767.0  # clipped to [-1, 1], then int16
    assert out.shape == (480_000,) and out.dtype == np.float32
    np.testing.assert_array_equal(out, np.tile(q, 160_000))
    out = laion.prepare_waveform(np.ones(200_000, np.float32) * 0.1)  # 2 whole copies, then zeros
    assert (out[:400_000] != 0).all() and (out[400_000:] == 0).all()


def test_checkpoints_that_do_not_fit_are_refused_with_the_reason(tmp_path, tower):
    good = {k: v.clone() for k, v in tower.state_dict().items()}
    missing = dict(good)
    del missing["audio_branch.bn0.running_var"]
    wrong_shape = dict(good, **{"audio_projection.0.weight": torch.zeros(512, 10)})
    for name, state in (("missing", missing), ("shape", wrong_shape)):
        path = tmp_path / f"{name}.pt"
        torch.save({"state_dict": state}, path)
        with pytest.raises(EncoderConfigError, match="does not fit laion_clap model 'HTSAT-tiny'"):
            build_encoder(spec_for(path))
    no_audio = tmp_path / "text-only.pt"
    torch.save({"state_dict": {"module.text_branch.x": torch.zeros(2)}}, no_audio)
    with pytest.raises(EncoderUnavailable, match="not a LAION-CLAP checkpoint"):
        build_encoder(spec_for(no_audio))
    # A checkpoint that pickles more than tensors is refused, never unpickled (weights_only=True).
    pickled = tmp_path / "with-args.pt"
    torch.save({"state_dict": good, "args": argparse.Namespace(lr=1e-4)}, pickled)
    with pytest.raises(EncoderUnavailable, match="weights only"):
        build_encoder(spec_for(pickled))


def test_spec_problems_and_status_say_what_to_do(tmp_path, checkpoint):
    ok, detail = encoder_status(spec_for(checkpoint))
    assert ok and "offline" in detail and "HTSAT-tiny" in detail and str(checkpoint) in detail
    no_ckpt = EncoderSpec("c", "audio", "laion_clap", "HTSAT-tiny")
    ok, detail = encoder_status(no_ckpt)
    assert not ok and "options.checkpoint" in detail and "630k-audioset-best.pt" in detail
    with pytest.raises(EncoderUnavailable, match="options.checkpoint"):
        build_encoder(no_ckpt)
    bad = {
        "text tower": EncoderSpec(
            "t", "text", "laion_clap", "HTSAT-tiny", options={"checkpoint": str(checkpoint)}
        ),
        "fusion": spec_for(checkpoint, enable_fusion=True),
        "model": EncoderSpec("m", "audio", "laion_clap", "PANN-14", options={"checkpoint": str(checkpoint)}),
        "option": spec_for(checkpoint, chekpoint="typo"),
    }
    for what, spec in bad.items():
        ok, detail = encoder_status(spec)
        assert not ok and detail, what
        for fn in (build_encoder, describe_encoder):
            with pytest.raises(EncoderConfigError, match=spec.name):
                fn(spec)
    assert "source hf" in encoder_status(bad["text tower"])[1]


def test_without_the_package_status_and_build_say_how_to_install(monkeypatch, checkpoint):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "laion_clap" else real(name, *a)
    )
    ok, detail = encoder_status(spec_for(checkpoint))
    assert not ok and detail.startswith("laion-clap is not installed: `make install`")
    assert "--no-deps" in detail and ".[clap]" in detail
    with pytest.raises(EncoderUnavailable, match="laion-clap is not installed"):
        build_encoder(spec_for(checkpoint))
    assert describe_encoder(spec_for(checkpoint)).dim == 512  # describe never needs the package


def test_laion_clap_package_init_and_torchvision_are_never_imported(encoder):
    # `import laion_clap` appends its folder to sys.path and imports torchvision; the encoder does neither.
    assert "laion_clap" not in sys.modules and "torchvision" not in sys.modules
    assert not any(p.rstrip("/").endswith("laion_clap") for p in sys.path)
    htsat = sys.modules["fusion.encoders._laion_htsat.htsat"]
    assert Path(htsat.__file__).parent.parent.name == "laion_clap"  # laion_clap's own file, unchanged


def test_a_user_registers_it_with_the_cli_and_sees_it_available(tmp_path, monkeypatch, capsys, checkpoint):
    from app.cli import main

    monkeypatch.setenv("FUSEMIX_CONFIGS", str(tmp_path))
    argv = ["encoder", "add", "clap-audio", "--modality", "audio", "--source", "laion_clap"]
    argv += [
        "--model",
        "HTSAT-tiny",
        "--option",
        f"checkpoint={checkpoint}",
        "--option",
        "enable_fusion=false",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    entry = yaml.safe_load((tmp_path / "encoders.yaml").read_text())["encoders"]["clap-audio"]
    assert entry["options"] == {"checkpoint": str(checkpoint), "enable_fusion": False}
    capsys.readouterr()
    assert main(["encoder", "list", "--max-width", "0"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("clap-audio"))
    assert " yes " in row and "offline: HTSAT-tiny audio tower from" in row
    assert main(argv[:-2] + ["--option", "enable_fusion"]) == 2  # not KEY=VALUE
    assert "--option takes KEY=VALUE" in capsys.readouterr().err


# ------------------------------------------------------------------------------ through the pipeline


def _audio_project(root: Path, checkpoint: Path) -> dict[str, Path]:
    """configs/ (tiny text encoder + the laion_clap one, an audio manifest dataset, one experiment) and
    5 short tones, 2 captions each: concepts low (2 clips) and mid train, high val, top test."""
    configs, data = root / "configs", root / "data"
    configs.mkdir(parents=True)
    data.mkdir()
    registry = configs / "encoders.yaml"
    shutil.copy(write_tiny_registry(root / "models"), registry)
    add_encoder(
        registry, "clap", modality="audio", source="laion_clap", model="HTSAT-tiny",
        batch_size=4, options={"checkpoint": str(checkpoint)},
    )  # fmt: skip
    concepts = {
        "low": (220.0, "train", 2),
        "mid": (330.0, "train", 1),
        "high": (660.0, "val", 1),
        "top": (880.0, "test", 1),
    }
    rows = []
    for concept, (f0, split, clips) in concepts.items():
        for v in range(clips):
            name = f"{concept}_{v}.wav"
            sf.write(data / name, tone(0.5 + 0.25 * v, 16_000, f0 * (1 + 0.03 * v), v), 16_000)
            for caption in (f"a {concept} tone", f"the {concept} sound"):
                rows.append({"audio": name, "caption": caption, "split": split, "concept": concept})
    with open(data / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["audio", "caption", "split", "concept"])
        w.writeheader()
        w.writerows(rows)
    (configs / "datasets.yaml").write_text(
        yaml.safe_dump(
            {"datasets": {"tones": {"modality": "audio", "reader": "manifest", "root": str(data)}}}
        )
    )
    experiment = {
        "dataset": "tones",
        "media_encoder": "clap",
        "text_encoder": "tiny-text",
        "adapter": {"depth": 1, "expansion": 2, "dropout": 0.0, "output_dim": 16},
        "train": {"epochs": 4, "batch_size": 4, "warmup_steps": 1},
    }
    (configs / "experiments.yaml").write_text(yaml.safe_dump({"experiments": {"tones-clap": experiment}}))
    return {"configs": configs, "data": data}


def test_extraction_into_lance_and_a_short_training_run(tmp_path, checkpoint, encoder, one_torch_thread):
    from pipelines.curate import curate, latents_contract, write_curated
    from pipelines.extract import run_extraction
    from pipelines.ingest import dataset_roots, load_dataset, write_dataset
    from pipelines.lake import Lake, arrow_to_vectors
    from pipelines.registries import load_datasets, load_experiments
    from pipelines.resources import EncoderBank
    from pipelines.train import train_experiment, training_data

    paths = _audio_project(tmp_path, checkpoint)
    spec = load_datasets(paths["configs"] / "datasets.yaml")["tones"]
    lake = Lake(tmp_path / "lake")
    write_dataset(lake, "tones", load_dataset(spec, tmp_path / "cache", progress=False))
    bank = EncoderBank(registry_path=str(paths["configs"] / "encoders.yaml"))
    clap, text = bank.get("clap"), bank.get("tiny-text")
    assert clap.fingerprint == encoder.fingerprint  # the registry entry builds the same encoder
    roots = dataset_roots(spec, tmp_path / "cache")

    stats = run_extraction(lake, "tones", clap, roots=roots, commit_every=4, progress=False)
    assert (stats["encoded"], stats["failed"]) == (5, 0)
    table = lake.read("latents__tones__clap")
    vectors = arrow_to_vectors(table["vector"])
    assert vectors.shape == (5, 512) and vectors.dtype == np.float32 and np.isfinite(vectors).all()
    assert set(table["fingerprint"].to_pylist()) == {clap.fingerprint}
    paths_by_id = {
        r["media_id"]: r["path"] for r in lake.read("media__tones", ["media_id", "path"]).to_pylist()
    }
    first = table.slice(0, 1).to_pylist()[0]
    np.testing.assert_allclose(
        np.asarray(first["vector"], np.float32),
        clap.encode([Path(paths_by_id[first["media_id"]])])[0],
        atol=1e-5,
    )
    again = run_extraction(lake, "tones", clap, roots=roots, progress=False)
    assert again["encoded"] == 0 and lake.count("latents__tones__clap") == 5  # incremental
    run_extraction(lake, "tones", text, roots=roots, progress=False)

    exp = load_experiments(paths["configs"] / "experiments.yaml")["tones-clap"]
    media_ref, text_ref = bank.ref("clap"), bank.ref("tiny-text")
    curated, info = curate(lake, exp, media_ref.fingerprint, text_ref.fingerprint)
    assert (info["selected_train_pairs"], info["val_pairs"], info["test_pairs"]) == (6, 2, 2)
    write_curated(lake, exp, curated)
    assert latents_contract(lake, exp, media_ref, text_ref)[0] == []
    result = train_experiment(training_data(lake, exp, curated), exp, media_ref, text_ref, "audio")
    losses = [h["loss"] for h in result.history]
    assert result.steps >= 4 and np.isfinite(losses).all()
    assert result.model.encoders["audio"] == media_ref and result.model.encoders["text"] == text_ref
