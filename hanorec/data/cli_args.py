"""The data stage's command-line flags: the ``data:`` section of a recipe, through
:mod:`hanorec.config` like every other stage (``--config X.yaml`` plus flat flags)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hanorec import config as recipe
from hanorec.data.config import DataConfig
from hanorec.data.prompt_config import PromptConfig


@dataclass
class DataRun:
    """What ``python -m hanorec.data`` reads from a recipe: its ``data:`` section."""

    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class ShowRun:
    """What ``python -m hanorec.data show`` reads: the data and the ``prompt:`` section, so a
    row is rendered as the recipe's stages render it (read-out, item tokens, titles)."""

    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)


def parse_show_cli(argv: list[str]) -> ShowRun:
    """Like :func:`parse_data_cli`, with the ``prompt:`` section's flags as well."""
    return recipe.parse(ShowRun, argv, prog="python -m hanorec.data show", description="")


def parse_data_cli(argv: list[str]) -> DataConfig:
    """Build a `DataConfig` from ``--config X.yaml`` and flat ``--field-name value`` flags.

    Flags override the YAML; unknown keys or flags raise a ``ValueError`` that names them.
    """
    return recipe.parse(DataRun, argv, prog="python -m hanorec.data", description="").data


def help_text() -> str:
    """Every DataConfig flag with its help text, as ``--help`` prints it."""
    parser = recipe.build_parser(DataRun, prog="python -m hanorec.data", description="")
    return parser.format_help().split("data section:", 1)[-1]
