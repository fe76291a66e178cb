"""Trains one adapter per side contrastively with FuseMix, from arrays or from a stream of chunks.

    from fusion.trainer import train_adapters
    result = train_adapters(x_train, y_train, AdapterConfig(), FuseMixConfig(), TrainConfig(epochs=20),
                            x_val=x_val, y_val=y_val, sides=("image", "text"))
    result.model.embed("image", latents)

Data: two aligned float arrays x [N, dx] and y [N, dy] (row i of each a positive pair), or a
callable returning a fresh iterator of (x_chunk, y_chunk) per epoch, so latents larger than
memory can stream. Validation (never the test split) picks the best checkpoint.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from fusion.adapters import Adapter, EncoderRef, FusedModel
from fusion.config import AdapterConfig, FuseMixConfig, TrainConfig
from fusion.fusemix import mix_latents
from fusion.loss import clamp_temperature, clip_loss

ChunkSource = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]
StepCallback = Callable[[dict], None]
Validator = Callable[[FusedModel], float]


@dataclass
class TrainResult:
    model: FusedModel
    history: list[dict] = field(default_factory=list)  # one row per step: step, epoch, loss, temperature, lr
    val_history: list[dict] = field(default_factory=list)  # step, score
    best_step: int | None = None
    best_score: float | None = None
    steps: int = 0
    pairs_seen: int = 0
    seconds: float = 0.0


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `min_ratio` (or constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(modules: Iterable[torch.nn.Module], weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: none on biases, norms (1-D) or the temperature."""
    decay, no_decay = [], []
    for m in modules:
        for p in m.parameters():
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _array_chunks(x: np.ndarray, y: np.ndarray) -> ChunkSource:
    return lambda: [(x, y)]


