"""`examples/paper_findings.py --quick` at its smallest setting (2 gloo ranks, every run of
both seeds): it finishes, and its results have every finding, in the documented schema, with
finite numbers. Whether a finding reproduces is measured at real settings (README), not here."""

import json
import math
import os
import subprocess
import sys

from conftest import REPO

FINDINGS = {"interposition vs stack", "noise on expert copies", "grown vs scratch at equal extra compute",
            "sunk cost", "optimizer state after growth"}


def numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from numbers(v)
    elif isinstance(value, float):
        yield value


def test_quick_findings_at_the_smallest_setting(tmp_path):
    out = tmp_path / "findings"
    cmd = [sys.executable, str(REPO / "examples" / "paper_findings.py"), "--quick", "--out", str(out),
           "--base-iters", "8", "--extra-iters", "4", "--points", "2", "--eval-interval", "2",
           "--eval-samples", "8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    assert "[findings] 26/26" in proc.stdout and "reproduced" in proc.stdout  # progress, then the table
    results = json.loads((out / "results.json").read_text())
    assert {f["name"] for f in results["findings"]} == FINDINGS
    for finding in results["findings"]:
        assert {"name", "paper", "ours", "reproduced"} <= finding.keys()
        assert finding["reproduced"] in (True, False, None)
        assert all(math.isfinite(x) for x in numbers(finding["ours"])), finding
    assert results["config"]["seeds"] == 2
    for image in results["plots"]:
        assert (out / image).stat().st_size > 5_000
    (out / "results.json").write_text(json.dumps(dict(results, findings=[])))
    again = subprocess.run([*cmd, "--report-only"], capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert again.returncode == 0 and "[findings] 1/" not in again.stdout, again.stderr[-3000:]
    assert json.loads((out / "results.json").read_text()) == results  # the findings from the runs alone
