"""Tests for hanorec.report: report.md with numbers, valid PNG plots, CLI."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from hanorec.report import load_training_log, write_report
from hanorec.report.__main__ import main as report_main


def _write_log(run_dir):
    lines = []
    for step in range(1, 21):
        lines.append({"step": step, "train/loss": 1.0 / step, "rewards/margins": 0.1 * step,
                      "rewards/accuracies": min(1.0, 0.5 + 0.03 * step),
                      "hars/beta_mean": 0.1, "hars/beta_min": 0.05, "hars/beta_max": 0.2})
        if step % 10 == 0:
            lines.append({"step": step, "eval/loss": 0.9 / step})
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def _png_paths(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", markdown)


def test_report_has_table_numbers_and_valid_pngs(tmp_path):
    """Two runs, one metric each with (mean, low, high); the cells read
    '0.4200 [0.3900, 0.4500]' and '0.1700 [0.1500, 0.1900]'; the comparison row shows the
    signed difference; both referenced PNGs exist and PIL can load them."""
    _write_log(tmp_path)
    tables = {"sasrec": {"HR@1": {"mean": 0.42, "low": 0.39, "high": 0.45, "n": 943}},
              "popularity": {"HR@1": (0.17, 0.15, 0.19)}}
    rows = [{"metric": "HR@1", "n_users": 943, "mean_a": 0.42, "mean_b": 0.17, "diff": 0.25,
             "diff_low": 0.21, "diff_high": 0.29, "p_bootstrap": 0.002, "p_wilcoxon": 1e-20,
             "run_a": "sasrec", "run_b": "popularity"}]
    path = write_report(tmp_path, title="Demo", metrics_tables=tables, compare_runs=rows)
    text = path.read_text()
    assert path == tmp_path / "report.md" and text.startswith("# Demo")
    assert "| HR@1 | 0.4200 [0.3900, 0.4500] | 0.1700 [0.1500, 0.1900] |" in text
    assert "+0.2500 [+0.2100, +0.2900]" in text
    pngs = _png_paths(text)
    assert pngs == ["plots/metrics.png", "plots/training_curves.png"]
    for relative in pngs:
        with Image.open(tmp_path / relative) as image:
            image.verify()
    assert "Panels: train, eval, rewards, hars" in text


def test_curve_panels_skip_bookkeeping_and_give_lr_its_own_axis(tmp_path):
    """A DPO log carries ``time`` (epoch seconds, ~1.8e9) and ``train/lr`` (~1e-4) beside the
    loss (~0.7). Plotted as they come, the time would be a panel of its own ("other") and the
    learning rate a flat zero line on the loss's axis. Expected panels, in order:
    train (loss only), learning rate, gradient norm — and no "other"."""
    from hanorec.report import _series, plot_training_curves

    records = [{"step": s, "time": 1.796e9 + s, "train/loss": 0.7 / s, "train/lr": 1e-4,
                "train/grad_norm": 0.5} for s in range(1, 6)]
    groups = _series(records)
    assert set(groups) == {"train", "learning rate", "gradient norm"}
    assert set(groups["train"]) == {"train/loss"}
    order = plot_training_curves(records, tmp_path / "curves.png")
    assert order == ["train", "learning rate", "gradient norm"]
    with Image.open(tmp_path / "curves.png") as image:
        image.verify()


def test_report_without_log_or_comparison(tmp_path):
    path = write_report(tmp_path, title="Only metrics",
                        metrics_tables={"run": {"MRR": (0.5, 0.4, 0.6)}})
    text = path.read_text()
    assert "Training curves" not in text and "Paired comparison" not in text
    assert "| MRR | 0.5000 [0.4000, 0.6000] |" in text


def test_bad_inputs_name_the_field_or_line(tmp_path):
    with pytest.raises(ValueError, match=r"\['run'\]\['MRR'\]: missing key 'low'"):
        write_report(tmp_path, title="x", metrics_tables={"run": {"MRR": {"mean": 1, "high": 1}}})
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        load_training_log(tmp_path / "metrics.jsonl")


def test_cli_reads_summaries(tmp_path):
    for name, mean in (("a", 0.3), ("b", 0.2)):
        run = tmp_path / name
        run.mkdir()
        (run / "summary.json").write_text(json.dumps(
            {"metrics": {"HR@1": {"mean": mean, "low": mean - 0.1, "high": mean + 0.1}}}))
    report_main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path)])
    text = (tmp_path / "report.md").read_text()
    assert "| metric | a | b |" in text and "0.2000 [0.1000, 0.3000]" in text
