"""Learning curves to the plateau: validation HR@1 against examples seen and training time, per
lever of the learning recipe.

    python benchmarks/learning_curve.py [--config configs/ml100k-smollm2.yaml] [--examples 9600]
        [--eval-every 1600] [--patience 2] [--conditions tail,crossfit,...] [--threads N]
        [--run-root runs/learning-curve] [--publish] [-- more hanorec.sft flags]

What makes a small LLM recommender learn on a CPU budget, and when does it stop learning? Each
*condition* is one SFT run of ``hanorec.sft`` (a subprocess, as a user would run it) on the
recipe with one lever changed. Every run validates on **all** validation users of the
``candidates`` protocol (20 candidates, the read-out's own scores) every ``--eval-every``
examples and stops when HR@1 has not improved for ``--patience`` validations (or at
``--examples``), keeping the best weights (``metric_for_best_model: eval/candidates_hr1``);
precision is the machine's faster one, measured (``mixed_precision: auto``).

=================  =========================================================================
``tail``           the recipe: one recommender without each user's last 5 training
                   items; SFT on those rows only (~4,700), 10-item histories
``insample``       one recommender on everything, every row, in-sample features (the leak)
``crossfit``       5 user-fold recommenders: every training row (~97,000), out-of-sample
``rolling``        5 stacked tails of 5 items: the last 25 rows of each user (~21,000), each
                   from a recommender that trained on its history but not its target
``rolling-long``   ``rolling`` + 50-item histories, titles and posters on the newest 10 only:
                   the item tokens and the user token read what SASRec reads (its 50 items)
``rolling-long-prior``  ``rolling-long`` with the recommender's own score added to the head's
                   (``collab.head_prior``: the LM learns a correction of SASRec)
``crossfit-long``  ``crossfit`` + 50-item histories
``long-notext``    ``crossfit-long`` with no titles and no posters: the collaborative channel alone
``titles``         head read-out, titles only (no collaborative token, no poster)
``index``          index read-out (labels A–T), collaborative + user tokens
=================  =========================================================================

(Runs of the same condition name reuse their folder: an interrupted benchmark resumes run by
run.) Reference lines on the same users and candidates: most-popular, and the collaborative
recommender itself — view 0, the SASRec trained on every training sequence, reading each
user's whole training sequence, as the SASRec baseline does. Training time excludes the
periodic evaluations; set-up (recommender training, item features) is reported apart.

Output: ``<run-root>/learning_curve.{md,json,png}`` (copied to ``benchmarks/results/`` with
``--publish``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEAD = ("--answer", "head")
COLLAB_USER = ("--item-tokens", "true", "--user-token", "true")
NO_IMAGES = ("--with-images", "false")
#: A prepared folder with 50-item histories (its own folder: max_history changes the rows).
LONG = ("--max-history", "50", "--title-budget", "10",
        "--output-dir", "{cache}/prepared/ml-100k-smollm2-h50")
CONDITIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tail": ("held-out tail (the recipe)", (*HEAD, "--collab-fit", "tail",
                                                "--collab-holdout", "5")),
    "insample": ("in-sample features, every row", (*HEAD, "--collab-fit", "insample")),
    "crossfit": ("cross-fitted by user, every row", (*HEAD, "--collab-fit", "crossfit")),
    "rolling": ("rolling tails, last 25 rows per user",
                (*HEAD, "--collab-fit", "rolling", "--collab-holdout", "5")),
    "rolling-long": ("rolling tails + 50-item history",
                     (*HEAD, "--collab-fit", "rolling", "--collab-holdout", "5", *LONG)),
    "rolling-long-prior": ("rolling + 50 items + the recommender's score in the head",
                           (*HEAD, "--collab-fit", "rolling", "--collab-holdout", "5", *LONG,
                            "--head-prior", "true")),
    "crossfit-long": ("cross-fitted + 50-item history",
                      (*HEAD, "--collab-fit", "crossfit", *LONG)),
    "long-notext": ("cross-fitted + 50 items, no titles or posters",
                    (*HEAD, "--collab-fit", "crossfit", *LONG, "--titles", "false",
                     *NO_IMAGES)),
    "titles": ("head, titles only",
               (*HEAD, "--item-tokens", "false", "--user-token", "false", *NO_IMAGES)),
    "index": ("index labels, collaborative + user",
              ("--answer", "index", *COLLAB_USER, *NO_IMAGES)),
}
DEFAULT_CONDITIONS = ("tail", "crossfit", "rolling", "crossfit-long")


def run_condition(name: str, args: argparse.Namespace, batch: int) -> Path:
    """One SFT run to its plateau (skipped when finished); returns its folder."""
    folder = Path(args.run_root) / name
    if (folder / "sft" / "summary.json").is_file():
        print(f"{name}: reusing {folder}")
        return folder
    steps = max(1, args.examples // batch)
    flags = [sys.executable, "-m", "hanorec.sft", "--config", args.config, "--run-dir", str(folder),
             "--max-steps", str(steps), "--eval-every", str(max(1, args.eval_every // batch)),
             "--rank-examples", "-1", "--eval-examples", "64",
             "--save-every", str(max(1, args.eval_every // batch)), "--keep-checkpoints", "1",
             "--early-stopping-patience", str(args.patience),
             "--metric-for-best-model", "eval/candidates_hr1", "--load-best-model-at-end", "true",
             "--mixed-precision", args.precision, "--max-train-examples", "0",
             "--resume", "true", *CONDITIONS[name][1], *args.extra]
    print(f"{name}: {' '.join(flags[3:])}", flush=True)
    started = time.time()
    env = dict(os.environ)
    if args.threads:  # two conditions side by side: one torch thread each, not two
        env["OMP_NUM_THREADS"] = str(args.threads)
    subprocess.run(flags, check=True, cwd=ROOT, env=env)
    print(f"{name}: {time.time() - started:.0f} s")
    return folder


def curve(folder: Path) -> dict[str, Any]:
    """Eval points (examples, training seconds, HR@1) and the run's summary."""
    from hanorec.training import read_metrics

    records = read_metrics(folder / "sft" / "metrics.jsonl")
    train = {r["step"]: r for r in records if "train/examples" in r}
    points = [{"examples": train[r["step"]]["train/examples"],
               "seconds": train[r["step"]]["train/seconds"],
               "hr1": r["eval/candidates_hr1"]} for r in records if "eval/candidates_hr1" in r
               and r["step"] in train]
    summary = json.loads((folder / "sft" / "summary.json").read_text())
    return {"points": points, "summary": summary}


