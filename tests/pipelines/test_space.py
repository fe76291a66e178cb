"""pipelines.space: which sides and datasets a checkpoint serves, read from its record or derived
from the two-sided keys, on real saved checkpoints (adapters and a baseline)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evaluation.baselines import fit_baseline, save_baseline
from fusion.adapters import Adapter, EncoderRef, FusedModel
from fusion.checkpoint import save_checkpoint
from fusion.config import AdapterConfig
from pipelines.space import SearchError, load_space, model_hash

CFG = AdapterConfig(depth=1, expansion=2, dropout=0.0, output_dim=8)
REFS = {
    "image": EncoderRef("img-enc", "fp-img", 6),
    "audio": EncoderRef("aud-enc", "fp-aud", 5),
    "text": EncoderRef("txt-enc", "fp-txt", 4),
}
TWO_SIDED = {
    "experiment": "pics",
    "dataset": "pics",
    "media_encoder": "img-enc",
    "text_encoder": "txt-enc",
    "media_side": "image",
    "text_side": "text",
}


def save(models, name: str, sides, extra: dict, seed: int = 0):
    torch.manual_seed(seed)
    refs = {s: REFS[s] for s in sides}
    model = FusedModel({s: Adapter(r.dim, CFG) for s, r in refs.items()}, refs)
    save_checkpoint(models / name, model, CFG, extra=extra)
    return model


def test_two_sided_record_is_derived_with_its_eval_datasets(tmp_path):
    model = save(tmp_path, "pics", ("image", "text"), {**TWO_SIDED, "eval_datasets": ["pics-b", "pics"]})
    space = load_space(tmp_path, "pics")
    assert space.sides == {"image": "img-enc", "text": "txt-enc"}
    assert space.datasets == {"pics": "image", "pics-b": "image"}
    assert space.datasets_of("image") == ["pics", "pics-b"] and space.datasets_of("text") == [
        "pics",
        "pics-b",
    ]
    assert space.dim == 8 and space.encoders == {"image": REFS["image"], "text": REFS["text"]}
    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    got = space.embed("image", x)
    assert got.dtype == np.float32 and got.shape == (3, 8)
    np.testing.assert_allclose(got, model.embed("image", x).numpy(), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # A checkpoint written before eval_datasets was recorded serves its own dataset only.
    save(tmp_path, "old", ("image", "text"), TWO_SIDED)
    assert load_space(tmp_path, "old").datasets == {"pics": "image"}


def test_three_sided_record_is_used_as_written(tmp_path):
    sides = {"image": "img-enc", "audio": "aud-enc", "text": "txt-enc"}
    extra = {**TWO_SIDED, "sides": sides, "datasets": {"pics": "image", "sounds": "audio"}}
    save(tmp_path, "tri", ("image", "audio", "text"), extra)
    space = load_space(tmp_path, "tri")
    assert space.sides == sides and space.datasets == {"pics": "image", "sounds": "audio"}
    assert space.datasets_of("audio") == ["sounds"] and space.datasets_of("text") == ["pics", "sounds"]
    with pytest.raises(SearchError, match="no side 'smell'"):
        space.datasets_of("smell")


def test_baseline_checkpoint_is_a_space(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 6)), rng.standard_normal((40, 4))
    model, _ = fit_baseline(
        "procrustes",
        x,
        y,
        val=None,
        sides=("image", "text"),
        encoders={"image": REFS["image"], "text": REFS["text"]},
    )
    save_baseline(tmp_path / "proc", model, extra={**TWO_SIDED, "method": "procrustes"})
    space = load_space(tmp_path, "proc")
    assert space.sides == {"image": "img-enc", "text": "txt-enc"} and space.dim == model.dim
    got = space.embed("text", y[:2])
    assert got.shape == (2, model.dim) and got.dtype == np.float32


def test_encoder_checks_name_fingerprint_and_width(tmp_path):
    save(tmp_path, "pics", ("image", "text"), TWO_SIDED)
    space = load_space(tmp_path, "pics")
    space.check_encoder("text", EncoderRef("txt-enc", "fp-txt", 4))
    for bad in (EncoderRef("txt-enc", "fp-other", 4), EncoderRef("other", "fp-txt", 4)):
        with pytest.raises(SearchError, match="fingerprint fp-txt"):
            space.check_encoder("text", bad)
    with pytest.raises(SearchError, match="no side 'audio'"):
        space.check_encoder("audio", REFS["audio"])


def test_model_hash_follows_the_files(tmp_path):
    save(tmp_path, "pics", ("image", "text"), TWO_SIDED, seed=0)
    first = model_hash(tmp_path / "pics")
    assert load_space(tmp_path, "pics").model_hash == first
    save(tmp_path, "pics", ("image", "text"), TWO_SIDED, seed=1)  # retrained: other weights
    assert model_hash(tmp_path / "pics") != first


def test_clear_errors(tmp_path):
    with pytest.raises(SearchError, match="no trained model"):
        load_space(tmp_path, "nope")
    for bad in ("../etc", "a__b", "", "x/y"):
        with pytest.raises(SearchError, match="invalid experiment name"):
            load_space(tmp_path, bad)
    save(tmp_path, "bare", ("image", "text"), {"dataset": "pics"})
    with pytest.raises(
        SearchError, match=r"does not record \['media_side', 'media_encoder', 'text_encoder'\]"
    ):
        load_space(tmp_path, "bare")
    # A record whose sides disagree with the adapters saved beside it.
    extra = {**TWO_SIDED, "sides": {"image": "img-enc", "audio": "aud-enc", "text": "txt-enc"}}
    save(tmp_path, "wrong", ("image", "text"), {**extra, "datasets": {"pics": "image"}})
    with pytest.raises(SearchError, match="adapters for"):
        load_space(tmp_path, "wrong")
    save(
        tmp_path,
        "textual",
        ("image", "text"),
        {**TWO_SIDED, "sides": {"image": "img-enc", "text": "txt-enc"}, "datasets": {"pics": "text"}},
    )
    with pytest.raises(SearchError, match="media side"):
        load_space(tmp_path, "textual")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(SearchError, match="cannot read"):
        load_space(tmp_path, "broken")
    save(tmp_path, "noweights", ("image", "text"), TWO_SIDED)
    (tmp_path / "noweights" / "adapters.safetensors").write_bytes(b"junk")
    with pytest.raises(SearchError, match="cannot load the model"):
        load_space(tmp_path, "noweights")
