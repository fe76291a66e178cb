"""Symmetric InfoNCE over cosine similarities divided by a learnable temperature.

`clip_loss(x, y, temperature)` takes L2-normalised features x [B, d] and y [B, d] where row i
of x and row i of y are a positive pair, and averages the x->y and y->x cross-entropies.

`masked_clip_loss(x, y, temperature, same)` is the same loss for batches in which several pairs share
a positive (one caption drawn in several styles, two captions of one image, one concept): `same`
[B, B] is True where pairs i and j share one, and such pairs are not used as each other's negatives.

    mode="masked"  off-diagonal `same` entries leave both softmax denominators; the target is still
                   the diagonal.  Row i:  -s_ii + log sum_{j: j == i or not same[i, j]} exp(s_ij)
    mode="multi"   the target spreads uniformly over every j with same[i, j] (the diagonal included);
                   nothing leaves the denominator.  Row i:  -mean_{j: same[i, j]} s_ij + log sum_j exp(s_ij)

With no off-diagonal True entry (or `same` None) both modes are exactly `clip_loss`.
`same_from_groups` builds `same` from per-pair integer keys.
"""

from __future__ import annotations

from typing import Literal

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


def same_from_groups(groups: torch.Tensor) -> torch.Tensor:
    """groups: int [B, K], one key per column (e.g. media id, caption id, concept code), -1 for none.

    Returns bool [B, B]: True where pairs i and j agree on some column with a key (not -1), and on
    the diagonal (a pair is always the same as itself). Symmetric. One [B, B] comparison per column.
    """
    if groups.ndim != 2:
        raise ValueError(f"groups must be [B, K], got shape {tuple(groups.shape)}")
    if groups.is_floating_point() or groups.dtype == torch.bool:
        raise ValueError(f"groups must be an integer tensor, got {groups.dtype}")
    b = groups.shape[0]
    same = torch.eye(b, dtype=torch.bool, device=groups.device)
    for col in groups.unbind(dim=1):
        same |= (col[:, None] == col[None, :]) & (col >= 0)[:, None]
    return same


def infonce_from_logits(
    logits: torch.Tensor,
    same: torch.Tensor | None = None,
    mode: Literal["masked", "multi"] = "masked",
    reduction: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
    """Symmetric InfoNCE on `logits` [B, B] (entry (i, j): x_i against y_j, already divided by the
    temperature) with the shared positives in `same` [B, B] (see the module docstring).

    reduction "none" returns the per-pair loss [B]: 0.5 * (row i of x->y + row i of y->x).
    """
    b = logits.shape[0]
    if logits.ndim != 2 or logits.shape[1] != b:
        raise ValueError(f"logits must be square [B, B], got {tuple(logits.shape)}")
    if mode not in ("masked", "multi"):
        raise ValueError(f"unknown mode {mode!r}; use masked or multi")
    if reduction not in ("mean", "none"):
        raise ValueError(f"unknown reduction {reduction!r}; use mean or none")
    target = torch.arange(b, device=logits.device)
    off = None
    if same is not None:
        if same.shape != (b, b) or same.dtype != torch.bool:
            raise ValueError(f"same must be a bool [{b}, {b}] matrix, got {same.dtype} {tuple(same.shape)}")
        if not torch.equal(same, same.T):
            raise ValueError("same must be symmetric (pair i shares a positive with j iff j with i)")
        off = same.clone()
        off.fill_diagonal_(False)
        if not bool(off.any()):
            off = None  # no shared positives: plain InfoNCE, bit for bit
    if off is None or mode == "masked":
        if off is not None:
            # exp(-inf) = 0: a shared positive is neither a negative nor (in the gradient) touched at all
            logits = logits.masked_fill(off.to(logits.device), float("-inf"))
        x_to_y = F.cross_entropy(logits, target, reduction=reduction)
        y_to_x = F.cross_entropy(logits.T, target, reduction=reduction)
        return 0.5 * (x_to_y + y_to_x)
    # multi: soft targets, uniform over each row's positives (same is symmetric, so rows = columns)
    pos = off.to(logits.device)
    pos.fill_diagonal_(True)
    q = pos.float() / pos.sum(dim=1, keepdim=True)
    lx = -(q * F.log_softmax(logits.float(), dim=1)).sum(dim=1)
    ly = -(q * F.log_softmax(logits.T.float(), dim=1)).sum(dim=1)
    per_pair = 0.5 * (lx + ly)
    return per_pair.mean() if reduction == "mean" else per_pair


def masked_clip_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    temperature: torch.Tensor,
    same: torch.Tensor | None = None,
    mode: Literal["masked", "multi"] = "masked",
    reduction: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
    """`clip_loss` that knows its positives. x, y: [B, d] normalised; temperature: scalar tensor
    (already clamped); same: bool [B, B], symmetric, True where pairs i and j share a positive (the
    diagonal is always the pair's own positive, whatever `same` holds there); None: no sharing.

    Equals `clip_loss(x, y, temperature)` exactly when `same` is None or has no off-diagonal True.
    """
    if x.shape != y.shape:
        raise ValueError(
            f"paired features must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    logits = (x.float() @ y.float().T) / temperature.float()
    return infonce_from_logits(logits, same, mode, reduction)
