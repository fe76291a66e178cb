"""Pair selection for the quantity, quality and diversity ablations of the curate stage (pure NumPy).

Every selector returns indices into the candidate list, sorted ascending, deterministic for a seed.
    quantity:  the first n of a seeded order, so a larger n contains every smaller one (nested).
    quality:   pairs whose score is at least a threshold.
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


def select_diversity(
    latents: np.ndarray, n: int, k: int = 16, mode: str = "balanced", seed: int = 0
) -> np.ndarray:
    """latents: [N, d] (one per candidate pair, e.g. its media latent). Returns n indices.

    uniform: a seeded random n. balanced: round-robin over clusters in a seeded order, so every
    cluster gets an equal share while it has members. concentrated: whole clusters, largest first.
    """
    total = len(latents)
    if not 1 <= n <= total:
        raise ValueError(f"diversity n must be in [1, {total}], got {n}")
    rng = np.random.default_rng(seed)
    if mode == "uniform":
        return np.sort(rng.permutation(total)[:n])
    if mode not in ("balanced", "concentrated"):
        raise ValueError(f"unknown diversity mode {mode!r}; use uniform, balanced or concentrated")
    labels, _ = kmeans(latents, min(k, total), seed=seed)
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
