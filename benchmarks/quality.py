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

Stages, budgets and the runner live in :mod:`benchmarks.quality_grid`; this file pools the
per-user results, tests them and writes the page.

Statistics (written to ``<out>/ml100k.md``, raw numbers to ``<out>/ml100k.json``):

* The unit is a (seed, user) pair. Each metric's per-user values are pooled over seeds and the
  table shows their mean with a 95% percentile-bootstrap interval over the pooled units
  (:func:`hanorec.stats.bootstrap_ci`), so the interval covers user and seed variation at once.
* ``hit1`` AUC: DeLong placement values (:func:`hanorec.metrics.auc_contributions`) computed
  per seed on the evaluated users; their mean over a seed's users is that seed's AUC, so the
  pooled mean is the user-weighted mean of the per-seed AUCs.
* Paired tests (:func:`hanorec.stats.compare_runs`: paired bootstrap and Wilcoxon) of every
  method against DPO and against SFT on the (seed, user) units both evaluated.
* The LLM evaluations use a seeded subset of users per seed (``--eval-max-users``, seeded by the
  run seed); the classic baselines score every test user and are restricted to the same
  (seed, user) units before pooling, so every row of a protocol covers the same users.
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
from hanorec.hardware import describe_machine  # noqa: E402
from hanorec.metrics import auc_contributions  # noqa: E402
from hanorec.stats import bootstrap_ci, compare_runs, holm  # noqa: E402

__all__ = ["BUDGETS", "BY_NAME", "METHODS", "Budget", "Method", "Plan", "Stage", "execute", "grid",
           "main", "run_stage",
           "write_results"]

HEADLINE = ("candidates/HR@1", "candidates/NDCG@10", "hit1/AUC", "full/NDCG@10")
TABLE_METRICS = ("candidates/HR@1", "candidates/HR@5", "candidates/NDCG@5", "candidates/NDCG@10",
                 "candidates/MRR",
                 "hit1/AUC", "full/HR@10", "full/NDCG@10")


# ----------------------------------------------------------------------------- results


Units = dict[str, dict[str, float]]  # metric -> {"seed:user": value}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def per_user_file(plan: Plan, seed: int, method: Method, protocol: str) -> Path:
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
    for row, adjusted in zip(rows, holm([r["p_wilcoxon"] for r in rows])):
        # one family per reference: every method and metric against it
        row["p_wilcoxon_holm"] = adjusted
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
                        method.kind == "baseline" and key.startswith(f"seed{seed}/baselines-")):
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


# ----------------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


def markdown(methods: Sequence[Method], table: dict, tests: list[dict], cost: dict,
             meta: dict[str, Any]) -> str:
    """The results page: settings, quality table, cost table, paired tests."""
    metrics = [m for m in TABLE_METRICS if any(m in table[x.name] for x in methods)]
    lines = [f"# Quality benchmark — {meta['title']}", "",
             f"Recipe `{meta['config']}`, budget `{meta['budget']}`, seeds {meta['seeds']}, "
             f"run folders under `{meta['run_root']}`. Generated by `benchmarks/quality.py` "
             "(see `benchmarks/results/README.md`).", "",
             f"Machine: {meta.get('machine', 'unknown')}; precision "
             f"{'bf16 autocast' if meta.get('bf16') else 'fp32'}; "
             f"compute of all stages {_fmt(meta.get('stage_seconds'), '.0f')} s "
             f"({_fmt((meta.get('stage_seconds') or 0) / 3600, '.2f')} h, one stage at a time).",
             "",
             "Mean over (seed, user) units pooled across seeds, with a 95% percentile-bootstrap "
             "interval over "
             "those units; `hit1/AUC` is the mean of per-seed DeLong placement values (the "
             "user-weighted mean of "
             "the per-seed AUCs). `n` is the number of (seed, user) units of the first metric.", "",
             "| method | n | " + " | ".join(metrics) + " |", "|---|---:|" + "---|" * len(metrics)]
    for method in methods:
        row = table[method.name]
        n = next((row[m][3] for m in metrics if m in row), 0)
        cells = [f"{row[m][0]:.4f} [{row[m][1]:.4f}, {row[m][2]:.4f}]" if m in row else "–"
                 for m in metrics]
        lines.append(f"| {method.label} | {n} | " + " | ".join(cells) + " |")
    lines += ["", "## Training cost (per seed; mean over seeds, peak memory = max)", "",
              "Preference methods' rows exclude the shared SFT stage (its cost is the `SFT "
              "only` row); "
              "baseline rows are the baselines CLI (both models, all protocols) per call.", "",
              "| method | train wall s | train CPU s | train peak RSS MB | steps | eval wall s |",
              "|---|---:|---:|---:|---:|---:|"]
    for method in methods:
        c = cost[method.name]
        lines.append(f"| {method.label} | {_fmt(c['train_seconds'])} | "
                     f"{_fmt(c['train_cpu_seconds'])} | {_fmt(c['train_peak_mb'], '.0f')} | "
                     f"{_fmt(c['steps'], '.0f')} | {_fmt(c['eval_seconds'])} |")
    lines += ["", "## Paired tests (method − reference, same (seed, user) units)", "",
              "`p (Holm)` is the Wilcoxon p adjusted by Holm's step-down procedure over every "
              "row with the "
              "same reference (all methods and metrics against it), so `p (Holm) ≤ 0.05` holds "
              "the chance "
              "of any false claim in that family at 5%.", "",
              "| method | reference | metric | units | diff [95% CI] | p (bootstrap) | p "
              "(Wilcoxon) | p (Holm) |",
              "|---|---|---|---:|---|---:|---:|---:|"]
    labels = {m.name: m.label for m in methods}
    lines += [f"| {labels[r['method']]} | {labels.get(r['reference'], r['reference'])} | "
              f"{r['metric']} | {r['n_users']} | "
              f"{r['diff']:+.4f} [{r['diff_low']:+.4f}, {r['diff_high']:+.4f}] | "
              f"{r['p_bootstrap']:.3g} | "
              f"{r['p_wilcoxon']:.3g} | {r['p_wilcoxon_holm']:.3g} |" for r in tests]
    if meta.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in meta["plots"]]
    return "\n".join(lines) + "\n"


