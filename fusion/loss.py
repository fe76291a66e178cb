"""Symmetric InfoNCE over cosine similarities divided by a learnable temperature.

`clip_loss(x, y, temperature)` takes L2-normalised features x [B, d] and y [B, d] where row i
of x and row i of y are a positive pair, and averages the x->y and y->x cross-entropies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clamp_temperature(t: torch.Tensor, t_min: float = 0.001, t_max: float = 0.5) -> torch.Tensor:
    return t.clamp(t_min, t_max)


def clip_loss(x: torch.Tensor, y: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """x, y: [B, d] normalised; temperature: scalar tensor (already clamped). Returns a scalar."""
    if x.shape != y.shape:
        raise ValueError(
            f"paired features must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    logits = (x.float() @ y.float().T) / temperature.float()
    target = torch.arange(x.shape[0], device=x.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
