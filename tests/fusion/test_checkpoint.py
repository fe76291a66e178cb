"""Checkpoints: bit-for-bit round trip, encoder fingerprint/dimension checks, the JSON config, and
no pickle anywhere (safetensors + JSON only)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fusion.adapters import Adapter, EncoderRef, FusedModel
from fusion.checkpoint import (
    CONFIG,
    FORMAT_VERSION,
    WEIGHTS,
    CheckpointMismatch,
    load_checkpoint,
    read_config,
    save_checkpoint,
)
from fusion.config import AdapterConfig

CFG = AdapterConfig(depth=2, expansion=2, dropout=0.3, output_dim=6)
ENC = {"image": EncoderRef("effnet-lite0", "sha-img-1", 10), "text": EncoderRef("minilm", "sha-txt-1", 7)}


def _model(seed=0) -> FusedModel:
    torch.manual_seed(seed)
    m = FusedModel({"image": Adapter(10, CFG), "text": Adapter(7, CFG)}, ENC, temperature=0.05)
    with torch.no_grad():  # move every parameter off its initial value, LayerNorms included
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def test_round_trip_bit_for_bit(tmp_path):
    m = _model()
    save_checkpoint(tmp_path / "ckpt", m, CFG, extra={"run": "abc", "steps": 12})
    loaded = load_checkpoint(tmp_path / "ckpt", expect=ENC)
    sa, sb = m.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert loaded.sides == m.sides and loaded.encoders == m.encoders
    assert not loaded.training
    lat = np.random.default_rng(0).standard_normal((9, 10)).astype(np.float32)
    assert torch.equal(loaded.embed("image", lat), m.embed("image", lat))
    assert float(loaded.temperature.detach()) == float(m.temperature.detach())
    # loading without expectations works too
    assert torch.equal(load_checkpoint(tmp_path / "ckpt").embed("image", lat), m.embed("image", lat))


def test_config_json_content(tmp_path):
    save_checkpoint(tmp_path, _model(), CFG, extra={"run": "abc"})
    cfg = json.loads((tmp_path / CONFIG).read_text())
    assert cfg == {
        "format_version": FORMAT_VERSION,
        "sides": ["image", "text"],
        "encoders": {
            "image": {"name": "effnet-lite0", "fingerprint": "sha-img-1", "dim": 10},
            "text": {"name": "minilm", "fingerprint": "sha-txt-1", "dim": 7},
        },
        "adapter": {"depth": 2, "expansion": 2, "dropout": 0.3, "output_dim": 6},
        "extra": {"run": "abc"},
    }
    assert read_config(tmp_path) == cfg


def test_files_are_safetensors_and_json_only_no_pickle(tmp_path, monkeypatch):
    m = _model()

    def no_pickle(*a, **k):
        raise AssertionError("pickle used")

    # torch.save / torch.load and pickle itself are off limits while saving and loading
    monkeypatch.setattr(pickle, "dump", no_pickle)
    monkeypatch.setattr(pickle, "dumps", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "save", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    save_checkpoint(tmp_path, m, CFG)
    load_checkpoint(tmp_path, expect=ENC)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([WEIGHTS, CONFIG])  # no .tmp left
    with safe_open(str(tmp_path / WEIGHTS), framework="pt") as f:
        assert set(f.keys()) == set(m.state_dict())
    raw = (tmp_path / WEIGHTS).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")  # safetensors: u64 header size, JSON header
    header = json.loads(raw[8 : 8 + header_len])  # a pickle or torch.save zip would not parse
    assert set(header) - {"__metadata__"} == set(m.state_dict())
    assert 8 + header_len + sum(v.numel() * 4 for v in m.state_dict().values()) == len(raw)  # all F32


def test_mismatched_fingerprint_names_both(tmp_path):
    save_checkpoint(tmp_path, _model(), CFG)
    other = {"image": EncoderRef("effnet-lite0-v2", "sha-img-2", 10)}
    with pytest.raises(CheckpointMismatch) as err:
        load_checkpoint(tmp_path, expect=other)
    msg = str(err.value)
    assert "sha-img-1" in msg and "sha-img-2" in msg and "effnet-lite0-v2" in msg and "'image'" in msg


def test_mismatched_dimension_names_both(tmp_path):
    save_checkpoint(tmp_path, _model(), CFG)
    with pytest.raises(CheckpointMismatch) as err:
        load_checkpoint(tmp_path, expect={"text": EncoderRef("mpnet", "sha-txt-1", 768)})
    msg = str(err.value)
    assert "7" in msg and "768" in msg and "minilm" in msg and "mpnet" in msg


def test_unknown_side_and_missing_or_foreign_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "a", _model(), CFG)
    with pytest.raises(CheckpointMismatch, match="audio"):
        load_checkpoint(tmp_path / "a", expect={"audio": EncoderRef("clap", "x", 512)})
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(tmp_path / "nothing-here")
    cfg = json.loads((tmp_path / "a" / CONFIG).read_text())
    cfg["format_version"] = 99
    (tmp_path / "a" / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatch, match="99"):
        load_checkpoint(tmp_path / "a")
    assert issubclass(CheckpointMismatch, ValueError)


def test_overwrite_replaces_weights(tmp_path):
    save_checkpoint(tmp_path, _model(0), CFG)
    m1 = _model(1)
    save_checkpoint(tmp_path, m1, CFG)
    loaded = load_checkpoint(tmp_path)
    assert all(torch.equal(v, m1.state_dict()[k]) for k, v in loaded.state_dict().items())