def references(config: str) -> dict[str, float]:
    """Most-popular and the collaborative recommender (view 0, each user's whole training
    sequence as input, as the SASRec baseline reads it) on the validation candidates."""
    import datasets
    import torch
    from accelerate import Accelerator

    from hanorec import config as recipe
    from hanorec.collab import CollabConfig, collab_features, user_states
    from hanorec.metrics import target_ranks
    from hanorec.runtime import load_catalog, load_rows, prepare_data
    from hanorec.sft import SFTRun

    run = recipe.parse(SFTRun, ["--config", config], prog="learning_curve", description="")
    prepared = prepare_data(run.data, Accelerator(cpu=True))
    catalog = load_catalog(run.data, prepared)
    rows = load_rows(prepared, ["candidates"], "validation")
    index = catalog.index
    candidates = torch.tensor([[index[i] for i in r["candidates"]] for r in rows])
    targets = [int(r["target_index"]) for r in rows]
    popularity = torch.tensor(datasets.load_from_disk(str(prepared / "items"))["popularity"],
                              dtype=torch.float64)
    cfg = run.collab if run.collab.collab_fit == "crossfit" else CollabConfig(
        **{**run.collab.__dict__, "collab_fit": "crossfit"})
    features = collab_features(prepared, len(catalog), cfg)
    states = user_states(features.models[0], [features.sequences[str(r["user_id"])]
                                              for r in rows], cfg.sasrec_max_len)
    table = features.item_embeddings[0]
    sasrec = torch.einsum("ud,ucd->uc", states, table[candidates]).double()
    hr1 = lambda scores: float(np.mean(target_ranks(scores.numpy(), targets) == 1))  # noqa: E731
    return {"Most popular": hr1(popularity[candidates]),
            "SASRec (the token recommender)": hr1(sasrec),
            "users": len(rows)}


