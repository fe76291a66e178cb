"""Frozen configs for the math: adapter shape, FuseMix augmentation, and training.

Launch-time knobs live in the pipeline's `dg.Config` classes; these dataclasses are what the
library takes. Named presets are at the bottom (`PRESETS`), so nothing scatters dictionaries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from fusion.hardware import valid_device

FuseMixMode = Literal["fusemix", "none", "independent", "permutation"]
Precision = Literal["fp32", "bf16", "fp16", "auto"]
Schedule = Literal["cosine", "constant"]
LossKind = Literal["infonce", "masked", "multi"]

# TrainConfig.batch_size "auto": the contrastive batch follows the number of training pairs n, the
# largest power of two at most n / AUTO_BATCH_PAIRS_PER, kept within [AUTO_BATCH_MIN, AUTO_BATCH_MAX].
# With FuseMix's two halves a step draws 2 x batch raw pairs, so n / 32 leaves at least 16 steps an
# epoch. Chosen on validation (configs/experiments.yaml, families select, select-demo and batch):
# 1,800 training pairs -> 128, the full emoji set's 17,374 -> 512.
AUTO_BATCH_MIN, AUTO_BATCH_MAX, AUTO_BATCH_PAIRS_PER = 128, 1024, 32


def auto_batch_size(n_pairs: int) -> int:
    """The contrastive batch TrainConfig(batch_size="auto") trains `n_pairs` training pairs with."""
    if n_pairs < 1:
        raise ValueError(f"need at least one training pair, got {n_pairs}")
    target = n_pairs // AUTO_BATCH_PAIRS_PER
    size = 1 << max(target, 1).bit_length() - 1  # the largest power of two <= target
    return max(AUTO_BATCH_MIN, min(AUTO_BATCH_MAX, size))


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class AdapterConfig:
    """One adapter: `depth` pre-LN residual MLP blocks of width `expansion * d`, then LN + Linear."""

    depth: int = 4
    expansion: int = 4
    dropout: float = 0.6
    output_dim: int = 512

    def __post_init__(self) -> None:
        _check(self.depth >= 0, f"depth must be >= 0, got {self.depth}")
        _check(self.expansion >= 1, f"expansion must be >= 1, got {self.expansion}")
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        _check(self.output_dim >= 1, f"output_dim must be >= 1, got {self.output_dim}")


@dataclass(frozen=True)
class FuseMixConfig:
    """Latent mixup.

    mode:
      fusemix      one lambda ~ Beta(alpha, alpha) per mixed pair, shared by both modalities; a shuffled
                   batch is split in halves and only the mixed pairs are trained on (the reference).
      none         no augmentation.
      independent  like fusemix but a separate lambda per modality (breaks the pairing; an ablation).
      permutation  each pair mixed with a random partner from the full batch; batch size is kept.
    lambda_per: "pair" draws a lambda for every mixed pair, "batch" one for the whole batch.
    """

    mode: FuseMixMode = "fusemix"
    alpha: float = 1.0
    lambda_per: Literal["pair", "batch"] = "pair"

    def __post_init__(self) -> None:
        _check(
            self.mode in ("fusemix", "none", "independent", "permutation"),
            f"unknown FuseMix mode {self.mode!r}; use fusemix, none, independent or permutation",
        )
        _check(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        _check(
            self.lambda_per in ("pair", "batch"), f"lambda_per must be pair or batch, got {self.lambda_per!r}"
        )


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation. Give `steps`, or `epochs` (steps are then derived from the data size).

    batch_size: the contrastive batch the loss sees, or "auto": a batch that follows the number of
    training pairs (`auto_batch_size`: 128 for a few thousand pairs, 512 for the full emoji set's
    17,374, at most 1,024); `batch_for(n)` resolves it.

    loss: the contrastive objective (see fusion.loss).
      infonce  plain symmetric InfoNCE: every other pair in the batch is a negative.
      masked   pairs that share a positive (a caption, a media item, a concept: the `groups` given to
               train_adapters) are left out of each other's softmax denominators.
      multi    such pairs are extra positives: the target spreads uniformly over them. Meant for unmixed
               batches (FuseMixConfig("none")): a mixed pair that shares only one of its two sources
               with another is far from a positive of it, and on synthetic data multi with FuseMix
               mixing lost about 0.2 R@1 to plain InfoNCE (the trainer warns).
    masked and multi need `groups`; infonce ignores them. Where the pairs that share a positive all
    hold the very same latent on one side (six images of one caption, and no other key), plain InfoNCE
    already is the multi-positive loss (equal in value and gradient); masked is not.

    device: cpu, cuda, cuda:N, mps, or auto ($FUSEMIX_DEVICE where it names a device, else a CUDA
    GPU where present, else mps, else cpu; fusion.hardware.resolve_device).
    precision: autocast of the step. "auto" picks per machine (fusion.hardware.resolve_train_precision:
    bf16 on a CPU with AMX or AVX-512 BF16 and on a bf16 GPU, fp16 on other GPUs, else fp32); the
    default stays fp32, since the config's repr is part of every experiment's inputs hash.
    compile: run each step's forward and loss through torch.compile (True, False, or "auto": where a
    compiler for the device is present). Results stay close to eager but not bit-equal (fused kernels,
    inductor's own dropout random numbers); on failure the trainer warns once and runs eagerly. Kept
    out of repr, and so out of the inputs hash: it changes how a run executes, not what it means.
    """

    batch_size: int | Literal["auto"] = 1024
    epochs: int | None = 20
    steps: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    schedule: Schedule = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None
    seed: int = 0
    device: str = "cpu"
    precision: Precision = "fp32"
    temperature_init: float = 0.07
    temperature_min: float = 0.001
    temperature_max: float = 0.5
    eval_every: int | None = None  # steps between validations; None: once per epoch
    val_batch_size: int = 4096
    loss: LossKind = "infonce"
    compile: bool | Literal["auto"] = field(default=False, repr=False)

    def __post_init__(self) -> None:
        _check(
            self.batch_size == "auto"
            or (
                isinstance(self.batch_size, int)
                and not isinstance(self.batch_size, bool)
                and self.batch_size >= 2
            ),
            f"batch_size must be a whole number >= 2 or 'auto', got {self.batch_size!r}",
        )
        _check(self.epochs is not None or self.steps is not None, "give epochs or steps")
        _check(self.steps is None or self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        _check(self.epochs is None or self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(
            self.grad_clip is None or self.grad_clip > 0,
            f"grad_clip must be None or > 0, got {self.grad_clip}",
        )
        _check(
            self.eval_every is None or self.eval_every >= 1,
            f"eval_every must be None or >= 1, got {self.eval_every}",
        )
        _check(self.val_batch_size >= 2, f"val_batch_size must be >= 2, got {self.val_batch_size}")
        _check(
            isinstance(self.device, str) and valid_device(self.device),
            f"device must be cpu, cuda, cuda:N, mps or auto, got {self.device!r}",
        )
        _check(
            self.precision in ("fp32", "bf16", "fp16", "auto"),
            f"precision must be fp32, bf16, fp16 or auto, got {self.precision!r}",
        )
        _check(
            isinstance(self.compile, bool) or self.compile == "auto",
            f"compile must be True, False or 'auto', got {self.compile!r}",
        )
        _check(
            self.schedule in ("cosine", "constant"),
            f"schedule must be cosine or constant, got {self.schedule!r}",
        )
        _check(
            self.loss in ("infonce", "masked", "multi"),
            f"unknown loss {self.loss!r}; use infonce, masked or multi",
        )
        _check(
            0 < self.temperature_min <= self.temperature_init <= self.temperature_max,
            "need 0 < temperature_min <= temperature_init <= temperature_max",
        )

    def batch_for(self, n_pairs: int) -> int:
        """The contrastive batch for `n_pairs` training pairs: batch_size, or auto_batch_size(n_pairs)."""
        return auto_batch_size(n_pairs) if self.batch_size == "auto" else self.batch_size


def to_dict(cfg: Any) -> dict[str, Any]:
    return asdict(cfg)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Builds a config from a dict, rejecting unknown keys with a clear message."""
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}; known: {sorted(names)}")
    return cls(**data)


@dataclass(frozen=True)
class Preset:
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    fusemix: FuseMixConfig = field(default_factory=FuseMixConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _cpu(batch_size: int | Literal["auto"]) -> Preset:
    """Thousands of pairs on a laptop CPU: narrower, shallower adapters and smaller batches than the
    reference. With a 1280-d image encoder one step at batch 128 costs about 5 GFLOP instead of 40 at
    the reference shape. The CPU presets differ only in their batch."""
    return Preset(
        AdapterConfig(depth=2, expansion=1, dropout=0.5, output_dim=256),
        FuseMixConfig("fusemix", 1.0),
        TrainConfig(batch_size=batch_size, epochs=40, lr=1e-3, weight_decay=0.1, warmup_steps=20),
    )


PRESETS: dict[str, Preset] = {
    # The paper's reference run: very large batches, needs a GPU and millions of pairs.
    "reference": Preset(
        AdapterConfig(depth=4, expansion=4, dropout=0.6, output_dim=512),
        FuseMixConfig("fusemix", 1.0),
        TrainConfig(batch_size=40960, epochs=500, lr=1e-3, weight_decay=0.1, warmup_steps=100),
    ),
    # A few thousand pairs: batches of 128.
    "cpu-small": _cpu(128),
    # Ten thousand pairs and more, chosen on validation only (configs/experiments.yaml, families sweep
    # and select): on the full emoji set (17,374 training pairs) batches of 512 lead the val R-sum by
    # 12 points over 128 (3 seeds); at 1,800 pairs 128 stays ahead.
    "cpu-full": _cpu(512),
    # The default: the two above in one, the batch following the data (auto_batch_size): cpu-small's
    # 128 up to 8,191 training pairs, cpu-full's 512 from 16,384, 1,024 from 32,768.
    "cpu": _cpu("auto"),
}


def preset(name: str, **train_overrides: Any) -> Preset:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    p = PRESETS[name]
    return replace(p, train=replace(p.train, **train_overrides)) if train_overrides else p