def _batches(
    source: ChunkSource, batch_size: int, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Shuffled full batches across chunks; the remainder of a chunk carries into the next."""
    carry_x: np.ndarray | None = None
    carry_y: np.ndarray | None = None
    for k, (cx, cy) in enumerate(source()):
        cx, cy = np.asarray(cx, dtype=np.float32), np.asarray(cy, dtype=np.float32)
        if len(cx) != len(cy):
            raise ValueError(f"chunk holds {len(cx)} x rows but {len(cy)} y rows")
        # Streamed chunks are never all in memory at once, so they are checked here, as they arrive.
        if not (np.isfinite(cx).all() and np.isfinite(cy).all()):
            raise ValueError(f"training latents contain NaN or inf (chunk {k})")
        if carry_x is not None:
            cx, cy = np.concatenate([carry_x, cx]), np.concatenate([carry_y, cy])
        order = rng.permutation(len(cx))
        n_full = len(cx) // batch_size
        for b in range(n_full):
            idx = order[b * batch_size : (b + 1) * batch_size]
            yield cx[idx], cy[idx]
        rest = order[n_full * batch_size :]
        carry_x, carry_y = cx[rest], cy[rest]
    # A last partial batch still trains (small datasets would otherwise lose pairs every epoch).
    if carry_x is not None and len(carry_x) >= 2:
        yield carry_x, carry_y


def _peek_dims(source: ChunkSource) -> tuple[int, int, int]:
    n, dx, dy = 0, None, None
    for cx, cy in source():
        n += len(cx)
        dx, dy = np.shape(cx)[1], np.shape(cy)[1]
    if dx is None or n == 0:
        raise ValueError("no training pairs")
    return n, dx, dy


@torch.no_grad()
def contrastive_val_score(model: FusedModel, x: np.ndarray, y: np.ndarray, batch_size: int = 4096) -> float:
    """Default model-selection score: minus the symmetric InfoNCE (at the learnt temperature) on
    validation pairs, in blocks of `batch_size`. Higher is better."""
    sx, sy = model.sides
    ex, ey = model.embed(sx, x), model.embed(sy, y)
    t = clamp_temperature(model.temperature.detach().cpu())
    losses, weights = [], []
    for i in range(0, len(ex), batch_size):
        bx, by = ex[i : i + batch_size], ey[i : i + batch_size]
        if len(bx) < 2:
            continue
        losses.append(float(clip_loss(bx, by, t)))
        weights.append(len(bx))
    return -float(np.average(losses, weights=weights)) if losses else float("nan")


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cpu" and precision == "fp16":
        raise ValueError("fp16 autocast is for CUDA; use bf16 or fp32 on the CPU")
    return torch.autocast(device.type, dtype=dtype)


def train_adapters(
    x: np.ndarray | None,
    y: np.ndarray | None,
    adapter_cfg: AdapterConfig,
    fusemix_cfg: FuseMixConfig,
    train_cfg: TrainConfig,
    *,
    chunks: ChunkSource | None = None,
    x_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    validator: Validator | None = None,
    sides: tuple[str, str] = ("x", "y"),
    encoders: dict[str, EncoderRef] | None = None,
    on_step: StepCallback | None = None,
    on_validate: StepCallback | None = None,
    progress: bool = False,
) -> TrainResult:
    """Trains the two adapters and the temperature. Give (x, y) arrays or `chunks`.

    x: [N, dx], y: [N, dy] aligned pairs. `validator(model) -> score` (higher is better) overrides the
    default score on (x_val, y_val). Returns the best model on validation when validation data or a
    validator is given, else the last one.
    """
    if (x is None) == (chunks is None):
        raise ValueError("give either the arrays x, y or a chunk source, not both")
    if chunks is None:
        if y is None or len(x) != len(y):
            raise ValueError("x and y must be aligned arrays of the same length")
        chunks = _array_chunks(np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.float32))
    n, dx, dy = _peek_dims(chunks)
    if not all(np.isfinite(np.asarray(a)).all() for a in (x, y) if a is not None):
        raise ValueError("training latents contain NaN or inf")
    # A NaN validation score would never compare greater, freezing the choice on the first one.
    if not all(np.isfinite(np.asarray(a)).all() for a in (x_val, y_val) if a is not None):
        raise ValueError("validation latents contain NaN or inf")

    torch.manual_seed(train_cfg.seed)
    rng = np.random.default_rng(train_cfg.seed)
    device = torch.device(train_cfg.device)
    sx, sy = sides
    adapters = {sx: Adapter(dx, adapter_cfg), sy: Adapter(dy, adapter_cfg)}
    encoders = encoders or {sx: EncoderRef(sx, "", dx), sy: EncoderRef(sy, "", dy)}
    model = FusedModel(adapters, encoders, temperature=train_cfg.temperature_init).to(device)

    # batch_size is the contrastive batch the loss sees. The halves schemes mix two raw pairs into
    # one, so they draw twice as many raw pairs; otherwise they would train on half the negatives.
    halves = fusemix_cfg.mode in ("fusemix", "independent")
    batch = min(train_cfg.batch_size * (2 if halves else 1), n)
    steps_per_epoch = max(1, math.ceil(n / batch))
    total = train_cfg.steps or steps_per_epoch * (train_cfg.epochs or 1)
    opt = torch.optim.AdamW(
        param_groups(model.adapters.values(), train_cfg.weight_decay)
        + [{"params": [model.temperature], "weight_decay": 0.0}],
        lr=train_cfg.lr,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: lr_factor(
            s, total, min(train_cfg.warmup_steps, total // 2), train_cfg.schedule, train_cfg.min_lr_ratio
        ),
    )
    scaler = torch.amp.GradScaler(enabled=train_cfg.precision == "fp16" and device.type == "cuda")
    eval_every = train_cfg.eval_every or steps_per_epoch
    has_val = validator is not None or (x_val is not None and y_val is not None and len(x_val) >= 2)

    def score() -> float:
        model.eval()
        s = (
            validator(model)
            if validator
            else contrastive_val_score(model, x_val, y_val, train_cfg.val_batch_size)
        )
        model.train()
        return s

    result = TrainResult(model=model)
    best_state = None
    t0 = time.perf_counter()
    step, epoch = 0, 0
    model.train()
    bar = tqdm(total=total, desc="train adapters", unit="step", disable=not progress)
    while step < total:
        step_at_epoch_start = step
        for bx, by in _batches(chunks, batch, rng):
            xb = torch.from_numpy(bx).to(device, non_blocking=True)
            yb = torch.from_numpy(by).to(device, non_blocking=True)
            xm, ym = mix_latents(xb, yb, fusemix_cfg, rng)
            with _autocast(device, train_cfg.precision):
                ex, ey = model.adapters[sx](xm), model.adapters[sy](ym)
                t = clamp_temperature(model.temperature, train_cfg.temperature_min, train_cfg.temperature_max)
                loss = clip_loss(ex, ey, t)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower the learning rate")
            lr_used = opt.param_groups[0]["lr"]  # read before sched.step() moves it to the next step
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if train_cfg.grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            with torch.no_grad():
                model.temperature.clamp_(train_cfg.temperature_min, train_cfg.temperature_max)
            row = {
                "step": step,
                "epoch": epoch,
                "loss": float(loss.detach()),
                "temperature": float(model.temperature.detach()),
                "lr": lr_used,
            }
            result.history.append(row)
            result.pairs_seen += len(bx)
            if on_step:
                on_step(row)
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{row['loss']:.3f}", t=f"{row['temperature']:.3f}")
            step += 1
            if has_val and (step % eval_every == 0 or step == total):
                s = score()
                result.val_history.append({"step": step, "score": s})
                if on_validate:
                    on_validate({"step": step, "score": s})
                if result.best_score is None or s > result.best_score:
                    result.best_score, result.best_step = s, step
                    best_state = copy.deepcopy(model.state_dict())
            if step >= total:
                break
        if step == step_at_epoch_start:
            # Otherwise this loop would spin forever on a source that is empty after its first pass.
            raise ValueError(
                f"the chunk source yielded no batch in epoch {epoch}; it must return a fresh iterator "
                "over all training chunks on every call"
            )
        epoch += 1
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    result.steps = step
    result.seconds = time.perf_counter() - t0
    return result
