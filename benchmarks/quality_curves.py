"""The quality benchmark's preference stage over its steps: validation HR@1 and reward margin.

Every preference run of the grid validates before its first step (``--eval-on-start``: the SFT
model it starts from, since the fresh adapter is zero) and every ``eval_every`` steps on the same
validation pairs. Its ``dpo/metrics.jsonl`` rows with ``eval/*`` keys are those validations:

* ``eval/candidates_hr1`` — HR@1 of the policy's ranking of the validation rows' candidates;
* ``eval/margins`` — the mean implicit reward margin ``β·[(log π − log π_ref)(y_w) −
  (log π − log π_ref)(y_l)]`` (DPO eq. 7; reference-free losses: ``β·(log π(y_w) − log π(y_l))``);
* ``eval/accuracies`` — the share of pairs whose margin is positive.

This module reads them per method and seed, averages over seeds, and renders a table and a
plot for ``benchmarks/results/ml100k.md``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CURVE_KEYS = {"hr1": "eval/candidates_hr1", "margin": "eval/margins", "accuracy": "eval/accuracies"}


@dataclass
class Curve:
    """One method's validations: ``{key: {step: [value per seed]}}``."""

    label: str
    values: dict[str, dict[int, list[float]]] = field(default_factory=dict)

    def add(self, key: str, step: int, value: float) -> None:
        self.values.setdefault(key, {}).setdefault(step, []).append(value)

    def steps(self) -> list[int]:
        return sorted({s for by_step in self.values.values() for s in by_step})

    def mean(self, key: str, step: int) -> float | None:
        seeds = self.values.get(key, {}).get(step)
        return float(np.mean(seeds)) if seeds else None


def read_validations(path: Path) -> list[dict[str, float]]:
    """The ``eval/*`` rows of one run's metrics log (``step`` included), in step order; the last
    row of a step wins (a resumed run may repeat one)."""
    by_step: dict[int, dict[str, float]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if any(k.startswith("eval/") for k in row):
            by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def read_curves(runs: dict[str, tuple[str, Sequence[Path]]]) -> dict[str, Curve]:
    """``{method: (label, [metrics.jsonl per seed])}`` → a :class:`Curve` per method with at
    least one log (missing logs are skipped: a method not yet run)."""
    curves: dict[str, Curve] = {}
    for name, (label, paths) in runs.items():
        curve = Curve(label)
        for path in paths:
            if not path.is_file():
                continue
            for row in read_validations(path):
                for key, column in CURVE_KEYS.items():
                    if column in row:
                        curve.add(key, int(row["step"]), float(row[column]))
        if curve.values:
            curves[name] = curve
    return curves


def curve_table(curves: dict[str, Curve]) -> list[str]:
    """Markdown: per method, validation HR@1 and reward margin at each validated step (mean
    over seeds; ``n`` seeds)."""
    if not curves:
        return []
    steps = sorted({s for c in curves.values() for s in c.steps()})
    head = ([f"HR@1 @ {s}" for s in steps] + [f"margin @ {s}" for s in steps])
    lines = ["| method | seeds | " + " | ".join(head) + " |", "|---|---:|" + "---:|" * len(head)]
    for curve in curves.values():
        seeds = max((len(v) for by_step in curve.values.values() for v in by_step.values()),
                    default=0)
        cells = [_cell(curve.mean("hr1", s), ".3f") for s in steps]
        cells += [_cell(curve.mean("margin", s), "+.3f") for s in steps]
        lines.append(f"| {curve.label} | {seeds} | " + " | ".join(cells) + " |")
    return lines


def _cell(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def plot_curves(curves: dict[str, Curve], path: Path) -> bool:
    """Two panels, validation HR@1 and reward margin against the step (mean over seeds).
    False when matplotlib is missing or there is nothing to plot."""
    try:
        from hanorec.report import pyplot
    except ImportError:
        return False
    if not curves:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.get_cmap("tab20").colors
    for n, curve in enumerate(curves.values()):
        for axis, key in zip(axes, ("hr1", "margin")):
            points = [(s, curve.mean(key, s)) for s in curve.steps()]
            points = [(s, v) for s, v in points if v is not None]
            if points:
                axis.plot(*zip(*points), marker="osD^v<>"[n % 7], color=colours[n % len(colours)],
                          label=curve.label if key == "hr1" else None)
    axes[0].set_ylabel("validation HR@1 (candidates)")
    axes[1].set_ylabel("validation reward margin")
    for axis in axes:
        axis.set_xlabel("preference step")
        axis.grid(alpha=0.3)
    fig.legend(fontsize="x-small", loc="center right")
    fig.tight_layout(rect=(0, 0, 0.78, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
