"""FuseMix: mixup in the latent space of frozen encoders, before the adapters.

For positive pairs (x1, y1), (x2, y2) and lambda ~ Beta(alpha, alpha):
    (lambda*x1 + (1-lambda)*x2,  lambda*y1 + (1-lambda)*y2)
The same lambda on both sides keeps the mixed pair a positive pair. See FuseMixConfig for the
modes; all randomness comes from the numpy Generator passed in, so a seed reproduces a run.
"""

from __future__ import annotations

import numpy as np
import torch

from fusion.config import FuseMixConfig


def _lambdas(rng: np.random.Generator, n: int, cfg: FuseMixConfig, device: torch.device) -> torch.Tensor:
    lam = rng.beta(cfg.alpha, cfg.alpha, size=1 if cfg.lambda_per == "batch" else n)
    if cfg.lambda_per == "batch":
        lam = np.repeat(lam, n)
    return torch.as_tensor(lam, dtype=torch.float32, device=device).unsqueeze(1)


def mix_latents(
    x: torch.Tensor, y: torch.Tensor, cfg: FuseMixConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [B, dx], y: [B, dy], row i of each a positive pair. Returns the mixed batch.

    fusemix / independent return B // 2 rows (halves of a shuffled batch mixed together);
    permutation returns B rows; none returns the input unchanged. `mix_with_sources` also says which
    raw pairs each mixed pair came from.
    """
    xm, ym, _, _ = mix_with_sources(x, y, cfg, rng)
    return xm, ym


def mix_with_sources(
    x: torch.Tensor, y: torch.Tensor, cfg: FuseMixConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`mix_latents` plus the sources: (xm, ym, a, b), a and b int64 [M] on x's device, mixed pair m
    being lambda_m * pair a[m] + (1 - lambda_m) * pair b[m] (for none, a = b = arange(B)).

    Draws exactly the same random numbers as `mix_latents` and gives the same mixed batch.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same number of pairs, got {x.shape[0]} and {y.shape[0]}")
    b = x.shape[0]
    if cfg.mode == "none":
        idx = torch.arange(b, device=x.device)
        return x, y, idx, idx
    perm = torch.as_tensor(rng.permutation(b), device=x.device)
    if cfg.mode == "permutation":
        lam = _lambdas(rng, b, cfg, x.device)
        xm, ym = lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]
        return xm, ym, torch.arange(b, device=x.device), perm
    h = b // 2
    if h == 0:
        raise ValueError("FuseMix needs at least two pairs in a batch")
    i1, i2 = perm[:h], perm[h : 2 * h]
    lam_x = _lambdas(rng, h, cfg, x.device)
    lam_y = _lambdas(rng, h, cfg, x.device) if cfg.mode == "independent" else lam_x
    return lam_x * x[i1] + (1 - lam_x) * x[i2], lam_y * y[i1] + (1 - lam_y) * y[i2], i1, i2


def mixed_same(same: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Which mixed pairs share a positive, from which raw pairs do.

    same: bool [B, B] over the raw batch (see fusion.loss.same_from_groups); a, b: int [M], the two
    sources of each mixed pair (from `mix_with_sources`). Returns bool [M, M]: mixed pairs m and m'
    are the same when any source of m is the same as any source of m' (a~a', a~b', b~a', b~b').
    """
    sa, sb = same[a], same[b]
    return sa[:, a] | sa[:, b] | sb[:, a] | sb[:, b]


def mixed_same_from_groups(groups: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`mixed_same(same_from_groups(groups), a, b)` without the raw [B, B] matrix (4x the memory of
    the [M, M] result in the halves schemes, where B = 2M): the mixed pairs' keys are compared directly.

    groups: int [B, K] keys of the raw pairs (-1 = none); a, b: int [M]. A raw pair's own index is one
    more key, so mixed pairs with a common source are the same even when they have no keys.
    """
    if groups.ndim != 2 or groups.is_floating_point() or groups.dtype == torch.bool:
        raise ValueError(f"groups must be an integer [B, K] tensor, got {groups.dtype} {tuple(groups.shape)}")
    own = torch.arange(len(groups), device=groups.device, dtype=groups.dtype)[:, None]
    keys = torch.cat([groups, own], dim=1)
    sides = [keys[a]] if a is b or torch.equal(a, b) else [keys[a], keys[b]]
    out = torch.zeros(len(a), len(a), dtype=torch.bool, device=groups.device)
    for u in sides:
        for v in sides:
            for col_u, col_v in zip(u.unbind(dim=1), v.unbind(dim=1), strict=True):
                out |= (col_u[:, None] == col_v[None, :]) & (col_u >= 0)[:, None]
    return out
