"""Quality benchmark on MovieLens-100K: every method, several seeds, paired tests, cost.

    python benchmarks/quality.py [--config configs/ml100k-smollm2.yaml] [--seeds 0,1,2]
        [--methods sft,dpo,hanorec-nodo,...] [--out benchmarks/results] [--full | --smoke]
    bash recipes/benchmark-ml100k.sh            (the same, with the defaults)

Each stage is a subprocess call of the toolkit's own CLIs (``hanorec.data``, ``hanorec.sft``,
``hanorec.dpo``, ``hanorec.evaluate``, ``hanorec.baselines`` and, when present,
``hanorec.bpo`` / ``hanorec.recpo``) with its own run folder
``<run-root>/seed<k>/<method>/`` (default ``runs/benchmark-ml100k``, git-ignored). A stage whose
output exists (``final/`` of a training stage, ``summary.json`` of an evaluation) is skipped on
a rerun, so an interrupted grid resumes stage by stage. Every preference method of seed ``k``
starts from the same SFT checkpoint ``seed<k>/sft/sft/final``.

Stages, budgets and the runner live in :mod:`benchmarks.quality_grid` (stages run method by
method, every seed of one method before the next, so a grid cut short is missing whole methods);
this file pools the per-user results and tests them; :mod:`benchmarks.quality_page` lays out the
page and :mod:`benchmarks.quality_curves` reads the preference stages' validation curves.

Statistics (written to ``<out>/ml100k.md``, raw numbers to ``<out>/ml100k.json``):

* The unit is a (seed, user) pair. Each metric's per-user values are pooled over seeds and the
  table shows their mean with a 95% percentile-bootstrap interval over the pooled units
  (:func:`hanorec.stats.bootstrap_ci`), so the interval covers user and seed variation at once.
* ``hit1`` AUC: DeLong placement values (:func:`hanorec.metrics.auc_contributions`) computed
  per seed on the evaluated users; their mean over a seed's users is that seed's AUC, so the
  pooled mean is the user-weighted mean of the per-seed AUCs.
* Paired tests (:func:`hanorec.stats.compare_runs`: paired bootstrap and Wilcoxon) on the
  (seed, user) units both evaluated, trained − reference: every preference method against DPO;
  every model trained from or beside SFT, and most-popular, against SFT; every language-model
  row against SASRec. Holm's correction within each reference's family.
* The poster (blind) gap: methods marked ``blind_eval`` are evaluated a second time with the
  posters removed from every prompt (``hanorec.evaluate --blind true``); the page pairs the two.
* The CPU budget evaluates every test user; a budget with ``eval_users`` uses a seeded subset per
  seed (seeded by the run seed); the classic baselines score every test user and are restricted
  to the same (seed, user) units before pooling, so every row of a protocol covers the same
  users.
"""


from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quality_curves import Curve, plot_curves, read_curves  # noqa: E402
from benchmarks.quality_grid import (  # noqa: E402
    BUDGETS,
    BY_NAME,
    EVAL_NAME,
    LLM_PROTOCOLS,
    METHODS,
    Budget,
    Method,
    Plan,
    Stage,
    execute,
    grid,
    run_stage,
)
from benchmarks.quality_page import markdown, plots  # noqa: E402
from hanorec.hardware import describe_machine  # noqa: E402
from hanorec.metrics import auc_contributions  # noqa: E402
from hanorec.stats import bootstrap_ci, compare_runs, holm  # noqa: E402

__all__ = ["BUDGETS", "BY_NAME", "METHODS", "Budget", "Method", "Plan", "Stage", "execute", "grid",
           "main", "run_stage",
           "write_results"]

HEADLINE = ("candidates/HR@1", "candidates/NDCG@10", "hit1/AUC", "hit3/HR@3", "full/NDCG@10")
# the paired tests: every method against each reference, Holm-corrected per reference
TEST_METRICS = ("candidates/HR@1", "candidates/NDCG@10", "hit1/AUC", "hit3/HR@3", "full/NDCG@10")
BLIND = "@blind"  # suffix of a row evaluated with the posters removed from every prompt


