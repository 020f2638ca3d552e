"""docs/guide.md cannot drift from the code: every command it shows accepts every flag it uses.

Each command of the guide's ```bash blocks that starts with ``python -m hanorec.`` or
``accelerate launch`` (or ``python <script>.py`` with flags) is run with ``--help`` appended (after
its leading positional words, so a subcommand CLI such as ``python -m hanorec.evaluate compare A B``
shows the subcommand's help); it must exit 0 and its help must list every ``--flag`` the guide
passes to it. ``accelerate launch``'s own flags are checked against ``accelerate launch --help``. A
missing module is a failure, never a skip. A script the guide runs without flags (``python
examples/custom_loop.py``) must exist. All help runs share one subprocess (one torch import, not one
each).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guide.md"
PLACEHOLDER_RECIPES = {"configs/my-recipe.yaml"}
ACCELERATE = ("accelerate", "launch")

# Runs each argv (module or script.py, *args) as ``python [-m] X *args`` in this one process and
# prints {"<index>": [exit code, output]} as JSON.
_DRIVER = r"""
import contextlib, io, json, runpy, sys, warnings
warnings.simplefilter("ignore")
results = {}
for index, argv in enumerate(json.loads(sys.argv[1])):
    buffer, code = io.StringIO(), 0
    sys.argv = [argv[0], *argv[1:]]
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        try:
            if argv[0].endswith(".py"):
                runpy.run_path(argv[0], run_name="__main__")
            else:
                runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
            if not isinstance(exit.code, (int, type(None))):
                print(exit.code)
        except BaseException as error:
            code = 99
            print(f"{type(error).__name__}: {error}")
    results[str(index)] = [code, buffer.getvalue()]
