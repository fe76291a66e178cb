"""Benchmark: chunked retrieval metrics at 100k items x 100k captions vs a full score matrix.

Run: python -m benchmarks.bench_retrieval            (100k x 100k, d=512; a few minutes on 2 cores)
     python -m benchmarks.bench_retrieval --n 20000  (quick)

Prints the wall time and peak memory of `evaluation.retrieval.retrieval_metrics` (both directions;
each caption is paired with one item, given as pairs: pair_items = the caption's item, pair_texts =
arange; --candidate-chunk-size also splits the candidate axis)
beside the memory the naive approach needs for one full float32 [N, N] score matrix (N*N*4 bytes,
40 GB at 100k), and the ratio. Memory is the growth of the process's resident set size (RSS) over its
value just before the call (after glibc's malloc_trim hands freed memory back, so reuse of it still
counts), sampled by a background thread every 2 ms (psutil, else /proc/self/statm);
tracemalloc would not see torch's allocations. On CUDA it is torch.cuda.max_memory_allocated growth.
Then, at a size where the naive full-matrix reference still fits (--naive-n), both run side by side on
the same data and the time and memory ratios and the agreement of their ranks are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from evaluation.retrieval import chance_recall, naive_retrieval, retrieval_metrics


def _rss_reader() -> Callable[[], int] | None:
    """A function returning the current RSS in bytes, or None where neither psutil nor /proc exists."""
    try:
        import psutil

        proc = psutil.Process()
        return lambda: proc.memory_info().rss
    except ImportError:
        pass
    if os.path.exists("/proc/self/statm"):
        page = os.sysconf("SC_PAGE_SIZE")

        def read() -> int:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page

        return read
    return None


def _release_freed_memory() -> None:
    """Hand memory freed earlier back to the OS (glibc only), so that a later block that reuses it
    still shows as RSS growth; elsewhere a no-op, and growth may then be under-reported."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Context manager: peak memory growth (bytes) during the block, as `self.peak`; None if unmeasurable."""

    def __init__(self, device: torch.device, interval_s: float = 0.002) -> None:
        self.device = device
        self.interval_s = interval_s
        self.peak: int | None = None
        self.how = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.how = "torch.cuda.max_memory_allocated growth"
            return self
        gc.collect()
        _release_freed_memory()
        self._read = _rss_reader()
        if self._read is None:
            self.how = "not measured (no psutil, no /proc)"
            return self
        self.how = f"peak RSS growth, sampled every {self.interval_s * 1000:.0f} ms"
        self._base = self._read()
        self._max = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, self._read())
            time.sleep(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._read is not None:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, self._read())
            self.peak = self._max - self._base