# ----------------------------------------------------------------------------- results


Units = dict[str, dict[str, float]]  # metric -> {"seed:user": value}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def per_user_file(plan: Plan, seed: int, method: Method, protocol: str) -> Path:
    if method.name.endswith(BLIND):  # hanorec.evaluate --blind true: <protocol>-blind.jsonl
        own = replace(method, name=method.name.removesuffix(BLIND))
        path = per_user_file(plan, seed, own, protocol)
        return path.with_name(f"{protocol}-blind.jsonl")
    if method.kind == "baseline":
        return plan.seed_dir(seed) / "baselines" / protocol / method.name / "per_user.jsonl"
    if method.kind == "recpo":
        return plan.run_dir(seed, method.name) / "recpo" / "per_user" / f"{protocol}.jsonl"
    return plan.run_dir(seed, method.name) / "eval" / EVAL_NAME / "per_user" / f"{protocol}.jsonl"


def protocol_units(records: list[dict[str, Any]], protocol: str, seed: int,
                   users: set[str] | None) -> Units:
    """Per-user values of one seed keyed ``seed:user``; ``hit1`` becomes DeLong placements
    (``AUC``).

    ``users`` restricts the records first (the baselines to the users the LLMs were evaluated on);
    the hit1 placements are computed after the restriction, so their mean is the AUC of those users.
    """
    if users is not None:
        records = [r for r in records if str(r["user_id"]) in users]
    if not records:
        return {}
    keys = [f"{seed}:{r['user_id']}" for r in records]
    if protocol == "hit1":
        scores = np.array([r["score"] for r in records], dtype=np.float64)
        labels = np.array([r["label"] for r in records], dtype=np.float64)
        if labels.min() == labels.max():
            return {}
        return {"hit1/AUC": dict(zip(keys, auc_contributions(scores, labels).tolist()))}
    names = [k for k in records[0] if k != "user_id"]
    return {f"{protocol}/{name}": dict(zip(keys, (float(r[name]) for r in records)))
            for name in names}


def collect(plan: Plan, methods: Sequence[Method], seeds: Sequence[int]) -> dict[str, Units]:
    """``{method: {metric: {seed:user: value}}}`` over every finished evaluation."""
    llm = [m for m in methods if m.kind != "baseline"]
    out: dict[str, Units] = {m.name: {} for m in methods}
    for seed in seeds:
        for protocol in (*LLM_PROTOCOLS, "full"):
            evaluated: set[str] = set()
            for method in llm:
                path = per_user_file(plan, seed, method, protocol)
                if path.is_file():
                    records = _read_jsonl(path)
                    evaluated |= {str(r["user_id"]) for r in records}
                    _merge(out[method.name], protocol_units(records, protocol, seed, None))
            for method in (m for m in methods if m.kind == "baseline"):
                path = per_user_file(plan, seed, method, protocol)
                if path.is_file():
                    _merge(out[method.name],
                           protocol_units(_read_jsonl(path), protocol, seed, evaluated or None))
    return out


def with_blind_rows(methods: Sequence[Method]) -> list[Method]:
    """``methods`` with a ``<name>@blind`` row after each method evaluated without its posters."""
    rows: list[Method] = []
    for method in methods:
        rows.append(method)
        if method.blind_eval:
            rows.append(replace(method, name=method.name + BLIND, blind_eval=False,
                                label=f"{method.label}, posters removed at test"))
    return rows


def blind_gaps(results: dict[str, Units], metrics: Sequence[str],
               n_resamples: int) -> list[dict[str, Any]]:
    """Paired ``with posters − posters removed`` of each blind-evaluated method, per metric."""
    rows = []
    for name in results:
        if name.endswith(BLIND):
            own = name.removesuffix(BLIND)
            rows += paired_tests({own: results.get(own, {}), name: results[name]}, name, metrics,
                                 n_resamples)
    return rows


