"""Binding a third modality through a frozen side (fusion.trainer `fixed`, FusedModel.restrict): the
fixed adapter never changes, only the other side trains, and two media sides bound to one text side
retrieve each other although no media-media pair was trained on.

    .venv/bin/pytest -q tests/fusion/test_bind.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.retrieval import chance_levels, retrieval_metrics
from fusion.adapters import Adapter
from fusion.config import AdapterConfig, FuseMixConfig, TrainConfig
from fusion.trainer import train_adapters

CFG = AdapterConfig(depth=1, expansion=2, dropout=0.1, output_dim=32)
TRAIN = TrainConfig(epochs=30, batch_size=64, warmup_steps=5, lr=2e-3)


def three_views(n: int, seed: int = 0, k: int = 8, noise: float = 0.3) -> dict[str, np.ndarray]:
    """Shared factors z seen through three random nonlinear maps: image [n, 48], text [n, 40],
    audio [n, 56]."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, k))
    out = {}
    for side, d in (("image", 48), ("text", 40), ("audio", 56)):
        w1 = rng.standard_normal((k, 4 * k)) / np.sqrt(k)
        w2 = rng.standard_normal((4 * k, d)) / np.sqrt(4 * k)
        v = np.tanh(z @ w1) @ w2
        v /= v.std(axis=0, keepdims=True)
        out[side] = (v + noise * rng.standard_normal((n, d))).astype(np.float32)
    return out


def test_a_fixed_side_stays_frozen_and_the_other_side_lands_in_its_space():
    views = three_views(1600)
    a, b, test = slice(0, 600), slice(600, 1200), slice(1200, 1600)
    image_text = train_adapters(
        views["image"][a], views["text"][a], CFG, FuseMixConfig(), TRAIN, sides=("image", "text")
    ).model
    text_before = {k: v.clone() for k, v in image_text.adapters["text"].state_dict().items()}
    # Other pairs (rows 600-1200) of audio and text; the text adapter is the image-text model's.
    bound = train_adapters(
        views["audio"][b],
        views["text"][b],
        CFG,
        FuseMixConfig(),
        TRAIN,
        sides=("audio", "text"),
        fixed={"text": image_text.adapters["text"]},
    )
    model = bound.model
    assert bound.history[-1]["loss"] < bound.history[0]["loss"]
    # The frozen copy equals the anchor's adapter and the anchor's own was not touched.
    for key, value in model.adapters["text"].state_dict().items():
        assert torch.equal(value, text_before[key])
        assert torch.equal(image_text.adapters["text"].state_dict()[key], text_before[key])
    assert not any(p.requires_grad for p in model.adapters["text"].parameters())
    assert model.adapters["text"] is not image_text.adapters["text"]

    # Emergent: audio queries against images of the held-out rows, never trained together.
    audio = model.embed("audio", views["audio"][test])
    image = image_text.embed("image", views["image"][test])
    idx = np.arange(400)
    emergent = retrieval_metrics(image, audio, idx, idx, ks=(1, 10))
    chance = chance_levels(idx, idx, 400, 400, ks=(1, 10))
    assert emergent.t2i_recall[10] > 5 * chance["t2i"][10]
    assert emergent.i2t_recall[10] > 5 * chance["i2t"][10]

    # Without the shared text side (an audio-text model trained on its own) there is no common space.
    alone = train_adapters(
        views["audio"][b], views["text"][b], CFG, FuseMixConfig(), TRAIN, sides=("audio", "text")
    ).model
    unrelated = retrieval_metrics(image, alone.embed("audio", views["audio"][test]), idx, idx, ks=(10,))
    assert emergent.t2i_recall[10] > unrelated.t2i_recall[10] + 0.2


def test_fixed_adapters_are_checked():
    x = np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32)
    y = np.random.default_rng(1).standard_normal((32, 6)).astype(np.float32)
    quick = TrainConfig(steps=2, batch_size=16, warmup_steps=0)
    with pytest.raises(ValueError, match="at most one side"):
        train_adapters(x, y, CFG, FuseMixConfig(), quick, fixed={"x": Adapter(8, CFG), "y": Adapter(6, CFG)})
    with pytest.raises(ValueError, match="these latents are 6-d"):
        train_adapters(x, y, CFG, FuseMixConfig(), quick, fixed={"y": Adapter(7, CFG)})
    with pytest.raises(ValueError, match="maps to 32-d"):
        train_adapters(
            x, y, CFG, FuseMixConfig(), quick, fixed={"y": Adapter(6, AdapterConfig(output_dim=16))}
        )
    with pytest.raises(ValueError, match="not one of the sides"):
        train_adapters(x, y, CFG, FuseMixConfig(), quick, fixed={"z": Adapter(6, CFG)})


def test_restrict_shares_adapters_in_the_given_order():
    views = three_views(64)
    m = train_adapters(
        views["audio"], views["text"], CFG, FuseMixConfig(), TrainConfig(steps=2, batch_size=32),
        sides=("audio", "text"),
    ).model  # fmt: skip
    view = m.restrict(("text", "audio"))
    assert view.sides == ("text", "audio")
    assert view.adapters["audio"] is m.adapters["audio"]
    assert torch.equal(view.embed("audio", views["audio"][:4]), m.embed("audio", views["audio"][:4]))
    with pytest.raises(KeyError, match="unknown sides"):
        m.restrict(("image",))
