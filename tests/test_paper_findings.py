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


def _finished(out, names, val_loss=1.0):
    for name in names:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.jsonl").write_text(json.dumps({"iteration": 4, "val_loss": val_loss}) + "\n")


def test_report_only_reports_the_runs_that_finished(tmp_path):
    """An interrupted run left results.json after its last finished run: --report-only gives
    the findings those runs make, names the pending ones, and plots nothing."""
    out = tmp_path / "findings"
    copy_, reset = "depth-width", "depth-width-optimizer-reset"
    finished = [f"seed{s}/{name}" for name in (copy_, reset) for s in (1, 2)]
    _finished(out, finished)
    _finished(out, ["seed1/base"])  # its metrics are there, but it had not finished
    (out / "results.json").write_text(json.dumps({"wall_seconds": 12.5, "finished_runs": finished}))
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "paper_findings.py"), "--quick",
                           "--out", str(out), "--report-only"], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert f"partial: 4 of {results['runs']} runs finished" in proc.stdout, proc.stdout
    assert [f["name"] for f in results["findings"]] == ["optimizer state after growth"]
    assert set(results["pending"]) == FINDINGS - {"optimizer state after growth"}
    assert results["plots"] == [] and results["wall_seconds"] == 12.5
    assert results["finished_runs"] == finished and not list(out.glob("*.tmp"))


def test_without_matplotlib_it_stops_before_any_run(tmp_path):
    out = tmp_path / "findings"
    script = ("import runpy, sys; sys.modules['matplotlib'] = None; "  # import matplotlib fails
              f"sys.argv = ['paper_findings.py', '--quick', '--out', {str(out)!r}]; "
              f"runpy.run_path({str(REPO / 'examples' / 'paper_findings.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 2 and "matplotlib is not installed" in proc.stderr, proc.stderr[-3000:]
    assert "[findings]" not in proc.stdout and not out.exists()
