"""Trains one adapter per side contrastively with FuseMix, from arrays or from a stream of chunks.

    from fusion.trainer import train_adapters
    result = train_adapters(x_train, y_train, AdapterConfig(), FuseMixConfig(), TrainConfig(epochs=20),
                            x_val=x_val, y_val=y_val, sides=("image", "text"))
    result.model.embed("image", latents)

Data: two aligned float arrays x [N, dx] and y [N, dy] (row i of each a positive pair), or a
callable returning a fresh iterator of (x_chunk, y_chunk) per epoch, so latents larger than
memory can stream. Validation (never the test split) picks the best checkpoint.

Shared positives: `groups` int64 [N, K] (or (x, y, g) chunks) gives each pair K keys (media id,
caption id, concept code; -1 = none). With TrainConfig.loss "masked" or "multi", pairs of a batch that
agree on a key (and mixed pairs with such sources) are not each other's negatives.

Binding to an existing space: `fixed={"text": adapter}` trains the other side against a copy of an
already trained adapter that stays frozen (no gradient, eval mode, not in the optimizer), so the new
side lands in that adapter's shared space. Two media sides bound to one frozen text adapter share a
space although no media-media pair was ever seen (pipelines: an experiment's `anchor`).

Speed: AdamW runs fused where this torch has the kernel (about 6x faster than the per-parameter loop on
a CPU; the same results to float rounding), TrainConfig.precision "auto" trains in bf16 where the
hardware has bf16 units (about 1.8x the pairs/s of fp32 with AVX-512 BF16), and TrainConfig.compile
runs the forward and loss through torch.compile (a few % on a 2-core CPU, after 20-50 s of compiling).
`python -m benchmarks.bench_train` measures the step against the machine's matmul peak.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from fusion.adapters import Adapter, EncoderRef, FusedModel
from fusion.config import AdapterConfig, FuseMixConfig, TrainConfig
from fusion.fusemix import mix_with_sources, mixed_same_from_groups
from fusion.hardware import resolve_device, resolve_train_precision
from fusion.loss import clamp_temperature, clip_loss, masked_clip_loss

# Each chunk is (x, y) or (x, y, groups); a source gives all chunks the same form.
ChunkSource = Callable[[], Iterable[tuple[np.ndarray, ...]]]
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
    precision: str = "fp32"  # what the steps ran in (TrainConfig.precision "auto" resolved)
    batch_size: int = 0  # the contrastive batch the loss saw (TrainConfig.batch_size "auto" resolved)
    compiled: bool = False  # whether the full batches' steps ran through torch.compile to the end


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


def _array_chunks(x: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> ChunkSource:
    return (lambda: [(x, y)]) if groups is None else (lambda: [(x, y, groups)])


def _check_groups(g: np.ndarray, n: int, where: str) -> np.ndarray:
    g = np.asarray(g)
    if g.ndim == 1:
        g = g[:, None]
    if g.ndim != 2 or len(g) != n:
        raise ValueError(f"groups{where} must be [N, K] with N = {n} pairs, got shape {g.shape}")
    if not np.issubdtype(g.dtype, np.integer):
        raise ValueError(f"groups{where} must hold integer keys (-1 = none), got {g.dtype}")
    if g.size and g.min() < -1:
        raise ValueError(f"groups{where} keys must be >= 0, or -1 for none; got {g.min()}")
    return g.astype(np.int64, copy=False)


def _split_chunk(chunk: tuple, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    if len(chunk) not in (2, 3):
        raise ValueError(f"chunk {k} must be (x, y) or (x, y, groups), got {len(chunk)} items")
    return chunk[0], chunk[1], (chunk[2] if len(chunk) == 3 else None)


def _batches(
    source: ChunkSource, batch_size: int, rng: np.random.Generator, with_groups: bool = False
) -> Iterator[tuple[np.ndarray, ...]]:
    """Shuffled full batches across chunks; the remainder of a chunk carries into the next.

    Yields (x, y) batches, or (x, y, groups) with `with_groups` (then every chunk must carry groups).
    Groups never change the shuffle: the same seed gives the same batches with or without them.
    """
    carry: list[np.ndarray] | None = None
    for k, chunk in enumerate(source()):
        cx, cy, cg = _split_chunk(chunk, k)
        cx, cy = np.asarray(cx, dtype=np.float32), np.asarray(cy, dtype=np.float32)
        if len(cx) != len(cy):
            raise ValueError(f"chunk holds {len(cx)} x rows but {len(cy)} y rows")
        # Streamed chunks are never all in memory at once, so they are checked here, as they arrive.
        if not (np.isfinite(cx).all() and np.isfinite(cy).all()):
            raise ValueError(f"training latents contain NaN or inf (chunk {k})")
        parts = [cx, cy]
        if with_groups:
            if cg is None:
                raise ValueError(f"chunk {k} has no groups; give (x, y, groups) for every chunk")
            parts.append(_check_groups(cg, len(cx), f" of chunk {k}"))
        if carry is not None:
            parts = [np.concatenate([c, p]) for c, p in zip(carry, parts, strict=True)]
        order = rng.permutation(len(parts[0]))
        n_full = len(parts[0]) // batch_size
        for b in range(n_full):
            idx = order[b * batch_size : (b + 1) * batch_size]
            yield tuple(p[idx] for p in parts)
        rest = order[n_full * batch_size :]
        carry = [p[rest] for p in parts]
    # A last partial batch still trains (small datasets would otherwise lose pairs every epoch).
    if carry is not None and len(carry[0]) >= 2:
        yield tuple(carry)


def _peek_dims(source: ChunkSource) -> tuple[int, int, int, bool]:
    """(pairs, dx, dy, whether the chunks carry groups); all chunks must agree on the last."""
    n, dx, dy, has_groups = 0, None, None, set()
    for k, chunk in enumerate(source()):
        cx, cy, cg = _split_chunk(chunk, k)
        n += len(cx)
        dx, dy = np.shape(cx)[1], np.shape(cy)[1]
        has_groups.add(cg is not None)
    if dx is None or n == 0:
        raise ValueError("no training pairs")
    if len(has_groups) > 1:
        raise ValueError("some chunks carry groups and others do not; give all (x, y, groups) or all (x, y)")
    return n, dx, dy, has_groups.pop()


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


def precision_autocast(device: torch.device, precision: str):
    """The autocast context of a step in `precision` ("fp32": none; "bf16"; "fp16", CUDA only)."""
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cpu" and precision == "fp16":
        raise ValueError("fp16 autocast is for CUDA; use bf16 or fp32 on the CPU")
    return torch.autocast(device.type, dtype=dtype)


def make_optimizer(groups: list[dict], lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `groups`, fused on CPU and CUDA: one kernel call instead of a dozen tensor ops per
    parameter (for the two reference adapters at 1280 and 384 dims, 58M parameters, on 2 idle cores:
    24 ms instead of 144 ms a step; 70 instead of 380 ms with another process busy, where each of the
    loop's small parallel ops waits for a time slice). The fused kernel rounds differently from the
    loop: losses agree to about 1e-6 over tens of steps, and the same seed still gives the same run bit
    for bit."""
    if device.type in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(groups, lr=lr, fused=True)
        except (RuntimeError, TypeError):  # a torch without the fused kernel for this device
            pass
    return torch.optim.AdamW(groups, lr=lr)


