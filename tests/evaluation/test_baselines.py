"""Tests of evaluation.baselines: each method against hand-computed results on tiny fixtures, selection on
validation only, save/load, and chance versus well above chance on the synthetic task."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch

from evaluation import baselines
from evaluation.baselines import (
    BASELINES,
    DEFAULTS,
    GRIDS,
    WEIGHTS,
    fit_baseline,
    is_baseline,
    load_baseline,
    orthogonal_procrustes,
    rsum,
    save_baseline,
)
from evaluation.retrieval import PairedSplit, chance_levels, evaluate_model
from fusion.adapters import Adapter, EncoderRef, FusedModel
from fusion.checkpoint import CONFIG, FORMAT_VERSION, CheckpointMismatch, read_config, save_checkpoint
from fusion.config import AdapterConfig
from fusion.synthetic import make_task

SIDES = ("image", "text")


def encoders(dx: int, dy: int) -> dict[str, EncoderRef]:
    return {"image": EncoderRef("img-enc", "fp-img", dx), "text": EncoderRef("txt-enc", "fp-txt", dy)}


def one_to_one(x: np.ndarray, y: np.ndarray) -> PairedSplit:
    n = len(x)
    return PairedSplit(
        [f"m{i}" for i in range(n)], [f"c{i}" for i in range(n)], x, y, np.arange(n), np.arange(n)
    )


def fit(method, x, y, val=None, **kw):
    return fit_baseline(method, x, y, val=val, sides=SIDES, encoders=encoders(x.shape[1], y.shape[1]), **kw)


@pytest.fixture(scope="module")
def task():
    return make_task(n_train=256, n_val=64, n_test=256, k=8, dx=48, dy=32, noise=1.0, seed=0)


# ----------------------------------------------------------------------------------------------- ASIF

# Media anchors in 2-D, text anchors in 3-D: three training pairs.
ANCHORS_X = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32)
ANCHORS_Y = np.array([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)


def test_asif_top_k_and_exponent_by_hand():
    model, info = fit("asif", ANCHORS_X, ANCHORS_Y, params={"k": 2, "exponent": 2, "centre": False})
    assert info["k"] == 2 and info["exponent"] == 2 and info["centre"] is False
    assert info["selected_by"] == "params" and info["val_rsum"] is None
    # x = (3, 4) -> unit (0.6, 0.8); cosines 0.6, 0.8, 1.4 / sqrt(2); top 2 squared: 0, 0.64, 0.98.
    want = np.array([0.0, 0.64, 0.98]) / math.sqrt(0.64**2 + 0.98**2)
    np.testing.assert_allclose(model.embed("image", np.array([[3.0, 4.0]])), [want], atol=1e-6)
    # y = (1, 1, 0): cosines 1/sqrt(2), 1/sqrt(2), 0; squared 0.5, 0.5, 0.
    want_t = np.array([1.0, 1.0, 0.0]) / math.sqrt(2)
    np.testing.assert_allclose(model.embed("text", np.array([[1.0, 1.0, 0.0]])), [want_t], atol=1e-6)
    # x = (-3, 4): cosines -0.6, 0.8, 0.1 * sqrt(2); top 2 keeps 0.8 and 0.1414, squared 0.64 and 0.02.
    want_neg = np.array([0.0, 0.64, 0.02]) / math.sqrt(0.64**2 + 0.02**2)
    np.testing.assert_allclose(model.embed("image", np.array([[-3.0, 4.0]])), [want_neg], atol=1e-6)
    # x = (-4, 3): cosines -0.8, 0.6, -0.1 * sqrt(2); the top 2 hold a negative one, clamped to 0 before
    # squaring (else it would come back as 0.02).
    np.testing.assert_allclose(model.embed("image", np.array([[-4.0, 3.0]])), [[0.0, 1.0, 0.0]], atol=1e-6)


def test_asif_clamps_negative_similarities_before_the_exponent():
    model, _ = fit("asif", ANCHORS_X, ANCHORS_Y, params={"k": "all", "exponent": 2, "centre": False})
    # x = (-3, 4): cosines -0.6, 0.8, 0.1414; the -0.6 must not come back as 0.36.
    want = np.array([0.0, 0.64, 0.02]) / math.sqrt(0.64**2 + 0.02**2)
    np.testing.assert_allclose(model.embed("image", np.array([[-3.0, 4.0]])), [want], atol=1e-6)


def test_asif_centring_by_hand():
    model, _ = fit("asif", ANCHORS_X, ANCHORS_Y, params={"k": "all", "exponent": 1, "centre": True})
    # Media mean (2/3, 2/3): centred anchors (1, -2)/3, (-2, 1)/3, (1, 1)/3; x = (5/3, 2/3) centres to (1, 0).
    # Cosines: 1/sqrt(5), -2/sqrt(5), 1/sqrt(2); clamped: 1/sqrt(5), 0, 1/sqrt(2).
    want = np.array([1 / math.sqrt(5), 0.0, 1 / math.sqrt(2)])
    want /= np.linalg.norm(want)
    np.testing.assert_allclose(model.embed("image", np.array([[5 / 3, 2 / 3]])), [want], atol=1e-6)
    # Text mean (2/3, 1, 1/3); y = (2/3, 1, 4/3) centres to (0, 0, 1); centred anchors
    # (4/3, -1, -1/3), (-2/3, 2, -1/3), (-2/3, -1, 2/3): cosines of their last coordinate over their norm.
    anchors = ANCHORS_Y - ANCHORS_Y.mean(axis=0)
    cos = np.clip(anchors[:, 2] / np.linalg.norm(anchors, axis=1), 0, None)
    got = model.embed("text", np.array([[2 / 3, 1.0, 4 / 3]]))
    np.testing.assert_allclose(got, [cos / np.linalg.norm(cos)], atol=1e-6)
    assert got[0, 0] == 0 and got[0, 1] == 0 and got[0, 2] == pytest.approx(1.0)


def test_asif_all_k_exponent_one_is_normalised_cosine_vector():
    rng = np.random.default_rng(1)
    x, y = np.abs(rng.normal(size=(20, 6))), np.abs(rng.normal(size=(20, 4)))  # positive: no clamping
    qx, qy = np.abs(rng.normal(size=(7, 6))), np.abs(rng.normal(size=(5, 4)))
    model, _ = fit("asif", x, y, params={"k": "all", "exponent": 1, "centre": False})

    def cosine_vectors(q, anchors):
        sims = np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in anchors] for a in q])
        return sims / np.linalg.norm(sims, axis=1, keepdims=True)

    assert model.embed("image", qx).shape == (7, 20) and model.embed("image", qx).dtype == np.float32
    np.testing.assert_allclose(model.embed("image", qx), cosine_vectors(qx, x), atol=1e-6)
    np.testing.assert_allclose(model.embed("text", qy), cosine_vectors(qy, y), atol=1e-6)


def test_asif_blocks_do_not_change_the_result(monkeypatch):
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(40, 5)).astype(np.float32), rng.normal(size=(40, 3)).astype(np.float32)
    model, _ = fit("asif", x, y, params={"k": 7, "exponent": 4, "centre": True})
    q = rng.normal(size=(33, 5)).astype(np.float32)
    whole = model.embed("image", q)
    monkeypatch.setattr(baselines, "_BLOCK_ELEMENTS", 100)  # 2 rows per block
    np.testing.assert_allclose(model.embed("image", q), whole, atol=1e-6)  # same up to matmul rounding
    assert ((whole > 0).sum(axis=1) <= 7).all()
    np.testing.assert_allclose(np.linalg.norm(whole, axis=1), 1.0, rtol=1e-5)


def test_asif_max_anchors_subsamples_with_the_seed():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(30, 4)), rng.normal(size=(30, 3))
    p = {"k": "all", "exponent": 1, "centre": False, "max_anchors": 10}
    a, _ = fit("asif", x, y, params=p, seed=5)
    b, _ = fit("asif", x, y, params=p, seed=5)
    assert a.n_anchors == 10 and a.embed("image", x[:3]).shape == (3, 10)
    np.testing.assert_array_equal(a.anchors[0], b.anchors[0])
    rows = [int(np.flatnonzero((x.astype(np.float32) == r).all(axis=1))[0]) for r in a.anchors[0]]
    np.testing.assert_array_equal(a.anchors[1], y[rows].astype(np.float32))  # pairs stay pairs


# ----------------------------------------------------------------------------------------------- ridge


def test_ridge_by_hand():
    # y = (2x + 1, x) exactly. Centred: xc = (-1, 0, 1), yc = ((-2, -1), (0, 0), (2, 1)); Xc^T Xc = 2, so
    # the relative alpha 1 is lam = 2: W = (2 + 2)^-1 (4, 2) = (1, 0.5); b = (3, 1) - 1 * W = (2, 0.5).
    x = np.array([[0.0], [1.0], [2.0]])
    y = np.array([[1.0, 0.0], [3.0, 1.0], [5.0, 2.0]])
    model, info = fit("ridge", x, y, params={"alpha": 1.0})
    assert info["alpha"] == 1.0
    np.testing.assert_allclose(model.weight, [[1.0, 0.5]], atol=1e-12)
    np.testing.assert_allclose(model.bias, [2.0, 0.5], atol=1e-12)
    np.testing.assert_allclose(
        model.embed("image", np.array([[3.0]])), [np.array([5.0, 2.0]) / math.sqrt(29)]
    )
    np.testing.assert_allclose(model.embed("text", np.array([[3.0, 4.0]])), [[0.6, 0.8]])
    exact, _ = fit("ridge", x, y, params={"alpha": 0.0})
    np.testing.assert_allclose(exact.weight, [[2.0, 1.0]], atol=1e-12)
    np.testing.assert_allclose(exact.bias, [1.0, 0.0], atol=1e-12)


def test_ridge_recovers_a_linear_map_as_alpha_goes_to_zero():
    rng = np.random.default_rng(4)
    w_true, b_true = rng.normal(size=(6, 4)), rng.normal(size=4)
    x = rng.normal(size=(50, 6))
    y = x @ w_true + b_true
    for alpha in (0.0, 1e-10):
        model, _ = fit("ridge", x, y, params={"alpha": alpha})
        np.testing.assert_allclose(model.weight, w_true, atol=1e-6)
        np.testing.assert_allclose(model.bias, b_true, atol=1e-6)
    q = rng.normal(size=(5, 6))
    model, _ = fit("ridge", x, y, params={"alpha": 0.0})
    want = q @ w_true + b_true
    np.testing.assert_allclose(
        model.embed("image", q), want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-6
    )


def test_ridge_matches_the_normal_equations():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(30, 5)) * 3 + 1, rng.normal(size=(30, 3))
    model, _ = fit("ridge", x, y, params={"alpha": 0.3})
    xc, yc = x - x.mean(0), y - y.mean(0)
    lam = 0.3 * np.trace(xc.T @ xc) / 5
    w = np.linalg.solve(xc.T @ xc + lam * np.eye(5), xc.T @ yc)
    np.testing.assert_allclose(model.weight, w, atol=1e-10)
    np.testing.assert_allclose(model.bias, y.mean(0) - x.mean(0) @ w, atol=1e-10)


# ----------------------------------------------------------------------------------------------- Procrustes


def test_orthogonal_procrustes_by_hand():
    quarter_turn = np.array([[0.0, 1.0], [-1.0, 0.0]])
    np.testing.assert_allclose(orthogonal_procrustes(np.eye(2), quarter_turn), quarter_turn, atol=1e-12)
    # X = diag(2, 1), Y = X rotated by 90 degrees: X^T Y = [[0, 4], [-1, 0]] = U S V^T; R is the turn.
    x = np.diag([2.0, 1.0])
    np.testing.assert_allclose(orthogonal_procrustes(x, x @ quarter_turn), quarter_turn, atol=1e-12)


def test_orthogonal_procrustes_recovers_a_random_rotation():
    rng = np.random.default_rng(6)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    x = rng.normal(size=(40, 5))
    np.testing.assert_allclose(orthogonal_procrustes(x, x @ q), q, atol=1e-10)


def test_procrustes_recovers_a_known_rotation_through_pca():
    rng = np.random.default_rng(7)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    x = rng.normal(size=(60, 5)) * np.array([5.0, 4.0, 3.0, 2.0, 1.0])  # distinct variances
    shift = rng.normal(size=5)
    model, _ = fit("procrustes", x, x @ q + shift, params={"r": 5, "whiten": False})
    # PCA bases: pca_y(x q + shift) = pca_x(x) D with D = Vx^T q Vy (signs); R must be exactly that.
    np.testing.assert_allclose(model.rotation, model.projs[0].T @ q @ model.projs[1], atol=1e-8)
    np.testing.assert_allclose(np.abs(model.rotation), np.eye(5), atol=1e-8)
    qx = rng.normal(size=(9, 5))
    np.testing.assert_allclose(model.embed("image", qx), model.embed("text", qx @ q + shift), atol=1e-6)


def test_procrustes_aligns_spaces_of_different_dimensions():
    # z [n, 3] seen isometrically in 6-d (media) and 4-d (text): r = 3 aligns every pair exactly.
    rng = np.random.default_rng(8)
    a = np.linalg.qr(rng.normal(size=(6, 3)))[0].T  # [3, 6], orthonormal rows
    b = np.linalg.qr(rng.normal(size=(4, 3)))[0].T  # [3, 4]
    z = rng.normal(size=(50, 3)) * np.array([3.0, 2.0, 1.0])
    model, info = fit("procrustes", z @ a, z @ b, params={"r": 3, "whiten": False})
    assert info["r"] == 3 and model.dim == 3
    zq = rng.normal(size=(8, 3))
    ex, ey = model.embed("image", zq @ a), model.embed("text", zq @ b)
    np.testing.assert_allclose(ex, ey, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(ex, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(model.rotation @ model.rotation.T, np.eye(3), atol=1e-10)


def test_procrustes_whitening_scales_components_to_unit_variance():
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(80, 6)) * np.arange(1, 7), rng.normal(size=(80, 4))
    model, _ = fit("procrustes", x, y, params={"r": 4, "whiten": True})
    reduced = (x - model.means[0]) @ model.projs[0]
    np.testing.assert_allclose(reduced.std(axis=0, ddof=1), 1.0, rtol=1e-8)


# ----------------------------------------------------------------------------------------------- random


def test_random_is_seeded_untrained_adapters_and_leaves_the_global_rng_alone():
    cfg = AdapterConfig(depth=1, expansion=2, dropout=0.1, output_dim=8)
    x, y = np.zeros((4, 6), np.float32), np.zeros((4, 5), np.float32)
    state = torch.random.get_rng_state()
    model, info = fit("random", x, y, seed=3, adapter_cfg=cfg)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert info["selected_by"] == "params" and info["seed"] == 3
    torch.manual_seed(3)
    ref = FusedModel({"image": Adapter(6, cfg), "text": Adapter(5, cfg)}, encoders(6, 5)).eval()
    q = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
    got = model.embed("image", q)
    assert isinstance(got, np.ndarray) and got.shape == (3, 8)
    np.testing.assert_array_equal(got, ref.embed("image", q).numpy())
    assert isinstance(model.fused, FusedModel)
    other, _ = fit("random", x, y, seed=4, adapter_cfg=cfg)
    assert not np.allclose(other.embed("image", q), got)


# ----------------------------------------------------------------------------------------------- selection


def test_selection_is_the_argmax_of_validation_rsum(task):
    val = one_to_one(task.x_val, task.y_val)
    model, info = fit("ridge", task.x_train, task.y_train, val=val)
    assert info["selected_by"] == "val"
    assert [p["alpha"] for p in info["grid"]] == list(GRIDS["ridge"]["alpha"])
    scores = []
    for alpha in GRIDS["ridge"]["alpha"]:  # each point fitted on its own and scored independently
        m, _ = fit("ridge", task.x_train, task.y_train, params={"alpha": alpha})
        scores.append(rsum(evaluate_model(m, val)[0]))
    assert [p["val_rsum"] for p in info["grid"]] == pytest.approx(scores)
    assert info["alpha"] == GRIDS["ridge"]["alpha"][int(np.argmax(scores))]
    assert info["val_rsum"] == pytest.approx(max(scores))
    assert max(scores) > min(scores)  # the grid is not flat, so the choice means something


def test_selection_follows_val_and_ignores_test(task):
    """fit_baseline never sees a test split: replacing the test data changes nothing, while a different
    validation split (the training pairs themselves, where the least regularisation wins) does."""
    val = one_to_one(task.x_val, task.y_val)
    _, held_out = fit("ridge", task.x_train, task.y_train, val=val)
    test_a = one_to_one(task.x_test, task.y_test)
    rng = np.random.default_rng(0)
    test_b = one_to_one(rng.normal(size=task.x_test.shape), rng.normal(size=task.y_test.shape))
    for _test in (test_a, test_b):  # what the pipeline would score afterwards; it cannot reach the fit
        _, again = fit("ridge", task.x_train, task.y_train, val=val)
        assert again == held_out
    _, on_train = fit(
        "ridge", task.x_train, task.y_train, val=one_to_one(task.x_train[:64], task.y_train[:64])
    )
    assert on_train["alpha"] < held_out["alpha"], (on_train, held_out)


def test_asif_grid_dedupes_k_and_fixed_params_narrow_the_search(task):
    val = one_to_one(task.x_val, task.y_val)
    x, y = task.x_train[:100], task.y_train[:100]
    _, info = fit("asif", x, y, val=val, params={"exponent": 4})
    ks = [p["k"] for p in info["grid"]]
    assert set(ks) == {8, 32, "all"} and len(info["grid"]) == 3 * 2  # 128 and 512 >= 100 anchors: "all"
    assert {p["exponent"] for p in info["grid"]} == {4} and info["exponent"] == 4
    assert info["selected_by"] == "val"
    best = max(info["grid"], key=lambda p: p["val_rsum"])
    assert (info["k"], info["centre"]) == (best["k"], best["centre"])


def test_defaults_without_validation(task):
    for method in ("asif", "ridge", "procrustes"):
        model, info = fit(method, task.x_train, task.y_train)
        assert info["selected_by"] == "default" and info["grid"] == [] and info["val_rsum"] is None
        for key, value in DEFAULTS[method].items():
            want = min(value, 32) if key == "r" else value  # the default r is capped at min(dx, dy, n_train)
            assert info[key] == want and model.params[key] == want
    _, info = fit("procrustes", task.x_train[:20], task.y_train[:20])
    assert info["r"] == 20


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("clip", None, r"unknown baseline 'clip'.*asif.*ridge.*procrustes.*random"),
        (
            "asif",
            {"kk": 3},
            r"unknown asif params \['kk'\]; valid: \['centre', 'exponent', 'k', 'max_anchors'\]",
        ),
        ("asif", {"k": 0}, r'k must be an integer >= 1 or "all"'),
        ("asif", {"k": "some"}, r'k must be an integer >= 1 or "all"'),
        ("asif", {"exponent": -1}, "exponent must be a finite number > 0"),
        ("asif", {"centre": 1}, "centre must be True or False"),
        ("ridge", {"alpha": -1.0}, "alpha must be a finite number >= 0"),
        ("ridge", {"alpha": float("nan")}, "alpha must be a finite number >= 0"),
        ("procrustes", {"r": 2.5}, "r must be an integer >= 1"),
        ("procrustes", {"r": 50}, r"r = 50 exceeds min\(dx, dy, n_train\) = 4"),
        ("random", {"k": 3}, r"unknown random params \['k'\]; valid: none"),
    ],
)
def test_bad_method_or_params(method, params, message):
    x, y = np.ones((10, 6)), np.ones((10, 4))
    with pytest.raises(ValueError, match=message):
        fit(method, x, y, params=params)


def test_bad_shapes_and_sides():
    x, y = np.ones((10, 6)), np.ones((10, 4))
    with pytest.raises(ValueError, match="x_train is 6-d but encoder img-enc gives 5-d"):
        fit_baseline("ridge", x, y, val=None, sides=SIDES, encoders=encoders(5, 4))
    with pytest.raises(ValueError, match="row-aligned"):
        fit("ridge", x, y[:9])
    with pytest.raises(ValueError, match="must name exactly the sides"):
        fit_baseline("ridge", x, y, val=None, sides=("audio", "text"), encoders=encoders(6, 4))
    model, _ = fit("ridge", np.random.default_rng(0).normal(size=(10, 6)), y)
    with pytest.raises(ValueError, match=r"side 'image' expects latents \[B, 6\]"):
        model.embed("image", np.ones((2, 4)))
    with pytest.raises(KeyError, match="unknown side 'audio'"):
        model.embed("audio", np.ones((2, 6)))
    assert model.embed("text", np.ones((0, 4))).shape == (0, 4)


# ----------------------------------------------------------------------------------------------- files


@pytest.mark.parametrize("method", BASELINES)
def test_save_load_round_trip(tmp_path, task, method, monkeypatch):
    cfg = AdapterConfig(depth=1, expansion=1, dropout=0.0, output_dim=16)
    model, info = fit(method, task.x_train[:64], task.y_train[:64], adapter_cfg=cfg)

    def no_pickle(*a, **k):
        raise AssertionError("pickle used")

    for mod, name in ((pickle, "dump"), (pickle, "dumps"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(mod, name, no_pickle)
    monkeypatch.setattr(torch, "save", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    out = save_baseline(tmp_path / "b", model, extra={"val_rsum": info["val_rsum"], "run": "r1"})
    assert sorted(p.name for p in out.iterdir()) == sorted([WEIGHTS, CONFIG])  # no .tmp left
    assert is_baseline(out)
    config = read_config(out)  # fusion.checkpoint reads it too
    assert config["format_version"] == FORMAT_VERSION and config["kind"] == "baseline"
    assert config["method"] == method and config["sides"] == list(SIDES)
    assert config["params"] == model.params and config["extra"] == {"val_rsum": None, "run": "r1"}
    assert config["encoders"]["image"] == {"name": "img-enc", "fingerprint": "fp-img", "dim": 48}
    loaded = load_baseline(out, expect=encoders(48, 32))
    assert type(loaded) is type(model) and loaded.params == model.params and loaded.sides == SIDES
    assert loaded.encoders == model.encoders
    for side, q in (("image", task.x_test[:20]), ("text", task.y_test[:20])):
        np.testing.assert_array_equal(loaded.embed(side, q), model.embed(side, q))


def test_load_checks_the_encoders(tmp_path, task):
    model, _ = fit("ridge", task.x_train[:64], task.y_train[:64])
    save_baseline(tmp_path, model)
    with pytest.raises(CheckpointMismatch) as err:
        load_baseline(tmp_path, expect={"image": EncoderRef("img-enc-v2", "fp-img-2", 48)})
    msg = str(err.value)
    assert "fp-img" in msg and "fp-img-2" in msg and "img-enc-v2" in msg and "'image'" in msg
    with pytest.raises(CheckpointMismatch, match="48-d latents from img-enc, got 768-d from big"):
        load_baseline(tmp_path, expect={"image": EncoderRef("big", "fp-img", 768)})
    with pytest.raises(CheckpointMismatch, match="not 'audio'"):
        load_baseline(tmp_path, expect={"audio": EncoderRef("a", "b", 1)})
    assert load_baseline(tmp_path, expect={"text": EncoderRef("txt-enc", "fp-txt", 32)}).dim == 32


def test_adapter_checkpoints_are_not_baselines(tmp_path):
    cfg = AdapterConfig(depth=0, expansion=1, dropout=0.0, output_dim=4)
    fused = FusedModel({"image": Adapter(6, cfg), "text": Adapter(5, cfg)}, encoders(6, 5))
    save_checkpoint(tmp_path / "ckpt", fused, cfg)
    assert not is_baseline(tmp_path / "ckpt") and not is_baseline(tmp_path / "missing")
    with pytest.raises(CheckpointMismatch, match="not a baseline"):
        load_baseline(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="not a baseline model"):
        save_baseline(tmp_path / "x", fused)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / CONFIG).write_text("{not json")
    assert not is_baseline(tmp_path / "bad")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / CONFIG).write_text(json.dumps({"format_version": FORMAT_VERSION, "kind": "baseline"}))
    with pytest.raises(ValueError, match="unknown baseline None"):
        load_baseline(tmp_path / "odd")


# ----------------------------------------------------------------------------------------------- synthetic


def test_random_is_near_chance_and_the_others_well_above(task):
    val, test = one_to_one(task.x_val, task.y_val), one_to_one(task.x_test, task.y_test)
    chance = chance_levels(test.pair_items, test.pair_texts, len(test.item_ids), len(test.text_ids), ks=(1,))
    r1_chance = chance["t2i"][1]  # 1 / 256
    r1 = {}
    for method in BASELINES:
        cfg = AdapterConfig(depth=1, expansion=1, dropout=0.0, output_dim=32)
        model, _ = fit(method, task.x_train, task.y_train, val=val, adapter_cfg=cfg)
        result, item_emb, text_emb = evaluate_model(model, test)
        np.testing.assert_allclose(np.linalg.norm(item_emb, axis=1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(text_emb, axis=1), 1.0, rtol=1e-5)
        r1[method] = (result.t2i_recall[1] + result.i2t_recall[1]) / 2
    assert r1["random"] < 5 * r1_chance, r1
    for method in ("asif", "ridge", "procrustes"):
        assert r1[method] > 25 * r1_chance, r1
