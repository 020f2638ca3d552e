"""Bad input at the command line: every entry point answers a user error with one `error:` line
and exit status 2 (issue classes 1, 4, 8 and 9). Each test writes its own broken input.

The entry points' ``__main__`` guards run in-process (``runpy``) with the hard exit of
:mod:`hanorec.cli` swapped for ``SystemExit``, so the trainers' heavy imports are shared with the
rest of the suite; two tests start real processes (exit status, and a thread alive at exit).
"""

from __future__ import annotations

import dataclasses
import json
import os
import runpy
import subprocess
import sys
import typing
import warnings
from pathlib import Path

import pytest
import yaml

from hanorec import cli
from hanorec import config as recipe
from hanorec.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
ITEM_HEADER = "item_id:token\tmovie_title:token_seq\n"


def write_recbole(folder: Path, users: int = 4, items: int = 12, length: int = 6) -> dict:
    """A small, valid RecBole data set; returns the ``data:`` section that reads it."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [f"{u}\t{(u + s) % items + 1}\t4\t{100 + s}\n" for u in range(1, users + 1)
            for s in range(length)]
    (folder / "d.inter").write_text(INTER_HEADER + "".join(rows))
    (folder / "d.item").write_text(ITEM_HEADER + "".join(f"{k}\tFilm {k}\n"
                                                         for k in range(1, items + 1)))
    return {"dataset_format": "recbole", "interactions_path": str(folder / "d.inter"),
            "items_path": str(folder / "d.item"), "output_dir": str(folder / "prepared"),
            "num_candidates": 4, "hit3_candidates": 4, "num_negatives": 2}


def write_recipe(folder: Path, text_or_data: str | dict, name: str = "r.yaml") -> Path:
    path = folder / name
    text = text_or_data if isinstance(text_or_data, str) else yaml.safe_dump(text_or_data)
    path.write_text(text)
    return path


def run_main(module: str, argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """Run ``python -m module *argv`` in this process; return (exit code, stdout, stderr)."""
    monkeypatch.setattr(cli, "hard_exit", lambda code: None)  # fail() raises SystemExit instead
    monkeypatch.setattr(sys, "argv", [module, *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def assert_one_error_line(code: int, err: str, *expected: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------- class 1: one line


def _cases(tmp: Path) -> dict[str, tuple[str, list[str], tuple[str, ...]]]:
    data = write_recbole(tmp / "data")
    bad_inter = tmp / "bad.inter"
    bad_inter.write_text(INTER_HEADER + "1\t1\t4\t100\n1\t2\t4\t2020-01-01\n")
    typo = write_recipe(tmp, {"data": data, "sft": {"lerning_rate": 1e-4}}, "typo.yaml")
    section = write_recipe(tmp, {"data": data, "stf": {"max_steps": 1}}, "section.yaml")
    mmsafe = tmp / "m.jsonl"
    (tmp / "imgs").mkdir()
    mmsafe.write_text(json.dumps({"prompt": "USER: hi ASSISTANT:", "image": None,
                                  "rejected": "no"}) + "\n")
    return {
        "data prepare": ("hanorec.data", ["prepare", "--dataset-format", "recbole",
                                          "--interactions-path", str(bad_inter),
                                          "--items-path", data["items_path"]],
                         ("bad.inter, line 3, field 'timestamp'", "not a number")),
        "data show": ("hanorec.data", ["show", "--config", str(write_recipe(tmp, {"data": data})),
                                       "--index", "100000"], ("--index 100000", "rows")),
        "mmsafe convert": ("hanorec.data.mmsafe", ["convert", "--input", str(mmsafe),
                                                   "--image-root", str(tmp / "imgs"),
                                                   "--out", str(tmp / "conv")],
                           ("m.jsonl, row 1, field 'chosen'", "missing field")),
        "sft": ("hanorec.sft", ["--config", str(typo)], ("typo.yaml: sft", "lerning_rate",
                                                          "'learning_rate'")),
        "dpo": ("hanorec.dpo", ["--config", str(section)], ("section.yaml, line", "'stf'",
                                                             "did you mean 'sft'")),
        "recpo": ("hanorec.recpo", ["--num-trace", "2"], ("unknown flag --num-trace",)),
        "evaluate": ("hanorec.evaluate", ["--run-dir", str(tmp / "run"), "--checkpoint",
                                          str(tmp / "nowhere")], ("nowhere", "does not exist")),
        "evaluate compare": ("hanorec.evaluate", ["compare", str(tmp / "a"), str(tmp / "b")],
                             ("not an evaluation folder",)),
        "baselines dir": ("hanorec.baselines", ["--prepared-dir", str(tmp / "missing"),
                                                "--out", str(tmp / "out")], ("missing",)),
        "baselines protocol": ("hanorec.baselines", ["--prepared-dir", str(tmp), "--out",
                                                     str(tmp / "out"), "--protocol", "top5"],
                               ("--protocol", "invalid choice: 'top5'")),
        "bpo": ("hanorec.bpo", [], ("usage: python -m hanorec.bpo generate",)),
        "report": ("hanorec.report", [str(tmp / "norun")], ("summary.json",)),
    }


CASES = ["data prepare", "data show", "mmsafe convert", "sft", "dpo", "recpo", "evaluate",
         "evaluate compare", "baselines dir", "baselines protocol", "bpo", "report"]


@pytest.mark.parametrize("case", CASES)
def test_every_entry_point_answers_a_user_error_with_one_line(case, tmp_path, monkeypatch,
                                                               capsys):
    """`error: <file>[, line N][, field F]: <message>`, exit 2, no traceback."""
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    module, argv, expected = _cases(tmp_path)[case]
    if case == "data show":  # a prepared folder to show from
        from hanorec.data.config import DataConfig
        from hanorec.data.prepare import prepare

        prepare(DataConfig(**write_recbole(tmp_path / "data")), progress=False)
    code, _, err = run_main(module, argv, monkeypatch, capsys)
    assert_one_error_line(code, err, *expected)


def test_debug_flag_and_environment_show_the_traceback(tmp_path, monkeypatch, capsys):
    """--debug (stripped before main sees it) and HANOREC_DEBUG=1 re-raise the user error."""
    bad = write_recipe(tmp_path, {"dat": {}})
    monkeypatch.setattr(cli, "hard_exit", lambda code: None)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    from hanorec.data.__main__ import main

    with pytest.raises(ConfigError, match="'dat'"):
        cli.run(main, ["prepare", "--config", str(bad), "--debug"])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ConfigError, match="'dat'"):
        cli.run(main, ["prepare", "--config", str(bad)])
    monkeypatch.setenv(cli.DEBUG_ENV, "0")
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, ["prepare", "--config", str(bad)])
    assert exit_info.value.code == 2


def _python(args: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **env}
    environ.pop(cli.DEBUG_ENV, None)
    environ.update(env)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=environ,
                          timeout=timeout, cwd=ROOT)


def test_a_real_process_exits_2_with_one_line_and_rejects_a_misspelled_section(tmp_path):
    """`dat:` instead of `data:` once built the default data set silently; now it is exit 2.
    The same recipe with HANOREC_DEBUG=1 shows the traceback."""
    bad = write_recipe(tmp_path, {"dat": write_recbole(tmp_path / "d")})
    proc = _python(["-m", "hanorec.data", "prepare", "--config", str(bad)])
    line = assert_one_error_line(proc.returncode, proc.stderr, "r.yaml, line 1",
                                 "unknown section(s) 'dat'", "did you mean 'data'")
    assert len(line) < 400 and not (tmp_path / "d" / "prepared").exists()
    debug = _python(["-m", "hanorec.data", "prepare", "--config", str(bad)], HANOREC_DEBUG="1")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


# ----------------------------------------------------------------------- class 9: clean exit


def test_error_exit_is_clean_with_a_thread_still_alive(tmp_path):
    """A native pool thread alive at exit once turned exit 2 into an abort (134): the error path
    leaves with os._exit, so even a thread that never ends cannot hold or abort the exit."""
    script = tmp_path / "live_thread.py"
    script.write_text(
        "import threading, time\n"
        "from hanorec.cli import run\n"
        "threading.Thread(target=time.sleep, args=(600,), daemon=False).start()\n"
        "def main(argv):\n"
        "    raise ValueError('x.csv, line 2: broken')\n"
        "run(main, [])\n")
    proc = _python([str(script)], timeout=120)  # without os._exit it waits for the thread
    assert proc.returncode == 2 and proc.stderr.strip() == "error: x.csv, line 2: broken"


# ----------------------------------------------------------------------- class 4: recipes


def _run_classes() -> list[type]:
    from hanorec.bpo import BPORun
    from hanorec.data.cli_args import DataRun
    from hanorec.dpo import DPORun
    from hanorec.evaluate import EvalRun
    from hanorec.recpo import RecPORun
    from hanorec.sft import SFTRun

    return [DataRun, SFTRun, DPORun, EvalRun, BPORun, RecPORun]


def test_every_entry_point_refuses_a_misspelled_section():
    """An unknown top-level key is an error for every entry point, naming it with a suggestion;
    sections another entry point reads are fine (one recipe serves every stage)."""
    for run_cls in _run_classes():
        with pytest.raises(ConfigError, match=r"unknown section\(s\) 'stf'.*did you mean 'sft'"):
            recipe.from_yaml_dict(run_cls, {"stf": {"max_steps": 1}}, "r.yaml")
        recipe.from_yaml_dict(run_cls, {"sft": {}, "dpo": {}, "eval": {}, "recpo": {},
                                        "bpo": {}, "seed": 1}, "r.yaml")


def test_the_section_registry_covers_every_entry_point():
    """RECIPE_KEYS (one line per new section) holds every run class's top-level fields, so the
    data CLI, which never imports the trainers, knows their sections."""
    for run_cls in _run_classes():
        fields = {f.name for f in dataclasses.fields(run_cls)}
        assert fields <= recipe.RECIPE_KEYS, (run_cls.__name__, fields - recipe.RECIPE_KEYS)
        hints = typing.get_type_hints(run_cls)
        assert all(dataclasses.is_dataclass(hints[f]) or f in ("run_dir", "seed")
                   for f in fields)


def test_flags_are_never_prefix_matched(tmp_path, monkeypatch, capsys):
    """--num-candidate is not --num-candidates, in the recipe parser and in plain argparse CLIs."""
    from hanorec.data.cli_args import parse_data_cli

    with pytest.raises(ConfigError, match=r"unknown flag --num-candidate \(did you mean "
                                          r"'--num-candidates'\?\)"):
        parse_data_cli(["--num-candidate", "5"])
    from hanorec.baselines.__main__ import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--prepared", str(tmp_path), "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert_one_error_line(2, capsys.readouterr().err, "required: --prepared-dir")
    from hanorec.data.mmsafe import main as mmsafe_main

    with pytest.raises(SystemExit):
        mmsafe_main(["convert", "--inp", "x", "--image-root", "y", "--out", "z"])
    assert "--inp" in capsys.readouterr().err


def test_duplicate_keys_random_bytes_and_bom_in_a_recipe(tmp_path):
    """YAML keeps only the last of two equal keys: refused. A recipe of random bytes names its
    file and line; an empty recipe is refused. A UTF-8 byte-order mark is accepted."""
    from hanorec.data.cli_args import DataRun

    twice = write_recipe(tmp_path, "data:\n  k_core: 2\ndata:\n  k_core: 3\n", "twice.yaml")
    with pytest.raises(ConfigError, match=r"twice\.yaml, line 3: key 'data' appears twice "
                                          r"\(first on line 1\)"):
        recipe.load_yaml(twice)
    noise = tmp_path / "noise.yaml"
    noise.write_bytes(b"data:\n  item_noun: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"noise\.yaml, line 2: not UTF-8"):
        recipe.load_yaml(noise)
    deep = write_recipe(tmp_path, "data:\n  protocols: " + "[" * 3000 + "]" * 3000 + "\n",
                        "deep.yaml")
    with pytest.raises(ConfigError, match=r"deep\.yaml: the recipe is nested too deeply"):
        recipe.load_yaml(deep)  # was a RecursionError traceback
    empty = write_recipe(tmp_path, "# nothing yet\n", "empty.yaml")
    with pytest.raises(ConfigError, match=r"empty\.yaml: the recipe is empty"):
        recipe.load_yaml(empty)  # it used to build the default data set
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbfdata:\n  k_core: 2\n")
    assert recipe.from_yaml_dict(DataRun, recipe.load_yaml(bom), str(bom)).data.k_core == 2


# ----------------------------------------------------------------------- class 8: messages


def test_config_errors_name_the_file_and_key_not_the_dataclass(tmp_path):
    """Range errors raised by DataConfig reach the user as `<recipe>: data.<key>: ...` (or as the
    flag), and the numeric checks the issue names hold: k_core >= 0, train_targets_per_user >= 1,
    finite numbers."""
    from hanorec.data.cli_args import parse_data_cli

    for key, value, why in [("max_history", 0, "must be >= min_history"),
                            ("k_core", -3, "must be >= 0"),
                            ("train_targets_per_user", 0, "must be >= 1 or null"),
                            ("min_rating", float("nan"), "finite")]:
        path = write_recipe(tmp_path, {"data": {key: value}}, f"{key}.yaml")
        with pytest.raises(ConfigError, match=rf"{key}\.yaml: data\.{key}: .*{why}"):
            parse_data_cli(["--config", str(path)])
    with pytest.raises(ConfigError, match=r"--k-core \(data\.k_core\): must be >= 0"):
        parse_data_cli(["--k-core", "-3"])
    from hanorec.sft import SFTRun

    with pytest.raises(ConfigError, match=r"r\.yaml: model\.lora_r: must be positive"):
        recipe.from_yaml_dict(SFTRun, {"model": {"lora_r": 0}}, "r.yaml")
    with pytest.raises(ConfigError, match=r"r\.yaml: sft\.per_device_batch_size: must be >= 1"):
        recipe.from_yaml_dict(SFTRun, {"sft": {"per_device_batch_size": 0}}, "r.yaml")


def test_an_alias_bomb_is_refused_in_a_short_message(tmp_path):
    """Nested YAML aliases expand to billions of values: refused before expansion, and no
    message ever prints more than a short repr of a value."""
    levels = ["a0: &a0 [hit1, hit1, hit1, hit1, hit1, hit1, hit1, hit1, hit1]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    bomb = write_recipe(tmp_path, "\n".join(levels) + "\ndata:\n  protocols: *a8\n")
    with pytest.raises(ConfigError) as error:
        recipe.load_yaml(bomb)
    assert "expands to more than" in str(error.value) and len(str(error.value)) < 300
    huge = write_recipe(tmp_path, yaml.safe_dump({"data": {"protocols": [["x"] * 50] * 1000}}),
                        "huge.yaml")
    from hanorec.data.cli_args import parse_data_cli

    with pytest.raises(ConfigError) as error:
        parse_data_cli(["--config", str(huge)])
    assert "protocols[0]" in str(error.value) and len(str(error.value)) < 300
    assert len(cli.one_line("x" * 10**6)) < 1100