def compiler_available(device: torch.device) -> bool:
    """Whether torch.compile's default backend can build kernels for `device`: a C++ compiler for
    the CPU ($CXX, g++, clang++ or c++ on the PATH), Triton for CUDA."""
    if device.type == "cpu":
        cxx = os.environ.get("CXX", "").split()
        return any(shutil.which(c) for c in ([cxx[0]] if cxx else []) + ["g++", "clang++", "c++"])
    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return False


def resolve_compile(compile: bool | str, device: torch.device) -> bool:
    """TrainConfig.compile to a yes or no: "auto" compiles where `compiler_available`."""
    return compiler_available(device) if compile == "auto" else bool(compile)


class CompiledOrEager:
    """Runs `fn` through torch.compile, or eagerly; the first failure to compile (no C++ compiler,
    an op the backend cannot take) warns once and every later call runs eagerly. A training run never
    fails for the compiler's sake: an error eager code would raise too is raised by the eager rerun.

    `run(body, *inputs)` returns body(fn, *inputs) with the compiled or the eager fn; body must be safe
    to run again (the step's forward and backward, from zeroed gradients), since backward is compiled
    on its first call and can fail there too. Inputs whose shapes differ from the first call's (the
    last partial batch of an epoch) run eagerly instead of compiling the step a second time.
    """

    def __init__(self, fn: Callable, enabled: bool, what: str = "the training step") -> None:
        self.eager = fn
        self.what = what
        self.compiled_fn: Callable | None = None
        self._shapes: tuple | None = None
        if enabled:
            try:
                self.compiled_fn = torch.compile(fn, dynamic=False)
            except Exception as err:  # any failure means: run eagerly
                self._fall_back(err)

    @property
    def compiled(self) -> bool:
        return self.compiled_fn is not None

    def _fall_back(self, err: Exception) -> None:
        self.compiled_fn = None
        warnings.warn(
            f"torch.compile failed for {self.what}, running it eagerly instead: {type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}",
            RuntimeWarning,
            stacklevel=3,
        )

    def run(self, body: Callable[..., torch.Tensor], *inputs: torch.Tensor | None) -> torch.Tensor:
        if self.compiled_fn is not None:
            shapes = tuple(None if t is None else tuple(t.shape) for t in inputs)
            if self._shapes is None:
                self._shapes = shapes
            if shapes == self._shapes:
                try:
                    return body(self.compiled_fn, *inputs)
                except Exception as err:  # see the class docstring
                    self._fall_back(err)
        return body(self.eager, *inputs)