def make_data(
    n_items: int, captions_per_item: int, d: int, noise: float, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """L2-normalised items [n, d] and noisy captions [n * m, d] (float32), and the pairs: each
    caption's item and the caption's index, int64 [n * m] each."""
    gen = torch.Generator().manual_seed(seed)
    items = torch.randn(n_items, d, generator=gen)
    items /= torch.linalg.vector_norm(items, dim=1, keepdim=True)
    owner = torch.arange(n_items).repeat(captions_per_item)
    owner = owner[torch.randperm(owner.numel(), generator=gen)]
    # Noise of norm ~`noise` around a unit vector: captions are informative but far from perfect.
    texts = torch.randn(owner.numel(), d, generator=gen).mul_(noise / d**0.5).add_(items[owner])
    texts /= torch.linalg.vector_norm(texts, dim=1, keepdim=True)
    return items.to(device), texts.to(device), owner, torch.arange(owner.numel())


def _mb(n_bytes: float | None) -> str:
    return "n/a" if n_bytes is None else f"{n_bytes / 2**20:,.1f} MB"


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, PeakMemory]:
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    return out, wall, mem


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark and print its figures; returns them as a dict (bytes, seconds, ratios)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_retrieval", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--n", type=int, default=100_000, help="number of items (default 100000)")
    parser.add_argument("--captions-per-item", type=int, default=1, help="captions per item (default 1)")
    parser.add_argument("--d", type=int, default=512, help="embedding dimension (default 512)")
    parser.add_argument("--chunk-size", type=int, default=256, help="queries per matmul block (default 256)")
    parser.add_argument(
        "--candidate-chunk-size",
        type=int,
        default=None,
        help="candidates per matmul block (default: all at once)",
    )
    parser.add_argument("--noise", type=float, default=4.0, help="caption noise norm around its item")
    parser.add_argument(
        "--naive-n",
        type=int,
        default=4000,
        help="size of the side-by-side run with the naive reference (0: skip)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.n < 1 or args.captions_per_item < 1 or args.d < 1 or args.chunk_size < 1 or args.naive_n < 0:
        parser.error("--n, --captions-per-item, --d and --chunk-size must be >= 1, --naive-n >= 0")
    if args.candidate_chunk_size is not None and args.candidate_chunk_size < 1:
        parser.error("--candidate-chunk-size must be >= 1")
    chunks = {"chunk_size": args.chunk_size, "candidate_chunk_size": args.candidate_chunk_size}
    device = torch.device(args.device)
    figures: dict[str, float] = {}

    n_texts = args.n * args.captions_per_item
    print(
        f"retrieval benchmark: {args.n:,} items x {n_texts:,} captions, d={args.d}, chunk={args.chunk_size}, "
        f"candidate chunk={args.candidate_chunk_size or 'all'}, "
        f"device={device}, torch threads={torch.get_num_threads()}",
        flush=True,
    )
    # One tiny call first, so that torch's one-time set-up (thread pools, kernels) is not counted.
    warm = make_data(64, 2, args.d, args.noise, args.seed, device)
    retrieval_metrics(*warm, chunk_size=16)
    naive_retrieval(warm[0].cpu().numpy(), warm[1].cpu().numpy(), warm[2].numpy(), warm[3].numpy())
    items, texts, pair_items, pair_texts = make_data(
        args.n, args.captions_per_item, args.d, args.noise, args.seed, device
    )
    result, wall, mem = _timed(
        lambda: retrieval_metrics(items, texts, pair_items, pair_texts, **chunks, progress=True), device
    )
    naive_bytes = float(n_texts) * args.n * 4
    # The float32 score block, plus a 1M-element comparison slice and its int32 sum copy.
    candidates = max(args.n, n_texts)
    if args.candidate_chunk_size is not None:
        candidates = min(candidates, args.candidate_chunk_size)
    block_bytes = args.chunk_size * candidates * 4 + 2**20 * 5
    print(f"  chunked: {wall:.1f} s for both directions; memory {_mb(mem.peak)} ({mem.how})")
    print(f"  chunked: expected per-chunk working set {_mb(block_bytes)} (score block + comparison slice)")
    print(
        f"  naive:   a full float32 score matrix needs {naive_bytes / 1e9:,.2f} GB (N_texts * N_items * 4 B)"
    )
    if mem.peak:
        figures["memory_ratio_naive_matrix_over_chunked_peak"] = naive_bytes / mem.peak
        print(f"  -> naive matrix / chunked peak = {naive_bytes / mem.peak:,.0f}x")
    print(
        f"  recall: t2i R@1 {result.t2i_recall[1]:.4f} R@10 {result.t2i_recall[10]:.4f}, "
        f"i2t R@1 {result.i2t_recall[1]:.4f}; chance R@10 {chance_recall(args.n, 10):.2e}",
        flush=True,
    )
    figures.update(
        chunked_wall_s=wall, chunked_peak_bytes=float(mem.peak or 0), naive_matrix_bytes=naive_bytes
    )

    if args.naive_n:
        n = args.naive_n
        print(
            f"side by side at {n:,} items x {n * args.captions_per_item:,} captions (same data for both):",
            flush=True,
        )
        items_s, texts_s, pi_s, pt_s = make_data(
            n, args.captions_per_item, args.d, args.noise, args.seed + 1, device
        )
        items_np, texts_np = items_s.cpu().numpy(), texts_s.cpu().numpy()
        cpu = torch.device("cpu")
        naive, naive_wall, naive_mem = _timed(
            lambda: naive_retrieval(items_np, texts_np, pi_s.numpy(), pt_s.numpy()), cpu
        )
        chunked, chunk_wall, chunk_mem = _timed(
            lambda: retrieval_metrics(items_s, texts_s, pi_s, pt_s, **chunks), device
        )
        # float64 full matrix vs float32 blocks: a rank may differ where two scores are within rounding.
        same_t2i = float(np.mean(naive.t2i_ranks == chunked.t2i_ranks))
        same_i2t = float(np.mean(naive.i2t_ranks == chunked.i2t_ranks))
        print(f"  naive (float64 matrix, argsort): {naive_wall:.2f} s, memory {_mb(naive_mem.peak)}")
        print(f"  chunked:                         {chunk_wall:.2f} s, memory {_mb(chunk_mem.peak)}")
        print(
            f"  -> time naive/chunked = {naive_wall / chunk_wall:.1f}x"
            + (
                f", memory naive/chunked = {naive_mem.peak / chunk_mem.peak:.1f}x"
                if naive_mem.peak and chunk_mem.peak
                else ""
            )
            + f"; identical ranks: t2i {same_t2i:.4%}, i2t {same_i2t:.4%}"
        )
        figures.update(
            side_by_side_time_ratio=naive_wall / chunk_wall,
            side_by_side_same_t2i=same_t2i,
            side_by_side_same_i2t=same_i2t,
        )
        if naive_mem.peak and chunk_mem.peak:
            figures["side_by_side_memory_ratio"] = naive_mem.peak / chunk_mem.peak
    return figures


if __name__ == "__main__":
    main()
