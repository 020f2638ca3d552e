"""The recipe system: YAML sections onto dataclasses, flat CLI overrides, help, errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from hanorec import config as cfgmod


@dataclass
class Alpha:
    beta: float = field(default=0.1, metadata={"help": "DPO temperature (Rafailov et al. 2023)."})
    loss: Literal["sigmoid", "ipo"] = field(default="sigmoid", metadata={"help": "Loss family."})
    ks: list[int] = field(default_factory=lambda: [1, 5], metadata={"help": "Cut-offs."})
    note: str | None = field(default=None, metadata={"help": "Optional note."})
    flag: bool = field(default=False, metadata={"help": "A switch."})


@dataclass
class Gamma:
    num_negatives: int = field(default=1, metadata={"help": "K."})


@dataclass
class Run:
    run_dir: str = field(default="runs/x", metadata={"help": "Output folder."})
    alpha: Alpha = field(default_factory=Alpha)
    gamma: Gamma = field(default_factory=Gamma)


def _write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_then_flags_override(tmp_path):
    path = _write(tmp_path,
                  "run_dir: out\nalpha:\n  beta: 0.5\n  ks: [1, 10]\ngamma:\n  num_negatives: "
                  "3\nother_stage:\n  whatever: 1\n")
    run = cfgmod.parse(Run, ["--config", path, "--beta", "0.2", "--flag", "true", "--note", "hi"],
                       prog="t", description="d")
    assert run.run_dir == "out"
    assert run.alpha.beta == 0.2 and isinstance(run.alpha.beta, float)
    assert run.alpha.ks == [1, 10]
    assert run.alpha.flag is True and run.alpha.note == "hi"
    assert run.gamma.num_negatives == 3


def test_list_and_none_from_cli():
    run = cfgmod.parse(Run, ["--ks", "1,5,20", "--note", "none"], prog="t", description="d")
    assert run.alpha.ks == [1, 5, 20] and run.alpha.note is None


def test_unknown_yaml_key_names_file_and_key(tmp_path):
    path = _write(tmp_path, "alpha:\n  betta: 0.5\n")
    with pytest.raises(cfgmod.ConfigError, match=r"r\.yaml: alpha.*betta"):
        cfgmod.parse(Run, ["--config", path], prog="t", description="d")


def test_bad_choice_and_bad_type_are_clear():
    with pytest.raises(cfgmod.ConfigError, match="--loss.*not one of"):
        cfgmod.parse(Run, ["--loss", "dpo"], prog="t", description="d")
    with pytest.raises(cfgmod.ConfigError, match="--num-negatives.*expected int"):
        cfgmod.parse(Run, ["--num-negatives", "three"], prog="t", description="d")


def test_help_lists_every_field_with_its_text(capsys):
    with pytest.raises(SystemExit):
        cfgmod.parse(Run, ["--help"], prog="t", description="d")
    out = capsys.readouterr().out
    for flag in ("--beta", "--loss", "--ks", "--note", "--flag", "--num-negatives", "--run-dir"):
        assert flag in out
    assert "Rafailov" in out and "Choices: sigmoid, ipo" in out


@dataclass
class Other:
    beta: float = 1.0


@dataclass
class Clash:
    alpha: Alpha = field(default_factory=Alpha)
    other: Other = field(default_factory=Other)


def test_duplicate_flat_names_are_rejected():
    with pytest.raises(cfgmod.ConfigError, match="--beta is defined twice"):
        cfgmod.leaf_fields(Clash)


def test_round_trip_through_yaml(tmp_path):
    run = cfgmod.parse(Run, ["--beta", "0.3", "--ks", "2,4"], prog="t", description="d")
    cfgmod.save_yaml(run, tmp_path / "saved.yaml")
    again = cfgmod.parse(Run, ["--config", str(tmp_path / "saved.yaml")], prog="t", description="d")
    assert again == run
