"""Benchmark: adapter training step throughput on the CPU, beside the machine's own matmul speed.

For the reference adapter shape (4 pre-LN residual blocks of width 4d, LN + Linear(d -> 512)) at the
text (d=384, MiniLM) and image (d=1280, EfficientNet-Lite) latent sizes, times a full training step
(forward, symmetric InfoNCE against a batch of target embeddings, backward, AdamW) and prints:

- pairs/s, and the achieved GFLOP/s of the adapter's matmuls: 3 x `Adapter.flops_per_example()` per
  pair (forward, and a backward that costs about twice the forward);
- the machine's fp32 matmul GFLOP/s, measured in the same run with one large `torch.mm` (once up
  front, and again in alternation with each adapter's steps for the ratio); the ratio (adapter step /
  bare matmul, same precision) says how much of the hardware the training step uses;
- fp32 vs bf16 autocast, side by side (the two timed in alternation, best of --repeats), with the
  CPU's bf16-relevant flags (AMX, AVX-512 BF16) and the bare bf16 matmul speed for context;
- one whole FuseMix step (both adapters, latent mixup, loss, AdamW) for the pairs/s a run sees.

Run: python -m benchmarks.bench_train              (quick: batch 1024, a minute or two on 2 cores)
     python -m benchmarks.bench_train --full       (more timed steps and repeats)
     python -m benchmarks.bench_train --dims 384 --no-bf16
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fusion.adapters import Adapter
from fusion.config import AdapterConfig, FuseMixConfig
from fusion.fusemix import mix_latents
from fusion.loss import clip_loss

CPU_FLAGS = ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512f", "avx512_vnni", "avx2", "fma")


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
    return f"{model}; AMX: {amx}; flags: {' '.join(have) or 'unknown'}"


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


def _autocast(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def adapter_step_fn(
    d_in: int, cfg: AdapterConfig, batch: int, precision: str, seed: int
) -> Callable[[], None]:
    """One training step of a single adapter: latents x [batch, d_in] -> embeddings [batch, out],
    InfoNCE against fixed normalised targets [batch, out] at a fixed temperature, backward, AdamW."""
    g = torch.Generator().manual_seed(seed)
    adapter = Adapter(d_in, cfg).train()
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-4, weight_decay=0.1)
    x = torch.randn(batch, d_in, generator=g)
    target = F.normalize(torch.randn(batch, cfg.output_dim, generator=g), dim=-1)
    t = torch.tensor(0.07)

    def step() -> None:
        with _autocast(precision):
            loss = clip_loss(adapter(x), target, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def fusemix_step_fn(dx: int, dy: int, cfg: AdapterConfig, batch: int, seed: int) -> Callable[[], None]:
    """One whole FuseMix step as the trainer runs it: 2 * batch raw pairs mixed into `batch` pairs,
    both adapters, learnable temperature, backward, AdamW."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    ax, ay = Adapter(dx, cfg).train(), Adapter(dy, cfg).train()
    temp = torch.nn.Parameter(torch.tensor(0.07))
    opt = torch.optim.AdamW([*ax.parameters(), *ay.parameters(), temp], lr=1e-4, weight_decay=0.1)
    x, y = torch.randn(2 * batch, dx, generator=g), torch.randn(2 * batch, dy, generator=g)
    mix = FuseMixConfig("fusemix")

    def step() -> None:
        xm, ym = mix_latents(x, y, mix, rng)
        loss = clip_loss(ax(xm), ay(ym), temp.clamp(0.001, 0.5))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def time_side_by_side(steps: dict[str, Callable[[], None]], n_steps: int, repeats: int) -> dict[str, float]:
    """Best seconds per step of each callable, timed in alternation so that load from other processes
    hits all of them alike. One untimed step each first (allocations, kernel choice)."""
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
    print(f"CPU: {cpu_description()}")
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, oneDNN {torch.backends.mkldnn.is_available()}; "
        f"adapter depth={cfg.depth} expansion={cfg.expansion} out={cfg.output_dim}; batch {args.batch}; "
        f"best of {repeats} x {n_steps} steps",
        flush=True,
    )
    figures: dict[str, float] = {}
    mm = {"fp32": matmul_gflops(args.mm_size, torch.float32, 3)}
    if "bf16" in precisions:
        mm["bf16"] = matmul_gflops(args.mm_size, torch.bfloat16, 3)
    print(
        "bare torch.mm "
        + ", ".join(f"{p}: {g:,.1f} GFLOP/s" for p, g in mm.items())
        + (f" (bf16/fp32 {mm['bf16'] / mm['fp32']:.2f}x)" if "bf16" in mm else ""),
        flush=True,
    )
    figures.update({f"mm_{p}_gflops": g for p, g in mm.items()})

    header = (
        f"{'d_in':>5} {'params':>8} {'prec':>5} {'ms/step':>9} {'pairs/s':>9} {'GFLOP/s':>8} {'of mm':>6}"
    )
    print(header)
    for d in dims:
        probe = Adapter(d, cfg)
        flops = 3 * probe.flops_per_example() * args.batch  # forward + ~2x for backward, matmuls only
        steps = {p: adapter_step_fn(d, cfg, args.batch, p, args.seed) for p in precisions}
        # The bare matmul is timed again in alternation with the steps, so that the ratio compares
        # the two under the same load from other processes (a shared machine drifts).
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
        steps.update({f"mm_{p}": mm_fn(args.mm_size, dtypes[p]) for p in precisions})
        secs = time_side_by_side(steps, n_steps, repeats)
        for p in precisions:
            pairs = args.batch / secs[p]
            gflops = flops / secs[p] / 1e9
            ratio = gflops / (2 * args.mm_size**3 / secs[f"mm_{p}"] / 1e9)
            print(
                f"{d:>5} {probe.num_parameters / 1e6:>7.1f}M {p:>5} {secs[p] * 1e3:>9.1f} {pairs:>9,.0f} "
                f"{gflops:>8.1f} {ratio:>6.2f}",
                flush=True,
            )
            figures[f"d{d}_{p}_pairs_per_s"] = pairs
            figures[f"d{d}_{p}_gflops"] = gflops
            figures[f"d{d}_{p}_of_mm"] = ratio
        if "bf16" in precisions:
            r = secs["fp32"] / secs["bf16"]
            figures[f"d{d}_bf16_over_fp32"] = r
            print(f"{'':>5} bf16 autocast / fp32 pairs/s: {r:.2f}x", flush=True)

    if len(dims) >= 2:
        dx, dy = max(dims), min(dims)
        step = fusemix_step_fn(dx, dy, cfg, args.batch, args.seed)
        secs = time_side_by_side({"fusemix": step}, n_steps, repeats if args.full else 1)
        pairs = args.batch / secs["fusemix"]
        figures["fusemix_step_pairs_per_s"] = pairs
        print(
            f"whole FuseMix step ({dx} + {dy}, fp32, {2 * args.batch} raw -> {args.batch} mixed pairs): "
            f"{secs['fusemix'] * 1e3:.1f} ms/step, {pairs:,.0f} mixed pairs/s",
            flush=True,
        )
    return figures


if __name__ == "__main__":
    main()
