"""What the machine runs fast: is bfloat16 faster than float32 here? Measured, not guessed.

bf16 autocast is a speed lever only where bf16 matmuls are fast. CPU flags do not tell: a 2-core
AMD EPYC with AVX2 only emulates bf16 (a 512² matmul 47× slower than fp32; one smollm2-llava SFT
step ~150 s against 5.8 s), a 2-core Xeon that reports ``avx512_bf16`` ran a 2048² bf16 matmul
at ~74 GFLOPS against ~120 in fp32 (an SFT step 1.7× slower), and another machine of the same
kind ran bf16 ~3× faster than fp32. So :func:`bf16_speedup` times one small matmul in both
precisions (under half a second, once per process) and :func:`native_bf16` answers from that.
Stages warn once when asked for bf16 where it measured slower, ``mixed_precision: auto``
resolves to bf16 only where it measured faster (:func:`resolve_precision`), and the quality
benchmark's CPU budget only turns bf16 on where it measured faster. The flags are still read
for reports, never for decisions.
"""

from __future__ import annotations

import functools
import math
import time
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


def _matmul_seconds(dtype: torch.dtype, device: str, size: int, repeats: int) -> float:
    """Best of ``repeats`` timings of one ``size``² matmul in ``dtype`` (after one warm-up)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for attempt in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        if attempt:  # the first run warms the kernels up
            best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def bf16_speedup(device_type: str = "cpu", size: int = 256, repeats: int = 5) -> float:
    """float32 time ÷ bfloat16 time of a ``size``² matmul on ``device_type`` (> 1: bf16 faster).

    The two precisions are timed in alternation, ``repeats`` times each after a warm-up, and
    the best of each is compared, so that a busy moment of the machine slows both rather than
    one (a single pair of millisecond timings once reported bf16 at 0.02× on a machine where
    it runs 2.7× fp32). About 2 s where bf16 is emulated, milliseconds elsewhere; 0 on a CUDA
    device without bf16.
    """
    if device_type == "cuda":
        if not (torch.cuda.is_available()
                and torch.cuda.is_bf16_supported(including_emulation=False)):
            return 0.0
        size = max(size, 2048)  # small GPU matmuls measure launch overhead, not arithmetic
    best = {torch.float32: math.inf, torch.bfloat16: math.inf}
    for _ in range(repeats):
        for dtype in best:
            best[dtype] = min(best[dtype], _matmul_seconds(dtype, device_type, size, 1))
    return best[torch.float32] / best[torch.bfloat16]


@functools.cache
def native_bf16(device_type: str = "cpu") -> bool:
    """True when bf16 matmuls measured faster than fp32 on ``device_type`` (``bf16_speedup``)."""
    return bf16_speedup(device_type) > 1.0


def resolve_precision(requested: str, device_type: str = "cpu") -> tuple[str, float]:
    """The mixed precision a stage runs with, and the measured bf16 speed ratio behind it.

    ``"auto"`` becomes ``"bf16"`` where :func:`bf16_speedup` measures bf16 matmuls faster than
    fp32 on ``device_type`` and ``"no"`` otherwise (CPU flags are not consulted: they claim
    bf16 on machines where it runs slower). Explicit values pass through unchanged; the ratio
    is measured for ``"bf16"`` too (for the log line) and is NaN for ``"no"`` and ``"fp16"``.

    Returns:
        ``(precision, fp32 time ÷ bf16 time)``, the precision being one accelerate accepts.
    """
    if requested not in ("auto", "bf16"):
        return requested, math.nan
    ratio = bf16_speedup(device_type)
    if requested == "bf16":
        return "bf16", ratio
    return ("bf16" if ratio > 1.0 else "no"), ratio


def precision_line(requested: str, resolved: str, ratio: float) -> str:
    """The run log's line about precision, e.g.
    ``precision: bf16 autocast (auto; bf16 matmul 2.40x fp32, measured)``."""
    label = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}.get(resolved,
                                                                                 resolved)
    measured = "" if math.isnan(ratio) else f"; bf16 matmul {ratio:.2f}x fp32, measured"
    return f"precision: {label} ({requested}{measured})"


def warn_if_emulated_bf16(what: str, device_type: str = "cpu") -> None:
    """One warning that ``what`` (a flag and value: ``"--mixed-precision bf16"``) will be slow."""
    if not native_bf16(device_type):
        warnings.warn(f"{what}: bfloat16 matmuls measured slower than float32 on this "
                      f"{device_type.upper()} "
                      "(emulated or slow bf16; see hanorec/hardware.py); use fp32 on this machine",
                      RuntimeWarning, stacklevel=3)


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
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = f"bf16 {bf16_speedup(device):.2f}× fp32 speed (measured)"
    return f"{model}, {os.cpu_count()} cores, {gpu}, {bf16}, torch {torch.__version__}"
