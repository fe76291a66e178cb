"""Symmetric InfoNCE against a hand computation, its symmetry, the temperature clamp under training
with a huge learning rate, and which parameters get weight decay."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusion.adapters import Adapter, EncoderRef, FusedModel
from fusion.config import AdapterConfig, FuseMixConfig, TrainConfig
from fusion.loss import clamp_temperature, clip_loss
from fusion.trainer import param_groups, train_adapters

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise log softmax written out: z_ij - log sum_k exp(z_ik), shifted by the row max."""
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def test_loss_equals_hand_computation_3x3():
    x = _unit(np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.6, 0.8]]))
    y = _unit(np.array([[0.8, 0.6, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    t = 0.1
    logits = (x @ y.T) / t  # [3, 3]; entry (i, j) = cos(x_i, y_j) / t
    # e.g. logits[0] = [8, 0, 0]: x_0 . y_0 = 0.8
    np.testing.assert_allclose(logits[0], [8.0, 0.0, 0.0])
    x_to_y = -np.mean(np.diag(_log_softmax(logits)))  # row i: which y belongs to x_i
    y_to_x = -np.mean(np.diag(_log_softmax(logits.T)))  # column i: which x belongs to y_i
    want = 0.5 * (x_to_y + y_to_x)
    got = clip_loss(torch.tensor(x), torch.tensor(y), torch.tensor(t))
    assert float(got) == pytest.approx(want, rel=1e-5)
    # and the two directions differ on this example, so averaging both matters
    assert abs(x_to_y - y_to_x) > 1e-3


def test_loss_perfect_and_uniform_cases():
    eye = torch.eye(4)
    # perfectly separated at low temperature: loss near 0
    assert float(clip_loss(eye, eye, torch.tensor(0.01))) < 1e-6
    # all features equal: every candidate is equally likely, loss = log B
    same = torch.nn.functional.normalize(torch.ones(4, 3), dim=-1)
    assert float(clip_loss(same, same, torch.tensor(0.07))) == pytest.approx(np.log(4), rel=1e-6)


def test_loss_is_symmetric():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(6, 5, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(6, 5, generator=g), dim=-1)
    t = torch.tensor(0.07)
    torch.testing.assert_close(clip_loss(x, y, t), clip_loss(y, x, t))
    # permuting the pairs together changes nothing
    p = torch.randperm(6, generator=g)
    torch.testing.assert_close(clip_loss(x[p], y[p], t), clip_loss(x, y, t))


def test_loss_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        clip_loss(torch.zeros(3, 4), torch.zeros(3, 5), torch.tensor(0.1))


def test_loss_bf16_inputs_are_computed_in_fp32():
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    t = torch.tensor(0.05)
    out = clip_loss(x.bfloat16(), y.bfloat16(), t)
    assert out.dtype == torch.float32
    assert float(out) == pytest.approx(float(clip_loss(x, y, t)), rel=0.05)


def test_clamp_temperature():
    assert float(clamp_temperature(torch.tensor(5.0))) == 0.5
    assert float(clamp_temperature(torch.tensor(1e-6))) == pytest.approx(0.001)
    assert float(clamp_temperature(torch.tensor(0.07))) == pytest.approx(0.07)
    assert float(clamp_temperature(torch.tensor(0.3), 0.01, 0.2)) == pytest.approx(0.2)


def test_temperature_gets_a_gradient_inside_the_range():
    x = torch.nn.functional.normalize(torch.randn(5, 4), dim=-1)
    t = torch.tensor(0.07, requires_grad=True)
    clip_loss(x, x, clamp_temperature(t)).backward()
    assert t.grad is not None and float(t.grad) != 0.0


@pytest.mark.parametrize("lr", [5.0, 50.0])
def test_temperature_stays_clamped_under_a_huge_learning_rate(lr):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 12)).astype(np.float32)
    y = (x[:, :8] + 0.1 * rng.standard_normal((64, 8))).astype(np.float32)
    res = train_adapters(
        x,
        y,
        AdapterConfig(depth=1, expansion=2, dropout=0.0, output_dim=8),
        FuseMixConfig("none"),
        TrainConfig(batch_size=32, steps=6, lr=lr, warmup_steps=0, schedule="constant", weight_decay=0.0),
    )
    temps = [row["temperature"] for row in res.history]
    eps = 1e-7  # the temperature is float32: 0.001 is stored as 0.00100000005
    assert all(0.001 - eps <= t <= 0.5 + eps for t in temps), temps
    on_bound = [min(abs(t - 0.001), abs(t - 0.5)) < eps for t in temps]
    assert any(on_bound), f"the huge lr should push the temperature onto a bound: {temps}"
    assert 0.001 - eps <= float(res.model.temperature.detach()) <= 0.5 + eps


def test_weight_decay_only_on_matrices():
    cfg = AdapterConfig(depth=2, expansion=2, dropout=0.0, output_dim=4)
    model = FusedModel(
        {"a": Adapter(6, cfg), "b": Adapter(5, cfg)},
        {"a": EncoderRef("ea", "fa", 6), "b": EncoderRef("eb", "fb", 5)},
    )
    groups = param_groups(model.adapters.values(), weight_decay=0.1)
    decay = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    names = dict(model.named_parameters())
    for name, p in names.items():
        if name == "temperature":
            assert id(p) not in decay and id(p) not in no_decay  # the trainer adds it in its own group
        elif name.endswith(".weight") and ("fc" in name or "proj" in name):
            assert id(p) in decay, name
        else:  # biases and LayerNorm weights
            assert ("bias" in name or "norm" in name) and id(p) in no_decay, name
    # every adapter parameter lands in exactly one group
    assert len(decay) + len(no_decay) == len(names) - 1
    assert decay.isdisjoint(no_decay)
    # handing the whole model in keeps the (0-d) temperature out of weight decay too
    whole = param_groups([model], weight_decay=0.1)
    assert id(model.temperature) in {id(p) for p in whole[1]["params"]}
