"""Adapters: small residual MLPs mapping a frozen encoder's latent into the shared space.

Reference architecture (FuseMix): `depth` pre-LN residual blocks
[LayerNorm, Linear d->e*d, GELU, Dropout, Linear e*d->d], then LayerNorm and Linear(d -> d_shared),
output L2-normalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fusion.config import AdapterConfig

_LANE_BITS = 15  # uniform bits per 16-bit lane of a random int64 word (its top bit is always 0)


def cpu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout with a mask drawn 4 elements per random word: 4x fewer draws than one per element.

    Each element gets a 15-bit uniform lane of a random int64; it is dropped when the lane is below
    round(p * 2**15), and kept ones are scaled by the inverse of the keep probability that this
    threshold gives, so the expectation is exactly x. The drop probability differs from p by at most
    2**-16. Follows torch's default generator, so torch.manual_seed makes it repeatable.
    """
    levels = 1 << _LANE_BITS
    threshold = round(p * levels)
    if threshold == 0:
        return x
    if threshold >= levels:
        return x * 0.0
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()
    lanes = words.view(torch.int16)[:n].view(x.shape) & (levels - 1)
    # A multiply by the scaled mask, in x's dtype: masked_fill and where run 2-3x slower here.
    keep = (lanes >= threshold).to(x.dtype).mul_(levels / (levels - threshold))
    return x * keep


class Dropout(nn.Dropout):
    """nn.Dropout, with `cpu_dropout`'s mask on the CPU when training.

    PyTorch's CPU dropout draws one Bernoulli sample per element on one thread: about 100 ms for a
    [1024, 5120] activation, a quarter of a bf16 training step at 1280-d (`make bench`, bench_train).
    On other devices, in eval mode and at p = 0 it is nn.Dropout itself.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.p > 0.0 and x.device.type == "cpu" and not self.inplace:
            return cpu_dropout(x, self.p)
        return super().forward(x)


class ResidualBlock(nn.Module):
    def __init__(self, dim: int, expansion: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, expansion * dim)
        self.act = nn.GELU()
        self.drop = Dropout(dropout)
        self.fc2 = nn.Linear(expansion * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.drop(self.act(self.fc1(self.norm(x)))))


class Adapter(nn.Module):
    """Maps [B, input_dim] latents to L2-normalised [B, cfg.output_dim] embeddings."""

    def __init__(self, input_dim: int, cfg: AdapterConfig) -> None:
        super().__init__()
        if input_dim < 1:
            raise ValueError(f"input_dim must be >= 1, got {input_dim}")
        self.input_dim = input_dim
        self.cfg = cfg
        self.blocks = nn.Sequential(
            *[ResidualBlock(input_dim, cfg.expansion, cfg.dropout) for _ in range(cfg.depth)]
        )
        self.norm = nn.LayerNorm(input_dim)
        self.proj = nn.Linear(input_dim, cfg.output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.input_dim:
            raise ValueError(f"adapter expects latents of dimension {self.input_dim}, got {x.shape[-1]}")
        return F.normalize(self.proj(self.norm(self.blocks(x))), dim=-1)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_example(self) -> int:
        """Multiply-adds x2 of the forward pass for one example (matmuls only)."""
        d, e = self.input_dim, self.cfg.expansion
        return 2 * (self.cfg.depth * 2 * d * e * d + d * self.cfg.output_dim)


@dataclass(frozen=True)
class EncoderRef:
    """Which frozen encoder produced a side's latents: the checkpoint refuses any other."""

    name: str
    fingerprint: str
    dim: int


class FusedModel(nn.Module):
    """One adapter per side (e.g. "image" and "text"; three for a space bound through text) and the
    learnt temperature.

    `embed(side, latents)` maps a batch of raw latents [B, d_side] of that side's encoder into
    the shared space [B, d_shared], L2-normalised.
    """

    def __init__(
        self,
        adapters: dict[str, Adapter],
        encoders: dict[str, EncoderRef],
        temperature: float = 0.07,
    ) -> None:
        super().__init__()
        if set(adapters) != set(encoders):
            raise ValueError(
                f"adapters {sorted(adapters)} and encoders {sorted(encoders)} must name the same sides"
            )
        for side, ref in encoders.items():
            if adapters[side].input_dim != ref.dim:
                raise ValueError(
                    f"side {side!r}: adapter input {adapters[side].input_dim} != encoder dim {ref.dim}"
                )
        self.sides = tuple(adapters)
        self.adapters = nn.ModuleDict(adapters)
        self.encoders = dict(encoders)
        self.temperature = nn.Parameter(torch.tensor(float(temperature)))

    def restrict(self, sides: tuple[str, ...]) -> FusedModel:
        """A model over some of these sides, in that order, sharing their adapters (not copies) and
        the temperature's value: a three-sided space seen as one of its pairs of sides."""
        missing = [s for s in sides if s not in self.adapters]
        if missing:
            raise KeyError(f"unknown sides {missing}; this model has {list(self.sides)}")
        view = FusedModel(
            {s: self.adapters[s] for s in sides},
            {s: self.encoders[s] for s in sides},
            temperature=float(self.temperature.detach()),
        )
        return view.to(self.temperature.device).train(self.training)

    @torch.inference_mode()
    def embed(self, side: str, latents, batch_size: int = 8192) -> torch.Tensor:
        if side not in self.adapters:
            raise KeyError(f"unknown side {side!r}; this model has {list(self.sides)}")
        adapter = self.adapters[side]
        was_training = adapter.training
        adapter.eval()
        device = next(adapter.parameters()).device
        x = torch.as_tensor(latents, dtype=torch.float32)
        outs = [adapter(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)]
        adapter.train(was_training)
        if not outs:
            return torch.empty(0, adapter.cfg.output_dim)
        return torch.cat(outs)
