"""One GPU check: Transformer Engine, bf16, FP8 state, NCCL, step time after growth.

    bash benchmarks/gpu_check.sh                  # install the pinned stack, run every part
    bash benchmarks/gpu_check.sh --dry-run        # the plan and its time budget; runs nothing
    bash benchmarks/gpu_check.sh --parts te_growth,step_time --python .venv-gpu/bin/python
    bash benchmarks/gpu_check.sh --wheels wheels/  # no registry: the machine's torch + carried wheels

Made for one H100/H200 machine that starts bare (Python 3.12 with pip, the CUDA driver, the
package registry and nothing else): it makes `.venv-gpu` with the pinned stack (Transformer
Engine is built in the background while the parts that do not need it run), then runs each part
in its own process with its own timeout, inside one overall `--budget-s`. A part that crashes or
times out is reported and the others still run; OUT/gpu-check.json is rewritten (atomically)
after every part, and a table is printed at the end. Parts (`benchmarks/gpu_parts.py`):

  env         versions: torch, CUDA, GPU, NCCL, megatron-core, Transformer Engine
  nccl_hook   the load hook under NCCL (world size 1): CUDA shards, bf16 and fp32, bitwise the CPU's
  demo        examples/demo.py at a GPU setting
  te_growth   TE-spec grouped-GEMM MoE grown at load: logits at alpha 0, FP8 _extra_state, FP8 params
  step_time   grown vs freshly initialised: 20 training steps (time, memory); hook vs plain load time
  paper       examples/paper_findings.py sized to the time left

On a GPU machine without the package registry, `--wheels DIR` installs the wheels in DIR
(offline, into OUT/site) for the interpreter `--python` names (default python3, with its own
torch) instead of the pinned stack; fetch them where the registry is reachable with
`pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
--platform manylinux_2_28_x86_64 -d DIR megatron-core==0.19.2`.

Only the standard library is imported here: this runs before anything is installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PARTS_SCRIPT = HERE / "gpu_parts.py"

# The stack a bare machine gets. torch 2.13.0 from PyPI is built for CUDA 13.0 (it pins
# cuda-toolkit 13.0.3, nvidia-cudnn-cu13 and triton 3.7.1); Transformer Engine's torch extension
# (transformer_engine_torch) is published as a source package only, so it is compiled here
# against that torch, with nvcc from the same CUDA 13.0 toolkit wheels when no system CUDA exists.
TORCH = "torch==2.13.0"
BASE_PINS = [TORCH, "triton==3.7.1", "megatron-core==0.19.2", "numpy", "einops", "psutil",
             "pytest", "matplotlib", "packaging", "setuptools", "wheel", "ninja", "pybind11"]
TE_VERSION = "2.20.2"
TE_PINS = [f"transformer-engine[core_cu13,pytorch]=={TE_VERSION}"]
NVCC_PINS = ["cuda-toolkit[nvcc,cccl,crt,cudart,cublas,curand,cusolver,cusparse,nvrtc,nvtx]==13.0.3"]

STATUS_OK = "ok"
NOT_RUN = "not run"


@dataclasses.dataclass
class Part:
    """One step of the check: a command run in its own process (session) with a timeout."""

    name: str
    answers: str  # what it measures, for the table
    budget_s: float  # planned seconds: its timeout, unless less is left
    command: Callable[["Context"], list[str]]
    min_s: float = 20.0  # not started with less than this left
    needs: tuple[str, ...] = ()  # parts that must have ended "ok" first (waited for if in background)
    background: bool = False  # started, then waited for only by the parts that need it
    elastic: bool = False  # gets all the time that is left (the last part)
    gpu: bool = True  # "not run: no CUDA" on a machine without a GPU (unless --python is given)


@dataclasses.dataclass
class Context:
    out: Path
    python: str  # the interpreter the parts run in
    env: dict
    args: argparse.Namespace


# --- the parts ---------------------------------------------------------------------------------
def _pip(ctx: Context, *packages: str, flags: tuple[str, ...] = ()) -> str:
    return " ".join([shlex.quote(ctx.python), "-m", "pip", "install", "--no-input",
                     "--disable-pip-version-check", *map(shlex.quote, (*flags, *packages))])


def install_command(ctx: Context) -> list[str]:
    venv, py = shlex.quote(str(ctx.args.venv)), shlex.quote(sys.executable)
    return ["bash", "-c", " && ".join([
        f"({py} -m venv {venv} || ({py} -m pip install --user virtualenv && {py} -m virtualenv {venv}))",
        _pip(ctx, "--upgrade", "pip"),
        _pip(ctx, *BASE_PINS),
        f"{shlex.quote(ctx.python)} -c 'import torch; print(torch.__version__, torch.version.cuda)'",
    ])]


def install_te_command(ctx: Context) -> list[str]:
    """nvcc from the CUDA 13.0 wheels if the machine has none, cuDNN's headers from torch's cuDNN
    wheel; TE built against the installed torch (no build isolation, or pip would build it
    against another torch)."""
    py = shlex.quote(ctx.python)
    nvidia = f"$({py} -c 'import nvidia; print(list(nvidia.__path__)[0])')"
    return ["bash", "-c", " && ".join([
        f"NVIDIA_DIR={nvidia}",
        "if ! command -v nvcc >/dev/null && [ -z \"${CUDA_HOME:-}\" ]; then " + _pip(ctx, *NVCC_PINS)
        + " && NVCC=$(find \"$NVIDIA_DIR\" -name nvcc -type f | head -n 1)"
        + " && export CUDA_HOME=$(dirname \"$(dirname \"$NVCC\")\") && export PATH=$CUDA_HOME/bin:$PATH; fi",
        "if [ -d \"$NVIDIA_DIR/cudnn\" ]; then export CUDNN_PATH=$NVIDIA_DIR/cudnn CUDNN_HOME=$NVIDIA_DIR/cudnn; fi",
        "echo CUDA_HOME=${CUDA_HOME:-system} CUDNN_PATH=${CUDNN_PATH:-system} && (nvcc --version | tail -n 1 || true)",
        f"export NVTE_FRAMEWORK=pytorch MAX_JOBS={os.cpu_count() or 8}",
        _pip(ctx, *TE_PINS, flags=("--no-build-isolation",)),
        f"{py} -c 'import transformer_engine.pytorch as te, transformer_engine; "
        "print(\"transformer_engine\", transformer_engine.__version__)'",
    ])]


def install_wheels_command(ctx: Context) -> list[str]:
    wheels = sorted(str(w) for w in Path(ctx.args.wheels).glob("*.whl"))
    return ["bash", "-c", _pip(ctx, *wheels, flags=("--no-index", "--no-deps", "--no-compile", "--upgrade",
                                                    "--target", str(site_dir(ctx.out))))]


def site_dir(out: Path) -> Path:
    return out / "site"


def with_wheels(plan: list[Part]) -> list[Part]:
    """`--wheels`: the carried wheels installed first; every other part waits for them."""
    install = Part("install_wheels", "pip --no-index: the carried wheels, for the machine's own torch",
                   60, install_wheels_command, min_s=10)
    return [install] + [dataclasses.replace(p, needs=(*p.needs, install.name)) for p in plan]


def part_command(name: str, *extra: str) -> Callable[[Context], list[str]]:
    def command(ctx: Context) -> list[str]:
        return [ctx.python, str(PARTS_SCRIPT), name, "--out", str(ctx.out), *extra,
                *ctx.args.part_args]
    return command


def parts() -> list[Part]:
    """Every part in run order, with its planned seconds on one H100/H200 (estimates: no GPU
    machine has run this yet). A part's budget is its timeout; parts that end early leave their
    time to the last one."""
    return [
        Part("install", f"pip: {TORCH}, megatron-core 0.19.2, ... into .venv-gpu", 150, install_command,
             min_s=60),
        Part("install_te", f"Transformer Engine {TE_VERSION} built against that torch (background)", 400,
             install_te_command, min_s=60, needs=("install",), background=True),
        Part("env", "versions: torch, CUDA, GPU, NCCL, megatron-core, TE", 30, part_command("env"),
             min_s=10, needs=("install",)),
        Part("nccl_hook", "load hook under NCCL: CUDA shards bf16/fp32 = the CPU's, bitwise", 45,
             part_command("nccl_hook"), needs=("install",)),
        Part("demo", "examples/demo.py at a GPU setting (grow, train, beat scratch)", 120,
             part_command("demo"), min_s=40, needs=("install",)),
        Part("step_time", "grown vs fresh: 20 steps (time, memory); hook vs plain load", 150,
             part_command("step_time"), min_s=30, needs=("install",)),
        Part("te_growth", "TE spec: logits at alpha 0, FP8 _extra_state, FP8 forward, FP8 params", 75,
             part_command("te_growth"), min_s=30, needs=("install", "install_te")),
        Part("paper", "examples/paper_findings.py sized to the time left", 45, part_command("paper"),
             min_s=45, needs=("install",), elastic=True),
    ]


# --- running ------------------------------------------------------------------------------------
def write_json(path: Path, obj) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def result_path(out: Path, name: str) -> Path:
    return out / "parts" / f"{name}.json"


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _stop(proc: subprocess.Popen) -> None:
    """The part's whole process group: SIGTERM, then SIGKILL after a grace period."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


