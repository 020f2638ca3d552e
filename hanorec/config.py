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
of the YAML that the entry point does not read are skipped, so one recipe serves every stage,
but every top-level key must be known to the project (:data:`RECIPE_KEYS`): a misspelled
section (``dat:``) is an error naming it, not a silently ignored block. Unknown keys inside a
section the entry point reads are an error naming the file and the key; out-of-range values
(:class:`FieldError`, raised by a section's ``__post_init__``) name the section and the key.
Flags must be spelled in full (no prefix matching).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from hanorec.cli import ArgumentParser, short_repr

T = TypeVar("T")

#: Every top-level key of a recipe that some entry point reads: its sections and scalars. A run
#: dataclass adds its own top-level fields when it parses a recipe; a section of an entry point
#: that a lighter command does not import (``python -m hanorec.data`` never imports the
#: trainers) must be listed here, one line per new section.
RECIPE_KEYS: set[str] = {
    "run_dir", "seed",                       # scalars of every run
    "data", "model", "prompt",               # shared sections
    "sft", "dpo", "eval", "bpo", "recpo",    # one section per stage
    # collaborative item tokens and ranking head (hanorec.collab)
    "collab",
}

#: Largest number of values a recipe may expand to (YAML anchors and aliases included).
MAX_RECIPE_VALUES = 100_000

_NONE_WORDS = {"none", "null", "~"}
_TRUE_WORDS = {"1", "true", "yes", "on"}
_FALSE_WORDS = {"0", "false", "no", "off"}


class ConfigError(ValueError):
    """A recipe or a command-line flag is wrong; the message says where."""


class FieldError(ValueError):
    """A section field holds a value out of its range; the recipe layer adds the file and key.

    Args:
        owner: The section class (``DataConfig``), the prefix of the plain message.
        field: The field name (the recipe key; ``--field-name`` as a flag).
        message: What is wrong and what to do.
    """

    def __init__(self, owner: str, field: str, message: str) -> None:
        super().__init__(f"{owner}: {field}: {message}")
        self.owner, self.field, self.message = owner, field, message


def register_recipe_keys(*names: str) -> None:
    """Declare top-level recipe keys (sections or scalars) read by some entry point."""
    RECIPE_KEYS.update(names)


def _suggest(name: str, known: Sequence[str] | set[str]) -> str:
    close = difflib.get_close_matches(str(name), sorted(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


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
        raise ConfigError(f"{where}: {short_repr(text)} is not one of {list(choices)}")
    if tp is bool:
        low = text.strip().lower()
        if low in _TRUE_WORDS:
            return True
        if low in _FALSE_WORDS:
            return False
        raise ConfigError(f"{where}: expected true/false, got {short_repr(text)}")
    if tp in (int, float, str):
        try:
            return _finite(tp(text), where)
        except ValueError as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(f"{where}: expected {tp.__name__}, got {short_repr(text)}") from None
    raise ConfigError(f"{where}: unsupported field type {tp!r}")


def _finite(value: Any, where: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {value!r}")
    return value


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
            raise ConfigError(f"{where}: expected a list, got {short_repr(value)}")
        items = [convert_value(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or inner is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {short_repr(value)}")
        return dict(value)
    if isinstance(value, str):
        return _convert_scalar(value, inner, where)
    if inner is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return _finite(float(value), where)
        except OverflowError:
            raise ConfigError(
                f"{where}: must be a finite number, got {short_repr(value)}"
            ) from None
    if inner is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if typing.get_origin(inner) is typing.Literal:
        return _convert_scalar(str(value), inner, where)
    if inner in (int, float, str, bool) and not isinstance(value, inner):
        raise ConfigError(f"{where}: expected {inner.__name__}, got {short_repr(value)}")
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
        owners = [(top.name, f, _hints(tp)[f.name])
                  for f in dataclasses.fields(tp)] if _is_section(tp) else [(None, top, tp)]
        for section, fld, ftp in owners:
            if fld.name in leaves:
                other = leaves[fld.name][0] or "top level"
                raise ConfigError(
                    f"flag {_flag(fld.name)} is defined twice ({other} and "
                    f"{section or 'top level'}); "
                    "field names must be unique across sections"
                )
            leaves[fld.name] = (section, fld, ftp)
    return leaves


def _section_from_mapping(cls: type[T], mapping: dict[str, Any], where: str) -> T:
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(mapping).__name__}")
    hints = _hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(mapping) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}{_suggest(unknown[0], known)}; "
                          f"known keys: {sorted(known)}")
    kwargs = {k: convert_value(v, hints[k], f"{where}.{k}") for k, v in mapping.items()}
    try:
        return cls(**kwargs)
    except FieldError as err:
        raise ConfigError(f"{where}.{err.field}: {err.message}") from None
    except ValueError as err:  # a section's own check: the message names the field
        raise ConfigError(f"{where}: {err}") from None


def is_project_run(run_cls: type) -> bool:
    """True for the run dataclasses of hanorec's own entry points (they share :data:`RECIPE_KEYS`),
    also when their module runs as ``__main__`` (``python -m hanorec.sft``)."""
    module = sys.modules.get(run_cls.__module__)
    spec = getattr(module, "__spec__", None)
    name = spec.name if spec is not None else run_cls.__module__
    return name.split(".")[0] == "hanorec"


def check_top_level(raw: dict[str, Any], known: set[str], source: str) -> None:
    """Refuse top-level keys no entry point reads, naming them (and their line when known).

    Raises:
        ConfigError: ``<file>, line N: unknown section 'dat' (did you mean 'data'?)``.
    """
    unknown = [str(key) for key in raw if key not in known]
    if not unknown:
        return
    lines = getattr(raw, "lines", {})
    where = source + (f", line {lines[unknown[0]]}" if unknown[0] in lines else "")
    names = ", ".join(repr(name) for name in unknown)
    raise ConfigError(f"{where}: unknown section(s) {names}{_suggest(unknown[0], known)}; a "
                      f"recipe's top-level keys are {sorted(known)}")


def from_yaml_dict(run_cls: type[T], raw: dict[str, Any], source: str = "<config>", *,
                   strict: bool | None = None) -> T:
    """Build ``run_cls`` from a parsed recipe.

    Sections the class does not read are skipped, but with ``strict`` (the default for the
    project's own run classes, :func:`is_project_run`) every top-level key must be in
    :data:`RECIPE_KEYS` or be a field of ``run_cls``.

    Raises:
        ConfigError: An unknown section or key, a wrong type or an out-of-range value; the
            message names the file and the key.
    """
    hints = _hints(run_cls)
    own = {f.name for f in dataclasses.fields(run_cls)}
    if strict is None:
        strict = is_project_run(run_cls)
    if strict:
        register_recipe_keys(*own)
        check_top_level(raw, RECIPE_KEYS | own, source)
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
    try:
        return run_cls(**kwargs)
    except FieldError as err:
        raise ConfigError(f"{source}: {err.field}: {err.message}") from None


class Recipe(dict):
    """A parsed recipe: a plain dict plus ``lines``, the source line of each top-level key."""

    lines: dict[str, int]


def _decode_recipe(path: Path) -> str:
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}, line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); "
                          "a recipe must be a UTF-8 YAML file") from None


