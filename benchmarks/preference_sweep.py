"""Which preference-stage lever earns its place? A sweep on validation users, from one SFT model.

    python benchmarks/preference_sweep.py --sft-checkpoint runs/cpu-hour/sft/final
        [--config configs/ml100k-smollm2.yaml] [--settings sft,dpo,neg-policy,...]
        [--steps 240] [--eval-every 60] [--run-root runs/preference-sweep] [--publish]
        [--threads N] [-- more hanorec.dpo flags]

Every *setting* is one ``hanorec.dpo`` run (a subprocess, as a user runs it) from the same SFT
checkpoint, for the same number of steps on the same training rows, that changes one lever of
the baseline preference stage (DPO, one random negative from the row's candidates, β 0.1,
lr 1e-4) — or is the control every preference method must beat: **continued SFT**
(``--loss sft``: the same stage, rows, steps, fresh adapter and schedule, with the SFT loss
−log π(target | x) instead of a preference loss). Each run validates before its first step and
every ``--eval-every`` steps on **all** validation users (``candidates`` HR@1 of the ranking
head, ``--rank-examples -1``) and keeps its best validation (``load_best_model_at_end``).
Choose by validation only: the test split is for the grid (``benchmarks/quality.py``).

The levers (:data:`SETTINGS`; ``--settings all`` runs every one):

=====================  ====================================================================
``sft``                continued SFT: the control
``dpo``                the baseline: DPO, 1 random negative, β 0.1, lr 1e-4
``neg-popular``        negatives: the most popular of the row's candidates
``neg-hard``           negatives: nearest the target in the head's item-vector space
``neg-collab``         negatives: the recommender's top-ranked wrong items (catalogue, pool 20)
``neg-policy``         negatives: the SFT model's own top-ranked wrong items (catalogue,
                       pool 20; drawn at random from the pool, RoDPO)
``neg-policy-fresh``   ``neg-policy`` redrawn from the current policy every 60 steps (SPRec)
``k3``, ``k7``         S-DPO with 3 or 7 random negatives
``beta-0.5/1/2``       β 0.5, 1, 2
``lr-5e-4``            learning rate 5e-4
``rpo``                an SFT term on the chosen item (RPO, weight 1)
=====================  ====================================================================

A finished run (``dpo/summary.json``) is reused and an interrupted one resumes (``--resume
true``), so the sweep can run in the background across sessions. Each finished setting's small
outputs (``summary.json``, ``metrics.jsonl`` and ``identity.json``: its command and the SHA-256
of the SFT adapter it started from) are also kept under ``benchmarks/results/preference-sweep/``
(``--store``), which is committed: a later session on a fresh machine reuses a stored setting
when its command and starting adapter are the same, and reruns it when either changed. Output:
``<run-root>/preference_sweep.{md,json,png}`` (validation HR@1 over steps per setting, the best
step and its gain over continued SFT at the same step count), copied to ``benchmarks/results/``
with ``--publish``.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))



def prepared_for(k: int) -> tuple[str, ...]:
    """Pairs with ``k`` negatives in their own prepared folder (``candidates`` and ``full`` only:
    ``hit3``'s 5 candidates cap K at 4), so that no setting re-prepares — and invalidates — the
    recipe's folder, whose fingerprint the SFT model's recommender cache follows."""
    return ("--num-negatives", str(k), "--protocols", "candidates,full",
            "--output-dir", f"{{cache}}/prepared/preference-sweep-k{k}")


#: The baseline preference stage every lever changes one thing of.
BASE = ("--loss", "sigmoid", "--beta", "0.1", "--learning-rate", "1e-4", *prepared_for(1),
        "--negative-sampling", "random", "--hardness", "none", "--noise", "none",
        "--reference", "frozen", "--sft-weight", "0")
CATALOGUE = ("--negative-scope", "catalogue", "--negative-pool", "20")
SETTINGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sft": ("continued SFT (the control)", ("--loss", "sft", "--reference", "none")),
    "dpo": ("DPO, 1 random negative, β 0.1", ()),
    "neg-popular": ("negatives: popular", ("--negative-sampling", "popular")),
    "neg-hard": ("negatives: hard (head space)", ("--negative-sampling", "hard")),
    "neg-collab": ("negatives: recommender's top (catalogue)",
                   ("--negative-sampling", "collab", *CATALOGUE)),
    "neg-policy": ("negatives: policy's top (catalogue)",
                   ("--negative-sampling", "policy", *CATALOGUE)),
    "neg-policy-fresh": ("negatives: policy's top, redrawn every 60 steps",
                         ("--negative-sampling", "policy", *CATALOGUE,
                          "--negative-refresh", "60")),
    "k3": ("S-DPO, K = 3", ("--loss", "sdpo", *prepared_for(3))),
    "k7": ("S-DPO, K = 7", ("--loss", "sdpo", *prepared_for(7))),
    "beta-0.5": ("β 0.5", ("--beta", "0.5")),
    "beta-1": ("β 1", ("--beta", "1.0")),
    "beta-2": ("β 2", ("--beta", "2.0")),
    "lr-5e-4": ("learning rate 5e-4", ("--learning-rate", "5e-4")),
    "rpo": ("+ SFT term (RPO, weight 1)", ("--sft-weight", "1.0")),
}


def setting_command(name: str, args: argparse.Namespace) -> list[str]:
    """The ``hanorec.dpo`` command line of one setting."""
    folder = Path(args.run_root) / name
    return [sys.executable, "-m", "hanorec.dpo", "--config", args.config,
               "--run-dir", str(folder), "--sft-checkpoint", args.sft_checkpoint,
               "--max-steps", str(args.steps), "--eval-every", str(args.eval_every),
               "--eval-on-start", "true", "--rank-examples", "-1",
               "--eval-examples", str(args.eval_pairs),
               "--metric-for-best-model", "eval/candidates_hr1",
               "--load-best-model-at-end", "true", "--save-every", str(args.eval_every),
               "--keep-checkpoints", "1", "--mixed-precision", "auto",
               "--max-train-pairs", str(args.pairs), "--resume", "true", "--seed", "0",
               *BASE, *SETTINGS[name][1], *args.extra]


STORED = ("summary.json", "metrics.jsonl")


def identity(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """What a stored result must match to be reused: the setting's command (without the
    interpreter and run folder) and the digest of the starting adapter's weights."""
    import hashlib

    command = setting_command(name, args)[3:]
    at = command.index("--run-dir")
    weights = Path(args.sft_checkpoint) / "adapter_model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None
    return {"command": command[:at] + command[at + 2:], "sft_adapter_sha256": digest}


