"""FuseMix latent mixup: convex combinations, shared lambda across modalities, pair alignment, batch
sizes per mode, seeding, and the Beta(alpha, alpha) distribution of lambda; the source pairs of each
mixed pair, and which mixed pairs share a positive."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fusion.config import FuseMixConfig
from fusion.fusemix import mix_latents, mix_with_sources, mixed_same, mixed_same_from_groups
from fusion.loss import same_from_groups


def _recover(mixed: torch.Tensor, src: torch.Tensor) -> tuple[int, int, float]:
    """Finds (a, b, lam) with mixed = lam * src[a] + (1 - lam) * src[b], lam in [0, 1], a != b.

    mixed: [d]; src: [B, d]. Brute force over ordered pairs: least-squares lambda, smallest residual.
    """
    best = (None, None, None, float("inf"))
    m, s = mixed.double(), src.double()
    for a, b in itertools.permutations(range(len(s)), 2):
        diff = s[a] - s[b]
        lam = float((m - s[b]) @ diff / (diff @ diff))
        res = float((m - (lam * s[a] + (1 - lam) * s[b])).norm())
        if res < best[3]:
            best = (a, b, lam, res)
    a, b, lam, res = best
    assert res < 1e-4, f"row is not on any segment between two input rows (residual {res})"
    assert -1e-6 <= lam <= 1 + 1e-6, f"lambda {lam} outside [0, 1]: not a convex combination"
    # Normalise the labelling so that equal mixtures compare equal.
    return (a, b, lam) if a < b else (b, a, 1 - lam)


def _pairs(b=8, dx=5, dy=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, dx, generator=g), torch.randn(b, dy, generator=g)


def test_fusemix_rows_are_convex_combinations_with_shared_lambda_and_aligned_pairs():
    x, y = _pairs()
    xm, ym = mix_latents(x, y, FuseMixConfig("fusemix"), np.random.default_rng(0))
    assert xm.shape == (4, 5) and ym.shape == (4, 4)
    used = []
    for i in range(len(xm)):
        ax, bx, lx = _recover(xm[i], x)
        ay, by, ly = _recover(ym[i], y)
        assert (ax, bx) == (ay, by), "mixed x row and mixed y row come from different source pairs"
        assert lx == pytest.approx(ly, abs=1e-5), "fusemix must use the same lambda on both sides"
        used += [ax, bx]
    # Halves of a shuffled batch: every source pair is used exactly once.
    assert sorted(used) == list(range(8))


def test_independent_mode_draws_a_different_lambda_per_side():
    x, y = _pairs()
    xm, ym = mix_latents(x, y, FuseMixConfig("independent"), np.random.default_rng(1))
    assert xm.shape[0] == 4
    diffs = []
    for i in range(len(xm)):
        ax, bx, lx = _recover(xm[i], x)
        ay, by, ly = _recover(ym[i], y)
        assert (ax, bx) == (ay, by)  # still the same two source pairs
        diffs.append(abs(lx - ly))
    assert max(diffs) > 1e-3


def _onehot_mix(cfg: FuseMixConfig, b: int, seed: int):
    """x = identity [b, b], y = a column-permuted identity [b, b]: row i of y is pair i's 'caption'.

    Mixed x row i then holds lambda at column a and 1 - lambda at column b (the source pairs), so
    mixed y row i must equal it once y's columns are put back in x's order."""
    x = torch.eye(b)
    sigma = torch.as_tensor(np.random.default_rng(100 + seed).permutation(b))
    y = x[:, sigma]  # y[i, j] = 1 iff sigma[j] == i
    xm, ym = mix_latents(x, y, cfg, np.random.default_rng(seed))
    inv = torch.argsort(sigma)
    return xm, ym[:, inv]


def test_onehot_pairs_stay_aligned_and_lambda_is_shared():
    xm, ym_back = _onehot_mix(FuseMixConfig("fusemix"), 64, 0)
    assert xm.shape == (32, 64)
    torch.testing.assert_close(ym_back, xm)
    assert ((xm > 0).sum(dim=1) <= 2).all()
    torch.testing.assert_close(xm.sum(dim=1), torch.ones(32))


def test_onehot_independent_does_not_match():
    xm, ym_back = _onehot_mix(FuseMixConfig("independent"), 64, 0)
    assert torch.equal(xm > 0, ym_back > 0)  # same source pairs
    assert not torch.allclose(xm, ym_back, atol=1e-3)  # different weights


def _lambdas_from_onehot(cfg: FuseMixConfig, b: int, seed: int) -> np.ndarray:
    """One lambda per mixed row: the weight on the lower-index source pair. Which source gets lambda
    is decided by the shuffle, independently of lambda, and Beta(a, a) is symmetric, so these are
    still Beta(a, a) draws."""
    xm, _ = _onehot_mix(cfg, b, seed)
    first = (xm > 0).to(torch.int64).argmax(dim=1)
    lam = xm[torch.arange(len(xm)), first].numpy().astype(np.float64)
    single = (xm > 0).sum(dim=1) == 1  # lambda exactly 0 or 1 is possible only in theory
    lam[single.numpy()] = 1.0
    return lam


@pytest.mark.parametrize("alpha", [0.2, 1.0, 5.0])
def test_lambda_is_roughly_beta_alpha_alpha(alpha):
    lam = np.concatenate([_lambdas_from_onehot(FuseMixConfig("fusemix", alpha), 1024, s) for s in range(4)])
    assert len(lam) == 2048
    assert ((lam >= 0) & (lam <= 1)).all()
    var = 1 / (4 * (2 * alpha + 1))  # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1))
    assert lam.mean() == pytest.approx(0.5, abs=0.03)
    assert lam.var() == pytest.approx(var, rel=0.15)
    if alpha == 1.0:  # uniform: the quartiles sit where they should
        assert np.quantile(lam, [0.25, 0.5, 0.75]) == pytest.approx([0.25, 0.5, 0.75], abs=0.04)


def test_lambda_per_batch_uses_one_lambda():
    xm, ym_back = _onehot_mix(FuseMixConfig("fusemix", lambda_per="batch"), 64, 3)
    torch.testing.assert_close(ym_back, xm)
    small = xm.clamp(min=1e-12).where(xm > 0, torch.ones_like(xm)).min(dim=1).values
    # every row holds the same {lambda, 1 - lambda}
    assert float(small.max() - small.min()) < 1e-6
    per_pair = _lambdas_from_onehot(FuseMixConfig("fusemix"), 64, 3)
    assert per_pair.std() > 0.1


def test_permutation_keeps_batch_and_mixes_each_pair_with_a_partner():
    b = 16
    xm, ym_back = _onehot_mix(FuseMixConfig("permutation"), b, 2)
    assert xm.shape == (b, b)
    torch.testing.assert_close(ym_back, xm)
    # row i mixes pair i with some partner: pair i carries weight lambda (>0), total weight 1
    assert (xm[torch.arange(b), torch.arange(b)] > 0).all()
    torch.testing.assert_close(xm.sum(dim=1), torch.ones(b))


def test_permutation_rows_are_convex_combinations():
    x, y = _pairs(b=6)
    xm, ym = mix_latents(x, y, FuseMixConfig("permutation"), np.random.default_rng(5))
    assert xm.shape == x.shape and ym.shape == y.shape
    for i in range(len(xm)):
        if torch.allclose(xm[i], x[i]):  # partner happened to be itself
            torch.testing.assert_close(ym[i], y[i])
            continue
        ax, bx, lx = _recover(xm[i], x)
        ay, by, ly = _recover(ym[i], y)
        assert (ax, bx) == (ay, by) and i in (ax, bx)
        assert lx == pytest.approx(ly, abs=1e-5)


def test_batch_halves_and_odd_batches():
    for b, want in ((8, 4), (7, 3), (2, 1)):
        x, y = _pairs(b=b)
        for mode in ("fusemix", "independent"):
            xm, ym = mix_latents(x, y, FuseMixConfig(mode), np.random.default_rng(0))
            assert xm.shape[0] == ym.shape[0] == want


def test_none_is_identity():
    x, y = _pairs()
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    xm, ym = mix_latents(x, y, FuseMixConfig("none"), rng)
    assert torch.equal(xm, x) and torch.equal(ym, y)
    assert rng.bit_generator.state == state  # draws nothing, so a 'none' run is not re-seeded by mixing


@pytest.mark.parametrize("mode", ["fusemix", "independent", "permutation"])
def test_same_seed_same_output_different_seed_different(mode):
    x, y = _pairs(b=16)
    a = mix_latents(x, y, FuseMixConfig(mode), np.random.default_rng(42))
    b = mix_latents(x, y, FuseMixConfig(mode), np.random.default_rng(42))
    c = mix_latents(x, y, FuseMixConfig(mode), np.random.default_rng(43))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_errors():
    x, y = _pairs(b=4)
    with pytest.raises(ValueError, match="same number of pairs"):
        mix_latents(x, y[:3], FuseMixConfig(), np.random.default_rng(0))
    with pytest.raises(ValueError, match="at least two pairs"):
        mix_latents(x[:1], y[:1], FuseMixConfig(), np.random.default_rng(0))


# --- sources of the mixed pairs, and which mixed pairs share a positive -----------------------------


@pytest.mark.parametrize("mode", ["fusemix", "independent", "permutation", "none"])
@pytest.mark.parametrize("lambda_per", ["pair", "batch"])
def test_mix_with_sources_is_mix_latents_plus_sources_with_the_same_draws(mode, lambda_per):
    cfg = FuseMixConfig(mode, lambda_per=lambda_per)
    x, y = _pairs(b=9)
    r1, r2 = np.random.default_rng(7), np.random.default_rng(7)
    xm, ym = mix_latents(x, y, cfg, r1)
    xs, ys, a, b = mix_with_sources(x, y, cfg, r2)
    assert torch.equal(xm, xs) and torch.equal(ym, ys)
    assert r1.bit_generator.state == r2.bit_generator.state  # same random numbers consumed
    assert a.dtype == b.dtype == torch.int64 and len(a) == len(b) == len(xm)
    # every mixed row lies on the segment between its two named sources, on both sides
    for m in range(len(xm)):
        for src, mixed in ((x, xs), (y, ys)):
            d = src[a[m]] - src[b[m]]
            if float(d.norm()) == 0.0:
                torch.testing.assert_close(mixed[m], src[a[m]])
                continue
            lam = float((mixed[m] - src[b[m]]) @ d / (d @ d))
            torch.testing.assert_close(mixed[m], lam * src[a[m]] + (1 - lam) * src[b[m]])
            assert -1e-6 <= lam <= 1 + 1e-6


def test_sources_per_mode():
    x, y = _pairs(b=8)
    _, _, a, b = mix_with_sources(x, y, FuseMixConfig("fusemix"), np.random.default_rng(0))
    assert sorted(torch.cat([a, b]).tolist()) == list(range(8))  # halves: each raw pair once
    _, _, a, b = mix_with_sources(x, y, FuseMixConfig("permutation"), np.random.default_rng(0))
    assert a.tolist() == list(range(8)) and sorted(b.tolist()) == list(range(8))
    _, _, a, b = mix_with_sources(x, y, FuseMixConfig("none"), np.random.default_rng(0))
    assert a.tolist() == b.tolist() == list(range(8))
    # a mixed pair is the lambda-weighted row of its first source: check with one-hot latents
    xm, _, a, b = mix_with_sources(
        torch.eye(8), torch.eye(8), FuseMixConfig("fusemix"), np.random.default_rng(3)
    )
    lam = xm[torch.arange(4), a]
    torch.testing.assert_close(xm[torch.arange(4), b], 1 - lam)


# Raw pairs, keys (caption id, media id):
#   0: (7, 0)   1: (8, 1)   2: (7, 2)   3: (9, 1)   4: (-1, 4)   5: (-1, 5)
# raw same: {0, 2} (one caption), {1, 3} (one image); 4 and 5 alone (-1 matches nothing).
GROUPS6 = torch.tensor([[7, 0], [8, 1], [7, 2], [9, 1], [-1, 4], [-1, 5]])


def test_mixed_same_by_hand():
    same = same_from_groups(GROUPS6)
    # m0 = (0, 5), m1 = (1, 2), m2 = (4, 3)
    a, b = torch.tensor([0, 1, 4]), torch.tensor([5, 2, 3])
    want = torch.tensor(
        [
            [1, 1, 0],  # m0 ~ m1 through a(m0) = 0 ~ 2 = b(m1)
            [1, 1, 1],  # m1 ~ m2 through a(m1) = 1 ~ 3 = b(m2)
            [0, 1, 1],  # m0 and m2 share nothing: not transitive through m1
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mixed_same(same, a, b), want)
    assert torch.equal(mixed_same_from_groups(GROUPS6, a, b), want)
    # the other source combinations
    cases = [
        # m0 = (0, 1), m1 = (2, 5), m2 = (4, 3): m0 ~ m1 through a ~ a' (0 ~ 2), m0 ~ m2 through b ~ b' (1 ~ 3)
        ([0, 2, 4], [1, 5, 3], [[1, 1, 1], [1, 1, 0], [1, 0, 1]]),
        # m0 = (4, 0), m1 = (1, 5), m2 = (2, 3): m0 ~ m2 through b ~ a' (0 ~ 2), m1 ~ m2 through a ~ b' (1 ~ 3)
        ([4, 1, 2], [0, 5, 3], [[1, 0, 1], [0, 1, 1], [1, 1, 1]]),
    ]
    for a2, b2, want2 in cases:
        a2, b2, want2 = torch.tensor(a2), torch.tensor(b2), torch.tensor(want2, dtype=torch.bool)
        assert torch.equal(mixed_same(same, a2, b2), want2)
        assert torch.equal(mixed_same_from_groups(GROUPS6, a2, b2), want2)


def test_mixed_pairs_with_a_common_source_are_the_same_even_without_keys():
    """Permutation mixes pair i with partner p(i), so mixed pairs share raw pairs: p = [1, 2, 0, 3] gives
    m0 = (0, 1), m1 = (1, 2), m2 = (2, 0), m3 = (3, 3)."""
    no_keys = torch.full((4, 1), -1)
    a, b = torch.arange(4), torch.tensor([1, 2, 0, 3])
    want = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mixed_same(same_from_groups(no_keys), a, b), want)
    assert torch.equal(mixed_same_from_groups(no_keys, a, b), want)
    # without mixing the sources are the pairs themselves: the raw same
    idx = torch.arange(6)
    assert torch.equal(mixed_same_from_groups(GROUPS6, idx, idx), same_from_groups(GROUPS6))


@pytest.mark.parametrize("mode", ["fusemix", "permutation", "none"])
def test_mixed_same_from_groups_equals_the_raw_matrix_route(mode):
    rng = np.random.default_rng(11)
    groups = torch.as_tensor(rng.integers(-1, 6, size=(40, 3)))
    x, y = _pairs(b=40)
    *_, a, b = mix_with_sources(x, y, FuseMixConfig(mode), rng)
    fast = mixed_same_from_groups(groups, a, b)
    assert torch.equal(fast, mixed_same(same_from_groups(groups), a, b))
    assert torch.equal(fast, fast.T) and fast.diagonal().all()
    assert 0 < int(fast.sum()) - len(a) < len(a) ** 2 - len(a)  # some sharing, not all
