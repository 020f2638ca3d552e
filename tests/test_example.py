"""examples/custom_loop.py runs as a user would run it, and its printed loss falls."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_custom_loop_runs_and_its_loss_falls():
    """30 DPO steps on 32 toy pairs (β0 = 0.5, NoDO σ = 0.1, HaRS dynamic): the first printed loss
    is near log 2 (policy = reference at step 0, so h ≈ 0 up to the noise) and the last is below
    half of it; seven lines are printed (steps 0, 5, …, 25 and 29)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "custom_loop.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", proc.stdout)]
    assert len(losses) == 7, proc.stdout
    assert abs(losses[0] - 0.6931) < 0.05
    assert losses[-1] < losses[0] / 2