class Runner:
    """Runs parts in order inside one deadline; records each part as it ends."""

    def __init__(self, ctx: Context, budget_s: float, no_cuda: bool, clock=time.monotonic):
        self.ctx, self.clock, self.no_cuda = ctx, clock, no_cuda
        self.deadline = clock() + budget_s
        self.report = {"budget_s": budget_s, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       "python": ctx.python, "parts": {}}
        self.running: dict[str, tuple[Part, subprocess.Popen, float, float]] = {}

    @property
    def json_path(self) -> Path:
        return self.ctx.out / "gpu-check.json"

    def left(self) -> float:
        return self.deadline - self.clock()

    def record(self, part: Part, entry: dict) -> None:
        self.report["parts"][part.name] = {"answers": part.answers, **entry}
        write_json(self.json_path, self.report)

    def status(self, name: str) -> Optional[str]:
        return self.report["parts"].get(name, {}).get("status")

    def run(self, plan: list[Part]) -> dict:
        for part in plan:
            self.report["parts"][part.name] = {"answers": part.answers, "status": "pending"}
        write_json(self.json_path, self.report)
        for part in plan:
            self.start(part)
        for name in list(self.running):
            self.wait(name, self.left())
        self.report["wall_s"] = round(self.clock() - (self.deadline - self.report["budget_s"]), 1)
        write_json(self.json_path, self.report)
        return self.report

    def start(self, part: Part) -> None:
        if part.gpu and self.no_cuda:
            return self.record(part, {"status": NOT_RUN, "reason": "no CUDA"})
        for need in part.needs:
            if need in self.running:  # a background part: wait, leaving this part its minimum
                self.wait(need, max(0.0, self.left() - part.min_s))
            if self.status(need) != STATUS_OK:
                return self.record(part, {"status": NOT_RUN,
                                          "reason": f"needs {need} ({self.status(need)})"})
        left = self.left()
        if left < part.min_s:
            return self.record(part, {"status": NOT_RUN,
                                      "reason": f"budget: {left:.0f} s left, needs {part.min_s:.0f} s"})
        timeout = left if part.elastic else min(part.budget_s, left)
        result = result_path(self.ctx.out, part.name)
        result.unlink(missing_ok=True)
        log = self.ctx.out / "logs" / f"{part.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(self.ctx.env, GPU_CHECK_RESULT=str(result), GPU_CHECK_TIMEOUT_S=f"{timeout:.0f}")
        with open(log, "w") as f:
            proc = subprocess.Popen(part.command(self.ctx), stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, cwd=ROOT, start_new_session=True)
        self.running[part.name] = (part, proc, self.clock(), timeout)
        self.record(part, {"status": "running", "timeout_s": round(timeout)})
        print(f"[gpu-check] {part.name}: started (timeout {timeout:.0f} s, "
              f"{self.left():.0f} s of the budget left)", flush=True)
        if not part.background:
            self.wait(part.name, timeout)

    def wait(self, name: str, at_most: float) -> None:
        """Wait for a running part, up to its own timeout and `at_most` more seconds."""
        part, proc, started, timeout = self.running[name]
        remaining = min(timeout - (self.clock() - started), at_most)
        timed_out = False
        try:
            proc.wait(max(0.0, remaining))
        except subprocess.TimeoutExpired:
            _stop(proc)
            timed_out = True
        del self.running[name]
        self.record(part, {"timeout_s": round(timeout),
                           **self.outcome(part, proc.returncode, timed_out, self.clock() - started)})
        entry = self.report["parts"][name]
        print(f"[gpu-check] {name}: {entry['status']} in {entry['seconds']:.0f} s"
              + (f" ({entry['reason']})" if entry.get("reason") else ""), flush=True)

    def outcome(self, part: Part, rc: Optional[int], timed_out: bool, seconds: float) -> dict:
        """The part's own result file (partial if it was stopped), with how it ended."""
        log = self.ctx.out / "logs" / f"{part.name}.log"
        entry: dict = {"seconds": round(seconds, 1), "returncode": rc, "log": str(log)}
        try:
            entry.update(json.loads(result_path(self.ctx.out, part.name).read_text()))
        except (OSError, ValueError):
            pass
        if timed_out:
            entry.update(status="timeout", reason=f"stopped after {seconds:.0f} s")
        elif rc != 0 and entry.get("status") in (None, STATUS_OK, "running"):
            entry.update(status="crashed", reason=f"exit code {rc}")
        elif "status" not in entry:
            entry["status"] = STATUS_OK
        if entry["status"] not in (STATUS_OK, NOT_RUN, "skipped"):
            entry["log_tail"] = _tail(log)
        return entry


