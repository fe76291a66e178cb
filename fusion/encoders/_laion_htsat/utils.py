"""The two names laion_clap's htsat.py imports from `.utils`, written for this project.

laion_clap's own utils.py imports torchvision and h5py at the top, and torchvision does not install
beside the project's torch; htsat.py needs only these two operations, whose behaviour is given by how
htsat.py uses them: `interpolate` stretches frame-wise outputs back to the input's time resolution,
`do_mixup` mixes examples for mixup training (never called at inference, where mixup_lambda is None).
"""

from __future__ import annotations

import torch


def do_mixup(x: torch.Tensor, mixup_lambda: torch.Tensor) -> torch.Tensor:
    """lambda_i * x_i + (1 - lambda_i) * x_{B-1-i}: each example mixed with its mirror in the batch.
    x [B, ...], mixup_lambda [B]."""
    lam = mixup_lambda.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return lam * x + (1 - lam) * x.flip(0)


def interpolate(x: torch.Tensor, ratio: int) -> torch.Tensor:
    """Each time step repeated `ratio` times in place: x [B, T, C] -> [B, T * ratio, C]."""
    return torch.repeat_interleave(x, ratio, dim=1)
