"""Smoke test of the quality benchmark driver (``benchmarks/quality.py --smoke``).

Runs the real grid (every stage a subprocess of the toolkit's CLIs) on the ``tiny_recipe`` data
with the tiny LLaVA, one seed, a subset of methods, 2 training steps and 6 users; then reruns it
and checks that every finished stage is skipped.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["popularity", "sft", "dpo", "hanorec-nodo"]


def load_driver():
    spec = importlib.util.spec_from_file_location("quality_benchmark",
                                                  ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def table_rows(markdown: str) -> dict[str, list[str]]:
    """``{method label: cells}`` of the first table (the quality table) of the results page."""
    block = markdown.split("\n\n| method | n |", 1)[1].split("\n\n", 1)[0]
    rows = [line.strip("|").split("|") for line in block.splitlines()[2:]]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_run(tiny_recipe, tmp_path_factory):
    quality = load_driver()
    methods = list(METHODS)
    recipe = tiny_recipe("tiny-llava")
    root = tmp_path_factory.mktemp("quality")
    args = ["--smoke", "--config", str(recipe), "--seeds", "0", "--methods", ",".join(methods),
            "--run-root", str(root / "runs"), "--out", str(root / "results"),
            "--bootstrap-resamples", "200"]
    path = quality.main(args)
    return quality, methods, args, root, path


def test_smoke_grid_writes_one_finite_row_per_method(smoke_run):
    """Every method has a row; every filled cell is ``mean [low, high]`` with finite numbers and
    low ≤ mean ≤ high; each preference method is tested against DPO and SFT."""
    quality, methods, _, root, path = smoke_run
    text = path.read_text(encoding="utf-8")
    rows = table_rows(text)
    labels = [quality.BY_NAME[m].label for m in methods]
    blind = [f"{quality.BY_NAME[m].label}, posters removed at test" for m in methods
             if quality.BY_NAME[m].blind_eval]
    assert blind and sorted(rows) == sorted(labels + blind)
    for label, cells in rows.items():
        numbers = [c for c in cells[1:] if c != "–"]
        assert numbers, f"{label}: no metric"
        for cell in numbers:
            mean, low, high = (float(x) for x in re.findall(r"-?\d+\.\d+", cell))
            assert all(math.isfinite(v)
                       for v in (mean, low, high)) and low <= mean + 1e-9 <= high + 2e-9, (label,
                                                                                           cell)
    raw = json.loads((root / "results" / "ml100k.json").read_text(encoding="utf-8"))
    tested = {(t["method"], t["reference"]) for t in raw["tests"]}
    assert {("hanorec-nodo", "dpo"), ("hanorec-nodo", "sft"), ("dpo", "sft")} <= tested
    for reference in ("dpo", "sft"):  # Holm within each reference's family: never below the raw p
        family = [t for t in raw["tests"] if t["reference"] == reference]
        assert all(t["p_wilcoxon"] <= t["p_wilcoxon_holm"] <= 1 for t in family)
        smallest = min(family, key=lambda t: t["p_wilcoxon"])
        assert smallest["p_wilcoxon_holm"] == pytest.approx(min(1.0,
                                                                len(family)
                                                                * smallest["p_wilcoxon"]))
    assert "| p (Holm) |" in text
    # the poster gap of each blind-evaluated method, paired over the same units
    gaps = {(g["method"], g["metric"]): g for g in raw["blind_gaps"]}
    gap = gaps[("sft", "candidates/HR@1")]
    assert gap["reference"] == "sft@blind" and gap["n_users"] == 6
    assert gap["diff"] == pytest.approx(gap["mean_a"] - gap["mean_b"])
    # the preference curves start at step 0 (--eval-on-start) and end at the last step
    for name in ("dpo", "hanorec-nodo"):
        steps = sorted(int(s) for s in raw["curves"][name]["values"]["hr1"])
        assert steps == [0, 2], (name, steps)
    assert "## The preference stage over its steps" in text
    stages = raw["stages"]
    assert stages["seed0/sft/train"]["steps"] == 2 and stages["seed0/sft/train"]["peak_rss_mb"] > 50
    assert stages["seed0/dpo/train"]["seconds"] > 0


def test_rerun_skips_finished_stages(smoke_run, capsys):
    """A second run starts no subprocess: every stage prints ``skip`` and the grid takes well under
    the time of one subprocess start (~5 s)."""
    quality, _, args, root, _ = smoke_run
    capsys.readouterr()
    start = time.perf_counter()
    quality.main(args)
    seconds = time.perf_counter() - start
    out = capsys.readouterr().out
    stage_lines = [line for line in out.splitlines() if re.match(r"\[\d+/\d+\] ", line)]
    assert stage_lines and all("skip" in line for line in stage_lines), out
    assert "running" not in out
    assert seconds < 5.0


def test_bpo_and_recpo_join_the_same_grid(smoke_run):
    """BPO and RecPO (when their modules exist) run from the seed's existing SFT checkpoint (the SFT
    stage is skipped) and get their own rows: BPO on candidates/hit1, RecPO on the full
    catalogue."""
    quality, methods, args, root, _ = smoke_run
    extra = [m for m in ("bpo", "recpo") if quality.BY_NAME[m].available()]
    if not extra:
        pytest.skip("hanorec.bpo / hanorec.recpo not present")
    sft_done = (root / "runs" / "seed0" / "sft" / "sft" / "final").stat().st_mtime
    grown = [a if a != ",".join(methods) else ",".join(methods + extra) for a in args]
    text = quality.main(grown).read_text(encoding="utf-8")
    rows = table_rows(text)
    assert (root / "runs" / "seed0" / "sft" / "sft" / "final").stat().st_mtime == sft_done
    if "bpo" in extra:
        assert rows[quality.BY_NAME["bpo"].label][1] != "–"  # candidates/HR@1
    if "recpo" in extra:
        header = text.split("| method | n | ", 1)[1].split("\n", 1)[0].rstrip(" |").split(" | ")
        cells = rows[quality.BY_NAME["recpo"].label][1:]
        assert cells[header.index("full/NDCG@10")] != "–"


def test_grid_rebuilds_a_prepared_folder_another_recipe_wrote(tiny_recipe, tmp_path):
    """The baselines read the prepared folder directly, so an existing folder prepared with other
    settings must not pass for finished: the grid lists a forced ``prepare`` stage until the
    folder's
    fingerprint matches the recipe, then none."""
    from hanorec.data.__main__ import main as data_main

    quality = load_driver()
    folder = str(tmp_path / "prepared")  # not the session's shared tiny folder
    recipe = tiny_recipe("tiny-llava", data={"output_dir": folder})
    other = tiny_recipe("tiny-llava", data={"output_dir": folder, "max_history": 7})
    plan = quality.Plan(recipe, tmp_path / "runs", quality.BUDGETS["smoke"],
                        quality.prepared_dir(recipe))
    assert quality.prepared_dir(other) == plan.prepared
    data_main(["prepare", "--config", str(other)])
    assert (plan.prepared / "manifest.json").is_file()
    stages = quality.grid(plan, [quality.BY_NAME["popularity"]], [0])
    assert stages[0].key == "prepare" and stages[0].force
    data_main(["prepare", "--config", str(recipe)])
    assert all(s.key != "prepare" for s in quality.grid(plan, [quality.BY_NAME["popularity"]], [0]))


@pytest.mark.parametrize("rerun", [False, True])
def test_execute_records_cost_and_isolates_a_failed_method(tmp_path, rerun):
    """Three stages: ``s0/a/train`` fails (exit 3), so ``s0/a/eval`` is left out; ``s0/b/train``
    writes its done file and is recorded with wall time, CPU time and peak RSS (> 1 MB for a
    Python child). A rerun skips ``s0/b/train`` (its done file exists) and retries the failed
    one."""
    quality = load_driver()
    py = sys.executable
    done_b = tmp_path / "b.done"
    stages = [quality.Stage("s0/a/train", [py, "-c", "raise SystemExit(3)"], tmp_path / "a.done"),
              quality.Stage("s0/a/eval", [py, "-c", "pass"], tmp_path / "a-eval.done"),
              quality.Stage("s0/b/train", [py, "-c", f"open({str(done_b)!r}, 'w').close()"],
                            done_b)]
    records = quality.execute(stages, tmp_path / "runs")
    if rerun:
        records = quality.execute(stages, tmp_path / "runs")
        assert records["s0/b/train"]["skipped_last_run"] is True
    assert "exit 3" in records["s0/a/train"]["failed"]
    assert "s0/a/eval" not in records
    b = records["s0/b/train"]
    assert b["seconds"] > 0 and b["cpu_seconds"] > 0 and b["peak_rss_mb"] > 1
    assert (
        json.loads((tmp_path / "runs" / "stages.json").read_text())["s0/b/train"]["peak_rss_mb"]
        == b["peak_rss_mb"]
    )


@pytest.mark.parametrize("native", [False, True], ids=["bf16-emulated", "bf16-native"])
@pytest.mark.parametrize("budget", ["cpu", "full", "smoke"])
def test_every_budget_flag_parses_in_the_cli_it_is_given_to(budget, native, tmp_path, monkeypatch):
    """Each stage command of a budget's whole grid (13 methods, one seed) parses with the
    entry point's own config parser, so a renamed or mistyped flag fails here in a second rather
    than hours into a benchmark run (unknown flags are errors, hanorec.config). The CPU budget
    asks for bf16 (training and scoring) only where bf16 is native: emulated, it made an SFT step
    ~25x slower than fp32 on an AVX2-only CPU."""
    from hanorec import bpo, dpo, evaluate, hardware, recpo, sft
    from hanorec.config import parse

    monkeypatch.setattr(hardware, "native_bf16", lambda device_type="cpu": native)

    quality = load_driver()
    runs = {"hanorec.sft": sft.SFTRun, "hanorec.dpo": dpo.DPORun,
            "hanorec.evaluate": evaluate.EvalRun,
            "hanorec.recpo": recpo.RecPORun, "hanorec.bpo": bpo.BPORun}
    plan = quality.Plan(config=ROOT / "configs" / "ml100k-smollm2.yaml", run_root=tmp_path,
                        budget=quality.BUDGETS[budget], prepared=tmp_path / "prepared")
    parsed = set()
    for stage in quality.grid(plan, quality.METHODS, [0]):
        module = stage.cmd[2] if stage.cmd[1] == "-m" else None
        if module not in runs:
            continue
        argv = stage.cmd[4:] if module == "hanorec.bpo" else stage.cmd[3:]  # bpo: after "generate"
        run = parse(runs[module], argv, prog=module, description="")
        assert run.seed == 0
        parsed.add(module)
        bf16 = native and budget == "cpu"
        if module in ("hanorec.sft", "hanorec.dpo"):  # auto: the stage measures (fp32 here)
            precision = getattr(run, module.split(".")[1]).mixed_precision
            assert precision in (("bf16",) if bf16 else ("no", "auto")), stage.key
        if module == "hanorec.evaluate":
            assert run.eval.eval_precision == ("bf16" if bf16 else "fp32"), stage.key
    assert parsed == set(runs)


def test_size_overrides_reach_every_stage_command(tiny_recipe, tmp_path, capsys):
    """``--sft-steps 300 --dpo-steps 40 --train-examples 1000 --eval-users 7`` on the CPU budget
    (150/48 steps, 384 pairs, every user by default): the dry run's SFT command carries
    ``--max-steps 300`` and ``--max-train-examples 1000``, the DPO command ``--max-steps 40``
    and ``--max-train-pairs 1000``,
    the evaluation ``--eval-max-users 7``; nothing runs."""
    quality = load_driver()
    recipe = tiny_recipe("tiny-llava")
    quality.main(["--config", str(recipe), "--seeds", "0", "--methods", "sft,dpo", "--run-root",
                  str(tmp_path / "runs"),
                  "--out", str(tmp_path / "out"), "--sft-steps", "300", "--dpo-steps", "40",
                  "--train-examples", "1000",
                  "--eval-users", "7", "--dry-run"])
    lines = capsys.readouterr().out.splitlines()

    def command(key: str) -> str:
        return next(line for line in lines if line.startswith("[") and f"] {key}:" in line)

    assert "--max-steps 300" in command(
        "seed0/sft/train"
    ) and "--max-train-examples 1000" in command("seed0/sft/train")
    assert "--max-steps 40" in command("seed0/dpo/train") and "--max-train-pairs 1000" in command(
        "seed0/dpo/train"
    )
    assert "--eval-max-users 7" in command("seed0/dpo/eval")
    assert not (tmp_path / "runs" / "seed0" / "sft").exists()
