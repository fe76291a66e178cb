"""Pair selection for the quantity, quality and diversity ablations of the curate stage (pure NumPy).

Every selector returns indices into the candidate list, sorted ascending, deterministic for a seed.
    quantity:  the first n of a seeded order, so a larger n contains every smaller one (nested).
    quality:   pairs whose score is at least a threshold, or the top fraction by score; the score can
               be hand-made (e.g. from cleaned captions) or alignment_quality, the cross-fitted
               agreement of each pair under a ridge map from media to caption latents.
    diversity: n pairs chosen uniformly, balanced across k-means clusters of the media latents, or
               concentrated in the fewest clusters.
"""

from __future__ import annotations

import hashlib

import numpy as np


def seeded_order(keys: list[str], seed: int) -> np.ndarray:
    """A permutation of range(len(keys)) that depends only on the keys and the seed (not their order)."""
    digests = [hashlib.sha256(f"{seed}:{k}".encode()).digest()[:8] for k in keys]
    return np.array(sorted(range(len(keys)), key=lambda i: digests[i]), dtype=np.int64)


def select_quantity(keys: list[str], n: int, seed: int = 0) -> np.ndarray:
    if n < 1:
        raise ValueError(f"quantity n must be >= 1, got {n}")
    return np.sort(seeded_order(keys, seed)[:n])


def select_quality(scores: np.ndarray, min_quality: float) -> np.ndarray:
    """scores: [N] floats in [0, 1], NaN for unknown (never selected by a threshold)."""
    s = np.asarray(scores, dtype=np.float64)
    return np.flatnonzero(np.nan_to_num(s, nan=-np.inf) >= min_quality)


def select_quality_fraction(scores: np.ndarray, keep: float) -> np.ndarray:
    """The top `keep` fraction of the pairs by score (round(keep * N), at least one), ties broken by
    the lower index; NaN scores are never kept, so fewer come back when fewer are known.

    For learned scores such as alignment_quality, whose scale depends on the data, a fraction reads
    cleaner than a threshold.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    if len(s) == 0:
        return np.zeros(0, dtype=np.int64)
    n_keep = max(1, int(np.floor(keep * len(s) + 0.5)))
    known = np.flatnonzero(~np.isnan(s))
    order = known[np.lexsort((known, -s[known]))]  # best first; equal scores by index
    return np.sort(order[:n_keep]).astype(np.int64)


# -- a learned quality score -------------------------------------------------------------------


def fold_assignment(n: int, folds: int, seed: int = 0) -> np.ndarray:
    """[n] fold of each pair: a seeded permutation dealt round-robin, so fold sizes differ by at most 1."""
    perm = np.random.default_rng(seed).permutation(n)
    fold_of = np.empty(n, dtype=np.int64)
    fold_of[perm] = np.arange(n) % folds
    return fold_of


def _unit_rows(a: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.where(norm > 0, norm, 1.0)  # a zero row stays zero (cosine 0 with anything)


def _ridge_predict(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, alpha: float) -> np.ndarray:
    """x_te @ W for W = argmin |x_tr W - y_tr|^2 + lam |W|^2, lam = alpha * trace(x_trᵀx_tr) / dx, in
    the primal or dual form, whichever solves the smaller system (they are equal)."""
    n, dx = x_tr.shape
    lam = alpha * float((x_tr * x_tr).sum()) / dx
    if dx <= n:
        gram = x_tr.T @ x_tr
        gram[np.diag_indices_from(gram)] += lam
        return x_te @ np.linalg.solve(gram, x_tr.T @ y_tr)
    kernel = x_tr @ x_tr.T
    kernel[np.diag_indices_from(kernel)] += lam
    return (x_te @ x_tr.T) @ np.linalg.solve(kernel, y_tr)


def alignment_quality(
    x: np.ndarray,
    y: np.ndarray,
    *,
    folds: int = 5,
    alpha: float = 1.0,
    seed: int = 0,
    kind: str = "rank",
    candidates: int = 4096,
) -> np.ndarray:
    """[N] float64 agreement of each pair (x[i], y[i]) under a ridge map x -> y fitted on the other
    pairs: a CLIP-score-like quality for any manifest, with no hand-made cleaning.

    Cross-fitted: the pairs are dealt into `folds` seeded folds (at most N // 2, so every fold holds
    two pairs); for each fold, the centring means and the ridge map from centred, L2-normalised x to
    centred, L2-normalised y come from the other folds only, so no pair ever scores itself. The ridge
    penalty is alpha * trace(XᵀX) / dx, so it does not depend on the scale of the latents.

    kind="cosine": the cosine between the pair's predicted y and its actual y, in [-1, 1].
    kind="rank" (default): the fraction of other captions that the pair's predicted y prefers its own
    caption to (cosine, ties count half), in [0, 1]; 1 is a caption that beats every other. Each
    query is compared with the same captions, so a pair whose x is hard to predict, or that sits
    near a hub caption every prediction leans to, is not scored by the scale of its cosine but by
    whether its own caption wins. The other captions are all N when N - 1 <= `candidates`, else a
    seeded sample of `candidates` of them (the same sample for every query).

    The seed only chooses the folds (and the candidate sample): the fit for a given partition is a
    closed form. Raises ValueError for N < 4, mismatched rows, non-finite values or a bad option.
    """
    if kind not in ("rank", "cosine"):
        raise ValueError(f"unknown alignment quality kind {kind!r}; use rank or cosine")
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"x and y must be 2-D [N, d], got shapes {x.shape} and {y.shape}")
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x and y must have one row per pair, got {n} and {len(y)} rows")
    if n < 4:
        raise ValueError(f"alignment quality needs at least 4 pairs, got {n}")
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if candidates < 2:
        raise ValueError(f"candidates must be >= 2, got {candidates}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("x and y must be finite")
    folds = min(folds, n // 2)
    fold_of = fold_assignment(n, folds, seed)
    if kind == "rank" and n - 1 > candidates:
        pool = np.sort(np.random.default_rng([seed, 1]).choice(n, size=candidates, replace=False))
    else:
        pool = np.arange(n)
    scores = np.empty(n, dtype=np.float64)
    for f in range(folds):
        te = fold_of == f
        tr = ~te
        mx, my = x[tr].mean(0), y[tr].mean(0)
        x_tr, y_tr = _unit_rows(x[tr] - mx), _unit_rows(y[tr] - my)
        pred = _unit_rows(_ridge_predict(x_tr, y_tr, _unit_rows(x[te] - mx), alpha))
        own = _unit_rows(y[te] - my)
        own_cos = (pred * own).sum(1)
        if kind == "cosine":
            scores[te] = own_cos
            continue
        rows = np.flatnonzero(te)
        cand = _unit_rows(y[pool] - my)
        for start in range(0, len(rows), 1024):  # [chunk, |pool|] cosines at a time
            sl = slice(start, start + 1024)
            cos = pred[sl] @ cand.T
            c = own_cos[sl, None]
            not_self = pool[None, :] != rows[sl, None]
            wins = ((cos < c) & not_self).sum(1) + 0.5 * ((cos == c) & not_self).sum(1)
            scores[rows[sl]] = wins / not_self.sum(1)
    return scores


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """x: [N, d]. Returns (labels [N], centres [k, d]); k-means++ initialisation, Lloyd iterations."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(n)]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else None
        centres.append(x[rng.choice(n, p=p)])
        d2 = np.minimum(d2, ((x - centres[-1]) ** 2).sum(1))
    c = np.stack(centres)
    labels = np.zeros(n, dtype=np.int64)
    for it in range(iters):
        dist = (x**2).sum(1, keepdims=True) - 2 * x @ c.T + (c**2).sum(1)
        new = dist.argmin(1)
        if it > 0 and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            if len(members):
                c[j] = members.mean(0)
    return labels, c


