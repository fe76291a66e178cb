"""Trainer: bit-for-bit determinism on CPU, step accounting, the lr schedule, best-checkpoint
selection on validation, streaming chunks (every pair once per epoch), bad input, bf16 on CPU; group keys
for the masked losses (plain runs unchanged bit for bit, the mask of every batch, chunks with keys)."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch

from fusion.config import AdapterConfig, FuseMixConfig, TrainConfig
from fusion.trainer import _batches, contrastive_val_score, lr_factor, train_adapters

SMALL = AdapterConfig(depth=1, expansion=2, dropout=0.1, output_dim=8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(n=96, dx=12, dy=10, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 6))
    x = z @ rng.standard_normal((6, dx)) + 0.3 * rng.standard_normal((n, dx))
    y = np.tanh(z @ rng.standard_normal((6, dy))) + 0.3 * rng.standard_normal((n, dy))
    return x.astype(np.float32), y.astype(np.float32)


def _train(x, y, mode="fusemix", **kw):
    cfg = dict(batch_size=16, steps=8, warmup_steps=2, seed=0)
    cfg.update(kw)
    return train_adapters(x, y, SMALL, FuseMixConfig(mode), TrainConfig(**cfg))


def _states_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_deterministic_on_cpu_bit_for_bit():
    x, y = _data()
    r1, r2 = _train(x, y), _train(x, y)
    assert _states_equal(r1.model, r2.model)
    assert [h["loss"] for h in r1.history] == [h["loss"] for h in r2.history]
    r3 = _train(x, y, seed=1)
    assert not _states_equal(r1.model, r3.model)


def test_history_and_step_accounting():
    x, y = _data(n=100)
    seen = []
    r = _train(x, y, mode="none", steps=None, epochs=3, batch_size=32)
    # 100 pairs in batches of 32: 3 full batches and a partial one of 4 per epoch
    assert r.steps == len(r.history) == 3 * math.ceil(100 / 32)
    assert [h["step"] for h in r.history] == list(range(r.steps))
    assert [h["epoch"] for h in r.history] == [e for e in range(3) for _ in range(4)]
    assert r.pairs_seen == 300
    # fusemix draws twice the contrastive batch of raw pairs (two are mixed into one)
    rf = train_adapters(
        x,
        y,
        SMALL,
        FuseMixConfig("fusemix"),
        TrainConfig(batch_size=32, epochs=3, warmup_steps=0),
        on_step=seen.append,
    )
    assert rf.steps == len(rf.history) == 3 * math.ceil(100 / 64)
    assert seen == rf.history  # the callback sees every row
    assert set(seen[0]) >= {"step", "epoch", "loss", "temperature", "lr"}


def test_auto_batch_trains_exactly_as_the_batch_it_resolves_to():
    x, y = _data(n=300)  # 300 pairs: auto resolves to its floor, 128, so FuseMix draws 256 a step
    auto = _train(x, y, steps=None, epochs=2, batch_size="auto")
    fixed = _train(x, y, steps=None, epochs=2, batch_size=128)
    assert auto.batch_size == fixed.batch_size == 128
    assert auto.steps == 2 * math.ceil(300 / 256)
    assert _states_equal(auto.model, fixed.model)
    assert not _states_equal(auto.model, _train(x, y, steps=None, epochs=2, batch_size=64).model)
    # the batch the loss saw: half the raw draw with FuseMix's halves, and never more than the data
    assert _train(x, y, mode="none", batch_size=32).batch_size == 32
    assert _train(x[:40], y[:40], batch_size=32).batch_size == 20


def test_steps_override_epochs():
    x, y = _data()
    r = _train(x, y, steps=5, epochs=50)
    assert r.steps == len(r.history) == 5


def test_lr_factor_warmup_then_cosine():
    total, warm = 110, 10
    assert lr_factor(0, total, warm, "cosine") == pytest.approx(0.1)
    assert lr_factor(4, total, warm, "cosine") == pytest.approx(0.5)
    assert lr_factor(9, total, warm, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, total, warm, "cosine") == pytest.approx(1.0)
    assert lr_factor(60, total, warm, "cosine") == pytest.approx(0.5)  # halfway through the decay
    assert lr_factor(35, total, warm, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(110, total, warm, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(110, total, warm, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(500, total, warm, "cosine") == pytest.approx(0.0, abs=1e-12)  # past the end: stays
    assert lr_factor(60, total, warm, "constant") == 1.0
    assert lr_factor(3, total, warm, "constant") == pytest.approx(0.4)
    assert lr_factor(0, total, 0, "cosine") == pytest.approx(1.0)
    vals = [lr_factor(s, total, warm, "cosine") for s in range(total)]
    assert all(a < b for a, b in zip(vals[:9], vals[1:10], strict=True))  # rises during warm-up
    assert all(a >= b for a, b in zip(vals[10:-1], vals[11:], strict=True))  # never rises after


def test_history_lr_is_the_lr_used_at_that_step():
    x, y = _data()
    r = _train(x, y, mode="none", steps=12, warmup_steps=4, lr=1e-3)
    want = [1e-3 * lr_factor(s, 12, 4, "cosine") for s in range(12)]
    assert [h["lr"] for h in r.history] == pytest.approx(want)
    assert r.history[0]["lr"] == pytest.approx(2.5e-4)


def _dist2(model, ref: dict) -> float:
    return float(sum(((v.float() - ref[k].float()) ** 2).sum() for k, v in model.state_dict().items()))


def test_best_checkpoint_is_chosen_on_validation():
    x, y = _data()
    cfg = TrainConfig(batch_size=16, steps=6, warmup_steps=0, lr=1e-2, eval_every=1)
    snapshots: dict[int, dict] = {}
    calls = []

    def snapshot(model) -> float:
        assert not model.training  # validation runs in eval mode
        snapshots[len(calls)] = copy.deepcopy(model.state_dict())
        calls.append(1)
        return float(len(calls))  # the last is best: training returns the final model

    r_last = train_adapters(
        x,
        y,
        SMALL,
        FuseMixConfig("none"),
        cfg,
        validator=snapshot,
    )
    assert r_last.best_step == 6 and len(r_last.val_history) == 6
    assert r_last.model.training is False
    # Validation after step 2 (the second call) is the target: a real score, the closer the better.
    target = snapshots[1]
    assert not _states_equal_dict(snapshots[5], target)  # training moved on after step 2

    def prefers_step_2(model) -> float:
        return -_dist2(model, target)

    validated = []
    r = train_adapters(
        x,
        y,
        SMALL,
        FuseMixConfig("none"),
        cfg,
        validator=prefers_step_2,
        on_validate=validated.append,
    )
    assert r.best_step == 2
    assert r.best_score == 0.0  # training is deterministic, so step 2 is exactly the target
    assert validated == r.val_history and [v["step"] for v in validated] == list(range(1, 7))
    assert max(v["score"] for v in r.val_history) == r.best_score
    assert prefers_step_2(r.model) == r.best_score  # the returned model IS the step-2 model
    assert _states_equal_dict(r.model.state_dict(), target)
    assert r.steps == 6  # training still ran to the end


def _states_equal_dict(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_default_validation_score_matches_recomputation():
    x, y = _data(n=192)
    x, y, xv, yv = x[:128], y[:128], x[128:], y[128:]
    r = train_adapters(
        x,
        y,
        SMALL,
        FuseMixConfig("fusemix"),
        TrainConfig(batch_size=16, epochs=4, warmup_steps=2, lr=1e-2),
        x_val=xv,
        y_val=yv,
    )
    assert len(r.val_history) == 4  # once per epoch by default
    assert r.best_step in [v["step"] for v in r.val_history]
    assert contrastive_val_score(r.model, xv, yv) == pytest.approx(r.best_score, abs=1e-5)
    # validation loss falls as it trains
    scores = [v["score"] for v in r.val_history]
    assert scores[-1] > scores[0] + 1.0, scores


def _index_rows(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pair i has x = [i, i] and y = [-i]: the index travels with the pair."""
    idx = np.arange(n, dtype=np.float32)
    return np.stack([idx, idx], axis=1), -idx[:, None]


