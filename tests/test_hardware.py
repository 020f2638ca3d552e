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


def test_native_bf16_on_this_cpu_agrees_with_its_flags() -> None:
    expected = bool(hardware.cpu_flags() & hardware.NATIVE_BF16_CPU_FLAGS)
    assert hardware.native_bf16("cpu") is expected


@pytest.mark.parametrize("native", [False, True])
def test_warning_only_where_bf16_is_emulated(native: bool, monkeypatch) -> None:
    monkeypatch.setattr(hardware, "native_bf16", lambda device_type="cpu": native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hardware.warn_if_emulated_bf16("--mixed-precision bf16")
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert (len(messages) == 0) if native else (len(messages) == 1 and "--mixed-precision bf16" in messages[0])


def test_describe_machine_names_the_cpu_and_the_bf16_answer(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "cpuinfo").write_text(EPYC_AVX2)
    monkeypatch.setattr(hardware, "native_bf16", lambda device_type="cpu": False)
    line = hardware.describe_machine(tmp_path / "cpuinfo")
    assert line.startswith("AMD EPYC, ") and "bf16 emulated" in line and "torch " in line
