"""What the CPU offers for reduced-precision matrix work, read from /proc/cpuinfo (lscpu's source).

bf16 pays off where the CPU has bf16 matrix instructions: AMX tiles (`amx_bf16`, Intel Sapphire Rapids
and later) or AVX-512 BF16 dot products (`avx512_bf16`, Intel Cooper Lake, AMD Zen 4 and later).
Without them PyTorch emulates bf16 and it is slower than fp32, so every "auto" precision of the
project resolves to fp32 there.

    from fusion.hardware import cpu_bf16_units, resolve_device
    cpu_bf16_units()   # "amx", "avx512_bf16" or None
    resolve_device("auto")   # "cuda" where a GPU is present, else "mps" on Apple silicon, else "cpu"
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

# Where encoders run when neither the encoder's entry nor the pipeline's EncoderBank names a device.
DEVICE_ENV = "FUSEMIX_DEVICE"
_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?|auto)$")


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


def valid_device(name: str) -> bool:
    """Whether `name` is a device resolve_device takes (cpu, cuda, cuda:N, mps, auto)."""
    return bool(_DEVICE.match(name))


def resolve_device(device: str | None = None) -> str:
    """A concrete torch device name: `device`, else $FUSEMIX_DEVICE, else "cpu". "auto" is
    $FUSEMIX_DEVICE where that names a device, else "cuda" where a CUDA GPU is present, else "mps"
    where Apple's Metal backend is, else "cpu". Raises ValueError for a name that is none of cpu,
    cuda, cuda:N, mps or auto."""
    name = (device or os.environ.get(DEVICE_ENV, "") or "cpu").strip()
    if name == "auto" and device == "auto" and os.environ.get(DEVICE_ENV, "").strip() not in ("", "auto"):
        name = os.environ[DEVICE_ENV].strip()  # the machine's choice, where the config leaves it open
    if not valid_device(name):
        where = f"${DEVICE_ENV}" if not device else "device"
        raise ValueError(f"{where} must be cpu, cuda, cuda:N, mps or auto, got {name!r}")
    if name != "auto":
        return name
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"