def plots(methods: Sequence[Method], table: dict, cost: dict, out: Path, stem: str) -> list[str]:
    """Headline metric bars with intervals, and quality against training time."""
    try:
        from hanorec.report import plot_metric_bars, pyplot
    except ImportError as err:
        print(f"plots skipped: {err}")
        return []
    tables = {m.label: {k: v[:3] for k, v in table[m.name].items()} for m in methods}
    metrics = [m for m in HEADLINE if any(m in t for t in tables.values())]
    if not metrics:
        return []
    names = [f"{stem}-quality.png"]
    plot_metric_bars(tables, metrics, out / names[0])
    points = [(cost[m.name]["train_seconds"], table[m.name][metrics[0]][0], m.label)
              for m in methods
              if cost[m.name]["train_seconds"] and metrics[0] in table[m.name]]
    if points:
        plt = pyplot()
        fig, axis = plt.subplots(figsize=(9, 4))
        colours = plt.get_cmap("tab20").colors
        # a legend, not annotations: close points overlap
        for n, (seconds, value, label) in enumerate(points):
            axis.scatter(seconds, value, color=colours[n % len(colours)], marker="osD^v<>"[n % 7],
                         s=40, label=label)
        axis.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5))
        axis.set_xscale("log")
        axis.set_xlabel("training wall time per seed (s, log)")
        axis.set_ylabel(metrics[0])
        axis.grid(alpha=0.3)
        fig.tight_layout()
        names.append(f"{stem}-cost.png")
        fig.savefig(out / names[1], dpi=100)
        plt.close(fig)
    return names


def write_results(plan: Plan, methods: Sequence[Method], seeds: Sequence[int], records: dict,
                  out: Path,
                  meta: dict[str, Any], n_resamples: int) -> Path:
    """Pool, test, plot and write ``<out>/<stem>.md`` and ``<out>/<stem>.json``."""
    results = collect(plan, methods, seeds)
    table = summary_table(results, n_resamples)
    metrics = [m for m in HEADLINE if m != "full/NDCG@10"] + ["full/NDCG@10"]
    tests = [row for ref in ("dpo", "sft") if ref in results
             for row in paired_tests(results, ref, metrics, n_resamples)
             # SFT vs DPO is DPO vs SFT with the sign flipped
             if not (ref == "dpo" and row["method"] == "sft")]
    cost = cost_table(records, methods, seeds)
    out.mkdir(parents=True, exist_ok=True)
    stem = meta["stem"]
    seconds = [r["seconds"] for r in records.values() if "seconds" in r]
    meta = {**meta, "plots": plots(methods, table, cost, out, stem),
            "stage_seconds": sum(seconds) if seconds else None}
    path = out / f"{stem}.md"
    path.write_text(markdown(methods, table, tests, cost, meta), encoding="utf-8")
    raw = {"meta": meta, "table": {k: {m: list(v) for m, v in t.items()} for k, t in table.items()},
           "tests": tests, "cost": cost, "stages": records}
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
                 "dpo_steps": args.dpo_steps, "train_examples": args.train_examples}
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
