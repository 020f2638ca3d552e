"""One report for a whole run: ``python -m hanorec.summary --run-dir runs/demo``.

It gathers what the stages of a run wrote — the evaluations (``<run>/eval/<name>/``), the
classic baselines (``<run>/baselines/<model>/``), the paired comparisons and the training logs of
SFT and DPO — into ``<run>/report.md`` with PNG plots (metric bars with 95% intervals, training
curves), and prints a short table to the terminal. Nothing is recomputed: every number is read
from the ``summary.json`` / ``comparison.json`` / ``metrics.jsonl`` files next to it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hanorec.cli import ArgumentParser
from hanorec.report import load_training_log, plot_metric_bars, plot_training_curves

#: The headline metrics of each protocol, in report order.
HEADLINE = ("candidates/HR@1", "candidates/NDCG@10", "candidates/MRR", "hit3/HR@3", "hit1/AUC",
            "full/HR@10", "full/NDCG@10")

Triple = tuple[float, float, float]


def _triples(metrics: dict[str, Any], prefix: str = "") -> dict[str, Triple]:
    return {prefix + k: (v["mean"], v["low"], v["high"]) for k,
            v in metrics.items() if isinstance(v, dict) and "mean" in v}


def collect_tables(run_dir: Path) -> dict[str, dict[str, Triple]]:
    """``{row name: {"protocol/metric": (mean, low, high)}}`` for baselines and evaluations."""
    tables: dict[str, dict[str, Triple]] = {}
    for summary in sorted((run_dir / "baselines").glob("*/summary.json")):
        data = json.loads(summary.read_text())
        name = {"popularity": "most-popular",
                "sasrec": "SASRec"}.get(data.get("model"), summary.parent.name)
        tables.setdefault(name, {}).update(_triples(data["metrics"], f"{data['protocol']}/"))
    for summary in sorted((run_dir / "eval").glob("*/summary.json")):
        data = json.loads(summary.read_text())
        tables[summary.parent.name.upper()] = _triples(data["metrics"])
    return tables


def _table(tables: dict[str, dict[str, Triple]], metrics: Sequence[str]) -> list[str]:
    lines = ["| model | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for name, row in tables.items():
        cells = [f"{row[m][0]:.3f} [{row[m][1]:.3f}, {row[m][2]:.3f}]" if m in row else "–"
                 for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _comparisons(run_dir: Path) -> list[str]:
    lines: list[str] = []
    for path in sorted((run_dir / "eval").glob("*/comparison.md")):
        body = path.read_text().split("\n", 1)[-1].strip()
        lines += [f"### {path.parent.name} vs. the other run ({path.relative_to(run_dir)})", "",
                  body, ""]
    return lines


def _curves(run_dir: Path, plots: Path) -> list[str]:
    lines: list[str] = []
    for stage in ("sft", "dpo", "recpo"):
        log = run_dir / stage / "metrics.jsonl"
        if log.is_file() and plot_training_curves(load_training_log(log),
                                                  plots / f"{stage}_curves.png"):
            lines += [f"### {stage.upper()}", "",
                      f"![{stage} training curves](plots/{stage}_curves.png)", ""]
    return lines


def write_summary(run_dir: str | Path) -> Path:
    """Write ``<run_dir>/report.md`` (+ ``plots/``) and return its path."""
    run_dir = Path(run_dir)
    tables = collect_tables(run_dir)
    if not tables:
        raise ValueError(f"{run_dir}: nothing to report (no eval/*/summary.json nor "
                         "baselines/*/summary.json)")
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    metrics = [m for m in HEADLINE if any(m in row for row in tables.values())]
    lines = [f"# hanorec run: `{run_dir}`", "",
             "Test split, one row per model; mean over users with its 95% bootstrap interval "
             "over users "
             "(hit1: AUC over all examples, users resampled). Ties count against the target.", ""]
    lines += _table(tables, metrics) + [""]
    plot_metric_bars(tables, metrics, plots / "models.png")
    lines += ["![headline metrics with 95% intervals](plots/models.png)", ""]
    compared = _comparisons(run_dir)
    if compared:
        lines += ["## Paired comparisons", ""] + compared
    curves = _curves(run_dir, plots)
    if curves:
        lines += ["## Training curves", ""] + curves
    stage_reports = sorted(p.relative_to(run_dir) for p in run_dir.glob("*/report.md")) + sorted(
        p.relative_to(run_dir) for p in run_dir.glob("*/*/report.md")
    )
    if stage_reports:
        lines += ["## Stage reports", ""] + [f"- [{p}]({p})" for p in stage_reports] + [""]
    report = run_dir / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(_table(tables,
                           [m for m in metrics
                            if m.startswith(("candidates/HR@1", "candidates/NDCG@10", "hit1/AUC",
                                             "full/HR@10"))])))
    print(f"\nreport: {report}")
    return report


def main(argv: Sequence[str] | None = None) -> Path:
    parser = ArgumentParser(prog="python -m hanorec.summary", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="Run folder (the recipe's run_dir).")
    return write_summary(parser.parse_args(argv).run_dir)


if __name__ == "__main__":
    from hanorec.cli import run as run_cli

    run_cli(main)  # user errors: one `error:` line, exit 2