def write_outputs(results: dict[str, dict[str, Any]], refs: dict[str, float], out: Path,
                  machine: str, note: str = "") -> None:
    """``learning_curve.json``, ``.md`` (table) and ``.png`` (HR@1 vs examples and vs time)."""
    (out
     / "learning_curve.json").write_text(json.dumps({"conditions": results, "references": refs,
                                                     "machine": machine}, indent=2))
    marks = sorted({p["examples"] for r in results.values() for p in r["points"]})
    lines = [f"Validation HR@1 on all {refs['users']} users (`candidates`, 20 candidates; "
             "chance 0.05) after N training "
             f"examples. Machine: {machine}.", "",
             "| condition | " + " | ".join(f"{int(m)}" for m in marks)
             + " | train s / example | set-up s |",
             "|---|" + "---:|" * (len(marks) + 2)]
    for name, result in results.items():
        by = {p["examples"]: p["hr1"] for p in result["points"]}
        summary = result["summary"]
        per = summary["train_seconds"] / max(1, summary["train_examples_seen"])
        lines.append(f"| {CONDITIONS[name][0]} | "
                     + " | ".join(f"{by[m]:.3f}" if m in by else "–" for m in marks)
                     + f" | {per:.2f} | {summary.get('setup_seconds', 0):.0f} |")
    for label in ("Most popular", "SASRec (the token recommender)"):
        lines.append(f"| {label} | " + " | ".join(f"{refs[label]:.3f}" for _ in marks)
                     + " | – | – |")
    if note:
        lines += ["", note]
    (out / "learning_curve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(results, refs, out / "learning_curve.png")


def plot(results: dict[str, dict[str, Any]], refs: dict[str, float], path: Path) -> None:
    from hanorec.report import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for name, result in results.items():
        points = result["points"]
        for axis, key, scale in ((axes[0], "examples", 1), (axes[1], "seconds", 60)):
            axis.plot([p[key] / scale for p in points], [p["hr1"] for p in points], marker="o",
                      label=CONDITIONS[name][0])
    for axis, xlabel in ((axes[0], "training examples seen"),
                         (axes[1], "training minutes (CPU, see the note)")):
        for (label, style) in (("Most popular", ":"), ("SASRec (the token recommender)", "--")):
            axis.axhline(refs[label], color="grey", linestyle=style, label=label)
        axis.axhline(0.05, color="lightgrey", linestyle="-", label="chance (1/20)")
        axis.set_xlabel(xlabel)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("validation HR@1 (943 users)")
    axes[1].legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/ml100k-smollm2.yaml",
                        help="The recipe the conditions modify.")
    parser.add_argument("--examples", type=int, default=9600,
                        help="Most training examples per condition (the cap of the schedule).")
    parser.add_argument("--eval-every", type=int, default=1600,
                        help="Examples between validation HR@1 checks.")
    parser.add_argument("--patience", type=int, default=2,
                        help="Validations without a better HR@1 before a run stops (its best "
                             "weights are kept).")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of each run (OMP_NUM_THREADS; 0: torch's default). "
                             "Use 1 when two conditions run side by side on 2 cores.")
    parser.add_argument("--precision", default="auto", choices=("auto", "no", "bf16"),
                        help="mixed_precision of every run (auto: the faster one, measured).")
    parser.add_argument("--conditions", default=",".join(DEFAULT_CONDITIONS),
                        help=f"Comma-separated subset of {list(CONDITIONS)}.")
    parser.add_argument("--run-root", default="runs/learning-curve",
                        help="Folder of the runs and outputs.")
    parser.add_argument("--publish", action="store_true",
                        help="Copy the table and plot to benchmarks/results/.")
    parser.add_argument("--note", default="",
                        help="A line printed under the table (how the runs were made).")
    parser.add_argument("extra", nargs="*",
                        help="More hanorec.sft flags for every condition (after --).")
    args = parser.parse_args(argv)
    from hanorec import config as recipe
    from hanorec.hardware import describe_machine
    from hanorec.sft import SFTRun

    run = recipe.parse(SFTRun, ["--config", args.config, *args.extra], prog="learning_curve",
                       description="")
    batch = run.sft.per_device_batch_size * run.sft.gradient_accumulation_steps
    names = [n.strip() for n in args.conditions.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONDITIONS]
    if unknown:
        parser.error(f"unknown condition(s) {unknown}; choose from {list(CONDITIONS)}")
    out = Path(args.run_root)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in names:
        result = curve(run_condition(name, args, batch))
        result["summary"]["train_examples_seen"] = result["summary"]["steps"] * batch
        results[name] = result
    write_outputs(results, references(args.config), out, describe_machine(), args.note)
    if args.publish:
        for suffix in ("md", "png", "json"):
            shutil.copy(out / f"learning_curve.{suffix}",
                        ROOT / "benchmarks" / "results" / f"learning_curve.{suffix}")


if __name__ == "__main__":
    main()
