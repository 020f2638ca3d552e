"""YAML recipes mapped onto typed dataclasses, with flat command-line overrides.

A recipe is one YAML file with a section per concern (``data``, ``model``, ``sft``, ``dpo``,
``eval``, ...) plus a few top-level scalars (``run_dir``, ``seed``). An entry point declares the
sections it reads as a top-level dataclass whose fields are either scalars or section
dataclasses, for example::

    @dataclass
    class SFTRun:
        run_dir: str = field(default="runs/sft", metadata={"help": "..."})
        data: DataConfig = field(default_factory=DataConfig)
        sft: SFTConfig = field(default_factory=SFTConfig)

Every leaf field becomes one flat, hyphenated flag (``--noise-std 0.05``); flat names must be
unique across the sections an entry point reads (checked when the parser is built). Sections
of the YAML that the entry point does not read are ignored, so one recipe serves every stage;
unknown keys inside a section it reads are an error naming the file and the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

_NONE_WORDS = {"none", "null", "~"}
_TRUE_WORDS = {"1", "true", "yes", "on"}
_FALSE_WORDS = {"0", "false", "no", "off"}


class ConfigError(ValueError):
    """A recipe or a command-line flag is wrong; the message says where."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """Return (inner type, is_optional) for ``X | None`` / ``Optional[X]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _convert_scalar(text: str, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if str(choice) == text:
                return choice
        raise ConfigError(f"{where}: {text!r} is not one of {list(choices)}")
    if tp is bool:
        low = text.strip().lower()
        if low in _TRUE_WORDS:
            return True
        if low in _FALSE_WORDS:
            return False
        raise ConfigError(f"{where}: expected true/false, got {text!r}")
    if tp in (int, float, str):
        try:
            return tp(text)
        except ValueError as err:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {text!r}") from err
    raise ConfigError(f"{where}: unsupported field type {tp!r}")


def convert_value(value: Any, tp: Any, where: str) -> Any:
    """Coerce a YAML value or a command-line string to the field type ``tp``."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (isinstance(value, str) and optional and value.lower() in _NONE_WORDS):
        if optional:
            return None
        raise ConfigError(f"{where}: may not be null")
    origin = typing.get_origin(inner)
    if origin in (list, tuple, Sequence):
        (item_type, *_) = typing.get_args(inner) or (str,)
        if isinstance(value, str):
            value = [v for v in (p.strip() for p in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        items = [convert_value(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or inner is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if isinstance(value, str):
        return _convert_scalar(value, inner, where)
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if inner is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if typing.get_origin(inner) is typing.Literal:
        return _convert_scalar(str(value), inner, where)
    if inner in (int, float, str, bool) and not isinstance(value, inner):
        raise ConfigError(f"{where}: expected {inner.__name__}, got {value!r}")
    if inner is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected int, got {value!r}")
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


def leaf_fields(run_cls: type) -> dict[str, tuple[str | None, dataclasses.Field, Any]]:
    """Map every flat name to (section name or None, field, type); flat names must be unique."""
    leaves: dict[str, tuple[str | None, dataclasses.Field, Any]] = {}
    run_hints = _hints(run_cls)
    for top in dataclasses.fields(run_cls):
        tp = run_hints[top.name]
        owners = [(top.name, f, _hints(tp)[f.name]) for f in dataclasses.fields(tp)] if _is_section(tp) else [(None, top, tp)]
        for section, fld, ftp in owners:
            if fld.name in leaves:
                other = leaves[fld.name][0] or "top level"
                raise ConfigError(
                    f"flag {_flag(fld.name)} is defined twice ({other} and {section or 'top level'}); "
                    "field names must be unique across sections"
                )
            leaves[fld.name] = (section, fld, ftp)
    return leaves


def _section_from_mapping(cls: type[T], mapping: dict[str, Any], where: str) -> T:
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(mapping).__name__}")
    hints = _hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    kwargs = {k: convert_value(v, hints[k], f"{where}.{k}") for k, v in mapping.items()}
    return cls(**kwargs)


def from_yaml_dict(run_cls: type[T], raw: dict[str, Any], source: str = "<config>") -> T:
    """Build ``run_cls`` from a parsed recipe; sections the class does not read are ignored."""
    hints = _hints(run_cls)
    kwargs: dict[str, Any] = {}
    for top in dataclasses.fields(run_cls):
        if top.name not in raw:
            continue
        tp = hints[top.name]
        value = raw[top.name]
        if _is_section(tp):
            kwargs[top.name] = _section_from_mapping(tp, value or {}, f"{source}: {top.name}")
        else:
            kwargs[top.name] = convert_value(value, tp, f"{source}: {top.name}")
    return run_cls(**kwargs)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def _help_text(fld: dataclasses.Field, ftp: Any) -> str:
    text = fld.metadata.get("help", "")
    inner, optional = _unwrap_optional(ftp)
    if typing.get_origin(inner) is typing.Literal:
        text += f" Choices: {', '.join(map(str, typing.get_args(inner)))}."
    if typing.get_origin(inner) in (list, tuple):
        text += " Comma-separated."
    default = fld.default if fld.default is not dataclasses.MISSING else (
        fld.default_factory() if fld.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
    )
    if _is_section(default.__class__):
        return text
    return f"{text} (default: {default})".strip().replace("%", "%%")


def build_parser(run_cls: type, *, prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with ``--config`` and one flat flag per leaf field, grouped by section."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML recipe (see configs/); flags override it.")
    groups: dict[str | None, Any] = {}
    for name, (section, fld, ftp) in leaf_fields(run_cls).items():
        if section not in groups:
            groups[section] = parser.add_argument_group(f"{section} section" if section else "run")
        groups[section].add_argument(
            _flag(name), dest=name, default=None, metavar=name.upper(), help=_help_text(fld, ftp)
        )
    return parser


def parse(run_cls: type[T], argv: Sequence[str] | None = None, *, prog: str, description: str) -> T:
    """Parse ``--config`` and flat overrides into a validated ``run_cls`` instance."""
    parser = build_parser(run_cls, prog=prog, description=description)
    args, unknown = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if unknown:
        flags = [u for u in unknown if u.startswith("--")] or unknown
        raise ConfigError(f"unknown flag {flags[0]} (see {prog} --help)")
    raw = load_yaml(args.config) if args.config else {}
    cfg = from_yaml_dict(run_cls, raw, args.config or "<defaults>")
    overrides = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: T, overrides: dict[str, Any]) -> T:
    """Return a copy of ``cfg`` with flat ``{field_name: value}`` overrides applied and validated."""
    leaves = leaf_fields(type(cfg))
    changes: dict[str | None, dict[str, Any]] = {}
    for name, value in overrides.items():
        if name not in leaves:
            raise ConfigError(f"unknown option {_flag(name)}")
        section, _fld, ftp = leaves[name]
        changes.setdefault(section, {})[name] = convert_value(value, ftp, _flag(name))
    top_changes = dict(changes.pop(None, {}))
    for section, values in changes.items():
        top_changes[section] = dataclasses.replace(getattr(cfg, section), **values)
    return dataclasses.replace(cfg, **top_changes) if top_changes else cfg  # type: ignore[type-var]


def to_dict(cfg: Any) -> dict[str, Any]:
    """The recipe as plain YAML-able data (lists instead of tuples)."""
    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def save_yaml(cfg: Any, path: str | Path) -> None:
    """Write the resolved recipe next to a run's outputs so the run can be repeated."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