@pytest.mark.parametrize("sizes", [[5, 17, 3, 30], [55], [8, 8, 8, 8, 8, 8, 7], [1, 1, 1, 52]])
def test_batches_feed_every_pair_once_per_epoch(sizes):
    x, y = _index_rows(sum(sizes))
    bounds = np.cumsum([0] + sizes)
    source = lambda: [(x[a:b], y[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]  # noqa: E731
    rng = np.random.default_rng(0)
    for _epoch in range(2):
        batches = list(_batches(source, 8, rng))
        seen = np.concatenate([bx[:, 0] for bx, _ in batches])
        assert sorted(seen.tolist()) == list(range(55))
        for bx, by in batches:
            np.testing.assert_array_equal(bx[:, 0], -by[:, 0])  # pairs stay aligned
            np.testing.assert_array_equal(bx[:, 0], bx[:, 1])
        # full batches, and the last partial batch (55 = 6 * 8 + 7) still trains
        assert [len(b[0]) for b in batches] == [8] * 6 + [7]


def test_batches_shuffle_differently_each_epoch():
    x, y = _index_rows(64)
    rng = np.random.default_rng(0)
    e1 = np.concatenate([b[0][:, 0] for b in _batches(lambda: [(x, y)], 16, rng)])
    e2 = np.concatenate([b[0][:, 0] for b in _batches(lambda: [(x, y)], 16, rng)])
    assert not np.array_equal(e1, e2) and sorted(e1) == sorted(e2)


def test_streaming_one_chunk_equals_arrays_and_many_chunks_train():
    x, y = _data(n=96)
    arrays = _train(x, y, steps=6)
    one = train_adapters(
        None,
        None,
        SMALL,
        FuseMixConfig("fusemix"),
        TrainConfig(batch_size=16, steps=6, warmup_steps=2),
        chunks=lambda: [(x, y)],
    )
    assert _states_equal(arrays.model, one.model)
    pieces = lambda: [(x[a : a + 20], y[a : a + 20]) for a in range(0, 96, 20)]  # noqa: E731
    cfg = TrainConfig(batch_size=16, epochs=8, warmup_steps=2, lr=1e-2)
    streamed = train_adapters(None, None, SMALL, FuseMixConfig("fusemix"), cfg, chunks=pieces)
    whole = train_adapters(x, y, SMALL, FuseMixConfig("fusemix"), cfg)
    assert streamed.steps == whole.steps and streamed.pairs_seen == whole.pairs_seen == 8 * 96
    tail = lambda r: np.mean([h["loss"] for h in r.history[-8:]])  # noqa: E731
    first = lambda r: np.mean([h["loss"] for h in r.history[:4]])  # noqa: E731
    assert tail(streamed) < first(streamed) - 2.0  # it learns (an untrained 8-d adapter scores ~9)
    assert tail(streamed) == pytest.approx(tail(whole), abs=0.5)


def test_nan_latents_give_a_clear_error():
    x, y = _data()
    x[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        _train(x, y)
    x2, y2 = _data()
    y2[5, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        train_adapters(
            None,
            None,
            SMALL,
            FuseMixConfig(),
            TrainConfig(batch_size=16, steps=3),
            chunks=lambda: [(x2[:50], y2[:50]), (x2[50:], y2[50:])],
        )
    xv, yv = _data(n=16, seed=3)
    xv[0, 0] = np.nan
    x3, y3 = _data()
    with pytest.raises(ValueError, match="validation"):
        train_adapters(
            x3, y3, SMALL, FuseMixConfig(), TrainConfig(batch_size=16, steps=3), x_val=xv, y_val=yv
        )


def test_bad_inputs():
    x, y = _data()
    cfg = TrainConfig(batch_size=16, steps=2)
    with pytest.raises(ValueError, match="either"):
        train_adapters(x, y, SMALL, FuseMixConfig(), cfg, chunks=lambda: [(x, y)])
    with pytest.raises(ValueError, match="either"):
        train_adapters(None, None, SMALL, FuseMixConfig(), cfg)
    with pytest.raises(ValueError, match="same length"):
        train_adapters(x, y[:-1], SMALL, FuseMixConfig(), cfg)
    with pytest.raises(ValueError, match="no training pairs"):
        train_adapters(None, None, SMALL, FuseMixConfig(), cfg, chunks=lambda: [])
    with pytest.raises(ValueError, match="x rows"):
        train_adapters(None, None, SMALL, FuseMixConfig(), cfg, chunks=lambda: [(x, y[:-1])])


def test_one_shot_chunk_source_is_an_error_not_a_hang():
    x, y = _data()
    it = iter([(x, y)])
    calls = []

    def once():
        calls.append(1)
        return it if len(calls) > 1 else [(x, y)]  # the peek sees data, then training finds it spent

    with pytest.raises(ValueError, match="fresh iterator"):
        train_adapters(None, None, SMALL, FuseMixConfig(), TrainConfig(batch_size=16, epochs=3), chunks=once)


def test_bf16_on_cpu_runs_with_finite_loss():
    x, y = _data()
    r = _train(x, y, precision="bf16", steps=4)
    assert len(r.history) == 4
    assert all(np.isfinite(h["loss"]) for h in r.history)
    emb = r.model.embed("x", x[:5])
    assert emb.dtype == torch.float32 and torch.isfinite(emb).all()
    with pytest.raises(ValueError, match="fp16"):
        _train(x, y, precision="fp16", steps=2)


def test_sides_and_encoders_name_the_model():
    x, y = _data()
    r = train_adapters(
        x, y, SMALL, FuseMixConfig(), TrainConfig(batch_size=16, steps=2), sides=("image", "text")
    )
    assert r.model.sides == ("image", "text")
    assert r.model.encoders["image"].dim == 12 and r.model.encoders["text"].dim == 10
    assert r.model.embed("text", y[:3]).shape == (3, 8)


# --- shared positives: groups through the batching, the mask per batch, the configured loss ----------


def _distinct_groups(n: int) -> np.ndarray:
    """Keys that share nothing: a distinct id in one column, and no key (-1) in the other."""
    return np.stack([np.arange(n), np.full(n, -1)], axis=1).astype(np.int64)


def _concept_groups(n: int, per: int = 4) -> np.ndarray:
    return (np.arange(n) // per)[:, None].astype(np.int64)


def _same_run(a, b) -> bool:
    return _states_equal(a.model, b.model) and [h["loss"] for h in a.history] == [
        h["loss"] for h in b.history
    ]


def test_default_training_calls_plain_clip_loss_every_step(monkeypatch):
    """The default config takes the plain path: clip_loss on every step, never the masked loss, so a
    run is what it was before groups existed (bit-identity with the previous trainer was also checked
    by training before and after the change)."""
    import fusion.trainer as trainer

    calls = {"clip": 0, "masked": 0}
    real_clip = trainer.clip_loss

    def spy_clip(*a, **k):
        calls["clip"] += 1
        return real_clip(*a, **k)

    def no_masked(*a, **k):
        calls["masked"] += 1
        raise AssertionError("masked_clip_loss must not run with the default config")

    x, y = _data()
    plain = _train(x, y)
    monkeypatch.setattr(trainer, "clip_loss", spy_clip)
    monkeypatch.setattr(trainer, "masked_clip_loss", no_masked)
    assert TrainConfig(steps=1).loss == "infonce"
    spied = _train(x, y)
    assert calls == {"clip": 8, "masked": 0}
    assert _same_run(plain, spied)
    # groups given to the plain loss are ignored: the very same run
    with_groups = train_adapters(
        x,
        y,
        SMALL,
        FuseMixConfig(),
        TrainConfig(batch_size=16, steps=8, warmup_steps=2),
        groups=_concept_groups(96),
    )
    assert _same_run(plain, with_groups)


@pytest.mark.filterwarnings("ignore:loss='multi' with FuseMix mixing")
@pytest.mark.parametrize("mode", ["fusemix", "independent", "none"])
@pytest.mark.parametrize("loss", ["masked", "multi"])
def test_masked_training_without_shared_keys_is_plain_training_bit_for_bit(mode, loss):
    x, y = _data()
    plain = _train(x, y, mode=mode)
    cfg = TrainConfig(batch_size=16, steps=8, warmup_steps=2, seed=0, loss=loss)
    masked = train_adapters(x, y, SMALL, FuseMixConfig(mode), cfg, groups=_distinct_groups(len(x)))
    assert _same_run(plain, masked)
    # with shared keys it is a different run
    shared = train_adapters(x, y, SMALL, FuseMixConfig(mode), cfg, groups=_concept_groups(len(x)))
    assert not _states_equal(plain.model, shared.model)


def test_permutation_masks_mixed_pairs_with_a_common_source():
    """Permutation mixes pair i into rows i and p^-1(i): those rows share a source, so even keys that share
    nothing change the masked run (the halves schemes use each raw pair once and do not)."""
    x, y = _data()
    plain = _train(x, y, mode="permutation")
    cfg = TrainConfig(batch_size=16, steps=8, warmup_steps=2, seed=0, loss="masked")
    masked = train_adapters(x, y, SMALL, FuseMixConfig("permutation"), cfg, groups=_distinct_groups(len(x)))
    assert not _states_equal(plain.model, masked.model)


@pytest.mark.parametrize("mode", ["fusemix", "permutation", "none"])
def test_the_trainer_masks_exactly_the_pairs_that_share_a_key(monkeypatch, mode):
    """Pair i carries its index in x, so each batch's `same` can be checked against the keys."""
    import fusion.trainer as trainer

    n = 64
    x, y = _index_rows(n)
    x = np.concatenate([x, np.random.default_rng(0).standard_normal((n, 4)).astype(np.float32)], axis=1)
    rng = np.random.default_rng(1)
    groups = np.stack([rng.integers(-1, 8, n), rng.integers(-1, 20, n)], axis=1)
    seen = []
    real_mix, real_loss = trainer.mix_with_sources, trainer.masked_clip_loss

    def spy_mix(xb, yb, cfg, r):
        out = real_mix(xb, yb, cfg, r)
        seen.append({"idx": xb[:, 0].long(), "a": out[2], "b": out[3]})
        return out

    def spy_loss(ex, ey, t, same, mode):
        seen[-1]["same"], seen[-1]["mode"] = same, mode
        return real_loss(ex, ey, t, same, mode=mode)

    monkeypatch.setattr(trainer, "mix_with_sources", spy_mix)
    monkeypatch.setattr(trainer, "masked_clip_loss", spy_loss)
    loss = "multi" if mode == "none" else "masked"
    cfg = TrainConfig(batch_size=16, steps=5, warmup_steps=0, loss=loss)
    train_adapters(x, y, SMALL, FuseMixConfig(mode), cfg, groups=groups)
    assert len(seen) == 5
    for s in seen:
        keys = groups[s["idx"].numpy()]  # the batch's rows of the key array
        raw = np.eye(len(keys), dtype=bool)
        for c in range(keys.shape[1]):
            raw |= (keys[:, c][:, None] == keys[:, c][None, :]) & (keys[:, c] >= 0)[:, None]
        a, b = s["a"].numpy(), s["b"].numpy()
        want = raw[a][:, a] | raw[a][:, b] | raw[b][:, a] | raw[b][:, b]
        np.testing.assert_array_equal(s["same"].numpy(), want)
        assert s["mode"] == loss
        assert want.sum() > len(want)  # the check is not vacuous


def test_multi_with_mixing_warns():
    x, y = _data()
    g = _concept_groups(len(x))
    with pytest.warns(UserWarning, match="loss='multi' with FuseMix mixing"):
        train_adapters(
            x, y, SMALL, FuseMixConfig(), TrainConfig(batch_size=16, steps=1, loss="multi"), groups=g
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_adapters(
            x, y, SMALL, FuseMixConfig("none"), TrainConfig(batch_size=16, steps=1, loss="multi"), groups=g
        )
        train_adapters(
            x, y, SMALL, FuseMixConfig(), TrainConfig(batch_size=16, steps=1, loss="masked"), groups=g
        )


def test_batches_carry_groups_aligned_without_changing_the_shuffle():
    x, y = _index_rows(55)
    g = (np.arange(55) * 10)[:, None]
    sizes = [5, 17, 3, 30]
    bounds = np.cumsum([0] + sizes)
    plain = lambda: [(x[a:b], y[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]  # noqa: E731
    keyed = lambda: [(x[a:b], y[a:b], g[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]  # noqa: E731
    r1, r2 = np.random.default_rng(0), np.random.default_rng(0)
    for _epoch in range(2):
        without = list(_batches(plain, 8, r1))
        with_g = list(_batches(keyed, 8, r2, with_groups=True))
        assert len(without) == len(with_g) == 7
        for (bx, by), (gx, gy, gg) in zip(without, with_g, strict=True):
            assert np.array_equal(bx, gx) and np.array_equal(by, gy)
            np.testing.assert_array_equal(gg[:, 0], 10 * gx[:, 0])  # keys stay with their pair
            assert gg.dtype == np.int64
    # without with_groups, keyed chunks give plain (x, y) batches
    assert all(len(b) == 2 for b in _batches(keyed, 8, np.random.default_rng(0)))


def test_streamed_chunks_with_groups_equal_the_array_path():
    x, y = _data(n=96)
    g = _concept_groups(96)
    cfg = TrainConfig(batch_size=16, steps=6, warmup_steps=2, loss="masked")
    arrays = train_adapters(x, y, SMALL, FuseMixConfig(), cfg, groups=g)
    one = train_adapters(None, None, SMALL, FuseMixConfig(), cfg, chunks=lambda: [(x, y, g)])
    assert _same_run(arrays, one)
    pieces = lambda: [(x[a : a + 20], y[a : a + 20], g[a : a + 20]) for a in range(0, 96, 20)]  # noqa: E731
    streamed = train_adapters(None, None, SMALL, FuseMixConfig(), cfg, chunks=pieces)
    assert streamed.steps == 6 and all(np.isfinite(h["loss"]) for h in streamed.history)


def test_groups_bad_inputs():
    x, y = _data()
    g = _concept_groups(len(x))
    masked = TrainConfig(batch_size=16, steps=2, loss="masked")
    with pytest.raises(ValueError, match="needs groups"):
        train_adapters(x, y, SMALL, FuseMixConfig(), masked)
    with pytest.raises(ValueError, match="needs groups"):
        train_adapters(None, None, SMALL, FuseMixConfig(), masked, chunks=lambda: [(x, y)])
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        train_adapters(x, y, SMALL, FuseMixConfig(), masked, groups=g[:-1])
    with pytest.raises(ValueError, match="integer"):
        train_adapters(x, y, SMALL, FuseMixConfig(), masked, groups=g.astype(np.float32))
    with pytest.raises(ValueError, match="-1 for none"):
        train_adapters(x, y, SMALL, FuseMixConfig(), masked, groups=g - 5)
    with pytest.raises(ValueError, match="inside the chunks"):
        train_adapters(None, None, SMALL, FuseMixConfig(), masked, chunks=lambda: [(x, y)], groups=g)
    with pytest.raises(ValueError, match="some chunks carry groups"):
        train_adapters(
            None,
            None,
            SMALL,
            FuseMixConfig(),
            masked,
            chunks=lambda: [(x[:50], y[:50], g[:50]), (x[50:], y[50:])],
        )
    with pytest.raises(ValueError, match="chunk 0 must be"):
        train_adapters(None, None, SMALL, FuseMixConfig(), masked, chunks=lambda: [(x,)])
    # a 1-D key array is one key column
    r = train_adapters(x, y, SMALL, FuseMixConfig(), masked, groups=g[:, 0])
    assert r.steps == 2
