"""Benchmark: adapter training step throughput on the CPU, beside the machine's own matmul speed.

For the reference adapter shape (4 pre-LN residual blocks of width 4d, LN + Linear(d -> 512)) at the
text (d=384, MiniLM) and image (d=1280, EfficientNet-Lite) latent sizes, times a full training step
(forward, symmetric InfoNCE against a batch of target embeddings, backward, AdamW) built from the
trainer's own parts (fused AdamW, the step's autocast, its torch.compile wrapper) and prints:

- pairs/s, and the achieved GFLOP/s of the adapter's matmuls: 3 x `Adapter.flops_per_example()` per
  pair (forward, and a backward that costs about twice the forward);
- the machine's fp32 and bf16 matmul GFLOP/s, measured in the same run with one large `torch.mm` (once
  up front, and again in alternation with each adapter's steps for the ratio); the ratio "of mm"
  (adapter step / bare matmul of the same precision) is the share of the hardware the step uses;
- fp32 and bf16 autocast, eager and through torch.compile, side by side (all timed in alternation,
  best of --repeats), with the CPU's bf16-relevant flags (AMX, AVX-512 BF16) for context;
- the whole FuseMix step as `train_adapters` runs it (both adapters, batch gathering, latent mixup,
  loss, AdamW) for the default TrainConfig, for precision "auto", and for "auto" with compile.

torch.compile builds C++ kernels on the first step of each variant (20-50 s each on 2 cores the first
time; inductor caches them on disk, so a second run takes seconds). --no-compile leaves them out.

Run: python -m benchmarks.bench_train              (quick: batch 1024, 2-3 minutes on 2 cores)
     python -m benchmarks.bench_train --full       (more timed steps and repeats)
     python -m benchmarks.bench_train --dims 384 --no-bf16 --no-compile
     python -m benchmarks.bench_train --profile    (also: the ops and shapes that take a step's time)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fusion.adapters import Adapter
from fusion.config import AdapterConfig, FuseMixConfig, TrainConfig
from fusion.hardware import cpu_bf16_units, resolve_train_precision
from fusion.loss import clip_loss
from fusion.trainer import (
    CompiledOrEager,
    compiler_available,
    make_optimizer,
    precision_autocast,
    train_adapters,
)

CPU_FLAGS = ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512f", "avx512_vnni", "avx2", "fma")
CPU = torch.device("cpu")


def cpu_description() -> str:
    """Model name and the flags that decide fp32/bf16 matmul speed, from /proc/cpuinfo (lscpu's source)."""
    model, flags = platform.processor() or platform.machine(), set()
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    have = [f for f in CPU_FLAGS if f in flags]
    amx = "yes" if any(f.startswith("amx") for f in flags) else "no"
    return (
        f"{model}; AMX: {amx}; bf16 units: {cpu_bf16_units() or 'none'}; flags: {' '.join(have) or 'unknown'}"
    )


def matmul_gflops(n: int, dtype: torch.dtype, repeats: int) -> float:
    """Best-of-`repeats` GFLOP/s of one [n, n] @ [n, n] torch.mm (2 n^3 FLOPs)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up: thread pool, kernel choice
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def mm_fn(n: int, dtype: torch.dtype) -> Callable[[], None]:
    """One bare [n, n] @ [n, n] torch.mm (2 n^3 FLOPs), to time beside the training steps."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return lambda: torch.mm(a, b)


class AdapterStep:
    """One training step of a single adapter, as the trainer runs it: latents x [batch, d_in] ->
    embeddings [batch, out], InfoNCE against fixed normalised targets [batch, out] at a fixed
    temperature, backward, fused AdamW; the forward and loss under `precision` autocast, through
    torch.compile with `compile` (falling back to eager, with a warning, where that fails)."""

    def __init__(
        self, d_in: int, cfg: AdapterConfig, batch: int, precision: str, seed: int, compile: bool = False
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.adapter = Adapter(d_in, cfg).train()
        self.opt = make_optimizer(
            [{"params": list(self.adapter.parameters()), "weight_decay": 0.1}], 1e-4, CPU
        )
        self.x = torch.randn(batch, d_in, generator=g)
        target = F.normalize(torch.randn(batch, cfg.output_dim, generator=g), dim=-1)
        t = torch.tensor(0.07)

        def loss_of(x: torch.Tensor) -> torch.Tensor:
            with precision_autocast(CPU, precision):
                return clip_loss(self.adapter(x), target, t)

        self.runner = CompiledOrEager(loss_of, compile, f"the {d_in}-d adapter step ({precision})")

    def _forward_backward(self, loss_of: Callable, x: torch.Tensor) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = loss_of(x)
        loss.backward()
        return loss

    def __call__(self) -> None:
        self.runner.run(self._forward_backward, self.x)
        self.opt.step()


def time_side_by_side(steps: dict[str, Callable[[], None]], n_steps: int, repeats: int) -> dict[str, float]:
    """Best seconds per step of each callable, timed in alternation so that load from other processes
    hits all of them alike. One untimed step each first (allocations, kernel choice, compilation)."""
    for fn in steps.values():
        fn()
    best = {name: float("inf") for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            for _ in range(n_steps):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / n_steps)
    return best


def fusemix_step_seconds(
    dx: int, dy: int, cfg: AdapterConfig, batch: int, train: TrainConfig, timed: int, seed: int
) -> tuple[float, bool]:
    """Best seconds per step of `train_adapters` itself (FuseMix "fusemix": 2 * batch raw pairs mixed
    into `batch`), over `timed` steps after an untimed first one (compilation, allocations); and
    whether its steps ran compiled."""
    rng = np.random.default_rng(seed)
    n = 2 * batch * (timed + 1)
    x = rng.standard_normal((n, dx), dtype=np.float32)
    y = rng.standard_normal((n, dy), dtype=np.float32)
    stamps: list[float] = []
    result = train_adapters(
        x, y, cfg, FuseMixConfig("fusemix"), train, on_step=lambda _: stamps.append(time.perf_counter())
    )
    return float(np.min(np.diff(stamps))), result.compiled


def profile_step(step: Callable[[], None], rows: int = 12) -> str:
    """The ops (with their input shapes) that take one step's CPU time, most first."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    table = prof.key_averages(group_by_input_shape=True)
    return table.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=28)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Runs the benchmark, prints a table, and returns the figures (pairs/s, GFLOP/s, ratios)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_train", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--dims", default="384,1280", help="adapter input dims (default 384,1280: text, image)"
    )
    parser.add_argument("--batch", type=int, default=1024, help="contrastive batch (default 1024)")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per repeat (default 1; --full 5)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="best of this many (default 2; --full 3)")
    parser.add_argument("--mm-size", type=int, default=2048, help="side of the reference torch.mm")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast comparison")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--profile", action="store_true", help="also profile one eager step per row")
    parser.add_argument("--full", action="store_true", help="more timed steps and repeats")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n_steps = args.steps or (5 if args.full else 1)
    repeats = args.repeats or (3 if args.full else 2)
    try:
        dims = [int(d) for d in args.dims.split(",") if d.strip()]
    except ValueError:
        parser.error(f"--dims must be comma-separated integers, got {args.dims!r}")
    if not dims or min(dims) < 1 or args.batch < 2 or n_steps < 1 or repeats < 1 or args.mm_size < 1:
        parser.error("--dims >= 1, --batch >= 2, --steps, --repeats and --mm-size >= 1")

    cfg = AdapterConfig()  # the reference shape: depth 4, expansion 4, output 512
    precisions = ["fp32"] if args.no_bf16 else ["fp32", "bf16"]
    compile_ok = not args.no_compile and compiler_available(CPU)
    variants = [(p, False) for p in precisions] + ([(p, True) for p in precisions] if compile_ok else [])
    print(f"CPU: {cpu_description()}")
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, oneDNN {torch.backends.mkldnn.is_available()}; "
        f"adapter depth={cfg.depth} expansion={cfg.expansion} out={cfg.output_dim}; batch {args.batch}; "
        f"best of {repeats} x {n_steps} steps; torch.compile: "
        + ("skipped" if args.no_compile else "on" if compile_ok else "no C++ compiler found"),
        flush=True,
    )
    print(_load_line(), flush=True)
    figures: dict[str, float] = {}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    mm = {p: matmul_gflops(args.mm_size, dtypes[p], 3) for p in precisions}
    print(
        "bare torch.mm "
        + ", ".join(f"{p}: {g:,.1f} GFLOP/s" for p, g in mm.items())
        + (f" (bf16/fp32 {mm['bf16'] / mm['fp32']:.2f}x)" if "bf16" in mm else ""),
        flush=True,
    )
    figures.update({f"mm_{p}_gflops": g for p, g in mm.items()})

    header = (
        f"{'d_in':>5} {'params':>8} {'prec':>5} {'compile':>7} {'ms/step':>9} {'pairs/s':>9} "
        f"{'GFLOP/s':>8} {'of mm':>6}"
    )
    print(header)
    for d in dims:
        probe = Adapter(d, cfg)
        flops = 3 * probe.flops_per_example() * args.batch  # forward + ~2x for backward, matmuls only
        steps: dict[str, Callable[[], None]] = {}
        runners: dict[str, AdapterStep] = {}
        for p, comp in variants:
            name = f"{p}+compile" if comp else p
            runners[name] = AdapterStep(d, cfg, args.batch, p, args.seed, compile=comp)
            steps[name] = runners[name]
        # The bare matmul is timed again in alternation with the steps, so that the ratio compares
        # the two under the same load from other processes (a shared machine drifts).
        steps.update({f"mm_{p}": mm_fn(args.mm_size, dtypes[p]) for p in precisions})
        secs = time_side_by_side(steps, n_steps, repeats)
        for name, runner in runners.items():
            p, comp = name.split("+")[0], name.endswith("+compile")
            if comp and not runner.runner.compiled:
                print(
                    f"{d:>5} {'':>8} {p:>5} {'failed':>7} (torch.compile fell back to eager; see the warning)"
                )
                continue
            pairs = args.batch / secs[name]
            gflops = flops / secs[name] / 1e9
            ratio = gflops / (2 * args.mm_size**3 / secs[f"mm_{p}"] / 1e9)
            print(
                f"{d:>5} {probe.num_parameters / 1e6:>7.1f}M {p:>5} {'yes' if comp else 'no':>7} "
                f"{secs[name] * 1e3:>9.1f} {pairs:>9,.0f} {gflops:>8.1f} {ratio:>6.2f}",
                flush=True,
            )
            key = f"d{d}_{name.replace('+', '_')}"
            figures[f"{key}_pairs_per_s"] = pairs
            figures[f"{key}_gflops"] = gflops
            figures[f"{key}_of_mm"] = ratio
        if "bf16" in precisions:
            r = secs["fp32"] / secs["bf16"]
            figures[f"d{d}_bf16_over_fp32"] = r
            line = f"{'':>5} bf16 autocast / fp32 pairs/s: {r:.2f}x"
            for p in precisions if compile_ok else []:
                if runners[f"{p}+compile"].runner.compiled:
                    c = secs[p] / secs[f"{p}+compile"]
                    figures[f"d{d}_{p}_compile_speedup"] = c
                    line += f"; compiled / eager {p}: {c:.2f}x"
            print(line, flush=True)
        if args.profile:
            for name, runner in runners.items():
                if not name.endswith("+compile"):
                    print(f"profile of one {d}-d {name} step (self CPU time, by op and input shapes):")
                    print(profile_step(runner), flush=True)

    if len(dims) >= 2:
        dx, dy = max(dims), min(dims)
        timed = n_steps * repeats
        base = TrainConfig(
            batch_size=args.batch, steps=timed + 1, epochs=None, warmup_steps=0, seed=args.seed
        )
        configs = {"default": base}
        if not args.no_bf16:
            configs["precision='auto'"] = dataclasses.replace(base, precision="auto")
        if compile_ok:
            configs["precision='auto', compile"] = dataclasses.replace(base, precision="auto", compile=True)
        print(
            f"whole FuseMix step, train_adapters ({dx} + {dy}, {2 * args.batch} raw -> {args.batch} mixed "
            f"pairs, best of {timed} steps):"
        )
        print(f"  {'TrainConfig':<28} {'runs in':>14} {'ms/step':>9} {'pairs/s':>9} {'vs default':>10}")
        default_secs = None
        for label, train in configs.items():
            secs, compiled = fusemix_step_seconds(dx, dy, cfg, args.batch, train, timed, args.seed)
            default_secs = default_secs or secs
            runs = resolve_train_precision(train.precision, "cpu") + (" + compile" if compiled else "")
            pairs = args.batch / secs
            print(
                f"  {label:<28} {runs:>14} {secs * 1e3:>9.1f} {pairs:>9,.0f} {default_secs / secs:>9.2f}x",
                flush=True,
            )
            key = {"default": "fusemix_step", "precision='auto'": "fusemix_auto"}.get(
                label, "fusemix_auto_compile"
            )
            figures[f"{key}_pairs_per_s"] = pairs
    print(_load_line(), flush=True)
    return figures


def _load_line() -> str:
    """Other processes on the machine skew every timing (on 2 cores, each parallel op of a step then
    waits for a time slice): the load average says how much."""
    if not hasattr(os, "getloadavg"):
        return "load average: unknown"
    one, five, _ = os.getloadavg()
    return f"load average (1 min, 5 min): {one:.2f}, {five:.2f} on {os.cpu_count()} CPUs"


if __name__ == "__main__":
    main()
