"""Every shipped recipe parses for every entry point that reads it, and every entry point's
flags are unique and documented (`--help` lists them all with their help text)."""

from __future__ import annotations

import dataclasses
import importlib
import typing
from pathlib import Path

import pytest

from hanorec import config as recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "configs").glob("*.yaml"))
ENTRY_POINTS = {"hanorec.sft": "SFTRun", "hanorec.dpo": "DPORun"}
SUBCOMMAND = {"hanorec.bpo": ["generate"]}  # entry points whose flags live under a subcommand
# Sections several stages read, all optional (their defaults apply); a stage's own section
# (sft, dpo, ...) decides whether a recipe is meant for it.
SHARED_SECTIONS = {"data", "model", "prompt", "collab"}
for optional, name in (("hanorec.evaluate", "EvalRun"), ("hanorec.recpo", "RecPORun"),
                       ("hanorec.bpo", "BPORun")):
    if (ROOT / (optional.replace(".", "/") + ".py")).exists():
        ENTRY_POINTS[optional] = name


def _run_class(module: str) -> type:
    return getattr(importlib.import_module(module), ENTRY_POINTS[module])


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_flags_are_unique_and_all_have_help(module, capsys):
    run_cls = _run_class(module)
    leaves = recipe.leaf_fields(run_cls)  # raises on a duplicate flat name
    missing = [name for name, (_, fld, _) in leaves.items() if not fld.metadata.get("help")]
    assert not missing, f"{module}: fields without help text: {missing}"
    with pytest.raises(SystemExit):
        importlib.import_module(module).main([*SUBCOMMAND.get(module, []), "--help"])
    out = capsys.readouterr().out
    assert all("--" + name.replace("_", "-") in out for name in leaves)


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_parses_for_every_entry_point_that_reads_it(path):
    raw = recipe.load_yaml(path)
    parsed = 0
    for module in ENTRY_POINTS:
        run_cls = _run_class(module)
        sections = {f.name for f in dataclasses.fields(run_cls)
                    if dataclasses.is_dataclass(typing.get_type_hints(run_cls)[f.name])}
        if sections - SHARED_SECTIONS <= set(raw):
            recipe.from_yaml_dict(run_cls, raw, str(path))
            parsed += 1
    assert parsed, f"{path.name} is read by no entry point"
