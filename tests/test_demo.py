"""The README's main command, end to end at its smallest setting (2 gloo ranks per phase)."""

import json
import math
import os
import subprocess
import sys

from conftest import REPO


def test_demo_runs_end_to_end_and_its_numbers_make_sense(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, str(REPO / "examples" / "demo.py"), "--out", str(out),
           "--base-iters", "8", "--extra-iters", "4", "--eval-interval", "4",
           "--eval-samples", "16", "--warmup-iters", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    assert "grown, right after growth" in proc.stdout  # the table
    assert "base     iteration" in proc.stdout  # progress while it runs
    results = json.loads((out / "results.json").read_text())
    numbers = ["base_at_growth", "grown_right_after_growth", "grown_after_extra",
               "scratch_at_start", "scratch_after_extra"]
    assert all(math.isfinite(results[k]) for k in numbers)
    # Growth keeps most of what the base learned: far below a fresh model of the same size.
    assert results["grown_right_after_growth"] < results["scratch_at_start"] - 0.2
    assert results["grown_after_extra"] < results["scratch_after_extra"]
    assert abs(results["grown_right_after_growth"] - results["base_at_growth"]) < 0.2
    assert (out / "loss_curves.png").stat().st_size > 10_000
    assert (out / "grown" / "latest_checkpointed_iteration.txt").read_text() == "12"