print(json.dumps(results))
"""


@dataclass(frozen=True)
class Command:
    """One guide command: the help invocation it maps to and the flags it uses."""

    line: str
    module: str
    positionals: tuple[str, ...]
    flags: frozenset[str]
    launcher_flags: frozenset[str]

    @property
    def help_argv(self) -> tuple[str, ...]:
        return (self.module, *self.positionals, "--help")


def bash_lines(text: str) -> list[str]:
    """Lines of the ```bash blocks, with backslash continuations joined."""
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines += [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return lines


def parse_command(line: str) -> Command | None:
    """A :class:`Command` for ``python -m hanorec.…``, ``accelerate launch … -m hanorec.…`` or
    ``python <script>.py …`` (``module`` is then the script's path), else None."""
    tokens = shlex.split(line, comments=True)
    if len(tokens) >= 2 and tokens[0] == "python" and tokens[1].endswith(".py"):
        tokens = ["python", "-m", *tokens[1:]]
    launcher: list[str] = []
    if tuple(tokens[:2]) == ACCELERATE:
        if "-m" not in tokens:
            raise ValueError(f"docs/guide.md: `accelerate launch` without `-m module`: {line}")
        split = tokens.index("-m")
        launcher, tokens = tokens[2:split], ["python", *tokens[split:]]
    if tokens[:2] != ["python", "-m"] or len(tokens) < 3:
        return None
    if not (tokens[2].startswith("hanorec.") or tokens[2].endswith(".py")):
        return None
    args = tokens[3:]
    first_flag = next((i for i, token in enumerate(args) if token.startswith("-")), len(args))
    return Command(
        line=line,
        module=tokens[2],
        positionals=tuple(args[:first_flag]),
        flags=frozenset(_flags(args)),
        launcher_flags=frozenset(_flags(launcher)),
    )


def _flags(tokens: list[str]) -> list[str]:
    return [token.split("=", 1)[0] for token in tokens if token.startswith("--")]


def guide_commands() -> list[Command]:
    return [c for c in map(parse_command, bash_lines(GUIDE.read_text(encoding="utf-8"))) if c]


def _mentions(help_text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text) is not None


COMMANDS = guide_commands()
SCRIPTS = sorted({c.module for c in COMMANDS if c.module.endswith(".py")})
# A script run without flags may have no --help (it would just run): only its existence is checked.
HELP_RUNS = sorted({c.help_argv for c in COMMANDS if c.flags or not c.module.endswith(".py")})
ACCELERATE_HELP = ("accelerate.commands.accelerate_cli", "launch", "--help")


@pytest.fixture(scope="module")
def helps() -> dict[tuple[str, ...], tuple[int, str]]:
    """``{argv: (exit code, output)}`` for every help invocation, from one subprocess."""
    argvs = [*HELP_RUNS, ACCELERATE_HELP]
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(argvs)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = json.loads(proc.stdout.strip().splitlines()[-1])
    return {tuple(argv): (raw[str(i)][0], raw[str(i)][1]) for i, argv in enumerate(argvs)}


def test_the_guide_shows_every_stage():
    """The commands the guide must document (issue 10) are all there, parsed as commands."""
    subcommand_clis = {"hanorec.data", "hanorec.evaluate", "hanorec.bpo", "hanorec.models"}
    shown = {(c.module, c.positionals[:1] if c.module in subcommand_clis else ()) for c in COMMANDS}
    expected = {
        ("hanorec.data", ("prepare",)), ("hanorec.data", ("show",)), ("hanorec.sft", ()),
        ("hanorec.dpo", ()), ("hanorec.evaluate", ()), ("hanorec.evaluate", ("compare",)),
        ("hanorec.baselines", ()), ("hanorec.bpo", ("generate",)), ("hanorec.recpo", ()),
        ("hanorec.summary", ()), ("hanorec.report", ()),
    }
    assert expected <= shown, sorted(expected - shown)
    assert any(c.launcher_flags for c in COMMANDS)  # the multi-GPU section is parsed


def test_parse_command_reads_launcher_module_subcommand_and_flags():
    cmd = parse_command("accelerate launch --config_file c.yaml -m hanorec.evaluate compare a b "
                        "--out o --seed=1  # x")
    assert cmd == Command(
        line=cmd.line, module="hanorec.evaluate", positionals=("compare", "a", "b"),
        flags=frozenset({"--out", "--seed"}), launcher_flags=frozenset({"--config_file"}),
    )
    assert cmd.help_argv == ("hanorec.evaluate", "compare", "a", "b", "--help")
    script = parse_command("python benchmarks/quality.py --seeds 0,1")
    assert (script.module, script.flags,
            script.help_argv) == ("benchmarks/quality.py", {"--seeds"},
                                  ("benchmarks/quality.py", "--help"))
    assert parse_command("python -m pip install x") is None
    assert parse_command("make demo") is None


@pytest.mark.parametrize("argv", HELP_RUNS, ids=[" ".join(a[:2]) for a in HELP_RUNS])
def test_guide_command_flags_exist(helps, argv):
    code, text = helps[argv]
    assert code == 0, f"`python -m {' '.join(argv)}` exited {code}:\n{text[-2000:]}"
    for command in (c for c in COMMANDS if c.help_argv == argv):
        missing = sorted(f for f in command.flags if not _mentions(text, f))
        assert not missing, (f"docs/guide.md uses {missing} in `{command.line}`, unknown to "
                             f"`{argv[0]}`")


def test_guide_accelerate_flags_and_configs_exist(helps):
    code, text = helps[ACCELERATE_HELP]
    assert code == 0, text[-2000:]
    for command in COMMANDS:
        missing = sorted(f for f in command.launcher_flags
                         if not _mentions(text, f.replace("-", "_").replace("__", "--", 1)))
        assert not missing, f"`accelerate launch` does not know {missing} (in `{command.line}`)"
    guide = GUIDE.read_text(encoding="utf-8")
    shipped = {p.name for p in (ROOT / "configs" / "accelerate").glob("*.yaml")}
    assert shipped and shipped <= set(re.findall(r"([\w.-]+\.yaml)",
                                                 guide)), "an accelerate config is undocumented"


def test_scripts_run_by_the_guide_exist():
    assert "examples/custom_loop.py" in SCRIPTS
    missing = [path for path in SCRIPTS if not (ROOT / path).is_file()]
    assert not missing, f"docs/guide.md runs scripts that do not exist: {missing}"


def test_recipes_named_by_the_guide_exist():
    named = set(re.findall(r"(configs/[\w./-]+\.yaml)", GUIDE.read_text(encoding="utf-8")))
    missing = sorted(p for p in named - PLACEHOLDER_RECIPES if not (ROOT / p).is_file())
    assert not missing, f"docs/guide.md names recipes that do not exist: {missing}"
