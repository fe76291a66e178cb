"""What the CPU offers for reduced-precision matrix work, read from /proc/cpuinfo (lscpu's source).

bf16 pays off where the CPU has bf16 matrix instructions: AMX tiles (`amx_bf16`, Intel Sapphire Rapids
and later) or AVX-512 BF16 dot products (`avx512_bf16`, Intel Cooper Lake, AMD Zen 4 and later).
Without them PyTorch emulates bf16 and it is slower than fp32, so every "auto" precision of the
project resolves to fp32 there.

    from fusion.hardware import cpu_bf16_units
    cpu_bf16_units()   # "amx", "avx512_bf16" or None
"""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is missing, e.g. on macOS)."""
    info = Path("/proc/cpuinfo")
    try:
        text = info.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_bf16_units() -> str | None:
    """ "amx" (AMX bf16 tiles), "avx512_bf16" (AVX-512 bf16 dot products) or None (bf16 is emulated)."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    return None


def resolve_train_precision(precision: str, device: str = "cpu") -> str:
    """The autocast precision adapter training runs in: "fp32", "bf16" or "fp16".

    "auto": on CUDA, bf16 where the GPU supports it, else fp16; on a CPU, bf16 where it has bf16 units
    (`cpu_bf16_units`), else fp32; fp32 on any other device. Any other value is returned as given
    (TrainConfig checks it). `device`: "cpu", "cuda", "cuda:1", ... (str() of a torch.device).
    """
    if precision != "auto":
        return precision
    kind = device.split(":")[0]
    if kind == "cuda":
        import torch  # only here: the CPU answer needs no torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if kind == "cpu":
        return "bf16" if cpu_bf16_units() else "fp32"
    return "fp32"
