"""The package's import graph keeps its shape (docs/architecture.md, "Who may import whom").

Every module of ``hanorec/`` is parsed with :mod:`ast` (nothing is imported) and every import
of a ``hanorec`` module is an edge, the imports inside functions included: a lazy import is
still a dependency. An *entry module* is one with a top-level ``if __name__ == "__main__":``
block (``python -m hanorec.sft``, ``hanorec.report.__main__``, ...); every other module is a
library module. The rules:

* no cycle among the modules;
* no library module imports an entry module;
* no entry module imports another entry module;
* the lower layers stay below the rest (``hanorec.losses`` needs torch only, ``metrics`` and
  ``stats`` need no other module, ``data`` knows no model, no stage and no loop, the loop
  knows no stage, the TRL integration needs only the losses and the shared forward);
* every entry point answers ``--help`` with exit status 0.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hanorec"

#: Lower layers and the only hanorec modules they may import (by prefix).
LAYERS: dict[str, tuple[str, ...]] = {
    "hanorec.losses": ("hanorec.losses",),
    "hanorec.metrics": (),
    "hanorec.stats": ("hanorec.metrics",),
    "hanorec.cli": (),
    "hanorec.config": ("hanorec.cli",),
    "hanorec.data": ("hanorec.data", "hanorec.config", "hanorec.cli"),
    "hanorec.baselines.sasrec": (),
    "hanorec.baselines.popularity": (),
    "hanorec.checkpoints": (),
    "hanorec.training": ("hanorec.checkpoints", "hanorec.config", "hanorec.cli"),
    "hanorec.report": ("hanorec.report", "hanorec.cli"),
    "hanorec.integrations": ("hanorec.losses", "hanorec.forward"),
}


def module_name(path: Path) -> str:
    """``hanorec/data/__init__.py`` → ``hanorec.data``; ``hanorec/sft.py`` → ``hanorec.sft``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _known(name: str) -> str:
    """The module ``name`` refers to: itself, or the package holding the imported attribute."""
    while name not in MODULES and "." in name:
        name = name.rpartition(".")[0]
    return name


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The absolute module of a ``from … import`` (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


def imports(module: str) -> set[str]:
    """The hanorec modules ``module`` imports anywhere in its source."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {_known(a.name) for a in node.names if a.name.split(".")[0] == "hanorec"}
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node)
            if source.split(".")[0] != "hanorec":
                continue
            for alias in node.names:  # `from hanorec.data import known` imports a module
                full = f"{source}.{alias.name}"
                found.add(full if full in MODULES else _known(source))
    return found - {module, "hanorec"}


def is_entry(module: str) -> bool:
    """True when the module ends in a top-level ``if __name__ == "__main__":`` block."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
               for node in tree.body)


GRAPH: dict[str, set[str]] = {module: imports(module) for module in MODULES}
ENTRIES: list[str] = sorted(m for m in MODULES if is_entry(m))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _edges(sources: Iterator[str] | list[str], targets: set[str]) -> list[str]:
    return [f"{a} -> {b}" for a in sources for b in sorted(GRAPH[a] & targets)]


def test_the_walk_sees_the_package():
    """A sanity check of the walker: known modules, entry points and edges are found."""
    assert {"hanorec.sft", "hanorec.losses.hars", "hanorec.report",
            "hanorec.data.known"} <= set(MODULES)
    assert {"hanorec.sft", "hanorec.dpo", "hanorec.report.__main__",
            "hanorec.data.__main__"} <= set(ENTRIES)
    assert "hanorec.training" in GRAPH["hanorec.sft"]
    assert "hanorec.losses.hars" in GRAPH["hanorec.losses"]


def test_no_import_cycle():
    assert cycles(GRAPH) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_library_module_imports_an_entry_module():
    libraries = [m for m in MODULES if m not in ENTRIES]
    assert _edges(libraries, set(ENTRIES)) == []


def test_no_entry_module_imports_another():
    assert _edges(ENTRIES, set(ENTRIES)) == []


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_lower_layers_import_only_what_they_may(layer):
    members = [m for m in MODULES if m == layer or m.startswith(layer + ".")]
    allowed = LAYERS[layer]
    bad = [f"{m} -> {dep}" for m in members for dep in sorted(GRAPH[m])
           if not any(dep == a or dep.startswith(a + ".") for a in allowed)]
    assert bad == []


def command(entry: str) -> str:
    """The ``python -m`` name of an entry module (a package's ``__main__`` runs as the package)."""
    return entry.removesuffix(".__main__")


def test_every_entry_point_answers_help_with_exit_0():
    """``python -m <entry> --help`` (the subcommands' help as well) exits 0, all in one process."""
    subcommands = {"hanorec.bpo": ["generate"], "hanorec.evaluate": ["compare"],
                   "hanorec.data": ["prepare"], "hanorec.data.mmsafe": ["convert"],
                   "hanorec.models": ["build"]}
    argvs = [[command(e), "--help"] for e in ENTRIES]
    argvs += [[name, *words, "--help"] for name, words in subcommands.items()]
    driver = (
        "import contextlib, io, json, runpy, sys\n"
        "import hanorec.cli\n"
        "hanorec.cli.hard_exit = sys.exit  # a user error must not end the driver\n"
        "codes = {}\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    sys.argv = list(argv)\n"
        "    with contextlib.redirect_stdout(io.StringIO()), "
        "contextlib.redirect_stderr(io.StringIO()):\n"
        "        try:\n"
        "            runpy.run_module(argv[0], run_name='__main__', alter_sys=True)\n"
        "            code = 0\n"
        "        except SystemExit as exit:\n"
        "            code = exit.code if isinstance(exit.code, int) else int(exit.code is not "
        "None)\n"
        "    codes[' '.join(argv)] = code\n"
        "print(json.dumps(codes))\n"
    )
    proc = subprocess.run([sys.executable, "-c", driver, json.dumps(argvs)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(codes) == len(argvs)
    assert {argv: code for argv, code in codes.items() if code != 0} == {}
