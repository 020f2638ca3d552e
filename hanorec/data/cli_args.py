"""The data stage's command-line flags: the ``data:`` section of a recipe, through
:mod:`hanorec.config` like every other stage (``--config X.yaml`` plus flat flags)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hanorec import config as recipe
from hanorec.data.config import DataConfig


@dataclass
class DataRun:
    """What ``python -m hanorec.data`` reads from a recipe: its ``data:`` section."""

    data: DataConfig = field(default_factory=DataConfig)


def parse_data_cli(argv: list[str]) -> DataConfig:
    """Build a `DataConfig` from ``--config X.yaml`` and flat ``--field-name value`` flags.

    Flags override the YAML; unknown keys or flags raise a ``ValueError`` that names them.
    """
    return recipe.parse(DataRun, argv, prog="python -m hanorec.data", description="").data


def help_text() -> str:
    """Every DataConfig flag with its help text, as ``--help`` prints it."""
    parser = recipe.build_parser(DataRun, prog="python -m hanorec.data", description="")
    return parser.format_help().split("data section:", 1)[-1]
