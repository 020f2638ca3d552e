"""The run-level report gathers evaluations, baselines, comparisons and training curves."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from hanorec.summary import collect_tables, write_summary


def _metric(mean, low, high):
    return {"mean": mean, "low": low, "high": high, "n": 10}


def test_summary_reads_every_stage_and_writes_plots(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "eval" / "sft").mkdir(parents=True)
    (run / "eval" / "sft" / "summary.json").write_text(
        json.dumps(
            {
                "metrics": {
                    "candidates/HR@1": _metric(0.25, 0.2, 0.3),
                    "hit1/AUC": _metric(0.61, 0.55, 0.66),
                }
            }
        )
    )
    (run / "eval" / "sft"
     / "comparison.md").write_text("# a vs b\n\n| protocol | metric |\n|---|---|\n| candidates "
                                   "| HR@1 |\n")
    (run / "baselines" / "sasrec").mkdir(parents=True)
    (run / "baselines" / "sasrec"
     / "summary.json").write_text(json.dumps({"model": "sasrec", "protocol": "candidates",
                                              "metrics": {"HR@1": _metric(0.42, 0.39, 0.45)}}))
    (run / "sft").mkdir()
    (run / "sft"
     / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 2.0 / s}) + "\n"
                                           for s in (1, 2, 3)))

    tables = collect_tables(run)
    assert tables["SASRec"]["candidates/HR@1"] == (0.42, 0.39, 0.45)
    assert tables["SFT"]["hit1/AUC"] == (0.61, 0.55, 0.66)
    report = write_summary(run)
    text = report.read_text()
    assert "0.420 [0.390, 0.450]" in text and "0.250 [0.200, 0.300]" in text
    assert "| candidates | HR@1 |" in text  # the paired comparison is carried over
    for png in ("models.png", "sft_curves.png"):
        assert f"plots/{png}" in text
        with Image.open(run / "plots" / png) as image:
            assert image.size[0] > 100
    assert "report:" in capsys.readouterr().out


def test_summary_of_an_empty_run_says_so(tmp_path):
    with pytest.raises(ValueError, match="nothing to report"):
        write_summary(tmp_path)