def store(name: str, folder: Path, args: argparse.Namespace) -> None:
    """Keep a finished setting's small outputs in the repository's results folder."""
    kept = Path(args.store) / name
    kept.mkdir(parents=True, exist_ok=True)
    for file in STORED:
        shutil.copy(folder / "dpo" / file, kept / file)
    (kept / "identity.json").write_text(json.dumps(identity(name, args), indent=1) + "\n")


def restore(name: str, folder: Path, args: argparse.Namespace) -> bool:
    """Bring a stored result of the same command and starting adapter into ``folder``."""
    kept = Path(args.store) / name
    if not (kept / "identity.json").is_file():
        return False
    if json.loads((kept / "identity.json").read_text()) != identity(name, args):
        print(f"{name}: stored result in {kept} is for another command or adapter: rerunning")
        return False
    (folder / "dpo").mkdir(parents=True, exist_ok=True)
    for file in STORED:
        shutil.copy(kept / file, folder / "dpo" / file)
    return True


def run_setting(name: str, args: argparse.Namespace) -> Path:
    """One preference run (skipped when finished or stored, resumed when interrupted); its
    folder."""
    folder = Path(args.run_root) / name
    if (folder / "dpo" / "summary.json").is_file() or restore(name, folder, args):
        print(f"{name}: reusing {folder}", flush=True)
        if not (Path(args.store) / name / "identity.json").is_file():
            store(name, folder, args)
        return folder
    command = setting_command(name, args)
    print(f"{name}: {' '.join(command[3:])}", flush=True)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    started = time.time()
    subprocess.run(command, check=True, cwd=ROOT, env=env)
    print(f"{name}: {time.time() - started:.0f} s", flush=True)
    store(name, folder, args)
    return folder


def curve(folder: Path) -> dict[str, Any]:
    """Validation points (step, HR@1, reward margin) and the run's summary."""
    from hanorec.training import read_metrics

    records = read_metrics(folder / "dpo" / "metrics.jsonl")
    points = [{"step": r["step"], "hr1": r["eval/candidates_hr1"],
               "margin": r.get("eval/margins")} for r in records if "eval/candidates_hr1" in r]
    return {"points": points, "summary": json.loads((folder / "dpo" / "summary.json").read_text())}


