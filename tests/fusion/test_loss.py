"""Symmetric InfoNCE against a hand computation, its symmetry, the temperature clamp under training
with a huge learning rate, and which parameters get weight decay; the masked and multi-positive variants
against clip_loss and by hand, and the identities they keep."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusion.adapters import Adapter, EncoderRef, FusedModel
from fusion.config import AdapterConfig, FuseMixConfig, TrainConfig
from fusion.loss import clamp_temperature, clip_loss, infonce_from_logits, masked_clip_loss, same_from_groups
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


# --- masked_clip_loss: InfoNCE that knows which pairs of a batch share a positive -------------------


def _rand_pairs(b: int, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1)
    return x, y


@pytest.mark.parametrize("mode", ["masked", "multi"])
def test_masked_loss_is_clip_loss_exactly_without_shared_positives(mode):
    x, y = _rand_pairs(7)
    t = torch.tensor(0.07)
    want = clip_loss(x, y, t)
    assert torch.equal(masked_clip_loss(x, y, t, None, mode=mode), want)
    assert torch.equal(masked_clip_loss(x, y, t, torch.eye(7, dtype=torch.bool), mode=mode), want)
    # the diagonal of `same` is the pair itself whatever it holds
    assert torch.equal(masked_clip_loss(x, y, t, torch.zeros(7, 7, dtype=torch.bool), mode=mode), want)
    # keys that are all distinct, or missing (-1), share nothing
    distinct = torch.tensor([[3, -1], [5, -1], [4, 0], [0, 1], [-1, 2], [1, -1], [2, 3]])
    assert torch.equal(same_from_groups(distinct), torch.eye(7, dtype=torch.bool))
    assert torch.equal(masked_clip_loss(x, y, t, same_from_groups(distinct), mode=mode), want)
    assert torch.equal(same_from_groups(torch.full((7, 2), -1)), torch.eye(7, dtype=torch.bool))
    # ... and the gradients are the very same too
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    masked_clip_loss(xs, ys, t, same_from_groups(distinct), mode=mode).backward()
    xc, yc = x.clone().requires_grad_(), y.clone().requires_grad_()
    clip_loss(xc, yc, t).backward()
    assert torch.equal(xs.grad, xc.grad) and torch.equal(ys.grad, yc.grad)


@pytest.mark.parametrize("mode", ["masked", "multi"])
def test_masked_loss_differs_with_shared_positives(mode):
    x, y = _rand_pairs(7)
    t = torch.tensor(0.07)
    groups = torch.tensor([[0], [1], [0], [2], [3], [4], [5]])  # pairs 0 and 2 share a key
    got = masked_clip_loss(x, y, t, same_from_groups(groups), mode=mode)
    assert abs(float(got) - float(clip_loss(x, y, t))) > 1e-3


def test_same_from_groups_by_hand():
    # columns: media id, caption id; -1 = no key
    groups = torch.tensor([[0, 10], [0, 11], [1, 12], [2, 12], [3, -1], [4, -1]])
    want = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0],  # 0 and 1: one image, two captions
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],  # 2 and 3: one caption, two images
            [0, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 0],  # -1 never matches -1
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(same_from_groups(groups), want)
    with pytest.raises(ValueError, match="integer"):
        same_from_groups(groups.float())
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        same_from_groups(groups[:, 0])


# The existing 3x3 example: logits = cos / 0.1
#   x->y rows: [8, 0, 0], [9.6, 8, 0], [3.6, 6, 8];  y->x rows (columns): [8, 9.6, 3.6], [0, 8, 6], [0, 0, 8]
# with pairs 0 and 1 sharing a positive.
X3 = _unit(np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.6, 0.8]]))
Y3 = _unit(np.array([[0.8, 0.6, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
SAME3 = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)


def _lse(*v: float) -> float:
    return float(np.logaddexp.reduce(np.array(v)))


def test_masked_loss_hand_computation_3x3():
    # masked: the other member of the group leaves the denominator; the target stays the diagonal
    x_to_y = [-8 + _lse(8, 0), -8 + _lse(8, 0), -8 + _lse(3.6, 6, 8)]  # row 1 drops 9.6, row 0 drops 0
    y_to_x = [-8 + _lse(8, 3.6), -8 + _lse(8, 6), -8 + _lse(0, 0, 8)]
    want = 0.5 * (np.mean(x_to_y) + np.mean(y_to_x))
    got = masked_clip_loss(torch.tensor(X3), torch.tensor(Y3), torch.tensor(0.1), SAME3)
    assert float(got) == pytest.approx(want, rel=1e-5)
    per_pair = masked_clip_loss(
        torch.tensor(X3), torch.tensor(Y3), torch.tensor(0.1), SAME3, reduction="none"
    )
    np.testing.assert_allclose(per_pair.numpy(), 0.5 * (np.array(x_to_y) + np.array(y_to_x)), rtol=1e-5)
    # plain InfoNCE pays dearly for x_1 being close to y_0, which masking forgives
    assert float(clip_loss(torch.tensor(X3), torch.tensor(Y3), torch.tensor(0.1))) > float(got) + 0.5


def test_multi_positive_loss_hand_computation_3x3():
    # multi: the target is uniform over the group; the denominator keeps everyone
    x_to_y = [-(8 + 0) / 2 + _lse(8, 0, 0), -(9.6 + 8) / 2 + _lse(9.6, 8, 0), -8 + _lse(3.6, 6, 8)]
    y_to_x = [-(8 + 9.6) / 2 + _lse(8, 9.6, 3.6), -(0 + 8) / 2 + _lse(0, 8, 6), -8 + _lse(0, 0, 8)]
    want = 0.5 * (np.mean(x_to_y) + np.mean(y_to_x))
    got = masked_clip_loss(torch.tensor(X3), torch.tensor(Y3), torch.tensor(0.1), SAME3, mode="multi")
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_masked_loss_never_uses_a_shared_positive_as_a_negative():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 6, generator=g) * 3
    same = same_from_groups(torch.tensor([[0], [1], [0], [2], [1], [0]]))
    off = same & ~torch.eye(6, dtype=torch.bool)
    lg = logits.clone().requires_grad_()
    loss = infonce_from_logits(lg, same)
    loss.backward()
    # no gradient through a shared positive's logit, however large it is ...
    assert (lg.grad[off] == 0).all() and (lg.grad[~off] != 0).all()
    # ... and changing those logits arbitrarily changes nothing
    assert torch.equal(infonce_from_logits(logits.masked_fill(off, 50.0), same), loss.detach())
    # plain InfoNCE does push them down
    lp = logits.clone().requires_grad_()
    infonce_from_logits(lp, None).backward()
    assert (lp.grad[off] > 0).all()


def test_a_same_group_duplicate_leaves_its_group_losses_unchanged():
    """Appending a copy d of pair k with k's key: the per-pair losses of k and d both equal k's loss in
    the batch without the copy (it is not a negative for its own group). For every other pair the copy
    is one more negative, so the mean is not unchanged: that stronger identity does not hold."""
    x, y = _rand_pairs(5, seed=4)
    t = torch.tensor(0.1)
    k = 2
    base = masked_clip_loss(x, y, t, None, reduction="none")  # plain InfoNCE, per pair
    assert float(base.mean()) == pytest.approx(float(clip_loss(x, y, t)), rel=1e-6)
    xd, yd = torch.cat([x, x[k : k + 1]]), torch.cat([y, y[k : k + 1]])
    same = same_from_groups(torch.tensor([[0], [1], [2], [3], [4], [k]]))
    dup = masked_clip_loss(xd, yd, t, same, reduction="none")
    torch.testing.assert_close(dup[k], base[k])
    torch.testing.assert_close(dup[5], base[k])
    others = [0, 1, 3, 4]
    assert (dup[others] > base[others]).all()
    # plain InfoNCE makes the copy a negative of its own original
    plain = masked_clip_loss(xd, yd, t, None, reduction="none")
    assert float(plain[k]) > float(base[k]) + 0.05


def test_multi_positive_on_a_fully_duplicated_batch_is_plain_loss_plus_log_2():
    """[x; x] with each copy in its original's group: the two equal targets are one positive split in
    half, so multi = clip_loss(x, y) + log 2 exactly (as is plain InfoNCE on [x; x]); masked is not."""
    x, y = _rand_pairs(6, seed=5)
    t = torch.tensor(0.1)
    xx, yy = torch.cat([x, x]), torch.cat([y, y])
    same = same_from_groups(torch.arange(12)[:, None] % 6)
    want = float(clip_loss(x, y, t)) + np.log(2)
    assert float(masked_clip_loss(xx, yy, t, same, mode="multi")) == pytest.approx(want, rel=1e-5)
    assert float(clip_loss(xx, yy, t)) == pytest.approx(want, rel=1e-5)
    assert abs(float(masked_clip_loss(xx, yy, t, same)) - want) > 1e-3


def test_multi_positive_is_plain_infonce_when_a_group_shares_one_exact_caption():
    """Six images of one caption: the caption rows are exact duplicates, so plain InfoNCE's x->y row already
    spreads the target over them and its y->x rows add up to the uniform target: multi changes nothing."""
    g = torch.Generator().manual_seed(7)
    x = torch.nn.functional.normalize(torch.randn(9, 5, generator=g), dim=-1)
    caption = torch.tensor([0, 0, 0, 1, 2, 2, 3, 4, 4])
    y = torch.nn.functional.normalize(torch.randn(5, 5, generator=g), dim=-1)[caption]
    t = torch.tensor(0.1)
    same = same_from_groups(caption[:, None])
    xs = x.clone().requires_grad_()
    multi = masked_clip_loss(xs, y, t, same, mode="multi")
    multi.backward()
    xc = x.clone().requires_grad_()
    plain = clip_loss(xc, y, t)
    plain.backward()
    torch.testing.assert_close(multi, plain)
    torch.testing.assert_close(xs.grad, xc.grad)
    assert abs(float(masked_clip_loss(x, y, t, same)) - float(plain.detach())) > 1e-2  # masked does differ


def test_masked_loss_whole_batch_one_group_is_zero_with_finite_gradients():
    x, y = _rand_pairs(4, seed=6)
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    t = torch.tensor(0.07, requires_grad=True)
    loss = masked_clip_loss(xs, ys, t, torch.ones(4, 4, dtype=torch.bool))
    loss.backward()
    assert float(loss.detach()) == 0.0  # every row's only candidate is its positive
    assert torch.isfinite(xs.grad).all() and torch.isfinite(ys.grad).all() and torch.isfinite(t.grad)


def test_masked_loss_bad_inputs():
    x, y = _rand_pairs(3)
    t = torch.tensor(0.1)
    with pytest.raises(ValueError, match="same shape"):
        masked_clip_loss(x, y[:, :4], t, None)
    with pytest.raises(ValueError, match="bool"):
        masked_clip_loss(x, y, t, torch.eye(3))
    with pytest.raises(ValueError, match="bool"):
        masked_clip_loss(x, y, t, torch.eye(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="symmetric"):
        masked_clip_loss(x, y, t, torch.tensor([[1, 1, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.bool))
    with pytest.raises(ValueError, match="mode"):
        masked_clip_loss(x, y, t, None, mode="soft")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reduction"):
        masked_clip_loss(x, y, t, None, reduction="sum")  # type: ignore[arg-type]
