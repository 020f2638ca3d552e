"""A small local `--config` + flat-flag parser for `DataConfig` (to be replaced by
``hanorec.config``'s shared one)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from hanorec.data.config import DataConfig


def _convert(text: str, hint: Any, flag: str) -> Any:
    args = typing.get_args(hint)
    if type(None) in args:
        if text.lower() in ("none", "null", ""):
            return None
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint)
    if origin is list:
        inner = typing.get_args(hint)[0]
        return [_convert(part.strip(), inner, flag) for part in text.split(",") if part.strip()]
    if hint is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{flag}: expected true/false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    try:
        return hint(text)
    except (TypeError, ValueError):
        raise ValueError(f"{flag}: cannot read {text!r} as {getattr(hint, '__name__', hint)}") \
            from None


def load_data_section(path: str | Path) -> dict[str, Any]:
    """The ``data:`` mapping of a recipe YAML (empty when absent)."""
    loaded = yaml.safe_load(Path(path).read_text()) or {}
    section = loaded.get("data", {}) or {}
    if not isinstance(section, dict):
        raise ValueError(f"{path}: 'data' must be a mapping")
    return section


def parse_data_cli(argv: list[str]) -> DataConfig:
    """Build a `DataConfig` from ``--config X.yaml`` and flat ``--field-name value`` flags.

    Flags override the YAML; unknown fields (in the YAML section or as flags) raise.
    """
    hints = typing.get_type_hints(DataConfig)
    names = {f.name for f in dataclasses.fields(DataConfig)}
    values: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    index = 0
    while index < len(argv):
        flag = argv[index]
        if not flag.startswith("--"):
            raise ValueError(f"unexpected argument {flag!r}")
        key, _, inline = flag[2:].partition("=")
        if not inline:
            if index + 1 >= len(argv):
                raise ValueError(f"{flag} needs a value")
            inline, index = argv[index + 1], index + 1
        index += 1
        if key == "config":
            values.update(load_data_section(inline))
            continue
        name = key.replace("-", "_")
        if name not in names:
            raise ValueError(f"unknown flag {flag}; DataConfig fields: {sorted(names)}")
        overrides[name] = _convert(inline, hints[name], flag)
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown data fields in config: {sorted(unknown)}")
    values.update(overrides)
    return DataConfig(**values)


def help_text() -> str:
    """Every DataConfig field with its default and help."""
    lines = []
    for item in dataclasses.fields(DataConfig):
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        lines.append(f"  --{item.name.replace('_', '-')} (default {default!r})\n"
                     f"      {item.metadata.get('help', '')}")
    return "\n".join(lines)