def _merge(into: Units, part: Units) -> None:
    for metric, values in part.items():
        into.setdefault(metric, {}).update(values)


def summary_table(results: dict[str, Units],
                  n_resamples: int) -> dict[str, dict[str, tuple[float, float, float, int]]]:
    """``{method: {metric: (mean, low, high, units)}}``: pooled (seed, user) bootstrap."""
    table: dict[str, dict[str, tuple[float, float, float, int]]] = {}
    for method, units in results.items():
        table[method] = {}
        for metric, values in units.items():
            mean, low, high = bootstrap_ci(list(values.values()), n_resamples=n_resamples, seed=0)
            table[method][metric] = (mean, low, high, len(values))
    return table


def paired_tests(results: dict[str, Units], reference: str, metrics: Sequence[str],
                 n_resamples: int) -> list[dict[str, Any]]:
    """Every method against ``reference`` on the (seed, user) units both have, per metric."""
    rows = []
    base = results.get(reference, {})
    for method, units in results.items():
        if method == reference:
            continue
        for metric in metrics:
            a, b = units.get(metric, {}), base.get(metric, {})
            shared = sorted(set(a) & set(b))
            if len(shared) < 2:
                continue
            (row,) = compare_runs({metric: [a[k] for k in shared]},
                                  {metric: [b[k] for k in shared]}, shared, shared,
                                  n_resamples=n_resamples, seed=0)
            rows.append({**row, "method": method, "reference": reference})
    if not rows:
        return rows
    for row, adjusted in zip(rows, holm([r["p_wilcoxon"] for r in rows])):
        # one family per reference: every method and metric against it
        row["p_wilcoxon_holm"] = adjusted
    return rows


def reference_tests(results: dict[str, Units], methods: Sequence[Method],
                    n_resamples: int) -> list[dict[str, Any]]:
    """The paired tests, one Holm family per reference, each pair once, trained − reference:

    * against continued SFT (the equal-compute control): every preference method;
    * against DPO: every other preference method (DPO, S-DPO, SimPO, HaNoRec, BPO, ...);
    * against SFT: every model trained from or beside it (preference methods, RecPO, the SFT
      ablations) and most-popular;
    * against SASRec: every language-model row, SFT included.

    The blind rows only enter :func:`blind_gaps`.
    """
    kinds = {m.name: m.kind for m in methods if not m.name.endswith(BLIND)}
    llm = {n for n, k in kinds.items() if k != "baseline"}
    preference = {n for n, k in kinds.items() if k in ("dpo", "bpo")} - {"continued-sft"}
    families = {"continued-sft": preference, "dpo": preference,
                "sft": (llm - {"sft"}) | {"popularity"}, "sasrec": llm}
    rows: list[dict[str, Any]] = []
    for ref, members in families.items():
        if ref in results:
            units = {k: v for k, v in results.items() if k in members or k == ref}
            rows += paired_tests(units, ref, TEST_METRICS, n_resamples)
    return rows


