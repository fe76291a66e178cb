"""End to end on the synthetic task: trained adapters retrieve far above chance, and FuseMix beats no
augmentation when paired data are scarce (mean over several seeds, each seed a different task).

The comparison trains both arms identically (same adapters, steps, contrastive batch, seed; no
dropout, so the augmentation is the only regulariser) and scores Recall@1 on the held-out test split,
averaged over both directions. Run the slow part with `pytest -m slow tests/fusion/test_end_to_end.py`.

A second synthetic task has shared positives (one concept drawn in several styles and named by several
captions): there the masked InfoNCE of TrainConfig(loss="masked") is measured against plain InfoNCE.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from evaluation.retrieval import chance_recall, retrieval_metrics
from fusion.config import AdapterConfig, FuseMixConfig, TrainConfig
from fusion.synthetic import make_task
from fusion.trainer import train_adapters

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _test_recall_at_1(model, task) -> float:
    ex = model.embed("x", task.x_test)
    ey = model.embed("y", task.y_test)
    pairs = np.arange(len(ex))
    m = retrieval_metrics(ex, ey, pairs, pairs)
    return 0.5 * (m.t2i_recall[1] + m.i2t_recall[1])


def test_training_retrieves_far_above_chance():
    task = make_task(n_train=256, n_val=128, n_test=512, noise=1.0, curvature=2.0, seed=0)
    res = train_adapters(
        task.x_train,
        task.y_train,
        AdapterConfig(depth=1, expansion=2, dropout=0.1, output_dim=64),
        FuseMixConfig("fusemix"),
        TrainConfig(batch_size=64, steps=50, warmup_steps=10, seed=0, eval_every=25),
        x_val=task.x_val,
        y_val=task.y_val,
    )
    chance = chance_recall(512, 1)
    r1 = _test_recall_at_1(res.model, task)
    assert r1 > 25 * chance, f"R@1 {r1:.3f} vs chance {chance:.4f}"
    # an untrained model of the same shape is near chance: the gain comes from training
    untrained = train_adapters(
        task.x_train,
        task.y_train,
        AdapterConfig(depth=1, expansion=2, dropout=0.1, output_dim=64),
        FuseMixConfig("fusemix"),
        TrainConfig(batch_size=64, steps=1, lr=1e-9, warmup_steps=0, seed=0),
    )
    assert _test_recall_at_1(untrained.model, task) < 5 * chance


# Scarce data: 128 training pairs, low noise, strongly curved views. Measured on this setting
# (R@1 on 512 test pairs, mean of both directions; seeds 0-5, each a different task), FuseMix won on
# every seed: differences +0.012 +0.023 +0.019 +0.010 +0.020 +0.012 (mean +0.016, none at ~0.92).
# With 64 pairs (noise 1.0, curvature 2.0, batch 32) it won on every seed too: +0.042 +0.018 +0.022
# +0.020 +0.016 +0.022 (seeds 0-5, none at ~0.37). Training is deterministic on the CPU, so these
# numbers repeat exactly here; the margins below leave room for other BLAS builds.
SCARCE = dict(n_train=128, n_val=256, n_test=512, noise=0.5, curvature=4.0)


def _scarce_run(seed: int, mode: str) -> float:
    task = make_task(**SCARCE, seed=seed)
    res = train_adapters(
        task.x_train,
        task.y_train,
        AdapterConfig(depth=2, expansion=2, dropout=0.0, output_dim=64),
        FuseMixConfig(mode),
        # Equal steps and equal contrastive batch (64) for both arms; fusemix draws 128 raw pairs
        # per step to mix them into 64.
        TrainConfig(batch_size=64, epochs=None, steps=200, warmup_steps=10, seed=seed),
    )
    return _test_recall_at_1(res.model, task)


@pytest.mark.slow
def test_fusemix_beats_no_augmentation_with_scarce_data():
    seeds = (0, 1, 2)
    fusemix = np.array([_scarce_run(s, "fusemix") for s in seeds])
    none = np.array([_scarce_run(s, "none") for s in seeds])
    diff = fusemix - none
    report = f"fusemix {np.round(fusemix, 3)} none {np.round(none, 3)} diff {np.round(diff, 3)}"
    assert fusemix.mean() > 50 * chance_recall(512, 1), report  # both really learn the task
    assert diff.mean() > 0.005, report
    assert (diff > 0).sum() >= 2, report


# --- shared positives: many pairs per concept in a batch ----------------------------------------------


@dataclass(frozen=True)
class SharedTask:
    x_train: np.ndarray  # [P, dx] one row per training pair
    y_train: np.ndarray  # [P, dy]
    groups_train: np.ndarray  # int64 [P, 3]: media id, caption id, concept id
    items_test: np.ndarray  # [n_test * styles, dx] each test image once
    texts_test: np.ndarray  # [n_test * captions, dy] each test caption once
    pair_items_test: np.ndarray  # the test pairs as row indices: every image of a concept with every
    pair_texts_test: np.ndarray  # caption of it


def make_shared_task(
    n_train: int = 16,
    n_test: int = 64,
    styles: int = 6,
    captions: int = 4,
    k: int = 16,
    dx: int = 384,
    dy: int = 256,
    noise: float = 1.0,
    curvature: float = 2.0,
    seed: int = 0,
) -> SharedTask:
    """Concepts z_c; each drawn in `styles` styles (image c, s = f(z_c + style_s) + noise, the style
    offsets shared by all concepts) and named by `captions` captions (g(z_c) + noise, different
    captions of one meaning). Every image of a concept is paired with every caption of it, so one
    concept gives styles * captions pairs sharing a concept, `captions` sharing each image and `styles`
    sharing each caption. Train and test concepts are disjoint."""
    rng = np.random.default_rng(seed)

    def net(d: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.standard_normal((k, 4 * k)) / np.sqrt(k), rng.standard_normal((4 * k, d)) / np.sqrt(4 * k)

    def view(w: tuple[np.ndarray, np.ndarray], latent: np.ndarray) -> np.ndarray:
        out = (np.tanh(curvature * (latent @ w[0])) / curvature) @ w[1]
        out /= out.std(axis=0, keepdims=True) + 1e-8
        return (out + noise * rng.standard_normal(out.shape)).astype(np.float32)

    fx, fy = net(dx), net(dy)
    style = rng.standard_normal((styles, k))
    z = rng.standard_normal((n_train + n_test, k))
    images = view(fx, (z[:, None, :] + style[None]).reshape(-1, k))  # row c * styles + s
    texts = view(fy, np.repeat(z, captions, axis=0))  # row c * captions + j

    def pairs(concepts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = np.repeat(concepts, styles * captions)
        s = np.tile(np.repeat(np.arange(styles), captions), len(concepts))
        j = np.tile(np.arange(captions), styles * len(concepts))
        return c * styles + s, c * captions + j

    img, txt = pairs(np.arange(n_train))
    groups = np.stack([img, txt, img // styles], axis=1).astype(np.int64)
    ti, tt = pairs(np.arange(n_train, n_train + n_test))
    return SharedTask(
        images[img],
        texts[txt],
        groups,
        images[n_train * styles :],
        texts[n_train * captions :],
        ti - n_train * styles,
        tt - n_train * captions,
    )


def _shared_run(
    task: SharedTask, loss: str, mode: str, seed: int, batch: int = 256, steps: int = 200
) -> float:
    res = train_adapters(
        task.x_train,
        task.y_train,
        AdapterConfig(depth=2, expansion=2, dropout=0.0, output_dim=64),
        FuseMixConfig(mode),
        TrainConfig(batch_size=batch, epochs=None, steps=steps, warmup_steps=10, seed=seed, loss=loss),
        groups=task.groups_train,
    )
    ex, ey = res.model.embed("x", task.items_test), res.model.embed("y", task.texts_test)
    m = retrieval_metrics(ex, ey, task.pair_items_test, task.pair_texts_test)
    return 0.5 * (m.t2i_recall[1] + m.i2t_recall[1])


def test_shared_task_pairs_and_keys():
    t = make_shared_task(n_train=2, n_test=3, styles=3, captions=2, seed=0)
    assert t.x_train.shape == (12, 384) and t.y_train.shape == (12, 256)
    # concept 0: images 0-2 x captions 0-1, then concept 1: images 3-5 x captions 2-3
    np.testing.assert_array_equal(t.groups_train[:, 0], [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    np.testing.assert_array_equal(t.groups_train[:, 1], [0, 1] * 3 + [2, 3] * 3)
    np.testing.assert_array_equal(t.groups_train[:, 2], [0] * 6 + [1] * 6)
    assert np.array_equal(t.y_train[0], t.y_train[2]) and np.array_equal(t.x_train[0], t.x_train[1])
    assert t.items_test.shape == (9, 384) and t.texts_test.shape == (6, 256)
    assert len(t.pair_items_test) == 18 and t.pair_texts_test.max() == 5


# Measured on make_shared_task() (16 train concepts: 384 pairs; 64 test concepts: 384 images and 256
# captions), test R@1 (mean of both directions), seeds 0-4, masked minus plain:
#   no mixing, batch 256, 200 steps: +0.002 +0.020 +0.027 +0.024 +0.035 (plain 0.412, masked 0.433)
#   no mixing, batch 128, 100 steps: +0.016 +0.071 +0.020 +0.035 +0.053 (plain 0.381, masked 0.420)
#   FuseMix,   batch 256, 200 steps: +0.045 +0.020 +0.043 +0.012 -0.050 (plain 0.426, masked 0.440)
#   FuseMix,   batch 128, 100 steps: -0.005 +0.028 -0.002 -0.026 -0.031 (plain 0.428, masked 0.421)
# multi (batch 256, 200 steps): no mixing 0.413 (= plain), FuseMix 0.218 (-0.21: see TrainConfig).
# On a task with fewer pairs per concept in a batch (48 concepts x 6 styles x 2 captions, batch 128),
# masked and plain were within +-0.02 either way, with or without mixing. So: without mixing masked is
# asserted to win (it did on every seed measured); with FuseMix only not to lose by more than a margin.
SHARED_FAST = dict(batch=128, steps=100)


def test_masked_loss_trains_at_least_as_well_as_plain_infonce_with_shared_positives():
    task = make_shared_task(seed=0)
    plain = _shared_run(task, "infonce", "none", seed=0, **SHARED_FAST)
    masked = _shared_run(task, "masked", "none", seed=0, **SHARED_FAST)
    assert plain > 15 * chance_recall(256, 1, n_correct=4), plain  # the task is learnt at all
    assert masked >= plain - 0.01, f"masked {masked:.3f} plain {plain:.3f}"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "fusemix"])
def test_masked_loss_against_plain_infonce_over_seeds(mode):
    seeds = (0, 1, 2)
    tasks = [make_shared_task(seed=s) for s in seeds]
    plain = np.array([_shared_run(t, "infonce", mode, seed=s) for s, t in zip(seeds, tasks, strict=True)])
    masked = np.array([_shared_run(t, "masked", mode, seed=s) for s, t in zip(seeds, tasks, strict=True)])
    diff = masked - plain
    report = f"{mode}: plain {np.round(plain, 3)} masked {np.round(masked, 3)} diff {np.round(diff, 3)}"
    assert plain.mean() > 15 * chance_recall(256, 1, n_correct=4), report
    if mode == "none":
        assert diff.mean() > 0.005 and (diff > 0).sum() >= 2, report
    else:
        assert diff.mean() > -0.02, report
