"""``python -m hanorec.report RUN_DIR [RUN_DIR ...] [--out DIR] [--title TEXT]``.

Reads each run's ``summary.json`` (``{"metrics": {name: {"mean", "low", "high"}}}``) and writes
``report.md`` with its plots (:func:`hanorec.report.write_report`) into the first run directory
(or ``--out``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hanorec.cli import ArgumentParser, run
from hanorec.report import write_report


def _load_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    if not path.exists():
        raise ValueError(f"{path}: no summary.json in the run directory")
    summary = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(summary.get("metrics"), dict):
        raise ValueError(f"{path}: field 'metrics' must map metric names to {{mean, low, high}}")
    return summary["metrics"]


def main(argv: Sequence[str] | None = None) -> None:
    """Write the report of the run directories named in ``argv``."""
    parser = ArgumentParser(prog="python -m hanorec.report",
                            description="Write report.md + plots for run directories.")
    parser.add_argument("run_dirs", nargs="+", type=Path,
                        help="Run directories with summary.json.")
    parser.add_argument("--out", type=Path, default=None,
                        help="Report directory (default: first run).")
    parser.add_argument("--title", default="hanorec report")
    args = parser.parse_args(argv)
    tables = {run.name or str(run): _load_summary(run) for run in args.run_dirs}
    print(write_report(args.out or args.run_dirs[0], title=args.title, metrics_tables=tables))


if __name__ == "__main__":
    run(main)  # user errors: one `error:` line, exit 2