def cost_table(records: dict[str, dict[str, Any]], methods: Sequence[Method],
               seeds: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Per method: mean training seconds and steps over seeds, max peak RSS, mean evaluation
    seconds."""
    out = {}
    for method in methods:
        keys = {"train": [], "eval": []}
        for seed in seeds:
            for key, rec in records.items():
                if not key.startswith(f"seed{seed}/{method.name}/") and not (
                        method.kind == "baseline" and key.startswith(f"seed{seed}/baselines/")):
                    continue
                if "seconds" in rec:
                    keys["eval" if key.endswith("/eval") else "train"].append(rec)
        train = keys["train"]
        steps = [r["steps"] for r in train if r.get("steps") is not None]
        out[method.name] = {
            "train_seconds": float(np.mean([r["seconds"] for r in train])) if train else None,
            "train_cpu_seconds": float(np.mean([r["cpu_seconds"] for r in train])) if train and all(
                "cpu_seconds" in r for r in train) else None,
            "train_peak_mb": max((r["peak_rss_mb"] for r in train), default=None),
            "steps": float(np.mean(steps)) if steps else None,
            "eval_seconds": float(np.mean([r["seconds"] for r in keys["eval"]])) if keys["eval"]
            else None,
        }
    return out


def preference_curves(plan: Plan, methods: Sequence[Method],
                      seeds: Sequence[int]) -> dict[str, Curve]:
    """The validation curve of every preference method (its ``dpo/metrics.jsonl`` per seed)."""
    runs = {m.name: (m.label, [plan.run_dir(s, m.name) / "dpo" / "metrics.jsonl" for s in seeds])
            for m in methods if m.kind in ("dpo", "bpo") and not m.name.endswith(BLIND)}
    return read_curves(runs)


def unfinished(methods: Sequence[Method], results: dict[str, Units]) -> list[str]:
    """Requested methods without any evaluated unit (cut by the budget, or failed)."""
    return [m.name for m in methods if not results.get(m.name)]


def write_results(plan: Plan, methods: Sequence[Method], seeds: Sequence[int], records: dict,
                  out: Path,
                  meta: dict[str, Any], n_resamples: int) -> Path:
    """Pool, test, plot and write ``<out>/<stem>.md`` and ``<out>/<stem>.json``."""
    methods = with_blind_rows(methods)
    results = collect(plan, methods, seeds)
    table = summary_table(results, n_resamples)
    tests = reference_tests(results, methods, n_resamples)
    gaps = blind_gaps(results, TEST_METRICS, n_resamples)
    curves = preference_curves(plan, methods, seeds)
    cost = cost_table(records, methods, seeds)
    out.mkdir(parents=True, exist_ok=True)
    stem = meta["stem"]
    seconds = [r["seconds"] for r in records.values() if "seconds" in r]
    names = plots(methods, table, cost, out, stem, HEADLINE)
    if plot_curves(curves, out / f"{stem}-preference.png"):
        names.append(f"{stem}-preference.png")
    meta = {**meta, "plots": names, "cut": unfinished(methods, results),
            "stage_seconds": sum(seconds) if seconds else None}
    path = out / f"{stem}.md"
    path.write_text(markdown(methods, table, tests, gaps, curves, cost, meta), encoding="utf-8")
    raw = {"meta": meta, "table": {k: {m: list(v) for m, v in t.items()} for k, t in table.items()},
           "tests": tests, "blind_gaps": gaps,
           "curves": {k: {"label": c.label, "values": c.values} for k, c in curves.items()},
           "cost": cost, "stages": records}
    (out / f"{stem}.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    print(f"results written to {path}")
    return path


# ----------------------------------------------------------------------------- CLI


def prepared_dir(config: Path) -> Path:
    """The recipe's prepared-data folder (``data.output_dir`` with ``{cache}`` resolved)."""
    from hanorec.data.cli_args import parse_data_cli

    data = parse_data_cli(["--config", str(config)])
    return Path(data.path(data.output_dir))


def select_methods(names: str) -> list[Method]:
    """``all`` or a comma list; unknown names are errors, unavailable optional methods are
    dropped."""
    if names == "all":
        chosen = list(METHODS)
    else:
        unknown = [n for n in names.split(",") if n not in BY_NAME]
        if unknown:
            raise ValueError(f"--methods: unknown method {unknown[0]!r}; choose from "
                             f"{', '.join(BY_NAME)}")
        chosen = [m for m in METHODS if m.name in names.split(",")]
    for method in chosen:
        if not method.available():
            print(f"{method.name}: {method.module} does not exist yet, left out")
    return [m for m in chosen if m.available()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmarks/quality.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/ml100k-smollm2.yaml",
                        help="Recipe (data, backbone, stage settings).")
    parser.add_argument("--methods", default="all",
                        help=f"Comma list or 'all': {', '.join(BY_NAME)}.")
    parser.add_argument("--seeds", default="0,1,2",
                        help="Comma list of training seeds (>= 3 for the published table).")
    parser.add_argument("--out", default="benchmarks/results",
                        help="Folder of <stem>.md, <stem>.json and the PNGs.")
    parser.add_argument("--stem", default="ml100k", help="File name stem of the results.")
    parser.add_argument("--run-root", default="runs/benchmark-ml100k",
                        help="Per-stage run folders (git-ignored).")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true",
                      help="GPU scale: the recipe's steps, every test user.")
    size.add_argument("--smoke", action="store_true",
                      help="Tiny run for `make test`: 2 steps, 6 users, one seed.")
    parser.add_argument("--eval-users", type=int, default=None,
                        help="Override the users evaluated per protocol and seed.")
    parser.add_argument("--sft-steps", type=int, default=None,
                        help="Override the SFT steps of the budget.")
    parser.add_argument("--dpo-steps", type=int, default=None,
                        help="Override the preference-stage steps of the budget.")
    parser.add_argument("--train-examples", type=int, default=None,
                        help="Override the SFT rows (and preference pairs) drawn per run; raise "
                             "it with the steps, or "
                             "longer runs repeat the same few rows.")
    parser.add_argument("--bootstrap-resamples", type=int, default=1000,
                        help="Resamples of intervals and paired tests.")
    parser.add_argument("--dry-run", action="store_true",
                        help="Print the stage commands without running them.")
    parser.add_argument("--report-only", action="store_true",
                        help="Only rebuild the results page from finished stages.")
    return parser


