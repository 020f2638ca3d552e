"""What the machine runs fast: is bfloat16 native here, or emulated?

bf16 autocast is a speed lever only where the hardware has bf16 arithmetic: CUDA GPUs from
Ampere on, and x86 CPUs with ``avx512_bf16`` or AMX. Elsewhere PyTorch emulates it, and the
emulation is far slower than plain fp32. Measured on a 2-core AMD EPYC with AVX2 only: one SFT
step of smollm2-llava (2 examples × ~450 tokens) took ~150 s under bf16 autocast against 5.8 s in
fp32, and scoring 20 candidates for 4 users 52 s against 10 s; on a CPU with ``avx512_bf16`` the
same bf16 step was about 2× faster than fp32. Stages warn once when asked for bf16 where it is
emulated, and the quality benchmark's CPU budget only turns bf16 on where it is native.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch

NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The feature flags of the first CPU in ``cpuinfo`` (empty where the file does not exist)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@functools.cache
def native_bf16(device_type: str = "cpu") -> bool:
    """True when bfloat16 matmuls run in hardware on ``device_type`` (``"cpu"`` or ``"cuda"``).

    CUDA: :func:`torch.cuda.is_bf16_supported` (without emulation). CPU: the ``avx512_bf16`` or
    ``amx_bf16`` flag in ``/proc/cpuinfo`` (other systems: False, the safe answer).
    """
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return bool(cpu_flags() & NATIVE_BF16_CPU_FLAGS)


def warn_if_emulated_bf16(what: str, device_type: str = "cpu") -> None:
    """One warning that ``what`` (a flag and value, e.g. ``"--mixed-precision bf16"``) will be slow."""
    if not native_bf16(device_type):
        warnings.warn(f"{what}: this {device_type.upper()} has no native bfloat16 (no avx512_bf16/AMX), so "
                      "PyTorch emulates it, which is much slower than fp32 here (see hanorec/hardware.py); "
                      "use fp32 on this machine", RuntimeWarning, stacklevel=3)


def describe_machine(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """One line for reports: CPU model, cores, GPU if any, whether bf16 is native, torch version."""
    import os

    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    model = next((line.partition(":")[2].strip() for line in text.splitlines()
                  if line.partition(":")[0].strip() == "model name"), "unknown CPU")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    bf16 = "native bf16" if native_bf16("cuda" if torch.cuda.is_available() else "cpu") else "bf16 emulated"
    return f"{model}, {os.cpu_count()} cores, {gpu}, {bf16}, torch {torch.__version__}"