def _yaml_error(path: Path, err: yaml.YAMLError) -> ConfigError:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"{path}, line {mark.line + 1}" if mark is not None else str(path)
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    text = f"{context}: {problem}" if context else problem
    return ConfigError(f"{where}: invalid YAML: {text}")


def _check_nodes(root: yaml.Node, path: Path) -> None:
    """Refuse duplicated keys and recipes that expand to more than MAX_RECIPE_VALUES values."""
    stack, seen = [root], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_RECIPE_VALUES:
            raise ConfigError(f"{path}: the recipe expands to more than {MAX_RECIPE_VALUES} values "
                              "(YAML aliases repeated inside each other?); write it out plainly")
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else None
                if name is not None and name in first:
                    raise ConfigError(f"{path}, line {key.start_mark.line + 1}: key {name!r} "
                                      f"appears twice (first on line {first[name]}); YAML keeps "
                                      "only the last, so remove one")
                if name is not None:
                    first[name] = key.start_mark.line + 1
                stack.extend((key, value))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a recipe (safe YAML: tags never construct objects).

    Returns:
        A :class:`Recipe` (a dict of sections) that also knows its top-level keys' lines.

    Raises:
        ConfigError: A missing or non-UTF-8 file, invalid YAML, a duplicated key, an alias
            bomb, or a top level that is not a mapping; the message names the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    loader = yaml.SafeLoader(_decode_recipe(path))
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_nodes(node, path)
        raw = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as err:
        raise _yaml_error(path, err) from None
    except RecursionError:
        raise ConfigError(f"{path}: the recipe is nested too deeply to read") from None
    finally:
        loader.dispose()
    if raw is None:
        raise ConfigError(f"{path}: the recipe is empty; write at least a data: section (see "
                          "configs/demo.yaml)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    recipe = Recipe(raw)
    recipe.lines = {key.value: key.start_mark.line + 1 for key, _ in node.value
                    if isinstance(key, yaml.ScalarNode)} if node is not None else {}
    return recipe


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
    """An argparse parser with ``--config`` and one flat flag per leaf field, grouped by section.

    Flags must be spelled in full: ``--num-candidate`` is an unknown flag, not a prefix of
    ``--num-candidates``.
    """
    parser = ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML recipe (see configs/); flags override it.")
    parser.add_argument("--debug", action="store_true",
                        help="Show the Python traceback of an error (also: HANOREC_DEBUG=1).")
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
        known = [_flag(name) for name in leaf_fields(run_cls)] + ["--config"]
        flag = flags[0].split("=", 1)[0]
        raise ConfigError(f"unknown flag {flag}{_suggest(flag, known)} (see {prog} --help)")
    raw = load_yaml(args.config) if args.config else {}
    cfg = from_yaml_dict(run_cls, raw, args.config or "<defaults>")
    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("config", "debug") and v is not None}
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: T, overrides: dict[str, Any]) -> T:
    """A copy of ``cfg`` with flat ``{field_name: value}`` overrides applied and validated."""
    leaves = leaf_fields(type(cfg))
    changes: dict[str | None, dict[str, Any]] = {}
    for name, value in overrides.items():
        if name not in leaves:
            raise ConfigError(f"unknown option {_flag(name)}")
        section, _fld, ftp = leaves[name]
        changes.setdefault(section, {})[name] = convert_value(value, ftp, _flag(name))
    top_changes = dict(changes.pop(None, {}))
    try:
        for section, values in changes.items():
            top_changes[section] = dataclasses.replace(getattr(cfg, section), **values)
        return dataclasses.replace(cfg, **top_changes) if top_changes else cfg  # type: ignore[type-var]
    except FieldError as err:
        section = next((leaves[n][0] for n in (err.field,) if n in leaves), None)
        key = f"{section}.{err.field}" if section else err.field
        raise ConfigError(f"{_flag(err.field)} ({key}): {err.message}") from None


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
