"""hanorec.hardware: native-bf16 detection from real cpuinfo text, and the one warning."""

from __future__ import annotations

import math
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
BF16_FLAGS = frozenset({"fpu", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})


def test_cpu_flags_reads_the_first_flags_line(tmp_path: Path) -> None:
    """The AVX2 EPYC lists avx2 but no bf16 flag; the Xeon lists avx512_bf16; a missing file
    gives no flags (the safe answer: bf16 treated as emulated)."""
    (tmp_path / "epyc").write_text(EPYC_AVX2)
    (tmp_path / "xeon").write_text(XEON_BF16)
    epyc, xeon = hardware.cpu_flags(tmp_path / "epyc"), hardware.cpu_flags(tmp_path / "xeon")
    assert "avx2" in epyc and not epyc & hardware.NATIVE_BF16_CPU_FLAGS
    assert xeon & hardware.NATIVE_BF16_CPU_FLAGS == {"avx512_bf16"}
    assert hardware.cpu_flags(tmp_path / "absent") == frozenset()


def test_one_busy_moment_does_not_decide_the_ratio(monkeypatch) -> None:
    """The probe alternates fp32 and bf16 and keeps the best of each: scripted timings where
    the machine is busy (×50) during the first bf16 timing only give fp32 2 ms ÷ bf16 1 ms = 2,
    not the 0.04 a single pair of timings would have reported."""
    calls: list[object] = []

    def scripted(dtype, device, size, repeats):
        calls.append(dtype)
        busy = 50.0 if calls.count(dtype) == 1 and dtype == hardware.torch.bfloat16 else 1.0
        return (2e-3 if dtype == hardware.torch.float32 else 1e-3) * busy

    monkeypatch.setattr(hardware, "_matmul_seconds", scripted)
    assert hardware.bf16_speedup.__wrapped__("cpu", repeats=5) == 2.0
    assert calls[:4] == [hardware.torch.float32, hardware.torch.bfloat16] * 2  # alternated


def test_native_bf16_follows_a_measurement_not_the_flags(monkeypatch) -> None:
    """bf16_speedup is fp32 time ÷ bf16 time of the probe matmul, and native_bf16 is that ratio
    above 1, whatever the flags say. The probe's clock is scripted here (no timing in a unit
    test); one real probe only has to return a positive ratio."""
    assert hardware.bf16_speedup("cpu") > 0
    for fp32, bf16 in ((1.0, 4.0), (3.0, 1.0)):
        monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": BF16_FLAGS)
        seconds = {hardware.torch.float32: fp32, hardware.torch.bfloat16: bf16}
        monkeypatch.setattr(hardware, "_matmul_seconds",
                            lambda dtype, device, size, repeats, s=seconds: s[dtype])
        ratio = hardware.bf16_speedup.__wrapped__("cpu")  # past the per-process cache
        assert ratio == fp32 / bf16
        monkeypatch.setattr(hardware, "bf16_speedup", lambda device_type="cpu", r=ratio: r)
        assert hardware.native_bf16.__wrapped__("cpu") is (fp32 > bf16)
        monkeypatch.undo()


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


def test_auto_precision_follows_the_measurement_not_the_cpu_flags(monkeypatch) -> None:
    """The flags claim native bf16 but bf16 measured 2× slower: auto stays fp32 ("no"). With no
    flags at all but bf16 measured 2.4× faster, auto becomes bf16; the ratio is the measured
    one, on the device asked for."""
    asked: list[str] = []

    def measured(ratio: float):
        def speedup(device_type: str = "cpu") -> float:
            asked.append(device_type)
            return ratio
        return speedup

    monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": BF16_FLAGS)
    monkeypatch.setattr(hardware, "bf16_speedup", measured(0.5))
    assert hardware.resolve_precision("auto", "cpu") == ("no", 0.5)

    monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": frozenset())
    monkeypatch.setattr(hardware, "bf16_speedup", measured(2.4))
    assert hardware.resolve_precision("auto", "cuda") == ("bf16", 2.4)
    assert asked == ["cpu", "cuda"]


@pytest.mark.parametrize("ratio", [0.5, 2.4])
def test_explicit_precisions_pass_through(ratio: float, monkeypatch) -> None:
    """An explicit choice is kept whatever bf16 measures (bf16 where slow only warns); "no" and
    "fp16" do not measure at all."""
    calls: list[str] = []

    def speedup(device_type: str = "cpu") -> float:
        calls.append(device_type)
        return ratio

    monkeypatch.setattr(hardware, "bf16_speedup", speedup)
    no, no_ratio = hardware.resolve_precision("no")
    fp16, fp16_ratio = hardware.resolve_precision("fp16")
    assert (no, fp16) == ("no", "fp16") and math.isnan(no_ratio) and math.isnan(fp16_ratio)
    assert not calls
    assert hardware.resolve_precision("bf16") == ("bf16", ratio)


def test_precision_line_names_the_choice_and_the_measured_ratio() -> None:
    assert hardware.precision_line("auto", "bf16", 2.4) == (
        "precision: bf16 autocast (auto; bf16 matmul 2.40x fp32, measured)")
    assert hardware.precision_line("auto", "no", 0.02) == (
        "precision: fp32 (auto; bf16 matmul 0.02x fp32, measured)")
    assert hardware.precision_line("no", "no", math.nan) == "precision: fp32 (no)"


@pytest.fixture
def fresh_accelerator_state():
    """start_stage builds an Accelerator in a precision the process may not have used yet;
    accelerate keeps one state per process, so reset it around the test."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize(("ratio", "expected"), [(0.5, "no"), (2.4, "bf16")])
def test_start_stage_resolves_auto_once_and_records_it(ratio: float, expected: str, tmp_path,
                                                      monkeypatch, capsys,
                                                      fresh_accelerator_state) -> None:
    """mixed_precision auto reaches the Accelerator as the measured choice, the run log says
    which and why, and the stage's config.yaml records the resolved value, not "auto"."""
    from dataclasses import dataclass, field

    import yaml

    from hanorec.runtime import start_stage
    from hanorec.training import TrainConfig

    @dataclass
    class Run:
        run_dir: str = str(tmp_path)
        seed: int = 0
        sft: TrainConfig = field(default_factory=lambda: TrainConfig(mixed_precision="auto"))

    monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": BF16_FLAGS)
    monkeypatch.setattr(hardware, "bf16_speedup", lambda device_type="cpu": ratio)
    run = Run()
    accelerator, out_dir = start_stage(run, "sft", run.sft)
    assert accelerator.mixed_precision == expected and run.sft.mixed_precision == expected
    saved = yaml.safe_load((out_dir / "config.yaml").read_text())
    assert saved["sft"]["mixed_precision"] == expected
    assert f"bf16 matmul {ratio:.2f}x fp32, measured" in capsys.readouterr().out
