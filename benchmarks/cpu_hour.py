"""One CPU hour of SFT on MovieLens-100K, tested on every user against most-popular and SASRec.

    python benchmarks/cpu_hour.py [--config configs/ml100k-smollm2.yaml] [--run-root runs/cpu-hour]
        [--publish] [-- more hanorec.sft flags]

The question this answers: does the learning configuration, trained for at most an hour of wall
time on 2 CPU cores (the collaborative recommenders' training included), rank the *test* item
above most-popular and SASRec on the whole ``candidates`` test split (943 users, 20
candidates)? Stages, each a subprocess of the toolkit's own CLI (the same commands a user runs),
each skipped when its output exists:

1. ``hanorec.data prepare``;
2. ``hanorec.sft`` with the recipe — its wall time is the hour: the cross-fitted recommenders,
   item features, training to the validation plateau (all validation users, best weights
   kept), the periodic validations, export. The recipe picks bf16 or fp32 by measurement
   (``mixed_precision: auto``) and says which in ``sft/config.yaml``;
3. ``hanorec.evaluate`` on the test split, all four protocols (timed);
4. ``hanorec.baselines`` (most-popular and SASRec, trained on the same splits) on the same
   candidates;
5. the token recommender itself — view 0 of the collaborative features, the SASRec the MLLM
   reads at test time — scored on the same test candidates from each user's whole sequence;
6. paired comparisons per user (bootstrap interval of the difference, Wilcoxon p) of the MLLM
   against each reference, :func:`hanorec.stats.compare_runs`;
7. the arithmetic rate of the training: floating-point operations of one SFT step counted with
   ``torch.utils.flop_counter`` (:func:`sft_step.count_step_flops`), times the steps run, over
   the training seconds, beside this machine's matmul rate in the same precision measured in the
   same run.

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
sys.path.insert(0, str(ROOT / "benchmarks"))  # sft_step: the FLOP counter

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


REFERENCES = {"popularity": "Most popular", "sasrec": "SASRec (baseline)",
              "token-recommender": "SASRec the MLLM reads (collab view 0)"}


def token_recommender(config: str, extra: list[str], out: Path) -> dict[str, Any]:
    """The collaborative recommender the MLLM reads at test time (view 0), scored on the test
    candidates from each user's whole sequence (training sequence + validation target, as the
    SASRec baseline is tested); writes ``per_user.jsonl`` and ``summary.json`` in ``out``."""
    import numpy as np
    import torch

    from hanorec import config as recipe
    from hanorec.collab import collab_features, user_states
    from hanorec.data.known import known_sequences
    from hanorec.metrics import ranking_metrics, target_ranks
    from hanorec.runtime import load_catalog, load_rows
    from hanorec.sft import SFTRun
    from hanorec.stats import summarize

    run = recipe.parse(SFTRun, ["--config", config, *extra], prog="cpu_hour", description="")
    prepared = run.data.path(run.data.output_dir)
    catalog = load_catalog(run.data, prepared)
    features = collab_features(prepared, len(catalog), run.collab, log=None)
    inputs, _ = known_sequences(prepared, "test")
    rows = load_rows(prepared, ["candidates"], "test")
    states = user_states(features.models[0], [inputs[str(r["user_id"])] for r in rows],
                         run.collab.sasrec_max_len)
    candidates = torch.tensor([[catalog.index[i] for i in r["candidates"]] for r in rows])
    scores = torch.einsum("ud,ucd->uc", states, features.item_embeddings[0][candidates])
    ranks = target_ranks(scores.double().numpy(), [int(r["target_index"]) for r in rows])
    metrics = ranking_metrics(ranks, (1, 5, 10))
    out.mkdir(parents=True, exist_ok=True)
    with (out / "per_user.jsonl").open("w") as fh:
        for n, row in enumerate(rows):
            fh.write(json.dumps({"user_id": str(row["user_id"]),
                                 **{m: float(v[n]) for m, v in metrics.items()}}) + "\n")
    summary = {"metrics": summarize({m: metrics[m] for m in METRICS}, n_resamples=2000),
               "fit": features.rows.fit, "views": features.views}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return {m: float(np.mean(v)) for m, v in metrics.items()}


def compare(eval_dir: Path, references: dict[str, Path]) -> list[dict[str, Any]]:
    """The MLLM against every reference, paired per test user."""
    from hanorec.stats import compare_runs

    users, mllm = per_user(eval_dir / "per_user" / "candidates.jsonl")
    rows = []
    for name, folder in references.items():
        other_users, other = per_user(folder / "per_user.jsonl")
        for row in compare_runs(mllm, other, users, other_users, n_resamples=2000, seed=0):
            rows.append({**row, "against": REFERENCES[name]})
    return rows


def arithmetic_rate(config: str, extra: list[str], precision: str, examples: int,
                    train_seconds: float, batches: int = 3) -> dict[str, float]:
    """Counted FLOPs per training example of the recipe's SFT step (``FlopCounterMode`` on
    ``batches`` batches of real training rows, with their views), the rate the run achieved
    over its training seconds, and this machine's 2048² matmul rate in the same precision."""
    from sft_step import build, count_flops, matmul_rate

    from hanorec import config as recipe
    from hanorec.collab import collab_features
    from hanorec.runtime import load_catalog, load_rows
    from hanorec.sft import SFTRun, sft_objective

    run = recipe.parse(SFTRun, ["--config", config, *extra], prog="cpu_hour", description="")
    prepared = run.data.path(run.data.output_dir)
    catalog = load_catalog(run.data, prepared)
    features = collab_features(prepared, len(catalog), run.collab, log=None)
    batch = run.sft.per_device_batch_size
    rows = features.training_rows(load_rows(prepared, run.sft.sft_protocols, "train",
                                            limit=batch * batches * 50, seed=1), catalog.index)
    model, collator, _ = build(run, prepared, catalog)
    flops = 0.0
    for n in range(batches):
        forward, backward = count_flops(model, collator, rows[n * batch : (n + 1) * batch],
                                        sft_objective, "bf16" if precision == "bf16" else "fp32")
        flops += forward + backward
    per_example = flops / (batches * batch)
    achieved = per_example * examples / max(train_seconds, 1e-9) / 1e9
    rate = matmul_rate(2048, 2048, 2048, "bf16" if precision == "bf16" else "fp32")
    return {"gflop_per_example": per_example / 1e9, "achieved_gflops": achieved,
            "matmul_gflops": rate, "fraction": achieved / rate}


