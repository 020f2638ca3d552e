"""hanorec.hardware: native-bf16 detection from real cpuinfo text, and the one warning."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from hanorec import hardware

EPYC_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 avx avx2 fma bmi2
"""
XEON_BF16 = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile
"""


def test_cpu_flags_reads_the_first_flags_line(tmp_path: Path) -> None:
    """The AVX2 EPYC lists avx2 but no bf16 flag; the Xeon lists avx512_bf16; a missing file
    gives no flags (the safe answer: bf16 treated as emulated)."""
    (tmp_path / "epyc").write_text(EPYC_AVX2)
    (tmp_path / "xeon").write_text(XEON_BF16)
    epyc, xeon = hardware.cpu_flags(tmp_path / "epyc"), hardware.cpu_flags(tmp_path / "xeon")
    assert "avx2" in epyc and not epyc & hardware.NATIVE_BF16_CPU_FLAGS
    assert xeon & hardware.NATIVE_BF16_CPU_FLAGS == {"avx512_bf16"}
    assert hardware.cpu_flags(tmp_path / "absent") == frozenset()


def test_native_bf16_follows_a_measurement_not_the_flags() -> None:
    """The answer is the probe's (fp32 time / bf16 time > 1), whatever the flags say; timing the
    same matmuls again here gives the same side of 1 unless the two are within 30%."""
    speedup = hardware.bf16_speedup("cpu")
    assert speedup > 0 and hardware.native_bf16("cpu") is (speedup > 1.0)
    fp32 = hardware._matmul_seconds(hardware.torch.float32, "cpu", 256, 3)
    bf16 = hardware._matmul_seconds(hardware.torch.bfloat16, "cpu", 256, 3)
    if not 0.7 < fp32 / bf16 < 1.3:
        assert (fp32 / bf16 > 1.0) is hardware.native_bf16("cpu")


@pytest.mark.parametrize("native", [False, True])
def test_warning_only_where_bf16_is_emulated(native: bool, monkeypatch) -> None:
    monkeypatch.setattr(hardware, "native_bf16", lambda device_type="cpu": native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hardware.warn_if_emulated_bf16("--mixed-precision bf16")
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert (len(messages) == 0) if native else (len(messages) == 1
                                                and "--mixed-precision bf16" in messages[0])


def test_describe_machine_names_the_cpu_and_the_bf16_answer(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "cpuinfo").write_text(EPYC_AVX2)
    monkeypatch.setattr(hardware, "bf16_speedup", lambda device_type="cpu": 0.02)
    line = hardware.describe_machine(tmp_path / "cpuinfo")
    assert (
        line.startswith("AMD EPYC, ")
        and "bf16 0.02× fp32 speed (measured)" in line
        and "torch " in line
    )