# --- reporting ---------------------------------------------------------------------------------
def table(report: dict) -> str:
    rows = ["| part | answers | status | s | result |", "|---|---|---|---|---|"]
    for name, p in report["parts"].items():
        status = p.get("status", "?")
        if p.get("reason") and status != STATUS_OK:
            status = f"{status}: {p['reason']}"
        summary = p.get("summary") or ""
        if not summary and p.get("status") in ("crashed", "timeout", "failed"):
            summary = (p.get("error") or p.get("log_tail", "").strip().splitlines()[-1:] or [""])[-1]
        seconds = f"{p['seconds']:.0f}" if "seconds" in p else ""
        rows.append(f"| {name} | {p.get('answers', '')} | {status} | {seconds} | "
                    f"{summary.replace('|', '/')[:300]} |")
    return "\n".join(rows)


def plan_text(plan: list[Part], budget_s: float, no_cuda: bool) -> str:
    lines = [f"budget {budget_s:.0f} s in all (--budget-s); parts in order:"]
    t = 0.0
    for part in plan:
        how = "background" if part.background else ("the rest" if part.elastic else "")
        gate = " [not run: no CUDA]" if part.gpu and no_cuda else ""
        needs = f" after {'+'.join(part.needs)}" if part.needs else ""
        lines.append(f"  {part.name:10s} {part.budget_s:5.0f} s {how:10s} {part.answers}{needs}{gate}")
        if not part.background:
            t += part.budget_s
    lines.append(f"planned foreground time: {t:.0f} s; the background build overlaps env to "
                 "step_time, te_growth waits for it (and step_time uses TE only if it is built by then)")
    return "\n".join(lines)