def main(argv: Sequence[str] | None = None) -> Path | None:
    args = build_parser().parse_args(argv)
    budget = BUDGETS["full" if args.full else "smoke" if args.smoke else "cpu"]
    overrides = {"eval_users": args.eval_users, "full_users": args.eval_users,
                 "sft_steps": args.sft_steps,
                 "dpo_steps": args.dpo_steps, "train_examples": args.train_examples,
                 "pairs": args.train_examples}
    budget = replace(budget, **{k: v for k, v in overrides.items() if v is not None})
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds:
        raise ValueError("--seeds: no seed given")
    methods = select_methods(args.methods)
    config = Path(args.config).resolve()
    run_root = Path(args.run_root).resolve()
    plan = Plan(config, run_root, budget, prepared_dir(config))
    stages = grid(plan, methods, seeds)
    started = time.perf_counter()
    if args.report_only:
        path = run_root / "stages.json"
        records = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    else:
        records = execute(stages, run_root, dry_run=args.dry_run)
    if args.dry_run:
        return None
    print(f"grid finished in {time.perf_counter() - started:.1f} s")
    failures = sorted(k for k, r in records.items() if "failed" in r and not _stage_done(stages, k))
    name = "full" if args.full else "smoke" if args.smoke else "cpu"
    meta = {"title": "MovieLens-100K", "config": str(args.config), "budget": name, "seeds": seeds,
            "run_root": str(args.run_root), "stem": args.stem, "bf16": budget.uses_bf16(),
            "machine": describe_machine(),
            "budget_values": {k: list(v) if isinstance(v, tuple) else v for k,
                              v in budget.__dict__.items()}}
    path = write_results(plan, methods, seeds, records, Path(args.out), meta,
                         args.bootstrap_resamples)
    if failures:
        raise SystemExit(f"{len(failures)} stage(s) failed: {', '.join(failures)} (logs in "
                         f"{run_root / 'logs'})")
    return path


def _stage_done(stages: Sequence[Stage], key: str) -> bool:
    return any(s.key == key and s.done.exists() for s in stages)


if __name__ == "__main__":
    main()