def write_outputs(results: dict[str, dict[str, Any]], out: Path, machine: str) -> None:
    """``preference_sweep.json``, ``.md`` (HR@1 per validation step, best, gain over the
    control at the same step) and ``.png``."""
    (out / "preference_sweep.json").write_text(json.dumps({"settings": results,
                                                           "machine": machine}, indent=2))
    steps = sorted({p["step"] for r in results.values() for p in r["points"]})
    control = {p["step"]: p["hr1"] for p in results.get("sft", {}).get("points", [])}
    lines = [f"Validation HR@1 on all validation users (`candidates`, 20 candidates) over the "
             f"preference steps, from one SFT checkpoint. Machine: {machine}.", "",
             "| setting | " + " | ".join(f"step {s}" for s in steps)
             + " | best | − continued SFT (same step) | train s |", "|---|"
             + "---:|" * (len(steps) + 3)]
    for name, result in results.items():
        by = {p["step"]: p["hr1"] for p in result["points"]}
        best_step = max(by, key=lambda s: (by[s], -s)) if by else None
        gain = (by[best_step] - control[best_step]
                if best_step in control and name != "sft" else None)
        seconds = result["summary"].get("train_seconds") or result["summary"].get("seconds", 0)
        lines.append(f"| {SETTINGS[name][0]} | "
                     + " | ".join(f"{by[s]:.3f}" if s in by else "–" for s in steps)
                     + f" | {by[best_step]:.3f} @ {best_step} | "
                     + (f"{gain:+.3f}" if gain is not None else "–") + f" | {seconds:.0f} |")
    (out / "preference_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(results, out / "preference_sweep.png")


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    from hanorec.report import pyplot

    plt = pyplot()
    fig, axis = plt.subplots(figsize=(9, 4.5))
    for name, result in results.items():
        points = result["points"]
        axis.plot([p["step"] for p in points], [p["hr1"] for p in points], marker="o",
                  linewidth=2.5 if name == "sft" else 1.2, label=SETTINGS[name][0])
    axis.set_xlabel("preference steps")
    axis.set_ylabel("validation HR@1 (all users)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/ml100k-smollm2.yaml")
    parser.add_argument("--sft-checkpoint", required=True,
                        help="The SFT adapter every setting starts from (its plateau).")
    parser.add_argument("--settings", default="all",
                        help=f"Comma-separated subset of {list(SETTINGS)} (all: every one).")
    parser.add_argument("--steps", type=int, default=240, help="Preference steps per setting.")
    parser.add_argument("--eval-every", type=int, default=60,
                        help="Steps between validations (all validation users).")
    parser.add_argument("--pairs", type=int, default=0,
                        help="Training pairs (a seeded subset; 0: steps × batch is enough).")
    parser.add_argument("--eval-pairs", type=int, default=256,
                        help="Validation pairs of the preference loss and margin (HR@1 always "
                             "uses every validation user).")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per run (OMP_NUM_THREADS; 0: torch's default).")
    parser.add_argument("--run-root", default="runs/preference-sweep")
    parser.add_argument("--store", default=str(ROOT / "benchmarks" / "results"
                                               / "preference-sweep"),
                        help="Where finished settings' small outputs are kept and reused from "
                             "(committed, so the sweep resumes on a fresh machine).")
    parser.add_argument("--publish", action="store_true",
                        help="Copy the table, plot and numbers to benchmarks/results/.")
    parser.add_argument("extra", nargs="*", help="More hanorec.dpo flags (after --).")
    args = parser.parse_args(argv)
    from hanorec.hardware import describe_machine

    names = list(SETTINGS) if args.settings == "all" else [
        n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {unknown}; choose from {list(SETTINGS)}")
    if not args.pairs:
        from hanorec import config as recipe
        from hanorec.dpo import DPORun

        run = recipe.parse(DPORun, ["--config", args.config], prog="sweep", description="")
        args.pairs = args.steps * run.dpo.per_device_batch_size * (
            run.dpo.gradient_accumulation_steps)
    out = Path(args.run_root)
    out.mkdir(parents=True, exist_ok=True)
    results = {name: curve(run_setting(name, args)) for name in names}
    write_outputs(results, out, describe_machine())
    if args.publish:
        for suffix in ("md", "png", "json"):
            shutil.copy(out / f"preference_sweep.{suffix}",
                        ROOT / "benchmarks" / "results" / f"preference_sweep.{suffix}")


if __name__ == "__main__":
    main()
