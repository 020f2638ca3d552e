"""The preference sweep driver (benchmarks/preference_sweep.py): every setting's command parses.

A typo in a flag of one setting would otherwise surface hours into a background sweep; the
settings must also differ from the baseline in exactly what their names say.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_driver():
    spec = importlib.util.spec_from_file_location("preference_sweep",
                                                  ROOT / "benchmarks" / "preference_sweep.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_setting_parses_and_changes_its_lever(tmp_path):
    from hanorec import config
    from hanorec.dpo import DPORun, check_run

    sweep = load_driver()
    args = argparse.Namespace(config=str(ROOT / "configs" / "ml100k-smollm2.yaml"),
                              run_root=str(tmp_path), sft_checkpoint=str(tmp_path / "sft"),
                              steps=240, eval_every=60, eval_pairs=256, pairs=1920, extra=[])
    runs = {}
    for name in sweep.SETTINGS:
        command = sweep.setting_command(name, args)
        run = config.parse(DPORun, command[3:], prog="hanorec.dpo", description="")
        check_run(run)
        assert run.dpo.max_steps == 240 and run.dpo.rank_examples == -1
        assert run.run_dir == str(tmp_path / name)
        runs[name] = run
    base = runs["dpo"]
    recipe = config.parse(DPORun, ["--config", args.config], prog="t", description="")
    assert all(r.data.output_dir != recipe.data.output_dir for r in runs.values())
    assert all(r.data.max_history == recipe.data.max_history for r in runs.values())
    assert runs["sft"].dpo.loss == "sft" and runs["sft"].dpo.reference == "none"
    assert runs["k3"].data.num_negatives == 3 and runs["k3"].dpo.loss == "sdpo"
    assert runs["neg-policy"].data.negative_sampling == "policy"
    assert runs["neg-policy"].dpo.negative_scope == "catalogue"
    assert runs["neg-policy-fresh"].dpo.negative_refresh == 60
    assert runs["beta-1"].dpo.beta == 1.0 != base.dpo.beta
    assert runs["rpo"].dpo.sft_weight == 1.0 != base.dpo.sft_weight
    assert runs["lr-5e-4"].dpo.learning_rate == 5e-4 != base.dpo.learning_rate


def test_stored_setting_is_reused_only_for_its_command_and_adapter(tmp_path, monkeypatch):
    """A finished setting is kept in the store; a fresh run folder takes it back when the command
    and the starting adapter's bytes are the same, and reruns it (here: the subprocess is
    refused) when the adapter changed."""
    sweep = load_driver()
    adapter = tmp_path / "sft"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights v1")
    args = argparse.Namespace(config=str(ROOT / "configs" / "ml100k-smollm2.yaml"),
                              run_root=str(tmp_path / "runs"), sft_checkpoint=str(adapter),
                              steps=4, eval_every=2, eval_pairs=8, pairs=32, extra=[],
                              threads=0, store=str(tmp_path / "store"))
    finished = tmp_path / "runs" / "dpo" / "dpo"
    finished.mkdir(parents=True)
    (finished / "summary.json").write_text('{"steps": 4}')
    (finished / "metrics.jsonl").write_text('{"step": 2, "eval/candidates_hr1": 0.5}\n')
    ran = []
    monkeypatch.setattr(sweep.subprocess, "run", lambda *a, **k: ran.append(a))
    sweep.run_setting("dpo", args)  # finished in the run folder: stored, nothing run
    assert ran == [] and (tmp_path / "store" / "dpo" / "metrics.jsonl").is_file()

    args.run_root = str(tmp_path / "fresh-machine")
    folder = sweep.run_setting("dpo", args)
    assert ran == [] and (folder / "dpo" / "summary.json").read_text() == '{"steps": 4}'

    (adapter / "adapter_model.safetensors").write_bytes(b"weights v2")
    args.run_root = str(tmp_path / "another-machine")
    with pytest.raises(FileNotFoundError):  # the refused subprocess left no outputs to store
        sweep.run_setting("dpo", args)
    assert len(ran) == 1