def write(run_root: Path, summary: dict[str, Any], publish: bool) -> None:
    arithmetic = summary["arithmetic"]
    precision = "bf16 autocast" if summary["precision"] == "bf16" else "fp32"
    best = summary.get("best_step")
    lines = [f"# One CPU hour of SFT on MovieLens-100K ({summary['machine']})", "",
             f"Recipe `{' '.join([summary['config'], *summary['extra']])}`; SFT wall time "
             f"**{summary['timings'].get('sft', summary['sft_seconds']):.0f} s** (the "
             f"recommenders {summary['collab_seconds']:.0f} s of it), {precision} (chosen by "
             f"measurement), {summary['sft_steps']} steps = {summary['train_examples']} examples "
             f"in {summary['train_seconds']:.0f} s of training "
             f"({summary['seconds_per_example']:.3f} s per example), best validation HR@1 "
             f"{summary['best_validation_hr1']:.3f} at step {best} (its weights are the model); "
             f"test evaluation of all four protocols {summary['eval_seconds']:.0f} s "
             f"({summary['candidates_seconds']:.0f} s for `candidates`).", "",
             f"Arithmetic: {arithmetic['gflop_per_example']:.1f} GFLOP per training example "
             "(forward + backward, counted by `torch.utils.flop_counter`), "
             f"{arithmetic['achieved_gflops']:.0f} GFLOP/s over the training seconds = "
             f"**{100 * arithmetic['fraction']:.0f}%** of this machine's "
             f"{arithmetic['matmul_gflops']:.0f} GFLOP/s {precision.split()[0]} 2048² matmul "
             "rate (measured in the same run).", "",
             "| model | " + " | ".join(METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    for name, values in summary["models"].items():
        lines.append(f"| {name} | " + " | ".join(
            f"{values[m]['mean']:.3f} [{values[m]['low']:.3f}, {values[m]['high']:.3f}]"
            for m in METRICS) + " |")
    lines += ["",
              "Paired over the 943 test users (MLLM − reference, 95% bootstrap interval, "
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

    machine = describe_machine()  # before any stage: the bf16 ratio of an idle machine
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
    token_dir = run_root / "token-recommender"
    token_recommender(args.config, args.extra, token_dir)
    references = {"popularity": baselines / "popularity", "sasrec": baselines / "sasrec",
                  "token-recommender": token_dir}
    models = {REFERENCES[name]: json.loads((folder / "summary.json").read_text())["metrics"]
              for name, folder in references.items()}
    models["smollm2-llava SFT (this recipe)"] = evaluation["protocols"]["candidates"]["metrics"]
    examples = (sft_summary["steps"] * run.sft.per_device_batch_size
                * run.sft.gradient_accumulation_steps)
    summary = {"config": args.config, "extra": args.extra, "machine": machine,
               "timings": timings, "sft_seconds": sft_summary["seconds"],
               "sft_steps": sft_summary["steps"], "best_step": sft_summary.get("best_step"),
               "best_validation_hr1": sft_summary.get("best_metric"),
               "precision": sft_summary.get("mixed_precision"),
               "train_examples": examples, "train_seconds": sft_summary["train_seconds"],
               "seconds_per_example": sft_summary["train_seconds"] / max(examples, 1),
               "collab_seconds": (sft_summary.get("collab") or {}).get("seconds") or 0.0,
               "eval_seconds": evaluation["seconds"]["total"],
               "candidates_seconds": evaluation["seconds"]["candidates"],
               "models": {k: {m: v[m] for m in METRICS} for k, v in models.items()},
               "other_protocols": {k: v for k,
                                   v in evaluation["metrics"].items()
                                   if not k.startswith("candidates/")},
               "comparisons": compare(eval_dir, references),
               "arithmetic": arithmetic_rate(args.config, args.extra,
                                             sft_summary.get("mixed_precision", "no"), examples,
                                             sft_summary["train_seconds"])}
    write(run_root, summary, args.publish)


if __name__ == "__main__":
    main()
