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
    permutation returns B rows; none returns the input unchanged.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same number of pairs, got {x.shape[0]} and {y.shape[0]}")
    if cfg.mode == "none":
        return x, y
    b = x.shape[0]
    perm = torch.as_tensor(rng.permutation(b), device=x.device)
    if cfg.mode == "permutation":
        lam = _lambdas(rng, b, cfg, x.device)
        return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]
    h = b // 2
    if h == 0:
        raise ValueError("FuseMix needs at least two pairs in a batch")
    i1, i2 = perm[:h], perm[h : 2 * h]
    lam_x = _lambdas(rng, h, cfg, x.device)
    lam_y = _lambdas(rng, h, cfg, x.device) if cfg.mode == "independent" else lam_x
    return lam_x * x[i1] + (1 - lam_x) * x[i2], lam_y * y[i1] + (1 - lam_y) * y[i2]