# Above this many candidates, k-means is fitted on a seeded sample of this size and every candidate
# is then assigned to its nearest centre in blocks (the latents need not be in memory at once).
KMEANS_SAMPLE = 50_000


def assign(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the nearest centre (squared Euclidean) of each row of x [N, d]."""
    x = np.asarray(x, dtype=np.float64)
    dist = (x**2).sum(1, keepdims=True) - 2 * x @ centres.T + (centres**2).sum(1)
    return dist.argmin(1)


def diversity_sample(total: int, seed: int = 0, cap: int | None = None) -> np.ndarray:
    """The sorted candidate indices k-means is fitted on: all of them up to `cap` (default
    KMEANS_SAMPLE), else a seeded sample of `cap`."""
    cap = KMEANS_SAMPLE if cap is None else cap
    if total <= cap:
        return np.arange(total)
    return np.sort(np.random.default_rng((seed, 1)).choice(total, cap, replace=False))


def uniform_indices(total: int, n: int, seed: int = 0) -> np.ndarray:
    """Diversity's `uniform` mode: a seeded random n of `total`, sorted."""
    return np.sort(np.random.default_rng(seed).permutation(total)[:n])


def select_by_clusters(labels: np.ndarray, n: int, mode: str = "balanced", seed: int = 0) -> np.ndarray:
    """n indices given each candidate's cluster: balanced round-robin over the clusters in a seeded
    order, or whole clusters, largest first (concentrated)."""
    total = len(labels)
    if not 1 <= n <= total:
        raise ValueError(f"diversity n must be in [1, {total}], got {n}")
    if mode not in ("balanced", "concentrated"):
        raise ValueError(f"unknown diversity mode {mode!r}; use uniform, balanced or concentrated")
    rng = np.random.default_rng(seed)
    clusters = [rng.permutation(np.flatnonzero(labels == j)) for j in range(labels.max() + 1)]
    clusters = [c for c in clusters if len(c)]
    if mode == "concentrated":
        clusters.sort(key=len, reverse=True)
        return np.sort(np.concatenate(clusters)[:n])
    picked: list[int] = []
    depth = 0
    while len(picked) < n:
        for c in clusters:
            if depth < len(c) and len(picked) < n:
                picked.append(int(c[depth]))
        depth += 1
    return np.sort(np.array(picked, dtype=np.int64))


def select_diversity(
    latents: np.ndarray,
    n: int,
    k: int = 16,
    mode: str = "balanced",
    seed: int = 0,
    sample: int | None = None,
) -> np.ndarray:
    """latents: [N, d] (one per candidate pair, e.g. its media latent). Returns n indices.

    uniform: a seeded random n. balanced: round-robin over clusters in a seeded order, so every
    cluster gets an equal share while it has members. concentrated: whole clusters, largest first.
    K-means runs on all candidates up to `sample`, else on a seeded sample of that size, with every
    candidate then assigned to its nearest centre.
    """
    total = len(latents)
    if not 1 <= n <= total:
        raise ValueError(f"diversity n must be in [1, {total}], got {n}")
    if mode == "uniform":
        return uniform_indices(total, n, seed)
    if mode not in ("balanced", "concentrated"):
        raise ValueError(f"unknown diversity mode {mode!r}; use uniform, balanced or concentrated")
    fit = diversity_sample(total, seed, sample)
    labels, centres = kmeans(latents[fit], min(k, len(fit)), seed=seed)
    if len(fit) < total:
        labels = np.concatenate([assign(latents[i : i + 65536], centres) for i in range(0, total, 65536)])
    return select_by_clusters(labels, n, mode, seed)
