"""A synthetic paired task for tests, benchmarks and the first demo.

Shared latent factors z [N, k] are seen through two different random nonlinear "encoders"
into high-dimensional spaces, with independent noise on each side: x = f(z) + e, y = g(z) + e'.
Retrieval from x to y is possible only if the adapters learn to undo f and g.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SyntheticTask:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _random_view(rng: np.random.Generator, k: int, d: int, hidden: int) -> tuple[np.ndarray, np.ndarray]:
    w1 = rng.standard_normal((k, hidden)) / np.sqrt(k)
    w2 = rng.standard_normal((hidden, d)) / np.sqrt(hidden)
    return w1, w2


def make_task(
    n_train: int = 512,
    n_val: int = 256,
    n_test: int = 512,
    k: int = 16,
    dx: int = 384,
    dy: int = 256,
    noise: float = 2.0,
    curvature: float = 1.0,
    seed: int = 0,
) -> SyntheticTask:
    """`curvature` scales the pre-activations of the tanh views (towards 0: nearly linear).

    Arrays are float32: x_* [n, dx], y_* [n, dy], row i of x and y a positive pair.

    The two views share the factors but not the maps: the task is the same for every `seed` of
    the data split only if `seed` is fixed, so vary it to average over tasks.
    """
    rng = np.random.default_rng(seed)
    fx = _random_view(rng, k, dx, 4 * k)
    fy = _random_view(rng, k, dy, 4 * k)
    n = n_train + n_val + n_test
    z = rng.standard_normal((n, k))

    def view(w: tuple[np.ndarray, np.ndarray], d: int) -> np.ndarray:
        h = np.tanh(curvature * (z @ w[0])) / curvature
        out = h @ w[1]
        out /= out.std(axis=0, keepdims=True) + 1e-8
        return (out + noise * rng.standard_normal((n, d))).astype(np.float32)

    x, y = view(fx, dx), view(fy, dy)
    a, b = n_train, n_train + n_val
    return SyntheticTask(x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:])
