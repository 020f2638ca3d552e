"""Human-readable run report: ``report.md`` plus PNG plots.

:func:`write_report` writes ``run_dir/report.md`` with

* a metrics table — one row per metric, one column per run, each cell ``mean [low, high]``
  (the 95% bootstrap interval over users from :func:`hanorec.stats.summarize`);
* an optional paired comparison table (rows of :func:`hanorec.stats.compare_runs`);
* ``plots/training_curves.png`` — from ``run_dir/metrics.jsonl`` (one JSON object per line with
  ``step`` and keys such as ``train/loss``, ``rewards/margins``, ``hars/beta_mean``,
  ``eval/loss``), one panel per key group (the part before ``/``), whatever keys exist;
* ``plots/metrics.png`` — bars per metric, one bar per run, with interval error bars.

matplotlib (``pip install hanorec[report]``) is imported lazily with the Agg backend.

:func:`try_write_report` is the same, but prints a note instead of failing when matplotlib
is missing (the stages use it: their JSON outputs never depend on the optional extra).

This package is a library; its command line, ``python -m hanorec.report RUN_DIR ...``, lives
in :mod:`hanorec.report.__main__`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["load_training_log", "plot_metric_bars", "plot_training_curves", "pyplot",
           "try_write_report", "write_report"]

# known groups first, the rest alphabetical
PANEL_ORDER = ("train", "learning rate", "eval", "rewards", "hars")
#: Bookkeeping fields of a metrics.jsonl record (counters and clocks, not curves of the run).
NOT_CURVES = frozenset({"step", "time", "epoch", "train/epoch", "train/examples", "train/seconds",
                        "eval/seconds"})
# scales unlike the loss's
OWN_PANEL = {"train/lr": "learning rate", "train/grad_norm": "gradient norm"}
MetricTable = Mapping[str, Mapping[str, Any]]  # run -> metric -> {mean, low, high} or (m, l, h)


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only), with a clear error when missing."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("hanorec.report needs matplotlib for its plots: "
                          "pip install 'hanorec[report]' (or matplotlib>=3.8)") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _triple(value: Any, where: str) -> tuple[float, float, float]:
    """``(mean, low, high)`` from a dict with those keys or a 3-sequence."""
    if isinstance(value, Mapping):
        try:
            return float(value["mean"]), float(value["low"]), float(value["high"])
        except KeyError as error:
            raise ValueError(f"metrics_tables{where}: missing key {error}") from None
    if isinstance(value, Sequence) and len(value) == 3:
        return float(value[0]), float(value[1]), float(value[2])
    raise ValueError(f"metrics_tables{where}: expected {{mean, low, high}} or a 3-tuple")


def load_training_log(path: Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file; blank lines skipped, bad lines raise with the line."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object")
            records.append(record)
    return records


def _series(records: list[dict[str, Any]]) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """``{group: {key: (steps, values)}}`` for every numeric key but bookkeeping (step, wall time).

    A key's group is its prefix before ``/`` (``other`` without one), except the keys of
    ``OWN_PANEL``: a learning rate of 1e-4 on the loss's axis would draw as a flat zero line.
    """
    groups: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for index, record in enumerate(records):
        step = record.get("step", index)
        for key, value in record.items():
            if key in NOT_CURVES or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            group = OWN_PANEL.get(key) or (key.split("/", 1)[0] if "/" in key else "other")
            steps, values = groups.setdefault(group, {}).setdefault(key, ([], []))
            steps.append(float(step))
            values.append(float(value))
    return groups


def plot_training_curves(records: list[dict[str, Any]], path: Path) -> list[str] | None:
    """One panel per key group; returns the plotted groups, or None when nothing is numeric."""
    groups = _series(records)
    if not groups:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(len(groups), 1, figsize=(7, 2.6 * len(groups)), squeeze=False)
    order = sorted(groups,
                   key=lambda g: (PANEL_ORDER.index(g) if g in PANEL_ORDER else len(PANEL_ORDER),
                                  g))
    for axis, group in zip(axes[:, 0], order):
        keys = groups[group]
        for key, (steps, values) in sorted(keys.items()):
            axis.plot(steps, values, marker="." if len(steps) < 30 else None, label=key)
        axis.set_title(group)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return order


def plot_metric_bars(tables: dict[str, dict[str, tuple[float, float, float]]],
                     metrics: list[str], path: Path) -> None:
    """Grouped bars (metric on x, one bar per run) with the interval as error bars."""
    plt = pyplot()
    runs = list(tables)
    width = 0.8 / max(len(runs), 1)
    many = len(runs) > 4  # legend beside the axes, one distinct colour per run (tab20 beyond 10)
    colors = plt.get_cmap("tab20" if len(runs) > 10 else "tab10").colors
    fig, axis = plt.subplots(figsize=(max(5.0, 1.2 * len(metrics) * max(1, len(runs)) ** 0.5)
                                      + (3.5 if many else 0), 3.6))
    for r, run in enumerate(runs):
        xs, means, errors = [], [], [[], []]
        for m, metric in enumerate(metrics):
            if metric not in tables[run]:
                continue
            mean, low, high = tables[run][metric]
            xs.append(m - 0.4 + width * (r + 0.5))
            means.append(mean)
            errors[0].append(max(mean - low, 0.0))
            errors[1].append(max(high - mean, 0.0))
        axis.bar(xs, means, width=width, yerr=errors, capsize=3, label=run,
                 color=colors[r % len(colors)])
    axis.set_xticks(range(len(metrics)), metrics, rotation=30, ha="right")
    axis.set_ylabel("mean (95% interval)")
    axis.grid(axis="y", alpha=0.3)
    if many:
        axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        axis.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _metrics_markdown(tables: dict[str, dict[str, tuple[float, float, float]]],
                      metrics: list[str]) -> list[str]:
    runs = list(tables)
    lines = ["| metric | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for metric in metrics:
        cells = []
        for run in runs:
            if metric in tables[run]:
                mean, low, high = tables[run][metric]
                cells.append(f"{mean:.4f} [{low:.4f}, {high:.4f}]")
            else:
                cells.append("–")
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return lines


def _comparison_markdown(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    first = rows[0]
    name_a, name_b = first.get("run_a", "A"), first.get("run_b", "B")
    lines = [f"Paired over {first['n_users']} users; diff = {name_a} − {name_b}, 95% paired "
             "bootstrap interval; p-values two-sided (paired bootstrap, Wilcoxon signed-rank).", "",
             f"| metric | {name_a} | {name_b} | diff [95% CI] | p (bootstrap) | p (Wilcoxon) |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['metric']} | {row['mean_a']:.4f} | {row['mean_b']:.4f} | "
            f"{row['diff']:+.4f} [{row['diff_low']:+.4f}, {row['diff_high']:+.4f}] | "
            f"{row['p_bootstrap']:.3g} | {row['p_wilcoxon']:.3g} |")
    return lines


def write_report(
    run_dir: str | Path,
    *,
    title: str,
    metrics_tables: MetricTable,
    compare_runs: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Write ``run_dir/report.md`` and its PNG plots under ``run_dir/plots/``.

    Args:
        run_dir: the run directory; ``metrics.jsonl`` in it (if any) gives training curves.
        title: report heading.
        metrics_tables: ``{run name: {metric: {"mean", "low", "high"}}}`` (a 3-tuple also works),
            e.g. ``{"sasrec": summarize(per_user)}``.
        compare_runs: optional rows of :func:`hanorec.stats.compare_runs` (keys ``run_a`` and
            ``run_b`` name the runs when present).

    Returns:
        Path of ``report.md``.
    """
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    tables = {str(run): {str(m): _triple(v, f"[{run!r}][{m!r}]") for m, v in table.items()}
              for run, table in metrics_tables.items()}
    metrics = list(dict.fromkeys(m for table in tables.values() for m in table))
    lines = [f"# {title}", ""]
    if tables and metrics:
        lines += ["## Metrics", "",
                  "Mean over users with the 95% percentile-bootstrap interval over users.", ""]
        lines += _metrics_markdown(tables, metrics) + [""]
        plot_metric_bars(tables, metrics, plots / "metrics.png")
        lines += ["![metrics with 95% intervals](plots/metrics.png)", ""]
    if compare_runs:
        lines += ["## Paired comparison", ""] + _comparison_markdown(compare_runs) + [""]
    log_path = run_dir / "metrics.jsonl"
    if log_path.exists():
        groups = plot_training_curves(load_training_log(log_path), plots / "training_curves.png")
        if groups:
            lines += ["## Training curves", "",
                      f"Panels: {', '.join(groups)} (from `metrics.jsonl`).",
                      "", "![training curves](plots/training_curves.png)", ""]
    report = run_dir / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report


def try_write_report(run_dir: str | Path, **kwargs: Any) -> Path | None:
    """:func:`write_report`, or None with a one-line note when matplotlib is not installed.

    Args:
        run_dir: The run directory.
        **kwargs: The keyword arguments of :func:`write_report`.

    Returns:
        Path of ``report.md``, or None when the plots (the optional ``report`` extra) are missing.
    """
    try:
        return write_report(run_dir, **kwargs)
    except ImportError as err:  # matplotlib is the optional `report` extra
        print(f"report skipped: {err}")
        return None


_pyplot = pyplot  # the former private name (benchmarks imported it)