def _frozen_adapters(fixed: dict[str, Adapter], dims: dict[str, int], output_dim: int) -> dict[str, Adapter]:
    """Frozen copies of the `fixed` adapters, checked against the sides' latent and output sizes."""
    if len(fixed) >= len(dims):
        raise ValueError("at most one side can be fixed: something has to be trained")
    out = {}
    for side, adapter in fixed.items():
        if side not in dims:
            raise ValueError(f"fixed side {side!r} is not one of the sides {sorted(dims)}")
        if adapter.input_dim != dims[side] or adapter.cfg.output_dim != output_dim:
            raise ValueError(
                f"fixed adapter of side {side!r} maps {adapter.input_dim}-d to {adapter.cfg.output_dim}-d; "
                f"these latents are {dims[side]}-d and the trained side maps to {output_dim}-d"
            )
        copy_ = copy.deepcopy(adapter).cpu()
        copy_.requires_grad_(False)
        out[side] = copy_.eval()
    return out


def step_loss_fn(
    model: FusedModel, train_cfg: TrainConfig, precision: str, device: torch.device
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """The step's forward: (mixed x [M, dx], mixed y [M, dy], same bool [M, M] or None) -> the scalar
    loss under the step's autocast (the part that torch.compile takes)."""
    sx, sy = model.sides
    t_min, t_max = train_cfg.temperature_min, train_cfg.temperature_max

    def loss_of(xm: torch.Tensor, ym: torch.Tensor, same: torch.Tensor | None) -> torch.Tensor:
        with precision_autocast(device, precision):
            ex, ey = model.adapters[sx](xm), model.adapters[sy](ym)
            t = clamp_temperature(model.temperature, t_min, t_max)
            if same is not None:
                return masked_clip_loss(ex, ey, t, same, mode=train_cfg.loss)
            return clip_loss(ex, ey, t)

    return loss_of


def train_adapters(
    x: np.ndarray | None,
    y: np.ndarray | None,
    adapter_cfg: AdapterConfig,
    fusemix_cfg: FuseMixConfig,
    train_cfg: TrainConfig,
    *,
    chunks: ChunkSource | None = None,
    groups: np.ndarray | None = None,
    x_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    validator: Validator | None = None,
    sides: tuple[str, str] = ("x", "y"),
    encoders: dict[str, EncoderRef] | None = None,
    on_step: StepCallback | None = None,
    on_validate: StepCallback | None = None,
    progress: bool = False,
    fixed: dict[str, Adapter] | None = None,
) -> TrainResult:
    """Trains the two adapters and the temperature. Give (x, y) arrays or `chunks`.

    x: [N, dx], y: [N, dy] aligned pairs. `groups` int [N, K]: keys of the shared positives of each
    pair (-1 = none; with `chunks`, give (x, y, groups) chunks instead); used by train_cfg.loss
    "masked" and "multi", which need them, and ignored by "infonce". `validator(model) -> score`
    (higher is better) overrides the default score on (x_val, y_val), which stays plain InfoNCE.
    Returns the best model on validation when validation data or a validator is given, else the last.
    `fixed` maps a side to a trained Adapter used frozen in its place (a copy: the caller's is not
    touched); its input size must match that side's latents and its output size adapter_cfg's.
    """
    if (x is None) == (chunks is None):
        raise ValueError("give either the arrays x, y or a chunk source, not both")
    if chunks is None:
        if y is None or len(x) != len(y):
            raise ValueError("x and y must be aligned arrays of the same length")
        if groups is not None:
            groups = _check_groups(groups, len(x), "")
        chunks = _array_chunks(np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.float32), groups)
    elif groups is not None:
        raise ValueError("with a chunk source, give the groups inside the chunks as (x, y, groups)")
    n, dx, dy, has_groups = _peek_dims(chunks)
    use_groups = train_cfg.loss != "infonce"
    if use_groups and not has_groups:
        raise ValueError(
            f"loss {train_cfg.loss!r} needs groups (the keys of the pairs' shared positives); "
            "pass groups= or (x, y, groups) chunks, or use loss='infonce'"
        )
    if train_cfg.loss == "multi" and fusemix_cfg.mode != "none":
        warnings.warn(
            "loss='multi' with FuseMix mixing makes every mixed pair that shares one source with another "
            "a full positive of it; on synthetic data this trained far worse than 'masked' (see "
            "TrainConfig). Use 'masked', or 'multi' with FuseMixConfig('none').",
            stacklevel=2,
        )
    if not all(np.isfinite(np.asarray(a)).all() for a in (x, y) if a is not None):
        raise ValueError("training latents contain NaN or inf")
    # A NaN validation score would never compare greater, freezing the choice on the first one.
    if not all(np.isfinite(np.asarray(a)).all() for a in (x_val, y_val) if a is not None):
        raise ValueError("validation latents contain NaN or inf")

    torch.manual_seed(train_cfg.seed)
    rng = np.random.default_rng(train_cfg.seed)
    device = torch.device(resolve_device(train_cfg.device))
    precision = resolve_train_precision(train_cfg.precision, str(device))
    sx, sy = sides
    adapters = {sx: Adapter(dx, adapter_cfg), sy: Adapter(dy, adapter_cfg)}
    frozen = _frozen_adapters(fixed or {}, {sx: dx, sy: dy}, adapter_cfg.output_dim)
    adapters.update(frozen)
    encoders = encoders or {sx: EncoderRef(sx, "", dx), sy: EncoderRef(sy, "", dy)}
    model = FusedModel(adapters, encoders, temperature=train_cfg.temperature_init).to(device)

    # batch_size is the contrastive batch the loss sees. The halves schemes mix two raw pairs into
    # one, so they draw twice as many raw pairs; otherwise they would train on half the negatives.
    halves = fusemix_cfg.mode in ("fusemix", "independent")
    contrastive = train_cfg.batch_for(n)
    batch = min(contrastive * (2 if halves else 1), n)
    steps_per_epoch = max(1, math.ceil(n / batch))
    total = train_cfg.steps or steps_per_epoch * (train_cfg.epochs or 1)
    opt = make_optimizer(
        param_groups([a for s, a in model.adapters.items() if s not in frozen], train_cfg.weight_decay)
        + [{"params": [model.temperature], "weight_decay": 0.0}],
        train_cfg.lr,
        device,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: lr_factor(
            s, total, min(train_cfg.warmup_steps, total // 2), train_cfg.schedule, train_cfg.min_lr_ratio
        ),
    )
    scaler = torch.amp.GradScaler(enabled=precision == "fp16" and device.type == "cuda")
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("fp16 autocast is for CUDA; use bf16 or fp32 on the CPU")
    step_loss = CompiledOrEager(
        step_loss_fn(model, train_cfg, precision, device), resolve_compile(train_cfg.compile, device)
    )
    eval_every = train_cfg.eval_every or steps_per_epoch
    has_val = validator is not None or (x_val is not None and y_val is not None and len(x_val) >= 2)

    def score() -> float:
        model.eval()
        s = (
            validator(model)
            if validator
            else contrastive_val_score(model, x_val, y_val, train_cfg.val_batch_size)
        )
        train_mode()
        return s

    def train_mode() -> None:
        model.train()
        for side in frozen:  # a frozen adapter never drops out: it is the fixed target space
            model.adapters[side].eval()

    def forward_backward(loss_of: Callable, *inputs: torch.Tensor | None) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = loss_of(*inputs)
        scaler.scale(loss).backward()
        return loss

    result = TrainResult(model=model, precision=precision, batch_size=batch // 2 if halves else batch)
    best_state = None
    t0 = time.perf_counter()
    step, epoch = 0, 0
    train_mode()
    bar = tqdm(total=total, desc="train adapters", unit="step", disable=not progress)
    while step < total:
        step_at_epoch_start = step
        for bx, by, *bg in _batches(chunks, batch, rng, with_groups=use_groups):
            xb = torch.from_numpy(bx).to(device, non_blocking=True)
            yb = torch.from_numpy(by).to(device, non_blocking=True)
            xm, ym, src_a, src_b = mix_with_sources(xb, yb, fusemix_cfg, rng)
            same = None
            if use_groups:
                same = mixed_same_from_groups(torch.from_numpy(bg[0]).to(device), src_a, src_b)
            loss = step_loss.run(forward_backward, xm, ym, same).detach()
            lr_used = opt.param_groups[0]["lr"]  # read before sched.step() moves it to the next step
            if train_cfg.grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            with torch.no_grad():
                model.temperature.clamp_(train_cfg.temperature_min, train_cfg.temperature_max)
                # One host sync a step, for both logged values (on a GPU each read waits for the queue).
                loss_value, temperature = torch.stack([loss.float(), model.temperature]).tolist()
            if not math.isfinite(loss_value):
                # Caught after the update the loss spoiled; the run raises, so that model is never returned.
                raise FloatingPointError(f"loss became {loss_value} at step {step}; lower the learning rate")
            row = {
                "step": step,
                "epoch": epoch,
                "loss": loss_value,
                "temperature": temperature,
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
    result.compiled = step_loss.compiled  # False after a fallback to eager
    return result
