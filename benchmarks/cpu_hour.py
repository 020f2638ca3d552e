"""One CPU hour of SFT on MovieLens-100K, tested on every user against most-popular and SASRec.

    python benchmarks/cpu_hour.py [--config configs/ml100k-smollm2.yaml] [--run-root runs/cpu-hour]
        [--publish] [-- more hanorec.sft flags]

The question this answers: does the learning configuration, trained for at most an hour of wall
time on 2 CPU cores (the collaborative recommender's training included), rank the *test* item
above most-popular on the whole ``candidates`` test split (943 users, 20 candidates), and how
does it compare with the project's SASRec? Stages, each a subprocess of the toolkit's own CLI
(the same commands a user runs), each skipped when its output exists:

1. ``hanorec.data prepare``;
2. ``hanorec.sft`` with the recipe (wall time measured: recommender, item features, training,
   the recipe's periodic validation, export);
3. ``hanorec.evaluate`` on the test split, all four protocols (timed; with the ranking head one
   forward per user serves them all);
4. ``hanorec.baselines`` (most-popular and SASRec) on the same candidates;
5. paired comparisons per user (bootstrap interval of the difference, Wilcoxon p) of the MLLM
   against each baseline, :func:`hanorec.stats.compare_runs`.

Writes ``<run-root>/cpu_hour.{md,json}`` (``--publish`` copies them to ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METRICS = ("HR@1", "NDCG@10", "MRR")


def stage(name: str, argv: list[str], done: Path, timings: dict[str, float]) -> None:
    """Run ``python -m <argv>`` unless ``done`` exists; record its wall time."""
    if done.exists():
        print(f"{name}: reusing {done}")
        return
    print(f"{name}: {' '.join(argv)}", flush=True)
    started = time.time()
    subprocess.run([sys.executable, "-m", *argv], check=True, cwd=ROOT)
    timings[name] = round(time.time() - started, 1)
    print(f"{name}: {timings[name]:.0f} s", flush=True)


def per_user(path: Path) -> tuple[list[str], dict[str, Any]]:
    import numpy as np

    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    users = [str(r["user_id"]) for r in records]
    return users, {m: np.array([r[m] for r in records], dtype=float) for m in METRICS}


def compare(run_root: Path, eval_dir: Path, baselines: Path) -> list[dict[str, Any]]:
    """The MLLM against most-popular and SASRec, paired per test user."""
    from hanorec.stats import compare_runs

    users, mllm = per_user(eval_dir / "per_user" / "candidates.jsonl")
    rows = []
    for name in ("popularity", "sasrec"):
        other_users, other = per_user(baselines / name / "per_user.jsonl")
        for row in compare_runs(mllm, other, users, other_users, n_resamples=2000, seed=0):
            rows.append({**row, "against": name})
    return rows


def write(run_root: Path, summary: dict[str, Any], publish: bool) -> None:
    lines = [f"# One CPU hour of SFT on MovieLens-100K ({summary['machine']})", "",
             f"Recipe `{summary['config']}`; SFT wall time "
             f"{summary['timings'].get('sft', summary['sft_seconds']):.0f} s "
             f"(recommender {summary['collab_seconds']:.0f} s of it), {summary['sft_steps']} "
             "steps, "
             f"{summary['train_examples']} examples; test evaluation of all four protocols "
             f"{summary['eval_seconds']:.0f} s ({summary['candidates_seconds']:.0f} s for "
             "`candidates`).", "",
             "| model | " + " | ".join(METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    for name, values in summary["models"].items():
        lines.append(f"| {name} | " + " | ".join(
            f"{values[m]['mean']:.3f} [{values[m]['low']:.3f}, {values[m]['high']:.3f}]"
            for m in METRICS) + " |")
    lines += ["",
              "Paired over the 943 test users (MLLM − baseline, 95% bootstrap interval, "
              "Wilcoxon p):", "",
              "| against | metric | difference | p (Wilcoxon) |", "|---|---|---|---:|"]
    for row in summary["comparisons"]:
        lines.append(f"| {row['against']} | {row['metric']} | {row['diff']:+.3f} "
                     f"[{row['diff_low']:+.3f}, "
                     f"{row['diff_high']:+.3f}] | {row['p_wilcoxon']:.2g} |")
    text = "\n".join(lines) + "\n"
    (run_root / "cpu_hour.md").write_text(text)
    (run_root / "cpu_hour.json").write_text(json.dumps(summary, indent=2, default=str))
    print(text)
    if publish:
        for suffix in ("md", "json"):
            shutil.copy(run_root / f"cpu_hour.{suffix}",
                        ROOT / "benchmarks" / "results" / f"cpu_hour.{suffix}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/ml100k-smollm2.yaml")
    parser.add_argument("--run-root", default="runs/cpu-hour")
    parser.add_argument("--publish", action="store_true",
                        help="Copy the results to benchmarks/results/.")
    parser.add_argument("--keep-recommender", action="store_true",
                        help="Reuse a cached collaborative recommender (default: train it "
                             "inside the timed SFT stage).")
    parser.add_argument("extra", nargs="*", help="More hanorec.sft flags (after --).")
    args = parser.parse_args(argv)
    from hanorec import config as recipe
    from hanorec.hardware import describe_machine
    from hanorec.sft import SFTRun

    run_root = Path(args.run_root)
    run_root.mkdir(parents=True, exist_ok=True)
    run = recipe.parse(SFTRun, ["--config", args.config, *args.extra], prog="cpu_hour",
                       description="")
    prepared = run.data.path(run.data.output_dir)
    timing_file = run_root / "timings.json"
    timings: dict[str, float] = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    common = ["--config", args.config, "--run-dir", str(run_root)]
    stage("prepare", ["hanorec.data", "prepare", "--config", args.config],
          prepared / "manifest.json", timings)
    if not args.keep_recommender and not (run_root / "sft" / "summary.json").is_file():
        from hanorec.collab import CACHE_FOLDER, cache_key

        cached = prepared / CACHE_FOLDER / cache_key(prepared, run.collab)
        if cached.exists():
            shutil.rmtree(cached)  # the SFT stage's timing includes training the recommender
    stage("sft", ["hanorec.sft", *common, *args.extra], run_root / "sft" / "summary.json", timings)
    eval_dir = run_root / "eval" / "test"
    stage("evaluate",
          ["hanorec.evaluate", *common, "--name", "test", "--checkpoint",
           str(run_root / "sft" / "final"),
                       "--eval-protocols", "candidates,hit3,hit1,full", "--bootstrap-resamples",
                       "2000"],
          eval_dir / "summary.json", timings)
    baselines = run_root / "baselines"
    stage("baselines",
          ["hanorec.baselines", "--prepared-dir", str(prepared), "--protocol", "candidates",
                        "--out", str(baselines), "--n-resamples", "2000"],
                        baselines / "sasrec" / "summary.json", timings)
    timing_file.write_text(json.dumps(timings, indent=2))
    sft_summary = json.loads((run_root / "sft" / "summary.json").read_text())
    evaluation = json.loads((eval_dir / "summary.json").read_text())
    models = {"Most popular": json.loads((baselines / "popularity"
                                          / "summary.json").read_text())["metrics"],
              "SASRec (whole sequence)": json.loads((baselines / "sasrec"
                                                     / "summary.json").read_text())["metrics"],
              "smollm2-llava SFT (this recipe)": evaluation["protocols"]["candidates"]["metrics"]}
    summary = {"config": args.config, "machine": describe_machine(), "timings": timings,
               "sft_seconds": sft_summary["seconds"], "sft_steps": sft_summary["steps"],
               "train_examples": sft_summary["steps"] * run.sft.per_device_batch_size
               * run.sft.gradient_accumulation_steps,
               "collab_seconds": (sft_summary.get("collab") or {}).get("seconds") or 0.0,
               "eval_seconds": evaluation["seconds"]["total"],
               "candidates_seconds": evaluation["seconds"]["candidates"],
               "models": {k: {m: v[m] for m in METRICS} for k, v in models.items()},
               "other_protocols": {k: v for k,
                                   v in evaluation["metrics"].items()
                                   if not k.startswith("candidates/")},
               "comparisons": compare(run_root, eval_dir, baselines)}
    write(run_root, summary, args.publish)


if __name__ == "__main__":
    main()
