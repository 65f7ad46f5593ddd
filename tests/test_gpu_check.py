"""benchmarks/gpu_check.py: the one-command GPU check. Its CPU-side logic runs everywhere
(arguments, plan, budget and timeouts, part isolation, JSON and table); the parts themselves
need CUDA and say so without it."""

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
from gpu_check import Context, Part, Runner  # noqa: E402


def python_part(name, code, budget_s=30.0, **kw):
    return Part(name, f"answers {name}", budget_s, lambda ctx: [sys.executable, "-c", code], gpu=False, **kw)


def write_result(status="ok", summary="fine"):
    """A part body that writes its own result file, as gpu_parts.py does."""
    return ("import json, os; json.dump({'status': %r, 'summary': %r, 'results': {'x': 1}}, "
            "open(os.environ['GPU_CHECK_RESULT'], 'w'))" % (status, summary))


def run_plan(tmp_path, plan, budget_s=60.0, no_cuda=False):
    ctx = Context(out=tmp_path, python=sys.executable, env={"PATH": "/usr/bin:/bin"},
                  args=argparse.Namespace(part_args=[], venv=tmp_path / "venv"))
    (tmp_path / "parts").mkdir(exist_ok=True)
    return Runner(ctx, budget_s, no_cuda).run(plan)


def test_a_crashing_and_a_hanging_part_are_reported_and_the_others_still_run(tmp_path):
    plan = [
        python_part("crash", "import sys; print('boom'); sys.exit(3)"),
        python_part("hang", "import time; time.sleep(120)", budget_s=2),
        python_part("after", write_result(summary="still ran")),
        python_part("needs_crash", write_result(), needs=("crash",)),
        python_part("raises", "raise RuntimeError('half-way')"),
    ]
    t0 = time.monotonic()
    report = run_plan(tmp_path, plan)
    assert time.monotonic() - t0 < 40  # the hanging part was stopped at its 2 s timeout
    parts = report["parts"]
    assert parts["crash"]["status"] == "crashed" and parts["crash"]["returncode"] == 3
    assert "boom" in parts["crash"]["log_tail"]
    assert parts["hang"]["status"] == "timeout" and parts["hang"]["seconds"] < 20
    assert parts["after"]["status"] == "ok" and parts["after"]["summary"] == "still ran"
    assert parts["needs_crash"] == {"answers": "answers needs_crash", "status": "not run",
                                    "reason": "needs crash (crashed)"}
    assert parts["raises"]["status"] == "crashed" and "half-way" in parts["raises"]["log_tail"]
    on_disk = json.loads((tmp_path / "gpu-check.json").read_text())
    assert on_disk["parts"] == parts
    table = gpu_check.table(report)
    for line in ("| crash |", "crashed: exit code 3", "timeout: stopped after", "| still ran |",
                 "not run: needs crash (crashed)"):
        assert line in table
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary file


def test_a_timed_out_part_keeps_the_results_it_wrote(tmp_path):
    code = write_result(status="running", summary="half") + "; import time; time.sleep(120)"
    report = run_plan(tmp_path, [python_part("slow", code, budget_s=3)])
    slow = report["parts"]["slow"]
    assert slow["status"] == "timeout" and slow["results"] == {"x": 1}


def test_the_json_is_written_after_each_part(tmp_path):
    """While the second part runs, the file already holds the first one's result."""
    peek = ("import json, os, sys; d = json.load(open(os.path.join(%r, 'gpu-check.json'))); "
            "sys.exit(0 if d['parts']['first']['status'] == 'ok' and "
            "d['parts']['second']['status'] == 'running' else 7)" % str(tmp_path))
    report = run_plan(tmp_path, [python_part("first", write_result()), python_part("second", peek)])
    assert report["parts"]["second"]["status"] == "ok", report["parts"]["second"]


def test_budget_parts_that_do_not_fit_are_not_started_and_the_last_takes_the_rest(tmp_path):
    plan = [
        python_part("quick", write_result(), budget_s=5),
        python_part("too_big", write_result(), budget_s=50, min_s=1000),
        python_part("rest", write_result(), budget_s=1, min_s=1, elastic=True),
    ]
    report = run_plan(tmp_path, plan, budget_s=100)
    parts = report["parts"]
    assert parts["quick"]["status"] == "ok"
    assert parts["too_big"]["status"] == "not run" and parts["too_big"]["reason"].startswith("budget:")
    assert parts["rest"]["status"] == "ok" and parts["rest"]["timeout_s"] > 50  # not its 1 s budget


def test_a_background_part_runs_beside_the_next_and_is_waited_for_by_what_needs_it(tmp_path):
    marker = tmp_path / "built"
    plan = [
        python_part("build", f"import time; time.sleep(2); open({str(marker)!r}, 'w').close()",
                    background=True),
        python_part("meanwhile", f"import os, sys; sys.exit(5 if os.path.exists({str(marker)!r}) else 0)"),
        python_part("uses_it", f"import os, sys; sys.exit(0 if os.path.exists({str(marker)!r}) else 6)",
                    needs=("build",)),
    ]
    report = run_plan(tmp_path, plan)
    assert {n: p["status"] for n, p in report["parts"].items()} == {
        "build": "ok", "meanwhile": "ok", "uses_it": "ok"}