def gpu_present() -> bool:
    """Without importing torch (it may not be installed yet): the driver lists a GPU."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def select(plan: list[Part], names: Optional[str], python_given: bool) -> list[Part]:
    """--parts (comma-separated); installs are dropped when --python names an interpreter."""
    known = {p.name for p in plan}
    chosen = known if names is None else set(filter(None, names.split(",")))
    unknown = chosen - known
    if unknown:
        raise UsageError(f"--parts: unknown {', '.join(sorted(unknown))}; choose from "
                         f"{', '.join(p.name for p in plan)}")
    out = [p for p in plan if p.name in chosen and not (python_given and p.name.startswith("install"))]
    dropped = {p.name for p in plan} - {p.name for p in out}
    for p in out:  # a dependency not selected is assumed present
        p.needs = tuple(n for n in p.needs if n not in dropped)
    return out


class UsageError(Exception):
    """A bad flag: one line naming it, exit code 2."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", type=Path, default=ROOT / "gpu-check-out", help="results and logs")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="seconds for everything, installs included (default 480: 8 minutes)")
    p.add_argument("--parts", default=None, help="comma-separated subset, in run order")
    p.add_argument("--python", default=None,
                   help="run the parts in this interpreter (its stack already installed: no installs)")
    p.add_argument("--venv", type=Path, default=None, help="where the install makes its venv "
                   "(default: .venv-gpu at the repository root)")
    p.add_argument("--wheels", type=Path, default=None,
                   help="a machine without the package registry: install the wheels in this "
                   "directory for --python (default python3) instead of the pinned stack")
    p.add_argument("--dry-run", action="store_true", help="print the plan and budget, run nothing")
    p.add_argument("part_args", nargs="*", help="after --: passed to every part (gpu_parts.py --help)")
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        raise UsageError(f"--budget-s {args.budget_s:g}: give a positive number of seconds")
    if args.wheels is not None:
        if not any(args.wheels.glob("*.whl")):
            raise UsageError(f"--wheels {args.wheels}: no .whl files there; download them where the "
                             "registry is reachable (see --help)")
        args.python = args.python or "python3"
    if args.python is not None and shutil.which(args.python) is None:
        raise UsageError(f"--python {args.python}: no such interpreter; give the path of one "
                         "with the stack installed, or leave it out to install one")
    return args


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        plan = select(parts(), args.parts, args.python is not None)
        if args.wheels is not None:
            plan = with_wheels(plan)
    except UsageError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    no_cuda = not gpu_present() and args.python is None
    if args.dry_run:
        print(plan_text(plan, args.budget_s, no_cuda))
        return 0
    out = args.out.resolve()
    venv = (args.venv or ROOT / ".venv-gpu").resolve()
    args.venv = venv
    python = args.python or str(venv / "bin" / "python")
    paths = [str(ROOT), str(site_dir(out)) if args.wheels is not None else None, os.environ.get("PYTHONPATH")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)),
               TORCHDYNAMO_DISABLE="1", PYTHONUNBUFFERED="1")
    ctx = Context(out=out, python=python, env=env, args=args)
    out.mkdir(parents=True, exist_ok=True)
    report = Runner(ctx, args.budget_s, no_cuda).run(plan)
    text = table(report)
    (out / "gpu-check.md").write_text(text + "\n")
    print(text)
    print(f"[gpu-check] {out / 'gpu-check.json'} ({report['wall_s']:.0f} s)")
    bad = [n for n, p in report["parts"].items() if p["status"] not in (STATUS_OK, NOT_RUN, "skipped")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