def test_without_cuda_every_gpu_part_says_not_run_and_nothing_is_installed(tmp_path):
    report = run_plan(tmp_path, gpu_check.parts(), no_cuda=True)
    assert {p["status"] for p in report["parts"].values()} == {"not run"}
    assert not (tmp_path / "venv").exists() and not (tmp_path / "logs").exists()
    table = gpu_check.table(report)
    assert table.count("not run: no CUDA") == len(gpu_check.parts())


def _cli(*args, timeout=60):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), *args],
                          capture_output=True, text=True, timeout=timeout)


def test_dry_run_prints_the_plan_and_budget_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    proc = _cli("--dry-run", "--out", str(out), "--budget-s", "300")
    assert proc.returncode == 0, proc.stderr
    assert "budget 300 s" in proc.stdout
    for part in gpu_check.parts():
        assert part.name in proc.stdout
    assert gpu_check.TORCH in proc.stdout and gpu_check.TE_VERSION in proc.stdout
    assert not out.exists()


def test_parts_selects_and_python_drops_the_installs():
    plan = gpu_check.select(gpu_check.parts(), "env,te_growth", python_given=True)
    assert [p.name for p in plan] == ["env", "te_growth"]
    assert plan[1].needs == ()  # the given interpreter is taken as installed


def test_wheels_install_first_offline_for_the_given_interpreter_and_every_part_waits(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "megatron_core-0.19.2-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"")
    args = gpu_check.parse_args(["--wheels", str(wheels), "--out", str(tmp_path / "out")])
    assert args.python == "python3"
    plan = gpu_check.with_wheels(gpu_check.select(gpu_check.parts(), None, python_given=True))
    assert plan[0].name == "install_wheels" and not any(p.name in ("install", "install_te") for p in plan)
    assert all("install_wheels" in p.needs for p in plan[1:])
    ctx = Context(out=tmp_path / "out", python="python3", env={}, args=args)
    argv = shlex.split(plan[0].command(ctx)[-1])
    assert argv[:4] == ["python3", "-m", "pip", "install"] and "--no-index" in argv and "--no-deps" in argv
    assert argv[argv.index("--target") + 1] == str(tmp_path / "out" / "site")
    assert argv[-1].endswith(".whl")
    proc = _cli("--dry-run", "--wheels", str(wheels))
    assert proc.returncode == 0 and proc.stdout.index("install_wheels") < proc.stdout.index("env "), proc.stdout


@pytest.mark.parametrize("args, flag", [(["--parts", "env,nope"], "--parts"),
                                        (["--wheels", "/nonexistent/wheels"], "--wheels"),
                                        (["--budget-s", "0"], "--budget-s"),
                                        (["--python", "/nonexistent/python"], "--python")])
def test_bad_flags_are_one_line_exit_2(tmp_path, args, flag):
    proc = _cli(*args, "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(gpu_check.gpu_present(), reason="on a GPU machine the command installs and runs everything")
def test_the_command_on_a_machine_without_a_gpu_reports_not_run(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "not run: no CUDA" in proc.stdout
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert report["parts"]["te_growth"]["reason"] == "no CUDA"
    assert (tmp_path / "gpu-check.md").read_text().startswith("| part |")


def test_the_parts_module_imports_without_torch():
    """Its imports are the standard library's: it loads where torch, CUDA or TE are missing."""
    code = ("import sys; sys.path.insert(0, %r); import gpu_parts; "
            "assert 'torch' not in sys.modules and 'megatron' not in sys.modules, sorted(sys.modules)"
            % str(ROOT / "benchmarks"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_the_paper_setting_fits_the_time_given():
    import gpu_parts

    assert gpu_parts.paper_setting(30, 0.05)["base_iters"] == 0
    setting = gpu_parts.paper_setting(560, 0.05)
    assert setting["base_iters"] >= 1000 and setting["base_iters"] % setting["points"] == 0
    steps = 2 * (setting["base_iters"] + 14 * setting["extra_iters"])
    assert steps * 0.05 <= 560


@pytest.mark.parametrize("part", ["nccl_hook", "te_growth", "step_time", "demo", "paper"])
def test_each_gpu_part_without_cuda_says_not_run_no_cuda(tmp_path, part, monkeypatch):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: the part runs (test_the_nccl_part_runs_on_cuda)")
    import gpu_parts

    monkeypatch.delenv("GPU_CHECK_RESULT", raising=False)
    assert gpu_parts.main([part, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "parts" / f"{part}.json").read_text())
    assert result["status"] == "not run" and result["summary"] == "not run: no CUDA"


def test_the_nccl_part_runs_on_cuda(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU: the load hook under NCCL into CUDA shards")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_parts.py"), "nccl_hook",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    result = json.loads((tmp_path / "parts" / "nccl_hook.json").read_text())
    assert proc.returncode == 0 and result["status"] == "ok", (result, proc.stdout[-3000:])
